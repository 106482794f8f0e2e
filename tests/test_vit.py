"""The shared ViT against the official DINOv2 code, the official checkpoint layout, and
independent plain-torch references for what the official PyPI code does not cover."""

import json
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import SHARED_DATA

import vprkit
from vprkit.models.vit import TokenLayout
from vprkit.weights import WeightsMismatchError, load_weights

LAYOUT_FILE = SHARED_DATA.parent / "reference" / "dinov2_state_dict_layout.json"


def randomize_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random values everywhere (LayerScale and norms too), so nothing matches by accident."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("gamma") or ("norm" in name and name.endswith("weight")):
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
    return model


@pytest.fixture(scope="module")
def official_vits14():
    vt = pytest.importorskip(
        "dinov2.models.vision_transformer",
        reason="test-only reference: pip install --no-deps dinov2==0.0.1.dev2",
    )
    model = vt.vit_small(patch_size=14, img_size=518, init_values=1.0, block_chunks=0)
    return randomize_(model).eval()


@pytest.mark.parametrize("size", [(224, 224), (322, 322), (224, 308)])
def test_parity_with_official_dinov2(official_vits14, size):
    ours = vprkit.create_model("dinov2_vits14", weights=official_vits14.state_dict()).eval()
    x = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = official_vits14.forward_features(x)
        out = ours(x)
    torch.testing.assert_close(out.cls_token, ref["x_norm_clstoken"], atol=1e-5, rtol=0)
    torch.testing.assert_close(out.patch_tokens, ref["x_norm_patchtokens"], atol=1e-5, rtol=0)
    # Pre-norm tokens grow through the blocks (|x| up to ~10 here): compare relative to scale.
    scale = ref["x_prenorm"].abs().max().item()
    torch.testing.assert_close(out.prenorm, ref["x_prenorm"], atol=1e-6 * scale, rtol=0)
    assert out.grid_size == (size[0] // 14, size[1] // 14)


def test_mask_token_matches_official(official_vits14):
    ours = vprkit.create_model("dinov2_vits14", weights=official_vits14.state_dict()).eval()
    x = torch.randn(1, 3, 224, 224)
    masks = torch.rand(1, 256, generator=torch.Generator().manual_seed(2)) > 0.5
    with torch.no_grad():
        ref = official_vits14.forward_features(x, masks=masks)
        out = ours(x, masks=masks)
    torch.testing.assert_close(out.patch_tokens, ref["x_norm_patchtokens"], atol=1e-5, rtol=0)


def _random_official_state(layout: dict, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(shape, generator=g) for k, shape in layout["keys"].items()}


@pytest.fixture(scope="module")
def official_layout():
    if not LAYOUT_FILE.is_file():
        pytest.skip(f"official layout reference not found at {LAYOUT_FILE}")
    return json.loads(LAYOUT_FILE.read_text())


@pytest.mark.parametrize("size", ["vits14", "vitb14", "vitl14"])
def test_official_layout_loads_strictly(official_layout, size, tmp_path):
    layout = official_layout[size]
    model = vprkit.create_model(f"dinov2_{size}")
    ours = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert ours == layout["keys"]
    assert sum(p.numel() for p in model.parameters()) == layout["n_params"]
    if size == "vits14":  # a file on disk, as the official release is: a plain state dict
        state = _random_official_state(layout)
        path = tmp_path / "dinov2_vits14_pretrain.pth"
        torch.save(state, path)
        assert load_weights(model, path) == "state dict"
        for k, v in model.state_dict().items():
            assert torch.equal(v, state[k]), k


def test_wrong_layout_names_the_offending_keys(official_layout):
    model = vprkit.create_model("dinov2_vits14")
    state = _random_official_state(official_layout["vits14"])
    state["blocks.0.attn.qkv.weight_renamed"] = state.pop("blocks.0.attn.qkv.weight")
    state["extra.thing"] = torch.zeros(1)
    state["pos_embed"] = torch.zeros(1, 257, 384)
    del state["norm.bias"]
    with pytest.raises(WeightsMismatchError) as info:
        load_weights(model, state)
    message = str(info.value)
    for key in (
        "blocks.0.attn.qkv.weight",
        "norm.bias",
        "extra.thing",
        "pos_embed",
        "(1, 257, 384)",
    ):
        assert key in message
    assert info.value.missing == ["blocks.0.attn.qkv.weight", "norm.bias"]
    assert sorted(info.value.unexpected) == ["blocks.0.attn.qkv.weight_renamed", "extra.thing"]


def test_vitg14_swiglu_and_registers_shapes():
    model = vprkit.create_model("dinov2_vitg14_reg4", depth=1)
    state = model.state_dict()
    assert state["blocks.0.mlp.w12.weight"].shape == (8192, 1536)
    assert state["blocks.0.mlp.w3.weight"].shape == (1536, 4096)
    assert state["register_tokens"].shape == (1, 4, 1536)
    assert state["pos_embed"].shape == (1, 1370, 1536)


def _reference_block(x, sd, prefix, heads, eps=1e-6, swiglu=False):
    """One pre-norm block with LayerScale from plain torch ops and raw state-dict tensors."""
    B, N, C = x.shape
    h = F.layer_norm(x, (C,), sd[prefix + "norm1.weight"], sd[prefix + "norm1.bias"], eps)
    qkv = F.linear(h, sd[prefix + "attn.qkv.weight"], sd[prefix + "attn.qkv.bias"])
    q, k, v = qkv.reshape(B, N, 3, heads, C // heads).permute(2, 0, 3, 1, 4)
    att = (q @ k.transpose(-1, -2) / math.sqrt(C // heads)).softmax(-1)
    a = (att @ v).transpose(1, 2).reshape(B, N, C)
    a = F.linear(a, sd[prefix + "attn.proj.weight"], sd[prefix + "attn.proj.bias"])
    x = x + a * sd.get(prefix + "ls1.gamma", 1)
    h = F.layer_norm(x, (C,), sd[prefix + "norm2.weight"], sd[prefix + "norm2.bias"], eps)
    h = F.gelu(F.linear(h, sd[prefix + "mlp.fc1.weight"], sd[prefix + "mlp.fc1.bias"]))
    h = F.linear(h, sd[prefix + "mlp.fc2.weight"], sd[prefix + "mlp.fc2.bias"])
    return x + h * sd.get(prefix + "ls2.gamma", 1)


def test_registers_follow_the_official_token_order():
    model = randomize_(vprkit.create_model("dinov2_vits14_reg4", depth=2)).eval()
    sd = model.state_dict()
    x = torch.randn(2, 3, 28 * 14, 28 * 14)  # 28x28 grid: interpolated from 37x37
    with torch.no_grad():
        out = model(x)
        tokens = F.conv2d(x, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=14)
        tokens = tokens.flatten(2).transpose(1, 2)
        grid = sd["pos_embed"][:, 1:].reshape(1, 37, 37, -1).permute(0, 3, 1, 2)
        pos = F.interpolate(grid, scale_factor=(28.1 / 37, 28.1 / 37), mode="bicubic")
        pos = pos.permute(0, 2, 3, 1).reshape(1, 784, -1)
        cls = sd["cls_token"].expand(2, -1, -1) + sd["pos_embed"][:, :1]
        seq = torch.cat([cls, sd["register_tokens"].expand(2, -1, -1), tokens + pos], dim=1)
        for i in range(2):
            seq = _reference_block(seq, sd, f"blocks.{i}.", heads=6)
        normed = F.layer_norm(seq, (384,), sd["norm.weight"], sd["norm.bias"], 1e-6)
    torch.testing.assert_close(out.cls_token, normed[:, 0], atol=1e-5, rtol=0)
    torch.testing.assert_close(out.register_tokens, normed[:, 1:5], atol=1e-5, rtol=0)
    torch.testing.assert_close(out.patch_tokens, normed[:, 5:], atol=1e-5, rtol=0)


def _deit_reference(model, x, pos_embed):
    sd = model.state_dict()
    tokens = F.conv2d(x, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=16)
    tokens = tokens.flatten(2).transpose(1, 2)
    B = x.shape[0]
    seq = torch.cat(
        [sd["cls_token"].expand(B, -1, -1), sd["dist_token"].expand(B, -1, -1), tokens], 1
    )
    seq = seq + pos_embed
    for i in range(model.cfg.depth):
        seq = _reference_block(seq, sd, f"blocks.{i}.", heads=6)
    return F.layer_norm(seq, (384,), sd["norm.weight"], sd["norm.bias"], 1e-6)


def test_deit_imagenet_file_resized_to_480x640_as_r2former_does(tmp_path):
    source = randomize_(vprkit.create_model("deit_small_distilled_patch16_224", depth=2))
    path = tmp_path / "deit_small_distilled_patch16_224-649709d9.pth"
    torch.save({"model": source.state_dict()}, path)  # the official file keeps it under "model"
    model = vprkit.create_model(
        "deit_small_distilled_patch16_224",
        weights=path,
        depth=2,
        img_size=(480, 640),
        num_classes=256,
    ).eval()
    pos = source.state_dict()["pos_embed"]
    grid = pos[:, 2:].reshape(1, 14, 14, 384).permute(0, 3, 1, 2)
    expected = F.interpolate(grid, size=(30, 40), mode="bilinear", align_corners=False)
    expected = torch.cat([pos[:, :2], expected.permute(0, 2, 3, 1).reshape(1, 1200, 384)], 1)
    torch.testing.assert_close(model.pos_embed.data, expected)
    # R2Former's quirk: both 256-row heads come from the ImageNet `head`.
    head = source.state_dict()["head.weight"][:256]
    assert torch.equal(model.head.weight, head) and torch.equal(model.head_dist.weight, head)

    x = torch.randn(1, 3, 480, 640)
    with torch.no_grad():
        out = model(x)
    ref = _deit_reference(model, x, model.pos_embed)
    torch.testing.assert_close(out.cls_token, ref[:, 0], atol=1e-5, rtol=0)
    torch.testing.assert_close(out.dist_token, ref[:, 1], atol=1e-5, rtol=0)
    torch.testing.assert_close(out.patch_tokens, ref[:, 2:], atol=1e-5, rtol=0)
    assert out.grid_size == (30, 40)


def test_deit_runtime_pos_embed_crop_for_other_sizes():
    model = randomize_(
        vprkit.create_model("deit_small_distilled_patch16_224", depth=1, img_size=(480, 640))
    )
    stored = model.pos_embed.data
    grid = stored[:, 2:].reshape(1, 30, 40, 384).permute(0, 3, 1, 2)
    # 320x240 input: square side 20 cropped from the middle of 30x40, then 15 of 20 rows.
    pos = model.interpolate_pos_embed(240, 320)
    window = grid[:, :, 5:25, 10:30][:, :, 10 - 7 : 10 - 7 + 15, :]
    torch.testing.assert_close(pos[:, 2:], window.permute(0, 2, 3, 1).reshape(1, -1, 384))
    torch.testing.assert_close(pos[:, :2], stored[:, :2])
    # 800x800 input: 50x50 is larger than the stored grid, so R2Former rescales it.
    pos = model.interpolate_pos_embed(800, 800)
    assert pos.shape == (1, 2 + 2500, 384)
    big = pos[:, 2:].reshape(1, 50, 50, 384).permute(0, 3, 1, 2)
    ori = ((grid[:, :, 0, 20] - grid[:, :, 15, 20]) ** 2).sum()
    new = ((big[:, :, 25 - 15, 25] - big[:, :, 25, 25]) ** 2).sum()
    torch.testing.assert_close(new, ori)
    assert model.interpolate_pos_embed(480, 640) is model.pos_embed


def test_attention_path_returns_last_block_weights_and_input():
    model = randomize_(vprkit.create_model("dinov2_vits14", depth=3)).eval()
    x = torch.randn(2, 3, 112, 140)
    with torch.no_grad():
        plain = model(x)
        full = model(x, return_attention=True)
        layout = model.layout_for(112, 140)
        tokens = model.prepare_tokens(x)
        for block in model.blocks[:2]:
            tokens, _ = block(tokens, layout)
        weights = model.blocks[2].attn.attention_weights(model.blocks[2].norm1(tokens))
    torch.testing.assert_close(full.patch_tokens, plain.patch_tokens, atol=1e-5, rtol=0)
    torch.testing.assert_close(full.last_block_input, tokens)
    torch.testing.assert_close(full.last_attention, weights)
    assert full.last_attention.shape == (2, 6, 81, 81)
    torch.testing.assert_close(full.last_attention.sum(-1), torch.ones(2, 6, 81))
    assert plain.last_attention is None and plain.last_block_input is None


class _Scale(torch.nn.Module):
    def __init__(self, factor):
        super().__init__()
        self.factor = torch.nn.Parameter(torch.tensor(float(factor)))
        self.layouts = []

    def forward(self, x, layout):
        self.layouts.append(layout)
        return x * self.factor


def test_adapter_insertion_points_sit_inside_layerscale():
    model = randomize_(vprkit.create_model("dinov2_vits14", depth=1)).eval()
    x = torch.randn(1, 3, 56, 70)
    block = model.blocks[0]
    with torch.no_grad():
        tokens = model.prepare_tokens(x)
        h1 = block.norm1(tokens)
        attn, _ = block.attn(h1)
        mid = tokens + block.ls1(attn * 2.0)
        h2 = block.norm2(mid)
        expected = mid + block.ls2(block.mlp(h2) + 0.2 * (h2 * 3.0))
        block.set_serial_adapter(_Scale(2.0), "adapter1")
        block.set_parallel_adapter(_Scale(3.0), "adapter2", scale=0.2)
        got, _ = block(tokens, model.layout_for(56, 70))
    torch.testing.assert_close(got, expected)
    assert {"blocks.0.adapter1.factor", "blocks.0.adapter2.factor"} <= set(model.state_dict())
    assert block.adapter1.layouts[0] == TokenLayout(1, (4, 5))


def test_bad_inputs_are_clear():
    model = vprkit.create_model("dinov2_vits14", depth=1)
    with pytest.raises(ValueError, match="not a multiple of the patch size 14"):
        model(torch.randn(1, 3, 100, 112))
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        model(torch.randn(3, 112, 112))
    with pytest.raises(ValueError, match="unknown model 'nope'"):
        vprkit.create_model("nope")
    with pytest.raises(TypeError, match="unknown ViT option"):
        vprkit.create_model("dinov2_vits14", depht=2)


@pytest.mark.parametrize(
    "name, h, w", [("dinov2_vits14", 70, 98), ("deit_small_distilled_patch16_224", 64, 96)]
)
def test_the_interpolated_pos_embed_is_kept_per_size_until_the_weights_change(name, h, w):
    torch.manual_seed(0)
    model = vprkit.create_model(name, depth=1).eval()
    x = torch.randn(2, 3, h, w)
    with torch.no_grad():
        fresh = model._interpolate_pos_embed(h, w)
        first = model.interpolate_pos_embed(h, w)
        assert torch.equal(first, fresh)
        assert model.interpolate_pos_embed(h, w) is first  # kept, not recomputed
        out = model(x)
    # A fresh model with the same weights, which has kept nothing: bit-identical outputs.
    twin = vprkit.create_model(name, depth=1).eval()
    twin.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert torch.equal(twin(x).patch_tokens, out.patch_tokens)
        # A weight load drops what was kept.
        changed = {k: v + 1 if k == "pos_embed" else v for k, v in model.state_dict().items()}
        model.load_state_dict(changed)
        again = model.interpolate_pos_embed(h, w)
        assert torch.equal(again, model._interpolate_pos_embed(h, w))
        assert not torch.equal(again, first)
    # Training: the pos-embed is differentiated through, and a step drops what was kept.
    model.train()
    optimizer = torch.optim.SGD([model.pos_embed], lr=0.1)
    model(x).patch_tokens.sum().backward()
    assert model.pos_embed.grad is not None and model.pos_embed.grad.abs().sum() > 0
    optimizer.step()
    with torch.no_grad():
        assert torch.equal(model.interpolate_pos_embed(h, w), model._interpolate_pos_embed(h, w))
