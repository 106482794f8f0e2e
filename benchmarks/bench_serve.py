"""`vprkit serve` under load: N concurrent clients on 127.0.0.1 against `localize` called
directly in one process, on a small synthetic map; and the server's memory over many requests.

The server runs as `vprkit serve` in its own process (so the clients do not share its GIL),
bound to 127.0.0.1 on a free port; its capacity is --workers running + --queue waiting, so
with N above that some answers are 503 (each must carry Retry-After; anything else is an
error). Every loop is bounded by a request count and a time limit.

    python benchmarks/bench_serve.py [--clients 1 4 16 64] [--requests 200] [--seconds 30]
    python benchmarks/bench_serve.py --soak 10000      # memory over 10,000 requests
"""

from __future__ import annotations

import argparse
import asyncio
import json
import selectors
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

MIB = 1 << 20


def build_map(folder: Path, method: str, options: dict, size: int) -> tuple[Path, list[Path]]:
    from vprkit.data.synthetic import generate
    from vprkit.maps import build_map as build

    city = generate(
        folder / "city",
        image_size=(size, size),
        train_places=8,
        val_queries=8,
        test_queries=32,
        difficulty="easy",
        eval_streets=1,
        vg_train_queries=0,
        vg_train_streets=1,
    )
    test = city / "vg" / "synthetic" / "images" / "test"
    build(
        test / "database",
        folder / "city.map",
        method=method,
        weights="random",
        model_options=options,
        image_size=[size, size],
        num_workers=0,
    )
    return folder / "city.map", sorted((test / "queries").iterdir())


def percentiles(latencies: list[float]) -> dict:
    if not latencies:
        return {"p50_ms": None, "p95_ms": None, "p99_ms": None}
    p50, p95, p99 = np.percentile(np.asarray(latencies) * 1000, [50, 95, 99])
    return {"p50_ms": round(p50, 1), "p95_ms": round(p95, 1), "p99_ms": round(p99, 1)}


