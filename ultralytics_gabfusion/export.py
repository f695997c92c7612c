"""Q/DQ ONNX export of fake-quantized (LSQ, LSQ+, PACT/DoReFa, N2UQ) Ultralytics detection models.

A QAT checkpoint evaluates its quantizers in float ("fake quantization"). Exporting it with Ultralytics' own
exporter would trace that float arithmetic and lose the integer grids, so quantized models get their own ONNX
path here; full-precision models are handed to Ultralytics unchanged (:func:`export_main`).

What :func:`export_qdq_onnx` does:

1. Deep-copies the model (the caller's model is never modified), puts it in eval mode and checks that every
   quantizer was initialised (calibrated / trained).
2. Folds every BatchNorm into its :class:`~ultralytics_gabfusion.quant.qconv.QuantConv2d` *exactly*: with
   ``f_c = gamma_c / sqrt(var_c + eps)`` the quantized weight ``W_c = off_c + k*s_c`` becomes
   ``f_c*W_c = F_c*off_c + k*(F_c*s_c)`` with ``F_c = |f_c|``. A negative ``f_c`` is moved into the integers by
   mirroring the grid, ``k' = qmin + qmax - k`` (always inside ``[qmin, qmax]``, also for the asymmetric signed
   range ``[-8, 7]``), ``off'_c = -F_c*(off_c + (qmin+qmax)*s_c)``; the bias becomes
   ``beta - mu*f + b*f``. Scales stay positive. Weights are quantized to integers offline.
3. Replaces each quantized conv by a module whose input/weight quantizers are traced as custom ``gabq::`` nodes
   (the installed torch's TorchScript exporter stops at opset 20 and cannot emit INT4), exports with
   ``torch.onnx.export(..., dynamo=False, opset_version=20)`` and lowers the ``gabq::`` nodes to standard ONNX
   opset-21 operators with the ``onnx`` package (below). The other opset-20 operators of the graph have the same
   semantics at opset 21 (opset 21 only added INT4/UINT4/float8 types to them), so the opset import is raised.
4. Runs ``onnx.checker`` (full check with shape inference) and, with ``check=True``, :func:`check_parity` against the
   original fake-quant PyTorch model. The file is written under a temporary name in the target directory and
   renamed only after both passed.

Emitted operators (``b`` = bits; container = element type of the tensor holding the integers; Q/DQ =
``QuantizeLinear``/``DequantizeLinear``):

* **Weights, every method**: ``DequantizeLinear(k, scale[C], zero_point[C], axis=0) -> Conv``, ``k`` an
  initializer. Container ``INT4``/``UINT4`` for b=4, ``INT8``/``UINT8`` for b=8 and for b in 2, 3, 5, 6, 7 (the
  integers are checked to lie in the b-bit range ``[qmin, qmax]`` at export; the range is recorded per layer in the
  ``quantization`` metadata). LSQ/LSQ+ grids (``k*s``, signed) are exact with integer zero points: 0, or -1 on
  channels whose BN scale is negative (mirrored grid).
* **DoReFa (PACT) and N2UQ weights**: their grid ``-M + k*2M/L`` (``L = 2^b-1``) has no zero level, so its zero
  point ``L/2`` is not an integer. ``weight_offset="add"`` (default) keeps the b-bit storage:
  ``DequantizeLinear(k UINT4|UINT8, scale, 0, axis=0) -> Add(offset[C,1,1,1]) -> Conv``. ``weight_offset="widen"``
  stores ``2k - L`` in ``[-L, L]`` (b+1 bits: ``INT8``, ``INT16`` for b=8) with ``scale/2`` and zero point 0, a
  plain ``DequantizeLinear -> Conv`` that Q/DQ-fusing runtimes recognise.
* **LSQ and canonical PACT activations** (offset 0): ``QuantizeLinear(x, s, 0) -> DequantizeLinear(., s, 0)``,
  per tensor; ``INT4``/``UINT4`` for b=4, ``INT8``/``UINT8`` for b=8; for b in 2, 3, 5, 6, 7 an 8-bit container
  with ``Clip(q, qmin, qmax)`` on the integers between Q and DQ (Q alone saturates to the container range only).
  ``QuantizeLinear`` divides by the scale and rounds half to even, exactly like the PyTorch forward.
* **LSQ+, signed PACT, and LSQ/PACT on a SiLU-offset grid** (``qat_act_grid``): their float offsets (``beta``,
  ``-alpha``, the fixed ``-0.2785``) are not integer zero points: ``Sub(x, offset) -> QuantizeLinear -> [Clip] ->
  DequantizeLinear -> Add(offset)``, same containers (``UINT4``/``UINT8`` with zero point 0 for unsigned grids).
* **N2UQ activations**: ``count = sum_i (beta1*x > T_i)`` over the 2^b-1 learned thresholds (compared in the
  ``beta1``-scaled domain exactly as the PyTorch forward, ``torch.bucketize``: ``x == T`` does not count), output
  ``count*Delta*beta2 + input_shift``. For b <= 4: ``Mul(beta1) -> Unsqueeze(-1) -> Greater(T[L]) -> Cast(INT32)
  -> ReduceSum(-1)``; for b >= 5, where that broadcast would hold 2^b-1 copies of the tensor, a branchless binary
  search over the sorted thresholds: ``Greater -> Cast -> Mul`` for the first step, then ``b-1`` rounds of
  ``Add -> Gather(T) -> Greater -> Where`` on an INT64 position. Both end in ``Cast(UINT4|UINT8) ->
  DequantizeLinear(count, Delta*beta2, 0) -> Add(input_shift)``, so the integer level is explicit in the graph.

GABFusion nodes are exported as traced float operators (softmax-weighted ``Concat`` and the channel LayerNorm
as ``ReduceMean``/``Sub``/``Mul``/``Sqrt``/``Div`` ...); a model already folded with ``fold_gabfusion`` exports its
``FoldedFusion`` affine as ``Mul``/``Add``. The Detect head is exported as Ultralytics does for ``format=onnx``
(decoded boxes, output ``(1, 4+nc, anchors)``, batch 1, static shape), and Ultralytics' metadata keys are stored
in ``metadata_props`` (plus ``quantization``, a JSON summary), so ``YOLO("model.onnx")`` predicts and validates
through ONNX Runtime.

Examples:
    >>> from ultralytics_gabfusion.export import export_qdq_onnx
    >>> info = export_qdq_onnx("runs/qat/weights/best.pt", "best-w4a4.onnx", imgsz=640, images="data.yaml")  # doctest: +SKIP
    >>> info["parity"]["ok"]  # doctest: +SKIP
    True
"""

from __future__ import annotations

import copy
import io
import json
import math
import os
import sys
import warnings
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .quant.qconv import QuantConv2d, QuantConvBlock, is_quantized, quant_convs

__all__ = [
    "ParityError",
    "PARITY_DEFAULTS",
    "SUPPORTED_OPSETS",
    "check_parity",
    "export_main",
    "export_qdq_onnx",
    "generated_images",
    "load_images",
    "load_quantized_model",
]

# ONNX opsets this exporter writes: INT4/UINT4 tensors need opset 21; later opsets are not verified here.
SUPPORTED_OPSETS = (21,)
_TRACE_OPSET = 20  # highest opset of torch's TorchScript ONNX exporter; raised to 21 after lowering
_DOMAIN = "gabq"  # private domain of the placeholder nodes; none survives lowering

# Parity tolerance of check_parity (see its docstring for the reasoning behind each number).
PARITY_DEFAULTS = {
    "conf": 0.25,  # confident anchors / detections: score >= conf (Ultralytics' predict threshold)
    "top_k": 20,  # and at least the top_k anchors of each image, so an untrained model is compared too
    "iou": 0.7,  # a confident detection is reproduced at its anchor if same-class score within margin and IoU > iou
    "margin": 0.1,
    "nms_iou": 0.7,  # Ultralytics' default NMS IoU
    "ref_eps": 1e-5,  # relative size of the reference perturbation (float32 rounding is ~6e-8)
    "ref_runs": 2,  # perturbed reference runs; the spread allowed is the largest of them
    "ratio": 2.0,  # ONNX may differ from PyTorch by at most ratio x the reference spread ...
    "floor": 1e-3,  # ... plus this floor (score units / 1 - IoU), for models the perturbation does not move
    "layer_eps": 1e-6,  # relative input perturbation of the layer-local reference (float32 rounding is ~6e-8)
    "layer_floor": 1e-3,  # layer-local: fraction of activation elements / relative conv-output error always allowed
}

_IMG_SUFFIXES = {".bmp", ".dng", ".jpeg", ".jpg", ".mpo", ".png", ".tif", ".tiff", ".webp", ".pfm", ".heic"}


class ParityError(RuntimeError):
    """The exported ONNX model disagrees with the fake-quant PyTorch model beyond the documented tolerance."""


def _log(msg: str, verbose: bool = True) -> None:
    if verbose:
        from ultralytics.utils import LOGGER

        LOGGER.info(msg)


# ----------------------------------------------------------------------------------------------------------------
# Integer containers
# ----------------------------------------------------------------------------------------------------------------
def _tp():
    import onnx

    return onnx.TensorProto


# name -> (lo, hi) of the container's integer range
_CONTAINER_RANGE = {
    "INT4": (-8, 7),
    "UINT4": (0, 15),
    "INT8": (-128, 127),
    "UINT8": (0, 255),
    "INT16": (-32768, 32767),
    "UINT16": (0, 65535),
}


