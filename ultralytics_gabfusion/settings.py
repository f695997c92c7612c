"""Plugin settings: every key the plugin adds to Ultralytics' flat argument namespace, in one place.

This module is longer than the others on purpose: the keys, their validators, the ``key=value`` parsers and the
validated :class:`QATConfig` are the one place where a user's setting is checked, and it imports no torch.

Each key is a plain Ultralytics-style setting (``key=value`` on the CLI, a keyword in Python, a line in a YAML
recipe). This module defines their defaults, types and allowed values and validates them with messages that say
what to fix.

Examples:
    >>> from ultralytics_gabfusion.settings import PLUGIN_DEFAULTS, validate_settings
    >>> PLUGIN_DEFAULTS["qat"]
    'none'
    >>> validate_settings({"qat": "lsq", "w_bits": 4, "a_bits": 4})["qat"]
    'lsq'
"""

from __future__ import annotations

import ast
import difflib
import tempfile
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Callable

import yaml

# The one list of quantizer names and the one bit range (quant.registry maps the names to classes).
QUANT_METHODS = ("lsq", "lsqplus", "pact", "n2uq")
QAT_METHODS = ("none", *QUANT_METHODS)
MIN_BITS, MAX_BITS = 2, 8
GAB_MODES = ("balanced", "learned", "off")
GAB_FORMS = ("grad", "paper")  # GABFusion: balancing in the backward pass only, or the paper's alpha + LayerNorm
ADA_ATTNS = ("simam", "qada")
ADA_DIVS = ("kl", "js")
ACT_GRIDS = ("auto", "signed", "unsigned")  # activation grids of quant.grids
QAT_KERNELS = ("auto", "reference", "compiled")  # fake-quant kernels of quant.kernels


class SettingsError(ValueError):
    """A mistake in the user's keys or values, found before any work starts; commands print it without a traceback."""


# ---------------------------------------------------------------------------------------------------- parsing
def parse_key_values(tokens) -> dict:
    """Parse ``key=value`` tokens the way ``yolo`` does (``--key=value`` and ``key = value`` accepted).

    Values are typed by Ultralytics' own rules, so ``bits=[4,3]``, ``seed=0`` and ``device=0`` mean what they mean
    to ``yolo``; later tokens win.

    Args:
        tokens: Tokens, e.g. ``["methods=[lsq,n2uq]", "bits=4"]``.

    Returns:
        (dict): ``{key: parsed value}``.

    Raises:
        SettingsError: A token without ``=`` or whose value cannot be parsed.

    Examples:
        >>> parse_key_values(["bits=[4,3]", "--epochs=2"])
        {'bits': [4, 3], 'epochs': 2}
    """
    from ultralytics.cfg import merge_equals_args, parse_key_value_pair  # keeps `settings` importable without torch

    out = {}
    for a in merge_equals_args(list(tokens)):
        a = a[2:] if a.startswith("--") else a
        a = a[:-1] if a.endswith(",") else a
        if "=" not in a:
            raise SettingsError(f"'{a}' is not a key=value pair (e.g. epochs=3).")
        try:
            k, v = parse_key_value_pair(a)
        except (AssertionError, NameError, ValueError, SyntaxError) as e:
            raise SettingsError(f"could not parse '{a}': {e}") from None
        out[k] = v
    return out


