"""Tests of the fake quantizers against their published formulas (LSQ, LSQ+, PACT/DoReFa, N2UQ).

The reference implementations below are written independently of the package, in plain elementwise
float64 torch code (masks, explicit sums, loops over levels where the formula is a sum over levels).
Inputs are built from integer codes plus fractions in [0.1, 0.4] (or thresholds plus margins) so no
element sits on a rounding tie, a clamp boundary or an N2UQ threshold/segment edge.
"""

import copy
import math
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

from ultralytics_gabfusion.quant import (
    FakeQuantizer,
    LSQPlusQuantizer,
    LSQQuantizer,
    N2UQQuantizer,
    PACTQuantizer,
    make_quantizer,
)

DT = torch.float64
BITS = list(range(2, 9))
C = 6  # output channels of the per-channel weight cases
W_SHAPE = (C, 3, 3, 3)
A_SHAPE = (4, 5, 6, 7)  # (batch, C, H, W) of the per-tensor activation cases
CONFIGS = [(m, r) for m in ("lsq", "lsqplus", "pact", "n2uq") for r in ("weight", "act")]


# ----------------------------------------------------------------------------------------------- helpers
KERNELS = ["reference", "compiled"]


@pytest.fixture(params=KERNELS)
def kernel(request):
    """Run the test once on the plain reference ops and once on the fused compiled kernels (qat_kernel)."""
    from ultralytics_gabfusion.quant import kernels

    if request.param == "compiled" and not kernels.compiled_available("cpu"):
        pytest.skip("no C++ compiler for torch.compile on this machine")
    with kernels.use_qat_kernel(request.param):
        yield request.param
    assert not kernels._state["failed"], "compiled kernels failed and fell back to the reference path"


def gen(seed):
    return torch.Generator().manual_seed(seed)


def int_range(bits, signed):
    return (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)


def codes(shape, lo, hi, g):
    """Values k + u: k integer in [lo-2, hi+2], |u| in [0.1, 0.4] -> >= 0.1 from integers, .5s, lo and hi."""
    k = torch.randint(lo - 2, hi + 3, shape, generator=g).to(DT)
    u = (0.1 + 0.3 * torch.rand(shape, generator=g, dtype=DT)) * torch.where(
        torch.rand(shape, generator=g) < 0.5, -1.0, 1.0
    ).to(DT)
    return k + u


def bcast(p, x, per_channel):
    return p.view(-1, *([1] * (x.dim() - 1))) if per_channel else p


def reduce(t, per_channel):
    return t.reshape(t.shape[0], -1).sum(1) if per_channel else t.sum().reshape(1)


def set_params(q, **values):
    """Initialise q (so forward does not re-init) and overwrite its tensors with the given values (float64)."""
    q.double()
    with torch.no_grad():
        for name, v in values.items():
            getattr(q, name).copy_(v)
        q.initialized.fill_(1)
    q._init_cached = False
    return q


def run(q, x, seed=123):
    """Forward + backward of sum(y * G) in float64; returns y, G, x.grad and {param: grad}."""
    q = q.double()
    q.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_(True)
    y = q(x)
    assert y.dtype == DT
    grad_out = torch.randn(x.shape, generator=gen(seed), dtype=DT)
    (y * grad_out).sum().backward()
    return y.detach(), grad_out, x.grad, {n: p.grad for n, p in q.named_parameters()}


def assert_close(a, b, tol=1e-9):
    torch.testing.assert_close(a, b, rtol=tol, atol=tol)


# ----------------------------------------------------------------------------------------------- references
def ref_lsq(x, s, beta, n, p, G, N, per_channel):
    """LSQ / LSQ+: y = round(clamp((x-beta)/s, n, p))*s + beta and its gradients."""
    sb, bb = bcast(s, x, per_channel), bcast(beta, x, per_channel)
    v = (x - bb) / sb
    y = torch.round(torch.clamp(v, n, p)) * sb + bb
    inside = (v > n) & (v < p)
    below, above = v <= n, v >= p
    g = 1.0 / math.sqrt(N * p)
    dx = G * inside.to(DT)
    ds_el = (torch.round(v) - v) * inside + n * below.to(DT) + p * above.to(DT)
    ds = reduce(G * ds_el, per_channel) * g
    dbeta = reduce(G * (below | above).to(DT), per_channel) * g
    return y, dx, ds, dbeta


def ref_pact(x, alpha, bits, signed, G):
    L = 2**bits - 1
    if signed:
        xc = torch.clamp(x, -alpha, alpha)
        y = torch.round((xc + alpha) * L / (2 * alpha)) * (2 * alpha) / L - alpha
        inside = (x > -alpha) & (x < alpha)
        dalpha = (G * (x >= alpha)).sum() - (G * (x <= -alpha)).sum()
    else:
        xc = torch.minimum(x.clamp(min=0), alpha)
        y = torch.round(xc * L / alpha) * alpha / L
        inside = (x >= 0) & (x < alpha)
        dalpha = (G * (x >= alpha)).sum()
    return y, G * inside, dalpha.reshape(1)


