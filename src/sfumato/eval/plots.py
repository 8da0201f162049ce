"""Small PNG figures drawn with Pillow alone (no plotting library needed at run time)."""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageFont


def scatter_panels(
    panels: list[tuple[str, torch.Tensor]],
    path: str | Path,
    *,
    extent: float = 3.0,
    size: int = 260,
    columns: int | None = None,
    max_points: int = 3000,
) -> Path:
    """Draw each (title, (N, 2) points) panel as a scatter plot on [-extent, extent]² and save one PNG."""
    cols = columns or len(panels)
    rows = -(-len(panels) // cols)
    title_h = 18
    img = Image.new("RGB", (cols * size, rows * (size + title_h)), "white")
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    for k, (title, pts) in enumerate(panels):
        x0, y0 = (k % cols) * size, (k // cols) * (size + title_h)
        draw.text((x0 + 6, y0 + 3), title, fill="black", font=font)
        top = y0 + title_h
        draw.rectangle([x0 + 2, top, x0 + size - 3, top + size - 3], outline=(200, 200, 200))
        mid = size / 2
        draw.line([x0 + mid, top, x0 + mid, top + size - 3], fill=(235, 235, 235))
        draw.line([x0 + 2, top + mid, x0 + size - 3, top + mid], fill=(235, 235, 235))
        p = pts[:max_points].detach().double().cpu()
        px = (x0 + mid + p[:, 0] / extent * (mid - 4)).tolist()
        py = (top + mid - p[:, 1] / extent * (mid - 4)).tolist()
        for u, v in zip(px, py):
            if x0 + 2 < u < x0 + size - 3 and top < v < top + size - 3:
                draw.ellipse([u - 1, v - 1, u + 1, v + 1], fill=(31, 90, 170))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path


def line_plot(
    values: list[float], path: str | Path, *, title: str = "", size: tuple[int, int] = (480, 260)
) -> Path:
    """A single curve (e.g. a loss per step), log-scaled on y when all values are positive."""
    import math

    w, h = size
    img = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(img)
    draw.text((6, 3), title, fill="black", font=ImageFont.load_default())
    if len(values) >= 2:
        log = all(v > 0 for v in values)
        ys = [math.log10(v) for v in values] if log else list(values)
        lo, hi = min(ys), max(ys)
        hi = hi if hi > lo else lo + 1
        pts = [
            (8 + i / (len(ys) - 1) * (w - 16), h - 8 - (y - lo) / (hi - lo) * (h - 30))
            for i, y in enumerate(ys)
        ]
        draw.line(pts, fill=(31, 90, 170), width=1)
        label = (lambda v: f"{10**v:.3g}") if log else (lambda v: f"{v:.3g}")
        draw.text((w - 70, 20), f"max {label(hi)}", fill="gray")
        draw.text((w - 70, h - 20), f"min {label(lo)}", fill="gray")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path
