"""Tests of the synthetic detection set generator (numpy + OpenCV + PyYAML only, a few seconds)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from ultralytics_gabfusion.data import make_synthetic_dataset, synth_main
from ultralytics_gabfusion.data import render, synth
from ultralytics_gabfusion.data.synth import CLASS_NAMES, SynthConfig, label_sha256, load_synth_info, render_sample

CI = dict(n_train=24, n_val=8, imgsz=160)  # CI-sized set: a fraction of a second in-process
LABEL_LINE = re.compile(r"^(\d+) (\d\.\d{6}) (\d\.\d{6}) (\d\.\d{6}) (\d\.\d{6})$")


def _files(root: Path) -> dict[str, bytes]:
    """All image and label files of a dataset, keyed by relative path."""
    return {
        str(p.relative_to(root)): p.read_bytes()
        for sub in ("images", "labels")
        for p in sorted((root / sub).rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def ci_set(tmp_path_factory) -> Path:
    """One CI-sized dataset shared by the read-only tests."""
    return make_synthetic_dataset(tmp_path_factory.mktemp("synth") / "ci", workers=0, **CI)


@pytest.fixture(scope="module")
def samples_512() -> list:
    """40 benchmark-sized images (~250 objects) rendered in memory for distribution checks."""
    cfg = SynthConfig(imgsz=512, seed=0)
    return [render_sample(cfg, "train", i) for i in range(40)]


# ----------------------------------------------------------------------------------------------- determinism


def test_same_seed_identical_bytes_across_runs_and_workers(tmp_path, ci_set):
    a = ci_set.parent
    b = make_synthetic_dataset(tmp_path / "b", workers=0, **CI).parent
    c = make_synthetic_dataset(tmp_path / "c", workers=2, **CI).parent  # spawned processes
    fa = _files(a)
    assert len(fa) == 2 * (CI["n_train"] + CI["n_val"])
    assert fa == _files(b)
    assert fa == _files(c)
    assert load_synth_info(a)["labels_sha256"] == load_synth_info(c)["labels_sha256"] == label_sha256(c)


def test_different_seed_differs(tmp_path, ci_set):
    d = make_synthetic_dataset(tmp_path / "d", seed=1, workers=0, **CI).parent
    fa, fd = _files(ci_set.parent), _files(d)
    assert fa.keys() == fd.keys()
    assert all(fa[k] != fd[k] for k in fa if k.startswith("images"))
    assert load_synth_info(ci_set)["labels_sha256"] != load_synth_info(d)["labels_sha256"]


def test_image_depends_only_on_seed_split_index():
    cfg = SynthConfig(imgsz=128, seed=3)
    a = render_sample(cfg, "val", 5)
    b = render_sample(SynthConfig(n_train=7, n_val=9, imgsz=128, seed=3), "val", 5)  # counts don't matter
    assert np.array_equal(a.image, b.image) and np.array_equal(a.boxes, b.boxes)
    assert not np.array_equal(a.image, render_sample(cfg, "train", 5).image)


# ------------------------------------------------------------------------------------------------- labels


def test_labels_valid(ci_set):
    root = ci_set.parent
    n = 0
    for split, count in (("train", CI["n_train"]), ("val", CI["n_val"])):
        labels = sorted((root / "labels" / split).glob("*.txt"))
        images = sorted((root / "images" / split).glob("*.jpg"))
        assert len(labels) == len(images) == count
        assert [p.stem for p in labels] == [p.stem for p in images]
        for p in labels:
            lines = p.read_text().splitlines()
            assert lines, f"{p} has no objects"
            for line in lines:
                m = LABEL_LINE.match(line)
                assert m, f"bad label line {line!r} in {p}"
                c, cx, cy, w, h = int(m[1]), *map(float, m.groups()[1:])
                assert 0 <= c < 16
                assert w > 0 and h > 0
                # strictly inside the image (the generator keeps a 1-px margin)
                assert 0 < cx - w / 2 and cx + w / 2 < 1 and 0 < cy - h / 2 and cy + h / 2 < 1
                n += 1
    assert n >= CI["n_train"] + CI["n_val"]


def test_label_file_matches_rendered_boxes(ci_set):
    cfg = SynthConfig(**CI)
    s = render_sample(cfg, "train", 3)
    rows = np.loadtxt(ci_set.parent / "labels" / "train" / "000003.txt", ndmin=2)
    assert np.array_equal(rows[:, 0].astype(int), s.classes)
    cx, cy, w, h = rows[:, 1:].T
    xyxy = np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], 1)
    assert np.abs(xyxy * cfg.imgsz - s.boxes).max() < 1e-3


@pytest.mark.parametrize("cls", [0, 7, 10, 13, 15])
@pytest.mark.parametrize("target", [9.0, 40.0, 150.0])
def test_rendered_object_hits_target_size(cls, target):
    """The drawn (alpha >= 0.5) pixels of an object span the requested longest side."""
    rng = np.random.default_rng(cls)
    alpha = render._render_object(cls, target, rng)
    ys, xs = np.nonzero(alpha >= 0.5)
    longest = max(xs.max() - xs.min() + 1, ys.max() - ys.min() + 1)
    assert abs(longest - target) <= max(2.0, 0.1 * target)


def test_box_is_tight_on_flat_background(monkeypatch):
    """On a flat background without degradations, each box is the tight box of the object's strong ink."""
    cfg = SynthConfig(imgsz=256, seed=0, max_objects=1)
    monkeypatch.setattr(render, "_background", lambda rng, size: np.full((size, size, 3), 128.0, np.float32))
    monkeypatch.setattr(render, "_render_distractor", lambda rng, size: None)
    monkeypatch.setattr(render, "_degrade", lambda rng, img: (np.clip(img, 0, 255).round().astype(np.uint8), 90))
    for i in range(8):
        s = render_sample(cfg, "train", i)
        assert len(s.boxes) == 1
        x1, y1, x2, y2 = s.boxes[0]
        diff = np.abs(s.image.astype(int) - 128).max(2)
        # pixels with >= ~50 % object coverage; rounding can flip the exact threshold by one pixel
        ys, xs = np.nonzero(diff >= diff.max() * 0.5)
        assert abs(xs.min() - x1) <= 1 and abs(xs.max() + 1 - x2) <= 1, (i, xs.min(), xs.max(), x1, x2)
        assert abs(ys.min() - y1) <= 1 and abs(ys.max() + 1 - y2) <= 1, (i, ys.min(), ys.max(), y1, y2)


