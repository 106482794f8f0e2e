"""A map on disk: what made it, where each photo was taken, its descriptors and its index.

A map folder (format ``vprkit-map``, version 1) holds:

- ``map.json``: the format and version; what made the descriptors (model name and options,
  the weights as named, the sha256 of the weights as loaded and of the weights file,
  preprocessing, batch size and precision, descriptor size, input size, local features),
  the batch rule, the photos' root folder, the UTM zone of the metric coordinates, the
  vprkit version, when it was made and last changed; the names and sha256 of the files below
  that make up the current map (its *generation*), and its chunks in order;
- ``photos-<generation>.csv``: one row per photo, its row number its id: ``id, path``
  (relative to the photos' root, POSIX), ``latitude, longitude`` (WGS84 degrees), ``east,
  north`` (metres in the map's UTM zone), ``heading, altitude, time, source`` (empty when
  unknown) and the photo file's ``sha256``;
- ``excluded-<generation>.csv``: the photos left out and why (``path, reason``);
- ``index-<generation>.faiss``: a FAISS ``IndexFlatL2`` over the L2-normalized descriptors,
  or, when the map was built with ``--index`` other than ``flat``, a trained compressed FAISS
  index over them (``vprkit.retrieval.indexes``); ``map.json``'s optional ``index`` entry
  then records the spec as given, the factory string, the search parameters, the re-scoring
  depth, the training sample (seed, size, photos) and, for ``auto``, the rule applied. The
  entry is optional and its absence means flat, so maps of either kind are version 1 and
  older maps read unchanged; localizing a compressed map re-scores its top candidates
  exactly from the chunks' memory-mapped descriptors;
- ``chunks/<n>/``: the descriptors, as ``vprkit-features`` folders of consecutive photos
  (``vprkit.pipeline.features``: ``global.npy`` memory-mapped, and ``local.npy`` when the map
  keeps local features for re-ranking).

``map.json`` is replaced atomically, last: a map is always the generation it names, whatever
was killed when. Files of other generations, and chunks it does not list, are leftovers of an
interrupted change: ignored when reading, reused or removed by the next change.
"""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from torch import Tensor

from vprkit.atomic import write_text
from vprkit.errors import MissingInputError, VprkitError
from vprkit.pipeline.features import Features, load_features
from vprkit.pipeline.fingerprint import file_sha256

FORMAT = "vprkit-map"
VERSION = 1
META = "map.json"
PHOTO_COLUMNS = (
    "id",
    "path",
    "latitude",
    "longitude",
    "east",
    "north",
    "heading",
    "altitude",
    "time",
    "source",
    "sha256",
)


@dataclass(frozen=True)
class MapPhoto:
    id: int
    path: str  # relative to the map's photos root
    latitude: float
    longitude: float
    east: float
    north: float
    heading: float | None = None
    altitude: float | None = None
    time: str | None = None
    source: str = "table"
    sha256: str = ""


def is_map_folder(folder: str | os.PathLike) -> bool:
    return (Path(folder) / META).is_file()


def generation_name(stem: str, generation: int, suffix: str) -> str:
    return f"{stem}-{generation:06d}{suffix}"


def chunk_folder(index: int) -> str:
    return f"chunks/{index:06d}"


# --------------------------------------------------------------------------- the photos table


def _cell(value) -> str:
    if value is None:
        return ""
    return repr(float(value)) if isinstance(value, float) else str(value)


def photos_csv(photos: list[MapPhoto]) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(PHOTO_COLUMNS)
    for p in photos:
        writer.writerow([_cell(getattr(p, c)) for c in PHOTO_COLUMNS])
    return out.getvalue()


def read_photos_csv(path: Path) -> list[MapPhoto]:
    def number(text: str) -> float | None:
        return None if text == "" else float(text)

    photos = []
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        if tuple(reader.fieldnames or ()) != PHOTO_COLUMNS:
            raise VprkitError(f"{path}: not a map's photos table (columns {reader.fieldnames})")
        for i, row in enumerate(reader):
            try:
                photo = MapPhoto(
                    id=int(row["id"]),
                    path=row["path"],
                    latitude=float(row["latitude"]),
                    longitude=float(row["longitude"]),
                    east=float(row["east"]),
                    north=float(row["north"]),
                    heading=number(row["heading"]),
                    altitude=number(row["altitude"]),
                    time=row["time"] or None,
                    source=row["source"],
                    sha256=row["sha256"],
                )
            except (TypeError, ValueError) as e:
                raise VprkitError(f"{path}, line {reader.line_num}: bad row ({e})") from None
            if photo.id != i:
                raise VprkitError(f"{path}, line {reader.line_num}: id {photo.id}, expected {i}")
            photos.append(photo)
    return photos


