"""SelaVPR (ICLR 2024): a frozen DINOv2 with two bottleneck adapters per block, a GeM global
descriptor and dense 128-D local features from two transposed convolutions.

Matches the official `network.py` and `backbone/dinov2/block.py` (Lu-Feng/SelaVPR):

    x = x + ls1( adapter1( attn(norm1(x)) ) )               adapter1(y) = y + fc2(relu(fc1(y)))
    x = x + ls2( mlp(norm2(x)) + 0.2 * adapter2(norm2(x)) )  adapter2(h) = fc2(relu(fc1(h)))

- global: final-norm patch tokens as a (D, rows, cols) map -> per-token L2 norm -> GeM (p
  learnable, init 3) -> flatten -> L2 norm (D-dim; 1024 for ViT-L);
- local: the same (un-normalized) map -> `LocalAdapt` (ConvTranspose2d D->256 k3 s2 p1, ReLU,
  ConvTranspose2d 256->128 k3 s2 p1) -> per-location L2 norm: (B, 128, 61, 61) at 224x224.

Parameter names are the official ones (`backbone.blocks.N.adapter1.D_fc1.weight`,
`aggregation.1.p`, `LocalAdapt.upconv1.weight`), so `SelaVPR_*.pth` load strictly.
The official code hard-codes a 16x16 grid; here any multiple of 14 works and the local map
is 2 * (2 * rows - 1) - 1 by 2 * (2 * cols - 1) - 1.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from vprkit.models.backbones import Backbone, dinov2_config, is_backbone_only, with_backbone_weights
from vprkit.models.info import ModelInfo
from vprkit.models.outputs import DescriptorOutput
from vprkit.models.pooling import Flatten, GeM, L2Norm
from vprkit.models.registry import register_model
from vprkit.models.vit import TokenLayout

ADAPTER_RATIO = 0.5  # bottleneck D -> D/2 -> D
PARALLEL_SCALE = 0.2  # adapter2's weight beside the MLP
LOCAL_DIM = 128

INFO = ModelInfo(
    image_size=(224, 224),  # the official network.py hard-codes the 16x16 grid of 224x224
    # Evaluation re-sorts the global top-100 by mutual-NN counts of the local maps (the
    # official `--rerank_num` default; the README says 100 reproduces the paper).
    reranker="mnn",
    rerank_num=100,
    # Equal counts in the official order, `np.argsort(counts)[::-1]` (test.rerank).
    tie_order="official",
    # What the official `train.py` trains: the backbone's parameters whose name contains
    # `adapter` (every other backbone parameter is frozen), GeM p and LocalAdapt.
    train_only=("backbone.*adapter*", "aggregation.*", "LocalAdapt.*"),
    # selavpr_reg4_msls needs backbone="dinov2_vitl14_reg4"
    weights=("selavpr_msls", "selavpr_pitts30k", "selavpr_reg4_msls"),
)


class Adapter(nn.Module):
    """The official bottleneck `Adapter`: Linear D->D/2, ReLU, Linear D/2->D, with an optional
    skip connection. Initialized as `train.py` does: fc1 trunc-normal(0.02) with zero bias
    (the DINOv2 init that reaches it), fc2 all zeros, so a fresh adapter changes nothing."""

    def __init__(self, dim: int, ratio: float = ADAPTER_RATIO, skip_connect: bool = True) -> None:
        super().__init__()
        self.skip_connect = skip_connect
        hidden = int(dim * ratio)
        self.act = nn.ReLU()
        self.D_fc1 = nn.Linear(dim, hidden)
        self.D_fc2 = nn.Linear(hidden, dim)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.trunc_normal_(self.D_fc1.weight, std=0.02)
        nn.init.zeros_(self.D_fc1.bias)
        nn.init.zeros_(self.D_fc2.weight)
        nn.init.zeros_(self.D_fc2.bias)

    def forward(self, x: Tensor, layout: TokenLayout | None = None) -> Tensor:
        out = self.D_fc2(self.act(self.D_fc1(x)))
        return x + out if self.skip_connect else out


class LocalAdapt(nn.Module):
    """Two stride-2 transposed convolutions (grid r -> 2r-1 -> 4r-3), ReLU between them.
    PyTorch's default init, as the official code leaves it."""

    def __init__(self, in_channels: int = 1024, mid_channels: int = 256, out_channels: int = 128):
        super().__init__()
        self.upconv1 = nn.ConvTranspose2d(in_channels, mid_channels, 3, stride=2, padding=1)
        self.upconv2 = nn.ConvTranspose2d(mid_channels, out_channels, 3, stride=2, padding=1)
        self.relu = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        return self.upconv2(self.relu(self.upconv1(x)))


