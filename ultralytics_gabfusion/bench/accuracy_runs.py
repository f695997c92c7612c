"""Runs of ``yolo-gab bench``: the arguments of every run, training or quantizing it, re-validating it, resuming.

Every run is described by its train arguments; their fingerprint (with the FP run's and the validation settings)
decides whether a result stored in ``out/results/<run>.json`` by an earlier, interrupted bench can be reused.
"""

from __future__ import annotations

import gc
import json
import shutil
import time
import traceback
from pathlib import Path
from types import SimpleNamespace
from typing import Callable

import torch
from ultralytics import YOLO
from ultralytics.utils import LOGGER
from ultralytics.utils.checks import check_yolov5u_filename

from ..data.synth import load_synth_info, make_synthetic_dataset
from ..provenance import epoch_columns, epochs_run
from ..ptq import post_training_quantize
from ..quant.mixed import model_size_bytes
from ..trainer import GABTrainer
from .accuracy_settings import synth_settings
from .arms import ARM_SETTINGS, METHOD_DEFAULTS, SCHEDULES
from .common import write_json

# Segmentation and pose runs: the task's own metrics next to the box ones, as Ultralytics names them (mask "(M)",
# keypoints "(P)"), recorded as <prefix>mAP50 / <prefix>mAP50_95.
TASK_METRICS = {"segment": ("mask_", "M"), "pose": ("pose_", "P")}
# results.csv columns kept per epoch in each run's record (bench.json): the EMA model's val mAP (and that of the
# masks / keypoints; absent columns are left out) and ADA's size relative to the task loss (ada/ratio) and to its
# gradient at the supervised features (ada/grad_ratio).
EPOCH_COLUMNS = {"mAP50": "metrics/mAP50(B)", "mAP50_95": "metrics/mAP50-95(B)", "ada_ratio": "ada/ratio",
                 "ada_grad_ratio": "ada/grad_ratio",
                 **{f"{p}{k}": f"metrics/mAP50{c}({t})" for p, t in TASK_METRICS.values()
                    for k, c in (("mAP50", ""), ("mAP50_95", "-95"))}}
# Ultralytics keys that also apply to the FP run (compute/data handling); every other extra key is QAT-only.
SHARED_KEYS = {"amp", "cache", "fraction", "single_cls", "classes", "rect", "half", "deterministic", "verbose"}


# ============================================================================================ train arguments
def _train_common(s: dict, data: str, seed: int, name: str) -> dict:
    kw = {"data": data, "imgsz": s["imgsz"], "batch": s["batch"], "device": s["device"], "seed": seed,
          "deterministic": True, "plots": False, "project": str(s["out"] / "runs"), "name": name, "exist_ok": True}
    if s["workers"] is not None:
        kw["workers"] = s["workers"]
    return kw


def fp_train_args(s: dict, data: str, seed: int, name: str) -> dict:
    """Keyword arguments of the FP run (Ultralytics defaults apart from the bench's shared keys).

    Args:
        s (dict): Resolved settings.
        data (str): Data YAML.
        seed (int): Training seed.
        name (str): Run name (directory under ``out/runs``).

    Returns:
        (dict): Keyword arguments of ``YOLO(model).train``.
    """
    kw = _train_common(s, data, seed, name)
    kw["epochs"] = s["fp_epochs"]
    if s["fp_time"]:
        kw["time"] = s["fp_time"]
    kw.update({k: v for k, v in s["extra"].items() if k in SHARED_KEYS})
    kw.update(s["fp_extra"])
    return kw


def qat_train_args(s: dict, data: str, seed: int, name: str, method: str, bits: int, arm: str) -> dict:
    """Keyword arguments of one QAT run: schedule < method defaults < recipe < extra keys < per-arm keys.

    Args:
        s (dict): Resolved settings.
        data (str): Data YAML.
        seed (int): Training seed.
        name (str): Run name (directory under ``out/runs``).
        method (str): Quantizer (``qat``).
        bits (int): Weight and activation bits.
        arm (str): One of :data:`~.arms.ARMS`.

    Returns:
        (dict): Keyword arguments of ``YOLO(fp).train(trainer=GABTrainer, ...)`` (or of PTQ for the ``ptq`` arm).
    """
    gab, use_ada, form, _ = ARM_SETTINGS[arm]
    kw = {**SCHEDULES[s.get("schedule") or "stable"], "qat_lr": METHOD_DEFAULTS[method]["qat_lr"]}
    kw.update(s["recipe_cfg"])
    kw.update(s["extra"])
    kw.update(_train_common(s, data, seed, name))
    kw["epochs"] = s["epochs"]
    if s["time"]:
        kw["time"] = s["time"]
    kw.update({"qat": method, "w_bits": bits, "a_bits": bits, "gab": gab, "ada": s["ada"] if use_ada else 0.0})
    if form is not None:
        kw["gab_form"] = form
    kw["ada_div"] = s["ada_div"] or s["recipe_cfg"].get("ada_div") or METHOD_DEFAULTS[method]["ada_div"]
    return kw


