"""ModelInfo: what each built-in model declares at registration (evaluation size, batch
protocol, re-ranker, trainable parameters, weights), `model_info` on names and models, the
train_only patterns against the official training rules, and the weights table agreeing
with the infos."""

import dataclasses

import pytest
import torch
from torch import nn

import vprkit
from vprkit import hub
from vprkit.cli import main
from vprkit.data.images import Preprocess
from vprkit.models import ModelInfo, model_info, register_model, registry
from vprkit.rerank import list_rerankers
from vprkit.train.recipes import apply_train_only, get_recipe

DINOV2 = [f"dinov2_{s}{r}" for s in ("vits14", "vitb14", "vitl14", "vitg14") for r in ("", "_reg4")]

TINY = {
    "cricavpr": {"depth": 1, "embed_dim": 64, "num_heads": 4, "encoder_heads": 4},
    "selavpr": {"backbone": "dinov2_vits14", "depth": 1},
    "r2former": {"depth": 1, "embed_dim": 64, "num_heads": 2, "img_size": (64, 64)},
}


def test_builtin_infos():
    for name in DINOV2:
        info = model_info(name)
        assert info.image_size == (224, 224) and info.weights == (name,)
        assert (info.reranker, info.rerank_num, info.train_only) == (None, 0, None)
    for name in ("dinov2_cls", "dinov2_gem"):
        assert model_info(name).weights == ("dinov2_vitb14",)
        assert model_info(name).reranker is None
    deit = model_info("deit_small_distilled_patch16_224")
    assert deit.image_size == (224, 224) and deit.weights == ("deit_small_distilled_patch16_224",)

    crica = model_info("cricavpr")
    assert crica.image_size == (224, 224)
    assert (crica.reranker, crica.rerank_num) == (None, 0)
    assert crica.train_only == ("backbone.*adapter*", "encoder.*", "aggregation.*")
    assert crica.weights == ("cricavpr",)

    sela = model_info("selavpr")
    assert sela.image_size == (224, 224)
    assert (sela.reranker, sela.rerank_num) == ("mnn", 100)
    assert sela.train_only == ("backbone.*adapter*", "aggregation.*", "LocalAdapt.*")
    assert sela.weights == ("selavpr_msls", "selavpr_pitts30k", "selavpr_reg4_msls")

    r2 = model_info("r2former")
    assert r2.image_size == (480, 640)
    assert (r2.reranker, r2.rerank_num) == ("r2former", 100)
    assert r2.train_only == ("local_head.*", "Reranker.*")
    assert r2.weights == ("r2former", "r2former_global_msls")

    for name in vprkit.list_models():
        info = model_info(name)
        assert info.reranker is None or info.reranker in list_rerankers()
        # the normalization Preprocess applies: the info documents it, it changes nothing
        assert (info.mean, info.std) == (Preprocess().mean, Preprocess().std)


def test_eval_batch_size_and_protocol():
    crica = model_info("cricavpr")
    assert [crica.eval_batch_size(n) for n in ("pitts30k", "Pitts250k", "msls", "tokyo247")] == [
        8,
        8,
        16,
        16,
    ]
    model = vprkit.create_model("cricavpr", **TINY["cricavpr"])
    assert "(16)" in crica.describe_protocol(model, 16)
    assert "WARNING" in crica.describe_protocol(model, 1)
    model.batch_mode = "single"
    assert "single mode" in crica.describe_protocol(model, 16)
    for name in ("selavpr", "r2former", "dinov2_gem"):
        info = model_info(name)
        assert info.eval_batch_size("pitts30k") == 16
        assert info.describe_protocol(model, 16) is None


def test_model_info_of_names_and_models():
    model = vprkit.create_model("r2former", **TINY["r2former"])
    assert model_info(model) is model_info("r2former")
    assert model_info(nn.Linear(2, 2)) == ModelInfo()  # not made by the registry
    with pytest.raises(ValueError, match="unknown model 'nope'"):
        model_info("nope")


def test_a_model_registered_with_info(monkeypatch):
    # a private copy of the registry, so the test model does not outlive the test
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    monkeypatch.setattr(registry, "_INFO", dict(registry._INFO))
    info = ModelInfo(image_size=(32, 48), reranker="mnn", rerank_num=20, train_only=("0.*",))

    @register_model(name="_test_info_model", info=info)
    def build(width: int = 4) -> nn.Module:
        return nn.Sequential(nn.Linear(width, width), nn.Linear(width, 2))

    assert model_info("_test_info_model") is info
    model = vprkit.create_model("_test_info_model", width=3)
    assert model_info(model) is info
    register_model(lambda: nn.Identity(), name="_test_no_info")
    assert model_info("_test_no_info") == ModelInfo()
    assert apply_train_only(model, list(model_info(model).train_only)) == (12, 20)


