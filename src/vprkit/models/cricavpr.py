"""CricaVPR (CVPR 2024): a frozen DINOv2 ViT-B/14 with a multi-scale convolutional adapter in
every block, a regional GeM pyramid and a cross-image transformer encoder that attends across
the images of a batch.

Matches the official `network.py`, `backbone/dinov2/block.py` and `train.py`
(Lu-Feng/CricaVPR):

    x = x + ls2( mlp(norm2(x)) + 0.2 * adapter(norm2(x)) )      (the attention half is plain)
    adapter(h): a = relu(D_fc1(h)); patch tokens of `a` as a map -> cat(branch1, branch2,
                branch3) -> tokens; prefix (cls) tokens keep `a`; then + a; then D_fc2

- descriptor: [final-norm cls, GeM of 2x2 regions, GeM of 3x3 regions] (14 x D, one shared GeM
  p, tokens L2-normalized first) -> `nn.TransformerEncoder` (2 layers, 16 heads, ff 2048,
  GELU, post-LN) fed (B, 14, D) *sequence-first*, so region i of every image in the batch
  attends to region i of every other image -> flatten (14 * D = 10,752) -> L2 norm.
- descriptors therefore depend on which images share a batch: the paper's numbers come from
  batches of 16 (8 on Pitts*) in sorted order, queries and database encoded separately.
  `batch_mode="single"` encodes every image alone (what a batch of 1 gives).

Parameter names are the official ones (`backbone.blocks.N.adapter.branch2.1.bn.running_mean`,
`aggregation.1.p`, `encoder.layers.1.self_attn.in_proj_weight`), so `CricaVPR.pth` loads
strictly. The official code hard-codes a 16x16 grid; here any grid of at least 3x3 works, and
at 16x16 the region slices are the official ones (see `region_bounds`).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from itertools import pairwise
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vprkit.models.backbones import Backbone, dinov2_config, is_backbone_only, with_backbone_weights
from vprkit.models.info import ModelInfo
from vprkit.models.outputs import DescriptorOutput
from vprkit.models.pooling import Flatten, GeM, L2Norm
from vprkit.models.registry import register_model
from vprkit.models.vit import TokenLayout

log = logging.getLogger(__name__)

PARALLEL_SCALE = 0.2  # the adapter's weight beside the MLP, inside ls2
CONV_INIT = 1e-5  # train.py sets every adapter Conv2d weight and bias to this constant
BN_EPS = 1e-3
PYRAMID = (2, 3)  # region grids after the cls token: 1 + 4 + 9 = 14 tokens
NUM_TOKENS = 1 + sum(n * n for n in PYRAMID)
# coupled: the images of one call attend to each other; single: each image alone;
# gathered: under torch.distributed, the images of every rank's call attend to each other
# (the whole global batch), each rank keeping its own slice of the result.
BATCH_MODES = ("coupled", "single", "gathered")


class BasicConv2d(nn.Module):
    """Conv (with bias) -> BatchNorm (eps 1e-3) -> ReLU, as the official `BasicConv2d`."""

    def __init__(self, in_channels: int, out_channels: int, **kwargs: Any) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, bias=True, **kwargs)
        self.bn = nn.BatchNorm2d(out_channels, eps=BN_EPS)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.bn(self.conv(x)))


class MulConvAdapter(nn.Module):
    """The official multi-scale conv adapter, `MulConvAdapter(768, 384, 192, 24, 96, 24, 96)`
    for ViT-B. No outer skip connection (`skip_connect=False` in the official block).

    Init as `train.py` leaves it: D_fc1 trunc-normal(0.02) with zero bias (DINOv2's timm init),
    D_fc2 all zeros (a fresh adapter outputs 0), every conv weight and bias 1e-5, BN default.
    """

    def __init__(
        self,
        fc_in_channels: int = 768,
        in_channels: int = 384,
        ch1x1: int = 192,
        ch3x3red: int = 24,
        ch3x3: int = 96,
        ch5x5red: int = 24,
        ch5x5: int = 96,
    ) -> None:
        super().__init__()
        if ch1x1 + ch3x3 + ch5x5 != in_channels:
            # the inner residual adds the fc1 activation to the concatenated branches
            raise ValueError(
                f"branch widths {ch1x1}+{ch3x3}+{ch5x5} must add up to in_channels {in_channels}"
            )
        self.branch1 = BasicConv2d(in_channels, ch1x1, kernel_size=1)
        self.branch2 = nn.Sequential(
            BasicConv2d(in_channels, ch3x3red, kernel_size=1),
            BasicConv2d(ch3x3red, ch3x3, kernel_size=3, padding=1),
        )
        self.branch3 = nn.Sequential(
            BasicConv2d(in_channels, ch5x5red, kernel_size=1),
            BasicConv2d(ch5x5red, ch5x5, kernel_size=5, padding=2),
        )
        self.D_fc1 = nn.Linear(fc_in_channels, in_channels)
        self.D_fc2 = nn.Linear(in_channels, fc_in_channels)
        self.reset_parameters()

    @classmethod
    def for_dim(cls, dim: int) -> MulConvAdapter:
        """The official widths scaled to `dim` (768 -> 384, 192, 24, 96, 24, 96)."""
        if dim % 32:
            raise ValueError(f"MulConvAdapter needs an embed_dim divisible by 32, got {dim}")
        return cls(dim, dim // 2, dim // 4, dim // 32, dim // 8, dim // 32, dim // 8)

    def reset_parameters(self) -> None:
        nn.init.trunc_normal_(self.D_fc1.weight, std=0.02)
        nn.init.zeros_(self.D_fc1.bias)
        nn.init.zeros_(self.D_fc2.weight)
        nn.init.zeros_(self.D_fc2.bias)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.constant_(m.weight, CONV_INIT)
                nn.init.constant_(m.bias, CONV_INIT)
            elif isinstance(m, nn.BatchNorm2d):
                m.reset_parameters()

    def forward(self, x: Tensor, layout: TokenLayout) -> Tensor:
        a = F.relu(self.D_fc1(x))
        B, T, C = a.shape
        n = layout.num_prefix_tokens
        rows, cols = layout.grid_size
        if T - n != rows * cols:
            raise ValueError(f"{T - n} patch tokens do not fill a {rows}x{cols} grid")
        fmap = a[:, n:].transpose(1, 2).reshape(B, C, rows, cols)
        conv = torch.cat((self.branch1(fmap), self.branch2(fmap), self.branch3(fmap)), dim=1)
        # prefix tokens skip the convs; the inner residual then doubles them
        out = torch.cat((a[:, :n], conv.flatten(2).transpose(1, 2)), dim=1) + a
        return self.D_fc2(out)


def region_bounds(n: int, parts: int) -> list[tuple[int, int]]:
    """Split `n` rows (or columns) into `parts` contiguous slices: boundary k is
    round(k * n / parts), halves rounded up. Sizes differ by at most one, the split is
    symmetric unless a boundary falls on a half, and at n = 16 it gives the official slices:
    2 -> [0:8] [8:16], 3 -> [0:5] [5:11] [11:16] (5/6/5)."""
    if parts < 1 or n < parts:
        raise ValueError(f"cannot split {n} patches into {parts} non-empty regions")
    # integer form of floor(k * n / parts + 1/2): exact, no float ties
    edges = [(2 * k * n + parts) // (2 * parts) for k in range(parts + 1)]
    return list(pairwise(edges))


def describe_eval_protocol(batch_size: int, batch_mode: str = "coupled") -> str:
    """One line for a run log: how the batch shapes CricaVPR's descriptors."""
    if batch_mode == "single":
        return (
            "CricaVPR in single mode: every image encoded alone (cross-image attention "
            "trivial), which differs from the paper's protocol (batches of 16, 8 on Pitts*)"
        )
    line = (
        f"CricaVPR descriptors depend on which images share a batch (cross-image encoder), "
        f"so the batch size ({batch_size}) and the image order are part of the protocol"
    )
    if batch_size == 1:
        line += (
            "; WARNING: batch size 1 makes the cross-image attention trivial and differs "
            "from the paper (16, or 8 on Pitts*)"
        )
    return line


INFO = ModelInfo(
    image_size=(224, 224),  # `--resize 224 224`: the 16x16 grid the official code assumes
    # The inference batch the paper's numbers use: 16, halved to 8 for Pitts30k/250k (the
    # official `eval.py` halves it when the dataset name starts with "pitts"; matched here
    # ignoring case, so a folder named "Pitts30k" gets the same protocol).
    infer_batch_size=16,
    batch_size_by_prefix=(("pitts", 8),),
    protocol=lambda model, batch_size: describe_eval_protocol(batch_size, model.batch_mode),
    # What the official `train.py` trains: the backbone's parameters whose name contains
    # `adapter` (every other backbone parameter is frozen), the encoder and GeM p.
    train_only=("backbone.*adapter*", "encoder.*", "aggregation.*"),
    weights=("cricavpr",),
)


class CricaVPR(nn.Module):
    """`forward(images)` -> `DescriptorOutput(global_desc (B, 14 * D))`, L2-normalized.

    In the default `batch_mode="coupled"` the images of one call attend to each other (the
    paper's protocol); `"single"` encodes each image as if it were alone in its batch.
    The backbone is frozen except its adapters (as `train.py` does), so `requires_grad`
    marks exactly the trainable parameters: adapters, encoder and GeM p.
    """

    def __init__(
        self,
        backbone: Backbone,
        encoder_heads: int = 16,
        encoder_ff_dim: int = 2048,
        encoder_layers: int = 2,
        encoder_dropout: float = 0.1,
        batch_mode: str = "coupled",
    ) -> None:
        super().__init__()
        dim = backbone.embed_dim
        for block in backbone.blocks:
            block.set_parallel_adapter(MulConvAdapter.for_dim(dim), "adapter", PARALLEL_SCALE)
        self.backbone = backbone
        self.aggregation = nn.Sequential(L2Norm(dim=1), GeM(p=3.0, eps=1e-6), Flatten())
        layer = nn.TransformerEncoderLayer(
            d_model=dim,
            nhead=encoder_heads,
            dim_feedforward=encoder_ff_dim,
            activation="gelu",
            dropout=encoder_dropout,
            batch_first=False,  # the official layout: the images of a batch are the sequence
        )
        # The layers start as copies of one layer, as in the official code. Nested tensors
        # need batch_first and a padding mask; disabling them only silences a warning.
        self.encoder = nn.TransformerEncoder(layer, encoder_layers, enable_nested_tensor=False)
        self.batch_mode = batch_mode
        self.freeze_backbone()

    @property
    def batch_mode(self) -> str:
        return self._batch_mode

    @batch_mode.setter
    def batch_mode(self, mode: str) -> None:
        if mode not in BATCH_MODES:
            raise ValueError(f"batch_mode must be one of {BATCH_MODES}, got {mode!r}")
        self._batch_mode = mode

    @property
    def global_dim(self) -> int:
        return NUM_TOKENS * self.backbone.embed_dim

    def freeze_backbone(self) -> None:
        """Freeze every backbone parameter whose name does not contain `adapter`; the encoder
        and GeM p stay trainable."""
        for name, p in self.backbone.named_parameters():
            p.requires_grad_("adapter" in name)
        for p in (*self.encoder.parameters(), *self.aggregation.parameters()):
            p.requires_grad_(True)

    def trainable_parameters(self) -> Iterator[nn.Parameter]:
        """The parameters `freeze_backbone` leaves trainable."""
        return (p for p in self.parameters() if p.requires_grad)

    def parameter_counts(self) -> dict[str, int]:
        """Parameter counts: adapters, encoder, GeM p, frozen backbone, trainable and total."""
        backbone = dict(self.backbone.named_parameters())
        return {
            "adapters": sum(p.numel() for n, p in backbone.items() if "adapter" in n),
            "encoder": sum(p.numel() for p in self.encoder.parameters()),
            "gem_p": sum(p.numel() for p in self.aggregation.parameters()),
            "backbone": sum(p.numel() for n, p in backbone.items() if "adapter" not in n),
            "trainable": sum(p.numel() for p in self.trainable_parameters()),
            "total": sum(p.numel() for p in self.parameters()),
        }

    def region_tokens(self, cls_token: Tensor, patch_map: Tensor) -> Tensor:
        """(B, 14, D): the cls token, then GeM over the 2x2 and 3x3 regions, row-major."""
        rows, cols = patch_map.shape[-2:]
        tokens = [cls_token]
        for parts in PYRAMID:
            for r0, r1 in region_bounds(rows, parts):
                for c0, c1 in region_bounds(cols, parts):
                    tokens.append(self.aggregation(patch_map[:, :, r0:r1, c0:c1]))
        return torch.stack(tokens, dim=1)

    def forward(self, x: Tensor, batch_mode: str | None = None) -> DescriptorOutput:
        mode = self.batch_mode if batch_mode is None else batch_mode
        if mode not in BATCH_MODES:
            raise ValueError(f"batch_mode must be one of {BATCH_MODES}, got {mode!r}")
        out = self.backbone(x)
        rows, cols = out.grid_size
        B, _, D = out.patch_tokens.shape
        patch_map = out.patch_tokens.reshape(B, rows, cols, D).permute(0, 3, 1, 2)
        tokens = self.region_tokens(out.cls_token, patch_map)
        if mode == "single":
            # a sequence of one image per (image, region): the attention sees only itself
            encoded = self.encoder(tokens.reshape(1, B * NUM_TOKENS, D))
        elif mode == "gathered" and self.training:  # evaluation never waits on other ranks
            from vprkit.train.distributed import current_world, gather_with_grad

            world = current_world()
            encoded = self.encoder(gather_with_grad(world, tokens))
            encoded = encoded[world.rank * B : (world.rank + 1) * B]
        else:
            # (B, 14, D) as is into a sequence-first encoder: sequence = images of the batch
            encoded = self.encoder(tokens)
        desc = encoded.reshape(B, NUM_TOKENS * D)
        return DescriptorOutput(global_desc=F.normalize(desc, p=2, dim=-1))

    def adapt_state_dict(self, state: dict) -> dict:
        """Accept the official full layout as is (checked strictly by the loader), or a plain
        DINOv2 `*_pretrain.pth` as a starting point: its tensors replace the backbone's
        non-adapter weights, and adapters, encoder and GeM p keep their current values (the
        official `--foundation_model_path` behaviour, but every backbone key must be present
        and none may be unknown)."""
        if not is_backbone_only(state, ("backbone.", "aggregation.", "encoder.")):
            return state  # the official layout, or neither: the strict check names every key
        full, loaded = with_backbone_weights(self, state, "DINOv2 backbone-only state dict")
        log.info(
            "CricaVPR: loading a DINOv2 backbone-only state dict (%d tensors); %d adapter, "
            "encoder and GeM tensors keep their current values",
            loaded,
            len(full) - loaded,
        )
        return full


@register_model(info=INFO)
def cricavpr(
    encoder_heads: int = 16,
    encoder_ff_dim: int = 2048,
    encoder_layers: int = 2,
    batch_mode: str = "coupled",
    **overrides,
) -> CricaVPR:
    """CricaVPR on DINOv2 ViT-B/14 (as released); `overrides` change the ViT config (e.g.
    `depth=2`, or `embed_dim`/`num_heads` for a tiny model: the adapter widths follow
    embed_dim, the encoder's d_model is embed_dim)."""
    backbone = Backbone(dinov2_config("vitb14", 0, **overrides))
    return CricaVPR(
        backbone,
        encoder_heads=encoder_heads,
        encoder_ff_dim=encoder_ff_dim,
        encoder_layers=encoder_layers,
        batch_mode=batch_mode,
    )
