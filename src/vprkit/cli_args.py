"""Flags shared by the verbs: the model to build, the dataset to read, how to extract; and
the argparse `type=` helpers that check a flag's value when it is parsed, so that a bad value
is a usage error (exit status 2) before any folder is made or any image read."""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import math
from pathlib import Path

import torch
from torch import nn

from vprkit.data.datasets import PlaceDataset, read_folders
from vprkit.data.formats import open_dataset
from vprkit.data.images import Preprocess
from vprkit.errors import UsageError, VprkitError
from vprkit.extract import PRECISIONS
from vprkit.models.registry import create_model, list_models, model_info
from vprkit.pipeline.config import size_option

RANDOM = "random"  # --weights random: an explicit random initialization

# --------------------------------------------------------------------------- value types


def positive_int(text: str) -> int:
    """An integer >= 1."""
    value = _int(text, "a positive integer")
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer (1, 2, ...), got {text}")
    return value


def non_negative_int(text: str) -> int:
    """An integer >= 0."""
    value = _int(text, "an integer >= 0")
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0 (e.g. 0), got {text}")
    return value


def positive_float(text: str) -> float:
    """A finite number > 0."""
    value = _float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text}")
    return value


def non_negative_float(text: str) -> float:
    """A finite number >= 0."""
    value = _float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text}")
    return value


def int_range(low: int, high: int | None = None):
    """A type for integers in [low, high] (no upper bound when high is None)."""

    def check(text: str) -> int:
        value = _int(text, "an integer")
        if value < low or (high is not None and value > high):
            accepted = f"in [{low}, {high}]" if high is not None else f">= {low}"
            raise argparse.ArgumentTypeError(f"expected an integer {accepted}, got {text}")
        return value

    check.__name__ = f"int_range({low}, {high})"
    return check


def float_range(low: float, high: float | None = None):
    """A type for finite numbers in [low, high] (no upper bound when high is None)."""

    def check(text: str) -> float:
        value = _float(text)
        if value < low or (high is not None and value > high):
            accepted = f"in [{low:g}, {high:g}]" if high is not None else f">= {low:g}"
            raise argparse.ArgumentTypeError(f"expected a number {accepted}, got {text}")
        return value

    check.__name__ = f"float_range({low}, {high})"
    return check


def _int(text: str, what: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None


def _float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text}")
    return value


def existing_file(text: str) -> Path:
    """The path of an existing file (not a folder)."""
    path = Path(text).expanduser()
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a folder; give a file")
    if not path.exists():
        raise argparse.ArgumentTypeError(f"no such file: {text}")
    return path


def existing_dir(text: str) -> Path:
    """The path of an existing folder."""
    path = Path(text).expanduser()
    if not path.exists():
        raise argparse.ArgumentTypeError(f"no such folder: {text}")
    if not path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a file; give a folder")
    return path


def output_file(text: str) -> Path:
    """A file to write: anything but an existing folder (its folder is made if needed)."""
    path = Path(text).expanduser()
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a folder; give the name of a file to write")
    return path


def device(text: str) -> str:
    """A torch device that exists here: cpu, cuda, cuda:N, mps."""
    try:
        parsed = torch.device(text)
    except (RuntimeError, ValueError):
        raise argparse.ArgumentTypeError(
            f"unknown device {text!r}; use cpu, cuda or cuda:N"
        ) from None
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise argparse.ArgumentTypeError("CUDA is not available here; use --device cpu")
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise argparse.ArgumentTypeError(
                f"no {text} here ({torch.cuda.device_count()} CUDA device(s)); use --device cuda:0"
            )
    if parsed.type == "mps" and not torch.backends.mps.is_available():
        raise argparse.ArgumentTypeError("MPS is not available here; use --device cpu")
    return text


