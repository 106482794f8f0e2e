"""Triplet training (SelaVPR's recipe, and any model): mining with the current model,
the global and local losses, and exact resume across refreshes."""

import csv

import torch

import vprkit
from vprkit.train.loop import train
from vprkit.train.losses import TripletLoss, mnn_similarity
from vprkit.weights import read_checkpoint

TINY_SELAVPR = {"backbone": "dinov2_vits14", "depth": 1, "embed_dim": 64, "num_heads": 4}


def selavpr_settings(synth, tmp_path, **overrides):
    vg = str(synth / "vg" / "synthetic")
    return {
        "train_dataset_folder": vg,
        "train_split": "train",
        "model_options": TINY_SELAVPR,
        "image_size": [56, 56],
        "queries_per_epoch": 16,
        "cache_refresh_rate": 8,
        "neg_samples_num": 40,
        "train_batch_size": 4,
        "lr": 1e-3,
        "num_workers": 0,
        "infer_batch_size": 32,
        "save_dir": str(tmp_path / "runs"),
        **overrides,
    }


def test_mnn_similarity_matches_its_definition():
    torch.manual_seed(0)
    a = torch.nn.functional.normalize(torch.randn(8, 30), dim=0)
    x = torch.nn.functional.normalize(torch.randn(8, 30), dim=0)
    sim = a.T @ x
    pairs = [
        (j, sim[j].argmax().item())
        for j in range(30)
        if sim[:, sim[j].argmax()].argmax().item() == j
    ]
    expected = torch.stack([sim[j, k] for j, k in pairs]).mean()
    torch.testing.assert_close(mnn_similarity(a, x), expected)
    assert mnn_similarity(a, a).item() == 1.0  # every feature is its own mutual neighbour


def test_both_losses_go_down_when_fitting_a_batch():
    torch.manual_seed(0)
    model = vprkit.create_model("selavpr", **TINY_SELAVPR)
    # 2 triplets of (query, positive, 2 negatives), each negative a near copy of its query
    # and the positive another image: the hardest case, far from satisfied at the start.
    images = torch.randn(2 * 4, 3, 56, 56)
    for q in (0, 4):
        images[q + 2] = images[q] + 0.05 * torch.randn(3, 56, 56)
        images[q + 3] = images[q] + 0.05 * torch.randn(3, 56, 56)
    loss_fn = TripletLoss(margin=0.1, local_weight=1.0)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    first = None
    for _ in range(15):
        loss, figures = loss_fn(model(images), negs=2)
        first = first or figures
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert first["triplet_loss"] > 0 and first["local_loss"] > 0
    assert figures["triplet_loss"] < first["triplet_loss"]
    assert figures["local_loss"] < first["local_loss"]


def test_selavpr_recipe_trains_and_logs_both_losses(tiny_synthetic, tmp_path):
    vg = str(tiny_synthetic / "vg" / "synthetic")
    cfg = selavpr_settings(
        tiny_synthetic, tmp_path, epochs=2, val_dataset_folder=vg, val_split="val"
    )
    run_dir, summary = train("selavpr", cfg)
    rows = list(csv.DictReader(open(run_dir / "train_log.csv")))
    steps = rows
    assert len(steps) == 2 * 4  # 16 queries per epoch in batches of 4
    assert all(float(r["local_loss"]) >= 0 and float(r["triplet_loss"]) >= 0 for r in steps)
    assert len(summary["history"]) == 2
    state = read_checkpoint(run_dir / "last.pth")["state_dict"]
    torch.manual_seed(cfg.get("seed", 0))  # the trainer seeds before building the model
    start = vprkit.create_model("selavpr", **TINY_SELAVPR).state_dict()
    # Only adapters, GeM p and LocalAdapt train: the backbone's own weights stay put.
    changed = {k for k in state if not torch.equal(state[k], start[k])}
    assert "LocalAdapt.upconv1.weight" in changed
    assert any("adapter" in k for k in changed)
    assert "backbone.blocks.0.attn.qkv.weight" not in changed
    assert all(k.startswith(("LocalAdapt.", "aggregation.")) or "adapter" in k for k in changed)


def test_resume_across_refreshes_gives_identical_weights(tiny_synthetic, tmp_path):
    # 4 batches per epoch, a refresh every 2: resuming at step 3 is mid-refresh (the saved
    # triplets are reused), and step 5 starts a new epoch that mines with the current model.
    cfg = selavpr_settings(tiny_synthetic, tmp_path, epochs=2)
    straight, _ = train("selavpr", {**cfg, "max_steps": 6, "run_name": "straight"})
    first, _ = train("selavpr", {**cfg, "max_steps": 3, "run_name": "resumed"})
    assert read_checkpoint(first / "last.pth")["data"]["refresh_index"] == 1
    train("selavpr", {**cfg, "max_steps": 6}, resume=first / "last.pth")
    a = read_checkpoint(straight / "last.pth")["state_dict"]
    b = read_checkpoint(first / "last.pth")["state_dict"]
    for key in a:
        assert torch.equal(a[key], b[key]), key
