"""BoQ (DINOv2, 12288-D): the released key layout at full size (meta device), strict loading
of a file in that layout, outputs against an independent reference (the official DINOv2 code
for the backbone, the aggregator transcribed here in plain torch ops from the official
`src/boq.py` of amaralibey/Bag-of-Queries), the frozen blocks, evaluation from the command line
and the training recipe."""

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
from vprkit.hub import OFFICIAL_WEIGHTS
from vprkit.models import model_info
from vprkit.train.loop import train
from vprkit.train.recipes import RECIPES
from vprkit.weights import WeightsMismatchError, load_weights, read_checkpoint

LAYOUT_FILE = SHARED_DATA.parent / "reference" / "dinov2_state_dict_layout.json"
# A tiny ViT (2 blocks, 64-D, 4 heads) and aggregator (128 channels = 2 heads, 8 queries).
TINY_VIT = {"embed_dim": 64, "num_heads": 4, "depth": 2}
TINY_BOQ = {"proj_channels": 128, "num_queries": 8, "num_layers": 2, "row_dim": 4}
TINY = {**TINY_VIT, **TINY_BOQ}


def meta_model(**kwargs):
    with torch.device("meta"):
        return vprkit.create_model("boq", **kwargs)


def aggregator_layout(
    in_ch: int, proj: int, queries: int, layers: int, row_dim: int
) -> dict[str, list[int]]:
    """The keys and shapes of the official `BoQ(in_ch, proj, queries, layers, row_dim)`, read
    off its modules: Conv2d, LayerNorm, per block a batch-first TransformerEncoderLayer (ff
    4 * proj), the queries, two MultiheadAttention and two LayerNorm, then the Linear."""

    def mha(prefix):
        return {
            f"{prefix}.in_proj_weight": [3 * proj, proj],
            f"{prefix}.in_proj_bias": [3 * proj],
            f"{prefix}.out_proj.weight": [proj, proj],
            f"{prefix}.out_proj.bias": [proj],
        }

    def norm(prefix):
        return {f"{prefix}.weight": [proj], f"{prefix}.bias": [proj]}

    keys = {"aggregator.proj_c.weight": [proj, in_ch, 3, 3], "aggregator.proj_c.bias": [proj]}
    keys |= norm("aggregator.norm_input")
    for i in range(layers):
        pre = f"aggregator.boqs.{i}"
        keys[f"{pre}.queries"] = [1, queries, proj]
        keys |= mha(f"{pre}.encoder.self_attn")
        keys |= {
            f"{pre}.encoder.linear1.weight": [4 * proj, proj],
            f"{pre}.encoder.linear1.bias": [4 * proj],
            f"{pre}.encoder.linear2.weight": [proj, 4 * proj],
            f"{pre}.encoder.linear2.bias": [proj],
        }
        keys |= norm(f"{pre}.encoder.norm1") | norm(f"{pre}.encoder.norm2")
        keys |= mha(f"{pre}.self_attn") | norm(f"{pre}.norm_q")
        keys |= mha(f"{pre}.cross_attn") | norm(f"{pre}.norm_out")
    keys["aggregator.fc.weight"] = [row_dim, layers * queries]
    keys["aggregator.fc.bias"] = [row_dim]
    return keys


def random_tensor(name: str, shape, g: torch.Generator, scale: float = 0.2) -> torch.Tensor:
    """Norm weights and LayerScale near 1, everything else (biases, queries, projections)
    random and non-zero."""
    if name.endswith("gamma") or ("norm" in name and name.endswith("weight")):
        return 1 + 0.3 * torch.randn(shape, generator=g)
    return scale * torch.randn(shape, generator=g)


# --------------------------------------------------------------------------------------------
# the released layout at full size


def test_full_size_keys_match_the_released_layout():
    if not LAYOUT_FILE.is_file():
        pytest.skip(f"{LAYOUT_FILE} not found")
    dino = json.loads(LAYOUT_FILE.read_text())["vitb14"]["keys"]
    # hubconf.py: DinoV2() + BoQ(768, proj_channels=384, num_queries=64, num_layers=2, 32)
    official = {f"backbone.dino.{k}": v for k, v in dino.items()}
    official |= aggregator_layout(768, 384, 64, 2, 32)
    model = meta_model()
    assert {k: list(v.shape) for k, v in model.state_dict().items()} == official
    assert model.global_dim == 12288
    assert sum(p.numel() for p in model.aggregator.parameters()) == 8_626_080
    # The official training: blocks 10 and 11 and the aggregator train, nothing else.
    info = model_info("boq")
    assert info.image_size == (322, 322) and info.weights == ("boq_dinov2",)
    for name, p in model.named_parameters():
        trains = name.startswith(("backbone.dino.blocks.10.", "backbone.dino.blocks.11.", "aggr"))
        assert p.requires_grad == trains, name
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 22_804_896
    entry = OFFICIAL_WEIGHTS["boq_dinov2"]
    assert entry.filename == "dinov2_12288.pth" and entry.sha256 is None


