"""Q/DQ ONNX export of a fake-quantized detection model (:func:`export_qdq_onnx`); format in the package docstring."""

from __future__ import annotations

import copy
import io
import json
import os
import warnings
from datetime import datetime
from pathlib import Path

import torch
import torch.nn as nn
from ultralytics import __version__ as ul_version
from ultralytics.nn.tasks import guess_model_task
from ultralytics.utils import LOGGER

from ..quant.grids import snap_zero_points
from ..quant.qconv import output_quantizers
from ..version import __version__
from .fold import _build_export_model, _check_initialized
from .inputs import _imgsz_pair, generated_images, load_images, load_quantized_model
from .nodes import _DOMAIN, _lower_graph
from .parity import PARITY_DEFAULTS, _check_parity, _fmt_parity, _tolerance

# onnx is imported inside the functions that use it: it is slow to import and only needed once a graph is written.

# ONNX opsets this exporter writes: INT4/UINT4 tensors need opset 21; later opsets are not verified here.
SUPPORTED_OPSETS = (21,)
_TRACE_OPSET = 20  # highest opset of torch's TorchScript ONNX exporter; raised to 21 after lowering
SILU_FORMS = ("auto", "standard", "ort")


def _log(msg: str, verbose: bool = True) -> None:
    if verbose:
        LOGGER.info(msg)


# ----------------------------------------------------------------------------------------------------------------
# The file's outputs and metadata, as Ultralytics' own format=onnx export writes them
# ----------------------------------------------------------------------------------------------------------------
def _task(model: nn.Module) -> str:
    """The Ultralytics task of ``model`` (``detect``, ``segment``, ``pose``, ...), from its head when not set."""
    return getattr(model, "task", None) or guess_model_task(model)


def _output_names(model: nn.Module) -> list[str]:
    """ONNX output names: ``output0`` (decoded anchors), plus ``output1`` (mask prototypes) for segmentation."""
    return ["output0", "output1"] if _task(model) == "segment" else ["output0"]


def _task_metadata(model: nn.Module) -> dict:
    """The task keys of the ONNX ``metadata_props``: ``task``, and for pose ``kpt_shape`` (and ``kpt_names``)."""
    meta = {"task": _task(model)}
    if meta["task"] == "pose":
        meta["kpt_shape"] = model.model[-1].kpt_shape
        if hasattr(model, "kpt_names"):
            meta["kpt_names"] = model.kpt_names
    return meta


def _metadata(model: nn.Module, imgsz, opset: int, rows: list, weight_offset: str, int4: bool = True,
              zero_point: str = "snap", batch: int = 1, silu: str = "standard") -> dict:
    """``metadata_props`` of the file: Ultralytics' keys (so ``YOLO("model.onnx")`` works) and ``quantization``.

    The task keys of :func:`_task_metadata` (segment / pose: ``task``, ``kpt_shape``) replace the default ``task``
    in place and follow the other keys.
    """
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
        "zero_point": zero_point,
        "int4": int4,
        "silu": silu,
        "bits": sorted({(r["w_bits"], r["a_bits"]) for r in rows}, key=str),
        "layers": [{k: r[k] for k in ("name", "method", "w_bits", "a_bits", "weight", "weight_range", "act")} for r in rows],
    }
    data = model.args.get("data", "") if isinstance(getattr(model, "args", None), dict) else ""
    meta = {
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
        "batch": batch,
        "imgsz": list(imgsz),
        "names": names,
        "args": {"batch": batch, "imgsz": list(imgsz), "dynamic": False, "nms": False, "half": False, "opset": opset},
        "channels": int(getattr(model, "yaml", {}).get("channels", 3)),
        "end2end": False,
        "quantization": json.dumps(quant, default=str),
    }
    meta.update(_task_metadata(model))
    return meta


