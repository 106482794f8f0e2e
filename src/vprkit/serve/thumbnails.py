"""Thumbnails of a map's photos, by photo id only: the id picks a row of the map's photos
table and the map names the file, so nothing a request sends reaches the file system."""

from __future__ import annotations

import io
import threading
from collections import OrderedDict

from PIL import Image, ImageOps

SIZES = (64, 128, 256, 512)  # the few sizes asked for, so the cache cannot be flooded


class Thumbnails:
    def __init__(self, photo_file, cache_items: int = 1024, quality: int = 80):
        self._photo_file = photo_file  # Map.photo_file: id -> Path (IndexError for a bad id)
        self._cache: OrderedDict[tuple[int, int], bytes] = OrderedDict()
        self._cache_items = cache_items
        self._quality = quality
        self._lock = threading.Lock()

    def jpeg(self, photo_id: int, size: int) -> bytes:
        """The photo, fitted into size x size, as JPEG bytes (cached, least recently used
        out first). IndexError for an id the map does not have."""
        key = (photo_id, size)
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
        data = self._render(self._photo_file(photo_id), size)
        with self._lock:
            self._cache[key] = data
            if len(self._cache) > self._cache_items:
                self._cache.popitem(last=False)
        return data

    def _render(self, path, size: int) -> bytes:
        with Image.open(path) as im:
            im.draft("RGB", (size, size))  # JPEG: decode at a reduced scale, much faster
            im = ImageOps.exif_transpose(im).convert("RGB")
            im.thumbnail((size, size))
            out = io.BytesIO()
            im.save(out, "JPEG", quality=self._quality)
        return out.getvalue()