def ref_dorefa(w, bits, G, per_channel):
    L = 2**bits - 1
    t = torch.tanh(w)
    rows = lambda z: z.reshape(z.shape[0], -1) if per_channel else z.reshape(1, -1)  # noqa: E731
    M = bcast(rows(t).abs().amax(1), w, per_channel)
    Mw = bcast(rows(w).abs().amax(1), w, per_channel)
    r = t / (2 * M) + 0.5
    scaled = L * r
    y = Mw * (2 * torch.round(scaled) / L - 1)
    dw = G * (Mw / M) * (1 - t**2)
    return y, dw, scaled


def ref_n2uq_weight(w, bits, G, per_channel, mode):
    L = 2**bits - 1
    rows = w.reshape(w.shape[0], -1) if per_channel else w.reshape(1, -1)
    SF = bcast((2**bits - 1) / 2 ** (bits - 1) * rows.abs().mean(1), w, per_channel)
    Wc = torch.clamp(w / SF, -1, 1)
    scaled = (Wc + 1) * L / 2
    y = SF * (torch.round(scaled) * 2 / L - 1)
    dw = G if mode == "ste" else G / SF
    return y, dw, scaled


def ref_n2uq_act(x, s0, a, b1, b2, G):
    """N2UQ activations, with the thresholds built by the recursion and loops over levels."""
    L = a.numel()
    delta = 2.0 / L
    xs = b1 * x
    T = [s0 + a[0] / 2]
    for i in range(1, L):
        T.append(T[-1] + a[i - 1] / 2 + a[i] / 2)
    count = torch.zeros_like(x)
    for t in T:
        count = count + (xs > t).to(DT)
    y = count * delta * b2
    d = [s0]
    for i in range(L):
        d.append(d[-1] + a[i])
    dx = torch.zeros_like(x)
    da = torch.zeros(L, dtype=DT)
    ds0 = torch.zeros((), dtype=DT)
    db1 = torch.zeros((), dtype=DT)
    for i in range(1, L + 1):  # segment i: d_{i-1} <= x' < d_i
        m = ((xs >= d[i - 1]) & (xs < d[i])).to(DT)
        ai = a[i - 1]
        gi = G * m * b2  # dL/dS on this segment (y = b2 * S)
        dx += gi * delta / ai * b1
        db1 += (gi * delta / ai * x).sum()
        da[i - 1] += (gi * (-delta * (xs - d[i - 1]) / ai**2)).sum()
        da[: i - 1] += (gi * (-delta / ai)).sum()
        ds0 += (gi * (-delta / ai)).sum()
    db2 = (G * count * delta).sum()
    return y, dx, {"start": ds0.reshape(1), "intervals": da, "scale_in": db1.reshape(1), "scale_out": db2.reshape(1)}


# ----------------------------------------------------------------------------------------------- LSQ / LSQ+
@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("role", ["weight", "act"])
def test_lsq_matches_formulas(bits, signed, role, kernel):
    g = gen(bits * 10 + signed)
    n, p = int_range(bits, signed)
    per_channel = role == "weight"
    shape = W_SHAPE if per_channel else A_SHAPE
    s = 0.05 + 0.5 * torch.rand(C if per_channel else 1, generator=g, dtype=DT)
    x = codes(shape, n, p, g) * bcast(s, torch.empty(shape), per_channel)
    q = set_params(make_quantizer("lsq", role, bits, channels=C if per_channel else 0, signed=signed), step=s)
    y, G, dx, grads = run(q, x)
    N = x.numel() / C if per_channel else x.numel() / x.shape[0]
    y_ref, dx_ref, ds_ref, _ = ref_lsq(x, s, torch.zeros_like(s), n, p, G, N, per_channel)
    assert_close(y, y_ref)
    assert_close(dx, dx_ref)
    assert_close(grads["step"], ds_ref)
    assert set(grads) == {"step"}


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("role", ["weight", "act"])
def test_lsqplus_matches_formulas(bits, signed, role, kernel):
    g = gen(bits * 10 + signed + 1000)
    n, p = int_range(bits, signed)
    per_channel = role == "weight"
    shape = W_SHAPE if per_channel else A_SHAPE
    c = C if per_channel else 1
    s = 0.05 + 0.5 * torch.rand(c, generator=g, dtype=DT)
    beta = torch.zeros(c, dtype=DT) if role == "weight" else torch.randn(c, generator=g, dtype=DT)
    x = codes(shape, n, p, g) * bcast(s, torch.empty(shape), per_channel) + bcast(beta, torch.empty(shape), per_channel)
    q = make_quantizer("lsqplus", role, bits, channels=C if per_channel else 0, signed=signed)
    q = set_params(q, step=s, offset=beta)
    y, G, dx, grads = run(q, x)
    N = x.numel() / C if per_channel else x.numel() / x.shape[0]
    y_ref, dx_ref, ds_ref, db_ref = ref_lsq(x, s, beta, n, p, G, N, per_channel)
    assert_close(y, y_ref)
    assert_close(dx, dx_ref)
    assert_close(grads["step"], ds_ref)
    if role == "act":
        assert_close(grads["offset"], db_ref)
    else:  # weights: beta fixed at 0, not learnable
        assert set(grads) == {"step"} and "offset" in dict(q.named_buffers())