def excluded_csv(excluded: dict[str, str]) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(("path", "reason"))
    writer.writerows(sorted(excluded.items()))
    return out.getvalue()


def read_excluded_csv(path: Path) -> dict[str, str]:
    with open(path, newline="", encoding="utf-8") as f:
        return {row["path"]: row["reason"] for row in csv.DictReader(f)}


# --------------------------------------------------------------------------- local features


class ChunkedLocalFeatures:
    """The local features of a map's chunks seen as one array, for the re-rankers (which
    index rows: ``local[[i, j, ...]]``)."""

    def __init__(self, chunks: list[Features]) -> None:
        self._caches = [c.local for c in chunks]
        self._starts = np.cumsum([0] + [len(c) for c in chunks])
        self.feature_shape = tuple(self._caches[0].feature_shape)
        self.dtype = self._caches[0].dtype

    def __len__(self) -> int:
        return int(self._starts[-1])

    def __getitem__(self, indices) -> Tensor:
        import torch

        single = isinstance(indices, (int, np.integer))
        idx = np.asarray(torch.as_tensor(indices).cpu(), dtype=np.int64).reshape(-1)
        if idx.size and (idx.min() < 0 or idx.max() >= len(self)):
            raise IndexError(f"indices out of range for a map of {len(self)} photos")
        out = torch.empty((len(idx), *self.feature_shape), dtype=torch.float32)
        chunk = np.searchsorted(self._starts, idx, side="right") - 1
        for c in np.unique(chunk):
            rows = np.flatnonzero(chunk == c)
            out[rows] = self._caches[c][idx[rows] - self._starts[c]]
        return out[0] if single else out


class ChunkedGlobal:
    """The global descriptors of a map's chunks seen as one (N, D) array, memory-mapped:
    rows are read only when indexed (``rows[ids]``, ``rows[a:b]``), for exact re-scoring and
    for building an index in blocks."""

    def __init__(self, chunks: list[Features]) -> None:
        self._parts = [c.global_desc for c in chunks]
        self._starts = np.cumsum([0] + [len(c) for c in self._parts])
        self.shape = (int(self._starts[-1]), int(self._parts[0].shape[1]))
        self.dtype = self._parts[0].dtype
        self.ndim = 2

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, rows) -> np.ndarray:
        idx = np.arange(len(self))[rows] if isinstance(rows, slice) else np.asarray(rows)
        idx = idx.astype(np.int64).reshape(-1)
        out = np.empty((len(idx), self.shape[1]), dtype=self.dtype)
        chunk = np.searchsorted(self._starts, idx, side="right") - 1
        for c in np.unique(chunk):
            at = np.flatnonzero(chunk == c)
            local = idx[at] - self._starts[c]
            if np.all(np.diff(local) == 1):  # consecutive: one slice (a block read)
                out[at] = self._parts[c][local[0] : local[-1] + 1]
            else:
                out[at] = self._parts[c][local]
        return out


# --------------------------------------------------------------------------- the map


