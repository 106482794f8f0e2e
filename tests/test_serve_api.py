"""`vprkit serve`'s HTTP API, in process (FastAPI's test client) on a real map built by
`build_map`: every route, error and limit; 20 concurrent answers equal the sequential ones."""

from __future__ import annotations

import hashlib
import io
import os
import selectors
import signal
import socket
import subprocess
import sys
import threading
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import pytest

pytest.importorskip(
    "fastapi", reason="the serve extra is not installed: pip install 'vprkit[serve]'"
)
with warnings.catch_warnings():  # starlette's note that httpx2 will replace httpx
    warnings.filterwarnings("ignore", message=".*httpx2", category=UserWarning)
    from fastapi.testclient import TestClient  # noqa: E402
from PIL import Image  # noqa: E402

from vprkit.serve.app import ServeOptions, create_app  # noqa: E402
from vprkit.serve.pool import QueueFull, WorkerPool  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")
TOKEN = "t0ken-for-tests"


@pytest.fixture(scope="module")
def localizer(serve_map):
    return serve_map.localizer()


@pytest.fixture(scope="module")
def queries(tiny_synthetic) -> list[Path]:
    return sorted((tiny_synthetic / "vg" / "synthetic" / "images" / "test" / "queries").iterdir())


@contextmanager
def client(serve_map, localizer, **options):
    app = create_app(serve_map, localizer, ServeOptions(**options))
    with TestClient(app) as c:
        yield c


@pytest.fixture(scope="module")
def api(serve_map, localizer):
    with client(serve_map, localizer, workers=2, queue_size=32) as c:
        yield c


def post(c, *photos: Path | tuple[str, bytes], headers=None, **fields):
    files = []
    for p in photos:
        name, data = (p.name, p.read_bytes()) if isinstance(p, Path) else p
        files.append(("images", (name, data, "application/octet-stream")))
    data = {k: str(v) for k, v in fields.items()}
    return c.post("/api/localize", files=files, data=data, headers=headers or {})


def without_timings(answer: dict) -> dict:
    answer = dict(answer, timings=None)
    answer["results"] = [dict(r, timings=None) for r in answer["results"]]
    return answer


def png_bytes(size: tuple[int, int], color=(90, 120, 200)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, color).save(out, "PNG")
    return out.getvalue()


# ------------------------------------------------------------------------------ localize


def test_localize_answers_what_the_localizer_gives_for_the_file(api, localizer, queries):
    r = post(api, queries[0], top_k=5)
    assert r.status_code == 200, r.text
    answer = r.json()
    (result,) = answer["results"]
    (direct,) = localizer.localize([queries[0]], top_k=5)
    # The upload is decoded as vprkit reads the file: the very same answer.
    assert result["query"] == queries[0].name
    est = result["estimate"]
    assert (est["latitude"], est["longitude"], est["confidence"], est["spread_m"]) == (
        direct.latitude,
        direct.longitude,
        direct.confidence,
        direct.spread_m,
    )
    assert [m["id"] for m in result["matches"]] == [m.photo_id for m in direct.matches]
    assert [m["distance"] for m in result["matches"]] == [m.distance for m in direct.matches]
    first = result["matches"][0]
    assert first["thumbnail_url"] == f"/api/photos/{first['id']}" and first["score"] is None
    assert set(first) >= {"rank", "id", "latitude", "longitude", "east", "north", "in_group"}
    assert set(result["timings"]) == {"extract_s", "search_s", "rerank_s", "estimate_s"}
    assert {"receive_s", "queue_s", "decode_s", "localize_s", "total_s"} == set(
        answer["timings"]
    ) - {"lock_wait_s"}
    assert answer["top_k"] == 5 and answer["rerank"] is False


def test_several_photos_in_one_request_answer_in_order_as_one_by_one(api, queries):
    both = post(api, queries[1], queries[2], top_k=3).json()["results"]
    alone = [post(api, q, top_k=3).json()["results"][0] for q in queries[1:3]]
    assert [r["query"] for r in both] == [q.name for q in queries[1:3]]
    assert [dict(r, timings=None) for r in both] == [dict(r, timings=None) for r in alone]


def test_rerank_uses_the_methods_reranker_on_the_maps_local_features(api, localizer, queries):
    result = post(api, queries[0], top_k=4, rerank="true").json()["results"][0]
    (direct,) = localizer.localize([queries[0]], top_k=4, rerank=True)
    assert [m["id"] for m in result["matches"]] == [m.photo_id for m in direct.matches]
    assert [m["score"] for m in result["matches"]] == [m.score for m in direct.matches]
    assert all(m["score"] is not None for m in result["matches"])