# ------------------------------------------------------------------------------- integer zero points (qat_act_zp)
# Every formula on the reference ops; one case per method on the compiled kernels (their first compile is slow).
ZP_CASES = [("lsqplus", 4, False, "reference"), ("lsqplus", 3, True, "reference"), ("lsqplus", 2, False, "reference"),
            ("lsq", 4, False, "reference"), ("lsq", 3, False, "reference"),
            ("lsqplus", 4, False, "compiled"), ("lsq", 4, False, "compiled")]


@pytest.mark.parametrize("method,bits,signed,kernel_name", ZP_CASES)
def test_integer_zero_point_lsq_matches_formulas(method, bits, signed, kernel_name):
    """act_zp=integer, float64: y = s*clamp(round((x - off_int)/s), n, p) + off_int with off_int = s*round(off/s);
    dy/dbeta as LSQ+ without the rounding (STE), dy/ds = LSQ's + round(off/s) * dy/doff (product rule)."""
    from ultralytics_gabfusion.quant import kernels
    from ultralytics_gabfusion.quant.grids import SILU_MIN

    if kernel_name == "compiled" and not kernels.compiled_available("cpu"):
        pytest.skip("no C++ compiler for torch.compile on this machine")
    g = gen(bits * 10 + signed + 3000)
    n, p = int_range(bits, signed)
    s = 0.04 + 0.06 * torch.rand(1, generator=g, dtype=DT)  # SILU_MIN/s in -7..-2.8
    if method == "lsqplus":
        off = s * (-2.1 - 0.3 * torch.rand(1, generator=g, dtype=DT))  # round(off/s) = -2, 0.1..0.4 step away
        q = set_params(make_quantizer("lsqplus", "act", bits, signed=signed, act_zp="integer"), step=s, offset=off)
    else:
        off = torch.tensor([SILU_MIN], dtype=DT)
        q = set_params(make_quantizer("lsq", "act", bits, signed=signed, fixed_offset=SILU_MIN, act_zp="integer"),
                       step=s)
    k = torch.round(off / s)
    off_int = s * k
    assert float((off / s - k).abs()) > 0.05 and int(k) != 0  # the offset really moves, by a whole number of steps
    x = codes(A_SHAPE, n, p, g) * s + off_int
    with kernels.use_qat_kernel(kernel_name):
        y, G, dx, grads = run(q, x)
    assert not kernels._state["failed"], "compiled kernels failed and fell back to the reference path"
    assert_close(y, s * torch.clamp(torch.round((x - off_int) / s), n, p) + off_int)
    assert_close(y / s, torch.round(y / s))  # every level an integer multiple of s: integer zero point -k
    N = x.numel() / x.shape[0]
    _, dx_ref, ds_lsq, db_lsq = ref_lsq(x, s, off_int, n, p, G, N, False)
    assert_close(dx, dx_ref)
    assert_close(grads["step"], ds_lsq + k * db_lsq)
    if method == "lsqplus":
        assert_close(grads["offset"], db_lsq)
    else:
        assert set(grads) == {"step"}
    grid = q.grid()
    assert_close(grid["offset"], off_int) and (grid["qmin"], grid["qmax"]) == (n, p)


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("signed", [False, True])
def test_integer_zero_point_pact_matches_formulas(bits, signed):
    """act_zp=integer PACT, float64: canonical with the SiLU offset b: off_int = s*round(b/s), s = alpha/L; signed:
    off_int = -2^(b-1)*s, s = 2alpha/L (the symmetric signed grid); y = off_int + PACT(x - off_int) with clip L*s;
    dalpha = c * sum(G, above) + (k*c/L) * sum(G, outside), c = ds/dalpha * L (1 or 2), k = off_int/s."""
    from ultralytics_gabfusion.quant.grids import SILU_MIN

    L, h = 2**bits - 1, 2 ** (bits - 1)
    alpha = torch.tensor([0.9 if bits > 2 else 0.6], dtype=DT)
    c = 2 if signed else 1
    s = c * alpha / L
    k = torch.tensor([-float(h)], dtype=DT) if signed else torch.round(SILU_MIN / s)
    off_int = s * k
    extra = {} if signed else {"fixed_offset": SILU_MIN}
    q = set_params(make_quantizer("pact", "act", bits, signed=signed, act_zp="integer", **extra), alpha=alpha)
    x = codes(A_SHAPE, 0, L, gen(bits + 7 * signed)) * s + off_int
    y, G, dx, grads = run(q, x)
    v = (x - off_int) / s
    assert_close(y, s * torch.clamp(torch.round(v), 0, L) + off_int)
    assert_close(y / s, torch.round(y / s))
    above, below = v >= L, v < 0
    assert_close(dx, G * ~(above | below))
    assert_close(grads["alpha"], (c * (G * above).sum() + k * c / L * (G * (above | below)).sum()).reshape(1))
    grid = q.grid()
    if signed:  # the symmetric signed integer grid, zero point 0
        assert float(grid["offset"]) == 0.0 and (grid["qmin"], grid["qmax"]) == (-h, h - 1)
    else:
        assert_close(grid["offset"], off_int) and (grid["qmin"], grid["qmax"]) == (0, L)
    assert_close(grid["scale"], s)


