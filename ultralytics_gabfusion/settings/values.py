"""Value checks shared by the plugin keys and ``yolo-gab`` commands: lists, numbers, bits, folders, budgets."""

from __future__ import annotations

import difflib
import tempfile
from pathlib import Path
from typing import Any

from .base import MAX_BITS, MIN_BITS, SettingsError


def as_list(key: str, v: Any) -> list:
    """A list from ``[a,b]``, ``a,b``, a scalar or a list/tuple (how the CLI spells lists)."""
    if v is None:
        return []
    if isinstance(v, (list, tuple)):
        return list(v)
    if isinstance(v, str):
        items = [x.strip().strip("'\"") for x in v.strip().strip("[]()").split(",")]
        return [x for x in items if x]
    return [v]


def as_str_list(key: str, v: Any, allowed=None) -> list[str]:
    """A non-empty, de-duplicated list of lower-case names, optionally restricted to ``allowed``."""
    items = list(dict.fromkeys(x for x in (str(y).strip().lower() for y in as_list(key, v)) if x))
    if not items:
        raise SettingsError(f"'{key}' is empty: give at least one value, e.g. {key}=[...].")
    if allowed is not None:
        allowed = list(allowed)
        for x in items:
            if x not in allowed:
                close = difflib.get_close_matches(x, allowed, n=1)
                hint = f" Did you mean '{close[0]}'?" if close else ""
                raise SettingsError(f"{key}: '{x}' is not one of {', '.join(allowed)}.{hint}")
    return items


def as_int(key: str, v: Any, lo: int | None = None, hi: int | None = None, allow_zero: bool = False) -> int:
    """An integer within ``[lo, hi]`` (or 0 when ``allow_zero``); floats such as 3.0 are accepted."""
    rng = (f"in {lo}..{hi}" if hi is not None else f">= {lo}") if lo is not None else ""
    rng += " or 0" if allow_zero else ""
    if isinstance(v, bool) or not isinstance(v, (int, float)) or float(v) != int(v):
        raise SettingsError(f"'{key}={v!r}' must be an integer{' ' + rng if hi is not None else ''}.")
    v = int(v)
    if ((lo is not None and v < lo) or (hi is not None and v > hi)) and not (allow_zero and v == 0):
        raise SettingsError(f"'{key}={v}' is out of range: use an integer {rng}.")
    return v


def as_int_list(key: str, v: Any, lo: int | None = None, hi: int | None = None) -> list[int]:
    """A non-empty, de-duplicated list of integers within ``[lo, hi]``."""
    raw = as_list(key, v)
    if not raw:
        raise SettingsError(f"'{key}' is empty: give at least one value, e.g. {key}=[0].")
    out = []
    for x in raw:
        if isinstance(x, str):
            try:
                x = int(x)
            except ValueError:
                raise SettingsError(f"{key}: '{x}' is not an integer.") from None
        out.append(as_int(key, x, lo, hi))
    return list(dict.fromkeys(out))


def as_float(key: str, v: Any, lo: float | None = None, hi: float | None = None, lo_open: bool = False) -> float:
    """A number (not NaN) ``>= lo`` (``> lo`` when ``lo_open``) and ``<= hi``."""
    if isinstance(v, bool) or not isinstance(v, (int, float)) or v != v:
        raise SettingsError(f"'{key}={v!r}' must be a number.")
    v = float(v)
    if (lo is not None and (v <= lo if lo_open else v < lo)) or (hi is not None and v > hi):
        rng = f"{'>' if lo_open else '>='} {lo}" + (f" and <= {hi}" if hi is not None else "")
        raise SettingsError(f"'{key}={v}' is out of range: it must be {rng}.")
    return v


def as_bool(key: str, v: Any) -> bool:
    """True/False from a bool or its usual spellings."""
    if isinstance(v, bool):
        return v
    if str(v).lower() in ("true", "1", "yes"):
        return True
    if str(v).lower() in ("false", "0", "no"):
        return False
    raise SettingsError(f"'{key}={v!r}' must be True or False.")


def check_bits(key: str, v) -> int:
    """A bit-width: an integer in ``MIN_BITS..MAX_BITS`` (``3.0`` is accepted as 3)."""
    return as_int(key, v, MIN_BITS, MAX_BITS)


def check_writable_dir(path: Any, key: str) -> Path:
    """Check that directory ``path`` can be created or written, by creating and removing a temp dir in it.

    Probing beats ``os.access``: it also catches read-only mounts and works the same for root.

    Raises:
        FileExistsError: ``path`` or one of its parents is a file.
        PermissionError: Nothing can be written there.
    """
    p = Path(str(path)).expanduser().resolve()
    if p.exists() and not p.is_dir():
        raise FileExistsError(f"{key}={path} is a file; pass a directory path.")
    anc = p
    while not anc.exists():
        anc = anc.parent
    if not anc.is_dir():
        raise FileExistsError(f"{key}={path}: {anc} is a file, not a folder; pass a directory path.")
    try:
        Path(tempfile.mkdtemp(prefix=".gab-write-test-", dir=anc)).rmdir()
    except OSError as e:
        raise PermissionError(f"{key}={path}: cannot write in {anc} ({e.strerror or e}); choose a folder you can write to.") from None
    return p