def local_map_size(rows: int, cols: int) -> tuple[int, int]:
    """Size of the local feature map for a rows x cols patch grid (16x16 -> 61x61)."""
    return 2 * (2 * rows - 1) - 1, 2 * (2 * cols - 1) - 1


class SelaVPR(nn.Module):
    """`forward(images)` -> `DescriptorOutput(global_desc (B, D), local_desc (B, 128, h, w))`.

    The backbone is frozen except its adapters (as the official `train.py` does), so
    `requires_grad` marks exactly the trainable parameters: adapters, GeM p and LocalAdapt.
    """

    def __init__(self, backbone: Backbone) -> None:
        super().__init__()
        dim = backbone.embed_dim
        for block in backbone.blocks:
            block.set_serial_adapter(Adapter(dim, skip_connect=True), "adapter1")
            block.set_parallel_adapter(
                Adapter(dim, skip_connect=False), "adapter2", scale=PARALLEL_SCALE
            )
        self.backbone = backbone
        self.aggregation = nn.Sequential(L2Norm(dim=1), GeM(p=3.0), Flatten())
        self.LocalAdapt = LocalAdapt(dim, 256, LOCAL_DIM)
        self.freeze_backbone()

    @property
    def global_dim(self) -> int:
        return self.backbone.embed_dim

    def freeze_backbone(self) -> None:
        """Freeze every backbone parameter whose name does not contain `adapter`."""
        for name, p in self.backbone.named_parameters():
            p.requires_grad_("adapter" in name)

    def forward(self, x: Tensor, local: bool = True) -> DescriptorOutput:
        """Global descriptors and (unless `local=False`) the dense local maps."""
        out = self.backbone(x)
        rows, cols = out.grid_size
        B, _, C = out.patch_tokens.shape
        patch_map = out.patch_tokens.reshape(B, rows, cols, C).permute(0, 3, 1, 2)
        global_desc = F.normalize(self.aggregation(patch_map), p=2, dim=-1)
        if not local:
            return DescriptorOutput(global_desc=global_desc)
        local_desc = F.normalize(self.LocalAdapt(patch_map), p=2, dim=1)
        return DescriptorOutput(global_desc=global_desc, local_desc=local_desc)

    def adapt_state_dict(self, state: dict) -> dict:
        """Accept the official full layout as is (checked strictly by the loader), or a plain
        DINOv2 `*_pretrain.pth` as a starting point: its tensors replace the backbone's
        non-adapter weights, and adapters, GeM p and LocalAdapt keep their current values
        (the official `--foundation_model_path` behaviour, but every backbone key must be
        present and none may be unknown)."""
        if not is_backbone_only(state, ("backbone.", "aggregation.", "LocalAdapt.")):
            return state  # the official layout, or neither: the strict check names every key
        full, _ = with_backbone_weights(self, state, "DINOv2 backbone-only state dict")
        return full


def _parse_backbone(name: str) -> tuple[str, int]:
    prefix = "dinov2_"
    rest = name[len(prefix) :] if name.startswith(prefix) else None
    registers = 0
    if rest is not None and rest.endswith("_reg4"):
        rest, registers = rest[: -len("_reg4")], 4
    if rest not in ("vits14", "vitb14", "vitl14", "vitg14"):
        raise ValueError(
            f"SelaVPR backbone must be dinov2_vit{{s,b,l,g}}14 with an optional _reg4 suffix, "
            f"got {name!r}"
        )
    return rest, registers


@register_model(info=INFO)
def selavpr(backbone: str = "dinov2_vitl14", **overrides) -> SelaVPR:
    """SelaVPR on DINOv2 (`backbone`: dinov2_vitl14 as released, dinov2_vitl14_reg4 for the
    registers variant, or another size); `overrides` change the ViT config (e.g. `depth=2`)."""
    size, registers = _parse_backbone(backbone)
    return SelaVPR(Backbone(dinov2_config(size, registers, **overrides)))
