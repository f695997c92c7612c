"""The shipped FP model: intact bytes, loadable, and as accurate on its regenerated val split as its card says."""

from __future__ import annotations

import json

import pytest

from ultralytics_gabfusion import zoo


def test_a_model_is_shipped_with_a_complete_card():
    assert "yolov5n-synth160" in zoo.names()
    card = zoo.card("yolov5n-synth160")
    for key in ("command", "data", "train", "metrics", "sha256", "commit", "hardware", "val"):
        assert card.get(key) is not None, key
    assert card["metrics"]["mAP50"] >= 0.60, "the shipped starting model must be a real detector"
    assert zoo.path("yolov5n-synth160").stat().st_size == card["bytes"] <= 8 * 2**20
    zoo.verify("yolov5n-synth160")  # sha256 matches


def test_unknown_and_damaged_models_are_refused(tmp_path, monkeypatch):
    with pytest.raises(KeyError, match="shipped: yolov5n-synth160"):
        zoo.path("yolov9-nope")
    # a copy of the assets folder with one flipped byte: verify() names the file and the fix
    assets = tmp_path / "assets"
    assets.mkdir()
    src = zoo.path("yolov5n-synth160")
    data = bytearray(src.read_bytes())
    data[len(data) // 2] ^= 0xFF
    (assets / src.name).write_bytes(bytes(data))
    (assets / "yolov5n-synth160.json").write_text(json.dumps(zoo.card("yolov5n-synth160")))
    monkeypatch.setattr(zoo, "ASSETS", assets)
    with pytest.raises(ValueError, match="does not match the sha256"):
        zoo.verify("yolov5n-synth160")


@pytest.mark.slow
def test_shipped_model_reaches_its_recorded_map(tmp_path):
    """Validate the shipped checkpoint on its val split; a broken loader or generator changes the numbers."""
    from ultralytics import YOLO

    from ultralytics_gabfusion.data import make_synthetic_dataset

    card = zoo.card("yolov5n-synth160")
    # Image i of a split depends only on (seed, split, i), so a 1-image train split gives the identical val split.
    data = make_synthetic_dataset(tmp_path / "d", **{**card["data"], "n_train": 1}, workers=0)
    r = YOLO(str(zoo.verify("yolov5n-synth160"))).val(
        data=str(data), imgsz=card["val"]["imgsz"], batch=card["val"]["batch"], workers=0, device="cpu",
        plots=False, verbose=False, project=str(tmp_path), name="val")
    got = r.results_dict
    # CPU inference is deterministic here; the tolerance covers other BLAS builds and thread counts.
    assert got["metrics/mAP50(B)"] == pytest.approx(card["metrics"]["mAP50"], abs=0.01)
    assert got["metrics/mAP50-95(B)"] == pytest.approx(card["metrics"]["mAP50_95"], abs=0.01)
