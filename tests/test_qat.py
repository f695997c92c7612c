"""Quantized models end to end: conversion policy, level counts, W8A8 fidelity, training, checkpoints, errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn as nn

from conftest import IMGSZ, run_python, train_kwargs

METHODS = ("lsq", "lsqplus", "pact", "n2uq")


def build(arch="yolov5s", nc=16):
    from ultralytics.nn.tasks import DetectionModel

    torch.manual_seed(0)
    return DetectionModel(f"{arch}.yaml", nc=nc, verbose=False)


def images(n=4, size=IMGSZ, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, size, size, generator=g)


def quantized(arch, method, w_bits=4, a_bits=4, **kw):
    from ultralytics_gabfusion.quant.convert import calibrate_activations, init_weight_quantizers, quantize_model

    model = build(arch)
    quantize_model(model, method, w_bits, a_bits, **kw)
    init_weight_quantizers(model)
    calibrate_activations(model, [images(4, seed=1), images(4, seed=2)])
    return model.eval()


# The per-layer tests below use the n scale of each family: the same layers and blocks as yolov5s / yolo11s (only
# the channel widths differ), at a quarter of the weights to quantize and search.
@pytest.mark.parametrize("arch", ["yolov5n", "yolo11n"])
@pytest.mark.parametrize("method", METHODS)
def test_levels_per_channel_and_tensor(arch, method):
    """Every quantized weight has <= 2^b values per output channel, every quantized input <= 2^b per tensor."""
    from ultralytics_gabfusion.quant.qconv import quant_convs

    bits = 3
    model = quantized(arch, method, bits, bits)
    seen = {}

    def hook(m, args):
        seen[m] = m.quantize_input(args[0])

    convs = dict(quant_convs(model))
    handles = [m.register_forward_pre_hook(hook) for m in convs.values()]
    with torch.no_grad():
        model(images(2, seed=3))
    for h in handles:
        h.remove()
    assert len(seen) == len(convs) > 50
    for name, m in convs.items():
        wb, ab = m.w_bits, m.a_bits
        w = m.quantized_weight().detach()
        per_ch = max(torch.unique(w[c]).numel() for c in range(w.shape[0]))
        assert per_ch <= 2**wb, (name, per_ch, wb)
        assert torch.unique(seen[m]).numel() <= 2**ab, (name, ab)


def test_policy_ends_at_8_bits_and_dfl_untouched():
    from ultralytics_gabfusion.quant.convert import format_policy, quantize_model
    from ultralytics_gabfusion.quant.qconv import QuantConv2d, QuantConvBlock

    model = build("yolo11s")
    rows = quantize_model(model, "lsq", 3, 3)
    assert rows[0]["role"] == "first" and rows[0]["w_bits"] == rows[0]["a_bits"] == 8
    heads = [r for r in rows if r["role"] == "head"]
    assert len(heads) == 6 and all(r["w_bits"] == r["a_bits"] == 8 for r in heads)
    assert all(r["w_bits"] == 3 for r in rows if r["role"] == "conv")
    dfl = model.model[-1].dfl.conv
    assert type(dfl) is nn.Conv2d
    assert isinstance(model.model[0], QuantConvBlock) and model.model[0].i == 0 and model.model[0].f == -1
    assert not any(type(m) is nn.Conv2d for n, m in model.named_modules() if ".dfl" not in n)
    assert isinstance(model.model[-1].cv2[0][2], QuantConv2d)
    table = format_policy(rows)
    assert "W bits" in table and "(first)" in table and "(head)" in table

    model = build("yolov5s")
    rows = quantize_model(model, "pact", 4, 4, first_bits=0, head_bits=0, skip=[23])
    assert rows[0]["w_bits"] == 4
    assert all(r["w_bits"] is None for r in rows if r["layer"] == 23)


def test_fuse_keeps_quantizers():
    """Ultralytics' fuse() (used by AutoBackend for val/predict) must not strip the fake quantization."""
    model = quantized("yolov5s", "lsq")
    x = images(2, seed=4)
    with torch.no_grad():
        before = model(x)[0]
        model.fuse()
        after = model(x)[0]
    assert torch.equal(before, after)


