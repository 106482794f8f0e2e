"""Build a map from geotagged photos, and add photos to it, on the pipeline's extract stage.

Photos take their position from a table, their EXIF GPS or a VG name
(`vprkit.maps.positions`); those without one are listed with the reason and left out. The
descriptors are extracted in chunks of consecutive photos, each a features folder written
whole or not at all, so a killed build run again continues at the first unfinished chunk and
ends with the map an uninterrupted build gives. The map folder appears only when complete
(it is written as ``<map>.incomplete/`` and renamed).

Batches: photos are encoded in map order in batches of the map's batch size, a chunk being a
whole number of batches, exactly as `vprkit.pipeline.extract` batches one image list. This
matters for models whose descriptors depend on the batch (CricaVPR's cross-image encoder):
`map add` encodes the new photos among themselves in the same way and never recomputes
descriptors already in the map, so a map built in two steps can differ from one built at
once in the batches around the step (the last batch of the first step holds only its own
photos).
"""

from __future__ import annotations

import json
import os
import shutil
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
from torch import nn
from tqdm import tqdm

import vprkit
from vprkit.data.datasets import read_images_paths
from vprkit.data.images import Preprocess
from vprkit.errors import MissingInputError, StageMismatchError, VprkitError
from vprkit.maps.folder import (
    ChunkedGlobal,
    Map,
    MapPhoto,
    chunk_folder,
    is_map_folder,
    write_generation,
)
from vprkit.maps.positions import Position, UtmZone, collect_positions, project, utm_zone
from vprkit.models.compiled import check_not_with_ray, compile_forward
from vprkit.models.registry import model_info
from vprkit.pipeline import fingerprint as fp
from vprkit.pipeline.extract import extract, vars_of
from vprkit.pipeline.features import Features
from vprkit.retrieval.search import flat_index

DEFAULT_CHUNK_SIZE = 1024
BUILD_SETTINGS = "build.json"


def _now() -> str:
    return datetime.now(timezone.utc).replace(microsecond=0).isoformat()


def list_photos(photos: str | os.PathLike | list, root: Path) -> list[Path]:
    """A folder's images (recursively, sorted), or the given files."""
    if isinstance(photos, str | os.PathLike):
        photos = [photos]
    out: list[Path] = []
    for p in map(Path, photos):
        p = p if p.is_absolute() else Path.cwd() / p
        if p.is_dir():
            out += read_images_paths(p)
        elif p.is_file():
            out.append(p)
        else:
            raise MissingInputError(f"photos {p} do not exist")
    return out


def _positions(paths: list[Path], root: Path, table, require: bool):
    positions, excluded = collect_positions(paths, root, table)
    if require and excluded:
        path, reason = next(iter(sorted(excluded.items())))
        raise VprkitError(
            f"{len(excluded)} of {len(paths)} photos have no usable position (first: {path}: "
            f"{reason}); give their positions with --positions CSV, or drop --require_positions "
            "to leave them out"
        )
    return positions, excluded


def _settings(model: nn.Module, preprocess: Preprocess, options: dict) -> dict:
    """What the map's descriptors depend on (a resumed build must use the same)."""
    return {
        "model": fp.model_fingerprint(model),
        "preprocess": json.loads(json.dumps(vars_of(preprocess))),
        **options,
    }


def _batch_rule(batch_size: int, chunk_size: int) -> str:
    return (
        f"photos are encoded in map order in batches of {batch_size}, each chunk of "
        f"{chunk_size} photos starting a new batch; photos added later are batched among "
        f"themselves the same way; queries are encoded one at a time, or a burst in batches "
        f"of {batch_size}"
    )


def _extract_chunk(model, paths, folder: Path, root: Path, listed: bool, label: str, **kw):
    """One chunk's features folder: reused when complete and the same, else (re)computed.
    A chunk that no map lists yet (a killed run's) but was made from other photos is stale:
    it is replaced."""
    try:
        return extract(model, paths, folder, root=root, label=label, **kw)
    except StageMismatchError:
        if listed:
            raise
        shutil.rmtree(folder)
        return extract(model, paths, folder, root=root, label=label, **kw)


