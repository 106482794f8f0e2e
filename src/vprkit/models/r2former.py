"""R2Former (CVPR 2023): a DeiT-S distilled global model whose last-block attention picks 500
local tokens, and a tiny transformer that re-ranks retrieval candidates from token pairs.

Matches the official `model/network.py` (`GeoLocalizationNetRerank`, `forward_deit`),
`model/R2Former.py`, `model/Deit.py` and `util.resume_train` (bytedance/R2Former):

- global: DeiT-S distilled at 480x640 (pos-embed stored at 30x40) with 256-row heads;
  L2-normalize((head(cls) + head_dist(dist)) / 2);
- tokens: last-block attention rows of cls and dist over the patches, summed over heads and
  the two tokens; the top `num_local` (500) by descending attention; per token
  `[x, y, a, f128]` (131 values): centre coordinates over max(H, W), attention over the image's
  maximum, and `local_head` (Linear 384->128) of the last block's *input* token;
- re-ranker (`R2FormerReranker`, dim 32, 4 heads): 7-value pair features, top-5 correlations
  in both directions (1,000 groups of 5 pairs), 2 blocks per group (`blocks_2`), 6 blocks over
  the group tokens (`blocks`), 2-class logits. Test-time ranking uses softmax(logits)[:, 1].

Official quirk kept on purpose (the released checkpoint was trained with it): the selected patch
indices are used to gather from the *whole* token sequence, whose first two entries are the cls
and dist tokens, so the feature of selected patch p is the token two positions earlier (patch
p-2; the cls or dist token for p = 0, 1) while its coordinates are patch p's. See
`official_token_gather`.

Parameter names are the official ones (`backbone.blocks.N.attn.qkv.weight`,
`local_head.weight`, `Reranker.blocks_2.1.mlp.fc2.bias`, the unused `Reranker.decoder_pos_embed`
and `Reranker.ratio`), so `CVPR23_DeitS_Rerank.pth` loads strictly.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vprkit.kernels import groups_first_token, small_head_attention
from vprkit.models.backbones import (
    Backbone,
    deit_small_distilled_patch16_224,
    with_backbone_weights,
)
from vprkit.models.info import ModelInfo
from vprkit.models.outputs import DescriptorOutput
from vprkit.models.registry import register_model
from vprkit.models.vit import Mlp

log = logging.getLogger(__name__)

NUM_LOCAL = 500
LOCAL_DIM = 128
GLOBAL_DIM = 256
NUM_COORDS = 3  # x, y, attention before the feature in each token
PAIR_DIM = 7  # [x_q, y_q, a_q, x_c, y_c, a_c, correlation]

INFO = ModelInfo(
    image_size=(480, 640),  # the official training and test resolution
    # Evaluation re-sorts the global top-100 by the re-ranker's probability (the official
    # `--rerank_top 100` of test.sh).
    reranker="r2former",
    rerank_num=100,
    # What `train_reranker.py --fix 1` trains on the full model (the global phase,
    # `train_deit.py`, trains the backbone alone; joint fine-tuning trains everything).
    train_only=("local_head.*", "Reranker.*"),
    weights=("r2former", "r2former_global_msls"),
)


# --------------------------------------------------------------------------------------------
# The re-ranking transformer


def sincos_1d(embed_dim: int, pos: Tensor) -> Tensor:
    """`get_1d_sincos_pos_embed_from_grid` of model/R2Former.py: (...,) -> (..., embed_dim),
    `[sin(pos * w), cos(pos * w)]` with w = 1 / 10000 ** (arange(D/2) / (D/2)), in float32."""
    if embed_dim % 2:
        raise ValueError(f"embed_dim must be even, got {embed_dim}")
    omega = torch.arange(embed_dim // 2, dtype=torch.float32, device=pos.device)
    omega = omega / (embed_dim / 2.0)
    omega = 1.0 / 10000**omega
    out = pos.float().unsqueeze(-1) * omega
    return torch.cat([torch.sin(out), torch.cos(out)], dim=-1)


def sincos_2d(embed_dim: int, grid: Tensor) -> Tensor:
    """`get_2d_sincos_pos_embed_from_grid` of model/R2Former.py: (..., 2) -> (..., embed_dim);
    the first half encodes `grid[..., 0]` (x), the second half `grid[..., 1]` (y)."""
    if embed_dim % 2:
        raise ValueError(f"embed_dim must be even, got {embed_dim}")
    return torch.cat(
        [sincos_1d(embed_dim // 2, grid[..., 0]), sincos_1d(embed_dim // 2, grid[..., 1])],
        dim=-1,
    )


class RerankAttention(nn.Module):
    """timm 0.5.4 `Attention` (qkv_bias=True, scale head_dim ** -0.5, no dropout at test)."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        B, N, C = x.shape
        qkv = self.qkv(x)
        # vprkit's kernel for head size 8 on the CPU (inference): 2-4x PyTorch's attention
        # there, read straight from the fused projection's output.
        out = small_head_attention(
            qkv[..., :C], qkv[..., C : 2 * C], qkv[..., 2 * C :], self.num_heads
        )
        if out is not None:
            return self.proj(out)
        q, k, v = qkv.reshape(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        # SDPA's default scale is head_dim ** -0.5, timm's. It avoids the (N, N) matrix of the
        # 1,001-token stage (~3x faster than matmul + softmax there), and is faster than
        # matmul + softmax for the 6-token groups too (one call over all groups, ~1.7x).
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(B, N, C))

    def forward_first(self, x: Tensor) -> Tensor:
        """`forward(x)[:, :1]`: the first token's query only (keys and values of all)."""
        B, N, C = x.shape
        w, b = self.qkv.weight, self.qkv.bias
        q = F.linear(x[:, :1], w[:C], b[:C])
        kv = F.linear(x, w[C:], b[C:])
        out = small_head_attention(q, kv[..., :C], kv[..., C:], self.num_heads)
        if out is not None:
            return self.proj(out)
        q = q.reshape(B, 1, self.num_heads, C // self.num_heads).transpose(1, 2)
        k, v = kv.reshape(B, N, 2, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(B, 1, C))


class RerankBlock(nn.Module):
    """timm 0.5.4 `Block`: x + attn(norm1(x)), then x + mlp(norm2(x)); no extra parameters."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, norm_eps: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = RerankAttention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))  # the ViT's (timm's fc1, GELU, fc2)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))

    def forward_first(self, x: Tensor) -> Tensor:
        """`forward(x)[:, :1]`: only the first (cls) token's output, which is all the last
        block of each stage is read for; the other tokens' attention rows, projection and
        MLP (5/6 of a group block, 1000/1001 of a top block) are skipped."""
        first = x[:, :1] + self.attn.forward_first(self.norm1(x))
        return first + self.mlp(self.norm2(first))


def first_token_after(blocks: nn.ModuleList, x: Tensor) -> Tensor:
    """`x` through `blocks` -> the first token's output (B, D); the same values as running
    every block on every token."""
    for blk in blocks[:-1]:
        x = blk(x)
    return (blocks[-1].forward_first(x) if len(blocks) else x[:, :1])[:, 0]


def block_weights(blocks: nn.ModuleList) -> list[Tensor]:
    """The blocks' tensors in the order of vprkit's `groups_first_token` kernel."""
    return [
        t
        for b in blocks
        for m in (b.norm1, b.attn.qkv, b.attn.proj, b.norm2, b.mlp.fc1, b.mlp.fc2)
        for t in (m.weight, m.bias)
    ]


class R2FormerReranker(nn.Module):
    """model/R2Former.py's `R2Former` as `GeoLocalizationNetRerank` instantiates it.

    `forward(x_global, x_tokens, y_global, y_tokens)` scores B pairs (query x, candidate y;
    tokens (B, N, 3 + F)) and returns `(logits (B, 2), final_score (B,))` as the official code;
    `final_score` (ratio-weighted with the global cosine) is not what the official test ranks by.
    """

    def __init__(
        self,
        embed_dim: int = 32,
        depth: int = 6,
        num_heads: int = 4,
        mlp_ratio: float = 4.0,
        num_classes: int = 2,
        num_patches: int = 2 * NUM_LOCAL,
        num_corr: int = 5,
        group_depth: int = 2,
        norm_eps: float = 1e-6,
    ) -> None:
        super().__init__()
        if num_classes not in (1, 2):
            raise ValueError(f"num_classes must be 1 or 2, got {num_classes}")
        self.embed_dim = embed_dim
        self.num_classes = num_classes
        self.num_corr = num_corr
        self.norm_eps = norm_eps
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.cls_token_2 = nn.Parameter(torch.zeros(1, 1, embed_dim))
        # Never used in forward; kept so the official state dict loads strictly.
        self.decoder_pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, embed_dim))
        self.ratio = nn.Parameter(torch.full((1,), 0.5))
        self.blocks = nn.ModuleList(
            RerankBlock(embed_dim, num_heads, mlp_ratio, norm_eps) for _ in range(depth)
        )
        self.blocks_2 = nn.ModuleList(
            RerankBlock(embed_dim, num_heads, mlp_ratio, norm_eps) for _ in range(group_depth)
        )
        self.decoder_norm = nn.LayerNorm(embed_dim, eps=norm_eps)
        self.pair_head = nn.Linear(PAIR_DIM, embed_dim)
        self.pair_head_2 = nn.Linear(embed_dim, embed_dim)
        self.decoder_pred = nn.Linear(embed_dim, num_classes)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The official init: trunc-normal(0.02) cls tokens, normal(0.01) pos-embed rows after
        the first, xavier-uniform linears with zero bias, unit LayerNorms, ratio 0.5."""
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        nn.init.trunc_normal_(self.cls_token_2, std=0.02)
        with torch.no_grad():
            self.decoder_pos_embed.zero_()
            self.decoder_pos_embed[:, 1:].normal_(mean=0.0, std=0.01)
            self.ratio.fill_(0.5)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def top_pairs(self, x_tokens: Tensor, y_tokens: Tensor) -> tuple[Tensor, ...]:
        """The official `select`'s ingredients: clamped, detached coordinates x_coord (B, N, 3)
        and y_coord (B, M, 3); for each query token i its num_corr most correlated candidate
        tokens `j_q` (B, N, k) with their correlations `corr_q`; for each candidate token j
        its num_corr most correlated query tokens `i_k` (B, M, k) with `corr_k`.

        `topk(sorted=True)` gives the official `argsort(descending=True)[..., :k]` for
        distinct correlations, ~15x faster (no full sort of 500 values). Exactly equal
        correlations may come in another order. They do occur (on the benchmark's synthetic
        tokens, 2 groups in 500,000 had a tie at the 5th place; it moved that candidate's
        probability by at most 3.5e-6), but that is no loss of fidelity: the official order of
        ties is the sort kernel's (CPU argsort is not stable, nor in index order; CUDA's may
        differ again).
        Nor can it matter much: a group's pairs are a set to the re-ranker (no position
        embedding), so only which tied pair makes the top k, and, in a candidate-side group,
        which pair is first (its query token's sin-cos is the group's) can change anything."""
        x_feat = F.normalize(x_tokens[..., NUM_COORDS:], p=2, dim=2)
        y_feat = F.normalize(y_tokens[..., NUM_COORDS:], p=2, dim=2)
        x_coord = x_tokens[..., :NUM_COORDS].detach().clamp(min=0, max=1)
        y_coord = y_tokens[..., :NUM_COORDS].detach().clamp(min=0, max=1)
        corr = torch.matmul(x_feat, y_feat.transpose(1, 2))  # (B, N, M)
        N, M = corr.shape[1:]
        corr_q, j_q = corr.topk(min(self.num_corr, M), dim=2, sorted=True)
        corr_k, i_k = corr.topk(min(self.num_corr, N), dim=1, sorted=True)
        return x_coord, y_coord, corr_q, j_q, corr_k.transpose(1, 2), i_k.transpose(1, 2)

    def pair_features(self, x_tokens: Tensor, y_tokens: Tensor) -> Tensor:
        """The official `select`: (B, N + M, num_corr, 7). Rows 0..N-1: each query token with
        its num_corr most correlated candidate tokens; rows N..N+M-1: each candidate token
        with its num_corr most correlated query tokens (query side always first). `forward`
        does not build it (see there); kept to compare with the official tensor."""
        x_coord, y_coord, corr_q, j_q, corr_k, i_k = self.top_pairs(x_tokens, y_tokens)
        B, N, k = j_q.shape
        M = i_k.shape[1]
        batch = torch.arange(B, device=j_q.device)[:, None, None]
        select_q = torch.cat(
            [x_coord[:, :, None].expand(B, N, k, -1), y_coord[batch, j_q], corr_q[..., None]],
            dim=-1,
        )
        select_k = torch.cat(
            [x_coord[batch, i_k], y_coord[:, :, None].expand(B, M, k, -1), corr_k[..., None]],
            dim=-1,
        )
        return torch.cat([select_q, select_k], dim=1)

    def logits(self, x_tokens: Tensor, y_tokens: Tensor) -> Tensor:
        """The re-ranker's output for B pairs (tokens (B, N, 3 + F), (B, M, 3 + F)): (B, 2)
        logits, or (B,) probabilities for a 1-class head. Differentiable (training)."""
        D = self.embed_dim
        dtype = self.pair_head.weight.dtype
        x_coord, y_coord, corr_q, j_q, corr_k, i_k = self.top_pairs(x_tokens, y_tokens)
        B, N, k = j_q.shape
        batch = torch.arange(B, device=j_q.device)[:, None, None]

        # Each pair's embedding: pair_head of [query side, candidate side, correlation] plus
        # the sin-cos of the candidate side's (x, y). pair_head is linear, so each token's
        # share is computed once per token and gathered per pair, instead of building the
        # official (B, N + M, k, 7) tensor and projecting each pair (same values, rounding
        # aside).
        w = self.pair_head.weight
        x_part = F.linear(x_coord.to(dtype), w[:, :NUM_COORDS], self.pair_head.bias)
        y_part = F.linear(y_coord.to(dtype), w[:, NUM_COORDS : 2 * NUM_COORDS])
        y_part = y_part + sincos_2d(D, y_coord[..., :2]).to(dtype)
        w_corr = w[:, 2 * NUM_COORDS]
        pairs_q = x_part[:, :, None] + y_part[batch, j_q] + corr_q[..., None].to(dtype) * w_corr
        pairs_k = x_part[batch, i_k] + y_part[:, :, None] + corr_k[..., None].to(dtype) * w_corr
        pairs = torch.cat([pairs_q, pairs_k], dim=1)  # (B, N + M, k, D)
        n_groups = pairs.shape[1]
        pairs = pairs.reshape(B * n_groups, k, D)
        x = torch.cat([self.cls_token_2.expand(B * n_groups, -1, -1), pairs], dim=1)
        num_heads = self.blocks_2[0].attn.num_heads if len(self.blocks_2) else 1
        first = groups_first_token(x, block_weights(self.blocks_2), num_heads, self.norm_eps)
        if first is None:
            first = first_token_after(self.blocks_2, x)
        x = self.decoder_norm(first)

        # Each group's token, plus the sin-cos of its first pair's query-side (x, y): the
        # query token itself for rows 0..N-1, the candidate token's best match for the rest.
        x_pos = sincos_2d(D, x_coord[..., :2]).to(dtype)  # (B, N, D)
        pos = torch.cat([x_pos, x_pos[batch[..., 0], i_k[..., 0]]], dim=1)
        groups = self.pair_head_2(x).reshape(B, n_groups, D) + pos
        x = torch.cat([self.cls_token.expand(B, -1, -1), groups], dim=1)
        x = self.decoder_norm(first_token_after(self.blocks, x))
        out = self.decoder_pred(x)
        return torch.sigmoid(out.reshape(-1)) if self.num_classes == 1 else out

    def forward(
        self, x_global: Tensor, x_tokens: Tensor, y_global: Tensor, y_tokens: Tensor
    ) -> tuple[Tensor, Tensor]:
        global_score = F.cosine_similarity(x_global.detach(), y_global.detach(), dim=1)
        logits = self.logits(x_tokens, y_tokens)
        ratio = self.ratio.clamp(min=0.1, max=0.9)
        local = self.same_place_probability(logits.detach())
        final_score = global_score * ratio + local * (1 - ratio)
        return logits, final_score

    def same_place_probability(self, logits: Tensor) -> Tensor:
        """What the official test ranks by: softmax(logits)[:, 1] (the sigmoid output for a
        1-class head, which `forward` already returns as probabilities)."""
        return logits if self.num_classes == 1 else logits.softmax(dim=1)[:, 1]


# --------------------------------------------------------------------------------------------
# The full model


class R2Former(nn.Module):
    """`forward(images)` -> `DescriptorOutput(global_desc (B, 256), local_tokens (B, n, 131))`
    with n = min(num_local, patches); `rerank_scores(...)` -> same-place probabilities."""

    def __init__(
        self,
        backbone: Backbone,
        num_local: int = NUM_LOCAL,
        local_dim: int = LOCAL_DIM,
        finetune: bool = False,
        official_token_gather: bool = True,
    ) -> None:
        """`finetune`: let the re-ranker's gradients reach the backbone through `local_head`
        (the official `--finetune 1`). `official_token_gather`: reproduce the official
        two-position shift of the gathered features (see the module doc); False takes the
        selected patch's own token (for models trained that way, not the released ones)."""
        super().__init__()
        if backbone.dist_token is None or backbone.head is None or backbone.head_dist is None:
            raise ValueError("R2Former needs a distilled DeiT backbone with both heads")
        if num_local < 1:
            raise ValueError(f"num_local must be at least 1, got {num_local}")
        self.backbone = backbone
        self.num_local = num_local
        self.finetune = finetune
        self.official_token_gather = official_token_gather
        self.local_head = nn.Linear(backbone.embed_dim, local_dim)
        self.Reranker = R2FormerReranker(num_patches=2 * num_local)
        self.reset_local_head()

    def reset_local_head(self) -> None:
        """The official init: normal(0, 0.01) weight, zero bias."""
        nn.init.normal_(self.local_head.weight, mean=0.0, std=0.01)
        nn.init.zeros_(self.local_head.bias)

    @property
    def global_dim(self) -> int:
        return self.backbone.cfg.num_classes

    @property
    def token_dim(self) -> int:
        return NUM_COORDS + self.local_head.out_features

    def parameter_counts(self) -> dict[str, int]:
        """Parameter counts of the parts; `reranker_used` leaves out `decoder_pos_embed`."""
        rr = sum(p.numel() for p in self.Reranker.parameters())
        return {
            "backbone": sum(p.numel() for p in self.backbone.parameters()),
            "local_head": sum(p.numel() for p in self.local_head.parameters()),
            "reranker": rr,
            "reranker_used": rr - self.Reranker.decoder_pos_embed.numel(),
            "total": sum(p.numel() for p in self.parameters()),
        }

    def forward(self, x: Tensor, local: bool = True) -> DescriptorOutput:
        """Global descriptors and (unless `local=False`) the selected local tokens."""
        B, _, H, W = x.shape
        out = self.backbone(x, return_attention=local)
        global_desc = F.normalize(self.backbone.forward_head(out), p=2, dim=1)
        if not local:
            return DescriptorOutput(global_desc=global_desc)
        n_prefix = self.backbone.cfg.num_prefix_tokens
        # Attention of the cls and dist rows over the patches: sum over heads, then tokens.
        att = out.last_attention[:, :, :n_prefix, n_prefix:].detach()
        scores = att.sum(dim=1).sum(dim=1)  # (B, patches)
        # Same indices as the official torch.argsort(descending=True) (both are the non-stable
        # sort): equal scores come in that sort's order, which on CPU is not index order for
        # long rows and may differ between devices.
        values, order = torch.sort(scores, dim=1, descending=True)
        n = min(order.shape[1], self.num_local)
        order, values = order[:, :n], values[:, :n]

        seq = out.last_block_input
        if not self.official_token_gather:
            seq = seq[:, n_prefix:]
        feats = torch.gather(seq, 1, order.unsqueeze(2).expand(-1, -1, seq.shape[2]))
        if not self.finetune:
            feats = feats.detach()
        feats = self.local_head(feats)

        cols = out.grid_size[1]
        patch = self.backbone.cfg.patch_size
        side = float(max(H, W))
        xy = torch.stack(
            [
                (order % cols * patch + patch // 2) / side,
                (order // cols * patch + patch // 2) / side,
            ],
            dim=2,
        )
        attention = (values / values[:, :1]).unsqueeze(2)
        tokens = torch.cat([xy.to(feats.dtype), attention.to(feats.dtype), feats], dim=2)
        return DescriptorOutput(global_desc=global_desc, local_tokens=tokens)

    # Pairs per re-ranker forward in `rerank_scores`. On CPU (2 threads, 500 tokens) with
    # vprkit's kernels, 2 to 20 pairs ran within 5% of each other (1 pair ~20% slower); on
    # PyTorch's ops alone 5-10 were the fastest, 20 ~10% and 100 ~15% slower (small batches
    # keep the group stage's 10,000 x 6 x 128 activations nearer the caches; 100 pairs held
    # ~1 GiB more). Other devices (not measured) keep the previous 100.
    rerank_batch_cpu = 10
    rerank_batch_other = 100

    @torch.no_grad()
    def rerank_scores(
        self,
        q_global: Tensor,
        q_tokens: Tensor,
        c_global: Tensor,
        c_tokens: Tensor,
        batch_size: int | None = None,
    ) -> Tensor:
        """Same-place probabilities softmax(logits)[:, 1] of each query against its candidates
        (inference only: no gradients; train through `Reranker` itself).

        Shapes: q_global (Q, D), q_tokens (Q, N, 131), c_global (Q, K, D), c_tokens
        (Q, K, M, 131) -> (Q, K); or unbatched (D,), (N, 131), (K, D), (K, M, 131) -> (K,).
        At most `batch_size` query-candidate pairs go through the re-ranker at once (default
        `rerank_batch_cpu` on CPU, else `rerank_batch_other`); the result does not depend on
        it. The global descriptors are only checked: the probability does not use them."""
        if q_tokens.ndim == 2:
            return self.rerank_scores(
                q_global[None], q_tokens[None], c_global[None], c_tokens[None], batch_size
            )[0]
        if q_tokens.ndim != 3 or c_tokens.ndim != 4:
            raise ValueError(
                f"expected q_tokens (Q, N, F) and c_tokens (Q, K, M, F), got "
                f"{tuple(q_tokens.shape)} and {tuple(c_tokens.shape)}"
            )
        Q, K = c_tokens.shape[:2]
        if q_tokens.shape[0] != Q or q_global.shape[0] != Q or c_global.shape[:2] != (Q, K):
            raise ValueError(
                f"inconsistent shapes: q_global {tuple(q_global.shape)}, q_tokens "
                f"{tuple(q_tokens.shape)}, c_global {tuple(c_global.shape)}, c_tokens "
                f"{tuple(c_tokens.shape)}"
            )
        if batch_size is None:
            cpu = c_tokens.device.type == "cpu"
            batch_size = self.rerank_batch_cpu if cpu else self.rerank_batch_other
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        c_tokens = c_tokens.reshape(Q * K, *c_tokens.shape[2:])
        scores = []
        for start in range(0, Q * K, batch_size):
            pairs = torch.arange(start, min(start + batch_size, Q * K), device=c_tokens.device)
            logits = self.Reranker.logits(q_tokens[pairs // K], c_tokens[pairs])
            scores.append(self.Reranker.same_place_probability(logits))
        return torch.cat(scores).reshape(Q, K)

    def adapt_state_dict(self, state: dict) -> dict:
        """Accept, after the loader strips `module.`:
        - the full official layout (`backbone.*`, `local_head.*`, `Reranker.*`) as is;
        - a backbone-only state dict (keys as `cls_token`, `blocks.0...`): the global-only
          `msls_v2_deits.pth` (which `util.resume_train` maps under `backbone.`) or the DeiT
          ImageNet file (pos-embed resized, heads truncated as the official). Every backbone
          key must be there; `local_head` and `Reranker` keep their current values.
        Anything else goes to the strict check unchanged, which names the offending keys."""
        if any(k.startswith(("backbone.", "local_head.", "Reranker.")) for k in state):
            return state
        if "cls_token" not in state:
            return state
        head = state.get("head.weight")
        imagenet = head is not None and head.shape[0] != self.global_dim
        full, loaded = with_backbone_weights(self, state, "DeiT backbone-only state dict")
        log.info(
            "R2Former: loading %s into the backbone (%d tensors); local_head and Reranker "
            "keep their current values",
            "DeiT ImageNet weights (pos-embed resized, heads truncated)"
            if imagenet
            else "a global-only checkpoint (msls_v2_deits.pth layout, remapped under backbone.)",
            loaded,
        )
        return full


@register_model(info=INFO)
def r2former(
    num_local: int = NUM_LOCAL,
    finetune: bool = False,
    official_token_gather: bool = True,
    **overrides,
) -> R2Former:
    """R2Former: DeiT-S distilled at 480x640 with 256-D heads, 500 local tokens and the
    re-ranker; `overrides` change the ViT config (e.g. `depth=1`, `img_size=(224, 224)`)."""
    overrides.setdefault("img_size", INFO.image_size)
    overrides.setdefault("num_classes", GLOBAL_DIM)
    return R2Former(
        deit_small_distilled_patch16_224(**overrides),
        num_local=num_local,
        finetune=finetune,
        official_token_gather=official_token_gather,
    )
