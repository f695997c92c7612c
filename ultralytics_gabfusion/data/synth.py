"""Synthetic 16-class detection, segmentation or pose set written as an Ultralytics dataset, and ``yolo-gab synth``.

No real detection data or pretrained YOLO weights can be downloaded where this project is developed, so
the benchmarks train on a generated stand-in. The set is built so that all three detection strides carry
targets (COCO-like small/medium/large split), objects stay learnable (minimum colour contrast, at most half
of any object hidden) and the scene is not trivially clean (textured backgrounds, unlabelled look-alike
distractors, blur, sensor noise, JPEG artefacts); :mod:`.render` draws each image and its boxes.

This module writes the images and YOLO labels (in worker processes for large sets), records the settings and
a hash of the labels in data.yaml, and reuses a dataset on disk when it matches the requested settings. The
``task`` setting picks the label format (:mod:`.labels`: boxes, polygons or boxes with keypoints); the images
do not depend on it, and detect sets are byte for byte what they were before segment and pose existed.

Only numpy, OpenCV and PyYAML are needed; Ultralytics is used for logging only when it is already
imported, so generating a CI-sized set costs a fraction of a second.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import logging
import multiprocessing
import os
import shutil
import socket
import sys
import time
import uuid
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import yaml

from ..settings import check_writable_dir
from .render import (
    CLASS_NAMES,
    NUM_CLASSES,
    SHAPES,  # noqa: F401 (public here as before)
    SIZE_BINS,
    SPLIT_IDS,
    SYNTH_VERSION,
    SynthConfig,
    SynthSample,
    TASKS,
    _check_int,
    render_sample,
    size_class,
)
from .labels import FLIP_IDX, KPT_NAMES, KPT_SHAPE, label_text

__all__ = [
    "CLASS_NAMES",
    "SIZE_BINS",
    "SYNTH_VERSION",
    "SynthConfig",
    "SynthSample",
    "TASKS",
    "label_sha256",
    "load_synth_info",
    "make_synthetic_dataset",
    "render_sample",
    "size_class",
    "synth_main",
]

_YAML_KEY = "synth"
_TMP_TAG = ".synth-tmp-"


def _logger() -> logging.Logger:
    """Return Ultralytics' LOGGER if Ultralytics is already loaded, else a module logger.

    Importing Ultralytics (and with it torch) costs seconds, which would dominate generating a CI-sized
    set, so it is only borrowed when someone else already paid for it.
    """
    if "ultralytics.utils" in sys.modules:
        try:
            from ultralytics.utils import LOGGER  # here, not at the top: this module must not pull Ultralytics in

            return LOGGER
        except Exception:  # pragma: no cover - partially initialised or broken install
            pass
    return logging.getLogger(__name__)


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
        (root_p / "labels" / split / f"{stem}.txt").write_text(label_text(s, cfg.imgsz, cfg.task))
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
        stats = _run_jobs(_make_jobs(cfg, tmp, workers), workers)
        info = _synth_record(cfg, tmp, stats)
        _write_data_yaml(tmp, out, info)
        _swap_in(tmp, out)
        log.info(f"synth: labels sha256 {info['labels_sha256']}")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _make_jobs(cfg: SynthConfig, tmp: Path, workers: int) -> list[tuple[dict, str, str, int, int, int]]:
    """Write jobs ``(cfg, root, split, start, stop, n)`` covering both splits."""
    # Chunks of up to 32 images (at least ~4 per worker) amortise task overhead and keep the pool
    # balanced; results come back in job order, and no image depends on which worker drew it.
    jobs = []
    cfg_dict = dataclasses.asdict(cfg)
    for split, n in (("train", cfg.n_train), ("val", cfg.n_val)):
        step = max(1, min(32, -(-n // (4 * workers)))) if workers else n
        jobs += [(cfg_dict, str(tmp), split, s, min(s + step, n), n) for s in range(0, n, step)]
    return jobs


def _synth_record(cfg: SynthConfig, root: Path, stats: list[tuple[int, int, int]]) -> dict[str, Any]:
    """The ``synth:`` record of data.yaml: settings, label hash, object/size/class counts, library versions."""
    sizes = [0, 0, 0]
    class_counts = [0] * NUM_CLASSES
    for c, w, h in stats:
        sizes[size_class(max(w, h))] += 1
        class_counts[c] += 1
    return {
        **cfg.settings(),
        "labels_sha256": label_sha256(root),
        "objects": len(stats),
        "sizes": {"small": sizes[0], "medium": sizes[1], "large": sizes[2]},
        "size_rule": f"longest box side in px: small < {SIZE_BINS[0]} <= medium < {SIZE_BINS[1]} <= large",
        "class_counts": class_counts,
        # Fonts and drawing differ between OpenCV releases: recorded so that a changed labels_sha256
        # can be traced to a library update rather than a code change.
        "opencv": cv2.__version__,
        "numpy": np.__version__,
        **({"keypoints": f"{', '.join(KPT_NAMES)} extreme points of each drawn shape"} if cfg.task == "pose" else {}),
    }


def _write_data_yaml(root: Path, out: Path, info: dict[str, Any]) -> None:
    """Write ``root/data.yaml`` for the dataset's final place ``out``, with the ``synth:`` record ``info``."""
    data = {
        "path": str(out),
        "train": "images/train",
        "val": "images/val",
        "nc": NUM_CLASSES,
        "names": dict(CLASS_NAMES),
        **({"kpt_shape": list(KPT_SHAPE), "flip_idx": list(FLIP_IDX)} if info.get("task") == "pose" else {}),
        _YAML_KEY: info,
    }
    (root / "data.yaml").write_text(yaml.safe_dump(data, sort_keys=False, default_flow_style=None))