def _extract_chunks(
    model,
    paths: list[Path],
    folder: Path,
    first_chunk: int,
    root: Path,
    chunk_size: int,
    ray: str | None = None,
    **kw,
) -> list[Features]:
    bounds = list(range(0, len(paths), chunk_size))
    if ray is not None:  # each chunk a shard of a Ray job (vprkit.distributed.ray_extract)
        from vprkit.distributed.ray_extract import extract_chunks

        return extract_chunks(model, paths, folder, first_chunk, root, chunk_size, ray, **kw)
    chunks = []
    with tqdm(total=len(paths), desc="map: photos", unit="img") as bar:
        for i, start in enumerate(bounds):
            part = paths[start : start + chunk_size]
            label = f"chunk {i + 1} of {len(bounds)}"
            chunks.append(
                _extract_chunk(
                    model, part, folder / chunk_folder(first_chunk + i), root, False, label, **kw
                )
            )
            bar.update(len(part))
    return chunks


def _chunk_entry(features: Features, folder: Path) -> dict:
    return {
        "folder": features.folder.relative_to(folder).as_posix(),
        "count": len(features),
        "sha256": {
            f.name: fp.file_sha256(f) for f in sorted(features.folder.iterdir()) if f.is_file()
        },
    }


def _map_photos(
    keys: list[str], positions: dict[str, Position], root: Path, first_id: int, zone: UtmZone
) -> list[MapPhoto]:
    east, north = project(
        [positions[k].latitude for k in keys], [positions[k].longitude for k in keys], zone
    )
    photos = []
    for i, key in enumerate(keys):
        p = positions[key]
        photos.append(
            MapPhoto(
                id=first_id + i,
                path=key,
                latitude=p.latitude,
                longitude=p.longitude,
                east=float(east[i]),
                north=float(north[i]),
                heading=p.heading,
                altitude=p.altitude,
                time=p.time,
                source=p.source,
                sha256=fp.file_sha256(root / key),
            )
        )
    return photos


def _model_for(
    method: str | None,
    weights: str | None,
    model_options: dict | None,
    model: nn.Module | None,
    seed: int,
    image_size,
) -> tuple[nn.Module, str | None]:
    if model is not None:
        return model, weights
    if method is None:
        raise VprkitError("give the method (--method) or a model")
    from vprkit.cli_args import build_model

    return build_model(
        method, weights, list((model_options or {}).items()), seed=seed, image_size=image_size
    )


