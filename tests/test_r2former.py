"""R2Former against the official checkpoint layouts and against plain-torch references written
here from SPEC §3 and the official code (model/network.py `forward_deit`, model/R2Former.py)."""

import logging
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import vprkit
from vprkit.models.r2former import R2Former
from vprkit.weights import WeightsMismatchError, load_weights

# --------------------------------------------------------------------------------------------
# The official layout, written out from the official classes (timm 0.5.4 DeiT, R2Former.py).

BLOCK_PARTS = {
    "norm1.weight": ("d",),
    "norm1.bias": ("d",),
    "attn.qkv.weight": ("3d", "d"),
    "attn.qkv.bias": ("3d",),
    "attn.proj.weight": ("d", "d"),
    "attn.proj.bias": ("d",),
    "norm2.weight": ("d",),
    "norm2.bias": ("d",),
    "mlp.fc1.weight": ("4d", "d"),
    "mlp.fc1.bias": ("4d",),
    "mlp.fc2.weight": ("d", "4d"),
    "mlp.fc2.bias": ("d",),
}


def _block_keys(prefix: str, d: int) -> dict[str, tuple[int, ...]]:
    size = {"d": d, "3d": 3 * d, "4d": 4 * d}
    return {f"{prefix}.{k}": tuple(size[s] for s in v) for k, v in BLOCK_PARTS.items()}


def deit_keys(depth: int = 12, grid: tuple[int, int] = (30, 40), classes: int = 256) -> dict:
    d = 384
    keys = {
        "cls_token": (1, 1, d),
        "pos_embed": (1, 2 + grid[0] * grid[1], d),
        "dist_token": (1, 1, d),
        "patch_embed.proj.weight": (d, 3, 16, 16),
        "patch_embed.proj.bias": (d,),
    }
    for i in range(depth):
        keys.update(_block_keys(f"blocks.{i}", d))
    keys.update(
        {
            "norm.weight": (d,),
            "norm.bias": (d,),
            "head.weight": (classes, d),
            "head.bias": (classes,),
            "head_dist.weight": (classes, d),
            "head_dist.bias": (classes,),
        }
    )
    return keys


def reranker_keys() -> dict:
    e = 32
    keys = {
        "cls_token": (1, 1, e),
        "cls_token_2": (1, 1, e),
        "decoder_pos_embed": (1, 1001, e),
        "ratio": (1,),
    }
    for i in range(6):
        keys.update(_block_keys(f"blocks.{i}", e))
    for i in range(2):
        keys.update(_block_keys(f"blocks_2.{i}", e))
    keys.update(
        {
            "decoder_norm.weight": (e,),
            "decoder_norm.bias": (e,),
            "pair_head.weight": (e, 7),
            "pair_head.bias": (e,),
            "pair_head_2.weight": (e, e),
            "pair_head_2.bias": (e,),
            "decoder_pred.weight": (2, e),
            "decoder_pred.bias": (2,),
        }
    )
    return keys


def official_rerank_keys(depth: int = 12) -> dict:
    """`CVPR23_DeitS_Rerank.pth`'s `model_state_dict` (DataParallel prefix included)."""
    keys = {f"module.backbone.{k}": v for k, v in deit_keys(depth).items()}
    keys["module.local_head.weight"] = (128, 384)
    keys["module.local_head.bias"] = (128,)
    keys.update({f"module.Reranker.{k}": v for k, v in reranker_keys().items()})
    return keys


def random_state(keys: dict, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(shape, generator=g) for k, shape in keys.items()}


