"""Rendering one sample of the synthetic 16-class set: the image, the boxes of its labelled objects and their masks.

Classes: the digits 0-9 (OpenCV fonts) and six geometric shapes, drawn by :mod:`.draw`. A scene is a procedural
background, unlabelled look-alike distractors underneath and among the objects, and camera-like degradations
(blur, sensor noise, JPEG quality). Objects stay learnable: each gets a colour that contrasts with the background
under it, and no item may hide more than half of a labelled object's drawn pixels.

Size convention: an object's size is the longest side of its labelled box, in pixels of the stored
image. COCO thresholds are applied to that length: small < 32 px, medium 32-96 px, large >= 96 px. The
longest side (rather than sqrt(area)) is what the generator samples, so the split is controlled directly;
at 512 px it comes out at about 44 / 34 / 22 %.

Determinism: image ``index`` of split ``split`` is a pure function of ``(seed, split, index)`` through
``np.random.SeedSequence([seed, split_id, index])``; no state is shared between images, so the output
bytes do not depend on the worker count or on the order in which workers finish.

Besides the boxes, a sample keeps the ownership map and each object's drawn mask, from which :mod:`.labels`
derives the segment polygons and pose keypoints; the task never changes the image.

Only numpy and OpenCV are needed.
"""

from __future__ import annotations

import dataclasses
import math
from numbers import Integral
from typing import Any

import cv2
import numpy as np

from .draw import _SIZE_HI, SHAPES, _render_distractor, _render_object, _sample_size
from .labels import TASKS, SynthSample

__all__ = [
    "CLASS_NAMES",
    "NUM_CLASSES",
    "SHAPES",
    "SIZE_BINS",
    "SPLIT_IDS",
    "SYNTH_VERSION",
    "SynthConfig",
    "SynthSample",
    "TASKS",
    "render_sample",
    "size_class",
]

# Bump whenever a change alters any output byte for the same settings: a dataset on disk is reused only
# when its recorded version matches, so a stale set is never silently mixed with new code.
SYNTH_VERSION = 1

CLASS_NAMES: dict[int, str] = {i: str(i) for i in range(10)} | {10 + i: s for i, s in enumerate(SHAPES)}
NUM_CLASSES = len(CLASS_NAMES)
SPLIT_IDS = {"train": 0, "val": 1}

# COCO thresholds (pixels), applied to the longest side of the stored box.
SIZE_BINS = (32, 96)

_ALPHA_ON = 0.5  # a pixel belongs to an item (occlusion bookkeeping, tight box) from this coverage on
_MAX_HIDDEN = 0.5  # no labelled object may lose more than this fraction of its drawn pixels
_PLACE_TRIES = 25
_MIN_COLOR_DIST = 90.0  # Euclidean BGR distance between an item and the mean background under it
_MIN_LUMA_DIST = 30.0  # luma difference: survives JPEG chroma subsampling, where hue-only contrast does not


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
        task: Label format, one of ``TASKS``: ``"detect"`` (boxes), ``"segment"`` (polygons) or ``"pose"``
            (boxes and keypoints); see :mod:`.labels`. The images are the same for every task.
    """

    n_train: int = 4000
    n_val: int = 500
    imgsz: int = 512
    seed: int = 0
    max_objects: int = 12
    min_size: int = 0
    task: str = "detect"

    def __post_init__(self) -> None:
        """Validate eagerly so that a bad value fails before any directory is touched."""
        _check_int("n_train", self.n_train, 1)
        _check_int("n_val", self.n_val, 1, " (a validation split is required by Ultralytics)")
        _check_int("max_objects", self.max_objects, 1)
        _check_int("seed", self.seed, 0)
        _check_int("min_size", self.min_size, 0)
        if not isinstance(self.task, str) or self.task not in TASKS:
            raise ValueError(f"task must be one of {', '.join(TASKS)}, got {self.task!r}")
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
        if d["task"] == "detect":  # likewise: detect records (and the fingerprints holding them) stay as they were
            d.pop("task")
        return {"version": SYNTH_VERSION, **d}


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
        cfg: Dataset settings (``imgsz``, ``seed``, ``max_objects``, ``min_size`` are used here).
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
    classes, rois, drawn = _draw_items(img, owner, _draw_order(rng, cfg), rng, cfg)
    boxes, keep = _tight_boxes(owner, rois)
    image, quality = _degrade(rng, img)
    if not keep.all():  # renumber the owners so that they index the kept objects
        lut = np.full(len(keep) + 1, -1, np.int32)
        lut[1:][keep] = np.arange(int(keep.sum()), dtype=np.int32)
        owner = lut[owner + 1]
    kept = tuple((x, y, m) for (x, y, _, _), m, k in zip(rois, drawn, keep) if k)
    return SynthSample(image, boxes[keep], np.asarray(classes, np.int64)[keep], quality, owner, kept)


def _draw_order(rng: np.random.Generator, cfg: SynthConfig) -> list[int]:
    """Class ids to draw in order, -1 for a distractor: the underneath distractors first, then the rest shuffled."""
    size = cfg.imgsz
    n_obj = int(rng.integers(1, cfg.max_objects + 1))
    n_dis = int(rng.integers(0, 3 + size // 128))
    n_under = int(rng.integers(0, n_dis + 1))
    # Items drawn after the underneath distractors, shuffled so objects occlude each other in any order.
    order = [int(rng.integers(NUM_CLASSES)) for _ in range(n_obj)] + [-1] * (n_dis - n_under)
    order = [order[i] for i in rng.permutation(len(order))]
    return [-1] * n_under + order


def _draw_items(
    img: np.ndarray, owner: np.ndarray, order: list[int], rng: np.random.Generator, cfg: SynthConfig
) -> tuple[list[int], list[tuple[int, int, int, int]], list[np.ndarray]]:
    """Draw the items of ``order`` into ``img`` and the ownership map ``owner`` (both in place).

    Returns:
        The classes of the labelled objects that were placed, their patch rectangles ``(x, y, w, h)`` and
        their drawn masks (bool, patch-sized).
    """
    size = cfg.imgsz
    classes: list[int] = []
    rois: list[tuple[int, int, int, int]] = []
    masks: list[np.ndarray] = []
    visible = np.zeros(0, np.int64)
    total = np.zeros(0, np.int64)
    for cls in order:
        if cls < 0:
            alpha = _render_distractor(rng, size)
        else:
            alpha = _render_object(cls, _sample_size(rng, size, cfg.min_size), rng)
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
            masks.append(mask)
            visible = np.append(visible, area)
            total = np.append(total, area)
        owner[y : y + h, x : x + w][mask] = oid
    return classes, rois, masks


def _tight_boxes(owner: np.ndarray, rois: list[tuple[int, int, int, int]]) -> tuple[np.ndarray, np.ndarray]:
    """Tight ``x1, y1, x2, y2`` box of the pixels each object still owns, and which objects own any."""
    boxes = np.zeros((len(rois), 4), np.int64)
    keep = np.ones(len(rois), bool)
    for i, (x, y, w, h) in enumerate(rois):
        ys, xs = np.nonzero(owner[y : y + h, x : x + w] == i)
        if ys.size == 0:  # cannot happen with the cap below 1, kept as a guard
            keep[i] = False
            continue
        boxes[i] = (x + xs.min(), y + ys.min(), x + xs.max() + 1, y + ys.max() + 1)
    return boxes, keep


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

