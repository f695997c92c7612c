"""Fake-quant kernel selection (``qat_kernel``), the fused compiled kernels and the weight-output cache.

The float64 formula tests of tests/test_quantizers.py run on both kernels; here the two kernels are compared with each
other on inputs that include the exact edge cases (rounding ties, values exactly on the clamp bounds, zeros, N2UQ
thresholds) where a different convention would show.
"""

import copy
import pickle

import pytest
import torch

from ultralytics_gabfusion.quant import kernels, make_quantizer
from ultralytics_gabfusion.quant.kernels import use_qat_kernel

pytestmark = pytest.mark.skipif(not kernels.compiled_available("cpu"), reason="no C++ compiler for torch.compile")

CASES = [(m, r, b) for m in ("lsq", "lsqplus", "pact", "n2uq") for r in ("weight", "act") for b in (3, 4)]


def edge_input(method, role, q, dtype, seed):
    """Random values plus exact ties, grid bounds and zeros of quantizer ``q`` (so conventions are exercised)."""
    g = torch.Generator().manual_seed(seed)
    shape = (6, 4, 3, 3) if role == "weight" else (3, 6, 5, 7)
    x = torch.randn(shape, generator=g, dtype=dtype)
    if role == "act":
        x = torch.nn.functional.silu(3 * x)
    flat = x.view(-1)
    with torch.no_grad():
        if method in ("lsq", "lsqplus") and role == "act":
            s, b = float(q.step), float(getattr(q, "offset", torch.zeros(1)).reshape(-1)[0] if role == "act" else 0)
            ks = torch.arange(q.qmin - 1, q.qmax + 2, dtype=dtype)
            special = torch.cat([ks * s + b, (ks + 0.5) * s + b, torch.zeros(3, dtype=dtype)])
        elif method == "pact" and role == "act":
            a = float(q.alpha)
            special = torch.tensor([a, -a, 0.0, 2 * a, -2 * a], dtype=dtype)
        elif method == "n2uq" and role == "act":
            special = torch.cat([q.thresholds().to(dtype), torch.zeros(2, dtype=dtype)])
        else:
            special = torch.zeros(4, dtype=dtype)
        flat[: special.numel()] = special
    return x


def forward_backward(q, x, kernel, seed=7):
    with use_qat_kernel(kernel):
        q.zero_grad(set_to_none=True)
        q.clear_weight_cache()
        x = x.clone().requires_grad_(True)
        y = q(x)
        grad_out = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed), dtype=y.dtype)
        (y * grad_out).sum().backward()
    return y.detach(), x.grad, {n: p.grad for n, p in q.named_parameters()}


@pytest.fixture
def spy(monkeypatch):
    """Count the calls of every compiled kernel (so a silent fall-back to the reference path fails the test)."""
    calls = {}
    for name in ("lsq_forward", "lsq_backward", "pact_forward", "pact_backward", "n2uq_forward", "n2uq_backward"):
        fn = getattr(kernels, name)

        def wrapped(*args, _fn=fn, _name=name):
            calls[_name] = calls.get(_name, 0) + 1
            return _fn(*args)

        monkeypatch.setattr(kernels, name, wrapped)
    return calls


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("method,role,bits", CASES)
def test_compiled_matches_reference(method, role, bits, dtype, spy):
    channels = 6 if role == "weight" else 0
    q = make_quantizer(method, role, bits, channels=channels).to(dtype)
    q.init_from(torch.nn.functional.silu(3 * torch.randn(3, 6, 5, 7, dtype=dtype)) if role == "act"
                else torch.randn(6, 4, 3, 3, dtype=dtype) * 0.1)
    x = edge_input(method, role, q, dtype, seed=bits)
    y_ref, dx_ref, g_ref = forward_backward(q, x, "reference")
    assert not spy
    y, dx, grads = forward_backward(q, x, "compiled")
    # Forward values and input gradients are elementwise: identical. Parameter gradients are sums (another order).
    torch.testing.assert_close(y, y_ref, rtol=0, atol=0)
    torch.testing.assert_close(dx, dx_ref, rtol=0, atol=0)
    assert set(grads) == set(g_ref)
    tol = 1e-12 if dtype == torch.float64 else 2e-5
    for name in g_ref:
        scale = g_ref[name].abs().max().clamp_min(1.0)
        torch.testing.assert_close(grads[name] / scale, g_ref[name] / scale, rtol=tol, atol=tol, msg=name)
    fused = {"lsq": "lsq", "lsqplus": "lsq", "pact": "pact", "n2uq": "n2uq"}[method]
    if role == "act" or method in ("lsq", "lsqplus"):  # DoReFa / N2UQ weights have no fused kernel
        assert spy.get(f"{fused}_forward") == 1 and spy.get(f"{fused}_backward") == 1, spy


