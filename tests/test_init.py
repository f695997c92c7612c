"""Quantizer init modes (``paper`` / ``mse``) and the BatchNorm mode of activation calibration."""

from __future__ import annotations

import copy

import pytest
import torch

from ultralytics_gabfusion.quant import make_quantizer
from ultralytics_gabfusion.quant.init import choose_zero_point, quant_error, refine_mse

C = 16
RANGED = [("lsq", "weight"), ("lsq", "act"), ("lsqplus", "weight"), ("lsqplus", "act"), ("pact", "act"),
          ("n2uq", "weight"), ("n2uq", "act")]


def trained_like_weight(seed=0):
    """Per-channel Gaussian weights where channel 0 has one weight at 7x its 3 sigma (as trained detectors do)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(C, 8, 3, 3, generator=g) * 0.05
    w[0, 0, 0, 0] = 7 * 3 * 0.05
    return w


def heavy_tailed_act(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(4, 8, 16, 16, generator=g) * torch.exp(torch.randn(4, 8, 16, 16, generator=g))


@pytest.mark.parametrize("bits", (8, 4))
@pytest.mark.parametrize("method,role", RANGED)
def test_mse_init_lowers_the_error_of_every_method(method, role, bits):
    x = trained_like_weight() if role == "weight" else heavy_tailed_act()
    q = make_quantizer(method, role, bits, channels=C if role == "weight" else 0).init_from(x)
    paper = quant_error(q, x)
    assert refine_mse(q, x)
    mse = quant_error(q, x)
    assert torch.all(mse <= paper * (1 + 1e-6)), (paper, mse)  # never worse (the published init is a candidate)
    if role == "weight":  # trained-like weights with an outlier: every published weight init clips or wastes levels
        assert float(mse.sum()) < 0.3 * float(paper.sum()), (float(paper.sum()), float(mse.sum()))


@pytest.mark.parametrize("method", ("lsqplus", "n2uq"))
def test_mse_init_keeps_the_outlier_the_paper_init_clips(method):
    w = trained_like_weight()
    q = make_quantizer(method, "weight", 8, channels=C).init_from(w)
    assert float((q(w) - w)[0, 0, 0, 0].abs()) > 0.5 * float(w[0, 0, 0, 0])  # paper init: clipped to < half
    refine_mse(q, w)
    assert float((q(w) - w)[0, 0, 0, 0].abs()) < 0.05 * float(w[0, 0, 0, 0])


def test_dorefa_weights_have_no_range_to_refine():
    w = trained_like_weight()
    q = make_quantizer("pact", "weight", 4, channels=C).init_from(w)
    before = {k: v.clone() for k, v in q.state_dict().items()}
    assert refine_mse(q, w) is False
    assert all(torch.equal(v, q.state_dict()[k]) for k, v in before.items())


def test_range_refinement_keeps_each_method_form():
    x = heavy_tailed_act()
    q = make_quantizer("lsqplus", "act", 4).init_from(x)
    centre = q.offset + q.step * (q.qmin + q.qmax) / 2
    refine_mse(q, x)
    torch.testing.assert_close(q.offset + q.step * (q.qmin + q.qmax) / 2, centre)  # grid scaled about its centre
    q = make_quantizer("n2uq", "act", 4).init_from(x)
    intervals = q.intervals.detach().clone()
    refine_mse(q, x)
    assert torch.equal(q.intervals, intervals)  # uniform segments kept; only the span moved
    torch.testing.assert_close(q.scale_out * q.scale_in, torch.ones(1))  # levels still k*span/L


def test_n2uq_weight_gain_scales_the_published_formula():
    w = trained_like_weight().double()
    q = make_quantizer("n2uq", "weight", 4, channels=C).double().init_from(w)
    assert torch.equal(q.w_gain, torch.ones(C, dtype=q.w_gain.dtype))  # paper init: gain 1
    refine_mse(q, w)
    gain = q.w_gain.double().view(-1, 1, 1, 1)
    L, gamma = 15, 15 / 8
    sf = gain * gamma * w.abs().mean((1, 2, 3), keepdim=True)
    ref = sf * (2 * torch.round((torch.clamp(w / sf, -1, 1) + 1) * L / 2) / L - 1)
    torch.testing.assert_close(q(w), ref)
    assert float(q.w_gain[0]) > 1.5  # the outlier channel widened its scale


def test_init_weight_quantizers_modes():
    from ultralytics.nn.tasks import DetectionModel

    from ultralytics_gabfusion.quant.convert import init_weight_quantizers, quantize_model
    from ultralytics_gabfusion.quant.qconv import quant_convs

    m = DetectionModel("yolov5n.yaml", nc=4, verbose=False)
    quantize_model(m, "lsqplus", 4, 4)
    steps = {}
    for init in ("paper", "mse"):
        init_weight_quantizers(m, init=init)
        steps[init] = torch.cat([c.weight_quant.step.detach().clone() for _, c in quant_convs(m)])
    name, conv = next(quant_convs(m))
    w = conv.weight.detach().float().reshape(conv.out_channels, -1)
    mu, sd = w.mean(1), w.std(1, correction=0)
    paper0 = torch.maximum((mu - 3 * sd).abs(), (mu + 3 * sd).abs()) / 128  # first conv: 8 bits
    torch.testing.assert_close(steps["paper"][: conv.out_channels], paper0)
    assert not torch.equal(steps["paper"], steps["mse"])
    with pytest.raises(ValueError, match="init='msa' is not a quantizer init mode"):
        init_weight_quantizers(m, init="msa")


# ------------------------------------------------------------------------------------------------ calibration
def _model_with_trained_bn(seed=0):
    from ultralytics.nn.tasks import DetectionModel

    torch.manual_seed(seed)
    m = DetectionModel("yolov5n.yaml", nc=4, verbose=False)
    g = torch.Generator().manual_seed(seed)
    for mod in m.modules():
        if isinstance(mod, torch.nn.BatchNorm2d):
            mod.running_mean.copy_(torch.randn(mod.running_mean.shape, generator=g) * 0.1)
            mod.running_var.copy_(torch.rand(mod.running_var.shape, generator=g) + 0.5)
    return m


def _act_state(m):
    from ultralytics_gabfusion.quant.qconv import quant_convs

    return torch.cat([c.act_quant.step.detach().clone() for _, c in quant_convs(m)])


def test_calibration_bn_modes():
    from ultralytics.nn.tasks import DetectionModel

    from ultralytics_gabfusion.quant.convert import bn_statistics_trained, calibrate_activations, quantize_model

    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    base = _model_with_trained_bn()
    assert bn_statistics_trained(base) and not bn_statistics_trained(DetectionModel("yolov5n.yaml", nc=4, verbose=False))
    quantize_model(base, "lsq", 4, 4)
    runs = {}
    for bn in ("auto", "eval", "batch"):
        m = copy.deepcopy(base).train()
        stats = [b.running_mean.clone() for b in m.modules() if isinstance(b, torch.nn.BatchNorm2d)]
        calibrate_activations(m, [x], bn=bn)
        assert m.training  # mode restored
        assert all(torch.equal(a, b.running_mean) for a, b in zip(stats, (b for b in m.modules() if isinstance(b, torch.nn.BatchNorm2d))))
        runs[bn] = _act_state(m)
    assert torch.equal(runs["auto"], runs["eval"])  # trained statistics: calibrate on what validation sees
    assert not torch.allclose(runs["eval"], runs["batch"])
    # eval mode = the activations of the model in eval mode
    m = copy.deepcopy(base).eval()
    seen = {}
    from ultralytics_gabfusion.quant.qconv import quant_convs

    name, conv = list(quant_convs(m))[5]
    conv.register_forward_pre_hook(lambda mod, a: seen.setdefault("x", a[0].detach().clone()))
    calibrate_activations(m, [x], bn="eval")
    aq = conv.act_quant  # the same grid as the layer's: unsigned + SiLU offset under qat_act_grid=auto
    q = make_quantizer("lsq", "act", 4, signed=aq.signed, fixed_offset=aq.fixed_offset).init_from(seen["x"])
    refine_mse(q, seen["x"])
    torch.testing.assert_close(conv.act_quant.step, q.step)
    fresh = DetectionModel("yolov5n.yaml", nc=4, verbose=False)
    quantize_model(fresh, "lsq", 4, 4)
    f1, f2 = copy.deepcopy(fresh), copy.deepcopy(fresh)
    calibrate_activations(f1, [x], bn="auto")
    calibrate_activations(f2, [x], bn="batch")
    assert torch.equal(_act_state(f1), _act_state(f2))  # untrained statistics: batch statistics
    with pytest.raises(ValueError, match="bn='running' is not a calibration BatchNorm mode"):
        calibrate_activations(fresh, [x], bn="running")


@pytest.mark.parametrize("method", ["lsq", "lsqplus", "pact"])
def test_integer_zero_point_calibration_picks_the_cheaper_neighbour(method):
    """qat_act_zp=integer: of s*floor(off/s) and s*ceil(off/s) the one with the lower error on the tensor is kept.

    Offset -2.4 steps: the forward rounds to -2, but 90% of the values sit at -2.9 steps, which only the grid
    starting at -3 steps represents."""
    s, b = 0.1, -0.24
    x = torch.cat([torch.full((900,), -2.9 * s), torch.linspace(-2 * s, 10 * s, 100)])
    extra = {} if method == "lsqplus" else {"fixed_offset": b}
    q = make_quantizer(method, "act", 4, signed=False, act_zp="integer", **extra)
    with torch.no_grad():
        if method == "pact":
            q.alpha.fill_(15 * s)
        else:
            q.step.fill_(s)
        if method == "lsqplus":
            q.offset.fill_(b)
    q._mark_initialized()
    before = float(quant_error(q, x).sum())
    assert float(q.grid()["offset"]) == pytest.approx(-2 * s)  # nearest multiple
    assert choose_zero_point(q, x)
    assert float(q.grid()["offset"]) == pytest.approx(-3 * s) and float(quant_error(q, x).sum()) < before
    assert not choose_zero_point(q, x)  # already on a multiple
    flat = torch.linspace(-2 * s, 10 * s, 1000)  # nothing below -2 steps: the nearest multiple kept, offset untouched
    q2 = copy.deepcopy(q)
    q2.set_grid_offset(b)
    assert not choose_zero_point(q2, flat) and float(q2.grid()["offset"]) == pytest.approx(-2 * s)
    assert (q2.offset.item() if method == "lsqplus" else q2.fixed_offset) == pytest.approx(b)
    q2.act_zp = "float"  # float offsets: nothing to choose
    assert not choose_zero_point(q2, x)


def test_signed_pact_zero_point_is_fixed_by_its_grid():
    q = make_quantizer("pact", "act", 4, signed=True, act_zp="integer").init_from(torch.randn(1000))
    assert not choose_zero_point(q, torch.randn(1000))
