"""vprkit.atomic: a file's final name holds either the old content or the complete new one."""

import os

import numpy as np
import pytest

from vprkit.atomic import atomic_path, save_npy, write_text


def test_target_appears_only_when_complete(tmp_path):
    target = tmp_path / "out.bin"
    with atomic_path(target) as tmp:
        assert tmp.parent == tmp_path and tmp != target
        tmp.write_bytes(b"first half")
        assert not target.exists()  # nothing under the final name while writing
        with open(tmp, "ab") as f:
            f.write(b", second half")
        assert not target.exists()
    assert target.read_bytes() == b"first half, second half"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.bin"]


def test_error_keeps_the_old_target_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "out.bin"
    old = bytes(range(256)) * 3
    target.write_bytes(old)
    with pytest.raises(RuntimeError, match="boom"), atomic_path(target) as tmp:
        tmp.write_bytes(b"half of the new content")
        raise RuntimeError("boom")
    assert target.read_bytes() == old
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.bin"]


def test_error_without_an_old_target_leaves_nothing(tmp_path):
    with pytest.raises(KeyboardInterrupt), atomic_path(tmp_path / "out.bin") as tmp:
        tmp.write_bytes(b"partial")
        raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []


def test_failed_rename_keeps_the_old_target(tmp_path, monkeypatch):
    target = tmp_path / "out.txt"
    target.write_text("previous\n")

    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk full"), atomic_path(target) as tmp:
        tmp.write_text("new\n")
    assert target.read_text() == "previous\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.txt"]


def test_missing_folder_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError), atomic_path(tmp_path / "no" / "out.bin"):
        pass


def test_permissions_are_those_of_a_plain_write(tmp_path):
    # Not mkstemp's 0o600: a file written atomically is as readable as one written directly.
    plain = tmp_path / "plain.txt"
    plain.write_text("x")
    written = write_text(tmp_path / "atomic.txt", "x")
    assert written.stat().st_mode & 0o777 == plain.stat().st_mode & 0o777


def test_save_npy_writes_exactly_the_given_name(tmp_path):
    array = np.arange(12, dtype=np.float32).reshape(3, 4)
    target = tmp_path / "descriptors.bin"  # not .npy: np.save(str) would append it
    assert save_npy(target, array) == target
    assert sorted(p.name for p in tmp_path.iterdir()) == ["descriptors.bin"]
    loaded = np.load(target, allow_pickle=False)
    assert loaded.dtype == array.dtype and np.array_equal(loaded, array)

    save_npy(tmp_path / "a.npy", array[:1])  # a .npy name is kept as it is, not doubled
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.npy", "descriptors.bin"]
    assert np.array_equal(np.load(tmp_path / "a.npy"), array[:1])


def test_write_text_round_trips_exactly(tmp_path):
    text = "Zürich → Köln, 東京\nnaïve café ✓\n\nlast line without newline"
    target = tmp_path / "notes.txt"
    assert write_text(target, text) == target
    assert target.read_bytes() == text.encode("utf-8")  # UTF-8, "\n" kept as "\n"
    assert target.read_text(encoding="utf-8") == text
    assert b"\r" not in target.read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_write_text_replaces_an_existing_file(tmp_path):
    target = tmp_path / "notes.txt"
    target.write_text("a much longer previous content\n" * 10)
    write_text(target, "short\n")
    assert target.read_bytes() == b"short\n"
