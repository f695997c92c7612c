"""The ``yolo-gab export`` command: Q/DQ ONNX for quantized checkpoints, Ultralytics' exporter for FP models."""

from __future__ import annotations

import sys
from pathlib import Path

from ultralytics import YOLO
from ultralytics.utils import LOGGER

from ..preflight import check_imgsz, check_writable_dir
from ..quant.qconv import is_quantized
from ..settings import PLUGIN_KEYS
from .inputs import _image_files, load_quantized_model
from .openvino import export_openvino
from .ort_kernels import ORT_INT_CONVS, ort_conv_kernels
from .parity import ParityError, _fmt_parity
from .qdq import check_opset, check_silu, export_qdq_onnx

_IGNORED_FOR_QDQ = ("half", "int8", "dynamic", "simplify", "nms", "optimize", "keras", "quantize", "batch", "workspace")


def export_main(overrides: dict) -> int:
    """Handle ``yolo-gab export model=... [format=onnx] [imgsz=..] [opset=21] [data=...] [file=out.onnx]``.

    * quantized checkpoint, ``format=onnx`` (or no format): :func:`export_qdq_onnx` with a parity check on the
      ``data=`` val images (first 8) or, without ``data=``, on generated synthetic images (the log says which);
      prints the output path and the parity numbers. ``file=`` (Python callers; the CLI may not accept the key) or
      ``save_dir=`` choose the output, default: next to the checkpoint with suffix ``.onnx``.
    * quantized checkpoint, ``format=openvino``: :func:`~.openvino.export_openvino`, an ``<name>_openvino_model/``
      directory whose convolutions run on OpenVINO's INT8 kernels with the learned grids (activation offsets moved
      to integer zero points; the same parity check on the intermediate Q/DQ graph).
    * ``zero_point=exact|snap``, ``int4=True|False`` and ``silu=auto|standard|ort`` (ONNX) are passed to
      :func:`export_qdq_onnx`.
    * quantized checkpoint, any other format: ``ValueError`` (other formats would trace the fake-quant graph in
      float, or have no integer-grid representation).
    * full-precision model: handed to Ultralytics' exporter, ``YOLO(model).export(**overrides)``.
    * checked first, before any file is written: ``batch`` a positive integer (both paths), ``opset`` 21, ``silu``
      and ``data=`` holding images (quantized models).

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
    ov = dict(overrides)
    ov.pop("mode", None)
    model = ov.pop("model", None)
    if model is None:
        raise ValueError("export needs model=, e.g. yolo-gab export model=runs/qat/weights/best.pt format=onnx")
    _drop_training_keys(ov)
    _check_batch(ov)
    path = Path(str(model))
    net = None
    if path.suffix == ".pt":
        if not path.is_file():
            raise FileNotFoundError(f"model={model}: file not found (no weights are downloaded by yolo-gab export).")
        net = load_quantized_model(path, require_quantized=False)
        _check_export_imgsz(net, ov.get("imgsz"))
    if net is None or not is_quantized(net):
        return _export_fp(model, ov)
    return _export_quantized(net, model, path, ov)


def _check_export_imgsz(net, imgsz) -> None:
    """Refuse an explicit ``imgsz`` that train refuses (<= 0, not a multiple of the model's largest stride).

    Both exporters would otherwise write a model at another size than asked (each rounds up to a stride multiple:
    ``imgsz=-1`` becomes 32, ``100`` becomes 128), and the Q/DQ graph is static. Checked for ``.pt`` models, whose
    stride is known once loaded; other FP sources (YAML, ONNX) are left to Ultralytics.
    """
    if imgsz is not None:
        check_imgsz(imgsz, int(max(net.stride)) if hasattr(net, "stride") else 32)


def _check_batch(ov: dict) -> None:
    """Refuse a ``batch`` that is not a positive integer (both exporters: Ultralytics fails deep in tracing on 0 or
    -1, and the Q/DQ path would ignore it and write a file); ``2.0`` is taken as 2."""
    v = ov.get("batch")
    if v is None:
        return
    if isinstance(v, bool) or not (isinstance(v, int) or (isinstance(v, float) and v.is_integer())) or v < 1:
        raise ValueError(f"batch={v} is not valid: the batch size must be a positive integer, e.g. batch=1.")
    ov["batch"] = int(v)


def _say_if_slow_in_ort(onnx_file) -> None:
    """One line when ONNX Runtime would run the file's convolutions in float (slower than the FP model there)."""
    k = ort_conv_kernels(onnx_file)
    if not any(k.get(op) for op in ORT_INT_CONVS):
        print(f"Note: ONNX Runtime runs this Q/DQ file's {sum(k.values())} convolutions in float on dequantized "
              "tensors, slower than the FP model; for integer kernels export with format=openvino (OpenVINO INT8), or "
              "quantize with qat_out_bits=8 (LSQ/LSQ+) for ONNX Runtime's QLinearConv.")


def _drop_training_keys(ov: dict) -> None:
    """Remove (with a warning) the plugin's training keys and ``trainer``: export has no use for them."""
    ours = sorted(k for k in ov if k in PLUGIN_KEYS or k == "trainer")
    if ours:
        LOGGER.warning(f"yolo-gab export: ignoring training keys {ours}")
        for k in ours:
            ov.pop(k)


def _export_fp(model, ov: dict) -> int:
    """Hand a full-precision model to Ultralytics' exporter with the remaining overrides."""
    bad = [k for k in ("file", "save_dir") if ov.get(k) is not None]
    if bad:
        raise ValueError(f"{bad} apply to quantized (Q/DQ) exports only; Ultralytics writes FP exports next to the weights.")
    ov.pop("file", None)
    ov.pop("save_dir", None)
    LOGGER.info(f"yolo-gab export: {model} has no quantized layers, handing over to Ultralytics' exporter.")
    f = YOLO(str(model), task=ov.pop("task", None)).export(**ov)
    print(f"Exported {f}")
    return 0


def _export_quantized(net, model, path: Path, ov: dict) -> int:
    """Q/DQ ONNX (or OpenVINO IR) export of the loaded quantized checkpoint ``net`` (from ``path``), parity checked."""
    fmt = str(ov.pop("format", None) or "onnx").lower()
    if fmt not in ("onnx", "openvino"):
        raise ValueError(
            f"format={fmt} is not supported for quantized models: other formats would run the fake-quant graph in float "
            "(or drop the learned integer grids). Use format=onnx (Q/DQ) or format=openvino (INT8 IR)."
        )
    zero_point = str(ov.pop("zero_point", None) or ("snap" if fmt == "openvino" else "exact")).lower()
    if fmt == "openvino" and zero_point != "snap":
        raise ValueError("format=openvino needs integer zero points (zero_point=snap, the default for OpenVINO): "
                         "float offsets would keep every convolution in float.")
    opset = check_opset(ov.get("opset"))
    silu = check_silu(ov.pop("silu", None) or "auto")
    if fmt == "openvino" and silu != "auto":
        raise ValueError(f"silu={silu} applies to format=onnx (ONNX Runtime); OpenVINO reads SiLU in its standard "
                         "form: leave silu out.")
    for k in _IGNORED_FOR_QDQ:
        v = ov.get(k)
        if v in (None, False, "") or (k == "batch" and v == 1):
            continue
        LOGGER.warning(f"yolo-gab export: {k}={v} is ignored by the Q/DQ ONNX export (static batch-1 graph).")
    if fmt == "onnx":
        int4 = ov.pop("int4", True)
        int4 = int4 if isinstance(int4, bool) else str(int4).lower() in ("true", "1", "yes")
    imgsz = ov.get("imgsz")
    if imgsz is None:
        args = getattr(net, "args", None)
        imgsz = (args.get("imgsz") if isinstance(args, dict) else None) or 640
    data = ov.get("data")
    if data:  # the parity images are found now: a wrong data= fails before the output folder is made
        try:
            found = _image_files(str(data))
        except FileNotFoundError as e:
            raise FileNotFoundError(f"data={data}: {e}") from None
        if not found:
            raise ValueError(f"data={data}: no images found (the parity check runs on its val images).")
        images, what = str(data), f"val images of data={data}"
    else:
        images, what = None, "generated synthetic images (pass data=... to use real validation images)"
    file = ov.get("file")
    default = path.with_suffix(".onnx") if fmt == "onnx" else path.with_name(f"{path.stem}_openvino_model")
    if file is None and ov.get("save_dir"):
        file = Path(ov["save_dir"]) / default.name
    out = Path(str(file or default))
    check_writable_dir(out.parent, "save_dir" if ov.get("save_dir") and not ov.get("file") else "file")
    LOGGER.info(f"yolo-gab export: {'Q/DQ ONNX' if fmt == 'onnx' else 'OpenVINO INT8'} export of {model}; "
                f"parity check on {what}")
    try:
        if fmt == "openvino":
            res = export_openvino(net, out, imgsz=imgsz, images=images)
            print(f"Exported {res['dir']} ({res['int8_convs']}/{res['convs']} convolutions on INT8 kernels)")
            res = res["onnx"]
        else:
            res = export_qdq_onnx(net, out, imgsz=imgsz, opset=opset, images=images, zero_point=zero_point,
                                  int4=int4, silu=silu)
            print(f"Exported {res['file']}")
            _say_if_slow_in_ort(res["file"])
    except ParityError as e:
        print(f"yolo-gab: error: {e}", file=sys.stderr)
        return 1
    moved = [r for r in res["zero_points"] if r["snapped"] is not None]
    if moved:
        print(f"Integer zero points: {len(moved)} activation offsets moved by up to "
              f"{max(abs(r['shift_steps']) for r in moved):.2f} step (validate the file to see the accuracy effect)")
    print(f"Parity ({what}): {_fmt_parity(res['parity'])}")
    return 0
