"""Tests of ultralytics_gabfusion.fusion: node, YAML registration, insertion, calibration, folding, telemetry.

Runs offline on CPU in well under a minute: models are built from the YAMLs shipped inside the installed
Ultralytics package (no download) and run at 64-128 px with batches of 1-4.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path


def _offline_ultralytics_env():
    """Offline Ultralytics: no probes, no pip, a local Arial.ttf; must run before ultralytics is imported."""
    import matplotlib

    cfg = Path(tempfile.mkdtemp(prefix="yolo_cfg_"))
    (cfg / "Ultralytics").mkdir()
    shutil.copy(Path(matplotlib.get_data_path()) / "fonts/ttf/DejaVuSans.ttf", cfg / "Ultralytics/Arial.ttf")
    os.environ.setdefault("YOLO_CONFIG_DIR", str(cfg))
    os.environ["YOLO_OFFLINE"] = "1"
    os.environ["YOLO_AUTOINSTALL"] = "false"


_offline_ultralytics_env()

import copy  # noqa: E402
import csv  # noqa: E402
import math  # noqa: E402
from types import SimpleNamespace  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
from ultralytics.nn.modules import Concat  # noqa: E402
from ultralytics.nn.tasks import ClassificationModel, DetectionModel  # noqa: E402
from ultralytics.utils.torch_utils import ModelEMA, intersect_dicts  # noqa: E402

import ultralytics_gabfusion.fusion as gf  # noqa: E402
from ultralytics_gabfusion.fusion import (  # noqa: E402
    DEFAULT_FOLD_TOL,
    FoldedFusion,
    FoldToleranceError,
    FusionTelemetry,
    GABFusion,
    calibrate_identity,
    fold_gabfusion,
    insert_gabfusion,
    neck_concat_indices,
    set_fusion_mode,
    sync_fusion_state,
    update_fusion,
)

ROOT = Path(__file__).resolve().parents[1]
EXPECTED = {"yolov5s.yaml": [12, 16, 19, 22], "yolo11s.yaml": [12, 15, 18, 21]}
WIDTHS = {"yolov5s.yaml": [(256, 256), (128, 128), (128, 128), (256, 256)],
          "yolo11s.yaml": [(512, 256), (256, 256), (128, 256), (256, 512)]}
GAB_YAML = {"yolov5s.yaml": ROOT / "cfg/models/yolov5s-gab.yaml", "yolo11s.yaml": ROOT / "cfg/models/yolo11s-gab.yaml"}


def _build(name: str, nc: int = 16) -> DetectionModel:
    torch.manual_seed(0)
    return DetectionModel(name, nc=nc, verbose=False)


def _lively(model: nn.Module, images: torch.Tensor):
    """Recalibrate BN statistics on ``images``: a random-init model then has unit-scale activations (as if trained)."""
    for b in model.modules():
        if isinstance(b, nn.BatchNorm2d):
            b.reset_running_stats()
            b.momentum = None  # cumulative average
    nodes = gf.fusion_nodes(model)
    for n in nodes:
        n._bypass = True  # statistics of the FP (plain concat) network
    model.train()
    with torch.no_grad():
        model(images)
    for n in nodes:
        n._bypass = False
    model.eval()


def _toy_loss(node: GABFusion, c: int, t1: torch.Tensor, t2: torch.Tensor, gain: float = 4.0):
    """Two random branches into ``node``; the loss weights branch 2's output channels ``gain`` times more."""
    f1 = torch.randn(4, c, 6, 6, requires_grad=True)
    f2 = torch.randn(4, c, 6, 6, requires_grad=True)
    y = node([f1, f2])
    ((y[:, :c] * t1).sum() + gain * (y[:, c:] * t2).sum()).backward()
    return f1, f2


def _centred_targets(c: int):
    g = torch.Generator().manual_seed(1)
    t = torch.randn(2, 1, c, 1, 1, generator=g)
    t = t - t.mean(2, keepdim=True)  # zero channel mean: LN's mean removal then leaves the 4x contrast intact
    return t[0] / t[0].norm(), t[1] / t[1].norm()