def randomize_(model: torch.nn.Module, seed: int = 0, scale: float = 0.05) -> torch.nn.Module:
    """Random values everywhere (norms near 1), so nothing matches by accident."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(scale * torch.randn(p.shape, generator=g))
    return model


@pytest.fixture(scope="module")
def full_model() -> R2Former:
    return vprkit.create_model("r2former")


# --------------------------------------------------------------------------------------------
# Layout and parameter counts


def test_state_dict_is_the_official_layout(full_model):
    ours = {f"module.{k}": tuple(v.shape) for k, v in full_model.state_dict().items()}
    assert ours == official_rerank_keys()


def test_parameter_counts(full_model):
    counts = full_model.parameter_counts()
    # Reranker: 8 blocks x 12,704 + norm 64 + pair heads 256 + 1,056 + pred 66 + 2 cls 64
    # + ratio 1 = 103,139; plus the unused 1001 x 32 pos-embed = 135,171.
    assert counts["reranker_used"] == 103_139
    assert counts["reranker"] == 135_171
    assert counts["local_head"] == 49_280
    # DeiT-S, 256-D heads, 30x40 grid: 22.25M.
    assert counts["backbone"] == 22_249_088
    assert counts["total"] == 22_433_539
    assert counts["total"] == sum(math.prod(s) for s in official_rerank_keys().values())


def test_official_checkpoint_loads_strictly(full_model):
    state = random_state(official_rerank_keys())
    checkpoint = {
        "model_state_dict": state,
        "epoch_num": 3,
        "recalls": np.array([89.7, 95.0]),
        "best_r5": 89.7,
        "not_improved_num": 0,
    }
    assert load_weights(full_model, checkpoint) == "training checkpoint"
    for k, v in full_model.state_dict().items():
        assert torch.equal(v, state[f"module.{k}"]), k


def test_wrong_keys_are_named(full_model):
    state = random_state(official_rerank_keys(), seed=1)
    state["module.Reranker.blocks_2.1.attn.qkv.weightX"] = state.pop(
        "module.Reranker.blocks_2.1.attn.qkv.weight"
    )
    state["module.Reranker.decoder_pos_embed"] = torch.zeros(1, 1201, 32)
    state["module.aggregation.0.weight"] = torch.zeros(3)
    with pytest.raises(WeightsMismatchError) as info:
        load_weights(full_model, {"model_state_dict": state})
    assert info.value.missing == ["Reranker.blocks_2.1.attn.qkv.weight"]
    assert sorted(info.value.unexpected) == [
        "Reranker.blocks_2.1.attn.qkv.weightX",
        "aggregation.0.weight",
    ]
    message = str(info.value)
    assert "Reranker.decoder_pos_embed" in message and "(1, 1201, 32)" in message


def test_global_only_checkpoint_is_remapped(full_model, caplog):
    """`msls_v2_deits.pth`: `module.*` DeiT keys; util.resume_train maps them under backbone."""
    before = {k: v.clone() for k, v in full_model.state_dict().items() if "backbone" not in k}
    state = random_state({f"module.{k}": v for k, v in deit_keys().items()}, seed=2)
    with caplog.at_level(logging.INFO, logger="vprkit.models.r2former"):
        load_weights(full_model, {"model_state_dict": state, "epoch_num": 1})
    assert "msls_v2_deits.pth" in caplog.text
    after = full_model.state_dict()
    for k, v in state.items():
        assert torch.equal(after[k.replace("module.", "backbone.", 1)], v), k
    for k, v in before.items():
        assert torch.equal(after[k], v), k

    del state["module.norm.bias"]
    state["module.extra"] = torch.zeros(1)
    with pytest.raises(WeightsMismatchError) as info:
        load_weights(full_model, {"model_state_dict": state})
    assert info.value.missing == ["norm.bias"] and info.value.unexpected == ["extra"]


def test_deit_imagenet_file_is_the_starting_backbone(caplog):
    model = vprkit.create_model("r2former", depth=1)
    state = random_state(deit_keys(depth=1, grid=(14, 14), classes=1000), seed=3)
    with caplog.at_level(logging.INFO, logger="vprkit.models.r2former"):
        assert load_weights(model, {"model": state}) == "deit"
    assert "ImageNet" in caplog.text
    sd = model.state_dict()
    assert sd["backbone.pos_embed"].shape == (1, 1202, 384)
    torch.testing.assert_close(sd["backbone.pos_embed"][:, :2], state["pos_embed"][:, :2])
    # The official quirk: head_dist takes head's first 256 rows, not its own.
    assert torch.equal(sd["backbone.head.weight"], state["head.weight"][:256])
    assert torch.equal(sd["backbone.head_dist.weight"], state["head.weight"][:256])
    assert torch.equal(sd["backbone.head_dist.bias"], state["head.bias"][:256])


def test_official_inits():
    torch.manual_seed(0)
    model = vprkit.create_model("r2former", depth=1)
    rr = model.Reranker
    assert rr.ratio.item() == 0.5
    assert torch.all(rr.decoder_pos_embed[:, 0] == 0)
    assert 0.005 < rr.decoder_pos_embed[:, 1:].std().item() < 0.015
    assert torch.all(rr.pair_head.bias == 0) and torch.all(rr.blocks[0].attn.qkv.bias == 0)
    bound = math.sqrt(6 / (32 + 96))  # xavier-uniform of qkv (96 x 32)
    assert rr.blocks[0].attn.qkv.weight.abs().max().item() <= bound
    assert torch.all(model.local_head.bias == 0)
    assert 0.008 < model.local_head.weight.std().item() < 0.012


# --------------------------------------------------------------------------------------------
# Plain-torch references


def _ln(x, state, name):
    return F.layer_norm(x, x.shape[-1:], state[f"{name}.weight"], state[f"{name}.bias"], 1e-6)


def _lin(x, state, name):
    return F.linear(x, state[f"{name}.weight"], state[f"{name}.bias"])


def _attention_weights(y, state, name, heads):
    B, N, C = y.shape
    qkv = _lin(y, state, f"{name}.attn.qkv").reshape(B, N, 3, heads, C // heads)
    qkv = qkv.permute(2, 0, 3, 1, 4)
    att = (qkv[0] @ qkv[1].transpose(-2, -1)) * (C // heads) ** -0.5
    return att.softmax(dim=-1), qkv[2]


def _block(x, state, name, heads):
    """timm 0.5.4 Block, explicit softmax attention."""
    att, v = _attention_weights(_ln(x, state, f"{name}.norm1"), state, name, heads)
    B, N, C = x.shape
    x = x + _lin((att @ v).transpose(1, 2).reshape(B, N, C), state, f"{name}.attn.proj")
    h = F.gelu(_lin(_ln(x, state, f"{name}.norm2"), state, f"{name}.mlp.fc1"))
    return x + _lin(h, state, f"{name}.mlp.fc2")


def reference_forward_deit(state, images, num_local, finetune=False):
    """network.py `forward_deit` at the stored input size, step by step."""
    B, _, H, W = images.shape
    p = "backbone."
    w, b = state[p + "patch_embed.proj.weight"], state[p + "patch_embed.proj.bias"]
    x = F.conv2d(images, w, b, stride=16)
    x = x.flatten(2).transpose(1, 2)
    x = torch.cat(
        [state[p + "cls_token"].expand(B, -1, -1), state[p + "dist_token"].expand(B, -1, -1), x],
        dim=1,
    )
    x = x + state[p + "pos_embed"]
    depth = len({k.split(".")[2] for k in state if k.startswith(p + "blocks.")})
    for i in range(depth):
        name = f"{p}blocks.{i}"
        if i == depth - 1:
            output = x * 1
            att, _ = _attention_weights(_ln(x, state, f"{name}.norm1"), state, name, 6)
            last_map = att[:, :, :2, 2:].sum(dim=1).sum(dim=1)
        x = _block(x, state, name, 6)
    x = _ln(x, state, p + "norm")
    glob = F.normalize(
        (_lin(x[:, 0], state, p + "head") + _lin(x[:, 1], state, p + "head_dist")) / 2
    )

    order = torch.argsort(last_map, dim=1, descending=True)
    n = np.minimum(order.shape[1], num_local)
    # As the official: patch indices gather from the whole sequence (cls and dist first).
    feats = torch.gather(output, 1, order[:, :n].unsqueeze(2).repeat(1, 1, output.shape[2]))
    cols = int(np.ceil(W / 16))
    hw = max(H, W)
    xy = torch.cat(
        [
            (order[:, :n].unsqueeze(2) % cols * 16 + 8) / 1.0 / hw,
            (order[:, :n].unsqueeze(2) // cols * 16 + 8) / 1.0 / hw,
        ],
        dim=2,
    )
    a = torch.sort(last_map, dim=1, descending=True)[0][:, :n]
    a = (a / torch.max(a, dim=1, keepdim=True)[0]).reshape(B, n, 1)
    local = _lin(feats.reshape(B * n, -1), state, "local_head").reshape(B, n, -1)
    return glob, torch.cat([xy, a, local], dim=2), last_map


def _sincos_1d(dim, pos):
    omega = torch.arange(dim // 2, dtype=torch.float32)
    omega /= dim / 2.0
    omega = 1.0 / 10000**omega
    out = torch.einsum("bm,d->bmd", pos, omega)
    return torch.cat([torch.sin(out), torch.cos(out)], dim=2)


def _sincos_2d(dim, grid):
    return torch.cat([_sincos_1d(dim // 2, grid[:, :, 0]), _sincos_1d(dim // 2, grid[:, :, 1])], 2)


def reference_rerank(state, x_rerank, y_rerank, num_corr=5, dim=32):
    """model/R2Former.py `forward` (num_classes 2), with the (B, N, M, 7) pair tensor."""
    s = {k[len("Reranker.") :]: v for k, v in state.items() if k.startswith("Reranker.")}
    B = x_rerank.shape[0]
    xt = F.normalize(x_rerank[:, :, 3:], p=2, dim=2)
    yt = F.normalize(y_rerank[:, :, 3:], p=2, dim=2)
    xc = x_rerank[:, :, :3].clamp(min=0, max=1)
    yc = y_rerank[:, :, :3].clamp(min=0, max=1)
    corr = xt @ yt.permute(0, 2, 1)
    N, M = corr.shape[1:]
    xy = torch.cat(
        [
            xc.unsqueeze(2).repeat(1, 1, M, 1),
            yc.unsqueeze(1).repeat(1, N, 1, 1),
            corr.unsqueeze(3),
        ],
        dim=3,
    )
    order_q = torch.argsort(corr.unsqueeze(3), dim=2, descending=True).repeat(1, 1, 1, 7)
    order_k = torch.argsort(corr.unsqueeze(3), dim=1, descending=True).repeat(1, 1, 1, 7)
    select_q = torch.gather(xy, 2, order_q[:, :, :num_corr])
    select_k = torch.gather(xy, 1, order_k[:, :num_corr])
    select = torch.cat([select_q, select_k.permute(0, 2, 1, 3)], dim=1)
    G = select.shape[1]
    pairs = _lin(select.reshape(B * G * num_corr, 7), s, "pair_head").reshape(B * G, num_corr, dim)
    pairs = pairs + _sincos_2d(dim, select.reshape(B * G, num_corr, 7)[:, :, 3:5])
    x = torch.cat([s["cls_token_2"].repeat(B * G, 1, 1), pairs], dim=1)
    for i in range(2):
        x = _block(x, s, f"blocks_2.{i}", 4)
    x = _ln(x, s, "decoder_norm")
    x = _lin(x[:, 0], s, "pair_head_2").reshape(B, G, dim) + _sincos_2d(dim, select[:, :, 0, 0:2])
    x = torch.cat([s["cls_token"].repeat(B, 1, 1), x], dim=1)
    for i in range(6):
        x = _block(x, s, f"blocks.{i}", 4)
    x = _ln(x, s, "decoder_norm")
    return _lin(x[:, 0], s, "decoder_pred"), select


# --------------------------------------------------------------------------------------------
# Parity with the references


@pytest.fixture(scope="module")
def tiny_model() -> R2Former:
    """2 blocks, 96x128 input (6x8 = 48 patches), 20 tokens; weights drawn so that the top-21
    attention scores are well apart (checked in the test): the ranking is not rounding's."""
    model = vprkit.create_model("r2former", depth=2, img_size=(96, 128), num_local=20)
    randomize_(model, seed=4)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for blk in model.backbone.blocks:
            blk.attn.qkv.weight.copy_(0.05 * torch.randn(blk.attn.qkv.weight.shape, generator=g))
    return model.eval()


