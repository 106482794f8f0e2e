"""Maps of your own geotagged photos, and localization against them.

- `vprkit.maps.positions`: where a photo was taken (a CSV table, EXIF GPS, VG names), UTM.
- `vprkit.maps.folder`: the map folder format; `Map.open(folder)`.
- `vprkit.maps.build`: `build_map(photos, out, method=...)`, `add_to_map(map, photos)`.
- `vprkit.maps.localize`: `Map.localizer().localize(images)` -> `Localization`s.
- `vprkit.maps.estimate`: the position estimate and its confidence.
- `vprkit.maps.report`: what `vprkit localize` writes, and the error metrics.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "Map": "vprkit.maps.folder",
    "MapPhoto": "vprkit.maps.folder",
    "build_map": "vprkit.maps.build",
    "add_to_map": "vprkit.maps.build",
    "Localizer": "vprkit.maps.localize",
    "Localization": "vprkit.maps.localize",
    "Match": "vprkit.maps.localize",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    # Lazy: `vprkit.maps.positions` (used by vprkit synth) must not import torch.
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'vprkit.maps' has no attribute {name!r}")
