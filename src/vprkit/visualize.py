"""Prediction pictures: a query beside its top-N predictions, framed green when a prediction
is a positive, red when it is not, grey when there are no labels."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from PIL import Image, ImageDraw

from vprkit.data.images import load_image

GREEN, RED, GREY, WHITE = (0, 170, 0), (220, 0, 0), (128, 128, 128), (255, 255, 255)


def _thumbnail(path: Path, height: int, frame: tuple[int, int, int], border: int) -> Image.Image:
    img = load_image(path)
    width = max(1, round(img.width * height / img.height))
    img = img.resize((width, height), Image.BILINEAR)
    framed = Image.new("RGB", (width + 2 * border, height + 2 * border), frame)
    framed.paste(img, (border, border))
    return framed


def prediction_picture(
    query: Path,
    predictions: Sequence[Path],
    correct: Sequence[bool | None],
    captions: Sequence[str] | None = None,
    height: int = 200,
    border: int = 6,
) -> Image.Image:
    """One row: the query (white frame), then each prediction framed by its correctness."""
    frames = [WHITE] + [GREY if c is None else GREEN if c else RED for c in correct]
    tiles = [
        _thumbnail(path, height, frame, border)
        for path, frame in zip([query, *predictions], frames, strict=True)
    ]
    caption_height = 18
    gap = 8
    width = sum(t.width for t in tiles) + gap * (len(tiles) - 1)
    canvas = Image.new("RGB", (width, tiles[0].height + caption_height), WHITE)
    draw = ImageDraw.Draw(canvas)
    labels = ["query", *(captions or [f"top-{i + 1}" for i in range(len(predictions))])]
    x = 0
    for tile, label in zip(tiles, labels, strict=True):
        canvas.paste(tile, (x, caption_height))
        draw.text((x + 2, 2), label, fill=(0, 0, 0))
        x += tile.width + gap
    return canvas


def save_prediction_picture(path: Path, *args, **kwargs) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    prediction_picture(*args, **kwargs).save(path, quality=90)