def direct(map_folder: Path, queries: list[Path], requests: int, seconds: float) -> list[dict]:
    """The baseline, in a fresh process as the server is: decode + `Localizer.localize`,
    one after another (what one request costs without HTTP, queue or concurrency), from the
    main thread as a script calls it, and from a second thread as the server's worker does
    (on a busy 2-core machine torch's intra-op threads make the two differ a lot)."""
    cmd = [sys.executable, __file__, "--_direct", str(map_folder), *map(str, queries)]
    cmd += ["--requests", str(requests), "--seconds", str(seconds)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def direct_child(map_folder: Path, photos: list[bytes], requests: int, seconds: float) -> list:
    import threading

    from vprkit.maps import Map
    from vprkit.serve.uploads import Upload, decode_image

    localizer = Map.open(map_folder).localizer()

    def one(i: int) -> None:
        image = decode_image(Upload("q.jpg", photos[i % len(photos)]), 40_000_000)
        localizer.localize([image], top_k=10)

    def loop(label: str, rows: list) -> None:
        for i in range(10):  # warm up, as the server is before it is measured
            one(i)
        latencies = []
        start = time.perf_counter()
        for i in range(requests):
            t0 = time.perf_counter()
            one(i)
            latencies.append(time.perf_counter() - t0)
            if time.perf_counter() - start > seconds:
                break
        wall = time.perf_counter() - start
        rows.append(
            {"clients": label, "ok": len(latencies), "rps": round(len(latencies) / wall, 1)}
            | percentiles(latencies)
        )

    rows: list = []
    loop("direct", rows)
    worker = threading.Thread(target=loop, args=("direct-t", rows))
    worker.start()
    worker.join()
    return rows


class Server:
    """`vprkit serve` in a child process, on 127.0.0.1 at a free port."""

    def __init__(self, map_folder: Path, workers: int, queue: int):
        cmd = [sys.executable, "-m", "vprkit", "serve", str(map_folder), "--port", "0"]
        cmd += ["--workers", str(workers), "--queue", str(queue), "--log_level", "warning"]
        self.proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
        self.url = self._wait_for_url(time.monotonic() + 180)

    def _wait_for_url(self, deadline: float) -> str:
        selector = selectors.DefaultSelector()
        selector.register(self.proc.stderr, selectors.EVENT_READ)
        while time.monotonic() < deadline and selector.select(deadline - time.monotonic()):
            line = self.proc.stderr.readline()
            if not line:
                break
            if " at http" in line:
                return line.split(" at ", 1)[1].split("/ ", 1)[0]
        self.close()
        raise RuntimeError("vprkit serve did not start")

    def rss(self) -> int:
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        return 0

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


async def load(
    url: str, photos: list[bytes], clients: int, requests: int, seconds: float, on_done=None
):
    """`clients` concurrent loops sharing a budget of `requests` and `seconds`."""
    import httpx

    latencies, statuses, errors = [], {}, []
    budget = iter(range(requests))
    deadline = time.perf_counter() + seconds
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)

    async def client(c: httpx.AsyncClient):
        for i in budget:
            if time.perf_counter() > deadline:
                return
            t0 = time.perf_counter()
            try:
                files = {"images": ("q.jpg", photos[i % len(photos)], "image/jpeg")}
                r = await c.post(f"{url}/api/localize", files=files, data={"top_k": "10"})
            except httpx.HTTPError as e:
                errors.append(type(e).__name__)
                continue
            statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
            if r.status_code == 200:
                latencies.append(time.perf_counter() - t0)
            elif r.status_code != 503 or "retry-after" not in r.headers:
                errors.append(f"{r.status_code}: {r.text[:80]}")
            if on_done is not None:
                on_done(i)

    start = time.perf_counter()
    async with httpx.AsyncClient(timeout=60, limits=limits) as c:
        await asyncio.gather(*(client(c) for _ in range(clients)))
    wall = time.perf_counter() - start
    ok = statuses.get(200, 0)
    return {
        "clients": clients,
        "ok": ok,
        "rps": round(ok / wall, 1),
        **percentiles(latencies),
        "503": statuses.get(503, 0),
        "errors": len(errors),
        "error_examples": errors[:3],
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16, 64])
    parser.add_argument("--requests", type=int, default=200, help="per client count (at most)")
    parser.add_argument("--seconds", type=float, default=30.0, help="per client count (at most)")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument(
        "--queue", type=int, default=16, help="the server's queue (capacity: workers + queue)"
    )
    parser.add_argument(
        "--soak",
        type=int,
        default=0,
        help="then this many requests, 4 clients, reading the server's memory",
    )
    parser.add_argument("--method", default="dinov2_gem")
    parser.add_argument("--size", type=int, default=56, help="photos and network input, pixels")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument("--_direct", nargs="+", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._direct:  # the child process of `direct`
        photos = [p.read_bytes() for p in args._direct[1:]]
        print(json.dumps(direct_child(args._direct[0], photos, args.requests, args.seconds)))
        return
    if max(args.clients) > 256 or args.requests > 100_000 or args.soak > 100_000:
        parser.error("bounded: at most 256 clients and 100,000 requests")

    with tempfile.TemporaryDirectory() as tmp:
        options = {"size": "vits14", "depth": 1} if args.method.startswith("dinov2") else {}
        map_folder, queries = build_map(Path(tmp), args.method, options, args.size)
        photos = [q.read_bytes() for q in queries]
        rows = direct(map_folder, queries, args.requests, args.seconds)
        server = Server(map_folder, args.workers, args.queue)
        soak = None
        try:
            asyncio.run(load(server.url, photos, 1, 10, 30))  # warm up
            for n in args.clients:
                rows.append(asyncio.run(load(server.url, photos, n, args.requests, args.seconds)))
            if args.soak:
                readings = []

                def read(i: int) -> None:
                    if i % max(1, args.soak // 20) == 0:
                        readings.append((i, server.rss()))

                soak_row = asyncio.run(load(server.url, photos, 4, args.soak, 3600, on_done=read))
                mib = [r / MIB for _, r in readings]
                soak = {
                    "requests": soak_row["ok"] + soak_row["503"] + soak_row["errors"],
                    "ok": soak_row["ok"],
                    "errors": soak_row["errors"],
                    "rss_mib_early": round(mib[1] if len(mib) > 1 else mib[0], 1),
                    "rss_mib_last": round(mib[-1], 1),
                    "rss_mib_max": round(max(mib), 1),
                    "readings_mib": [round(m, 1) for m in mib],
                }
        finally:
            server.close()

    capacity = args.workers + args.queue
    print(
        f"vprkit serve, {args.method} at {args.size}px, workers {args.workers}, "
        f"queue {args.queue} (capacity {capacity})"
    )
    print(
        f"{'clients':>8} {'ok':>6} {'req/s':>7} {'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8} "
        f"{'503':>5} {'errors':>6}"
    )
    for r in rows:
        print(
            f"{r['clients']!s:>8} {r['ok']:>6} {r['rps']:>7} {r['p50_ms']!s:>8} {r['p95_ms']!s:>8} "
            f"{r['p99_ms']!s:>8} {r.get('503', '-')!s:>5} {r.get('errors', '-')!s:>6}"
        )
        for example in r.get("error_examples", []):
            print(f"{'':>8} error: {example}")
    if soak:
        print(
            f"soak: {soak['requests']} requests ({soak['errors']} errors); server RSS "
            f"{soak['rss_mib_early']} MiB after 5%, {soak['rss_mib_last']} MiB at the end, "
            f"max {soak['rss_mib_max']} MiB"
        )
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "soak": soak}, indent=2))


if __name__ == "__main__":
    main()