# --------------------------------------------------------------------------------------------
# the official DINOv2 code and a plain-torch aggregator


@pytest.fixture(scope="module")
def official_dinov2_tiny():
    vt = pytest.importorskip(
        "dinov2.models.vision_transformer",
        reason="test-only reference: pip install --no-deps dinov2==0.0.1.dev2",
    )
    from dinov2.layers import MemEffAttention, NestedTensorBlock

    # As the hub's dinov2_vitb14 builds it (518, patch 14, LayerScale 1), with tiny sizes.
    model = vt.DinoVisionTransformer(
        img_size=518,
        patch_size=14,
        mlp_ratio=4,
        init_values=1.0,
        block_chunks=0,
        block_fn=partial(NestedTensorBlock, attn_class=MemEffAttention),
        **TINY_VIT,
    )
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(random_tensor(name, p.shape, g, scale=0.05))
    return model.eval()


def released_state(dino: torch.nn.Module, seed: int = 1) -> dict:
    """A file in the released layout: the official DINOv2 tensors under `backbone.dino.`,
    random aggregator tensors under the official names."""
    g = torch.Generator().manual_seed(seed)
    state = {f"backbone.dino.{k}": v.clone() for k, v in dino.state_dict().items()}
    layout = aggregator_layout(TINY_VIT["embed_dim"], *TINY_BOQ.values())
    state |= {k: random_tensor(k, shape, g) for k, shape in layout.items()}
    return state


