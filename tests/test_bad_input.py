"""Bad input, as a user types it: one table of commands and calls that must fail fast, clearly and cleanly.

Each case must end with a non-zero exit status (CLI, its error on one line) or a typed exception (Python API) whose
message names the key or file and says what to do, within seconds (before any dataset scan, calibration or
training), and leave the filesystem as it was: no run folder, checkpoint, export or dataset, complete or partial.

Most CLI cases run ``cli.main(argv)`` in this process (the same parse and dispatch as the console script, without
~3 s of imports each); a few run as real subprocesses to check the console exit status and that no traceback is
printed. All cases share one tiny generated dataset and checkpoints built without training.
"""

from __future__ import annotations

import os
import shutil
import time
from copy import deepcopy
from pathlib import Path

import pytest
import torch

from conftest import run_cli

CASE_SECONDS = 20  # generous for a shared 2-core machine; the cases take well under 2 s each in-process


# ------------------------------------------------------------------------------------------------------- fixtures
def _save_ckpt(model, path: Path, **extra) -> Path:
    """Write ``model`` the way Ultralytics does (fp16 module in an Ultralytics checkpoint dict)."""
    from ultralytics import __version__
    from ultralytics.utils import DEFAULT_CFG_DICT

    ckpt = {"epoch": -1, "model": deepcopy(model).half(), "ema": None, "optimizer": None, "version": __version__,
            "train_args": {**DEFAULT_CFG_DICT, "model": "yolov5n.yaml", "imgsz": 64}, **extra}
    torch.save(ckpt, path)
    return path