def weights_option(text: str) -> str:
    """`--weights`: a weights file, an official name (vprkit weights list) or `random`."""
    from vprkit.hub import OFFICIAL_WEIGHTS

    if text == RANDOM or text in OFFICIAL_WEIGHTS:
        return text
    path = Path(text).expanduser()
    if path.is_dir():
        raise argparse.ArgumentTypeError(
            f"{text} is a folder; give the weights file inside it (.pth), an official name "
            "(vprkit weights list) or random"
        )
    if not path.is_file():
        raise argparse.ArgumentTypeError(
            f"{text!r} is neither a file nor an official name ({', '.join(OFFICIAL_WEIGHTS)}); "
            "give a weights file, a name, or random for a random initialization"
        )
    return text


class ImageSize(argparse.Action):
    """`--image_size N` (short side) or `--image_size H W`, positive integers."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        if len(values) not in (1, 2):
            parser.error(
                f"argument {option_string}: takes one value (short side) or two (H W), got "
                f"{len(values)}"
            )
        setattr(namespace, self.dest, values)


def parse_model_option(text: str) -> tuple[str, object]:
    if "=" not in text or not text.split("=", 1)[0]:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE (e.g. depth=2), got {text!r}")
    key, value = text.split("=", 1)
    try:
        return key, ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return key, value  # a plain string such as size=vits14


# --------------------------------------------------------------------------- flag groups


def add_model_arguments(
    parser: argparse.ArgumentParser, default_method: str | None = None, backends: bool = True
):
    """`--method`, `--weights`, `--model_option` and `--seed` (the verbs that build a model);
    with `backends`, also `--backend` and `--onnx` (an exported file run by ONNX Runtime,
    which then names the method: `check_model` fills `--method` and `--weights` in)."""
    model = parser.add_argument_group("model")
    model.add_argument(
        "--method",
        # Checked by check_model, not argparse: --onnx FILE names the method itself.
        required=default_method is None and not backends,
        default=default_method,
        help="a registered model: vprkit models"
        + ("" if default_method is None else " (default: %(default)s)")
        + ("; required unless --onnx gives the file that names it" if backends else ""),
    )
    model.add_argument(
        "--weights",
        type=weights_option,
        help="weights file, official name (vprkit weights list), or random for an explicit "
        "random initialization; default: the method's official weights (vprkit models)",
    )
    model.add_argument(
        "--model_option",
        "--model-option",
        type=parse_model_option,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="constructor override, repeatable, e.g. size=vits14 depth=2 (official weights "
        "fit only options that keep the architecture)",
    )
    model.add_argument(
        "--seed",
        type=non_negative_int,
        default=0,
        help="torch seed set before the model is built: reproducible --weights random",
    )
    if backends:
        add_backend_arguments(model)


BACKENDS = ("torch", "onnxruntime")


def add_backend_arguments(group: argparse._ArgumentGroup) -> None:
    """`--backend` and `--onnx`: run a file `vprkit export` wrote instead of PyTorch."""
    group.add_argument(
        "--backend",
        choices=BACKENDS,
        help="torch (the PyTorch model) or onnxruntime (an exported file: --onnx); default: "
        "onnxruntime with --onnx, else torch",
    )
    group.add_argument(
        "--onnx",
        type=existing_file,
        help="a model exported by vprkit export --format onnx, run by ONNX Runtime (pip install "
        "vprkit[export]); method, options, weights and input size come from the file",
    )


def uses_onnx(args: argparse.Namespace) -> bool:
    """Whether the flags ask for an exported ONNX file (`--backend onnxruntime`, `--onnx`)."""
    backend, onnx = getattr(args, "backend", None), getattr(args, "onnx", None)
    if backend == "torch" and onnx is not None:
        raise UsageError(
            "argument --onnx: an ONNX file runs with --backend onnxruntime, not torch; drop "
            "--backend torch (or --onnx)"
        )
    if backend == "onnxruntime" and onnx is None:
        raise UsageError(
            "argument --backend: onnxruntime runs an exported file: add --onnx FILE (vprkit "
            "export --format onnx writes one)"
        )
    return onnx is not None


def check_onnx_arguments(args: argparse.Namespace) -> None:
    """`--onnx FILE`: the file's method and weights go into `args.method` and `args.weights`
    (so `build_model(args.method, args.weights, ...)` loads it); `--method`, `--weights`,
    `--model_option` and `--image_size` must agree with the file."""
    from vprkit.export.onnx import read_metadata

    path = args.onnx
    if args.weights is not None:
        raise UsageError(
            f"argument --weights: {path}'s weights are inside it; leave --weights out with --onnx"
        )
    meta = read_metadata(path)
    method = meta.get("method")
    if args.method is not None and args.method != method:
        raise UsageError(
            f"argument --method: {path} was exported from {method}, not {args.method}; leave "
            "--method out (the file names it) or give the right file"
        )
    _check_onnx_options(method, args.model_option, meta, path)
    check_onnx_image_size(meta, getattr(args, "image_size", None), path)
    if getattr(args, "precision", "fp32") != "fp32":
        raise UsageError(
            f"argument --precision: {path} runs in fp32 (ONNX Runtime does not autocast): "
            "leave --precision out"
        )
    args.method, args.weights = method, str(path)


def _check_onnx_options(method: str, options: list, meta: dict, path) -> None:
    if not options:
        return
    import json

    given = json.loads(json.dumps(model_options(method, options), default=repr))
    if any(meta.get("options", {}).get(k) != v for k, v in given.items()):
        raise UsageError(
            f"argument --model_option: {path} was exported with options "
            f"{meta.get('options')}; its architecture is fixed: leave --model_option out"
        )


def check_onnx_image_size(meta: dict, image_size: list[int] | None, path) -> None:
    """An exported model takes one input size: `--image_size` may only repeat it."""
    if image_size is None:
        return
    h, w = meta["image_size"]
    if list(image_size) != [h, w]:
        raise UsageError(
            f"argument --image_size: {path} was exported for {h}x{w} (H x W) inputs, not "
            f"{' x '.join(map(str, image_size))}: leave --image_size out (or give {h} {w}), "
            f"or export the model again with --image_size {' '.join(map(str, image_size))}"
        )


def add_dataset_arguments(parser: argparse.ArgumentParser) -> None:
    """`--dataset_folder` (any known layout) or `--database_folder`/`--queries_folder`."""
    data = parser.add_argument_group("data")
    data.add_argument(
        "--dataset_folder",
        "--dataset-folder",
        type=existing_dir,
        help="a dataset in any known layout (VG, VPR-Bench, GSV-Cities val, MSLS, folders)",
    )
    data.add_argument("--split", default="test", help="VG layout split")
    data.add_argument(
        "--database_folder",
        "--database-folder",
        type=existing_dir,
        help="plain folder of database images (with --queries_folder)",
    )
    data.add_argument(
        "--queries_folder",
        "--queries-folder",
        type=existing_dir,
        help="plain folder of query images (with --database_folder)",
    )
    data.add_argument(
        "--ground_truth",
        "--ground-truth",
        type=existing_file,
        help="VPR-Bench-style ground truth .npy (images then named by number)",
    )
    data.add_argument(
        "--no_labels",
        "--no-labels",
        action="store_true",
        help="images without coordinates or ground truth: retrieval only, no recall",
    )
    data.add_argument(
        "--msls_split",
        "--msls-split",
        choices=["val", "test"],
        default="val",
        help="Mapillary SLS folder (train_val/, test/): which split",
    )
    data.add_argument(
        "--msls_val_split",
        "--msls-val-split",
        choices=["official", "downloader"],
        default="official",
        help="official: the 740-query set the papers use; downloader: VPR-datasets-downloader's",
    )
    data.add_argument(
        "--msls_subtask",
        "--msls-subtask",
        default="all",
        help="Mapillary SLS subtask (the official mapillary_sls evaluation's)",
    )
    data.add_argument(
        "--msls_cities",
        "--msls-cities",
        nargs="+",
        help="Mapillary SLS cities; default: the split's",
    )
    data.add_argument(
        "--positive_dist_threshold",
        "--positive-dist-threshold",
        type=non_negative_float,
        default=25.0,
        help="metres: database images this close to a query are its positives (the VG "
        "benchmark's 25)",
    )


def add_extraction_arguments(parser: argparse.ArgumentParser) -> argparse._ArgumentGroup:
    """Input size, batch size, workers, device and precision of the forward passes."""
    run = parser.add_argument_group("run")
    run.add_argument(
        "--image_size",
        "--image-size",
        type=positive_int,
        nargs="+",
        action=ImageSize,
        metavar="N",
        help="network input: the short side, or H W; default: the method's evaluation size "
        "(vprkit models)",
    )
    run.add_argument(
        "--infer_batch_size",
        "--infer-batch-size",
        type=positive_int,
        help="default: the method's official value (CricaVPR: 16, 8 for pitts*), else 16",
    )
    add_device_arguments(run)
    return run


def add_device_arguments(group: argparse._ArgumentGroup) -> None:
    """Workers, device and precision of the forward passes."""
    group.add_argument(
        "--num_workers",
        "--num-workers",
        type=non_negative_int,
        default=2,
        help="image-loading processes (0: in this process)",
    )
    group.add_argument(
        "--device",
        type=device,
        default="cuda" if torch.cuda.is_available() else "cpu",
        help="cpu, cuda or cuda:N",
    )
    group.add_argument(
        "--precision",
        choices=sorted(PRECISIONS),
        default="fp32",
        help="autocast precision of the forward passes",
    )
    group.add_argument(
        "--compile",
        action="store_true",
        help="run the model through torch.compile (needs a C++ compiler; the first batches "
        "compile, so it pays off on long extractions; falls back to the plain model on failure)",
    )


def add_reranker_arguments(group: argparse._ArgumentGroup | argparse.ArgumentParser) -> None:
    """Which re-ranker, how ties are ordered, and its memory and precision."""
    from vprkit.rerank import list_rerankers

    group.add_argument("--reranker", choices=list_rerankers(), help="default: the method's own")
    group.add_argument(
        "--tie_order",
        "--tie-order",
        choices=["official", "stable"],
        help="order of equal re-rank scores: official (SelaVPR's np.argsort(counts)[::-1]) or "
        "stable (global order); default: the method's (SelaVPR: official, others: stable)",
    )
    group.add_argument(
        "--rerank_memory_mb",
        "--rerank-memory-mb",
        type=positive_float,
        help="bound the re-ranker's working memory (same order, slower)",
    )
    group.add_argument(
        "--rerank_precision",
        "--rerank-precision",
        choices=sorted(PRECISIONS),
        default="fp32",
        help="autocast precision of re-rankers that run a network (R2Former's)",
    )


def add_keep_local_argument(group: argparse._ArgumentGroup | argparse.ArgumentParser) -> None:
    group.add_argument(
        "--local",
        action=argparse.BooleanOptionalAction,
        help="keep local features for re-ranking; default: when the method re-ranks",
    )


def add_local_fp16_argument(group: argparse._ArgumentGroup | argparse.ArgumentParser) -> None:
    group.add_argument(
        "--local_features_fp16",
        "--local-features-fp16",
        action="store_true",
        help="store local features in fp16 (half the disk; counts may differ slightly)",
    )


def add_ray_argument(group: argparse._ArgumentGroup | argparse.ArgumentParser) -> None:
    group.add_argument(
        "--ray",
        metavar="ADDRESS",
        help="extract as a Ray job over the cluster's workers (one model per worker, GPU-aware; "
        "pip install 'vprkit[ray]'): auto (the cluster on this machine, else a local one) or "
        "a head's HOST:PORT; the images and outputs must be reachable from every worker",
    )


def add_recall_values(group: argparse._ArgumentGroup | argparse.ArgumentParser) -> None:
    group.add_argument(
        "--recall_values",
        "--recall-values",
        type=positive_int,
        nargs="+",
        default=[1, 5, 10, 20, 100],
        metavar="N",
        help="report Recall@N for these N (the VG benchmark's list)",
    )


# --------------------------------------------------------------------------- the model


def model_options(method: str, options: list[tuple[str, object]]) -> dict:
    """`--model_option` pairs as constructor keywords, each value checked against the type of
    its default (in the constructor's signature, or the ViT config its overrides go to)."""
    if method not in list_models():
        raise UsageError(
            f"argument --method: unknown method {method!r}; known: {', '.join(list_models())}"
        )
    defaults = _option_defaults(method)
    checked = {}
    for key, value in options:
        default = defaults.get(key)
        if default is not None and not _fits(value, default):
            raise UsageError(
                f"argument --model_option: {key}={value!r}: {method}'s {key} takes "
                f"{type(default).__name__} values, e.g. {key}={default!r}"
            )
        checked[key] = value
    return checked


def _option_defaults(method: str) -> dict[str, object]:
    """The constructor's keyword defaults; for a constructor taking `**overrides`, also those
    of the ViT config (where every built-in model sends them)."""
    from vprkit.models.registry import _REGISTRY
    from vprkit.models.vit import ViTConfig

    parameters = inspect.signature(_REGISTRY[method]).parameters.values()
    defaults = {
        p.name: p.default
        for p in parameters
        if p.default is not inspect.Parameter.empty and p.kind != p.VAR_KEYWORD
    }
    if any(p.kind == p.VAR_KEYWORD for p in parameters):
        vit = {f.name: f.default for f in dataclasses.fields(ViTConfig)}
        defaults = {**vit, **defaults}
    return defaults


def _fits(value: object, default: object) -> bool:
    if isinstance(default, bool):
        return isinstance(value, bool)
    if isinstance(default, int):
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(default, float):
        return isinstance(value, int | float) and not isinstance(value, bool)
    if isinstance(default, tuple):
        return isinstance(value, int | tuple | list)  # img_size=224 or (H, W)
    return isinstance(value, type(default))


def _describe_options(options: dict) -> str:
    return " ".join(f"{k}={v!r}" for k, v in options.items())


def _meta_model(method: str, options: dict) -> nn.Module:
    """The model built on the meta device (no memory, no init cost): checks the options."""
    try:
        with torch.device("meta"):
            return create_model(method, **options)
    except (TypeError, ValueError) as err:
        if not options:
            raise  # the constructor fails without options: a bug
        known = ""
        if "unexpected keyword" in str(err):  # Python's own message lists nothing
            known = f"; known options: {', '.join(sorted(_option_defaults(method)))}"
        raise UsageError(
            f"argument --model_option: {_describe_options(options)}: cannot build a {method}: "
            f"{err}{known}"
        ) from err


def patch_size(model: nn.Module) -> int | None:
    """The ViT patch size inside `model`, None for a model without one."""
    for module in model.modules():
        size = getattr(getattr(module, "cfg", None), "patch_size", None)
        if isinstance(size, int):
            return size
    return None


def check_image_size(model: nn.Module, image_size: list[int] | None) -> None:
    """`--image_size` values must be multiples of the model's patch size."""
    patch = patch_size(model)
    if image_size is None or patch is None:
        return
    for value in image_size:
        if value % patch:
            low = max(patch, value // patch * patch)
            near = f"{low} or {low + patch}"
            raise UsageError(
                f"argument --image_size: {value} is not a multiple of "
                f"{getattr(model, 'vprkit_name', 'the model')}'s patch size {patch}; use {near}"
            )


def default_weights(method: str, options: dict, meta: nn.Module) -> str | None:
    """The weights used without `--weights`: the method's official file when it fits the
    architecture the options make; None for a model without parameters; refused otherwise
    (never a silent random initialization)."""
    if not meta.state_dict():
        return None  # nothing to load: a parameter-free model (e.g. raw pixels)
    official = model_info(method).weights
    if not official:
        raise VprkitError(
            f"{method} has no official weights: pass --weights FILE, or --weights random for "
            "a random initialization"
        )
    if options:
        reference = _meta_model(method, {})
        shapes = {k: tuple(v.shape) for k, v in meta.state_dict().items()}
        if shapes != {k: tuple(v.shape) for k, v in reference.state_dict().items()}:
            raise VprkitError(
                f"--model_option {_describe_options(options)} changes {method}'s architecture, "
                f"so its official weights ({official[0]}) cannot fit: pass --weights FILE, or "
                "--weights random for a random initialization"
            )
    return official[0]


def check_model(args: argparse.Namespace) -> None:
    """`--method`, `--model_option`, `--image_size` and the default weights checked without
    building the model or reading a file: before the dataset is read. With `--onnx FILE`, the
    file's metadata is read and fills `--method` and `--weights` in."""
    if uses_onnx(args):
        check_onnx_arguments(args)
        return
    if args.method is None:
        raise UsageError("the following arguments are required: --method (or --onnx FILE)")
    options = model_options(args.method, args.model_option)
    meta = _meta_model(args.method, options)
    meta.vprkit_name = args.method
    check_image_size(meta, getattr(args, "image_size", None))
    if args.weights is None:
        default_weights(args.method, options, meta)


def build_model_from_args(args: argparse.Namespace) -> tuple[nn.Module, str | None]:
    """`build_model` from the model and run flags (`add_model_arguments`, `--compile`)."""
    return build_model(
        args.method,
        args.weights,
        args.model_option,
        seed=args.seed,
        image_size=args.image_size,
        compile=args.compile,
    )


def build_model(
    method: str,
    weights: str | None,
    options: list[tuple[str, object]],
    *,
    seed: int = 0,
    image_size: list[int] | None = None,
    compile: bool = False,
) -> tuple[nn.Module, str | None]:
    """The model the flags ask for, and how its weights are named ("random", a file or an
    official name; None for a parameter-free model). Options, input size and weights are
    checked before the model is built; `seed` is set just before, so that a random
    initialization is reproducible (`--seed 0` is `torch.manual_seed(0)`).

    `weights` naming an exported `.onnx` file gives its `vprkit.export.runtime.OnnxModel`
    (run by ONNX Runtime), after checking `method`, `options` and `image_size` against it.
    `compile`: the forward through torch.compile (`vprkit.models.compiled`)."""
    from vprkit.export.runtime import is_onnx_file

    if is_onnx_file(weights):
        if compile:
            raise VprkitError(
                f"argument --compile: {weights} runs in ONNX Runtime, which torch.compile "
                "does not apply to: leave --compile out"
            )
        return _onnx_model(method, Path(weights).expanduser(), options, image_size), weights
    options = model_options(method, options)
    meta = _meta_model(method, options)
    meta.vprkit_name = method
    check_image_size(meta, image_size)
    if weights is None:
        weights = default_weights(method, options, meta)
    source = None
    if weights is not None and weights != RANDOM:
        from vprkit.hub import resolve_weights

        source = resolve_weights(weights)  # downloads, or says where to put the file
    torch.manual_seed(seed)
    model = create_model(method, weights=source, **options)
    if weights == RANDOM:
        model.vprkit_seed = seed  # recorded with features: the same model can be rebuilt
        print(
            f"vprkit: warning: --weights random: {method} is randomly initialized (seed "
            f"{seed}); its figures are those of an untrained network"
        )  # stdout, with the run's log: stderr is for the one line of a failure
    if compile:
        from vprkit.models.compiled import compile_forward

        compile_forward(model)
    return model, weights


def _onnx_model(
    method: str | None, path: Path, options: list, image_size: list[int] | None
) -> nn.Module:
    from vprkit.export.runtime import load_onnx_model

    model = load_onnx_model(path)
    meta = model.metadata
    if method is not None and method != meta.get("method"):
        raise UsageError(
            f"argument --method: {path} was exported from {meta.get('method')}, not {method}"
        )
    _check_onnx_options(meta.get("method"), options, meta, path)
    check_onnx_image_size(meta, image_size, path)
    return model


def make_preprocess(model: torch.nn.Module, image_size: list[int] | None) -> Preprocess:
    """The preprocessing `--image_size` asks for, else the model's evaluation size."""
    size = size_option(image_size)
    return Preprocess(image_size=model_info(model).image_size if size is None else size)


# --------------------------------------------------------------------------- the dataset


def read_dataset(args: argparse.Namespace) -> PlaceDataset:
    """The dataset the flags name: `--dataset_folder` in any registered layout
    (`vprkit.data.formats`), or `--database_folder` with `--queries_folder`."""
    if args.no_labels and args.ground_truth:
        raise UsageError("argument --no_labels: --no_labels and --ground_truth exclude each other")
    if args.dataset_folder is not None:
        if args.database_folder or args.queries_folder:
            raise UsageError(
                "argument --dataset_folder: give either --dataset_folder or "
                "--database_folder and --queries_folder, not both"
            )
        options = dict(
            split=args.split,
            no_labels=args.no_labels,
            msls_split=args.msls_split,
            msls_cities=args.msls_cities,
            msls_subtask=args.msls_subtask,
            msls_val_split=args.msls_val_split,
            positive_dist_threshold=args.positive_dist_threshold,
        )
        if args.ground_truth is not None:
            options["ground_truth"] = args.ground_truth
        return open_dataset(args.dataset_folder, **options)
    if not (args.database_folder and args.queries_folder):
        raise UsageError(
            "argument --dataset_folder: give --dataset_folder, or both --database_folder and "
            "--queries_folder"
        )
    for flag, folder in (
        ("--database_folder", args.database_folder),
        ("--queries_folder", args.queries_folder),
    ):
        if (folder / "query").is_dir() and (folder / "ref").is_dir():
            raise UsageError(
                f"argument {flag}: {folder} is a VPR-Bench dataset (query/, ref/): give it as "
                f"--dataset_folder {folder}, or its ref/ and query/ folders with --ground_truth"
            )
    return read_folders(
        args.database_folder, args.queries_folder, args.ground_truth, no_labels=args.no_labels
    )


def add_index_arguments(group) -> None:
    """`--index`, `--rescore`, `--index_params` (map build and eval)."""
    from vprkit.retrieval.indexes import DEFAULT_RESCORE

    group.add_argument(
        "--index",
        default="flat",
        help="flat (exact, the default), ivfpq, hnsw, auto (flat while N <= 1,000,000 and it "
        "fits in a quarter of the available memory, else ivfpq), or a FAISS index-factory "
        "string such as PCA512,IVF4096,PQ64 or HNSW32",
    )
    group.add_argument(
        "--rescore",
        type=non_negative_int,
        default=DEFAULT_RESCORE,
        help="with a compressed --index: re-score this many candidates per query exactly "
        "from the full descriptors (at least k; 0: the index's own order)",
    )
    group.add_argument(
        "--index_params",
        "--index-params",
        help="FAISS search parameters of a compressed --index, e.g. nprobe=32 or efSearch=128 "
        "(default: nprobe=16, efSearch=64)",
    )
    group.add_argument(
        "--index_seed",
        "--index-seed",
        type=non_negative_int,
        default=0,
        help="seed of the training sample of a compressed --index",
    )
