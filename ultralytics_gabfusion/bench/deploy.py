"""``yolo-gab bench deploy``: what an exported model is worth against FP -- latency, throughput, size and mAP.

For the FP checkpoint (detection, segmentation or pose) and every quantized checkpoint, the command writes the
deployable files and measures each in the runtimes a CPU deployment would use, all in one run on one machine; with
NNCF installed, also Ultralytics' own ``format=openvino int8=True`` export of the FP model:

* **files**: FP through Ultralytics' own exporters (``format=onnx``, ``format=openvino``); quantized models through
  :func:`~ultralytics_gabfusion.export.export_qdq_onnx` (Q/DQ ONNX, integer zero points, INT4 storage of 4-bit
  grids) and :func:`~ultralytics_gabfusion.export.openvino.export_openvino` (OpenVINO IR, INT8 convolutions with the
  learned grids). Graphs are static, so each is written per input size and batch: the validation size at batch 1
  (parity-checked, validated), every ``imgsz`` at batch 1 and the throughput size at ``batch``.
* **latency**: median and p90 of ``runs`` timed calls at batch 1, after ``warmup`` calls, per size. All runners of
  one size are timed in blocks, round-robin: each round gives every runner one untimed call and then ``block``
  timed calls in a row. Blocks keep one runner from paying for another (ONNX Runtime's worker threads keep spinning
  for a while after a call returns and slow whichever runtime runs next: one call each per round measured the W8A8
  OpenVINO file at 28.1 ms after ONNX Runtime calls against 15.2 ms in blocks); the untimed call absorbs the
  previous runner's spin; the rounds spread a change in machine load over every row alike.
  ``threads`` intra-op threads for every runtime.
* **throughput**: images/s at ``batch`` (at the largest ``imgsz``), the same way.
* **what executes**: OpenVINO: the runtime precision of every convolution after its low-precision transformations
  (``u8``/``i8`` = integer kernels); ONNX Runtime: the convolution operators left after its graph optimisation
  (``QLinearConv`` = integer, ``Conv``/``FusedConv``/``NchwcConv`` = float on dequantized tensors).
* **accuracy**: ``YOLO(file).val(data=...)`` of every exported file at the validation size, next to the PyTorch
  checkpoint's own (fake-quant) mAP and that of its integer-zero-point copy (the grids the files hold); the task's
  own metric (box, mask or pose mAP; box mAP beside it for segmentation and pose).
* **size**: bytes of the file (ONNX) or of ``.xml`` + ``.bin`` (OpenVINO).

Ratios are to FP measured in the same run: ``x FP ORT`` (the FP ONNX model in ONNX Runtime) and ``x FP same`` (FP in
the same runtime; for OpenVINO at float32 precision, the plugin's default on CPUs without BF16 support). OpenVINO's
CPU default for float layers is bfloat16 where the CPU has AVX512-BF16 or AMX; the FP row ``openvino-bf16`` shows it.

Outputs in ``out``: ``deploy.json`` (settings, environment, every row with raw timings summary), ``deploy.md`` (the
table) and ``deploy.png`` (latency against mAP50), plus ``files/`` (the exported models) and ``models/`` (PTQ
checkpoints when none were given).

Examples:
    yolo-gab bench deploy                                             # shipped FP YOLOv5n + its PTQ W8A8, W4A4
    yolo-gab bench deploy model=fp.pt quantized=[w8a8.pt,w4a4.pt] data=data.yaml imgsz=[160,640] runs=100
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import statistics
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
from ultralytics import YOLO
from ultralytics.utils import LOGGER

from .. import zoo
from ..data import make_synthetic_dataset
from ..export import export_qdq_onnx, load_quantized_model
from ..export.openvino import compile_model, conv_precisions, export_openvino, require_openvino
from ..export.ort_kernels import ORT_INT_CONVS, ort_conv_kernels
from ..provenance import environment
from ..preflight import check_fp_checkpoint, load_model_file, model_task
from ..ptq import post_training_quantize
from ..quant.grids import snap_zero_points
from ..quant.qconv import is_quantized, output_quantizers, quant_convs
from ..settings import as_int, as_int_list, as_list, as_str_list, parse_key_values, unknown_key_error
from .common import BenchError, cli_value, write_json

# onnx, onnxruntime and openvino are imported where they are used: openvino is optional (the `deploy` extra) and
# require_openvino() turns its absence into one line; onnx and onnxruntime are heavy and only needed by a run.
# The package's own modules are imported above: torch and Ultralytics dominate the import either way, so
# `yolo-gab bench deploy help` costs the same.

RUNTIMES = ("onnxruntime", "openvino")
INT8_ROW = "FP INT8 (Ultralytics int8=True, NNCF)"
# The metric each task's rows report: Ultralytics' metrics attribute (masks for segmentation, keypoints for pose).
TASK_METRIC = {"detect": "box", "segment": "seg", "pose": "pose"}
METRIC_NAME = {"box": "box", "seg": "mask", "pose": "pose"}
DEFAULTS: dict[str, Any] = {
    "model": None,  # FP checkpoint; default: the shipped yolov5n-synth160
    "quantized": None,  # quantized checkpoints; default: PTQ W8A8 and W4A4 (LSQ) of model
    "data": None,  # data.yaml; default for the shipped model: its generated set
    "ptq": ["w8a8", "w4a4"],
    "imgsz": [160, 640],
    "val_imgsz": None,  # default: the FP checkpoint's training imgsz
    "batch": 8,
    "runs": 50,
    "warmup": 10,
    "block": 10,
    "threads": None,  # default: all cores
    "runtimes": list(RUNTIMES),
    "out": "runs/gab-deploy",
}
HELP = {
    "model": "FP checkpoint (default: the shipped yolov5n-synth160)",
    "quantized": "quantized checkpoints to deploy (default: PTQ of model at each entry of ptq)",
    "data": "data.yaml for calibration and validation (default for the shipped model: its generated set)",
    "ptq": "W<b>A<b> settings of the PTQ models made when quantized is not given (LSQ; W<b>A<b>o8: 8-bit conv outputs, "
           "qat_out_bits=8, for ONNX Runtime's integer convs)",
    "imgsz": "input sizes timed at batch 1",
    "val_imgsz": "size at which every file is validated (default: the FP model's training imgsz)",
    "batch": "batch size of the throughput measurement (at the largest imgsz)",
    "runs": "timed calls per runner and size (median and p90 reported)",
    "warmup": "untimed calls before timing",
    "block": "timed calls in a row per runner and round (after one untimed call; 1 = plain round-robin)",
    "threads": "intra-op threads of every runtime (default: all cores)",
    "runtimes": "onnxruntime and/or openvino",
    "out": "output directory",
}


def help_text() -> str:
    """The key table printed by ``yolo-gab bench deploy help``."""
    w = max(len(k) for k in DEFAULTS) + 2
    lines = ["yolo-gab bench deploy key=value ...   (exported FP vs quantized models: latency, size, mAP)"]
    lines += [f"  {k:<{w}}{cli_value(v):<24}{HELP[k]}" for k, v in DEFAULTS.items()]
    return "\n".join(lines)


def _bits_setting(v: str) -> tuple[int, int, int]:
    """``w8a8`` -> (8, 8, 0); ``w8a8o8`` -> (8, 8, 8): conv outputs at 8 bits (``qat_out_bits=8``)."""
    m = re.fullmatch(r"w([2-8])a([2-8])(o8)?", str(v).strip().lower())
    if not m:
        raise BenchError(f"ptq: '{v}' is not a W<b>A<b> setting with bits in 2..8 (o8 appended: 8-bit conv outputs, "
                         "qat_out_bits=8), e.g. ptq=[w8a8,w4a4,w8a8o8].")
    return int(m.group(1)), int(m.group(2)), 8 if m.group(3) else 0


def resolve_settings(argv: list[str]) -> dict:
    """Parse and check the keys; resolve the shipped-model defaults.

    The checkpoints are loaded here, after the cheap checks: ``model=`` must be an FP checkpoint (the reference)
    and every ``quantized=`` entry a quantized one. The quantized models are kept (``s["_nets"]``) for the label and
    the exports, so each file is read once.

    Raises:
        BenchError: Unknown key, bad value, missing file, a checkpoint of the wrong kind (exit status 2; nothing is
            written).
    """
    user = parse_key_values(argv)
    for k in user:
        if k not in DEFAULTS:
            raise unknown_key_error(k, DEFAULTS, "bench deploy")
    s = {**DEFAULTS, **user}
    s["runtimes"] = list(dict.fromkeys(as_str_list("runtimes", s["runtimes"], RUNTIMES)))
    s["imgsz"] = sorted(set(as_int_list("imgsz", s["imgsz"], 32)))
    for v in s["imgsz"]:
        if v % 32:
            raise BenchError(f"imgsz={v} must be a multiple of 32.")
    s["batch"] = as_int("batch", s["batch"], 1)
    s["runs"] = as_int("runs", s["runs"], 5)
    s["warmup"] = as_int("warmup", s["warmup"], 0)
    s["block"] = as_int("block", s["block"], 1)
    s["threads"] = as_int("threads", s["threads"] if s["threads"] is not None else (os.cpu_count() or 1), 1)
    s["ptq"] = [_bits_setting(v) for v in as_list("ptq", s["ptq"])]
    if s["model"] is None:
        s["model"] = str(zoo.path("yolov5n-synth160"))
        s["_card"] = zoo.card("yolov5n-synth160")
    s["model"] = str(Path(s["model"]).resolve())
    if not Path(s["model"]).is_file():
        raise BenchError(f"model={s['model']}: file not found (an FP .pt checkpoint).")
    quant = s["quantized"]
    s["quantized"] = [str(Path(str(q)).resolve()) for q in as_list("quantized", quant)] if quant else []
    for q in s["quantized"]:
        if not Path(q).is_file():
            raise BenchError(f"quantized: {q}: file not found (quantized .pt checkpoints).")
    twice = sorted({q for q in s["quantized"] if s["quantized"].count(q) > 1})
    if twice:
        raise BenchError(f"quantized: {twice[0]} is listed more than once; list each checkpoint once.")
    if s["data"] is None and "_card" not in s:
        raise BenchError("data= is required for a model other than the shipped one (calibration and validation).")
    if s["data"] is not None and not Path(str(s["data"])).is_file():
        raise BenchError(f"data={s['data']}: file not found.")
    if s["data"] is not None and Path(str(s["data"])).suffix.lower() not in (".yaml", ".yml"):
        raise BenchError(f"data={s['data']} is not a data YAML: pass the dataset's .yaml (calibration and validation "
                         "read its splits).")
    if s["val_imgsz"] is not None:
        s["val_imgsz"] = as_int("val_imgsz", s["val_imgsz"], 32)
        if s["val_imgsz"] % 32:
            raise BenchError(f"val_imgsz={s['val_imgsz']} must be a multiple of 32 (the exported graphs are static).")
    if not s["quantized"] and not s["ptq"]:
        raise BenchError("ptq is empty and quantized= is not given: no quantized model to compare with FP; pass "
                         "ptq=[w8a8] or quantized=[q.pt].")
    s["out"] = str(Path(str(s["out"])).resolve())
    _check_checkpoints(s)
    return s


def _check_checkpoints(s: dict) -> None:
    """``model=`` an FP ``.pt`` checkpoint, each ``quantized=`` entry a quantized one; keeps what the run needs of
    them: the FP model's training imgsz (``s["_fp_imgsz"]``) and the quantized models (``s["_nets"]``)."""
    try:
        if Path(s["model"]).suffix != ".pt":
            raise ValueError(f"model={s['model']} is not a .pt checkpoint: pass the FP checkpoint.")
        fp = check_fp_checkpoint(s["model"], "model", "bench deploy",  # the reference every row is compared with
                                 "pass the FP checkpoint the quantized models were made from, and this one in "
                                 "quantized=[...]")
        s["_fp_imgsz"] = int((getattr(fp, "args", None) or {}).get("imgsz") or 640)  # train_args over defaults
        s["_task"] = task = model_task(fp) or "detect"
        if task not in TASK_METRIC:
            raise ValueError(f"model={s['model']} is a {task} model; bench deploy measures detect, segment and pose "
                             "models.")
        nets = s["_nets"] = {}
        for q in s["quantized"]:
            net, _ = load_model_file(q, "quantized")
            if net is None or not is_quantized(net):
                raise ValueError(f"quantized: {q} has no quantized layers: pass quantized checkpoints (QAT or PTQ of "
                                 "model=), or leave quantized= out to compare PTQ models.")
            if (model_task(net) or "detect") != task:
                raise ValueError(f"quantized: {q} is a {model_task(net)} model but model= is a {task} model: compare "
                                 "checkpoints of one task (the FP model and its own PTQ/QAT copies).")
            nets[q] = net
    except (ValueError, FileNotFoundError) as e:
        raise BenchError(str(e)) from None


