"""Fake-quant kernels: which implementation the quantizers' autograd functions run (``qat_kernel``).

Two implementations of the same arithmetic (the conventions of :mod:`.quantizers`):

* ``reference`` -- the plain PyTorch code inside each autograd function (``LSQFakeQuantize`` ...): easy to read,
  one PyTorch op per formula term, so every term is a separate pass over the tensor with its own temporaries.
* ``compiled`` -- the same formulas written once more below as whole-tensor functions and compiled with
  ``torch.compile`` (Inductor: C++/OpenMP on CPU, Triton on CUDA), so a fake-quant costs about one read and one
  write of the tensor in forward, and one pass (reading the input and the upstream gradient, writing the input
  gradient and reducing the parameter gradients) in backward. Forward saves only the input, as the reference does.

``auto`` (the default) picks ``compiled`` where it compiles (a C++ compiler on CPU, Triton on CUDA) and
``reference`` otherwise; a compile failure falls back to ``reference`` with one warning. The selection is
process-wide (``set_qat_kernel``, or the ``qat_kernel`` training key) and never stored in checkpoints.

Both paths give the same forward values and gradients (tests compare them in float64); sums of parameter gradients
may differ in the last bits because the compiled reductions add in another order.

Compile cost: the first call of each function compiles it (tens of seconds on 2 CPU cores, seconds on a GPU
machine); Inductor caches the result on disk, so later processes reuse it. Shapes are dynamic (one kernel per
function, per-tensor/per-channel layout and dtype), bit-widths are runtime tensors (no recompile per width).

N2UQ's compiled activation kernel unrolls its comparisons against the 2^b-1 thresholds; above
``N2UQ_COMPILED_MAX_BITS`` bits that stops paying off and those quantizers keep the reference path.

Examples:
    >>> from ultralytics_gabfusion.quant.kernels import set_qat_kernel, use_qat_kernel
    >>> set_qat_kernel("reference")
    'reference'
    >>> with use_qat_kernel("auto"):
    ...     pass
"""

from __future__ import annotations

import contextlib
import difflib
import functools
import shutil

import torch
from ultralytics.utils import LOGGER

from ..settings import QAT_KERNELS  # the one list, validated there

__all__ = [
    "QAT_KERNELS",
    "N2UQ_COMPILED_MAX_BITS",
    "set_qat_kernel",
    "get_qat_kernel",
    "use_qat_kernel",
    "kernel_for",
    "compiled_available",
]

N2UQ_COMPILED_MAX_BITS = 5  # 31 thresholds unrolled; 6-8 bits (the 8-bit ends) stay on the reference path

_state = {"kernel": "auto", "failed": False}


def _check_kernel(name) -> str:
    s = str(name).strip().lower()
    if s not in QAT_KERNELS:
        close = difflib.get_close_matches(s, QAT_KERNELS, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"unknown qat_kernel {name!r}{hint}; allowed: {', '.join(QAT_KERNELS)}")
    return s


def set_qat_kernel(name: str) -> str:
    """Select the fake-quant implementation for this process: ``auto``, ``reference`` or ``compiled``.

    Returns:
        str: the normalised name.

    Examples:
        >>> set_qat_kernel("compiled")
        'compiled'
        >>> set_qat_kernel("auto")
        'auto'
    """
    _state["kernel"] = _check_kernel(name)
    return _state["kernel"]


def get_qat_kernel() -> str:
    """The selected kernel name (``auto`` unless changed)."""
    return _state["kernel"]


@contextlib.contextmanager
def use_qat_kernel(name: str):
    """Context manager selecting ``name`` inside the block and restoring the previous choice afterwards."""
    prev = _state["kernel"]
    set_qat_kernel(name)
    try:
        yield
    finally:
        _state["kernel"] = prev


