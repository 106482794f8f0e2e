"""DINOv2 SALAD (Izquierdo & Civera, "Optimal Transport Aggregation for Visual Place
Recognition", CVPR 2024): a DINOv2 ViT-B/14 whose last 4 blocks are fine-tuned, and an
aggregator that assigns patch features to clusters by optimal transport (Sinkhorn) with a
dust bin for uninformative features.

Matches the official code (serizba/salad):
- `models/backbones/dinov2.py` (`DINOv2`, as `hubconf.py` and `main.py` configure it:
  `num_trainable_blocks=4`, `norm_layer=True`, `return_token=True`): the aggregator gets the
  final-norm tokens of the torch.hub DINOv2, the class token and the patch tokens as a
  (C, H/14, W/14) map;
- `models/aggregators/salad.py` (`SALAD`, the Sinkhorn code it takes from SuperGlue):

      f = cluster_features(map)  (l = 128 per patch)     s = score(map)  (m = 64 per patch)
      g = token_features(cls)    (256)
      P = exp(log_optimal_transport(s, dust_bin, 3 iterations)) without its dust-bin row
      V[:, j] = sum_i P[j, i] f_i, L2-normalized per cluster j
      descriptor = L2norm([L2norm(g), V flattened l-major])  -> 64 * 128 + 256 = 8448-D

The torch.hub DINOv2 this model loads is the newer hub code (registers, interpolate_offset
0.1, interpolate_antialias False): for the pos-embed it computes the same bicubic scale factor
(rows + 0.1) / 37 as the 2023 code vprkit's ViT follows, so the backbone is vprkit's ViT as is.

Module names are the official ones (`backbone.model.blocks.N...`, `aggregator.score.0.weight`,
`aggregator.dust_bin`), so the released `dino_salad.ckpt` (a plain state dict) loads strictly
as it is.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vprkit.errors import VprkitError
from vprkit.models.backbones import DINOV2_SIZES, Backbone, dinov2_config, is_backbone_only
from vprkit.models.info import ModelInfo
from vprkit.models.outputs import DescriptorOutput
from vprkit.models.registry import register_model
from vprkit.weights import WeightsMismatchError

HIDDEN = 512  # width of the three MLPs, hard-coded in the official SALAD
SINKHORN_ITERS = 3  # the official forward's `log_optimal_transport(p, self.dust_bin, 3)`
NUM_TRAINABLE_BLOCKS = 4  # hubconf.py / main.py
VITB_DEPTH = 12

INFO = ModelInfo(
    image_size=(322, 322),  # the official README evaluates with `--image_size 322 322`
    # What the official training updates: the last 4 blocks run with gradients, and the
    # final norm and the aggregator after them; earlier blocks run under no_grad and their
    # output is detached, so patch embed, tokens and pos-embed get no gradient either.
    train_only=(
        *(
            f"backbone.model.blocks.{i}.*"
            for i in range(VITB_DEPTH - NUM_TRAINABLE_BLOCKS, VITB_DEPTH)
        ),
        "backbone.model.norm.*",
        "aggregator.*",
    ),
    weights=("salad",),
)


def log_optimal_transport(scores: Tensor, dust_bin: Tensor, iters: int) -> Tensor:
    """Log of the transport plan between n features and m clusters plus a dust bin,
    scaled by m + n, as SuperGlue's `log_optimal_transport` that SALAD uses.

    `scores` (B, m, n) are the cluster scores of each feature; the dust bin's score is the
    scalar `dust_bin` for every feature. Every feature sends mass 1 / (m + n); every cluster
    receives 1 / (m + n) and the dust bin the rest, (n - m) / (m + n). `iters` Sinkhorn
    iterations in log space. Returns (B, m + 1, n), the dust bin last.
    """
    b, m, n = scores.shape
    couplings = torch.cat((scores, dust_bin.expand(b, 1, n)), dim=1)
    log_norm = -couplings.new_tensor(m + n).log()
    log_mu = torch.cat((log_norm.expand(m), (couplings.new_tensor(n - m).log() + log_norm)[None]))
    log_nu = log_norm.expand(n)
    u = couplings.new_zeros(b, m + 1)
    v = couplings.new_zeros(b, n)
    for _ in range(iters):
        u = log_mu - torch.logsumexp(couplings + v[:, None, :], dim=2)
        v = log_nu - torch.logsumexp(couplings + u[:, :, None], dim=1)
    return couplings + u[:, :, None] + v[:, None, :] - log_norm


class SALADAggregator(nn.Module):
    """The official `SALAD` aggregator: (patch map (B, C, H, W), class token (B, C)) ->
    L2-normalized (B, num_clusters * cluster_dim + token_dim). PyTorch's default init, as
    the official code leaves it; dropout (0.3, the official default) only in training."""

    def __init__(
        self,
        num_channels: int = 768,
        num_clusters: int = 64,
        cluster_dim: int = 128,
        token_dim: int = 256,
        dropout: float = 0.3,
        mlp_dim: int = HIDDEN,
    ) -> None:
        super().__init__()
        self.num_clusters, self.cluster_dim, self.token_dim = num_clusters, cluster_dim, token_dim

        def drop() -> nn.Module:
            return nn.Dropout(dropout) if dropout > 0 else nn.Identity()

        # Index layout as the official Sequentials (dropout at 1), so the keys match.
        self.token_features = nn.Sequential(
            nn.Linear(num_channels, mlp_dim), nn.ReLU(), nn.Linear(mlp_dim, token_dim)
        )
        self.cluster_features = nn.Sequential(
            nn.Conv2d(num_channels, mlp_dim, 1),
            drop(),
            nn.ReLU(),
            nn.Conv2d(mlp_dim, cluster_dim, 1),
        )
        self.score = nn.Sequential(
            nn.Conv2d(num_channels, mlp_dim, 1),
            drop(),
            nn.ReLU(),
            nn.Conv2d(mlp_dim, num_clusters, 1),
        )
        self.dust_bin = nn.Parameter(torch.tensor(1.0))

    @property
    def output_dim(self) -> int:
        return self.num_clusters * self.cluster_dim + self.token_dim

    def forward(self, feature_map: Tensor, token: Tensor) -> Tensor:
        features = self.cluster_features(feature_map).flatten(2)  # (B, l, n)
        scores = self.score(feature_map).flatten(2)  # (B, m, n)
        n = scores.shape[-1]
        if n < self.num_clusters:
            # the dust bin's mass (n - m) / (m + n) would be negative
            raise VprkitError(
                f"SALAD needs at least as many patches as clusters: {n} patches for "
                f"{self.num_clusters} clusters; use a larger image (at least "
                f"{14 * math.ceil(math.sqrt(self.num_clusters))} pixels a side)"
            )
        plan = log_optimal_transport(scores, self.dust_bin, SINKHORN_ITERS).exp()
        plan = plan[:, :-1]  # features sent to the dust bin are discarded
        # (B, l, m): cluster j's sum of the features weighted by their mass to j; the same
        # values as the official repeat-multiply-sum, without its (B, l, m, n) tensor
        clusters = F.normalize(features @ plan.transpose(1, 2), p=2, dim=1)
        desc = torch.cat(
            (F.normalize(self.token_features(token), p=2, dim=-1), clusters.flatten(1)), dim=-1
        )
        return F.normalize(desc, p=2, dim=-1)


class DINOv2Features(nn.Module):
    """The official `DINOv2` wrapper: the ViT under `model` (so keys read `backbone.model.*`),
    returning the final-norm patch tokens as a (B, C, H/14, W/14) map and the class token."""

    def __init__(self, model: Backbone, num_trainable_blocks: int = NUM_TRAINABLE_BLOCKS):
        super().__init__()
        depth = len(model.blocks)
        if not 1 <= num_trainable_blocks <= depth:
            raise ValueError(
                f"num_trainable_blocks must be between 1 and the depth {depth}, "
                f"got {num_trainable_blocks}"
            )
        if model.cfg.num_register_tokens:
            raise ValueError("SALAD's official backbone has no register tokens")
        self.model = model
        self.num_trainable_blocks = num_trainable_blocks

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        out = self.model(x)
        rows, cols = out.grid_size
        B, _, C = out.patch_tokens.shape
        feature_map = out.patch_tokens.reshape(B, rows, cols, C).permute(0, 3, 1, 2)
        return feature_map, out.cls_token


class SALAD(nn.Module):
    """`forward(images)` -> `DescriptorOutput(global_desc (B, 8448))`, L2-normalized.

    As the official training, only the last `num_trainable_blocks` blocks, the final norm and
    the aggregator are trainable (`requires_grad`); the earlier blocks are frozen.
    """

    def __init__(
        self,
        backbone: Backbone,
        num_trainable_blocks: int = NUM_TRAINABLE_BLOCKS,
        num_clusters: int = 64,
        cluster_dim: int = 128,
        token_dim: int = 256,
        dropout: float = 0.3,
    ) -> None:
        super().__init__()
        self.backbone = DINOv2Features(backbone, num_trainable_blocks)
        self.aggregator = SALADAggregator(
            backbone.embed_dim, num_clusters, cluster_dim, token_dim, dropout
        )
        self.freeze_backbone()

    @property
    def global_dim(self) -> int:
        return self.aggregator.output_dim

    def freeze_backbone(self) -> None:
        """Trainable: the last `num_trainable_blocks` blocks and the final norm; the rest of
        the backbone is frozen. The aggregator stays trainable."""
        vit = self.backbone.model
        trainable = {id(p) for p in vit.norm.parameters()}
        for block in vit.blocks[-self.backbone.num_trainable_blocks :]:
            trainable.update(id(p) for p in block.parameters())
        for p in vit.parameters():
            p.requires_grad_(id(p) in trainable)

    def forward(self, x: Tensor) -> DescriptorOutput:
        return DescriptorOutput(global_desc=self.aggregator(*self.backbone(x)))

    def adapt_state_dict(self, state: dict) -> dict:
        """Accept the released layout as is (checked strictly by the loader), or a plain
        DINOv2 `*_pretrain.pth` as the starting point of training (the official run starts
        from torch.hub's pretrained DINOv2): its tensors replace the backbone's, and the
        aggregator keeps its current values. Every backbone key must be present and none
        may be unknown."""
        if not is_backbone_only(state, ("backbone.", "aggregator.")):
            return state  # the released layout, or neither: the strict check names every key
        vit = self.backbone.model
        state = vit.adapt_state_dict(state)
        expected = vit.state_dict()
        missing = [k for k in expected if k not in state]
        unexpected = [k for k in state if k not in expected]
        if missing or unexpected:
            raise WeightsMismatchError("DINOv2 backbone-only state dict", missing, unexpected, [])
        full = dict(self.state_dict())
        full.update({f"backbone.model.{k}": v for k, v in state.items()})
        return full


@register_model(info=INFO)
def salad(
    backbone: str = "dinov2_vitb14",
    num_trainable_blocks: int = NUM_TRAINABLE_BLOCKS,
    num_clusters: int = 64,
    cluster_dim: int = 128,
    token_dim: int = 256,
    dropout: float = 0.3,
    **overrides,
) -> SALAD:
    """DINOv2 SALAD (CVPR 2024): DINOv2 ViT-B/14 + optimal-transport aggregation, 8448-D
    (serizba/salad). `backbone` may be dinov2_vit{s,b,l,g}14 as in the official hubconf;
    `overrides` change the ViT config (e.g. `depth=2`, `embed_dim=64` for a tiny model)."""
    size = backbone.removeprefix("dinov2_")
    if size not in DINOV2_SIZES:
        raise ValueError(
            f"SALAD backbone must be one of {['dinov2_' + s for s in DINOV2_SIZES]}, "
            f"got {backbone!r}"
        )
    return SALAD(
        Backbone(dinov2_config(size, 0, **overrides)),
        num_trainable_blocks=num_trainable_blocks,
        num_clusters=num_clusters,
        cluster_dim=cluster_dim,
        token_dim=token_dim,
        dropout=dropout,
    )