# ------------------------------------------------------------------------------------------------ preparation
def _prepare(s: dict) -> tuple[str, list[tuple[str, str]], int]:
    """Data, the quantized checkpoints (PTQ when none given) and the validation size."""
    out = Path(s["out"])
    data = s["data"]
    if data is None:  # the shipped model: regenerate its own set (deterministic) under out/data
        d = s["_card"]["data"]
        data = str(make_synthetic_dataset(out / "data", n_train=d["n_train"], n_val=d["n_val"], imgsz=d["imgsz"],
                                          seed=d["seed"], max_objects=d["max_objects"], min_size=d["min_size"]))
    val_imgsz = s["val_imgsz"] or s["_fp_imgsz"]
    models = [("FP", s["model"])]
    if s["quantized"]:
        models += [(_label(s, q, tag), q) for q, tag in zip(s["quantized"], _unique_tags(s["quantized"]))]
    else:
        for w, a, o in s["ptq"]:
            f = out / "models" / f"ptq-w{w}a{a}{'o8' if o else ''}.pt"
            if not f.exists():
                with tempfile.TemporaryDirectory() as tmp:
                    post_training_quantize(s["model"], file=f, data=data, qat="lsq", w_bits=w, a_bits=a,
                                           qat_out_bits=o, imgsz=val_imgsz, project=tmp, name="ptq", workers=0,
                                           plots=False)
            models.append((f"W{w}A{a} PTQ" + (" out8" if o else ""), str(f)))
    return data, models, val_imgsz