def test_rerank_on_a_map_without_local_features_is_refused(tiny_synthetic, tmp_path, queries):
    from vprkit.maps import build_map

    plain, _ = build_map(
        tiny_synthetic / "vg" / "synthetic" / "images" / "test" / "database",
        tmp_path / "plain.map",
        method="dinov2_gem",
        weights="random",
        model_options={"size": "vits14", "depth": 1},
        image_size=[56, 56],
        num_workers=0,
    )
    with client(plain, plain.localizer()) as c:
        r = post(c, queries[0], rerank="true")
        assert r.status_code == 422 and "cannot re-rank" in r.json()["detail"]
        assert str(tmp_path) not in r.text
        assert post(c, queries[0]).json()["results"][0]["matches"]


@pytest.mark.parametrize(
    "fields, words",
    [
        ({"top_k": 0}, "top_k 0"),
        ({"top_k": 100_000}, "top_k 100000"),
        ({"top_k": "abc"}, "top_k 'abc'"),
        ({"rerank": "maybe"}, "rerank 'maybe'"),
    ],
)
def test_bad_fields_are_refused_with_422_and_a_message(api, queries, fields, words):
    r = post(api, queries[0], **fields)
    assert r.status_code == 422 and words in r.json()["detail"]


def test_twenty_concurrent_requests_answer_as_sequential_ones(api, queries):
    photos = [queries[i % len(queries)] for i in range(20)]
    sequential = [without_timings(post(api, p, top_k=5).json()) for p in photos]
    with ThreadPoolExecutor(20) as pool:
        responses = list(pool.map(lambda p: post(api, p, top_k=5), photos))
    assert [r.status_code for r in responses] == [200] * 20
    assert [without_timings(r.json()) for r in responses] == sequential


# ------------------------------------------------------------------------------ refusals


def test_a_non_image_is_refused_with_415_and_a_message(api):
    r = post(api, ("notes.txt", b"these are not pixels"))
    assert r.status_code == 415
    assert "notes.txt: not an image" in r.json()["detail"] and "JPEG" in r.json()["detail"]
    truncated = png_bytes((64, 64))[:60]
    r = post(api, ("cut.png", truncated))
    assert r.status_code == 415 and r.json()["detail"].startswith("cut.png:")
    r = api.post(
        "/api/localize", content=b'{"image": 1}', headers={"content-type": "application/json"}
    )
    assert r.status_code == 415 and "multipart/form-data" in r.json()["detail"]


def test_an_oversized_upload_is_refused_with_413_said_or_streamed(serve_map, localizer, queries):
    with client(serve_map, localizer, max_upload_bytes=20_000) as c:
        big = ("big.png", os.urandom(30_000))
        r = post(c, big)
        assert r.status_code == 413 and "over the limit of 20000" in r.json()["detail"]

        def chunks():  # no Content-Length: counted while it streams
            for _ in range(10):
                yield b"x" * 5_000

        r = c.post(
            "/api/localize",
            content=chunks(),
            headers={"content-type": "multipart/form-data; boundary=xyz"},
        )
        assert r.status_code == 413 and "over the limit of 20000 bytes" in r.json()["detail"]
        assert post(c, queries[0]).status_code == 200  # a small one still goes through


def test_too_many_pixels_are_refused_before_decoding(serve_map, localizer):
    # 4000 x 4000 of one colour: a few kilobytes that would decode into 48 MB.
    bomb = png_bytes((4000, 4000))
    assert len(bomb) < 200_000
    with client(serve_map, localizer, max_pixels=1_000_000) as c:
        r = post(c, ("bomb.png", bomb))
        assert r.status_code == 413
        assert "4000x4000 pixels, over the limit of 1000000" in r.json()["detail"]


def test_too_many_photos_in_one_request_or_none_are_refused(serve_map, localizer, queries):
    with client(serve_map, localizer, max_images=2) as c:
        assert post(c, *queries[:3]).status_code == 413
        r = c.post("/api/localize", data={"top_k": "3"}, files=[("other", ("a.jpg", b"x"))])
        assert r.status_code == 400 and "images" in r.json()["detail"]


def test_a_full_queue_answers_503_with_retry_after_at_once(serve_map, localizer, queries):
    with client(serve_map, localizer, workers=1, queue_size=1) as c:
        pool = c.app.state.service.pool
        held = [pool.admit(), pool.admit()]  # every slot: one running, one waiting
        r = post(c, queries[0])
        assert r.status_code == 503
        assert int(r.headers["Retry-After"]) >= 1 and "busy" in r.json()["detail"]
        for ticket in held:
            ticket.release()
        assert post(c, queries[0]).status_code == 200