def _swap_in(tmp: Path, out: Path) -> None:
    """Replace ``out`` by ``tmp``, moving any previous dataset aside first (rename is atomic, rmtree is not)."""
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.synth-old-{uuid.uuid4().hex[:8]}"
        out.rename(old)
    tmp.rename(out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


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
    task: str = "detect",
) -> Path:
    """Write the synthetic 16-class set as an Ultralytics detect, segment or pose dataset and return its data.yaml.

    Layout: ``images/{train,val}/NNNNNN.jpg``, ``labels/{train,val}/NNNNNN.txt`` and ``data.yaml`` with ``path``
    (absolute), ``train``, ``val``, ``nc``, ``names`` and a ``synth`` record (settings, label hash,
    object/size/class counts) that Ultralytics ignores. Labels (normalised, 6 decimals, see :mod:`.labels`):
    detect ``cls cx cy w h``; segment ``cls x1 y1 x2 y2 ...``, the outline of each object's visible pixels;
    pose ``cls cx cy w h`` plus 4 keypoints ``x y v`` (top, right, bottom, left extreme points of the drawn
    shape), with ``kpt_shape: [4, 3]`` and ``flip_idx: [0, 3, 2, 1]`` in data.yaml. The record holds
    ``task`` for segment and pose sets; a record without it is a detect set.

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
        task: ``"detect"``, ``"segment"`` or ``"pose"``: the label format. Images are identical for all three.

    Returns:
        Path of ``out_dir/data.yaml``.

    Raises:
        ValueError: A bad argument (the message says what to pass instead).
        FileExistsError: ``out_dir`` is a file, or a non-empty directory not made by this generator.
    """
    cfg = SynthConfig(
        n_train=n_train, n_val=n_val, imgsz=imgsz, seed=seed, max_objects=max_objects, min_size=min_size, task=task
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

    check_writable_dir(out, "out")
    if out.is_dir() and any(out.iterdir()) and _reuse_existing(out, cfg, overwrite, log):
        return yaml_path

    out.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    log.info(f"synth: generating {_describe(cfg)} in {out} with {n_workers or 'no'} worker processes")
    _generate(cfg, out, n_workers)
    log.info(f"synth: done in {time.perf_counter() - t0:.1f}s")
    return yaml_path


def _reuse_existing(out: Path, cfg: SynthConfig, overwrite: bool, log: logging.Logger) -> bool:
    """Decide about a non-empty ``out``: True to reuse it as is, False to regenerate, FileExistsError to refuse."""
    info = load_synth_info(out / "data.yaml")
    if info is None and not overwrite:
        raise FileExistsError(
            f"out_dir {out} is not empty and holds no synthetic dataset (no data.yaml with a "
            f"'{_YAML_KEY}:' record); choose an empty or new directory, or pass overwrite=True to replace it"
        )
    if info is not None and not overwrite:
        # A record without a task is a detect set (settings() leaves it out for detect).
        same = {k: info.get(k) for k in cfg.settings()} == cfg.settings() and info.get("task", "detect") == cfg.task
        if same and _is_complete(out, cfg, info):
            log.info(f"synth: {out} already holds this dataset ({_describe(cfg)}), reusing it")
            return True
        if _labels_edited(out, info):
            raise FileExistsError(
                f"out_dir {out} holds a synthetic dataset whose labels were changed after generation (edited by "
                "hand?); regenerating would lose them. Choose another out=, or pass overwrite=True to replace it"
            )
        why = "was made with other settings" if not same else "is incomplete"
        log.info(f"synth: {out} {why}, regenerating")
    return False


def _describe(cfg: SynthConfig) -> str:
    extra = f", min_size {cfg.min_size}px" if cfg.min_size else ""
    extra += f", task {cfg.task}" if cfg.task != "detect" else ""
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
    "task": "detect",
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
    """Command-line entry: ``yolo-gab synth out=DIR train=4000 val=500 imgsz=512 seed=0 task=detect ...``.

    Values may be strings (as parsed from ``key=value``) or typed. Defaults give the benchmark set.
    Prints one summary line: path, image counts, objects, size split, label hash and seconds.

    Args:
        args: Mapping of keys ``out, train, val, imgsz, seed, max_objects, min_size, workers, overwrite, task``
            (``n_train``/``n_val`` are accepted for ``train``/``val``; ``task`` is detect, segment or pose).

    Returns:
        Path of the dataset's data.yaml.

    Raises:
        ValueError: Unknown key (the message names the closest valid one) or a bad value.
    """
    merged = _merge_cli_args(args)
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
        task=merged["task"],
    )
    dt = time.perf_counter() - t0
    info = load_synth_info(path) or {}
    sizes = info.get("sizes", {})
    n = max(int(info.get("objects", 0)), 1)
    split = "/".join(f"{100 * sizes.get(k, 0) / n:.0f}" for k in ("small", "medium", "large"))
    print(
        f"synth: {path} | train {info.get('n_train')} val {info.get('n_val')} imgsz {info.get('imgsz')} "
        f"seed {info.get('seed')} task {info.get('task', 'detect')} | {info.get('objects')} objects, "
        f"small/medium/large {split} % | "
        f"labels sha256 {info.get('labels_sha256')} | {dt:.1f}s"
    )
    return path


def _merge_cli_args(args: dict[str, Any] | None) -> dict[str, Any]:
    """``SYNTH_CLI_DEFAULTS`` updated with ``args``, aliases resolved and values typed."""
    merged = dict(SYNTH_CLI_DEFAULTS)
    for k, v in (args or {}).items():
        key = _CLI_ALIASES.get(str(k), str(k))
        if key not in SYNTH_CLI_DEFAULTS:
            valid = list(SYNTH_CLI_DEFAULTS)
            close = difflib.get_close_matches(str(k), valid + list(_CLI_ALIASES), n=1, cutoff=0.5)
            hint = f" Did you mean '{close[0]}'?" if close else ""
            raise ValueError(f"synth: '{k}' is not a valid argument.{hint} Valid arguments: {', '.join(valid)}")
        merged[key] = _parse_cli_value(key, v)
    return merged
