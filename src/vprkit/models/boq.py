"""BoQ (Ali-bey, Chaib-draa, Giguere, "BoQ: A Place is Worth a Bag of Learnable Queries",
CVPR 2024), the DINOv2 variant released as `dinov2_12288.pth`: a 12,288-D descriptor.

Matches the official code of amaralibey/Bag-of-Queries: `src/backbones.py` (`DinoV2`),
`src/boq.py` (`BoQ`, `BoQBlock`) and `hubconf.py` (`get_trained_boq("dinov2", 12288)`):

    DINOv2 ViT-B/14 -> patch tokens BEFORE the final norm (cls token dropped) as a
    (768, rows, cols) map -> Conv2d 3x3 768->384 (padding 1) -> tokens -> LayerNorm
    -> 2 BoQ blocks, each:
         x = TransformerEncoderLayer(x)        (post-LN, 6 heads, ff 1536, ReLU, no dropout)
         q = LayerNorm(queries + SelfAttn(queries))               (64 learnable queries)
         o = LayerNorm(CrossAttn(q, x, x))     (the next block gets x, not o)
    -> cat(o_1, o_2): (B, 128, 384) -> transpose -> Linear 128->32 over the queries
    -> (B, 384, 32) flattened channel-major -> L2 norm: 384 * 32 = 12,288.

The backbone is the DINOv2 that `torch.hub.load("facebookresearch/dinov2", "dinov2_vitb14")`
builds, which vprkit's ViT matches for this model (bicubic pos-embed by scale factor with the
0.1 offset, no antialias); the official wrapper never applies DINOv2's final norm, but the
norm's parameters are in the released file, so they are kept. Training freezes everything but
the last two blocks (`unfreeze_n_blocks=2`) and the aggregator.

Parameter names are the released ones (`backbone.dino.blocks.11.attn.qkv.weight`,
`aggregator.boqs.0.encoder.self_attn.in_proj_weight`, `aggregator.fc.weight`), so
`dinov2_12288.pth` loads strictly as it is.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vprkit.models.backbones import Backbone, dinov2_config, is_backbone_only
from vprkit.models.info import ModelInfo
from vprkit.models.outputs import DescriptorOutput
from vprkit.models.registry import register_model
from vprkit.weights import WeightsMismatchError

log = logging.getLogger(__name__)

INFO = ModelInfo(
    # The official README and train.py evaluate the DINOv2 model at 322x322 (23x23 patches);
    # it is trained at 224x224.
    image_size=(322, 322),
    # What the official training updates: the last 2 of DINOv2's 12 blocks and the aggregator
    # (`DinoV2(unfreeze_n_blocks=2)`); everything else in the backbone is frozen.
    train_only=("backbone.dino.blocks.10.*", "backbone.dino.blocks.11.*", "aggregator.*"),
    weights=("boq_dinov2",),
)


class DinoV2Tokens(nn.Module):
    """The official `DinoV2` wrapper: the ViT's patch tokens before the final norm, reshaped to
    (B, C, rows, cols) row-major. Parameters of all but the last `unfreeze_n_blocks` blocks
    are frozen (`requires_grad=False`), as the official constructor does (a value above the
    depth unfreezes every block, as its slicing does; 0 freezes them all, where the official
    `blocks[-0:]` would unfreeze them all)."""

    def __init__(self, vit: Backbone, unfreeze_n_blocks: int = 2) -> None:
        super().__init__()
        if unfreeze_n_blocks < 0:
            raise ValueError(f"unfreeze_n_blocks must be 0 or more, got {unfreeze_n_blocks}")
        self.dino = vit
        self.unfreeze_n_blocks = unfreeze_n_blocks
        for p in vit.parameters():
            p.requires_grad_(False)
        for block in vit.blocks[max(0, len(vit.blocks) - unfreeze_n_blocks) :]:
            for p in block.parameters():
                p.requires_grad_(True)

    @property
    def out_channels(self) -> int:
        return self.dino.embed_dim

    def forward(self, x: Tensor) -> Tensor:
        out = self.dino(x)
        tokens = out.prenorm[:, self.dino.cfg.num_prefix_tokens :]
        rows, cols = out.grid_size
        return tokens.transpose(1, 2).reshape(x.shape[0], -1, rows, cols)


class BoQBlock(nn.Module):
    """One official `BoQBlock`: a transformer encoder layer refines the tokens, then the
    learnable queries (after self-attention among themselves) cross-attend to them.

    `forward` returns (refined tokens, block output (B, Q, D), cross-attention weights
    (B, Q, N) averaged over heads, or None unless `return_attention`)."""

    def __init__(self, dim: int, num_queries: int, num_heads: int) -> None:
        super().__init__()
        self.encoder = nn.TransformerEncoderLayer(
            d_model=dim, nhead=num_heads, dim_feedforward=4 * dim, dropout=0.0, batch_first=True
        )
        self.queries = nn.Parameter(torch.randn(1, num_queries, dim))  # the official init
        self.self_attn = nn.MultiheadAttention(dim, num_heads=num_heads, batch_first=True)
        self.norm_q = nn.LayerNorm(dim)
        self.cross_attn = nn.MultiheadAttention(dim, num_heads=num_heads, batch_first=True)
        self.norm_out = nn.LayerNorm(dim)

    def forward(self, x: Tensor, return_attention: bool = False) -> tuple[Tensor, Tensor, Tensor]:
        x = self.encoder(x)
        # The queries do not depend on the image: attend once and share the result across the
        # batch (the official code repeats them B times first; the values are the same).
        q = self.queries
        q = self.norm_q(q + self.self_attn(q, q, q, need_weights=False)[0])
        q = q.expand(x.shape[0], -1, -1)
        # nn.MultiheadAttention's cross-attention path transposes batch-first inputs to
        # sequence-first; given them in sequence-first memory, the transposed views are
        # contiguous and its projections are single matrix products. Otherwise they are
        # batched products against the weight repeated per token, which bf16 autocast
        # materializes (a 529 x 384 x 768 copy per batch: most of the aggregator's time).
        kv = seq_major(x)
        out, attn = self.cross_attn(seq_major(q), kv, kv, need_weights=return_attention)
        return x, self.norm_out(out), attn


def seq_major(x: Tensor) -> Tensor:
    """`x` (B, N, D), the same values, laid out in memory as (N, B, D)."""
    return x.transpose(0, 1).contiguous().transpose(0, 1)


class BoQ(nn.Module):
    """The official `BoQ` aggregator on a (B, C, H, W) feature map: `forward` returns the
    L2-normalized (B, proj_channels * row_dim) descriptor and each block's attention weights
    (None entries unless `return_attention`)."""

    def __init__(
        self,
        in_channels: int = 768,
        proj_channels: int = 384,
        num_queries: int = 64,
        num_layers: int = 2,
        row_dim: int = 32,
    ) -> None:
        super().__init__()
        if proj_channels % 64:
            # the official head count is proj_channels // 64
            raise ValueError(f"proj_channels must be a multiple of 64, got {proj_channels}")
        self.proj_c = nn.Conv2d(in_channels, proj_channels, kernel_size=3, padding=1)
        self.norm_input = nn.LayerNorm(proj_channels)
        heads = proj_channels // 64
        self.boqs = nn.ModuleList(
            BoQBlock(proj_channels, num_queries, heads) for _ in range(num_layers)
        )
        self.fc = nn.Linear(num_layers * num_queries, row_dim)

    def forward(
        self, x: Tensor, return_attention: bool = False
    ) -> tuple[Tensor, list[Tensor | None]]:
        x = self.norm_input(self.proj_c(x).flatten(2).transpose(1, 2))
        outs, attns = [], []
        for block in self.boqs:
            x, out, attn = block(x, return_attention)
            outs.append(out)
            attns.append(attn)
        # (B, L*Q, D) -> (B, D, L*Q) -> fc over the queries -> (B, D, row_dim) -> D * row_dim
        desc = self.fc(torch.cat(outs, dim=1).transpose(1, 2)).flatten(1)
        return F.normalize(desc, p=2, dim=-1), attns


class BoQModel(nn.Module):
    """`forward(images)` -> `DescriptorOutput(global_desc (B, proj_channels * row_dim))`,
    L2-normalized. `model.aggregator(model.backbone(x), return_attention=True)` also gives
    the queries' cross-attention maps (the official `attns`)."""

    def __init__(
        self,
        backbone: DinoV2Tokens,
        proj_channels: int = 384,
        num_queries: int = 64,
        num_layers: int = 2,
        row_dim: int = 32,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.aggregator = BoQ(
            backbone.out_channels, proj_channels, num_queries, num_layers, row_dim
        )

    @property
    def global_dim(self) -> int:
        return self.aggregator.norm_input.normalized_shape[0] * self.aggregator.fc.out_features

    def forward(self, x: Tensor) -> DescriptorOutput:
        desc, _ = self.aggregator(self.backbone(x))
        return DescriptorOutput(global_desc=desc)

    def adapt_state_dict(self, state: dict) -> dict:
        """The released layout loads as it is (checked strictly by the loader). A plain DINOv2
        `*_pretrain.pth` is a starting point for training: its tensors replace the ViT's, and
        the aggregator keeps its current values. Every ViT key must be in it, none unknown."""
        if not is_backbone_only(state, ("backbone.", "aggregator.")):
            return state
        vit = self.backbone.dino
        state = vit.adapt_state_dict(state)
        expected = list(vit.state_dict())
        missing = [k for k in expected if k not in state]
        unexpected = [k for k in state if k not in set(expected)]
        if missing or unexpected:
            raise WeightsMismatchError(
                "DINOv2 backbone-only state dict", missing, unexpected, misshaped=[]
            )
        full = dict(self.state_dict())
        full.update({f"backbone.dino.{k}": v for k, v in state.items()})
        log.info(
            "BoQ: loading a DINOv2 backbone-only state dict (%d tensors); the %d aggregator "
            "tensors keep their current values",
            len(state),
            len(full) - len(state),
        )
        return full


@register_model(info=INFO)
def boq(
    proj_channels: int = 384,
    num_queries: int = 64,
    num_layers: int = 2,
    row_dim: int = 32,
    unfreeze_n_blocks: int = 2,
    **overrides,
) -> BoQModel:
    """BoQ (CVPR 2024) on DINOv2 ViT-B/14, 12288-D, as released (amaralibey/Bag-of-Queries);
    `overrides` change the ViT config (e.g. `depth=2`, `embed_dim`/`num_heads` for a tiny
    model)."""
    backbone = DinoV2Tokens(Backbone(dinov2_config("vitb14", 0, **overrides)), unfreeze_n_blocks)
    return BoQModel(backbone, proj_channels, num_queries, num_layers, row_dim)