def test_the_pool_runs_at_most_workers_plus_queue_and_refuses_the_next():
    pool = WorkerPool(workers=1, queue_size=1)
    started, release = threading.Event(), threading.Event()

    def job():
        started.set()
        release.wait(timeout=30)
        return "done"

    async def scenario():
        import asyncio

        first = asyncio.ensure_future(pool.submit(pool.admit(), job))
        await asyncio.get_running_loop().run_in_executor(None, started.wait, 30)
        second = asyncio.ensure_future(pool.submit(pool.admit(), lambda: "queued"))
        with pytest.raises(QueueFull) as busy:
            pool.admit()
        assert busy.value.retry_after_s >= 1
        release.set()
        return await first, await second

    import asyncio

    try:
        assert asyncio.run(scenario()) == ("done", "queued")
        pool.admit().release()  # free again
    finally:
        pool.close()


# ------------------------------------------------------------------------------ the map, photos


def test_map_route_says_what_the_map_holds_and_not_where_it_lives(api, serve_map):
    info = api.get("/api/map").json()
    assert info["count"] == serve_map.count and info["method"] == "selavpr"
    assert info["has_local"] is True and info["weights"]["name"] == "random"
    assert "folder" not in info and "photos_root" not in info
    assert str(serve_map.folder) not in api.get("/api/map").text
    assert info["server"]["max_top_k"] == min(100, serve_map.count)
    photos = api.get("/api/map/photos", params={"offset": 2, "limit": 3}).json()
    assert photos["count"] == serve_map.count
    assert [p["id"] for p in photos["photos"]] == [2, 3, 4]
    assert photos["photos"][0]["latitude"] == serve_map.photos[2].latitude


def test_photos_are_served_by_id_only(api, serve_map):
    r = api.get("/api/photos/3", params={"size": 128})
    assert r.status_code == 200 and r.headers["content-type"] == "image/jpeg"
    thumb = Image.open(io.BytesIO(r.content))
    original = Image.open(serve_map.photo_file(3))
    assert max(thumb.size) <= 128 and thumb.size[0] / thumb.size[1] == pytest.approx(
        original.size[0] / original.size[1], rel=0.05
    )
    assert api.get(f"/api/photos/{serve_map.count}").status_code == 404
    assert api.get("/api/photos/3", params={"size": 4000}).status_code == 422


@pytest.mark.parametrize(
    "path",
    [
        "/api/photos/..%2F..%2Fetc%2Fpasswd",
        "/api/photos/../../etc/passwd",
        "/api/photos/%2Fetc%2Fpasswd",
        "/api/photos/-1",
        "/api/photos/1.5",
        "/api/photos/0%00.jpg",
        "/static/..%2F..%2Fapp.py",
        "/vendor/leaflet/..%2F__init__.py",
    ],
)
def test_a_path_from_the_request_never_reaches_the_file_system(api, path):
    r = api.get(path)
    assert r.status_code in (404, 422)
    assert b"root:" not in r.content and b"import" not in r.content


def test_no_request_writes_into_the_map(api, serve_map, queries):
    def snapshot():
        files = sorted(p for p in serve_map.folder.rglob("*") if p.is_file())
        return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}

    before = snapshot()
    post(api, queries[0], top_k=3)
    api.get("/api/photos/1")
    for method in ("put", "delete", "patch"):
        assert getattr(api, method)("/api/map").status_code == 405
        assert getattr(api, method)("/api/photos/1").status_code == 405
    assert snapshot() == before


# ------------------------------------------------------------------------------ the token


def test_with_a_token_every_api_call_needs_it(serve_map, localizer, queries):
    with client(serve_map, localizer, token=TOKEN) as c:
        calls = [
            lambda h: c.get("/api/map", headers=h),
            lambda h: c.get("/api/map/photos", headers=h),
            lambda h: c.get("/api/photos/0", headers=h),
            lambda h: post(c, queries[0], headers=h),
        ]
        for call in calls:
            missing = call({})
            assert missing.status_code == 401 and missing.headers["WWW-Authenticate"] == "Bearer"
            assert "Authorization: Bearer" in missing.json()["detail"]
            assert call({"Authorization": "Bearer wrong"}).status_code == 403
            assert call({"Authorization": TOKEN}).status_code == 401  # not a bearer header
            assert call({"Authorization": f"Bearer {TOKEN}"}).status_code == 200
        # Health, the page and its files tell nothing about the map: no token needed.
        assert c.get("/healthz").json()["status"] == "ok"
        assert c.get("/page-config").json()["token_required"] is True
        assert c.get("/").status_code == 200


