"""What `vprkit localize` writes: the localizations as CSV, JSON and GeoJSON, a picture per
query, an offline map page, and, for queries whose true position is known, the error in
metres and the precision the confidence gives.

Error metrics (queries with a known position only): the distance on the WGS84 ellipsoid from
the true position to the estimate (and to the top-1 match's position, for comparison); its
median and the share of queries within 5, 10, 25 and 50 m. Confidence: a query is *correct*
when its estimate is within ``correct_m`` metres (25 by default); answering only the queries
whose confidence is above a threshold gives, for each threshold, a precision (correct /
answered) and a recall (correct / all); the curve over all thresholds and its area (the
average precision) say how well the confidence separates right answers from wrong ones.
"""

from __future__ import annotations

import csv
import io
import json
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from vprkit.atomic import write_text
from vprkit.errors import MissingInputError
from vprkit.maps.folder import Map
from vprkit.maps.localize import Localization
from vprkit.maps.positions import Position, geodesic_distance_m, project
from vprkit.visualize import save_prediction_picture

WITHIN_M = (5, 10, 25, 50)
DEFAULT_CORRECT_M = 25.0


# --------------------------------------------------------------------------- metrics


def errors_m(
    results: Sequence[Localization], truth: Sequence[Position | None]
) -> tuple[np.ndarray, np.ndarray]:
    """(estimate error, top-1 error) in metres per query; NaN where the truth is unknown."""
    est, top1 = np.full(len(results), np.nan), np.full(len(results), np.nan)
    for i, (r, t) in enumerate(zip(results, truth, strict=True)):
        if t is None:
            continue
        est[i] = geodesic_distance_m(t.latitude, t.longitude, r.latitude, r.longitude)
        m = r.matches[0]
        top1[i] = geodesic_distance_m(t.latitude, t.longitude, m.latitude, m.longitude)
    return est, top1


def confidence_curve(
    confidence: np.ndarray, correct: np.ndarray
) -> tuple[np.ndarray, np.ndarray, float]:
    """(recall, precision, average precision) of answering the most confident first."""
    order = np.argsort(-confidence, kind="stable")
    hits = correct[order].astype(np.float64)
    answered = np.arange(1, len(hits) + 1)
    precision = np.cumsum(hits) / answered
    recall = np.cumsum(hits) / len(hits)
    ap = float((precision * hits).sum() / len(hits)) if len(hits) else float("nan")
    return recall, precision, ap


def error_summary(
    results: Sequence[Localization],
    truth: Sequence[Position | None],
    correct_m: float = DEFAULT_CORRECT_M,
) -> dict | None:
    """The error figures (module doc), None when no query has a known position."""
    est, top1 = errors_m(results, truth)
    known = ~np.isnan(est)
    if not known.any():
        return None
    e, t = est[known], top1[known]
    confidence = np.array([r.confidence for r in results])[known]
    recall, precision, ap = confidence_curve(confidence, e <= correct_m)
    return {
        "queries_with_position": int(known.sum()),
        "median_error_m": float(np.median(e)),
        "within_m": {str(d): float(100 * (e <= d).mean()) for d in WITHIN_M},
        "top1_median_error_m": float(np.median(t)),
        "top1_within_m": {str(d): float(100 * (t <= d).mean()) for d in WITHIN_M},
        "correct_m": correct_m,
        "confidence_average_precision": ap,
        "curve": {"recall": recall.tolist(), "precision": precision.tolist()},
    }


def format_errors(summary: dict) -> str:
    within = ", ".join(f"{d} m: {v:.1f}%" for d, v in summary["within_m"].items())
    top1 = ", ".join(f"{d} m: {v:.1f}%" for d, v in summary["top1_within_m"].items())
    return (
        f"error (estimate): median {summary['median_error_m']:.1f} m; within {within}\n"
        f"error (top-1):    median {summary['top1_median_error_m']:.1f} m; within {top1}\n"
        f"confidence: average precision {100 * summary['confidence_average_precision']:.1f} "
        f"(correct = within {summary['correct_m']:g} m; "
        f"{summary['queries_with_position']} queries with a known position)"
    )


# --------------------------------------------------------------------------- tables


def format_table(results: Sequence[Localization], errors: np.ndarray | None = None) -> str:
    """One line per query, for the terminal."""
    lines = [f"{'query':<40} {'latitude':>11} {'longitude':>12} {'conf':>5} {'top-1':>6}"]
    if errors is not None:
        lines[0] += f" {'error m':>8}"
    for i, r in enumerate(results):
        name = r.query if len(r.query) <= 40 else "..." + r.query[-37:]
        line = f"{name:<40} {r.latitude:11.6f} {r.longitude:12.6f} {r.confidence:5.2f} "
        line += f"{r.matches[0].photo_id:6d}"
        if errors is not None:
            line += f" {errors[i]:8.1f}" if not np.isnan(errors[i]) else f" {'-':>8}"
        lines.append(line)
    return "\n".join(lines)


