"""MegaLoc: the released layout (key names and shapes at full size), strict loading of a
`model.safetensors` written in that layout, and outputs against a reference made of the
official DINOv2 code (PyPI `dinov2`) plus the official aggregator transcribed below in plain
torch, line by line from gmberton/MegaLoc `megaloc_model.py` (tiny configs)."""

import json
import math
from functools import partial

import pytest
import torch
import torch.nn.functional as F
from conftest import SHARED_DATA

import vprkit
from vprkit.cli import main as cli_main
from vprkit.errors import VprkitError
from vprkit.hub import OFFICIAL_WEIGHTS
from vprkit.models import model_info
from vprkit.models.megaloc import nearest_multiple_size
from vprkit.weights import WeightsFileError, WeightsMismatchError, load_weights

safetensors_torch = pytest.importorskip("safetensors.torch")

LAYOUT_FILE = SHARED_DATA.parent / "reference" / "dinov2_state_dict_layout.json"
# A tiny backbone (2 blocks, 64-D) and aggregator (8 clusters of 16, 8-D token, 24-D out).
TINY_VIT = {"depth": 2, "embed_dim": 64, "num_heads": 4}
TINY_AGG = {"num_clusters": 8, "cluster_dim": 16, "token_dim": 8, "mlp_dim": 32, "feat_dim": 24}
TINY = {**TINY_VIT, **TINY_AGG}


def aggregator_layout(c: int, clusters: int, l: int, g: int, mlp: int, out: int) -> dict:
    """Key -> shape of the official `Aggregator` (`agg` = FeatureAggregator, `linear`)."""
    a = "aggregator.agg"
    return {
        f"{a}.token_features.0.weight": [mlp, c],
        f"{a}.token_features.0.bias": [mlp],
        f"{a}.token_features.2.weight": [g, mlp],
        f"{a}.token_features.2.bias": [g],
        f"{a}.cluster_features.0.weight": [mlp, c, 1, 1],
        f"{a}.cluster_features.0.bias": [mlp],
        f"{a}.cluster_features.3.weight": [l, mlp, 1, 1],
        f"{a}.cluster_features.3.bias": [l],
        f"{a}.score.0.weight": [mlp, c, 1, 1],
        f"{a}.score.0.bias": [mlp],
        f"{a}.score.3.weight": [clusters, mlp, 1, 1],
        f"{a}.score.3.bias": [clusters],
        f"{a}.dust_bin": [],
        "aggregator.linear.weight": [out, clusters * l + g],
        "aggregator.linear.bias": [out],
    }


def test_full_size_keys_match_released_layout(shared_data):
    if not LAYOUT_FILE.is_file():
        pytest.skip(f"{LAYOUT_FILE} not found")
    dino = json.loads(LAYOUT_FILE.read_text())["vitb14"]["keys"]
    # MegaLoc's own DINOv2 copy has no mask_token; everything else is DINOv2 ViT-B/14's.
    released = {f"backbone.{k}": v for k, v in dino.items() if k != "mask_token"}
    released |= aggregator_layout(768, 64, 256, 256, 512, 8448)
    with torch.device("meta"):
        model = vprkit.create_model("megaloc")
    ours = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert ours == released
    assert model.global_dim == 8448
    assert sum(v.numel() for v in model.state_dict().values()) == 228_639_553
    info = model_info(model)
    assert info.image_size == (322, 322) and info.weights == ("megaloc",)
    assert "megaloc" in OFFICIAL_WEIGHTS


def test_train_only_selects_last_four_blocks_norm_and_aggregator():
    import fnmatch

    with torch.device("meta"):
        model = vprkit.create_model("megaloc")
    patterns = model_info("megaloc").train_only
    trained = {
        n for n, _ in model.named_parameters() if any(fnmatch.fnmatch(n, p) for p in patterns)
    }
    blocks = {int(n.split(".")[2]) for n in trained if n.startswith("backbone.blocks.")}
    assert blocks == {8, 9, 10, 11}
    assert {
        "backbone.norm.weight",
        "aggregator.agg.dust_bin",
        "aggregator.linear.weight",
    } <= trained
    assert not any(n.startswith(("backbone.patch_embed", "backbone.pos_embed")) for n in trained)


