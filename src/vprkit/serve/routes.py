"""The routes: /api/localize, /api/map, /api/map/photos, /api/photos/{id} (behind the token
when there is one), and /healthz, /page-config (public, they tell nothing about the map)."""

from __future__ import annotations

import time

from fastapi import APIRouter, Path, Query, Request
from fastapi.responses import Response

from vprkit.errors import VprkitError
from vprkit.serve.thumbnails import SIZES
from vprkit.serve.uploads import IMAGE_FIELD, Rejected, decode_image, parse_form, read_body

api = APIRouter()
public = APIRouter()

# Server paths stay on the server: the map's info without where it lives.
PRIVATE_INFO = ("folder", "photos_root")

LOCALIZE_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": [IMAGE_FIELD],
                    "properties": {
                        IMAGE_FIELD: {
                            "type": "array",
                            "items": {"type": "string", "format": "binary"},
                            "description": "one or more photos (JPEG, PNG, WebP, BMP, TIFF)",
                        },
                        "top_k": {"type": "integer", "minimum": 1, "default": 10},
                        "rerank": {"type": "boolean", "default": False},
                    },
                }
            }
        },
    }
}


def _service(request: Request):
    return request.app.state.service


@public.get("/healthz")
def healthz(request: Request) -> dict:
    pool = _service(request).pool
    return {"status": "ok", "workers": pool.workers, "queue_size": pool.queue_size}


@public.get("/page-config", include_in_schema=False)
def page_config(request: Request) -> dict:
    """What the page needs before it may call the API: whether to ask for a token, tiles."""
    options = _service(request).options
    return {
        "token_required": options.token is not None,
        "tiles": options.tiles,
        "tiles_attribution": options.tiles_attribution,
        "cluster_above": options.cluster_above,
    }


@api.get("/map")
def map_info(request: Request) -> dict:
    """What the map holds and what made it, and this server's limits."""
    service = _service(request)
    info = {k: v for k, v in service.map.info().items() if k not in PRIVATE_INFO}
    o = service.options
    info["server"] = {
        "workers": o.workers,
        "queue_size": o.queue_size,
        "max_upload_bytes": o.max_upload_bytes,
        "max_pixels": o.max_pixels,
        "max_images": o.max_images,
        "max_top_k": min(o.max_top_k, service.map.count),
        "tiles": o.tiles,
    }
    return info


@api.get("/map/photos")
def map_photos(
    request: Request,
    offset: int = Query(0, ge=0),
    limit: int = Query(10_000, ge=1, le=50_000),
) -> dict:
    """The map's photos and their positions, in id order, a page at a time."""
    m = _service(request).map
    photos = [
        {
            "id": p.id,
            "path": p.path,
            "latitude": p.latitude,
            "longitude": p.longitude,
            "east": p.east,
            "north": p.north,
            "heading": p.heading,
            "thumbnail_url": f"/api/photos/{p.id}",
        }
        for p in m.photos[offset : offset + limit]
    ]
    return {"count": m.count, "offset": offset, "photos": photos}


@api.get(
    "/photos/{photo_id}",
    response_class=Response,
    responses={200: {"content": {"image/jpeg": {}}}, 404: {"description": "no such photo"}},
)
def photo(
    request: Request,
    photo_id: int = Path(..., ge=0, description="the photo's id in the map"),
    size: int = Query(256, description=f"the longer side in pixels, one of {SIZES}"),
) -> Response:
    """A thumbnail of a map photo, by id (no path from the request reaches the disk)."""
    if size not in SIZES:
        raise Rejected(422, f"size {size}: give one of {', '.join(map(str, SIZES))}")
    try:
        data = _service(request).thumbnails.jpeg(photo_id, size)
    except IndexError:
        raise Rejected(
            404, f"no photo {photo_id}; the map has ids 0 to {_service(request).map.count - 1}"
        ) from None
    except VprkitError as e:  # the file is gone from disk
        raise Rejected(404, str(e)) from None
    return Response(
        data, media_type="image/jpeg", headers={"Cache-Control": "private, max-age=3600"}
    )


@api.post("/localize", openapi_extra=LOCALIZE_BODY)
async def localize(request: Request) -> dict:
    """Where each photo was taken: the estimate (latitude, longitude, confidence, the radius
    of its circle), the matches with their positions, scores and thumbnails, and timings."""
    start = time.perf_counter()
    service = _service(request)
    o = service.options
    # A worker slot first, before the body is read: a full queue answers 503 at once.
    with service.pool.admit() as ticket:
        body = await read_body(request, o.max_upload_bytes, o.upload_timeout_s)
        uploads, fields = await parse_form(request, body, o.max_images)
        top_k = _top_k(fields.get("top_k"), min(o.max_top_k, service.map.count))
        rerank = _flag(fields.get("rerank"), "rerank")
        if rerank and not service.map.has_local:
            raise Rejected(
                422, "this map keeps no local features, so it cannot re-rank; send rerank=false"
            )
        received = time.perf_counter()
        results, timings = await service.pool.submit(
            ticket, _localize_job, service, uploads, top_k, rerank
        )
    timings["receive_s"] = received - start
    timings["queue_s"] = timings.pop("started") - received
    timings["total_s"] = time.perf_counter() - start
    return {
        "results": [_result(r) for r in results],
        "top_k": top_k,
        "rerank": rerank,
        "timings": timings,
    }


def _localize_job(service, uploads, top_k: int, rerank: bool):
    """On a worker thread: decode (in parallel with other workers), then localize (one at a
    time, the Localizer being single-threaded)."""
    started = time.perf_counter()
    images = [decode_image(u, service.options.max_pixels) for u in uploads]
    decoded = time.perf_counter()
    with service.model_lock:
        locked = time.perf_counter()
        try:
            results = service.localizer.localize(
                images, names=[u.name for u in uploads], top_k=top_k, rerank=rerank
            )
        except VprkitError as e:  # e.g. re-ranking asked of a method without a re-ranker
            # Said without the map's folder: server paths stay on the server.
            raise Rejected(422, str(e).replace(str(service.map.folder), "the map")) from None
    done = time.perf_counter()
    return results, {
        "started": started,
        "decode_s": decoded - started,
        "lock_wait_s": locked - decoded,
        "localize_s": done - locked,
    }


def _result(loc) -> dict:
    return {
        "query": loc.query,
        "estimate": {
            "latitude": loc.latitude,
            "longitude": loc.longitude,
            "east": loc.east,
            "north": loc.north,
            "confidence": loc.confidence,
            "spread_m": loc.spread_m,
        },
        "matches": [
            {
                "rank": m.rank,
                "id": m.photo_id,
                "path": m.path,
                "latitude": m.latitude,
                "longitude": m.longitude,
                "east": m.east,
                "north": m.north,
                "distance": m.distance,
                "score": m.score,
                "in_group": m.in_group,
                "thumbnail_url": f"/api/photos/{m.photo_id}",
            }
            for m in loc.matches
        ],
        "timings": dict(loc.timings),
    }


def _top_k(value, most: int) -> int:
    if value is None:
        return min(10, most)
    try:
        k = int(value)
    except ValueError:
        raise Rejected(422, f"top_k {value!r}: give a whole number from 1 to {most}") from None
    if not 1 <= k <= most:
        raise Rejected(422, f"top_k {k}: give a whole number from 1 to {most}")
    return k


def _flag(value, name: str) -> bool:
    if value is None:
        return False
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off", ""):
        return False
    raise Rejected(422, f"{name} {value!r}: give true or false")
