"""Errors a user can fix (bad input, a mismatched file, a refused setting), apart from bugs.

The command line prints these as one line; anything else is a bug and keeps its traceback.
They derive from ValueError, which is what vprkit raised for bad input before they existed.
"""

from __future__ import annotations


class VprkitError(ValueError):
    """Bad input or a request vprkit cannot honour; the message says what to do."""


class StageMismatchError(VprkitError):
    """A stage's output already exists but was made from other inputs, model or settings."""
