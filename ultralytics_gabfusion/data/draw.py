"""Drawing one item of a synthetic image: a digit, a shape or an unlabelled distractor, as an alpha patch.

Every item is drawn upright, white on black, into its own canvas (supersampled when small), then rotated, sheared
and stretched so that the box of its ink has the requested longest side, and area-downsampled to an anti-aliased
float alpha patch in ``[0, 1]``. Placing and colouring the patches is the scene's job (:mod:`.render`).

Only numpy and OpenCV are needed.
"""

from __future__ import annotations

import math
from typing import Any

import cv2
import numpy as np

SHAPES = ("circle", "square", "triangle", "star", "hexagon", "cross")

# Glyph faces. OpenCV < 5 draws the Hershey vector fonts: seven faces (SCRIPT_COMPLEX is left out, its
# digits are ornate enough to be ambiguous), optionally with the FONT_ITALIC flag. OpenCV 5 renders the
# Hershey ids with its built-in outline fonts (sans/italic, two weights), so there the built-in faces are
# used directly: "sans" and "italic" at two weights (different proportions) and "uni" (another design, e.g.
# an unslashed zero). Stroke width is set separately (see _set_stroke), so it varies the same way in both.
_MODERN_FONTS = hasattr(cv2, "FontFace")
if _MODERN_FONTS:
    _FACES: tuple = (("sans", 300), ("sans", 600), ("italic", 300), ("italic", 600), ("uni", 400))
else:  # pragma: no cover - exercised only with OpenCV 4
    _FACES = tuple(
        (f, 0)
        for f in (
            cv2.FONT_HERSHEY_SIMPLEX,
            cv2.FONT_HERSHEY_PLAIN,
            cv2.FONT_HERSHEY_DUPLEX,
            cv2.FONT_HERSHEY_COMPLEX,
            cv2.FONT_HERSHEY_TRIPLEX,
            cv2.FONT_HERSHEY_COMPLEX_SMALL,
            cv2.FONT_HERSHEY_SCRIPT_SIMPLEX,
        )
    )
_FONT_CACHE: dict[str, Any] = {}  # FontFace objects load font data: one per name and process
# Unlabelled hard negatives that resemble digits (O~0, I/l~1, S~5, Z~2, B~8, G~6, q~9).
_DISTRACTOR_LETTERS = "OIlSZBGq"

# Object size sampling: the box's longest side is log-uniform in [_SIZE_LO, _SIZE_HI] * imgsz / 512.
# The bounds solve ln(32/lo) = 0.44 r, ln(hi/96) = 0.22 r with r = ln(hi/lo), i.e. a 44/34/22 % split at
# 512 px; hi is a little above that solution (7.7, 195) because occlusion trims some boxes afterwards.
_SIZE_LO = 7.7
_SIZE_HI = 200.0
_SIZE_FLOOR = 6.0  # px; below this a glyph is a smudge, so small imgsz clamp the lower bound here


def _sample_size(rng: np.random.Generator, imgsz: int, min_size: int = 0) -> float:
    """Longest side (px) of an object: log-uniform, scaled with the image size, at least ``min_size``."""
    s = imgsz / 512.0
    lo, hi = max(_SIZE_FLOOR, _SIZE_LO * s, float(min_size)), _SIZE_HI * s
    return float(math.exp(rng.uniform(math.log(lo), math.log(hi))))


def _supersample(target: float) -> int:
    """Supersampling factor: small items are drawn larger and area-downsampled for clean anti-aliasing."""
    return 4 if target < 32 else 2 if target < 96 else 1