def _container(lo: int, hi: int, bits: int | None) -> str:
    """Smallest standard container for integers in ``[lo, hi]``: 4-bit types only for 4-bit grids, else 8/16 bit."""
    if bits == 4:
        if lo >= -8 and hi <= 7:
            return "INT4"
        if lo >= 0 and hi <= 15:
            return "UINT4"
    if lo < 0:
        return "INT8" if lo >= -128 and hi <= 127 else "INT16"
    return "UINT8" if hi <= 255 else "UINT16"


def _int_tensor(name: str, container: str, values, dims=None):
    """An ONNX integer initializer of the given container type (INT4/UINT4 packed two per byte by onnx.helper)."""
    from onnx import helper

    arr = np.asarray(values).astype(np.int64)
    lo, hi = _CONTAINER_RANGE[container]
    if arr.size and (arr.min() < lo or arr.max() > hi):
        raise RuntimeError(f"{name}: integers [{arr.min()}, {arr.max()}] do not fit container {container}")
    dims = list(arr.shape) if dims is None else list(dims)
    np_dtype = {"INT4": np.int8, "UINT4": np.uint8, "INT8": np.int8, "UINT8": np.uint8, "INT16": np.int16,
                "UINT16": np.uint16}[container]
    if container in ("INT8", "UINT8", "INT16", "UINT16"):
        from onnx import numpy_helper

        return numpy_helper.from_array(arr.astype(np_dtype).reshape(dims), name)
    return helper.make_tensor(name, getattr(_tp(), container), dims, arr.astype(np_dtype).reshape(-1))


def _float_tensor(name: str, values, dims=None):
    from onnx import numpy_helper

    arr = np.asarray(values, dtype=np.float32)
    if dims is not None:
        arr = arr.reshape(dims)
    return numpy_helper.from_array(arr, name)


# ----------------------------------------------------------------------------------------------------------------
# Quantizer specs: everything needed to emit a quantizer, and its exact PyTorch forward (for the trace dry run)
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class _WeightSpec:
    """Integer weight ``W' = (k - zp)*scale (+ offset)`` per output channel (axis 0)."""

    key: str
    bits: int
    ints: np.ndarray  # int64, weight shape
    scale: np.ndarray  # float32 (C,)
    zp: np.ndarray  # int64 (C,)
    offset: np.ndarray | None  # float32 (C,) added after DequantizeLinear ("add" mode), else None
    container: str
    qrange: tuple  # declared integer range of `ints`
    mode: str  # "zero_point", "add" or "widen"
    op_type: str = "WeightDQ"

    def dequantized(self) -> torch.Tensor:
        """The float weight ONNX Runtime reconstructs (float32 arithmetic, as DequantizeLinear)."""
        c = self.ints.shape[0]
        shape = (c,) + (1,) * (self.ints.ndim - 1)
        k = torch.from_numpy(self.ints.astype(np.float32))
        zp = torch.from_numpy(self.zp.astype(np.float32)).view(shape)
        w = (k - zp) * torch.from_numpy(self.scale).view(shape)
        if self.offset is not None:
            w = w + torch.from_numpy(self.offset).view(shape)
        return w

    def forward(self, w: torch.Tensor) -> torch.Tensor:  # the traced input is already the dequantized weight
        return w.clone()

    def describe(self) -> str:
        s = f"DequantizeLinear {self.container} axis=0"
        if self.mode == "add":
            s += " + Add(offset)"
        elif self.mode == "widen":
            s += f" (widened 2k-L, range {list(self.qrange)})"
        elif self.container not in ("INT4", "UINT4") and self.bits != 8:
            s += f" (range {list(self.qrange)})"
        return s

    def lower(self, inp: str, out: str):
        from onnx import helper

        k = self.key
        inits = [
            _int_tensor(f"{k}/w_int", self.container, self.ints),
            _float_tensor(f"{k}/w_scale", self.scale),
            _int_tensor(f"{k}/w_zero_point", self.container, self.zp),
        ]
        dq_out = out if self.offset is None else f"{k}/w_dq"
        nodes = [helper.make_node("DequantizeLinear", [f"{k}/w_int", f"{k}/w_scale", f"{k}/w_zero_point"], [dq_out],
                                  name=f"{k}/WeightDequantize", axis=0)]
        if self.offset is not None:
            c = self.ints.shape[0]
            inits.append(_float_tensor(f"{k}/w_offset", self.offset, (c,) + (1,) * (self.ints.ndim - 1)))
            nodes.append(helper.make_node("Add", [dq_out, f"{k}/w_offset"], [out], name=f"{k}/WeightOffset"))
        return nodes, inits


@dataclass
class _ActSpec:
    """Uniform per-tensor activation grid ``offset + k*scale``, k in [qmin, qmax] (LSQ, LSQ+, PACT)."""

    key: str
    method: str
    bits: int
    scale: float  # float32 value
    offset: float  # float32 value (0.0: no Sub/Add)
    qmin: int
    qmax: int
    container: str
    op_type: str = "ActQDQ"

    @property
    def clip(self) -> bool:
        lo, hi = _CONTAINER_RANGE[self.container]
        return (self.qmin, self.qmax) != (lo, hi)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = torch.tensor(self.scale, dtype=torch.float32)
        b = torch.tensor(self.offset, dtype=torch.float32)
        v = x - b if self.offset != 0.0 else x
        y = torch.round(v / s).clamp(self.qmin, self.qmax) * s
        return y + b if self.offset != 0.0 else y

    def describe(self) -> str:
        s = f"QuantizeLinear/DequantizeLinear {self.container}"
        if self.clip:
            s += f" + Clip[{self.qmin},{self.qmax}]"
        if self.offset != 0.0:
            s = f"Sub(offset) -> {s} -> Add(offset)"
        return s

    def lower(self, inp: str, out: str):
        from onnx import helper

        k = self.key
        inits = [_float_tensor(f"{k}/a_scale", self.scale, ()), _int_tensor(f"{k}/a_zero_point", self.container, 0, ())]
        nodes = []
        src = inp
        if self.offset != 0.0:
            inits.append(_float_tensor(f"{k}/a_offset", self.offset, ()))
            nodes.append(helper.make_node("Sub", [inp, f"{k}/a_offset"], [f"{k}/a_centered"], name=f"{k}/ActSubOffset"))
            src = f"{k}/a_centered"
        nodes.append(helper.make_node("QuantizeLinear", [src, f"{k}/a_scale", f"{k}/a_zero_point"], [f"{k}/a_int"],
                                      name=f"{k}/ActQuantize"))
        q = f"{k}/a_int"
        if self.clip:
            inits += [_int_tensor(f"{k}/a_qmin", self.container, self.qmin, ()),
                      _int_tensor(f"{k}/a_qmax", self.container, self.qmax, ())]
            nodes.append(helper.make_node("Clip", [q, f"{k}/a_qmin", f"{k}/a_qmax"], [f"{k}/a_int_clipped"],
                                          name=f"{k}/ActClipRange"))
            q = f"{k}/a_int_clipped"
        dq_out = out if self.offset == 0.0 else f"{k}/a_dq"
        nodes.append(helper.make_node("DequantizeLinear", [q, f"{k}/a_scale", f"{k}/a_zero_point"], [dq_out],
                                      name=f"{k}/ActDequantize"))
        if self.offset != 0.0:
            nodes.append(helper.make_node("Add", [dq_out, f"{k}/a_offset"], [out], name=f"{k}/ActAddOffset"))
        return nodes, inits


