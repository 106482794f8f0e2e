"""CricaVPR: parameter counts and key layout at full size (meta device), strict loading of
the official checkpoint layout, outputs against a plain-torch reference built on the official
DINOv2 code, batch coupling, init and the region slices."""

import functools
import json
import logging
import math
import re
from itertools import pairwise

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import SHARED_DATA

import vprkit
from vprkit.models import model_info
from vprkit.models.cricavpr import describe_eval_protocol, region_bounds
from vprkit.weights import WeightsMismatchError, load_weights

LAYOUT_FILE = SHARED_DATA.parent / "reference" / "dinov2_state_dict_layout.json"
TINY = {"embed_dim": 64, "num_heads": 4, "depth": 1}  # adapter 32/16/2/8, encoder 16 heads
SMALL = {"embed_dim": 384, "num_heads": 6, "depth": 2}  # = DINOv2 ViT-S, 2 blocks

# The official network.py slices of a 16x16 map, row-major (rows, cols).
OFFICIAL_2X2 = [(slice(0, 8), slice(0, 8)), (slice(0, 8), slice(8, None))]
OFFICIAL_2X2 += [(slice(8, None), slice(0, 8)), (slice(8, None), slice(8, None))]
_THIRDS = [slice(0, 5), slice(5, 11), slice(11, None)]
OFFICIAL_3X3 = [(r, c) for r in _THIRDS for c in _THIRDS]


def n_params(params) -> int:
    return sum(p.numel() for p in params)


def randomize_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random values everywhere (adapter fc2, convs and BN statistics too), so no term is zero
    or constant by accident."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("gamma") or (
                re.search(r"(norm|bn)\d*\.weight$", name) and p.ndim == 1
            ):
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=g))
            elif name.endswith(".p"):
                p.fill_(2.5)
            else:
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
        for name, b in model.named_buffers():
            if name.endswith("running_mean"):
                b.copy_(0.1 * torch.randn(b.shape, generator=g))
            elif name.endswith("running_var"):
                b.copy_(0.5 + torch.rand(b.shape, generator=g))
    return model


def meta_model(**kwargs):
    with torch.device("meta"):
        return vprkit.create_model("cricavpr", **kwargs)


@pytest.fixture(scope="module")
def dinov2_vt():
    return pytest.importorskip(
        "dinov2.models.vision_transformer",
        reason="test-only reference: pip install --no-deps dinov2==0.0.1.dev2",
    )


@functools.cache
def official_dinov2(vt, embed_dim=768, depth=2, num_heads=12, seed=3):
    """The official DINOv2 built as CricaVPR's `get_backbone` does (vit_base, 518, LS 1),
    random weights; cached, so tests must not modify it."""
    model = vt.DinoVisionTransformer(
        img_size=518,
        patch_size=14,
        embed_dim=embed_dim,
        depth=depth,
        num_heads=num_heads,
        mlp_ratio=4,
        init_values=1.0,
        block_chunks=0,
    )
    return randomize_(model, seed=seed).eval()


# --------------------------------------------------------------------------------------------
# the official checkpoint layout


def adapter_keys(prefix: str, dim: int = 768) -> dict[str, list[int]]:
    """`MulConvAdapter(768, 384, 192, 24, 96, 24, 96)`'s keys, from the official block.py."""
    hid, c1, red, c3 = dim // 2, dim // 4, dim // 32, dim // 8
    keys = {
        f"{prefix}.D_fc1.weight": [hid, dim],
        f"{prefix}.D_fc1.bias": [hid],
        f"{prefix}.D_fc2.weight": [dim, hid],
        f"{prefix}.D_fc2.bias": [dim],
    }
    convs = {
        "branch1": (hid, c1, 1),
        "branch2.0": (hid, red, 1),
        "branch2.1": (red, c3, 3),
        "branch3.0": (hid, red, 1),
        "branch3.1": (red, c3, 5),
    }
    for name, (cin, cout, k) in convs.items():
        p = f"{prefix}.{name}"
        keys[f"{p}.conv.weight"] = [cout, cin, k, k]
        keys[f"{p}.conv.bias"] = [cout]
        for b in ("weight", "bias", "running_mean", "running_var"):
            keys[f"{p}.bn.{b}"] = [cout]
        keys[f"{p}.bn.num_batches_tracked"] = []
    return keys


