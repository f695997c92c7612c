"""Synthetic 16-class detection set: OpenCV-font digits and geometric shapes on procedural backgrounds.

No real detection data or pretrained YOLO weights can be downloaded where this project is developed, so
the benchmarks train on a generated stand-in (see ``docs/benchmark.md``). The set is built so that all
three detection strides carry targets (COCO-like small/medium/large split), objects stay learnable
(minimum colour contrast, at most half of any object hidden) and the scene is not trivially clean
(textured backgrounds, unlabelled look-alike distractors, blur, sensor noise, JPEG artefacts).

Only numpy, OpenCV and PyYAML are needed; Ultralytics is used for logging only when it is already
imported, so generating a CI-sized set costs a fraction of a second.

Size convention: an object's size is the longest side of its labelled box, in pixels of the stored
image. COCO thresholds are applied to that length: small < 32 px, medium 32-96 px, large >= 96 px. The
longest side (rather than sqrt(area)) is what the generator samples, so the split is controlled directly;
at 512 px it comes out at about 44 / 34 / 22 %.

Determinism: image ``index`` of split ``split`` is a pure function of ``(seed, split, index)`` through
``np.random.SeedSequence([seed, split_id, index])``; no state is shared between images, so the output
bytes do not depend on the worker count or on the order in which workers finish.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import logging
import math
import multiprocessing
import os
import shutil
import socket
import sys
import time
import uuid
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from numbers import Integral
from pathlib import Path
from typing import Any, NamedTuple

import cv2
import numpy as np
import yaml

__all__ = [
    "CLASS_NAMES",
    "SIZE_BINS",
    "SYNTH_VERSION",
    "SynthConfig",
    "SynthSample",
    "label_sha256",
    "load_synth_info",
    "make_synthetic_dataset",
    "render_sample",
    "size_class",
    "synth_main",
]

# Bump whenever a change alters any output byte for the same settings: a dataset on disk is reused only
# when its recorded version matches, so a stale set is never silently mixed with new code.
SYNTH_VERSION = 1

SHAPES = ("circle", "square", "triangle", "star", "hexagon", "cross")
CLASS_NAMES: dict[int, str] = {i: str(i) for i in range(10)} | {10 + i: s for i, s in enumerate(SHAPES)}
NUM_CLASSES = len(CLASS_NAMES)
SPLIT_IDS = {"train": 0, "val": 1}

# COCO thresholds (pixels), applied to the longest side of the stored box.
SIZE_BINS = (32, 96)

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
_ALPHA_ON = 0.5  # a pixel belongs to an item (occlusion bookkeeping, tight box) from this coverage on
_MAX_HIDDEN = 0.5  # no labelled object may lose more than this fraction of its drawn pixels
_PLACE_TRIES = 25
_MIN_COLOR_DIST = 90.0  # Euclidean BGR distance between an item and the mean background under it
_MIN_LUMA_DIST = 30.0  # luma difference: survives JPEG chroma subsampling, where hue-only contrast does not

_YAML_KEY = "synth"
_TMP_TAG = ".synth-tmp-"


def _logger() -> logging.Logger:
    """Return Ultralytics' LOGGER if Ultralytics is already loaded, else a module logger.

    Importing Ultralytics (and with it torch) costs seconds, which would dominate generating a CI-sized
    set, so it is only borrowed when someone else already paid for it.
    """
    if "ultralytics.utils" in sys.modules:
        try:
            from ultralytics.utils import LOGGER

            return LOGGER
        except Exception:  # pragma: no cover - partially initialised or broken install
            pass
    return logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------------------
# Configuration and argument checking
# --------------------------------------------------------------------------------------------------------


def _check_int(name: str, value: Any, minimum: int, hint: str = "") -> int:
    """Return ``value`` as int or raise a ValueError that says what to pass instead."""
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise ValueError(f"{name} must be an integer >= {minimum}{hint}, got {value!r} ({type(value).__name__})")
    if value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}{hint}, got {value}")
    return int(value)


@dataclasses.dataclass(frozen=True)
class SynthConfig:
    """Settings that determine every output byte of a synthetic dataset.

    Attributes:
        n_train: Number of training images (>= 1).
        n_val: Number of validation images (>= 1; Ultralytics validates every epoch).
        imgsz: Square image side in pixels; >= 64 and a multiple of 32 (the largest YOLO stride).
        seed: Non-negative integer; image ``i`` of a split depends only on ``(seed, split, i)``.
        max_objects: Upper bound of labelled objects per image (each image draws 1..max_objects).
        min_size: Smallest longest side of a labelled object in px (0 = the default size law, whose floor
            scales with ``imgsz``). Raising it gives an easier set of medium/large objects, e.g. the
            CPU-sized set the shipped FP model was trained on (``imgsz=160 max_objects=4 min_size=20``).
    """

    n_train: int = 4000
    n_val: int = 500
    imgsz: int = 512
    seed: int = 0
    max_objects: int = 12
    min_size: int = 0

    def __post_init__(self) -> None:
        """Validate eagerly so that a bad value fails before any directory is touched."""
        _check_int("n_train", self.n_train, 1)
        _check_int("n_val", self.n_val, 1, " (a validation split is required by Ultralytics)")
        _check_int("max_objects", self.max_objects, 1)
        _check_int("seed", self.seed, 0)
        _check_int("min_size", self.min_size, 0)
        imgsz = _check_int("imgsz", self.imgsz, 64)
        if imgsz % 32:
            lo, hi = imgsz // 32 * 32, imgsz // 32 * 32 + 32
            raise ValueError(
                f"imgsz must be a multiple of 32 (the largest YOLO stride), got {imgsz}; use {lo} or {hi}"
            )
        hi = int(_SIZE_HI * imgsz / 512.0)
        if self.min_size > hi:
            raise ValueError(f"min_size={self.min_size} exceeds the largest object side at imgsz={imgsz} ({hi} px)")

    def settings(self) -> dict[str, int]:
        """Return the settings recorded in data.yaml (and compared when deciding to reuse a dataset)."""
        d = dataclasses.asdict(self)
        if not d["min_size"]:  # sets made before the key existed stay reusable
            d.pop("min_size")
        return {"version": SYNTH_VERSION, **d}


class SynthSample(NamedTuple):
    """One rendered image before JPEG encoding.

    Attributes:
        image: ``(imgsz, imgsz, 3)`` uint8 BGR image.
        boxes: ``(N, 4)`` int array of ``x1, y1, x2, y2`` pixel edges (exclusive x2/y2) of the visible
            drawn pixels of each labelled object.
        classes: ``(N,)`` int array of class ids in ``0..15``.
        jpeg_quality: Quality the image is stored with (part of the augmentation).
    """

    image: np.ndarray
    boxes: np.ndarray
    classes: np.ndarray
    jpeg_quality: int


def size_class(longest_side: float) -> int:
    """Return 0 (small), 1 (medium) or 2 (large) for a box's longest side in pixels (COCO thresholds)."""
    return int(longest_side >= SIZE_BINS[0]) + int(longest_side >= SIZE_BINS[1])


