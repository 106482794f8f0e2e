"""`--compile` (vprkit.models.compiled): torch.compile's extraction equals the plain model's
within 1e-5, and a failing compiler falls back to the plain model with one warning."""

import os
import shutil
import subprocess
import sys

import pytest

from vprkit.cli import main as cli_main
from vprkit.pipeline.features import load_features

needs_compiler = pytest.mark.skipif(
    shutil.which(os.environ.get("CXX") or "c++") is None,
    reason="no C++ compiler: torch.compile's CPU backend cannot build here",
)


@needs_compiler
def test_compiled_extraction_matches_plain(shared_data, tmp_path):
    images = shared_data / "gardenspoint10" / "ref"
    base = ["extract", "--method", "dinov2_gem", "--weights", "random"]
    base += ["--model_option", "size=vits14", "--model_option", "depth=1"]
    base += ["--images", str(images), "--image_size", "28", "28", "--num_workers", "0"]
    base += ["--infer_batch_size", "4"]  # 10 images: 4, 4, then 2 (a new shape recompiles)
    assert cli_main([*base, "--out", str(tmp_path / "plain")]) == 0
    assert cli_main([*base, "--compile", "--out", str(tmp_path / "compiled")]) == 0
    plain, compiled = load_features(tmp_path / "plain"), load_features(tmp_path / "compiled")
    assert compiled.fingerprint == plain.fingerprint  # the same model and settings
    assert abs(compiled.global_desc - plain.global_desc).max() <= 1e-5


def test_failing_compiler_falls_back_to_the_plain_model(tmp_path):
    code = (
        "import torch\n"
        "from vprkit.models.compiled import compile_forward\n"
        "torch.manual_seed(0)\n"
        "m = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.GELU()).eval()\n"
        "x = torch.randn(3, 8)\n"
        "ref = m(x)\n"
        "keys = list(m.state_dict())\n"
        "assert compile_forward(m) is m and list(m.state_dict()) == keys\n"
        "for _ in range(2):\n"
        "    assert torch.equal(m(x), ref)\n"
    )
    env = {**os.environ, "CXX": "/bin/false", "TORCHINDUCTOR_CACHE_DIR": str(tmp_path)}
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    assert done.stderr.count("torch.compile failed") == 1, done.stderr


def test_compile_is_refused_with_ray(capsys, tmp_path):
    argv = ["map", "build", str(tmp_path), "--out", str(tmp_path / "m"), "--method"]
    argv += ["dinov2_gem", "--weights", "random", "--compile", "--ray", "auto"]
    assert cli_main(argv) == 1
    err = capsys.readouterr().err
    assert "--compile" in err and "--ray" in err and err.count("\n") == 1
