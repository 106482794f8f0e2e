"""Ray as the distributed engine: sharded extraction equals the single-process extract (also
with a worker killed mid-job), a map built on Ray equals one built without, sharded search
equals flat search exactly, and two Ray nodes on 127.0.0.1 run `vprkit map build --ray`."""

from __future__ import annotations

import functools
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from vprkit.data.formats import open_dataset
from vprkit.data.images import Preprocess
from vprkit.extract import same_shape_batches
from vprkit.maps import Map, build_map
from vprkit.models.registry import create_model
from vprkit.pipeline import EvalConfig, evaluate, extract
from vprkit.retrieval.search import search

# Ray turns 127.0.0.1 into the machine's outward address and listens on every interface,
# unless told, before it is imported, that this is a single-machine cluster.
LOOPBACK_ONLY = {"RAY_USAGE_STATS_ENABLED": "0", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
for _key, _value in LOOPBACK_ONLY.items():
    os.environ.setdefault(_key, _value)
ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'vprkit[ray]')")

from vprkit.distributed.ray_extract import ModelSpec, ray_extract, shard_plan  # noqa: E402
from vprkit.distributed.sharded_search import ShardedIndex, sharded_search  # noqa: E402

TINY = {"size": "vits14", "depth": 1}
SIZE = (56, 56)
PRE = Preprocess(image_size=SIZE)
LOCAL_RAY = dict(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1")


def _tiny_model(seed: int = 0):
    torch.manual_seed(seed)
    model = create_model("dinov2_gem", **TINY)
    model.vprkit_seed = seed
    return model


def _database(city: Path) -> Path:
    return city / "vg" / "synthetic" / "images" / "test" / "database"


def _photos(city: Path) -> list[Path]:
    return sorted(_database(city).glob("*.jpg"))


@pytest.fixture(scope="class")
def local_ray():
    """A local Ray cluster of 2 CPUs on 127.0.0.1, stopped after the class's tests."""
    assert not ray.is_initialized()
    ray.init(**LOCAL_RAY, log_to_driver=False)
    assert {n["NodeManagerAddress"] for n in ray.nodes()} == {"127.0.0.1"}
    # This module's functions (the kill hook) travel by value: workers cannot import tests/.
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    try:
        yield ray
    finally:
        ray.shutdown()


def kill_once(marker: Path, shards: Path, module, inputs) -> None:
    """A forward pre-hook: the first forward after a shard is complete kills its worker
    process (SIGKILL, as the OOM killer does), once; the marker records that it happened."""
    done = [p for p in shards.glob("shard-*/features.json") if ".incomplete" not in str(p)]
    if done and not marker.exists():
        marker.write_text(str(os.getpid()))
        os.kill(os.getpid(), signal.SIGKILL)


def test_shards_are_whole_batches_of_the_single_process_order():
    """Mixed shapes: each shard, extracted alone, is batched into exactly the batches the
    whole list makes; every image is in exactly one shard."""
    rng = np.random.default_rng(0)
    shapes = [tuple(s) for s in rng.choice([(56, 56), (56, 84), (84, 56)], size=61)]
    batches = same_shape_batches(shapes, 4)

    import vprkit.distributed.ray_extract as rx  # the plan asks input_hw: no images needed

    original = rx.input_hw
    rx.input_hw = lambda p, pre: shapes[int(p)]
    try:
        plan = shard_plan([str(i) for i in range(61)], Preprocess(image_size=56), 4, 3)
    finally:
        rx.input_hw = original
    assert sorted(np.concatenate(plan).tolist()) == list(range(61))
    rebuilt = []
    for idx in plan:
        local = same_shape_batches([shapes[i] for i in idx], 4)
        rebuilt += [sorted(int(idx[j]) for j in b) for b in local]
    assert sorted(rebuilt) == sorted(sorted(b) for b in batches)


@pytest.mark.usefixtures("local_ray")
class TestOnALocalCluster:
    def test_sharded_extraction_equals_single_process_even_with_a_worker_killed(
        self, tiny_synthetic, tmp_path
    ):
        paths = _photos(tiny_synthetic)
        model = _tiny_model()
        options = dict(preprocess=PRE, root=_database(tiny_synthetic), batch_size=4)
        one = extract(model, paths, tmp_path / "one", **options)

        calm = ray_extract(model, paths, tmp_path / "calm", shard_size=8, workers=2, **options)
        # Workers that build the model themselves (the merge checks they got its weights).
        spec = ModelSpec("dinov2_gem", "random", TINY, seed=0)
        built = ray_extract(
            model, paths, tmp_path / "spec", model_spec=spec, shard_size=16, workers=2, **options
        )
        marker = tmp_path / "killed"
        hooked = _tiny_model()
        hooked.register_forward_pre_hook(
            functools.partial(kill_once, marker, tmp_path / "killed_run.shards")
        )
        killed = ray_extract(
            hooked, paths, tmp_path / "killed_run", shard_size=8, workers=2, **options
        )
        assert marker.exists()  # a worker process was really killed mid-job
        pids_alive = int(marker.read_text())
        with pytest.raises(ProcessLookupError):
            os.kill(pids_alive, 0)
        for got in (calm, built, killed):
            assert got.names == one.names  # every photo, exactly once, in input order
            assert len(set(got.names)) == len(paths)
            np.testing.assert_array_equal(np.asarray(got.global_desc), one.global_desc)
            assert got.fingerprint == one.fingerprint
            assert got.record["ray_shards"] > 2
            assert not got.folder.with_name(got.folder.name + ".shards").exists()
        # Made the same way: the single-process stage reuses the Ray folder, and back.
        again = extract(model, paths, tmp_path / "calm", **options)
        np.testing.assert_array_equal(again.global_desc, one.global_desc)
        reused = ray_extract(model, paths, tmp_path / "one", **options)
        assert reused.folder == one.folder

    def test_local_features_are_merged_in_input_order(self, tiny_synthetic, tmp_path):
        paths = _photos(tiny_synthetic)[:10]
        torch.manual_seed(0)
        model = create_model("selavpr", backbone="dinov2_vits14", depth=1)
        options = dict(preprocess=PRE, batch_size=4, local=True)
        one = extract(model, paths, tmp_path / "one", **options)
        got = ray_extract(model, paths, tmp_path / "ray", shard_size=4, workers=2, **options)
        np.testing.assert_array_equal(np.asarray(got.global_desc), one.global_desc)
        np.testing.assert_array_equal(
            got.local[np.arange(10)].numpy(), one.local[np.arange(10)].numpy()
        )

    def test_a_map_built_on_ray_is_the_map_built_in_one_process(self, tiny_synthetic, tmp_path):
        options = dict(
            method="dinov2_gem",
            weights="random",
            model_options=TINY,
            image_size=list(SIZE),
            batch_size=4,
            chunk_size=8,
            num_workers=0,
        )
        a, _ = build_map(_database(tiny_synthetic), tmp_path / "a.map", **options)
        b, _ = build_map(_database(tiny_synthetic), tmp_path / "b.map", ray="auto", **options)
        assert a.photos == b.photos
        np.testing.assert_array_equal(a.global_descriptors(), b.global_descriptors())
        for key in ("chunks", "model", "batch_rule"):
            assert a.meta[key] == b.meta[key], key

    def test_eval_on_ray_gives_the_predictions_and_recalls_of_eval(self, tiny_synthetic, tmp_path):
        dataset = open_dataset(tiny_synthetic / "vg" / "synthetic", split="test")
        model = _tiny_model()
        config = dict(
            image_size=SIZE,
            infer_batch_size=4,
            num_workers=0,
            device="cpu",
            recall_values=(1, 5),
            save_dir=tmp_path,
        )
        a = evaluate(model, dataset, EvalConfig(run_name="one", **config))
        b = evaluate(model, dataset, EvalConfig(run_name="ray", ray="auto", **config))
        assert a.recalls == b.recalls
        np.testing.assert_array_equal(a.predictions, b.predictions)
        np.testing.assert_array_equal(a.distances, b.distances)

    def test_sharded_search_equals_flat_search_exactly(self, tmp_path):
        rng = np.random.default_rng(0)
        database = rng.standard_normal((300, 32)).astype(np.float32)
        database[200:210] = database[5]  # exact ties across shards: smaller index first
        database[250] = 0.0
        queries = np.concatenate([rng.standard_normal((20, 32)), database[[5, 7, 250]]])
        queries = queries.astype(np.float32)
        bounds = [0, 90, 91, 200, 300]
        shards = [database[a:b] for a, b in zip(bounds, bounds[1:], strict=False)]
        with ShardedIndex(shards) as index:  # one actor per shard, started once
            assert len(index) == 300
            for k in (1, 10, 95, 300):
                want_d, want_i = search(database, queries, k)
                got_d, got_i = index.search(queries, k)
                np.testing.assert_array_equal(got_i, want_i)
                np.testing.assert_array_equal(got_d, want_d)
        # From files (each actor memory-maps its own), in one call.
        for n, shard in enumerate(shards):
            np.save(tmp_path / f"{n}.npy", shard)
        files = [tmp_path / f"{n}.npy" for n in range(4)]
        got_d, got_i = sharded_search([files[:3], files[3]], queries, 12)  # 3 files, 1 shard
        want_d, want_i = search(database, queries, 12)
        np.testing.assert_array_equal(got_i, want_i)
        np.testing.assert_array_equal(got_d, want_d)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# `ray start` of a second node on this machine: Ray refuses a multi-node cluster in the
# loopback-only mode, so this node keeps 127.0.0.1 by being told that is its outward address.
SECOND_NODE = """
import sys
import ray._private.services as services
services.node_ip_address_from_perspective = lambda address=None: "127.0.0.1"
from ray.scripts.scripts import main
sys.argv = ["ray", *sys.argv[1:]]
main()
"""


@pytest.fixture
def two_node_cluster(tmp_path):
    """A head and a second node started with `ray start`, both on 127.0.0.1 only (a token
    of this test's own); yields the address and the environment to reach it; stopped after."""
    import secrets

    ray_bin = Path(sys.executable).with_name("ray")
    port = _free_port()
    env = {**os.environ, **LOOPBACK_ONLY, "RAY_AUTH_MODE": "token"}
    env["RAY_AUTH_TOKEN"] = secrets.token_hex(32)
    second = tmp_path / "second_node.py"
    second.write_text(SECOND_NODE)
    common = ["--node-ip-address", "127.0.0.1", "--disable-usage-stats", "--num-cpus", "1"]
    try:
        subprocess.run(
            [ray_bin, "start", "--head", "--port", str(port), "--include-dashboard=false",
             *common],
            env=env, check=True, capture_output=True, timeout=120,
        )  # fmt: skip
        worker_env = {**env, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "1"}
        subprocess.run(
            [sys.executable, second, "start", "--address", f"127.0.0.1:{port}", *common],
            env=worker_env, check=True, capture_output=True, timeout=120,
        )  # fmt: skip
        yield f"127.0.0.1:{port}", env
    finally:
        subprocess.run([ray_bin, "stop", "--force"], env=env, capture_output=True, timeout=120)


def test_map_build_on_two_ray_nodes_from_the_command_line(
    tiny_synthetic, tmp_path, two_node_cluster
):
    assert not ray.is_initialized()
    flags = ["--method", "dinov2_gem", "--model_option", "size=vits14", "--model_option"]
    flags += ["depth=1", "--weights", "random", "--image_size", "56", "56"]
    flags += ["--infer_batch_size", "4", "--chunk_size", "8", "--num_workers", "0"]
    photos = str(_database(tiny_synthetic))
    address, env = two_node_cluster
    check = (
        f"import ray; ray.init(address={address!r}, _node_ip_address='127.0.0.1', "
        "log_to_driver=False)\n"
        "nodes = [n['NodeManagerAddress'] for n in ray.nodes() if n['Alive']]\n"
        "assert nodes == ['127.0.0.1'] * 2, nodes\n"
    )
    subprocess.run([sys.executable, "-c", check], env=env, check=True, timeout=120)
    cli = [sys.executable, "-m", "vprkit", "map", "build", photos, *flags]
    subprocess.run([*cli, "--out", str(tmp_path / "a.map")], env=env, check=True, timeout=300)
    ray_cli = [*cli, "--out", str(tmp_path / "b.map"), "--ray", address]
    subprocess.run(ray_cli, env=env, check=True, timeout=300)
    a, b = Map.open(tmp_path / "a.map"), Map.open(tmp_path / "b.map")
    assert a.photos == b.photos
    np.testing.assert_array_equal(a.global_descriptors(), b.global_descriptors())


def test_without_ray_nothing_of_ray_is_imported():
    code = (
        "import sys, vprkit, vprkit.cli, vprkit.maps.build, vprkit.pipeline.evaluate, "
        "vprkit.evaluate, vprkit.maps.commands\n"
        "assert not [m for m in sys.modules if m == 'ray' or m.startswith('ray.')], 'ray'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