def stable_args(args: dict | None) -> dict | None:
    """Train args without those that cannot change the result (so a resumed bench may use other worker counts)."""
    return None if args is None else {k: v for k, v in args.items() if k not in ("workers", "verbose")}


def val_key(s: dict) -> dict:
    """What the re-validation depends on (part of every run's fingerprint)."""
    return {"imgsz": s["imgsz"], "batch": s["batch"], "split": "val"}


# ================================================================================================= data
def prepare_data(s: dict) -> tuple[str, dict]:
    """Return (data YAML, data record); generates the benchmark set under ``out/data`` when ``data`` is unset."""
    if s["data"] is not None:
        return s["data"], {"yaml": s["data"], "generated": False}
    kw = synth_settings(s)
    d = s["out"] / "data" / ("synth-" + "-".join(f"{k}{v}" for k, v in kw.items()))
    t0 = time.perf_counter()
    yaml_path = make_synthetic_dataset(d, workers=s["workers"], **kw)
    LOGGER.info(f"bench: data {yaml_path} ({time.perf_counter() - t0:.1f} s)")
    info = load_synth_info(yaml_path)
    return str(yaml_path), {"yaml": str(yaml_path), "generated": True, **kw, "synth": info}


# =========================================================================================== one run, resumable
def run_once(s: dict, rec: dict, fp: str, train_fn: Callable[[], dict]) -> dict:
    """Train (unless a stored result with the same fingerprint exists) and validate one run; never raises.

    Args:
        s (dict): Resolved settings.
        rec (dict): The run's record (``id``, ``data`` ...); completed in place with status, weights and metrics.
        fp (str): Fingerprint of everything the result depends on.
        train_fn (Callable): Trains the run; returns ``status``, ``weights``, ``epochs_run``, ``train_metrics``.

    Returns:
        (dict): The completed record, a stored one (``cached`` True), or one with ``status`` failed.
    """
    res_file = s["out"] / "results" / f"{rec['id']}.json"
    if s.get("report_only"):  # the weights may be gone (copied from another machine): the stored record suffices
        old = _stored_result(res_file, fp, need_weights=False) if res_file.exists() else None
        if old is None:
            return {**rec, "status": "missing", "error": "no stored result (report_only)"}
        return {**old, "cached": True}
    if res_file.exists():
        old = _stored_result(res_file, fp)
        if old is not None:
            LOGGER.info(f"bench: {rec['id']}: stored result reused ({res_file})")
            if old.get("size_bytes") is None:  # stored by a version without the size axis
                old["size_bytes"] = weights_size_bytes(old["weights"])
            return {**old, "cached": True}
        LOGGER.info(f"bench: {rec['id']}: stored result is stale or incomplete, running it again")
    rec.update({"fingerprint": fp, "cached": False, "error": None})
    try:
        t0 = time.perf_counter()
        rec.update(train_fn())
        rec["train_wall_s"] = round(time.perf_counter() - t0, 2) if rec["status"] == "trained" else 0.0
        metrics, vt = validate_weights(s, rec["weights"], rec["data"], rec["id"])
        rec.update(metrics)
        rec["size_bytes"] = weights_size_bytes(rec["weights"])
        rec["val_wall_s"] = round(vt, 2)
        rec["wall_s"] = round(rec["train_wall_s"] + vt, 2)
        write_json(res_file, rec)
    except Exception as e:  # one failed run must not lose the others: recorded, reported, exit status 1
        LOGGER.error(f"bench: {rec['id']} failed: {type(e).__name__}: {e}\n{traceback.format_exc()}")
        rec.update({"status": "failed", "error": f"{type(e).__name__}: {e}"})
    finally:
        _free_memory()
    return rec


def _stored_result(res_file: Path, fp: str, need_weights: bool = True) -> dict | None:
    """A stored result still valid for fingerprint ``fp`` (finished, its weights still there), else None."""
    try:
        old = json.loads(res_file.read_text())
    except (OSError, ValueError):
        return None
    if old and old.get("fingerprint") == fp and old.get("status") in ("trained", "given") and \
            (not need_weights or Path(old.get("weights", "")).is_file()):
        return old
    return None


def validate_weights(s: dict, weights: str, data: str, name: str) -> tuple[dict, float]:
    """Validate a checkpoint exactly like every other arm; returns (metrics, wall seconds)."""
    t0 = time.perf_counter()
    kw = {"data": data, "imgsz": s["imgsz"], "batch": s["batch"], "device": s["device"].split(",")[0],
          "plots": False, "project": str(s["out"] / "val"), "name": name, "exist_ok": True, "split": "val",
          "verbose": False}  # no per-class table: the bench prints its own
    if s["workers"] is not None:
        kw["workers"] = s["workers"]
    r = YOLO(weights).val(**kw)
    return _metrics_of(r), time.perf_counter() - t0


