"""The FastAPI application: the service's state, the token check, security headers, the
page and its map library (from the XStatic packages, served as files, never from a CDN)."""

from __future__ import annotations

import secrets
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated
from urllib.parse import urlsplit

from fastapi import Depends, FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from fastapi.staticfiles import StaticFiles

import vprkit
from vprkit.serve.pool import QueueFull, WorkerPool
from vprkit.serve.thumbnails import Thumbnails
from vprkit.serve.uploads import Rejected

STATIC = Path(__file__).parent / "static"


@dataclass(frozen=True)
class ServeOptions:
    token: str | None = None
    tiles: str | None = None  # an XYZ template, {z}/{x}/{y}
    tiles_attribution: str = ""
    workers: int = 1
    queue_size: int = 8
    max_upload_bytes: int = 20 * 1024 * 1024
    max_pixels: int = 40_000_000
    max_images: int = 8
    max_top_k: int = 100
    upload_timeout_s: float = 30.0
    cluster_above: int = 300  # the page clusters the map's photos when it has more


class Service:
    """What every request shares: the map, its model (loaded once), the worker pool."""

    def __init__(self, map_, localizer, options: ServeOptions):
        self.map = map_
        self.localizer = localizer
        self.options = options
        # The Localizer is not thread-safe: workers decode photos in parallel, one encodes.
        self.model_lock = threading.Lock()
        self.pool = WorkerPool(options.workers, options.queue_size)
        self.thumbnails = Thumbnails(map_.photo_file)


def vendor_dirs() -> dict[str, Path]:
    """Leaflet and Leaflet.markercluster, as the `serve` extra installs them."""
    import xstatic.pkg.leaflet as leaflet
    import xstatic.pkg.leaflet_markercluster as markercluster

    return {"leaflet": Path(leaflet.BASE_DIR), "markercluster": Path(markercluster.BASE_DIR)}


def _security_headers(tiles: str | None) -> dict[str, str]:
    img = "'self' blob: data:"
    if tiles:  # the browser fetches the user's tiles itself: allow that origin, no other
        parts = urlsplit(tiles)
        img += f" {parts.scheme}://{parts.netloc.replace('{s}', '*')}"
    return {
        "X-Content-Type-Options": "nosniff",
        "Referrer-Policy": "no-referrer",
        "X-Frame-Options": "DENY",
        "Content-Security-Policy": (
            f"default-src 'self'; img-src {img}; style-src 'self' 'unsafe-inline'; "
            "script-src 'self'; frame-ancestors 'none'"
        ),
    }


def create_app(map_, localizer, options: ServeOptions | None = None) -> FastAPI:
    """The service for an opened `vprkit.maps.Map` and its `Localizer`."""
    from vprkit.serve import routes

    options = options or ServeOptions()
    service = Service(map_, localizer, options)
    app = FastAPI(
        title="vprkit localization service",
        version=vprkit.__version__,
        description="Send a photo, get the position where it was taken, from a vprkit map.",
        lifespan=_lifespan,
        # Swagger UI and ReDoc load their scripts from a CDN: offline (and under this CSP)
        # they cannot work, so only the schema itself is served, at /openapi.json.
        docs_url=None,
        redoc_url=None,
    )
    app.state.service = service
    headers = _security_headers(options.tiles)

    @app.middleware("http")
    async def add_headers(request: Request, call_next):
        response = await call_next(request)
        for key, value in headers.items():
            response.headers.setdefault(key, value)
        return response

    @app.exception_handler(Rejected)
    async def rejected(request: Request, err: Rejected):
        return JSONResponse({"detail": err.message}, err.status, headers=err.headers)

    @app.exception_handler(QueueFull)
    async def busy(request: Request, err: QueueFull):
        retry = {"Retry-After": str(err.retry_after_s)}
        return JSONResponse({"detail": str(err)}, 503, headers=retry)

    app.include_router(routes.api, prefix="/api", dependencies=[Depends(require_token)])
    app.include_router(routes.public)
    for name, folder in vendor_dirs().items():
        app.mount(f"/vendor/{name}", StaticFiles(directory=folder), name=f"vendor-{name}")
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/", include_in_schema=False)
    def page() -> FileResponse:
        return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})

    return app


async def _lifespan(app: FastAPI):
    yield
    app.state.service.pool.close()


_bearer = HTTPBearer(auto_error=False, description="the server's --token")


def require_token(
    request: Request, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]
) -> None:
    """With `--token`, every /api call carries `Authorization: Bearer TOKEN`."""
    token = request.app.state.service.options.token
    if token is None:
        return
    if credentials is None:
        raise Rejected(
            401,
            "this server needs a token: send the header Authorization: Bearer <token>",
            {"WWW-Authenticate": "Bearer"},
        )
    # Constant time: the comparison does not tell how much of a guess was right.
    if not secrets.compare_digest(credentials.credentials.encode(), token.encode()):
        raise Rejected(403, "wrong token", {"WWW-Authenticate": 'Bearer error="invalid_token"'})