def bn_calibrated_fp(arch):
    """A random-init model whose BN running statistics match the test images (as a trained model's would)."""
    fp = build(arch)
    with torch.no_grad():
        fp.train()
        for m in fp.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.momentum = None  # cumulative average over the batch
        fp(torch.cat([images(4, seed=s) for s in range(3)]))
    return fp.eval()


def layer_errors(model, x):
    """Relative error of every quantized conv's output vs the same conv in float on the same input."""
    import torch.nn.functional as F

    from ultralytics_gabfusion.quant.qconv import quant_convs

    errs = []

    def hook(m, args, out):
        ref = F.conv2d(args[0], m.weight, m.bias, m.stride, m.padding, m.dilation, m.groups)
        errs.append(float((out - ref).norm() / ref.norm()))

    handles = [m.register_forward_hook(hook) for _, m in quant_convs(model)]
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    return torch.tensor(errs)


@pytest.mark.parametrize("method", METHODS)
def test_w8a8_close_to_fp(method):
    """W8A8 convs reproduce their FP outputs closely (median relative error < 5 %, 4x below W4A4).

    Measured per layer on the layer's own input: an untrained network is chaotic end to end (input noise of 1e-3
    changes its neck features by ~5 %), so whole-network output differences of a random model say nothing about
    quantization fidelity.
    """
    from ultralytics_gabfusion.quant.convert import calibrate_activations, init_weight_quantizers, quantize_model

    fp = bn_calibrated_fp("yolov5n")
    med = {}
    for bits in (8, 4):
        q = build("yolov5n")
        q.load_state_dict(fp.state_dict())
        quantize_model(q, method, bits, bits)
        init_weight_quantizers(q)
        calibrate_activations(q, [images(4, seed=1), images(4, seed=2)])
        med[bits] = float(layer_errors(q.eval(), images(2, seed=3)).median())
    assert med[8] < 0.05, med
    assert med[8] < 0.25 * med[4], med


@pytest.mark.parametrize("method", METHODS)
def test_training_steps_lower_the_loss(method):
    from ultralytics_gabfusion.quant.convert import quantizer_parameters

    model = quantized("yolov5n", method, 4, 4)
    model.train()
    from ultralytics.cfg import get_cfg

    model.args = get_cfg()
    g = torch.Generator().manual_seed(0)
    batch = {
        "img": images(4, seed=7),
        "batch_idx": torch.tensor([0.0, 1, 2, 3]),
        "cls": torch.tensor([[1.0], [2], [3], [4]]),
        "bboxes": torch.rand(4, 4, generator=g) * 0.3 + torch.tensor([0.35, 0.35, 0.1, 0.1]),
    }
    qp = {id(p) for p in sum(quantizer_parameters(model), [])}
    assert qp, "quantizers expose learnable parameters"
    opt = torch.optim.SGD(model.parameters(), lr=0.005, momentum=0.9)
    losses = []
    for _ in range(6):
        loss, _ = model.loss(batch)
        opt.zero_grad()
        loss.sum().backward()
        grads = [p.grad for p in model.parameters() if id(p) in qp and p.grad is not None]
        assert grads and all(torch.isfinite(gr).all() for gr in grads)
        opt.step()
        losses.append(loss.sum().item())
    # SGD with momentum on a tiny untrained model wobbles step to step; learning shows as some later step below
    # the first (with broken gradients the loss of this fixed batch would not move at all)
    assert min(losses[1:]) < losses[0] - 1e-3, losses


def test_bad_input_errors():
    from ultralytics_gabfusion.quant import make_quantizer
    from ultralytics_gabfusion.quant.convert import quantize_model

    for bits in (1, 9, 4.5):
        with pytest.raises(ValueError, match="2..8"):
            quantize_model(build(), "lsq", bits, 4)
    with pytest.raises(ValueError, match="lsq"):
        make_quantizer("dorefa", "act", 4)
    with pytest.raises(ValueError, match="no nn.Conv2d"):
        quantize_model(nn.Sequential(nn.Linear(3, 3)), "lsq", 4, 4)
    model = build()
    quantize_model(model, "lsq", 4, 4)
    with pytest.raises(ValueError, match="already quantized"):
        quantize_model(model, "lsq", 4, 4)