def test_act_zp_is_configuration_and_old_pickles_read_float():
    """act_zp is a plain attribute (pickled with the model); quantizers pickled before it existed read 'float'."""
    import pickle

    q = make_quantizer("lsqplus", "act", 4, signed=False, act_zp="Integer")
    assert q.act_zp == "integer" and q.integer_zero_point and "act_zp='integer'" in repr(q)
    assert pickle.loads(pickle.dumps(q)).integer_zero_point
    assert not make_quantizer("lsqplus", "weight", 4, channels=2, act_zp="integer").integer_zero_point  # acts only
    del q.act_zp  # as a quantizer pickled by an earlier release
    old = pickle.loads(pickle.dumps(q))
    assert old.act_zp == "float" and not old.integer_zero_point
    with pytest.raises(ValueError, match="act_zp='int' is not valid; allowed: float, integer"):
        make_quantizer("lsq", "act", 4, act_zp="int")


def test_lsq_per_tensor_weight_uses_all_elements_for_g(kernel):
    bits, n, p = 4, -8, 7
    g = gen(7)
    s = torch.tensor([0.2], dtype=DT)
    x = codes(W_SHAPE, n, p, g) * s
    q = set_params(make_quantizer("lsq", "weight", bits, channels=0), step=s)
    _, G, _, grads = run(q, x)
    _, _, ds_ref, _ = ref_lsq(x, s, torch.zeros(1, dtype=DT), n, p, G, x.numel(), False)
    assert_close(grads["step"], ds_ref)


def test_lsq_init():
    w = torch.randn(W_SHAPE, generator=gen(1))
    q = make_quantizer("lsq", "weight", 4, channels=C)
    q(w)
    assert_close(q.step.double(), (2 * w.abs().reshape(C, -1).mean(1) / math.sqrt(7)).double(), 1e-6)
    a = torch.randn(A_SHAPE, generator=gen(2))
    q = make_quantizer("lsq", "act", 3, signed=False)
    q(a)
    assert_close(q.step.double(), (2 * a.abs().mean() / math.sqrt(7)).reshape(1).double(), 1e-6)


def test_lsqplus_init():
    w = torch.randn(W_SHAPE, generator=gen(3), dtype=DT) * 0.1 + 0.01
    q = make_quantizer("lsqplus", "weight", 4, channels=C).double()
    q(w)
    rows = w.reshape(C, -1)
    mu, sd = rows.mean(1), rows.std(1, correction=0)
    s_ref = torch.maximum((mu - 3 * sd).abs(), (mu + 3 * sd).abs()) / 8
    assert_close(q.step, s_ref, 1e-6)
    assert torch.all(q.offset == 0)
    # activations: min-max; the grid spans exactly [min, max]
    a = torch.rand(A_SHAPE, generator=gen(4), dtype=DT) * 3 - 0.28
    for signed in (True, False):
        q = make_quantizer("lsqplus", "act", 4, signed=signed).double()
        y = q(a)
        assert_close(q.step, ((a.max() - a.min()) / 15).reshape(1), 1e-6)
        assert_close(y.min(), a.min(), 1e-6)
        assert_close(y.max(), a.max(), 1e-6)


# ----------------------------------------------------------------------------------------------- PACT / DoReFa
@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("signed", [True, False])
def test_pact_act_matches_formulas(bits, signed, kernel):
    g = gen(bits + 100 * signed)
    L = 2**bits - 1
    alpha = torch.tensor([0.5 + 1.5 * torch.rand(1, generator=g).item()], dtype=DT)
    if signed:  # codes relative to -alpha in units of 2 alpha / L
        x = -alpha + codes(A_SHAPE, 0, L, g) * (2 * alpha / L)
    else:
        x = codes(A_SHAPE, 0, L, g) * (alpha / L)
    q = set_params(make_quantizer("pact", "act", bits, signed=signed), alpha=alpha)
    y, G, dx, grads = run(q, x)
    y_ref, dx_ref, da_ref = ref_pact(x, alpha, bits, signed, G)
    assert_close(y, y_ref)
    assert_close(dx, dx_ref)
    assert_close(grads["alpha"], da_ref)
    assert (x >= alpha).any() and (x < (-alpha if signed else 0)).any()  # both clip sides exercised


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("per_channel", [True, False])
def test_dorefa_weight_matches_formulas(bits, per_channel, kernel):
    w = torch.randn(W_SHAPE, generator=gen(bits + 7 * per_channel), dtype=DT) * 0.7
    q = make_quantizer("pact", "weight", bits, channels=C if per_channel else 0)
    y, G, dw, grads = run(q, w)
    y_ref, dw_ref, scaled = ref_dorefa(w, bits, G, per_channel)
    assert (scaled - scaled.floor() - 0.5).abs().min() > 1e-7  # no rounding tie in this sample
    assert_close(y, y_ref)
    assert_close(dw, dw_ref)
    assert grads == {}