def _mha(st, prefix, q_in, k_in, v_in, heads):
    """nn.MultiheadAttention (batch first) from its raw tensors; also the head-mean weights."""
    w, b = st[f"{prefix}.in_proj_weight"], st[f"{prefix}.in_proj_bias"]
    dim = w.shape[1]
    wq, wk, wv = w.chunk(3)
    bq, bk, bv = b.chunk(3)

    def split(t):  # (B, n, D) -> (B, heads, n, D / heads)
        return t.reshape(t.shape[0], t.shape[1], heads, dim // heads).transpose(1, 2)

    q, k, v = split(q_in @ wq.T + bq), split(k_in @ wk.T + bk), split(v_in @ wv.T + bv)
    att = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(dim // heads), dim=-1)
    out = (att @ v).transpose(1, 2).reshape(q_in.shape[0], q_in.shape[1], dim)
    out = out @ st[f"{prefix}.out_proj.weight"].T + st[f"{prefix}.out_proj.bias"]
    return out, att.mean(dim=1)


def _ln(st, prefix, x):
    return F.layer_norm(x, x.shape[-1:], st[f"{prefix}.weight"], st[f"{prefix}.bias"], 1e-5)


def reference_forward(dino, st: dict, x: torch.Tensor):
    """The official DinoV2.forward (src/backbones.py) with the official DINOv2 modules, then
    BoQ.forward and BoQBlock.forward (src/boq.py) line by line in plain torch ops."""
    B, _, H, W = x.shape
    t = dino.prepare_tokens_with_masks(x)
    for blk in dino.blocks:
        t = blk(t)
    t = t[:, 1:]  # the cls token dropped; no final norm
    fmap = t.permute(0, 2, 1).reshape(B, t.shape[-1], H // 14, W // 14)

    y = F.conv2d(fmap, st["aggregator.proj_c.weight"], st["aggregator.proj_c.bias"], padding=1)
    y = _ln(st, "aggregator.norm_input", y.flatten(2).permute(0, 2, 1))
    heads = y.shape[-1] // 64
    outs, attns = [], []
    for i in range(TINY_BOQ["num_layers"]):
        pre = f"aggregator.boqs.{i}"
        # TransformerEncoderLayer: post-norm, ReLU, no dropout
        e = f"{pre}.encoder"
        y = _ln(st, f"{e}.norm1", y + _mha(st, f"{e}.self_attn", y, y, y, heads)[0])
        ff = torch.relu(y @ st[f"{e}.linear1.weight"].T + st[f"{e}.linear1.bias"])
        ff = ff @ st[f"{e}.linear2.weight"].T + st[f"{e}.linear2.bias"]
        y = _ln(st, f"{e}.norm2", y + ff)
        q = st[f"{pre}.queries"].repeat(B, 1, 1)
        q = _ln(st, f"{pre}.norm_q", q + _mha(st, f"{pre}.self_attn", q, q, q, heads)[0])
        out, att = _mha(st, f"{pre}.cross_attn", q, y, y, heads)
        outs.append(_ln(st, f"{pre}.norm_out", out))
        attns.append(att)
    out = torch.cat(outs, dim=1)
    out = out.permute(0, 2, 1) @ st["aggregator.fc.weight"].T + st["aggregator.fc.bias"]
    return F.normalize(out.flatten(1), p=2, dim=-1), attns


@pytest.mark.parametrize("size", [(322, 322), (224, 308)])
def test_released_layout_loads_strictly_and_matches_the_reference(
    official_dinov2_tiny, tmp_path, size
):
    state = released_state(official_dinov2_tiny)
    path = tmp_path / "dinov2_12288.pth"
    torch.save(state, path)  # the release is a plain state dict (hubconf.py loads it so)
    model = vprkit.create_model("boq", weights=path, **TINY).eval()
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k
    x = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        out = model(x)
        desc, attns = model.aggregator(model.backbone(x), return_attention=True)
        ref, ref_attns = reference_forward(official_dinov2_tiny, state, x)
    assert out.global_desc.shape == (2, 128 * 4)
    torch.testing.assert_close(out.global_desc, ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(desc, ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(out.global_desc.norm(dim=-1), torch.ones(2))
    rows, cols = size[0] // 14, size[1] // 14
    for a, r in zip(attns, ref_attns, strict=True):
        assert a.shape == (2, 8, rows * cols)
        torch.testing.assert_close(a, r, atol=1e-5, rtol=0)
    # not a degenerate case: the two images differ and the attention is not uniform
    assert (ref[0] - ref[1]).abs().max() > 1e-2
    assert (ref_attns[0].max(dim=-1).values > 2.0 / (rows * cols)).all()


def test_wrong_files_are_refused_naming_the_keys(official_dinov2_tiny):
    state = released_state(official_dinov2_tiny)
    bad = dict(state)
    del bad["aggregator.boqs.1.norm_q.bias"]
    bad["aggregator.boqs.1.extra.weight"] = torch.zeros(3)
    bad["aggregator.fc.weight"] = torch.zeros(4, 17)
    with pytest.raises(WeightsMismatchError) as info:
        load_weights(vprkit.create_model("boq", **TINY), bad)
    message = str(info.value)
    assert info.value.missing == ["aggregator.boqs.1.norm_q.bias"]
    assert info.value.unexpected == ["aggregator.boqs.1.extra.weight"]
    assert "aggregator.fc.weight" in message and "(4, 17)" in message
    # vprkit's own naming of the ViT (without `dino.`) is not the released layout
    renamed = {k.replace("backbone.dino.", "backbone."): v for k, v in state.items()}
    with pytest.raises(WeightsMismatchError, match=r"backbone\.dino\.cls_token"):
        load_weights(vprkit.create_model("boq", **TINY), renamed)


def test_dinov2_pretrain_file_is_a_starting_point(official_dinov2_tiny, tmp_path):
    path = tmp_path / "dinov2_vitb14_pretrain.pth"
    torch.save(official_dinov2_tiny.state_dict(), path)
    torch.manual_seed(0)
    init = vprkit.create_model("boq", **TINY).state_dict()
    torch.manual_seed(0)
    model = vprkit.create_model("boq", weights=path, **TINY)
    for k, v in model.state_dict().items():
        if k.startswith("backbone.dino."):
            assert torch.equal(v, official_dinov2_tiny.state_dict()[k[len("backbone.dino.") :]])
        else:
            assert torch.equal(v, init[k]), k  # the aggregator keeps its initialization
    partial_state = dict(official_dinov2_tiny.state_dict())
    del partial_state["blocks.1.ls2.gamma"]
    with pytest.raises(WeightsMismatchError, match=r"blocks\.1\.ls2\.gamma"):
        load_weights(vprkit.create_model("boq", **TINY), partial_state)


def test_frozen_blocks_and_options():
    model = vprkit.create_model("boq", **TINY, unfreeze_n_blocks=1)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert all(n.startswith(("backbone.dino.blocks.1.", "aggregator.")) for n in trainable)
    assert any(n.startswith("backbone.dino.blocks.1.") for n in trainable)
    every = vprkit.create_model("boq", **TINY, unfreeze_n_blocks=5)  # more than the depth
    assert all(p.requires_grad for n, p in every.named_parameters() if ".blocks." in n)
    with pytest.raises(ValueError, match="multiple of 64"):
        vprkit.create_model("boq", **TINY_VIT, proj_channels=100)
    with pytest.raises(ValueError, match="multiple of the patch size"):
        vprkit.create_model("boq", **TINY)(torch.randn(1, 3, 100, 98))


def test_eval_command_prints_recalls(shared_data, tmp_path, capsys):
    torch.manual_seed(0)
    argv = ["eval", "--method", "boq", "--weights", "random"]
    for key, value in {**TINY, "depth": 1, "proj_channels": 64}.items():
        argv += ["--model_option", f"{key}={value}"]
    argv += ["--dataset_folder", str(shared_data / "corridor"), "--image_size", "56", "56"]
    argv += ["--num_workers", "0", "--recall_values", "1", "5", "--save_dir", str(tmp_path)]
    assert cli_main(argv) == 0
    printed = capsys.readouterr()
    assert "R@1" in printed.out + printed.err and "R@5" in printed.out + printed.err
    (run,) = [p for p in tmp_path.glob("*/*") if p.is_dir()]
    recalls = json.loads((run / "recalls.json").read_text())["recalls"]
    assert set(recalls) == {"R@1", "R@5"} and 0 <= recalls["R@1"] <= recalls["R@5"] <= 100


# --------------------------------------------------------------------------------------------
# the training recipe


def test_recipe_has_the_official_settings():
    cfg = RECIPES["boq"].config_defaults()
    assert cfg["model"] == "boq" and cfg["train_only"] == list(model_info("boq").train_only)
    assert (cfg["places_per_batch"], cfg["images_per_place"]) == (128, 4)
    assert cfg["image_size"] == [224, 224] and cfg["val_image_size"] == [322, 322]
    assert (cfg["optimizer"], cfg["lr"], cfg["weight_decay"]) == ("adamw", 1e-4, 1e-4)
    assert (cfg["rand_augment_ops"], cfg["rand_augment_magnitude"]) == (3, 15)
    assert cfg["epochs"] == 40 and cfg["save_best"] == "R@1"
    assert RECIPES["boq"].official_init == "dinov2_vitb14"


def test_recipe_trains_only_the_last_block_and_the_aggregator(tiny_synthetic, tmp_path):
    torch.manual_seed(0)
    start = vprkit.create_model("boq", **TINY).state_dict()
    torch.save(start, tmp_path / "start.pth")  # the released layout: the names are the same
    cfg = {
        "gsv_root": str(tiny_synthetic / "gsv"),
        "init_weights": str(tmp_path / "start.pth"),
        "model_options": {**TINY, "unfreeze_n_blocks": 1},
        # the tiny model's last block (the official patterns name blocks 10 and 11 of 12)
        "train_only": ["backbone.dino.blocks.1.*", "aggregator.*"],
        "image_size": [56, 56],
        "val_image_size": [56, 56],
        "places_per_batch": 16,
        "num_workers": 0,
        "lr": 1e-3,
        "epochs": 3,
        "save_dir": str(tmp_path / "runs"),
    }
    run_dir, _ = train("boq", cfg)
    losses = [float(r["loss"]) for r in csv.DictReader(open(run_dir / "train_log.csv"))]
    assert len(losses) == 9 and sum(losses[-3:]) < sum(losses[:3]), losses
    saved = json.loads((run_dir / "config.json").read_text())
    assert saved["model"] == "boq" and saved["optimizer"] == "adamw"
    final = read_checkpoint(run_dir / "last.pth")["state_dict"]
    for k, v in final.items():
        changed = not torch.equal(v, start[k])
        trains = k.startswith(("backbone.dino.blocks.1.", "aggregator."))
        assert changed == trains, k