def _quantized_net(s: dict, ckpt: str):
    """The model of quantized checkpoint ``ckpt``, loaded once per run and handed to every step that needs it."""
    nets = s.setdefault("_nets", {})
    if ckpt not in nets:
        nets[ckpt] = load_quantized_model(ckpt)
    return nets[ckpt]


def _unique_tags(ckpts: list[str]) -> list[str]:
    """A short name per checkpoint that tells them apart: the file name, with parent folders added where names
    repeat (Ultralytics' ``weights/`` folder skipped), e.g. ``run-s0/best`` and ``run-s1/best``."""
    parts = [[p for p in Path(c).with_suffix("").parts if p != "weights"] for c in ckpts]
    depth = [1] * len(ckpts)
    while True:
        tags = ["/".join(p[-d:]) for p, d in zip(parts, depth)]
        repeated = [i for i, t in enumerate(tags) if tags.count(t) > 1 and depth[i] < len(parts[i])]
        if not repeated:
            return tags
        for i in repeated:
            depth[i] += 1


def _label(s: dict, ckpt: str, tag: str | None = None) -> str:
    """``W4A4 lsq (tag)``: the most common bits and method of the checkpoint's quantized convs, else ``tag``."""
    tag = tag or Path(ckpt).stem
    try:
        net = _quantized_net(s, ckpt)
        convs = [c for _, c in quant_convs(net)]
        (w, a, method), _ = Counter((c.w_bits, c.a_bits, c.method) for c in convs).most_common(1)[0]
        return f"W{w}A{a} {method}{' out8' if any(output_quantizers(net)) else ''} ({tag})"
    except Exception:
        return tag