def test_occlusion_cap():
    """A placement that would hide more than half of an object's drawn pixels is rejected."""
    size = 64
    owner = np.full((size, size), -1, np.int32)
    owner[10:20, 10:20] = 0  # object 0: 100 px, all visible
    visible, total = np.array([100]), np.array([100])
    rng = np.random.default_rng(0)
    # a 14x14 mask anywhere over the object can hide at most 100 px; force overlap by filling the image
    big = np.ones((size - 2, size - 2), bool)
    assert render._place(big, size, owner, visible, total, rng) is None  # would hide all of object 0
    half = np.zeros((size - 2, size - 2), bool)
    half[:, :14] = True  # covers image columns 1..14 at x=1: hides columns 10..14 of the object = 50 px
    res = render._place(half, size + 1, np.pad(owner, ((0, 1), (0, 1)), constant_values=-1), visible, total, rng)
    assert res is not None and res[2] is not None and res[2][0] <= 50


def test_color_contrast():
    rng = np.random.default_rng(0)
    for bg in ([0, 0, 0], [255, 255, 255], [128, 128, 128], [20, 200, 90], [127, 127, 128]):
        bg = np.array(bg, float)
        for _ in range(20):
            c = render._pick_color(rng, bg)
            assert abs(render._luma(c) - render._luma(bg)) >= render._MIN_LUMA_DIST
            assert np.linalg.norm(c - bg) >= render._MIN_COLOR_DIST


