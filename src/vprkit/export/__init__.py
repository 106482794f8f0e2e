"""Deployment: a registered model as an ONNX graph or a TorchScript file, and the ONNX
Runtime-backed model that runs an exported file inside vprkit (`--backend onnxruntime
--onnx FILE`), so an export can be checked on a benchmark before it is deployed.

- `vprkit.export.onnx`: `export_onnx(model, out, image_size)` (the global descriptor graph,
  with local features / tokens as extra outputs) and `export_r2former_reranker(...)`;
  metadata in the file says what made it (`read_metadata`).
- `vprkit.export.runtime`: `OnnxModel`, an `nn.Module` whose forward takes the same
  (B, 3, H, W) tensor and returns the same `DescriptorOutput` as the PyTorch model;
  `load_onnx_model(path)`.
- `vprkit.export.torchscript`: `export_torchscript(model, out, image_size)` (traced).
- `vprkit.export.cli`: the `vprkit export` verb.

onnx and onnxruntime are an optional extra (`pip install vprkit[export]`), imported only here
and only when used.
"""

from __future__ import annotations

from vprkit.errors import VprkitError

INSTALL_HINT = "pip install vprkit[export]"


def require(module: str):
    """Import `module` (onnx, onnxruntime), or say in one line how to install it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise VprkitError(
            f"{module} is not installed: it is needed to export or run ONNX models; {INSTALL_HINT}"
        ) from None