def _metrics_of(results) -> dict:
    """Box mAP50 / mAP50-95 / precision / recall of a validation, plus the mask or pose metrics it reports."""
    rd = dict(getattr(results, "results_dict", {}) or {})
    out = {
        "mAP50": float(rd.get("metrics/mAP50(B)", float("nan"))),
        "mAP50_95": float(rd.get("metrics/mAP50-95(B)", float("nan"))),
        "precision": float(rd.get("metrics/precision(B)", float("nan"))),
        "recall": float(rd.get("metrics/recall(B)", float("nan"))),
    }
    for prefix, t in TASK_METRICS.values():
        if f"metrics/mAP50({t})" in rd:
            out[f"{prefix}mAP50"] = float(rd[f"metrics/mAP50({t})"])
            out[f"{prefix}mAP50_95"] = float(rd[f"metrics/mAP50-95({t})"])
    return out


def weights_size_bytes(weights: str) -> float:
    """Stored model size of a checkpoint from the bit-width of each conv (FP layers at 32 bits)."""
    ckpt = torch.load(weights, map_location="cpu", weights_only=False)
    return model_size_bytes(ckpt.get("ema") or ckpt["model"])


def _free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ============================================================================================ what a run does
def train_fp(s: dict, entry: dict, data: str, seed: int, run_id: str) -> Callable[[], dict]:
    """The FP run of a model entry: trained from its YAML, or a given checkpoint taken as is."""
    def fn():
        if entry["kind"] == "pt":
            return {"status": "given", "weights": loadable_fp(entry, s), "epochs_run": None, "train_metrics": None}
        run_dir = s["out"] / "runs" / run_id
        shutil.rmtree(run_dir, ignore_errors=True)  # Ultralytics appends to an old results.csv otherwise
        model = YOLO(entry["source"])
        model.train(**fp_train_args(s, data, seed, run_id))
        return _after_train(model, run_dir)

    return fn


def train_qat(s: dict, fp_weights: str, data: str, seed: int, run_id: str, method: str, bits: int,
              arm: str) -> Callable[[], dict]:
    """One QAT arm, trained by :class:`~ultralytics_gabfusion.trainer.GABTrainer` from the FP checkpoint."""
    def fn():
        run_dir = s["out"] / "runs" / run_id
        shutil.rmtree(run_dir, ignore_errors=True)
        model = YOLO(fp_weights)
        model.train(trainer=GABTrainer, **qat_train_args(s, data, seed, run_id, method, bits, arm))
        return _after_train(model, run_dir)

    return fn


def quantize_ptq(s: dict, fp_weights: str, data: str, seed: int, run_id: str, method: str,
                 bits: int, arm: str = "ptq") -> Callable[[], dict]:
    """A step-0 arm (``ptq``, ``ptq_gab`` ...): the FP checkpoint converted and calibrated, no training step."""
    def fn():
        run_dir = s["out"] / "runs" / run_id
        shutil.rmtree(run_dir, ignore_errors=True)
        args = qat_train_args(s, data, seed, run_id, method, bits, arm)
        weights = post_training_quantize(fp_weights, **args)
        return {"status": "trained", "weights": str(weights), "epochs_run": 0, "train_metrics": None}

    return fn


def _after_train(model, run_dir: Path) -> dict:
    tr = model.trainer
    best = Path(tr.best) if Path(tr.best).is_file() else Path(tr.last)
    m = tr.metrics or {}
    return {
        "status": "trained",
        "weights": str(best),
        "epochs_run": epochs_run(run_dir),
        "train_metrics": {k: v for k, v in _metrics_of(SimpleNamespace(results_dict=m)).items()
                          if k not in ("precision", "recall")},
        "per_epoch": epoch_columns(run_dir, EPOCH_COLUMNS),
    }


def loadable_fp(entry: dict, s: dict) -> str:
    """A path Ultralytics loads without renaming (it rewrites '.../yolov5s.pt' to 'yolov5su.pt' and downloads)."""
    src = entry["source"]
    if check_yolov5u_filename(src, verbose=False) == src:
        return src
    link = s["out"] / "given" / entry["label"] / "fp.pt"
    link.parent.mkdir(parents=True, exist_ok=True)
    if not link.exists():
        try:
            link.symlink_to(src)
        except OSError:
            shutil.copyfile(src, link)
    return str(link)


__all__ = ["EPOCH_COLUMNS", "SHARED_KEYS", "TASK_METRICS", "fp_train_args", "loadable_fp", "prepare_data",
           "qat_train_args", "quantize_ptq",
           "run_once", "stable_args", "train_fp", "train_qat", "val_key", "validate_weights", "weights_size_bytes"]
