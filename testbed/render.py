"""Rendering: the sprites, background textures and layout that turn one scene into JPEG bytes.

Each category is a distinct shape and each species a marking pattern on it, so a model can only
tell species apart by looking closely. Every random choice comes from the generator passed in, and
JPEG encoding is deterministic, so the same seed renders the same bytes on every machine.
"""

from __future__ import annotations

import io
import math

import numpy as np
from PIL import Image, ImageDraw

from testbed.world import BACKGROUNDS, COLORS, MARK_RGB, Concept, marking_tone

BACKGROUND_BASE = {
    "grass": (72, 104, 46),
    "sand": (198, 178, 132),
    "sky": (132, 176, 222),
    "water": (34, 84, 112),
    "snow": (196, 205, 218),
}

_SS = 4  # supersampling factor for anti-aliased shape edges


def _shape_polygon_mask(category: str, n: int) -> np.ndarray:
    """Boolean mask (n x n) of the category's shape, drawn with PIL at resolution n."""
    img = Image.new("L", (n, n), 0)
    d = ImageDraw.Draw(img)

    def p(x: float, y: float) -> tuple[float, float]:
        return (x * n, y * n)

    if category == "bird":
        d.polygon([p(0.5, 0.04), p(0.97, 0.92), p(0.03, 0.92)], fill=255)
    elif category == "lizard":
        d.polygon([p(0.5, 0.02), p(0.98, 0.5), p(0.5, 0.98), p(0.02, 0.5)], fill=255)
    elif category == "fish":
        d.ellipse([p(0.02, 0.2), p(0.98, 0.8)], fill=255)
    elif category == "flower":
        pts = []
        for k in range(10):
            r = 0.49 if k % 2 == 0 else 0.21
            a = -math.pi / 2 + k * math.pi / 5
            pts.append(p(0.5 + r * math.cos(a), 0.53 + r * math.sin(a)))
        d.polygon(pts, fill=255)
    elif category == "beetle":
        d.ellipse([p(0.06, 0.06), p(0.94, 0.94)], fill=255)
    elif category == "mushroom":
        d.pieslice([p(0.02, 0.1), p(0.98, 1.0)], 180, 360, fill=255)
        d.rectangle([p(0.37, 0.54), p(0.63, 0.98)], fill=255)
    elif category == "butterfly":
        d.polygon([p(0.02, 0.08), p(0.5, 0.4), p(0.98, 0.08), p(0.98, 0.92), p(0.5, 0.6), p(0.02, 0.92)], fill=255)
    elif category == "shell":
        d.pieslice([p(-0.03, 0.04), p(1.03, 1.84)], 200, 340, fill=255)
    else:  # pragma: no cover - the taxonomy is fixed
        raise KeyError(category)
    return np.asarray(img) > 127


def _erode(mask: np.ndarray, steps: int) -> np.ndarray:
    """Binary erosion with a 4-neighbourhood, ``steps`` times (small masks, cached: speed irrelevant)."""
    m = mask.copy()
    for _ in range(steps):
        p = np.pad(m, 1)
        m = m & p[:-2, 1:-1] & p[2:, 1:-1] & p[1:-1, :-2] & p[1:-1, 2:]
    return m


_SPRITES: dict[tuple[str, str, int], tuple[np.ndarray, np.ndarray]] = {}


