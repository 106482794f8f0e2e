"""DINOv2 SALAD: the released `dino_salad.ckpt` layout loads strictly, outputs equal a
reference built from the official DINOv2 code (PyPI `dinov2`) and a plain-torch transcription
of the official aggregator (serizba/salad `models/aggregators/salad.py`), the full-size key
layout, wrong files, `vprkit eval`, and the training recipe at a tiny size."""

import csv
import json
import math
from functools import partial

import pytest
import torch
import torch.nn.functional as F
from conftest import SHARED_DATA

import vprkit
from vprkit.cli import main as cli_main
from vprkit.models import model_info
from vprkit.train.loop import train
from vprkit.train.recipes import get_recipe
from vprkit.weights import WeightsMismatchError, load_weights, read_checkpoint

LAYOUT_FILE = SHARED_DATA.parent / "reference" / "dinov2_state_dict_layout.json"
DIM, HEADS, DEPTH = 64, 4, 2
CLUSTERS, CLUSTER_DIM, TOKEN_DIM = 16, 8, 32
TINY = {
    "embed_dim": DIM,
    "num_heads": HEADS,
    "depth": DEPTH,
    "num_trainable_blocks": 1,
    "num_clusters": CLUSTERS,
    "cluster_dim": CLUSTER_DIM,
    "token_dim": TOKEN_DIM,
}


def aggregator_shapes(c: int, m: int, l: int, g: int) -> dict[str, list[int]]:
    """The official SALAD's parameters (hidden width 512, dropout at index 1)."""
    return {
        "aggregator.token_features.0.weight": [512, c],
        "aggregator.token_features.0.bias": [512],
        "aggregator.token_features.2.weight": [g, 512],
        "aggregator.token_features.2.bias": [g],
        "aggregator.cluster_features.0.weight": [512, c, 1, 1],
        "aggregator.cluster_features.0.bias": [512],
        "aggregator.cluster_features.3.weight": [l, 512, 1, 1],
        "aggregator.cluster_features.3.bias": [l],
        "aggregator.score.0.weight": [512, c, 1, 1],
        "aggregator.score.0.bias": [512],
        "aggregator.score.3.weight": [m, 512, 1, 1],
        "aggregator.score.3.bias": [m],
        "aggregator.dust_bin": [],
    }


def random_aggregator(c: int, m: int, l: int, g: int, seed: int = 0) -> dict:
    """Random values for every aggregator tensor, biases and dust bin included, scaled so
    the scores spread over a few units and the transport plan is far from uniform."""
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in aggregator_shapes(c, m, l, g).items():
        if key.endswith("dust_bin"):
            state[key] = torch.tensor(0.5 + torch.rand((), generator=gen).item())
        elif key.endswith("bias"):
            state[key] = 0.1 * torch.randn(shape, generator=gen)
        else:
            fan_in = math.prod(shape[1:])
            state[key] = 2.0 * torch.randn(shape, generator=gen) / math.sqrt(fan_in)
    return state


def randomize_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random values everywhere in a ViT (LayerScale, norms and mask token too)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("gamma") or ("norm" in name and name.endswith("weight")):
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
    return model


@pytest.fixture(scope="module")
def official_dinov2_tiny():
    vt = pytest.importorskip(
        "dinov2.models.vision_transformer",
        reason="test-only reference: pip install --no-deps dinov2==0.0.1.dev2",
    )
    from dinov2.layers import MemEffAttention, NestedTensorBlock

    # The torch.hub model's settings (hub/backbones.py): 518, LayerScale 1.0, block_chunks 0.
    model = vt.DinoVisionTransformer(
        img_size=518,
        patch_size=14,
        embed_dim=DIM,
        depth=DEPTH,
        num_heads=HEADS,
        mlp_ratio=4,
        init_values=1.0,
        block_chunks=0,
        block_fn=partial(NestedTensorBlock, attn_class=MemEffAttention),
    )
    return randomize_(model, seed=3).eval()