def test_n2uq_high_bits_stay_on_reference(spy):
    q = make_quantizer("n2uq", "act", kernels.N2UQ_COMPILED_MAX_BITS + 1)
    x = torch.randn(2, 3, 4, 4)
    q.init_from(x)
    forward_backward(q, x, "compiled")
    assert "n2uq_forward" not in spy and "n2uq_backward" not in spy


def test_kernel_selection_and_errors():
    assert kernels.get_qat_kernel() == "auto"
    with use_qat_kernel("reference"):
        assert kernels.kernel_for(torch.zeros(1)) == "reference"
    with use_qat_kernel("compiled"):
        assert kernels.kernel_for(torch.zeros(1)) == "compiled"
    assert kernels.kernel_for(torch.zeros(1)) == "reference"  # auto compiles on CUDA only
    with pytest.raises(ValueError, match="did you mean 'compiled'"):
        kernels.set_qat_kernel("compield")
    from ultralytics_gabfusion.settings import validate_settings

    assert validate_settings({"qat_kernel": "Reference"})["qat_kernel"] == "reference"
    with pytest.raises(ValueError, match="qat_kernel=fast"):
        validate_settings({"qat_kernel": "fast"})


# ------------------------------------------------------------------------------------------------ weight cache
@pytest.mark.parametrize("method", ["lsq", "lsqplus", "pact", "n2uq"])
def test_weight_output_cached_until_weight_changes(method, monkeypatch):
    q = make_quantizer(method, "weight", 4, channels=6)
    w = torch.nn.Parameter(torch.randn(6, 4, 3, 3) * 0.1)
    calls = []
    orig = type(q)._quantize

    def counting(self, x, cdtype, cached=None):
        calls.append(cached is not None)
        return orig(self, x, cdtype, cached=cached) if cached is not None else orig(self, x, cdtype)

    monkeypatch.setattr(type(q), "_quantize", counting)
    with torch.no_grad():
        y1 = q(w)
        y2 = q(w)  # validation batches: the cached output, no recomputation
    assert y2.data_ptr() == y1.data_ptr() and calls == [False]  # the same storage, computed once
    with torch.no_grad():
        w.add_(0.01)  # an optimizer step changes the weight in place (version counter bumped)
        y3 = q(w)
    assert calls == [False, False] and not torch.equal(y3, y1)

    # training micro-batches: the first call computes, later ones replay the cached output with the same gradients
    ga = torch.randn_like(w)
    q.clear_weight_cache()
    calls.clear()
    q(w).mul(ga).sum().backward()
    single = [w.grad.clone()] + [p.grad.clone() for p in q.parameters()]
    w.grad = None
    q.zero_grad(set_to_none=True)
    for _ in range(2):
        q(w).mul(ga).sum().backward()
    assert calls == ([False, True, True] if q.replays_cached else [False, False, False])
    for got, ref in zip([w.grad] + [p.grad for p in q.parameters()], single):
        torch.testing.assert_close(got, 2 * ref)

    # the cache never travels into copies or pickles (EMA deepcopy, checkpoints)
    assert q._wq_cache is not None
    assert copy.deepcopy(q)._wq_cache is None
    assert pickle.loads(pickle.dumps(q))._wq_cache is None


def test_weight_cache_invalidated_by_quantizer_tensors():
    q = make_quantizer("lsq", "weight", 4, channels=6)
    w = torch.randn(6, 4, 3, 3) * 0.1
    with torch.no_grad():
        y1 = q(w)
        q.step.mul_(2)  # the quantizer's own parameter changed (optimizer step on the step size)
        y2 = q(w)
    assert y2.data_ptr() != y1.data_ptr() and not torch.equal(y1, y2)


# ------------------------------------------------------------------------------------------------ ADA teacher
def test_ada_teacher_runs_in_inference_mode():
    from ultralytics.nn.tasks import DetectionModel

    from ultralytics_gabfusion.distill import ADALoss, default_layers

    torch.manual_seed(0)
    student = DetectionModel("yolov5n.yaml", nc=4, verbose=False)
    teacher = copy.deepcopy(student)
    layers = default_layers(student)
    ada = ADALoss(teacher, layers, attn="simam", div="kl", weight=1.0).attach(student)
    img = torch.rand(2, 3, 64, 64)
    feats = ada.teacher_features(img)
    assert all(feats[j].is_inference() for j in layers)  # no autograd bookkeeping for the teacher
    student.train()
    student(img)
    weighted, _ = ada(student, img)
    weighted.backward()  # teacher tensors are only read by the loss: backward works
    assert student.model[layers[0]].cv1.conv.weight.grad is not None
    ada.detach()
