"""SelaVPR: parameter counts and key layout at full size (meta device), strict loading of
the official checkpoint layout, and outputs against a plain-torch reference built on the
official DINOv2 code (tiny configs)."""

import json
from functools import partial

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import SHARED_DATA

import vprkit
from vprkit.models import model_info
from vprkit.models.selavpr import local_map_size
from vprkit.weights import WeightsMismatchError, load_weights

LAYOUT_FILE = SHARED_DATA.parent / "reference" / "dinov2_state_dict_layout.json"
TINY = {"backbone": "dinov2_vits14", "depth": 2}


def n_params(params) -> int:
    return sum(p.numel() for p in params)


def meta_model(**kwargs):
    with torch.device("meta"):
        return vprkit.create_model("selavpr", **kwargs)


def randomize_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random values everywhere (adapter fc2 too), so no term is zero by accident."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("gamma") or ("norm" in name and name.endswith("weight")):
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=g))
            elif name.endswith(".p"):
                p.fill_(2.5)
            else:
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
    return model


def test_parameter_counts_vitl_and_vitb():
    m = meta_model()
    named = dict(m.named_parameters())
    adapters = n_params(p for n, p in named.items() if "adapter" in n)
    assert adapters == 50_405_376
    assert n_params(m.LocalAdapt.parameters()) == 2_654_592
    assert n_params(p for n, p in named.items() if p.requires_grad) == 53_059_969
    assert n_params(p for n, p in m.backbone.named_parameters() if "adapter" not in n) == (
        304_368_640
    )
    assert n_params(m.parameters()) == 357_428_609
    # trainable = names containing `adapter`, GeM p, LocalAdapt; nothing else
    for name, p in named.items():
        rule = "adapter" in name or name == "aggregation.1.p" or name.startswith("LocalAdapt.")
        assert p.requires_grad == rule, name
    b = meta_model(backbone="dinov2_vitb14")
    assert round(n_params(p for p in b.parameters() if p.requires_grad) / 1e6, 1) == 16.2
    assert round(n_params(b.parameters()) / 1e6, 1) == 102.8
    assert model_info(m).image_size == (224, 224)


def official_selavpr_layout() -> dict[str, list[int]]:
    """Every key and shape of `SelaVPR_msls.pth`'s `model_state_dict` (DataParallel names),
    from the official DINOv2 ViT-L layout plus SelaVPR's own modules."""
    dino = json.loads(LAYOUT_FILE.read_text())["vitl14"]["keys"]
    keys = {f"module.backbone.{k}": v for k, v in dino.items()}
    for i in range(24):
        for a in ("adapter1", "adapter2"):
            pre = f"module.backbone.blocks.{i}.{a}"
            keys |= {
                f"{pre}.D_fc1.weight": [512, 1024],
                f"{pre}.D_fc1.bias": [512],
                f"{pre}.D_fc2.weight": [1024, 512],
                f"{pre}.D_fc2.bias": [1024],
            }
    keys["module.aggregation.1.p"] = [1]
    keys |= {
        "module.LocalAdapt.upconv1.weight": [1024, 256, 3, 3],
        "module.LocalAdapt.upconv1.bias": [256],
        "module.LocalAdapt.upconv2.weight": [256, 128, 3, 3],
        "module.LocalAdapt.upconv2.bias": [128],
    }
    return keys


def test_full_size_keys_match_official_layout(shared_data):
    if not LAYOUT_FILE.is_file():
        pytest.skip(f"{LAYOUT_FILE} not found")
    official = official_selavpr_layout()
    ours = {f"module.{k}": list(v.shape) for k, v in meta_model().state_dict().items()}
    assert ours == official


def official_checkpoint(model: torch.nn.Module, seed: int = 1) -> dict:
    """A training checkpoint in the official layout: DataParallel keys, NumPy extras."""
    state = randomize_(model, seed).state_dict()
    return {
        "epoch_num": 3,
        "model_state_dict": {f"module.{k}": v.clone() for k, v in state.items()},
        "optimizer_state_dict": {"state": {}, "param_groups": []},
        "recalls": np.array([90.8, 96.4, 97.2, 98.0]),
        "best_r5": np.float64(96.4),
        "not_improved_num": 0,
    }


