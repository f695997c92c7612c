"""YOLO label lines of one synthetic image for the three tasks: detect boxes, segment polygons, pose keypoints.

All three are derived from what the renderer tracks (:class:`SynthSample`): the tight box of each object's
visible pixels, the ownership map (which object each pixel shows) and each object's full drawn mask.
``SynthSample`` and ``TASKS`` live here, below :mod:`.render`, which imports both.

Coordinates are in the pixel-edge frame of the stored image (pixel ``c`` spans ``[c, c + 1)``, the frame of the
detect boxes), normalised by the image side and written with 6 decimals.

- detect: ``cls cx cy w h``.
- segment: ``cls x1 y1 x2 y2 ...``: the outline of the object's visible pixels along the pixel edges, lightly
  simplified (Douglas-Peucker, ``POLY_EPS`` px). Holes (rings, the digits 0 4 6 8 9) and parts that occlusion
  cut apart are joined into the one polygon the format allows by zero-width cuts, so filling the polygon gives
  back the visible pixels. The four extreme points of every part survive the simplification, so the polygon's
  bounding box is exactly the detect box.
- pose: ``cls cx cy w h x1 y1 v1 ... x4 y4 v4``: the detect box and the four extreme points of the object's
  full drawn shape (pixels of alpha >= 0.5 before occlusion), in the order top, right, bottom, left. Each lies on
  the outer edge of its extreme pixel row or column, at the mean of that row's (column's) pixel centres, so for
  an unoccluded object every keypoint touches its side of the box. Visibility is 2 when at least half of those
  extreme pixels are still visible, 0 when occluded (the coordinates are still the true ones) and ``0 0 0`` for a
  point outside the image. A horizontal flip swaps right and left: ``FLIP_IDX = [0, 3, 2, 1]``. The definition
  is the same for every class: digits, filled and outlined shapes.

Only numpy and OpenCV are needed.
"""

from __future__ import annotations

from typing import NamedTuple

import cv2
import numpy as np

__all__ = [
    "FLIP_IDX",
    "KPT_NAMES",
    "KPT_SHAPE",
    "POLY_EPS",
    "TASKS",
    "SynthSample",
    "extreme_keypoints",
    "label_text",
    "outline",
]

TASKS = ("detect", "segment", "pose")
KPT_NAMES = ("top", "right", "bottom", "left")
KPT_SHAPE = [len(KPT_NAMES), 3]
FLIP_IDX = [0, 3, 2, 1]  # top and bottom stay, right <-> left under a horizontal flip
POLY_EPS = 0.5  # px; the pixel staircase of a straight edge deviates up to 0.5 px from the edge


class SynthSample(NamedTuple):
    """One rendered image before JPEG encoding (made by :func:`.render.render_sample`, read by :func:`label_text`).

    Attributes:
        image: ``(imgsz, imgsz, 3)`` uint8 BGR image.
        boxes: ``(N, 4)`` int array of ``x1, y1, x2, y2`` pixel edges (exclusive x2/y2) of the visible
            drawn pixels of each labelled object.
        classes: ``(N,)`` int array of class ids in ``0..15``.
        jpeg_quality: Quality the image is stored with (part of the augmentation).
        owner: ``(imgsz, imgsz)`` int32 map: index (into ``boxes``) of the labelled object each pixel shows,
            -1 for background and distractors.
        drawn: Per object ``(x, y, mask)``: its full drawn shape (bool, alpha >= 0.5, before any occlusion)
            and the image position of the mask's top-left pixel.
    """

    image: np.ndarray
    boxes: np.ndarray
    classes: np.ndarray
    jpeg_quality: int
    owner: np.ndarray | None = None
    drawn: tuple = ()


def _fmt(v: float) -> str:
    return f"{v:.6f}"


def detect_line(cls: int, box, size: int) -> str:
    """``cls cx cy w h`` of an ``x1 y1 x2 y2`` pixel box (without newline)."""
    x1, y1, x2, y2 = box
    cx, cy = (x1 + x2) / (2 * size), (y1 + y2) / (2 * size)
    return f"{cls} {cx:.6f} {cy:.6f} {(x2 - x1) / size:.6f} {(y2 - y1) / size:.6f}"