def build_map(
    photos: str | os.PathLike,
    out: str | os.PathLike,
    *,
    method: str | None = None,
    weights: str | None = None,
    model_options: dict | None = None,
    model: nn.Module | None = None,
    positions: str | os.PathLike | None = None,
    require_positions: bool = False,
    image_size: list[int] | None = None,
    batch_size: int | None = None,
    precision: str = "fp32",
    local: bool | None = None,
    local_dtype: str = "float32",
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    device: str = "cpu",
    num_workers: int = 0,
    seed: int = 0,
    index: str | None = "flat",
    rescore: int | None = None,
    index_params: str | None = None,
    index_seed: int = 0,
    ray: str | None = None,
    compile: bool = False,
) -> tuple[Map, dict]:
    """Build a map of the photos in the folder `photos` into the folder `out`; returns the
    opened map and a summary (photos in, mapped, left out and why, extent, size).

    The model: `method` with `weights` ("random", an official name or a file) and
    `model_options`, or a `model` built by the caller (then `weights` only names it).
    `positions`: a CSV table (path relative to `photos`, latitude, longitude, optional
    heading, altitude, time), preferred over EXIF GPS and VG names. `local`: keep local
    features for re-ranking (default: when the method has a re-ranker of its own).
    `index`: ``flat`` (exact, the default), ``ivfpq``, ``hnsw``, ``auto`` or a FAISS
    index-factory string (`vprkit.retrieval.indexes`), trained on a sample drawn with
    `index_seed`; `rescore`: candidates re-scored exactly per query (default 100);
    `index_params`: FAISS search parameters (``nprobe=16``, ``efSearch=64``).
    `compile`: the model's forward through torch.compile (`vprkit.models.compiled`; not with
    `ray`, whose workers build their own models).
    `ray`: "auto" or a Ray address: the chunks are extracted as a Ray job, one model per
    worker (`vprkit.distributed.ray_extract`); the map is the same.
    """
    check_not_with_ray(compile, ray)  # before anything is read
    from vprkit.retrieval.indexes import DEFAULT_RESCORE

    if rescore is not None and rescore < 0:
        raise VprkitError(f"--rescore must be 0 (off) or more, got {rescore}")
    root = Path(photos).absolute()
    out = Path(out)
    if is_map_folder(out):
        raise VprkitError(
            f"{out} is already a map: add photos with vprkit map add, or choose another --out"
        )
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise VprkitError(f"{out} exists and is not an empty folder; choose another --out")
    if not root.is_dir():
        raise MissingInputError(f"photos folder {root} does not exist")
    paths = list_photos(root, root)
    known, excluded = _positions(paths, root, positions, require_positions)
    keys = sorted(known)
    if not keys:
        raise VprkitError(
            f"none of the {len(paths)} photos in {root} has a usable position (e.g. "
            f"{next(iter(excluded.items()), ('', ''))[0]}: {next(iter(excluded.values()), '')}); "
            "give a positions table with --positions CSV"
        )
    from vprkit.retrieval.indexes import check_spec_size

    check_spec_size(index, len(keys))  # before any photo is encoded
    model, weights = _model_for(method, weights, model_options, model, seed, image_size)
    if compile:
        compile_forward(model)
    info = model_info(model)
    from vprkit.cli_args import make_preprocess

    preprocess = make_preprocess(model, image_size)
    batch_size = int(batch_size or info.infer_batch_size)
    chunk_size = -(-int(chunk_size) // batch_size) * batch_size  # whole batches
    local = info.reranker is not None if local is None else bool(local)
    options = {
        "batch_size": batch_size,
        "precision": precision,
        "local": {"dtype": local_dtype} if local else None,
        "chunk_size": chunk_size,
        "photos_root": str(root),
    }
    settings = _settings(model, preprocess, options)
    staging = out.with_name(out.name + ".incomplete")
    staging.mkdir(parents=True, exist_ok=True)
    _check_resume(staging, settings)

    chunks = _extract_chunks(
        model,
        [root / k for k in keys],
        staging,
        0,
        root,
        chunk_size,
        ray,
        preprocess=preprocess,
        local=local,
        local_dtype=local_dtype,
        batch_size=batch_size,
        num_workers=num_workers,
        device=device,
        precision=precision,
        weights=weights,
    )
    # One zone for the whole map, that of its median position: true distances across a border.
    zone = utm_zone(
        float(np.median([known[k].latitude for k in keys])),
        float(np.median([known[k].longitude for k in keys])),
    )
    mapped = _map_photos(keys, known, root, 0, zone)
    meta = new_map_meta(settings, chunks, staging, zone)
    built = _map_index(chunks, index, index_params, index_seed)
    if built is None:  # the exact flat index, as always
        descriptors = np.concatenate([np.asarray(c.global_desc) for c in chunks])
        faiss_index = flat_index(descriptors)
        del descriptors
    else:
        faiss_index = built.index
        meta["index"] = _index_entry(built, DEFAULT_RESCORE if rescore is None else rescore)
    write_generation(staging, meta, mapped, excluded, faiss_index)
    (staging / BUILD_SETTINGS).unlink()
    if out.is_dir():
        out.rmdir()  # an empty folder the user made for us
    os.replace(staging, out)
    made = Map.open(out)
    result = summary(made, len(paths), len(mapped), excluded)
    result["index"] = _index_line(made, built)
    return made, result


def _map_index(chunks: list[Features], spec, params, seed: int):
    """The map's compressed index (`BuiltIndex`), or None for the exact flat index."""
    from vprkit.retrieval.indexes import build_index, parse_index

    rows = ChunkedGlobal(chunks)
    choice = parse_index(spec, len(rows), rows.shape[1], params)
    if choice.flat and choice.spec == "flat":
        return None
    return build_index(rows, choice, seed=seed)  # auto may choose flat: its reason is kept


def _index_entry(built, rescore: int) -> dict:
    return {
        **built.choice.to_json(),
        "rescore": int(rescore),
        "train": built.train,
        "build_s": round(built.build_s, 3),
        "bytes_per_photo": round(built.bytes_per_photo, 1),
    }


def _index_line(m: Map, built) -> str:
    choice, rescore = m.index_choice()
    if built is None:
        return (
            "exact flat (IndexFlatL2)"
            + (f" [{m.meta['index']['reason']}]" if m.meta.get("index") else "")
            + f"; {4 * m.meta['descriptor_dim']} bytes per photo"
        )
    text = built.summary().removeprefix("index ")  # printed after "index: "
    if choice.flat:
        return text
    return text + (
        f"; top {rescore} re-scored exactly from the descriptors" if rescore else "; no re-scoring"
    )


def new_map_meta(settings: dict, chunks: list[Features], folder: Path, zone: UtmZone) -> dict:
    """`map.json`'s content for a first generation made of `chunks` (features folders under
    `folder`) with `settings` (`_settings`: model, preprocessing, batch size, precision,
    local features, chunk size, photos root); `write_generation` adds the files' names."""
    now = _now()
    local = settings["local"]
    meta = {
        "format": "vprkit-map",
        "version": 1,
        "generation": 1,
        "created": now,
        "updated": now,
        "vprkit_version": vprkit.__version__,
        "model": {**settings["model"], **chunks[0].record},
        "preprocess": settings["preprocess"],
        "batch_size": settings["batch_size"],
        "chunk_size": settings["chunk_size"],
        "batch_rule": _batch_rule(settings["batch_size"], settings["chunk_size"]),
        "precision": settings["precision"],
        "descriptor_dim": int(chunks[0].global_desc.shape[1]),
        "image_hw": list(chunks[0].image_hw),
        "local": None
        if not local
        else {"dtype": local["dtype"], "shape": list(chunks[0].local.feature_shape)},
        "photos_root": settings["photos_root"],
        "utm_zone": {"number": zone.number, "hemisphere": zone.hemisphere, "epsg": zone.epsg},
        "chunks": [_chunk_entry(c, folder) for c in chunks],
    }
    for key in ("device", "root", "vprkit_version"):
        meta["model"].pop(key, None)  # where and with what it ran, not what made it
    return meta


def _check_resume(staging: Path, settings: dict) -> None:
    """A build resumed in `staging` must be the same build."""
    path = staging / BUILD_SETTINGS
    if path.is_file():
        recorded = json.loads(path.read_text())
        diff = fp.differences(recorded, settings)
        if diff:
            raise StageMismatchError(
                f"{staging} holds an interrupted build with other settings: "
                + "; ".join(diff)
                + f". Run it again with the same settings to finish it, or delete {staging}"
            )
    else:
        from vprkit.atomic import write_text

        write_text(path, json.dumps(settings, indent=1))


def add_to_map(
    map_folder: str | os.PathLike,
    photos,
    *,
    positions: str | os.PathLike | None = None,
    require_positions: bool = False,
    weights: str | None = None,
    model: nn.Module | None = None,
    device: str = "cpu",
    num_workers: int = 0,
    compile: bool = False,
) -> tuple[Map, dict]:
    """Append `photos` (a folder or files under the map's photos root) to a map, with the
    map's own model, preprocessing and batch rule; photos already in the map are skipped.
    Old descriptors are not recomputed. `weights` must give the map's weights when its
    record cannot (a file that moved). `compile`: as for `build_map`."""
    old = Map.open(map_folder)
    meta = old.meta
    root = old.photos_root
    entries = [photos] if isinstance(photos, str | os.PathLike) else list(photos)
    for entry in map(Path, entries):
        # Checked before listing: a folder above the root could hold the whole disk.
        if Path(os.path.relpath(entry.absolute(), root)).as_posix().split("/")[0] == "..":
            raise VprkitError(
                f"{entry} is not under the map's photos root {root}; a map's photos share one "
                "root folder: copy the photos there, or build a map from a folder above both"
            )
    paths = list_photos(entries, root)
    have = {p.path for p in old.photos}
    new_paths = [p for p in paths if Path(os.path.relpath(p, root)).as_posix() not in have]
    skipped = len(paths) - len(new_paths)
    known, excluded = _positions(new_paths, root, positions, require_positions)
    keys = sorted(known)
    if not keys:
        raise VprkitError(
            f"no new photo with a usable position to add ({skipped} already in the map, "
            f"{len(excluded)} without a position)"
        )
    model = model or _rebuild_model(old, weights)
    if compile:
        compile_forward(model)
    made = old.meta["model"]
    if fp.state_sha256(model) != made["state_sha256"]:
        raise StageMismatchError(
            f"{old.folder} was made with other weights ({made['name']}, "
            f"{made.get('weights')}); give the map's own --weights"
        )
    preprocess = preprocess_of(old)
    chunks = _extract_chunks(
        model,
        [root / k for k in keys],
        old.folder,
        len(meta["chunks"]),
        root,
        meta["chunk_size"],
        preprocess=preprocess,
        local=old.has_local,
        local_dtype=(meta["local"] or {}).get("dtype", "float16"),
        batch_size=meta["batch_size"],
        num_workers=num_workers,
        device=device,
        precision=meta["precision"],
        weights=made.get("weights"),
    )
    zone = _zone_of(old)
    added = _map_photos(keys, known, root, old.count, zone)
    all_chunks = old.chunks + chunks
    previous = {k: v for k, v in old.excluded().items() if k not in known}
    new_meta = {
        **meta,
        "generation": old.generation + 1,
        "updated": _now(),
        "chunks": meta["chunks"] + [_chunk_entry(c, old.folder) for c in chunks],
    }
    choice, _ = old.index_choice()
    if choice.flat:
        descriptors = np.concatenate([np.asarray(c.global_desc) for c in all_chunks])
        faiss_index = flat_index(descriptors)
        index_note = "exact flat index rebuilt"
    else:
        # Added to the trained index, never retrained: the old rows keep their codes.
        from vprkit.retrieval.indexes import index_bytes
        from vprkit.retrieval.search import _load_rows

        faiss_index = old.index()
        new_rows = ChunkedGlobal(chunks)
        for start in range(0, len(new_rows), 16384):
            faiss_index.add(_load_rows(new_rows, slice(start, start + 16384), "database"))
        train = meta["index"]["train"]
        new_meta["index"] = {
            **meta["index"],
            "bytes_per_photo": round(index_bytes(faiss_index) / faiss_index.ntotal, 1),
        }
        index_note = (
            f"{len(new_rows)} photos added to the trained {choice.factory} index without "
            f"retraining (trained on {train['size']} of the first {train['photos']} photos; "
            "build the map again to retrain)"
        )
    write_generation(
        old.folder, new_meta, old.photos + added, {**previous, **excluded}, faiss_index
    )
    grown = Map.open(old.folder)
    result = summary(grown, len(paths), len(added), excluded)
    result["already_in_map"] = skipped
    result["index"] = index_note
    return grown, result


def _zone_of(m: Map) -> UtmZone:
    z = m.meta["utm_zone"]
    return UtmZone(int(z["number"]), z["hemisphere"])


def preprocess_of(m: Map) -> Preprocess:
    p = dict(m.meta["preprocess"])
    for key in ("image_size", "crop"):
        if isinstance(p.get(key), list):
            p[key] = tuple(p[key])
    return Preprocess(**p)


def _rebuild_model(m: Map, weights: str | None) -> nn.Module:
    """The map's model, rebuilt from its record (a random init from its seed)."""
    from vprkit.cli_args import build_model

    made = m.meta["model"]
    weights = weights or made.get("weights")
    if weights is not None and weights != "random" and not Path(weights).is_file():
        from vprkit.hub import OFFICIAL_WEIGHTS

        if weights not in OFFICIAL_WEIGHTS:
            raise MissingInputError(
                f"{m.folder} was made with the weights file {weights}, which is not there any "
                "more; give its new place with --weights"
            )
    model, _ = build_model(
        made["name"], weights, list(made["options"].items()), seed=made.get("seed", 0)
    )
    if fp.state_sha256(model) != made["state_sha256"]:
        raise StageMismatchError(
            f"{m.folder} was made with other weights than {weights or 'a random init'}; give "
            "the map's own --weights"
        )
    return model


def summary(m: Map, photos_in: int, mapped: int, excluded: dict[str, str]) -> dict:
    """What a build or an add did, for the user."""
    reasons = Counter(_reason_kind(r) for r in excluded.values())
    info = m.info()
    return {
        "map": str(m.folder),
        "photos_in": photos_in,
        "mapped": mapped,
        "left_out": len(excluded),
        "left_out_reasons": dict(reasons.most_common()),
        "left_out_examples": dict(sorted(excluded.items())[:5]),
        "map_photos": m.count,
        "extent_m": info["extent_m"],
        "size_bytes": info["size_bytes"],
    }


def _reason_kind(reason: str) -> str:
    """A reason without the specifics, to count photos left out for the same reason."""
    return reason.split(";")[0].split("(")[0].strip()


def format_summary(s: dict) -> str:
    lines = [
        f"map {s['map']}: {s['map_photos']} photos",
        f"  photos in: {s['photos_in']}, mapped now: {s['mapped']}, left out: {s['left_out']}"
        + (f", already in the map: {s['already_in_map']}" if s.get("already_in_map") else ""),
    ]
    for reason, n in s["left_out_reasons"].items():
        lines.append(f"    {n} x {reason}")
    for path, reason in s["left_out_examples"].items():
        lines.append(f"    e.g. {path}: {reason}")
    east, north = s["extent_m"]
    lines.append(f"  extent: {east:.0f} m east-west x {north:.0f} m north-south")
    if s.get("index"):
        lines.append(f"  index: {s['index']}")
    lines.append(f"  size on disk: {s['size_bytes'] / 2**20:.1f} MiB")
    return "\n".join(lines)
