"""Reading weight files safely (no arbitrary unpickling) and the layouts vprkit accepts."""

import io
import os
import zipfile

import numpy as np
import pytest
import torch

import vprkit
from vprkit.errors import VprkitError
from vprkit.weights import extract_state_dict, load_weights, read_checkpoint, save_checkpoint


def _tiny():
    return vprkit.create_model("dinov2_vits14", depth=1, embed_dim=48, num_heads=2)


def _training_checkpoint(model):
    """What CricaVPR/SelaVPR/R2Former release: DataParallel keys plus NumPy bookkeeping."""
    return {
        "epoch_num": 7,
        "model_state_dict": {"module." + k: v for k, v in model.state_dict().items()},
        "optimizer_state_dict": {"state": {}, "param_groups": [{"lr": 1e-5, "params": [0, 1]}]},
        "recalls": np.array([90.8, 96.4, 97.2, 98.0]),
        "best_r5": np.float64(96.4),
        "not_improved_num": np.int64(0),
    }


def _rename_numpy_module(path, old: bytes, new: bytes):
    """Rewrite the pickle inside a torch zip file, as if written under another NumPy."""
    with zipfile.ZipFile(path) as zin:
        entries = [(info, zin.read(info)) for info in zin.infolist()]
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as zout:
        for info, data in entries:
            if info.filename.endswith("data.pkl"):
                assert old in data
                data = data.replace(old, new)
            zout.writestr(info, data)
    path.write_bytes(buffer.getvalue())


@pytest.mark.parametrize("numpy_names", ["numpy2", "numpy1"])
def test_training_checkpoint_with_numpy_entries_loads(tmp_path, numpy_names):
    source = _tiny()
    path = tmp_path / "SelaVPR_msls.pth"
    torch.save(_training_checkpoint(source), path)
    if numpy_names == "numpy1":  # the released files were written with NumPy 1.x
        _rename_numpy_module(path, b"numpy._core.multiarray", b"numpy.core.multiarray")
    checkpoint = read_checkpoint(path)
    assert checkpoint["best_r5"] == pytest.approx(96.4)
    np.testing.assert_allclose(checkpoint["recalls"], [90.8, 96.4, 97.2, 98.0])
    model = _tiny()
    assert load_weights(model, path) == "training checkpoint"
    for k, v in source.state_dict().items():
        assert torch.equal(model.state_dict()[k], v)


class _Evil:
    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_arbitrary_pickles_are_refused_not_executed(tmp_path):
    marker = tmp_path / "pwned"
    evil = _Evil()
    evil.marker = marker
    path = tmp_path / "evil.pth"
    torch.save({"model_state_dict": _tiny().state_dict(), "payload": evil}, path)
    with pytest.raises(VprkitError) as info:
        read_checkpoint(path)
    assert not marker.exists()
    message = str(info.value)
    assert message.startswith(f"refusing to load 'os.system' from {path}: ")
    assert "malformed or malicious" in message
    assert "weights_only" not in message  # never torch's advice to load it unsafely


class _Custom:
    pass


def test_a_refused_class_is_named_and_no_message_says_weights_only(tmp_path):
    path = tmp_path / "custom.pth"
    torch.save({"state_dict": {}, "obj": _Custom()}, path)
    with pytest.raises(VprkitError, match=r"refusing to load 'test_weights\._Custom' from"):
        read_checkpoint(path)
    text = tmp_path / "notes.pth"
    text.write_text("not a torch file")
    with pytest.raises(VprkitError, match="notes.pth") as info:
        read_checkpoint(text)
    assert "weights_only" not in str(info.value)


def test_bad_files_name_the_file(tmp_path):
    empty = tmp_path / "empty.pth"
    empty.touch()
    with pytest.raises(ValueError, match="empty.pth.*zero bytes"):
        read_checkpoint(empty)
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(os.urandom(1000))
    with pytest.raises(ValueError, match="garbage.pth"):
        read_checkpoint(garbage)
    with pytest.raises(FileNotFoundError, match="missing.pth") as info:
        read_checkpoint(tmp_path / "missing.pth")
    assert isinstance(info.value, VprkitError)
    with pytest.raises(ValueError, match="no state dict found"):
        extract_state_dict({"epoch": 1, "note": "x"}, "odd.pth")


def test_vprkit_checkpoint_round_trip_is_atomic(tmp_path, monkeypatch):
    model = _tiny()
    path = save_checkpoint(model, tmp_path / "runs" / "best.pth", epoch=3)
    assert sorted(p.name for p in path.parent.iterdir()) == ["best.pth"]
    other = _tiny()
    assert load_weights(other, path) == "vprkit"
    assert all(torch.equal(other.state_dict()[k], v) for k, v in model.state_dict().items())
    assert read_checkpoint(path)["vprkit"]["overrides"] == {
        "depth": 1,
        "embed_dim": 48,
        "num_heads": 2,
    }

    # A crash while writing leaves the previous file intact and no temporary file behind.
    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(model, path)
    assert sorted(p.name for p in path.parent.iterdir()) == ["best.pth"]
    assert load_weights(other, path) == "vprkit"


def test_checkpoint_of_another_model_is_refused(tmp_path):
    path = save_checkpoint(vprkit.create_model("dinov2_vits14", depth=1), tmp_path / "a.pth")
    deit = vprkit.create_model("deit_small_distilled_patch16_224", depth=1)
    with pytest.raises(ValueError, match="holds a 'dinov2_vits14' model"):
        load_weights(deit, path)