@pytest.mark.parametrize("method,act_zp", [("lsqplus", "integer"), ("n2uq", "float")])
def test_qat_run_checkpoint_roundtrip_fresh_process(method, act_zp, tmp_path, tiny_data, fp_ckpt):
    """QAT from an FP .pt; the saved best.pt rebuilt in a fresh process gives bit-identical quantized outputs (and,
    trained with qat_act_zp=integer, keeps its integer-zero-point grids: nothing for the export's snap to move)."""
    from ultralytics import YOLO

    from ultralytics_gabfusion import GABTrainer
    from ultralytics_gabfusion.quant.qconv import quant_convs

    model = YOLO(str(fp_ckpt["yolov5s"]))
    model.train(trainer=GABTrainer, data=str(tiny_data), qat=method, w_bits=3, a_bits=3, qat_calib=2,
                qat_act_zp=act_zp, **train_kwargs(tmp_path))
    best = Path(model.trainer.best)
    ckpt = torch.load(best, weights_only=False)
    m = ckpt["model"].float().eval()
    qs = [q for _, c in quant_convs(m) for q in (c.weight_quant, c.act_quant) if q is not None]
    assert qs and all(bool(q.initialized) for q in qs)
    for q in qs:  # quantizer state is stored in fp32 despite Ultralytics' fp16 checkpoints
        assert all(p.dtype == torch.float32 for p in q.parameters())
    assert m.gabfusion["qat_act_zp"] == act_zp  # the run's keys, recorded with the model
    want_int = act_zp == "integer"
    assert all(c.act_quant.integer_zero_point == want_int for _, c in quant_convs(m) if c.act_quant is not None)
    x = images(2, seed=9)
    torch.save(x, tmp_path / "x.pt")
    with torch.no_grad():
        ref = m(x)[0]
    torch.save(ref, tmp_path / "ref.pt")
    code = (
        "import torch, ultralytics_gabfusion\n"
        "from ultralytics import YOLO\n"
        f"torch.set_num_threads({torch.get_num_threads()})\n"  # bit-identical needs the same conv reduction order
        f"m = YOLO(r'{best}').model.float().eval()\n"
        f"x = torch.load(r'{tmp_path / 'x.pt'}')\n"
        f"ref = torch.load(r'{tmp_path / 'ref.pt'}')\n"
        "with torch.no_grad(): out = m(x)[0]\n"
        "print('EQUAL', torch.equal(out, ref))\n"
        "from ultralytics_gabfusion.quant.grids import snap_zero_points\n"
        "acts = [c.act_quant for c in m.modules() if getattr(c, 'act_quant', None) is not None]\n"
        "print('INTEGER', sorted({q.integer_zero_point for q in acts}), 'MOVES', len(snap_zero_points(m)))\n"
    )
    r = run_python(code)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "EQUAL True" in r.stdout
    if want_int:
        assert "INTEGER [True] MOVES 0" in r.stdout


def test_optimizer_groups(tmp_path, tiny_data, fp_ckpt):
    from ultralytics import YOLO

    from ultralytics_gabfusion import GABTrainer

    model = YOLO(str(fp_ckpt["yolov5s"]))
    model.train(trainer=GABTrainer, data=str(tiny_data), qat="pact", qat_lr=0.1, qat_calib=1, gab="learned",
                **train_kwargs(tmp_path, optimizer="MuSGD"))
    groups = {g.get("param_group"): g for g in model.trainer.optimizer.param_groups}
    assert {"quant_decay", "fusion"} <= set(groups), "PACT has only alpha (decayed); DoReFa weights are parameter-free"
    assert groups["fusion"]["weight_decay"] == 0.0
    assert groups["quant_decay"]["weight_decay"] > 0  # PACT alpha: the paper's L2 penalty
    for name in ("quant_decay", "fusion"):
        assert all(p.ndim == 1 for p in groups[name]["params"])
        assert not groups[name].get("use_muon", False)
    assert groups["quant_decay"]["initial_lr"] == pytest.approx(0.1 * model.trainer.args.lr0)
    fusion_ids = {id(p) for p in groups["fusion"]["params"]}
    assert any(p.numel() == 2 for p in groups["fusion"]["params"]), "learned lambda is optimised"
    other = [p for g in model.trainer.optimizer.param_groups if g.get("param_group") not in ("quant", "quant_decay", "fusion") for p in g["params"]]
    assert not fusion_ids & {id(p) for p in other}


