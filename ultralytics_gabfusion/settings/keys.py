"""The plugin key table: each key's default, help text and validator, and :func:`validate_settings`."""

from __future__ import annotations

import ast
import difflib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from .base import (
    ACT_GRIDS,
    ACT_ZPS,
    ADA_ATTNS,
    ADA_DIVS,
    GAB_FORMS,
    GAB_MODES,
    MAX_BITS,
    MIN_BITS,
    QAT_KERNELS,
    QAT_METHODS,
    SettingsError,
)
from .values import as_bool, as_float, as_int, check_bits, parse_bits_budget


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


def _out_bits(key, v):
    """``qat_out_bits``: 0 (off) or 8 (the output type of integer conv kernels)."""
    try:
        bits = as_int(key, int(v) if isinstance(v, str) and v.strip().lstrip("-").isdigit() else v, 0, 8, True)
    except SettingsError:
        bits = None
    if bits not in (0, 8):
        raise SettingsError(f"'{key}={v}' is not valid: use 0 (off) or 8 (an 8-bit quantizer on each quantized conv's "
                            "output, the grid ONNX Runtime's integer convolutions write).")
    return bits


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
    "qat_act_zp": Setting("integer", "activation grid offsets (LSQ+ beta, the LSQ/PACT SiLU offset, signed PACT): "
                          "integer (rounded to a multiple of the step in every forward: integer zero points, the grid "
                          "OpenVINO's INT8 kernels execute) or float (trained as they are; snapped only at export)",
                          _choice(*ACT_ZPS)),
    "qat_out_bits": Setting(0, "0 (off) or 8: an 8-bit quantizer on the output of every quantized conv (after BatchNorm, "
                            "before the activation), so ONNX Runtime runs the exported convs as integer QLinearConv",
                            _out_bits),
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
# Plugin keys added after 0.1 with the behaviour of the runs and checkpoints saved before them: Ultralytics' BatchNorm
# statistics (no re-estimation), float activation offsets, no conv output quantizers.
KEYS_BEFORE_THEY_EXISTED = {"qat_bn_recalib": 0, "qat_act_zp": "float", "qat_out_bits": 0}


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


def help_text() -> str:
    """A table of the plugin keys with defaults, for ``yolo-gab help``."""
    width = max(len(k) for k in SETTINGS) + 2
    lines = ["Plugin keys (use as key=value, in cfg= recipes, or as Python keywords):"]
    for k, s in SETTINGS.items():
        lines.append(f"  {k:<{width}}{str(s.default):<10}{s.help}")
    return "\n".join(lines)
