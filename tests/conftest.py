"""Shared fixtures: offline Ultralytics environment, a tiny generated dataset and a tiny trained FP checkpoint.

The environment is set before anything imports Ultralytics, so no test can download weights, fonts or data.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
_CFG_DIR = Path(tempfile.mkdtemp(prefix="gab-yolo-config-"))
sys.path.insert(0, str(ROOT))
from ultralytics_gabfusion.offline import setup_offline_env  # noqa: E402  (imports no Ultralytics)

setup_offline_env(_CFG_DIR)
# Under pytest-xdist (scripts/test.sh runs two workers on two cores) each worker and the processes it starts get one
# thread: the tiny models here gain little from intra-op threads, and two workers x two threads would oversubscribe.
os.environ.setdefault("OMP_NUM_THREADS", "1" if os.environ.get("PYTEST_XDIST_WORKER") else "2")

import pytest  # noqa: E402

IMGSZ = 64  # every end-to-end test trains at this size: fast on 2 CPU cores, all three strides still used


def run_cli(*args, cwd=None, timeout=600):
    """Run ``python -m ultralytics_gabfusion ARGS`` as a user would, in a fresh process."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "ultralytics_gabfusion", *map(str, args)],
        cwd=cwd or ROOT, env=env, capture_output=True, text=True, timeout=timeout,
    )


def run_python(code: str, cwd=None, timeout=600):
    """Run a Python snippet in a fresh process with the offline environment."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-c", code], cwd=cwd or ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


def shared_build(tmp_path_factory, name: str, build) -> dict:
    """Build an expensive test artefact once per test run, shared by every pytest-xdist worker.

    ``build(folder)`` writes into ``folder`` and returns a JSON-able dict of paths; the first worker builds under a
    file lock, the others wait and read the result. Without xdist this is a plain session cache.
    """
    from filelock import FileLock

    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # the run's base folder, common to all workers
    folder, done = root / f"shared-{name}", root / f"shared-{name}.json"
    with FileLock(str(root / f"shared-{name}.lock")):
        if not done.exists():
            folder.mkdir(parents=True, exist_ok=True)
            done.write_text(json.dumps({k: str(v) for k, v in build(folder).items()}))
    return {k: Path(v) for k, v in json.loads(done.read_text()).items()}


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """A generated 16-class detection set (16 train / 8 val images at 64 px); returns data.yaml."""

    def build(folder):
        from ultralytics_gabfusion.data import make_synthetic_dataset

        return {"data": make_synthetic_dataset(folder / "synth", n_train=16, n_val=8, imgsz=IMGSZ, seed=0,
                                               max_objects=6, workers=0)}

    return shared_build(tmp_path_factory, "tiny-data", build)["data"]


def bench_result(settings: dict, rows: list, **extra) -> dict:
    """A minimal ``yolo-gab bench`` result around report ``rows`` (for rendering the markdown in report tests)."""
    return {"settings": {"imgsz": 160, "batch": 16, "fp_epochs": 1, "epochs": 3, "ada": 0.1, **settings, **extra},
            "environment": {"hardware": "cpu", "torch": "t", "ultralytics": "u", "ultralytics_gabfusion": "p",
                            "git_commit": None},
            "data": {"generated": True, "n_train": 1, "n_val": 1, "imgsz": 160}, "rows": rows, "wall_s": 1.0}


def train_kwargs(tmp_path: Path, **kw) -> dict:
    """Common tiny-run training arguments (CPU, no plots, deterministic)."""
    base = dict(imgsz=IMGSZ, epochs=1, batch=8, workers=0, device="cpu", plots=False, project=str(tmp_path),
                name="run", exist_ok=True, seed=0, deterministic=True, amp=False, val=True, warmup_epochs=0,
                mosaic=0.0, optimizer="SGD", lr0=0.01, verbose=False)
    base.update(kw)
    return base


@pytest.fixture(scope="session")
def fp_ckpt(tiny_data, tmp_path_factory) -> dict:
    """Tiny FP checkpoints of yolov5s and yolo11s trained 1 epoch with the stock trainer: {'yolov5s': path, ...}."""

    def build(folder):
        from ultralytics import YOLO

        out = {}
        for arch in ("yolov5s", "yolo11s"):
            d = folder / arch
            YOLO(f"{arch}.yaml").train(data=str(tiny_data), **train_kwargs(d, val=False))
            out[arch] = d / "run" / "weights" / "last.pt"
            assert out[arch].exists()
        return out

    return shared_build(tmp_path_factory, "fp-ckpt", build)


# The package will ship a long-trained FP detector here; until then the tests train their own "real model".
ASSET_DIR = ROOT / "ultralytics_gabfusion" / "assets"


@pytest.fixture(scope="session")
def trained_fp(tiny_data, tmp_path_factory) -> Path:
    """The trained FP checkpoint that stands for a user's real detector in the tests (the only switch point).

    The checkpoint shipped in ``ultralytics_gabfusion/assets/`` when there is one; otherwise yolov5n trained with the
    stock trainer for 8 epochs on the tiny generated set (trained BN statistics, weights moved away from their init).
    """
    shipped = sorted(ASSET_DIR.glob("*.pt")) if ASSET_DIR.is_dir() else []
    if shipped:
        return shipped[0]
    from ultralytics import YOLO

    d = tmp_path_factory.mktemp("trained-fp")
    YOLO("yolov5n.yaml").train(data=str(tiny_data), **train_kwargs(d, epochs=8, val=False, optimizer="AdamW", lr0=0.01,
                                                                   batch=4))
    path = d / "run" / "weights" / "last.pt"
    assert path.exists()
    return path


# ---------------------------------------------------------------------------------------------------------------------
# Segmentation and pose: tiny data sets and FP checkpoints shared by the multi-task tests (tests/test_multitask.py).
# ---------------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def task_data(tmp_path_factory) -> dict:
    """Generated segment and pose sets (8 train / 4 val images, 64 px): ``{"segment": data.yaml, "pose": data.yaml}``."""

    def build(folder):
        from ultralytics_gabfusion.data import make_synthetic_dataset

        return {t: make_synthetic_dataset(folder / t / "synth", task=t, n_train=8, n_val=4, imgsz=IMGSZ, seed=0,
                                          max_objects=4, workers=0) for t in ("segment", "pose")}

    return shared_build(tmp_path_factory, "task-data", build)


TASK_MODELS = {"segment": "cfg/models/yolov5n-seg.yaml", "pose": "yolov8n-pose.yaml"}  # smallest of each task


@pytest.fixture(scope="session")
def task_fp_ckpt(task_data, tmp_path_factory) -> dict:
    """FP checkpoints trained 1 epoch with the stock task trainer: ``{"segment": last.pt, "pose": last.pt}``."""

    def build(folder):
        from ultralytics import YOLO

        out = {}
        for task, model in TASK_MODELS.items():
            d = folder / task
            YOLO(str(ROOT / model) if model.startswith("cfg/") else model).train(
                data=str(task_data[task]), **train_kwargs(d, val=False, batch=4))
            out[task] = d / "run" / "weights" / "last.pt"
            assert out[task].exists()
        return out

    return shared_build(tmp_path_factory, "task-fp-ckpt", build)