def test_pact_init_and_decay_params():
    a = torch.randn(8, 4, 16, 16, generator=gen(5))
    q = make_quantizer("pact", "act", 4, signed=True)
    q(a)
    mag = a.abs().flatten()
    assert mag.quantile(0.99) <= q.alpha.item() <= mag.max()
    q = make_quantizer("pact", "act", 4, signed=False)
    q(a)
    assert a.clamp(min=0).flatten().quantile(0.99) <= q.alpha.item() <= a.max()
    assert q.decay_params == ("alpha",) and PACTQuantizer.decay_params == ("alpha",)
    assert make_quantizer("pact", "weight", 4, channels=C).decay_params == ()
    for m in ("lsq", "lsqplus", "n2uq"):
        assert make_quantizer(m, "act", 4).decay_params == ()


# ----------------------------------------------------------------------------------------------- N2UQ
def n2uq_case(bits, seed, n=1500):
    """Random N2UQ parameters and inputs x' placed inside segments, >= 5% of a segment from edges/midpoints."""
    g = gen(seed)
    L = 2**bits - 1
    delta = 2.0 / L
    s0 = -torch.rand(1, generator=g, dtype=DT)
    a = delta * (0.5 + torch.rand(L, generator=g, dtype=DT))
    b1 = 0.5 + 1.5 * torch.rand(1, generator=g, dtype=DT)
    b2 = 0.5 + 1.5 * torch.rand(1, generator=g, dtype=DT)
    d = torch.cat([s0, s0 + torch.cumsum(a, 0)])
    seg = torch.randint(0, L + 2, (n,), generator=g)  # 0: below s0, L+1: above d_L
    u = 0.05 + 0.4 * torch.rand(n, generator=g, dtype=DT)
    u = torch.where(torch.rand(n, generator=g) < 0.5, u, u + 0.5)  # [0.05, 0.45] or [0.55, 0.95]
    inside = seg.clamp(1, L)
    xs = d[inside - 1] + u * a[inside - 1]
    xs = torch.where(seg == 0, s0 - u, xs)
    xs = torch.where(seg == L + 1, d[-1] + u, xs)
    return (xs / b1).reshape(3, 5, -1), s0, a, b1, b2


@pytest.mark.parametrize("bits", BITS)
def test_n2uq_act_matches_formulas(bits, kernel):
    x, s0, a, b1, b2 = n2uq_case(bits, seed=bits)
    q = set_params(make_quantizer("n2uq", "act", bits), start=s0, intervals=a, scale_in=b1, scale_out=b2)
    y, G, dx, grads = run(q, x)
    y_ref, dx_ref, grads_ref = ref_n2uq_act(x, s0[0], a, b1[0], b2[0], G)
    assert_close(y, y_ref)
    assert_close(dx, dx_ref)
    assert set(grads) == set(grads_ref)
    for name in grads_ref:
        assert grads[name].shape == grads_ref[name].shape, name
        assert_close(grads[name], grads_ref[name], 1e-8)
    # the same input flattened to 1-D (backward histogram not spread over rows) gives the same gradients
    y1, _, dx1, grads1 = run(q, x.reshape(-1))
    assert_close(dx1, dx.reshape(-1))
    for name in grads_ref:
        assert_close(grads1[name], grads[name], 1e-8)
    # thresholds(): count = #(x > T_i) in the input domain reproduces the output
    T = q.thresholds()
    assert T.shape == (2**bits - 1,) and torch.all(T[1:] >= T[:-1])
    count = (x.unsqueeze(-1) > T.to(DT)).sum(-1).to(DT)
    assert_close(count * (2.0 / (2**bits - 1)) * b2, y, 1e-6)


def test_n2uq_interval_floor_is_straight_through(kernel):
    x, s0, a, b1, b2 = n2uq_case(3, seed=11)
    a[2] = -0.5  # below the 1e-3 floor: forward uses 1e-3, gradient still reaches the parameter
    q = set_params(make_quantizer("n2uq", "act", 3), start=s0, intervals=a, scale_in=b1, scale_out=b2)
    y, G, _, grads = run(q, x)
    a_eff = a.clamp_min(1e-3)
    y_ref, _, grads_ref = ref_n2uq_act(x, s0[0], a_eff, b1[0], b2[0], G)
    assert_close(y, y_ref)
    assert_close(grads["intervals"], grads_ref["intervals"], 1e-8)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("mode", ["ste", "reference"])
