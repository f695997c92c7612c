"""Deployment form of a quantized model: BatchNorm folded exactly into integer weights, quantizers as specs.

:func:`_build_export_model` deep-copies a fake-quant model and replaces every
:class:`~ultralytics_gabfusion.quant.qconv.QuantConv2d` by an :class:`_ExportConv` whose weight is the BN-folded
integer grid and whose quantizers are :mod:`.nodes` specs, built only from each quantizer's
:meth:`~ultralytics_gabfusion.quant.quantizers.FakeQuantizer.export_spec`; the copy comes back ready to trace (head
in its ONNX export mode), so :mod:`.qdq` makes one call here for the whole deployment copy.
"""

from __future__ import annotations

import copy

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from ultralytics.nn.modules import C2f, Detect
from ultralytics.nn.modules.block import DFL

from ..quant.qconv import QuantConv2d, QuantConvBlock, integer_bias, output_quantizers, quant_convs
from .nodes import _CONTAINER_RANGE, _ActSpec, _BiasSpec, _container, _GabqOp, _N2UQSpec, _WeightSpec

_ZP_TOL = 1e-4  # largest zero-point snap, in quantization steps (float rounding of the scale is ~1e-5 at 8 bits)


class _ExportConv(nn.Module):
    """Deployment form of a :class:`QuantConv2d` (BN folded, integer weights); traced with ``gabq::`` placeholders."""

    def __init__(self, conv: nn.Conv2d, weight: torch.Tensor, bias: torch.Tensor | None, act_spec=None, w_spec=None,
                 out_spec=None, b_spec=None):
        super().__init__()
        if conv.padding_mode != "zeros":
            raise ValueError(f"padding_mode={conv.padding_mode!r} is not supported by the Q/DQ exporter (zeros only).")
        self.stride, self.padding, self.dilation, self.groups = conv.stride, conv.padding, conv.dilation, conv.groups
        self.register_buffer("weight", weight.detach().float().contiguous())
        self.register_buffer("bias", None if bias is None else bias.detach().float().contiguous())
        self.act_spec, self.w_spec, self.out_spec, self.b_spec = act_spec, w_spec, out_spec, b_spec

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Quantize the input (placeholder op), dequantize the integer weight (placeholder op), convolve, quantize
        the output when the model has output quantizers (``qat_out_bits``: the Q an integer conv kernel fuses)."""
        if self.act_spec is not None:
            x = _GabqOp.apply(x, self.act_spec)
        w = _GabqOp.apply(self.weight, self.w_spec) if self.w_spec is not None else self.weight
        b = _GabqOp.apply(self.bias, self.b_spec) if self.b_spec is not None else self.bias
        y = F.conv2d(x, w, b, self.stride, self.padding, self.dilation, self.groups)
        return _GabqOp.apply(y, self.out_spec) if self.out_spec is not None else y


class _LastAxisDFL(nn.Module):
    """Ultralytics' :class:`DFL` with its softmax on the last axis: the same expectation over the ``c1`` bins.

    ``DFL`` softmaxes ``(b, c1, 4, a)`` over axis 1 and sums the bins with a fixed 1x1 conv; ONNX Runtime computes a
    softmax over a middle axis through transposes (4.4 ms of a 27 ms YOLOv5n file at 640 px on 2 CPU threads). Here
    the bins are the last axis, so the softmax is the contiguous kernel and the bin sum a ``MatMul`` with the conv's
    weights (the bin indices 0..c1-1): the same values, up to float rounding.
    """

    def __init__(self, dfl: DFL):
        super().__init__()
        self.c1 = dfl.c1
        self.register_buffer("bins", dfl.conv.weight.detach().float().reshape(dfl.c1, 1).clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Decode ``(b, 4*c1, a)`` bin logits into ``(b, 4, a)`` expected distances."""
        b, _, a = x.shape
        return (x.view(b, 4, self.c1, a).transpose(2, 3).softmax(-1) @ self.bins).view(b, 4, a)