# ------------------------------------------------------------------------------------------------ the node itself
def test_forward_is_channel_layernorm_of_alpha_scaled_concat():
    torch.manual_seed(0)
    node = GABFusion(form="paper", n_branches=2, channels=24)
    with torch.no_grad():
        node.lam.copy_(torch.tensor([0.3, -0.2]))
        node.norm.weight.uniform_(0.5, 1.5)
        node.norm.bias.uniform_(-0.5, 0.5)
    a, b = torch.randn(2, 8, 5, 5), torch.randn(2, 16, 5, 5)
    alpha = torch.softmax(node.lam, 0)
    z = torch.cat([alpha[0] * a, alpha[1] * b], 1)
    w, b_ = node.norm.weight, node.norm.bias
    ref = nn.functional.layer_norm(z.permute(0, 2, 3, 1), (24,), w, b_, 1e-5).permute(0, 3, 1, 2)
    assert torch.allclose(node([a, b]), ref, atol=1e-5)
    assert isinstance(node.norm, nn.LayerNorm) and node.norm.eps == 1e-5  # Ultralytics: no weight decay for it
    # low-precision inputs: float32 LN inside, input dtype out
    assert node([a.bfloat16(), b.bfloat16()]).dtype == torch.bfloat16


def test_grad_form_forward_is_concat_and_backward_scales_each_branch_by_k_alpha():
    node = GABFusion(n_branches=2, channels=24).train()  # the default form
    assert node.form == "grad" and node.norm is None and not list(node.parameters())
    with torch.no_grad():
        node.lam.copy_(torch.tensor([0.7, -0.3]))
    a = torch.randn(2, 8, 5, 5, dtype=torch.float64, requires_grad=True)
    b = torch.randn(2, 16, 5, 5, dtype=torch.float64, requires_grad=True)
    w = torch.randn(1, 24, 5, 5, dtype=torch.float64)
    y = node([a, b])
    assert torch.equal(y, torch.cat([a, b], 1))  # bit-exact: nothing to fold, nothing changes at insertion
    (y * w).sum().backward()
    alpha = torch.softmax(torch.tensor([0.7, -0.3], dtype=torch.float64), 0)
    assert torch.allclose(a.grad, 2 * float(alpha[0]) * w[:, :8].expand_as(a), rtol=1e-6)
    assert torch.allclose(b.grad, 2 * float(alpha[1]) * w[:, 8:].expand_as(b), rtol=1e-6)
    # the meter sees the gradient that reaches each branch (after the scaling), as in the paper form
    g = node.update_lambda()
    assert torch.allclose(g.double(), torch.stack([a.grad.norm(), b.grad.norm()]), rtol=1e-5)
    # at alpha = 1/K the node is exactly a Concat in both passes
    fresh = GABFusion(n_branches=2, channels=24).train()
    a2, b2 = a.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()
    (fresh([a2, b2]) * w).sum().backward()
    assert torch.equal(a2.grad, w[:, :8].expand_as(a)) and torch.equal(b2.grad, w[:, 8:].expand_as(b))


def test_grad_form_balances_gradient_norms():
    torch.manual_seed(0)
    c = 16
    t1, t2 = _centred_targets(c)
    node = GABFusion(n_branches=2, channels=2 * c).train()
    f1, f2 = _toy_loss(node, c, t1, t2)
    assert float(f2.grad.norm() / f1.grad.norm()) > 3.0
    node.update_lambda()
    for _ in range(150):
        _toy_loss(node, c, t1, t2)
        node.update_lambda()
    assert 0.9 < float(node.grad_ema[1] / node.grad_ema[0]) < 1.1  # balanced by the backward scaling alone
    assert abs(float(node.alpha[1] / node.alpha[0]) - 0.25) < 0.05


