"""Segment and pose labels of the synthetic set: definitions, flip consistency, data.yaml, loading by Ultralytics."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import run_cli

from ultralytics_gabfusion.data import make_synthetic_dataset, synth_main
from ultralytics_gabfusion.data import labels as L
from ultralytics_gabfusion.data import render, synth
from ultralytics_gabfusion.data.synth import SynthConfig, load_synth_info, render_sample

TINY = dict(n_train=8, n_val=4, imgsz=64, seed=0, workers=0)


def _images(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted((root / "images").rglob("*.jpg"))}


def _rows(path: Path) -> list[np.ndarray]:
    return [np.array(line.split(), float) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def sets(tmp_path_factory) -> dict[str, Path]:
    """The same tiny set (8 train / 4 val at 64 px) for each task; returns the data.yaml paths."""
    root = tmp_path_factory.mktemp("tasks")
    return {t: make_synthetic_dataset(root / t, task=t, **TINY) for t in L.TASKS}


@pytest.fixture(scope="module")
def samples() -> list:
    """Images at 160 px with up to 12 objects: occlusion, outlined shapes and holes in digits are common."""
    cfg = SynthConfig(imgsz=160, seed=0)
    return [render_sample(cfg, "train", i) for i in range(12)]


def _fill(poly: np.ndarray, size: int) -> np.ndarray:
    """Pixels whose centre lies inside ``poly`` (pixel-edge frame) by the even-odd rule, one scanline per row."""
    a, b = poly, np.roll(poly, -1, 0)
    out = np.zeros((size, size), bool)
    centres = np.arange(size) + 0.5
    for r in range(size):
        yc = r + 0.5
        cross = (a[:, 1] <= yc) != (b[:, 1] <= yc)  # edges spanning the row centre (half-open: no double count)
        t = (yc - a[cross, 1]) / (b[cross, 1] - a[cross, 1])
        xs = np.sort(a[cross, 0] + t * (b[cross, 0] - a[cross, 0]))
        out[r] = (np.searchsorted(xs, centres) % 2).astype(bool)
    return out


# ------------------------------------------------------------------------------------------------- segment


def test_outline_of_known_masks_is_exact():
    m = np.zeros((12, 14), bool)
    m[2:10, 1:9] = True
    m[4:7, 3:6] = False  # a hole
    m[5:8, 11:13] = True  # a second part
    m[0, 13] = True  # a one-pixel part in the corner
    poly = L.outline(m)
    assert poly.min(0).tolist() == [1, 0] and poly.max(0).tolist() == [14, 10]  # pixel edges of the tight box
    assert np.array_equal(_fill(poly, 14)[:12], m)
    with pytest.raises(ValueError, match="at least one pixel"):
        L.outline(np.zeros((3, 3), bool))


def test_segment_polygon_is_outline_of_visible_pixels(samples):
    ious = []
    for s in samples:
        lines = L.label_text(s, 160, "segment").splitlines()
        assert len(lines) == len(s.boxes)
        for i, line in enumerate(lines):
            v = line.split()
            assert int(v[0]) == s.classes[i] and (len(v) - 1) % 2 == 0 and len(v) >= 7  # >= 3 points
            poly = np.array(v[1:], float).reshape(-1, 2) * 160
            # the polygon's box is the detect box (exactly, up to the 6-decimal rounding)
            assert np.abs(np.r_[poly.min(0), poly.max(0)] - s.boxes[i]).max() < 1e-3
            mask = s.owner == i
            filled = _fill(poly, 160)
            ious.append((filled & mask).sum() / (filled | mask).sum())
    ious = np.array(ious)
    assert len(ious) > 40
    assert ious.min() > 0.95 and ious.mean() > 0.995, (ious.min(), ious.mean())


def test_segment_keeps_holes_of_outlined_shapes():
    """An outlined circle is a ring: its polygon must not fill the hole."""
    rng = np.random.default_rng(0)
    while True:  # half of the shapes are drawn filled
        alpha = render._render_object(10, 60.0, rng)
        m = alpha >= 0.5
        if m[m.shape[0] // 2, m.shape[1] // 2] == 0:  # outlined
            break
    poly = L.outline(m)
    filled = _fill(poly + 2, m.shape[1] + 4)[2 : 2 + m.shape[0], 2 : 2 + m.shape[1]]
    assert not filled[m.shape[0] // 2, m.shape[1] // 2]
    assert (filled & m).sum() / (filled | m).sum() > 0.97


# ---------------------------------------------------------------------------------------------------- pose


def test_keypoints_definition():
    d = np.zeros((5, 6), bool)
    d[0, 2:4] = d[1:4, :] = d[4, 1] = True
    k = L.extreme_keypoints(d, d, 10, 20, 64)
    # top, right, bottom, left; each on the outer edge of its extreme row/column, at the mean pixel centre
    assert k.tolist() == [[13.0, 20.0, 2], [16.0, 22.5, 2], [11.5, 25.0, 2], [10.0, 22.5, 2]]
    vis = d.copy()
    vis[0] = False  # the top row hidden by an occluder: position kept, visibility 0
    vis[1:4, 5] = [True, False, False]  # one of three right-column pixels visible: below half
    k2 = L.extreme_keypoints(d, vis, 10, 20, 64)
    assert k2[:, 2].tolist() == [0, 0, 2, 2] and np.array_equal(k2[:, :2], k[:, :2])
    assert L.extreme_keypoints(d, d, 60, 20, 64)[1].tolist() == [0, 0, 0]  # right point outside the image


def test_pose_labels_on_unoccluded_objects_touch_box(monkeypatch):
    """Without occlusion every keypoint is visible and lies on its side of the detect box."""
    monkeypatch.setattr(render, "_render_distractor", lambda rng, size: None)
    cfg = SynthConfig(imgsz=128, seed=0, max_objects=1, task="pose")
    for i in range(6):
        s = render_sample(cfg, "train", i)
        (row,) = [np.array(line.split(), float) for line in L.label_text(s, 128, "pose").splitlines()]
        assert row.shape == (5 + 4 * 3,) and row[0] == s.classes[0]
        k = row[5:].reshape(4, 3)
        k[:, :2] *= 128
        x1, y1, x2, y2 = s.boxes[0]
        assert k[:, 2].tolist() == [2, 2, 2, 2]
        assert np.allclose([k[0, 1], k[1, 0], k[2, 1], k[3, 0]], [y1, x2, y2, x1], atol=1e-3)
        assert np.all((k[:, 0] >= x1 - 1e-3) & (k[:, 0] <= x2 + 1e-3) & (k[:, 1] >= y1 - 1e-3) & (k[:, 1] <= y2 + 1e-3))


def test_flip_idx_maps_keypoints_of_flipped_image(samples):
    """Ultralytics' horizontal flip with the data.yaml flip_idx gives the keypoints of the mirrored objects."""
    from ultralytics.data.augment import RandomFlip
    from ultralytics.utils.instance import Instances

    size, hidden = 160, 0
    for s in samples[:6]:
        rows = np.stack([np.array(line.split(), float) for line in L.label_text(s, size, "pose").splitlines()])
        kpts = rows[:, 5:].reshape(-1, 4, 3)
        hidden += int((kpts[..., 2] == 0).sum())
        inst = Instances(rows[:, 1:5].copy(), np.zeros((len(rows), 0, 2)), kpts.copy(), "xywh", normalized=True)
        out = RandomFlip(p=1.0, direction="horizontal", flip_idx=L.FLIP_IDX)({"img": s.image, "instances": inst})
        got = out["instances"].keypoints
        # the same objects drawn mirrored: flipped drawn masks and ownership map
        owner = s.owner[:, ::-1]
        want = []
        for i, (x, y, d) in enumerate(s.drawn):
            h, w = d.shape
            xf = size - x - w
            want.append(L.extreme_keypoints(d[:, ::-1], owner[y : y + h, xf : xf + w] == i, xf, y, size))
        want = np.stack(want)
        want[..., :2] /= size
        assert np.array_equal(got[..., 2], want[..., 2])
        assert np.abs(got[..., :2] - want[..., :2]).max() < 2e-6
    assert hidden > 0  # occluded keypoints were part of the check


