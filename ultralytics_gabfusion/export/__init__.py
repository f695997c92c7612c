"""Q/DQ ONNX export of fake-quantized (LSQ, LSQ+, PACT/DoReFa, N2UQ) Ultralytics detection, segmentation and pose models.

A QAT checkpoint evaluates its quantizers in float ("fake quantization"). Exporting it with Ultralytics' own
exporter would trace that float arithmetic and lose the integer grids, so quantized models get their own ONNX
path here; full-precision models are handed to Ultralytics unchanged (:func:`export_main`).

What :func:`export_qdq_onnx` does:

1. Deep-copies the model (the caller's model is never modified), puts it in eval mode and checks that every
   quantizer was initialised (calibrated / trained).
2. Folds every BatchNorm into its :class:`~ultralytics_gabfusion.quant.qconv.QuantConv2d` *exactly*: with
   ``f_c = gamma_c / sqrt(var_c + eps)`` the quantized weight ``W_c = off_c + k*s_c`` becomes
   ``f_c*W_c = F_c*off_c + k*(F_c*s_c)`` with ``F_c = |f_c|``. A negative ``f_c`` on a signed grid (LSQ, LSQ+)
   is moved into the integers, ``k' = -k``, where ``-k`` stays in ``[qmin, qmax]`` (not where ``k = qmin``), and
   otherwise kept as a negative channel scale ``f_c*s_c``: the zero point stays 0 either way, which integer
   convolution kernels require. On unsigned grids (DoReFa, N2UQ) the grid is mirrored, ``k' = qmin + qmax - k``,
   ``off'_c = -F_c*(off_c + (qmin+qmax)*s_c)``. The bias becomes ``beta - mu*f + b*f``. Weights are quantized to
   integers offline.
3. Replaces each quantized conv by a module whose input/weight quantizers, read only through their
   :meth:`~ultralytics_gabfusion.quant.quantizers.FakeQuantizer.export_spec`, are traced as custom ``gabq::`` nodes
   (the installed torch's TorchScript exporter stops at opset 20 and cannot emit INT4), exports with
   ``torch.onnx.export(..., dynamo=False, opset_version=20)`` and lowers the ``gabq::`` nodes to standard ONNX
   opset-21 operators with the ``onnx`` package (below). The other opset-20 operators of the graph have the same
   semantics at opset 21 (opset 21 only added INT4/UINT4/float8 types to them), so the opset import is raised.
   With ``silu="ort"`` (the default for models with conv output quantizers, ``qat_out_bits``) each SiLU
   ``Mul(x, Sigmoid(x))`` is written as ONNX Runtime's ``com.microsoft.QuickGelu`` (alpha 1, the same function):
   ONNX Runtime then dequantizes each integer conv output once and runs SiLU as one kernel.
4. Runs ``onnx.checker`` (full check with shape inference) and, with ``check=True``, :func:`check_parity` against the
   original fake-quant PyTorch model. The file is written under a temporary name in the target directory and
   renamed only after both passed.

Emitted operators (``b`` = bits; container = element type of the tensor holding the integers; Q/DQ =
``QuantizeLinear``/``DequantizeLinear``):

* **Weights, every method**: ``DequantizeLinear(k, scale[C], zero_point[C], axis=0) -> Conv``, ``k`` an
  initializer. Container ``INT4``/``UINT4`` for b=4 (``int4=False``: 8-bit), ``INT8``/``UINT8`` for b=8 and for b
  in 2, 3, 5, 6, 7 (the integers are checked against the container at export; the range is recorded per layer in
  the ``quantization`` metadata). LSQ/LSQ+ grids (``k*s``, signed) are exact with zero point 0.
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
  ``zero_point="snap"`` first moves each movable offset to the nearest multiple of its step
  (:func:`~ultralytics_gabfusion.quant.grids.snap_zero_points`), giving plain ``QuantizeLinear ->
  DequantizeLinear`` with integer zero point ``z``: the pattern integer runtimes execute (:mod:`.openvino`).
  A model trained with ``qat_act_zp=integer`` already has every such offset on a multiple of its step (signed
  PACT: the symmetric signed grid, zero point 0), so both modes write that plain Q/DQ graph and the snap moves
  nothing.
* **N2UQ activations**: ``count = sum_i (beta1*x > T_i)`` over the 2^b-1 learned thresholds (compared in the
  ``beta1``-scaled domain exactly as the PyTorch forward, ``torch.bucketize``: ``x == T`` does not count), output
  ``count*Delta*beta2 + input_shift``. For b <= 4: ``Mul(beta1) -> Unsqueeze(-1) -> Greater(T[L]) -> Cast(INT32)
  -> ReduceSum(-1)``; for b >= 5, where that broadcast would hold 2^b-1 copies of the tensor, a branchless binary
  search over the sorted thresholds: ``Greater -> Cast -> Mul`` for the first step, then ``b-1`` rounds of
  ``Add -> Gather(T) -> Greater -> Where`` on an INT64 position. Both end in ``Cast(UINT4|UINT8) ->
  DequantizeLinear(count, Delta*beta2, 0) -> Add(input_shift)``, so the integer level is explicit in the graph.

GABFusion nodes are exported as traced float operators (softmax-weighted ``Concat`` and the channel LayerNorm
as ``ReduceMean``/``Sub``/``Mul``/``Sqrt``/``Div`` ...); a model already folded with ``fold_gabfusion`` exports its
``FoldedFusion`` affine as ``Mul``/``Add``. The head is exported as Ultralytics does for ``format=onnx`` (batch 1,
static shape): ``output0`` ``(1, 4+nc, anchors)`` with decoded boxes for Detect, ``(1, 4+nc+nm, anchors)`` (mask
coefficients) plus ``output1`` ``(1, nm, h/4, w/4)`` (mask prototypes; the prototype upsampling
``ConvTranspose2d`` stays float) for Segment, ``(1, 4+nc+nk, anchors)`` (decoded keypoints) for Pose; end-to-end
(NMS-free) heads are refused. The DFL box decoder takes its softmax over the last axis (the same values; ONNX
Runtime's softmax over a middle axis transposes and cost a YOLOv5n file 4 ms of 27 at 640 px). Ultralytics' metadata keys are stored in ``metadata_props`` (``task``, ``kpt_shape``
for pose, plus ``quantization``, a JSON summary), so ``YOLO("model.onnx")`` predicts and validates through ONNX
Runtime.

Layout: :mod:`.qdq` (:func:`export_qdq_onnx`), :mod:`.openvino` (OpenVINO INT8 IR from the Q/DQ graph),
:mod:`.fold` (BN folding, deployment copy of the model),
:mod:`.nodes` (the ``gabq::`` placeholders and their lowering), :mod:`.parity` (:func:`check_parity`),
:mod:`.inputs` (checkpoint and image loading), :mod:`.command` (``yolo-gab export``).

Examples:
    >>> from ultralytics_gabfusion.export import export_qdq_onnx
    >>> info = export_qdq_onnx("runs/qat/weights/best.pt", "best-w4a4.onnx", imgsz=640, images="data.yaml")  # doctest: +SKIP
    >>> info["parity"]["ok"]  # doctest: +SKIP
    True
"""

from .command import export_main

# _image_files is private but imported from here by the study scripts and tests.
from .inputs import _image_files, generated_images, load_images, load_quantized_model  # noqa: F401
from .parity import PARITY_DEFAULTS, ParityError, check_parity
from .qdq import SUPPORTED_OPSETS, export_qdq_onnx

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