def parse_command(argv: list[str]) -> tuple[str | None, dict]:
    """Parse ``yolo``-style tokens into (mode, overrides), reading ``cfg=`` first and letting explicit keys win.

    Args:
        argv (list[str]): Tokens after the program name, e.g. ``["train", "model=x.pt", "epochs=3"]``.

    Returns:
        (tuple[str | None, dict]): The mode (or None) and the overrides, plugin keys included.

    Raises:
        SettingsError: On unknown keys (with the closest valid key), missing '=' or bad values.
    """
    from ultralytics.cfg import MODES, TASKS, merge_equals_args, parse_key_value_pair  # settings stays torch-free
    from ultralytics.utils import DEFAULT_CFG_DICT

    mode, overrides, recipe = None, {}, {}
    for a in merge_equals_args(argv):
        a = a[2:] if a.startswith("--") else a
        a = a[:-1] if a.endswith(",") else a
        if "=" in a:
            try:
                k, v = parse_key_value_pair(a)
            except (NameError, SyntaxError, ValueError, AssertionError) as e:
                raise SettingsError(f"could not parse '{a}': {e}") from None
            if k == "cfg" and v is not None:
                try:
                    recipe = read_recipe(v)
                except (FileNotFoundError, ValueError) as e:
                    raise SettingsError(str(e)) from None
            else:
                overrides[k] = v
        elif a in MODES:
            mode = a
        elif a in TASKS:
            overrides["task"] = a
        elif a in DEFAULT_CFG_DICT and isinstance(DEFAULT_CFG_DICT[a], bool):
            overrides[a] = True  # bare boolean flag, e.g. 'resume'
        else:
            raise SettingsError(f"'{a}' is not a mode or key=value pair.{_suggest(a)}")
    overrides = {**recipe, **overrides}
    valid = set(DEFAULT_CFG_DICT) | set(PLUGIN_KEYS) | {"trainer", "task", "save_dir", "file"}
    if mode == "export":
        valid |= set(EXPORT_KEYS)
    bad = [k for k in overrides if k not in valid]
    if bad:
        raise SettingsError("\n".join(f"'{k}' is not a valid yolo-gab argument.{_suggest(k)}" for k in bad))
    try:
        validate_settings(overrides)
    except ValueError as e:
        raise SettingsError(str(e)) from None
    return mode, overrides


# Keys of ``yolo-gab export`` for quantized models (see export/command.py); not Ultralytics or training keys.
EXPORT_KEYS = ("zero_point", "int4")


def _suggest(key: str) -> str:
    from ultralytics.utils import DEFAULT_CFG_DICT

    close = difflib.get_close_matches(key, list(DEFAULT_CFG_DICT) + sorted(PLUGIN_KEYS) + ["trainer"], n=3)
    return f" Similar arguments: {', '.join(close)}." if close else " Run 'yolo-gab help' for the plugin keys."


def unknown_key_error(key: str, valid, command: str) -> SettingsError:
    """A :class:`SettingsError` for an unknown key of ``yolo-gab COMMAND`` that names the closest valid key."""
    close = difflib.get_close_matches(key, sorted(valid), n=1, cutoff=0.5)
    hint = f" Did you mean '{close[0]}'?" if close else f" Run 'yolo-gab {command} help' for the keys."
    return SettingsError(f"'{key}' is not a valid '{command}' key.{hint}")


# ----------------------------------------------------------------------------------------------- value checks
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


# ------------------------------------------------------------------------------------------------ plugin keys
@dataclass(frozen=True)
class Setting:
    """One plugin key: default, help text and a validator returning the normalised value or raising ValueError."""

    default: Any
    help: str
    check: Callable[[str, Any], Any]


def _choice(*allowed: str) -> Callable[[str, Any], Any]:
    def check(key, v):
        s = str(v).lower() if v is not None else "none"
        if s in ("false", "0") and "off" in allowed:
            s = "off"
        if s in ("false", "0") and "none" in allowed:
            s = "none"
        if s not in allowed:
            close = difflib.get_close_matches(s, allowed, n=1)
            hint = f" Did you mean '{key}={close[0]}'?" if close else ""
            raise SettingsError(f"'{key}={v}' is not valid. Allowed values: {', '.join(allowed)}.{hint}")
        return s

    return check


def _int_range(lo: int, hi: int, allow_zero: bool = False) -> Callable[[str, Any], Any]:
    return lambda key, v: as_int(key, v, lo, hi, allow_zero)


def _float_range(lo: float, hi: float | None = None, lo_open: bool = False) -> Callable[[str, Any], Any]:
    return lambda key, v: as_float(key, v, lo, hi, lo_open)


def _optional_choice(*allowed: str) -> Callable[[str, Any], Any]:
    inner = _choice(*allowed)

    def check(key, v):
        return None if v in (None, "", "none", "None") else inner(key, v)

    return check


def _optional_float(lo: float) -> Callable[[str, Any], Any]:
    inner = _float_range(lo, lo_open=True)

    def check(key, v):
        return None if v in (None, "", "none", "None") else inner(key, v)

    return check


