"""vprkit.export: every registered model (tiny) exported to ONNX at a non-default input size,
run back with ONNX Runtime on real photos and compared with PyTorch; R2Former's re-ranker
graph; CricaVPR's batch coupling; the size refusal; TorchScript."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import vprkit
from vprkit.errors import VprkitError

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from vprkit.export.onnx import (  # noqa: E402
    export_onnx,
    export_r2former_reranker,
    read_metadata,
    reranker_path,
    tokens_difference,
)
from vprkit.export.runtime import OnnxModel  # noqa: E402
from vprkit.export.torchscript import export_torchscript, load_torchscript  # noqa: E402

ATOL = 1e-4

# name -> (tiny constructor options, an input size other than the method's default)
TINY_VIT = {"embed_dim": 64, "num_heads": 4, "depth": 1}
CASES = {
    "cricavpr": (TINY_VIT, (98, 126)),
    "selavpr": ({"backbone": "dinov2_vits14", "depth": 1}, (56, 70)),
    "r2former": ({"depth": 1, "img_size": (96, 128), "num_local": 20}, (80, 112)),
    "dinov2_gem": ({"size": "vits14", "depth": 1}, (56, 84)),
    "dinov2_cls": ({"size": "vits14", "depth": 1}, (70, 56)),
    "dinov2_vits14_reg4": ({"depth": 1}, (56, 70)),
    "deit_small_distilled_patch16_224": ({"depth": 1}, (64, 96)),
    "boq": (
        {**TINY_VIT, "proj_channels": 64, "num_queries": 8, "num_layers": 2, "row_dim": 4},
        (56, 70),
    ),
    "salad": (
        {**TINY_VIT, "depth": 2, "num_trainable_blocks": 1, "num_clusters": 8},
        (56, 70),
    ),
    "megaloc": (
        {**TINY_VIT, "num_clusters": 8, "cluster_dim": 16, "token_dim": 8, "mlp_dim": 32},
        (56, 70),
    ),
}


def test_every_registered_model_has_a_case():
    """A model added to the registry must be added here (and so checked to export)."""
    covered = set(CASES) | {"dinov2_vit" + s for s in ("s14", "b14", "l14", "g14")}
    covered |= {f"dinov2_vit{s}_reg4" for s in ("b14", "l14", "g14")}  # same code as vits14
    # Names with a leading underscore are registered by other test modules, not by vprkit.
    registered = {name for name in vprkit.list_models() if not name.startswith("_")}
    assert registered <= covered


def photos(root, hw, count):
    from vprkit.data.datasets import read_images_paths
    from vprkit.data.images import Preprocess, load_image

    preprocess = Preprocess(image_size=hw)
    return torch.stack([preprocess(load_image(p)) for p in read_images_paths(root)[:count]])


def tiny(name: str, seed: int = 0):
    torch.manual_seed(seed)
    return vprkit.create_model(name, **CASES[name][0]).eval()


def as_dict(out) -> dict[str, torch.Tensor]:
    return {k: v for k, v in vars(out).items() if isinstance(v, torch.Tensor)}


@pytest.mark.parametrize("name", sorted(CASES))
def test_onnx_runtime_equals_pytorch_on_real_photos(name, shared_data, tmp_path):
    model = tiny(name)
    hw = CASES[name][1]
    images = photos(shared_data / "corridor" / "ref", hw, 5)
    path = tmp_path / f"{name}.onnx"
    meta = export_onnx(model, path, hw, sample=images[:2], weights="random")
    assert meta["verified_max_abs_diff"] <= ATOL
    onnx_model = OnnxModel(path)
    # Other batch sizes than the export's (the batch axis is dynamic), other photos.
    for batch in (images[2:5], images[4:5]):
        with torch.no_grad():
            expected = as_dict(model(batch))
        got = as_dict(onnx_model(batch))
        assert set(got) == set(expected) and set(got) == set(meta["outputs"])
        for key, value in expected.items():
            assert got[key].shape == value.shape
            if key == "local_tokens":  # a set: near-tied attention may come in another order
                assert tokens_difference(value.numpy(), got[key].numpy()) <= ATOL
            else:
                torch.testing.assert_close(got[key], value, atol=ATOL, rtol=0)
    assert type(onnx_model(images[:1])) is type(model(images[:1]))
    # What the file says about what made it.
    stored = read_metadata(path)
    assert stored["method"] == name and stored["image_size"] == list(hw)
    assert stored["options"] == json.loads(json.dumps(CASES[name][0]))
    from vprkit.pipeline.fingerprint import state_sha256

    assert stored["weights_sha256"] == state_sha256(model)
    assert stored["weights"] == "random" and stored["vprkit_version"] == vprkit.__version__
    assert stored["mean"] == [0.485, 0.456, 0.406] and stored["std"] == [0.229, 0.224, 0.225]
    assert vprkit.model_info(onnx_model).image_size == hw
    # A model exported at one size refuses another, naming the file and the size.
    wrong = torch.zeros(1, 3, hw[0] + 14 * 2, hw[1] + 16 * 7)
    with pytest.raises(VprkitError, match=rf"{path.name} was exported for {hw[0]}x{hw[1]}"):
        onnx_model(wrong)


def test_cricavpr_batch_coupling_is_kept(shared_data, tmp_path):
    model = tiny("cricavpr")
    hw = CASES["cricavpr"][1]
    images = photos(shared_data / "corridor" / "query", hw, 4)
    path = tmp_path / "cricavpr.onnx"
    assert export_onnx(model, path, hw, sample=images[:2])["batch_coupled"]
    onnx_model = OnnxModel(path)
    assert onnx_model.batch_coupled and onnx_model.batch_mode == "coupled"
    together = onnx_model(images).global_desc
    alone = onnx_model(images[:1]).global_desc
    with torch.no_grad():
        torch.testing.assert_close(together, model(images).global_desc, atol=ATOL, rtol=0)
    # As in PyTorch: the first image's descriptor depends on its batch.
    assert (together[0] - alone[0]).abs().max() > 1e-3
    single = vprkit.create_model("cricavpr", batch_mode="single", **TINY_VIT).eval()
    meta = export_onnx(single, tmp_path / "single.onnx", hw, sample=images[:2])
    assert not meta["batch_coupled"]


def test_r2former_reranker_graph_gives_the_same_order(shared_data, tmp_path):
    model = tiny("r2former")
    hw = CASES["r2former"][1]
    queries = photos(shared_data / "corridor" / "query", hw, 2)
    database = photos(shared_data / "corridor" / "ref", hw, 12)
    path = tmp_path / "r2.onnx"
    rr = reranker_path(path)
    assert rr.name == "r2.rerank.onnx"
    meta = export_r2former_reranker(model, rr, image_size=hw)
    assert meta["kind"] == "r2former_reranker" and meta["num_tokens"] == 20
    export_onnx(model, path, hw, sample=queries, reranker=rr.name)
    onnx_model = OnnxModel(path)
    with torch.no_grad():
        q, d = model(queries), model(database)
    # 2 queries x 12 candidates; tokens from PyTorch, so only the re-ranker differs.
    c_global = d.global_desc[None].expand(2, -1, -1)
    c_tokens = d.local_tokens[None].expand(2, -1, -1, -1)
    args = (q.global_desc, q.local_tokens, c_global, c_tokens)
    expected = model.rerank_scores(*args)
    got = onnx_model.rerank_scores(*args)
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)
    for e, g in zip(expected, got, strict=True):
        assert np.array_equal(
            np.argsort(-e.numpy(), kind="stable"), np.argsort(-g.numpy(), kind="stable")
        )
    # Unbatched, as R2Former.rerank_scores.
    torch.testing.assert_close(
        onnx_model.rerank_scores(*(a[0] for a in args)), expected[0], atol=ATOL, rtol=0
    )
    # The pair graph with other token counts (its token axes are dynamic).
    import onnxruntime as ort

    session = ort.InferenceSession(str(rr), providers=["CPUExecutionProvider"])
    qt, ct = q.local_tokens[:1, :12], d.local_tokens[:1, :7]
    probability, similarity = session.run(
        None,
        {
            "query_global": q.global_desc[:1].numpy(),
            "query_tokens": qt.numpy(),
            "candidate_global": d.global_desc[:1].numpy(),
            "candidate_tokens": ct.numpy(),
        },
    )
    with torch.no_grad():
        logits = model.Reranker.logits(qt, ct)
        expected_p = model.Reranker.same_place_probability(logits)
    np.testing.assert_allclose(probability, expected_p.numpy(), atol=ATOL, rtol=0)
    cosine = torch.nn.functional.cosine_similarity(q.global_desc[:1], d.global_desc[:1])
    np.testing.assert_allclose(similarity, cosine.numpy(), atol=1e-5, rtol=0)
    # A re-ranker from other weights is refused.
    other = tiny("r2former", seed=1)
    export_r2former_reranker(other, rr, image_size=hw)
    with pytest.raises(VprkitError, match="not the re-ranker exported with"):
        OnnxModel(path).rerank_scores(*args)
    rr.unlink()
    with pytest.raises(VprkitError, match="which is missing"):
        OnnxModel(path).rerank_scores(*args)


def test_tokens_are_compared_as_sets():
    """R2Former's tokens: near-tied attention may come in another order (and swap the last
    kept token), nothing else may differ."""
    rng = np.random.default_rng(0)
    patches = [(x, y) for x in range(6) for y in range(4)]
    attention = np.sort(rng.uniform(0.1, 1.0, len(patches)))[::-1]
    attention[4] = attention[5] + 1e-7  # a near-tie inside, and one at the cut (place 8)
    attention[8] = attention[7] - 2e-7
    rows = np.array(
        [
            [x / 6, y / 6, a, *rng.normal(size=4)]
            for (x, y), a in zip(patches, attention, strict=True)
        ]
    )
    expected = rows[None, :8].astype(np.float32)
    swapped = rows[[0, 1, 2, 3, 5, 4, 6, 8]][None].astype(np.float32)  # 4<->5, 7 -> 8
    assert tokens_difference(expected, swapped) < 1e-6
    changed = expected.copy()
    changed[0, 3, 5] += 1e-2
    assert tokens_difference(expected, changed) > 5e-3
    other = rows[[0, 1, 2, 3, 4, 5, 6, 12]][None].astype(np.float32)  # not a tie: refused
    assert tokens_difference(expected, other) > 1e-2


def test_fingerprint_differs_from_pytorch_and_between_files(tmp_path):
    from vprkit.pipeline.fingerprint import model_fingerprint

    model = tiny("dinov2_gem")
    a, b = tmp_path / "a.onnx", tmp_path / "b.onnx"
    export_onnx(model, a, (56, 56))
    export_onnx(model, b, (56, 70))
    fa, fb = model_fingerprint(OnnxModel(a)), model_fingerprint(OnnxModel(b))
    ft = model_fingerprint(model)
    assert fa["name"] == ft["name"] == "dinov2_gem" and fa["options"] == ft["options"]
    assert len({fa["state_sha256"], fb["state_sha256"], ft["state_sha256"]}) == 3
    assert model_fingerprint(OnnxModel(a)) == fa  # stable


def test_export_refuses_an_inexact_graph_and_writes_nothing(tmp_path, monkeypatch):
    import vprkit.export.onnx as ex

    model, other = tiny("dinov2_gem"), tiny("dinov2_gem", seed=1)
    path = tmp_path / "a.onnx"
    export_onnx(model, path, (56, 56))
    sample = torch.randn(2, 3, 56, 56)
    with pytest.raises(VprkitError, match="a.onnx: the exported graph's global_desc differs"):
        ex.verify_model_file(path, other, sample, {}, ["global_desc"], label=path)
    # A failed check leaves no file behind (nor a temporary one).
    reference = ex.verify_model_file

    def against_other(path_, model_, *args, **kwargs):
        return reference(path_, other, *args, **kwargs)

    monkeypatch.setattr(ex, "verify_model_file", against_other)
    with pytest.raises(VprkitError, match="differs from PyTorch's"):
        export_onnx(model, tmp_path / "b.onnx", (56, 56))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.onnx"]


def test_non_onnx_file_and_file_without_metadata(tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a graph")
    with pytest.raises(VprkitError, match="bad.onnx: not a readable ONNX file"):
        OnnxModel(bad)
    import onnx

    model = tiny("dinov2_gem")
    path = tmp_path / "plain.onnx"
    export_onnx(model, path, (56, 56), verify=False)
    proto = onnx.load(str(path))
    del proto.metadata_props[:]
    onnx.save(proto, str(path))
    with pytest.raises(VprkitError, match="without vprkit's metadata"):
        OnnxModel(path)


def test_missing_onnx_package_says_how_to_install(monkeypatch):
    import builtins

    from vprkit.export import require

    real_import = builtins.__import__

    def no_onnx(name, *args, **kwargs):
        if name.split(".")[0] in ("onnx", "onnxruntime"):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_onnx)
    monkeypatch.delitem(__import__("sys").modules, "onnxruntime", raising=False)
    with pytest.raises(VprkitError, match=r"pip install vprkit\[export\]"):
        require("onnxruntime")


@pytest.mark.parametrize("name", ["cricavpr", "selavpr", "r2former", "boq", "salad", "megaloc"])
def test_torchscript_trace_equals_pytorch(name, tmp_path):
    model = tiny(name)
    hw = CASES[name][1]
    path = tmp_path / f"{name}.pt"
    export_torchscript(model, path, hw)
    traced, stored = load_torchscript(path)
    assert stored["method"] == name and stored["image_size"] == list(hw)
    x = torch.randn(3, 3, *hw, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = as_dict(model(x))
        got = dict(zip(stored["outputs"], traced(x), strict=True))
    for key, value in expected.items():
        torch.testing.assert_close(got[key], value, atol=ATOL, rtol=0)