def test_form_switches_and_learned_needs_the_paper_form():
    node = GABFusion(n_branches=2, channels=6)
    with pytest.raises(ValueError, match="form 'paper'"):
        node.set_mode("learned")
    with pytest.raises(ValueError, match="form 'paper'"):
        GABFusion(n_branches=2, channels=6, mode="learned", form="grad")
    with pytest.raises(ValueError, match="Allowed values: grad, paper"):
        GABFusion(form="ln")
    node.set_form("paper").set_mode("learned")
    assert node.norm.normalized_shape == (6,) and isinstance(node.lam, nn.Parameter)
    with pytest.raises(ValueError, match="form 'paper'"):
        node.set_form("grad")
    node.set_mode("balanced").set_form("grad")
    assert node.norm is None and set(node.state_dict()) == {"lam", "grad_ema", "n_updates"}
    # a node pickled before the grad form existed has no 'form' in its __dict__: it unpickles as the paper form
    old = GABFusion(form="paper", n_branches=2, channels=6)
    del old.__dict__["form"]
    assert copy.deepcopy(old).form == "paper"


@pytest.mark.parametrize("name", ["yolov5s.yaml", "yolo11n.yaml"])
def test_grad_form_insertion_leaves_the_model_unchanged_and_folds_to_identity(name):
    torch.manual_seed(0)
    model = _build(name)
    x = torch.rand(2, 3, 64, 64)
    model.eval()
    with torch.no_grad():
        ref = model(x)[0]
    insert_gabfusion(model)
    with torch.no_grad():
        assert torch.equal(model(x)[0], ref)
    rep = fold_gabfusion(model, x)
    assert rep["output_rel_change"] == 0.0
    assert all(torch.equal(m.weight, torch.ones_like(m.weight)) for m in model.model if isinstance(m, FoldedFusion))


def test_off_mode_is_plain_concat_and_still_measures():
    node = GABFusion(form="paper", n_branches=2, channels=8, mode="off").train()
    a, b = torch.randn(1, 3, 2, 2, requires_grad=True), torch.randn(1, 5, 2, 2, requires_grad=True)
    y = node([a, b])
    assert torch.equal(y, torch.cat([a, b], 1))
    (y * 2).sum().backward()
    g = node.update_lambda()
    assert torch.allclose(g, torch.tensor([a.grad.norm(), b.grad.norm()]))
    assert node.lam.abs().sum() == 0  # only balanced moves lambda


def test_alpha_stays_on_simplex():
    c = 4
    t1, t2 = _centred_targets(c)
    for mode in ("balanced", "learned"):
        node = GABFusion(form="paper", n_branches=2, channels=2 * c, mode=mode, eta=5.0).train()  # huge steps on purpose
        opt = torch.optim.SGD(node.fusion_parameters() or [torch.zeros(1, requires_grad=True)], lr=50.0)
        for _ in range(30):
            _toy_loss(node, c, t1, t2, gain=100.0)
            opt.step()
            opt.zero_grad()
            node.update_lambda()
            a = node.alpha
            assert torch.all(a > 0) and torch.isfinite(a).all()
            assert abs(float(a.sum()) - 1.0) < 1e-6
    three = GABFusion(form="paper", n_branches=3, channels=6)
    three.lam.copy_(torch.tensor([80.0, -80.0, 0.0]))
    assert abs(float(three.alpha.sum()) - 1) < 1e-6 and torch.all(three.alpha >= 0)


def test_balanced_drives_gradient_ratio_to_one():
    torch.manual_seed(0)
    c = 16
    t1, t2 = _centred_targets(c)
    node = GABFusion(form="paper", n_branches=2, channels=2 * c).train()  # paper defaults: beta 0.1, eta 0.05
    f1, f2 = _toy_loss(node, c, t1, t2)
    assert float(f2.grad.norm() / f1.grad.norm()) > 3.0  # the imbalance is there at the start
    node.update_lambda()
    # paper's direction: lam_i -= eta * (log G_i - mean log G), so the branch with the larger gradient loses weight,
    # by exactly eta * log(G2/G1) / 2 each (first update: Gbar = G)
    step = 0.05 * math.log(float(f2.grad.norm() / f1.grad.norm())) / 2
    assert float(node.lam[0]) == pytest.approx(step, rel=1e-4) and float(node.lam[1]) == pytest.approx(-step, rel=1e-4)
    assert float(node.alpha[1]) < 0.5 < float(node.alpha[0])
    for _ in range(150):
        _toy_loss(node, c, t1, t2)
        node.update_lambda()
    ratio = float(node.grad_ema[1] / node.grad_ema[0])
    assert 0.9 < ratio < 1.1
    # the controller's fixed point: alpha_2 / alpha_1 ~ 1/4 undoes the 4x loss weight
    assert abs(float(node.alpha[1] / node.alpha[0]) - 0.25) < 0.05
    assert int(node.n_updates) == 151