def released_checkpoint(dino: torch.nn.Module, seed: int = 1) -> dict:
    """A plain state dict in the layout of `dino_salad.ckpt`: the hub DINOv2 under
    `backbone.model.`, the aggregator under `aggregator.`."""
    state = {f"backbone.model.{k}": v.clone() for k, v in dino.state_dict().items()}
    state.update(random_aggregator(DIM, CLUSTERS, CLUSTER_DIM, TOKEN_DIM, seed))
    return state


def hub_pos_embed(pos_embed: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The newer torch.hub DINOv2 `interpolate_pos_encoding` (interpolate_offset 0.1,
    interpolate_antialias False), which SALAD's `torch.hub.load` gets."""
    n = pos_embed.shape[1] - 1
    if n == (height // 14) * (width // 14) and height == width:
        return pos_embed
    pos = pos_embed.float()
    dim = pos.shape[-1]
    side = int(math.sqrt(n))
    sx = float(height // 14 + 0.1) / side
    sy = float(width // 14 + 0.1) / side
    patch = F.interpolate(
        pos[:, 1:].reshape(1, side, side, dim).permute(0, 3, 1, 2),
        scale_factor=(sx, sy),
        mode="bicubic",
        antialias=False,
    )
    patch = patch.permute(0, 2, 3, 1).reshape(1, -1, dim)
    return torch.cat((pos[:, :1], patch), dim=1)


def reference_backbone(dino, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The official `DINOv2.forward` (norm_layer=True, return_token=True) on the official
    modules: frozen and trained blocks give the same values, so all blocks run in turn."""
    B, _, H, W = x.shape
    t = dino.prepare_tokens_with_masks(x)
    for blk in dino.blocks:
        t = blk(t)
    t = dino.norm(t)
    f = t[:, 1:].reshape(B, H // 14, W // 14, t.shape[-1]).permute(0, 3, 1, 2)
    return f, t[:, 0]


def reference_aggregator(st: dict, x: torch.Tensor, t: torch.Tensor, iters: int = 3):
    """SALAD.forward in eval mode from plain torch ops, following the official code."""

    def conv(h, name):
        return F.conv2d(h, st[f"aggregator.{name}.weight"], st[f"aggregator.{name}.bias"])

    def linear(h, name):
        return F.linear(h, st[f"aggregator.{name}.weight"], st[f"aggregator.{name}.bias"])

    f = conv(torch.relu(conv(x, "cluster_features.0")), "cluster_features.3").flatten(2)
    p = conv(torch.relu(conv(x, "score.0")), "score.3").flatten(2)
    t = linear(torch.relu(linear(t, "token_features.0")), "token_features.2")

    # log_optimal_transport (SuperGlue's, as SALAD copies it)
    alpha = st["aggregator.dust_bin"]
    b, m, n = p.shape
    one = p.new_tensor(1)
    ms, ns, bs = (m * one).to(p), (n * one).to(p), ((n - m) * one).to(p)
    bins = alpha.expand(b, 1, n)
    couplings = torch.cat([p, bins], 1)
    norm = -(ms + ns).log()
    log_mu = torch.cat([norm.expand(m), bs.log()[None] + norm])
    log_nu = norm.expand(n)
    log_mu, log_nu = log_mu[None].expand(b, -1), log_nu[None].expand(b, -1)
    u, v = torch.zeros_like(log_mu), torch.zeros_like(log_nu)
    for _ in range(iters):
        u = log_mu - torch.logsumexp(couplings + v.unsqueeze(1), dim=2)
        v = log_nu - torch.logsumexp(couplings + u.unsqueeze(2), dim=1)
    Z = couplings + u.unsqueeze(2) + v.unsqueeze(1)
    Z = Z - norm

    plan = torch.exp(Z)
    p = plan[:, :-1, :]
    l = f.shape[1]
    p = p.unsqueeze(1).repeat(1, l, 1, 1)
    f = f.unsqueeze(2).repeat(1, 1, m, 1)
    out = torch.cat(
        [
            F.normalize(t, p=2, dim=-1),
            F.normalize((f * p).sum(dim=-1), p=2, dim=1).flatten(1),
        ],
        dim=-1,
    )
    return F.normalize(out, p=2, dim=-1), plan


@pytest.mark.parametrize("size", [(322, 322), (224, 308)])
def test_released_layout_loads_and_matches_the_official_code(official_dinov2_tiny, tmp_path, size):
    ckpt = released_checkpoint(official_dinov2_tiny)
    path = tmp_path / "dino_salad.ckpt"
    torch.save(ckpt, path)
    model = vprkit.create_model("salad", weights=path, **TINY).eval()
    for k, v in model.state_dict().items():
        assert torch.equal(v, ckpt[k]), k
    x = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        out = model(x).global_desc
        ref, plan = reference_aggregator(ckpt, *reference_backbone(official_dinov2_tiny, x))
        # A scalar dust bin shifts a whole row of the log-couplings, which its row potential
        # absorbs at the first Sinkhorn step: the official formulation ignores its value.
        other = dict(ckpt, **{"aggregator.dust_bin": ckpt["aggregator.dust_bin"] + 1.0})
        moved, _ = reference_aggregator(other, *reference_backbone(official_dinov2_tiny, x))
    assert out.shape == (2, CLUSTERS * CLUSTER_DIM + TOKEN_DIM) == (2, model.global_dim)
    diff = (out - ref).abs().max().item()
    assert diff < 1e-5, diff
    assert (moved - ref).abs().max().item() < 1e-6
    # the plan is far from uniform: features keep very different shares of their mass
    kept = plan[:, :-1].sum(dim=1) / plan.sum(dim=1)  # (B, n) mass to the real clusters
    assert kept.amax() > 5 * kept.amin() and plan[:, :-1].amax() > 5 * plan[:, :-1].mean()
    torch.testing.assert_close(out.norm(dim=-1), torch.ones(2))


@pytest.mark.parametrize("size", [(322, 322), (224, 308), (518, 518)])
def test_hub_pos_embed_interpolation_is_the_one_vprkit_follows(official_dinov2_tiny, size):
    # The PyPI DINOv2 (2023) and the newer torch.hub code compute the same scale factor.
    pos = official_dinov2_tiny.pos_embed.detach()
    x = torch.zeros(1, 1 + (size[0] // 14) * (size[1] // 14), DIM)
    pypi = official_dinov2_tiny.interpolate_pos_encoding(x, *size)
    assert torch.equal(hub_pos_embed(pos, *size), pypi)
    ours = vprkit.create_model("salad", weights=released_checkpoint(official_dinov2_tiny), **TINY)
    assert torch.equal(ours.backbone.model.interpolate_pos_embed(*size), pypi)


def full_size_layout() -> dict[str, list[int]]:
    """Every key and shape of the released `dino_salad.ckpt`: the official DINOv2 ViT-B/14
    layout under `backbone.model.` and the aggregator for 768 channels, 64 x 128 + 256."""
    dino = json.loads(LAYOUT_FILE.read_text())["vitb14"]["keys"]
    keys = {f"backbone.model.{k}": v for k, v in dino.items()}
    return keys | aggregator_shapes(768, 64, 128, 256)


def test_full_size_layout_counts_and_info(shared_data):
    if not LAYOUT_FILE.is_file():
        pytest.skip(f"{LAYOUT_FILE} not found")
    with torch.device("meta"):
        model = vprkit.create_model("salad")
    assert {k: list(v.shape) for k, v in model.state_dict().items()} == full_size_layout()
    assert model.global_dim == 8448
    params = dict(model.named_parameters())
    assert sum(p.numel() for p in params.values()) == 86_580_480 + 1_411_009
    # trainable as the official run: the last 4 blocks, the final norm, the aggregator
    trainable = {n for n, p in params.items() if p.requires_grad}

    def officially_trained(name: str) -> bool:
        parts = name.split(".")
        if name.startswith(("aggregator.", "backbone.model.norm.")):
            return True
        return parts[:3] == ["backbone", "model", "blocks"] and int(parts[3]) >= 8

    expected = {n for n in params if officially_trained(n)}
    assert trainable == expected
    assert sum(params[n].numel() for n in trainable) == 4 * 7_089_408 + 1_536 + 1_411_009
    info = model_info("salad")
    assert info.image_size == (322, 322) and info.weights == ("salad",)
    assert info.reranker is None
    from fnmatch import fnmatch

    assert {n for n in params if any(fnmatch(n, p) for p in info.train_only)} == expected
    from vprkit.hub import OFFICIAL_WEIGHTS

    entry = OFFICIAL_WEIGHTS["salad"]
    assert entry.url == "https://github.com/serizba/salad/releases/download/v1.0.0/dino_salad.ckpt"
    assert entry.filename == "dino_salad.ckpt" and entry.checksum is None


def test_wrong_files_are_refused_naming_the_keys(official_dinov2_tiny):
    ckpt = released_checkpoint(official_dinov2_tiny)
    removed = dict(ckpt)
    del removed["aggregator.dust_bin"]
    del removed["backbone.model.blocks.1.attn.qkv.bias"]
    with pytest.raises(WeightsMismatchError) as err:
        load_weights(vprkit.create_model("salad", **TINY), removed)
    assert err.value.missing == ["backbone.model.blocks.1.attn.qkv.bias", "aggregator.dust_bin"]
    assert "aggregator.dust_bin" in str(err.value)
    added = dict(ckpt, **{"aggregator.extra.weight": torch.zeros(3)})
    with pytest.raises(WeightsMismatchError, match=r"unexpected keys \(1\): aggregator\.extra"):
        load_weights(vprkit.create_model("salad", **TINY), added)
    misshaped = dict(ckpt, **{"aggregator.score.3.bias": torch.zeros(CLUSTERS + 1)})
    with pytest.raises(WeightsMismatchError, match=r"aggregator\.score\.3\.bias: file \(17,\)"):
        load_weights(vprkit.create_model("salad", **TINY), misshaped)
    # a vprkit-named (un-prefixed) backbone is neither layout: every key is named
    renamed = {k.replace("backbone.model.", "backbone."): v for k, v in ckpt.items()}
    with pytest.raises(WeightsMismatchError, match=r"missing keys .*backbone\.model\.cls_token"):
        load_weights(vprkit.create_model("salad", **TINY), renamed)


def test_dinov2_pretrain_file_is_a_starting_point(official_dinov2_tiny, tmp_path):
    path = tmp_path / "dinov2_vitb14_pretrain.pth"
    torch.save(official_dinov2_tiny.state_dict(), path)
    torch.manual_seed(0)
    init = vprkit.create_model("salad", **TINY).state_dict()
    torch.manual_seed(0)
    model = vprkit.create_model("salad", weights=path, **TINY)
    for k, v in model.state_dict().items():
        if k.startswith("backbone.model."):
            assert torch.equal(v, official_dinov2_tiny.state_dict()[k[len("backbone.model.") :]])
        else:
            assert torch.equal(v, init[k]), k  # the aggregator keeps its initialization
    assert model.aggregator.dust_bin.item() == 1.0
    partial_state = dict(official_dinov2_tiny.state_dict())
    del partial_state["blocks.1.ls2.gamma"]
    with pytest.raises(WeightsMismatchError, match=r"blocks\.1\.ls2\.gamma"):
        load_weights(vprkit.create_model("salad", **TINY), partial_state)


def test_too_few_patches_and_bad_options_are_refused():
    model = vprkit.create_model("salad", **TINY).eval()
    with pytest.raises(ValueError, match="16 clusters"):
        model(torch.randn(1, 3, 42, 42))  # 9 patches
    with torch.no_grad():  # as many patches as clusters: the dust bin gets no mass
        out = model(torch.randn(1, 3, 56, 56)).global_desc
    assert torch.isfinite(out).all()
    with pytest.raises(ValueError, match="num_trainable_blocks"):
        vprkit.create_model("salad", **{**TINY, "num_trainable_blocks": 3})
    with pytest.raises(ValueError, match="SALAD backbone"):
        vprkit.create_model("salad", backbone="dinov2_vitb14_reg4")


def test_eval_command_runs_end_to_end(shared_data, tmp_path, capsys):
    options = [f"{k}={v}" for k, v in {**TINY, "num_clusters": 8}.items()]
    argv = ["eval", "--method", "salad", "--weights", "random"]
    for option in options:
        argv += ["--model_option", option]
    argv += [
        "--dataset_folder",
        str(shared_data / "corridor"),
        "--image_size",
        "56",
        "56",
        "--num_workers",
        "0",
        "--recall_values",
        "1",
        "5",
        "--save_dir",
        str(tmp_path / "runs"),
    ]
    assert cli_main(argv) == 0
    assert "R@1" in capsys.readouterr().out
    (run,) = [p for p in (tmp_path / "runs").glob("*/*") if p.is_dir()]
    summary = json.loads((run / "recalls.json").read_text())
    assert set(summary["recalls"]) == {"R@1", "R@5"}


def test_recipe_has_the_official_settings():
    cfg = get_recipe("salad").config_defaults()
    assert cfg["model"] == "salad"
    assert (cfg["places_per_batch"], cfg["images_per_place"], cfg["image_size"]) == (
        60,
        4,
        [224, 224],
    )
    assert (cfg["optimizer"], cfg["lr"], cfg["weight_decay"]) == ("adamw", 6e-5, 9.5e-9)
    assert (cfg["epochs"], cfg["rand_augment_ops"], cfg["save_best"]) == (4, 3, "R@1")
    assert (cfg["ms_alpha"], cfg["ms_beta"], cfg["ms_base"], cfg["ms_epsilon"]) == (1, 50, 0, 0.1)
    assert cfg["train_only"] == list(model_info("salad").train_only)


def test_recipe_trains_only_the_official_parameters(tiny_synthetic, tmp_path):
    tiny = {**TINY, "num_clusters": 8}  # 56x56 images have 16 patches
    train_only = ["backbone.model.blocks.1.*", "backbone.model.norm.*", "aggregator.*"]
    cfg = {
        "gsv_root": str(tiny_synthetic / "gsv"),
        "model_options": tiny,
        "train_only": train_only,
        "image_size": [56, 56],
        "places_per_batch": 16,
        "rand_augment_ops": 0,
        "num_workers": 0,
        "lr": 1e-3,
        "precision": "fp32",
        "device": "cpu",
        "epochs": 2,
        "save_dir": str(tmp_path / "runs"),
        "recall_values": [1, 5],
    }
    run_dir, summary = train("salad", cfg)
    rows = list(csv.DictReader(open(run_dir / "train_log.csv")))
    assert len(rows) == 2 * 3  # 48 places / 16 per batch
    lrs = [float(r["lr"]) for r in rows]
    assert lrs[0] == 1e-3 and lrs[-1] < lrs[0]  # decayed per epoch
    losses = [float(r["loss"]) for r in rows]
    assert sum(losses[-3:]) < sum(losses[:3]), losses
    state = read_checkpoint(run_dir / "last.pth")["state_dict"]
    torch.manual_seed(cfg.get("seed", 0))  # the trainer seeds before building the model
    start = vprkit.create_model("salad", **tiny).state_dict()
    changed = {k for k in state if not torch.equal(state[k], start[k])}
    assert "aggregator.score.3.weight" in changed and "backbone.model.norm.weight" in changed
    assert "backbone.model.blocks.1.attn.qkv.weight" in changed
    assert all(
        k.startswith(("aggregator.", "backbone.model.norm.", "backbone.model.blocks.1."))
        for k in changed
    )
