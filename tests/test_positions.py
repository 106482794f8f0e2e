"""Photo positions: CSV tables, EXIF GPS written by Pillow into real JPEGs, VG names, UTM."""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import numpy as np
import pyproj
import pytest
from PIL import Image
from PIL.TiffImagePlugin import IFDRational

from vprkit.errors import VprkitError
from vprkit.maps.positions import (
    Position,
    collect_positions,
    geodesic_distance_m,
    position_from_name,
    read_exif_position,
    read_positions_table,
    to_metric,
)


def _dms(degrees: float) -> tuple[IFDRational, IFDRational, IFDRational]:
    # Seconds to a millionth of an arcsecond (3e-5 m): far inside the 1 cm tolerance.
    d = abs(degrees)
    whole = int(d)
    minutes = int((d - whole) * 60)
    seconds = Fraction(round(((d - whole) * 60 - minutes) * 60 * 1_000_000), 1_000_000)
    return IFDRational(whole, 1), IFDRational(minutes, 1), IFDRational(seconds)


def _gps(lat: float, lon: float) -> dict:
    return {1: "N" if lat >= 0 else "S", 2: _dms(lat), 3: "E" if lon >= 0 else "W", 4: _dms(lon)}


def _jpeg(path: Path, gps: dict | None = None, exif_ifd: dict | None = None) -> Path:
    exif = Image.Exif()
    if gps is not None:
        exif[0x8825] = gps
    if exif_ifd is not None:
        exif[0x8769] = exif_ifd
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), (90, 120, 150)).save(path, "JPEG", exif=exif.tobytes())
    return path


@pytest.mark.parametrize("lat", [45.123456, -45.123456])
@pytest.mark.parametrize("lon", [7.654321, -7.654321])
def test_exif_every_hemisphere_round_trips_within_a_centimetre(tmp_path, lat, lon):
    photo = _jpeg(tmp_path / "p.jpg", _gps(lat, lon))
    position, reason = read_exif_position(photo)
    assert reason is None and position is not None and position.source == "exif"
    assert np.sign(position.latitude) == np.sign(lat)
    assert np.sign(position.longitude) == np.sign(lon)
    east, north, zone = to_metric([position.latitude], [position.longitude])
    to_utm = pyproj.Transformer.from_crs("EPSG:4326", f"EPSG:{zone.epsg}", always_xy=True)
    true_east, true_north = to_utm.transform(lon, lat)
    assert abs(east[0] - true_east) < 0.01 and abs(north[0] - true_north) < 0.01


def test_exif_altitude_below_sea_level_heading_and_time(tmp_path):
    gps = _gps(31.5, 35.5) | {
        5: b"\x01",
        6: IFDRational(4305, 10),
        16: "T",
        17: IFDRational(2705, 10),
    }
    exif_ifd = {0x9003: "2024:05:06 07:08:09", 0x9011: "+02:00"}
    position, reason = read_exif_position(_jpeg(tmp_path / "dead_sea.jpg", gps, exif_ifd))
    assert reason is None
    assert position.altitude == pytest.approx(-430.5)
    assert position.heading == pytest.approx(270.5)
    assert position.time == "2024-05-06T07:08:09+02:00"
    # Above sea level, and no time.
    gps[5] = 0
    position, _ = read_exif_position(_jpeg(tmp_path / "hill.jpg", gps))
    assert position.altitude == pytest.approx(430.5) and position.time is None


def test_exif_malformed_gps_gives_a_reason_never_a_crash(tmp_path):
    zero = _gps(10, 10) | {2: (IFDRational(1, 0), IFDRational(0, 1), IFDRational(0, 1))}
    no_ref = {k: v for k, v in _gps(10, 10).items() if k != 3}
    too_far = _gps(10, 10) | {2: _dms(95.0)}
    bad_ref = _gps(10, 10) | {1: "X"}
    cases = {
        "zero.jpg": (zero, "zero denominator"),
        "noref.jpg": (no_ref, "no E/W reference"),
        "far.jpg": (too_far, "outside [-90, 90]"),
        "badref.jpg": (bad_ref, "not N or S"),
        "nogps.jpg": (None, "no GPS position"),
    }
    for name, (gps, expected) in cases.items():
        position, reason = read_exif_position(_jpeg(tmp_path / name, gps))
        assert position is None and expected in reason, (name, reason)


def test_exif_photo_that_does_not_decode_names_the_file(tmp_path):
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not a jpeg at all")
    with pytest.raises(VprkitError, match="broken.jpg"):
        read_exif_position(broken)