def test_gradient_measurement_accumulates_and_isolates_branch():
    node = GABFusion(form="paper", n_branches=2, channels=4, mode="balanced", eta=0.0).train()
    ref = copy.deepcopy(node).eval()  # same function, no meters
    assert node.update_lambda() is None  # nothing accumulated: no-op
    w = torch.arange(4.0).view(1, 4, 1, 1)
    sq = torch.zeros(2)
    for _ in range(2):  # two micro-batches, one optimizer step
        a = torch.randn(1, 2, 3, 3, requires_grad=True)
        b = torch.randn(1, 2, 3, 3, requires_grad=True)
        shared = a * 1.0
        other = (shared * 100).sum()  # a second consumer of the same tensor must not count
        ((node([shared, b]).pow(2) * w).sum() + other).backward()
        ga, gb = torch.autograd.grad((ref([a, b]).pow(2) * w).sum(), [a, b])
        sq += torch.stack([ga.pow(2).sum(), gb.pow(2).sum()])
    g = node.update_lambda()
    assert torch.allclose(g, sq.sqrt(), rtol=1e-4)  # sqrt of the summed squares over the step
    assert torch.equal(node._grad_sq, torch.zeros(2)) and node._pending == 0


def test_rms_norm_divides_by_sqrt_numel():
    node = GABFusion(form="paper", n_branches=2, channels=12, rms=True, mode="off").train()
    a, b = torch.randn(1, 4, 2, 2, requires_grad=True), torch.randn(1, 8, 2, 2, requires_grad=True)
    node([a, b]).sum().backward()
    g = node.update_lambda()
    assert torch.allclose(g, torch.tensor([a.grad.norm() / 4.0, b.grad.norm() / math.sqrt(32)]))


def test_nonfinite_step_is_skipped():
    node = GABFusion(form="paper", n_branches=2, channels=4).train()
    node._grad_sq.copy_(torch.tensor([float("inf"), 1.0]))
    node._pending, node._grad_numel = 2, [4, 4]  # an AMP overflow step
    assert node.update_lambda() is not None
    assert int(node.n_updates) == 0 and node.lam.abs().sum() == 0 and node.grad_ema.abs().sum() == 0


def test_frozen_branch_is_still_measured():
    node = GABFusion(form="paper", n_branches=2, channels=4).train()
    frozen = torch.randn(1, 2, 3, 3)  # e.g. from a frozen backbone layer: no requires_grad
    live = torch.randn(1, 2, 3, 3, requires_grad=True)
    (node([live, frozen]) * torch.arange(4.0).view(1, 4, 1, 1)).sum().backward()
    g = node.update_lambda()
    assert g is not None and torch.all(g > 0) and frozen.grad is None
    node([live, frozen])  # forward only, no backward: nothing measured, nothing updated
    assert node.update_lambda() is None and int(node.n_updates) == 1