def test_n2uq_weight_matches_formulas(bits, mode, kernel):
    w = torch.randn(W_SHAPE, generator=gen(bits + 50), dtype=DT) * 0.1
    q = make_quantizer("n2uq", "weight", bits, channels=C, weight_grad=mode)
    y, G, dw, grads = run(q, w)
    y_ref, dw_ref, scaled = ref_n2uq_weight(w, bits, G, True, mode)
    assert (scaled - scaled.floor() - 0.5).abs().min() > 1e-7
    assert_close(y, y_ref)
    assert_close(dw, dw_ref)
    assert grads == {}
    # per-tensor variant
    q = make_quantizer("n2uq", "weight", bits, channels=0)
    y, G, dw, _ = run(q, w)
    y_ref, dw_ref, _ = ref_n2uq_weight(w, bits, G, False, "ste")
    assert_close(y, y_ref)
    assert_close(dw, dw_ref)


def test_n2uq_act_init_covers_range():
    a = torch.nn.functional.silu(torch.randn(4, 8, 16, 16, generator=gen(9), dtype=DT) * 2)
    for bits in (2, 4, 8):
        q = make_quantizer("n2uq", "act", bits).double()
        y = q(a)
        L = 2**bits - 1
        assert_close(q.intervals, torch.full((L,), 2.0 / L, dtype=DT), 1e-6)
        assert_close(q.scale_in * q.scale_out, torch.ones(1, dtype=DT), 1e-6)
        flat = a.flatten()
        lo, hi = flat.quantile(0.001), flat.quantile(0.999)
        assert lo < 0  # negative SiLU values are covered
        T = q.thresholds().double()
        assert lo - 1e-6 <= T[0] and T[-1] <= hi + 1e-6
        lo_q, hi_q = q.start / q.scale_in, (q.start + 2) / q.scale_in  # segments tile [lo_q, hi_q]
        step = (hi - lo) / L
        assert (lo_q - lo).abs() < step and (hi_q - hi).abs() < step  # percentile estimates agree
        # output is on the input's scale, shifted by -lo: y ~ x - lo within half a step inside the range
        m = (a > lo_q) & (a < hi_q)
        assert ((y - (a - lo_q))[m].abs() <= (hi_q - lo_q) / L / 2 + 1e-9).all()
        assert_close(q.step_size().double(), (hi_q - lo_q) / L, 1e-6)


def test_n2uq_act_rejects_per_channel():
    with pytest.raises(ValueError, match="per-tensor"):
        make_quantizer("n2uq", "act", 4, channels=8)


