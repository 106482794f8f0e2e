"""An exported ONNX file as a vprkit model: `OnnxModel(path)` is an `nn.Module` whose forward
takes the same (B, 3, H, W) tensor as the PyTorch model and returns the same output
(`DescriptorOutput(global_desc, local_desc / local_tokens)`), computed by ONNX Runtime.

It carries what the rest of vprkit asks a model for, read from the file's metadata:
`vprkit_name` and `vprkit_overrides` (the method and its options), `vprkit_info` (the
method's `ModelInfo` with the exported input size and normalization: what `model_info`,
`make_preprocess` and the evaluation defaults read), and CricaVPR's `batch_mode`.

Fingerprint: its state dict holds one buffer, `onnx_sha256` (the sha256 of the file, whose
graph holds the weights), so features extracted with an ONNX file are never taken for those of
the PyTorch model nor of another file (`vprkit.pipeline.fingerprint.model_fingerprint`). They
are deliberately not the same: ONNX Runtime's outputs equal PyTorch's only within ~1e-5.

An R2Former file exported with its re-ranker (`X.rerank.onnx` beside `X.onnx`, named in the
metadata) also has `rerank_scores`, the same call as `R2Former.rerank_scores`, run by the
re-ranker graph: `vprkit eval --backend onnxruntime` re-ranks with it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import os
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from vprkit.errors import VprkitError
from vprkit.export import require
from vprkit.export.onnx import (
    KIND_MODEL,
    KIND_R2FORMER_RERANKER,
    RERANKER_INPUTS,
    _metadata_of,
)


def is_onnx_file(path: object) -> bool:
    """Whether `path` names an existing `.onnx` file (what `--weights`/`--onnx` may give)."""
    if path is None:
        return False
    path = Path(str(path)).expanduser()
    return path.suffix.lower() == ".onnx" and path.is_file()


def onnx_sha256(path: Path) -> bytes:
    """sha256 of the file (its graph and, below 2 GB, its weights)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.digest()


def _session(path: Path, threads: int | None, providers: list[str] | None):
    ort = require("onnxruntime")
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    try:
        return ort.InferenceSession(
            str(path), options, providers=providers or ["CPUExecutionProvider"]
        )
    except Exception as err:  # onnxruntime raises its own types for unreadable files
        raise VprkitError(f"{path}: not a readable ONNX file ({err}); re-export it") from None


def _output_type(name: str):
    if name == "torch.Tensor":
        return None
    module, _, qualname = name.partition(":")
    try:
        obj = importlib.import_module(module)
        for part in qualname.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError):
        raise VprkitError(
            f"the exported model returns {name}, which this vprkit does not have; use the "
            "vprkit version that exported it"
        ) from None
    return obj


