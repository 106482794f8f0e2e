"""`--compile`: a model's forward through `torch.compile` (TorchInductor), with the plain
forward as the fallback and the reference.

The model object stays the same (its forward is replaced on the instance), so its state dict,
fingerprint and attributes do not change. Compiling happens at the first forward and again
for each new input shape (the last, smaller batch of an extraction recompiles once with a
dynamic batch size): worth it for long extractions, not for a handful of images. Should
compiling fail (no C++ compiler, an unsupported op), one warning says why and the plain
forward runs from then on. Measured in `benchmarks/bench_backbone.py --compile`.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from vprkit.errors import VprkitError

log = logging.getLogger(__name__)


def compile_forward(model: nn.Module) -> nn.Module:
    """`model` with its forward compiled; returns the same object."""
    plain = model.forward
    compiled = torch.compile(plain)
    failed: list[Exception] = []

    def forward(*args, **kwargs):
        if not failed:
            try:
                return compiled(*args, **kwargs)
            except Exception as err:  # the compiler's own errors are many kinds
                failed.append(err)
                reason = str(err).strip().splitlines()[0] if str(err).strip() else repr(err)
                log.warning("torch.compile failed (%s): running the plain model", reason[:300])
        return plain(*args, **kwargs)

    model.forward = forward
    log.info("compiling the model with torch.compile at its first batches (slower at first)")
    return model


def check_not_with_ray(compile: bool, ray: str | None) -> None:
    """`--compile` compiles this process's model; Ray workers build their own plain ones."""
    if compile and ray is not None:
        raise VprkitError(
            "argument --compile: with --ray the workers build their own plain models; leave "
            "one of the two out"
        )
