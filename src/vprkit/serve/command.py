"""`vprkit serve MAP`: the localization service and its map page (vprkit.serve)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from urllib.parse import urlsplit

from vprkit.errors import UsageError, VprkitError

TOKEN_ENV = "VPRKIT_SERVE_TOKEN"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Serve a map over HTTP: POST a photo to /api/localize and get its position; the page "
        "at / shows it on the map. The API's OpenAPI schema is at /openapi.json."
    )
    parser.add_argument("map", type=Path, help="the map folder (vprkit map build)")
    net = parser.add_argument_group("network")
    net.add_argument(
        "--host", default="127.0.0.1", help="address to bind; 127.0.0.1: this machine only"
    )
    net.add_argument("--port", type=int, default=8000, help="port (0: any free one)")
    net.add_argument(
        "--token",
        help=f"every /api call must send 'Authorization: Bearer TOKEN'; default: ${TOKEN_ENV} "
        "when set (which keeps it out of the process list), else no token is asked",
    )
    page = parser.add_argument_group("page")
    page.add_argument(
        "--tiles",
        help="XYZ tile URL template for the page's background, e.g. "
        "https://tiles.example.org/{z}/{x}/{y}.png (default: a plain metric grid, offline)",
    )
    page.add_argument(
        "--tiles_attribution", "--tiles-attribution", help="credit shown for the tiles"
    )
    model = parser.add_argument_group("model")
    model.add_argument(
        "--weights", help="weights file for the map's model (default: as the map records)"
    )
    model.add_argument(
        "--photos_root",
        "--photos-root",
        type=Path,
        help="where the map's photos are now, if they moved",
    )
    model.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    limits = parser.add_argument_group("limits")
    limits.add_argument(
        "--workers",
        type=int,
        default=1,
        help="worker threads (decoding runs in parallel; the model one at a time)",
    )
    limits.add_argument(
        "--queue",
        type=int,
        default=8,
        help="requests that may wait; one more is answered 503 with Retry-After",
    )
    limits.add_argument(
        "--max_upload_mb", "--max-upload-mb", type=float, default=20.0, help="largest request body"
    )
    limits.add_argument(
        "--max_pixels",
        "--max-pixels",
        type=int,
        default=40_000_000,
        help="largest photo, width x height",
    )
    limits.add_argument(
        "--max_images", "--max-images", type=int, default=8, help="photos per request"
    )
    parser.add_argument(
        "--log_level",
        "--log-level",
        default="info",
        choices=["debug", "info", "warning", "error"],
        help="uvicorn's log level",
    )


def _check(args) -> None:
    if args.token is None:  # read here, not as the flag's default: --help must not show it
        args.token = os.environ.get(TOKEN_ENV)
    if not 0 <= args.port <= 65535:
        raise UsageError(f"--port {args.port}: give 0 to 65535")
    for flag in ("workers", "max_images", "max_pixels"):
        if getattr(args, flag) < 1:
            raise UsageError(f"--{flag} {getattr(args, flag)}: give 1 or more")
    if args.queue < 0 or args.max_upload_mb <= 0:
        raise UsageError("--queue must be 0 or more and --max_upload_mb above 0")
    if args.token is not None and not args.token.strip():
        raise UsageError("--token is empty; give a token, or leave it out")
    if args.tiles is not None:
        parts = urlsplit(args.tiles)
        missing = [p for p in ("{z}", "{x}", "{y}") if p not in args.tiles]
        if parts.scheme not in ("http", "https") or not parts.netloc or missing:
            raise UsageError(
                f"--tiles {args.tiles!r}: give an http(s) URL template with {{z}}, {{x}} and {{y}}"
            )


def run(args) -> int:
    _check(args)
    try:
        from vprkit.serve import server
        from vprkit.serve.app import ServeOptions, create_app
    except ModuleNotFoundError as e:
        raise VprkitError(
            f"vprkit serve needs {e.name}, which is not installed: pip install 'vprkit[serve]'"
        ) from None
    from vprkit.maps import Map

    m = Map.open(args.map, photos_root=args.photos_root)
    options = ServeOptions(
        token=args.token,
        tiles=args.tiles,
        tiles_attribution=args.tiles_attribution or "",
        workers=args.workers,
        queue_size=args.queue,
        max_upload_bytes=int(args.max_upload_mb * 1024 * 1024),
        max_pixels=args.max_pixels,
        max_images=args.max_images,
    )
    if not server.is_loopback(args.host) and args.token is None:
        print(
            f"vprkit serve: warning: --host {args.host} lets other machines in, and no --token "
            "is asked: anyone who reaches it can use the service",
            file=sys.stderr,
        )
    sock = server.bind(args.host, args.port)  # before the model loads: a taken port fails fast
    try:
        app = create_app(m, m.localizer(device=args.device, weights=args.weights), options)
        print(
            f"vprkit serve: {m.folder} ({m.count} photos, {m.method}) at {server.url_of(sock)}/ "
            f"(API schema: /openapi.json); Ctrl-C stops",
            file=sys.stderr,
            flush=True,
        )
        server.serve_forever(app, sock, log_level=args.log_level)
    except KeyboardInterrupt:  # uvicorn has shut down cleanly; Ctrl-C is how a server stops
        pass
    finally:
        sock.close()
    return 0
