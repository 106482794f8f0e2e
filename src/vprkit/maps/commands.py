"""`vprkit map build | add | info | verify` and `vprkit localize`: your own geotagged photos
as a map, and where other photos were taken on it.

    vprkit map build photos/ --method cricavpr --out my.map
    vprkit localize --map my.map frames/ --out runs/localize
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from pathlib import Path

from vprkit.cli_args import (
    add_device_arguments,
    add_extraction_arguments,
    add_index_arguments,
    add_keep_local_argument,
    add_local_fp16_argument,
    add_model_arguments,
    add_ray_argument,
    check_model,
    device,
    existing_file,
    non_negative_int,
    positive_float,
    positive_int,
    weights_option,
)
from vprkit.errors import UsageError, VprkitError

# --------------------------------------------------------------------------- vprkit map


def add_map_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="map_command", required=True, metavar="COMMAND")
    fmt = parser.formatter_class
    build = sub.add_parser(
        "build", help="build a map from a folder of geotagged photos", formatter_class=fmt
    )
    build.add_argument("photos", type=Path, help="folder of photos (searched recursively)")
    build.add_argument("--out", type=Path, required=True, help="the map folder to make")
    add_model_arguments(build)
    _add_position_arguments(build)
    run = add_extraction_arguments(build)
    add_keep_local_argument(run)
    add_local_fp16_argument(run)
    run.add_argument(
        "--chunk_size",
        "--chunk-size",
        type=positive_int,
        default=1024,
        help="photos per chunk: a killed build resumes at the first unfinished chunk "
        "(rounded up to whole batches); with --ray, a chunk is one worker's shard",
    )
    add_index_arguments(build.add_argument_group("index"))
    add_ray_argument(run)

    add = sub.add_parser("add", help="add photos to a map (its own model)", formatter_class=fmt)
    add.add_argument("map", type=Path, help="the map folder")
    add.add_argument(
        "photos", type=Path, nargs="+", help="photos or folders under the map's photos root"
    )
    add.add_argument(
        "--weights", type=weights_option, help="where the map's weights file is now, if it moved"
    )
    _add_position_arguments(add)
    run = add.add_argument_group("run")
    add_device_arguments(run)

    info = sub.add_parser("info", help="what a map holds and what made it", formatter_class=fmt)
    info.add_argument("map", type=Path, help="the map folder")
    info.add_argument("--json", action="store_true", help="print it as JSON")

    verify = sub.add_parser(
        "verify",
        help="check every file of a map against the sha256 it records (exit 1 on a problem)",
        formatter_class=fmt,
    )
    verify.add_argument("map", type=Path, help="the map folder")
    verify.add_argument("--photos", action="store_true", help="also check each photo file's sha256")


def _add_position_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("positions")
    group.add_argument(
        "--positions",
        type=existing_file,
        help="CSV table path,latitude,longitude[,heading,altitude,time] (paths relative to the "
        "photos folder); preferred over the photos' EXIF GPS and VG @east@north@ names",
    )
    group.add_argument(
        "--require_positions",
        "--require-positions",
        action="store_true",
        help="refuse the build if any photo has no usable position (default: list the photo "
        "and leave it out)",
    )


def run_map(args: argparse.Namespace) -> int:
    return {"build": _build, "add": _add, "info": _info, "verify": _verify}[args.map_command](args)


def _build(args: argparse.Namespace) -> int:
    from vprkit.maps.build import build_map, format_summary

    check_model(args)
    if not args.photos.is_dir():
        raise VprkitError(f"photos folder {args.photos} does not exist or is not a folder")
    _, summary = build_map(
        args.photos,
        args.out,
        method=args.method,
        weights=args.weights,
        model_options=dict(args.model_option),
        positions=args.positions,
        require_positions=args.require_positions,
        image_size=args.image_size,
        batch_size=args.infer_batch_size,
        precision=args.precision,
        local=args.local,
        local_dtype="float16" if args.local_features_fp16 else "float32",
        chunk_size=args.chunk_size,
        device=args.device,
        num_workers=args.num_workers,
        seed=args.seed,
        index=args.index,
        rescore=args.rescore,
        index_params=args.index_params,
        index_seed=args.index_seed,
        ray=args.ray,
        compile=args.compile,
    )
    print(format_summary(summary))
    return 0


def _add(args: argparse.Namespace) -> int:
    from vprkit.maps.build import add_to_map, format_summary

    _, summary = add_to_map(
        args.map,
        args.photos,
        positions=args.positions,
        require_positions=args.require_positions,
        weights=args.weights,
        device=args.device,
        num_workers=args.num_workers,
        compile=args.compile,
    )
    print(format_summary(summary))
    return 0


def _info(args: argparse.Namespace) -> int:
    from vprkit.maps.folder import Map

    info = Map.open(args.map).info()
    if args.json:
        print(json.dumps(info, indent=1))
        return 0
    east, north = info["extent_m"]
    weights = info["weights"]
    print(
        "\n".join(
            [
                f"map {info['folder']} (format {info['format']} version {info['version']}, "
                f"generation {info['generation']})",
                f"  photos: {info['count']} ({info['excluded']} left out), "
                f"root {info['photos_root']}",
                f"  method: {info['method']} {info['model_options'] or ''}".rstrip(),
                f"  weights: {weights['name']} (state sha256 {weights['state_sha256'][:16]})",
                f"  descriptors: {info['descriptor_dim']}-D, {info['precision']}, "
                f"input {info['preprocess']['image_size']}"
                + (", local features kept" if info["has_local"] else ""),
                f"  batches: {info['batch_rule']}",
                f"  index: {_index_info(info['index'])}",
                f"  centre: {info['center']['latitude']:.6f}, {info['center']['longitude']:.6f}"
                f" (UTM {info['utm_zone']['number']}{info['utm_zone']['hemisphere']}); "
                f"extent {east:.0f} m x {north:.0f} m",
                f"  size on disk: {info['size_bytes'] / 2**20:.1f} MiB; made {info['created']}, "
                f"changed {info['updated']}, vprkit {info['vprkit_version']}",
            ]
        )
    )
    return 0


def _index_info(entry: dict) -> str:
    if entry.get("factory") is None:
        return "exact flat (IndexFlatL2)" + (f" [{entry['reason']}]" if entry.get("reason") else "")
    train = entry.get("train", {})
    return (
        f"{entry['factory']} ({entry.get('params') or 'default parameters'}), spec "
        f"{entry['spec']!r}, trained on {train.get('size')} of {train.get('photos')} photos "
        f"(seed {train.get('seed')}), {entry.get('bytes_per_photo')} bytes per photo, top "
        f"{entry.get('rescore')} re-scored exactly"
    )


def _verify(args: argparse.Namespace) -> int:
    from vprkit.maps.folder import Map

    m = Map.open(args.map)
    problems = m.verify(photos=args.photos)
    for p in problems:
        print(f"problem: {p}")
    checked = "file and photo" if args.photos else "file"
    if problems:
        print(f"{args.map}: {len(problems)} problems")
        return 1
    print(f"{args.map}: ok ({m.count} photos; every {checked} as map.json records it)")
    return 0


# --------------------------------------------------------------------------- vprkit localize


def add_localize_arguments(parser: argparse.ArgumentParser) -> None:
    from vprkit.maps.estimate import DEFAULT_RADIUS_M, DEFAULT_TEMPERATURE
    from vprkit.maps.report import DEFAULT_CORRECT_M

    parser.add_argument(
        "queries", type=Path, nargs="+", help="photos or folders of photos to localize"
    )
    parser.add_argument("--map", type=Path, required=True, help="the map folder (vprkit map build)")
    parser.add_argument("--out", type=Path, help="run folder; default: runs/localize/<time>")
    parser.add_argument(
        "--top_k", "--top-k", type=positive_int, default=10, help="matches per query"
    )
    parser.add_argument(
        "--rerank", action="store_true", help="re-rank with the method's own re-ranker"
    )
    parser.add_argument(
        "--burst",
        action="store_true",
        help="encode the queries together, in batches of the map's batch size (CricaVPR couples "
        "the images of a batch); default: each query alone",
    )
    parser.add_argument(
        "--positions",
        type=existing_file,
        help="CSV table of the queries' true positions (path relative to the first query folder); "
        "else their EXIF GPS or VG names, when they have them: errors in metres are reported",
    )
    parser.add_argument(
        "--method", help="check that the map was made by this method (its own is always used)"
    )
    parser.add_argument(
        "--weights", type=weights_option, help="where the map's weights file is now, if it moved"
    )
    parser.add_argument(
        "--photos_root",
        "--photos-root",
        type=Path,
        help="where the map's photos are now, if they moved",
    )
    group = parser.add_argument_group("estimate")
    group.add_argument(
        "--radius_m", type=positive_float, default=DEFAULT_RADIUS_M, help="matches this close agree"
    )
    group.add_argument(
        "--temperature",
        type=positive_float,
        default=DEFAULT_TEMPERATURE,
        help="weight of a match: exp((similarity - best similarity) / temperature)",
    )
    group.add_argument(
        "--correct_m",
        type=positive_float,
        default=DEFAULT_CORRECT_M,
        help="an estimate this close is correct",
    )
    group.add_argument(
        "--pictures", type=non_negative_int, default=5, help="matches per query picture (0: none)"
    )
    group.add_argument("--device", type=device, default="cpu", help="cpu, cuda or cuda:N")


def _query_files(entries: list[Path]) -> tuple[list[Path], Path]:
    """The query photos, and the folder their names are relative to."""
    from vprkit.data.datasets import read_images_paths

    files: list[Path] = []
    for entry in entries:
        if entry.is_dir():
            files += read_images_paths(entry)
        elif entry.is_file():
            files.append(entry.absolute())
        else:
            raise VprkitError(f"query {entry} does not exist")
    root = entries[0].absolute() if entries[0].is_dir() else entries[0].absolute().parent
    if len(entries) > 1:
        root = Path(os.path.commonpath([str(f.parent) for f in files]))
    return files, root


def _query_truth(files: list[Path], root: Path, table: Path | None):
    from vprkit.maps.positions import collect_positions

    positions, _ = collect_positions(files, root, table)
    return [positions.get(Path(os.path.relpath(f, root)).as_posix()) for f in files]


def run_localize(args: argparse.Namespace) -> int:
    from datetime import datetime

    from vprkit.maps.folder import Map
    from vprkit.maps.report import format_errors, format_table, write_run

    out = args.out or Path("runs", "localize", datetime.now().strftime("%Y-%m-%d_%H-%M-%S"))
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise VprkitError(f"{out} exists and is not empty; choose another --out")
    m = Map.open(args.map, photos_root=args.photos_root)
    if args.method is not None and args.method != m.method:
        raise UsageError(
            f"argument --method: {args.map} was made by {m.method}, not {args.method}; "
            "localize with the map's own method (drop --method), or build a map with "
            f"{args.method}"
        )
    files, root = _query_files(args.queries)
    truth = _query_truth(files, root, args.positions)
    localizer = m.localizer(device=args.device, weights=args.weights)
    names = [Path(os.path.relpath(f, root)).as_posix() for f in files]
    results = localizer.localize(
        files,
        names=names,
        top_k=args.top_k,
        rerank=args.rerank,
        burst=args.burst,
        radius_m=args.radius_m,
        temperature=args.temperature,
    )
    staging = out.with_name(out.name + ".incomplete")
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    config = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k != "func"}
    config["queries"] = [str(q) for q in args.queries]
    summary = write_run(
        staging,
        m,
        results,
        files,
        truth,
        pictures=args.pictures,
        correct_m=args.correct_m,
        config=config,
    )
    if out.is_dir():
        out.rmdir()
    os.replace(staging, out)
    from vprkit.maps.report import errors_m

    est, _ = errors_m(results, truth)
    print(format_table(results, est if summary["errors"] else None))
    if summary["errors"]:
        print(format_errors(summary["errors"]))
    print(f"results: {out}/ (localizations.csv, .json, .geojson, map.html, pictures/)")
    return 0


COMMANDS = {
    "map": (add_map_arguments, run_map),
    "localize": (add_localize_arguments, run_localize),
}