def randomize_(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Random values in every tensor (biases, norms, LayerScale too): no term vanishes."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("gamma") or ("norm" in name and name.endswith("weight")):
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
    return module


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
        embed_dim=TINY_VIT["embed_dim"],
        depth=TINY_VIT["depth"],
        num_heads=TINY_VIT["num_heads"],
        mlp_ratio=4,
        init_values=1.0,
        block_chunks=0,
        block_fn=partial(NestedTensorBlock, attn_class=MemEffAttention),
    )
    return randomize_(model, seed=3).eval()


def released_state(dino: torch.nn.Module, seed: int = 4) -> dict[str, torch.Tensor]:
    """A `model.safetensors` state dict in the released layout: the official DINOv2 tensors
    under `backbone.` (no mask_token) and random aggregator tensors, dust bin included."""
    state = {f"backbone.{k}": v.clone() for k, v in dino.state_dict().items() if k != "mask_token"}
    g = torch.Generator().manual_seed(seed)
    layout = aggregator_layout(TINY_VIT["embed_dim"], 8, 16, 8, 32, 24)
    for key, shape in layout.items():
        scale = 0.3 if key.endswith("bias") else 0.2
        state[key] = scale * torch.randn(shape, generator=g)
    state["aggregator.agg.dust_bin"] = torch.tensor(0.7)
    return state