# ----------------------------------------------------------------------------------------------------------------
# BN folding and weight specs
# ----------------------------------------------------------------------------------------------------------------
def _bn_factors(conv: nn.Conv2d, bn: nn.Module | None):
    """Return float64 (f, bias') with ``BN(conv(x) + b) == f*conv(x) + bias'`` per output channel."""
    c = conv.out_channels
    b = conv.bias.detach().double() if conv.bias is not None else torch.zeros(c, dtype=torch.float64)
    if bn is None or isinstance(bn, nn.Identity):
        return torch.ones(c, dtype=torch.float64), b
    if not isinstance(bn, nn.modules.batchnorm._BatchNorm) or not bn.track_running_stats or bn.running_var is None:
        raise ValueError(f"cannot fold {type(bn).__name__} into a quantized conv: only BatchNorm with running stats.")
    f = torch.rsqrt(bn.running_var.detach().double() + bn.eps)
    if bn.affine:
        f = f * bn.weight.detach().double()
    shift = -bn.running_mean.detach().double() * f + b * f
    if bn.affine:
        shift = shift + bn.bias.detach().double()
    return f, shift


def _weight_ints(key: str, conv: QuantConv2d):
    """``conv``'s quantized weight as integers ``k`` (float64) on the grid ``offset + k*scale`` of its export spec."""
    q = conv.weight_quant
    w = conv.weight.detach().float()
    wq = q(w).double()  # PACT/N2UQ refresh their w_scale buffer from this weight here (on the export copy)
    spec = q.export_spec(torch.float64)
    s, off = spec.scale, spec.offset
    shape = (-1,) + (1,) * (w.dim() - 1)
    k = torch.round((wq - off.view(shape)) / s.view(shape))
    err = ((k * s.view(shape) + off.view(shape)) - wq).abs().amax(dim=tuple(range(1, w.dim())))
    if spec.kind != "uniform" or bool((err > 1e-3 * s).any()) or int(k.min()) < spec.qmin or int(k.max()) > spec.qmax:
        raise RuntimeError(
            f"{key}: the weight quantizer's export_spec() does not describe its output (internal error).")
    return k, spec


@torch.no_grad()
def _weight_spec(key: str, conv: QuantConv2d, f: torch.Tensor, mode: str, int4: bool = True) -> _WeightSpec:
    """Quantize ``conv``'s weight to integers and fold the per-channel BN factor ``f`` into grid and integers."""
    k, spec = _weight_ints(key, conv)
    s, off, qmin, qmax = spec.scale, spec.offset, spec.qmin, spec.qmax
    shape = (-1,) + (1,) * (k.dim() - 1)
    big_f, neg = f.abs(), f < 0
    # Negative BN scale. Signed grids: negate the integers where -k stays in [qmin, qmax] (zero point 0, positive
    # scale), else (the channel holds qmin = -qmax - 1) keep k and give that channel a negative scale (still zero
    # point 0: INT8 kernels need zero-point-0 weights; ONNX Runtime and OpenVINO take negative per-channel scales).
    # Unsigned grids: mirror the grid, k' = qmin + qmax - k, keeping k in [qmin, qmax] and the scale positive.
    fits = (-k).amax(dim=tuple(range(1, k.dim()))) <= qmax
    negate, flip_scale = (neg & fits, neg & ~fits) if qmin < 0 else (torch.zeros_like(neg), torch.zeros_like(neg))
    mirror = neg & ~negate & ~flip_scale
    k2 = torch.where(negate.view(shape), -k, torch.where(mirror.view(shape), qmin + qmax - k, k))
    off2 = torch.where(mirror, -big_f * (off + (qmin + qmax) * s), f * off)
    s2 = torch.where(flip_scale, f * s, big_f * s)
    dead = s2 == 0  # gamma == 0: the channel outputs exactly its bias
    s2 = torch.where(dead, s, s2)
    off2 = torch.where(dead, torch.zeros_like(off2), off2)
    # Zero point in steps. Snapping it to an integer (or half-integer) moves the grid by at most ZP_TOL of a step:
    # float32 scales such as 2M/255 make DoReFa's L/2 come out as 127.50001.
    z = -off2 / s2
    zr = torch.round(z)
    offset = None
    if bool(((z - zr).abs() <= _ZP_TOL).all()) and int(zr.min()) >= qmin and int(zr.max()) <= qmax:
        ints, zp, scale, qrange, used = k2, zr, s2, (qmin, qmax), "zero_point"
    elif mode == "widen" and bool(((2 * z - torch.round(2 * z)).abs() <= 2 * _ZP_TOL).all()):
        z2 = torch.where(dead, torch.full_like(z, float(qmin + qmax)), torch.round(2 * z))  # dead: any in-range z
        ints = 2 * k2 - z2.view(shape)
        zp, scale, used = torch.zeros_like(z2), s2 / 2, "widen"
        qrange = (int(2 * qmin - z2.max()), int(2 * qmax - z2.min()))
    else:
        ints, zp, scale, qrange, used, offset = k2, torch.zeros_like(z), s2, (qmin, qmax), "add", off2
    ints = torch.where(dead.view(shape), zp.view(shape), ints)
    container = _container(qrange[0], qrange[1], spec.bits if used != "widen" and int4 else None)
    return _WeightSpec(
        key=key, bits=spec.bits, ints=ints.to(torch.int64).numpy(), scale=scale.float().numpy(),
        zp=zp.to(torch.int64).numpy(), offset=None if offset is None else offset.float().numpy(),
        container=container, qrange=qrange, mode=used,
    )