# ------------------------------------------------------------------------------------------- dataset level


def test_tasks_share_images_and_boxes(sets):
    roots = {t: p.parent for t, p in sets.items()}
    assert _images(roots["detect"]) == _images(roots["segment"]) == _images(roots["pose"])
    for f in sorted((roots["detect"] / "labels" / "val").glob("*.txt")):
        det = np.stack(_rows(f))
        seg = _rows(roots["segment"] / "labels" / "val" / f.name)
        pose = np.stack(_rows(roots["pose"] / "labels" / "val" / f.name))
        assert np.array_equal(pose[:, :5], det) and pose.shape[1] == 17
        for d, s in zip(det, seg):
            xy = s[1:].reshape(-1, 2)
            assert s[0] == d[0]
            assert np.allclose(np.r_[(xy.min(0) + xy.max(0)) / 2, xy.max(0) - xy.min(0)], d[1:], atol=2e-6)


def test_data_yaml_records_task(sets):
    det, seg, pose = (yaml.safe_load(sets[t].read_text()) for t in L.TASKS)
    assert "task" not in det["synth"] and "kpt_shape" not in det  # detect records are unchanged
    assert seg["synth"]["task"] == "segment" and "kpt_shape" not in seg
    assert pose["synth"]["task"] == "pose" and pose["kpt_shape"] == [4, 3] and pose["flip_idx"] == [0, 3, 2, 1]
    assert pose["synth"]["labels_sha256"] == synth.label_sha256(sets["pose"].parent)
    assert len({d["synth"]["labels_sha256"] for d in (det, seg, pose)}) == 3