def _set_stroke(canvas: np.ndarray, thickness: float) -> np.ndarray | None:
    """Re-draw the ink of ``canvas`` with strokes ``thickness`` px wide (anti-aliased).

    The current stroke width w0 is estimated as 2 * area / perimeter (exact for long strokes); the ink is
    then grown or shrunk by (thickness - w0) / 2 through its signed distance to the outline (shrinking at
    most to 0.8 * w0). This gives the same stroke widths whether OpenCV draws 1-px Hershey vectors
    (OpenCV 4) or filled outline fonts (OpenCV 5, whose putText ignores thickness beyond 2).
    """
    mask = (canvas >= 128).astype(np.uint8)
    area = int(mask.sum())
    if area == 0:
        return None
    contours, _ = cv2.findContours(mask, cv2.RETR_LIST, cv2.CHAIN_APPROX_NONE)
    perimeter = sum(cv2.arcLength(c, True) for c in contours)
    w0 = 2.0 * area / max(perimeter, 1.0)
    # Outline fonts are not monoline (joins and hairlines are thinner than w0): shrinking by more than
    # ~20 % would cut glyphs apart, so thin strokes stop at 0.8 * w0. Growing is always safe.
    delta = (max(thickness, 0.8 * w0) - w0) / 2.0
    d_in = cv2.distanceTransform(mask, cv2.DIST_L2, cv2.DIST_MASK_PRECISE)
    d_out = cv2.distanceTransform(1 - mask, cv2.DIST_L2, cv2.DIST_MASK_PRECISE)
    # Signed distance of each pixel centre to the outline (pixel edges at +-0.5), positive inside.
    sd = np.where(mask > 0, d_in - 0.5, 0.5 - d_out)
    alpha = np.clip(sd + np.float32(delta + 0.5), 0.0, 1.0)
    return (alpha * 255.0 + 0.5).astype(np.uint8)


def _text_canvas(text: str, face: tuple, italic: bool, height: float, thickness: float) -> np.ndarray | None:
    """Draw ``text`` upright, white on black: glyph height about ``height``, strokes ``thickness`` px.

    Drawn into a generous canvas and cropped to the ink (plus room for the stroke change), which avoids
    text-metrics calls that differ between OpenCV versions.
    """
    font, weight = face
    pad = int(math.ceil(thickness)) + 4
    canvas = np.zeros((int(height * 2.2) + 2 * pad, int(height * 1.8 * len(text)) + 2 * pad), np.uint8)
    org = (pad + int(0.3 * height), pad + int(1.5 * height))  # baseline; room for ascenders and descenders
    if isinstance(font, str):
        ff = _FONT_CACHE.get(font)
        if ff is None:
            ff = _FONT_CACHE[font] = cv2.FontFace(font)
        cv2.putText(canvas, text, org, 255, ff, max(1, int(round(height / 0.75))), weight)  # cap height ~0.75 em
    else:  # pragma: no cover - OpenCV 4 Hershey path
        (_, h1), _ = cv2.getTextSize(text, font, 1.0, 1)
        face_id = font | (cv2.FONT_ITALIC if italic else 0)
        # LINE_8: a connected binary centre line; _set_stroke adds the anti-aliasing.
        cv2.putText(canvas, text, org, face_id, height / max(h1, 1), 255, 1, cv2.LINE_8)
    rows = np.flatnonzero(canvas.any(1))
    cols = np.flatnonzero(canvas.any(0))
    if rows.size == 0:
        return None
    y0, y1 = max(rows[0] - pad, 0), rows[-1] + pad + 1
    x0, x1 = max(cols[0] - pad, 0), cols[-1] + pad + 1
    return _set_stroke(np.ascontiguousarray(canvas[y0:y1, x0:x1]), thickness)


def _polygon(kind: str, rng: np.random.Generator) -> np.ndarray:
    """Return a shape's outline in unit coordinates (roughly radius 1, centred on 0)."""
    if kind == "square":
        return np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]], np.float64)
    if kind == "triangle":
        a = np.deg2rad([-90.0, 30.0, 150.0])
        return np.stack([np.cos(a), np.sin(a)], 1)
    if kind == "star":
        n = 5
        r_in = rng.uniform(0.38, 0.5)
        a = -np.pi / 2 + np.arange(2 * n) * np.pi / n
        r = np.where(np.arange(2 * n) % 2 == 0, 1.0, r_in)
        return np.stack([r * np.cos(a), r * np.sin(a)], 1)
    if kind == "hexagon":
        a = np.arange(6) * np.pi / 3
        return np.stack([np.cos(a), np.sin(a)], 1)
    if kind == "cross":
        w = rng.uniform(0.22, 0.36)
        quarter = [[-w, -1], [w, -1], [w, -w]]  # one arm's end and the inner corner, rotated 4 times
        pts = [(x * c - y * s, x * s + y * c) for c, s in ((1, 0), (0, 1), (-1, 0), (0, -1)) for x, y in quarter]
        return np.array(pts, np.float64)
    if kind == "blob":  # irregular closed outline: low harmonics of the radius around the centre
        a = np.linspace(0, 2 * np.pi, 48, endpoint=False)
        r = np.ones_like(a)
        for k in (2, 3, 4):
            r += rng.uniform(0.05, 0.25) * np.cos(k * a + rng.uniform(0, 2 * np.pi))
        return np.stack([r * np.cos(a), r * np.sin(a)], 1)
    raise ValueError(kind)


