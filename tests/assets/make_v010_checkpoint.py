"""Write tests/assets/v010-qat-gab-ada.pt: a QAT checkpoint as plugin version 0.1.0 saved it (before the package was
split into smaller modules), so the tests can check that checkpoints from earlier versions keep loading.

A tiny YOLOv5 (width 1/16) trained 1 FP epoch, then 1 QAT epoch (N2UQ W4A4, GABFusion, ADA from the FP teacher) on
the tests' generated set. Run from the repository root: ``python tests/assets/make_v010_checkpoint.py``.
"""

import shutil
import tempfile
from pathlib import Path

from ultralytics import YOLO
from ultralytics.utils import YAML

from ultralytics_gabfusion import GABTrainer, __version__
from ultralytics_gabfusion.data import make_synthetic_dataset

ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / "tests" / "assets" / "v010-qat-gab-ada.pt"

with tempfile.TemporaryDirectory() as tmp:
    tmp = Path(tmp)
    data = make_synthetic_dataset(tmp / "data", n_train=16, n_val=8, imgsz=64, seed=0, max_objects=6, workers=0)
    cfg = YAML.load(Path(__import__("ultralytics").__file__).parent / "cfg/models/v5/yolov5.yaml")
    cfg["scales"] = {"n": [0.33, 0.0625, 1024]}
    YAML.save(tmp / "yolov5n-tiny.yaml", cfg)
    kw = dict(data=str(data), imgsz=64, epochs=1, batch=8, workers=0, device="cpu", plots=False, exist_ok=True,
              seed=0, deterministic=True, amp=False, warmup_epochs=0, mosaic=0.0, verbose=False)
    YOLO(str(tmp / "yolov5n-tiny.yaml")).train(project=str(tmp / "fp"), name="run", **kw)
    fp = tmp / "fp" / "run" / "weights" / "last.pt"
    YOLO(str(fp)).train(trainer=GABTrainer, qat="n2uq", w_bits=4, a_bits=4, gab="balanced", ada=0.01,
                        teacher=str(fp), qat_calib=1, project=str(tmp / "qat"), name="run", **kw)
    shutil.copy(tmp / "qat" / "run" / "weights" / "last.pt", OUT)
print(f"plugin {__version__}: wrote {OUT} ({OUT.stat().st_size / 1e6:.2f} MB)")