def _sprite(category: str, pattern: str, s: int) -> tuple[np.ndarray, np.ndarray]:
    """(alpha[s,s,1] float32, marking[s,s,1] bool) for one object of size s; cached."""
    key = (category, pattern, s)
    hit = _SPRITES.get(key)
    if hit is not None:
        return hit
    shape = _shape_polygon_mask(category, s * _SS)
    hi = shape
    if pattern == "hollow":
        width = max(2, round(s / 8)) * _SS
        hi = hi & ~_erode(hi, width)
    alpha = hi.reshape(s, _SS, s, _SS).mean(axis=(1, 3)).astype(np.float32)
    full = shape.reshape(s, _SS, s, _SS).mean(axis=(1, 3)) > 0.5
    ys, xs = np.nonzero(full)
    cy, cx = (ys.mean(), xs.mean()) if len(ys) else (s / 2, s / 2)
    yy, xx = np.mgrid[0:s, 0:s]
    if pattern == "hstripes":
        per = max(4, round(s / 4.5))
        mark = (yy // (per // 2)) % 2 == 1
    elif pattern == "vstripes":
        per = max(4, round(s / 4.5))
        mark = (xx // (per // 2)) % 2 == 1
    elif pattern == "dots":
        per = max(5, round(s / 4))
        r = max(1.0, per / 3.2)
        mark = ((yy % per) - per / 2 + 0.5) ** 2 + ((xx % per) - per / 2 + 0.5) ** 2 <= r * r
    elif pattern == "checker":
        cell = max(3, round(s / 6))
        mark = ((yy // cell) + (xx // cell)) % 2 == 1
    elif pattern == "center_dot":
        r = max(2.0, s / 6)
        mark = (yy - cy + 0.5) ** 2 + (xx - cx + 0.5) ** 2 <= r * r
    elif pattern == "cross":
        half = max(1.0, s / 14)
        mark = (np.abs(yy - cy + 0.5) <= half) | (np.abs(xx - cx + 0.5) <= half)
    else:  # solid, hollow
        mark = np.zeros((s, s), dtype=bool)
    out = (alpha[:, :, None], mark[:, :, None])
    _SPRITES[key] = out
    return out


def _box_blur(a: np.ndarray, ry: int, rx: int) -> np.ndarray:
    """Wrap-around box blur as a mean of rolled copies, so the textures still tile smoothly."""
    out = a
    if ry > 0:
        out = sum(np.roll(out, k, axis=0) for k in range(-ry, ry + 1)) / (2 * ry + 1)
    if rx > 0:
        out = sum(np.roll(out, k, axis=1) for k in range(-rx, rx + 1)) / (2 * rx + 1)
    return out


def make_textures(rng: np.random.Generator, size: int) -> dict[str, np.ndarray]:
    """One tileable texture (2*size square, float32 RGB) per background kind; images crop from it."""
    t = 2 * size
    yy, xx = np.mgrid[0:t, 0:t].astype(np.float32)
    sc = size / 64
    tex: dict[str, np.ndarray] = {}
    for kind in BACKGROUNDS:
        base = np.array(BACKGROUND_BASE[kind], np.float32)
        n = rng.standard_normal((t, t)).astype(np.float32)
        if kind == "grass":
            lum = 16 * _box_blur(n, max(1, round(3 * sc)), 0) * 1.8 + 5 * rng.standard_normal((t, t))
            img = base + lum[..., None] * np.array((0.8, 1.0, 0.6), np.float32)
        elif kind == "sand":
            lum = 9 * n + 7 * np.sin(0.22 / sc * yy + 0.08 / sc * xx)
            img = base + lum[..., None]
        elif kind == "sky":
            cloud = np.clip(_box_blur(n, max(2, round(6 * sc)), max(3, round(9 * sc))) * 9, 0, 1)
            img = base + (22 * yy / t)[..., None] + cloud[..., None] * (np.array((245, 248, 252)) - base) * 0.6
        elif kind == "water":
            wave = np.sin(0.75 / sc * yy + 1.6 * np.sin(0.13 / sc * xx))
            img = base + (13 * wave + 4 * n)[..., None] * np.array((0.7, 0.9, 1.0), np.float32)
        else:  # snow
            speck = (rng.random((t, t)) > 0.97).astype(np.float32) * 28
            img = base + (6 * _box_blur(n, 2, 2) * 2.5 + speck)[..., None]
        tex[kind] = np.clip(img, 0, 255).astype(np.float32)
    return tex


def _layout(rng: np.random.Generator, count: int, position: str | None, size: int) -> list[tuple[int, int, int]]:
    """(x0, y0, s) boxes for ``count`` objects: one at a named position, or several in distinct quadrants."""
    sc = size / 64
    boxes = []
    if count == 1:
        s = int(round(rng.integers(18, 31) * sc))
        fx, fy = {"left": (0.25, 0.5), "right": (0.75, 0.5), "top": (0.5, 0.25), "bottom": (0.5, 0.75)}.get(
            position or "center", (0.5, 0.5)
        )
        jx, jy = rng.integers(-3, 4, size=2) * sc
        centers = [(fx * size + jx, fy * size + jy, s)]
    else:
        cells = rng.choice(4, size=count, replace=False)
        centers = []
        for c in cells:
            s = int(round(rng.integers(16, 23) * sc))
            jx, jy = rng.integers(-2, 3, size=2) * sc
            centers.append(((0.25 + 0.5 * (c % 2)) * size + jx, (0.25 + 0.5 * (c // 2)) * size + jy, s))
    for cx, cy, s in centers:
        x0 = int(min(max(round(cx - s / 2), 0), size - s))
        y0 = int(min(max(round(cy - s / 2), 0), size - s))
        boxes.append((x0, y0, s))
    return boxes


def render(
    rng: np.random.Generator,
    textures: dict[str, np.ndarray],
    size: int,
    concept: Concept,
    color: str,
    count: int,
    position: str | None,
    background: str,
) -> bytes:
    """Draw one image and return its JPEG bytes (quality 90, deterministic)."""
    tex = textures[background]
    oy, ox = rng.integers(0, tex.shape[0] - size + 1, size=2)
    canvas = tex[oy : oy + size, ox : ox + size].copy()
    canvas += rng.normal(0.0, 3.0, size=(size, size, 1)).astype(np.float32) + float(rng.integers(-8, 9))
    rgb = COLORS[color]
    col = np.array(rgb, np.float32)
    mark_col = np.array(MARK_RGB[marking_tone(rgb)], np.float32)
    for x0, y0, s in _layout(rng, count, position, size):
        alpha, mark = _sprite(concept.category, concept.pattern, s)
        paint = np.where(mark, mark_col, col)
        box = canvas[y0 : y0 + s, x0 : x0 + s]
        box += alpha * (paint - box)
    buf = io.BytesIO()
    Image.fromarray(np.clip(canvas, 0, 255).astype(np.uint8), "RGB").save(buf, format="JPEG", quality=90)
    return buf.getvalue()
