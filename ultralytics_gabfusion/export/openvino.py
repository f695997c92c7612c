"""OpenVINO IR export of a quantized model: the learned integer grids executed by OpenVINO's INT8 convolutions.

The Q/DQ ONNX graph (:func:`~.qdq.export_qdq_onnx`) already says everything an integer runtime needs: per-channel
integer weights and per-tensor activation grids with integer zero points. OpenVINO's ONNX front end turns each
``QuantizeLinear -> DequantizeLinear`` pair into a ``FakeQuantize`` with exactly those levels, and its CPU plugin runs
a convolution whose input and weights come through such nodes on integer kernels (VNNI / AMX where the CPU has
them). Nothing is re-calibrated: unlike ``YOLO(...).export(format="openvino", int8=True)``, which runs NNCF's
post-training quantization on calibration images, the IR holds the grids that QAT learned.

Two things are chosen for the runtime rather than for file size, so this path always uses them:

* ``zero_point="snap"``: activation offsets on integer zero points (a float ``Sub``/``Add`` around the Q/DQ pair
  would keep the convolution in float);
* ``int4=False``: 4-bit integers in 8-bit containers. OpenVINO executes INT8 convolutions; a 4-bit grid is a subset
  of the 8-bit one (the range is kept by a ``Clip``), so W4A4 and W3A3 run on the same INT8 kernels. OpenVINO
  2026.4 also crashes on UINT4 activations with a non-zero zero point.

The result is an Ultralytics ``*_openvino_model/`` directory (``<name>.xml``, ``<name>.bin``, ``metadata.yaml``), so
``YOLO("best_openvino_model/")`` predicts and validates through Ultralytics' OpenVINO backend. It is built in a
temporary directory next to the target and renamed into place only when conversion and checks passed.

Examples:
    >>> from ultralytics_gabfusion.export.openvino import export_openvino
    >>> info = export_openvino("runs/qat/weights/best.pt", imgsz=640, images="data.yaml")  # doctest: +SKIP
    >>> info["conv_precisions"]  # doctest: +SKIP
    {'u8': 75, 'f32': 1}
"""

from __future__ import annotations

import ast
import os
import shutil
from pathlib import Path

from ultralytics.utils import LOGGER, YAML

from .inputs import load_quantized_model
from .qdq import _export_qdq

INSTALL_HINT = "pip install 'ultralytics-gabfusion[deploy]' (or pip install openvino)"


def require_openvino():
    """Import and return ``openvino``, or raise an ``ImportError`` that says how to install it."""
    try:
        import openvino as ov
    except ImportError:
        raise ImportError(f"OpenVINO is not installed: {INSTALL_HINT}") from None
    return ov


def conv_precisions(compiled) -> dict[str, int]:
    """How many convolutions an OpenVINO compiled model runs at each precision (``u8``/``i8`` = integer kernels).

    Read from the runtime model the CPU plugin built (its ``runtimePrecision`` of every ``Convolution`` node), i.e.
    what actually executes, after OpenVINO's low-precision transformations.

    Args:
        compiled (openvino.CompiledModel): A compiled model.

    Returns:
        (dict[str, int]): ``{precision: count}``, e.g. ``{"u8": 75, "f32": 1}``.
    """
    counts: dict[str, int] = {}
    for op in compiled.get_runtime_model().get_ops():
        info = op.get_rt_info()
        if "layerType" in info and info["layerType"].astype(str) == "Convolution":
            p = info["runtimePrecision"].astype(str) if "runtimePrecision" in info else "unknown"
            counts[p] = counts.get(p, 0) + 1
    return dict(sorted(counts.items()))


def compile_model(xml_or_onnx, batch: int | None = None, threads: int | None = None, precision: str | None = None):
    """Compile a model file for the CPU with OpenVINO (latency mode), optionally reshaped to another batch size.

    Args:
        xml_or_onnx (str | Path): An ``.xml`` IR, an ``*_openvino_model/`` directory or an ``.onnx`` file.
        batch (int | None): Reshape the (static) input to this batch size first.
        threads (int | None): ``INFERENCE_NUM_THREADS`` (None: OpenVINO's default, all cores).
        precision (str | None): ``INFERENCE_PRECISION_HINT`` for float layers (``f32``, ``bf16``); None: the plugin's
            default (``bf16`` on CPUs with AVX512-BF16 or AMX, else ``f32``).

    Returns:
        (openvino.CompiledModel): The compiled model.
    """
    ov = require_openvino()
    p = Path(xml_or_onnx)
    if p.is_dir():
        p = next(p.glob("*.xml"), None) or p
    if not p.is_file():
        raise FileNotFoundError(f"{xml_or_onnx}: no OpenVINO .xml or .onnx model found")
    core = ov.Core()
    model = core.read_model(str(p))
    if batch is not None:
        shape = list(model.input(0).get_partial_shape().to_shape())
        model.reshape({model.input(0): [int(batch), *shape[1:]]})
    config = {"PERFORMANCE_HINT": "LATENCY"}
    if threads:
        config["INFERENCE_NUM_THREADS"] = int(threads)
    if precision:
        config["INFERENCE_PRECISION_HINT"] = precision
    return core.compile_model(model, "CPU", config)