@dataclass
class _N2UQSpec:
    """N2UQ activation: ``count = #{i: beta1*x > T_i}``, output ``count*out_scale + shift``."""

    key: str
    bits: int
    beta1: float
    thresholds: np.ndarray  # float32 (L,), non-decreasing, beta1-scaled domain
    out_scale: float  # Delta*beta2 (float32)
    shift: float | None  # the conv's input_shift (None: no Add)
    method: str = "n2uq"
    op_type: str = "N2UQAct"
    broadcast_max_levels: int = 15  # up to this many thresholds use the Greater/ReduceSum broadcast

    @property
    def container(self) -> str:
        return "UINT4" if self.bits == 4 else "UINT8"

    @property
    def form(self) -> str:
        return "broadcast" if len(self.thresholds) <= self.broadcast_max_levels else "binary-search"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xs = x * torch.tensor(self.beta1, dtype=torch.float32)
        count = torch.bucketize(xs, torch.from_numpy(self.thresholds), right=False)
        y = count.to(torch.float32) * torch.tensor(self.out_scale, dtype=torch.float32)
        return y + torch.tensor(self.shift, dtype=torch.float32) if self.shift is not None else y

    def describe(self) -> str:
        core = ("Mul -> Unsqueeze -> Greater -> Cast -> ReduceSum" if self.form == "broadcast"
                else f"Mul -> {self.bits}x(Add -> Gather -> Greater -> Where)")
        return f"N2UQ count ({core}) -> Cast {self.container} -> DequantizeLinear" + (" -> Add(shift)" if self.shift is not None else "")

    def lower(self, inp: str, out: str):
        from onnx import helper

        tp = _tp()
        k = self.key
        L = len(self.thresholds)
        inits = [_float_tensor(f"{k}/n2uq_beta1", self.beta1, ()),
                 _float_tensor(f"{k}/n2uq_out_scale", self.out_scale, ()),
                 _int_tensor(f"{k}/n2uq_zero_point", self.container, 0, ())]
        nodes = [helper.make_node("Mul", [inp, f"{k}/n2uq_beta1"], [f"{k}/n2uq_xs"], name=f"{k}/N2UQScaleIn")]
        if self.form == "broadcast":
            # count = ReduceSum_i (x' > T_i): the thresholds vector broadcasts on a new last axis.
            inits += [_float_tensor(f"{k}/n2uq_thresholds", self.thresholds),
                      _int_tensor_i64(f"{k}/n2uq_axes", [-1])]
            nodes += [
                helper.make_node("Unsqueeze", [f"{k}/n2uq_xs", f"{k}/n2uq_axes"], [f"{k}/n2uq_xu"], name=f"{k}/N2UQUnsqueeze"),
                helper.make_node("Greater", [f"{k}/n2uq_xu", f"{k}/n2uq_thresholds"], [f"{k}/n2uq_gt"], name=f"{k}/N2UQGreater"),
                helper.make_node("Cast", [f"{k}/n2uq_gt"], [f"{k}/n2uq_gt_i"], name=f"{k}/N2UQCastInt", to=tp.INT32),
                helper.make_node("ReduceSum", [f"{k}/n2uq_gt_i", f"{k}/n2uq_axes"], [f"{k}/n2uq_count"],
                                 name=f"{k}/N2UQCount", keepdims=0),
            ]
        else:
            # Branchless binary search (lower bound) over the sorted thresholds: pos <- pos + step while
            # T[pos + step - 1] < x', steps 2^(b-1) .. 1. L = 2^b - 1, so pos + step never exceeds L. The table is
            # shifted by one ([-inf, T_0, ..]) so that Gather(T_shift, pos + step) reads T[pos + step - 1].
            steps = [1 << i for i in range(self.bits - 1, -1, -1)]
            assert sum(steps) == L, "binary search needs 2^b - 1 thresholds"
            t_shift = np.concatenate([np.array([-np.inf], np.float32), self.thresholds])
            inits.append(_float_tensor(f"{k}/n2uq_thresholds_shifted", t_shift))
            first = steps[0]
            inits += [_float_tensor(f"{k}/n2uq_t_first", self.thresholds[first - 1], ()),
                      _int_tensor_i64(f"{k}/n2uq_step0", first, ())]
            nodes += [
                helper.make_node("Greater", [f"{k}/n2uq_xs", f"{k}/n2uq_t_first"], [f"{k}/n2uq_g0"], name=f"{k}/N2UQGreater0"),
                helper.make_node("Cast", [f"{k}/n2uq_g0"], [f"{k}/n2uq_g0_i"], name=f"{k}/N2UQCast0", to=tp.INT64),
                helper.make_node("Mul", [f"{k}/n2uq_g0_i", f"{k}/n2uq_step0"], [f"{k}/n2uq_pos0"], name=f"{k}/N2UQPos0"),
            ]
            pos = f"{k}/n2uq_pos0"
            for j, step in enumerate(steps[1:], 1):
                inits.append(_int_tensor_i64(f"{k}/n2uq_step{j}", step, ()))
                last = j == len(steps) - 1
                t, g, p = f"{k}/n2uq_try{j}", f"{k}/n2uq_g{j}", f"{k}/n2uq_count" if last else f"{k}/n2uq_pos{j}"
                nodes += [
                    helper.make_node("Add", [pos, f"{k}/n2uq_step{j}"], [t], name=f"{k}/N2UQTry{j}"),
                    helper.make_node("Gather", [f"{k}/n2uq_thresholds_shifted", t], [f"{k}/n2uq_t{j}"],
                                     name=f"{k}/N2UQGather{j}", axis=0),
                    helper.make_node("Greater", [f"{k}/n2uq_xs", f"{k}/n2uq_t{j}"], [g], name=f"{k}/N2UQGreater{j}"),
                    helper.make_node("Where", [g, t, pos], [p], name=f"{k}/N2UQStep{j}"),
                ]
                pos = p
        dq_out = out if self.shift is None else f"{k}/n2uq_dq"
        nodes += [
            helper.make_node("Cast", [f"{k}/n2uq_count"], [f"{k}/n2uq_level"], name=f"{k}/N2UQCastLevel",
                             to=getattr(tp, self.container)),
            helper.make_node("DequantizeLinear", [f"{k}/n2uq_level", f"{k}/n2uq_out_scale", f"{k}/n2uq_zero_point"],
                             [dq_out], name=f"{k}/N2UQDequantize"),
        ]
        if self.shift is not None:
            inits.append(_float_tensor(f"{k}/n2uq_shift", self.shift, ()))
            nodes.append(helper.make_node("Add", [dq_out, f"{k}/n2uq_shift"], [out], name=f"{k}/N2UQAddShift"))
        return nodes, inits


def _int_tensor_i64(name, values, dims=None):
    from onnx import numpy_helper

    arr = np.asarray(values, dtype=np.int64)
    return numpy_helper.from_array(arr.reshape(dims) if dims is not None else arr, name)


class _GabqOp(torch.autograd.Function):
    """Placeholder traced as one ``gabq::<op_type>`` node; forward computes the exact quantized values."""

    @staticmethod
    def forward(ctx, x, spec):  # noqa: D102
        return spec.forward(x)

    @staticmethod
    def symbolic(g, x, spec):  # noqa: D102
        out = g.op(f"{_DOMAIN}::{spec.op_type}", x, key_s=spec.key)
        out.setType(x.type())
        return out


class _ExportConv(nn.Module):
    """Deployment form of a :class:`QuantConv2d` (BN folded, integer weights); traced with ``gabq::`` placeholders."""

    def __init__(self, conv: nn.Conv2d, weight: torch.Tensor, bias: torch.Tensor | None, act_spec=None, w_spec=None):
        super().__init__()
        if conv.padding_mode != "zeros":
            raise ValueError(f"padding_mode={conv.padding_mode!r} is not supported by the Q/DQ exporter (zeros only).")
        self.stride, self.padding, self.dilation, self.groups = conv.stride, conv.padding, conv.dilation, conv.groups
        self.register_buffer("weight", weight.detach().float().contiguous())
        self.register_buffer("bias", None if bias is None else bias.detach().float().contiguous())
        self.act_spec, self.w_spec = act_spec, w_spec

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Quantize the input (placeholder op), dequantize the integer weight (placeholder op), convolve."""
        if self.act_spec is not None:
            x = _GabqOp.apply(x, self.act_spec)
        w = _GabqOp.apply(self.weight, self.w_spec) if self.w_spec is not None else self.weight
        return F.conv2d(x, w, self.bias, self.stride, self.padding, self.dilation, self.groups)


# ----------------------------------------------------------------------------------------------------------------
# BN folding and spec construction
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


_ZP_TOL = 1e-4  # largest zero-point snap, in quantization steps (float rounding of the scale is ~1e-5 at 8 bits)


@torch.no_grad()
def _weight_spec(key: str, conv: QuantConv2d, f: torch.Tensor, mode: str) -> _WeightSpec:
    """Quantize ``conv``'s weight to integers and fold the per-channel BN factor ``f`` into grid and integers."""
    q = conv.weight_quant
    w = conv.weight.detach().float()
    wq = q(w).double()  # PACT/N2UQ refresh their w_scale buffer from this weight here (on the export copy)
    g = q.grid()
    s, off, qmin, qmax = g["scale"].double(), g["offset"].double(), g["qmin"], g["qmax"]
    shape = (-1,) + (1,) * (w.dim() - 1)
    k = torch.round((wq - off.view(shape)) / s.view(shape))
    err = ((k * s.view(shape) + off.view(shape)) - wq).abs().amax(dim=tuple(range(1, w.dim())))
    if bool((err > 1e-3 * s).any()) or int(k.min()) < qmin or int(k.max()) > qmax:
        raise RuntimeError(f"{key}: the weight quantizer's grid() does not describe its output (internal error).")
    big_f, neg = f.abs(), f < 0
    # Negative BN scale: mirror the grid so the scale stays positive and k stays in [qmin, qmax].
    k2 = torch.where(neg.view(shape), qmin + qmax - k, k)
    off2 = torch.where(neg, -big_f * (off + (qmin + qmax) * s), big_f * off)
    s2 = big_f * s
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
    container = _container(qrange[0], qrange[1], q.bits if used != "widen" else None)
    return _WeightSpec(
        key=key, bits=q.bits, ints=ints.to(torch.int64).numpy(), scale=scale.float().numpy(),
        zp=zp.to(torch.int64).numpy(), offset=None if offset is None else offset.float().numpy(),
        container=container, qrange=qrange, mode=used,
    )


