"""Activation grids: decide per conv whether its input needs a signed or an unsigned integer grid.

Almost every conv input of a YOLO model is a SiLU output, or a concat / upsample / max-pool / residual sum of SiLU
outputs, bounded below by SiLU's minimum -0.2785. A signed b-bit grid spends half its levels on negative values that
hardly occur there; an unsigned grid puts all ``2^b`` levels on ``[0, max]`` (measured in docs/RESULTS.md). Inputs
that really are signed (a GABFusion/LayerNorm output, a conv without activation, an attention product) keep a signed
grid.

What feeds a conv is found by :func:`input_lower_bounds`: one small forward pass in which every tensor carries a lower
bound that is propagated through the ops of the forward (a ``TorchFunctionMode``), so the internals of C3, C2f,
C3k2, SPPF, C2PSA and any other block are covered without per-block rules:

- the image: 0 (preprocessed images are in [0, 1]);
- ``silu`` -> :data:`SILU_MIN`, ``relu``/``relu6``/``sigmoid``/``hardsigmoid`` -> 0, ``hardswish`` -> -0.375,
  ``gelu`` -> :data:`GELU_MIN`;
- ``cat``/``stack`` -> the smallest bound of the parts; ``a + b`` -> the sum of the bounds;
- views, slices, chunks, padding with 0, nearest/bilinear upsampling, max-pooling, copies -> the input's bound;
- anything else (conv, BatchNorm, LayerNorm, products, ...) -> unbounded (signed).

``qat_act_grid=auto`` (the default) gives an unsigned grid to every input with a finite lower bound and a signed
grid to the others; ``signed`` / ``unsigned`` force one grid everywhere (the first conv reads the image and is always
unsigned). LSQ+ and N2UQ learn an offset on top of the grid, so for them the grid only moves where the levels start.
LSQ and PACT have none; on an unsigned grid they get a fixed offset ``b = max(lower bound, SILU_MIN)`` (levels
``b + k*s``), so the negative SiLU tail -- 45% of the values of a trained YOLOv5n's conv inputs -- is represented
instead of clipped to 0 (:func:`fixed_offset`; measured in docs/RESULTS.md: 0.29x the quantization MSE of the
signed grid at 4 bits, against 0.80x for a plain unsigned grid).

Integer zero points (:func:`snap_zero_points`): integer kernels (OpenVINO's INT8 convolutions, onnxruntime's
QLinearConv) take an activation grid ``offset + k*s`` only when ``offset = -z*s`` for an integer zero point ``z``.
The SiLU offset is not a multiple of the step, so for deployment each movable offset is rounded to the nearest
multiple: every level moves by less than half a step (measured in docs/RESULTS.md). ``qat_act_zp=integer`` trains
on those rounded offsets instead (:func:`.quantizers.integer_offset`), so the snap finds nothing to move.

Examples:
    >>> from ultralytics.nn.tasks import DetectionModel
    >>> from ultralytics_gabfusion.quant.grids import input_lower_bounds
    >>> model = DetectionModel("yolov5n.yaml", verbose=False)
    >>> bounds = input_lower_bounds(model)
    >>> bounds["model.0.conv"], round(bounds["model.1.conv"], 4)
    (0.0, -0.2785)
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from ..settings import ACT_GRIDS  # the one list, validated there
from .probe import conv_hooks, probe_image
from .quantizers import FakeQuantizer

__all__ = ["ACT_GRIDS", "SILU_MIN", "GELU_MIN", "input_lower_bounds", "grid_signed", "fixed_offset", "snap_zero_points"]
OFFSET_METHODS = ("lsq", "pact")  # methods without a learnable offset: their unsigned grid gets a fixed one

SILU_MIN = -0.2784645427610738  # min_x x*sigmoid(x), at x = -1.2785
GELU_MIN = -0.16997120747  # min_x x*Phi(x), at x = -0.7518
UNBOUNDED = -math.inf

# Ops whose output is bounded below by a constant whatever the input.
_ACTIVATION_MIN = {
    F.silu: SILU_MIN,
    torch.sigmoid: 0.0,
    torch.Tensor.sigmoid: 0.0,
    F.sigmoid: 0.0,
    F.relu: 0.0,
    torch.relu: 0.0,
    torch.Tensor.relu: 0.0,
    F.relu6: 0.0,
    F.hardsigmoid: 0.0,
    F.hardswish: -0.375,
    F.gelu: GELU_MIN,
}
# Ops whose output only rearranges, selects, copies, max-pools or convexly interpolates input values: same bound.
_SAME_BOUND = {
    torch.Tensor.view, torch.Tensor.reshape, torch.reshape, torch.Tensor.flatten, torch.flatten,
    torch.Tensor.permute, torch.permute, torch.Tensor.transpose, torch.transpose, torch.Tensor.contiguous,
    torch.Tensor.clone, torch.clone, torch.Tensor.to, torch.Tensor.float, torch.Tensor.half, torch.Tensor.detach,
    torch.Tensor.__getitem__, torch.Tensor.chunk, torch.chunk, torch.Tensor.split, torch.split,
    torch.Tensor.unbind, torch.unbind, torch.Tensor.expand, torch.Tensor.repeat, torch.Tensor.squeeze,
    torch.squeeze, torch.Tensor.unsqueeze, torch.unsqueeze, torch.Tensor.type_as,
    F.max_pool2d, F.max_pool1d, F.adaptive_max_pool2d, F.avg_pool2d, F.adaptive_avg_pool2d, F.interpolate,
    torch.Tensor.mean, torch.mean, torch.Tensor.amax, torch.amax,
}
_JOIN = {torch.cat, torch.concat, torch.stack}
_ADD = {torch.add, torch.Tensor.add, torch.Tensor.__add__, torch.Tensor.__radd__}


class _BoundTracker(TorchFunctionMode):
    """Attach a lower bound to every tensor produced inside the mode; see the module docstring for the rules."""

    def __init__(self):
        super().__init__()
        self.bounds: dict[int, tuple[torch.Tensor, float]] = {}  # id -> (tensor kept alive so ids stay unique, lb)

    def set(self, t, lb: float) -> None:
        if isinstance(t, torch.Tensor):
            self.bounds[id(t)] = (t, lb)
        elif isinstance(t, (list, tuple)):
            for x in t:
                self.set(x, lb)

    def get(self, t) -> float:
        if isinstance(t, torch.Tensor):
            entry = self.bounds.get(id(t))
            return entry[1] if entry is not None and entry[0] is t else UNBOUNDED
        if isinstance(t, (int, float)):
            return float(t)
        if isinstance(t, (list, tuple)) and t:
            return min(self.get(x) for x in t)
        return UNBOUNDED

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func in _ACTIVATION_MIN:
            lb = _ACTIVATION_MIN[func]
        elif func in _SAME_BOUND:
            lb = self.get(args[0]) if args else UNBOUNDED
            if func is F.interpolate and kwargs.get("mode", args[3] if len(args) > 3 else "nearest") not in (
                "nearest", "bilinear", "linear", "area", "nearest-exact"
            ):
                lb = UNBOUNDED  # bicubic overshoots
        elif func in _JOIN:
            lb = self.get(args[0] if args else kwargs.get("tensors", ()))
        elif func in _ADD and len(args) >= 2 and "alpha" not in kwargs:
            lb = self.get(args[0]) + self.get(args[1])
        elif func is F.pad:
            value = kwargs.get("value", args[3] if len(args) > 3 else 0.0) or 0.0
            mode = kwargs.get("mode", args[2] if len(args) > 2 else "constant")
            lb = min(self.get(args[0]), value) if mode == "constant" else self.get(args[0])
        else:
            lb = UNBOUNDED
        if lb != UNBOUNDED:
            self.set(out, lb)
        return out


@torch.no_grad()
def input_lower_bounds(model: nn.Module, imgsz: int = 64) -> dict[str, float]:
    """Lower bound of the input of every ``nn.Conv2d`` in ``model``, by one bound-propagating forward pass.

    The model runs once in eval mode on a ``(1, ch, imgsz, imgsz)`` image in [0, 1] (BatchNorm statistics and
    training-only state are untouched; the train/eval flags are restored).

    Args:
        model (nn.Module): An Ultralytics model (before or after quantization).
        imgsz (int): Side of the probe image; a multiple of the model stride.

    Returns:
        (dict[str, float]): ``{conv module name: lower bound}``; ``-inf`` for signed (unbounded) inputs. Convs that
        did not run in the probe are absent.
    """
    tracker = _BoundTracker()
    found: dict[str, float] = {}

    def record(name):
        def hook(module, args):  # returns None: the input is not replaced
            found.setdefault(name, tracker.get(args[0]))

        return hook

    with conv_hooks(model, record, pre=True):
        img = probe_image(model, imgsz, 0.5)
        with tracker:
            tracker.set(img, 0.0)
            model(img)
    return found


def grid_signed(mode: str, lower_bound: float, role: str = "conv") -> bool:
    """Whether an activation grid is signed, for ``qat_act_grid=mode`` and the input's lower bound.

    Args:
        mode (str): ``auto``, ``signed`` or ``unsigned``.
        lower_bound (float): From :func:`input_lower_bounds` (``-inf``: unbounded or unknown).
        role (str): ``first`` (reads the image: always unsigned), ``conv`` or ``head``.

    Returns:
        (bool): True for a signed grid.

    Examples:
        >>> grid_signed("auto", SILU_MIN), grid_signed("auto", float("-inf")), grid_signed("signed", 0.0, "first")
        (False, True, False)
    """
    if mode not in ACT_GRIDS:
        raise ValueError(f"qat_act_grid={mode!r} is not valid. Allowed values: {', '.join(ACT_GRIDS)}.")
    if role == "first":
        return False
    if mode == "auto":
        return not math.isfinite(lower_bound)
    return mode == "signed"


def fixed_offset(method: str, signed: bool, lower_bound: float) -> float:
    """The constant grid offset of an LSQ/PACT activation quantizer (0.0 for signed grids and other methods).

    ``max(lower_bound, SILU_MIN)``: the input's lower bound (0 after ReLU), but no lower than SiLU's minimum, which
    residual sums of SiLU outputs can in principle pass but in practice hardly do (the measurement in
    docs/RESULTS.md includes those layers). Unbounded inputs forced onto an unsigned grid get ``SILU_MIN``.

    Examples:
        >>> fixed_offset("lsq", False, 2 * SILU_MIN) == SILU_MIN, fixed_offset("pact", False, 0.0)
        (True, 0.0)
        >>> fixed_offset("lsqplus", False, SILU_MIN), fixed_offset("lsq", True, SILU_MIN)
        (0.0, 0.0)
    """
    if signed or method not in OFFSET_METHODS:
        return 0.0
    return float(max(lower_bound, SILU_MIN))


@torch.no_grad()
def snap_zero_points(model: nn.Module) -> list[dict]:
    """Round every movable activation-grid offset to a multiple of its step, in place: ``b -> -z*s``, z integer.

    The grid ``b + k*s`` then equals ``(k' - z)*s`` with ``k' = k`` (unsigned grids: ``k'`` in ``[0, 2^b-1]``), which
    is exactly ``QuantizeLinear``/``DequantizeLinear`` with zero point ``z``: no float ``Sub``/``Add`` around them, so
    runtimes can run the conv on the integers. Only the offset moves (by at most half a step); scales and ranges stay.
    Grids already on an integer zero point (offset 0 included; every grid of a model trained with
    ``qat_act_zp=integer``, whose forward uses exactly these offsets) are left as they are and not reported; grids
    that cannot move (signed PACT under ``qat_act_zp=float``, whose zero point is ``(2^b-1)/2``; N2UQ thresholds)
    are reported with ``snapped=None``.

    Args:
        model (nn.Module): A quantized model (quantizers initialised); typically a deployment copy.

    Returns:
        (list[dict]): One row per activation grid with a non-integer zero point: ``name``, ``method``, ``offset``
        (before), ``snapped`` (after, or None), ``zero_point`` (``z``), ``shift_steps`` (``(after - before)/s``).

    Examples:
        >>> from ultralytics_gabfusion.quant.lsq import LSQQuantizer
        >>> q = LSQQuantizer("act", 8, signed=False, fixed_offset=SILU_MIN); _ = q.step.data.fill_(0.05)
        >>> holder = nn.Module(); holder.act_quant = q
        >>> row = snap_zero_points(holder)[0]
        >>> row["zero_point"], round(q.fixed_offset, 4)
        (6, -0.3)
    """
    rows = []
    for name, m in model.named_modules():
        q = getattr(m, "act_quant", None)
        if not isinstance(q, FakeQuantizer) or q.role != "act":
            continue
        spec = q.export_spec(torch.float64)
        if spec.kind != "uniform" or spec.scale.numel() != 1:
            continue
        s, b = float(spec.scale), float(spec.offset)
        z = round(-b / s)
        if abs(b + z * s) <= 1e-6 * s * max(1, abs(z)):  # on a multiple up to the float32 rounding of z*s
            continue
        new = -z * s
        ok = q.set_grid_offset(new)
        rows.append({"name": name, "method": q.method, "offset": b, "snapped": new if ok else None, "zero_point": z,
                     "shift_steps": (new - b) / s})
    return rows
