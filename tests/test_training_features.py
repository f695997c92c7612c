"""GABFusion and ADA inside real GABTrainer runs; resume and reload of quantized checkpoints."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch

from conftest import IMGSZ, ROOT, run_cli, run_python, train_kwargs


def qat_train(fp, data, tmp_path, **kw):
    from ultralytics import YOLO

    from ultralytics_gabfusion import GABTrainer

    model = YOLO(str(fp))
    model.train(trainer=GABTrainer, data=str(data), qat_calib=1, **train_kwargs(tmp_path, **kw))
    return model


# ------------------------------------------------------------------------------------------------- GABFusion
@pytest.mark.parametrize("qat,form", [("none", "paper"), ("lsq", None)])
def test_gabfusion_training_with_and_without_quantization(qat, form, tmp_path, tiny_data, fp_ckpt):
    from ultralytics_gabfusion.fusion import GABFusion

    model = qat_train(fp_ckpt["yolov5s"], tiny_data, tmp_path, qat=qat, gab="balanced", gab_form=form, epochs=2)
    run = Path(model.trainer.save_dir)
    nodes = [m for m in model.trainer.model.modules() if isinstance(m, GABFusion)]
    assert [n.i for n in nodes] == [12, 16, 19, 22] and all(n.form == (form or "grad") for n in nodes)
    assert model.trainer.model.gabfusion["gab_form"] == (form or "grad")  # the form built is recorded
    rows = list(csv.DictReader(open(run / "gabfusion.csv")))
    assert {r["layer"] for r in rows} == {"12", "16", "19", "22"} and {r["epoch"] for r in rows} == {"1", "2"}
    # 2 batches/epoch with accumulate=4: the first optimizer step (and gradient measurement) is in epoch 2
    assert all(float(r["grad_ema"]) > 0 for r in rows if r["epoch"] == "2")
    assert (run / "gabfusion.png").stat().st_size > 1000
    lam_train = nodes[0].lam.detach().clone()
    assert not torch.allclose(lam_train, torch.zeros_like(lam_train)), "balanced mode moved lambda"

    # alpha survives the fp16 checkpoint and a reload in a fresh process, bit for bit
    best = run / "weights" / "best.pt"
    ck = torch.load(best, weights_only=False)
    alphas = [m.alpha.tolist() for m in ck["model"].modules() if isinstance(m, GABFusion)]
    r = run_python(
        "import ultralytics_gabfusion; from ultralytics import YOLO; from ultralytics_gabfusion.fusion import GABFusion\n"
        f"m = YOLO(r'{best}').model\n"
        "print('ALPHA', [g.alpha.tolist() for g in m.modules() if isinstance(g, GABFusion)])"
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"ALPHA {alphas}" in r.stdout

    # LayerNorm folding holds its tolerance on trained weights (train images to fit, held-out val images to check)
    from ultralytics_gabfusion.export import load_images
    from ultralytics_gabfusion.fusion import DEFAULT_FOLD_TOL, FoldedFusion, fold_gabfusion

    trained = ck["model"].float().eval()
    fit = load_images(Path(tiny_data).parent / "images" / "train", IMGSZ, n=16)
    held_out = load_images(tiny_data, IMGSZ, n=8)
    rep = fold_gabfusion(trained, fit, check_images=held_out)
    assert rep["output_rel_change"] <= DEFAULT_FOLD_TOL and sum(isinstance(m, FoldedFusion) for m in trained.modules()) == 4


def test_gab_model_yaml_trains_and_learned_mode(tmp_path, tiny_data):
    from ultralytics import YOLO

    from ultralytics_gabfusion import GABTrainer
    from ultralytics_gabfusion.fusion import GABFusion

    model = YOLO(str(ROOT / "cfg" / "models" / "yolo11s-gab.yaml"))
    # nbs=8 with batch 8: one optimizer step per batch, so the 2 batches of the epoch do update the weights
    model.train(trainer=GABTrainer, data=str(tiny_data), gab="learned", **train_kwargs(tmp_path, nbs=8, lr0=0.1))
    nodes = [m for m in model.trainer.model.modules() if isinstance(m, GABFusion)]
    assert [n.i for n in nodes] == [12, 15, 18, 21] and all(n.mode == "learned" for n in nodes)
    # backprop moved the learned fusion weights away from their start (lam = 0, alpha = 1/K)
    for n in nodes:
        assert float(n.lam.detach().abs().max()) > 1e-6, n.lam
        assert float((n.alpha - 0.5).abs().max()) > 1e-7, n.alpha
    groups = {g.get("param_group"): g for g in model.trainer.optimizer.param_groups}
    lam_ids = {id(n.lam) for n in nodes}
    assert lam_ids <= {id(p) for p in groups["fusion"]["params"]} and groups["fusion"]["weight_decay"] == 0


def test_gab_bad_value_is_rejected(tiny_data, tmp_path):
    r = run_cli("train", "model=yolov5s.yaml", f"data={tiny_data}", "gab=on", f"project={tmp_path}")
    assert r.returncode == 2 and "balanced, learned, off" in r.stderr


# -------------------------------------------------------------------------------------------------------- ADA
@pytest.mark.parametrize("attn,div,qat", [("simam", "kl", "lsq"), ("qada", "js", "n2uq")])
def test_ada_run_logs_loss_and_never_saves_teacher(attn, div, qat, tmp_path, tiny_data, fp_ckpt):
    import shutil

    fp_copy = tmp_path / "fp_teacher.pt"
    shutil.copy(fp_ckpt["yolov5s"], fp_copy)
    # qat_bn_recalib=0: the val < train comparison below needs both models on their own running statistics in eval
    # (re-estimation gives the student the statistics of the quantized network, the teacher keeps its FP ones)
    model = qat_train(fp_copy, tiny_data, tmp_path, qat=qat, gab="balanced", ada=0.01, ada_attn=attn, ada_div=div,
                      qat_bn_recalib=0)
    run = Path(model.trainer.save_dir)
    header = (run / "results.csv").read_text().splitlines()[0].split(",")
    assert "train/ada_loss" in header and "val/ada_loss" in header and "ada/ratio" in header
    assert "ada/grad_ratio" in header
    row = list(csv.DictReader(open(run / "results.csv")))[0]
    assert 0 < float(row["ada/grad_ratio"]) < 1e3  # measured: ADA's gradient / the detection gradient at the features
    # val/ada_loss is the same weighted term on the EMA model: positive (P != R) and logged with significant digits
    # (in eval mode both models use running BN statistics, so it is orders of magnitude below the training term,
    # where the student normalises with batch statistics and the teacher with running ones)
    train_ada, val_ada = float(row["train/ada_loss"]), float(row["val/ada_loss"])
    assert train_ada > 0 and 0 < val_ada < train_ada, (train_ada, val_ada)
    assert "teacher: " + str(fp_copy) in (run / "args.yaml").read_text()

    best = run / "weights" / "best.pt"
    ck = torch.load(best, weights_only=False)
    n_params = sum(p.numel() for p in ck["model"].parameters())
    fp_params = sum(p.numel() for p in torch.load(fp_copy, weights_only=False)["model"].parameters())
    assert n_params < 1.2 * fp_params, "the checkpoint holds no teacher"
    assert getattr(ck["model"], "criterion", None) is None
    fp_copy.unlink()  # the quantized model must reload and validate without the teacher file
    r = run_python(
        "import ultralytics_gabfusion; from ultralytics import YOLO\n"
        f"r = YOLO(r'{best}').val(data=r'{tiny_data}', imgsz={IMGSZ}, batch=8, device='cpu', plots=False)\n"
        "print('OK', r.box.map50)"
    )
    assert r.returncode == 0 and "OK" in r.stdout, r.stderr[-2000:]


def test_ada_mismatched_teacher(tmp_path, tiny_data, fp_ckpt):
    from ultralytics import YOLO

    from ultralytics_gabfusion import GABTrainer

    with pytest.raises(ValueError, match="teacher"):
        YOLO(str(fp_ckpt["yolov5s"])).train(trainer=GABTrainer, data=str(tiny_data), qat="lsq", ada=0.01,
                                           teacher=str(fp_ckpt["yolo11s"]), **train_kwargs(tmp_path))


# ---------------------------------------------------------------------------------------------- resume/reload
class Interrupt(Exception):
    pass


def _quant_state(model):
    from ultralytics_gabfusion.fusion import GABFusion
    from ultralytics_gabfusion.quant.convert import quantizers

    out = {f"q.{n}.{k}": v.detach().float().clone() for n, q in quantizers(model) for k, v in q.state_dict().items()}
    for i, m in enumerate(x for x in model.modules() if isinstance(x, GABFusion)):
        out[f"gab{i}.lam"] = m.lam.detach().float().clone()
        out[f"gab{i}.grad_ema"] = m.grad_ema.detach().float().clone()
    return out


def test_resume_restores_quantizers_fusion_and_keys(tmp_path, tiny_data, fp_ckpt):
    from ultralytics import YOLO

    from ultralytics_gabfusion import GABTrainer
    from ultralytics_gabfusion.settings import PLUGIN_KEYS

    model = YOLO(str(fp_ckpt["yolov5s"]))

    def stop_after_first_epoch(trainer):
        if trainer.epoch == 0:
            raise Interrupt

    model.add_callback("on_fit_epoch_end", stop_after_first_epoch)
    with pytest.raises(Interrupt):
        model.train(trainer=GABTrainer, data=str(tiny_data), qat="n2uq", w_bits=3, a_bits=3, gab="balanced",
                    gab_form="paper", qat_calib=1, qat_lr=0.1, **train_kwargs(tmp_path, epochs=2))
    last = tmp_path / "run" / "weights" / "last.pt"
    saved = torch.load(last, weights_only=False)
    assert saved["epoch"] == 0 and saved["optimizer"] is not None
    ema = saved["ema"].float()
    ema.load_state_dict(saved["gab_resume"]["ema"])  # last.pt's exact fp32 EMA, which resume restores
    saved_state = _quant_state(ema)
    saved_args = {k: saved["train_args"][k] for k in PLUGIN_KEYS}

    seen = {}

    def capture(trainer):
        seen["ema"] = _quant_state(trainer.ema.ema)
        seen["args"] = {k: getattr(trainer.args, k) for k in PLUGIN_KEYS}
        seen["groups"] = [g.get("param_group") for g in trainer.optimizer.param_groups]

    resumed = YOLO(str(last))
    resumed.add_callback("on_pretrain_routine_end", capture)
    resumed.train(trainer=GABTrainer, resume=True)
    assert seen["args"] == saved_args and seen["args"]["qat"] == "n2uq" and seen["args"]["w_bits"] == 3
    assert set(seen["ema"]) == set(saved_state)
    for k, v in saved_state.items():
        assert torch.equal(seen["ema"][k], v), k
    assert "quant" in seen["groups"] and "fusion" in seen["groups"]
    rows = list(csv.DictReader(open(tmp_path / "run" / "results.csv")))
    assert [r["epoch"].strip() for r in rows][:2] == ["1", "2"]
    assert float(rows[-1]["metrics/mAP50-95(B)"]) >= 0


def test_reload_in_fresh_process_gives_final_eval_metrics(tmp_path, tiny_data, fp_ckpt):
    model = qat_train(fp_ckpt["yolo11s"], tiny_data, tmp_path, qat="lsq", gab="balanced", epochs=1)
    final = model.trainer.metrics
    best = Path(model.trainer.best)
    r = run_python(
        "import json, ultralytics_gabfusion; from ultralytics import YOLO\n"
        f"m = YOLO(r'{best}').val(data=r'{tiny_data}', imgsz={IMGSZ}, batch=16, device='cpu', plots=False)\n"
        "print('METRICS', json.dumps({k: float(v) for k, v in m.results_dict.items()}))"
    )
    assert r.returncode == 0, r.stderr[-2000:]
    import json

    fresh = json.loads(r.stdout.split("METRICS", 1)[1].strip().splitlines()[0])
    for k in ("metrics/precision(B)", "metrics/recall(B)", "metrics/mAP50(B)", "metrics/mAP50-95(B)"):
        assert fresh[k] == pytest.approx(float(final[k]), abs=1e-9), k


def test_cli_resume_finishes_interrupted_run(tmp_path, tiny_data, fp_ckpt):
    from ultralytics import YOLO

    from ultralytics_gabfusion import GABTrainer

    model = YOLO(str(fp_ckpt["yolov5s"]))

    def stop(trainer):
        raise Interrupt

    model.add_callback("on_fit_epoch_end", stop)
    with pytest.raises(Interrupt):
        model.train(trainer=GABTrainer, data=str(tiny_data), qat="lsq", gab="balanced", qat_calib=1,
                    **train_kwargs(tmp_path, epochs=2))
    last = tmp_path / "run" / "weights" / "last.pt"
    r = run_cli("train", "resume", f"model={last}")
    assert r.returncode == 0, r.stderr[-3000:]
    rows = list(csv.DictReader(open(tmp_path / "run" / "results.csv")))
    assert len(rows) >= 2 and (tmp_path / "run" / "weights" / "best.pt").exists()
    args = (tmp_path / "run" / "args.yaml").read_text()
    assert "qat: lsq" in args and "gab: balanced" in args


# ------------------------------------------------------------------------------------------ conv output quantizers
def test_qat_with_output_quantizers_trains_reloads_and_exports_integer_convs(tmp_path, tiny_data, fp_ckpt):
    """qat_out_bits=8 end to end: a QAT run calibrates and trains with the output quantizers, best.pt
    reloads in a fresh process with them, and its Q/DQ file runs every such conv as QLinearConv with parity."""
    from ultralytics_gabfusion.quant.qconv import output_quantizers

    model = qat_train(fp_ckpt["yolov5s"], tiny_data, tmp_path, qat="lsq", w_bits=4, a_bits=4, qat_out_bits=8)
    best = Path(model.trainer.save_dir) / "weights" / "best.pt"
    outs = list(output_quantizers(model.trainer.model))
    assert outs and all(bool(q.initialized) for _, _, q in outs)
    code = f"""
import json
from ultralytics_gabfusion.export import export_qdq_onnx, load_quantized_model
from ultralytics_gabfusion.export.ort_kernels import ort_conv_kernels
from ultralytics_gabfusion.quant.qconv import output_quantizers
net = load_quantized_model({str(best)!r})
n = len(list(output_quantizers(net)))
info = export_qdq_onnx(net, {str(tmp_path / 'q.onnx')!r}, imgsz={IMGSZ}, images={str(tiny_data)!r}, verbose=False)
print(json.dumps({{"outs": n, "ok": info["parity"]["ok"], "kernels": ort_conv_kernels({str(tmp_path / 'q.onnx')!r})}}))
"""
    r = run_python(code)
    assert r.returncode == 0, r.stderr[-2000:]
    res = __import__("json").loads(r.stdout.strip().splitlines()[-1])
    assert res["ok"] and res["outs"] == len(outs) and res["kernels"].get("QLinearConv") == len(outs), res