def reference_megaloc(dino: torch.nn.Module, st: dict, images: torch.Tensor) -> torch.Tensor:
    """MegaLoc's forward from the official `megaloc_model.py`, in plain torch around the
    official DINOv2 (its `x_norm_*` outputs: the final norm on every token)."""
    b, c, h, w = images.shape
    if h % 14 != 0 or w % 14 != 0:
        h = round(h / 14) * 14
        w = round(w / 14) * 14
        # torchvision's resize(tensor, [h, w], antialias=True) on float images is this call
        # (torchvision/transforms/_functional_tensor.py); torchvision is not installed here.
        images = F.interpolate(
            images, size=[h, w], mode="bilinear", align_corners=False, antialias=True
        )
    out = dino.forward_features(images)
    t, feats = out["x_norm_clstoken"], out["x_norm_patchtokens"]
    x = feats.reshape((b, h // 14, w // 14, feats.shape[-1])).permute(0, 3, 1, 2)

    a = "aggregator.agg."

    def conv(z, name):
        return F.conv2d(z, st[a + name + ".weight"], st[a + name + ".bias"])

    def lin(z, name):
        return F.linear(z, st[a + name + ".weight"], st[a + name + ".bias"])

    # FeatureAggregator.forward (dropout is the identity in eval mode)
    f = conv(F.relu(conv(x, "cluster_features.0")), "cluster_features.3").flatten(2)
    p = conv(F.relu(conv(x, "score.0")), "score.3").flatten(2)
    t = lin(F.relu(lin(t, "token_features.0")), "token_features.2")

    # get_matching_probs(p, dust_bin, 3), reg 1.0, with log_otp_solver inlined
    S = p
    batch_size, m, n = S.size()
    S_aug = torch.empty(batch_size, m + 1, n, dtype=S.dtype)
    S_aug[:, :m, :n] = S
    S_aug[:, m, :] = st[a + "dust_bin"]
    norm = -torch.tensor(math.log(n + m))
    log_a, log_b = norm.expand(m + 1).contiguous(), norm.expand(n).contiguous()
    log_a[-1] = log_a[-1] + math.log(n - m)
    log_a, log_b = log_a.expand(batch_size, -1), log_b.expand(batch_size, -1)
    M = S_aug / 1.0
    u, v = torch.zeros_like(log_a), torch.zeros_like(log_b)
    for _ in range(3):
        u = log_a - torch.logsumexp(M + v.unsqueeze(1), dim=2).squeeze()
        v = log_b - torch.logsumexp(M + u.unsqueeze(2), dim=1).squeeze()
    log_P = M + u.unsqueeze(2) + v.unsqueeze(1)
    p = torch.exp(log_P - norm)
    p = p[:, :-1, :]

    # the earlier official version's repeat-and-sum (same as its later einsum)
    cluster_dim, num_clusters = f.shape[1], p.shape[1]
    p = p.unsqueeze(1).repeat(1, cluster_dim, 1, 1)
    f = f.unsqueeze(2).repeat(1, 1, num_clusters, 1)
    f = torch.cat(
        [
            F.normalize(t, p=2, dim=-1),
            F.normalize((f * p).sum(dim=-1), p=2, dim=1).flatten(1),
        ],
        dim=-1,
    )
    salad = F.normalize(f, p=2, dim=-1)
    # Aggregator.linear, then MegaLoc's L2Norm (dim 1)
    desc = F.linear(salad, st["aggregator.linear.weight"], st["aggregator.linear.bias"])
    return F.normalize(desc, p=2.0, dim=1)


@pytest.mark.parametrize("size", [(322, 322), (224, 308), (100, 130), (105, 147)])
def test_outputs_match_official_reference(official_dinov2_tiny, tmp_path, size):
    state = released_state(official_dinov2_tiny)
    path = tmp_path / "model.safetensors"
    safetensors_torch.save_file(state, str(path))
    model = vprkit.create_model("megaloc", weights=path, **TINY).eval()
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k
    x = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ours = model(x).global_desc
        ref = reference_megaloc(official_dinov2_tiny, state, x)
        # batch of one: the official solver's squeeze() path
        single = model(x[:1]).global_desc
        ref_single = reference_megaloc(official_dinov2_tiny, state, x[:1])
    assert ours.shape == (2, 24)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(single, ref_single, atol=1e-5, rtol=0)
    torch.testing.assert_close(ours.norm(dim=-1), torch.ones(2))
    assert (ours[0] - ours[1]).abs().max() > 1e-3  # the images give different descriptors


def test_resize_rounds_to_nearest_multiple_half_to_even():
    assert nearest_multiple_size(100, 130) == (98, 126)
    assert nearest_multiple_size(105, 147) == (112, 140)  # 7.5 -> 8, 10.5 -> 10
    assert nearest_multiple_size(322, 320) == (322, 322)
    model = vprkit.create_model("megaloc", **TINY).eval()
    with pytest.raises(VprkitError, match="at least as many patches as clusters"):
        model(torch.randn(1, 3, 28, 42))  # 2 x 3 = 6 patches for 8 clusters
    with pytest.raises(VprkitError, match="too small"):
        model(torch.randn(1, 3, 5, 200))


def test_wrong_files_are_refused_naming_keys(official_dinov2_tiny, tmp_path):
    state = released_state(official_dinov2_tiny)
    bad = dict(state)
    del bad["aggregator.agg.dust_bin"]
    bad["aggregator.agg.cluster_features.1.weight"] = torch.zeros(3)
    path = tmp_path / "bad.safetensors"
    safetensors_torch.save_file(bad, str(path))
    with pytest.raises(WeightsMismatchError) as err:
        vprkit.create_model("megaloc", weights=path, **TINY)
    message = str(err.value)
    assert "missing keys (1): aggregator.agg.dust_bin" in message
    assert "unexpected keys (1): aggregator.agg.cluster_features.1.weight" in message

    misshaped = dict(state, **{"aggregator.linear.weight": torch.zeros(24, 100)})
    with pytest.raises(WeightsMismatchError, match=r"aggregator\.linear\.weight: file \(24, 100\)"):
        load_weights(vprkit.create_model("megaloc", **TINY), misshaped)
    # A DINOv2 file with mask_token (the hub layout) is not MegaLoc's release.
    hub_layout = dict(state, **{"backbone.mask_token": torch.zeros(1, 64)})
    with pytest.raises(WeightsMismatchError, match=r"unexpected keys \(1\): backbone\.mask_token"):
        load_weights(vprkit.create_model("megaloc", **TINY), hub_layout)

    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    with pytest.raises(WeightsFileError, match="cannot read it as a safetensors file"):
        vprkit.create_model("megaloc", weights=corrupt, **TINY)


def test_eval_cli_runs_end_to_end(shared_data, capsys):
    options = [f"{k}={v}" for k, v in TINY.items()]
    argv = ["eval", "--method", "megaloc", "--weights", "random", "--num_workers", "0"]
    for option in options:
        argv += ["--model_option", option]
    argv += ["--dataset_folder", str(shared_data / "corridor"), "--recall_values", "1", "5"]
    torch.manual_seed(0)
    assert cli_main(argv) == 0
    out = capsys.readouterr().out
    assert "R@1" in out and "R@5" in out
