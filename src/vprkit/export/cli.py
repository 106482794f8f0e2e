"""`vprkit export`: a registered model as an ONNX graph (run it back in vprkit with
`--backend onnxruntime --onnx FILE`) or a traced TorchScript file.

    vprkit export --method cricavpr --weights cricavpr --format onnx --image_size 224 224 \\
        --out cricavpr_224.onnx

R2Former also gets its re-ranking transformer as a second graph beside the model,
`<out stem>.rerank.onnx` (the model's file names it). The export is checked before the file is
written: ONNX Runtime's (or the traced module's) outputs must equal PyTorch's within
`--atol` on the export's images (`--verify_images FOLDER`: real photos; default random
ones) at several batch sizes.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from vprkit.cli_args import (
    add_model_arguments,
    build_model,
    check_model,
    existing_dir,
    output_file,
    positive_float,
    positive_int,
)
from vprkit.errors import UsageError, VprkitError

FORMATS = ("onnx", "torchscript")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser, backends=False)
    out = parser.add_argument_group("export")
    out.add_argument("--format", choices=FORMATS, default="onnx", help="the file to write")
    out.add_argument(
        "--image_size",
        "--image-size",
        type=positive_int,
        nargs=2,
        metavar=("H", "W"),
        help="the input size the file is made for (it refuses others); default: the "
        "method's evaluation size (vprkit models)",
    )
    out.add_argument("--out", type=output_file, required=True, help="the file to write")
    out.add_argument(
        "--no_local",
        "--no-local",
        action="store_true",
        help="only the global descriptor (SelaVPR's local maps and R2Former's tokens and "
        "re-ranker are left out)",
    )
    out.add_argument(
        "--verify_images",
        "--verify-images",
        type=existing_dir,
        help="check the export on these photos (the first 2 of the folder, preprocessed as "
        "for evaluation); default: random images",
    )
    out.add_argument(
        "--atol",
        type=positive_float,
        default=1e-4,
        help="largest difference from PyTorch's outputs accepted",
    )
    out.add_argument(
        "--opset", type=positive_int, default=17, help="ONNX opset version (--format onnx)"
    )


def sample_images(folder: Path, image_size: tuple[int, int], count: int = 2) -> torch.Tensor:
    """The first `count` images of `folder` (sorted, recursively), as evaluation
    preprocesses them at `image_size`."""
    from vprkit.data.datasets import read_images_paths
    from vprkit.data.images import Preprocess, load_image

    paths = sorted(read_images_paths(folder))[:count]
    if len(paths) < count:
        raise VprkitError(f"--verify_images {folder}: needs at least {count} images")
    preprocess = Preprocess(image_size=tuple(image_size))
    return torch.stack([preprocess(load_image(p)) for p in paths])


def run(args: argparse.Namespace) -> int:
    from vprkit.export.onnx import export_onnx, export_r2former_reranker, reranker_path
    from vprkit.models.registry import model_info

    check_model(args)
    hw = tuple(args.image_size or model_info(args.method).image_size)
    if args.format == "onnx":
        from vprkit.export import require

        require("onnx"), require("onnxruntime")  # before the model is built
    model, weights = build_model(
        args.method, args.weights, args.model_option, seed=args.seed, image_size=list(hw)
    )
    sample = None if args.verify_images is None else sample_images(args.verify_images, hw)
    common = dict(weights=weights, local=not args.no_local, sample=sample, atol=args.atol)
    if args.out.suffix.lower() == ".onnx" and args.format != "onnx":
        raise UsageError(f"argument --out: {args.out} is an .onnx name for --format {args.format}")
    if args.format == "torchscript":
        from vprkit.export.torchscript import export_torchscript

        meta = export_torchscript(model, args.out, hw, **common)
    else:
        rerank_out = None
        if hasattr(model, "Reranker") and not args.no_local:  # R2Former's re-ranker graph
            rerank_out = reranker_path(args.out)
            rr = export_r2former_reranker(
                model,
                rerank_out,
                weights=weights,
                image_size=hw,
                opset=args.opset,
                atol=args.atol,
            )
            print(
                f"wrote {rerank_out}: the re-ranking transformer (pairs of global descriptors "
                f"and {rr['num_tokens']} tokens -> same-place probability), max |onnx - torch| "
                f"{rr['verified_max_abs_diff']:.2g}"
            )
        meta = export_onnx(
            model,
            args.out,
            hw,
            opset=args.opset,
            reranker=None if rerank_out is None else rerank_out.name,
            **common,
        )
    coupled = (
        "; the images of a batch shape each other's outputs, as in PyTorch (batch-coupled)"
        if meta["batch_coupled"]
        else ""
    )
    print(
        f"wrote {args.out}: {args.method} at {hw[0]}x{hw[1]}, outputs {', '.join(meta['outputs'])}"
        f", any batch size{coupled}; max |{args.format} - torch| "
        f"{meta['verified_max_abs_diff']:.2g}"
    )
    return 0