class OnnxModel(nn.Module):
    """An exported model run by ONNX Runtime (CPU unless `providers` says otherwise)."""

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        threads: int | None = None,
        providers: list[str] | None = None,
    ) -> None:
        super().__init__()
        from vprkit.models.info import ModelInfo
        from vprkit.models.registry import list_models, model_info

        self.onnx_path = Path(path).expanduser()
        self._threads, self._providers = threads, providers
        self.session = _session(self.onnx_path, threads, providers)
        self.metadata = meta = _metadata_of(self.session, self.onnx_path)
        if meta.get("kind") != KIND_MODEL:
            raise VprkitError(
                f"{self.onnx_path}: a {meta.get('kind')} graph, not a model: give the model's "
                "file (the re-ranker is found beside it)"
            )
        self.image_size: tuple[int, int] = tuple(meta["image_size"])
        self.outputs: list[str] = list(meta["outputs"])
        self.batch_coupled = bool(meta.get("batch_coupled"))
        self._type = _output_type(meta["output_type"])
        self._constants = {
            k: tuple(v) if isinstance(v, list) else v for k, v in meta.get("constants", {}).items()
        }
        method = meta.get("method")
        self.vprkit_name = method or self.onnx_path.stem
        self.vprkit_overrides = dict(meta.get("options", {}))
        base = model_info(method) if method in list_models() else ModelInfo()
        self.vprkit_info = dataclasses.replace(
            base,
            image_size=self.image_size,
            mean=tuple(meta.get("mean", base.mean)),
            std=tuple(meta.get("std", base.std)),
        )
        for key, value in meta.get("attributes", {}).items():
            setattr(self, key, value)  # CricaVPR's batch_mode, for its protocol line
        digest = torch.frombuffer(bytearray(onnx_sha256(self.onnx_path)), dtype=torch.uint8)
        self.register_buffer("onnx_sha256", digest.clone())
        self._reranker = None
        name = meta.get("reranker")
        self.reranker_path = None if name is None else self.onnx_path.with_name(name)
        if self.reranker_path is None:
            self.rerank_scores = None  # re-rankers check `getattr(model, "rerank_scores")`

    def extra_repr(self) -> str:
        h, w = self.image_size
        return f"{self.onnx_path}, {self.vprkit_name} at {h}x{w}, outputs {self.outputs}"

    def check_input(self, images: Tensor) -> None:
        h, w = self.image_size
        if images.ndim != 4 or images.shape[1] != 3:
            raise VprkitError(
                f"{self.onnx_path}: expected images of shape (B, 3, {h}, {w}), got "
                f"{tuple(images.shape)}"
            )
        if tuple(images.shape[2:]) != self.image_size:
            raise VprkitError(
                f"{self.onnx_path} was exported for {h}x{w} (H x W) inputs, got "
                f"{images.shape[2]}x{images.shape[3]}: resize the images to {h}x{w} "
                f"(--image_size {h} {w}, or leave --image_size out), or export the model again "
                f"with --image_size {images.shape[2]} {images.shape[3]}"
            )

    def forward(self, images: Tensor, local: bool = True):
        """The model's output for (B, 3, H, W) images; `local=False` skips the local
        features (SelaVPR, R2Former), as the PyTorch model does."""
        self.check_input(images)
        names = self.outputs
        if not local and "global_desc" in names:
            names = ["global_desc"]
        feed = np.ascontiguousarray(images.detach().float().cpu().numpy())
        results = self.session.run(names, {"images": feed})
        tensors = {
            n: torch.from_numpy(r).to(images.device) for n, r in zip(names, results, strict=True)
        }
        if self._type is None:
            return tensors["output"]
        return self._type(**self._constants, **tensors)

    # ------------------------------------------------------------------ R2Former re-ranking

    def _reranker_session(self):
        if self._reranker is None:
            path = self.reranker_path
            if not path.is_file():
                raise VprkitError(
                    f"{self.onnx_path} re-ranks with {path}, which is missing: keep the two "
                    "files of `vprkit export` together, or pass --rerank_num 0"
                )
            session = _session(path, self._threads, self._providers)
            meta = _metadata_of(session, path)
            if meta.get("kind") != KIND_R2FORMER_RERANKER or (
                meta.get("weights_sha256") != self.metadata.get("weights_sha256")
            ):
                raise VprkitError(
                    f"{path} is not the re-ranker exported with {self.onnx_path} (other "
                    "weights): export the model again"
                )
            self._reranker = session
        return self._reranker

    rerank_batch = 10  # pairs per run, as R2Former.rerank_batch_cpu

    @torch.no_grad()
    def rerank_scores(
        self,
        q_global: Tensor,
        q_tokens: Tensor,
        c_global: Tensor,
        c_tokens: Tensor,
        batch_size: int | None = None,
    ) -> Tensor:
        """`R2Former.rerank_scores` by the re-ranker graph: (Q, D), (Q, N, F), (Q, K, D),
        (Q, K, M, F) -> (Q, K) same-place probabilities (or unbatched -> (K,))."""
        if q_tokens.ndim == 2:
            return self.rerank_scores(
                q_global[None], q_tokens[None], c_global[None], c_tokens[None], batch_size
            )[0]
        session = self._reranker_session()
        Q, K = c_tokens.shape[:2]
        size = batch_size or self.rerank_batch
        qg = q_global.float().cpu().numpy()
        qt = q_tokens.float().cpu().numpy()
        cg = c_global.float().cpu().reshape(Q * K, -1).numpy()
        ct = c_tokens.float().cpu().reshape(Q * K, *c_tokens.shape[2:]).numpy()
        scores = []
        for start in range(0, Q * K, size):
            pairs = np.arange(start, min(start + size, Q * K))
            feed = (qg[pairs // K], qt[pairs // K], cg[pairs], ct[pairs])
            (probability,) = session.run(
                ["probability"],
                {n: np.ascontiguousarray(a) for n, a in zip(RERANKER_INPUTS, feed, strict=True)},
            )
            scores.append(probability)
        return torch.from_numpy(np.concatenate(scores).reshape(Q, K)).to(c_tokens.device)


def load_onnx_model(path: str | os.PathLike, **options) -> OnnxModel:
    """`OnnxModel(path, **options)`, the file checked to exist first."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise VprkitError(f"no such ONNX file: {path}; give the file `vprkit export` wrote")
    return OnnxModel(path, **options)