def _shape_canvas(kind: str, size: float, thickness: int, filled: bool, rng: np.random.Generator) -> np.ndarray:
    """Draw a shape upright, white on black, about ``size`` canvas pixels across."""
    radius = size / 2.0
    pad = thickness + 4
    # Unit outlines reach radius 1 (blobs up to 1.75); the crop in _warp_to_size removes the slack.
    dim = int(math.ceil(size * (1.8 if kind == "blob" else 1.15))) + 2 * pad
    canvas = np.zeros((dim, dim), np.uint8)
    c = dim / 2.0
    shift = 4  # sub-pixel vertex precision (coordinates in 1/16 px)
    if kind == "circle":
        ctr = (int(round(c * 16)), int(round(c * 16)))
        cv2.circle(canvas, ctr, int(round(radius * 16)), 255, -1 if filled else thickness, cv2.LINE_AA, shift)
        return canvas
    pts = np.round((_polygon(kind, rng) * radius + c) * 16).astype(np.int32).reshape(-1, 1, 2)
    if filled:
        cv2.fillPoly(canvas, [pts], 255, cv2.LINE_AA, shift)
    else:
        cv2.polylines(canvas, [pts], True, 255, thickness, cv2.LINE_AA, shift)
    return canvas


def _warp_to_size(
    canvas: np.ndarray, target: float, ss: int, angle: float, shear: float, aspect: float
) -> np.ndarray | None:
    """Rotate/shear/stretch an upright canvas so that the ink's bounding box has longest side ``target``.

    The extent after the transform is computed from the row-extreme ink pixels, so the final
    size is hit in one warp whatever the glyph's proportions. The warp happens at ``ss`` times the final
    resolution and is area-downsampled, which gives anti-aliased edges without blurring thin strokes.

    Returns:
        A float32 alpha patch in ``[0, 1]`` cropped to its non-zero pixels, or None if nothing was drawn.
    """
    ink = canvas > 0
    rows = np.flatnonzero(ink.any(1))
    if rows.size == 0:
        return None
    # Every convex-hull vertex of the ink is the leftmost or rightmost ink pixel of its row, so these
    # 2*rows points have the same extent under any linear map as all ink pixels (and are far fewer).
    first = ink[rows].argmax(1)
    last = canvas.shape[1] - 1 - ink[rows, ::-1].argmax(1)
    pts = np.concatenate([np.stack([first, rows], 1), np.stack([last, rows], 1)]).astype(np.float64)
    # Pixel centres -> the four corners of each pixel, so 1-px strokes have a non-zero extent.
    hull = (pts[:, None, :] + np.array([[-0.5, -0.5], [0.5, -0.5], [0.5, 0.5], [-0.5, 0.5]])).reshape(-1, 2)
    ca, sa = math.cos(math.radians(angle)), math.sin(math.radians(angle))
    lin = np.array([[ca, -sa], [sa, ca]]) @ np.array([[1.0, shear], [0.0, 1.0]]) @ np.diag([aspect, 1.0])
    q = hull @ lin.T
    lo, hi = q.min(0), q.max(0)
    k = target * ss / max(float((hi - lo).max()), 1e-6)
    a = lin * k
    margin = 2 * ss
    # Output size in final pixels, then in supersampled pixels (a multiple of ss so INTER_AREA is exact).
    wf = int(math.ceil((hi[0] - lo[0]) * k / ss)) + 2 * margin // ss + 1
    hf = int(math.ceil((hi[1] - lo[1]) * k / ss)) + 2 * margin // ss + 1
    ws, hs = wf * ss, hf * ss
    # Map the centre of the transformed extent to the centre of the output patch.
    t = np.array([ws / 2.0, hs / 2.0]) - (lo + hi) / 2.0 * k
    m = np.hstack([a, t[:, None]])
    out = cv2.warpAffine(canvas, m, (ws, hs), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    if ss > 1:
        out = cv2.resize(out, (wf, hf), interpolation=cv2.INTER_AREA)
    ys = np.flatnonzero(out.any(1))
    xs = np.flatnonzero(out.any(0))
    if ys.size == 0:
        return None
    out = out[ys[0] : ys[-1] + 1, xs[0] : xs[-1] + 1]
    return out.astype(np.float32) * (1.0 / 255.0)


def _render_object(cls: int, target: float, rng: np.random.Generator) -> np.ndarray | None:
    """Render labelled class ``cls`` (digit 0-9 or one of the six shapes) as an alpha patch."""
    ss = _supersample(target)
    if cls < 10:
        face = _FACES[rng.integers(len(_FACES))]
        italic = bool(rng.random() < 0.3)
        stroke = max(1.0, target * rng.uniform(0.04, 0.13))
        canvas = _text_canvas(str(cls), face, italic, target * ss, stroke * ss)
        if canvas is None:
            return None
        return _warp_to_size(
            canvas, target, ss, rng.uniform(-25, 25), rng.uniform(-0.25, 0.25), rng.uniform(0.8, 1.2)
        )
    kind = SHAPES[cls - 10]
    filled = bool(rng.random() < 0.5)
    stroke = max(1.0, target * rng.uniform(0.05, 0.14))
    canvas = _shape_canvas(kind, target * ss, max(1, int(round(stroke * ss))), filled, rng)
    # Any rotation keeps a shape's identity; shear/stretch stay mild so a square still reads as one.
    return _warp_to_size(
        canvas, target, ss, rng.uniform(-180, 180), rng.uniform(-0.1, 0.1), rng.uniform(0.85, 1.15)
    )


def _render_distractor(rng: np.random.Generator, imgsz: int) -> np.ndarray | None:
    """Render an unlabelled distractor: look-alike letter, line, arc or blob."""
    u = rng.random()
    if u < 0.4:  # digit-like letter, drawn exactly like the digits
        target = _sample_size(rng, imgsz)
        ss = _supersample(target)
        letter = _DISTRACTOR_LETTERS[rng.integers(len(_DISTRACTOR_LETTERS))]
        face = _FACES[rng.integers(len(_FACES))]
        stroke = max(1.0, target * rng.uniform(0.04, 0.13))
        canvas = _text_canvas(letter, face, bool(rng.random() < 0.3), target * ss, stroke * ss)
        if canvas is None:
            return None
        return _warp_to_size(
            canvas, target, ss, rng.uniform(-25, 25), rng.uniform(-0.25, 0.25), rng.uniform(0.8, 1.2)
        )
    if u < 0.65:  # straight line segment
        target = imgsz * rng.uniform(0.1, 0.7)
        t = max(1, int(round(rng.uniform(1.0, 1.0 + imgsz / 160))))
        pad = t + 3
        canvas = np.zeros((2 * pad + 1, int(target) + 2 * pad), np.uint8)
        cv2.line(canvas, (pad, pad), (pad + int(target), pad), 255, t, cv2.LINE_AA)
        return _warp_to_size(canvas, target, 1, rng.uniform(0, 180), 0.0, 1.0)
    if u < 0.8:  # open arc (60-270 deg) so it never closes into a labelled circle
        target = _sample_size(rng, imgsz) * 1.3
        ss = _supersample(target)
        r = target * ss / 2
        t = max(1, int(round(max(1.0, target * rng.uniform(0.04, 0.12)) * ss)))
        dim = int(2 * r) + 2 * (t + 4)
        canvas = np.zeros((dim, dim), np.uint8)
        start = rng.uniform(0, 360)
        axes = (int(r), int(r * rng.uniform(0.5, 1.0)))
        cv2.ellipse(canvas, (dim // 2, dim // 2), axes, 0, start, start + rng.uniform(60, 270), 255, t, cv2.LINE_AA)
        return _warp_to_size(canvas, target, ss, rng.uniform(0, 360), 0.0, 1.0)
    # filled irregular blob, stretched so it is rarely mistaken for a circle
    target = _sample_size(rng, imgsz) * 1.2
    ss = _supersample(target)
    canvas = _shape_canvas("blob", target * ss, 1, True, rng)
    return _warp_to_size(canvas, target, ss, rng.uniform(0, 180), rng.uniform(-0.2, 0.2), rng.uniform(0.45, 0.9))
