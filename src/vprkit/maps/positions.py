"""Where each photo of a map was taken: from a CSV table, the photo's EXIF GPS or a VG name.

Sources, in the order :func:`collect_positions` prefers them:

- ``table``: a CSV with columns ``path, latitude, longitude`` and optional ``heading,
  altitude, time`` (:func:`read_positions_table`); a bad table is refused as a whole.
- ``exif``: the GPS block of the photo's EXIF (:func:`read_exif_position`).
- ``name``: a VG-style name ``@utm_east@utm_north@zone@letter@...`` (:func:`position_from_name`).

EXIF and name readers never raise for a photo that merely lacks a usable position: they
return a ``(position, reason)`` pair, exactly one of them ``None``, so a map build can list
the photos it left out and why. Positions are WGS84 degrees; :func:`to_metric` projects a
whole map into one UTM zone (pyproj) for metric distances.
"""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal, NamedTuple

import numpy as np
import pyproj
from PIL import Image, UnidentifiedImageError

from vprkit.errors import MissingInputError, VprkitError

__all__ = [
    "Position",
    "UtmZone",
    "collect_positions",
    "exif_gps",
    "geodesic_distance_m",
    "position_from_name",
    "read_exif_position",
    "read_positions_table",
    "project",
    "to_metric",
    "unproject",
    "utm_zone",
]

Source = Literal["table", "exif", "name"]
Result = tuple["Position | None", "str | None"]


@dataclass(frozen=True)
class Position:
    """Where a photo was taken (WGS84), and which source said so."""

    latitude: float  # degrees, north positive
    longitude: float  # degrees, east positive
    altitude: float | None = None  # metres above sea level
    heading: float | None = None  # degrees clockwise from north, in [0, 360)
    time: str | None = None  # ISO 8601, as the source gave it
    source: Source = "table"


def _coordinates_problem(latitude: float, longitude: float) -> str | None:
    if not (math.isfinite(latitude) and math.isfinite(longitude)):
        return f"latitude/longitude {latitude}, {longitude} are not finite numbers"
    if not -90 <= latitude <= 90:
        return f"latitude {latitude} is outside [-90, 90]"
    if not -180 <= longitude <= 180:
        return f"longitude {longitude} is outside [-180, 180]"
    return None


# ---------------------------------------------------------------------------------------
# CSV table
# ---------------------------------------------------------------------------------------

_ALIASES = {"lat": "latitude", "lon": "longitude", "lng": "longitude"}
_REQUIRED = ("path", "latitude", "longitude")
_OPTIONAL = ("heading", "altitude", "time")


def _relative_key(path: str | os.PathLike) -> str:
    # One spelling per photo, whatever separators or "./" the user wrote.
    return Path(os.path.normpath(os.fspath(path))).as_posix()


def read_positions_table(
    csv_path: str | os.PathLike, photos_root: str | os.PathLike
) -> dict[str, Position]:
    """``{path relative to photos_root: Position}`` from a CSV table of positions.

    Header names are case-insensitive; ``lat``, ``lon`` and ``lng`` stand for ``latitude``
    and ``longitude``; other columns are ignored. Empty optional cells mean unknown. Any bad
    row (non-numeric or out-of-range value, a duplicate path, a photo that does not exist)
    refuses the whole table with a :class:`VprkitError` naming the file and line.
    """
    csv_path, root = Path(csv_path), Path(photos_root)
    if not csv_path.is_file():
        raise MissingInputError(f"positions table {csv_path} does not exist")
    # utf-8-sig: spreadsheets often write a byte-order mark before the header.
    with open(csv_path, newline="", encoding="utf-8-sig") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None:
            raise VprkitError(f"{csv_path} is empty; expected a header path,latitude,longitude")
        columns: dict[str, int] = {}
        for index, raw in enumerate(header):
            name = raw.strip().lower()
            name = _ALIASES.get(name, name)
            if name in columns and name in _REQUIRED + _OPTIONAL:
                raise VprkitError(f"{csv_path}: column {name!r} appears twice in the header")
            columns.setdefault(name, index)
        missing = [name for name in _REQUIRED if name not in columns]
        if missing:
            raise VprkitError(
                f"{csv_path}: the header lacks {', '.join(missing)}; expected columns "
                "path,latitude,longitude (optional heading,altitude,time)"
            )
        positions: dict[str, Position] = {}
        for row in reader:
            if not any(cell.strip() for cell in row):
                continue  # blank line
            where = f"{csv_path}, line {reader.line_num}"
            key, position = _table_row(row, columns, where, root)
            if key in positions:
                raise VprkitError(f"{where}: {key} is listed twice; keep one row per photo")
            positions[key] = position
    return positions