def test_info_is_frozen_and_checked():
    info = ModelInfo()
    with pytest.raises(dataclasses.FrozenInstanceError):
        info.image_size = (1, 1)
    assert (info.image_size, info.eval_batch_size("any"), info.reranker) == ((224, 224), 16, None)
    with pytest.raises(ValueError, match="go together"):
        ModelInfo(reranker="mnn")
    with pytest.raises(ValueError, match="go together"):
        ModelInfo(rerank_num=10)
    with pytest.raises(TypeError, match="tuple"):
        ModelInfo(train_only=["*"])
    with pytest.raises(TypeError, match="tuple"):
        ModelInfo(weights="cricavpr")
    with pytest.raises(ValueError, match="image_size"):
        ModelInfo(image_size=(224,))


# --------------------------------------------------------------------------------------------
# train_only against the official training code


def trainable_after(name: str, patterns) -> set[str]:
    torch.manual_seed(0)
    model = vprkit.create_model(name, **TINY[name])
    apply_train_only(model, None if patterns is None else list(patterns))
    return {n for n, p in model.named_parameters() if p.requires_grad}


def params_of(name: str) -> list[str]:
    return [n for n, _ in vprkit.create_model(name, **TINY[name]).named_parameters()]


def test_cricavpr_trains_what_the_official_code_trains():
    # train.py: a backbone parameter trains iff its name contains `adapter`; the encoder and
    # GeM p (`aggregation.1.p`) train.
    names = params_of("cricavpr")
    assert {n.split(".")[0] for n in names} == {"backbone", "encoder", "aggregation"}
    official = {n for n in names if not n.startswith("backbone.") or "adapter" in n}
    assert "aggregation.1.p" in official and "backbone.blocks.0.adapter.D_fc1.weight" in official
    assert "backbone.blocks.0.mlp.fc1.weight" not in official
    assert trainable_after("cricavpr", model_info("cricavpr").train_only) == official
    # the model freezes itself the same way at construction
    model = vprkit.create_model("cricavpr", **TINY["cricavpr"])
    assert {n for n, p in model.named_parameters() if p.requires_grad} == official
    assert get_recipe("cricavpr").config_defaults()["train_only"] == list(
        model_info("cricavpr").train_only
    )


def test_selavpr_trains_what_the_official_code_trains():
    # train.py: a backbone parameter trains iff its name contains `adapter` (adapter1 and
    # adapter2 of every block); GeM p and LocalAdapt train.
    names = params_of("selavpr")
    assert {n.split(".")[0] for n in names} == {"backbone", "aggregation", "LocalAdapt"}
    official = {n for n in names if not n.startswith("backbone.") or "adapter" in n}
    adapters = {"backbone.blocks.0.adapter1.D_fc1.weight", "backbone.blocks.0.adapter2.D_fc2.bias"}
    assert adapters <= official and "LocalAdapt.upconv1.weight" in official
    assert "backbone.norm.weight" not in official
    assert trainable_after("selavpr", model_info("selavpr").train_only) == official
    assert get_recipe("selavpr").config_defaults()["train_only"] == list(
        model_info("selavpr").train_only
    )


def test_r2former_phases_train_what_the_official_code_trains():
    names = params_of("r2former")
    assert {n.split(".")[0] for n in names} == {"backbone", "local_head", "Reranker"}
    backbone = {n for n in names if n.startswith("backbone.")}
    # train_reranker.py --fix 1: only local_head and the Reranker
    rerank = get_recipe("r2former_rerank").config_defaults()["train_only"]
    assert rerank == list(model_info("r2former").train_only)
    assert trainable_after("r2former", rerank) == set(names) - backbone
    # train_deit.py (phase 1) has no re-ranker: the backbone alone trains
    phase1 = get_recipe("r2former").config_defaults()["train_only"]
    assert trainable_after("r2former", phase1) == backbone
    # joint fine-tuning (--fix 0): everything
    assert get_recipe("r2former_joint").config_defaults()["train_only"] is None
    assert trainable_after("r2former", None) == set(names)


# --------------------------------------------------------------------------------------------
# the weights table and the command line


def test_weights_table_agrees_with_the_infos():
    claimed = {w for name in vprkit.list_models() for w in model_info(name).weights}
    assert claimed <= set(hub.OFFICIAL_WEIGHTS)  # every declared name is in the table
    assert set(hub.OFFICIAL_WEIGHTS) <= claimed  # every file in the table has a model
    assert hub.models_using("dinov2_vitb14") == ["dinov2_cls", "dinov2_gem", "dinov2_vitb14"]
    assert hub.models_using("selavpr_reg4_msls") == ["selavpr"]


def test_cli_lists_weights_with_their_models(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("VPRKIT_HOME", str(tmp_path))
    assert main(["weights", "list"]) == 0
    lines = {line.split()[0]: line.split() for line in capsys.readouterr().out.splitlines() if line}
    assert "MODELS" in lines["NAME"]
    assert "r2former" in lines["r2former_global_msls"]


def test_cli_models_prints_the_info(capsys):
    assert main(["models"]) == 0
    rows = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()}
    assert sorted(rows) == vprkit.list_models()
    assert "480x640" in rows["r2former"] and "rerank r2former top-100" in rows["r2former"]
    assert "rerank mnn top-100" in rows["selavpr"] and "selavpr_pitts30k" in rows["selavpr"]
    assert "global only" in rows["cricavpr"] and "weights: cricavpr" in rows["cricavpr"]
    assert main(["models", "dinov2_vit?14"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 4
