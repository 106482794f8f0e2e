"""A registered model as an ONNX graph, with what made it recorded inside the file.

`export_onnx(model, out, image_size)` traces the model at one input size (H, W) with a
dynamic batch axis and writes one graph whose input is `images` (B, 3, H, W), normalized as
the model expects, and whose outputs are the tensor fields of the model's output
(`global_desc`; SelaVPR's `local_desc`, R2Former's `local_tokens`; a backbone's `cls_token`,
`patch_tokens`, ...), named as those fields. A model added later through the registry
exports the same way: nothing here names a method.

- The input size is fixed: the ViT pos-embed is interpolated for (H, W) once, in PyTorch,
  exactly as the model does it, and stored in the graph as a constant. An exported model
  refuses another size (`vprkit.export.runtime.OnnxModel`).
- The batch axis is dynamic. A model whose images of one batch shape each other's outputs
  (CricaVPR's cross-image encoder) keeps that coupling in the graph exactly as in PyTorch:
  the same batch gives the same descriptors. The export measures whether the model couples
  its batch and records it (`batch_coupled`).
- R2Former's re-ranking transformer is a second graph (`export_r2former_reranker`): B pairs
  of query and candidate (global descriptor, tokens) in, B same-place probabilities out.
- Each file holds a metadata entry `vprkit` (JSON; `read_metadata`): method, options,
  weights name and hash, input size, normalization, outputs, vprkit and torch versions.
- `verify=True` (the default) runs the written file with ONNX Runtime on the export's inputs
  and on other batch sizes and refuses it (the file is not written) when any output differs
  from PyTorch's by more than `atol`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vprkit.atomic import atomic_path
from vprkit.errors import VprkitError
from vprkit.export import require

METADATA_KEY = "vprkit"
FORMAT_VERSION = 1
INPUT_NAME = "images"
DEFAULT_OPSET = 17
KIND_MODEL = "model"
KIND_R2FORMER_RERANKER = "r2former_reranker"
RERANKER_INPUTS = ("query_global", "query_tokens", "candidate_global", "candidate_tokens")
RERANKER_OUTPUTS = ("probability", "global_similarity")


# --------------------------------------------------------------------------- what to trace


@contextlib.contextmanager
def fixed_pos_embed(model: nn.Module, image_size: tuple[int, int]) -> Iterator[None]:
    """Within the block, every ViT inside `model` returns the pos-embed it computes for
    `image_size` as a constant (the very tensor PyTorch computes; the interpolation is not
    traced), and refuses any other size."""
    from vprkit.models.vit import VisionTransformer

    vits = [m for m in model.modules() if isinstance(m, VisionTransformer)]
    try:
        for vit in vits:
            with torch.no_grad():
                constant = vit.interpolate_pos_embed(*image_size).detach().clone()

            def fixed(height: int, width: int, constant=constant) -> Tensor:
                if (height, width) != tuple(image_size):
                    raise VprkitError(f"traced for {image_size}, got {(height, width)}")
                return constant

            vit.interpolate_pos_embed = fixed  # an instance attribute hides the method
        yield
    finally:
        for vit in vits:
            vit.__dict__.pop("interpolate_pos_embed", None)


def _traceable_attention(mha: nn.MultiheadAttention):
    """`mha.forward` for unmasked attention in a form whose traced graph keeps every axis
    dynamic (torch's own computes `batch * heads` as a number, which the trace fixes): the
    same in-projections, scaled softmax attention and out-projection."""

    def forward(
        query,
        key,
        value,
        key_padding_mask=None,
        need_weights=True,
        attn_mask=None,
        average_attn_weights=True,
        is_causal=False,
    ):
        if key_padding_mask is not None or attn_mask is not None or is_causal:
            raise VprkitError("exporting masked attention is not supported")
        if mha.in_proj_weight is None or mha.bias_k is not None:
            raise VprkitError("exporting attention with separate k/v sizes is not supported")
        if mha.batch_first:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        L, N, S = query.shape[0], query.shape[1], key.shape[0]  # (L, N, E), (S, N, E)
        head_dim = mha.head_dim
        w = mha.in_proj_weight.chunk(3)
        b = mha.in_proj_bias.chunk(3) if mha.in_proj_bias is not None else (None,) * 3
        q, k, v = (
            F.linear(t, wi, bi).reshape(t.shape[0], -1, head_dim).transpose(0, 1)
            for t, wi, bi in zip((query, key, value), w, b, strict=True)
        )  # (N * heads, L or S, head_dim)
        weights = torch.softmax(q @ k.transpose(1, 2) * head_dim**-0.5, dim=-1)
        out = (weights @ v).transpose(0, 1).reshape(L, N, -1)
        out = F.linear(out, mha.out_proj.weight, mha.out_proj.bias)
        if mha.batch_first:
            out = out.transpose(0, 1)
        if not need_weights:
            return out, None
        weights = weights.reshape(N, mha.num_heads, L, S)
        return out, weights.mean(dim=1) if average_attn_weights else weights

    return forward


@contextlib.contextmanager
def traceable_attention(model: nn.Module) -> Iterator[None]:
    """Within the block, every `nn.MultiheadAttention` inside `model` computes unmasked
    self-attention with `_traceable_attention` (inference, no dropout)."""
    layers = [m for m in model.modules() if isinstance(m, nn.MultiheadAttention)]
    try:
        for mha in layers:
            mha.forward = _traceable_attention(mha)
        yield
    finally:
        for mha in layers:
            mha.__dict__.pop("forward", None)


def model_kwargs(model: nn.Module, local: bool) -> dict:
    """`local=` for models whose local features are optional (SelaVPR, R2Former)."""
    from vprkit.extract import computes_local

    return {"local": local} if computes_local(model) else {}


def output_fields(out: object) -> tuple[list[str], dict]:
    """The tensor fields of a model output (the graph's outputs, in field order) and its
    other non-None fields (constants such as a ViT's grid_size), JSON-ready."""
    if isinstance(out, Tensor):
        return ["output"], {}
    if not dataclasses.is_dataclass(out):
        raise VprkitError(
            f"cannot export a model that returns {type(out).__name__}: vprkit exports models "
            "returning a tensor or an output dataclass (DescriptorOutput)"
        )
    tensors, constants = [], {}
    for field in dataclasses.fields(out):
        value = getattr(out, field.name)
        if isinstance(value, Tensor):
            tensors.append(field.name)
        elif value is not None:
            constants[field.name] = json.loads(json.dumps(value))
    return tensors, constants


class OutputTuple(nn.Module):
    """`model(images, **kwargs)` as a tuple of the named output fields (what tracing needs)."""

    def __init__(self, model: nn.Module, fields: Sequence[str], kwargs: dict) -> None:
        super().__init__()
        self.model, self.fields, self.kwargs = model, list(fields), dict(kwargs)

    def forward(self, images: Tensor) -> tuple[Tensor, ...]:
        out = self.model(images, **self.kwargs)
        if isinstance(out, Tensor):
            return (out,)
        return tuple(getattr(out, name) for name in self.fields)


def batch_coupled(model: nn.Module, images: Tensor, kwargs: dict, atol: float = 1e-5) -> bool:
    """Whether an image's outputs depend on the other images of its batch (CricaVPR's
    cross-image encoder): the batch against each image alone."""
    if len(images) < 2:
        raise ValueError("needs at least 2 images")
    fields, _ = output_fields(model(images[:1], **kwargs))
    wrapped = OutputTuple(model, fields, kwargs)
    together = wrapped(images)
    for i in range(len(images)):
        alone = wrapped(images[i : i + 1])
        for a, b in zip(alone, together, strict=True):
            if not torch.allclose(a[0], b[i], atol=atol, rtol=0):
                return True
    return False


def _json_safe(value: object) -> object:
    return json.loads(json.dumps(value, default=repr))


def describe_model(
    model: nn.Module,
    image_size: tuple[int, int],
    weights: str | os.PathLike | None,
) -> dict:
    """The metadata every exported file carries about the model that made it."""
    import vprkit
    from vprkit.models.registry import model_info
    from vprkit.pipeline.fingerprint import state_sha256, weights_record

    info = model_info(model)
    attributes = {}
    if isinstance(getattr(model, "batch_mode", None), str):  # CricaVPR's protocol line
        attributes["batch_mode"] = model.batch_mode
    return {
        "format_version": FORMAT_VERSION,
        "method": getattr(model, "vprkit_name", None),
        "options": _json_safe(getattr(model, "vprkit_overrides", {})),
        **weights_record(weights),
        "weights_sha256": state_sha256(model),  # the weights in memory, as the fingerprint
        "image_size": [int(image_size[0]), int(image_size[1])],
        "mean": list(info.mean),
        "std": list(info.std),
        "attributes": attributes,
        "vprkit_version": vprkit.__version__,
        "torch_version": torch.__version__,
    }


# --------------------------------------------------------------------------- writing


def _export_graph(
    module: nn.Module,
    args: tuple[Tensor, ...],
    path: Path,
    input_names: Sequence[str],
    output_names: Sequence[str],
    dynamic_axes: dict,
    opset: int,
) -> None:
    require("onnx")  # the exporter needs it; say how to install it rather than fail deep down
    fastpath = torch.backends.mha.get_fastpath_enabled()
    # nn.TransformerEncoderLayer's fused inference kernel has no ONNX form; the plain path
    # computes the same layer.
    torch.backends.mha.set_fastpath_enabled(False)
    with contextlib.ExitStack() as stack:
        stack.callback(torch.backends.mha.set_fastpath_enabled, fastpath)
        stack.enter_context(warnings.catch_warnings())
        stack.enter_context(torch.no_grad())
        # Tracing warns at every shape it turns into a constant: fixed sizes are the intent.
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", category=UserWarning)
        torch.onnx.export(
            module,
            args,
            str(path),
            dynamo=False,  # the TorchScript-based exporter: no onnxscript, dynamic axes
            input_names=list(input_names),
            output_names=list(output_names),
            dynamic_axes=dynamic_axes,
            opset_version=opset,
            do_constant_folding=True,
        )


def _set_metadata(path: Path, metadata: dict) -> None:
    onnx = require("onnx")
    proto = onnx.load(str(path), load_external_data=False)
    del proto.metadata_props[:]
    entry = proto.metadata_props.add()
    entry.key, entry.value = METADATA_KEY, json.dumps(metadata, sort_keys=True)
    proto.producer_name = "vprkit"
    onnx.save(proto, str(path))


def read_metadata(path: str | os.PathLike) -> dict:
    """The `vprkit` metadata of an exported file (through ONNX Runtime: onnx is not needed to
    run a model)."""
    ort = require("onnxruntime")
    path = Path(path)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # faster
    try:
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as err:  # onnxruntime raises its own types for unreadable files
        raise VprkitError(f"{path}: not a readable ONNX file ({err}); re-export it") from None
    return _metadata_of(session, path)


def _metadata_of(session, path: Path) -> dict:
    text = session.get_modelmeta().custom_metadata_map.get(METADATA_KEY)
    if text is None:
        raise VprkitError(
            f"{path}: an ONNX file without vprkit's metadata: vprkit runs the files that "
            "`vprkit export` writes; export the model with it"
        )
    metadata = json.loads(text)
    if metadata.get("format_version", 0) > FORMAT_VERSION:
        raise VprkitError(
            f"{path}: written by a newer vprkit (format {metadata['format_version']}); "
            "upgrade vprkit"
        )
    return metadata


def export_onnx(
    model: nn.Module,
    out: str | os.PathLike,
    image_size: Sequence[int] | None = None,
    *,
    weights: str | os.PathLike | None = None,
    local: bool = True,
    batch_size: int = 2,
    sample: Tensor | None = None,
    opset: int = DEFAULT_OPSET,
    verify: bool = True,
    atol: float = 1e-4,
    reranker: str | None = None,
) -> dict:
    """Write `model` at `image_size` (H, W; default: the method's evaluation size) as an
    ONNX graph to `out` and return its metadata. `weights` is only recorded. `local`: also
    the local features (models where they are optional). `sample`: (B, 3, H, W) images to
    trace and verify with (default: `batch_size` random ones). The file appears only once
    written (and verified). `reranker`: the name of the re-ranker graph written beside it
    (R2Former), recorded for `OnnxModel.rerank_scores`."""
    from vprkit.models.registry import model_info

    out = Path(out)
    model = model.eval()
    hw = tuple(int(v) for v in (image_size or model_info(model).image_size))
    if len(hw) != 2:
        raise VprkitError(f"image_size must be (H, W), got {image_size}")
    if sample is None:
        generator = torch.Generator().manual_seed(0)
        sample = torch.randn(max(batch_size, 2), 3, *hw, generator=generator)
    if tuple(sample.shape[1:]) != (3, *hw) or len(sample) < 2:
        raise ValueError(f"sample must be (B >= 2, 3, {hw[0]}, {hw[1]}), got {tuple(sample.shape)}")
    kwargs = model_kwargs(model, local)
    with torch.no_grad():
        fields, constants = output_fields(model(sample[:1], **kwargs))
        coupled = batch_coupled(model, sample[:2], kwargs)
    metadata = {
        **describe_model(model, hw, weights),
        "kind": KIND_MODEL,
        "input": INPUT_NAME,
        "outputs": fields,
        "output_type": _type_name(model, sample, kwargs),
        "constants": constants,
        "local": bool(kwargs.get("local", True)),
        "dynamic_batch": True,
        "batch_coupled": coupled,
        "opset": opset,
        **({"reranker": reranker} if reranker else {}),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as staging:  # the file appears only once written and verified
        with fixed_pos_embed(model, hw), traceable_attention(model):
            wrapped = OutputTuple(model, fields, kwargs).eval()
            axes = {INPUT_NAME: {0: "batch"}, **{name: {0: "batch"} for name in fields}}
            _export_graph(wrapped, (sample,), staging, [INPUT_NAME], fields, axes, opset)
        _set_metadata(staging, metadata)
        if verify:
            metadata["verified_max_abs_diff"] = verify_model_file(
                staging, model, sample, kwargs, fields, atol=atol, label=out
            )
    return metadata


def _type_name(model: nn.Module, sample: Tensor, kwargs: dict) -> str:
    with torch.no_grad():
        out = model(sample[:1], **kwargs)
    if isinstance(out, Tensor):
        return "torch.Tensor"
    return f"{type(out).__module__}:{type(out).__qualname__}"


def array_difference(expected: np.ndarray, got: np.ndarray, atol: float = 1e-4) -> float:
    """max |expected - got| (shapes must agree)."""
    if expected.shape != got.shape:
        return float("inf")
    return float(np.abs(expected - got).max()) if expected.size else 0.0


def tokens_difference(expected: np.ndarray, got: np.ndarray, atol: float = 1e-4) -> float:
    """The difference of two sets of R2Former tokens (B, n, [x, y, attention, features]).

    Tokens come sorted by attention, and the order of attention values closer than rounding
    is the sort kernel's: ONNX Runtime's TopK and torch.sort order such near-ties differently
    (as PyTorch on two devices may), and at the 500th place one may keep a token the other
    leaves out. So tokens are matched by their patch (x, y): the sorted attention values must
    agree, every patch both keep must agree in all its values, and a patch only one keeps must
    be tied (within `atol`) with the last kept one. Returns the largest difference found
    (inf when the sets differ otherwise)."""
    if expected.shape != got.shape:
        return float("inf")
    worst = array_difference(np.sort(expected[..., 2], -1), np.sort(got[..., 2], -1))
    for e, g in zip(expected, got, strict=True):
        keys_e = {tuple(np.round(t[:2], 4)): t for t in e}
        keys_g = {tuple(np.round(t[:2], 4)): t for t in g}
        for key in keys_e.keys() & keys_g.keys():
            worst = max(worst, float(np.abs(keys_e[key] - keys_g[key]).max()))
        cutoff = min(float(e[:, 2].min()), float(g[:, 2].min()))
        for key in keys_e.keys() ^ keys_g.keys():
            token = keys_e.get(key, keys_g.get(key))
            worst = max(worst, float(token[2]) - cutoff)
    return worst


def verify_model_file(
    path: Path,
    model: nn.Module,
    sample: Tensor,
    kwargs: dict,
    fields: Sequence[str],
    *,
    atol: float = 1e-4,
    label: object = None,
) -> float:
    """The largest |ONNX Runtime - PyTorch| over every output, on `sample` and on batches of
    1 and len(sample) + 1 (the dynamic axis); a VprkitError above `atol`."""
    ort = require("onnxruntime")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    wrapped = OutputTuple(model, fields, kwargs)
    batches = [sample, sample[:1], torch.cat([sample, sample[:1].flip(-1)])]
    worst = 0.0
    for batch in batches:
        with torch.no_grad():
            expected = wrapped(batch)
        got = session.run(list(fields), {INPUT_NAME: batch.numpy()})
        for name, e, g in zip(fields, expected, got, strict=True):
            compare = tokens_difference if name == "local_tokens" else array_difference
            diff = compare(e.float().numpy(), g, atol)
            worst = max(worst, diff)
            if not diff <= atol:
                raise VprkitError(
                    f"{label or path}: the exported graph's {name} differs from PyTorch's by "
                    f"{diff:.3g} (> {atol:g}) at batch {len(batch)}; this model does not export "
                    "exactly (report it), or pass a larger tolerance"
                )
    return worst


# --------------------------------------------------------------------------- R2Former


class RerankerGraph(nn.Module):
    """R2Former's re-ranking transformer as a graph over B pairs: same-place probabilities
    softmax(logits)[:, 1] (what the official test ranks by) and the global cosine."""

    def __init__(self, reranker: nn.Module) -> None:
        super().__init__()
        self.reranker = reranker

    def forward(
        self, q_global: Tensor, q_tokens: Tensor, c_global: Tensor, c_tokens: Tensor
    ) -> tuple[Tensor, Tensor]:
        logits = self.reranker.logits(q_tokens, c_tokens)
        probability = self.reranker.same_place_probability(logits)
        similarity = torch.nn.functional.cosine_similarity(q_global, c_global, dim=1)
        return probability, similarity


def reranker_path(out: str | os.PathLike) -> Path:
    """Where `vprkit export` writes R2Former's re-ranker beside the model: `X.rerank.onnx`."""
    out = Path(out)
    stem = out.name[: -len(".onnx")] if out.name.lower().endswith(".onnx") else out.name
    return out.with_name(f"{stem}.rerank.onnx")


def export_r2former_reranker(
    model: nn.Module,
    out: str | os.PathLike,
    *,
    weights: str | os.PathLike | None = None,
    num_tokens: int | None = None,
    image_size: Sequence[int] | None = None,
    opset: int = DEFAULT_OPSET,
    verify: bool = True,
    atol: float = 1e-4,
) -> dict:
    """Write `model.Reranker` (an R2Former) as an ONNX graph: inputs query_global (B, D),
    query_tokens (B, N, F), candidate_global (B, D), candidate_tokens (B, M, F); outputs
    probability (B,) and global_similarity (B,). B, N and M are dynamic (N, M >= the
    re-ranker's 5 correlations). Returns the metadata."""
    from vprkit.models.registry import model_info

    reranker = getattr(model, "Reranker", None)
    if reranker is None or not hasattr(reranker, "logits"):
        raise VprkitError(
            f"{getattr(model, 'vprkit_name', type(model).__name__)} has no R2Former re-ranker"
        )
    out = Path(out)
    model = model.eval()
    hw = tuple(int(v) for v in (image_size or model_info(model).image_size))
    n = num_tokens or getattr(model, "num_local", 500)
    generator = torch.Generator().manual_seed(0)
    pairs = 3
    q_global = torch.nn.functional.normalize(
        torch.randn(pairs, model.global_dim, generator=generator), dim=1
    )
    c_global = torch.nn.functional.normalize(
        torch.randn(pairs, model.global_dim, generator=generator), dim=1
    )
    q_tokens = torch.rand(pairs, n, model.token_dim, generator=generator)
    c_tokens = torch.rand(pairs, n, model.token_dim, generator=generator)
    sample = (q_global, q_tokens, c_global, c_tokens)
    metadata = {
        **describe_model(model, hw, weights),
        "kind": KIND_R2FORMER_RERANKER,
        "inputs": list(RERANKER_INPUTS),
        "outputs": list(RERANKER_OUTPUTS),
        "num_tokens": int(n),
        "token_dim": int(model.token_dim),
        "global_dim": int(model.global_dim),
        "dynamic_batch": True,
        "opset": opset,
    }
    graph = RerankerGraph(reranker).eval()
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as staging:
        axes = {
            "query_global": {0: "pairs"},
            "query_tokens": {0: "pairs", 1: "query_tokens"},
            "candidate_global": {0: "pairs"},
            "candidate_tokens": {0: "pairs", 1: "candidate_tokens"},
            "probability": {0: "pairs"},
            "global_similarity": {0: "pairs"},
        }
        _export_graph(graph, sample, staging, RERANKER_INPUTS, RERANKER_OUTPUTS, axes, opset)
        _set_metadata(staging, metadata)
        if verify:
            metadata["verified_max_abs_diff"] = _verify_reranker(
                staging, graph, sample, atol=atol, label=out
            )
    return metadata


def _verify_reranker(path: Path, graph: nn.Module, sample, *, atol: float, label) -> float:
    ort = require("onnxruntime")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    worst = 0.0
    for size in (len(sample[0]), 1):
        batch = tuple(t[:size] for t in sample)
        with torch.no_grad():
            expected = graph(*batch)
        got = session.run(
            list(RERANKER_OUTPUTS),
            dict(zip(RERANKER_INPUTS, (t.numpy() for t in batch), strict=True)),
        )
        for name, e, g in zip(RERANKER_OUTPUTS, expected, got, strict=True):
            diff = float(np.abs(e.numpy() - g).max())
            worst = max(worst, diff)
            if not diff <= atol:
                raise VprkitError(
                    f"{label}: the exported re-ranker's {name} differs from PyTorch's by "
                    f"{diff:.3g} (> {atol:g}) at {size} pairs"
                )
    return worst