def test_reuse_only_for_same_task(tmp_path, caplog):
    out = tmp_path / "ds"
    make_synthetic_dataset(out, task="segment", **TINY)
    (out / "marker").write_text("x")
    with caplog.at_level("INFO"):
        make_synthetic_dataset(out, task="segment", **TINY)
    assert (out / "marker").exists() and "reusing" in caplog.text
    make_synthetic_dataset(out, **TINY)  # detect: regenerated, never the segment set
    assert not (out / "marker").exists() and "task" not in load_synth_info(out)
    (out / "marker").write_text("x")
    make_synthetic_dataset(out, task="pose", **TINY)  # a detect set is not reused for pose either
    assert not (out / "marker").exists() and load_synth_info(out)["task"] == "pose"


@pytest.mark.parametrize("task", ["seg", "Detect", 3, None])
def test_unknown_task_lists_valid_ones(tmp_path, task):
    with pytest.raises(ValueError, match="task must be one of detect, segment, pose"):
        make_synthetic_dataset(tmp_path / "x", task=task, **TINY)
    assert not (tmp_path / "x").exists()


def test_cli_task(tmp_path, sets):
    with pytest.raises(ValueError, match="task must be one of detect, segment, pose, got 'obb'"):
        synth_main({"out": str(tmp_path / "bad"), "task": "obb"})
    assert not (tmp_path / "bad").exists()
    # as typed, in a fresh process: the same bytes as the Python API
    r = run_cli("synth", f"out={tmp_path / 'cli'}", "task=pose", "train=8", "val=4", "imgsz=64", "workers=0")
    assert r.returncode == 0, r.stderr[-2000:]
    info = load_synth_info(tmp_path / "cli")
    assert "task pose" in r.stdout and info["task"] == "pose"
    assert info["labels_sha256"] == load_synth_info(sets["pose"])["labels_sha256"]
    assert yaml.safe_load((tmp_path / "cli" / "data.yaml").read_text())["flip_idx"] == L.FLIP_IDX


# ---------------------------------------------------------------------------------------------- Ultralytics


@pytest.mark.parametrize("task", ["segment", "pose"])
def test_ultralytics_builds_dataset(sets, task):
    """check_det_dataset + build_yolo_dataset read the set: masks/keypoints match the labels, no image dropped."""
    from ultralytics.cfg import get_cfg
    from ultralytics.data.build import build_yolo_dataset
    from ultralytics.data.utils import check_det_dataset

    data = check_det_dataset(str(sets[task]))
    cfg = get_cfg(overrides=dict(task=task, imgsz=64, overlap_mask=False, mode="val"))
    ds = build_yolo_dataset(cfg, data["val"], 4, data, mode="val")
    det_root = sets["detect"].parent
    assert len(ds) == TINY["n_val"]
    for i in range(len(ds)):
        item = ds[i]
        name = Path(item["im_file"]).with_suffix(".txt").name
        det = np.stack(_rows(det_root / "labels" / "val" / name))
        n = len(det)
        assert item["cls"].view(-1).tolist() == det[:, 0].tolist()
        assert np.abs(item["bboxes"].numpy() - det[:, 1:]).max() < 1e-5  # boxes from polygons = detect boxes
        if task == "segment":
            masks = item["masks"].numpy()  # (n, 16, 16): 1/4 of the image
            assert masks.shape == (n, 16, 16) and all(m.any() for m in masks)
            for m, (cx, cy, w, h) in zip(masks, det[:, 1:] * 16):
                ys, xs = np.nonzero(m)  # inside the box, allowing one mask pixel of rasterisation
                assert xs.min() >= cx - w / 2 - 1 and xs.max() < cx + w / 2 + 1
                assert ys.min() >= cy - h / 2 - 1 and ys.max() < cy + h / 2 + 1
        else:
            k = item["keypoints"].numpy()
            rows = np.stack(_rows(sets[task].parent / "labels" / "val" / name))
            assert k.shape == (n, 4, 3) and np.allclose(k, rows[:, 5:].reshape(n, 4, 3), atol=1e-6)
            assert (k[..., 2] == 2).mean() > 0.5