class Map:
    """An opened map folder (module doc). `Map.open(folder)` checks it; the descriptors are
    memory-mapped, the photos table is in memory."""

    def __init__(self, folder: Path, meta: dict, photos: list[MapPhoto], chunks: list[Features]):
        self.folder = folder
        self.meta = meta
        self.photos = photos
        self.chunks = chunks
        self.photos_root = Path(meta["photos_root"])
        self._index = None

    # ------------------------------------------------------------------ opening

    @classmethod
    def open(cls, folder: str | os.PathLike, photos_root: str | os.PathLike | None = None) -> Map:
        """Open and check a map folder; `photos_root`: where its photos are now, if they moved.
        A folder that is not a map, comes from a newer vprkit, or whose files do not match
        what `map.json` records is refused with a `VprkitError` naming the file."""
        folder = Path(folder)
        meta = read_meta(folder)
        photos_file = folder / meta["files"]["photos"]
        _check_file(folder, meta, "photos", photos_file)
        photos = read_photos_csv(photos_file)
        if len(photos) != meta["count"]:
            raise VprkitError(f"{photos_file}: {len(photos)} photos, map.json says {meta['count']}")
        chunks = []
        for entry in meta["chunks"]:
            chunk_dir = folder / entry["folder"]
            if not (chunk_dir / "features.json").is_file():
                raise VprkitError(
                    f"{folder}: chunk {entry['folder']} is missing; the map is damaged"
                )
            chunks.append(load_features(chunk_dir))
        names = [n for c in chunks for n in c.names]
        if names != [p.path for p in photos]:
            raise VprkitError(
                f"{folder}: the descriptors' photos differ from {photos_file.name}; the map is "
                "damaged (vprkit map verify says where)"
            )
        m = cls(folder, meta, photos, chunks)
        if photos_root is not None:
            m.photos_root = Path(photos_root)
        return m

    # ------------------------------------------------------------------ what it holds

    @property
    def count(self) -> int:
        return len(self.photos)

    @property
    def method(self) -> str:
        return self.meta["model"]["name"]

    @property
    def has_local(self) -> bool:
        return self.meta["local"] is not None

    @property
    def generation(self) -> int:
        return int(self.meta["generation"])

    def global_descriptors(self) -> np.ndarray:
        """(N, D) float32, rows in photo-id order."""
        return np.concatenate([np.asarray(c.global_desc) for c in self.chunks])

    def local_features(self) -> ChunkedLocalFeatures | None:
        return ChunkedLocalFeatures(self.chunks) if self.has_local else None

    def index_choice(self):
        """The map's `IndexChoice` (flat when map.json has no ``index`` entry) and its
        re-scoring depth."""
        from vprkit.retrieval.indexes import DEFAULT_RESCORE, IndexChoice

        entry = self.meta.get("index")
        if not entry or entry.get("factory") is None:
            return IndexChoice("flat", None), 0
        choice = IndexChoice(
            entry["spec"], entry["factory"], entry.get("params", ""), entry.get("reason", "")
        )
        return choice, int(entry.get("rescore", DEFAULT_RESCORE))

    def index(self):
        """The FAISS index (read once, trained as saved: never retrained), with the search
        parameters map.json records."""
        if self._index is None:
            from vprkit.retrieval.indexes import read_index

            path = self.folder / self.meta["files"]["index"]
            self._index = read_index(path, self.index_choice()[0])
            if self._index.ntotal != self.count:
                raise VprkitError(f"{path}: {self._index.ntotal} vectors for {self.count} photos")
        return self._index

    def search(self, global_desc: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top ``k`` photos per descriptor: exact on a flat map; on a compressed one, the
        index's top candidates (its re-scoring depth) ranked exactly from the chunks'
        memory-mapped descriptors (`vprkit.retrieval.indexes.search`)."""
        from vprkit.retrieval.indexes import search
        from vprkit.retrieval.search import search_flat_index

        choice, rescore = self.index_choice()
        if choice.flat:
            return search_flat_index(self.index(), global_desc, k)
        return search(
            self.index(),
            global_desc,
            k,
            rescore=rescore,
            full_descriptors=ChunkedGlobal(self.chunks),
        )

    def excluded(self) -> dict[str, str]:
        return read_excluded_csv(self.folder / self.meta["files"]["excluded"])

    def positions(self) -> tuple[np.ndarray, np.ndarray]:
        """(east, north) in metres, photo-id order."""
        return (
            np.array([p.east for p in self.photos]),
            np.array([p.north for p in self.photos]),
        )

    def photo_file(self, photo_id: int) -> Path:
        """The file of photo `photo_id` (ids are rows of the photos table; nothing else from
        a caller reaches the file system)."""
        if not isinstance(photo_id, (int, np.integer)) or not 0 <= photo_id < self.count:
            raise IndexError(f"no photo {photo_id!r} in a map of {self.count} photos")
        path = self.photos_root / self.photos[int(photo_id)].path
        if not path.is_file():
            raise MissingInputError(
                f"photo {photo_id} ({self.photos[int(photo_id)].path}) is not under "
                f"{self.photos_root} any more; open the map with photos_root=<where it is now>"
            )
        return path

    def size_bytes(self) -> int:
        files = [self.folder / META] + [self.folder / f for f in self.meta["files"].values()]
        total = sum(f.stat().st_size for f in files if f.is_file())
        for c in self.chunks:
            total += sum(f.stat().st_size for f in c.folder.iterdir() if f.is_file())
        return total

    def info(self) -> dict:
        """What the map holds and what made it (JSON-able)."""
        east, north = self.positions()
        lat = np.array([p.latitude for p in self.photos])
        lon = np.array([p.longitude for p in self.photos])
        model = self.meta["model"]
        return {
            "format": self.meta["format"],
            "version": self.meta["version"],
            "folder": str(self.folder),
            "count": self.count,
            "excluded": self.meta["excluded"],
            "method": model["name"],
            "model_options": model["options"],
            "weights": {
                "name": model.get("weights"),
                "state_sha256": model["state_sha256"],
                "file_sha256": model.get("weights_file_sha256"),
            },
            "preprocess": self.meta["preprocess"],
            "batch_size": self.meta["batch_size"],
            "batch_rule": self.meta["batch_rule"],
            "precision": self.meta["precision"],
            "descriptor_dim": self.meta["descriptor_dim"],
            "has_local": self.has_local,
            "index": self.meta.get("index") or {"spec": "flat", "factory": None},
            "utm_zone": self.meta["utm_zone"],
            "center": {"latitude": float(np.median(lat)), "longitude": float(np.median(lon))},
            "extent_m": [float(np.ptp(east)), float(np.ptp(north))],
            "photos_root": str(self.photos_root),
            "generation": self.generation,
            "created": self.meta["created"],
            "updated": self.meta["updated"],
            "vprkit_version": self.meta["vprkit_version"],
            "size_bytes": self.size_bytes(),
        }

    def localizer(self, device: str = "cpu", weights: str | None = None, model=None):
        """A `Localizer` holding the map's model, loaded once (see `vprkit.maps.localize`)."""
        from vprkit.maps.localize import Localizer

        return Localizer(self, device=device, weights=weights, model=model)

    def verify(self, photos: bool = False) -> list[str]:
        """Every problem found, by checking each file's sha256 against `map.json` (and each
        photo's, with `photos=True`); an empty list means the map is intact."""
        problems = []
        for key, name in self.meta["files"].items():
            try:
                _check_file(self.folder, self.meta, key, self.folder / name)
            except VprkitError as e:
                problems.append(str(e))
        for entry, chunk in zip(self.meta["chunks"], self.chunks, strict=True):
            for name, recorded in entry["sha256"].items():
                path = chunk.folder / name
                if not path.is_file() or file_sha256(path) != recorded:
                    problems.append(f"{path}: sha256 differs from map.json (changed or damaged)")
        if photos:
            for p in self.photos:
                path = self.photos_root / p.path
                if not path.is_file():
                    problems.append(f"{path}: photo {p.id} is missing")
                elif file_sha256(path) != p.sha256:
                    problems.append(f"{path}: photo {p.id} changed since it was mapped")
        return problems


def read_meta(folder: Path) -> dict:
    path = folder / META
    if not path.is_file():
        hint = (
            " (an interrupted build: run the same vprkit map build again)"
            if Path(f"{folder}.incomplete").is_dir()
            else ""
        )
        raise MissingInputError(
            f"{folder}: not a map folder (no {META}){hint}; make one with vprkit map build"
        )
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise VprkitError(f"{path}: not valid JSON ({e}); the map is damaged") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise VprkitError(f"{path}: not a vprkit map (format {meta.get('format')!r})")
    version = meta.get("version")
    if not isinstance(version, int) or version > VERSION:
        raise VprkitError(
            f"{path}: map format version {version!r}, made by a newer vprkit; this vprkit "
            f"reads version {VERSION}: upgrade vprkit (pip install -U vprkit)"
        )
    if version != VERSION:
        raise VprkitError(f"{path}: map format version {version}, expected {VERSION}")
    return meta


def _check_file(folder: Path, meta: dict, key: str, path: Path) -> None:
    if not path.is_file():
        raise VprkitError(f"{path}: missing; the map is damaged")
    if file_sha256(path) != meta["sha256"][key]:
        raise VprkitError(
            f"{path}: sha256 differs from what {folder / META} records (changed or damaged); "
            "rebuild the map, or restore the file"
        )


# --------------------------------------------------------------------------- writing


def write_generation(
    folder: Path,
    meta: dict,
    photos: list[MapPhoto],
    excluded: dict[str, str],
    index,
) -> dict:
    """Write the files of generation `meta["generation"]` into `folder`, then `map.json`
    naming them (atomically, last), then remove other generations' files."""
    import faiss

    from vprkit.atomic import atomic_path

    generation = int(meta["generation"])
    files = {
        "photos": generation_name("photos", generation, ".csv"),
        "excluded": generation_name("excluded", generation, ".csv"),
        "index": generation_name("index", generation, ".faiss"),
    }
    write_text(folder / files["photos"], photos_csv(photos))
    write_text(folder / files["excluded"], excluded_csv(excluded))
    with atomic_path(folder / files["index"]) as tmp:
        faiss.write_index(index, str(tmp))
    meta = {
        **meta,
        "count": len(photos),
        "excluded": len(excluded),
        "files": files,
        "sha256": {key: file_sha256(folder / name) for key, name in files.items()},
    }
    write_text(folder / META, json.dumps(meta, indent=1))
    remove_leftovers(folder, meta)
    return meta


def remove_leftovers(folder: Path, meta: dict) -> None:
    """Files of other generations and unlisted chunks' temporary folders."""
    keep = set(meta["files"].values()) | {META}
    for f in folder.iterdir():
        if (
            f.is_file()
            and f.name not in keep
            and f.name.split("-")[0]
            in (
                "photos",
                "excluded",
                "index",
            )
        ):
            f.unlink()
    for f in (folder / "chunks").glob("*.incomplete"):
        shutil.rmtree(f, ignore_errors=True)