def localizations_csv(
    results: Sequence[Localization], truth: Sequence[Position | None], errors: np.ndarray
) -> str:
    out = io.StringIO()
    w = csv.writer(out, lineterminator="\n")
    w.writerow(
        [
            "query",
            "latitude",
            "longitude",
            "confidence",
            "spread_m",
            "true_latitude",
            "true_longitude",
            "error_m",
            "top1_photo",
            "top1_path",
            "match_ids",
            "match_distances",
            "match_scores",
        ]
    )
    for r, t, e in zip(results, truth, errors, strict=True):
        w.writerow(
            [
                r.query,
                repr(r.latitude),
                repr(r.longitude),
                f"{r.confidence:.6f}",
                f"{r.spread_m:.3f}",
                "" if t is None else repr(t.latitude),
                "" if t is None else repr(t.longitude),
                "" if np.isnan(e) else f"{e:.3f}",
                r.matches[0].photo_id,
                r.matches[0].path,
                json.dumps([m.photo_id for m in r.matches]),
                json.dumps([round(m.distance, 6) for m in r.matches]),
                json.dumps([m.score for m in r.matches]),
            ]
        )
    return out.getvalue()


def geojson(
    results: Sequence[Localization], truth: Sequence[Position | None], errors: np.ndarray
) -> dict:
    """Estimates as points (properties: query, confidence, matches, error), and for queries
    with a known position the true position and the line from it to the estimate."""
    features = []
    for r, t, e in zip(results, truth, errors, strict=True):
        props = {
            "kind": "estimate",
            "query": r.query,
            "confidence": r.confidence,
            "spread_m": r.spread_m,
            "matches": [m.photo_id for m in r.matches],
            "error_m": None if np.isnan(e) else float(e),
        }
        features.append(_feature("Point", [r.longitude, r.latitude], props))
        if t is not None:
            props = {"kind": "truth", "query": r.query}
            features.append(_feature("Point", [t.longitude, t.latitude], props))
            line = [[t.longitude, t.latitude], [r.longitude, r.latitude]]
            features.append(_feature("LineString", line, {"kind": "error", "query": r.query}))
    return {"type": "FeatureCollection", "features": features}


def _feature(kind: str, coordinates, properties: dict) -> dict:
    return {
        "type": "Feature",
        "geometry": {"type": kind, "coordinates": coordinates},
        "properties": properties,
    }


# --------------------------------------------------------------------------- pictures


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", Path(name).stem)[:60] or "query"


def save_query_pictures(
    folder: Path,
    m: Map,
    results: Sequence[Localization],
    query_paths: Sequence[Path],
    truth: Sequence[Position | None],
    per_query: int,
    correct_m: float,
) -> int:
    """`<folder>/<index>_<query>.jpg`: the query beside its matches, each captioned with its
    distance in metres from the query's true position (framed green within `correct_m`,
    red beyond), or with its rank and score when the position is unknown."""
    saved = 0
    for i, (r, path, t) in enumerate(zip(results, query_paths, truth, strict=True)):
        matches = r.matches[:per_query]
        try:
            files = [m.photo_file(x.photo_id) for x in matches]
        except MissingInputError:
            continue  # the map's photos are not on this machine: no pictures
        if t is None:
            correct = [None] * len(matches)
            captions = [
                f"#{x.rank}" + ("" if x.score is None else f" score {x.score:.3g}") for x in matches
            ]
        else:
            d = geodesic_distance_m(
                t.latitude,
                t.longitude,
                [x.latitude for x in matches],
                [x.longitude for x in matches],
            )
            d = np.atleast_1d(d)
            correct = [bool(v <= correct_m) for v in d]
            captions = [f"#{x.rank} {v:.0f} m" for x, v in zip(matches, d, strict=True)]
        save_prediction_picture(
            folder / f"{i:05d}_{_safe(r.query)}.jpg", path, files, correct, captions
        )
        saved += 1
    return saved


