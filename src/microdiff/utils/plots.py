"""PNG plots drawn with Pillow alone (no plotting library needed): line charts, scatter panels,
histograms. Meant for run folders, so results can be looked at before they are read."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from .files import write_png_atomic

PALETTE = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
           (140, 86, 75), (227, 119, 194), (127, 127, 127)]
MARGIN_L, MARGIN_R, MARGIN_T, MARGIN_B = 64, 16, 32, 44


def _font(size: int = 12):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


def _ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    if hi <= lo:
        return [lo]
    step = 10 ** math.floor(math.log10((hi - lo) / n))
    for mult in (1, 2, 5, 10):
        if (hi - lo) / (step * mult) <= n:
            step *= mult
            break
    start = math.ceil(lo / step) * step
    return [start + k * step for k in range(int((hi - start) / step) + 1)]


class _Axes:
    """Maps data coordinates into a plotting rectangle and draws frame, ticks and labels."""

    def __init__(self, draw, box, xlim, ylim, logy=False, logx=False):
        self.draw, self.box, self.logy, self.logx = draw, box, logy, logx
        self.xlim = tuple(math.log10(v) for v in xlim) if logx else xlim
        self.ylim = tuple(math.log10(v) for v in ylim) if logy else ylim

    def xy(self, x, y):
        x0, y0, x1, y1 = self.box
        if self.logy:
            y = math.log10(max(y, 1e-300))
        if self.logx:
            x = math.log10(max(x, 1e-300))
        fx = (x - self.xlim[0]) / ((self.xlim[1] - self.xlim[0]) or 1)
        fy = (y - self.ylim[0]) / ((self.ylim[1] - self.ylim[0]) or 1)
        return x0 + fx * (x1 - x0), y1 - fy * (y1 - y0)

    @staticmethod
    def _axis_ticks(lim, log) -> list[float]:
        if not log:
            return _ticks(*lim)
        decades = [10.0**k for k in range(math.floor(lim[0]), math.ceil(lim[1]) + 1)]
        inside = [v for v in decades if lim[0] - 1e-9 <= math.log10(v) <= lim[1] + 1e-9]
        # less than a decade of range: linear ticks read better than a single power of ten
        return inside if len(inside) >= 2 else _ticks(10 ** lim[0], 10 ** lim[1])

    def frame(self, title="", xlabel="", ylabel=""):
        d, (x0, y0, x1, y1), font = self.draw, self.box, _font()
        d.rectangle(self.box, outline=(0, 0, 0))
        for t in self._axis_ticks(self.xlim, self.logx):
            px, _ = self.xy(t, self.ylim[0] if not self.logy else 10 ** self.ylim[0])
            d.line([(px, y1), (px, y1 + 4)], fill=(0, 0, 0))
            d.text((px, y1 + 6), f"{t:g}", fill=(0, 0, 0), font=font, anchor="ma")
        for value in self._axis_ticks(self.ylim, self.logy):
            _, py = self.xy(self.xlim[0], value)
            if y0 - 1 <= py <= y1 + 1:
                d.line([(x0 - 4, py), (x0, py)], fill=(0, 0, 0))
                d.text((x0 - 6, py), f"{value:.3g}", fill=(0, 0, 0), font=font, anchor="rm")
        d.text(((x0 + x1) / 2, 8), title, fill=(0, 0, 0), font=_font(14), anchor="ma")
        d.text(((x0 + x1) / 2, y1 + 24), xlabel, fill=(0, 0, 0), font=font, anchor="ma")
        d.text((4, y0 - 18), ylabel, fill=(0, 0, 0), font=font)


def line_plot(series: dict[str, tuple[Sequence[float], Sequence[float]]], path, title="",
              xlabel="", ylabel="", logy=False, logx=False, size=(640, 400)) -> Path:
    """One line per entry of ``series`` (name -> (xs, ys)), with a legend."""
    img = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(img)
    xs_all = np.concatenate([np.asarray(x, float) for x, _ in series.values()])
    ys_all = np.concatenate([np.asarray(y, float) for _, y in series.values()])
    ys_all = ys_all[np.isfinite(ys_all) & ((ys_all > 0) if logy else True)]
    ylim = (float(ys_all.min()), float(ys_all.max())) if len(ys_all) else (0.0, 1.0)
    if ylim[0] == ylim[1]:
        ylim = (ylim[0] * 0.9, ylim[1] * 1.1 + 1e-12)
    box = (MARGIN_L, MARGIN_T, size[0] - MARGIN_R, size[1] - MARGIN_B)
    ax = _Axes(draw, box, (float(xs_all.min()), float(xs_all.max())), ylim, logy, logx)
    ax.frame(title, xlabel, ylabel)
    for k, (name, (xs, ys)) in enumerate(series.items()):
        color = PALETTE[k % len(PALETTE)]
        pts = [ax.xy(x, y) for x, y in zip(xs, ys) if math.isfinite(y) and (y > 0 or not logy)]
        if len(pts) > 1:
            draw.line(pts, fill=color, width=2)
        for p in pts if len(pts) <= 32 else []:
            draw.ellipse([p[0] - 3, p[1] - 3, p[0] + 3, p[1] + 3], fill=color)
        draw.text((box[2] - 8, box[1] + 8 + 14 * k), name, fill=color, font=_font(), anchor="ra")
    return _save(img, path)


def scatter_panels(panels: Sequence[tuple[str, np.ndarray]], path, lim: float | None = None,
                   panel_size: int = 256, columns: int = 4) -> Path:
    """A grid of 2-D scatter plots sharing one square range; ``panels`` is (title, (N, 2) array)."""
    arrays = [np.asarray(p, float)[:, :2] for _, p in panels]
    if lim is None:
        lim = float(max(np.percentile(np.abs(a), 99.5) for a in arrays)) * 1.1
    rows = math.ceil(len(panels) / columns)
    cols = min(columns, len(panels))
    img = Image.new("RGB", (cols * panel_size, rows * (panel_size + 20)), "white")
    draw = ImageDraw.Draw(img)
    for k, ((title, _), pts) in enumerate(zip(panels, arrays)):
        ox, oy = (k % cols) * panel_size, (k // cols) * (panel_size + 20)
        draw.text((ox + panel_size / 2, oy + 4), title, fill=(0, 0, 0), font=_font(13), anchor="ma")
        box = (ox + 8, oy + 22, ox + panel_size - 8, oy + panel_size + 12)
        draw.rectangle(box, outline=(160, 160, 160))
        ax = _Axes(draw, box, (-lim, lim), (-lim, lim))
        color = PALETTE[k % len(PALETTE)]
        for x, y in pts:
            if abs(x) <= lim and abs(y) <= lim:
                px, py = ax.xy(x, y)
                draw.point((px, py), fill=color)
    return _save(img, path)


def histogram(values: Sequence[float], path, bins: int = 40, title="", xlabel="",
              size=(640, 400), text: Mapping[str, str] | None = None) -> Path:
    """Bars of ``values`` in ``bins``; ``text``: PNG text chunks (e.g. ``files.stamp(command)``)."""
    values = np.asarray(values, float)
    counts, edges = np.histogram(values[np.isfinite(values)], bins=bins)
    img = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(img)
    box = (MARGIN_L, MARGIN_T, size[0] - MARGIN_R, size[1] - MARGIN_B)
    ax = _Axes(draw, box, (float(edges[0]), float(edges[-1])), (0.0, float(max(counts.max(), 1))))
    for c, a, b in zip(counts, edges[:-1], edges[1:]):
        (x0, y0), (x1, y1) = ax.xy(a, c), ax.xy(b, 0)
        draw.rectangle([x0, y0, x1, y1], fill=PALETTE[0], outline=(255, 255, 255))
    ax.frame(title, xlabel, "count")
    return _save(img, path, text)


def grouped_bars(groups: dict[str, dict[str, float]], path, title="", ylabel="", size=(640, 400)) -> Path:
    """Bars of ``groups`` (group -> {series: value}), one colour per series, groups side by side."""
    names = list(dict.fromkeys(k for g in groups.values() for k in g))
    top = max([v for g in groups.values() for v in g.values() if math.isfinite(v)] + [1e-12])
    img = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(img)
    box = (MARGIN_L, MARGIN_T + 14 * len(names), size[0] - MARGIN_R, size[1] - MARGIN_B)
    ax = _Axes(draw, box, (0.0, float(len(groups))), (0.0, top * 1.1))
    width = 0.8 / max(len(names), 1)
    for gi, (group, values) in enumerate(groups.items()):
        for si, name in enumerate(names):
            value = values.get(name, float("nan"))
            if not math.isfinite(value):
                continue
            (x0, y0), (x1, y1) = ax.xy(gi + 0.1 + si * width, value), ax.xy(gi + 0.1 + (si + 1) * width, 0)
            draw.rectangle([x0, y0, x1 - 1, y1], fill=PALETTE[si % len(PALETTE)])
            draw.text(((x0 + x1) / 2, y0 - 2), f"{value:.3g}", fill=(0, 0, 0), font=_font(10), anchor="md")
        px, py = ax.xy(gi + 0.5, 0)
        draw.text((px, py + 6), group, fill=(0, 0, 0), font=_font(), anchor="ma")
    x0, y0, x1, y1 = box
    draw.rectangle(box, outline=(0, 0, 0))
    for value in _ticks(0.0, top * 1.1):
        _, py = ax.xy(0, value)
        draw.line([(x0 - 4, py), (x0, py)], fill=(0, 0, 0))
        draw.text((x0 - 6, py), f"{value:.3g}", fill=(0, 0, 0), font=_font(), anchor="rm")
    draw.text(((x0 + x1) / 2, 8), title, fill=(0, 0, 0), font=_font(14), anchor="ma")
    draw.text((4, y0 - 18), ylabel, fill=(0, 0, 0), font=_font())
    for si, name in enumerate(names):
        draw.text((x1 - 8, MARGIN_T + 14 * si - 4), name, fill=PALETTE[si % len(PALETTE)], font=_font(), anchor="ra")
    return _save(img, path)


def _save(img: Image.Image, path, text: Mapping[str, str] | None = None) -> Path:
    """Atomically (a killed process leaves no torn PNG), with ``text`` as microdiff:<key> chunks."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_png_atomic(img, path, text)
    return path
