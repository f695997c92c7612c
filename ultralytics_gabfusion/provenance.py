"""Where a result came from: the commit, the hardware and the software versions that produced it.

Benchmark results (``bench.json``, ``speed.json``) and the cards of shipped models record these, so a number can be
traced back to the code and machine behind it.

Examples:
    >>> from ultralytics_gabfusion.provenance import environment, git_commit
    >>> environment("cpu")["device"]
    'cpu'
    >>> git_commit()  # doctest: +SKIP
    'b7addad...'
"""

from __future__ import annotations

import csv

import os
import platform
import subprocess
from pathlib import Path

import torch
import ultralytics

from .version import __version__

PKG_ROOT = Path(__file__).resolve().parents[1]  # the directory that holds the ultralytics_gabfusion package


def git_commit(root: Path = PKG_ROOT) -> str | None:
    """Commit of the checkout the plugin runs from, or None (not a checkout, no git, detached worktree...).

    The ref files are read directly so no ``git`` binary is needed; ``git rev-parse HEAD`` is the fallback.

    Args:
        root (Path): Directory of the checkout (default: the one holding this package).

    Returns:
        (str | None): The full commit hash, or None when it cannot be found.
    """
    try:
        git = root / ".git"
        head = (git / "HEAD").read_text().strip()
        if not head.startswith("ref:"):
            return head if len(head) == 40 else None
        ref = head.split(None, 1)[1].strip()
        f = git / ref
        if f.exists():
            return f.read_text().strip() or None
        packed = git / "packed-refs"
        if packed.exists():
            for line in packed.read_text().splitlines():
                parts = line.split()
                if len(parts) == 2 and parts[1] == ref:
                    return parts[0]
    except (OSError, IndexError):
        pass
    try:
        r = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        return r.stdout.strip() or None if r.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def cpu_name() -> str:
    """The CPU model string (``/proc/cpuinfo`` on Linux, ``platform.processor()`` elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def environment(device: str | None = None) -> dict:
    """Hardware, software versions and commit, recorded with every benchmark result.

    Args:
        device (str | None): Normalised device string (``cpu``, ``mps``, ``0``, ``0,1``); the GPU names are
            recorded for CUDA devices.

    Returns:
        (dict): ``hardware`` (one readable line), ``cpu``, ``cpu_count``, ``gpu``, ``device``, ``torch_threads``,
            the ``python``/``platform``/``torch``/``cuda``/``ultralytics``/``ultralytics_gabfusion`` versions and
            ``git_commit``.
    """
    cpu = cpu_name()
    n_cpu = os.cpu_count() or 0
    gpus = []
    if device not in (None, "cpu", "mps") and torch.cuda.is_available():
        gpus = [torch.cuda.get_device_name(int(i)) for i in device.split(",")]
    hardware = f"{', '.join(gpus)} ({cpu}, {n_cpu} CPUs)" if gpus else f"{cpu}, {n_cpu} CPUs"
    return {
        "hardware": hardware,
        "cpu": cpu,
        "cpu_count": n_cpu,
        "gpu": gpus or None,
        "device": device,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "ultralytics": ultralytics.__version__,
        "ultralytics_gabfusion": __version__,
        "git_commit": git_commit(),
    }


def epochs_run(run_dir: str | os.PathLike) -> int | None:
    """Epochs an Ultralytics training run completed: the data rows of its ``results.csv``.

    Args:
        run_dir (str | os.PathLike): The run directory (the one holding ``results.csv`` and ``weights/``).

    Returns:
        (int | None): Number of epochs written, or None when the run left no ``results.csv``.
    """
    f = Path(run_dir) / "results.csv"
    if not f.exists():
        return None
    return max(len([ln for ln in f.read_text().splitlines() if ln.strip()]) - 1, 0)


def epoch_columns(run_dir: str | os.PathLike, columns: dict[str, str]) -> dict[str, list[float]]:
    """Per-epoch values of some ``results.csv`` columns of an Ultralytics run (absent columns are left out).

    Args:
        run_dir (str | os.PathLike): The run directory.
        columns (dict[str, str]): ``{name in the result: results.csv column}``.

    Returns:
        (dict[str, list[float]]): ``{name: [value per epoch]}`` (empty without a ``results.csv``).
    """
    f = Path(run_dir) / "results.csv"
    if not f.exists():
        return {}
    with open(f, newline="") as fh:
        rows = [{k.strip(): v for k, v in r.items() if k} for r in csv.DictReader(fh)]
    out = {}
    for name, col in columns.items():
        try:
            out[name] = [float(r[col]) for r in rows]
        except (KeyError, TypeError, ValueError):
            continue
    return out


__all__ = ["PKG_ROOT", "cpu_name", "environment", "epoch_columns", "epochs_run", "git_commit"]
