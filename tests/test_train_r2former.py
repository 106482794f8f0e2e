"""R2Former's three training phases (SPEC §3.5): recipes, the per-epoch schedule, the
loss with its quirks, and tiny configurations of each phase whose losses go down."""

import math

import pytest
import torch

import vprkit
from vprkit.models.outputs import DescriptorOutput
from vprkit.train.distributed import World
from vprkit.train.loop import make_optimizer, make_scheduler, r2former_epoch_factor, resolve_config
from vprkit.train.losses import R2FormerLoss, TripletLoss
from vprkit.train.recipes import apply_train_only, get_recipe
from vprkit.weights import save_checkpoint

TINY = {"depth": 2, "embed_dim": 64, "num_heads": 2, "img_size": (64, 64)}
SIZE = 64


def official_adjust_learning_rate(epoch, lr, warmup, epochs):
    """train_reranker.py's adjust_learning_rate with --cos, written out as there."""
    if epoch < warmup:
        alpha = epoch / warmup
        warmup_factor = 0.1 * (1.0 - alpha) + alpha
        lr *= warmup_factor
    else:
        lr *= 0.5 * (1.0 + math.cos(math.pi * epoch / epochs))
    return lr


def test_epoch_schedule_is_the_official_one_and_constant_within_an_epoch():
    for epoch in range(50):
        expected = official_adjust_learning_rate(epoch, 5e-4, 5, 50)
        assert r2former_epoch_factor(epoch, 5, 50) * 5e-4 == pytest.approx(expected, rel=1e-12)
    cfg = {"scheduler": "warmup_cosine_epochs", "warmup_epochs": 5, "epochs": 50}
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=5e-4)
    scheduler = make_scheduler(cfg, optimizer, steps_per_epoch=3)
    lrs = []
    for _ in range(3 * 7):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    per_epoch = [lrs[3 * e : 3 * e + 3] for e in range(7)]
    for epoch, values in enumerate(per_epoch):
        assert values == pytest.approx([official_adjust_learning_rate(epoch, 5e-4, 5, 50)] * 3)
    assert per_epoch[0][0] == pytest.approx(5e-5)  # warm-up starts at a tenth
    assert per_epoch[5][0] < 5e-4  # cosine over the whole run: already below after warm-up


def official_reranker_loss(desc, pos_logits, neg_logits, batch, negs, margin, fix):
    """The loop body of train_reranker.py for one batch, written out as there."""
    triplet = torch.nn.TripletMarginLoss(margin=margin, p=2, reduction="sum")
    ce = torch.nn.CrossEntropyLoss(ignore_index=-100)
    group = 2 + negs
    loss = 0
    for n in range(negs):
        q = torch.arange(batch) * group
        if not fix:
            loss += triplet(desc[q], desc[q + 1], desc[q + 2 + n])
        target = torch.zeros(batch * 2, dtype=torch.long)
        target[:batch] = 1
        loss += ce(torch.cat([pos_logits, neg_logits[:, n]], dim=0), target)
    return loss / (batch * negs)


@pytest.mark.parametrize("triplet", [True, False])
def test_loss_equals_the_official_loop(triplet):
    torch.manual_seed(0)
    batch, negs = 3, 2
    desc = torch.nn.functional.normalize(torch.randn(batch * (2 + negs), 16), dim=1)
    logits = torch.randn(batch, 1 + negs, 2)
    loss, figures = R2FormerLoss(0.1, triplet, True, global_batch_size=batch)(desc, logits, negs)
    expected = official_reranker_loss(
        desc, logits[:, 0], logits[:, 1:], batch, negs, 0.1, fix=not triplet
    )
    torch.testing.assert_close(loss, expected)
    assert ("triplet_loss" in figures) == triplet
    assert 0 <= figures["rerank_accuracy"] <= 1


def test_global_only_loss_is_the_triplet_loss():
    desc = torch.nn.functional.normalize(torch.randn(8, 16), dim=1)
    loss, _ = R2FormerLoss(0.1, True, False, global_batch_size=2)(desc, None, 2)
    expected, _ = TripletLoss(0.1)(DescriptorOutput(global_desc=desc), 2)
    torch.testing.assert_close(loss, expected)