def save_curve_picture(path: Path, recall: np.ndarray, precision: np.ndarray, title: str) -> None:
    """Precision against recall, as a small PNG."""
    w, h, pad = 420, 320, 40
    img = Image.new("RGB", (w, h), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    x0, y0, x1, y1 = pad, h - pad, w - 15, 25
    draw.rectangle([x0, y1, x1, y0], outline=(0, 0, 0))
    for v in (0.25, 0.5, 0.75):
        draw.line([x0, y0 - v * (y0 - y1), x1, y0 - v * (y0 - y1)], fill=(225, 225, 225))
        draw.line([x0 + v * (x1 - x0), y0, x0 + v * (x1 - x0), y1], fill=(225, 225, 225))
    points = [
        (x0 + r * (x1 - x0), y0 - p * (y0 - y1)) for r, p in zip(recall, precision, strict=True)
    ]
    if len(points) > 1:
        draw.line(points, fill=(20, 90, 200), width=2)
    draw.text((x0, 6), title, fill=(0, 0, 0))
    draw.text((x1 - 40, y0 + 8), "recall", fill=(0, 0, 0))
    draw.text((4, y1), "prec.", fill=(0, 0, 0))
    draw.text((x0 - 10, y0 + 4), "0", fill=(0, 0, 0))
    draw.text((x0 - 12, y1 - 4), "1", fill=(0, 0, 0))
    img.save(path)


# --------------------------------------------------------------------------- the map page


def map_page(
    m: Map,
    results: Sequence[Localization],
    truth: Sequence[Position | None],
    pictures: dict[int, str],
) -> str:
    """A self-contained HTML page (no network, no library): the map's photos, each query's
    estimate with its confidence circle, its matches and its true position, on a metric grid.
    Click an estimate to see its matches and picture."""
    zone = m.meta["utm_zone"]
    from vprkit.maps.positions import UtmZone

    z = UtmZone(int(zone["number"]), zone["hemisphere"])
    east, north = m.positions()
    queries = []
    for i, (r, t) in enumerate(zip(results, truth, strict=True)):
        te, tn = (None, None)
        if t is not None:
            a, b = project([t.latitude], [t.longitude], z)
            te, tn = float(a[0]), float(b[0])
        queries.append(
            {
                "name": r.query,
                "e": r.east,
                "n": r.north,
                "lat": r.latitude,
                "lon": r.longitude,
                "conf": r.confidence,
                "spread": r.spread_m,
                "te": te,
                "tn": tn,
                "matches": [[x.photo_id, x.in_group] for x in r.matches],
                "picture": pictures.get(i),
            }
        )
    data = {
        "map": {"name": str(m.folder.name), "count": m.count, "method": m.method},
        "photos": [
            [round(float(a), 2), round(float(b), 2)] for a, b in zip(east, north, strict=True)
        ],
        "paths": [p.path for p in m.photos],
        "queries": queries,
    }
    blob = json.dumps(data).replace("</", "<\\/")
    return _page_template().replace("/*DATA*/null", blob)


def _page_template() -> str:
    from importlib.resources import files

    return files("vprkit.maps").joinpath("map_page.html").read_text(encoding="utf-8")


# --------------------------------------------------------------------------- the run folder


def write_run(
    folder: Path,
    m: Map,
    results: Sequence[Localization],
    query_paths: Sequence[Path],
    truth: Sequence[Position | None],
    *,
    pictures: int = 5,
    correct_m: float = DEFAULT_CORRECT_M,
    config: dict | None = None,
) -> dict:
    """Every output into `folder` (which exists and is empty: the caller renames it into
    place when complete); returns the summary."""
    est, _ = errors_m(results, truth)
    errors = error_summary(results, truth, correct_m)
    write_text(folder / "localizations.csv", localizations_csv(results, truth, est))
    records = [
        {
            **r.to_dict(),
            "true_position": None
            if t is None
            else {"latitude": t.latitude, "longitude": t.longitude},
            "error_m": None if np.isnan(e) else float(e),
        }
        for r, t, e in zip(results, truth, est, strict=True)
    ]
    write_text(folder / "localizations.json", json.dumps(records, indent=1))
    write_text(folder / "localizations.geojson", json.dumps(geojson(results, truth, est)))
    saved = 0
    picture_names: dict[int, str] = {}
    if pictures > 0:
        saved = save_query_pictures(
            folder / "pictures", m, results, query_paths, truth, pictures, correct_m
        )
        if saved:
            for i, r in enumerate(results):
                name = f"pictures/{i:05d}_{_safe(r.query)}.jpg"
                if (folder / name).is_file():
                    picture_names[i] = name
    write_text(folder / "map.html", map_page(m, results, truth, picture_names))
    summary = {
        "map": str(m.folder),
        "queries": len(results),
        "pictures": saved,
        "errors": errors,
        "config": config or {},
    }
    if errors is not None:
        curve = errors["curve"]
        save_curve_picture(
            folder / "confidence_curve.png",
            np.array(curve["recall"]),
            np.array(curve["precision"]),
            "precision vs recall by confidence "
            f"(AP {100 * errors['confidence_average_precision']:.1f})",
        )
    write_text(folder / "summary.json", json.dumps(summary, indent=1))
    return summary