def _export(s: dict, name: str, ckpt: str, fp: bool, data: str, val_imgsz: int, int8: bool = False) -> dict:
    """Write every (runtime, imgsz, batch) file of one model; returns ``{runtime: {(imgsz, batch): path}}``.

    ``int8``: the FP checkpoint through Ultralytics' ``format=openvino int8=True`` (NNCF post-training quantization
    on ``data``), OpenVINO only: what an OpenVINO user gets without this plugin.
    """
    # one folder per model, named after its whole label: two checkpoints at the same bits never share files
    d = Path(s["out"]) / "files" / (re.sub(r"[^a-z0-9._]+", "-", name.lower()).strip("-") or "model")
    d.mkdir(parents=True, exist_ok=True)
    shapes = sorted({(val_imgsz, 1), *((v, 1) for v in s["imgsz"]), (max(s["imgsz"]), s["batch"])})
    runtimes = ["openvino"] if int8 else s["runtimes"]
    files: dict[str, dict] = {rt: {} for rt in runtimes}
    for sz, b in shapes:
        stem = f"{sz}px-b{b}"
        for rt in runtimes:
            target = d / (f"{stem}.onnx" if rt == "onnxruntime" else f"{stem}_openvino_model")
            if not target.exists():
                check = b == 1 and sz == val_imgsz  # parity once per model, on the validation images
                if fp:
                    fmt = "onnx" if rt == "onnxruntime" else "openvino"
                    with tempfile.TemporaryDirectory() as tmp:
                        src = Path(tmp) / "model.pt"
                        shutil.copy(ckpt, src)  # Ultralytics writes next to the weights: keep the user's folder clean
                        f = YOLO(str(src)).export(format=fmt, imgsz=sz, batch=b, verbose=False,
                                                  **({"int8": True, "data": data} if int8 else {}))
                        shutil.move(str(f), str(target))
                elif rt == "onnxruntime":  # the exporters never modify the model: one load serves every file
                    export_qdq_onnx(_quantized_net(s, ckpt), target, imgsz=sz, batch=b, images=data if check else None,
                                    check=check, verbose=False)
                else:
                    export_openvino(_quantized_net(s, ckpt), target, imgsz=sz, batch=b,
                                    images=data if check else None, check=check, verbose=False)
            files[rt][(sz, b)] = target
    return files