@pytest.mark.parametrize("official_gather", [True, False])
def test_global_and_tokens_match_reference(tiny_model, official_gather):
    images = torch.randn(2, 3, 96, 128, generator=torch.Generator().manual_seed(6))
    tiny_model.official_token_gather = official_gather
    try:
        with torch.no_grad():
            out = tiny_model(images)
            ref_global, ref_tokens, last_map = reference_forward_deit(
                tiny_model.state_dict(), images, num_local=20
            )
    finally:
        tiny_model.official_token_gather = True
    # The ranking must not hinge on rounding: the sorted scores are well apart.
    gaps = torch.sort(last_map, dim=1, descending=True)[0][:, :21].diff(dim=1).abs()
    assert gaps.min().item() > 1e-4
    torch.testing.assert_close(out.global_desc, ref_global, atol=1e-5, rtol=0)
    assert out.global_desc.shape == (2, 256)
    assert out.local_tokens.shape == (2, 20, 131)
    torch.testing.assert_close(out.local_tokens[..., :3], ref_tokens[..., :3], atol=1e-6, rtol=0)
    if official_gather:
        torch.testing.assert_close(out.local_tokens, ref_tokens, atol=1e-5, rtol=0)
    else:
        # The selected patch's own token: the reference's feature of the patch 2 places on.
        assert not torch.allclose(out.local_tokens[..., 3:], ref_tokens[..., 3:], atol=1e-3)


