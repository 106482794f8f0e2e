"""A registered model as a TorchScript file, traced at one input size.

`export_torchscript(model, out, image_size)` traces the model with `torch.jit.trace` (with
the same two export-time substitutions as the ONNX export: the pos-embed for (H, W) as a
constant, and a trace-friendly form of `nn.MultiheadAttention`), so the file's forward takes
(B, 3, H, W) images, any B, and returns the tuple of the output fields named in its metadata
(`vprkit.json` in the file's extra files, as `vprkit.export.onnx.read_metadata` gives for
ONNX). Load it with `torch.jit.load(path, _extra_files={"vprkit.json": ""})`, or with
`load_torchscript(path)`, which also gives the metadata.

Tracing, not scripting: every vprkit model returns a dataclass and builds its layout with
Python (dataclasses, `**kwargs`, registries), which `torch.jit.script` cannot compile. The
traced file is verified against PyTorch on the tracing batch and on other batch sizes.
"""

from __future__ import annotations

import contextlib
import json
import os
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from vprkit.atomic import atomic_path
from vprkit.errors import VprkitError
from vprkit.export.onnx import (
    KIND_MODEL,
    OutputTuple,
    batch_coupled,
    describe_model,
    fixed_pos_embed,
    model_kwargs,
    output_fields,
    traceable_attention,
)

EXTRA_FILE = "vprkit.json"


def export_torchscript(
    model: nn.Module,
    out: str | os.PathLike,
    image_size: Sequence[int] | None = None,
    *,
    weights: str | os.PathLike | None = None,
    local: bool = True,
    batch_size: int = 2,
    sample: Tensor | None = None,
    verify: bool = True,
    atol: float = 1e-4,
) -> dict:
    """Trace `model` at `image_size` (H, W; default: its evaluation size) into `out`; returns
    the metadata stored with it. The file appears only once written and verified."""
    from vprkit.models.registry import model_info

    out = Path(out)
    model = model.eval()
    hw = tuple(int(v) for v in (image_size or model_info(model).image_size))
    if sample is None:
        generator = torch.Generator().manual_seed(0)
        sample = torch.randn(max(batch_size, 2), 3, *hw, generator=generator)
    kwargs = model_kwargs(model, local)
    with torch.no_grad():
        fields, constants = output_fields(model(sample[:1], **kwargs))
        coupled = batch_coupled(model, sample[:2], kwargs)
    metadata = {
        **describe_model(model, hw, weights),
        "kind": KIND_MODEL,
        "format": "torchscript",
        "outputs": fields,
        "constants": constants,
        "local": bool(kwargs.get("local", True)),
        "dynamic_batch": True,
        "batch_coupled": coupled,
    }
    wrapped = OutputTuple(model, fields, kwargs).eval()
    fastpath = torch.backends.mha.get_fastpath_enabled()
    with contextlib.ExitStack() as stack:
        stack.callback(torch.backends.mha.set_fastpath_enabled, fastpath)
        torch.backends.mha.set_fastpath_enabled(False)
        stack.enter_context(fixed_pos_embed(model, hw))
        stack.enter_context(traceable_attention(model))
        stack.enter_context(torch.no_grad())
        stack.enter_context(warnings.catch_warnings())
        warnings.simplefilter("ignore")  # TracerWarnings: the fixed sizes are the intent
        try:
            traced = torch.jit.trace(wrapped, (sample,), check_trace=False)
        except Exception as err:  # tracing fails with many types; the message says why
            raise VprkitError(
                f"{getattr(model, 'vprkit_name', type(model).__name__)} does not trace: {err}; "
                "export it with --format onnx"
            ) from err
    if verify:
        metadata["verified_max_abs_diff"] = _verify(traced, wrapped, sample, fields, atol, out)
    out.parent.mkdir(parents=True, exist_ok=True)
    extra = {EXTRA_FILE: json.dumps(metadata, sort_keys=True)}
    with atomic_path(out) as staging, warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # TorchScript is the ask here
        torch.jit.save(traced, str(staging), _extra_files=extra)
    return metadata


def _verify(traced, wrapped, sample: Tensor, fields, atol: float, out: Path) -> float:
    worst = 0.0
    for batch in (sample, sample[:1], torch.cat([sample, sample[:1].flip(-1)])):
        with torch.no_grad():
            expected, got = wrapped(batch), traced(batch)
        for name, e, g in zip(fields, expected, got, strict=True):
            diff = float((e - g).abs().max()) if e.numel() else 0.0
            worst = max(worst, diff)
            if not diff <= atol:
                raise VprkitError(
                    f"{out}: the traced {name} differs from PyTorch's by {diff:.3g} at batch "
                    f"{len(batch)}: this model does not trace cleanly; export it with --format onnx"
                )
    return worst


def load_torchscript(path: str | os.PathLike) -> tuple[torch.jit.ScriptModule, dict]:
    """The traced module and its metadata."""
    extra = {EXTRA_FILE: ""}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        module = torch.jit.load(str(path), map_location="cpu", _extra_files=extra)
    if not extra[EXTRA_FILE]:
        raise VprkitError(f"{path}: a TorchScript file without vprkit's metadata")
    return module, json.loads(extra[EXTRA_FILE])
