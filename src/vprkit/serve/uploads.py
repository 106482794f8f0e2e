"""Uploads: the request body read with a size limit, its multipart parts, and each photo
decoded (in a worker, not on the event loop) with a pixel limit.

Nothing here touches the file system: a part's file name is only a label for the answer.
"""

from __future__ import annotations

import asyncio
import io
import posixpath
from collections.abc import AsyncIterator
from dataclasses import dataclass

from PIL import Image, ImageOps, UnidentifiedImageError
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import ClientDisconnect, Request

from vprkit.data.images import to_rgb

# What Pillow may try: the photo formats cameras and phones write. Naming them keeps Pillow's
# rarer decoders (and their bugs) away from bytes a stranger sent.
FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "TIFF", "GIF")
IMAGE_FIELD = "images"
FIELDS = ("top_k", "rerank")


class Rejected(Exception):
    """A request refused with an HTTP status and a message that says what to do."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or {}


@dataclass(frozen=True)
class Upload:
    name: str  # a label only (the part's file name, without folders)
    data: bytes


async def read_body(request: Request, max_bytes: int, timeout_s: float) -> bytes:
    """The whole body, refused with 413 past `max_bytes` (before reading it when the client
    says its length; while reading when it does not) and 408 when it takes over
    `timeout_s` (a slow client would hold a worker slot)."""
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > max_bytes:
        raise Rejected(413, f"the upload is {int(length)} bytes, over the limit of {max_bytes}")

    async def collect() -> bytes:
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > max_bytes:
                raise Rejected(413, f"the upload is over the limit of {max_bytes} bytes")
        return bytes(body)

    try:
        return await asyncio.wait_for(collect(), timeout_s)
    except TimeoutError:
        raise Rejected(408, f"the upload took over {timeout_s:g} s; send it faster") from None
    except ClientDisconnect:
        raise Rejected(400, "the client went away during the upload") from None


async def parse_form(request: Request, body: bytes, max_images: int) -> tuple[list[Upload], dict]:
    """The photos (field `images`, one or more) and the other fields of a multipart body."""
    content_type = request.headers.get("content-type", "")
    if not content_type.startswith("multipart/form-data"):
        raise Rejected(
            415,
            f"send the photos as multipart/form-data (field {IMAGE_FIELD!r}), not "
            f"{content_type or 'a body without a content type'}",
        )

    async def stream() -> AsyncIterator[bytes]:
        yield body

    parser = MultiPartParser(
        request.headers, stream(), max_files=max_images, max_fields=len(FIELDS)
    )
    try:
        form = await parser.parse()
    except MultiPartException as e:
        raise Rejected(413 if "Too many" in e.message else 400, f"{e.message}") from None
    uploads, fields = [], {}
    try:
        for key, value in form.multi_items():
            if isinstance(value, UploadFile):
                if key != IMAGE_FIELD:
                    raise Rejected(
                        400, f"unexpected file field {key!r}; send photos as {IMAGE_FIELD!r}"
                    )
                name = posixpath.basename((value.filename or "").replace("\\", "/"))[:200]
                uploads.append(Upload(name or f"image-{len(uploads) + 1}", await value.read()))
            elif key in FIELDS:
                fields[key] = value
            else:
                raise Rejected(
                    400, f"unknown field {key!r}; the fields are {IMAGE_FIELD}, top_k, rerank"
                )
    finally:
        await form.close()
    if not uploads:
        raise Rejected(
            400, f"no photo in the request; send one or more in the field {IMAGE_FIELD!r}"
        )
    return uploads, fields


def decode_image(upload: Upload, max_pixels: int) -> Image.Image:
    """An RGB image, read as `vprkit.data.images.load_image` reads a file (EXIF orientation
    applied), so an uploaded photo gives the answer its file would. The pixel count is checked
    from the header, before any pixel is decoded: a small file cannot expand into gigabytes."""
    if not upload.data:
        raise Rejected(415, f"{upload.name}: empty file, not an image")
    try:
        im = Image.open(io.BytesIO(upload.data), formats=FORMATS)
    except Image.DecompressionBombError:
        raise Rejected(413, f"{upload.name}: too many pixels (a decompression bomb?)") from None
    except (UnidentifiedImageError, OSError, SyntaxError):
        raise Rejected(
            415, f"{upload.name}: not an image vprkit reads ({', '.join(FORMATS)})"
        ) from None
    with im:
        width, height = im.size
        if width * height > max_pixels:
            raise Rejected(
                413, f"{upload.name}: {width}x{height} pixels, over the limit of {max_pixels}"
            )
        try:
            im.load()
            return to_rgb(ImageOps.exif_transpose(im))
        except Exception as e:  # Pillow's decoders raise many types on broken data
            raise Rejected(415, f"{upload.name}: the image cannot be decoded ({e})") from None