def _ema_tau(key, v):
    """``qat_ema_tau``: None (Ultralytics' 2000), ``auto`` (sized to the run) or a positive number of updates."""
    if v in (None, "", "none", "None"):
        return None
    if str(v).lower() == "auto":
        return "auto"
    try:
        return as_float(key, v, 0.0, None, True)
    except SettingsError:
        raise SettingsError(f"'{key}={v}' must be auto, None (Ultralytics' 2000) or a number of optimizer updates > 0, "
                            f"e.g. {key}=auto.") from None


def _path_or_none(key, v):
    if v in (None, "", "none", "None"):
        return None
    if not isinstance(v, str):
        v = str(v)
    return v


def _int_list_or_none(key, v):
    if v in (None, "", "none", "None"):
        return None
    if isinstance(v, int) and not isinstance(v, bool):
        v = [v]
    if isinstance(v, str):
        v = [s for s in v.replace("[", "").replace("]", "").split(",") if s.strip()]
    try:
        out = [int(x) for x in v]
    except (TypeError, ValueError):
        raise SettingsError(f"'{key}={v!r}' must be a list of layer indices, e.g. {key}=[17,20,23].") from None
    if not out:
        raise SettingsError(f"'{key}' must name at least one layer index, or be None for the default.")
    return out


def _float_list_or_none(key, v):
    if v in (None, "", "none", "None"):
        return None
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        v = [v]
    if isinstance(v, str):
        v = [s for s in v.replace("[", "").replace("]", "").split(",") if s.strip()]
    try:
        return [float(x) for x in v]
    except (TypeError, ValueError):
        raise SettingsError(f"'{key}={v!r}' must be a list of numbers, e.g. {key}=[0.0,0.0].") from None


def _layer_bits(key, v):
    """``{layer: bits}`` (a mapping, also as the CLI literal ``{17:8,20:6}``) or the path of a sensitivity CSV."""
    if v in (None, "", "none", "None"):
        return None
    if isinstance(v, str) and v.strip().startswith("{"):
        try:
            v = ast.literal_eval(v.strip())
        except (ValueError, SyntaxError):
            raise SettingsError(f"'{key}={v}' is not a valid mapping: write it as {{17: 8, 20: 6}} (layer: bits).") from None
    if isinstance(v, dict):
        out = {}
        for k, b in v.items():
            try:
                layer = int(k)
            except (TypeError, ValueError):
                layer = -1
            if layer < 0 or (isinstance(k, float) and k != layer) or isinstance(k, bool):
                raise SettingsError(f"'{key}': {k!r} is not a layer index; use non-negative integers, e.g. {{17: 8}}.")
            if isinstance(b, bool) or not isinstance(b, (int, float)) or float(b) != int(b) or not MIN_BITS <= int(b) <= MAX_BITS:
                raise SettingsError(f"'{key}': layer {layer} bits {b!r} are not supported; use an integer in "
                                 f"{MIN_BITS}..{MAX_BITS}.")
            out[layer] = int(b)
        if not out:
            raise SettingsError(f"'{key}' is an empty mapping: name at least one layer, e.g. {{17: 8}}, or use None.")
        return out
    if isinstance(v, str) and v.lower().endswith(".csv"):
        if not Path(v).is_file():
            raise SettingsError(f"'{key}={v}': file not found; pass the sensitivity.csv written by 'yolo-gab sensitivity'.")
        return v
    raise SettingsError(f"'{key}={v!r}' must be a mapping {{layer: bits}} (e.g. {{17: 8, 20: 6}}) or the path of the "
                     f"sensitivity.csv written by 'yolo-gab sensitivity' (with qat_bits_budget=).")


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


def _bits_budget(key, v):
    if v in (None, "", "none", "None"):
        return None
    kind, x = parse_bits_budget(v)
    return x if kind == "avg_bits" else str(v).strip().replace(" ", "")