@torch.no_grad()
def _act_spec(key: str, conv: QuantConv2d):
    q = conv.act_quant
    if q.method == "n2uq":
        from .quant.n2uq import n2uq_boundaries

        s0, a, b1, b2 = q._act_params(torch.float32)
        _, thr = n2uq_boundaries(s0, a)
        out_scale = (b2 * q.delta).reshape(())  # exactly the forward's `beta2 * delta`
        shift = None if conv.input_shift is None else float(conv.input_shift.detach().float().reshape(()))
        return _N2UQSpec(key=key, bits=q.bits, beta1=float(b1.reshape(())), thresholds=thr.float().numpy().copy(),
                         out_scale=float(out_scale), shift=shift)
    g = q.grid()
    if g["axis"] is not None and g["scale"].numel() > 1:
        raise ValueError(f"{key}: per-channel activation quantizers are not supported by the Q/DQ exporter.")
    lo, hi = g["qmin"], g["qmax"]
    bits = q.bits
    container = ("INT4" if lo < 0 else "UINT4") if bits == 4 else ("INT8" if lo < 0 else "UINT8")
    spec = _ActSpec(key=key, method=q.method, bits=bits, scale=float(g["scale"].float().reshape(())),
                    offset=float(g["offset"].float().reshape(())), qmin=lo, qmax=hi, container=container)
    if conv.input_shift is not None:  # only N2UQ has one today; keep the function exact if that changes
        raise ValueError(f"{key}: input_shift on a non-N2UQ quantizer is not supported by the Q/DQ exporter.")
    return spec


def _check_initialized(model: nn.Module) -> None:
    missing = []
    for name, m in quant_convs(model):
        for role, q in (("weight", m.weight_quant), ("act", m.act_quant)):
            if q is not None and not bool(q.initialized):
                missing.append(f"{name}.{role}_quant")
    if missing:
        raise ValueError(
            f"{len(missing)} quantizer(s) were never initialised ({', '.join(missing[:4])}{' ...' if len(missing) > 4 else ''}): "
            "calibrate (quant.convert.calibrate_activations) or train the model before exporting."
        )


def _build_export_model(model: nn.Module, weight_offset: str):
    """Deep copy of ``model`` with BN folded and every QuantConv2d replaced by an :class:`_ExportConv`."""
    m = copy.deepcopy(model).float().eval()
    for p in m.parameters():
        p.requires_grad_(False)
    specs, rows = {}, []

    def convert(name: str, conv: QuantConv2d, bn):
        f, bias = _bn_factors(conv, bn)
        key = name
        a_spec = _act_spec(key + ".act", conv) if conv.act_quant is not None else None
        if conv.weight_quant is not None:
            w_spec = _weight_spec(key + ".weight", conv, f, weight_offset)
            weight = w_spec.dequantized()
        else:
            w_spec = None
            weight = (conv.weight.detach().double() * f.view(-1, 1, 1, 1)).float()
        if a_spec is None and conv.input_shift is not None:
            raise ValueError(f"{name}: input_shift without an activation quantizer cannot be exported.")
        for s in (a_spec, w_spec):
            if s is not None:
                specs[s.key] = s
        rows.append({
            "name": name,
            "method": conv.method or "fp",
            "w_bits": conv.w_bits,
            "a_bits": conv.a_bits,
            "bn_folded": bn is not None and not isinstance(bn, nn.Identity),
            "weight": w_spec.describe() if w_spec else "float initializer",
            "weight_range": list(w_spec.qrange) if w_spec else None,
            "act": a_spec.describe() if a_spec else "float",
        })
        return _ExportConv(conv, weight, bias.float(), a_spec, w_spec)

    # Blocks first (their conv carries the BN), then the raw quantized convs (Detect predictors).
    for name, mod in list(m.named_modules()):
        if isinstance(mod, QuantConvBlock) and isinstance(mod.conv, QuantConv2d):
            mod.conv = convert(f"{name}.conv", mod.conv, mod.bn)
            mod.bn = nn.Identity()
    for name, mod in list(m.named_modules()):
        for child_name, child in list(mod.named_children()):
            if isinstance(child, QuantConv2d):
                full = f"{name}.{child_name}" if name else child_name
                new = convert(full, child, None)
                for a in ("i", "f", "type", "np"):
                    if hasattr(child, a):
                        setattr(new, a, getattr(child, a))
                setattr(mod, child_name, new)
    rows.sort(key=lambda r: _natural_key(r["name"]))
    return m, specs, rows


def _natural_key(name: str):
    return [int(t) if t.isdigit() else t for t in name.split(".")]


def _prepare_for_onnx(m: nn.Module, imgsz: tuple[int, int]) -> nn.Module:
    """Fuse remaining float Conv+BN and set the Detect export attributes as Ultralytics' ONNX exporter does."""
    from ultralytics.nn.modules import C2f, Detect

    if hasattr(m, "fuse"):
        m = m.fuse(verbose=False)
    stride = m.stride.tolist() if hasattr(m, "stride") else [32]
    for mod in m.modules():
        if isinstance(mod, Detect):
            mod.dynamic = False
            mod.export = True
            mod.format = "onnx"
            mod.xyxy = False
            mod.shape = None
            mod.max_det = min(300, sum(int(imgsz[0] / s) * int(imgsz[1] / s) for s in stride))
            mod.agnostic_nms = False
        elif isinstance(mod, C2f):
            mod.forward = mod.forward_split  # Ultralytics' ONNX graph uses Split instead of Chunk (same values)
    return m


# ----------------------------------------------------------------------------------------------------------------
# ONNX lowering
# ----------------------------------------------------------------------------------------------------------------
def _lower_graph(proto, specs: dict, opset: int):
    """Replace the ``gabq::`` placeholders by standard operators, drop dead tensors, set the opset."""
    from onnx import helper

    graph = proto.graph
    new_nodes, new_inits = [], []
    for node in graph.node:
        if node.domain != _DOMAIN:
            new_nodes.append(node)
            continue
        key = next(a.s.decode() for a in node.attribute if a.name == "key")
        nodes, inits = specs[key].lower(node.input[0], node.output[0])
        new_nodes += nodes
        new_inits += inits
    del graph.node[:]
    graph.node.extend(new_nodes)
    graph.initializer.extend(new_inits)
    _remove_dead(graph)
    ops = [o for o in proto.opset_import if o.domain not in ("", "ai.onnx", _DOMAIN)]
    del proto.opset_import[:]
    proto.opset_import.extend([helper.make_opsetid("", opset), *ops])
    proto.ir_version = 10  # INT4 needs IR >= 10; Ultralytics also caps at 10 for ONNX Runtime compatibility
    return proto


def _remove_dead(graph) -> None:
    """Remove nodes whose outputs are unused, then unused initializers and stale value_info (replaced weights)."""
    outputs = {o.name for o in graph.output}
    while True:
        used = set(outputs)
        for n in graph.node:
            used.update(i for i in n.input if i)
        keep = [n for n in graph.node if any(o in used for o in n.output)]
        if len(keep) == len(graph.node):
            break
        del graph.node[:]
        graph.node.extend(keep)
    inits = [i for i in graph.initializer if i.name in used]
    del graph.initializer[:]
    graph.initializer.extend(inits)
    produced = {o for n in graph.node for o in n.output}
    vi = [v for v in graph.value_info if v.name in produced]
    del graph.value_info[:]
    graph.value_info.extend(vi)


def _metadata(model: nn.Module, imgsz, opset: int, rows: list, weight_offset: str) -> dict:
    from ultralytics import __version__ as ul_version

    from . import __version__

    names = getattr(model, "names", None) or {i: f"class{i}" for i in range(int(getattr(model.model[-1], "nc", 80)))}
    if isinstance(names, (list, tuple)):
        names = dict(enumerate(names))
    stride = int(max(model.stride)) if hasattr(model, "stride") else 32
    yaml_file = Path(getattr(model, "yaml", {}).get("yaml_file", "") or "model").stem
    methods = sorted({r["method"] for r in rows if r["method"] != "fp"})
    quant = {
        "format": "qdq",
        "plugin": f"ultralytics-gabfusion {__version__}",
        "methods": methods,
        "opset": opset,
        "weight_offset": weight_offset,
        "bits": sorted({(r["w_bits"], r["a_bits"]) for r in rows}, key=str),
        "layers": [{k: r[k] for k in ("name", "method", "w_bits", "a_bits", "weight", "weight_range", "act")} for r in rows],
    }
    data = model.args.get("data", "") if isinstance(getattr(model, "args", None), dict) else ""
    return {
        "description": f"Ultralytics {yaml_file} model, {'/'.join(methods)} Q/DQ export by ultralytics-gabfusion"
        + (f", trained on {data}" if data else ""),
        "author": "Ultralytics / ultralytics-gabfusion",
        "date": datetime.now().astimezone().isoformat(),
        "version": ul_version,
        "license": "AGPL-3.0 License (https://ultralytics.com/license)",
        "docs": "https://docs.ultralytics.com",
        "stride": stride,
        "task": getattr(model, "task", "detect"),
        "head": type(model.model[-1]).__name__ if hasattr(model, "model") else "Detect",
        "batch": 1,
        "imgsz": list(imgsz),
        "names": names,
        "args": {"batch": 1, "imgsz": list(imgsz), "dynamic": False, "nms": False, "half": False, "opset": opset},
        "channels": int(getattr(model, "yaml", {}).get("channels", 3)),
        "end2end": False,
        "quantization": json.dumps(quant, default=str),
    }