def encoder_keys(dim: int = 768, ff: int = 2048, layers: int = 2) -> dict[str, list[int]]:
    keys = {}
    for i in range(layers):
        p = f"encoder.layers.{i}"
        keys |= {
            f"{p}.self_attn.in_proj_weight": [3 * dim, dim],
            f"{p}.self_attn.in_proj_bias": [3 * dim],
            f"{p}.self_attn.out_proj.weight": [dim, dim],
            f"{p}.self_attn.out_proj.bias": [dim],
            f"{p}.linear1.weight": [ff, dim],
            f"{p}.linear1.bias": [ff],
            f"{p}.linear2.weight": [dim, ff],
            f"{p}.linear2.bias": [dim],
            f"{p}.norm1.weight": [dim],
            f"{p}.norm1.bias": [dim],
            f"{p}.norm2.weight": [dim],
            f"{p}.norm2.bias": [dim],
        }
    return keys


def official_layout(dinov2_keys: dict[str, list[int]], depth: int) -> dict[str, list[int]]:
    """`CricaVPR.pth`'s `model_state_dict` keys and shapes, DataParallel names."""
    keys = {f"module.backbone.{k}": list(v) for k, v in dinov2_keys.items()}
    for i in range(depth):
        keys |= {f"module.{k}": v for k, v in adapter_keys(f"backbone.blocks.{i}.adapter").items()}
    keys["module.aggregation.1.p"] = [1]
    keys |= {f"module.{k}": v for k, v in encoder_keys().items()}
    return keys


def dinov2_keys_from_official_code(vt, depth: int) -> dict[str, list[int]]:
    """The official DINOv2 ViT-B keys for `depth` blocks (block 0 and 1 built, then repeated)."""
    two = {k: list(v.shape) for k, v in official_dinov2(vt, depth=2).state_dict().items()}
    keys = {}
    for k, v in two.items():
        m = re.match(r"blocks\.(\d+)\.(.*)", k)
        if m is None:
            keys[k] = v
        elif m.group(1) == "0":
            keys |= {f"blocks.{i}.{m.group(2)}": v for i in range(depth)}
    return keys


def test_parameter_counts_and_trainable_set_full_size():
    m = meta_model()
    counts = m.parameter_counts()
    assert counts["adapters"] == 9_153_216
    assert counts["adapters"] // 12 == 762_768
    assert counts["encoder"] == 11_027_968
    assert counts["backbone"] == 86_580_480
    assert counts["trainable"] == 20_181_185
    assert counts["total"] == 106_761_665 and round(counts["total"] / 1e6, 2) == 106.76
    assert n_params(m.trainable_parameters()) == 20_181_185
    for name, p in m.named_parameters():
        rule = "adapter" in name or name == "aggregation.1.p" or name.startswith("encoder.")
        assert p.requires_grad == rule, name
    assert model_info(m).image_size == (224, 224)
    assert m.global_dim == 10_752
    layer = m.encoder.layers[0]
    assert layer.self_attn.num_heads == 16 and not layer.self_attn.batch_first
    assert layer.linear1.out_features == 2048 and not layer.norm_first
    assert layer.activation is F.gelu and layer.dropout.p == 0.1
    assert m.encoder.norm is None
    bn = m.backbone.blocks[0].adapter.branch3[1].bn
    assert bn.eps == 1e-3 and m.backbone.blocks[5].parallel_scale == 0.2


def test_full_size_keys_match_official_layout(dinov2_vt):
    official = official_layout(dinov2_keys_from_official_code(dinov2_vt, 12), depth=12)
    ours = {f"module.{k}": list(v.shape) for k, v in meta_model().state_dict().items()}
    assert ours == official
    if LAYOUT_FILE.is_file():  # the key list read from the real dinov2_vitb14_pretrain.pth
        real = json.loads(LAYOUT_FILE.read_text())["vitb14"]["keys"]
        assert official == official_layout(real, depth=12)