def export_qdq_onnx(
    model,
    file=None,
    imgsz=640,
    opset: int = 21,
    images=None,
    check: bool = True,
    weight_offset: str = "add",
    zero_point: str = "exact",
    int4: bool = True,
    batch: int = 1,
    silu: str = "auto",
    verbose: bool = True,
    **parity_tol,
) -> dict:
    """Export a fake-quantized Ultralytics detection model to a Q/DQ ONNX file (opset 21, INT4 where 4-bit).

    See :mod:`ultralytics_gabfusion.export` for the exact operators emitted per quantizer and bit-width.

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
        zero_point (str): Activation grids whose offset is not a multiple of the step (the SiLU offset of LSQ/PACT,
            LSQ+'s beta): ``"exact"`` (default) keeps the trained offsets as float ``Sub``/``Add`` around Q/DQ (the
            model's own arithmetic, but no runtime runs those convs on integers); ``"snap"`` moves each offset to the
            nearest multiple, an integer zero point, so the graph is plain Q/DQ that INT8 runtimes fuse into integer
            convolutions (every level moves by less than half a step, which costs accuracy at 4 bits unless the
            model was trained with ``qat_act_zp=integer``; parity is checked against the snapped model). Grids
            already on integer zero points are written as plain Q/DQ in both modes.
        batch (int): Static batch size of the graph. Parity runs image by image, so ``batch > 1`` needs
            ``check=False`` (export the same model at batch 1 to check it).
        int4 (bool): Store 4-bit integers in ``INT4``/``UINT4`` (default: half the size). False: in 8-bit
            containers with a range ``Clip``, which INT8 kernels (OpenVINO) execute as integer convolutions.
        silu (str): How SiLU is written: ``"standard"`` (``Sigmoid``, ``Mul``), ``"ort"`` (ONNX Runtime's
            ``com.microsoft.QuickGelu``, one kernel: with conv output quantizers ONNX Runtime otherwise dequantizes
            each conv output twice and runs SiLU as two float passes between its integer convolutions) or
            ``"auto"`` (default: ``"ort"`` when the model has conv output quantizers, ``qat_out_bits``, whose file is
            made for ONNX Runtime; ``"standard"`` otherwise).
        verbose (bool): Log progress with Ultralytics' logger.
        **parity_tol: :data:`PARITY_DEFAULTS` overrides (conf, top_k, iou, margin, nms_iou, ref_eps, ref_runs, ratio,
            floor).

    Returns:
        (dict): ``file``, ``opset``, ``imgsz``, ``output_shape``, ``ops`` (op type counts), ``int_types``
        (element types of the integer tensors), ``layers`` (per-conv rows: bits, weight and activation encoding),
        ``zero_points`` (the :func:`~ultralytics_gabfusion.quant.grids.snap_zero_points` rows), ``parity`` (the :func:`check_parity` result, or None) and ``images`` (what parity ran on).

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
    return _export_qdq(model, file, imgsz, opset, images, check, weight_offset, zero_point, int4, batch, verbose,
                       silu=silu, **parity_tol)[0]


def _export_qdq(model, file=None, imgsz=640, opset: int = 21, images=None, check: bool = True,
                weight_offset: str = "add", zero_point: str = "exact", int4: bool = True, batch: int = 1,
                verbose: bool = True, silu: str = "auto", **parity_tol):
    """:func:`export_qdq_onnx`, also returning the written ``onnx.ModelProto`` (for callers that read the graph or
    its metadata: no reload of the file).

    The model is loaded once (when a path is given) and handed down: the exported copy and the parity reference
    are built from it, never from the file again.
    """
    opset, silu = _check_options(opset, weight_offset, zero_point, parity_tol, silu)
    if not isinstance(batch, int) or batch < 1:
        raise ValueError(f"batch={batch!r} is not valid: a positive integer.")
    if batch > 1 and check:
        raise ValueError(f"batch={batch}: parity is checked at batch 1; pass check=False (and check the batch-1 export).")
    src_path = Path(model) if isinstance(model, (str, Path)) else None
    model = load_quantized_model(model)
    file = _output_file(file, src_path)
    _check_initialized(model)
    snapped = []
    own_copy = zero_point == "snap"
    if own_copy:
        model = copy.deepcopy(model)  # the caller's model keeps its trained offsets
        snapped = snap_zero_points(model)
        model.float().eval()  # already what the parity reference needs: check_parity uses it without another copy
        moved = [r for r in snapped if r["snapped"] is not None]
        if moved:
            _log(f"Q/DQ ONNX: {len(moved)} activation grid offsets moved to integer zero points (largest move "
                 f"{max(abs(r['shift_steps']) for r in moved):.2f} step); zero_point=exact keeps them", verbose)
    out_quant = any(output_quantizers(model))
    if int4 and out_quant:
        int4 = False
        _log("Q/DQ ONNX: 4-bit grids in 8-bit containers: the model quantizes its conv outputs (qat_out_bits) for "
             "ONNX Runtime's integer convolutions, which take no INT4", verbose)
    if silu == "auto":
        silu = "ort" if out_quant else "standard"
    stride = int(max(model.stride)) if hasattr(model, "stride") else 32
    hw = _imgsz_pair(imgsz, stride)
    proto, data, rows = _trace_qdq(model, hw, opset, weight_offset, verbose, int4, zero_point, batch, silu)
    out_shape, ops, int_types = _graph_summary(proto)
    result = {"file": str(file), "opset": opset, "silu": silu, "imgsz": list(hw), "output_shape": out_shape, "ops": ops,
              "int_types": int_types, "layers": rows, "zero_points": snapped, "parity": None, "images": None}
    _save_checked(proto, data, file, result, verbose, check=check, model=model, own_copy=own_copy, images=images,
                  hw=hw, parity_tol=parity_tol)
    _log(f"Q/DQ ONNX: saved {file} ({len(data) / 1e6:.1f} MB, opset {opset}, integer types {int_types})", verbose)
    return result, proto


def check_opset(opset) -> int:
    """Return the opset to write (None: the default), or refuse one the exporter does not write, naming it."""
    if opset is not None and (isinstance(opset, bool) or opset not in SUPPORTED_OPSETS):  # 0 is not "no opset" here
        raise ValueError(f"opset={opset} is not supported by the Q/DQ exporter: use opset=21 (INT4/UINT4 need 21) "
                         "or leave opset out.")
    return SUPPORTED_OPSETS[-1] if opset is None else int(opset)


def check_silu(silu) -> str:
    """Return the SiLU form (``auto``, ``standard``, ``ort``), or refuse another value, naming the valid ones."""
    if str(silu).lower() not in SILU_FORMS:
        raise ValueError(f"silu={silu!r} is not valid: use {', '.join(SILU_FORMS)} (ort: SiLU as ONNX Runtime's "
                         "QuickGelu; auto: ort when the model quantizes its conv outputs).")
    return str(silu).lower()


def _check_options(opset: int, weight_offset: str, zero_point: str, parity_tol: dict,
                   silu: str = "auto") -> tuple[int, str]:
    """Refuse an unsupported opset, weight encoding, SiLU form or parity tolerance key before any work is done;
    returns the opset to write and the SiLU form (lower case)."""
    opset, silu = check_opset(opset), check_silu(silu)
    if weight_offset not in ("add", "widen"):
        raise ValueError(f"weight_offset={weight_offset!r} is not valid: use 'add' or 'widen'.")
    if zero_point not in ("snap", "exact"):
        raise ValueError(f"zero_point={zero_point!r} is not valid: use 'snap' (integer zero points) or 'exact'.")
    unknown = set(parity_tol) - set(PARITY_DEFAULTS)
    if unknown:
        raise ValueError(f"unknown export_qdq_onnx arguments {sorted(unknown)}; parity tolerances: {sorted(PARITY_DEFAULTS)}")
    return opset, silu


def _output_file(file, src_path: Path | None) -> Path:
    """The ``.onnx`` output path: ``file``, else the checkpoint path with suffix ``.onnx``."""
    if file is None:
        if src_path is None:
            raise ValueError("file= is required when exporting a model object (no checkpoint path to derive it from).")
        file = src_path.with_suffix(".onnx")
    file = Path(file)
    if file.suffix != ".onnx":
        raise ValueError(f"file={file}: the output must end in .onnx")
    return file


def _trace_qdq(model: nn.Module, hw: tuple[int, int], opset: int, weight_offset: str, verbose: bool, int4: bool = True,
               zero_point: str = "snap", batch: int = 1, silu: str = "standard"):
    """Trace the deployment copy of ``model`` with ``gabq::`` placeholders, lower them, add metadata, check.

    Returns:
        (tuple): the checked ``onnx.ModelProto``, its serialization (checked, and written as is) and the per-layer
        rows.
    """
    import onnx

    exp, specs, rows = _build_export_model(model, hw, weight_offset, int4)
    im = torch.zeros(batch, int(getattr(model, "yaml", {}).get("channels", 3)), *hw)
    _log(f"Q/DQ ONNX: tracing {len(rows)} quantized convs at {hw[0]}x{hw[1]} (batch {batch})", verbose)

    buf = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation/tracer warnings
        torch.onnx.export(exp, im, buf, opset_version=_TRACE_OPSET, dynamo=False, input_names=["images"],
                          output_names=_output_names(model), custom_opsets={_DOMAIN: 1}, do_constant_folding=True)
    proto = _lower_graph(onnx.load_from_string(buf.getvalue()), specs, opset, ort_silu=silu == "ort")
    for k, v in _metadata(model, hw, opset, rows, weight_offset, int4, zero_point, batch, silu).items():
        meta = proto.metadata_props.add()
        meta.key, meta.value = k, str(v)
    data = proto.SerializeToString()  # once: the checker reads these bytes and the file gets them
    onnx.checker.check_model(data, full_check=True)
    return proto, data, rows


def _graph_summary(proto):
    """``(output shape, {op type: count}, sorted element types of the integer initializers)``."""
    import onnx

    out_shape = tuple(d.dim_value for d in proto.graph.output[0].type.tensor_type.shape.dim)
    ops = {}
    for n in proto.graph.node:
        ops[n.op_type] = ops.get(n.op_type, 0) + 1
    int_types = sorted({onnx.TensorProto.DataType.Name(i.data_type) for i in proto.graph.initializer
                        if i.data_type not in (onnx.TensorProto.FLOAT, onnx.TensorProto.INT64)})
    return out_shape, ops, int_types


def _save_checked(proto, data: bytes, file: Path, result: dict, verbose: bool, check: bool, model: nn.Module,
                  own_copy: bool, images, hw, parity_tol: dict) -> None:
    """Write ``data`` (``proto`` serialized) under a temporary name next to ``file``, check parity (``check``), then
    rename it to ``file``.

    Parity runs on ``images``, or on :func:`generated_images` when None, and fills ``result["parity"]`` and
    ``result["images"]``; it gets ``proto`` rather than reading the file back, and ``model`` itself as its reference
    when ``own_copy`` (the exporter's private float32 eval copy). On any failure the temporary file is removed and
    ``file`` is left untouched.
    """
    file.parent.mkdir(parents=True, exist_ok=True)
    tmp = file.with_name(f".{file.stem}.{os.getpid()}.tmp.onnx")
    try:
        tmp.write_bytes(data)  # what onnx.save writes for a model without external data
        if check:
            if images is None:
                x, result["images"] = generated_images(hw, n=4), "generated synthetic images (no data given)"
            else:
                x = load_images(images, hw)
                result["images"] = f"{len(x)} image(s) from {images if not torch.is_tensor(images) else 'a tensor'}"
            result["parity"] = _check_parity(model, tmp, x, _tolerance(parity_tol), proto=proto,
                                             copy_model=not own_copy)
            _log(f"Q/DQ ONNX parity on {result['images']}: {_fmt_parity(result['parity'])}", verbose)
        os.replace(tmp, file)
    finally:
        if tmp.exists():
            tmp.unlink()
