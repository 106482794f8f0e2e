"""The extract stage as a Ray job: shards of whole batches, one model per worker.

`ray_extract(model, paths, out, ...)` gives exactly the features folder (and the same
descriptors, row for row) that `vprkit.pipeline.extract.extract` gives in one process:

- **Shards are whole batches, in input order.** The image list is cut into the batches the
  single-process extraction would make (`vprkit.extract.same_shape_batches`: consecutive
  batches of `batch_size`, or, for images of mixed shapes, batches of one shape each); a
  shard is a run of consecutive batches, so every batch a model sees is the batch it sees in
  one process (CricaVPR's descriptors depend on the batch). The partial batches at the end
  all go to the last shard.
- **Each worker is a Ray actor holding one model** (given as the model itself, shipped once
  through Ray's object store, or as a `ModelSpec` that each worker builds: method, options,
  weights, seed). On a GPU cluster each actor takes one GPU (`num_gpus=1`) and runs on the
  GPU Ray gives it.
- **Each shard is a features folder** written by `vprkit.pipeline.extract` itself, under
  `<out>.shards/shard-NNNNNN/` (it appears only when complete). Shards are handed out to the
  actors as they become free.
- **A failed or killed worker's shard is redone**: Ray restarts the actor (it loads its model
  again) and retries the shard on it (`max_restarts`, `max_task_retries`); the half-written
  shard's `.incomplete` folder is discarded. A shard already complete (from a killed driver's
  earlier run) is reused, as extract always does.
- **Merge**: the shards' rows are put back in input order into the one features folder
  `out`, with the fingerprint the single-process extraction records (each shard's model,
  preprocessing, batch size and precision are checked against it), then the shards are
  removed. Every image appears exactly once, or the merge refuses.

The images and the output folder must be reachable at the same paths from every worker (one
machine, or a shared file system).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from vprkit.data.images import Preprocess, input_hw
from vprkit.distributed.cluster import ray_session, worker_count, worker_resources
from vprkit.errors import VprkitError
from vprkit.extract import same_shape_batches
from vprkit.pipeline import fingerprint as fp
from vprkit.pipeline.extract import (
    _check_one_shape,
    extract,
    extract_fingerprint,
    extract_record,
    network_input_hw,
    relative_names,
)
from vprkit.pipeline.features import (
    Features,
    is_features_folder,
    load_features,
    local_path,
    publish,
    staging_folder,
)
from vprkit.rerank.local_features import LocalFeatureCache

DEFAULT_SHARD_SIZE = 1024  # images, rounded up to whole batches
DEFAULT_RETRIES = 3


@dataclass(frozen=True)
class ModelSpec:
    """How a worker builds its model (instead of receiving it): what `vprkit.cli_args.build_model`
    takes. The weights must be reachable from every worker (a shared path or an official
    name in each worker's cache)."""

    method: str
    weights: str | None = None
    options: dict = field(default_factory=dict)
    seed: int = 0

    def build(self) -> nn.Module:
        from vprkit.cli_args import build_model

        model, _ = build_model(
            self.method, self.weights, list(self.options.items()), seed=self.seed
        )
        return model


class _ExtractWorker:
    """One Ray actor: one model, kept for every shard it is given."""

    def __init__(self, model: nn.Module | ModelSpec, device: str) -> None:
        from vprkit.allocator import keep_freed_memory

        keep_freed_memory()  # as the vprkit command does: batches reuse each other's memory
        self.model = model.build() if isinstance(model, ModelSpec) else model
        self.device = device

    def extract(self, paths: list[str], folder: str, options: dict, chunk: bool) -> str:
        kwargs = {**options, "device": self.device}
        if chunk:  # a map's chunk: a stale one a killed build left is replaced
            from vprkit.maps.build import _extract_chunk

            label = kwargs.pop("label")
            root = kwargs.pop("root")
            _extract_chunk(self.model, paths, Path(folder), Path(root), False, label, **kwargs)
        else:
            extract(self.model, paths, folder, **kwargs)
        return folder

    def pid(self) -> int:
        return os.getpid()


def run_shards(
    model: nn.Module | ModelSpec,
    jobs: Sequence[tuple[list[str], Path]],
    options: dict,
    *,
    address: str | None,
    device: str = "cpu",
    workers: int | None = None,
    max_retries: int = DEFAULT_RETRIES,
    chunk: bool = False,
) -> list[Features]:
    """Run `extract(model, paths, folder, **options)` for each job `(paths, folder)` on Ray
    actors that each hold one model; returns the features folders in the jobs' order."""
    with ray_session(address) as ray:
        from ray.util import ActorPool

        resources, worker_device = worker_resources(device)
        count = worker_count(ray, device, len(jobs), workers)
        actor = ray.remote(_ExtractWorker).options(
            max_restarts=max_retries, max_task_retries=max_retries, **resources
        )
        model_ref = ray.put(model)
        actors = [actor.remote(model_ref, worker_device) for _ in range(count)]
        try:
            pool = ActorPool(actors)
            done = list(
                pool.map(
                    lambda a, job: a.extract.remote(
                        [str(p) for p in job[0]], str(job[1]), options, chunk
                    ),
                    list(jobs),
                )
            )
        except ray.exceptions.RayError as err:
            raise VprkitError(
                f"a Ray extraction worker failed more than {max_retries} times: "
                f"{str(err).splitlines()[0]}"
            ) from None
        finally:
            for a in actors:
                ray.kill(a)
    return [load_features(folder) for folder in done]


def shard_plan(
    paths: Sequence[Path], preprocess: Preprocess, batch_size: int, shard_batches: int
) -> list[np.ndarray]:
    """Image indices of each shard: runs of `shard_batches` consecutive batches of the
    single-process extraction, each shard's images in batch order (so that the shard, extracted
    alone, is batched exactly so); the partial batches at the end go to the last shard."""
    if isinstance(preprocess, Preprocess) and preprocess.fixed_hw is None:
        shapes: Sequence = [input_hw(p, preprocess) for p in paths]
    else:
        shapes = [None] * len(paths)
    batches = same_shape_batches(shapes, batch_size)
    full = [b for b in batches if len(b) == batch_size]
    partial = [b for b in batches if len(b) < batch_size]
    shards = [full[i : i + shard_batches] for i in range(0, len(full), shard_batches)]
    if partial:
        shards = shards or [[]]
        shards[-1] += partial
    return [np.array([i for b in shard for i in b], dtype=np.int64) for shard in shards]


def ray_extract(
    model: nn.Module,
    image_paths: Sequence[str | os.PathLike],
    out: str | os.PathLike | None = None,
    *,
    preprocess: Preprocess,
    root: str | os.PathLike | None = None,
    local: bool = False,
    local_dtype: str = "float32",
    batch_size: int = 16,
    num_workers: int = 0,
    device: str = "cpu",
    precision: str = "fp32",
    weights: str | os.PathLike | None = None,
    label: str = "images",
    on_compute=None,
    address: str | None = "auto",
    model_spec: ModelSpec | None = None,
    shard_size: int | None = None,
    workers: int | None = None,
    max_retries: int = DEFAULT_RETRIES,
) -> Features:
    """`vprkit.pipeline.extract.extract` run as a Ray job (module doc): same arguments, same
    result. `address`: "auto" or a Ray address. `model_spec`: the workers build the model
    from it (it must give the same weights) instead of receiving `model`. `shard_size`:
    images per shard, rounded up to whole batches (default 1024, fewer when that leaves a
    worker idle). `workers`: actors to start (default: one per GPU, or per CPU)."""
    paths = [Path(p) for p in image_paths]
    if not paths:
        raise VprkitError(f"no {label} to extract")
    kwargs = dict(
        preprocess=preprocess,
        root=root,
        local=local,
        local_dtype=local_dtype,
        batch_size=batch_size,
        num_workers=num_workers,
        precision=precision,
        weights=weights,
    )
    folder = None if out is None else Path(out)
    if folder is not None and is_features_folder(folder):  # checked and reused, as extract does
        return extract(model, paths, folder, device=device, label=label, **kwargs)
    if local:
        if folder is None:
            raise VprkitError("local features extracted on Ray need an output folder (out=...)")
        _check_one_shape(paths, preprocess, relative_names(paths, root and Path(root)))
    if on_compute is not None:
        on_compute()
    with tempfile.TemporaryDirectory(prefix="vprkit_ray_") as tmp, ray_session(address) as ray:
        base = Path(tmp) / "features" if folder is None else folder
        shards_dir = base.with_name(base.name + ".shards")
        per_shard = -(-int(shard_size or DEFAULT_SHARD_SIZE) // batch_size)
        if shard_size is None:  # enough shards to keep every worker busy
            count = worker_count(ray, device, len(paths), workers)
            per_shard = max(1, min(per_shard, -(-len(paths) // (batch_size * 2 * count))))
        plan = shard_plan(paths, preprocess, batch_size, per_shard)
        jobs = [
            ([paths[i] for i in idx], shards_dir / f"shard-{n:06d}") for n, idx in enumerate(plan)
        ]
        shards = run_shards(
            model_spec or model,
            jobs,
            {**kwargs, "label": label},
            address=address,
            device=device,
            workers=workers,
            max_retries=max_retries,
        )
        features = _merge(model, paths, plan, shards, folder, device=device, label=label, **kwargs)
        if folder is not None:
            shutil.rmtree(shards_dir)
    return features


def _merge(model, paths, plan, shards, folder, *, device, label, **kw) -> Features:
    """The shards' rows in input order, with the single-process fingerprint."""
    root = kw["root"]
    names = relative_names(paths, None if root is None else Path(root))
    order = np.concatenate(plan)
    if len(order) != len(paths) or not np.array_equal(np.sort(order), np.arange(len(paths))):
        raise VprkitError(f"the Ray shards of {label} do not hold every image exactly once")
    wanted = extract_fingerprint(
        model,
        names,
        paths,
        kw["preprocess"],
        kw["batch_size"],
        kw["precision"],
        kw["local"],
        kw["local_dtype"],
    )
    dim = shards[0].global_desc.shape[1]
    global_desc = np.empty((len(paths), dim), dtype=np.float32)
    for idx, shard in zip(plan, shards, strict=True):
        if [names[i] for i in idx] != shard.names:
            raise VprkitError(f"{shard.folder}: holds other images than its shard of {label}")
        got = {k: shard.fingerprint[k] for k in ("model", "preprocess", "batch_size", "precision")}
        diff = fp.differences(got, {k: wanted[k] for k in got})
        if diff:
            raise VprkitError(
                f"{shard.folder}: a Ray worker extracted with another model or settings: "
                + "; ".join(diff)
            )
        global_desc[idx] = shard.global_desc
    record = {**extract_record(model, kw["weights"], device, root), "ray_shards": len(shards)}
    staging = None
    if folder is not None:
        staging = staging_folder(folder)
    local = None
    if kw["local"]:
        local = LocalFeatureCache.create(
            local_path(staging), len(paths), shards[0].local.feature_shape, kw["local_dtype"]
        )
        try:
            for idx, shard in zip(plan, shards, strict=True):
                for s in range(0, len(idx), 256):
                    rows = np.arange(s, min(len(idx), s + 256))
                    local.write(torch.from_numpy(idx[rows]), shard.local[rows])
            local.close()
        except BaseException:
            local.abort()
            raise
    features = Features(
        names=names,
        global_desc=global_desc,
        image_hw=network_input_hw(kw["preprocess"], paths[0]),
        fingerprint=json.loads(json.dumps(wanted)),
        record=record,
        local=local,
    )
    if staging is None:
        return features
    return publish(features, staging, folder)


def extract_chunks(
    model: nn.Module,
    paths: list[Path],
    folder: Path,
    first_chunk: int,
    root: Path,
    chunk_size: int,
    address: str,
    *,
    device: str = "cpu",
    workers: int | None = None,
    max_retries: int = DEFAULT_RETRIES,
    **kw,
) -> list[Features]:
    """A map's chunks (`vprkit.maps.build`) as a Ray job: each chunk, a whole number of
    batches, is one shard, extracted by `vprkit.maps.build._extract_chunk` on a worker into
    the chunk's own features folder (a complete one is reused, a killed run's stale one
    replaced), exactly as the single-process build extracts it."""
    from vprkit.maps.folder import chunk_folder

    bounds = list(range(0, len(paths), chunk_size))
    jobs = [
        (paths[start : start + chunk_size], folder / chunk_folder(first_chunk + i))
        for i, start in enumerate(bounds)
    ]
    options = {**kw, "root": str(root), "label": "map chunk"}
    return run_shards(
        model,
        jobs,
        options,
        address=address,
        device=device,
        workers=workers,
        max_retries=max_retries,
        chunk=True,
    )