def test_checkpoint_from_other_plugin_format_is_a_clear_error(tmp_path):
    from ultralytics_gabfusion.quant.qconv import quant_convs

    model = quantized("yolov5s", "lsq")
    for _, m in quant_convs(model):
        m.format_version = 0  # as written by an incompatible plugin version
    torch.save({"model": model.half(), "train_args": {}}, tmp_path / "old.pt")
    with pytest.raises(RuntimeError, match="format 0.*reads format"):
        torch.load(tmp_path / "old.pt", weights_only=False)


# ------------------------------------------------------------------------------------------------ activation grids
def test_grid_analysis_follows_what_feeds_each_conv():
    """SiLU-fed inputs (also inside C3/C3k2/SPPF and through residual sums) are bounded; LayerNorm / no-activation
    inputs are not; the policy turns that into unsigned grids with the SiLU offset for LSQ/PACT only."""
    from ultralytics_gabfusion.fusion import insert_gabfusion
    from ultralytics_gabfusion.quant.convert import format_policy, plan_policy, quantize_model
    from ultralytics_gabfusion.quant.grids import SILU_MIN, input_lower_bounds

    v5 = build("yolov5s")
    b = input_lower_bounds(v5)
    assert b["model.0.conv"] == 0.0 and b["model.1.conv"] == pytest.approx(SILU_MIN)
    assert b["model.2.m.0.cv2.conv"] == pytest.approx(SILU_MIN)  # Bottleneck cv2 <- cv1's SiLU
    assert b["model.2.cv3.conv"] == pytest.approx(2 * SILU_MIN)  # C3 cv3 <- cat(x + bottleneck(x), cv2(x))
    assert b["model.9.cv2.conv"] == pytest.approx(SILU_MIN)  # SPPF cv2 <- cat of max-pools of a SiLU output
    assert b["model.24.cv2.0.2"] == pytest.approx(SILU_MIN)  # raw Detect predictor
    v11 = build("yolo11s")
    b11 = input_lower_bounds(v11)
    assert b11["model.10.m.0.attn.qkv.conv"] == pytest.approx(SILU_MIN)
    assert b11["model.10.m.0.attn.pe.conv"] == -float("inf")  # v of qkv: a conv without activation
    assert b11["model.10.m.0.ffn.0.conv"] == -float("inf")  # x + attention(x): signed
    insert_gabfusion(v5)  # the default grad form outputs the plain concat: its readers keep unsigned grids
    assert not any(r["a_signed"] for r in plan_policy(v5, 4, 4) if r["name"].startswith("model.13.cv"))
    insert_gabfusion(v5, form="paper")
    rows = {r["name"]: r for r in plan_policy(v5, 4, 4)}
    assert rows["model.13.cv1.conv"]["a_signed"] and rows["model.13.cv2.conv"]["a_signed"]  # LayerNorm output
    assert not rows["model.13.cv3.conv"]["a_signed"] and not rows["model.0.conv"]["a_signed"]
    assert sum(r["a_signed"] for r in rows.values()) == 8  # exactly the 4 nodes x (C3 cv1, cv2)
    forced = plan_policy(v5, 4, 4, act_grid="signed")
    assert all(r["a_signed"] == (r["role"] != "first") and r["a_min"] is None for r in forced)
    assert not any(r["a_signed"] for r in plan_policy(v5, 4, 4, act_grid="unsigned"))
    with pytest.raises(ValueError, match="auto, signed, unsigned"):
        plan_policy(v5, 4, 4, act_grid="uint")
    for method, offset in (("lsq", SILU_MIN), ("pact", SILU_MIN), ("lsqplus", 0.0), ("n2uq", 0.0)):
        m = build("yolov5s")
        insert_gabfusion(m, form="paper")
        rows = {r["name"]: r for r in quantize_model(m, method, 4, 4)}
        q = dict(m.named_modules())["model.13.cv3.conv"].act_quant
        assert (q.signed, getattr(q, "fixed_offset", 0.0)) == (False, offset), method
        assert dict(m.named_modules())["model.13.cv1.conv"].act_quant.signed
        assert rows["model.13.cv3.conv"]["a_offset"] == offset
    table = format_policy(list(rows.values()))
    assert "A grid" in table and "signed" in table and "unsigned" in table and "-inf" in table