# ------------------------------------------------------------------------------ page, schema


def test_the_page_and_its_map_library_come_from_this_server(api):
    page = api.get("/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert "default-src 'self'" in page.headers["content-security-policy"]
    assert "http" not in page.text  # no CDN: every script and style is served here
    for path in (
        "/vendor/leaflet/leaflet.js",
        "/vendor/leaflet/leaflet.css",
        "/vendor/markercluster/leaflet.markercluster.js",
        "/static/app.js",
    ):
        assert api.get(path).status_code == 200, path
    assert api.get("/page-config").json() == {
        "token_required": False,
        "tiles": None,
        "tiles_attribution": "",
        "cluster_above": 300,
    }


def test_tiles_are_offered_to_the_page_and_allowed_by_its_policy(serve_map, localizer):
    tiles = "https://{s}.tiles.example.org/{z}/{x}/{y}.png"
    with client(serve_map, localizer, tiles=tiles) as c:
        assert c.get("/page-config").json()["tiles"] == tiles
        assert "https://*.tiles.example.org" in c.get("/").headers["content-security-policy"]


def test_the_openapi_schema_lists_every_route(api):
    schema = api.get("/openapi.json").json()
    assert {
        "/api/localize",
        "/api/map",
        "/api/map/photos",
        "/api/photos/{photo_id}",
        "/healthz",
    } <= set(schema["paths"])
    assert api.get("/docs").status_code == 404  # Swagger UI would need a CDN
    body = schema["paths"]["/api/localize"]["post"]["requestBody"]["content"]
    assert "images" in body["multipart/form-data"]["schema"]["properties"]


# ------------------------------------------------------------------------------ the command


def vprkit(*args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "vprkit", *args], capture_output=True, text=True, timeout=120, **kw
    )


@pytest.mark.parametrize(
    "args, status, words",
    [
        (["--tiles", "https://example.org/tiles.png"], 2, "--tiles"),
        (["--port", "70000"], 2, "--port 70000"),
        (["--workers", "0"], 2, "--workers 0"),
        (["--token", " "], 2, "--token is empty"),
    ],
)
def test_serve_refuses_bad_flags_in_one_line(serve_map, args, status, words):
    r = vprkit("serve", str(serve_map.folder), *args)
    assert r.returncode == status
    assert r.stderr.startswith("vprkit serve: error: ") and words in r.stderr
    assert r.stderr.count("\n") == 1


def test_serve_refuses_a_folder_that_is_not_a_map(tmp_path):
    r = vprkit("serve", str(tmp_path), "--port", "0")
    assert r.returncode == 1 and r.stderr.startswith("vprkit serve: error: ")
    assert "not a map folder" in r.stderr and "Traceback" not in r.stderr


def test_vprkit_serve_binds_loopback_answers_and_stops_on_ctrl_c(serve_map, queries):
    proc = subprocess.Popen(
        [sys.executable, "-m", "vprkit", "serve", str(serve_map.folder), "--port", "0"],
        stderr=subprocess.PIPE,
        text=True,
        # The default SIGINT disposition back (a background shell, as CI's, ignores it).
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        url = _wait_for_url(proc, deadline=time.monotonic() + 120)
        assert url.startswith("http://127.0.0.1:")
        import httpx

        assert httpx.get(f"{url}/healthz", timeout=30).json()["status"] == "ok"
        with open(queries[0], "rb") as f:
            r = httpx.post(f"{url}/api/localize", files={"images": f}, timeout=60)
        assert r.status_code == 200 and r.json()["results"][0]["matches"]
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _wait_for_url(proc: subprocess.Popen, deadline: float) -> str:
    """The URL `vprkit serve` prints once it listens (read from stderr with a deadline)."""
    selector = selectors.DefaultSelector()
    selector.register(proc.stderr, selectors.EVENT_READ)
    seen = []
    while time.monotonic() < deadline:
        if not selector.select(timeout=max(0.0, deadline - time.monotonic())):
            break
        line = proc.stderr.readline()
        if not line:
            break
        seen.append(line)
        if " at http" in line:
            return line.split(" at ", 1)[1].split("/ ", 1)[0]
    raise AssertionError(f"vprkit serve printed no URL: {''.join(seen)}")


def test_the_listening_socket_is_tcp_so_answers_are_not_held_by_nagle():
    from vprkit.serve.server import bind

    # asyncio sets TCP_NODELAY on accepted sockets only when the listener says it is TCP.
    sock = bind("127.0.0.1", 0)
    try:
        assert sock.proto == socket.IPPROTO_TCP and sock.getsockname()[0] == "127.0.0.1"
    finally:
        sock.close()