@functools.lru_cache(maxsize=None)
def compiled_available(device_type: str) -> bool:
    """Whether ``torch.compile`` can generate kernels on ``device_type`` (C++ compiler on CPU, Triton on CUDA)."""
    if not hasattr(torch, "compile"):
        return False
    if device_type == "cpu":
        return any(shutil.which(c) for c in ("g++", "c++", "clang++"))
    if device_type == "cuda":
        try:
            import triton  # noqa: F401
        except ImportError:
            return False
        return True
    return False


def kernel_for(x: torch.Tensor) -> str:
    """The implementation to run for input ``x``: ``"reference"`` or ``"compiled"``.

    ``auto`` is ``compiled`` on CUDA (Triton) and ``reference`` elsewhere. ``compiled`` needs a device it can
    compile for; the selection ``compiled`` on a device without one falls back to ``reference``, and so does any input while TorchDynamo is already tracing (a user's own
    ``torch.compile`` of the model traces the reference code instead of nesting compilations).
    """
    k = _state["kernel"]
    if k == "reference" or _state["failed"] or not compiled_available(x.device.type):
        return "reference"
    if k == "auto" and x.device.type != "cuda":
        # On CPU the first step of every process compiles C++ kernels for minutes on a small machine, more than
        # the ~0.3 x FP per step they save in a short run: CPU users ask for them with qat_kernel=compiled.
        return "reference"
    if torch.compiler.is_compiling():
        return "reference"
    return "compiled"


def _compile(fn):
    """Compile ``fn`` lazily with dynamic shapes.

    Inputs are detached first: the kernels are called inside autograd functions, and TorchDynamo would otherwise
    compile one variant per ``requires_grad`` pattern. Should a new variant still exceed TorchDynamo's recompile
    limit, that call runs ``fn`` eagerly (the same formulas, unfused) instead of failing.
    """
    compiled = None

    @functools.wraps(fn)
    def call(*args):
        nonlocal compiled
        if compiled is None:
            compiled = torch.compile(fn, dynamic=True, fullgraph=True)
        args = tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args)
        try:
            return compiled(*args)
        except Exception as e:
            if type(e).__name__ != "FailOnRecompileLimitHit":
                raise
            return fn(*args)

    return call