# ----------------------------------------------------------------------------------------------------------------
# Activation specs
# ----------------------------------------------------------------------------------------------------------------
@torch.no_grad()
def _act_spec(key: str, conv: QuantConv2d, int4: bool = True):
    """The :mod:`.nodes` spec of ``conv``'s input quantizer: thresholds (nonuniform) or a per-tensor Q/DQ grid."""
    q = conv.act_quant
    spec = q.export_spec(torch.float32)
    if spec.kind == "nonuniform":
        shift = None if conv.input_shift is None else float(conv.input_shift.detach().float().reshape(()))
        return _N2UQSpec(key=key, bits=spec.bits, beta1=float(spec.input_scale.reshape(())),
                         thresholds=spec.thresholds.float().numpy().copy(), out_scale=float(spec.scale.reshape(())),
                         shift=shift)
    if conv.input_shift is not None:  # only N2UQ has one today; keep the function exact if that changes
        raise ValueError(f"{key}: input_shift on a non-N2UQ quantizer is not supported by the Q/DQ exporter.")
    return _uniform_spec(key, q, spec, int4)


def _uniform_spec(key: str, q, spec, int4: bool = True) -> _ActSpec:
    """Per-tensor Q/DQ spec of a uniform activation quantizer ``q`` (conv input or output), its export ``spec``."""
    if spec.axis is not None and spec.scale.numel() > 1:
        raise ValueError(f"{key}: per-channel activation quantizers are not supported by the Q/DQ exporter.")
    lo, hi = spec.qmin, spec.qmax
    bits = spec.bits
    container = ("INT4" if lo < 0 else "UINT4") if bits == 4 and int4 else ("INT8" if lo < 0 else "UINT8")
    scale, offset = float(spec.scale.reshape(())), float(spec.offset.reshape(()))
    # An offset on a multiple of the step (snap_zero_points) is an integer zero point: no float Sub/Add needed.
    z = round(-offset / scale)
    c_lo, c_hi = _CONTAINER_RANGE[container]
    if offset != 0.0 and abs(offset + z * scale) <= _ZP_TOL * scale and c_lo <= z <= c_hi:
        offset, zp = 0.0, z
    else:
        zp = 0
    return _ActSpec(key=key, method=q.method, bits=bits, scale=scale, offset=offset, qmin=lo, qmax=hi,
                    container=container, zero_point=zp)