# --------------------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------------------


def _luma(c: np.ndarray) -> float:
    """Rec. 601 luma of a BGR colour."""
    return float(0.114 * c[0] + 0.587 * c[1] + 0.299 * c[2])


def _random_color(rng: np.random.Generator) -> np.ndarray:
    return rng.uniform(0.0, 255.0, 3)


def _pick_color(rng: np.random.Generator, bg: np.ndarray) -> np.ndarray:
    """Pick a colour that stays distinguishable from the mean background ``bg`` under the item.

    A random colour is kept only if it differs enough in both BGR distance and luma; after a few misses
    the better of black and white is used, which always satisfies the luma test for mid-tone
    backgrounds and is the most contrasting choice otherwise.
    """
    bl = _luma(bg)
    for _ in range(10):
        c = _random_color(rng)
        if np.linalg.norm(c - bg) >= _MIN_COLOR_DIST and abs(_luma(c) - bl) >= _MIN_LUMA_DIST:
            return c
    return np.zeros(3) if bl > 127.5 else np.full(3, 255.0)


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


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """Return a float32 BGR background: multi-octave colour noise, a gradient, flat colour, or a mix.

    Everything is built at quarter resolution and upsampled once: gradients are linear (so linear
    upsampling is exact) and the finest noise octave is far coarser than a quarter-resolution pixel
    pair, which keeps a 512-px background at a couple of milliseconds.
    """
    u = rng.random()
    c0 = _random_color(rng).astype(np.float32)
    if u < 0.15:  # flat
        return np.broadcast_to(c0, (size, size, 3)).copy()
    work = max(32, size // 4)
    grad = None
    if u < 0.45 or u >= 0.85:  # linear gradient at a random angle
        c1 = _random_color(rng).astype(np.float32)
        a = rng.uniform(0, 2 * np.pi)
        r = np.linspace(-0.5, 0.5, work, dtype=np.float32)
        t = r[None, :] * np.float32(math.cos(a)) + r[:, None] * np.float32(math.sin(a))
        t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
        grad = c0 + t[..., None] * (c1 - c0)
    if u < 0.45:
        return cv2.resize(grad, (size, size), interpolation=cv2.INTER_LINEAR)
    # Multi-octave value noise, one independent field per channel (colour noise).
    noise = np.zeros((work, work, 3), np.float32)
    amp, persistence = 1.0, rng.uniform(0.4, 0.7)
    cells = int(rng.integers(2, 5))
    while cells <= work // 2:
        grid = rng.random((cells, cells, 3), dtype=np.float32)
        noise += np.float32(amp) * cv2.resize(grid, (work, work), interpolation=cv2.INTER_CUBIC)
        amp *= persistence
        cells *= 2
    lo = noise.reshape(-1, 3).min(0)
    noise = (noise - lo) / np.maximum(noise.reshape(-1, 3).max(0) - lo, 1e-6)
    # The colour span is limited so that the mean-background contrast check stays meaningful locally.
    span = rng.uniform(-110, 110, 3).astype(np.float32)
    if grad is None:
        base = np.clip(c0, np.maximum(0, -span), np.minimum(255, 255 - span))
        bg = base + noise * span
    else:
        bg = grad + (noise - 0.5) * (0.6 * span)
    return cv2.resize(bg, (size, size), interpolation=cv2.INTER_LINEAR)


def _place(
    mask: np.ndarray,
    size: int,
    owner: np.ndarray,
    visible: np.ndarray,
    total: np.ndarray,
    rng: np.random.Generator,
) -> tuple[int, int, np.ndarray | None] | None:
    """Find a position for ``mask`` that hides at most half of any labelled object's drawn pixels.

    Returns:
        ``(x, y, covered)`` with ``covered[j]`` the pixels of object ``j`` the item would hide (None if it
        hides none), or None if every try violated the occlusion cap. A 1-px margin keeps boxes strictly
        inside the image.
    """
    h, w = mask.shape
    if h >= size - 1 or w >= size - 1:
        return None
    n = len(visible)
    for _ in range(_PLACE_TRIES):
        y = int(rng.integers(1, size - h))
        x = int(rng.integers(1, size - w))
        if n == 0:
            return x, y, None
        under = owner[y : y + h, x : x + w][mask]
        under = under[under >= 0]
        if under.size == 0:
            return x, y, None
        covered = np.bincount(under, minlength=n)
        if np.all(visible - covered >= (1.0 - _MAX_HIDDEN) * total):
            return x, y, covered
    return None


def render_sample(cfg: SynthConfig, split: str, index: int) -> SynthSample:
    """Render image ``index`` of ``split`` — a pure function of ``(cfg.seed, split, index)`` and ``cfg``.

    Drawing order: background, distractors underneath, then labelled objects and the remaining
    distractors in random order. Every item goes through :func:`_place`, which enforces the occlusion
    cap against an ownership map (id of the labelled object that owns each pixel, -1 otherwise).

    Args:
        cfg: Dataset settings (``imgsz``, ``seed``, ``max_objects`` are used here).
        split: ``"train"`` or ``"val"``.
        index: Image index within the split.

    Returns:
        The rendered sample; boxes are the tight boxes of each object's still-visible drawn pixels.
    """
    if split not in SPLIT_IDS:
        raise ValueError(f"split must be one of {sorted(SPLIT_IDS)}, got {split!r}")
    rng = np.random.default_rng(np.random.SeedSequence([cfg.seed, SPLIT_IDS[split], int(index)]))
    size = cfg.imgsz
    img = _background(rng, size)
    owner = np.full((size, size), -1, np.int32)

    n_obj = int(rng.integers(1, cfg.max_objects + 1))
    n_dis = int(rng.integers(0, 3 + size // 128))
    n_under = int(rng.integers(0, n_dis + 1))
    # Items drawn after the underneath distractors, shuffled so objects occlude each other in any order.
    order = [int(rng.integers(NUM_CLASSES)) for _ in range(n_obj)] + [-1] * (n_dis - n_under)
    order = [order[i] for i in rng.permutation(len(order))]
    order = [-1] * n_under + order

    classes: list[int] = []
    rois: list[tuple[int, int, int, int]] = []
    visible = np.zeros(0, np.int64)
    total = np.zeros(0, np.int64)
    for cls in order:
        alpha = _render_distractor(rng, size) if cls < 0 else _render_object(cls, _sample_size(rng, size, cfg.min_size), rng)
        if alpha is None:
            continue
        mask = alpha >= _ALPHA_ON
        area = int(mask.sum())
        if area == 0:
            continue
        placed = _place(mask, size, owner, visible, total, rng)
        if placed is None:
            continue
        x, y, covered = placed
        h, w = alpha.shape
        roi = img[y : y + h, x : x + w]
        color = _pick_color(rng, roi[mask].mean(0))
        a = alpha[..., None]
        roi *= 1.0 - a
        roi += a * color.astype(np.float32)
        if covered is not None:
            visible = visible - covered
        oid = -1
        if cls >= 0:
            oid = len(classes)
            classes.append(cls)
            rois.append((x, y, w, h))
            visible = np.append(visible, area)
            total = np.append(total, area)
        owner[y : y + h, x : x + w][mask] = oid

    boxes = np.zeros((len(classes), 4), np.int64)
    keep = np.ones(len(classes), bool)
    for i, (x, y, w, h) in enumerate(rois):
        ys, xs = np.nonzero(owner[y : y + h, x : x + w] == i)
        if ys.size == 0:  # cannot happen with the cap below 1, kept as a guard
            keep[i] = False
            continue
        boxes[i] = (x + xs.min(), y + ys.min(), x + xs.max() + 1, y + ys.max() + 1)

    image, quality = _degrade(rng, img)
    return SynthSample(image, boxes[keep], np.asarray(classes, np.int64)[keep], quality)


def _degrade(rng: np.random.Generator, img: np.ndarray) -> tuple[np.ndarray, int]:
    """Camera-like degradations; returns the uint8 image and the JPEG quality to store it with.

    The blur scales with the image so it means the same at any imgsz; JPEG quality 55-95 adds blocking
    and chroma-subsampling artefacts of varying strength when the image is written.
    """
    size = img.shape[0]
    if rng.random() < 0.3:
        sigma = rng.uniform(0.4, 1.1) * size / 512
        if sigma >= 0.3:
            img = cv2.GaussianBlur(img, (0, 0), sigma)
    if rng.random() < 0.5:
        # Sensor noise with std sigma. Sum of two uniform int8 fields (triangular, std 104.4) instead of
        # standard_normal: the exact shape is irrelevant here and it is ~4x cheaper at 512 px.
        sigma = rng.uniform(2.0, 9.0)
        n = rng.integers(-128, 128, (2, *img.shape), dtype=np.int8)
        img += (n[0].astype(np.int16) + n[1]) * np.float32(sigma / 104.4)
    quality = int(rng.integers(55, 96))
    # Negative values first (convertScaleAbs would mirror them), then a saturating, rounding cast to uint8.
    return cv2.convertScaleAbs(np.maximum(img, 0, out=img)), quality


def _label_text(sample: SynthSample, size: int) -> str:
    """YOLO label lines ``cls cx cy w h`` (normalised, 6 decimals)."""
    lines = []
    for c, (x1, y1, x2, y2) in zip(sample.classes.tolist(), sample.boxes.tolist()):
        cx, cy = (x1 + x2) / (2 * size), (y1 + y2) / (2 * size)
        lines.append(f"{c} {cx:.6f} {cy:.6f} {(x2 - x1) / size:.6f} {(y2 - y1) / size:.6f}\n")
    return "".join(lines)


# --------------------------------------------------------------------------------------------------------
# Writing (worker side)
# --------------------------------------------------------------------------------------------------------


def _stem(index: int, n: int) -> str:
    return f"{index:0{max(6, len(str(n - 1)))}d}"


def _init_worker() -> None:
    """Pool initializer: one OpenCV thread per process, since the processes already fill the cores."""
    cv2.setNumThreads(0)


def _work_chunk(job: tuple[dict, str, str, int, int, int]) -> list[tuple[int, int, int]]:
    """Render and write images ``start..stop-1`` of one split; return ``(cls, w, h)`` per object."""
    cfg_dict, root, split, start, stop, n = job
    cfg = SynthConfig(**cfg_dict)
    root_p = Path(root)
    stats = []
    for i in range(start, stop):
        s = render_sample(cfg, split, i)
        ok, buf = cv2.imencode(".jpg", s.image, [cv2.IMWRITE_JPEG_QUALITY, s.jpeg_quality])
        if not ok:  # pragma: no cover - only on a broken OpenCV build
            raise RuntimeError("cv2.imencode('.jpg') failed")
        stem = _stem(i, n)
        (root_p / "images" / split / f"{stem}.jpg").write_bytes(buf.tobytes())
        (root_p / "labels" / split / f"{stem}.txt").write_text(_label_text(s, cfg.imgsz))
        stats.extend((c, x2 - x1, y2 - y1) for c, (x1, y1, x2, y2) in zip(s.classes.tolist(), s.boxes.tolist()))
    return stats


# --------------------------------------------------------------------------------------------------------
# Dataset level
# --------------------------------------------------------------------------------------------------------


def label_sha256(root: str | os.PathLike) -> str:
    """SHA-256 over all label files of a dataset, in sorted order.

    Each file contributes ``"<split>/<name>\\n"`` followed by its bytes, splits in the order train, val.
    Only ``*.txt`` counts, so the ``labels/*.cache`` files Ultralytics writes do not change the hash.
    """
    h = hashlib.sha256()
    for split in SPLIT_IDS:
        d = Path(root) / "labels" / split
        for f in sorted(d.glob("*.txt")) if d.is_dir() else ():
            h.update(f"{split}/{f.name}\n".encode())
            h.update(f.read_bytes())
    return h.hexdigest()


def load_synth_info(path: str | os.PathLike) -> dict | None:
    """Return the generator record (``synth:`` key) of a dataset's data.yaml, or None if it has none.

    Args:
        path: The data.yaml file or the dataset directory.
    """
    p = Path(path)
    if p.is_dir():
        p = p / "data.yaml"
    try:
        data = yaml.safe_load(p.read_text())
    except (OSError, yaml.YAMLError):
        return None
    info = data.get(_YAML_KEY) if isinstance(data, dict) else None
    return info if isinstance(info, dict) else None


def _is_complete(root: Path, cfg: SynthConfig, info: dict) -> bool:
    """Check that a synth dataset on disk has all its files and unchanged labels."""
    for split, n in (("train", cfg.n_train), ("val", cfg.n_val)):
        for sub, ext in (("images", "jpg"), ("labels", "txt")):
            d = root / sub / split
            if not d.is_dir() or sum(1 for _ in d.glob(f"*.{ext}")) != n:
                return False
    return label_sha256(root) == info.get("labels_sha256")


def _labels_edited(root: Path, info: dict) -> bool:
    """True if every recorded label file is there but their hash differs from the record (edited, not incomplete)."""
    for split in ("train", "val"):
        d = root / "labels" / split
        if not d.is_dir() or sum(1 for _ in d.glob("*.txt")) != int(info.get(f"n_{split}") or -1):
            return False
    return label_sha256(root) != info.get("labels_sha256")


def _resolve_workers(workers: int | None, n_images: int, imgsz: int) -> int:
    """Number of worker processes: 0 means in-process.

    None picks min(cpu_count, 8), except for sets smaller than ~256 images at 512 px (about 5 CPU-seconds
    of work): a spawned worker re-imports the package (and whatever it imports, e.g. torch) at a cost of
    seconds, which such a set would not earn back.
    """
    if workers is None:
        if n_images * imgsz * imgsz < 256 * 512 * 512:
            return 0
        return min(os.cpu_count() or 1, 8)
    w = _check_int("workers", workers, 0, " (0 or 1 = in-process)")
    return 0 if w <= 1 else min(w, n_images)


def _cleanup_stale_tmp(out: Path) -> None:
    """Remove temp dirs of earlier runs on this host whose process is gone (killed mid-generation)."""
    if os.name == "nt":  # os.kill(pid, 0) would terminate the process on Windows, not probe it
        return
    host = socket.gethostname()
    for d in out.parent.glob(f".{out.name}{_TMP_TAG}*"):
        try:
            tag_host, pid, _ = d.name[len(f".{out.name}{_TMP_TAG}") :].rsplit("-", 2)
            if tag_host != host:
                continue
            os.kill(int(pid), 0)  # raises if no such process
        except ProcessLookupError:
            shutil.rmtree(d, ignore_errors=True)
        except (ValueError, OSError):
            continue


def _run_in_process(jobs: list) -> list[tuple[int, int, int]]:
    prev = cv2.getNumThreads()
    cv2.setNumThreads(0)  # same settings as the workers; restored because the caller may rely on threads
    try:
        return [st for job in jobs for st in _work_chunk(job)]
    finally:
        cv2.setNumThreads(prev)


def _run_jobs(jobs: list, workers: int) -> list[tuple[int, int, int]]:
    """Run the write jobs in ``workers`` spawned processes (in-process for 0) and collect object stats.

    spawn rather than fork: forking a parent that holds CUDA contexts or OpenMP/torch thread pools can
    hang the children. ProcessPoolExecutor rather than Pool: a worker that cannot start (e.g. spawn cannot
    re-import a ``__main__`` read from stdin) raises BrokenProcessPool instead of hanging forever. Every
    image is a pure function of its index, so falling back to in-process generation then rewrites the
    same bytes.
    """
    if not workers:
        return _run_in_process(jobs)
    pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"), initializer=_init_worker)
    try:
        return [st for part in pool.map(_work_chunk, jobs) for st in part]
    except BrokenProcessPool as e:
        _logger().warning(f"synth: worker processes failed ({e}); generating in-process instead")
        return _run_in_process(jobs)
    finally:
        # Drop queued chunks and wait for running ones, so no worker still writes into the temp dir when
        # the caller deletes it after an error or Ctrl-C.
        pool.shutdown(wait=True, cancel_futures=True)


def _generate(cfg: SynthConfig, out: Path, workers: int) -> None:
    """Generate into a temp dir next to ``out`` and swap it in, so an interrupted run leaves nothing."""
    log = _logger()
    _cleanup_stale_tmp(out)
    tmp = out.parent / f".{out.name}{_TMP_TAG}{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        for sub in ("images", "labels"):
            for split in SPLIT_IDS:
                (tmp / sub / split).mkdir(parents=True)
        # Chunks of up to 32 images (at least ~4 per worker) amortise task overhead and keep the pool
        # balanced; results come back in job order, and no image depends on which worker drew it.
        jobs = []
        cfg_dict = dataclasses.asdict(cfg)
        for split, n in (("train", cfg.n_train), ("val", cfg.n_val)):
            step = max(1, min(32, -(-n // (4 * workers)))) if workers else n
            jobs += [(cfg_dict, str(tmp), split, s, min(s + step, n), n) for s in range(0, n, step)]
        stats = _run_jobs(jobs, workers)

        sizes = [0, 0, 0]
        class_counts = [0] * NUM_CLASSES
        for c, w, h in stats:
            sizes[size_class(max(w, h))] += 1
            class_counts[c] += 1
        info = {
            **cfg.settings(),
            "labels_sha256": label_sha256(tmp),
            "objects": len(stats),
            "sizes": {"small": sizes[0], "medium": sizes[1], "large": sizes[2]},
            "size_rule": f"longest box side in px: small < {SIZE_BINS[0]} <= medium < {SIZE_BINS[1]} <= large",
            "class_counts": class_counts,
            # Fonts and drawing differ between OpenCV releases: recorded so that a changed labels_sha256
            # can be traced to a library update rather than a code change.
            "opencv": cv2.__version__,
            "numpy": np.__version__,
        }
        data = {
            "path": str(out),
            "train": "images/train",
            "val": "images/val",
            "nc": NUM_CLASSES,
            "names": dict(CLASS_NAMES),
            _YAML_KEY: info,
        }
        (tmp / "data.yaml").write_text(yaml.safe_dump(data, sort_keys=False, default_flow_style=None))

        # Swap: move any previous dataset aside first (rename is atomic, rmtree is not).
        old = None
        if out.exists():
            old = out.parent / f".{out.name}.synth-old-{uuid.uuid4().hex[:8]}"
            out.rename(old)
        tmp.rename(out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        log.info(f"synth: labels sha256 {info['labels_sha256']}")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def make_synthetic_dataset(
    out_dir: str | os.PathLike,
    n_train: int = 4000,
    n_val: int = 500,
    imgsz: int = 512,
    seed: int = 0,
    max_objects: int = 12,
    workers: int | None = None,
    overwrite: bool = False,
    min_size: int = 0,
) -> Path:
    """Write the synthetic 16-class detection set as an Ultralytics dataset and return its data.yaml.

    Layout: ``images/{train,val}/NNNNNN.jpg``, ``labels/{train,val}/NNNNNN.txt`` (YOLO ``cls cx cy w h``,
    normalised, 6 decimals) and ``data.yaml`` with ``path`` (absolute), ``train``, ``val``, ``nc``,
    ``names`` and a ``synth`` record (settings, label hash, object/size/class counts) that Ultralytics
    ignores.

    An existing ``out_dir`` is handled as follows: missing or empty -> generated; a synth dataset with the
    same settings and intact labels -> returned as is (logged); any other synth dataset -> regenerated;
    anything else that is not empty -> FileExistsError unless ``overwrite=True``. ``overwrite=True``
    always regenerates. The new set replaces the old one by a rename at the end.

    Args:
        out_dir: Dataset directory.
        n_train: Training images (>= 1).
        n_val: Validation images (>= 1).
        imgsz: Image side in px (>= 64, multiple of 32).
        seed: Non-negative integer seed.
        max_objects: Each image gets 1..max_objects labelled objects (fewer if placements fail the
            occlusion cap).
        min_size: Smallest longest side of a labelled object in px (0 = default size law).
        workers: Processes; 0 or 1 = in-process, None = min(cpu_count, 8) (in-process for sets under
            ~256 images at 512 px, where starting processes costs more than it saves). The output bytes
            do not depend on it.
        overwrite: Replace a non-empty ``out_dir`` that is not a synth dataset, or regenerate one that is.

    Returns:
        Path of ``out_dir/data.yaml``.

    Raises:
        ValueError: A bad argument (the message says what to pass instead).
        FileExistsError: ``out_dir`` is a file, or a non-empty directory not made by this generator.
    """
    cfg = SynthConfig(
        n_train=n_train, n_val=n_val, imgsz=imgsz, seed=seed, max_objects=max_objects, min_size=min_size
    )
    n_workers = _resolve_workers(workers, cfg.n_train + cfg.n_val, cfg.imgsz)
    if not isinstance(overwrite, bool):
        raise ValueError(f"overwrite must be True or False, got {overwrite!r}")
    if not isinstance(out_dir, (str, os.PathLike)) or not str(out_dir):
        raise ValueError(f"out_dir must be a non-empty path, got {out_dir!r}")
    out = Path(out_dir).expanduser().resolve()
    yaml_path = out / "data.yaml"
    log = _logger()

    if out.exists() and not out.is_dir():
        raise FileExistsError(f"out_dir {out} is a file; pass a directory path")
    from ..preflight import check_writable_dir

    check_writable_dir(out, "out")
    if out.is_dir() and any(out.iterdir()):
        info = load_synth_info(yaml_path)
        if info is None and not overwrite:
            raise FileExistsError(
                f"out_dir {out} is not empty and holds no synthetic dataset (no data.yaml with a "
                f"'{_YAML_KEY}:' record); choose an empty or new directory, or pass overwrite=True to replace it"
            )
        if info is not None and not overwrite:
            same = {k: info.get(k) for k in cfg.settings()} == cfg.settings()
            if same and _is_complete(out, cfg, info):
                log.info(f"synth: {out} already holds this dataset ({_describe(cfg)}), reusing it")
                return yaml_path
            if _labels_edited(out, info):
                raise FileExistsError(
                    f"out_dir {out} holds a synthetic dataset whose labels were changed after generation (edited by "
                    "hand?); regenerating would lose them. Choose another out=, or pass overwrite=True to replace it"
                )
            why = "was made with other settings" if not same else "is incomplete"
            log.info(f"synth: {out} {why}, regenerating")

    out.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    log.info(f"synth: generating {_describe(cfg)} in {out} with {n_workers or 'no'} worker processes")
    _generate(cfg, out, n_workers)
    log.info(f"synth: done in {time.perf_counter() - t0:.1f}s")
    return yaml_path


def _describe(cfg: SynthConfig) -> str:
    extra = f", min_size {cfg.min_size}px" if cfg.min_size else ""
    return f"{cfg.n_train}+{cfg.n_val} images at {cfg.imgsz}px, seed {cfg.seed}, max_objects {cfg.max_objects}{extra}"


# --------------------------------------------------------------------------------------------------------
# CLI entry (wired into `yolo-gab synth ...` by the CLI module)
# --------------------------------------------------------------------------------------------------------

SYNTH_CLI_DEFAULTS: dict[str, Any] = {
    "out": "datasets/synth",
    "train": 4000,
    "val": 500,
    "imgsz": 512,
    "seed": 0,
    "max_objects": 12,
    "min_size": 0,
    "workers": None,
    "overwrite": False,
}
_CLI_ALIASES = {"n_train": "train", "n_val": "val"}
_CLI_INTS = ("train", "val", "imgsz", "seed", "max_objects", "min_size", "workers")


def _parse_cli_value(key: str, value: Any) -> Any:
    """Turn an Ultralytics-style ``key=value`` string (or an already typed value) into the typed value."""
    if value is None or (isinstance(value, str) and value.strip().lower() in {"", "none", "null"}):
        return SYNTH_CLI_DEFAULTS[key]
    if key == "overwrite":
        if isinstance(value, bool):
            return value
        s = str(value).strip().lower()
        if s in {"true", "1", "yes", "on"}:
            return True
        if s in {"false", "0", "no", "off"}:
            return False
        raise ValueError(f"synth: overwrite={value!r} must be True or False")
    if key in _CLI_INTS:
        if isinstance(value, str):
            try:
                return int(value.strip())
            except ValueError:
                raise ValueError(f"synth: {key}={value!r} must be an integer") from None
        return value  # typed values are checked by make_synthetic_dataset
    return str(value)


def synth_main(args: dict[str, Any] | None = None) -> Path:
    """Command-line entry: ``yolo-gab synth out=DIR train=4000 val=500 imgsz=512 seed=0 ...``.

    Values may be strings (as parsed from ``key=value``) or typed. Defaults give the benchmark set.
    Prints one summary line: path, image counts, objects, size split, label hash and seconds.

    Args:
        args: Mapping of keys ``out, train, val, imgsz, seed, max_objects, min_size, workers, overwrite``
            (``n_train``/``n_val`` are accepted for ``train``/``val``).

    Returns:
        Path of the dataset's data.yaml.

    Raises:
        ValueError: Unknown key (the message names the closest valid one) or a bad value.
    """
    merged = dict(SYNTH_CLI_DEFAULTS)
    for k, v in (args or {}).items():
        key = _CLI_ALIASES.get(str(k), str(k))
        if key not in SYNTH_CLI_DEFAULTS:
            valid = list(SYNTH_CLI_DEFAULTS)
            close = difflib.get_close_matches(str(k), valid + list(_CLI_ALIASES), n=1, cutoff=0.5)
            hint = f" Did you mean '{close[0]}'?" if close else ""
            raise ValueError(f"synth: '{k}' is not a valid argument.{hint} Valid arguments: {', '.join(valid)}")
        merged[key] = _parse_cli_value(key, v)

    t0 = time.perf_counter()
    path = make_synthetic_dataset(
        merged["out"],
        n_train=merged["train"],
        n_val=merged["val"],
        imgsz=merged["imgsz"],
        seed=merged["seed"],
        max_objects=merged["max_objects"],
        min_size=merged["min_size"],
        workers=merged["workers"],
        overwrite=merged["overwrite"],
    )
    dt = time.perf_counter() - t0
    info = load_synth_info(path) or {}
    sizes = info.get("sizes", {})
    n = max(int(info.get("objects", 0)), 1)
    split = "/".join(f"{100 * sizes.get(k, 0) / n:.0f}" for k in ("small", "medium", "large"))
    print(
        f"synth: {path} | train {info.get('n_train')} val {info.get('n_val')} imgsz {info.get('imgsz')} "
        f"seed {info.get('seed')} | {info.get('objects')} objects, small/medium/large {split} % | "
        f"labels sha256 {info.get('labels_sha256')} | {dt:.1f}s"
    )
    return path