# --------------------------------------------------------------------------------------------------------
# Segment: outline of a pixel set
# --------------------------------------------------------------------------------------------------------


def _rings(mask: np.ndarray) -> list[tuple[np.ndarray, bool]]:
    """Pixel-edge outlines of ``mask`` as ``(points, is_outer)``: outer borders and hole borders.

    OpenCV traces borders through the centres of boundary pixels. At twice the resolution each pixel ``c`` is
    the sub-pixels ``2c, 2c + 1``, and a boundary sub-pixel ``q`` maps to the pixel edge ``ceil(q / 2)`` facing
    the outside (even: left/top edge ``c``, odd: right/bottom edge ``c + 1``), which turns the traced border
    into the exact edge outline, corners included.
    """
    up = np.pad(mask.astype(np.uint8).repeat(2, 0).repeat(2, 1), 1)  # padded so borders never touch the edge
    contours, hierarchy = cv2.findContours(up, cv2.RETR_CCOMP, cv2.CHAIN_APPROX_NONE)
    rings = []
    for c, h in zip(contours, hierarchy[0] if hierarchy is not None else ()):
        q = c.reshape(-1, 2) - 1  # undo the padding
        p = (q + 1) // 2
        p = p[np.any(p != np.roll(p, 1, 0), 1)]  # drop repeats (two sub-pixels map to one corner)
        if len(p) >= 3:
            rings.append((p, h[3] < 0))  # no parent: an outer border
    return rings


def _simplify(p: np.ndarray, keep_extremes: bool) -> np.ndarray:
    """Douglas-Peucker with ``POLY_EPS``; for outer rings the extreme points in x and y are kept exactly."""
    if not keep_extremes:
        s = cv2.approxPolyDP(p.astype(np.int32).reshape(-1, 1, 2), POLY_EPS, True).reshape(-1, 2)
        return s if len(s) >= 3 else p
    # Split the ring at its extreme points and simplify each open chain: chain ends are never dropped.
    cut = np.unique([p[:, 0].argmin(), p[:, 0].argmax(), p[:, 1].argmin(), p[:, 1].argmax()])
    out = []
    for a, b in zip(cut, np.roll(cut, -1)):
        chain = p[a : b + 1] if b > a else np.concatenate([p[a:], p[: b + 1]])
        s = cv2.approxPolyDP(chain.astype(np.int32).reshape(-1, 1, 2), POLY_EPS, False).reshape(-1, 2)
        out.append(s[:-1])  # the end is the next chain's start
    s = np.concatenate(out)
    return s if len(s) >= 3 else p


def _splice(poly: np.ndarray, ring: np.ndarray) -> np.ndarray:
    """Join ``ring`` into ``poly`` by a zero-width cut between their closest vertices (there and back)."""
    d = ((poly[:, None, :] - ring[None, :, :]) ** 2).sum(-1)
    i, j = np.unravel_index(d.argmin(), d.shape)
    ring = np.roll(ring, -j, 0)
    return np.concatenate([poly[: i + 1], ring, ring[:1], poly[i:]])


def outline(mask: np.ndarray) -> np.ndarray:
    """One polygon ``(P, 2)`` (int pixel-edge coordinates of ``mask``) whose filling is the pixel set ``mask``.

    The largest outer border comes first; the other borders (further parts, holes) are joined to it one by one
    with zero-width cuts, largest first, so even-odd and non-zero filling both give back the holes.

    Examples:
        >>> m = np.zeros((6, 6), bool)
        >>> m[1:5, 2:4] = True
        >>> outline(m).min(0).tolist(), outline(m).max(0).tolist()
        ([2, 1], [4, 5])
    """
    rings = [(_simplify(p, outer), outer) for p, outer in _rings(mask)]
    if not rings:
        raise ValueError("outline() needs a mask with at least one pixel")
    rings.sort(key=lambda r: (not r[1], -abs(cv2.contourArea(r[0].astype(np.int32)))))
    poly = rings[0][0]
    for ring, _ in rings[1:]:
        poly = _splice(poly, ring)
    return poly