def test_learned_is_parameter_balanced_is_buffer():
    learned = GABFusion(form="paper", n_branches=2, channels=8, mode="learned")
    assert isinstance(learned.lam, nn.Parameter)
    assert learned.fusion_parameters() == [learned.lam]
    balanced = GABFusion(form="paper", n_branches=2, channels=8)
    assert not isinstance(balanced.lam, nn.Parameter) and "lam" in dict(balanced.named_buffers())
    assert all(p is not balanced.lam for p in balanced.parameters()) and balanced.fusion_parameters() == []
    assert len(list(balanced.parameters())) == 2  # LN gamma, beta
    # switching keeps the values and the state_dict key
    balanced.lam.fill_(0.7)
    balanced.set_mode("learned")
    assert isinstance(balanced.lam, nn.Parameter) and float(balanced.lam.detach()[0]) == pytest.approx(0.7)
    assert set(balanced.state_dict()) == set(GABFusion(form="paper", n_branches=2, channels=8).state_dict())


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="Allowed values: balanced, learned, off"):
        GABFusion(mode="fast")
    with pytest.raises(ValueError, match="beta"):
        GABFusion(beta=0.0)
    with pytest.raises(ValueError, match="tau"):
        GABFusion(form="paper", n_branches=2, tau=[0.0])
    model = _build("yolov5s.yaml")
    with pytest.raises(ValueError, match="Allowed values"):
        insert_gabfusion(model, mode="on")
    with pytest.raises(ValueError, match="Unknown GABFusion option"):
        insert_gabfusion(model, form="paper", mode="balanced", gamma=1.0)


def test_model_without_neck_concat_raises():
    cls = ClassificationModel("yolo11n-cls.yaml", nc=10, verbose=False)
    with pytest.raises(ValueError, match="no Concat after the backbone.*gab=off"):
        insert_gabfusion(cls)
    plain = {
        "nc": 2,
        "backbone": [[-1, 1, "Conv", [16, 3, 2]], [-1, 1, "Conv", [32, 3, 2]], [-1, 1, "Conv", [32, 3, 2]]],
        "head": [[-1, 1, "Conv", [32, 3, 1]], [[1, 2, 3], 1, "Detect", ["nc"]]],
    }
    det = DetectionModel(plain, verbose=False)
    assert neck_concat_indices(det) == []
    with pytest.raises(ValueError, match="PAN/FPN neck"):
        insert_gabfusion(det)


def test_lazy_channels_and_state_dict_load():
    lazy = GABFusion(form="paper", n_branches=2)
    assert lazy.norm is None
    y = lazy([torch.randn(1, 3, 2, 2), torch.randn(1, 5, 2, 2)])
    assert y.shape[1] == 8 and lazy.norm.weight.shape == (8,)
    src = GABFusion(form="paper", n_branches=2, channels=8)
    src.norm.weight.data.fill_(2.0)
    fresh = GABFusion(form="paper", n_branches=2)
    fresh.load_state_dict(src.state_dict())
    assert torch.equal(fresh.norm.weight, src.norm.weight)


# ------------------------------------------------------------------------------------------------ Ultralytics models
@pytest.mark.parametrize("name", ["yolov5s.yaml", "yolo11s.yaml"])
def test_insert_into_stock_models(name):
    stock = _build(name)
    model = _build(name)
    idx = insert_gabfusion(model, form="paper", mode="balanced")
    assert idx == EXPECTED[name] == neck_concat_indices(model)
    nodes = [m for m in model.model if isinstance(m, GABFusion)]
    assert [n.i for n in nodes] == EXPECTED[name]
    assert not any(isinstance(m, Concat) for m in model.model[len(model.yaml["backbone"]):])
    for n, old, w in zip(nodes, (stock.model[i] for i in idx), WIDTHS[name]):
        assert (n.f, n.d, n.n_branches) == (old.f, old.d, 2)
        assert n.norm.normalized_shape == (sum(w),) and n.type.endswith("GABFusion") and n.np == 2 * sum(w)
    # idempotent: a second call only sets the mode
    assert insert_gabfusion(model, form="paper", mode="learned", beta=0.2) == idx
    assert all(n.mode == "learned" and n.beta == 0.2 for n in nodes) and nodes[0] is model.model[idx[0]]
    set_fusion_mode(model, "balanced")
    # stock FP weights transfer completely
    sd, gsd = stock.state_dict(), model.state_dict()
    assert len(intersect_dicts(sd, gsd)) == len(sd)
    model.load_state_dict(sd, strict=False)
    # same output shapes (eval and train)
    x = torch.rand(1, 3, 64, 64)
    stock.eval(), model.eval()
    with torch.no_grad():
        a, b = stock(x), model(x)
    assert a[0].shape == b[0].shape
    stock.train(), model.train()
    with torch.no_grad():
        fa, fb = stock(x), model(x)
    fa, fb = (f["feats"] if isinstance(f, dict) else f for f in (fa, fb))
    assert [t.shape for t in fa] == [t.shape for t in fb]