@functools.lru_cache(maxsize=256)
def scalar(value: float, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A cached 0-d tensor holding ``value`` (kernel constants such as grid bounds; never written to)."""
    with torch.inference_mode(False):
        return torch.tensor(float(value), dtype=dtype, device=device)


def flat(*ts: torch.Tensor):
    """The same-shaped tensors ``ts`` as 1-D views when all are contiguous (one compiled variant for every rank).

    Otherwise (channels_last on CUDA) they are returned as they are: flattening would cost a copy, and the kernel's
    elementwise output keeps their shape, so ``.view(shape)`` of it works either way. One tensor in, one out.
    """
    out = tuple(t.view(-1) for t in ts) if all(t.is_contiguous() for t in ts) else ts
    return out[0] if len(ts) == 1 else out


class CompileFailed(RuntimeError):
    """Raised by :func:`run_compiled` after a compile error (callers then run the reference path)."""


def run_compiled(fn, *args):
    """Run a compiled kernel; on failure disable compiled kernels for the process and raise :class:`CompileFailed`."""
    try:
        return fn(*args)
    except Exception as e:  # compiler missing at run time, unsupported op, ...: correctness first
        _state["failed"] = True

        LOGGER.warning(f"qat_kernel: compiled fake-quant kernels failed ({type(e).__name__}: {str(e)[:200]}); "
                       f"using the reference kernels for the rest of this process.")
        raise CompileFailed(str(e)) from e


# ----------------------------------------------------------------------------------------------------------
# The compiled formulas. Every function mirrors the reference code of its autograd function line by line; the
# per-channel ones take x as (C, K) rows and 1-D parameters viewed as (C, 1).
# ----------------------------------------------------------------------------------------------------------
@_compile
def lsq_forward(x, step, offset, qmin, qmax):
    """LSQ/LSQ+ forward: ``round(clamp((x - beta)/s, qmin, qmax)) * s + beta`` in ``step``'s dtype."""
    v = (x.to(step.dtype) - offset) / step
    return torch.round(torch.clamp(v, qmin, qmax)) * step + offset


@_compile
def lsq_backward(x, grad, step, offset, qmin, qmax, per_channel: bool):
    """LSQ/LSQ+ backward: ``dx`` (x's dtype) and the unscaled per-row sums of the step and offset gradients."""
    v = (x.to(step.dtype) - offset) / step
    below, above = v <= qmin, v >= qmax
    outside = below | above
    dx = torch.where(outside, 0.0, grad).to(x.dtype)
    ds_el = torch.where(below, qmin, torch.where(above, qmax, torch.round(v) - v))
    g = grad.to(step.dtype)
    if per_channel:
        return dx, (g * ds_el).sum(1), (g * outside).sum(1)
    return dx, (g * ds_el).sum().reshape(1), (g * outside).sum().reshape(1)


@_compile
def pact_forward(x, alpha, levels, signed: bool):
    """PACT forward (canonical ``[0, alpha]`` or signed ``[-alpha, alpha]``), in ``alpha``'s dtype."""
    xf = x.to(alpha.dtype)
    if signed:
        scale = 2 * alpha / levels
        xc = torch.maximum(torch.minimum(xf, alpha), -alpha)
        return torch.round((xc + alpha) / scale) * scale - alpha
    scale = alpha / levels
    xc = torch.minimum(xf.clamp(min=0), alpha)
    return torch.round(xc / scale) * scale


@_compile
def pact_backward(x, grad, alpha, signed: bool, per_channel: bool):
    """PACT backward: ``dx`` (x's dtype) and the per-row alpha gradient."""
    xf = x.to(alpha.dtype)
    above = xf >= alpha
    below = xf <= -alpha if signed else xf < 0
    dx = torch.where(above | below, 0.0, grad).to(x.dtype)
    g = grad.to(alpha.dtype)
    d = torch.where(above, g, 0.0)
    if signed:
        d = d - torch.where(below, g, 0.0)
    if per_channel:
        return dx, d.sum(1)
    return dx, d.sum().reshape(1)


@_compile
def n2uq_forward(x, thresholds, beta1, level):
    """N2UQ forward: ``#{i: beta1*x > T_i} * level`` (``level = Delta*beta2``), comparisons unrolled."""
    xs = x.to(beta1.dtype) * beta1
    count = (xs > thresholds[0]).to(beta1.dtype)
    for i in range(1, thresholds.shape[0]):
        count = count + (xs > thresholds[i]).to(beta1.dtype)
    return count * level


@_compile
def n2uq_backward(x, grad, merged, inv_a, seg_start, beta1):
    """N2UQ generalised-STE backward, elementwise part (see ``N2UQFakeQuantize``).

    Bins ``beta1*x`` against the merged boundaries by an unrolled select chain (no gathers) and returns the bin
    index ``j`` (int32; the caller widens it for ``scatter_add_``), ``w = G/a_i`` (0 outside the segments) and
    ``r = w*(x'-d_{i-1})/a_i``.
    """
    xf = x.to(beta1.dtype)
    xs = xf * beta1
    m = xs >= merged[0]
    j = m.to(torch.int32)  # int32: int64 arithmetic here is not vectorised by Inductor's C++ backend (~40x slower)
    ia = torch.where(m, inv_a[1], inv_a[0])
    d = torch.where(m, seg_start[1], seg_start[0])
    for k in range(1, merged.shape[0]):
        m = xs >= merged[k]
        j = j + m.to(torch.int32)
        ia = torch.where(m, inv_a[k + 1], ia)
        d = torch.where(m, seg_start[k + 1], d)
    w = grad.to(beta1.dtype) * ia
    r = w * ((xs - d) * ia)
    return j, w, r
