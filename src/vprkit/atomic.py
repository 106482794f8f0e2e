"""Write a file so that its final name never holds a half-written file.

The content goes to a temporary file beside the target (same folder, hence same file
system) and is renamed over the target only once complete; on any error the temporary file
is removed and an existing target is left as it was.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

import numpy as np

from vprkit.errors import DiskFullError, disk_full, is_disk_full


def _new_file_beside(path: Path) -> Path:
    """Create an empty, new `<name>.<random>.tmp` beside `path`. Its permissions are those
    `open()` would give (0o666 less the umask), not mkstemp's 0o600, so the renamed file is
    as readable as one written directly."""
    for _ in range(100):
        tmp = path.with_name(f"{path.name}.{secrets.token_hex(4)}.tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            continue
        os.close(fd)
        return tmp
    raise FileExistsError(f"no free temporary name beside {path}")


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yields a temporary path beside `path` to write to; renamed to `path` when the block
    ends without error, deleted otherwise. The parent folder must exist.

    A target that exists and is not a regular file (/dev/stdout, a pipe) is written in
    place: renaming over it would replace the device. A full disk is a `DiskFullError`
    naming `path`."""
    path = Path(path)
    if path.exists() and not path.is_file() and not path.is_dir():
        with _disk_full_named(path):
            yield path
        return
    tmp = _new_file_beside(path)
    try:
        with _disk_full_named(path):
            yield tmp
        os.replace(tmp, path)
    except BaseException:
        with suppress(OSError):  # never hide the error that got us here
            tmp.unlink()
        raise


@contextmanager
def _disk_full_named(path: Path) -> Iterator[None]:
    try:
        yield
    except OSError as err:
        if is_disk_full(err) and not isinstance(err, DiskFullError):
            raise disk_full(path) from err
        raise


def save_npy(path: str | os.PathLike, array: np.ndarray) -> Path:
    """`np.save` to exactly `path` (no `.npy` appended), atomically."""
    path = Path(path)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.save(f, array)
    return path


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Write `text` (UTF-8, newlines as given) to `path`, atomically."""
    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8", newline="")
    return path