def test_official_checkpoint_file_loads_strictly(tmp_path):
    source = vprkit.create_model("selavpr", **TINY)
    ckpt = official_checkpoint(source)
    path = tmp_path / "SelaVPR_msls.pth"
    torch.save(ckpt, path)
    model = vprkit.create_model("selavpr", weights=path, **TINY)
    for k, v in model.state_dict().items():
        assert torch.equal(v, ckpt["model_state_dict"][f"module.{k}"]), k

    bad = dict(ckpt["model_state_dict"])
    bad["module.backbone.blocks.1.adapter2.fc1.weight"] = bad.pop(
        "module.backbone.blocks.1.adapter2.D_fc1.weight"
    )
    del bad["module.LocalAdapt.upconv2.bias"]
    with pytest.raises(WeightsMismatchError) as err:
        load_weights(vprkit.create_model("selavpr", **TINY), {"model_state_dict": bad})
    message = str(err.value)
    assert "backbone.blocks.1.adapter2.D_fc1.weight" in message  # missing
    assert "LocalAdapt.upconv2.bias" in message  # missing
    assert "backbone.blocks.1.adapter2.fc1.weight" in message  # unexpected
    misshaped = dict(ckpt["model_state_dict"])
    misshaped["module.aggregation.1.p"] = torch.ones(2)
    with pytest.raises(WeightsMismatchError, match=r"aggregation\.1\.p"):
        load_weights(vprkit.create_model("selavpr", **TINY), {"model_state_dict": misshaped})


def test_dinov2_pretrain_file_is_a_starting_point(tmp_path):
    plain = randomize_(vprkit.create_model("dinov2_vits14", depth=2), seed=2)
    path = tmp_path / "dinov2_vits14_pretrain.pth"
    torch.save(plain.state_dict(), path)
    torch.manual_seed(0)
    fresh = vprkit.create_model("selavpr", **TINY)
    init = {k: v.clone() for k, v in fresh.state_dict().items()}
    torch.manual_seed(0)
    model = vprkit.create_model("selavpr", weights=path, **TINY)
    for k, v in model.state_dict().items():
        if k.startswith("backbone.") and "adapter" not in k:
            assert torch.equal(v, plain.state_dict()[k[len("backbone.") :]]), k
        else:
            assert torch.equal(v, init[k]), k  # adapters, GeM p, LocalAdapt keep their init
    assert model.aggregation[1].p.item() == 3.0
    for block in model.backbone.blocks:
        for a in (block.adapter1, block.adapter2):
            assert not a.D_fc2.weight.any() and not a.D_fc2.bias.any()
            assert not a.D_fc1.bias.any() and 0.01 < a.D_fc1.weight.std() < 0.03

    extra = dict(plain.state_dict(), **{"head.weight": torch.zeros(3)})
    with pytest.raises(WeightsMismatchError, match=r"unexpected keys \(1\): head\.weight"):
        load_weights(vprkit.create_model("selavpr", **TINY), extra)
    partial_state = dict(plain.state_dict())
    del partial_state["blocks.1.ls2.gamma"]
    with pytest.raises(WeightsMismatchError, match=r"blocks\.1\.ls2\.gamma"):
        load_weights(vprkit.create_model("selavpr", **TINY), partial_state)


@pytest.fixture(scope="module")
def official_dinov2_tiny():
    vt = pytest.importorskip(
        "dinov2.models.vision_transformer",
        reason="test-only reference: pip install --no-deps dinov2==0.0.1.dev2",
    )
    from dinov2.layers import MemEffAttention, NestedTensorBlock

    model = vt.DinoVisionTransformer(
        img_size=518,
        patch_size=14,
        embed_dim=384,
        depth=2,
        num_heads=6,
        mlp_ratio=4,
        init_values=1.0,
        block_chunks=0,
        block_fn=partial(NestedTensorBlock, attn_class=MemEffAttention),
    )
    return randomize_(model, seed=3).eval()


