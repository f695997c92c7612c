"""QAT stability keys: frozen BatchNorm (``qat_bn``), BatchNorm re-estimation before validation (``qat_bn_recalib``),
the EMA ramp (``qat_ema_tau``) and the bench's per-run stability record."""

from __future__ import annotations

import math
from copy import deepcopy

import pytest
import torch
import torch.nn as nn

from conftest import bench_result, train_kwargs
from ultralytics_gabfusion.stability import (
    auto_ema_tau,
    bn_statistics,
    ema_decay,
    freeze_bn_stats,
    recalibrate_bn,
    shift_bn_statistics,
)


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 5, 3, padding=1), nn.BatchNorm2d(5), nn.SiLU(), nn.Conv2d(5, 4, 1),
                         nn.BatchNorm2d(4)).double()


def test_recalibrate_bn_is_the_plain_average_of_batch_statistics():
    """Running mean/var after re-estimation = mean over batches of each batch's mean / unbiased variance (float64)."""
    net = _net().eval()
    batches = [torch.rand(3, 3, 6, 6, dtype=torch.float64) * (i + 1) for i in range(3)]
    before = {k: v.clone() for k, v in net.state_dict().items() if "running" not in k and "num_batches" not in k}
    assert recalibrate_bn(net, batches) == 3
    # expected: the first BN sees conv0(x); the second sees conv3(silu(bn1(conv0(x)))) with bn1 in batch mode
    conv0, bn1, conv3 = net[0], net[1], net[3]
    means1, vars1, means2, vars2 = [], [], [], []
    for x in batches:
        z = conv0(x)
        means1.append(z.mean((0, 2, 3)))
        vars1.append(z.var((0, 2, 3), unbiased=True))
        zn = (z - z.mean((0, 2, 3), keepdim=True)) / torch.sqrt(z.var((0, 2, 3), unbiased=False, keepdim=True) + bn1.eps)
        z2 = conv3(torch.nn.functional.silu(zn * bn1.weight[None, :, None, None] + bn1.bias[None, :, None, None]))
        means2.append(z2.mean((0, 2, 3)))
        vars2.append(z2.var((0, 2, 3), unbiased=True))
    torch.testing.assert_close(net[1].running_mean, torch.stack(means1).mean(0), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(net[1].running_var, torch.stack(vars1).mean(0), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(net[4].running_mean, torch.stack(means2).mean(0), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(net[4].running_var, torch.stack(vars2).mean(0), rtol=1e-12, atol=1e-12)
    # flags, momentum and every other tensor as they were
    assert not net.training and not any(m.training for m in net.modules())
    assert net[1].momentum == 0.1 and net[4].momentum == 0.1
    for k, v in net.state_dict().items():
        if k in before:
            assert torch.equal(v, before[k]), k
    assert recalibrate_bn(net, []) == 0


def test_shift_bn_statistics_moves_trained_statistics_by_the_quantization_shift():
    """mean = base + (mean_q - mean_fp), var = base * var_q / var_fp, each estimate the plain average (float64)."""
    from ultralytics_gabfusion.quant.convert import init_weight_quantizers, quantize_model
    from ultralytics_gabfusion.quant.qconv import quantizers_disabled

    net = _net()
    quantize_model(net, "lsq", 3, 3, first_bits=0, head_bits=0)
    init_weight_quantizers(net)
    net.double().eval()
    g = torch.Generator().manual_seed(0)
    for m in (net[1], net[4]):  # "trained" statistics, unlike anything the batches give
        m.running_mean.copy_(torch.randn(m.num_features, generator=g, dtype=torch.float64))
        m.running_var.copy_(torch.rand(m.num_features, generator=g, dtype=torch.float64) + 0.5)
    base = bn_statistics(net)
    batches = [torch.rand(3, 3, 6, 6, generator=g, dtype=torch.float64) * (i + 1) for i in range(3)]
    fp, q = deepcopy(net), deepcopy(net)
    with quantizers_disabled(fp):
        recalibrate_bn(fp, batches)
    recalibrate_bn(q, batches)
    assert shift_bn_statistics(net, batches, base) == 3
    for i in (1, 4):
        shift = q[i].running_mean - fp[i].running_mean
        assert shift.abs().max() > 1e-3  # 3-bit quantization does move the statistics here
        torch.testing.assert_close(net[i].running_mean, base[net[i]][0] + shift, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(net[i].running_var, base[net[i]][1] * q[i].running_var / fp[i].running_var,
                                   rtol=1e-12, atol=1e-12)
    assert not any(m.training for m in net.modules())
    assert shift_bn_statistics(net, [], base) == 0


def test_w8a8_ptq_of_a_trained_detector_keeps_its_detections_and_statistics(trained_fp, tiny_data):
    """W8A8 is indistinguishable from FP on a trained model, for every method, BatchNorm re-estimation on (default).

    Every FP detection (conf >= 0.25) has a W8A8 detection of the same class with IoU > 0.7 (conf >= 0.2), and the
    BatchNorm statistics stay at the trained ones. A plain re-estimation on a few augmented batches moved them by its
    sampling noise and cost 13 % of the detections on the shipped model (docs/RESULTS.md 16).
    """
    from ultralytics.data.utils import check_det_dataset
    from ultralytics.nn.tasks import load_checkpoint
    from ultralytics.utils.metrics import box_iou
    from ultralytics.utils.nms import non_max_suppression

    from ultralytics_gabfusion.export import _image_files, load_images
    from ultralytics_gabfusion.qat_setup import calibrate_model
    from ultralytics_gabfusion.quant.convert import init_weight_quantizers, quantize_model

    size = 160  # the shipped model's size: real detections
    fp, _ = load_checkpoint(str(trained_fp))
    fp = fp.float().eval()
    train = load_images(_image_files(check_det_dataset(str(tiny_data), autodownload=False)["train"]), size, n=16)
    calib, bn_images = [train[:8]], [train[8:12], train[12:]]
    val = load_images(tiny_data, size, n=8)

    def dets(m, conf):
        with torch.no_grad():
            return non_max_suppression(m(val)[0], conf_thres=conf, iou_thres=0.7)

    ref = dets(fp, 0.25)
    assert sum(len(d) for d in ref) >= 8
    for method in ("lsq", "lsqplus", "pact", "n2uq"):
        q = deepcopy(fp)
        quantize_model(q, method, 8, 8)
        init_weight_quantizers(q)
        calibrate_model(q, calib, bn_images=bn_images)
        q.eval()
        # per channel: mean moved in units of the trained std, |log| of the variance ratio. Measured on the shipped
        # model: medians 0.003 / 0.008 with the shift, 0.014 / 0.11 with a plain re-estimation
        pairs = list(zip(bn_statistics(fp).values(), bn_statistics(q).values()))
        dev = torch.cat([(m1[0] - m0[0]).abs() / m0[1].sqrt() for m0, m1 in pairs])
        ratio = torch.cat([(m1[1] / m0[1]).log().abs() for m0, m1 in pairs])
        assert dev.median() < 0.007 and dev.quantile(0.99) < 0.3 and ratio.median() < 0.03, (method, dev, ratio)
        for d0, d1 in zip(ref, dets(q, 0.2)):
            if len(d0):
                iou = box_iou(d0[:, :4], d1[:, :4]) if len(d1) else torch.zeros(len(d0), 0)
                same = d0[:, 5:6] == d1[:, 5][None] if len(d1) else iou.bool()
                assert ((iou > 0.7) & same).any(1).all(), (method, d0, d1)


def test_recalibrate_bn_keeps_a_train_mode_model_in_train_mode():
    net = _net().train()
    recalibrate_bn(net, [torch.rand(2, 3, 4, 4, dtype=torch.float64)])
    assert all(m.training for m in net.modules())


def test_recalibrate_bn_keeps_statistics_of_constant_channels():
    """A channel whose input is constant on every batch (var ~0), or whose variance falls below 1 % of what it was,
    keeps its old statistics; the others are re-estimated."""
    net = _net().eval()
    with torch.no_grad():
        net[0].weight[2].zero_()  # channel 2 of the first BN sees only the bias: a constant
        net[1].running_mean.fill_(0.5)
        net[1].running_var.fill_(0.04)  # the order of the batch variances here (0.01-0.07)
        net[1].running_var[4] = 10.0  # a channel whose variance falls below 1 % of what it was: kept too
    recalibrate_bn(net, [torch.rand(3, 3, 6, 6, dtype=torch.float64) for _ in range(2)])
    assert net[1].running_mean[2] == 0.5 and net[1].running_var[2] == 0.04
    assert net[1].running_mean[4] == 0.5 and net[1].running_var[4] == 10.0
    assert (net[1].running_var[[0, 1, 3]] != 0.04).all() and (net[1].running_var > net[1].eps).all()


def test_frozen_bn_trains_the_function_that_is_validated():
    """With frozen BN a training step keeps the running statistics, and the train-mode forward is the eval forward."""
    net = _net().train()
    stats = {k: v.clone() for k, v in net.state_dict().items() if "running" in k}
    assert freeze_bn_stats(net) == 2
    x = torch.rand(4, 3, 6, 6, dtype=torch.float64)
    y_train = net(x)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    y_train.square().mean().backward()
    opt.step()
    for k, v in net.state_dict().items():
        if k in stats:
            assert torch.equal(v, stats[k]), k
    assert net[0].training and not net[1].training
    y_now = net(x)
    torch.testing.assert_close(y_now, deepcopy(net).eval()(x), rtol=0, atol=0)
    assert net[1].weight.grad is not None and net[1].weight.grad.abs().sum() > 0, "the BN affine still trains"


def test_ema_ramp_formula():
    d = ema_decay(40.0)
    for x in (1, 10, 80):
        assert d(x) == pytest.approx(0.9999 * (1 - math.exp(-x / 40.0)), rel=1e-15)
    assert auto_ema_tau(80) == pytest.approx(80 / math.log(8))
    assert auto_ema_tau(5) == 5.0 and auto_ema_tau(0) == 1.0
    # the window 1/(1-d) at the run's end is about a tenth of the run
    t = 500
    assert 1 / (1 - ema_decay(auto_ema_tau(t), max_decay=1.0)(t)) == pytest.approx(t / 10)


# ------------------------------------------------------------------------------------------ through the trainer
def _bn_stats(model) -> dict:
    return {k: v.detach().float().clone() for k, v in model.state_dict().items()
            if k.endswith("running_mean") or k.endswith("running_var")}


def test_trainer_recalib_and_ema_tau(tmp_path, tiny_data, trained_fp):
    """qat_bn_recalib: the validated EMA (and the saved checkpoint) carries statistics re-estimated on the cached
    batches; qat_ema_tau=auto: the EMA ramp is sized to the run."""
    from ultralytics_gabfusion import GABTrainer

    t = GABTrainer(overrides={"model": str(trained_fp), "data": str(tiny_data), "qat": "lsq", "w_bits": 4,
                              "a_bits": 4, "qat_calib": 1, "qat_bn_recalib": 2, "qat_ema_tau": "auto",
                              **train_kwargs(tmp_path, epochs=1, batch=4)})
    seen = {}

    def at_start(trainer):  # step 0: after calibration, before any training step
        seen["model"] = deepcopy(trainer.model)

    t.add_callback("on_train_start", at_start)
    t.train()
    assert len(t._bn_images) == 2 and t._bn_images[0].dtype == torch.uint8
    images = [x.float() / 255 for x in t._bn_images]
    # step 0: the trained statistics are moved by the shift that quantization causes on the cached batches
    start, again0 = _bn_stats(seen["model"]), deepcopy(seen["model"])
    from ultralytics import YOLO

    fp = _bn_stats(YOLO(str(trained_fp)).model)
    base = {m: (fp[f"{n}.running_mean"], fp[f"{n}.running_var"]) for n, m in again0.named_modules()
            if f"{n}.running_mean" in fp}
    shift_bn_statistics(again0, images, base)
    for k, v in _bn_stats(again0).items():
        torch.testing.assert_close(start[k], v, rtol=1e-5, atol=1e-6)
    assert any(not torch.allclose(start[k], fp[k]) for k in start)
    updates = 1 * max(len(t.train_loader) // t.accumulate, 1)
    assert t.ema.decay(7) == pytest.approx(ema_decay(auto_ema_tau(updates))(7))
    ema = t.ema.ema
    again = deepcopy(ema)
    recalibrate_bn(again, images)
    got, want, raw = _bn_stats(ema), _bn_stats(again), _bn_stats(t.model)
    assert got.keys() == want.keys() and got
    for k in got:
        torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-6)
    assert any(not torch.allclose(got[k], raw[k]) for k in got), "the EMA's statistics were re-estimated"
    saved = torch.load(tmp_path / "run" / "weights" / "last.pt", weights_only=False)["model"].float()
    for k, v in _bn_stats(saved).items():
        torch.testing.assert_close(v, got[k], rtol=1e-6, atol=1e-7)


def test_trainer_frozen_bn_keeps_step0_statistics(tmp_path, tiny_data, trained_fp):
    """qat_bn=freeze: the statistics re-estimated at step 0 are used in training and kept to the end (no
    re-estimation before validation); without qat_bn_recalib they would be the FP checkpoint's."""
    from ultralytics import YOLO

    from ultralytics_gabfusion import GABTrainer

    fp = _bn_stats(YOLO(str(trained_fp)).model)
    seen = {}
    t = GABTrainer(overrides={"model": str(trained_fp), "data": str(tiny_data), "qat": "lsq", "w_bits": 4,
                              "a_bits": 4, "qat_calib": 1, "qat_bn": "freeze", "qat_bn_recalib": 2,
                              **train_kwargs(tmp_path, epochs=1, batch=4)})
    t.add_callback("on_train_start", lambda tr: seen.setdefault("start", _bn_stats(tr.model)))
    t.train()
    assert not any(m.training for m in t.model.modules() if isinstance(m, nn.BatchNorm2d))
    saved = _bn_stats(torch.load(tmp_path / "run" / "weights" / "last.pt", weights_only=False)["model"].float())
    assert saved.keys() == fp.keys() == seen["start"].keys()
    for k, v in saved.items():
        torch.testing.assert_close(v, seen["start"][k], rtol=1e-6, atol=1e-7)
    assert any(not torch.allclose(v, fp[k]) for k, v in saved.items()), "re-estimated at step 0"
    w0 = YOLO(str(trained_fp)).model.model[1].conv.weight.float()
    assert not torch.equal(t.model.model[1].conv.weight.detach().float(), w0), "the weights did train"


def test_float_run_keeps_ultralytics_batchnorm(tmp_path, tiny_data, trained_fp):
    """qat=none: no re-estimation (the default qat_bn_recalib applies to quantized runs only): the stock trainer."""
    from ultralytics_gabfusion import GABTrainer

    seen = {}
    t = GABTrainer(overrides={"model": str(trained_fp), "data": str(tiny_data), **train_kwargs(tmp_path, epochs=1,
                                                                                                 batch=4, val=False)})
    t.add_callback("on_train_start", lambda tr: seen.setdefault("start", _bn_stats(tr.model)))
    t.train()
    from ultralytics import YOLO

    fp = _bn_stats(YOLO(str(trained_fp)).model)
    assert t.args.qat_bn_recalib == 8 and t._bn_images == []
    for k, v in seen["start"].items():
        torch.testing.assert_close(v, fp[k], rtol=0, atol=0)


def test_run_saved_before_the_key_resumes_without_reestimation(tmp_path, tiny_data, trained_fp):
    """A last.pt whose args lack qat_bn_recalib / qat_act_zp (written before the keys existed) resumes as it was
    trained."""
    from ultralytics_gabfusion import GABTrainer

    class Stop(Exception):
        pass

    def stop(trainer):
        raise Stop

    t = GABTrainer(overrides={"model": str(trained_fp), "data": str(tiny_data), "qat": "lsq", "qat_calib": 1,
                              "qat_bn_recalib": 1, **train_kwargs(tmp_path, epochs=2, batch=4, val=False)})
    t.add_callback("on_train_epoch_end", stop)
    with pytest.raises(Stop):
        t.train()
    t.save_model()
    last = tmp_path / "run" / "weights" / "last.pt"
    args = GABTrainer(overrides={"resume": str(last)}).args
    assert args.qat_bn_recalib == 1 and args.qat_act_zp == "integer"
    ck = torch.load(last, weights_only=False)
    del ck["train_args"]["qat_bn_recalib"], ck["train_args"]["qat_act_zp"]
    torch.save(ck, last)
    args = GABTrainer(overrides={"resume": str(last)}).args
    assert args.qat_bn_recalib == 0 and args.qat_act_zp == "float"  # the behaviour before each key existed


# ------------------------------------------------------------------------------------------------- the bench
def test_bench_records_lowest_epoch_and_epochs_below_start():
    from ultralytics_gabfusion.bench.report import aggregate, annotate_stability, markdown

    def rec(seed, arm, m50, curve=None):
        return {"id": f"{arm}{seed}", "model": "m", "seed": seed, "kind": "qat" if arm != "fp" else "fp",
                "method": "lsq" if arm != "fp" else None, "bits": 4 if arm != "fp" else None, "arm": arm,
                "status": "trained", "mAP50": m50, "mAP50_95": m50 / 2, "epochs_run": len(curve or []),
                "per_epoch": {"mAP50": curve} if curve else None}

    recs = [rec(0, "fp", 0.9), rec(1, "fp", 0.9),
            rec(0, "ptq", 0.80), rec(1, "ptq", 0.78), rec(0, "ptq_gab", 0.80), rec(1, "ptq_gab", 0.78),
            rec(0, "baseline", 0.86, [0.70, 0.82, 0.86]), rec(1, "baseline", 0.85, [0.80, 0.83, 0.85]),
            rec(0, "gab_ada", 0.87, [0.81, 0.79, 0.87]), rec(1, "gab_ada", 0.84, [0.60, 0.77, 0.84])]
    s = {"models": ["m"], "seeds": [0, 1], "bits": [4], "methods": ["lsq"],
         "arms": ["ptq", "ptq_gab", "baseline", "gab_ada"]}
    annotate_stability(recs, s)
    by = {r["id"]: r for r in recs}
    assert by["baseline0"]["stability"] == {"metric": "mAP50", "start": 0.80, "lowest": 0.70, "lowest_epoch": 1,
                                            "below_start": 1}
    assert by["baseline1"]["stability"]["below_start"] == 0  # 0.80 is not below 0.78
    assert by["gab_ada0"]["stability"]["below_start"] == 1 and by["gab_ada0"]["stability"]["lowest_epoch"] == 2
    assert by["gab_ada1"]["stability"]["below_start"] == 2
    assert "stability" not in by["ptq0"]
    rows = {r["arm"]: r for r in aggregate(recs, s)}
    st = rows["gab_ada"]["stability"]
    assert st["below_start"] == [1, 2] and st["lowest"]["values"] == pytest.approx([0.79, 0.60])
    md = markdown(bench_result(s, list(rows.values())))
    assert "### Stability" in md
    assert "| m | W4A4 | lsq | +GABFusion+ADA | 0/1 | 80.00 / 78.00 | 79.00 (2) / 60.00 (1) | 1 / 2 | 87.00 / 84.00 |" in md
    # a run whose step-0 arm was not run: lowest epoch recorded, no count
    recs2 = [r for r in recs if r["arm"] not in ("ptq",)]
    for r in recs2:
        r.pop("stability", None)
    annotate_stability(recs2, s)
    assert {k: v for k, v in {r["id"]: r for r in recs2}["baseline0"]["stability"].items()} == \
        {"metric": "mAP50", "start": None, "lowest": 0.70, "lowest_epoch": 1, "below_start": None}


def test_bench_schedules_stable_by_default_and_paper_literal(tmp_path):
    """schedule=stable (default): hyp.VOC without warm-up, BatchNorm re-estimated; schedule=paper: hyp.VOC literally."""
    from ultralytics_gabfusion.bench.accuracy_runs import qat_train_args
    from ultralytics_gabfusion.bench.accuracy_settings import PRESETS, resolve_settings
    from ultralytics_gabfusion.bench.arms import PAPER_SCHEDULE
    from ultralytics_gabfusion.bench.common import BenchError

    base = ["models=[yolov5n-synth160]", "imgsz=160", "methods=[lsq]", "bits=[4]", f"out={tmp_path / 'b'}"]
    s = resolve_settings(base)
    assert s["schedule"] == "stable"
    a = qat_train_args(s, "d.yaml", 0, "r", "lsq", 4, "baseline")
    assert a["warmup_epochs"] == 0 and a["qat_bn_recalib"] == 8 and a["lr0"] == PAPER_SCHEDULE["lr0"]
    p = qat_train_args(resolve_settings([*base, "schedule=paper"]), "d.yaml", 0, "r", "lsq", 4, "baseline")
    assert {k: p[k] for k in PAPER_SCHEDULE} == PAPER_SCHEDULE and p["qat_bn_recalib"] == 0
    # a user's key still wins over the schedule
    u = qat_train_args(resolve_settings([*base, "qat_bn_recalib=2"]), "d.yaml", 0, "r", "lsq", 4, "baseline")
    assert u["qat_bn_recalib"] == 2
    assert PRESETS["study-long-paper"]["schedule"] == "paper" and "schedule" not in PRESETS["study-long"]
    with pytest.raises(BenchError, match="schedule"):
        resolve_settings([*base, "schedule=fast"])
    assert not (tmp_path / "b").exists(), "resolving settings writes nothing"