# ------------------------------------------------------------------------------------------- distribution


def test_size_split_matches_spec(samples_512):
    sizes = np.array([max(x2 - x1, y2 - y1) for s in samples_512 for (x1, y1, x2, y2) in s.boxes])
    assert len(sizes) >= 200
    split = np.bincount([synth.size_class(v) for v in sizes], minlength=3) / len(sizes)
    for got, want in zip(split, (0.44, 0.34, 0.22)):
        assert abs(got - want) <= 0.10, f"size split {np.round(split, 3)} vs 44/34/22 %"
    assert sizes.min() >= 5 and sizes.max() <= 256


def test_all_classes_appear(samples_512):
    counts = np.bincount(np.concatenate([s.classes for s in samples_512]), minlength=16)
    assert len(counts) == 16 and counts.min() > 0, counts


def test_scene_properties(samples_512):
    """Every image keeps >= 1 object, has the right shape and a varying JPEG quality."""
    assert all(len(s.classes) >= 1 for s in samples_512)
    assert len({s.jpeg_quality for s in samples_512}) > 5
    assert all(s.image.dtype == np.uint8 and s.image.shape == (512, 512, 3) for s in samples_512)


# ------------------------------------------------------------------------------------------------ data.yaml


def test_data_yaml(ci_set):
    data = yaml.safe_load(ci_set.read_text())
    assert Path(data["path"]) == ci_set.parent and Path(data["path"]).is_absolute()
    assert data["train"] == "images/train" and data["val"] == "images/val"
    assert data["names"] == CLASS_NAMES and data["names"][10] == "circle" and data["names"][0] == "0"
    assert data["nc"] == 16
    info = data["synth"]
    assert info["version"] == synth.SYNTH_VERSION and info["seed"] == 0 and info["imgsz"] == CI["imgsz"]
    assert info["labels_sha256"] == label_sha256(ci_set.parent)
    assert sum(info["sizes"].values()) == info["objects"] == sum(info["class_counts"])


# ------------------------------------------------------------------------------------------ atomic handling


def test_refuses_foreign_dir_unless_overwrite(tmp_path):
    out = tmp_path / "foreign"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        make_synthetic_dataset(out, workers=0, **CI)
    assert (out / "keep.txt").read_text() == "mine"
    make_synthetic_dataset(out, workers=0, overwrite=True, **CI)
    assert not (out / "keep.txt").exists() and (out / "data.yaml").exists()
    (tmp_path / "afile").write_text("x")
    with pytest.raises(FileExistsError, match="is a file"):
        make_synthetic_dataset(tmp_path / "afile", workers=0, **CI)


def test_reuses_same_settings_and_regenerates_others(tmp_path, caplog):
    out = tmp_path / "ds"
    make_synthetic_dataset(out, workers=0, **CI)
    (out / "marker").write_text("survives reuse")
    (out / "labels" / "train.cache").write_bytes(b"ultralytics writes these")  # must not break reuse
    with caplog.at_level("INFO"):
        make_synthetic_dataset(out, workers=0, **CI)
    assert (out / "marker").exists()
    assert "reusing" in caplog.text
    make_synthetic_dataset(out, workers=0, seed=5, **CI)  # other settings of a synth set: no overwrite needed
    assert not (out / "marker").exists() and load_synth_info(out)["seed"] == 5
    # hand-edited labels are never regenerated silently: refused unless overwrite=True
    f = out / "labels" / "train" / "000000.txt"
    f.write_text("0 0.5 0.5 0.1 0.1\n")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        make_synthetic_dataset(out, workers=0, seed=5, **CI)
    assert f.read_text() == "0 0.5 0.5 0.1 0.1\n"
    make_synthetic_dataset(out, workers=0, seed=5, overwrite=True, **CI)
    assert f.read_text() != "0 0.5 0.5 0.1 0.1\n"
    assert [p.name for p in tmp_path.iterdir()] == ["ds"]  # no temp dirs left behind