# ------------------------------------------------------------------------------------------------ runners
class _Runner:
    """One compiled model of one file: ``call()`` runs it once on a fixed random input."""

    def __init__(self, runtime: str, path: Path, threads: int, precision: str | None = None):
        self.runtime, self.path, self.precision = runtime, path, precision
        if runtime == "onnxruntime":
            import onnxruntime as ort

            opts = ort.SessionOptions()
            opts.intra_op_num_threads = threads
            opts.inter_op_num_threads = 1
            self.sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
            inp = self.sess.get_inputs()[0]
            self.name, shape = inp.name, inp.shape
            self.x = np.random.default_rng(0).random(shape, dtype=np.float32)
            self.call = lambda: self.sess.run(None, {self.name: self.x})
        else:
            self.compiled = compile_model(path, threads=threads, precision=precision)
            shape = list(self.compiled.input(0).get_shape())
            self.x = np.random.default_rng(0).random(shape, dtype=np.float32)
            self.req = self.compiled.create_infer_request()
            self.call = lambda: self.req.infer({0: self.x})


def _time_in_blocks(runners: list[_Runner], runs: int, warmup: int, block: int = 10) -> list[list[float]]:
    """Per runner, ``runs`` wall times in ms, taken in rounds: each runner one untimed call, then up to ``block``
    timed calls in a row (after ``warmup`` untimed calls each). ``block=1`` with no untimed call is plain round-robin.
    """
    for r in runners:
        for _ in range(warmup):
            r.call()
    times: list[list[float]] = [[] for _ in runners]
    while len(times[0]) < runs:
        n = min(block, runs - len(times[0]))
        for i, r in enumerate(runners):
            if block > 1:
                r.call()  # absorbs what the previous runner left running (ONNX Runtime's spinning threads)
            for _ in range(n):
                t0 = time.perf_counter()
                r.call()
                times[i].append((time.perf_counter() - t0) * 1e3)
    return times


def _p90(v: list[float]) -> float:
    return statistics.quantiles(v, n=10)[-1] if len(v) >= 2 else v[0]


def _executes(runtime: str, path: Path, threads: int, runner: _Runner | None) -> tuple[str, int, int]:
    """``(description, integer convs, convs)`` of what the runtime runs for this file."""
    if runtime == "onnxruntime":
        k = ort_conv_kernels(path, threads)
        n_int = sum(v for op, v in k.items() if op in ORT_INT_CONVS)
    else:
        k = conv_precisions(runner.compiled)
        n_int = sum(v for p, v in k.items() if p in ("u8", "i8"))
    return ", ".join(f"{v} {p}" for p, v in k.items()), n_int, sum(k.values())


