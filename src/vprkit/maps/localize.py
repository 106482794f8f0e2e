"""Localize photos against a map: descriptors, exact search, optional re-ranking, estimate.

`Localizer` holds the map's model, loaded once and checked to be the one that made the map
(the sha256 of its weights as loaded). Each query is encoded alone, a batch of one, unless
`burst=True` couples consecutive queries in batches of the map's batch size, as the map's own
photos were (for CricaVPR, whose cross-image encoder mixes the images of a batch, a burst of
frames from one place is encoded the way its papers' evaluation encodes its queries).
The search is exact (the map's flat index, ranked as `vprkit eval` ranks), or on a map built
with a compressed `--index`, that index's top candidates re-scored exactly from the map's
memory-mapped descriptors (`Map.search`); re-ranking uses the
method's own re-ranker on the local features the map keeps; the position estimate and the
confidence are those of `vprkit.maps.estimate`.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn

from vprkit.data.images import load_image
from vprkit.errors import StageMismatchError, VprkitError
from vprkit.extract import autocast_context, computes_local
from vprkit.maps.build import _rebuild_model, _zone_of, preprocess_of
from vprkit.maps.estimate import (
    DEFAULT_RADIUS_M,
    DEFAULT_TEMPERATURE,
    estimate_position,
    match_weights,
)
from vprkit.maps.folder import Map
from vprkit.maps.positions import unproject
from vprkit.models.registry import model_info
from vprkit.pipeline.fingerprint import state_sha256
from vprkit.rerank import apply_order, make_scorer, rerank_order

ImageInput = str | os.PathLike | Image.Image


@dataclass(frozen=True)
class Match:
    rank: int  # 1-based, after re-ranking when asked
    photo_id: int
    path: str
    latitude: float
    longitude: float
    east: float
    north: float
    distance: float  # squared L2 distance of the L2-normalized global descriptors
    score: float | None  # the re-ranker's score, None without re-ranking
    in_group: bool  # agrees with the estimate (vprkit.maps.estimate)


@dataclass
class Localization:
    query: str
    latitude: float
    longitude: float
    east: float
    north: float
    confidence: float
    spread_m: float
    matches: list[Match]
    reranked: bool = False
    timings: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


class _InMemoryLocal:
    """A batch's local features, indexed like the map's (`[i]` one, `[[i, ...]]` several)."""

    def __init__(self, features: Tensor) -> None:
        self._features = features
        self.feature_shape = tuple(features.shape[1:])
        self.dtype = np.dtype("float32")

    def __len__(self) -> int:
        return len(self._features)

    def __getitem__(self, indices) -> Tensor:
        if isinstance(indices, (int, np.integer)):
            return self._features[int(indices)]
        return self._features[torch.as_tensor(np.asarray(indices), dtype=torch.long)]


class Localizer:
    """The map's model, loaded once, and everything a query needs (module doc). Not
    thread-safe: call `localize` from one thread at a time."""

    def __init__(
        self,
        m: Map,
        *,
        device: str = "cpu",
        weights: str | None = None,
        model: nn.Module | None = None,
    ) -> None:
        self.map = m
        self.device = device
        if model is None:
            model = _rebuild_model(m, weights)
        elif state_sha256(model) != m.meta["model"]["state_sha256"]:
            raise StageMismatchError(
                f"{m.folder} was made by another model or other weights than the one given"
            )
        self.model = model.eval().to(device)
        self.info = model_info(model)
        self.preprocess = preprocess_of(m)
        self.precision = m.meta["precision"]
        self.zone = _zone_of(m)
        self.east, self.north = m.positions()
        self._db_global: np.ndarray | None = None

    # ------------------------------------------------------------------ encoding

    def _tensor(self, image: ImageInput) -> Tensor:
        if isinstance(image, Image.Image):
            return self.preprocess(image.convert("RGB"))
        return self.preprocess(load_image(image))

    @torch.no_grad()
    def encode(self, tensors: list[Tensor], local: bool) -> tuple[np.ndarray, Tensor | None]:
        """Global descriptors (and local features) of one batch."""
        shapes = {tuple(t.shape) for t in tensors}
        if len(shapes) > 1:
            raise VprkitError(
                "a burst needs images of one size after preprocessing; the map's image_size "
                f"{self.preprocess.image_size} gives {sorted(shapes)}"
            )
        options = {} if local or not computes_local(self.model) else {"local": False}
        with autocast_context(self.device, self.precision):
            out = self.model(torch.stack(tensors).to(self.device), **options)
        global_desc = out.global_desc.float().cpu().numpy()
        features = None
        if local:
            features = out.local_desc if out.local_desc is not None else out.local_tokens
            features = features.float().cpu()
        return global_desc, features

    # ------------------------------------------------------------------ localizing

    def localize(
        self,
        images: Sequence[ImageInput],
        *,
        names: Sequence[str] | None = None,
        top_k: int = 10,
        rerank: bool = False,
        burst: bool = False,
        radius_m: float = DEFAULT_RADIUS_M,
        temperature: float = DEFAULT_TEMPERATURE,
    ) -> list[Localization]:
        """One `Localization` per image, in order (`images`: paths or PIL images)."""
        images = list(images)
        if names is None:
            names = [
                f"image {i}" if isinstance(im, Image.Image) else str(im)
                for i, im in enumerate(images)
            ]
        if len(names) != len(images):
            raise ValueError(f"{len(names)} names for {len(images)} images")
        if top_k < 1:
            raise VprkitError(f"top_k must be at least 1, got {top_k}")
        reranker, depth = self._reranker(rerank)
        group = self.map.meta["batch_size"] if burst else 1
        results = []
        for start in range(0, len(images), group):
            batch = list(range(start, min(start + group, len(images))))
            t0 = time.perf_counter()
            tensors = [self._tensor(images[i]) for i in batch]
            global_desc, local = self.encode(tensors, local=reranker is not None)
            extract_s = (time.perf_counter() - t0) / len(batch)
            for j, i in enumerate(batch):
                results.append(
                    self._one(
                        names[i],
                        global_desc[j : j + 1],
                        None if local is None else local[j : j + 1],
                        top_k,
                        reranker,
                        depth,
                        radius_m,
                        temperature,
                        extract_s,
                    )
                )
        return results

    def _reranker(self, rerank: bool) -> tuple[str | None, int]:
        if not rerank:
            return None, 0
        if self.info.reranker is None:
            raise VprkitError(
                f"{self.map.method} has no re-ranker of its own; localize without --rerank"
            )
        if not self.map.has_local:
            raise VprkitError(
                f"{self.map.folder} keeps no local features, so it cannot re-rank; build the "
                "map with local features (vprkit map build --local)"
            )
        return self.info.reranker, self.info.rerank_num

    def _database_global(self) -> np.ndarray:
        if self._db_global is None:
            self._db_global = self.map.global_descriptors()
        return self._db_global

    def _one(
        self,
        name: str,
        global_desc: np.ndarray,
        local: Tensor | None,
        top_k: int,
        reranker: str | None,
        depth: int,
        radius_m: float,
        temperature: float,
        extract_s: float,
    ) -> Localization:
        t0 = time.perf_counter()
        k = min(max(top_k, depth), self.map.count)
        distances, indices = self.map.search(global_desc, k)
        t1 = time.perf_counter()
        scores = None
        if reranker is not None:
            scorer = make_scorer(
                reranker,
                self.model,
                _InMemoryLocal(local),
                self.map.local_features(),
                global_desc,
                self._database_global(),
                tuple(self.map.meta["image_hw"]),
                device=self.device,
                precision=self.precision,
            )
            orders, scores = rerank_order(
                indices,
                depth,
                scorer,
                tie_order=self.info.default_tie_order(reranker),
                progress=False,  # one query at a time: a bar per query is noise
            )
            indices, distances = apply_order(indices, orders), apply_order(distances, orders)
            scores = scores[0]
        t2 = time.perf_counter()
        top = min(top_k, k)
        ids, dist = indices[0, :top], distances[0, :top]
        shown = None if scores is None else scores[: min(top, len(scores))]
        weights = match_weights(
            dist[: len(shown)] if shown is not None else dist, shown, temperature
        )
        n = len(weights)
        est = estimate_position(self.east[ids[:n]], self.north[ids[:n]], weights, radius_m)
        lat, lon = unproject(est.east, est.north, self.zone)
        matches = []
        for r, (pid, d) in enumerate(zip(ids, dist, strict=True)):
            p = self.map.photos[int(pid)]
            matches.append(
                Match(
                    rank=r + 1,
                    photo_id=int(pid),
                    path=p.path,
                    latitude=p.latitude,
                    longitude=p.longitude,
                    east=p.east,
                    north=p.north,
                    distance=float(d),
                    score=None if shown is None or r >= len(shown) else float(shown[r]),
                    in_group=bool(r < n and est.in_group[r]),
                )
            )
        t3 = time.perf_counter()
        return Localization(
            query=name,
            latitude=float(lat),
            longitude=float(lon),
            east=est.east,
            north=est.north,
            confidence=est.confidence,
            spread_m=est.spread_m,
            matches=matches,
            reranked=reranker is not None,
            timings={
                "extract_s": extract_s,
                "search_s": t1 - t0,
                "rerank_s": t2 - t1,
                "estimate_s": t3 - t2,
            },
        )