def test_token_count_is_clipped_to_the_patches(tiny_model):
    tiny_model.num_local = 500
    try:
        with torch.no_grad():
            out = tiny_model(torch.randn(1, 3, 96, 128))
            ref = reference_forward_deit(tiny_model.state_dict(), torch.randn(1, 3, 96, 128), 500)
    finally:
        tiny_model.num_local = 20
    assert out.local_tokens.shape == (1, 48, 131) == ref[1].shape
    assert sorted(out.local_tokens[0, :, 0].unique().tolist()) == [
        (c * 16 + 8) / 128 for c in range(8)
    ]


def _random_tokens(shape, generator):
    """Token sets with coordinates a little outside [0, 1] too (the re-ranker clamps them)."""
    coords = torch.rand(*shape[:-1], 3, generator=generator) * 1.4 - 0.2
    feats = torch.randn(*shape[:-1], shape[-1] - 3, generator=generator)
    return torch.cat([coords, feats], dim=-1)


@pytest.fixture(scope="module")
def reranker_model() -> R2Former:
    model = vprkit.create_model("r2former", depth=1, img_size=(32, 32))
    randomize_(model.Reranker, seed=7, scale=0.3)
    return model.eval()


def test_reranker_matches_reference(reranker_model):
    g = torch.Generator().manual_seed(8)
    x = _random_tokens((3, 500, 131), g)
    y = _random_tokens((3, 500, 131), g)
    y[0] = x[0]  # one pair of identical token sets: all correlations on the diagonal are 1
    xg = F.normalize(torch.randn(3, 256, generator=g))
    yg = F.normalize(torch.randn(3, 256, generator=g))
    state = reranker_model.state_dict()
    with torch.no_grad():
        ref_logits, ref_select = reference_rerank(state, x, y)
        select = reranker_model.Reranker.pair_features(x, y)
        logits, final = reranker_model.Reranker(xg, x, yg, y)
        probs = reranker_model.rerank_scores(xg, x, yg[:, None], y[:, None])
    assert select.shape == (3, 1000, 5, 7)
    assert torch.equal(select, ref_select)
    torch.testing.assert_close(logits, ref_logits, atol=1e-5, rtol=0)
    ref_probs = ref_logits.softmax(dim=1)[:, 1]
    torch.testing.assert_close(probs, ref_probs[:, None], atol=1e-5, rtol=0)
    margin = ref_logits[:, 1] - ref_logits[:, 0]
    assert margin.std() > 0.05  # the random re-ranker does tell the pairs apart
    ratio = state["Reranker.ratio"].clamp(min=0.1, max=0.9)  # randomized, and clamped
    expected = (xg * yg).sum(1) * ratio + ref_probs * (1 - ratio)
    torch.testing.assert_close(final, expected, atol=1e-5, rtol=0)