@pytest.mark.parametrize("name", ["yolov5s.yaml", "yolo11s.yaml"])
def test_gab_yaml_builds_s_scale(name):
    from ultralytics import YOLO

    stock, gab = YOLO(name), YOLO(str(GAB_YAML[name]))
    net = gab.model
    assert neck_concat_indices(net) == EXPECTED[name]
    assert [m.i for m in net.model if isinstance(m, GABFusion)] == EXPECTED[name]
    assert all(net.model[i].mode == "balanced" and net.model[i].type.endswith("GABFusion") for i in EXPECTED[name])
    n_stock = sum(p.numel() for p in stock.model.parameters())
    assert all(net.model[i].form == "grad" for i in EXPECTED[name])  # default form: no parameters of its own
    assert sum(p.numel() for p in net.parameters()) == n_stock
    set_fusion_mode(net, "balanced", form="paper")  # the paper form adds a LayerNorm affine per node
    assert sum(p.numel() for p in net.parameters()) == n_stock + 2 * sum(sum(w) for w in WIDTHS[name])
    assert len(intersect_dicts(stock.model.state_dict(), net.state_dict())) == len(stock.model.state_dict())


def test_yaml_rows_take_mode_and_options_and_registration_is_idempotent():
    from ultralytics.nn import tasks

    wrapper = tasks.parse_model
    gf.register_gabfusion()
    assert tasks.parse_model is wrapper and getattr(wrapper, "_gabfusion_wrapper", False)
    d = {
        "nc": 2,
        "backbone": [[-1, 1, "Conv", [16, 3, 2]], [-1, 1, "Conv", [32, 3, 2]], [-1, 1, "Conv", [64, 3, 2]]],
        "head": [
            [-1, 1, "nn.Upsample", [None, 2, "nearest"]],
            [[-1, 1], 1, "GABFusion", [1, "learned", {"rms": True, "beta": 0.3}]],
            [-1, 1, "Conv", [32, 3, 2]],
            [[-1, 2], 1, "GABFusion", [1]],
            [[4, 6], 1, "Detect", ["nc"]],
        ],
    }
    m = DetectionModel(d, verbose=False)
    a, b = m.model[4], m.model[6]
    assert isinstance(a, GABFusion) and a.mode == "learned" and a.rms and a.beta == 0.3
    assert a.norm.normalized_shape == (64 + 32,) and isinstance(a.lam, nn.Parameter)
    assert a.form == "paper"  # learned implies the paper form
    assert isinstance(b, GABFusion) and b.mode == "balanced" and b.form == "grad" and b.norm is None
    assert m.model[-1].cv2[0][0].conv.in_channels == 96  # Detect saw the summed channel counts
    assert neck_concat_indices(m) == [4, 6]


