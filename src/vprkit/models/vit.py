"""One Vision Transformer for both backbone families vprkit needs.

- DINOv2 (CricaVPR, SelaVPR): patch 14, LayerScale, optional register tokens, SwiGLU MLP for
  ViT-g, `mask_token`, pos-embed stored at 37x37 and interpolated the way the 2023 DINOv2 code
  that CricaVPR and SelaVPR vendor does (bicubic, scale factor with a +0.1 offset).
- DeiT distilled (R2Former): patch 16, class and distillation tokens, pos-embed stored at the
  training grid (e.g. 30x40 for 480x640) and cropped or rescaled at run time as R2Former does.

Parameter names follow the official checkpoints, so their state dicts load strictly.
Blocks have two insertion points for adapters (see `Block`), so the methods add their
adapters without copying the block.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vprkit.errors import VprkitError

# Input sizes whose interpolated pos-embed a ViT keeps (inference at a few sizes).
_POS_EMBED_CACHE_SIZE = 8


@dataclass(frozen=True)
class ViTConfig:
    patch_size: int = 14
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    ffn: str = "mlp"  # "mlp" or "swiglu" (DINOv2 ViT-g)
    img_size: tuple[int, int] = (518, 518)  # the grid the stored pos-embed is for
    layerscale_init: float | None = 1.0  # None: no LayerScale (DeiT)
    num_register_tokens: int = 0
    distilled: bool = False  # DeiT's distillation token
    mask_token: bool = True  # DINOv2 keeps it (unused at inference) so official files load
    num_classes: int = 0  # DeiT classifier heads; 0 = none
    norm_eps: float = 1e-6
    qkv_bias: bool = True
    # How the pos-embed follows other input sizes: "dinov2" or "r2former" (see module doc).
    pos_embed_mode: str = "dinov2"
    interpolate_offset: float = 0.1
    interpolate_antialias: bool = False

    def __post_init__(self) -> None:
        if self.ffn not in ("mlp", "swiglu"):
            raise ValueError(f"ffn must be 'mlp' or 'swiglu', got {self.ffn!r}")
        if self.pos_embed_mode not in ("dinov2", "r2former"):
            raise ValueError(
                f"pos_embed_mode must be 'dinov2' or 'r2former', got {self.pos_embed_mode!r}"
            )
        if self.embed_dim % self.num_heads:
            raise ValueError(
                f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}"
            )
        h, w = self.img_size
        if h % self.patch_size or w % self.patch_size:
            raise ValueError(
                f"img_size {self.img_size} is not a multiple of patch_size {self.patch_size}"
            )

    @property
    def grid_size(self) -> tuple[int, int]:
        return self.img_size[0] // self.patch_size, self.img_size[1] // self.patch_size

    @property
    def num_prefix_tokens(self) -> int:
        return 1 + int(self.distilled) + self.num_register_tokens


@dataclass(frozen=True)
class TokenLayout:
    """Where the patch tokens are in a token sequence, for adapters that need the 2-D map."""

    num_prefix_tokens: int
    grid_size: tuple[int, int]  # (rows, cols) of patches


@dataclass
class ViTOutput:
    """Final-norm tokens (as DINOv2's `x_norm_clstoken` / `x_norm_patchtokens`) and extras."""

    cls_token: Tensor  # (B, C)
    patch_tokens: Tensor  # (B, N, C), N = rows * cols, row-major
    grid_size: tuple[int, int]
    prenorm: Tensor  # (B, T, C): every token before the final norm (DINOv2's `x_prenorm`)
    dist_token: Tensor | None = None  # (B, C), DeiT distilled
    register_tokens: Tensor | None = None  # (B, R, C)
    # Only with return_attention=True:
    last_block_input: Tensor | None = None  # (B, T, C): the tokens entering the last block
    last_attention: Tensor | None = None  # (B, heads, T, T): softmax weights of the last block


class LayerScale(nn.Module):
    def __init__(self, dim: int, init_value: float) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), float(init_value)))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.gamma


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class SwiGLU(nn.Module):
    """DINOv2's SwiGLUFFNFused: the hidden size is rounded as the official code does."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        hidden = (int(hidden * 2 / 3) + 7) // 8 * 8
        self.w12 = nn.Linear(dim, 2 * hidden)
        self.w3 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        x1, x2 = self.w12(x).chunk(2, dim=-1)
        return self.w3(F.silu(x1) * x2)


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def _qkv(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        return q, k, v

    def attention_weights(self, x: Tensor) -> Tensor:
        """Softmax attention (B, heads, N, N), computed as R2Former does: (q @ k^T) * scale."""
        q, k, _ = self._qkv(x)
        return ((q @ k.transpose(-2, -1)) * self.scale).softmax(dim=-1)

    def forward(self, x: Tensor, return_weights: bool = False) -> tuple[Tensor, Tensor | None]:
        B, N, C = x.shape
        q, k, v = self._qkv(x)
        if return_weights:
            weights = ((q @ k.transpose(-2, -1)) * self.scale).softmax(dim=-1)
            out = weights @ v
        else:
            weights = None
            out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(B, N, C)), weights


class Block(nn.Module):
    """Pre-norm transformer block with two adapter insertion points, both inside LayerScale:

        x = x + ls1( serial_adapter( attn(norm1(x)) ) )
        x = x + ls2( mlp(norm2(x)) + scale * parallel_adapter(norm2(x)) )

    Adapters are registered under the names the official checkpoints use (CricaVPR: `adapter`
    in parallel; SelaVPR: `adapter1` serial, `adapter2` parallel). An adapter's forward takes
    `(x, layout)`, where `layout` tells where the patch tokens are.
    """

    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        dim = cfg.embed_dim
        self.norm1 = nn.LayerNorm(dim, eps=cfg.norm_eps)
        self.attn = Attention(dim, cfg.num_heads, qkv_bias=cfg.qkv_bias)
        self.norm2 = nn.LayerNorm(dim, eps=cfg.norm_eps)
        hidden = int(dim * cfg.mlp_ratio)
        self.mlp = SwiGLU(dim, hidden) if cfg.ffn == "swiglu" else Mlp(dim, hidden)
        if cfg.layerscale_init is None:
            self.ls1, self.ls2 = nn.Identity(), nn.Identity()
        else:
            self.ls1 = LayerScale(dim, cfg.layerscale_init)
            self.ls2 = LayerScale(dim, cfg.layerscale_init)
        self._serial_name: str | None = None
        self._parallel_name: str | None = None
        self.parallel_scale = 0.0

    def set_serial_adapter(self, adapter: nn.Module, name: str) -> None:
        """Apply `adapter` to the attention output, inside `ls1` (SelaVPR's `adapter1`)."""
        self.add_module(name, adapter)
        self._serial_name = name

    def set_parallel_adapter(self, adapter: nn.Module, name: str, scale: float) -> None:
        """Add `scale * adapter(norm2(x))` beside the MLP, inside `ls2`."""
        self.add_module(name, adapter)
        self._parallel_name = name
        self.parallel_scale = scale

    def forward(
        self, x: Tensor, layout: TokenLayout, return_attention: bool = False
    ) -> tuple[Tensor, Tensor | None]:
        y, weights = self.attn(self.norm1(x), return_weights=return_attention)
        if self._serial_name is not None:
            y = getattr(self, self._serial_name)(y, layout)
        x = x + self.ls1(y)
        h = self.norm2(x)
        y = self.mlp(h)
        if self._parallel_name is not None:
            y = y + self.parallel_scale * getattr(self, self._parallel_name)(h, layout)
        return x + self.ls2(y), weights


class PatchEmbed(nn.Module):
    def __init__(self, patch_size: int, embed_dim: int) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(3, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


def _bicubic_dinov2(
    patch_pos: Tensor, grid: int, rows: int, cols: int, offset: float, antialias: bool
) -> Tensor:
    """DINOv2's interpolation of a square (1, grid*grid, C) pos-embed to rows x cols."""
    dim = patch_pos.shape[-1]
    square = patch_pos.reshape(1, grid, grid, dim).permute(0, 3, 1, 2)
    if offset:
        # The official code adds a small number to avoid floating point error in the
        # output size, then asks for a scale factor rather than a size.
        kwargs = {"scale_factor": ((rows + offset) / grid, (cols + offset) / grid)}
    else:
        kwargs = {"size": (rows, cols)}
    out = F.interpolate(square, mode="bicubic", antialias=antialias, **kwargs)
    if out.shape[-2:] != (rows, cols):
        raise RuntimeError(
            f"pos-embed interpolation gave {tuple(out.shape[-2:])}, not {(rows, cols)}"
        )
    return out.permute(0, 2, 3, 1).reshape(1, rows * cols, dim)


def _r2former_pos_resize(grid_map: Tensor, size: tuple[int, int]) -> Tensor:
    """R2Former's `pos_resize`: bicubic upscaling, then rescaled about the centre so the
    distance between the centre and the top-middle position keeps its original length."""
    _, _, H, W = grid_map.shape
    new = F.interpolate(grid_map, size=size, mode="bicubic")
    ori_dis = ((grid_map[:, :, 0, W // 2] - grid_map[:, :, H // 2, W // 2]) ** 2).sum(dim=1)
    new_dis = (
        (new[:, :, size[0] // 2 - H // 2, size[1] // 2] - new[:, :, size[0] // 2, size[1] // 2])
        ** 2
    ).sum(dim=1)
    ratio = torch.sqrt(ori_dis / new_dis)
    center = new[:, :, size[0] // 2, size[1] // 2].unsqueeze(2).unsqueeze(3)
    return (new - center) * ratio + center


def _r2former_runtime_pos(patch_pos: Tensor, grid: tuple[int, int], rows: int, cols: int) -> Tensor:
    """R2Former's `forward_deit` for inputs other than the training size: take a centred
    square of side max(rows, cols) (cropped, or rescaled if the stored grid is smaller), then
    crop the centred rows x cols window out of it."""
    dim = patch_pos.shape[-1]
    grid_map = patch_pos.reshape(1, grid[0], grid[1], dim).permute(0, 3, 1, 2)
    side = max(rows, cols)
    if grid[0] >= side and grid[1] >= side:
        top, left = grid[0] // 2 - side // 2, grid[1] // 2 - side // 2
        square = grid_map[:, :, top : top + side, left : left + side]
    else:
        square = _r2former_pos_resize(grid_map, (side, side))
    if rows >= cols:
        start = side // 2 - cols // 2
        window = square[:, :, :, start : start + cols]
    else:
        start = side // 2 - rows // 2
        window = square[:, :, start : start + rows, :]
    return window.permute(0, 2, 3, 1).reshape(1, rows * cols, dim)


class VisionTransformer(nn.Module):
    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        dim = cfg.embed_dim
        self.patch_embed = PatchEmbed(cfg.patch_size, dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.dist_token = nn.Parameter(torch.zeros(1, 1, dim)) if cfg.distilled else None
        # DINOv2 keeps registers out of the pos-embed; DeiT's dist token has a position.
        rows, cols = cfg.grid_size
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + int(cfg.distilled) + rows * cols, dim))
        if cfg.num_register_tokens:
            self.register_tokens = nn.Parameter(torch.zeros(1, cfg.num_register_tokens, dim))
        else:
            self.register_tokens = None
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(dim, eps=cfg.norm_eps)
        self.mask_token = nn.Parameter(torch.zeros(1, dim)) if cfg.mask_token else None
        if cfg.num_classes:
            self.head = nn.Linear(dim, cfg.num_classes)
            self.head_dist = nn.Linear(dim, cfg.num_classes) if cfg.distilled else None
        else:
            self.head = self.head_dist = None
        self.reset_parameters()

    @property
    def embed_dim(self) -> int:
        return self.cfg.embed_dim

    def reset_parameters(self) -> None:
        """The official inits: trunc-normal(0.02) linears and pos-embed (timm style)."""
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        if self.cfg.distilled:
            nn.init.trunc_normal_(self.cls_token, std=0.02)
            nn.init.trunc_normal_(self.dist_token, std=0.02)
        else:
            nn.init.normal_(self.cls_token, std=1e-6)
        if self.register_tokens is not None:
            nn.init.normal_(self.register_tokens, std=1e-6)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def layout_for(self, height: int, width: int) -> TokenLayout:
        p = self.cfg.patch_size
        if height % p or width % p:
            raise VprkitError(
                f"input size {height}x{width} is not a multiple of the patch size {p}; resize "
                f"to e.g. {height // p * p}x{width // p * p} (--image_size {height // p * p} "
                f"{width // p * p}: with one value, the long side follows each photo's shape)"
            )
        return TokenLayout(self.cfg.num_prefix_tokens, (height // p, width // p))

    def interpolate_pos_embed(self, height: int, width: int) -> Tensor:
        """The pos-embed for an input of height x width pixels, as the official code makes it.

        Without gradients to it, the result is kept per input size and reused while the stored
        pos-embed is unchanged: a weight load or an optimizer step changes its version counter
        (or its storage), which drops the kept one. With gradients (training) it is computed
        on every call, inside the autograd graph."""
        stored = self.pos_embed
        if torch.is_grad_enabled() and stored.requires_grad:
            return self._interpolate_pos_embed(height, width)
        key = (height, width, stored.data_ptr(), stored._version, stored.dtype, stored.device)
        cache = self.__dict__.setdefault("_pos_embed_cache", {})
        if key not in cache:
            if len(cache) >= _POS_EMBED_CACHE_SIZE:
                cache.pop(next(iter(cache)))  # the oldest size
            cache[key] = self._interpolate_pos_embed(height, width).detach()
        return cache[key]

    def _interpolate_pos_embed(self, height: int, width: int) -> Tensor:
        cfg = self.cfg
        rows, cols = height // cfg.patch_size, width // cfg.patch_size
        n_prefix = 1 + int(cfg.distilled)
        stored = self.pos_embed
        if cfg.pos_embed_mode == "dinov2":
            grid = cfg.grid_size[0]
            # Same early exit as the official code: square input with the stored token count.
            if rows * cols == grid * grid and height == width:
                return stored
            dtype = stored.dtype
            stored = stored.float()
            patch = _bicubic_dinov2(
                stored[:, n_prefix:],
                grid,
                rows,
                cols,
                cfg.interpolate_offset,
                cfg.interpolate_antialias,
            )
        else:
            if (height, width) == tuple(cfg.img_size):
                return stored
            dtype = stored.dtype
            patch = _r2former_runtime_pos(stored[:, n_prefix:], cfg.grid_size, rows, cols)
        return torch.cat((stored[:, :n_prefix], patch), dim=1).to(dtype)

    def prepare_tokens(self, x: Tensor, masks: Tensor | None = None) -> Tensor:
        B, _, H, W = x.shape
        tokens = self.patch_embed(x)
        if masks is not None:
            if self.mask_token is None:
                raise ValueError("this model has no mask token")
            tokens = torch.where(masks.unsqueeze(-1), self.mask_token.to(tokens.dtype), tokens)
        prefix = [self.cls_token.expand(B, -1, -1)]
        if self.dist_token is not None:
            prefix.append(self.dist_token.expand(B, -1, -1))
        tokens = torch.cat((*prefix, tokens), dim=1)
        tokens = tokens + self.interpolate_pos_embed(H, W)
        if self.register_tokens is not None:
            # DINOv2 inserts registers after the cls token, after the pos-embed is added.
            tokens = torch.cat(
                (tokens[:, :1], self.register_tokens.expand(B, -1, -1), tokens[:, 1:]), dim=1
            )
        return tokens

    def forward(
        self, x: Tensor, masks: Tensor | None = None, return_attention: bool = False
    ) -> ViTOutput:
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"expected images of shape (B, 3, H, W), got {tuple(x.shape)}")
        layout = self.layout_for(x.shape[2], x.shape[3])
        tokens = self.prepare_tokens(x, masks)
        last_input = last_attention = None
        for i, block in enumerate(self.blocks):
            is_last = i == len(self.blocks) - 1
            if is_last and return_attention:
                last_input = tokens
            tokens, weights = block(tokens, layout, return_attention=return_attention and is_last)
            if weights is not None:
                last_attention = weights
        normed = self.norm(tokens)
        n_prefix = layout.num_prefix_tokens
        n_reg = self.cfg.num_register_tokens
        return ViTOutput(
            cls_token=normed[:, 0],
            patch_tokens=normed[:, n_prefix:],
            grid_size=layout.grid_size,
            prenorm=tokens,
            dist_token=normed[:, 1] if self.cfg.distilled else None,
            register_tokens=normed[:, 1 : 1 + n_reg] if n_reg else None,
            last_block_input=last_input,
            last_attention=last_attention,
        )

    def forward_head(self, out: ViTOutput) -> Tensor:
        """DeiT's classifier output at inference: the mean of the two heads."""
        if self.head is None:
            raise ValueError("this model was built with num_classes=0: it has no head")
        logits = self.head(out.cls_token)
        if self.head_dist is not None:
            logits = (logits + self.head_dist(out.dist_token)) / 2
        return logits


def vit_config(base: ViTConfig, **overrides) -> ViTConfig:
    """`base` with `overrides`; `img_size` may be an int (square)."""
    if isinstance(overrides.get("img_size"), int):
        overrides["img_size"] = (overrides["img_size"],) * 2
    elif "img_size" in overrides:
        overrides["img_size"] = tuple(overrides["img_size"])
    unknown = set(overrides) - set(ViTConfig.__dataclass_fields__)
    if unknown:
        raise TypeError(
            f"unknown ViT option(s) {sorted(unknown)}; "
            f"known: {sorted(ViTConfig.__dataclass_fields__)}"
        )
    return replace(base, **overrides)


def adapt_official_vit_state_dict(model: VisionTransformer, state: dict[str, Tensor]) -> dict:
    """Bring an official file's tensors to this model's shapes where the official code does so
    itself; everything else must match exactly (strict loading checks it afterwards).

    For DeiT (R2Former's backbone), as R2Former's `deit_small_distilled_patch16_224` does:
    - the 14x14 ImageNet pos-embed is resized to the model's grid (bilinear, what
      torchvision's Resize does to a tensor; e.g. 30x40 for 480x640);
    - a 1000-class ImageNet head given to a model with fewer classes keeps its first rows,
      and `head_dist` is initialized from `head`'s rows too (the official quirk).
    """
    cfg = model.cfg
    state = dict(state)
    pos = state.get("pos_embed")
    if cfg.pos_embed_mode == "r2former" and pos is not None and pos.shape != model.pos_embed.shape:
        n_prefix = 1 + int(cfg.distilled)
        n_patch = pos.shape[1] - n_prefix
        side = int(round(n_patch**0.5))
        if side * side != n_patch:
            raise ValueError(f"pos_embed with {n_patch} patch positions is not a square grid")
        square = pos[:, n_prefix:].reshape(1, side, side, -1).permute(0, 3, 1, 2)
        resized = F.interpolate(
            square.float(), size=cfg.grid_size, mode="bilinear", align_corners=False
        )
        resized = resized.permute(0, 2, 3, 1).reshape(1, -1, pos.shape[-1]).to(pos.dtype)
        state["pos_embed"] = torch.cat((pos[:, :n_prefix], resized), dim=1)
    head_w = state.get("head.weight")
    if (
        model.head is not None
        and head_w is not None
        and head_w.shape[0] > cfg.num_classes
        and head_w.shape[1] == cfg.embed_dim
    ):
        n = cfg.num_classes
        state["head.weight"], state["head.bias"] = head_w[:n], state["head.bias"][:n]
        if model.head_dist is not None:
            state["head_dist.weight"], state["head_dist.bias"] = head_w[:n], state["head.bias"][:n]
    return state