SETTINGS: dict[str, Setting] = {
    # Quantization-aware training
    "qat": Setting("none", f"quantizer for weights and activations: {', '.join(QAT_METHODS)}", _choice(*QAT_METHODS)),
    "w_bits": Setting(4, "weight bit-width (2-8) of every quantized conv outside the policy's ends", check_bits),
    "a_bits": Setting(4, "activation bit-width (2-8) of every quantized conv input outside the ends", check_bits),
    "qat_first_bits": Setting(8, "W and A bits of the first conv (0 = same as w_bits/a_bits)",
                              _int_range(MIN_BITS, MAX_BITS, True)),
    "qat_head_bits": Setting(8, "W and A bits of the head output convs: box, class, mask coefficients and prototypes, "
                             "keypoints (0 = same as w_bits/a_bits)", _int_range(MIN_BITS, MAX_BITS, True)),
    "qat_skip": Setting(None, "layer indices left in full precision, e.g. [0,23]", _int_list_or_none),
    "qat_layer_bits": Setting(None, "mixed precision: {layer: bits} of ordinary convs, or a sensitivity.csv (with "
                              "qat_bits_budget)", _layer_bits),
    "qat_bits_budget": Setting(None, "budget for qat_layer_bits=<csv>: average weight bits (e.g. 4.5), a size (600KB) or "
                               "bit-operations (40GBOPs at 640 px, 2.5GBOPs@160, or 1.8%BOPs of FP)",
                               _bits_budget),
    "qat_calib": Setting(4, "training batches used to initialise activation quantizers before training", _int_range(1, 1000)),
    "qat_init": Setting("mse", "quantizer init: mse (published init, range refined by an MSE search) or paper (published inits)", _choice("mse", "paper")),
    "qat_act_grid": Setting("auto", "activation grids: auto (unsigned after SiLU/ReLU, signed after LayerNorm), signed, unsigned",
                            _choice(*ACT_GRIDS)),
    "qat_lr": Setting(1.0, "learning-rate multiplier of quantizer parameters (N2UQ reference: 0.1)", _float_range(0.0, lo_open=True)),
    "qat_kernel": Setting("auto", "fake-quant kernels: auto (compiled on CUDA with Triton, reference on CPU), reference, compiled", _choice(*QAT_KERNELS)),
    # Stability of the QAT run (stability.py)
    "qat_bn": Setting("train", "BatchNorm in QAT: train (batch statistics, running statistics updated: Ultralytics) or "
                      "freeze (running statistics used and kept, after the step-0 re-estimation of qat_bn_recalib; "
                      "affine trained)", _choice("train", "freeze")),
    "qat_bn_recalib": Setting(8, "training batches on which BatchNorm statistics are re-estimated at step 0 and before each "
                              "validation, quantized runs only (0 = off: Ultralytics' running statistics)",
                              _int_range(1, 1000, True)),
    "qat_ema_tau": Setting(None, "EMA ramp time constant in optimizer updates: None (Ultralytics' 2000), auto (sized to "
                           "the run: the EMA averages about its last tenth) or a number", _ema_tau),
    # GABFusion
    "gab": Setting("off", "GABFusion at the neck Concat nodes: balanced, learned, off", _choice(*GAB_MODES)),
    "gab_beta": Setting(0.1, "EMA factor of the per-branch gradient norms (balanced)", _float_range(0.0, 1.0, lo_open=True)),
    "gab_eta": Setting(0.05, "step size of the lambda update (balanced)", _float_range(0.0)),
    "gab_eps": Setting(1e-12, "epsilon inside log(G + eps) (balanced)", _float_range(0.0, lo_open=True)),
    "gab_tau": Setting(None, "per-branch log-ratio targets tau_i (balanced; None = 0)", _float_list_or_none),
    "gab_rms": Setting(False, "use size-normalised gradient norms ||g||/sqrt(numel) (balanced)", as_bool),
    "gab_form": Setting(None, "GABFusion form: grad (forward = the Concat, gradients rescaled; default), paper "
                        "(alpha + LayerNorm in the forward); None = the form already in the model, else grad (paper "
                        "for gab=learned)", _optional_choice(*GAB_FORMS)),
    "gab_calib": Setting(True, "fit the LayerNorm affine so a GABFusion node starts close to the Concat it replaced", as_bool),
    # ADA distillation
    "ada": Setting(0.0, "ADA loss weight (0 = off; paper: 0.01)", _float_range(0.0)),
    "ada_attn": Setting("simam", "attention of ADA: simam (v1) or qada (v2)", _choice(*ADA_ATTNS)),
    "ada_div": Setting("kl", "divergence of ADA: kl (teacher||student) or js", _choice(*ADA_DIVS)),
    "ada_layers": Setting(None, "supervised layer indices (None = the head inputs: the neck outputs P3-P5)",
                          _int_list_or_none),
    "ada_t": Setting(None, "temperature of the sharper softmax(S/T) distribution (None = paper's A/sum A)", _optional_float(0.0)),
    "teacher": Setting(None, "full-precision teacher checkpoint (default: the FP .pt QAT starts from)", _path_or_none),
}