def official_checkpoint(layout: dict[str, list[int]], seed: int = 1) -> dict:
    """A training checkpoint in the official layout with random tensors and NumPy extras."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for k, shape in layout.items():
        if k.endswith("num_batches_tracked"):
            state[k] = torch.tensor(1234)
        elif k.endswith("running_var"):
            state[k] = 0.5 + torch.rand(shape, generator=g)
        else:
            state[k] = torch.randn(shape, generator=g)
    return {
        "epoch_num": 7,
        "model_state_dict": state,
        "optimizer_state_dict": {"state": {}, "param_groups": []},
        "recalls": np.array([94.9, 97.3, 98.2, 99.5]),
        "best_r5": np.float64(192.2),
        "not_improved_num": 1,
    }


def test_official_checkpoint_file_loads_strictly(tmp_path, dinov2_vt):
    layout = official_layout(dinov2_keys_from_official_code(dinov2_vt, 2), depth=2)
    ckpt = official_checkpoint(layout)
    path = tmp_path / "CricaVPR.pth"
    torch.save(ckpt, path)
    model = vprkit.create_model("cricavpr", weights=path, depth=2)
    for k, v in model.state_dict().items():
        assert torch.equal(v, ckpt["model_state_dict"][f"module.{k}"]), k
    assert model.backbone.blocks[1].adapter.branch2[1].bn.num_batches_tracked.item() == 1234

    good = ckpt["model_state_dict"]
    bad = dict(good)
    bad["module.backbone.blocks.1.adapter.branch1.conv2.weight"] = bad.pop(
        "module.backbone.blocks.1.adapter.branch1.conv.weight"
    )
    del bad["module.encoder.layers.1.linear2.bias"]
    bad["module.encoder.norm.weight"] = torch.ones(768)
    with pytest.raises(WeightsMismatchError) as err:
        load_weights(vprkit.create_model("cricavpr", depth=2), {"model_state_dict": bad})
    message = str(err.value)
    assert "backbone.blocks.1.adapter.branch1.conv.weight" in message  # missing
    assert "encoder.layers.1.linear2.bias" in message  # missing
    assert "backbone.blocks.1.adapter.branch1.conv2.weight" in message  # unexpected
    assert "encoder.norm.weight" in message  # unexpected
    misshaped = dict(good, **{"module.aggregation.1.p": torch.ones(2)})
    with pytest.raises(WeightsMismatchError, match=r"aggregation\.1\.p"):
        load_weights(vprkit.create_model("cricavpr", depth=2), {"model_state_dict": misshaped})
    no_bn_stats = {k: v for k, v in good.items() if "running_mean" not in k}
    with pytest.raises(WeightsMismatchError, match=r"branch1\.bn\.running_mean"):
        load_weights(vprkit.create_model("cricavpr", depth=2), {"model_state_dict": no_bn_stats})


def test_dinov2_pretrain_file_is_a_starting_point(tmp_path, dinov2_vt, caplog):
    plain = official_dinov2(dinov2_vt, embed_dim=384, num_heads=6, seed=2)
    path = tmp_path / "dinov2_vits14_pretrain.pth"
    torch.save(plain.state_dict(), path)
    torch.manual_seed(0)
    fresh = vprkit.create_model("cricavpr", **SMALL)
    init = {k: v.clone() for k, v in fresh.state_dict().items()}
    torch.manual_seed(0)
    with caplog.at_level(logging.INFO, logger="vprkit.models.cricavpr"):
        model = vprkit.create_model("cricavpr", weights=path, **SMALL)
    assert "backbone-only" in caplog.text
    for k, v in model.state_dict().items():
        if k.startswith("backbone.") and "adapter" not in k:
            assert torch.equal(v, plain.state_dict()[k[len("backbone.") :]]), k
        else:
            assert torch.equal(v, init[k]), k  # adapters, encoder, GeM p keep their init

    extra = dict(plain.state_dict(), **{"head.weight": torch.zeros(3)})
    with pytest.raises(WeightsMismatchError, match=r"unexpected keys \(1\): head\.weight"):
        load_weights(vprkit.create_model("cricavpr", **SMALL), extra)
    partial_state = dict(plain.state_dict())
    del partial_state["blocks.1.ls2.gamma"]
    with pytest.raises(WeightsMismatchError, match=r"blocks\.1\.ls2\.gamma"):
        load_weights(vprkit.create_model("cricavpr", **SMALL), partial_state)
    # a file that is neither layout fails on every key
    with pytest.raises(WeightsMismatchError, match=r"missing keys"):
        load_weights(vprkit.create_model("cricavpr", **SMALL), {"foo.weight": torch.zeros(1)})


# --------------------------------------------------------------------------------------------
# outputs against a plain-torch reference (SPEC §1 and the official network.py / block.py)


def ref_splits(n: int, parts: int) -> list[slice]:
    if (n, parts) == (16, 2):
        return [slice(0, 8), slice(8, None)]
    if (n, parts) == (16, 3):
        return _THIRDS
    edges = [math.floor(k * n / parts + 0.5) for k in range(parts + 1)]
    return [slice(a, b) for a, b in pairwise(edges)]


def ref_adapter(st: dict, pre: str, h: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    def basic_conv(p, x, pad):
        y = F.conv2d(x, st[f"{p}.conv.weight"], st[f"{p}.conv.bias"], padding=pad)
        y = F.batch_norm(
            y,
            st[f"{p}.bn.running_mean"],
            st[f"{p}.bn.running_var"],
            st[f"{p}.bn.weight"],
            st[f"{p}.bn.bias"],
            training=False,
            eps=1e-3,
        )
        return torch.relu(y)

    a = torch.relu(F.linear(h, st[f"{pre}.D_fc1.weight"], st[f"{pre}.D_fc1.bias"]))
    B, _, D = a.shape
    xs = a[:, 1:].reshape(B, rows, cols, D).permute(0, 3, 1, 2)
    b1 = basic_conv(f"{pre}.branch1", xs, 0)
    b2 = basic_conv(f"{pre}.branch2.1", basic_conv(f"{pre}.branch2.0", xs, 0), 1)
    b3 = basic_conv(f"{pre}.branch3.1", basic_conv(f"{pre}.branch3.0", xs, 0), 2)
    out = torch.cat([b1, b2, b3], dim=1).reshape(B, D, rows * cols).permute(0, 2, 1)
    out = torch.cat([a[:, :1], out], dim=1) + a
    return F.linear(out, st[f"{pre}.D_fc2.weight"], st[f"{pre}.D_fc2.bias"])


def ref_encoder_layer(st: dict, pre: str, x: torch.Tensor, heads: int = 16) -> torch.Tensor:
    """Post-LN transformer layer on a sequence-first (S, N, E) input, in plain ops."""
    S, N, E = x.shape
    d = E // heads
    qkv = F.linear(x, st[f"{pre}.self_attn.in_proj_weight"], st[f"{pre}.self_attn.in_proj_bias"])
    q, k, v = (t.reshape(S, N, heads, d).permute(1, 2, 0, 3) for t in qkv.chunk(3, dim=-1))
    weights = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(d), dim=-1)  # (N, h, S, S)
    o = (weights @ v).permute(2, 0, 1, 3).reshape(S, N, E)
    o = F.linear(o, st[f"{pre}.self_attn.out_proj.weight"], st[f"{pre}.self_attn.out_proj.bias"])
    x = F.layer_norm(x + o, (E,), st[f"{pre}.norm1.weight"], st[f"{pre}.norm1.bias"], 1e-5)
    ff = F.linear(x, st[f"{pre}.linear1.weight"], st[f"{pre}.linear1.bias"])
    ff = F.linear(F.gelu(ff), st[f"{pre}.linear2.weight"], st[f"{pre}.linear2.bias"])
    return F.layer_norm(x + ff, (E,), st[f"{pre}.norm2.weight"], st[f"{pre}.norm2.bias"], 1e-5)


def reference_forward(dino, st: dict, x: torch.Tensor, coupled: bool = True):
    """CricaVPR from SPEC §1 in plain torch ops around the official DINOv2 modules."""
    B, _, H, W = x.shape
    rows, cols = H // 14, W // 14
    t = dino.prepare_tokens_with_masks(x)
    for i, blk in enumerate(dino.blocks):
        t = t + blk.ls1(blk.attn(blk.norm1(t)))
        h = blk.norm2(t)
        adapter = ref_adapter(st, f"backbone.blocks.{i}.adapter", h, rows, cols)
        t = t + blk.ls2(blk.mlp(h) + 0.2 * adapter)
    normed = dino.norm(t)
    D = normed.shape[-1]
    x_p = normed[:, 1:].reshape(B, rows, cols, D).permute(0, 3, 1, 2)
    p = st["aggregation.1.p"]

    def gem(region):
        r = F.normalize(region, p=2, dim=1)
        return r.clamp(min=1e-6).pow(p).mean(dim=(2, 3)).pow(1.0 / p)

    tokens = [normed[:, 0]]
    for parts in (2, 3):
        for rs in ref_splits(rows, parts):
            for cs in ref_splits(cols, parts):
                tokens.append(gem(x_p[:, :, rs, cs]))
    seq = torch.stack(tokens, dim=1)  # (B, 14, D): sequence = images, batch = regions
    if not coupled:
        seq = seq.reshape(1, B * 14, D)
    for i in range(2):
        seq = ref_encoder_layer(st, f"encoder.layers.{i}", seq)
    return F.normalize(seq.reshape(B, 14 * D), p=2, dim=-1), normed


@pytest.mark.parametrize(
    "config,size",
    [("vitb", (224, 224)), ("small", (224, 308)), ("small", (98, 70))],
)
def test_outputs_match_plain_reference(dinov2_vt, config, size):
    if config == "vitb":
        dino, opts = official_dinov2(dinov2_vt), {"depth": 2}
    else:
        dino, opts = official_dinov2(dinov2_vt, embed_dim=384, num_heads=6), SMALL
    model = randomize_(vprkit.create_model("cricavpr", **opts), seed=4)
    # the official DINOv2 weights go in through the backbone-only loading path
    load_weights(model, dino.state_dict())
    model.eval()
    x = torch.randn(3, 3, *size, generator=torch.Generator().manual_seed(5))
    st = model.state_dict()
    with torch.no_grad():
        out = model(x)
        ref, _ = reference_forward(dino, st, x)
        single = model(x, batch_mode="single")
        ref_single, _ = reference_forward(dino, st, x, coupled=False)
    dim = dino.embed_dim
    assert out.global_desc.shape == (3, 14 * dim)
    torch.testing.assert_close(out.global_desc, ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(single.global_desc, ref_single, atol=1e-5, rtol=0)
    torch.testing.assert_close(out.global_desc.norm(dim=1), torch.ones(3))
    assert (out.global_desc - single.global_desc).abs().max() > 1e-3


def test_encoder_fast_path_equals_slow_path():
    model = randomize_(vprkit.create_model("cricavpr", **TINY), seed=6).eval()
    x = torch.randn(4, 3, 56, 56, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        fast = model(x).global_desc
    slow = model(x).global_desc.detach()  # grad enabled: PyTorch never takes the fast path
    prev = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with torch.no_grad():
            disabled = model(x).global_desc
    finally:
        torch.backends.mha.set_fastpath_enabled(prev)
    torch.testing.assert_close(fast, slow, atol=1e-6, rtol=0)
    torch.testing.assert_close(fast, disabled, atol=1e-6, rtol=0)


# --------------------------------------------------------------------------------------------
# batch coupling


@pytest.fixture(scope="module")
def tiny_model():
    return randomize_(vprkit.create_model("cricavpr", **TINY), seed=8).eval()


def test_batch_coupling(tiny_model):
    x = torch.randn(5, 3, 56, 56, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        base = tiny_model(x).global_desc
        again = tiny_model(x).global_desc
        perm = torch.tensor([3, 0, 4, 1, 2])
        shuffled = tiny_model(x[perm]).global_desc
        other = x.clone()
        other[4] = torch.randn(3, 56, 56, generator=torch.Generator().manual_seed(10))
        changed = tiny_model(other).global_desc
        alone = torch.cat([tiny_model(x[i : i + 1]).global_desc for i in range(5)])
        single = tiny_model(x, batch_mode="single").global_desc
    assert torch.equal(base, again)  # eval mode is deterministic
    torch.testing.assert_close(shuffled, base[perm], atol=1e-6, rtol=0)  # order does not matter
    assert (changed[0] - base[0]).abs().max() > 1e-4  # membership does
    torch.testing.assert_close(single, alone, atol=1e-6, rtol=0)  # batch of 1 == single mode
    assert (single[0] - base[0]).abs().max() > 1e-4
    tiny_model.batch_mode = "single"
    try:
        with torch.no_grad():
            torch.testing.assert_close(tiny_model(x).global_desc, single, atol=0, rtol=0)
    finally:
        tiny_model.batch_mode = "coupled"
    with pytest.raises(ValueError, match="batch_mode"):
        tiny_model(x, batch_mode="pairs")


def test_eval_protocol_helpers(tiny_model):
    info = model_info(tiny_model)
    assert info.eval_batch_size("pitts30k") == 8
    assert info.eval_batch_size("Pitts250k") == 8
    assert info.eval_batch_size("msls") == 16
    assert info.eval_batch_size("tokyo247") == 16
    line = describe_eval_protocol(16)
    assert "batch" in line and "16" in line and "WARNING" not in line and "\n" not in line
    assert "WARNING" in describe_eval_protocol(1) and "paper" in describe_eval_protocol(1)
    single = vprkit.create_model("cricavpr", batch_mode="single", **TINY)
    assert "single" in info.describe_protocol(single, 16)
    assert info.describe_protocol(tiny_model, 8) == describe_eval_protocol(8)


# --------------------------------------------------------------------------------------------
# init and regions


def test_init_leaves_dinov2_unchanged(dinov2_vt):
    dino = official_dinov2(dinov2_vt, embed_dim=384, num_heads=6, seed=11)
    model = vprkit.create_model("cricavpr", weights=dino.state_dict(), **SMALL).eval()
    for block in model.backbone.blocks:
        a = block.adapter
        assert not a.D_fc2.weight.any() and not a.D_fc2.bias.any()
        assert not a.D_fc1.bias.any() and 0.01 < a.D_fc1.weight.std() < 0.03
        convs = [m for m in a.modules() if isinstance(m, torch.nn.Conv2d)]
        bns = [m for m in a.modules() if isinstance(m, torch.nn.BatchNorm2d)]
        assert len(convs) == 5 and len(bns) == 5
        for c in convs:
            assert torch.all(c.weight == 1e-5) and torch.all(c.bias == 1e-5)
        for bn in bns:
            assert torch.all(bn.weight == 1) and not bn.bias.any() and bn.eps == 1e-3
            assert not bn.running_mean.any() and torch.all(bn.running_var == 1)
    assert model.aggregation[1].p.item() == 3.0
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(12))
    with torch.no_grad():
        ours = model.backbone(x)
        ref = dino.forward_features(x)
    torch.testing.assert_close(ours.patch_tokens, ref["x_norm_patchtokens"], atol=1e-5, rtol=0)
    torch.testing.assert_close(ours.cls_token, ref["x_norm_clstoken"], atol=1e-5, rtol=0)
    # the two encoder layers start as copies of one layer, as nn.TransformerEncoder makes them
    l0, l1 = model.encoder.layers
    assert torch.equal(l0.self_attn.in_proj_weight, l1.self_attn.in_proj_weight)


def test_region_slices():
    assert region_bounds(16, 2) == [(0, 8), (8, 16)]
    assert region_bounds(16, 3) == [(0, 5), (5, 11), (11, 16)]
    model = vprkit.create_model("cricavpr", **TINY)
    fmap = torch.rand(2, 64, 16, 16) + 0.1
    with torch.no_grad():
        tokens = model.region_tokens(torch.zeros(2, 64), fmap)
        official = [model.aggregation(fmap[:, :, r, c]) for r, c in OFFICIAL_2X2 + OFFICIAL_3X3]
    assert tokens.shape == (2, 14, 64)
    assert not tokens[:, 0].any()
    torch.testing.assert_close(tokens[:, 1:], torch.stack(official, dim=1), atol=0, rtol=0)
    for n in (3, 5, 16, 22, 23, 37):
        for parts in (2, 3):
            bounds = region_bounds(n, parts)
            sizes = [b - a for a, b in bounds]
            assert bounds[0][0] == 0 and bounds[-1][1] == n
            assert all(a1 == b0 for (_, b0), (a1, _) in pairwise(bounds))
            assert min(sizes) >= 1 and max(sizes) - min(sizes) <= 1
    assert region_bounds(23, 3) == [(0, 8), (8, 15), (15, 23)]  # 8/7/8, symmetric
    assert region_bounds(22, 3) == [(0, 7), (7, 15), (15, 22)]  # 7/8/7
    assert region_bounds(23, 2) == [(0, 12), (12, 23)]  # a half rounds up
    with pytest.raises(ValueError, match="non-empty"):
        region_bounds(2, 3)
    with torch.no_grad():
        out = model(torch.randn(1, 3, 224, 308))  # 16x22 grid
        assert out.global_desc.shape == (1, 14 * 64)
        with pytest.raises(ValueError, match="non-empty"):
            model(torch.randn(1, 3, 28, 56))  # 2x4 grid: too small for 3x3 regions