def test_n2uq_large_tensor_memory():
    """16x64x80x80 forward+backward at 8 bits in a fresh process: peak RSS far below a per-level loop.

    (Half of YOLO's 32x64x80x80 to keep the suite fast; the bytes/element bound does not depend on size.)
    """
    code = textwrap.dedent(
        """
        import resource, torch
        torch.set_num_threads(2)
        from ultralytics_gabfusion.quant import make_quantizer
        q = make_quantizer("n2uq", "act", 8)
        x = torch.randn(16, 64, 80, 80)
        q.init_from(x)
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        x.requires_grad_(True)
        y = q(x)
        y.backward(torch.ones_like(y))
        assert torch.isfinite(x.grad).all() and all(torch.isfinite(p.grad).all() for p in q.parameters())
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        print((peak - base) * 1024 / x.numel())
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    bytes_per_elem = float(out.stdout.strip().splitlines()[-1])
    # A loop over the 255 levels with full-size temporaries would need > 1000 bytes/element.
    assert bytes_per_elem < 64, bytes_per_elem


# ----------------------------------------------------------------------------------------------- common behaviour
def make(method, role, bits=4, signed=True):
    return make_quantizer(method, role, bits, channels=C if role == "weight" else 0, signed=signed)


def sample(role, seed=0, dtype=torch.float32):
    shape = W_SHAPE if role == "weight" else A_SHAPE
    x = torch.randn(shape, generator=gen(seed), dtype=dtype)
    return x * 0.1 if role == "weight" else torch.nn.functional.silu(3 * x)


@pytest.mark.parametrize("method,role", CONFIGS)
@pytest.mark.parametrize("bits", BITS)
def test_grid_reproduces_output_and_level_count(method, role, bits):
    for signed in (True, False):
        q = make(method, role, bits, signed).double()
        x = sample(role, seed=bits, dtype=DT)
        y = q(x).detach()
        grid = q.grid()
        assert set(grid) == {"scale", "offset", "qmin", "qmax", "axis"}
        per_channel = role == "weight"
        assert grid["axis"] == (0 if per_channel else None)
        assert grid["scale"].shape == grid["offset"].shape == ((C,) if per_channel else (1,))
        assert torch.all(grid["scale"] > 0)
        k = (y - bcast(grid["offset"], y, per_channel)) / bcast(grid["scale"], y, per_channel)
        assert (k - k.round()).abs().max() < 1e-6
        assert k.round().min() >= grid["qmin"] and k.round().max() <= grid["qmax"]
        assert grid["qmax"] - grid["qmin"] + 1 == 2**bits
        rows = y.reshape(C, -1) if per_channel else y.reshape(1, -1)
        assert max(len(torch.unique(r)) for r in rows) <= 2**bits
        step = q.step_size()
        assert step.shape == grid["scale"].shape and torch.all(step > 0)


@pytest.mark.parametrize("method,role", CONFIGS)
def test_learnable_tensor_names_and_shapes(method, role):
    expected = {
        "lsq": {"step"},
        "lsqplus": {"step", "offset"} if role == "act" else {"step"},
        "pact": {"alpha"} if role == "act" else set(),
        "n2uq": {"start", "intervals", "scale_in", "scale_out"} if role == "act" else set(),
    }[method]
    q = make(method, role, bits=3)
    params = dict(q.named_parameters())
    assert set(params) == expected
    for name, p in params.items():
        assert p.dim() == 1 and p.dtype == torch.float32
        if name != "intervals":
            assert p.shape == ((C,) if role == "weight" else (1,))
    assert q.intervals.shape == (7,) if (method, role) == ("n2uq", "act") else True
    assert isinstance(q, FakeQuantizer)
    assert (q.method, q.role, q.bits, q.signed, q.channels) == (method, role, 3, True, C if role == "weight" else 0)
    text = repr(q)
    assert "bits=3" in text and repr(method) in text and repr(role) in text
    assert q.qmin == -4 and q.qmax == 3
    q.signed = False
    assert q.qmin == 0 and q.qmax == 7


def test_classes_exported():
    assert isinstance(make_quantizer("lsq", "act", 4), LSQQuantizer)
    assert isinstance(make_quantizer("lsq+", "act", 4), LSQPlusQuantizer)
    assert isinstance(make_quantizer("PACT", "activation", 4), PACTQuantizer)
    assert isinstance(make_quantizer("n2uq", "weight", 4, channels=2), N2UQQuantizer)


@pytest.mark.parametrize("method,role", CONFIGS)
def test_lazy_init_and_state_dict(method, role):
    q = make(method, role)
    assert int(q.initialized) == 0 and q.initialized.dtype == torch.uint8
    x = sample(role, seed=1)
    y1 = q(x)
    assert int(q.initialized) == 1
    sd = q.state_dict()
    assert "initialized" in sd and sd["initialized"].dtype == torch.uint8
    # further forwards do not re-initialise (on very different data)
    before = {k: v.clone() for k, v in q.state_dict().items()}
    q(10 * sample(role, seed=2))
    for k, v in q.named_parameters():
        assert torch.equal(v, before[k]), k
    # a loaded quantizer is not re-initialised by its first forward
    q2 = make(method, role)
    q2.load_state_dict(before)
    assert torch.equal(q2(x), y1)
    for k, v in q2.named_parameters():
        assert torch.equal(v, before[k]), k
    # init_from re-initialises explicitly
    q2.init_from(5 * x)
    if method in ("lsq", "lsqplus"):
        assert not torch.equal(q2.step, before["step"])


def test_lazy_init_under_inference_mode_then_train():
    q = make("lsqplus", "act")
    with torch.inference_mode():
        q(sample("act"))
    assert not q.step.is_inference() and q.step.requires_grad
    x = sample("act").requires_grad_(True)
    q(x).sum().backward()
    assert q.step.grad is not None and x.grad is not None


@pytest.mark.parametrize("method,role", CONFIGS)
def test_half_keeps_fp32_state(method, role):
    q = make(method, role)
    x = sample(role)
    y32 = q(x)
    q.half()
    for name, t in list(q.named_parameters()) + list(q.named_buffers()):
        if t.is_floating_point():
            assert t.dtype == torch.float32, name
    yh = q(x.half())
    assert yh.dtype == torch.float16
    torch.testing.assert_close(yh.float(), q(x.half().float()).half().float())
    # only the fp16 rounding of the input differs: at most one step where it crosses a rounding boundary
    assert (yh.float() - y32).abs().max() <= q.step_size().max() * 1.01 + 1e-3
    # inside a model: the conv becomes fp16, the quantizer stays fp32; device moves still work
    model = nn.Sequential(nn.Conv2d(3, 3, 1), make(method, role)).half().to("cpu")
    assert model[0].weight.dtype == torch.float16
    assert all(p.dtype == torch.float32 for p in model[1].parameters())
    q.double()
    assert all(p.dtype == torch.float64 for p in q.parameters())


def test_half_converts_existing_grads():
    q = make("lsq", "act")
    q(sample("act")).sum().backward()
    q.half()
    assert q.step.dtype == q.step.grad.dtype == torch.float32
    q(sample("act")).sum().backward()  # accumulation still works


@pytest.mark.parametrize("method,role", CONFIGS)
def test_autocast_bf16_computes_in_fp32(method, role):
    x = sample(role, seed=3)
    q = make(method, role)
    y_ref = q(x)
    xb = x.bfloat16()
    y_ref_b = q(xb.float())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = q(x)
        yb = q(xb)
    assert y.dtype == torch.float32 and torch.equal(y, y_ref)
    assert yb.dtype == torch.bfloat16 and torch.equal(yb, y_ref_b.bfloat16())


@pytest.mark.parametrize("method,role", CONFIGS)
@pytest.mark.parametrize("value", [0.0, 3.0, -0.25])
def test_no_nan_on_constant_input(method, role, value):
    q = make(method, role)
    shape = W_SHAPE if role == "weight" else A_SHAPE
    x = torch.full(shape, value, requires_grad=True)
    y = q(x)
    y.sum().backward()
    assert torch.isfinite(y).all() and torch.isfinite(x.grad).all()
    for name, p in q.named_parameters():
        assert torch.isfinite(p).all() and torch.isfinite(p.grad).all(), name
    for name, b in q.named_buffers():
        assert torch.isfinite(b.float()).all(), name
    assert torch.isfinite(q.step_size()).all() and torch.all(q.step_size() > 0)
    # a quantizer initialised on zeros still handles real data
    y2 = q(sample(role))
    assert torch.isfinite(y2).all()


def test_deepcopy_and_float64_dtype_preserved():
    q = make("n2uq", "act")
    q(sample("act"))
    q2 = copy.deepcopy(q)
    assert torch.equal(q2(sample("act", 4)), q(sample("act", 4)))
    x = sample("act", dtype=DT)
    assert q(x).dtype == DT


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"bits": 1}, r"2\.\.8"),
        ({"bits": 9}, r"2\.\.8"),
        ({"bits": 4.0}, r"integer in 2\.\.8"),
        ({"bits": "4"}, r"integer in 2\.\.8"),
        ({"bits": True}, r"integer in 2\.\.8"),
        ({"method": "lsqq"}, r"did you mean 'lsq'.*allowed methods: lsq, lsqplus, pact, n2uq"),
        ({"method": "dorefa"}, r"allowed methods: lsq, lsqplus, pact, n2uq"),
        ({"role": "bias"}, r"allowed roles: weight, act"),
        ({"channels": -1}, r"non-negative"),
        ({"channels": 2.5}, r"non-negative integer"),
    ],
)
def test_bad_arguments(kwargs, match):
    args = {"method": "lsq", "role": "weight", "bits": 4, "channels": 3}
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        make_quantizer(**args)


def test_bad_input_shape_and_option():
    q = make_quantizer("lsq", "weight", 4, channels=4)
    with pytest.raises(ValueError, match="channels=4"):
        q(torch.randn(3, 2, 1, 1))
    with pytest.raises(ValueError, match="weight_grad"):
        make_quantizer("n2uq", "weight", 4, channels=2, weight_grad="nope")


# ---------------------------------------------------------------------------- conv output quantizer (qat_out_bits)
@pytest.mark.parametrize("signed,beta_steps", [(False, -100.3), (False, 40.2), (False, -300.2), (True, 20.4),
                                               (True, -150.1)])
def test_conv_output_quantizer_keeps_its_zero_point_in_the_integer_type(signed, beta_steps):
    """ConvOutputQuantizer, float64: LSQ+ with off_int = s*clamp(round(beta/s), -p, -n), so the zero point
    z = -round(...) lies in [n, p] (the 8-bit type an integer conv writes) even when beta drifts outside; gradients
    are LSQ+'s with the clamped integer (product rule), the offset's straight through."""
    from ultralytics_gabfusion.quant.lsq import ConvOutputQuantizer

    g = gen(int(abs(beta_steps)) + signed)
    n, p = int_range(8, signed)
    s = torch.tensor([0.02], dtype=DT)
    q = set_params(ConvOutputQuantizer(8, signed=signed), step=s, offset=s * beta_steps)
    k = torch.clamp(torch.round(torch.tensor([beta_steps], dtype=DT)), -p, -n)
    off_int = s * k
    x = codes(A_SHAPE, n, p, g) * s + off_int
    y, G, dx, grads = run(q, x)
    assert_close(y, s * torch.clamp(torch.round((x - off_int) / s), n, p) + off_int)
    _, dx_ref, ds_lsq, db_lsq = ref_lsq(x, s, off_int, n, p, G, x.numel() / x.shape[0], False)
    assert_close(dx, dx_ref)
    assert_close(grads["step"], ds_lsq + k * db_lsq)
    assert_close(grads["offset"], db_lsq)
    z = -float(q.grid()["offset"] / q.grid()["scale"])
    assert n <= round(z) <= p and abs(z - round(z)) < 1e-6
    # init: min-max widened to contain 0, so an all-positive output still gets a zero point in range
    q2 = ConvOutputQuantizer(8, signed=signed).double()
    q2(torch.linspace(0.5, 2.0, 64, dtype=DT))
    grid = q2.grid()
    lo, hi = (float(grid["offset"] + k * grid["scale"]) for k in (n, p))
    assert lo <= 0.0 <= hi + 1e-12