def reference_forward(dino, sela_state: dict, x: torch.Tensor):
    """SelaVPR from SPEC §2 in plain torch ops around the official DINOv2 modules."""
    st = {k: v for k, v in sela_state.items()}

    def adapter(prefix, h, skip):
        w1, b1 = st[f"{prefix}.D_fc1.weight"], st[f"{prefix}.D_fc1.bias"]
        w2, b2 = st[f"{prefix}.D_fc2.weight"], st[f"{prefix}.D_fc2.bias"]
        out = torch.relu(h @ w1.T + b1) @ w2.T + b2
        return h + out if skip else out

    t = dino.prepare_tokens_with_masks(x)
    for i, blk in enumerate(dino.blocks):
        pre = f"backbone.blocks.{i}"
        t = t + blk.ls1(adapter(f"{pre}.adapter1", blk.attn(blk.norm1(t)), True))
        h = blk.norm2(t)
        t = t + blk.ls2(blk.mlp(h) + 0.2 * adapter(f"{pre}.adapter2", h, False))
    patches = dino.norm(t)[:, 1:]
    B, _, H, W = x.shape
    fmap = patches.reshape(B, H // 14, W // 14, -1).permute(0, 3, 1, 2)
    p = st["aggregation.1.p"]
    normed = F.normalize(fmap, p=2, dim=1)
    g = normed.clamp(min=1e-6).pow(p).mean(dim=(2, 3)).pow(1.0 / p)
    global_desc = F.normalize(g, p=2, dim=-1)
    y = F.conv_transpose2d(
        fmap, st["LocalAdapt.upconv1.weight"], st["LocalAdapt.upconv1.bias"], 2, 1
    )
    y = F.conv_transpose2d(
        torch.relu(y), st["LocalAdapt.upconv2.weight"], st["LocalAdapt.upconv2.bias"], 2, 1
    )
    local = F.normalize(y.permute(0, 2, 3, 1), p=2, dim=-1).permute(0, 3, 1, 2)
    return global_desc, local, patches


@pytest.mark.parametrize("size", [(224, 224), (224, 308), (98, 70)])
def test_outputs_match_plain_reference(official_dinov2_tiny, size):
    model = randomize_(vprkit.create_model("selavpr", **TINY), seed=4)
    # the official DINOv2 weights go in through the backbone-only loading path
    load_weights(model, official_dinov2_tiny.state_dict())
    model.eval()
    x = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        out = model(x)
        ref_g, ref_l, _ = reference_forward(official_dinov2_tiny, model.state_dict(), x)
    rows, cols = size[0] // 14, size[1] // 14
    assert out.global_desc.shape == (2, 384)
    assert out.local_desc.shape == (2, 128, *local_map_size(rows, cols))
    assert out.local_desc.shape[-2:] == (4 * rows - 3, 4 * cols - 3)
    torch.testing.assert_close(out.global_desc, ref_g, atol=2e-5, rtol=0)
    torch.testing.assert_close(out.local_desc, ref_l, atol=2e-5, rtol=0)
    torch.testing.assert_close(
        out.local_desc.norm(dim=1), torch.ones(2, *out.local_desc.shape[-2:])
    )


def test_fresh_adapters_leave_dinov2_unchanged(official_dinov2_tiny):
    model = vprkit.create_model("selavpr", weights=official_dinov2_tiny.state_dict(), **TINY)
    model.eval()
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        ours = model.backbone(x)
        ref = official_dinov2_tiny.forward_features(x)
        _, _, ref_patches = reference_forward(official_dinov2_tiny, model.state_dict(), x)
    torch.testing.assert_close(ours.patch_tokens, ref["x_norm_patchtokens"], atol=1e-5, rtol=0)
    torch.testing.assert_close(ref_patches, ref["x_norm_patchtokens"], atol=1e-5, rtol=0)


def test_default_size_local_map_and_errors():
    assert local_map_size(16, 16) == (61, 61)
    model = vprkit.create_model("selavpr", **TINY).eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, 224, 224))
    assert out.local_desc.shape == (1, 128, 61, 61)
    assert out.global_desc.shape == (1, 384)
    with pytest.raises(ValueError, match="multiple of the patch size"):
        model(torch.randn(1, 3, 225, 224))
    with pytest.raises(ValueError, match="SelaVPR backbone"):
        vprkit.create_model("selavpr", backbone="deit_small")
    reg = meta_model(backbone="dinov2_vitl14_reg4")
    assert reg.backbone.register_tokens.shape == (1, 4, 1024)
    assert "selavpr" in vprkit.list_models("sela*")


@pytest.mark.parametrize("name, options", [("selavpr", TINY), ("r2former", {"depth": 1})])
def test_global_only_extraction_skips_local_features(tmp_path, name, options):
    # Mining and validation need only global descriptors: the same values, without the
    # local branch (SelaVPR's up-convolutions, R2Former's token selection).
    from PIL import Image

    from vprkit.data.images import Preprocess
    from vprkit.extract import computes_local, extract_global_descriptors

    model = vprkit.create_model(name, **options).eval()
    assert computes_local(model)
    paths = []
    for i in range(3):
        paths.append(tmp_path / f"{i}.png")
        Image.fromarray(np.full((64, 64, 3), 40 * i, dtype=np.uint8)).save(paths[-1])
    size = (56, 56) if name == "selavpr" else (64, 64)
    preprocess = Preprocess(image_size=size)
    calls = []
    model.register_forward_hook(lambda m, args, kwargs, out: calls.append(kwargs), with_kwargs=True)
    sunk = []
    with_local = extract_global_descriptors(
        model, paths, preprocess, local_sink=lambda i, local: sunk.append(local)
    )
    global_only = extract_global_descriptors(model, paths, preprocess)
    assert calls == [{}, {"local": False}] and len(sunk) == 1
    # R2Former's last block computes its attention explicitly when it is returned, SDPA
    # otherwise: equal up to float rounding.
    np.testing.assert_allclose(global_only, with_local, rtol=0, atol=1e-6)