# ----------------------------------------------------------------------------------------------------------------
# Loading models and images
# ----------------------------------------------------------------------------------------------------------------
def load_quantized_model(model, require_quantized: bool = True) -> nn.Module:
    """Return an ``nn.Module`` from a model or an Ultralytics checkpoint path (float32, eval mode).

    Args:
        model (nn.Module | str | Path): A model, or a ``.pt`` checkpoint written by Ultralytics/the GAB trainer.
        require_quantized (bool): Raise if the model holds no quantized layers.

    Returns:
        (nn.Module): The model (the caller's object itself when a module was passed).

    Raises:
        FileNotFoundError: The path does not exist.
        ValueError: Not a readable Ultralytics checkpoint, or (``require_quantized``) a full-precision model.

    Examples:
        >>> load_quantized_model("yolov5s.yaml")  # doctest: +SKIP
        Traceback (most recent call last):
        ...
        ValueError: yolov5s.yaml is not a .pt checkpoint ...
    """
    if isinstance(model, (str, Path)):
        path = Path(model)
        if path.suffix != ".pt":
            raise ValueError(f"{model} is not a .pt checkpoint; pass a quantized checkpoint written by the GAB trainer.")
        if not path.is_file():
            raise FileNotFoundError(f"{model}: checkpoint not found (no weights are downloaded by the Q/DQ exporter).")
        from ultralytics.nn.tasks import load_checkpoint

        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                model, _ = load_checkpoint(str(path))
        except Exception as e:  # torch/pickle raise many types on a corrupt file: report one clear error
            raise ValueError(f"{path} is not a readable Ultralytics checkpoint ({type(e).__name__}: {e}).") from None
    if not isinstance(model, nn.Module):
        raise ValueError(f"expected a model or a .pt checkpoint path, got {type(model).__name__}.")
    if require_quantized and not is_quantized(model):
        raise ValueError(
            f"{type(model).__name__} has no quantized layers (no QuantConv2d with a weight or activation quantizer). "
            "The Q/DQ exporter is for QAT models; use YOLO(model).export(format='onnx') for FP models."
        )
    return model


def _image_files(source) -> list[Path]:
    """Image files from a directory, an image, a list, a ``.txt`` list or a data YAML (its ``val`` split)."""
    if isinstance(source, (list, tuple)):
        out = []
        for s in source:
            out += _image_files(s)
        return out
    p = Path(source)
    if p.suffix in (".yaml", ".yml"):
        from ultralytics.data.utils import check_det_dataset

        data = check_det_dataset(str(p), autodownload=False)
        val = data.get("val") or data.get("test") or data.get("train")
        return _image_files(val)
    if p.is_dir():
        return sorted(f for f in p.rglob("*") if f.suffix.lower() in _IMG_SUFFIXES)
    if p.suffix == ".txt" and p.is_file():
        lines = [ln.strip() for ln in p.read_text().splitlines() if ln.strip()]
        return [Path(ln) if Path(ln).is_absolute() else (p.parent / ln).resolve() for ln in lines]
    if p.is_file() and p.suffix.lower() in _IMG_SUFFIXES:
        return [p]
    raise ValueError(f"no images found at {source}: pass image files, a directory, a .txt list or a data YAML.")


def load_images(source, imgsz=640, n: int = 8) -> torch.Tensor:
    """Load up to ``n`` images as Ultralytics predicts them: letterbox to ``imgsz`` (pad 114), RGB, CHW, /255.

    Args:
        source: Image path(s), a directory, a ``.txt`` list or a data YAML (its ``val`` images), or a float tensor
            ``(N, 3, H, W)`` in [0, 1] (returned as is).
        imgsz (int | tuple[int, int]): Target size (square int or (h, w)).
        n (int): Maximum number of images (the first ``n`` in sorted order).

    Returns:
        (torch.Tensor): float32 ``(N, 3, h, w)`` in [0, 1].

    Examples:
        >>> x = load_images("datasets/synth/data.yaml", imgsz=64, n=2)  # doctest: +SKIP
        >>> x.shape  # doctest: +SKIP
        torch.Size([2, 3, 64, 64])
    """
    if torch.is_tensor(source):
        return source.float()
    import cv2
    from ultralytics.data.augment import LetterBox

    h, w = (imgsz, imgsz) if isinstance(imgsz, int) else tuple(imgsz)
    files = _image_files(source)[:n]
    if not files:
        raise ValueError(f"no images found at {source}.")
    lb = LetterBox(new_shape=(h, w), auto=False, stride=32)
    out = []
    for f in files:
        im = cv2.imread(str(f))
        if im is None:
            raise ValueError(f"cannot read image {f}")
        im = lb(image=im)
        out.append(torch.from_numpy(np.ascontiguousarray(im[..., ::-1].transpose(2, 0, 1))).float() / 255.0)
    return torch.stack(out)