@pytest.fixture(scope="session")
def env(tmp_path_factory) -> dict:
    """Every file the cases point at: data YAMLs (good, empty, bad labels), checkpoints (FP, 20-class, other
    architecture, quantized, newer format, resumable, truncated, not a checkpoint), recipes and synth folders."""
    from ultralytics.nn.tasks import DetectionModel

    from ultralytics_gabfusion.data import make_synthetic_dataset
    from ultralytics_gabfusion.fusion import insert_gabfusion
    from ultralytics_gabfusion.quant.convert import init_weight_quantizers, quantize_model
    from ultralytics_gabfusion.quant.qconv import QuantConv2d
    from ultralytics_gabfusion.settings import PLUGIN_DEFAULTS

    root = tmp_path_factory.mktemp("bad-input")
    e = {"root": root}
    e["data"] = Path(make_synthetic_dataset(root / "synth", n_train=8, n_val=4, imgsz=64, seed=0, max_objects=3,
                                            workers=0))
    torch.manual_seed(0)
    fp = DetectionModel("yolov5n.yaml", nc=16, verbose=False)
    e["fp"] = _save_ckpt(fp, root / "fp.pt")
    e["teacher20"] = _save_ckpt(DetectionModel("yolov5n.yaml", nc=20, verbose=False), root / "teacher20.pt")
    e["yolo11"] = _save_ckpt(DetectionModel("yolo11n.yaml", nc=16, verbose=False), root / "yolo11n-fp.pt")
    gp = deepcopy(fp)
    insert_gabfusion(gp, "balanced", form="paper")
    e["gabpaper"] = _save_ckpt(gp, root / "fp-gab-paper.pt")  # a fine-tuned FP model with paper-form GABFusion
    q = deepcopy(fp)
    quantize_model(q, "lsq", 4, 4, 8, 8, None)
    init_weight_quantizers(q, init="paper")
    q.gabfusion = {**PLUGIN_DEFAULTS, "qat": "lsq", "w_bits": 4, "a_bits": 4}
    e["q"] = _save_ckpt(q, root / "q-w4a4-lsq.pt")
    plugin_args = {**PLUGIN_DEFAULTS, "qat": "lsq"}
    e["qlast"] = _save_ckpt(q, root / "last.pt", epoch=0, optimizer={"state": {}, "param_groups": []},
                            train_args={"model": "fp.pt", "data": str(e["data"]), "imgsz": 64, "epochs": 3, **plugin_args})
    for m in q.modules():  # a checkpoint written by a future plugin release
        if isinstance(m, QuantConv2d):
            m.format_version += 1
    e["newer"] = root / "newer-format.pt"
    torch.save({"epoch": -1, "model": q.half(), "train_args": {"imgsz": 64}}, e["newer"])
    blob = e["fp"].read_bytes()
    e["truncated"] = root / "truncated.pt"
    e["truncated"].write_bytes(blob[: len(blob) // 2])
    e["notckpt"] = root / "notes.pt"
    e["notckpt"].write_text("these are my notes\n")
    e["notes"] = root / "notes.txt"
    e["notes"].write_text("qat: lsq\n")
    e["notsens"] = root / "results.csv"  # a CSV, but not the sensitivity.csv of 'yolo-gab sensitivity'
    e["notsens"].write_text("epoch,train/box_loss\n1,0.5\n")
    e["sens"] = root / "sensitivity.csv"  # a valid ranking, for budget cases
    e["sens"].write_text("rank,layer,score\n1,4,0.9\n2,17,0.5\n")
    e["listyaml"] = root / "list.yaml"
    e["listyaml"].write_text("- qat\n- lsq\n")
    e["broken"] = root / "broken.yaml"
    e["broken"].write_text("qat: [lsq\n")
    e["ckptdir"] = root / "run-folder"
    e["ckptdir"].mkdir()
    e["noconcat"] = root / "noconcat.yaml"
    e["noconcat"].write_text(
        "nc: 16\nbackbone:\n  - [-1, 1, Conv, [16, 3, 2]]\n  - [-1, 1, Conv, [32, 3, 2]]\n  - [-1, 1, Conv, [64, 3, 2]]\n"
        "  - [-1, 1, Conv, [64, 3, 2]]\n  - [-1, 1, Conv, [64, 3, 2]]\nhead:\n  - [[2, 3, 4], 1, Detect, [nc]]\n")
    synth = e["data"].parent
    (noimg := root / "noimg").mkdir()
    (noimg / "images" / "train").mkdir(parents=True)
    (noimg / "images" / "val").mkdir(parents=True)
    e["noimg"] = root / "noimg.yaml"
    e["noimg"].write_text(f"path: {noimg}\ntrain: images/train\nval: images/val\nnc: 16\n")
    bad = root / "badlabels"
    shutil.copytree(synth, bad)
    for f in (bad / "labels").rglob("*.txt"):
        f.write_text("".join(f"99 {ln.split(' ', 1)[1]}\n" for ln in f.read_text().splitlines() if ln.strip()))
    e["badlabels"] = root / "badlabels.yaml"
    e["badlabels"].write_text(f"path: {bad}\ntrain: images/train\nval: images/val\nnc: 16\n")
    edited = root / "edited-synth"
    shutil.copytree(synth, edited)
    lb = sorted((edited / "labels" / "train").glob("*.txt"))[0]
    lb.write_text(lb.read_text() + "0 0.5 0.5 0.1 0.1\n")  # a hand-added box
    e["edited"] = edited
    e["foreign"] = root / "my-photos"
    e["foreign"].mkdir()
    (e["foreign"] / "holiday.jpg").write_bytes(b"not really a jpeg")
    if os.geteuid() == 0:  # root writes through file modes: use a read-only kernel file system instead
        e["readonly"] = Path("/sys/gab-readonly-test")
    else:
        e["readonly"] = root / "readonly"
        e["readonly"].mkdir()
        e["readonly"].chmod(0o555)
    return e


def _snapshot(*roots: Path, runs_dir: Path | None = None) -> dict:
    """Every file (size, mtime) under ``roots``; for the shared runs folder only its run folders' names."""
    out = {}
    for r in roots:
        if r.exists():
            for p in r.rglob("*"):
                st = p.lstat()
                out[str(p)] = (st.st_size, st.st_mtime_ns) if p.is_file() else None
    if runs_dir is not None and runs_dir.exists():
        out.update({str(p): None for p in runs_dir.glob("*/*")})  # other jobs may write inside existing runs
    return out


# ---------------------------------------------------------------------------------------------------------- cases
T = "train data={data} project={tmp}/runs epochs=1 imgsz=64 batch=4 device=cpu"
TQ = T + " model={fp} qat=lsq"

# (id, kind, command or call, words the message must contain)
#   kind 'cli': cli.main(argv) in-process; 'sub': a real `python -m ultralytics_gabfusion` process; 'api': Python.
CASES = [
    # bit-widths and methods
    ("w_bits=0", "cli", TQ + " w_bits=0", ["w_bits=0", "2..8"]),
    ("w_bits=1", "cli", TQ + " w_bits=1", ["w_bits=1", "2..8"]),
    ("a_bits=9", "cli", TQ + " a_bits=9", ["a_bits=9", "2..8"]),
    ("w_bits=4.5", "cli", TQ + " w_bits=4.5", ["w_bits", "integer"]),
    ("w_bits=four", "sub", TQ + " w_bits=four", ["w_bits", "integer"]),
    ("a_bits without qat", "cli", T + " model={fp} a_bits=3", ["a_bits", "qat=none", "qat=lsq"]),
    ("qat_skip without qat", "cli", T + " model={fp} qat_skip=[0]", ["qat_skip", "qat=none"]),
    ("unknown method", "cli", T + " model={fp} qat=xnor", ["qat=xnor", "lsq, lsqplus"]),
    ("method typo", "cli", T + " model={fp} qat=lsq+", ["qat=lsq+", "lsqplus"]),
    ("unknown gab mode", "cli", TQ + " gab=balance", ["gab=balance", "balanced"]),
    ("ada < 0", "cli", TQ + " ada=-1", ["ada=-1", ">= 0"]),
    ("qat_bn typo", "cli", TQ + " qat_bn=frozen", ["qat_bn=frozen", "train, freeze", "Did you mean 'qat_bn=freeze'"]),
    ("qat_act_zp typo", "cli", TQ + " qat_act_zp=foo", ["qat_act_zp=foo", "float, integer"]),
    ("qat_out_bits=4", "cli", TQ + " qat_out_bits=4", ["qat_out_bits=4", "0 (off) or 8"]),
    ("qat_out_bits with n2uq", "cli", T + " model={fp} qat=n2uq qat_out_bits=8", ["qat_out_bits=8", "qat=lsq|lsqplus"]),
    ("qat_out_bits with float offsets", "cli", TQ + " qat_out_bits=8 qat_act_zp=float",
     ["qat_out_bits=8", "qat_act_zp=integer"]),
    ("qat_out_bits without qat", "cli", T + " model={fp} qat_out_bits=8", ["qat_out_bits=8", "qat=lsq"]),
    ("qat_bn_recalib < 0", "cli", TQ + " qat_bn_recalib=-2", ["qat_bn_recalib=-2", "1..1000 or 0"]),
    ("qat_ema_tau = 0", "cli", TQ + " qat_ema_tau=0", ["qat_ema_tau=0", "auto", "> 0"]),
    ("qat_ema_tau word", "cli", TQ + " qat_ema_tau=fast", ["qat_ema_tau=fast", "auto"]),
    ("misspelt key", "sub", TQ + " w_bit=4", ["w_bit", "w_bits"]),
    ("mode typo", "sub", "tran model={fp} data={data} qat=lsq", ["tran", "Did you mean 'train'"]),
    ("plugin keys, stock trainer", "cli", TQ + " trainer=default", ["trainer=gab"]),
    ("qada without qat", "cli", T + " model={fp} ada=0.01 ada_attn=qada", ["qada", "qat="]),
    ("qat_skip out of range", "cli", TQ + " qat_skip=[99]", ["99", "out of range"]),
    ("ada_layers out of range", "cli", TQ + " ada=0.01 ada_layers=[99]", ["ada_layers", "99"]),
    ("imgsz not a stride multiple", "cli", TQ.replace("imgsz=64", "imgsz=100"), ["imgsz=100", "multiple", "96"]),
    ("qat_layer_bits layer without conv", "cli", TQ + " qat_layer_bits={{99:8}}",
     ["qat_layer_bits", "[99]", "layers that can be set"]),
    ("qat_layer_bits CSV not a sensitivity file", "cli", TQ + " qat_layer_bits={notsens} qat_bits_budget=4.5",
     ["qat_layer_bits={notsens}", "yolo-gab sensitivity", "columns layer, score"]),
    ("qat_bits_budget not a BOPs unit", "cli", TQ + " qat_layer_bits={sens} qat_bits_budget=2GFLOPs",
     ["qat_bits_budget=2GFLOPs", "GBOPs", "%BOPs"]),
    ("qat_bits_budget BOPs below the uniform plan", "cli", TQ + " qat_layer_bits={sens} qat_bits_budget=1MBOPs@64",
     ["qat_bits_budget=0.1 GBOPs at 640 px", "is below the uniform plan's", "% of FP)", "lower w_bits/a_bits"]),
    # ADA teacher
    ("ada without teacher", "cli", T + " model=yolov5n.yaml qat=lsq ada=0.01", ["teacher=", "ada=0"]),
    ("teacher without ada", "cli", TQ + " teacher={fp}", ["teacher", "ada=0.01"]),
    ("teacher missing", "cli", TQ + " ada=0.01 teacher={root}/nope.pt", ["nope.pt", "not found"]),
    ("teacher truncated", "cli", TQ + " ada=0.01 teacher={truncated}", ["truncated.pt", "not a readable"]),
    ("teacher not a checkpoint", "cli", TQ + " ada=0.01 teacher={notckpt}", ["notes.pt", "not a readable"]),
    ("teacher not .pt", "cli", TQ + " ada=0.01 teacher={notes}", ["notes.txt", ".pt"]),
    ("teacher other classes", "cli", TQ + " ada=0.01 teacher={teacher20}", ["20 classes", "16", "teacher="]),
    ("teacher other architecture", "cli", TQ + " ada=0.01 teacher={yolo11}", ["teacher does not match", "teacher="]),
    ("teacher quantized", "cli", TQ + " ada=0.01 teacher={q}", ["full precision", "teacher="]),
    # model
    ("gab=learned with gab_form=grad", "cli", T + " model={fp} gab=learned gab_form=grad",
     ["gab=learned", "gab_form=paper"]),
    ("gab_form other than the checkpoint's", "cli", T + " model={gabpaper} gab=balanced gab_form=grad",
     ["form paper", "gab_form=paper"]),
    ("gab_form typo", "cli", T + " model={fp} gab=balanced gab_form=ln", ["gab_form=ln", "grad, paper"]),
    ("no fusion Concat for gab", "cli", T + " model={noconcat} gab=balanced", ["gab=balanced", "gab=off"]),
    ("classify model with gab", "cli", T + " model=yolo11n-cls.yaml gab=balanced", ["classify", "detection"]),
    ("classify model", "cli", T + " model=yolo11n-cls.yaml", ["classify", "detection"]),
    ("model truncated .pt", "sub", T + " model={truncated}", ["truncated.pt", "not a readable"]),
    ("model not a checkpoint", "cli", T + " model={notckpt}", ["notes.pt", "not a readable"]),
    ("model is a directory", "cli", T + " model={ckptdir}", ["directory", ".pt"]),
    ("model missing", "cli", T + " model={root}/missing.pt", ["missing.pt", "not found"]),
    ("model newer format", "cli", T + " model={newer} qat=lsq", ["format", "Install the plugin version"]),
    ("model already quantized", "cli", T + " model={q} qat=pact w_bits=3", ["already quantized", "w_bits=3", "FP"]),
    ("quantized model, qat=none", "cli", T + " model={q}", ["already quantized", "qat=none"]),
    ("resume with changed qat keys", "cli", "train resume model={qlast} w_bits=3", ["resume", "w_bits=3", "new run"]),
    ("resume of a missing run", "cli", "train resume model={root}/gone/last.pt", ["last.pt", "not found"]),
    ("resume of a finished run", "cli", "train resume model={q}", ["nothing to resume", "model="]),
    # cfg=
    ("cfg missing", "cli", TQ + " cfg={root}/nope.yaml", ["cfg=", "not found"]),
    ("cfg not YAML", "cli", TQ + " cfg={notes}", ["cfg=", ".yaml"]),
    ("cfg YAML of a list", "cli", TQ + " cfg={listyaml}", ["cfg=", "list", "key: value"]),
    ("cfg broken YAML", "cli", TQ + " cfg={broken}", ["cfg=", "not valid YAML"]),
    # data=
    ("data missing", "cli", TQ.replace("data={data}", "data={root}/nope.yaml"), ["data=", "nope.yaml", "not found"]),
    ("data with no images", "cli", TQ.replace("data={data}", "data={noimg}"), ["noimg.yaml", "no images"]),
    ("data labels out of range", "cli", TQ.replace("data={data}", "data={badlabels}"), ["class 99", "names:"]),
    # export
    ("export unwritable save_dir", "cli", "export model={q} save_dir={readonly}/out", ["save_dir=", "cannot write"]),
    ("export other format", "cli", "export model={q} format=engine", ["format=engine", "format=onnx"]),
    ("export opset without int4", "cli", "export model={q} opset=17", ["opset=17", "opset=21"]),
    ("export FP model as Q/DQ", "cli", "export model={fp} save_dir={tmp}/out", ["quantized", "save_dir"]),
    ("export truncated", "cli", "export model={truncated}", ["truncated.pt", "not a readable"]),
    ("export imgsz=-1", "cli", "export model={q} format=onnx imgsz=-1 save_dir={tmp}/out",
     ["imgsz=-1", "positive multiple", "imgsz=32"]),
    ("export imgsz not a stride multiple", "cli", "export model={q} imgsz=100 save_dir={tmp}/out",
     ["imgsz=100", "multiple", "96"]),
    ("export batch=0 to OpenVINO", "cli", "export model={q} format=openvino batch=0 save_dir={tmp}/out",
     ["batch=0", "positive integer"]),
    ("export batch=-1", "cli", "export model={q} format=onnx batch=-1 save_dir={tmp}/out",
     ["batch=-1", "positive integer"]),
    ("export batch not a number", "sub", "export model={q} format=openvino batch=abc save_dir={tmp}/out",
     ["batch=abc", "positive integer"]),
    ("export FP batch=0", "cli", "export model={fp} format=onnx batch=0", ["batch=0", "positive integer"]),
    ("export opset=0", "cli", "export model={q} opset=0 save_dir={tmp}/out", ["opset=0", "opset=21"]),
    ("export opset not a number", "cli", "export model={q} opset=abc save_dir={tmp}/out", ["opset=abc", "opset=21"]),
    ("export silu unknown", "cli", "export model={q} silu=fast save_dir={tmp}/out", ["silu='fast'", "standard, ort"]),
    ("export silu to OpenVINO", "cli", "export model={q} format=openvino silu=ort save_dir={tmp}/out",
     ["silu=ort", "format=onnx"]),
    ("export data missing", "cli", "export model={q} data={root}/nope.yaml save_dir={tmp}/out", ["data=", "nope.yaml"]),
    # bench
    ("bench empty methods", "cli", "bench methods=[] out={tmp}/bench", ["methods", "empty"]),
    ("bench unknown arm", "cli", "bench arms=[baseline,fancy] out={tmp}/bench", ["fancy", "gab_ada"]),
    ("bench seeds not integers", "cli", "bench seeds=[a,b] out={tmp}/bench", ["seeds", "integer"]),
    # bench deploy: model= is the FP reference, quantized= the quantized checkpoints
    ("deploy quantized model=", "cli", "bench deploy model={q} quantized=[{q}] data={data} out={tmp}/d",
     ["model={q}", "quantized checkpoint", "FP checkpoint", "quantized=[...]"]),
    ("deploy FP checkpoint in quantized=", "cli", "bench deploy model={fp} quantized=[{fp}] data={data} out={tmp}/d",
     ["quantized:", "fp.pt", "no quantized layers"]),
    ("deploy model not a checkpoint", "cli", "bench deploy model={notckpt} quantized=[{q}] data={data} out={tmp}/d",
     ["notes.pt", "not a readable"]),
    ("deploy data not a YAML", "cli", "bench deploy model={fp} quantized=[{q}] data={fp} out={tmp}/d",
     ["data=", "not a data YAML"]),
    ("deploy val_imgsz not a multiple of 32", "cli",
     "bench deploy model={fp} quantized=[{q}] data={data} val_imgsz=100 out={tmp}/d",
     ["val_imgsz=100", "multiple of 32"]),
    ("deploy imgsz=0", "cli", "bench deploy model={fp} quantized=[{q}] data={data} imgsz=[0] out={tmp}/d",
     ["imgsz=0", ">= 32"]),
    ("deploy batch=0", "cli", "bench deploy model={fp} quantized=[{q}] data={data} batch=0 out={tmp}/d",
     ["batch=0", ">= 1"]),
    ("deploy runs=2", "cli", "bench deploy model={fp} quantized=[{q}] data={data} runs=2 out={tmp}/d",
     ["runs=2", ">= 5"]),
    ("deploy warmup=-1", "cli", "bench deploy model={fp} quantized=[{q}] data={data} warmup=-1 out={tmp}/d",
     ["warmup=-1", ">= 0."]),
    ("deploy threads=0", "cli", "bench deploy model={fp} quantized=[{q}] data={data} threads=0 out={tmp}/d",
     ["threads=0", ">= 1"]),
    ("deploy checkpoint listed twice", "cli",
     "bench deploy model={fp} quantized=[{q},{q}] data={data} out={tmp}/d", ["listed more than once"]),
    ("deploy nothing quantized", "sub", "bench deploy model={fp} ptq=[] data={data} out={tmp}/d",
     ["ptq is empty", "quantized="]),
    # sensitivity
    ("sensitivity quantized model", "cli",
     "sensitivity model={q} data={data} qat=lsq w_bits=4 a_bits=4 imgsz=64 project={tmp}/runs",
     ["model={q}", "quantized checkpoint", "FP checkpoint"]),
    ("sensitivity images=0", "cli", "sensitivity model={fp} data={data} qat=lsq imgsz=64 images=0 project={tmp}/runs",
     ["images=0", "positive integer"]),
    # synth
    ("synth train=0", "cli", "synth out={tmp}/s train=0 val=2 imgsz=64", ["n_train", "1"]),
    ("synth read-only out", "sub", "synth out={readonly}/s train=2 val=2 imgsz=64", ["out=", "cannot write"]),
    ("synth out is a file", "cli", "synth out={notes} train=2 val=2 imgsz=64", ["notes.txt", "is a file"]),
    ("synth out foreign folder", "cli", "synth out={foreign} train=2 val=2 imgsz=64", ["my-photos", "overwrite=True"]),
    ("synth hand-edited labels", "cli", "synth out={edited} train=8 val=4 imgsz=64 seed=1 max_objects=3",
     ["edited", "overwrite=True"]),
    # Python API where it differs from the CLI
    ("api: a_bits without qat", "api", "yolo_train", ["a_bits", "qat=none"]),
    ("api: cfg YAML of a list", "api", "trainer_cfg_list", ["cfg=", "key: value"]),
    ("api: data missing", "api", "trainer_data_missing", ["data=", "not found"]),
    ("api: truncated model", "api", "trainer_truncated", ["truncated.pt", "not a readable"]),
    ("api: Q/DQ export of an FP model", "api", "qdq_fp", ["no quantized layers", "export(format='onnx')"]),
    ("api: synth into an edited set", "api", "synth_edited", ["edited", "overwrite=True"]),
    ("api: PTQ of a quantized checkpoint", "api", "ptq_quantized", ["q-w4a4-lsq.pt", "quantized checkpoint", "FP"]),
]


def _api_call(name: str, e: dict, tmp: Path):
    """The Python API calls of the table; each must raise."""
    from ultralytics import YOLO

    from ultralytics_gabfusion import GABTrainer

    base = {"data": str(e["data"]), "project": str(tmp / "runs"), "epochs": 1, "imgsz": 64, "device": "cpu"}
    if name == "yolo_train":
        return YOLO(str(e["fp"])).train(trainer=GABTrainer, a_bits=3, **base)
    if name == "trainer_cfg_list":
        return GABTrainer(overrides={**base, "model": str(e["fp"]), "cfg": str(e["listyaml"])})
    if name == "trainer_data_missing":
        return GABTrainer(overrides={**base, "model": str(e["fp"]), "qat": "lsq", "data": str(tmp / "nope.yaml")})
    if name == "trainer_truncated":
        return GABTrainer(overrides={**base, "model": str(e["truncated"])})
    if name == "qdq_fp":
        from ultralytics_gabfusion.export import export_qdq_onnx, load_quantized_model

        return export_qdq_onnx(load_quantized_model(e["fp"], require_quantized=False), tmp / "fp.onnx", imgsz=64)
    if name == "ptq_quantized":
        from ultralytics_gabfusion.ptq import post_training_quantize

        return post_training_quantize(e["q"], data=str(e["data"]), qat="lsq", w_bits=4, a_bits=4, imgsz=64,
                                      project=str(tmp / "runs"), device="cpu")
    if name == "synth_edited":
        from ultralytics_gabfusion.data import make_synthetic_dataset

        return make_synthetic_dataset(e["edited"], n_train=8, n_val=4, imgsz=64, seed=1, max_objects=3, workers=0)
    raise KeyError(name)


@pytest.mark.parametrize("name,kind,command,words", CASES, ids=[c[0] for c in CASES])
def test_bad_input(name, kind, command, words, env, tmp_path, monkeypatch, capsys):
    from ultralytics.utils import SETTINGS

    from ultralytics_gabfusion.cli import main

    monkeypatch.chdir(tmp_path)  # anything written relative to the working directory would land here
    fmt = {k: str(v) for k, v in env.items()} | {"tmp": str(tmp_path)}
    watched = [env["root"], tmp_path]
    runs = Path(SETTINGS["runs_dir"])
    before = _snapshot(*watched, runs_dir=runs)
    t0 = time.perf_counter()
    if kind == "api":
        with pytest.raises((ValueError, FileNotFoundError, FileExistsError, PermissionError)) as info:
            _api_call(command, env, tmp_path)
        msg = str(info.value)
    else:
        argv = command.format(**fmt).split()
        if kind == "cli":
            rc = main(argv)
            err = capsys.readouterr().err
        else:
            res = run_cli(*argv, cwd=tmp_path, timeout=120)
            rc, err = res.returncode, res.stderr
            assert "Traceback" not in err, err[-2000:]
        assert rc != 0, f"exit status 0 for: {' '.join(argv)}"
        starts = [i for i, ln in enumerate(err.splitlines()) if ln.startswith("yolo-gab")]
        msg = "\n".join(err.splitlines()[starts[-1]:]) if starts else ""
        assert msg, f"no 'yolo-gab ...: error:' line in stderr: {err[-2000:]}"
        assert len(msg.splitlines()) == 1, f"the error is not one line: {msg}"
    dt = time.perf_counter() - t0
    for w in words:
        assert w.format(**fmt) in msg, f"{w!r} not in the message: {msg}"
    assert dt < CASE_SECONDS, f"took {dt:.1f}s: the check must run before any long work"
    after = _snapshot(*watched, runs_dir=runs)
    assert after == before, f"files changed: {sorted(set(after) ^ set(before)) or 'contents'}"
