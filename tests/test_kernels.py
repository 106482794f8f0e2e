"""vprkit's CPU kernels (vprkit.kernels) against the PyTorch ops they replace, and their
fallback. They are built with the machine's C++ compiler on first use (about 15 s, cached)."""

import os
import shutil
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from vprkit import kernels
from vprkit.models.r2former import RerankBlock, block_weights, first_token_after

needs_compiler = pytest.mark.skipif(
    shutil.which(os.environ.get("CXX") or "c++") is None,
    reason="no C++ compiler: the kernels cannot be built here (PyTorch's ops are used)",
)


@pytest.fixture(scope="module")
def built():
    if kernels.load() is None:
        pytest.fail("a C++ compiler is here but the kernels did not build (see the warning)")


def _sdpa(q, k, v, heads):
    B, Nq, C = q.shape
    split = lambda t: t.reshape(B, t.shape[1], heads, C // heads).transpose(1, 2)  # noqa: E731
    return F.scaled_dot_product_attention(split(q), split(k), split(v)).transpose(1, 2)


@needs_compiler
@pytest.mark.parametrize(
    "batch, n, heads, head",
    [(3, 1001, 4, 8), (40, 6, 4, 8), (2, 1, 4, 8), (2, 17, 2, 16), (1, 33, 1, 32), (2, 16, 4, 8)],
)
@pytest.mark.parametrize("first_only", [False, True])
def test_attention_matches_sdpa(built, batch, n, heads, head, first_only):
    g = torch.Generator().manual_seed(n * head)
    C = heads * head
    qkv = 2 * torch.randn(batch, n, 3 * C, generator=g)  # peaked softmax rows too
    q, k, v = qkv[..., :C], qkv[..., C : 2 * C], qkv[..., 2 * C :]  # strided views, as used
    if first_only:
        q = q[:, :1]
    with torch.no_grad():
        out = kernels.small_head_attention(q, k, v, heads)
        ref = _sdpa(q, k, v, heads).reshape(out.shape)
        exact = _sdpa(q.double(), k.double(), v.double(), heads).reshape(out.shape)
    assert out.shape == (batch, q.shape[1], C) and out.is_contiguous()
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
    # as close to the float64 result as PyTorch's own float32 attention is
    assert (out.double() - exact).abs().max() <= 2 * (ref.double() - exact).abs().max() + 1e-6


def _randomized_blocks(depth, seed):
    torch.manual_seed(seed)
    blocks = torch.nn.ModuleList(RerankBlock(32, 4, 4.0, 1e-6) for _ in range(depth))
    with torch.no_grad():
        for p in blocks.parameters():  # layer norms and biases away from their inits too
            p.add_(0.2 * torch.randn_like(p))
    return blocks.eval()


@needs_compiler
@pytest.mark.parametrize("depth", [0, 1, 2, 3])
@pytest.mark.parametrize("groups", [1, 17, 160])
def test_groups_first_token_matches_blocks(built, depth, groups):
    blocks = _randomized_blocks(depth, seed=depth)
    x = torch.randn(groups, 6, 32, generator=torch.Generator().manual_seed(groups))
    with torch.no_grad():
        out = kernels.groups_first_token(x, block_weights(blocks), 4, 1e-6)
        with kernels.disabled():
            ref = first_token_after(blocks, x)
    assert out.shape == (groups, 32)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)


@needs_compiler
def test_kernels_step_aside(built):
    """Where they do not apply, the functions say so (None) and callers use PyTorch's ops."""
    q = torch.randn(2, 10, 32)
    assert kernels.small_head_attention(q, q, q, 4) is not None
    assert kernels.small_head_attention(q.double(), q.double(), q.double(), 4) is None
    assert kernels.small_head_attention(q, q, q, 8) is None  # head size 4: no variant
    leaf = q.clone().requires_grad_()
    assert kernels.small_head_attention(leaf, q, q, 4) is None  # training: autograd needed
    with torch.no_grad():
        assert kernels.small_head_attention(leaf, q, q, 4) is not None
    with kernels.disabled():
        assert kernels.small_head_attention(q, q, q, 4) is None
    assert kernels.small_head_attention(q, q, q, 4) is not None
    with pytest.raises(RuntimeError, match="channel dimension must be contiguous"):
        square = torch.randn(2, 32, 32)
        torch.ops.vprkit.small_head_attention(square.transpose(1, 2), square, square, 4, 0.35)


@needs_compiler
def test_library_is_built_once(built):
    compiler = os.environ.get("CXX") or "c++"
    lib = kernels._build(compiler)
    stamp = lib.stat().st_mtime_ns
    assert kernels._build(compiler) == lib and lib.stat().st_mtime_ns == stamp
    assert lib.parent == kernels.cache_dir() and not list(lib.parent.glob("*.partial"))


@pytest.mark.parametrize(
    "env, message",
    [
        ({"CXX": "/bin/false"}, "CPU kernels are not available"),
        ({"CXX": "no-such-compiler"}, "no C++ compiler"),
        ({"VPRKIT_KERNELS": "0"}, None),
    ],
)
def test_no_kernels_falls_back_to_pytorch(tmp_path, env, message):
    """No compiler, a failing build, or kernels turned off: a warning at most, PyTorch's ops."""
    code = (
        "import torch, vprkit\n"
        "from vprkit import kernels\n"
        "assert kernels.load() is None\n"
        "m = vprkit.create_model('r2former', depth=1, img_size=(32, 32)).eval()\n"
        "t = torch.rand(1, 3, 40, 131)\n"
        "s = m.rerank_scores(torch.rand(256), t[0, 0], torch.rand(2, 256), t[0, 1:])\n"
        "assert s.shape == (2,)\n"
    )
    run_env = {**os.environ, "VPRKIT_CACHE": str(tmp_path), **env}
    done = subprocess.run(
        [sys.executable, "-c", code], env=run_env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    if message:
        assert message in done.stderr
        assert done.stderr.count(message) == 1
    else:
        assert "kernel" not in done.stderr
    assert not list(tmp_path.rglob("*.so"))