# ----------------------------------------------------------------------------------------------------------------
# Export model
# ----------------------------------------------------------------------------------------------------------------
def _check_initialized(model: nn.Module) -> None:
    """Raise if any quantizer was never initialised (its grid would be the constructor's placeholder)."""
    missing = []
    for name, m in quant_convs(model):
        for role, q in (("weight", m.weight_quant), ("act", m.act_quant)):
            if q is not None and not bool(q.initialized):
                missing.append(f"{name}.{role}_quant")
    missing += [f"{name}.out_quant" for name, _, q in output_quantizers(model) if not bool(q.initialized)]
    if missing:
        raise ValueError(
            f"{len(missing)} quantizer(s) were never initialised ({', '.join(missing[:4])}{' ...' if len(missing) > 4 else ''}): "
            "calibrate (quant.convert.calibrate_activations) or train the model before exporting."
        )


def _layer_row(name: str, conv: QuantConv2d, bn, a_spec, w_spec, o_spec=None) -> dict:
    """One row of the export's per-layer summary (returned and stored in the ``quantization`` metadata)."""
    return {
        "name": name,
        "method": conv.method or "fp",
        "w_bits": conv.w_bits,
        "a_bits": conv.a_bits,
        "bn_folded": bn is not None and not isinstance(bn, nn.Identity),
        "weight": w_spec.describe() if w_spec else "float initializer",
        "weight_range": list(w_spec.qrange) if w_spec else None,
        "act": a_spec.describe() if a_spec else "float",
        "out": o_spec.describe() if o_spec else "float",
    }


def _convert_conv(name: str, conv: QuantConv2d, bn, weight_offset: str, specs: dict, rows: list,
                  int4: bool = True, out_quant=None) -> _ExportConv:
    """The :class:`_ExportConv` of ``conv`` (``bn`` folded in, ``out_quant`` on its output); records its specs and
    summary row."""
    f, bias = _bn_factors(conv, bn)
    a_spec = _act_spec(name + ".act", conv, int4) if conv.act_quant is not None else None
    o_spec = None
    if out_quant is not None:
        o_spec = _uniform_spec(name + ".out", out_quant, out_quant.export_spec(torch.float32), int4)
    if conv.weight_quant is not None:
        w_spec = _weight_spec(name + ".weight", conv, f, weight_offset, int4)
        weight = w_spec.dequantized()
    else:
        w_spec = None
        weight = (conv.weight.detach().double() * f.view(-1, 1, 1, 1)).float()
    if a_spec is None and conv.input_shift is not None:
        raise ValueError(f"{name}: input_shift without an activation quantizer cannot be exported.")
    b_spec = None
    if o_spec is not None:  # integer kernel: int32 bias on the accumulator's scale, as the fake-quant model rounds it
        if not (isinstance(a_spec, _ActSpec) and a_spec.offset == 0.0 and w_spec is not None and w_spec.mode == "zero_point"):
            raise ValueError(f"{name}: a quantized conv output needs integer zero points on the conv's input and weight "
                             "grids (qat_act_zp=integer, LSQ or LSQ+).")
        exact, step = integer_bias(conv, bn)
        k = torch.round(exact / step)
        sign = torch.from_numpy(np.sign(w_spec.scale)).double()  # a negative weight scale (BN gamma < 0) flips it
        b_spec = _BiasSpec(key=name + ".bias", ints=(k * sign).to(torch.int64).numpy(), scale=(step * sign).float().numpy())
        bias = k * step
    for s in (a_spec, w_spec, o_spec, b_spec):
        if s is not None:
            specs[s.key] = s
    rows.append(_layer_row(name, conv, bn, a_spec, w_spec, o_spec))
    return _ExportConv(conv, weight, bias.float(), a_spec, w_spec, o_spec, b_spec)


