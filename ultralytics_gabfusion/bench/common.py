"""Shared pieces of the benchmarks: the settings error, device resolution, result fingerprints and files.

Both benchmarks take Ultralytics-style ``key=value`` tokens, parsed and checked with the plugin's one parser and
validator set (:mod:`ultralytics_gabfusion.settings`). Every setting is checked before anything is trained or
written; a mistake raises :class:`BenchError` (the settings module's ``SettingsError``), which ``bench_main`` prints
without a traceback and turns into exit status 2.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path
from typing import Any

import torch

from ..provenance import PKG_ROOT
from ..settings import SettingsError

# The benchmarks' name for a settings mistake; the same class, so `except BenchError` also catches the validators'.
BenchError = SettingsError


def cli_value(v: Any) -> str:
    """A value as it is typed on the command line (lists as ``[a,b]``), for the help tables."""
    return f"[{','.join(map(str, v))}]" if isinstance(v, (list, tuple)) else str(v)


def resolve_device(key: str, v: Any) -> str:
    """Normalise ``device`` and refuse a CUDA device this machine does not have (before anything runs).

    Args:
        key (str): The setting's name, used in messages.
        v (Any): The user's value (None or empty: the first GPU when CUDA is available, else the CPU).

    Returns:
        (str): ``'cpu'``, ``'mps'`` or a CUDA spec such as ``'0'`` / ``'0,1'``.

    Raises:
        BenchError: Not a device spec, or a CUDA index this machine does not have.
    """
    if v is None or str(v).strip() == "":
        return "0" if torch.cuda.is_available() else "cpu"
    s = str(v).strip().lower().replace("cuda:", "").replace(" ", "").strip("[]()")
    if s in ("cpu", "mps"):
        return s
    ids = [x for x in s.split(",") if x]
    if not ids or not all(x.isdigit() for x in ids):
        raise BenchError(f"'{key}={v}' is not a device: use cpu, 0, 0,1 or mps.")
    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    missing = [x for x in ids if int(x) >= n]
    if missing:
        raise BenchError(f"'{key}={v}': CUDA device {','.join(missing)} not found ({n} visible); use {key}=cpu.")
    return ",".join(ids)


def torch_device(device: str) -> torch.device:
    """The ``torch.device`` of a normalised device string (first GPU of a list)."""
    if device in ("cpu", "mps"):
        return torch.device(device)
    return torch.device(f"cuda:{device.split(',')[0]}")


def fingerprint(obj: Any) -> str:
    """A short stable hash of a JSON-able settings record (decides whether a stored result is still valid)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def write_json(path: Path, obj: Any) -> None:
    """Write JSON atomically (a crash mid-write never leaves a truncated result that looks valid)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str, allow_nan=True) + "\n")
    os.replace(tmp, path)


def child_env() -> dict:
    """Environment for a child Python process that must import this package even when it is not installed."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(PKG_ROOT), *filter(None, [env.get("PYTHONPATH")])])
    return env


def python() -> str:
    """The running interpreter (child processes use the same venv)."""
    return sys.executable


__all__ = ["BenchError", "child_env", "cli_value", "fingerprint", "python", "resolve_device", "torch_device",
           "write_json"]