def test_under_ddp_each_slice_divides_by_the_global_batch():
    # Two ranks with half the batch each, their losses averaged as DDP averages gradients,
    # give the single-process loss.
    torch.manual_seed(1)
    desc = torch.nn.functional.normalize(torch.randn(4 * 3, 16), dim=1)
    logits = torch.randn(4, 2, 2)
    whole, _ = R2FormerLoss(0.1, True, True, 4)(desc, logits, 1)
    halves = [
        R2FormerLoss(0.1, True, True, 4)(desc[s * 6 : s * 6 + 6], logits[s * 2 : s * 2 + 2], 1)[0]
        for s in (0, 1)
    ]
    torch.testing.assert_close((halves[0] + halves[1]) / 2, whole)


def test_pairs_module_scores_each_pair_as_the_reranker_alone():
    torch.manual_seed(0)
    model = vprkit.create_model("r2former", **TINY).eval()
    step = get_recipe("r2former_joint").train_module(model)
    images = torch.randn(2 * 4, 3, SIZE, SIZE)
    desc, logits = step(images, negs=2, rerank=True)
    out = model(images)
    assert logits.shape == (2, 3, 2)
    for b in range(2):
        for k in range(3):
            q, c = 4 * b, 4 * b + 1 + k
            expected, _ = model.Reranker(
                out.global_desc[q : q + 1],
                out.local_tokens[q : q + 1],
                out.global_desc[c : c + 1],
                out.local_tokens[c : c + 1],
            )
            torch.testing.assert_close(logits[b, k], expected[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(desc, out.global_desc)


def test_recipes_carry_the_official_settings():
    phase1 = get_recipe("r2former").config_defaults()
    assert phase1["image_size"] == [480, 640] and phase1["margin"] == 0.1
    assert (phase1["optimizer"], phase1["lr"], phase1["scheduler"]) == ("adam", 1e-5, "none")
    assert (phase1["train_batch_size"], phase1["negs_num_per_query"]) == (16, 2)
    assert (phase1["mining"], phase1["queries_per_epoch"], phase1["cache_refresh_rate"]) == (
        "partial",
        50000,
        10000,
    )
    assert (phase1["triplet_loss"], phase1["rerank_loss"]) == (True, False)
    phase2 = get_recipe("r2former_rerank").config_defaults()
    assert (phase2["optimizer"], phase2["lr"], phase2["weight_decay"]) == ("adamw", 5e-4, 0.03)
    assert (phase2["scheduler"], phase2["warmup_epochs"], phase2["epochs"]) == (
        "warmup_cosine_epochs",
        5,
        50,
    )
    assert (phase2["mining"], phase2["neg_hardness"], phase2["negs_num_per_query"]) == (
        "precomputed",
        100,
        1,
    )
    assert phase2["train_batch_size"] == 64
    assert phase2["train_only"] == ["local_head.*", "Reranker.*"]
    assert (phase2["triplet_loss"], phase2["rerank_loss"]) == (False, True)
    assert (phase2["save_best"], phase2["val_rerank_num"]) == ("R@1", 100)
    phase3 = get_recipe("r2former_joint").config_defaults()
    assert (phase3["lr"], phase3["train_batch_size"], phase3["negs_num_per_query"]) == (
        1e-5,
        48,
        2,
    )
    assert (phase3["epochs"], phase3["mining"], phase3["train_only"]) == (20, "partial", None)
    assert (phase3["triplet_loss"], phase3["rerank_loss"]) == (True, True)


def test_rerank_phase_needs_a_trained_global_model():
    recipe = get_recipe("r2former_rerank")
    cfg = resolve_config(recipe, {}, {"model_options": TINY})
    with pytest.raises(ValueError, match="init_weights"):
        recipe.build_model(cfg)


# ---------------------------------------------------------------- each phase fits a batch


def hard_batch(seed=0):
    """2 x (query, positive, 2 negatives): each negative a near copy of its query, the
    positive another image, the hardest case for the global loss; the re-ranker has to learn
    to tell the pairs apart."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(2 * 4, 3, SIZE, SIZE, generator=g)
    for q in (0, 4):
        for n in (2, 3):
            images[q + n] = images[q] + 0.05 * torch.randn(3, SIZE, SIZE, generator=g)
    return images, torch.zeros(2, 4, dtype=torch.long)


def fit(method, steps, tmp_path, **settings):
    recipe = get_recipe(method)
    cfg = resolve_config(
        recipe,
        {},
        {"model_options": TINY, "train_batch_size": 2, "negs_num_per_query": 2, **settings},
    )
    torch.manual_seed(0)
    model = recipe.build_model(cfg)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    apply_train_only(model, cfg["train_only"])
    step = recipe.train_module(model)
    optimizer = make_optimizer(cfg, [p for p in model.parameters() if p.requires_grad])
    loss_fn = recipe.make_loss(cfg)
    history = []
    for _ in range(steps):
        loss, figures = recipe.loss(step, hard_batch(), cfg, World(), loss_fn)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        history.append(figures)
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, start[k])}
    return model, history, changed


def test_phase1_global_loss_goes_down_and_only_the_backbone_trains(tmp_path):
    _, history, changed = fit("r2former", 12, tmp_path, lr=1e-3)
    assert history[-1]["triplet_loss"] < 0.5 * history[0]["triplet_loss"]
    assert "rerank_ce" not in history[0]
    assert changed and all(k.startswith("backbone.") for k in changed)


def test_phase2_rerank_loss_goes_down_with_the_global_model_frozen(tmp_path):
    torch.manual_seed(0)
    weights = save_checkpoint(vprkit.create_model("r2former", **TINY), tmp_path / "global.pth")
    _, history, changed = fit("r2former_rerank", 40, tmp_path, init_weights=str(weights), lr=1e-3)
    assert history[-1]["rerank_ce"] < 0.5 * history[0]["rerank_ce"]
    assert history[-1]["rerank_accuracy"] == 1.0
    assert "triplet_loss" not in history[0]
    assert changed and all(k.startswith(("local_head.", "Reranker.")) for k in changed)
    # Parameters the official forward never uses stay untouched (no gradient).
    assert "Reranker.decoder_pos_embed" not in changed and "Reranker.ratio" not in changed


def test_phase3_both_losses_go_down_and_everything_trains(tmp_path):
    _, history, changed = fit("r2former_joint", 40, tmp_path, lr=1e-3)
    assert history[-1]["triplet_loss"] < 0.5 * history[0]["triplet_loss"]
    assert history[-1]["rerank_ce"] < 0.5 * history[0]["rerank_ce"]
    assert any(k.startswith("backbone.") for k in changed)
    assert any(k.startswith("Reranker.") for k in changed)


# ---------------------------------------------------------------- the user's workflow


def test_three_phases_chain_through_the_real_loop(tiny_synthetic, tmp_path):
    """Phase 1, `vprkit mine` with its best model, phase 2 from it on the mined file,
    phase 3 from phase 2: each through `vprkit train`'s loop with validation."""
    import csv

    from vprkit.cli import main
    from vprkit.train.loop import train
    from vprkit.weights import read_checkpoint

    vg = str(tiny_synthetic / "vg" / "synthetic")
    common = {
        "train_dataset_folder": vg,
        "train_split": "train",
        "val_dataset_folder": vg,
        "val_split": "val",
        "model_options": TINY,
        "image_size": [SIZE, SIZE],
        "queries_per_epoch": 16,
        "cache_refresh_rate": 16,
        "neg_samples_num": 40,
        "train_batch_size": 4,
        "lr": 1e-3,
        "epochs": 2,
        "num_workers": 0,
        "infer_batch_size": 32,
        "save_dir": str(tmp_path / "runs"),
    }
    phase1, summary1 = train("r2former", {**common, "run_name": "global"})
    assert len(summary1["history"]) == 2

    hard = tmp_path / "hard_negatives.npy"
    options = [f"{k}={v!r}".replace(" ", "") for k, v in TINY.items()]
    main(
        ["mine", "--weights", str(phase1 / "best.pth"), "--dataset_folder", vg]
        + ["--split", "train", "--image_size", str(SIZE), str(SIZE), "--out", str(hard)]
        + [arg for option in options for arg in ("--model_option", option)]
        + ["--candidates", "30", "--keep", "20", "--num_workers", "0"]
    )
    phase2, summary2 = train(
        "r2former_rerank",
        {
            **common,
            "init_weights": str(phase1 / "best.pth"),
            "hard_negatives_file": str(hard),
            "val_rerank_num": 10,
            "run_name": "rerank",
        },
    )
    rows = list(csv.DictReader(open(phase2 / "train_log.csv")))
    assert len(rows) == 2 * 4 and all(float(r["rerank_ce"]) > 0 for r in rows)
    assert "triplet_loss" not in rows[0]
    start = read_checkpoint(phase1 / "best.pth")["state_dict"]
    after = read_checkpoint(phase2 / "last.pth")["state_dict"]
    trained = {k for k in start if not torch.equal(start[k], after[k])}
    # The global model is frozen; local_head and the re-ranker train.
    assert trained and all(k.startswith(("local_head.", "Reranker.")) for k in trained)
    assert len(summary2["history"]) == 2 and "R@1" in summary2["history"][0]

    phase3, _ = train(
        "r2former_joint",
        {
            **common,
            "init_weights": str(phase2 / "best.pth"),
            "val_rerank_num": 10,
            "run_name": "joint",
        },
    )
    rows = list(csv.DictReader(open(phase3 / "train_log.csv")))
    assert all(float(r["rerank_ce"]) > 0 and float(r["triplet_loss"]) >= 0 for r in rows)


def test_joint_phase_under_torchrun_matches_one_process(tiny_synthetic, tmp_path):
    # The whole step (descriptors, tokens, re-ranker) runs inside DDP's forward, and each
    # slice's cross-entropy is divided by the global batch: 2 processes = 1 process.
    from test_train import assert_same_weights, final_weights, torchrun_two_steps

    from vprkit.train.loop import train

    cfg = {
        "train_dataset_folder": str(tiny_synthetic / "vg" / "synthetic"),
        "train_split": "train",
        "model_options": TINY,
        "image_size": [SIZE, SIZE],
        "queries_per_epoch": 8,
        "cache_refresh_rate": 8,
        "neg_samples_num": 40,
        "train_batch_size": 4,
        "optimizer": "sgd",  # see test_train: Adam magnifies ulp-level differences
        "lr": 1e-2,
        "num_workers": 0,
        "save_dir": str(tmp_path / "runs"),
        "run_name": "ddp",
    }
    torchrun_two_steps("r2former_joint", cfg)
    (ddp_dir,) = (tmp_path / "runs" / "ddp").iterdir()
    single, _ = train("r2former_joint", {**cfg, "max_steps": 2, "run_name": "single"})
    assert "(2 processes)" in (ddp_dir / "log.txt").read_text()
    assert_same_weights(final_weights(single), final_weights(ddp_dir), atol=1e-5)


def test_a_run_from_random_weights_is_warned():
    import logging

    recipe = get_recipe("r2former")
    cfg = resolve_config(recipe, {}, {"model_options": TINY})
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("vprkit.train")
    logger.addHandler(handler)
    try:
        recipe.build_model(cfg)
    finally:
        logger.removeHandler(handler)
    assert any("deit_small_distilled_patch16_224" in r.getMessage() for r in records)


def test_rerank_phase_resumes_exactly(tiny_synthetic, tmp_path):
    # A refresh every 2 batches: resuming at step 3 is mid-refresh (saved triplets reused).
    from test_train import assert_same_weights, final_weights

    from vprkit.cli import main
    from vprkit.train.loop import train
    from vprkit.weights import read_checkpoint

    vg = str(tiny_synthetic / "vg" / "synthetic")
    torch.manual_seed(0)
    weights = save_checkpoint(vprkit.create_model("r2former", **TINY), tmp_path / "global.pth")
    hard = tmp_path / "hard_negatives.npy"
    options = [f"{k}={v!r}".replace(" ", "") for k, v in TINY.items()]
    main(
        ["mine", "--weights", str(weights), "--dataset_folder", vg, "--out", str(hard)]
        + ["--image_size", str(SIZE), str(SIZE), "--num_workers", "0"]
        + [arg for option in options for arg in ("--model_option", option)]
    )
    cfg = {
        "train_dataset_folder": vg,
        "model_options": TINY,
        "image_size": [SIZE, SIZE],
        "init_weights": str(weights),
        "hard_negatives_file": str(hard),
        "queries_per_epoch": 16,
        "cache_refresh_rate": 8,
        "train_batch_size": 4,
        "epochs": 2,
        "num_workers": 0,
        "save_dir": str(tmp_path / "runs"),
    }
    straight, _ = train("r2former_rerank", {**cfg, "max_steps": 6, "run_name": "straight"})
    first, _ = train("r2former_rerank", {**cfg, "max_steps": 3, "run_name": "resumed"})
    assert read_checkpoint(first / "last.pth")["data"]["refresh_index"] == 1
    train("r2former_rerank", {**cfg, "max_steps": 6}, resume=first / "last.pth")
    assert_same_weights(final_weights(straight), final_weights(first))
    start = read_checkpoint(weights)["state_dict"]
    trained = final_weights(straight)
    assert not torch.equal(start["Reranker.pair_head.weight"], trained["Reranker.pair_head.weight"])
