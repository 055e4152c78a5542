"""Small SVG charts with no plotting dependency."""
from __future__ import annotations

import math
from html import escape

COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf"]


def _ticks(lo: float, hi: float, log: bool) -> list[float]:
    if log:
        a, b = math.floor(math.log10(lo)), math.ceil(math.log10(hi))
        ticks = [m * 10.0 ** e for e in range(a, b + 1) for m in (1, 2, 5) if lo <= m * 10.0 ** e <= hi]
        return ticks or [lo, hi]
    step = 10 ** math.floor(math.log10((hi - lo) or 1.0))
    while (hi - lo) / step > 8:
        step *= 2
    start = math.ceil(lo / step) * step
    return [start + i * step for i in range(int((hi - start) / step) + 1)]


def line_chart(series: dict, title: str, xlabel: str, ylabel: str, logy: bool = False,
               width: int = 640, height: int = 400) -> str:
    """series: name -> list of (x, y). Returns an SVG document."""
    pts = [(x, y) for s in series.values() for x, y in s if y is not None and (y > 0 or not logy)]
    if not pts:
        pts = [(0.0, 1.0), (1.0, 2.0)]
    xs, ys = [p[0] for p in pts], [p[1] for p in pts]
    x0, x1 = min(xs), max(xs)
    if x0 == x1:
        x0, x1 = x0 - 1, x1 + 1
    y0, y1 = min(ys), max(ys)
    if logy:
        y0, y1 = y0 / 1.2, y1 * 1.2
    else:
        pad = (y1 - y0) * 0.08 or 1.0
        y0, y1 = y0 - pad, y1 + pad
    L, R, T, B = 70, 160, 40, 50
    fy = (lambda v: math.log10(v)) if logy else (lambda v: v)
    sx = lambda x: L + (x - x0) / (x1 - x0) * (width - L - R)
    sy = lambda y: height - B - (fy(y) - fy(y0)) / ((fy(y1) - fy(y0)) or 1.0) * (height - T - B)
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" font-size="12">',
           f'<rect width="{width}" height="{height}" fill="white"/>',
           f'<text x="{width / 2}" y="22" text-anchor="middle" font-size="15">{escape(title)}</text>',
           f'<line x1="{L}" y1="{height - B}" x2="{width - R}" y2="{height - B}" stroke="black"/>',
           f'<line x1="{L}" y1="{T}" x2="{L}" y2="{height - B}" stroke="black"/>',
           f'<text x="{(L + width - R) / 2}" y="{height - 12}" text-anchor="middle">{escape(xlabel)}</text>',
           f'<text x="16" y="{(T + height - B) / 2}" text-anchor="middle" transform="rotate(-90 16 {(T + height - B) / 2})">{escape(ylabel)}</text>']
    for t in _ticks(y0, y1, logy):
        y = sy(t)
        out.append(f'<line x1="{L}" y1="{y:.1f}" x2="{width - R}" y2="{y:.1f}" stroke="#ddd"/>')
        out.append(f'<text x="{L - 6}" y="{y + 4:.1f}" text-anchor="end">{t:g}</text>')
    for t in _ticks(x0, x1, False):
        out.append(f'<text x="{sx(t):.1f}" y="{height - B + 16}" text-anchor="middle">{t:g}</text>')
    for i, (name, s) in enumerate(series.items()):
        c = COLORS[i % len(COLORS)]
        p = [(sx(x), sy(y)) for x, y in s if y is not None and (y > 0 or not logy)]
        if len(p) > 1:
            out.append(f'<polyline fill="none" stroke="{c}" stroke-width="2" points="' + " ".join(f"{a:.1f},{b:.1f}" for a, b in p) + '"/>')
        out.extend(f'<circle cx="{a:.1f}" cy="{b:.1f}" r="3.5" fill="{c}"/>' for a, b in p)
        ly = T + 10 + 18 * i
        out.append(f'<rect x="{width - R + 12}" y="{ly - 9}" width="12" height="12" fill="{c}"/>')
        out.append(f'<text x="{width - R + 30}" y="{ly + 1}">{escape(str(name))}</text>')
    out.append("</svg>")
    return "\n".join(out) + "\n"


def write_svg(path: str, svg: str) -> None:
    from .io.atomic import atomic_file

    with atomic_file(path) as f:
        f.write(svg)


def stack_svgs(svgs: list, width: int = 640) -> str:
    """SVG documents (e.g. line_chart's) one below the other in one SVG document."""
    import re

    out, y = [], 0
    for s in svgs:
        m = re.search(r'<svg [^>]*?height="(\d+)"', s)
        out.append(s.replace("<svg ", f'<svg y="{y}" ', 1))
        y += int(m.group(1)) if m else 400
    return "\n".join([f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{y}">', *out, "</svg>"]) + "\n"