def test_half_keeps_fp32_state_and_pickle_roundtrip(tmp_path):
    model = _build("yolov5s.yaml")
    insert_gabfusion(model, form="paper", mode="balanced")
    nodes = gf.fusion_nodes(model)
    with torch.no_grad():
        for n in nodes:
            n.lam.copy_(torch.tensor([0.123456789, -0.0987654321]))
            n.grad_ema.copy_(torch.tensor([1.000001, 3.3333333]))
            n.norm.weight.add_(1e-4)  # not representable exactly in fp16
    before = [(n.lam.clone(), n.alpha.clone(), n.grad_ema.clone(), n.norm.weight.clone()) for n in nodes]
    half = copy.deepcopy(model).half()  # what Ultralytics' save_model does
    for n, (lam, alpha, ge, w) in zip(gf.fusion_nodes(half), before):
        assert n.lam.dtype == n.grad_ema.dtype == n.norm.weight.dtype == torch.float32
        assert torch.equal(n.lam, lam) and torch.equal(n.alpha, alpha) and torch.equal(n.grad_ema, ge)
        assert torch.equal(n.norm.weight, w)
    assert half.model[0].conv.weight.dtype == torch.float16  # the rest of the model did go fp16
    torch.save({"model": half}, tmp_path / "ckpt.pt")
    loaded = torch.load(tmp_path / "ckpt.pt", weights_only=False)["model"]
    layer_attrs = [(n.i, n.f, n.type, n.np) for n in nodes]
    assert [a[0] for a in layer_attrs] == EXPECTED["yolov5s.yaml"]
    assert all(t == "ultralytics_gabfusion.fusion.modules.GABFusion" and np_ > 0 for _, _, t, np_ in layer_attrs)
    for n, (lam, alpha, ge, w), attrs in zip(gf.fusion_nodes(loaded), before, layer_attrs):
        assert torch.equal(n.lam, lam) and torch.equal(n.alpha, alpha) and torch.equal(n.grad_ema, ge)
        assert (n.i, n.f, n.type, n.np) == attrs  # Ultralytics' layer bookkeeping survives fp16 + pickle
    # an fp16 model still runs (LN in fp32 inside, fp16 out); CPU conv in fp16 may be unsupported, test the node
    n = gf.fusion_nodes(loaded)[0]
    x = [torch.randn(1, 256, 4, 4).half(), torch.randn(1, 256, 4, 4).half()]
    assert n(x).dtype == torch.float16


def test_update_fusion_and_ema_sync():
    model = _build("yolov5s.yaml")
    insert_gabfusion(model, form="paper", mode="balanced", eta=0.5)
    ema = ModelEMA(model)
    model.train()
    x = torch.rand(2, 3, 64, 64)
    for _ in range(3):
        out = model(x)
        feats = out["feats"] if isinstance(out, dict) else out
        sum(f.float().pow(2).mean() for f in feats).backward()
        assert update_fusion(model, grad_scale=2.0) == 4
        ema.update(model)
        assert sync_fusion_state(model, ema.ema) == 4
    for s, d in zip(gf.fusion_nodes(model), gf.fusion_nodes(ema.ema)):
        assert int(s.n_updates) == 3 and s.lam.abs().sum() > 0
        assert torch.equal(s.lam, d.lam) and torch.equal(s.grad_ema, d.grad_ema)
        assert torch.equal(s.n_updates, d.n_updates)
    # ModelEMA caches its tensors: the synced ones must still be the ones it lerps
    ema_tensors = {t.data_ptr() for t in ema._pairs[0]}
    assert all(d.lam.data_ptr() in ema_tensors for d in gf.fusion_nodes(ema.ema))


def test_update_fusion_under_torch_distributed(tmp_path):
    import torch.distributed as dist

    if not dist.is_available() or dist.is_initialized():
        pytest.skip("torch.distributed unavailable or already initialised")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        node = GABFusion(form="paper", n_branches=2, channels=4).train()
        a, b = torch.randn(1, 2, 2, 2, requires_grad=True), torch.randn(1, 2, 2, 2, requires_grad=True)
        (node([a, b]) * torch.arange(4.0).view(1, 4, 1, 1)).sum().backward()
        assert update_fusion(node) == 1
        assert int(node.n_updates) == 1 and node.lam.abs().sum() > 0
        (node([a, b]) * torch.arange(4.0).view(1, 4, 1, 1)).sum().backward()
        assert node.update_lambda() is not None and int(node.n_updates) == 2  # the node's own all-reduce path
    finally:
        dist.destroy_process_group()