def _size_mb(path: Path) -> float:
    if path.is_dir():
        return sum(f.stat().st_size for f in path.iterdir() if f.suffix in (".xml", ".bin")) / 1e6
    return path.stat().st_size / 1e6


def _metrics(m, task: str) -> dict:
    """mAP50 / mAP50-95 (%) of the task's own metric (box, mask or pose), plus the box mAP50 for seg/pose."""
    own = getattr(m, TASK_METRIC[task])
    r = {"mAP50": round(100 * float(own.map50), 2), "mAP50_95": round(100 * float(own.map), 2)}
    if task != "detect":
        r["box_mAP50"] = round(100 * float(m.box.map50), 2)
    return r


# Every model sees the same imgsz x imgsz letterboxed input: Ultralytics validates a .pt with rect=True, which pads each
# image to a stride multiple plus half a stride (a 160 px square image becomes 192 px), while a static exported file
# gets exactly imgsz. Compared that way, quantized files were 0.2-1.1 mAP50 below their own checkpoint on 1000 images
# in every row (RESULTS 19.2); on the same input they agree within 0.2.
_SAME_INPUT = {"rect": False}


def _validate(y: YOLO, data: str, imgsz: int, out: Path, task: str) -> dict:
    """mAP (%) of a loaded model, validated by Ultralytics on ``data``'s val split at batch 1 (:func:`_metrics`)."""
    m = y.val(data=data, imgsz=imgsz, batch=1, workers=0, plots=False, verbose=False, project=str(out / "val"),
              name="v", exist_ok=True, **_SAME_INPUT)
    return _metrics(m, task)


def _val(path, data: str, imgsz: int, out: Path, task: str = "detect") -> dict:
    """mAP (%) of a checkpoint or exported file (:func:`_validate`)."""
    return _validate(YOLO(str(path), task=task), data, imgsz, out, task)


def _val_snapped(ckpt: str, data: str, imgsz: int, out: Path, task: str = "detect") -> dict:
    """mAP of the checkpoint with its activation offsets on integer zero points (what the exported files hold)."""
    y = YOLO(ckpt, task=task)
    snap_zero_points(y.model)
    return _validate(y, data, imgsz, out, task)