PLUGIN_DEFAULTS: dict[str, Any] = {k: s.default for k, s in SETTINGS.items()}
PLUGIN_KEYS = frozenset(SETTINGS)


def validate_settings(values: dict) -> dict:
    """Validate and normalise the plugin keys in ``values`` (other keys are Ultralytics' and are left out).

    Args:
        values (dict): Mapping of keys to values.

    Returns:
        (dict): The plugin keys present in ``values`` with normalised values.

    Raises:
        SettingsError: On a bad value, with the allowed values in the message.

    Examples:
        >>> validate_settings({"w_bits": "3"})
        Traceback (most recent call last):
        ...
        ultralytics_gabfusion.settings.SettingsError: 'w_bits='3'' must be an integer in 2..8.
    """
    return {k: SETTINGS[k].check(k, v) for k, v in values.items() if k in SETTINGS}


@dataclass(frozen=True)
class QATConfig:
    """The plugin's keys for one run, validated once (each value normalised, cross-key rules checked).

    Built from the user's keys by :meth:`from_keys` (defaults from :data:`SETTINGS`, the one place they are written);
    the model set-up (:mod:`ultralytics_gabfusion.qat_setup`) and the trainer read it by name. Field names are the
    plugin keys of :data:`SETTINGS`.

    Examples:
        >>> cfg = QATConfig.from_keys({"qat": "LSQ", "w_bits": 3, "a_bits": 3, "gab": "balanced"})
        >>> cfg.qat, cfg.w_bits, cfg.gab, cfg.quantized
        ('lsq', 3, 'balanced', True)
    """

    qat: str
    w_bits: int
    a_bits: int
    qat_first_bits: int
    qat_head_bits: int
    qat_skip: tuple | None
    qat_layer_bits: Any
    qat_bits_budget: Any
    qat_calib: int
    qat_init: str
    qat_act_grid: str
    qat_lr: float
    qat_kernel: str
    qat_bn: str
    qat_bn_recalib: int
    qat_ema_tau: Any
    gab: str
    gab_beta: float
    gab_eta: float
    gab_eps: float
    gab_tau: tuple | None
    gab_rms: bool
    gab_form: str | None
    gab_calib: bool
    ada: float
    ada_attn: str
    ada_div: str
    ada_layers: tuple | None
    ada_t: float | None
    teacher: str | None

    @classmethod
    def from_keys(cls, values) -> "QATConfig":
        """Validate the plugin keys of ``values`` (a dict or a namespace such as ``trainer.args``); defaults fill in.

        Raises:
            SettingsError: A bad value or contradicting keys, saying which key to change.
        """
        d = dict(values) if isinstance(values, dict) else dict(vars(values))
        v = {**PLUGIN_DEFAULTS, **validate_settings({k: d[k] for k in SETTINGS if k in d})}
        check_consistency(v)
        for k in ("qat_skip", "gab_tau", "ada_layers"):  # hashable and immutable, like the config itself
            v[k] = None if v[k] is None else tuple(v[k])
        return cls(**v)

    def as_dict(self) -> dict:
        """The keys and values as plain Python (lists, not tuples), as they are written to args.yaml."""
        return {f.name: list(v) if isinstance(v, tuple) else v
                for f in fields(self) for v in (getattr(self, f.name),)}

    @property
    def quantized(self) -> bool:
        """Whether convs are fake-quantized (``qat`` is not ``none``)."""
        return self.qat != "none"

    @property
    def fusion_options(self) -> dict:
        """Keyword arguments of GABFusion's balanced update (``gab_*`` keys)."""
        return {"beta": self.gab_beta, "eta": self.gab_eta, "eps": self.gab_eps,
                "tau": None if self.gab_tau is None else list(self.gab_tau), "rms": self.gab_rms}


