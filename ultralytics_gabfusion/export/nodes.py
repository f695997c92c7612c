"""The ``gabq::`` placeholder nodes of the Q/DQ export and their lowering to standard ONNX operators.

Every quantizer of a quantized conv becomes one spec object (:class:`_WeightSpec`, :class:`_ActSpec`,
:class:`_N2UQSpec`) that knows (1) its exact PyTorch forward, used while tracing, where :class:`_GabqOp` records it
as a single ``gabq::<op_type>`` node, and (2) the standard opset-21 operators and integer initializers that replace
that node (``lower``). The operators emitted per method and bit-width are listed in :mod:`ultralytics_gabfusion.export`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

# onnx is imported inside the functions that build protos: it is slow to import and only needed once a graph is
# written, not to import the package.

ORT_DOMAIN = "com.microsoft"  # ONNX Runtime's contrib operators
_DOMAIN = "gabq"  # private domain of the placeholder nodes; none survives lowering


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
    "INT32": (-(2**31), 2**31 - 1),
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
                "UINT16": np.uint16, "INT32": np.int32}[container]
    if container in ("INT8", "UINT8", "INT16", "UINT16", "INT32"):
        from onnx import numpy_helper

        return numpy_helper.from_array(arr.astype(np_dtype).reshape(dims), name)
    return helper.make_tensor(name, getattr(_tp(), container), dims, arr.astype(np_dtype).reshape(-1))


def _float_tensor(name: str, values, dims=None):
    """An ONNX float32 initializer (reshaped to ``dims`` when given)."""
    from onnx import numpy_helper

    arr = np.asarray(values, dtype=np.float32)
    if dims is not None:
        arr = arr.reshape(dims)
    return numpy_helper.from_array(arr, name)


def _int_tensor_i64(name, values, dims=None):
    """An ONNX INT64 initializer (axes, positions and steps of the lowered N2UQ count)."""
    from onnx import numpy_helper

    arr = np.asarray(values, dtype=np.int64)
    return numpy_helper.from_array(arr.reshape(dims) if dims is not None else arr, name)


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
class _BiasSpec:
    """Integer bias of an integer conv: ``b = k * scale`` per output channel, ``scale = input step x weight step``.

    Written when the conv's output is quantized (``qat_out_bits``): ``DequantizeLinear -> Conv -> QuantizeLinear``
    then becomes one integer kernel whose int32 accumulator takes ``k`` as it is; the fake-quant model rounds its
    folded bias the same way (:func:`~ultralytics_gabfusion.quant.qconv.bias_rounding`).
    """

    key: str
    ints: np.ndarray  # int64 (C,)
    scale: np.ndarray  # float32 (C,)
    op_type: str = "BiasDQ"

    def forward(self, b: torch.Tensor) -> torch.Tensor:  # the traced input is already the dequantized bias
        return b.clone()

    def lower(self, inp: str, out: str):
        from onnx import helper

        k = self.key
        inits = [_int_tensor(f"{k}/b_int", "INT32", self.ints), _float_tensor(f"{k}/b_scale", self.scale),
                 _int_tensor(f"{k}/b_zero_point", "INT32", np.zeros_like(self.ints))]
        return [helper.make_node("DequantizeLinear", [f"{k}/b_int", f"{k}/b_scale", f"{k}/b_zero_point"], [out],
                                 name=f"{k}/BiasDequantize", axis=0)], inits


@dataclass
class _ActSpec:
    """Uniform per-tensor activation grid ``offset + k*scale``, k in [qmin, qmax] (LSQ, LSQ+, PACT).

    With an integer ``zero_point`` z (``offset == -z*scale``) the grid is ``(k - z)*scale`` and is written as plain
    ``QuantizeLinear``/``DequantizeLinear`` with that zero point (``offset`` is then 0.0 here); otherwise the float
    offset is subtracted before and added after them.
    """

    key: str
    method: str
    bits: int
    scale: float  # float32 value
    offset: float  # float32 value (0.0: no Sub/Add)
    qmin: int
    qmax: int
    container: str
    zero_point: int = 0
    op_type: str = "ActQDQ"

    @property
    def clip(self) -> bool:
        lo, hi = _CONTAINER_RANGE[self.container]
        return (self.qmin, self.qmax) != (lo, hi)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = torch.tensor(self.scale, dtype=torch.float32)
        b = torch.tensor(self.offset, dtype=torch.float32)
        v = x - b if self.offset != 0.0 else x
        z = float(self.zero_point)
        q = torch.round(v / s) + z if z else torch.round(v / s)
        y = (q.clamp(self.qmin, self.qmax) - z) * s if z else q.clamp(self.qmin, self.qmax) * s
        return y + b if self.offset != 0.0 else y

    def describe(self) -> str:
        s = f"QuantizeLinear/DequantizeLinear {self.container}" + (f" zp={self.zero_point}" if self.zero_point else "")
        if self.clip:
            s += f" + Clip[{self.qmin},{self.qmax}]"
        if self.offset != 0.0:
            s = f"Sub(offset) -> {s} -> Add(offset)"
        return s

    def lower(self, inp: str, out: str):
        from onnx import helper

        k = self.key
        inits = [_float_tensor(f"{k}/a_scale", self.scale, ()),
                 _int_tensor(f"{k}/a_zero_point", self.container, self.zero_point, ())]
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

        k = self.key
        inits = [_float_tensor(f"{k}/n2uq_beta1", self.beta1, ()),
                 _float_tensor(f"{k}/n2uq_out_scale", self.out_scale, ()),
                 _int_tensor(f"{k}/n2uq_zero_point", self.container, 0, ())]
        nodes = [helper.make_node("Mul", [inp, f"{k}/n2uq_beta1"], [f"{k}/n2uq_xs"], name=f"{k}/N2UQScaleIn")]
        count_nodes, count_inits = self._count_broadcast() if self.form == "broadcast" else self._count_binary_search()
        nodes += count_nodes
        inits += count_inits
        dq_out = out if self.shift is None else f"{k}/n2uq_dq"
        nodes += [
            helper.make_node("Cast", [f"{k}/n2uq_count"], [f"{k}/n2uq_level"], name=f"{k}/N2UQCastLevel",
                             to=getattr(_tp(), self.container)),
            helper.make_node("DequantizeLinear", [f"{k}/n2uq_level", f"{k}/n2uq_out_scale", f"{k}/n2uq_zero_point"],
                             [dq_out], name=f"{k}/N2UQDequantize"),
        ]
        if self.shift is not None:
            inits.append(_float_tensor(f"{k}/n2uq_shift", self.shift, ()))
            nodes.append(helper.make_node("Add", [dq_out, f"{k}/n2uq_shift"], [out], name=f"{k}/N2UQAddShift"))
        return nodes, inits

    def _count_broadcast(self):
        """``n2uq_count = ReduceSum_i (x' > T_i)``: the thresholds vector broadcasts on a new last axis."""
        from onnx import helper

        k = self.key
        inits = [_float_tensor(f"{k}/n2uq_thresholds", self.thresholds), _int_tensor_i64(f"{k}/n2uq_axes", [-1])]
        nodes = [
            helper.make_node("Unsqueeze", [f"{k}/n2uq_xs", f"{k}/n2uq_axes"], [f"{k}/n2uq_xu"], name=f"{k}/N2UQUnsqueeze"),
            helper.make_node("Greater", [f"{k}/n2uq_xu", f"{k}/n2uq_thresholds"], [f"{k}/n2uq_gt"], name=f"{k}/N2UQGreater"),
            helper.make_node("Cast", [f"{k}/n2uq_gt"], [f"{k}/n2uq_gt_i"], name=f"{k}/N2UQCastInt", to=_tp().INT32),
            helper.make_node("ReduceSum", [f"{k}/n2uq_gt_i", f"{k}/n2uq_axes"], [f"{k}/n2uq_count"],
                             name=f"{k}/N2UQCount", keepdims=0),
        ]
        return nodes, inits

    def _count_binary_search(self):
        """``n2uq_count`` by a branchless binary search (lower bound) over the sorted thresholds.

        ``pos <- pos + step`` while ``T[pos + step - 1] < x'``, steps 2^(b-1) .. 1. L = 2^b - 1, so pos + step never
        exceeds L. The table is shifted by one ([-inf, T_0, ..]) so that Gather(T_shift, pos + step) reads
        T[pos + step - 1].
        """
        from onnx import helper

        k = self.key
        L = len(self.thresholds)
        steps = [1 << i for i in range(self.bits - 1, -1, -1)]
        assert sum(steps) == L, "binary search needs 2^b - 1 thresholds"
        t_shift = np.concatenate([np.array([-np.inf], np.float32), self.thresholds])
        inits = [_float_tensor(f"{k}/n2uq_thresholds_shifted", t_shift)]
        first = steps[0]
        inits += [_float_tensor(f"{k}/n2uq_t_first", self.thresholds[first - 1], ()),
                  _int_tensor_i64(f"{k}/n2uq_step0", first, ())]
        nodes = [
            helper.make_node("Greater", [f"{k}/n2uq_xs", f"{k}/n2uq_t_first"], [f"{k}/n2uq_g0"], name=f"{k}/N2UQGreater0"),
            helper.make_node("Cast", [f"{k}/n2uq_g0"], [f"{k}/n2uq_g0_i"], name=f"{k}/N2UQCast0", to=_tp().INT64),
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
        return nodes, inits


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


# ----------------------------------------------------------------------------------------------------------------
# Lowering
# ----------------------------------------------------------------------------------------------------------------
def _lower_graph(proto, specs: dict, opset: int, ort_silu: bool = False):
    """Replace the ``gabq::`` placeholders by standard operators, drop dead tensors, set the opset; ``ort_silu``:
    SiLU as ONNX Runtime's ``QuickGelu`` (:func:`_silu_as_quickgelu`)."""
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
    ops = [o for o in proto.opset_import if o.domain not in ("", "ai.onnx", _DOMAIN, ORT_DOMAIN)]
    if ort_silu and _silu_as_quickgelu(graph):
        ops.append(helper.make_opsetid(ORT_DOMAIN, 1))
    del proto.opset_import[:]
    proto.opset_import.extend([helper.make_opsetid("", opset), *ops])
    proto.ir_version = 10  # INT4 needs IR >= 10; Ultralytics also caps at 10 for ONNX Runtime compatibility
    return proto


def _silu_as_quickgelu(graph) -> int:
    """Write each traced SiLU, ``Mul(x, Sigmoid(x))``, as ONNX Runtime's ``com.microsoft.QuickGelu`` (alpha 1:
    ``x * sigmoid(x)``, the same function); returns how many.

    ONNX Runtime fuses that pattern into ``QuickGelu`` in a float graph, but not after a ``DequantizeLinear``: it
    gives the dequantized conv output one copy per consumer (Sigmoid and Mul), so SiLU cost two dequantizations and
    two float passes between integer convolutions. Written as one node it is one of each. Standard ONNX's ``Swish``
    (opset 24) is expanded back into Sigmoid and Mul by ONNX Runtime 1.32 (1.56x against 1.81x the FP model in one
    comparison at 640 px), so the contrib operator is used; OpenVINO reads it too.
    """
    from onnx import helper

    producer = {o: n for n in graph.node for o in n.output}
    consumers: dict[str, int] = {}
    for n in graph.node:
        for i in n.input:
            consumers[i] = consumers.get(i, 0) + 1
    outputs = {o.name for o in graph.output}
    drop, fused = set(), {}
    for n in graph.node:
        if n.op_type != "Mul" or n.domain not in ("", "ai.onnx") or len(n.input) != 2:
            continue
        for x, s in (n.input, n.input[::-1]):
            sig = producer.get(s)
            if (sig is not None and sig.op_type == "Sigmoid" and sig.input[0] == x and consumers.get(s) == 1
                    and s not in outputs):
                drop.add(id(sig))
                fused[id(n)] = helper.make_node("QuickGelu", [x], list(n.output), name=(n.name or s) + "/QuickGelu",
                                                domain=ORT_DOMAIN, alpha=1.0)
                break
    nodes = [fused.get(id(n), n) for n in graph.node if id(n) not in drop]
    del graph.node[:]
    graph.node.extend(nodes)
    return len(fused)


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