@pytest.mark.parametrize("method", ["lsq", "pact"])
def test_offset_grid_forward_matches_formula_float64(method):
    """LSQ and PACT on the SiLU-offset grid: y = b + s*round(clamp((x-b)/s, 0, 2^b-1)), levels b + k*s, in float64."""
    from ultralytics_gabfusion.quant import make_quantizer
    from ultralytics_gabfusion.quant.grids import SILU_MIN

    b, bits = SILU_MIN, 4
    q = make_quantizer(method, "act", bits, signed=False, fixed_offset=b).double()
    x = torch.nn.functional.silu(torch.randn(4, 8, 6, 6, dtype=torch.float64) * 3).requires_grad_(True)
    q.init_from(x.detach())
    y = q(x)
    s = float(q.step_size())
    ref = b + s * torch.round(((x.detach() - b) / s).clamp(0, 2**bits - 1))
    assert torch.allclose(y.detach(), ref, atol=1e-12)
    g = q.grid()
    assert (g["qmin"], g["qmax"]) == (0, 15) and float(g["offset"]) == pytest.approx(b)
    assert float(y.detach().min()) == pytest.approx(b)  # the negative SiLU tail is represented, not clipped to 0
    y.sum().backward()
    inside = ((x.detach() - b) / s > 0) & ((x.detach() - b) / s < 15)
    assert torch.equal(x.grad != 0, inside if method == "lsq" else ((x.detach() - b) >= 0) & (x.detach() - b < float(q.alpha)))


@pytest.mark.parametrize("method", ["lsq", "n2uq"])
def test_fp16_checkpoint_holds_exactly_the_model_that_was_validated(method, tmp_path):
    """Ultralytics saves ``deepcopy(ema).half()``; the quantized model reloaded from it computes bit for bit what the
    in-memory model (the one validated during training) computed. BN and conv tensors are perturbed off the float16
    grid first, as training leaves them: plain fp16 rounding of them changes the outputs (checked)."""
    import copy

    from ultralytics_gabfusion.quant.qconv import QuantConvBlock

    def block_tensors(model):
        for m in model.modules():
            if isinstance(m, QuantConvBlock):
                yield from (m.conv.weight, m.bn.weight, m.bn.bias, m.bn.running_mean, m.bn.running_var)

    model = quantized("yolov5n", method, 3, 3)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for t in block_tensors(model):
            t.mul_(1 + 1e-3 * torch.rand(t.shape, generator=g))
    x = images(2, seed=7)
    with torch.no_grad():
        ref = model(x)[0]
        plain = copy.deepcopy(model)
        for t in block_tensors(plain):  # what fp16 storage of those tensors would do
            t.copy_(t.half().float())
        assert not torch.equal(plain(x)[0], ref)
    torch.save({"model": copy.deepcopy(model).half(), "train_args": {}}, tmp_path / "best.pt")
    loaded = torch.load(tmp_path / "best.pt", weights_only=False)["model"].float().eval()
    with torch.no_grad():
        assert torch.equal(loaded(x)[0], ref)