def test_calibrate_identity_reduces_error():
    torch.manual_seed(0)
    model = _build("yolov5s.yaml")
    insert_gabfusion(model, form="paper")
    x = torch.rand(8, 3, 64, 64)
    _lively(model, x)
    model.train()
    rep = calibrate_identity(model, x)
    assert model.training  # mode restored
    assert set(rep["nodes"]) == set(EXPECTED["yolov5s.yaml"])
    for r in rep["nodes"].values():  # LN's per-pixel normalisation is not affine: closer, not exact
        assert r["after"] < 0.5 * r["before"]
    assert rep["output"]["after"] < 0.5 * rep["output"]["before"]


def test_fold_gabfusion_within_tolerance():
    torch.manual_seed(0)
    model = _build("yolo11s.yaml")
    insert_gabfusion(model, form="paper")
    x = torch.rand(8, 3, 64, 64)
    _lively(model, x)
    calibrate_identity(model, x)
    with torch.no_grad():
        for n in gf.fusion_nodes(model):
            n.lam.copy_(torch.tensor([0.4, -0.4]))  # a trained, non-uniform alpha to fold in
    # too tight a tolerance: error raised and the model keeps its GABFusion nodes
    with pytest.raises(FoldToleranceError) as e:
        fold_gabfusion(model, x, tol=1e-6)
    assert e.value.report["output_rel_change"] > 1e-6
    assert len(gf.fusion_nodes(model)) == 4
    ref_model = copy.deepcopy(model).eval()
    rep = fold_gabfusion(model, x)
    assert rep["tol"] == DEFAULT_FOLD_TOL and rep["output_rel_change"] <= DEFAULT_FOLD_TOL
    assert set(rep["nodes"]) == set(EXPECTED["yolo11s.yaml"])
    assert all(r["mean_abs"] <= r["max_abs"] for r in rep["nodes"].values())
    folded = [m for m in model.model if isinstance(m, FoldedFusion)]
    assert [m.i for m in folded] == EXPECTED["yolo11s.yaml"] and all(m.f and hasattr(m, "np") for m in folded)
    assert not gf.fusion_nodes(model)
    model.eval()
    with torch.no_grad():
        out, ref = model(x)[0], ref_model(x)[0]
    assert float((out - ref).norm() / ref.norm()) <= DEFAULT_FOLD_TOL


# ------------------------------------------------------------------------------------------------ telemetry
def test_telemetry_writes_csv_and_png(tmp_path):
    model = _build("yolov5s.yaml")
    insert_gabfusion(model, form="paper", mode="learned")  # grad norms are measured in every mode
    model.train()
    x = torch.rand(1, 3, 64, 64)
    tel = FusionTelemetry()
    trainer = SimpleNamespace(save_dir=tmp_path, model=model, epoch=0)
    for epoch in range(2):
        trainer.epoch = epoch
        out = model(x)
        feats = out["feats"] if isinstance(out, dict) else out
        sum(f.pow(2).mean() for f in feats).backward()
        update_fusion(model)
        tel.on_train_epoch_end(trainer)
    with open(tmp_path / "gabfusion.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert tuple(rows[0]) == gf.COLUMNS and len(rows) == 2 * 4 * 2
    first = [r for r in rows if r["epoch"] == "1"]
    assert [int(r["layer"]) for r in first] == [12, 12, 16, 16, 19, 19, 22, 22]
    r12 = {r["role"]: r for r in first if r["layer"] == "12"}
    assert r12["deep"]["source_layer"] == "11" and r12["shallow"]["source_layer"] == "6"
    assert float(r12["deep"]["grad_ema"]) > 0 and r12["deep"]["mode"] == "learned"
    ratio = float(r12["deep"]["grad_ema"]) / float(r12["shallow"]["grad_ema"])
    assert float(r12["deep"]["deep_shallow_ratio"]) == pytest.approx(ratio, rel=1e-5)
    assert float(r12["deep"]["alpha"]) + float(r12["shallow"]["alpha"]) == pytest.approx(1.0)
    png = tel.on_train_end(trainer)
    assert png == tmp_path / "gabfusion.png" and png.stat().st_size > 1000
