"""``RUN_DIR/confusion_matrix.png``: the evaluation's confusion matrix as a picture (rows: true class, columns:
predicted class; each cell shaded by the fraction of its row's videos and labelled with its count)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

CELL = 36  # pixels per cell
MAX_NAME = 18  # characters of a class name shown


def draw_confusion(counts: Sequence[Sequence[int]], names: Sequence[str], title: str) -> Image.Image:
    """The picture of ``counts`` (``[K, K]``, rows true class) with the class names along both axes."""
    font = ImageFont.load_default()
    classes = len(names)
    labels = [
        f"{i}: " + (name if len(name) <= MAX_NAME else name[: MAX_NAME - 1] + "~") for i, name in enumerate(names)
    ]
    margin = 8 + 7 * max((len(label) for label in labels), default=1)
    width = max(margin + CELL * classes + 16, 8 + 6 * (len(title) + 40))
    height = 28 + CELL * classes + 20
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    draw.text((8, 6), f"{title} (rows: true class, columns: predicted)", fill="black", font=font)
    top = 28
    for row in range(classes):
        total = sum(counts[row]) or 1
        draw.text((4, top + row * CELL + CELL // 2 - 5), labels[row], fill="black", font=font)
        for col in range(classes):
            share = counts[row][col] / total
            shade = round(255 * (1 - share))
            colour = (shade, shade, 255) if row == col else (255, shade, shade)
            x0, y0 = margin + col * CELL, top + row * CELL
            draw.rectangle((x0, y0, x0 + CELL - 1, y0 + CELL - 1), fill=colour, outline=(200, 200, 200))
            text = str(counts[row][col])
            draw.text((x0 + CELL // 2 - 3 * len(text), y0 + CELL // 2 - 5), text, fill="black", font=font)
    for col in range(classes):  # the predicted class's index under its column
        x0 = margin + col * CELL + CELL // 2 - 3 * len(str(col))
        draw.text((x0, top + classes * CELL + 4), str(col), fill="black", font=font)
    return image


def write_confusion(path: Path, counts: Sequence[Sequence[int]], names: Sequence[str], title: str) -> None:
    """Write the picture atomically (a temporary file renamed over ``path``)."""
    tmp = path.with_name(f".{path.name}.tmp")
    draw_confusion(counts, names, title).save(tmp, format="PNG")
    tmp.replace(path)


__all__ = ["draw_confusion", "write_confusion"]