def generated_images(imgsz=640, n: int = 4, seed: int = 0) -> torch.Tensor:
    """Deterministic synthetic test images (gradients, noise and filled shapes) for parity checks without data.

    They exercise the whole activation range of a network better than noise alone, but they are not natural
    images: prefer ``data=`` / real images for a meaningful detection comparison.
    """
    import cv2

    h, w = (imgsz, imgsz) if isinstance(imgsz, int) else tuple(imgsz)
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        base = np.stack([(xx / w), (yy / h), 0.5 + 0.5 * np.sin((xx + yy) / max(h, w) * 6.28)], -1) * 255
        im = (0.6 * base + 0.4 * rng.uniform(0, 255, (h, w, 3))).astype(np.uint8)
        for _ in range(int(rng.integers(2, 7))):
            color = tuple(int(c) for c in rng.integers(0, 256, 3))
            x0, y0 = int(rng.integers(0, w - 4)), int(rng.integers(0, h - 4))
            x1, y1 = min(w - 1, x0 + int(rng.integers(4, max(5, w // 2)))), min(h - 1, y0 + int(rng.integers(4, max(5, h // 2))))
            if rng.random() < 0.5:
                cv2.rectangle(im, (x0, y0), (x1, y1), color, -1)
            else:
                cv2.ellipse(im, ((x0 + x1) // 2, (y0 + y1) // 2), (max(1, (x1 - x0) // 2), max(1, (y1 - y0) // 2)), 0, 0,
                            360, color, -1)
        out.append(torch.from_numpy(np.ascontiguousarray(im.transpose(2, 0, 1))).float() / 255.0)
    return torch.stack(out)


def _imgsz_pair(imgsz, stride: int) -> tuple[int, int]:
    from ultralytics.utils.checks import check_imgsz

    sz = check_imgsz(imgsz, stride=stride, min_dim=2)
    return (int(sz[0]), int(sz[1]))


# ----------------------------------------------------------------------------------------------------------------
# Parity
# ----------------------------------------------------------------------------------------------------------------
def _ort_session(onnx_file):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    # A verification run, not a benchmark: spinning worker threads only steal CPU from the PyTorch reference.
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    model = onnx_file if isinstance(onnx_file, bytes) else str(onnx_file)  # a path or a serialized model
    return ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])


def _anchor_unmatched(dets, idx, other, conf: float, margin: float, iou: float) -> int:
    """Detections (``score >= conf``) whose own anchor in the ``other`` raw output disagrees.

    ``dets``: NMS rows ``[x1, y1, x2, y2, score, cls]``; ``idx``: their anchor indices; ``other``: the other model's
    raw output ``(4+nc, anchors)`` for the same image. Disagreement: the other model's box at that anchor overlaps
    with IoU <= ``iou``, or its score for the same class differs by more than ``margin``.
    """
    from ultralytics.utils.metrics import bbox_iou
    from ultralytics.utils.ops import xywh2xyxy

    strong = dets[:, 4] >= conf
    if not bool(strong.any()):
        return 0
    d, a = dets[strong], idx.view(-1)[strong].long()
    o = other[:, a].T  # (k, 4+nc)
    cls = d[:, 5].long()
    score = o[torch.arange(len(o)), 4 + cls]
    ious = bbox_iou(d[:, :4], xywh2xyxy(o[:, :4]), xywh=False).view(-1)
    return int(((ious <= iou) | ((score - d[:, 4]).abs() > margin)).sum())


def _anchor_spread(y_ref: torch.Tensor, y: torch.Tensor, conf: float, top_k: int) -> dict:
    """How far ``y`` is from ``y_ref`` on the anchors that matter (both decoded ``(N, 4+nc, anchors)`` outputs).

    Anchors compared: those whose best class score in ``y_ref`` is ``>= conf``, and at least the ``top_k`` best of
    each image. Returns the mean over them of ``|score difference|`` for ``y_ref``'s best class and of
    ``1 - IoU`` of the two boxes, and how many anchors were compared.
    """
    from ultralytics.utils.metrics import bbox_iou

    sd, bd, n = [], [], 0
    for r, o in zip(y_ref, y):
        score, cls = r[4:].max(0)
        k = min(top_k, score.numel())
        sel = (score >= conf) | (score >= score.topk(k).values[-1])
        a = sel.nonzero().view(-1)
        c = cls[a]
        sd.append((o[4 + c, a] - r[4 + c, a]).abs())
        bd.append(1 - bbox_iou(r[:4, a].T, o[:4, a].T, xywh=True).view(-1).clamp(0, 1))
        n += len(a)
    return {"score": float(torch.cat(sd).mean()), "box": float(torch.cat(bd).mean()), "anchors": n}


def _perturbed_output(model: nn.Module, x: torch.Tensor, eps: float, seed: int) -> torch.Tensor:
    """``model(x)`` with every conv input multiplied by ``1 + eps*u``, ``u ~ U(-1, 1)`` (seeded): float-noise twin."""
    g = torch.Generator().manual_seed(seed)

    def hook(_, args):
        t = args[0]
        u = torch.rand(t.shape, generator=g, dtype=t.dtype).mul_(2).sub_(1)
        return (t * (1 + eps * u),) + tuple(args[1:])

    handles = [m.register_forward_pre_hook(hook) for m in model.modules() if isinstance(m, nn.Conv2d)]
    try:
        y = model(x)
    finally:
        for h in handles:
            h.remove()
    return (y[0] if isinstance(y, (list, tuple)) else y).float()


def _layer_tensors(proto) -> dict:
    """``{conv key: (act_in, conv_in, conv_out)}`` tensor names of every quantized conv in a lowered Q/DQ graph.

    ``act_in`` is the input of the conv's activation quantizer (None when its input is not quantized), ``conv_in``
    and ``conv_out`` the input (= the quantizer's output) and output of its ``Conv`` node (BN folded).
    """
    producer = {o: n for n in proto.graph.node for o in n.output}
    out = {}
    for n in proto.graph.node:
        if n.op_type != "Conv" or n.input[1] not in producer:
            continue
        wname = producer[n.input[1]].name
        if not wname.endswith(("/WeightDequantize", "/WeightOffset")):
            continue
        key = wname.split("/")[0][: -len(".weight")]
        act_in = None
        src = producer.get(n.input[0])
        if src is not None and src.name.startswith(f"{key}.act/"):
            node = src
            while node is not None and node.name.startswith(f"{key}.act/"):  # walk back to the chain's input
                act_in = node.input[0]
                node = producer.get(act_in)
        out[key] = (act_in, n.input[0], n.output[0])
    return out


def _layer_parity(model: nn.Module, proto, x: torch.Tensor, t: dict) -> dict:
    """Layer-local parity: each quantized conv of ``model`` recomputed on ONNX Runtime's own input to that conv.

    Feeding every layer the ONNX tensors isolates it from upstream float noise, so a correct export agrees to float
    rounding and any wrong scale, zero point, offset, threshold or folded weight shows at the layer that has it.
    Per layer: ``act``: fraction of activation elements where PyTorch's quantizer on the ONNX input differs from the
    ONNX quantized activation by more than ``1e-3`` step (a rounding flip is a whole step); ``conv``: largest
    per-channel ``max|diff| / max|out|`` of BN(conv) on the ONNX quantized input vs the ONNX ``Conv`` output. Each is
    compared with the same number under a ``layer_eps`` relative perturbation of the layer input (the float
    sensitivity of that layer) and must stay within ``ratio`` x that + ``layer_floor``.
    """
    import onnx
    from onnx import helper

    names = _layer_tensors(proto)
    graph_inputs = {i.name for i in proto.graph.input}
    extra = sorted({v for trio in names.values() for v in trio if v and v not in graph_inputs})
    p2 = onnx.ModelProto()
    p2.CopyFrom(proto)
    known = {o.name for o in p2.graph.output}
    for v in extra:
        if v not in known:
            p2.graph.output.append(helper.make_tensor_value_info(v, onnx.TensorProto.FLOAT, None))
    sess = _ort_session(p2.SerializeToString())
    inp = sess.get_inputs()[0].name
    out_names = [o.name for o in sess.get_outputs()]
    modules = dict(model.named_modules())
    g = torch.Generator().manual_seed(0)
    worst = {"act": (0.0, float("inf"), ""), "conv": (0.0, float("inf"), "")}  # (value, limit, layer): largest value/limit
    fails = []
    for i in range(len(x)):
        xi = x[i : i + 1]
        vals = dict(zip(out_names, sess.run(None, {inp: xi.numpy()})))
        vals[inp] = xi.numpy()
        for key, (a_in, c_in, c_out) in names.items():
            conv = modules.get(key)
            if not isinstance(conv, QuantConv2d):
                continue
            parent = modules.get(key.rsplit(".", 1)[0]) if "." in key else None
            bn = parent.bn if isinstance(parent, QuantConvBlock) and parent.conv is conv else None
            checks = []
            qin = torch.from_numpy(vals[c_in])
            if a_in is not None and conv.act_quant is not None:
                xin = torch.from_numpy(vals[a_in])
                q = conv.act_quant
                step = (q.grid()["scale"] if q.method == "n2uq" else q.step_size()).float()

                def bad_frac(a, b):
                    return float(((a - b).abs() > 1e-3 * step + 1e-6 * b.abs()).float().mean())

                a_t = conv.quantize_input(xin)
                u = torch.rand(xin.shape, generator=g).mul_(2).sub_(1)
                ref = bad_frac(conv.quantize_input(xin * (1 + t["layer_eps"] * u)), a_t)
                checks.append(("act", bad_frac(a_t, qin), ref))
            if conv.weight_quant is not None:
                w = conv.quantized_weight().float()

                def conv_out(z):
                    y = conv._conv_forward(z, w, conv.bias.float() if conv.bias is not None else None)
                    return bn(y) if bn is not None else y

                y_t, y_o = conv_out(qin), torch.from_numpy(vals[c_out])
                scale = y_t.abs().amax(dim=(0, 2, 3)).clamp_min(1e-12)
                err = float(((y_t - y_o).abs().amax(dim=(0, 2, 3)) / scale).max())
                u = torch.rand(qin.shape, generator=g).mul_(2).sub_(1)
                ref = float(((conv_out(qin * (1 + t["layer_eps"] * u)) - y_t).abs().amax(dim=(0, 2, 3)) / scale).max())
                checks.append(("conv", err, ref))
            for kind, val, ref in checks:
                lim = t["ratio"] * ref + t["layer_floor"]
                w_val, w_lim, _ = worst[kind]
                if val / lim >= w_val / w_lim:
                    worst[kind] = (val, lim, key)
                if val > lim:
                    what = "activation elements off the quantizer's output" if kind == "act" else "relative conv output error"
                    fails.append(f"{key}: {what} {val:.3g} > {lim:.3g} (image {i})")
    return {"layers": len(names), "worst_act": worst["act"], "worst_conv": worst["conv"], "fails": sorted(set(fails))}


@torch.no_grad()
def check_parity(model, onnx_file, images, raise_error: bool = True, **tol) -> dict:
    """Compare the fake-quant PyTorch model with the exported ONNX model in ONNX Runtime on the same images.

    The reference is the original quantized model (fake quantization, BN not folded) in eval mode, float32. Both
    produce Ultralytics' decoded output ``(N, 4+nc, anchors)``: xywh boxes in pixels and class probabilities.

    Why the tolerance is relative to the model itself. The two graphs compute the same integer grids, but not
    bit-identically: BN folding rounds ``f*W`` and ``beta - mu*f`` differently from running BN after the conv,
    ONNX Runtime sums convolutions in another order, and ``QuantizeLinear`` divides where PyTorch's forward
    divides too but on slightly different inputs. A float difference of ~1e-7 relative is harmless except where
    it pushes a pre-activation across a rounding boundary of the next quantizer; that activation then moves by a
    whole step and the change propagates. How far it propagates is a property of the model: on a trained
    detector, perturbing the PyTorch model itself by 1e-7 moves confident boxes by pixels and background boxes by
    tens of pixels, so any fixed element tolerance either refuses every real model or accepts real errors.
    Instead the model is compared against its own float noise:

    * *reference spread*: the PyTorch model is run ``ref_runs`` times with every conv input multiplied by
      ``1 + ref_eps*u`` (``u`` uniform in [-1, 1], seeded; ``ref_eps = 1e-5``, ~100x float32 rounding, so the
      reference covers the export's float differences with room);
    * on the anchors that matter (best class score ``>= conf`` in the PyTorch output, and at least the ``top_k``
      best per image), the mean ``|score difference|`` for PyTorch's class and the mean ``1 - IoU`` of the boxes,
      ONNX vs PyTorch, must each be ``<= ratio * reference + floor`` (``ratio = 2``, ``floor = 1e-3``);
    * detection level: NMS at ``conf`` on both outputs; each detection of one model must be reproduced at its own
      anchor by the other (same-class score within ``margin``, IoU > ``iou``). The number of such misses must be
      ``<= ratio * (reference misses) + 1``;
    * layer-local (what catches small export errors, which the chaotic whole-network output hides): every quantized
      conv is recomputed in PyTorch on ONNX Runtime's own input to it, and its quantized activation and BN-folded
      conv output must match ONNX's up to the float sensitivity of that layer (see :func:`_layer_parity`:
      ``<= ratio * reference + layer_floor`` under a ``layer_eps = 1e-6`` relative input perturbation,
      ``layer_floor = 1e-3``).

    Measured (docs/RESULTS.md): correct exports of a trained YOLOv5n at W8A8 and W4A4 for LSQ, LSQ+, PACT and N2UQ
    pass; one conv's weight scale off by 1% is refused by the layer-local check (the output-level spread of such an
    error is within the model's own float noise at W8A8).

    Args:
        model (nn.Module | str | Path): The quantized model (or its checkpoint) that was exported.
        onnx_file (str | Path): The ONNX file.
        images: Float tensor ``(N, 3, H, W)`` in [0, 1] at the export size, or anything :func:`load_images` takes.
        raise_error (bool): Raise :class:`ParityError` when a criterion fails (else only report ``ok=False``).
        **tol: Overrides of :data:`PARITY_DEFAULTS`.

    Returns:
        (dict): ``max_abs_diff`` / ``mean_abs_diff`` (raw output units: pixels and probabilities, for information),
        ``boxes_max_abs_diff_px``, ``scores_max_abs_diff``, ``score_diff`` / ``box_diff`` (ONNX vs PyTorch on the
        compared anchors) and ``ref_score_diff`` / ``ref_box_diff`` (largest reference spread), ``anchors``,
        ``detections_torch``, ``detections_onnx``, ``unmatched``, ``ref_unmatched``, ``layers_checked``,
        ``layer_act`` / ``layer_conv`` (the layer-local value closest to its limit: value, limit, layer), ``images``,
        ``tol``, ``ok``.

    Raises:
        ParityError: If a criterion fails and ``raise_error``.

    Examples:
        >>> r = check_parity(qmodel, "model.onnx", "data.yaml")  # doctest: +SKIP
        >>> r["ok"], r["score_diff"] <= 2 * r["ref_score_diff"] + 1e-3  # doctest: +SKIP
        (True, True)
    """
    from ultralytics.utils.nms import non_max_suppression

    unknown = set(tol) - set(PARITY_DEFAULTS)
    if unknown:
        raise ValueError(f"unknown parity tolerance keys {sorted(unknown)}; valid: {sorted(PARITY_DEFAULTS)}")
    t = {**PARITY_DEFAULTS, **tol}
    model = load_quantized_model(model, require_quantized=False)
    sess = _ort_session(onnx_file)
    inp = sess.get_inputs()[0]
    h, w = int(inp.shape[2]), int(inp.shape[3])
    x = load_images(images, (h, w))
    if tuple(x.shape[2:]) != (h, w):
        raise ValueError(f"images are {tuple(x.shape[2:])}, the ONNX model expects {(h, w)}")
    ref_model = copy.deepcopy(model).float().eval()
    y_t = ref_model(x)
    y_t = (y_t[0] if isinstance(y_t, (list, tuple)) else y_t).float()
    y_o = torch.cat([torch.from_numpy(sess.run(None, {inp.name: x[i : i + 1].numpy()})[0]) for i in range(len(x))])
    if y_o.shape != y_t.shape:
        raise ParityError(f"output shapes differ: onnx {tuple(y_o.shape)} vs torch {tuple(y_t.shape)}")
    if not bool(torch.isfinite(y_o).all()):
        raise ParityError(f"ONNX output of {onnx_file} holds NaN or Inf values")

    def misses(y_a, y_b):
        # No NMS time limit: on a busy CPU it would silently drop the detections of the remaining images.
        nms = dict(conf_thres=t["conf"], iou_thres=t["nms_iou"], return_idxs=True, max_time_img=1e3)
        dets_a, idx_a = non_max_suppression(y_a, **nms)
        dets_b, idx_b = non_max_suppression(y_b, **nms)
        n = sum(_anchor_unmatched(dets_a[i], idx_a[i], y_b[i], t["conf"], t["margin"], t["iou"])
                + _anchor_unmatched(dets_b[i], idx_b[i], y_a[i], t["conf"], t["margin"], t["iou"]) for i in range(len(x)))
        return n, sum(len(d) for d in dets_a), sum(len(d) for d in dets_b)

    spread = _anchor_spread(y_t, y_o, t["conf"], t["top_k"])
    unmatched, n_t, n_o = misses(y_t, y_o)
    ref = {"score": 0.0, "box": 0.0, "unmatched": 0}
    for seed in range(int(t["ref_runs"])):
        y_p = _perturbed_output(ref_model, x, t["ref_eps"], seed)
        sp = _anchor_spread(y_t, y_p, t["conf"], t["top_k"])
        ref = {"score": max(ref["score"], sp["score"]), "box": max(ref["box"], sp["box"]),
               "unmatched": max(ref["unmatched"], misses(y_t, y_p)[0])}
    diff = (y_o - y_t).abs()
    res = {
        "images": int(len(x)),
        "max_abs_diff": float(diff.max()),
        "mean_abs_diff": float(diff.mean()),
        "boxes_max_abs_diff_px": float(diff[:, :4].max()),
        "scores_max_abs_diff": float(diff[:, 4:].max()),
        "score_diff": spread["score"],
        "box_diff": spread["box"],
        "ref_score_diff": ref["score"],
        "ref_box_diff": ref["box"],
        "anchors": spread["anchors"],
        "detections_torch": n_t,
        "detections_onnx": n_o,
        "unmatched": int(unmatched),
        "ref_unmatched": int(ref["unmatched"]),
        "tol": t,
    }
    fails = []
    for key, what in (("score", "mean |score difference|"), ("box", "mean 1-IoU of boxes")):
        lim = t["ratio"] * ref[key] + t["floor"]
        if spread[key] > lim:
            fails.append(f"{what} on {spread['anchors']} anchors is {spread[key]:.3g}, above {lim:.3g} "
                         f"({t['ratio']} x the model's own float-noise spread {ref[key]:.3g} + {t['floor']})")
    import onnx

    local = _layer_parity(ref_model, onnx.load(str(onnx_file)), x, t)
    res["layers_checked"] = local["layers"]
    res["layer_act"] = {"value": local["worst_act"][0], "limit": local["worst_act"][1], "layer": local["worst_act"][2]}
    res["layer_conv"] = {"value": local["worst_conv"][0], "limit": local["worst_conv"][1], "layer": local["worst_conv"][2]}
    if local["fails"]:
        more = f" and {len(local['fails']) - 3} more" if len(local["fails"]) > 3 else ""
        fails.append("layer-local mismatch: " + "; ".join(local["fails"][:3]) + more)
    lim = t["ratio"] * ref["unmatched"] + 1
    if unmatched > lim:
        fails.append(f"{unmatched} detection(s) (conf >= {t['conf']}) not reproduced at their anchor, more than "
                     f"{lim:g} ({t['ratio']} x {ref['unmatched']} under float noise + 1)")
    res["ok"] = not fails
    if fails and raise_error:
        raise ParityError(f"ONNX/PyTorch parity failed for {onnx_file}: " + "; ".join(fails) + f". Numbers: {_fmt_parity(res)}")
    return res


def _fmt_parity(r: dict) -> str:
    return (f"score diff {r['score_diff']:.3g} (float-noise reference {r['ref_score_diff']:.3g}), box 1-IoU "
            f"{r['box_diff']:.3g} (reference {r['ref_box_diff']:.3g}) on {r['anchors']} anchors; max|diff| "
            f"{r['max_abs_diff']:.4g} (boxes {r['boxes_max_abs_diff_px']:.4g} px, scores {r['scores_max_abs_diff']:.4g}); "
            f"detections torch/onnx {r['detections_torch']}/{r['detections_onnx']}, unmatched {r['unmatched']} "
            f"(reference {r['ref_unmatched']}); layer-local worst: act {r['layer_act']['value']:.3g} / "
            f"{r['layer_act']['limit']:.3g}, conv {r['layer_conv']['value']:.3g} / {r['layer_conv']['limit']:.3g} on "
            f"{r['layers_checked']} layers; {r['images']} image(s)")


# ----------------------------------------------------------------------------------------------------------------
# Export
# ----------------------------------------------------------------------------------------------------------------
def export_qdq_onnx(
    model,
    file=None,
    imgsz=640,
    opset: int = 21,
    images=None,
    check: bool = True,
    weight_offset: str = "add",
    verbose: bool = True,
    **parity_tol,
) -> dict:
    """Export a fake-quantized Ultralytics detection model to a Q/DQ ONNX file (opset 21, INT4 where 4-bit).

    See the module docstring for the exact operators emitted per quantizer and bit-width.

    Args:
        model (nn.Module | str | Path): A quantized ``DetectionModel`` or a ``.pt`` checkpoint path (loaded with
            ``ultralytics.nn.tasks.load_checkpoint``). It is deep-copied, never modified.
        file (str | Path | None): Output ``.onnx`` path; default: the checkpoint path with suffix ``.onnx``
            (required when ``model`` is a module).
        imgsz (int | tuple[int, int]): Input size, rounded up to a multiple of the model stride; batch is 1.
        opset (int): ONNX opset; only 21 (INT4/UINT4 types) is supported.
        images: Parity images: a tensor ``(N,3,H,W)`` in [0,1], image files, a directory, a data YAML (its val
            split); None uses :func:`generated_images` (synthetic, not natural images).
        check (bool): Run :func:`check_parity` and refuse to write the file if it fails.
        weight_offset (str): How weights whose grid has no integer zero point (DoReFa, N2UQ) are stored:
            ``"add"`` (b-bit integers + per-channel float ``Add``) or ``"widen"`` (``2k-L`` in b+1 bits).
        verbose (bool): Log progress with Ultralytics' logger.
        **parity_tol: :data:`PARITY_DEFAULTS` overrides (conf, top_k, iou, margin, nms_iou, ref_eps, ref_runs, ratio,
            floor).

    Returns:
        (dict): ``file``, ``opset``, ``imgsz``, ``output_shape``, ``ops`` (op type counts), ``int_types``
        (element types of the integer tensors), ``layers`` (per-conv rows: bits, weight and activation encoding),
        ``parity`` (the :func:`check_parity` result, or None) and ``images`` (what parity ran on).

    Raises:
        ValueError: Not a checkpoint / corrupt file, an FP model (use ``YOLO(model).export``), uninitialised
            quantizers, an unsupported opset or option.
        ParityError: ``check=True`` and the ONNX model disagrees with the PyTorch model beyond the tolerance.

    Examples:
        >>> from ultralytics.nn.tasks import DetectionModel
        >>> from ultralytics_gabfusion.quant.convert import quantize_model, init_weight_quantizers, calibrate_activations
        >>> m = DetectionModel("yolov5s.yaml", nc=16, verbose=False)
        >>> _ = quantize_model(m, "lsq", 4, 4); _ = init_weight_quantizers(m)
        >>> _ = calibrate_activations(m, [torch.rand(2, 3, 64, 64)])
        >>> info = export_qdq_onnx(m, "w4a4.onnx", imgsz=64)  # doctest: +SKIP
        >>> info["int_types"]  # doctest: +SKIP
        ['INT4', 'INT8', 'UINT8']
    """
    import onnx

    if opset not in SUPPORTED_OPSETS:
        raise ValueError(f"opset={opset} is not supported by the Q/DQ exporter: use opset=21 (INT4/UINT4 need 21).")
    if weight_offset not in ("add", "widen"):
        raise ValueError(f"weight_offset={weight_offset!r} is not valid: use 'add' or 'widen'.")
    unknown = set(parity_tol) - set(PARITY_DEFAULTS)
    if unknown:
        raise ValueError(f"unknown export_qdq_onnx arguments {sorted(unknown)}; parity tolerances: {sorted(PARITY_DEFAULTS)}")
    src_path = Path(model) if isinstance(model, (str, Path)) else None
    model = load_quantized_model(model)
    if file is None:
        if src_path is None:
            raise ValueError("file= is required when exporting a model object (no checkpoint path to derive it from).")
        file = src_path.with_suffix(".onnx")
    file = Path(file)
    if file.suffix != ".onnx":
        raise ValueError(f"file={file}: the output must end in .onnx")
    _check_initialized(model)
    stride = int(max(model.stride)) if hasattr(model, "stride") else 32
    hw = _imgsz_pair(imgsz, stride)

    exp, specs, rows = _build_export_model(model, weight_offset)
    exp = _prepare_for_onnx(exp, hw)
    im = torch.zeros(1, int(getattr(model, "yaml", {}).get("channels", 3)), *hw)
    _log(f"Q/DQ ONNX: tracing {len(rows)} quantized convs at {hw[0]}x{hw[1]} (batch 1)", verbose)

    buf = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation/tracer warnings
        torch.onnx.export(exp, im, buf, opset_version=_TRACE_OPSET, dynamo=False, input_names=["images"],
                          output_names=["output0"], custom_opsets={_DOMAIN: 1}, do_constant_folding=True)
    proto = _lower_graph(onnx.load_from_string(buf.getvalue()), specs, opset)
    for k, v in _metadata(model, hw, opset, rows, weight_offset).items():
        meta = proto.metadata_props.add()
        meta.key, meta.value = k, str(v)
    onnx.checker.check_model(proto, full_check=True)
    out_shape = tuple(d.dim_value for d in proto.graph.output[0].type.tensor_type.shape.dim)

    ops = {}
    for n in proto.graph.node:
        ops[n.op_type] = ops.get(n.op_type, 0) + 1
    int_types = sorted({onnx.TensorProto.DataType.Name(i.data_type) for i in proto.graph.initializer
                        if i.data_type not in (onnx.TensorProto.FLOAT, onnx.TensorProto.INT64)})
    file.parent.mkdir(parents=True, exist_ok=True)
    tmp = file.with_name(f".{file.stem}.{os.getpid()}.tmp.onnx")
    result = {"file": str(file), "opset": opset, "imgsz": list(hw), "output_shape": out_shape, "ops": ops,
              "int_types": int_types, "layers": rows, "parity": None, "images": None}
    try:
        onnx.save(proto, str(tmp))
        if check:
            if images is None:
                x, result["images"] = generated_images(hw, n=4), "generated synthetic images (no data given)"
            else:
                x = load_images(images, hw)
                result["images"] = f"{len(x)} image(s) from {images if not torch.is_tensor(images) else 'a tensor'}"
            result["parity"] = check_parity(model, tmp, x, **parity_tol)
            _log(f"Q/DQ ONNX parity on {result['images']}: {_fmt_parity(result['parity'])}", verbose)
        os.replace(tmp, file)
    finally:
        if tmp.exists():
            tmp.unlink()
    _log(f"Q/DQ ONNX: saved {file} ({file.stat().st_size / 1e6:.1f} MB, opset {opset}, integer types {int_types})", verbose)
    return result


# ----------------------------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------------------------
_IGNORED_FOR_QDQ = ("half", "int8", "dynamic", "simplify", "nms", "optimize", "keras", "quantize", "batch", "workspace")


def export_main(overrides: dict) -> int:
    """Handle ``yolo-gab export model=... [format=onnx] [imgsz=..] [opset=21] [data=...] [file=out.onnx]``.

    * quantized checkpoint, ``format=onnx`` (or no format): :func:`export_qdq_onnx` with a parity check on the
      ``data=`` val images (first 8) or, without ``data=``, on generated synthetic images (the log says which);
      prints the output path and the parity numbers. ``file=`` (Python callers; the CLI may not accept the key) or
      ``save_dir=`` choose the output, default: next to the checkpoint with suffix ``.onnx``.
    * quantized checkpoint, any other format: ``ValueError`` (other formats would trace the fake-quant graph in
      float, or have no integer-grid representation).
    * full-precision model: handed to Ultralytics' exporter, ``YOLO(model).export(**overrides)``.

    Args:
        overrides (dict): Parsed ``key=value`` pairs (plugin keys and ``trainer`` are ignored with a warning).

    Returns:
        (int): 0 on success, 1 when the parity check failed (the message is printed; no file is written).

    Raises:
        ValueError: Missing/invalid model, corrupt checkpoint, quantized model with a non-ONNX format.
        FileNotFoundError: The checkpoint does not exist.

    Examples:
        >>> export_main({"model": "runs/qat/weights/best.pt", "format": "onnx", "data": "data.yaml"})  # doctest: +SKIP
        0
    """
    from ultralytics.utils import LOGGER

    from .settings import PLUGIN_KEYS

    ov = dict(overrides)
    ov.pop("mode", None)
    model = ov.pop("model", None)
    if model is None:
        raise ValueError("export needs model=, e.g. yolo-gab export model=runs/qat/weights/best.pt format=onnx")
    ours = sorted(k for k in ov if k in PLUGIN_KEYS or k == "trainer")
    if ours:
        LOGGER.warning(f"yolo-gab export: ignoring training keys {ours}")
        for k in ours:
            ov.pop(k)
    path = Path(str(model))
    quantized = False
    if path.suffix == ".pt":
        if not path.is_file():
            raise FileNotFoundError(f"model={model}: file not found (no weights are downloaded by yolo-gab export).")
        net = load_quantized_model(path, require_quantized=False)
        quantized = is_quantized(net)
    if not quantized:
        bad = [k for k in ("file", "save_dir") if ov.get(k) is not None]
        if bad:
            raise ValueError(f"{bad} apply to quantized (Q/DQ) exports only; Ultralytics writes FP exports next to the weights.")
        ov.pop("file", None)
        ov.pop("save_dir", None)
        from ultralytics import YOLO

        LOGGER.info(f"yolo-gab export: {model} has no quantized layers, handing over to Ultralytics' exporter.")
        f = YOLO(str(model), task=ov.pop("task", None)).export(**ov)
        print(f"Exported {f}")
        return 0

    fmt = str(ov.pop("format", None) or "onnx").lower()
    if fmt != "onnx":
        raise ValueError(
            f"format={fmt} is not supported for quantized models: other formats would run the fake-quant graph in float "
            "(or drop the learned integer grids). Use format=onnx for the Q/DQ export."
        )
    for k in _IGNORED_FOR_QDQ:
        v = ov.get(k)
        if v in (None, False, "") or (k == "batch" and v == 1):
            continue
        LOGGER.warning(f"yolo-gab export: {k}={v} is ignored by the Q/DQ ONNX export (static batch-1 graph).")
    imgsz = ov.get("imgsz")
    if imgsz is None:
        args = getattr(net, "args", None)
        imgsz = (args.get("imgsz") if isinstance(args, dict) else None) or 640
    opset = ov.get("opset") or 21
    file = ov.get("file")
    if file is None and ov.get("save_dir"):
        file = Path(ov["save_dir"]) / path.with_suffix(".onnx").name
    from .preflight import check_writable_dir

    out = Path(str(file or path.with_suffix(".onnx")))
    check_writable_dir(out.parent, "save_dir" if ov.get("save_dir") and not ov.get("file") else "file")
    data = ov.get("data")
    if data:
        images, what = str(data), f"val images of data={data}"
    else:
        images, what = None, "generated synthetic images (pass data=... to use real validation images)"
    LOGGER.info(f"yolo-gab export: Q/DQ ONNX export of {model}; parity check on {what}")
    try:
        res = export_qdq_onnx(net, file or path.with_suffix(".onnx"), imgsz=imgsz, opset=int(opset), images=images)
    except ParityError as e:
        print(f"yolo-gab: error: {e}", file=sys.stderr)
        return 1
    p = res["parity"]
    print(f"Exported {res['file']}")
    print(f"Parity ({what}): {_fmt_parity(p)}")
    return 0