assert [f.name for f in fields(QATConfig)] == list(SETTINGS), "QATConfig fields must be the plugin keys, in order"


def read_recipe(path) -> dict:
    """Read a ``cfg=`` recipe: a YAML file of ``key: value`` pairs (its own ``cfg`` key is ignored).

    Raises:
        FileNotFoundError: The file does not exist.
        ValueError: Not a .yaml file, not parseable, or not a mapping.

    Examples:
        >>> read_recipe("cfg/qat/w4a4-lsq.yaml")["qat"]  # doctest: +SKIP
        'lsq'
    """
    p = Path(str(path))
    hint = "Pass a recipe YAML of key: value pairs, e.g. cfg=cfg/qat/w4a4-lsq.yaml"
    if not p.is_file():
        raise FileNotFoundError(f"cfg={path}: file not found. {hint}")
    if p.suffix not in (".yaml", ".yml"):
        raise SettingsError(f"cfg={path} is not a .yaml file. {hint}")

    try:
        recipe = yaml.safe_load(p.read_text(errors="replace"))
    except yaml.YAMLError as e:
        raise SettingsError(f"cfg={path} is not valid YAML ({str(e).splitlines()[0]}). {hint}") from None
    if recipe is None:
        return {}
    if not isinstance(recipe, dict):
        raise SettingsError(f"cfg={path} holds a {type(recipe).__name__}, not key: value pairs. {hint}")
    return {k: v for k, v in recipe.items() if k != "cfg"}


def check_consistency(args) -> None:
    """Cross-key checks that a single key's validator cannot do.

    Args:
        args: Namespace or dict holding the plugin keys.

    Raises:
        ValueError: When keys contradict each other, saying which key to change.
    """
    get = args.get if isinstance(args, dict) else (lambda k, d=None: getattr(args, k, d))
    layer_bits, budget = get("qat_layer_bits"), get("qat_bits_budget")
    if isinstance(layer_bits, str) and budget is None:
        raise SettingsError(f"'qat_layer_bits={layer_bits}' (a sensitivity CSV) needs qat_bits_budget= (average bits such "
                         "as 4.5, or a model size such as 600KB).")
    if budget is not None and not isinstance(layer_bits, str):
        raise SettingsError("'qat_bits_budget' applies to qat_layer_bits=<sensitivity.csv>; pass that CSV, or drop the "
                         "budget when giving a {layer: bits} mapping.")
    if get("gab") == "learned" and get("gab_form") == "grad":
        raise SettingsError("'gab=learned' trains alpha through the forward pass, which 'gab_form=grad' leaves untouched: "
                            "use gab_form=paper with gab=learned, or gab=balanced.")
    if get("ada_attn") == "qada" and get("qat") == "none" and (get("ada") or 0) > 0:
        raise SettingsError("'ada_attn=qada' uses the student's quantizers: set qat=lsq|lsqplus|pact|n2uq or ada_attn=simam.")


def split_overrides(overrides: dict) -> tuple[dict, dict]:
    """Split a flat override dict into (plugin keys, Ultralytics keys)."""
    ours = {k: v for k, v in overrides.items() if k in PLUGIN_KEYS}
    theirs = {k: v for k, v in overrides.items() if k not in PLUGIN_KEYS}
    return ours, theirs


def strip_plugin_keys(args) -> dict:
    """Return Ultralytics-only args as a dict (for components that re-validate, such as validators)."""
    d = dict(vars(args)) if not isinstance(args, dict) else dict(args)
    return {k: v for k, v in d.items() if k not in PLUGIN_KEYS}


def help_text() -> str:
    """A table of the plugin keys with defaults, for ``yolo-gab help``."""
    width = max(len(k) for k in SETTINGS) + 2
    lines = ["Plugin keys (use as key=value, in cfg= recipes, or as Python keywords):"]
    for k, s in SETTINGS.items():
        lines.append(f"  {k:<{width}}{str(s.default):<10}{s.help}")
    return "\n".join(lines)