def segment_line(cls: int, poly: np.ndarray, size: int) -> str:
    """``cls x1 y1 x2 y2 ...`` of a pixel polygon (without newline)."""
    return f"{cls} " + " ".join(_fmt(v / size) for v in poly.reshape(-1).tolist())


# --------------------------------------------------------------------------------------------------------
# Pose: extreme points of the drawn shape
# --------------------------------------------------------------------------------------------------------


def extreme_keypoints(drawn: np.ndarray, visible: np.ndarray, x: int, y: int, size: int) -> np.ndarray:
    """The ``(4, 3)`` keypoints ``x, y, v`` (pixels, pixel-edge frame) of one object: top, right, bottom, left.

    Args:
        drawn: ``(h, w)`` bool, the object's full drawn shape in its patch.
        visible: ``(h, w)`` bool, the pixels of the patch the object still shows in the final image.
        x: Column of the patch's left edge in the image.
        y: Row of the patch's top edge in the image.
        size: Image side (points outside ``[0, size]`` become ``0, 0, 0``).

    Examples:
        >>> d = np.zeros((3, 4), bool)
        >>> d[0, 1:3] = d[1, :] = d[2, 0] = True
        >>> extreme_keypoints(d, d, 10, 20, 64).tolist()
        [[12.0, 20.0, 2.0], [14.0, 21.5, 2.0], [10.5, 23.0, 2.0], [10.0, 22.0, 2.0]]
    """
    ys, xs = np.nonzero(drawn)
    kpts = np.zeros((4, 3))
    r0, r1, c0, c1 = ys.min(), ys.max(), xs.min(), xs.max()
    for k, (sel, px, py) in enumerate(
        (
            (ys == r0, None, r0),  # top: on the top edge of the first row
            (xs == c1, c1 + 1, None),  # right: on the right edge of the last column
            (ys == r1, None, r1 + 1),  # bottom
            (xs == c0, c0, None),  # left
        )
    ):
        px = xs[sel].mean() + 0.5 if px is None else float(px)
        py = ys[sel].mean() + 0.5 if py is None else float(py)
        px, py = x + px, y + py
        if 0 <= px <= size and 0 <= py <= size:
            kpts[k] = (px, py, 2.0 if visible[ys[sel], xs[sel]].mean() >= 0.5 else 0.0)
    return kpts


def pose_line(cls: int, box: np.ndarray, kpts: np.ndarray, size: int) -> str:
    """``cls cx cy w h x1 y1 v1 ...`` (without newline)."""
    pts = " ".join(f"{_fmt(px / size)} {_fmt(py / size)} {int(v)}" for px, py, v in kpts.tolist())
    return f"{detect_line(cls, box, size)} {pts}"


# --------------------------------------------------------------------------------------------------------
# One image
# --------------------------------------------------------------------------------------------------------


def label_text(sample: SynthSample, size: int, task: str = "detect") -> str:
    """The label file of one rendered sample for ``task`` (one line per object, see the module docstring)."""
    if task not in TASKS:
        raise ValueError(f"task must be one of {', '.join(TASKS)}, got {task!r}")
    lines = []
    for i, (c, box) in enumerate(zip(sample.classes.tolist(), sample.boxes.tolist())):
        if task == "detect":
            lines.append(detect_line(c, box, size))
            continue
        x, y, drawn = sample.drawn[i]
        h, w = drawn.shape
        if task == "segment":
            x1, y1, x2, y2 = (int(v) for v in box)
            poly = outline(sample.owner[y1:y2, x1:x2] == i) + (x1, y1)
            lines.append(segment_line(c, poly, size))
        else:
            kpts = extreme_keypoints(drawn, sample.owner[y : y + h, x : x + w] == i, x, y, size)
            lines.append(pose_line(c, box, kpts, size))
    return "".join(f"{line}\n" for line in lines)
