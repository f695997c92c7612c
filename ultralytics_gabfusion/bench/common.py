"""Shared pieces of the benchmarks: ``key=value`` parsing, value checks, environment record, small helpers.

Both benchmarks take Ultralytics-style ``key=value`` tokens (parsed with ``ultralytics.cfg.merge_equals_args`` and
``parse_key_value_pair``, so ``bits=[4,3]``, ``seeds=0`` and ``device=0`` mean what they mean to ``yolo``). Every
setting is checked before anything is trained or written; a mistake raises :class:`BenchError`, which
``bench_main`` prints without a traceback and turns into exit status 2.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterable

PKG_ROOT = Path(__file__).resolve().parents[2]  # the directory that holds the ultralytics_gabfusion package


class BenchError(Exception):
    """A settings mistake found before any work starts; printed without a traceback, exit status 2."""


# --------------------------------------------------------------------------------------------------- parsing
def parse_tokens(argv: Iterable[str]) -> dict:
    """Parse ``key=value`` tokens the way ``yolo`` does (``--key=value`` and ``key = value`` accepted).

    Args:
        argv: Tokens, e.g. ``["methods=[lsq,n2uq]", "bits=4"]``.

    Returns:
        (dict): ``{key: parsed value}``; later tokens win.

    Raises:
        BenchError: A token without ``=`` or with an empty value.
    """
    from ultralytics.cfg import merge_equals_args, parse_key_value_pair

    out = {}
    for a in merge_equals_args(list(argv)):
        a = a[2:] if a.startswith("--") else a
        a = a[:-1] if a.endswith(",") else a
        if "=" not in a:
            raise BenchError(f"'{a}' is not a key=value pair (e.g. epochs=3).")
        try:
            k, v = parse_key_value_pair(a)
        except (AssertionError, ValueError, SyntaxError) as e:
            raise BenchError(f"could not parse '{a}': {e}") from None
        out[k] = v
    return out


def unknown_key_error(key: str, valid: Iterable[str], command: str) -> BenchError:
    """A :class:`BenchError` for an unknown key that names the closest valid key."""
    close = difflib.get_close_matches(key, sorted(valid), n=1, cutoff=0.5)
    hint = f" Did you mean '{close[0]}'?" if close else f" Run 'yolo-gab {command} help' for the keys."
    return BenchError(f"'{key}' is not a valid '{command}' key.{hint}")


def as_list(key: str, v: Any) -> list:
    """A list from ``[a,b]``, ``a,b``, a scalar or a list/tuple (how the CLI spells lists)."""
    if v is None:
        return []
    if isinstance(v, (list, tuple)):
        items = list(v)
    elif isinstance(v, str):
        items = [s.strip().strip("'\"") for s in v.strip().strip("[]()").split(",")]
        items = [s for s in items if s]
    else:
        items = [v]
    return items


def as_str_list(key: str, v: Any, allowed: Iterable[str] | None = None) -> list[str]:
    """A non-empty, de-duplicated list of lower-case names, optionally restricted to ``allowed``."""
    items = [str(x).strip().lower() for x in as_list(key, v)]
    items = list(dict.fromkeys(x for x in items if x))
    if not items:
        raise BenchError(f"'{key}' is empty: give at least one value, e.g. {key}=[...].")
    if allowed is not None:
        allowed = list(allowed)
        for x in items:
            if x not in allowed:
                close = difflib.get_close_matches(x, allowed, n=1)
                hint = f" Did you mean '{close[0]}'?" if close else ""
                raise BenchError(f"{key}: '{x}' is not one of {', '.join(allowed)}.{hint}")
    return items


def as_int(key: str, v: Any, lo: int | None = None, hi: int | None = None) -> int:
    """An integer within ``[lo, hi]`` (floats such as 3.0 accepted), else :class:`BenchError`."""
    if isinstance(v, bool) or not isinstance(v, (int, float)) or float(v) != int(v):
        raise BenchError(f"'{key}={v!r}' must be an integer.")
    v = int(v)
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        rng = f"{lo}..{hi}" if hi is not None else f">= {lo}"
        raise BenchError(f"'{key}={v}' is out of range: use an integer {rng}.")
    return v


def as_int_list(key: str, v: Any, lo: int | None = None, hi: int | None = None) -> list[int]:
    """A non-empty, de-duplicated list of integers within ``[lo, hi]``."""
    raw = as_list(key, v)
    if not raw:
        raise BenchError(f"'{key}' is empty: give at least one value, e.g. {key}=[0].")
    out = []
    for x in raw:
        if isinstance(x, str):
            try:
                x = int(x)
            except ValueError:
                raise BenchError(f"{key}: '{x}' is not an integer.") from None
        out.append(as_int(key, x, lo, hi))
    return list(dict.fromkeys(out))


def as_float(key: str, v: Any, lo: float | None = None, lo_open: bool = False) -> float:
    """A finite number ``>= lo`` (``> lo`` when ``lo_open``)."""
    if isinstance(v, bool) or not isinstance(v, (int, float)) or v != v:
        raise BenchError(f"'{key}={v!r}' must be a number.")
    v = float(v)
    if lo is not None and (v <= lo if lo_open else v < lo):
        raise BenchError(f"'{key}={v}' is out of range: it must be {'>' if lo_open else '>='} {lo}.")
    return v


def as_bool(key: str, v: Any) -> bool:
    """True/False from a bool or its usual spellings."""
    if isinstance(v, bool):
        return v
    s = str(v).lower()
    if s in ("true", "1", "yes"):
        return True
    if s in ("false", "0", "no"):
        return False
    raise BenchError(f"'{key}={v!r}' must be True or False.")


def resolve_device(key: str, v: Any) -> str:
    """Normalise ``device`` and refuse a CUDA device this machine does not have (before anything runs).

    Returns:
        (str): ``'cpu'``, ``'mps'`` or a CUDA spec such as ``'0'`` / ``'0,1'``.
    """
    import torch

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


def torch_device(device: str):
    """The ``torch.device`` of a normalised device string (first GPU of a list)."""
    import torch

    if device in ("cpu", "mps"):
        return torch.device(device)
    return torch.device(f"cuda:{device.split(',')[0]}")


# ---------------------------------------------------------------------------------------------- environment
def git_commit(root: Path = PKG_ROOT) -> str | None:
    """Commit of the checkout the plugin runs from, or None (not a checkout, no git, detached worktree...).

    The ref files are read directly so no ``git`` binary is needed; ``git rev-parse HEAD`` is the fallback.
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
        device: Normalised device string; the GPU name is recorded for CUDA devices.
    """
    import torch
    import ultralytics

    from ..version import __version__

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