def _ultralytics_metadata(proto) -> dict:
    """The Q/DQ graph's Ultralytics ``metadata_props`` as the Python values Ultralytics writes to metadata.yaml."""
    meta = {}
    for p in proto.metadata_props:
        try:
            meta[p.key] = ast.literal_eval(p.value)
        except (ValueError, SyntaxError):
            meta[p.key] = p.value  # plain strings (description, date, the quantization JSON)
    return meta


def _output_dir(out, src_path: Path | None) -> Path:
    if out is None:
        if src_path is None:
            raise ValueError("out= is required when exporting a model object (no checkpoint path to derive it from).")
        out = src_path.with_name(f"{src_path.stem}_openvino_model")
    out = Path(out)
    if out.suffix:
        raise ValueError(f"out={out}: give a directory (Ultralytics' convention: <name>_openvino_model), not a file.")
    return out


def export_openvino(model, out=None, imgsz=640, images=None, check: bool = True, batch: int = 1,
                    verbose: bool = True, **parity_tol) -> dict:
    """Export a quantized model to an OpenVINO IR directory whose convolutions run on INT8 kernels.

    Args:
        model (nn.Module | str | Path): A quantized model or its ``.pt`` checkpoint (never modified).
        out (str | Path | None): Output directory; default ``<checkpoint stem>_openvino_model`` next to the checkpoint.
        imgsz (int | tuple[int, int]): Input size (static).
        images: Parity images for the intermediate Q/DQ ONNX file, as for :func:`~.qdq.export_qdq_onnx`.
        check (bool): Check ONNX Runtime parity of the Q/DQ graph against the PyTorch model (see ``export_qdq_onnx``)
            and that OpenVINO compiles the IR.
        batch (int): Static batch size (``batch > 1`` needs ``check=False``, as for ``export_qdq_onnx``).
        verbose (bool): Log progress.
        **parity_tol: Parity tolerance overrides.

    Returns:
        (dict): ``dir``, ``xml``, ``imgsz``, ``conv_precisions`` (what OpenVINO executes, see
        :func:`conv_precisions`), ``int8_convs``, ``convs``, ``onnx`` (the Q/DQ export's result dict: parity, zero
        points, layers) and ``openvino`` (version).

    Raises:
        ImportError: OpenVINO is not installed.
        ValueError / FileNotFoundError / ParityError: As for ``export_qdq_onnx``; nothing is written then.
    """
    ov = require_openvino()
    src_path = Path(model) if isinstance(model, (str, Path)) else None
    out = _output_dir(out, src_path)
    net = load_quantized_model(model)  # loaded once (from a path), handed to the Q/DQ export and its parity check
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    name = out.name.removesuffix("_openvino_model") or "model"
    try:
        onnx_file = tmp / f"{name}.onnx"
        res, proto = _export_qdq(net, onnx_file, imgsz=imgsz, images=images, check=check, zero_point="snap",
                                 int4=False, batch=batch, verbose=verbose, silu="standard", **parity_tol)
        ov_model = ov.convert_model(str(onnx_file))
        xml = tmp / f"{name}.xml"
        ov.save_model(ov_model, str(xml), compress_to_fp16=False)  # float layers (Detect decode) stay float32
        YAML.save(tmp / "metadata.yaml", _ultralytics_metadata(proto))  # the graph in hand, not the file read back
        onnx_file.unlink()
        prec = conv_precisions(compile_model(xml))
        int8 = sum(n for p, n in prec.items() if p in ("u8", "i8"))
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    result = {"dir": str(out), "xml": str(out / f"{name}.xml"), "imgsz": res["imgsz"], "conv_precisions": prec,
              "int8_convs": int8, "convs": sum(prec.values()), "onnx": res, "openvino": ov.get_version()}
    if verbose:
        LOGGER.info(f"OpenVINO: saved {out} ({int8}/{result['convs']} convolutions on INT8 kernels: {prec})")
    return result


__all__ = ["INSTALL_HINT", "compile_model", "conv_precisions", "export_openvino", "require_openvino"]
