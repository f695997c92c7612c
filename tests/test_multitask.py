"""Segmentation and pose: the plugin trainers of each task, CLI routing by task, the head output policy, GABFusion and
ADA on seg/pose necks, preflight errors of wrong task combinations, and a QAT checkpoint's reload, val and resume."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from conftest import IMGSZ, ROOT, run_cli, run_python, train_kwargs

SEG_YAML = ROOT / "cfg" / "models" / "yolov5n-seg.yaml"
QAT = dict(qat="lsq", w_bits=4, a_bits=4, gab="balanced", ada=0.1, qat_calib=1)


class Interrupt(Exception):
    pass


def _rows(path: Path) -> list[dict]:
    return [{k.strip(): v.strip() for k, v in r.items()} for r in csv.DictReader(open(path))]


def _head_rows(model) -> dict[str, tuple]:
    """{conv name: (W bits, A bits)} of the quantized convs of the head, read from the modules themselves."""
    from ultralytics_gabfusion.quant.qconv import quant_convs

    head = f"model.{len(model.model) - 1}."
    return {n: (m.weight_quant.bits if m.weight_quant is not None else None,
                m.act_quant.bits if m.act_quant is not None else None)
            for n, m in quant_convs(model) if n.startswith(head)}


# ---------------------------------------------------------------------------------------------- conversion policy
def test_head_outputs_of_segment_and_pose_heads_keep_head_bits():
    """Mask coefficients, prototypes and keypoints (v8/11 and YOLO26 heads) follow qat_head_bits, like box/class."""
    from collections import Counter

    from ultralytics.nn.tasks import PoseModel, SegmentationModel

    from ultralytics_gabfusion.quant.convert import format_policy, head_outputs, quantize_model, unquantized_layers
    from ultralytics_gabfusion.quant.qconv import QuantConvBlock

    seg = SegmentationModel(str(SEG_YAML), nc=2, verbose=False)
    rows = quantize_model(seg, "lsq", 4, 4)
    outs = {r["name"]: r["output"] for r in rows if r["role"] == "head"}
    assert Counter(outs.values()) == {"box": 3, "class": 3, "mask coefficients": 3, "mask prototypes": 1}
    head = seg.model[-1]
    assert outs["model.24.proto.cv3.conv"] == "mask prototypes" and isinstance(head.proto.cv3, QuantConvBlock)
    assert isinstance(head.proto.cv3.bn, nn.BatchNorm2d), "the prototype conv keeps its BN and SiLU"
    bits = _head_rows(seg)
    for name in outs:
        assert bits[name] == (8, 8), name
    ordinary = {n: b for n, b in bits.items() if n not in outs}
    assert ordinary and set(ordinary.values()) == {(4, 4)}, "the head's inner convs (and Proto.cv1/cv2) are ordinary"
    assert type(head.proto.upsample) is nn.ConvTranspose2d  # not a Conv2d: stays float, and the table says so
    table = format_policy(rows, unquantized_layers(seg))
    assert "lsq (head) mask prototypes" in table and "lsq (head) mask coefficients" in table
    assert "model.24.proto.upsample" in table and "not quantized (ConvTranspose2d" in table

    rows = quantize_model(SegmentationModel(str(SEG_YAML), nc=2, verbose=False), "lsq", 4, 4, head_bits=6)
    assert {(r["w_bits"], r["a_bits"]) for r in rows if r["role"] == "head"} == {(6, 6)}

    outputs = Counter(head_outputs(PoseModel("yolo26n-pose.yaml", nc=1, verbose=False)).values())
    assert outputs == {"box": 6, "class": 6, "keypoints": 6, "keypoint sigmas (training)": 6}  # + one-to-one copies
    outputs = Counter(head_outputs(SegmentationModel("yolo26n-seg.yaml", nc=2, verbose=False)).values())
    assert outputs["mask prototypes"] == 1 and outputs["mask coefficients"] == 6
    assert outputs["semantic logits (training)"] == 1


def test_gabfusion_yaml_and_insertion_on_seg_and_pose_necks():
    import ultralytics_gabfusion  # noqa: F401 - registers GABFusion for the -gab YAML
    from ultralytics.nn.tasks import PoseModel, SegmentationModel

    from ultralytics_gabfusion.distill import default_layers
    from ultralytics_gabfusion.fusion import GABFusion, insert_gabfusion, neck_concat_indices

    stock = SegmentationModel(str(SEG_YAML), nc=2, verbose=False)
    gab = SegmentationModel(str(ROOT / "cfg" / "models" / "yolov5n-seg-gab.yaml"), nc=2, verbose=False)
    assert neck_concat_indices(stock) == neck_concat_indices(gab) == [12, 16, 19, 22]
    assert [m.i for m in gab.model if isinstance(m, GABFusion)] == [12, 16, 19, 22]
    assert default_layers(gab) == [17, 20, 23], "ADA supervises the Segment head inputs (the neck outputs)"
    stock.eval(), gab.eval()
    gab.load_state_dict(stock.state_dict(), strict=False)  # every stock key exists in the -gab model
    x = torch.rand(1, 3, IMGSZ, IMGSZ)
    with torch.no_grad():
        assert torch.equal(stock(x)[0][0], gab(x)[0][0]), "the grad form computes the Concat it replaces"
    pose = PoseModel("yolov8n-pose.yaml", nc=1, data_kpt_shape=(4, 3), verbose=False)
    assert insert_gabfusion(pose, mode="balanced") == [11, 14, 17, 20]
    assert default_layers(pose) == [15, 18, 21]


# ------------------------------------------------------------------------------------------------- end to end
def test_segment_qat_gab_ada_reloads_validates_and_resumes_in_fresh_processes(task_data, task_fp_ckpt, tmp_path):
    """W4A4 LSQ + GABFusion + ADA on the seg model through GABTrainer (dispatched), stopped after epoch 1, then in a
    fresh process resumed with the CLI's train command and its best checkpoint reloaded and validated."""
    from ultralytics_gabfusion import GABSegmentationTrainer, GABTrainer, trainer_for

    data, fp = task_data["segment"], task_fp_ckpt["segment"]
    assert trainer_for(fp) is GABSegmentationTrainer
    t = GABTrainer(overrides={"model": str(fp), "data": str(data), **QAT, **train_kwargs(tmp_path, epochs=2, batch=4)})
    assert type(t) is GABSegmentationTrainer and t.args.task == "segment"

    def stop_after_first_epoch(trainer):
        if trainer.epoch == 0:
            raise Interrupt

    t.add_callback("on_fit_epoch_end", stop_after_first_epoch)
    with pytest.raises(Interrupt):
        t.train()
    assert {"seg_loss", "ada_loss"} <= set(t.loss_names)
    assert t._ada.layers == [17, 20, 23]
    run = Path(t.save_dir)
    last, best = run / "weights" / "last.pt", run / "weights" / "best.pt"
    res = run_python(  # one fresh process: 'yolo-gab train resume model=last.pt', then reload and validate best.pt
        "from ultralytics import YOLO\n"
        "from ultralytics_gabfusion.cli import main\n"
        "from ultralytics_gabfusion.quant.qconv import quant_convs\n"
        f"assert main(['train', 'resume', r'model={last}']) == 0\n"
        f"m = YOLO(r'{best}')\n"
        "q = dict(quant_convs(m.model))\n"
        "print('TASK', m.task, 'PROTO', q['model.24.proto.cv3.conv'].weight_quant.bits)\n"
        f"r = m.val(data=r'{data}', imgsz={IMGSZ}, batch=4, device='cpu', plots=False)\n"
        "print('SEG', 0 <= r.seg.map50 <= 1, 0 <= r.box.map50 <= 1)"
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert "TASK segment" in res.stdout and "PROTO 8" in res.stdout and "SEG True True" in res.stdout
    rows = _rows(run / "results.csv")
    assert [r["epoch"] for r in rows] == ["1", "2"], "the resumed run continued with epoch 2"
    for col in ("train/seg_loss", "train/ada_loss", "val/ada_loss", "ada/grad_ratio", "metrics/mAP50(M)"):
        assert col in rows[0] and rows[-1][col] != "", col
    assert {int(r["layer"]) for r in _rows(run / "gabfusion.csv")} == {12, 16, 19, 22}


def test_cli_pose_qat_gab_ada_as_typed(task_data, task_fp_ckpt, tmp_path):
    """'yolo-gab train trainer=gab model=<pose fp.pt> cfg=recipe gab=balanced ada=0.1': GABPoseTrainer, W4A4 LSQ."""
    from ultralytics import YOLO

    from ultralytics_gabfusion.quant.convert import head_outputs

    r = run_cli("train", "trainer=gab", f"model={task_fp_ckpt['pose']}", f"data={task_data['pose']}",
                "cfg=cfg/qat/w4a4-lsq.yaml", "gab=balanced", "ada=0.1", "qat_calib=1", f"imgsz={IMGSZ}", "epochs=1", "batch=4", "workers=0",
                "device=cpu", "plots=False", f"project={tmp_path}", "name=pose", "warmup_epochs=0", "mosaic=0.0")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "training with GABPoseTrainer" not in r.stdout + r.stderr, "the CLI picks the class itself"
    run = tmp_path / "pose"
    args = (run / "args.yaml").read_text()
    assert "task: pose" in args and "qat: lsq" in args and "gab: balanced" in args
    row = _rows(run / "results.csv")[0]
    for col in ("train/pose_loss", "train/kobj_loss", "train/ada_loss", "ada/ratio", "metrics/mAP50(P)"):
        assert row.get(col, "") != "", col
    assert {int(r["layer"]) for r in _rows(run / "gabfusion.csv")} == {11, 14, 17, 20}
    model = YOLO(str(run / "weights" / "best.pt"))
    assert model.task == "pose"
    bits = _head_rows(model.model)
    kpts = [n for n, what in head_outputs(model.model).items() if what == "keypoints"]
    assert len(kpts) == 3 and all(bits[n] == (8, 8) for n in kpts)
    assert any(b == (4, 4) for b in bits.values())


def test_cli_trainer_default_trains_a_seg_model_with_the_stock_seg_trainer(task_data, tmp_path):
    """Used to crash at validation ('tuple' object has no attribute 'shape'): the detection trainer got a seg model."""
    r = run_cli("train", "trainer=default", f"model={SEG_YAML}", f"data={task_data['segment']}", f"imgsz={IMGSZ}",
                "epochs=1", "batch=4", "workers=0", "device=cpu", "plots=False", f"project={tmp_path}", "name=stock",
                "warmup_epochs=0", "mosaic=0.0")
    assert r.returncode == 0, r.stderr[-3000:]
    args = (tmp_path / "stock" / "args.yaml").read_text()
    assert "task: segment" in args and "qat:" not in args
    assert "metrics/mAP50(M)" in _rows(tmp_path / "stock" / "results.csv")[0]


# ------------------------------------------------------------------------------------------- routing and errors
def test_routing_by_task():
    from ultralytics.models.yolo.pose import PoseTrainer
    from ultralytics.models.yolo.segment import SegmentationTrainer

    from ultralytics_gabfusion import GABPoseTrainer, GABSegmentationTrainer, GABTrainer, trainer_for
    from ultralytics_gabfusion.cli import resolve_trainer

    assert trainer_for("yolo11n-pose.yaml") is GABPoseTrainer and trainer_for(SEG_YAML) is GABSegmentationTrainer
    assert trainer_for("yolov5n.yaml") is GABTrainer and trainer_for(task="pose") is GABPoseTrainer
    with pytest.raises(ValueError, match="trainer=default"):
        trainer_for("yolo11n-obb.yaml")
    assert resolve_trainer("gab", "segment") is GABSegmentationTrainer
    assert resolve_trainer("default", "segment") is SegmentationTrainer
    assert resolve_trainer("default", "pose") is PoseTrainer
    assert issubclass(GABSegmentationTrainer, SegmentationTrainer)
    assert not issubclass(GABSegmentationTrainer, GABTrainer), "one mixin over each task trainer, not a chain"


def test_cli_refuses_wrong_task_combinations(capsys, task_data):
    from ultralytics_gabfusion.cli import main

    assert main(["train", "model=yolov8n-pose.yaml", "task=segment", f"data={task_data['segment']}"]) == 2
    assert "task=segment, but model=yolov8n-pose.yaml is a pose model" in capsys.readouterr().err
    assert main(["train", "model=yolo11n-obb.yaml", f"data={task_data['segment']}", "qat=lsq"]) == 2
    err = capsys.readouterr().err
    assert "GABSegmentationTrainer" in err and "trainer=default" in err


def test_preflight_refuses_wrong_task_combinations_before_a_run_folder(task_data, task_fp_ckpt, tiny_data, tmp_path):
    from ultralytics_gabfusion import GABPoseTrainer, GABSegmentationTrainer, GABTrainer

    def refused(cls, match, **kw):
        with pytest.raises(ValueError, match=match):
            cls(overrides={**train_kwargs(tmp_path), **kw})
        assert not any(tmp_path.iterdir()), "a refused configuration must not create a run folder"

    pose_fp, seg_fp = task_fp_ckpt["pose"], task_fp_ckpt["segment"]
    refused(GABPoseTrainer, r"teacher .* is a segment model, but the student is a pose model",
            model=str(pose_fp), data=str(task_data["pose"]), qat="lsq", ada=0.1, teacher=str(seg_fp))
    refused(GABPoseTrainer, "has no kpt_shape", model="yolov8n-pose.yaml", data=str(tiny_data))
    refused(GABSegmentationTrainer, "boxes only", model=str(SEG_YAML), data=str(tiny_data))  # a detect set
    refused(GABSegmentationTrainer, "pose model; GABSegmentationTrainer trains segmentation models. Use GABPoseTrainer",
            model=str(pose_fp), data=str(task_data["pose"]))
    refused(GABTrainer, "segment model; GABTrainer trains detection models. Use GABSegmentationTrainer",
            model=str(SEG_YAML), data=str(task_data["segment"]), task="detect")  # explicit task: no dispatch
    bad = tmp_path.parent / f"{tmp_path.name}-kpt5.yaml"
    bad.write_text(task_data["pose"].read_text().replace("kpt_shape: [4, 3]", "kpt_shape: [5, 3]")
                   .replace("flip_idx: [0, 3, 2, 1]", "flip_idx: [0, 3, 2, 1, 4]"))
    assert "[5, 3]" in bad.read_text() and "[0, 3, 2, 1, 4]" in bad.read_text()
    refused(GABPoseTrainer, r"has 17 numbers, but kpt_shape \[5, 3\] needs 5 \+ 5\*3 = 20", model="yolov8n-pose.yaml",
            data=str(bad))
    # a 5-keypoint copy of the set (the box centre added): QAT from the 4-keypoint FP model would restart its head
    five = tmp_path.parent / f"{tmp_path.name}-kpt5"
    shutil.copytree(task_data["pose"].parent, five, ignore=shutil.ignore_patterns("*.cache", "*.yaml"))
    for f in (five / "labels").rglob("*.txt"):
        f.write_text("".join(f"{ln} {ln.split()[1]} {ln.split()[2]} 2\n" for ln in f.read_text().splitlines()))
    (five / "data.yaml").write_text(bad.read_text().replace(str(task_data["pose"].parent), str(five)))
    refused(GABPoseTrainer, r"predicts kpt_shape \[4, 3\], but data=.* has \[5, 3\]", model=str(pose_fp),
            data=str(five / "data.yaml"), qat="lsq")


@pytest.mark.parametrize("task", ["segment", "pose"])
def test_bench_deploy_measures_segment_and_pose_models(task, task_data, task_fp_ckpt, tmp_path):
    """bench deploy on a segmentation / pose FP checkpoint: its W8A8 PTQ copy exported for ONNX Runtime and OpenVINO,
    every file timed and validated on the task's own metric (mask / pose mAP, box mAP beside it); a quantized
    checkpoint of another task is refused before anything is written."""
    from ultralytics_gabfusion.bench.common import BenchError
    from ultralytics_gabfusion.bench.deploy import report_table, resolve_settings, run_deploy

    # OpenVINO for one task only: its export path is the detection one (tested at length in test_deploy)
    runtimes = "[onnxruntime,openvino]" if task == "segment" else "[onnxruntime]"
    base = [f"model={task_fp_ckpt[task]}", f"data={task_data[task]}", "ptq=[w8a8]", f"imgsz=[{IMGSZ}]", "batch=1",
            "runs=5", "warmup=0", "block=5", f"runtimes={runtimes}"]
    res = run_deploy(resolve_settings(base + [f"out={tmp_path / 'out'}"]))
    assert res["task"] == task and res["metric"] == {"segment": "mask", "pose": "pose"}[task]
    rows = {(r["model"], r["runtime"]) for r in res["rows"]}
    assert {("FP", "onnxruntime"), ("W8A8 PTQ", "onnxruntime")} <= rows
    assert (("W8A8 PTQ", "openvino") in rows) == (task == "segment")
    for r in res["rows"]:
        assert r["ms_64"]["median"] > 0
        v = r["val"] or r["torch_val"]["torch"]
        assert {"mAP50", "mAP50_95", "box_mAP50"} <= set(v) and 0 <= v["mAP50"] <= 100
    assert f"{res['metric']} mAP50 file" in report_table(res)
    other = task_fp_ckpt["pose" if task == "segment" else "segment"]
    q = next((tmp_path / "out" / "models").glob("*.pt"))
    with pytest.raises(BenchError, match="model of one task|task"):
        resolve_settings([f"model={other}", f"data={task_data[task]}", f"quantized=[{q}]", f"out={tmp_path / 'o2'}"])
    assert not (tmp_path / "o2").exists()