def _build_export_model(model: nn.Module, imgsz: tuple[int, int], weight_offset: str, int4: bool = True):
    """Deep copy of ``model`` with BN folded and every QuantConv2d replaced by an :class:`_ExportConv`, ready to trace.

    ``int4=False`` stores 4-bit integers in 8-bit containers (with the range ``Clip``), which INT8 kernels execute.
    The copy is prepared for tracing at ``imgsz`` (``(h, w)``) by :func:`_prepare_for_onnx`.

    Returns:
        (tuple): the prepared copy, ``{spec key: spec}`` of its quantizers and the per-layer summary rows.
    """
    _check_head(model)
    m = copy.deepcopy(model).float().eval()
    for p in m.parameters():
        p.requires_grad_(False)
    specs, rows = {}, []
    # Blocks first (their conv carries the BN), then the raw quantized convs (Detect predictors).
    for name, mod in list(m.named_modules()):
        if isinstance(mod, QuantConvBlock) and isinstance(mod.conv, QuantConv2d):
            mod.conv = _convert_conv(f"{name}.conv", mod.conv, mod.bn, weight_offset, specs, rows, int4,
                                     getattr(mod, "out_quant", None))
            mod.bn, mod.out_quant = nn.Identity(), None  # both now inside the _ExportConv
    for name, mod in list(m.named_modules()):
        for child_name, child in list(mod.named_children()):
            if isinstance(child, QuantConv2d):
                full = f"{name}.{child_name}" if name else child_name
                new = _convert_conv(full, child, None, weight_offset, specs, rows, int4, getattr(child, "out_quant", None))
                for a in ("i", "f", "type", "np"):
                    if hasattr(child, a):
                        setattr(new, a, getattr(child, a))
                setattr(mod, child_name, new)
    rows.sort(key=lambda r: _natural_key(r["name"]))
    return _prepare_for_onnx(m, imgsz), specs, rows


def _natural_key(name: str):
    return [int(t) if t.isdigit() else t for t in name.split(".")]


def _prepare_for_onnx(m: nn.Module, imgsz: tuple[int, int]) -> nn.Module:
    """Fuse remaining float Conv+BN and set the head's export attributes as Ultralytics' ONNX exporter does.

    Detect and its subclasses Segment / Pose (and their YOLO26 forms) then output what ``format=onnx`` writes:
    ``(1, 4+nc+extra, anchors)`` (extra: the ``nm`` mask coefficients or the ``nk`` decoded keypoints), and for
    Segment also the mask prototypes ``(1, nm, h/4, w/4)``. The box decoder's DFL is written in the form ONNX
    Runtime runs fastest (:class:`_LastAxisDFL`).
    """
    if hasattr(m, "fuse"):
        m = m.fuse(verbose=False)
    stride = m.stride.tolist() if hasattr(m, "stride") else [32]
    for mod in list(m.modules()):  # a list: the DFL child is replaced on the way
        if isinstance(mod, Detect):
            mod.dynamic = False
            mod.export = True
            mod.format = "onnx"
            mod.xyxy = False
            mod.shape = None
            mod.max_det = min(300, sum(int(imgsz[0] / s) * int(imgsz[1] / s) for s in stride))
            mod.agnostic_nms = False
            if isinstance(getattr(mod, "dfl", None), DFL):
                mod.dfl = _LastAxisDFL(mod.dfl)
        elif isinstance(mod, C2f):
            mod.forward = mod.forward_split  # Ultralytics' ONNX graph uses Split instead of Chunk (same values)
    return m


# ----------------------------------------------------------------------------------------------------------------
# Task heads
# ----------------------------------------------------------------------------------------------------------------
def _check_head(model: nn.Module) -> None:
    """Refuse heads whose ONNX output the exporter and its parity check do not describe (end-to-end heads)."""
    if bool(getattr(model, "end2end", False)):
        raise ValueError(
            f"{type(model.model[-1]).__name__} is in end-to-end (NMS-free) mode, which the Q/DQ exporter does not "
            "support: set model.end2end = False to export the one-to-many head (decoded anchors, NMS at inference)."
        )
