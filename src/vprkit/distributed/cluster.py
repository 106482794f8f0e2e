"""Connecting to Ray: `--ray auto` or `--ray ADDRESS` (imports ray; the optional extra)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

from vprkit.errors import VprkitError

LOCAL_HOSTS = ("127.0.0.1", "localhost")


def import_ray():
    try:
        import ray
    except ImportError:
        raise VprkitError(
            "--ray needs Ray: pip install 'vprkit[ray]' (or pip install ray)"
        ) from None
    return ray


@contextmanager
def ray_session(address: str | None) -> Iterator[object]:
    """Ray, connected for the duration of the block.

    Already connected (`ray.init` called by the caller): that session, left open. `"auto"`:
    the cluster running on this machine (`ray start`, or RAY_ADDRESS) if there is one, else a
    new one of this machine alone, listening on 127.0.0.1 only (no dashboard), stopped at
    the end. Else the address of a
    running cluster's head (`HOST:PORT` or `ray://HOST:PORT`). Usage statistics are off
    unless RAY_USAGE_STATS_ENABLED says otherwise.
    """
    ray = import_ray()
    if ray.is_initialized():
        yield ray
        return
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    address = address or "auto"
    host = address.split("://")[-1].rsplit(":", 1)[0]
    local_ip = {"_node_ip_address": "127.0.0.1"} if host in LOCAL_HOSTS else {}
    try:
        if address == "auto":
            try:
                ray.init(address="auto", log_to_driver=False)
            except ConnectionError:  # a cluster of this machine alone, on loopback only
                _loopback_only(ray)
                ray.init(include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False)
        else:
            if local_ip:  # a cluster given on 127.0.0.1 stays on loopback
                _loopback_only(ray)
            ray.init(address=address, log_to_driver=False, **local_ip)
    except (ConnectionError, ValueError, RuntimeError) as err:
        raise VprkitError(
            f"--ray {address}: cannot connect to a Ray cluster ({str(err).splitlines()[0]}); "
            "start one with `ray start --head`, give its address, or use --ray auto"
        ) from None
    try:
        yield ray
    finally:
        ray.shutdown()


def _loopback_only(ray) -> None:
    """Keep a cluster of this machine alone on 127.0.0.1. Without this Ray replaces the
    address 127.0.0.1 by the machine's outward one and listens on every interface; Ray reads
    the switch (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0) when it is imported, hence both."""
    if os.environ.get("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER") is None:
        os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # the processes it starts
        constants = getattr(getattr(ray, "_private", None), "ray_constants", None)
        if constants is not None and hasattr(constants, "ENABLE_RAY_CLUSTER"):
            constants.ENABLE_RAY_CLUSTER = False


def worker_resources(device: str) -> tuple[dict, str]:
    """Ray resources of one worker holding one model on `device`, and the device name it
    uses inside (Ray sets CUDA_VISIBLE_DEVICES to the GPU it gives: always `cuda` there)."""
    if str(device).startswith("cuda"):
        return {"num_gpus": 1, "num_cpus": 1}, "cuda"
    return {"num_cpus": 1}, "cpu"


def worker_count(ray, device: str, jobs: int, requested: int | None) -> int:
    """Workers to start: as asked, else one per GPU (cuda) or per CPU of the cluster, never
    more than there are jobs."""
    if requested is not None:
        return max(1, min(int(requested), jobs))
    resources = ray.cluster_resources()
    per = "GPU" if str(device).startswith("cuda") else "CPU"
    available = int(resources.get(per, 0))
    if available < 1:
        raise VprkitError(
            f"the Ray cluster has no {per} to run on (resources: {resources}); "
            + ("add GPU workers or use --device cpu" if per == "GPU" else "add workers")
        )
    return max(1, min(available, jobs))