def test_reranker_is_invariant_to_candidate_order_and_batching(reranker_model):
    g = torch.Generator().manual_seed(9)
    Q, K, N = 2, 5, 60
    qg, cg = torch.randn(Q, 256, generator=g), torch.randn(Q, K, 256, generator=g)
    qt, ct = _random_tokens((Q, N, 131), g), _random_tokens((Q, K, N, 131), g)
    with torch.no_grad():
        scores = reranker_model.rerank_scores(qg, qt, cg, ct)
        one_by_one = reranker_model.rerank_scores(qg, qt, cg, ct, batch_size=1)
        perm = torch.randperm(K, generator=g)
        permuted = reranker_model.rerank_scores(qg, qt, cg[:, perm], ct[:, perm], batch_size=3)
        unbatched = reranker_model.rerank_scores(qg[1], qt[1], cg[1], ct[1])
    assert scores.shape == (Q, K)
    assert torch.all((scores >= 0) & (scores <= 1))
    torch.testing.assert_close(one_by_one, scores, atol=1e-6, rtol=0)
    torch.testing.assert_close(permuted, scores[:, perm], atol=1e-6, rtol=0)
    torch.testing.assert_close(unbatched, scores[1], atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="inconsistent"):
        reranker_model.rerank_scores(qg, qt, cg[:1], ct[:1])