def _cell(row: list[str], columns: dict[str, int], name: str) -> str:
    index = columns.get(name)
    return row[index].strip() if index is not None and index < len(row) else ""


def _number(text: str, name: str, where: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise VprkitError(f"{where}: {name} {text!r} is not a number") from None
    if not math.isfinite(value):
        raise VprkitError(f"{where}: {name} {text!r} is not a finite number")
    return value


def _table_row(
    row: list[str], columns: dict[str, int], where: str, root: Path
) -> tuple[str, Position]:
    path = _cell(row, columns, "path")
    if not path:
        raise VprkitError(f"{where}: the path is empty")
    for name in ("latitude", "longitude"):
        if not _cell(row, columns, name):
            raise VprkitError(f"{where}: {name} is empty")
    latitude = _number(_cell(row, columns, "latitude"), "latitude", where)
    longitude = _number(_cell(row, columns, "longitude"), "longitude", where)
    problem = _coordinates_problem(latitude, longitude)
    if problem:
        raise VprkitError(f"{where}: {problem}")
    optional = {
        name: _number(text, name, where)
        for name in ("heading", "altitude")
        if (text := _cell(row, columns, name))
    }
    key = _relative_key(path)
    if not (root / key).is_file():
        raise VprkitError(
            f"{where}: photo {key} does not exist under {root}; fix the path or drop the row"
        )
    heading = optional.get("heading")
    position = Position(
        latitude=latitude,
        longitude=longitude,
        altitude=optional.get("altitude"),
        heading=None if heading is None else heading % 360.0,
        time=_cell(row, columns, "time") or None,
        source="table",
    )
    return key, position


# ---------------------------------------------------------------------------------------
# EXIF GPS
# ---------------------------------------------------------------------------------------

_GPS_IFD, _EXIF_IFD = 0x8825, 0x8769
_LAT_REF, _LAT, _LON_REF, _LON, _ALT_REF, _ALT = 1, 2, 3, 4, 5, 6
_IMG_DIRECTION = 17
_DATETIME_ORIGINAL, _OFFSET_TIME_ORIGINAL = 0x9003, 0x9011


class _BadExif(Exception):
    """A GPS field is malformed; the message is the reason the photo is excluded."""


def _rational(value: Any, name: str) -> float:
    # Pillow gives IFDRational (nan for a zero denominator) or a plain number.
    denominator = getattr(value, "denominator", 1)
    if denominator == 0:
        raise _BadExif(f"{name} has a zero denominator")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise _BadExif(f"{name} is not a number ({value!r})") from None
    if not math.isfinite(number) or number < 0:
        raise _BadExif(f"{name} is {number}, not a finite non-negative number")
    return number


def _text(value: Any) -> str:
    if isinstance(value, bytes):
        value = value.decode("ascii", "replace")
    return str(value).strip("\x00 ")


def _dms(value: Any, name: str) -> float:
    if isinstance(value, (int, float)) or hasattr(value, "denominator"):
        value = (value,)  # a writer that stored plain degrees
    if not isinstance(value, tuple) or not 1 <= len(value) <= 3:
        raise _BadExif(f"{name} is not (degrees, minutes, seconds): {value!r}")
    parts = [_rational(part, name) for part in value]
    if any(part >= 60 for part in parts[1:]):
        raise _BadExif(f"{name} has minutes or seconds of 60 or more: {parts}")
    return sum(part / 60**i for i, part in enumerate(parts))


def _signed(gps: dict, ref_tag: int, tag: int, name: str, refs: str) -> float:
    if tag not in gps:
        raise _BadExif(f"no GPS {name} in EXIF")
    if ref_tag not in gps:
        raise _BadExif(f"GPS {name} has no {refs[0]}/{refs[1]} reference")
    ref = _text(gps[ref_tag]).upper()
    if ref not in refs:
        raise _BadExif(f"GPS {name} reference is {ref!r}, not {refs[0]} or {refs[1]}")
    degrees = _dms(gps[tag], f"GPS {name}")
    return -degrees if ref == refs[1] else degrees


def _exif_time(exif_ifd: dict) -> str | None:
    # EXIF writes "YYYY:MM:DD HH:MM:SS"; anything else is dropped, not fatal.
    text = _text(exif_ifd.get(_DATETIME_ORIGINAL, ""))
    if len(text) != 19 or text[4] != ":" or text[7] != ":" or text[10] != " ":
        return None
    iso = f"{text[:4]}-{text[5:7]}-{text[8:10]}T{text[11:]}"
    offset = _text(exif_ifd.get(_OFFSET_TIME_ORIGINAL, ""))
    return iso + offset if len(offset) == 6 and offset[0] in "+-" else iso


def read_exif_position(photo_path: str | os.PathLike) -> Result:
    """``(Position, None)`` from the photo's EXIF GPS, or ``(None, reason)``.

    Malformed or partial GPS data (a missing reference, a zero denominator, values out of
    range) gives ``(None, reason)``; a broken altitude, heading or time is dropped alone.
    A file Pillow cannot open raises a :class:`VprkitError` naming it.
    """
    try:
        with Image.open(photo_path) as image:
            exif = image.getexif()
            gps = dict(exif.get_ifd(_GPS_IFD))
            exif_ifd = dict(exif.get_ifd(_EXIF_IFD))
    except (UnidentifiedImageError, SyntaxError, ValueError, EOFError, OSError) as e:
        # OSError: a file cut short inside its headers ("Truncated File Read").
        raise VprkitError(f"{photo_path}: cannot read the photo ({e}); replace or remove it") from e
    if not gps:
        return None, "no GPS position in EXIF"
    try:
        latitude = _signed(gps, _LAT_REF, _LAT, "latitude", "NS")
        longitude = _signed(gps, _LON_REF, _LON, "longitude", "EW")
    except _BadExif as e:
        return None, str(e)
    problem = _coordinates_problem(latitude, longitude)
    if problem:
        return None, f"EXIF {problem}"
    return Position(
        latitude=latitude,
        longitude=longitude,
        altitude=_exif_altitude(gps),
        heading=_optional_rational(gps.get(_IMG_DIRECTION), 360.0),
        time=_exif_time(exif_ifd),
        source="exif",
    ), None


def _optional_rational(value: Any, modulo: float | None = None) -> float | None:
    if value is None:
        return None
    try:
        number = _rational(value, "value")
    except _BadExif:
        return None
    return number % modulo if modulo else number


def _exif_altitude(gps: dict) -> float | None:
    altitude = _optional_rational(gps.get(_ALT))
    if altitude is None:
        return None
    ref = gps.get(_ALT_REF, 0)
    # GPSAltitudeRef is a BYTE: 1 means below sea level; Pillow gives int or bytes.
    below = ref[:1] == b"\x01" if isinstance(ref, bytes) else ref == 1
    return -altitude if below else altitude


# ---------------------------------------------------------------------------------------
# VG names
# ---------------------------------------------------------------------------------------

_NORTH_BANDS = "NPQRSTUVWX"
_SOUTH_BANDS = "CDEFGHJKLM"


def position_from_name(path: str | os.PathLike) -> Result:
    """``(Position, None)`` from a VG name ``@east@north@zone@letter@...``, or ``(None, reason)``.

    The zone number and latitude band letter say which UTM zone and hemisphere east/north
    are in; the heading field (the 9th) is kept when it is a number.
    """
    fields = os.path.basename(os.fspath(path)).split("@")
    try:
        east, north = float(fields[1]), float(fields[2])
        zone_text, band = fields[3].strip(), fields[4].strip().upper()
    except (IndexError, ValueError):
        return None, "the name has no @utm_east@utm_north@zone@letter@ fields"
    if not (math.isfinite(east) and math.isfinite(north)):
        return None, "the UTM coordinates in the name are not finite"
    if not zone_text or not band:
        return None, "the name has UTM coordinates but no zone number and letter"
    if not zone_text.isdigit() or not 1 <= int(zone_text) <= 60:
        return None, f"UTM zone {zone_text!r} in the name is not a number from 1 to 60"
    if len(band) != 1 or band not in _NORTH_BANDS + _SOUTH_BANDS:
        return None, f"UTM latitude band {band!r} in the name is not a letter C-X"
    zone = UtmZone(int(zone_text), "N" if band in _NORTH_BANDS else "S")
    longitude, latitude = _from_utm(zone.epsg).transform(east, north)
    problem = _coordinates_problem(latitude, longitude)
    if problem:
        return None, f"the UTM coordinates in the name give {problem}"
    heading = None
    if len(fields) > 9:
        try:
            value = float(fields[9])
            heading = value % 360.0 if math.isfinite(value) else None
        except ValueError:
            pass
    return Position(latitude=latitude, longitude=longitude, heading=heading, source="name"), None


def exif_gps(
    latitude: float,
    longitude: float,
    altitude: float | None = None,
    heading: float | None = None,
) -> bytes:
    """An EXIF block with this GPS position, for ``Image.save(..., exif=...)`` (what a camera
    writes: degrees, minutes and seconds with N/S/E/W references; seconds to a millionth of an
    arcsecond, 3e-5 m)."""
    from fractions import Fraction

    from PIL.TiffImagePlugin import IFDRational

    def dms(degrees: float) -> tuple:
        d = abs(degrees)
        whole = int(d)
        minutes = int((d - whole) * 60)
        seconds = Fraction(round(((d - whole) * 60 - minutes) * 60 * 1_000_000), 1_000_000)
        return IFDRational(whole, 1), IFDRational(minutes, 1), IFDRational(seconds)

    gps: dict = {
        1: "N" if latitude >= 0 else "S",
        2: dms(latitude),
        3: "E" if longitude >= 0 else "W",
        4: dms(longitude),
    }
    if altitude is not None:
        gps[5] = b"\x01" if altitude < 0 else b"\x00"
        gps[6] = IFDRational(Fraction(round(abs(altitude) * 1000), 1000))
    if heading is not None:
        gps[16] = "T"  # true north
        gps[17] = IFDRational(Fraction(round((heading % 360.0) * 100), 100))
    exif = Image.Exif()
    exif[0x8825] = gps  # the GPSInfo IFD
    return exif.tobytes()


# ---------------------------------------------------------------------------------------
# Metric coordinates
# ---------------------------------------------------------------------------------------


class UtmZone(NamedTuple):
    number: int  # 1..60
    hemisphere: str  # "N" or "S"

    @property
    def epsg(self) -> int:
        return (32600 if self.hemisphere == "N" else 32700) + self.number

    def __str__(self) -> str:
        return f"{self.number}{self.hemisphere}"


@lru_cache(maxsize=16)
def _to_utm(epsg: int) -> pyproj.Transformer:
    return pyproj.Transformer.from_crs("EPSG:4326", f"EPSG:{epsg}", always_xy=True)


@lru_cache(maxsize=16)
def _from_utm(epsg: int) -> pyproj.Transformer:
    return pyproj.Transformer.from_crs(f"EPSG:{epsg}", "EPSG:4326", always_xy=True)


def utm_zone(latitude: float, longitude: float) -> UtmZone:
    """The UTM zone of one position, with the Norway and Svalbard exceptions."""
    number = int((longitude + 180) // 6) % 60 + 1
    if 56 <= latitude < 64 and 3 <= longitude < 12:
        number = 32
    elif 72 <= latitude < 84 and 0 <= longitude < 42:
        number = 31 + 2 * int((longitude + 3) // 12) if longitude >= 9 else 31
    return UtmZone(number, "N" if latitude >= 0 else "S")


def to_metric(
    latitudes: Sequence[float] | np.ndarray, longitudes: Sequence[float] | np.ndarray
) -> tuple[np.ndarray, np.ndarray, UtmZone]:
    """``(east, north, zone)``: the whole map projected into ONE UTM zone, in metres.

    The zone is that of the map's median position, so a map straddling a zone border keeps
    true distances (each point in its own zone would put a border's two sides hundreds of
    kilometres apart).
    """
    lat = np.asarray(latitudes, dtype=np.float64)
    lon = np.asarray(longitudes, dtype=np.float64)
    if lat.shape != lon.shape or lat.ndim != 1 or lat.size == 0:
        raise ValueError("latitudes and longitudes must be 1-D, non-empty and the same length")
    zone = utm_zone(float(np.median(lat)), float(np.median(lon)))
    east, north = project(lat, lon, zone)
    return east, north, zone


def project(
    latitudes: Sequence[float] | np.ndarray, longitudes: Sequence[float] | np.ndarray, zone: UtmZone
) -> tuple[np.ndarray, np.ndarray]:
    """``(east, north)`` in metres in the given UTM zone (a map keeps its zone as it grows)."""
    lat = np.asarray(latitudes, dtype=np.float64)
    lon = np.asarray(longitudes, dtype=np.float64)
    east, north = _to_utm(zone.epsg).transform(lon, lat)
    return np.asarray(east, dtype=np.float64), np.asarray(north, dtype=np.float64)


def unproject(east: Any, north: Any, zone: UtmZone) -> tuple[Any, Any]:
    """``(latitude, longitude)`` of metric coordinates in ``zone`` (inverse of `project`)."""
    lon, lat = _from_utm(zone.epsg).transform(east, north)
    return lat, lon


_GEOD = pyproj.Geod(ellps="WGS84")


def geodesic_distance_m(lat1: Any, lon1: Any, lat2: Any, lon2: Any) -> Any:
    """Distance on the WGS84 ellipsoid in metres (floats or arrays, broadcast)."""
    lat1, lon1, lat2, lon2 = np.broadcast_arrays(
        *(np.asarray(v, float) for v in (lat1, lon1, lat2, lon2))
    )
    _, _, distance = _GEOD.inv(lon1, lat1, lon2, lat2)
    distance = np.asarray(distance, dtype=np.float64)
    return float(distance) if distance.ndim == 0 else distance


# ---------------------------------------------------------------------------------------
# All sources together
# ---------------------------------------------------------------------------------------


def collect_positions(
    photos: Iterable[str | os.PathLike],
    photos_root: str | os.PathLike,
    table: str | os.PathLike | None = None,
) -> tuple[dict[str, Position], dict[str, str]]:
    """``(positions, excluded)`` for ``photos`` (absolute, or relative to ``photos_root``).

    Both are keyed by the path relative to ``photos_root``. Each photo takes its position
    from the table if it lists the photo, else its EXIF GPS, else its VG name; a photo with
    none of them, or one that cannot be opened, goes to ``excluded`` with the reasons.
    """
    root = Path(photos_root)
    listed = read_positions_table(table, root) if table is not None else {}
    positions: dict[str, Position] = {}
    excluded: dict[str, str] = {}
    for photo in photos:
        photo = Path(photo)
        full = photo if photo.is_absolute() else root / photo
        try:
            key = _relative_key(os.path.relpath(full, root))
        except ValueError:  # another drive on Windows
            raise VprkitError(f"photo {photo} is not under {root}") from None
        if key.startswith("../"):
            raise VprkitError(f"photo {photo} is not under {root}")
        if key in listed:
            positions[key] = listed[key]
            continue
        try:
            position, exif_reason = read_exif_position(full)
        except VprkitError as e:
            excluded[key] = str(e)
            continue
        if position is None:
            position, name_reason = position_from_name(key)
        if position is None:
            reasons = [f"EXIF: {exif_reason}", f"name: {name_reason}"]
            if table is not None:
                reasons.insert(0, "not in the positions table")
            excluded[key] = "; ".join(reasons)
        else:
            positions[key] = position
    return positions, excluded
