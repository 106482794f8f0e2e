"""Beyond one machine, on Ray (the optional extra ``pip install vprkit[ray]``).

- `vprkit.distributed.ray_extract`: the extract stage as a Ray job, in shards of whole
  batches, one model per worker, a killed worker's shard redone; merged into exactly what
  `vprkit.pipeline.extract` gives in one process.
- `vprkit.distributed.sharded_search`: exact search over shards held by Ray actors, merged
  into exactly the top-K of `vprkit.retrieval.search.search`.

Nothing here imports ray at import time of vprkit: only these modules do, when used.
"""