def test_local_tokens_layout_at_480x640():
    model = vprkit.create_model("r2former", depth=1).eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, 480, 640, generator=torch.Generator().manual_seed(10)))
    tokens = out.local_tokens
    assert tokens.shape == (1, 500, 131)
    assert out.global_desc.shape == (1, 256)
    torch.testing.assert_close(out.global_desc.norm(dim=1), torch.ones(1))
    xy, a = tokens[0, :, :2], tokens[0, :, 2]
    assert xy.min() >= 0 and xy.max() <= 1
    # x = (col * 16 + 8) / 640, y = (row * 16 + 8) / 640, on the 30 x 40 grid.
    cols = (xy[:, 0] * 640 - 8) / 16
    rows = (xy[:, 1] * 640 - 8) / 16
    torch.testing.assert_close(cols, cols.round())
    assert cols.max() <= 39 and rows.max() <= 29
    assert len({(int(r), int(c)) for r, c in zip(rows.round(), cols.round(), strict=True)}) == 500
    assert a[0] == 1 and torch.all(a.diff() <= 0) and a.min() > 0
    assert model(torch.randn(1, 3, 480, 640), local=False).local_tokens is None


# --------------------------------------------------------------------------------------------
# The fast path (top-k, per-token pair embeddings, cls-only last blocks) against the
# implementation it replaced, copied here as the reference.


def previous_pair_features(rr, x_tokens, y_tokens):
    """The previous `R2FormerReranker.pair_features` (full argsort)."""
    x_feat = F.normalize(x_tokens[..., 3:], p=2, dim=2)
    y_feat = F.normalize(y_tokens[..., 3:], p=2, dim=2)
    x_coord = x_tokens[..., :3].detach().clamp(min=0, max=1)
    y_coord = y_tokens[..., :3].detach().clamp(min=0, max=1)
    corr = torch.matmul(x_feat, y_feat.transpose(1, 2))
    B, N, M = corr.shape
    k = rr.num_corr
    batch = torch.arange(B)[:, None, None]
    j = torch.argsort(corr, dim=2, descending=True)[:, :, :k]
    i = torch.arange(N)[None, :, None].expand(B, N, k)
    select_q = torch.cat(
        [x_coord[batch, i], y_coord[batch, j], corr[batch, i, j].unsqueeze(-1)], dim=-1
    )
    i = torch.argsort(corr, dim=1, descending=True)[:, :k, :].transpose(1, 2)
    j = torch.arange(M)[None, :, None].expand(B, M, k)
    select_k = torch.cat(
        [x_coord[batch, i], y_coord[batch, j], corr[batch, i, j].unsqueeze(-1)], dim=-1
    )
    return torch.cat([select_q, select_k], dim=1)


def previous_logits(rr, x_tokens, y_tokens):
    """The previous `R2FormerReranker.forward`'s logits: the (B, N + M, k, 7) pair tensor,
    every token through every block."""
    from vprkit.models.r2former import sincos_2d

    B, D = x_tokens.shape[0], rr.embed_dim
    select = previous_pair_features(rr, x_tokens, y_tokens)
    n_groups, k = select.shape[1], select.shape[2]
    pairs = rr.pair_head(select.reshape(B * n_groups * k, 7)).reshape(B * n_groups, k, D)
    pairs = pairs + sincos_2d(D, select[..., 3:5].reshape(B * n_groups, k, 2))
    x = torch.cat([rr.cls_token_2.expand(B * n_groups, -1, -1), pairs], dim=1)
    for blk in rr.blocks_2:
        x = blk(x)
    x = rr.decoder_norm(x)
    groups = rr.pair_head_2(x[:, 0]).reshape(B, n_groups, D)
    groups = groups + sincos_2d(D, select[:, :, 0, 0:2])
    x = torch.cat([rr.cls_token.expand(B, -1, -1), groups], dim=1)
    for blk in rr.blocks:
        x = blk(x)
    out = rr.decoder_pred(rr.decoder_norm(x)[:, 0])
    return torch.sigmoid(out.reshape(-1)) if rr.num_classes == 1 else out