SIZE_UNITS = {"kib": 1024, "mib": 1024**2, "gib": 1024**3, "kb": 1e3, "mb": 1e6, "gb": 1e9, "b": 1}  # longest first


def parse_bits_budget(value) -> tuple[str, float]:
    """``qat_bits_budget`` as ``(kind, limit)``: average weight bits, a model size, or a compute budget in BOPs.

    Forms (case-insensitive, spaces ignored):

    - a number in 2..8: ``("avg_bits", x)``, the weight bits averaged over the quantized conv weights;
    - a size with a unit (``600KB``, ``1.2MiB``, ``650000B``): ``("bytes", n)``;
    - bit-operations (BOPs = MACs x weight bits x activation bits, summed over the convs) with a unit ``BOPs``,
      ``KBOPs``, ``MBOPs``, ``GBOPs`` or ``TBOPs`` (powers of 1000): ``("bops", n)`` with ``n`` the BOPs of one
      640 x 640 image (Ultralytics' GFLOPs convention). ``@<imgsz>`` states another input side (``2.5GBOPs@160``,
      a positive multiple of 32); it is converted to 640 px by ``(640 / imgsz) ** 2``, exact for a convolutional
      model whose largest stride divides ``imgsz`` (every feature map scales with the input side);
    - a percentage of the FP model's BOPs (32-bit weights and activations everywhere), independent of the input
      size: ``1.8%BOPs`` -> ``("bops_fraction", 0.018)``.

    Examples:
        >>> parse_bits_budget(4.5)
        ('avg_bits', 4.5)
        >>> parse_bits_budget("1.5KiB")
        ('bytes', 1536.0)
        >>> parse_bits_budget("2.5GBOPs@160")
        ('bops', 40000000000.0)
        >>> parse_bits_budget("2%BOPs")
        ('bops_fraction', 0.02)

    Raises:
        SettingsError: Any other value, with the forms it accepts.
    """
    ref_imgsz = 640  # BOPs budgets are stated at this input side (= quant.mixed.BOPS_IMGSZ)
    bops_units = {"tbops": 1e12, "gbops": 1e9, "mbops": 1e6, "kbops": 1e3, "bops": 1.0}  # longest first
    forms = ("give an average bit-width (e.g. 4.5), a model size with a unit (e.g. 600KB, 1.2MB, 900KiB, 650000B), "
             "or a compute budget in bit-operations: 40GBOPs (at a 640 px input), 2.5GBOPs@160 (at 160 px) or "
             "1.8%BOPs (a share of the FP model's BOPs)")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        v = float(value)
        if not 2 <= v <= 8:
            raise SettingsError(f"'qat_bits_budget={value}' is out of range: an average bit-width must be in 2..8; give a "
                             f"model size with a unit instead, e.g. qat_bits_budget=600KB, or a compute budget, e.g. "
                             f"qat_bits_budget=2.5GBOPs@160.")
        return "avg_bits", v
    s = str(value).strip().replace(" ", "")
    low = s.lower()
    if "bops" in low:
        head, _, at = low.partition("@")
        num = None
        if head.endswith("%bops"):
            try:
                num = float(head[: -len("%bops")])
            except ValueError:
                num = None
            if at or num is None or not 0 < num <= 100 or num != num:
                raise SettingsError(f"'qat_bits_budget={value}' is not valid: a share of the FP model's BOPs is a "
                                    f"percentage in (0, 100] without @imgsz, e.g. qat_bits_budget=1.8%BOPs.")
            return "bops_fraction", num / 100
        unit = next((u for u in bops_units if head.endswith(u)), None)
        try:
            num = float(head[: -len(unit)]) * bops_units[unit] if unit else None
        except ValueError:
            num = None
        imgsz = ref_imgsz
        if at:
            try:
                imgsz = int(at)
            except ValueError:
                imgsz = 0
            if imgsz <= 0 or imgsz % 32:
                raise SettingsError(f"'qat_bits_budget={value}': the input size after @ must be a positive multiple of "
                                    f"32 (the image side the BOPs are counted at), e.g. qat_bits_budget=2.5GBOPs@160.")
        if num is None or not num > 0 or num == float("inf"):
            raise SettingsError(f"'qat_bits_budget={value}' is not valid: a BOPs budget is a positive number with a unit "
                                f"BOPs, KBOPs, MBOPs, GBOPs or TBOPs, optionally @imgsz, e.g. qat_bits_budget=40GBOPs "
                                f"(640 px) or 2.5GBOPs@160, or a share of FP such as 1.8%BOPs.")
        return "bops", num * (ref_imgsz / imgsz) ** 2
    for unit, mult in SIZE_UNITS.items():
        if low.endswith(unit):
            try:
                n = float(s[: -len(unit)]) * mult
            except ValueError:
                break
            if n > 0:
                return "bytes", n
            break
    raise SettingsError(f"'qat_bits_budget={value}' is not valid: {forms}.")