def _table(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "positions.csv"
    path.write_text(text)
    return path


def test_table_reads_good_rows_with_aliases_and_optional_columns(tmp_path):
    for name in ("a.jpg", "sub/b.jpg"):
        _jpeg(tmp_path / "photos" / name)
    table = _table(
        tmp_path,
        "Path,LAT,lng,Heading,altitude,time,note\n"
        "a.jpg,45.5,7.25,370,12.5,2024-01-02T03:04:05,x\n"
        "./sub/b.jpg,-33.9,151.2,,,,\n",
    )
    positions = read_positions_table(table, tmp_path / "photos")
    assert positions == {
        "a.jpg": Position(45.5, 7.25, 12.5, 10.0, "2024-01-02T03:04:05", "table"),
        "sub/b.jpg": Position(-33.9, 151.2, None, None, None, "table"),
    }


@pytest.mark.parametrize(
    "row, message",
    [
        ("a.jpg,91,7", "latitude 91.0 is outside"),
        ("a.jpg,45,-180.5", "longitude -180.5 is outside"),
        ("a.jpg,nan,7", "not a finite number"),
        ("a.jpg,45,inf", "not a finite number"),
        ("a.jpg,north,7", "latitude 'north' is not a number"),
        ("a.jpg,45,7,east", "heading 'east' is not a number"),
        ("a.jpg,45,7\na.jpg,46,7", "line 3: a.jpg is listed twice"),
        ("missing.jpg,45,7", "photo missing.jpg does not exist"),
    ],
)
def test_table_bad_rows_are_refused_naming_the_file_and_row(tmp_path, row, message):
    _jpeg(tmp_path / "photos" / "a.jpg")
    table = _table(tmp_path, "path,latitude,longitude,heading\n" + row + "\n")
    with pytest.raises(VprkitError, match="positions.csv, line") as info:
        read_positions_table(table, tmp_path / "photos")
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_table_without_required_columns_is_refused(tmp_path):
    table = _table(tmp_path, "path,latitude\na.jpg,45\n")
    with pytest.raises(VprkitError, match="positions.csv: the header lacks longitude"):
        read_positions_table(table, tmp_path)


def test_vg_names_to_wgs84():
    lat, lon = 45.0621, 7.6784  # Turin, zone 32T
    to_utm = pyproj.Transformer.from_crs("EPSG:4326", "EPSG:32632", always_xy=True)
    east, north = to_utm.transform(lon, lat)
    name = f"db/@{east:.2f}@{north:.2f}@32@T@{lat}@{lon}@pano@0@123.5@0@0@0@@@.jpg"
    position, reason = position_from_name(name)
    assert reason is None and position.source == "name" and position.heading == 123.5
    assert geodesic_distance_m(lat, lon, position.latitude, position.longitude) < 0.01
    # Southern hemisphere: band letter below N.
    to_utm = pyproj.Transformer.from_crs("EPSG:4326", "EPSG:32756", always_xy=True)
    east, north = to_utm.transform(151.2, -33.9)
    position, _ = position_from_name(f"@{east}@{north}@56@H@.jpg")
    assert position.latitude == pytest.approx(-33.9) and position.longitude == pytest.approx(151.2)
    for bad, reason_part in [
        ("@584149.54@4477196.24@@@.jpg", "no zone number and letter"),
        ("@584149.54@4477196.24.jpg", "no @utm_east@utm_north@zone@letter@ fields"),
        ("plain.jpg", "no @utm_east"),
        ("@584149.54@4477196.24@61@T@.jpg", "not a number from 1 to 60"),
        ("@584149.54@4477196.24@17@I@.jpg", "not a letter C-X"),
    ]:
        position, reason = position_from_name(bad)
        assert position is None and reason_part in reason, (bad, reason)


def test_one_zone_projection_keeps_true_distances_across_a_zone_border():
    rng = np.random.default_rng(0)
    lat = 48.0 + rng.uniform(-0.05, 0.05, 40)
    lon = np.concatenate([11.99 - rng.uniform(0, 0.03, 20), 12.01 + rng.uniform(0, 0.03, 20)])
    east, north, zone = to_metric(lat, lon)
    assert zone.number in (32, 33) and zone.hemisphere == "N"
    i, j = np.triu_indices(len(lat), 1)
    euclid = np.hypot(east[i] - east[j], north[i] - north[j])
    geodesic = geodesic_distance_m(lat[i], lon[i], lat[j], lon[j])
    assert np.all(np.abs(euclid - geodesic) / geodesic < 0.001)
    # Projecting each side in its own zone would not: the border pair lands far apart.
    own = [
        pyproj.Transformer.from_crs("EPSG:4326", f"EPSG:{e}", always_xy=True).transform(x, 48.0)
        for e, x in ((32632, 11.99), (32633, 12.01))
    ]
    assert np.hypot(own[0][0] - own[1][0], own[0][1] - own[1][1]) > 100_000


def test_collect_positions_prefers_table_then_exif_then_name(tmp_path):
    root = tmp_path / "photos"
    to_utm = pyproj.Transformer.from_crs("EPSG:4326", "EPSG:32632", always_xy=True)
    east, north = to_utm.transform(7.7, 45.1)
    vg_name = f"@{east}@{north}@32@T@.jpg"
    _jpeg(root / "both.jpg", _gps(10, 20))  # in the table and with EXIF: the table wins
    _jpeg(root / "exif.jpg", _gps(-10, -20))
    _jpeg(root / vg_name)  # no EXIF GPS: the name
    _jpeg(root / "zero.jpg", _gps(10, 10) | {4: (IFDRational(3, 0), 0, 0)})
    _jpeg(root / "nothing.jpg")
    (root / "broken.jpg").write_bytes(b"garbage")
    table = _table(tmp_path, "path,lat,lon\nboth.jpg,1,2\n")
    photos = ["both.jpg", root / "exif.jpg", vg_name, "zero.jpg", "nothing.jpg", "broken.jpg"]
    positions, excluded = collect_positions(photos, root, table)
    assert positions["both.jpg"].source == "table" and positions["both.jpg"].latitude == 1
    assert positions["exif.jpg"].source == "exif"
    assert positions["exif.jpg"].latitude == pytest.approx(-10)
    assert positions[vg_name].source == "name"
    assert positions[vg_name].latitude == pytest.approx(45.1)
    assert set(excluded) == {"zero.jpg", "nothing.jpg", "broken.jpg"}
    assert "zero denominator" in excluded["zero.jpg"]
    assert "no GPS position" in excluded["nothing.jpg"] and "name:" in excluded["nothing.jpg"]
    assert "broken.jpg" in excluded["broken.jpg"]