def previous_probs(rr, q_tokens, c_tokens):
    """(Q, N, F), (Q, K, M, F) -> (Q, K), one pair at a time."""
    Q, K = c_tokens.shape[:2]
    out = torch.empty(Q, K)
    for q in range(Q):
        for c in range(K):
            out[q, c] = rr.same_place_probability(
                previous_logits(rr, q_tokens[q : q + 1], c_tokens[q, c : c + 1])
            )
    return out


@pytest.mark.parametrize("num_classes", [1, 2])
def test_fast_forward_matches_previous_implementation(num_classes):
    from vprkit.models.r2former import R2FormerReranker

    torch.manual_seed(11)
    rr = randomize_(R2FormerReranker(num_classes=num_classes), seed=12, scale=0.3).eval()
    g = torch.Generator().manual_seed(13)
    x, y = _random_tokens((3, 80, 131), g), _random_tokens((3, 60, 131), g)  # N != M
    xg, yg = torch.randn(3, 256, generator=g), torch.randn(3, 256, generator=g)
    with torch.no_grad():
        logits, final = rr(xg, x, yg, y)
        ref = previous_logits(rr, x, y)
        select = rr.pair_features(x, y)
    assert torch.equal(select, previous_pair_features(rr, x, y))
    assert logits.shape == ((3,) if num_classes == 1 else (3, 2))
    torch.testing.assert_close(logits, ref, atol=1e-5, rtol=0)
    ratio = rr.ratio.clamp(min=0.1, max=0.9)
    probs = rr.same_place_probability(ref)
    expected = F.cosine_similarity(xg, yg) * ratio + probs * (1 - ratio)
    torch.testing.assert_close(final, expected, atol=1e-5, rtol=0)