# ------------------------------------------------------------------------------------------------ run
def run_deploy(s: dict) -> dict:
    """Export, time, validate; write ``deploy.json``/``deploy.md``/``deploy.png`` into ``s["out"]``."""
    out = Path(s["out"])
    out.mkdir(parents=True, exist_ok=True)
    if "openvino" in s["runtimes"]:
        try:
            require_openvino()
        except ImportError as e:
            raise BenchError(f"{e} (or pass runtimes=[onnxruntime])") from None
    data, models, val_imgsz = _prepare(s)
    LOGGER.info(f"bench deploy: {len(models)} models x {s['runtimes']}, val at {val_imgsz} px on {data}")
    files = {name: _export(s, name, ckpt, name == "FP", data, val_imgsz) for name, ckpt in models}
    s.pop("_nets", None)  # the loaded quantized models are not needed past the exports
    notes = []
    if "openvino" in s["runtimes"]:  # Ultralytics' own INT8 export of the FP model: the comparison an OpenVINO user makes
        if importlib.util.find_spec("nncf") is None:
            notes.append(f"{INT8_ROW} row skipped: Ultralytics' format=openvino int8=True needs nncf (pip install nncf)")
            LOGGER.warning(f"bench deploy: {notes[-1]}")
        else:
            files[INT8_ROW] = _export(s, INT8_ROW, s["model"], True, data, val_imgsz, int8=True)

    # rows: FP in each runtime (OpenVINO FP at float32 and at the plugin's default precision), quantized in each
    rows = []
    for name, ckpt in models + ([(INT8_ROW, s["model"])] if INT8_ROW in files else []):
        for rt in files[name]:
            precs = ["f32", None] if (name == "FP" and rt == "openvino") else [None]
            for p in precs:
                rows.append({"model": name, "checkpoint": ckpt, "runtime": rt + ("-f32" if p == "f32" else ""),
                             "precision": p, "files": {f"{k[0]}px-b{k[1]}": str(v) for k, v in files[name][rt].items()},
                             "_rt": rt, "_files": files[name][rt]})

    big = max(s["imgsz"])
    shapes = [(v, 1) for v in s["imgsz"]] + ([(big, s["batch"])] if s["batch"] > 1 else [])
    for sz, b in shapes:
        runners = [_Runner(r["_rt"], r["_files"][(sz, b)], s["threads"], r["precision"]) for r in rows]
        LOGGER.info(f"bench deploy: timing {len(runners)} runners at {sz} px batch {b} ({s['runs']} rounds)")
        n = s["runs"] if b == 1 else max(5, s["runs"] // 4)
        times = _time_in_blocks(runners, n, s["warmup"] if b == 1 else max(1, s["warmup"] // 4), s["block"])
        for r, t, run in zip(rows, times, runners):
            if b == 1:
                r[f"ms_{sz}"] = {"median": round(statistics.median(t), 2), "p90": round(_p90(t), 2), "runs": len(t)}
            else:
                r[f"img_s_{sz}_b{b}"] = round(1e3 * b / statistics.median(t), 1)
            if sz == max(s["imgsz"]) and b == 1:
                r["executes"], r["int_convs"], r["convs"] = _executes(r["_rt"], r["_files"][(sz, b)], s["threads"], run)
        del runners
    if s["batch"] == 1:  # throughput at batch 1 is the inverse of the batch-1 latency
        for r in rows:
            r[f"img_s_{big}_b1"] = round(1e3 / r[f"ms_{big}"]["median"], 1)

    fq = {}
    for name, ckpt in models:  # the PyTorch checkpoints themselves: the accuracy each file should reproduce
        fq[name] = {"torch": _val(ckpt, data, val_imgsz, out, s["_task"])}
        if name != "FP":
            fq[name]["torch_int_zp"] = _val_snapped(ckpt, data, val_imgsz, out, s["_task"])
    fq[INT8_ROW] = fq["FP"]  # NNCF quantizes the FP model: the FP checkpoint is its reference
    for r in rows:
        r["size_mb"] = round(_size_mb(r["_files"][(max(s["imgsz"]), 1)]), 2)
        if r["precision"] == "f32":  # same file as the default-precision row; Ultralytics validates at the default
            r["val"] = None
        else:
            r["val"] = _val(r["_files"][(val_imgsz, 1)], data, val_imgsz, out, s["_task"])
        r["torch_val"] = fq[r["model"]]
    _ratios(rows, s)
    for r in rows:
        r.pop("_rt"), r.pop("_files")
    result = {"settings": {k: v for k, v in s.items() if not k.startswith("_")}, "task": s["_task"],
              "metric": METRIC_NAME[TASK_METRIC[s["_task"]]], "data": data, "val_imgsz": val_imgsz,
              "environment": environment(), "versions": _runtime_versions(), "rows": rows, "notes": notes}
    write_json(out / "deploy.json", result)
    table = report_table(result)
    (out / "deploy.md").write_text(table + "\n")
    _plot(result, out / "deploy.png")
    print(table)
    LOGGER.info(f"bench deploy: results in {out}/deploy.md, deploy.json, deploy.png")
    return result


def _runtime_versions() -> dict:
    import onnxruntime

    v = {"onnxruntime": onnxruntime.__version__}
    try:
        import openvino

        v["openvino"] = openvino.get_version()
    except ImportError:
        pass
    return v


def _ratios(rows: list[dict], s: dict) -> None:
    """Speed-ups against FP in ONNX Runtime and against FP in the same runtime (OpenVINO: float32)."""
    big = max(s["imgsz"])
    fp = {r["runtime"]: r for r in rows if r["model"] == "FP"}
    ref_ort = fp.get("onnxruntime")
    for r in rows:
        same = fp.get("openvino-f32" if r["_rt"] == "openvino" else "onnxruntime")
        for sz in s["imgsz"]:
            m = r[f"ms_{sz}"]["median"]
            if ref_ort:
                r[f"x_fp_ort_{sz}"] = round(ref_ort[f"ms_{sz}"]["median"] / m, 2)
            if same:
                r[f"x_fp_same_{sz}"] = round(same[f"ms_{sz}"]["median"] / m, 2)
        r["x_fp_same_thr"] = round(r[f"img_s_{big}_b{s['batch']}"] / same[f"img_s_{big}_b{s['batch']}"], 2) if same else None


def report_table(result: dict) -> str:
    """The markdown table of a deploy result (also used to rebuild it from ``deploy.json``)."""
    s = result["settings"]
    big, sizes, b = max(s["imgsz"]), s["imgsz"], s["batch"]
    head = ["model", "runtime", "executes (convs)", "size MB"]
    head += [f"{sz} px ms (p90)" for sz in sizes] + [f"x FP ORT @{big}", f"x FP same @{big}", f"img/s b{b} @{big}"]
    metric = result.get("metric", "box")
    what = "" if metric == "box" else f"{metric} "
    head += [f"{what}mAP50 file @{result['val_imgsz']}", f"{what}mAP50-95 file", f"{what}mAP50 PyTorch (int zp)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in result["rows"]:
        tv = r["torch_val"]
        torch_map = f"{tv['torch']['mAP50']:.2f}" + (f" ({tv['torch_int_zp']['mAP50']:.2f})" if "torch_int_zp" in tv else "")
        cells = [r["model"], r["runtime"], r.get("executes", ""), f"{r['size_mb']:.2f}"]
        cells += [f"{r[f'ms_{sz}']['median']:.1f} ({r[f'ms_{sz}']['p90']:.1f})" for sz in sizes]
        cells += [f"{r.get(f'x_fp_ort_{big}', float('nan')):.2f}", f"{r.get(f'x_fp_same_{big}', float('nan')):.2f}",
                  f"{r[f'img_s_{big}_b{b}']:.1f}"]
        v = r["val"]
        cells += [f"{v['mAP50']:.2f}" if v else "(same file)", f"{v['mAP50_95']:.2f}" if v else "", torch_map]
        lines.append("| " + " | ".join(cells) + " |")
    env = result["environment"]
    lines.append("")
    lines.append(f"{env.get('cpu', '')}; threads={s['threads']}; batch-1 latency: median (p90) of {s['runs']} "
                 f"calls after {s['warmup']} warm-up calls, timed round-robin in blocks of {s.get('block', 1)} (each "
                 f"after one untimed call); x FP same: OpenVINO rows against FP OpenVINO at float32. mAP of each "
                 "file and checkpoint validated by Ultralytics at batch 1 on the same square input (rect=False).")
    lines += [f"Note: {n}." for n in result.get("notes", [])]
    return "\n".join(lines)


def _plot(result: dict, path: Path) -> None:
    """Latency at the largest size against mAP50 of each file, one marker per runtime."""
    import matplotlib  # slow to import: loaded only when the plot is drawn

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    big = max(result["settings"]["imgsz"])
    fig, ax = plt.subplots(figsize=(7, 4.5))
    markers = {"onnxruntime": "o", "openvino": "s", "openvino-f32": "^"}
    for r in result["rows"]:
        m50 = (r["val"] or r["torch_val"]["torch"])["mAP50"]
        ax.scatter(r[f"ms_{big}"]["median"], m50, marker=markers.get(r["runtime"], "x"), s=50)
        ax.annotate(f"{r['model'].split(' (')[0]} {r['runtime']}", (r[f"ms_{big}"]["median"], m50), fontsize=7,
                    xytext=(4, 3), textcoords="offset points")
    ax.set_xlabel(f"latency at {big} px, batch 1 (ms, median)")
    metric = result.get("metric", "box")
    ax.set_ylabel(f"{'' if metric == 'box' else metric + ' '}mAP50 of the exported file (%)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def deploy_main(argv: list[str]) -> int:
    """``yolo-gab bench deploy key=value ...``; see the module docstring."""
    if argv and argv[0] in ("help", "-h", "--help"):
        print(help_text())
        return 0
    run_deploy(resolve_settings(argv))
    return 0


__all__ = ["DEFAULTS", "deploy_main", "ort_conv_kernels", "report_table", "resolve_settings", "run_deploy"]
