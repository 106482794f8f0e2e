"""Errors a user can fix (bad input, a mismatched file, a refused setting), apart from bugs.

The rule the command line follows (`vprkit.cli.main`):

- A `VprkitError` is an expected failure: vprkit checked the input and refused it. Its
  message is one sentence saying what is wrong, which file or option, and what to do; the
  command prints it as one line, `vprkit <verb>: error: <message>`, and exits with 1 (2 for a
  `UsageError`, like argparse's own usage errors).
- The operating system's refusals are expected too, whoever raised them (numpy, torch, the
  standard library): a missing file or folder, a folder where a file was wanted or the
  reverse, a file that exists already, no permission, a full disk (errno ENOSPC/EDQUOT).
- Anything else, a plain `ValueError` or `RuntimeError` from deep inside numpy or torch
  included, is a bug and keeps its traceback. vprkit's own checks raise a `VprkitError`;
  a plain `ValueError` of ours is a programming error (an API called the wrong way).

`--debug` (or `VPRKIT_DEBUG=1`) prints the traceback of expected failures as well. The
classes derive from the standard types vprkit raised before they existed (`ValueError`,
`FileNotFoundError`, `OSError`), so `except ValueError` and `pytest.raises(FileNotFoundError)`
keep working.
"""

from __future__ import annotations

import errno
import os


class VprkitError(ValueError):
    """Bad input or a request vprkit cannot honour; the message says what to do."""


class UsageError(VprkitError):
    """A flag's value is refused after parsing (it depends on the model, or on another
    flag); reported like argparse's usage errors, exit status 2."""


class StageMismatchError(VprkitError):
    """A stage's output already exists but was made from other inputs, model or settings."""


class MissingInputError(VprkitError, FileNotFoundError):
    """A file or folder the user named, or one a dataset lists, does not exist."""


class DiskFullError(VprkitError, OSError):
    """The disk (or quota) filled up while writing an output; what was written before stays
    whole, the output being written is removed or left as `.incomplete`."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.errno = errno.ENOSPC


DISK_FULL_ERRNOS = {errno.ENOSPC, errno.EDQUOT}


def is_disk_full(err: BaseException) -> bool:
    return isinstance(err, OSError) and err.errno in DISK_FULL_ERRNOS


def disk_full(path: str | os.PathLike, what: str = "--out/--save_dir") -> DiskFullError:
    """The error for a full disk while writing `path`."""
    return DiskFullError(f"disk full, while writing {path}: free space or choose another {what}")