def test_fast_gradients_match_previous_implementation(reranker_model):
    """Training backpropagates the 2-class cross-entropy through the re-ranker into the
    token features (and so `local_head`): the same gradients as before."""
    rr = reranker_model.Reranker
    g = torch.Generator().manual_seed(14)
    x0, y0 = _random_tokens((4, 50, 131), g), _random_tokens((4, 50, 131), g)
    labels = torch.tensor([1, 0, 0, 1])
    grads = []
    for fn in (rr.logits, lambda x, y: previous_logits(rr, x, y)):
        rr.zero_grad()
        x, y = x0.clone().requires_grad_(), y0.clone().requires_grad_()
        F.cross_entropy(fn(x, y), labels).backward()
        grads.append(
            [x.grad, y.grad] + [p.grad.clone() for p in rr.parameters() if p.grad is not None]
        )
    rr.zero_grad()
    assert len(grads[0]) == len(grads[1]) > 2
    assert grads[0][0][..., 3:].abs().max() > 1e-4  # features get a gradient, coordinates none
    assert torch.all(grads[0][0][..., :3] == 0)
    for new, old in zip(*grads, strict=True):
        torch.testing.assert_close(new, old, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("n", [6, 41])
def test_forward_first_is_the_first_token_of_forward(reranker_model, n):
    blk = reranker_model.Reranker.blocks[0]
    x = torch.randn(5, n, 32, generator=torch.Generator().manual_seed(n))
    with torch.no_grad():
        torch.testing.assert_close(blk.forward_first(x), blk(x)[:, :1], atol=1e-5, rtol=1e-5)


def test_rerank_scores_match_previous_implementation(reranker_model):
    """Over queries and candidates, any batch size, any candidate order."""
    rr = reranker_model.Reranker
    g = torch.Generator().manual_seed(15)
    Q, K, N = 2, 7, 120
    qg, cg = torch.randn(Q, 256, generator=g), torch.randn(Q, K, 256, generator=g)
    qt, ct = _random_tokens((Q, N, 131), g), _random_tokens((Q, K, N, 131), g)
    ct[0, 3] = qt[0]  # the query itself among the candidates
    with torch.no_grad():
        ref = previous_probs(rr, qt, ct)
        perm = torch.randperm(K, generator=g)
        runs = {
            "default": reranker_model.rerank_scores(qg, qt, cg, ct),
            "batch 1": reranker_model.rerank_scores(qg, qt, cg, ct, batch_size=1),
            "batch 3": reranker_model.rerank_scores(qg, qt, cg, ct, batch_size=3),
            "batch 100": reranker_model.rerank_scores(qg, qt, cg, ct, batch_size=100),
            "permuted": reranker_model.rerank_scores(
                qg, qt, cg[:, perm], ct[:, perm], batch_size=4
            )[:, torch.argsort(perm)],
            "per query": torch.stack(
                [reranker_model.rerank_scores(qg[q], qt[q], cg[q], ct[q]) for q in range(Q)]
            ),
        }
    assert ref.std() > 1e-3  # the random re-ranker tells the pairs apart (100x the tolerance)
    for name, scores in runs.items():
        assert scores.shape == (Q, K), name
        torch.testing.assert_close(scores, ref, atol=1e-5, rtol=0, msg=name)


def test_rerank_scores_need_no_gradients(reranker_model):
    g = torch.Generator().manual_seed(16)
    qt = _random_tokens((1, 30, 131), g).requires_grad_()
    scores = reranker_model.rerank_scores(
        torch.randn(1, 256), qt, torch.randn(1, 2, 256), _random_tokens((1, 2, 30, 131), g)
    )
    assert not scores.requires_grad


def test_tied_correlations_keep_the_top_values():
    """Duplicate tokens give exactly equal correlations: top-k may order the tied pairs
    unlike argsort (neither is stable), but picks the same top-k correlation values."""
    from vprkit.models.r2former import R2FormerReranker

    rr = R2FormerReranker()
    g = torch.Generator().manual_seed(17)
    x = _random_tokens((2, 40, 131), g)
    y = torch.cat([x[:, :10], x[:, :10], x[:, 5:15], _random_tokens((2, 10, 131), g)], dim=1)
    with torch.no_grad():
        select, ref = rr.pair_features(x, y), previous_pair_features(rr, x, y)
        logits = rr.logits(x, y)
    torch.testing.assert_close(select[..., 6], ref[..., 6], atol=0, rtol=0)
    assert torch.isfinite(logits).all()


def _planted_candidates(query, k, generator):
    """k candidates sharing a decreasing share of the query's tokens (features with noise,
    positions shifted a little), the rest random: a retrieval top-k with true matches."""
    n = query.shape[0]
    out = _random_tokens((k, n, 131), generator)
    for c in range(k):
        shared = torch.randperm(n, generator=generator)[: int(n * 0.8 * (1 - c / k))]
        out[c, shared, 3:] = query[shared, 3:] + 0.5 * torch.randn(
            len(shared), 128, generator=generator
        )
        out[c, shared, :2] = query[shared, :2] + 0.02 * torch.randn(
            len(shared), 2, generator=generator
        )
    return out


@pytest.mark.parametrize("planted", [True, False])
def test_fast_rerank_matches_transcription_with_the_same_order(reranker_model, planted):
    """The fast path (vprkit's CPU kernels where built) against the direct transcription of
    the official forward at full size (500 tokens): probabilities within 1e-5, same order."""
    g = torch.Generator().manual_seed(18 + planted)
    K = 8
    query = _random_tokens((500, 131), g)
    cands = _planted_candidates(query, K, g) if planted else _random_tokens((K, 500, 131), g)
    with torch.no_grad():
        probs = reranker_model.rerank_scores(
            torch.randn(256), query, torch.randn(K, 256), cands, batch_size=3
        )
        ref_logits, _ = reference_rerank(
            reranker_model.state_dict(), query[None].expand(K, -1, -1), cands
        )
    ref = ref_logits.softmax(dim=1)[:, 1]
    torch.testing.assert_close(probs, ref, atol=1e-5, rtol=0)
    # The order is the transcription's wherever rounding cannot decide it (gaps over 2e-5);
    # with planted matches the gaps are all that wide, and the order is the same outright.
    apart = (ref[:, None] - ref[None, :]) > 2e-5
    assert torch.all((probs[:, None] > probs[None, :])[apart])
    if planted:
        assert torch.sort(ref).values.diff().min() > 1e-4
        assert torch.equal(
            torch.argsort(probs, descending=True), torch.argsort(ref, descending=True)
        )