def test_interrupted_run_leaves_nothing(tmp_path, monkeypatch):
    out = tmp_path / "ds"
    real = synth._work_chunk
    calls = []

    def boom(job):
        calls.append(job)
        if len(calls) > 1:
            raise KeyboardInterrupt
        return real(job)

    monkeypatch.setattr(synth, "_work_chunk", boom)
    with pytest.raises(KeyboardInterrupt):
        make_synthetic_dataset(out, workers=0, **CI)
    assert list(tmp_path.iterdir()) == []
    # an existing dataset survives a failed regeneration untouched
    monkeypatch.setattr(synth, "_work_chunk", real)
    make_synthetic_dataset(out, workers=0, **CI)
    before = _files(out)
    calls.clear()
    monkeypatch.setattr(synth, "_work_chunk", boom)
    with pytest.raises(KeyboardInterrupt):
        make_synthetic_dataset(out, workers=0, overwrite=True, **CI)
    assert _files(out) == before and sorted(p.name for p in tmp_path.iterdir()) == ["ds"]


def test_stale_temp_dir_of_dead_process_is_removed(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f".ds{synth._TMP_TAG}{synth.socket.gethostname()}-{dead.pid}-deadbeef"
    (stale / "images").mkdir(parents=True)
    make_synthetic_dataset(tmp_path / "ds", workers=0, **CI)
    assert not stale.exists()


# --------------------------------------------------------------------------------------------- bad arguments


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(n_train=0), "n_train must be an integer >= 1"),
        (dict(n_val=0), "n_val must be an integer >= 1"),
        (dict(n_train=-3), "n_train"),
        (dict(n_train=2.5), "n_train must be an integer"),
        (dict(imgsz=32), "imgsz must be an integer >= 64"),
        (dict(imgsz=500), "multiple of 32.*480 or 512"),
        (dict(max_objects=0), "max_objects must be an integer >= 1"),
        (dict(seed=1.5), "seed must be an integer"),
        (dict(seed="1"), "seed must be an integer"),
        (dict(seed=-1), "seed must be an integer >= 0"),
        (dict(seed=True), "seed must be an integer"),
        (dict(workers=-1), "workers must be an integer >= 0"),
        (dict(overwrite="yes"), "overwrite must be True or False"),
    ],
)
def test_bad_arguments(tmp_path, kwargs, match):
    args = {**CI, "workers": 0, **kwargs}
    with pytest.raises(ValueError, match=match):
        make_synthetic_dataset(tmp_path / "x", **args)
    assert not (tmp_path / "x").exists()


# --------------------------------------------------------------------------------------------------- CLI


def test_synth_main_unknown_key_names_closest():
    with pytest.raises(ValueError, match="Did you mean 'imgsz'.*Valid arguments: out, train, val, imgsz"):
        synth_main({"imgs": 128})
    with pytest.raises(ValueError, match="Did you mean 'max_objects'"):
        synth_main({"max_object": 3})
    with pytest.raises(ValueError, match="imgsz='big' must be an integer"):
        synth_main({"imgsz": "big"})


def test_synth_main_string_args(tmp_path, capsys):
    args = {"out": str(tmp_path / "cli"), "train": "24", "val": "8", "imgsz": "160", "seed": "0"}
    path = synth_main({**args, "workers": "0", "overwrite": "False"})
    assert path == tmp_path / "cli" / "data.yaml"
    line = capsys.readouterr().out.strip().splitlines()[-1]
    info = load_synth_info(path)
    assert str(path) in line and "train 24 val 8" in line and info["labels_sha256"] in line
    assert "small/medium/large" in line and line.endswith("s")
    # same content as the Python API with the same settings
    api = make_synthetic_dataset(tmp_path / "api", workers=0, **CI)
    assert info["labels_sha256"] == load_synth_info(api)["labels_sha256"]
