"""LSQ (Esser et al., ICLR 2020) and LSQ+ (Bhalgat et al., CVPRW 2020).

Both share one autograd function, :class:`LSQFakeQuantize`; its ``backward`` is the single place where
the LSQ / LSQ+ gradients (input, step, offset) are computed.

With ``act_zp="integer"`` (``qat_act_zp=integer``) an activation quantizer hands the autograd function the offset
already on a multiple of the step, ``off_int = s*round(off/s)`` (:func:`.quantizers.integer_offset`, computed in
:meth:`_LSQBase._quantize`), so the reference and the compiled kernels run the integer-zero-point grid unchanged;
autograd adds the offset path: ``dy/dbeta`` as above (straight-through), ``dy/ds`` plus ``round(off/s) * dy/doff``.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from . import kernels
from .kernels import CompileFailed, kernel_for
from .quantizers import STEP_EPS, FakeQuantizer, _check_act_zp, integer_offset, positive

__all__ = ["ConvOutputQuantizer", "LSQFakeQuantize", "LSQQuantizer", "LSQPlusQuantizer"]


class LSQFakeQuantize(torch.autograd.Function):
    r"""LSQ / LSQ+ fake quantization with the LSQ gradients.

    With ``v = (x - beta) / s`` (``beta = 0`` for LSQ), ``n = qmin``, ``p = qmax``::

        forward:   y = round(clamp(v, n, p)) * s + beta                      (round half to even)
        inside  := n < v < p        below := v <= n        above := v >= p    (on the unrounded v)
        dy/dx    = 1 inside, 0 otherwise
        dy/ds    = g * (round(v) - v  inside | n below | p above)
        dy/dbeta = g * (0 inside | 1 below or above)

    ``g = 1/sqrt(N*Qp)`` is passed in by the caller. ``s`` and ``beta`` are broadcast along dim 0 when
    per-channel and their gradients are summed to their own shape ``(C,)`` / ``(1,)``.
    Only ``x`` (in its original dtype) is saved; ``v`` is recomputed in backward.
    """

    @staticmethod
    def forward(ctx, x, step, offset, qmin, qmax, grad_scale, per_channel, cdtype, cached=None):
        """Fake-quantize raw ``x`` in ``cdtype``; ``step``/``offset`` are 1-D, already positive / cast.

        ``cached``: this function's earlier output for the same (unchanged) ``x`` and parameters, returned as is.
        """
        ctx.save_for_backward(x, step, offset)
        ctx.conf = (qmin, qmax, grad_scale, per_channel, cdtype)
        ctx.kernel = kernel_for(x)
        if cached is not None:  # weights unchanged since the cached forward: same values, gradients as usual
            return cached.view_as(cached)
        if ctx.kernel == "compiled":
            try:
                return _compiled_forward(x, step, offset, qmin, qmax, per_channel)
            except CompileFailed:
                ctx.kernel = "reference"
        s, b = _views(x, step, offset, per_channel)
        xf = x.to(cdtype)
        v = (xf - b) / s if b is not None else xf / s
        y = torch.round(v.clamp_(qmin, qmax)).mul_(s)
        return y.add_(b) if b is not None else y

    @staticmethod
    def backward(ctx, grad):
        """Return ``(dx, ds, dbeta)`` as in the class docstring (the LSQ gradient lives here)."""
        x, step, offset = ctx.saved_tensors
        qmin, qmax, g, per_channel, cdtype = ctx.conf
        if ctx.kernel == "compiled":
            try:
                dx, ds, db = _compiled_backward(x, grad, step, offset, qmin, qmax, per_channel)
                need = ctx.needs_input_grad
                return (dx if need[0] else None, ds * g if need[1] else None,
                        db * g if offset is not None and need[2] else None, None, None, None, None, None, None)
            except CompileFailed:
                pass
        s, b = _views(x, step, offset, per_channel)
        xf = x.to(cdtype)
        v = (xf - b) / s if b is not None else xf / s
        below, above = v <= qmin, v >= qmax
        outside = below | above
        dx = ds = db = None
        if ctx.needs_input_grad[0]:
            dx = grad.masked_fill(outside, 0).to(x.dtype)
        if ctx.needs_input_grad[1]:
            ds_el = torch.where(below, float(qmin), torch.where(above, float(qmax), torch.round(v) - v))
            ds = _sum_to(ds_el.mul_(grad), per_channel) * g
        if offset is not None and ctx.needs_input_grad[2]:
            db = _sum_to(grad * outside, per_channel) * g
        return dx, ds, db, None, None, None, None, None, None


def _bounds(step, qmin, qmax):
    """``qmin``/``qmax`` as 0-d tensors (runtime values for the compiled kernels: no recompile per bit-width)."""
    return kernels.scalar(qmin, step.dtype, step.device), kernels.scalar(qmax, step.dtype, step.device)


def _compiled_forward(x, step, offset, qmin, qmax, per_channel):
    lo, hi = _bounds(step, qmin, qmax)
    off = offset if offset is not None else torch.zeros_like(step)  # (x - 0)/s and q*s + 0 are exact
    if per_channel:
        y = kernels.run_compiled(kernels.lsq_forward, x.reshape(x.shape[0], -1), step.view(-1, 1), off.view(-1, 1),
                                 lo, hi)
        return y.view(x.shape)
    return kernels.run_compiled(kernels.lsq_forward, kernels.flat(x), step, off, lo, hi).view(x.shape)


def _compiled_backward(x, grad, step, offset, qmin, qmax, per_channel):
    lo, hi = _bounds(step, qmin, qmax)
    off = offset if offset is not None else torch.zeros_like(step)
    if per_channel:
        rows = (x.shape[0], -1)
        dx, ds, db = kernels.run_compiled(kernels.lsq_backward, x.reshape(rows), grad.reshape(rows),
                                          step.view(-1, 1), off.view(-1, 1), lo, hi, True)
        return dx.view(x.shape), ds, db
    dx, ds, db = kernels.run_compiled(kernels.lsq_backward, *kernels.flat(x, grad), step, off, lo, hi, False)
    return dx.view(x.shape), ds, db


def _views(x, step, offset, per_channel):
    """Broadcastable views of the 1-D step/offset against ``x``."""
    if per_channel and x.dim() > 1:
        shape = (-1,) + (1,) * (x.dim() - 1)
        return step.view(shape), (offset.view(shape) if offset is not None else None)
    return step, offset


def _sum_to(t, per_channel):
    if per_channel:
        return t.reshape(t.shape[0], -1).sum(1) if t.dim() > 1 else t
    return t.sum().reshape(1)


class _LSQBase(FakeQuantizer):
    """Shared LSQ/LSQ+ plumbing: the gradient scale and the call into :class:`LSQFakeQuantize`."""

    def grad_scale(self, x: torch.Tensor) -> float:
        """``g = 1/sqrt(N*Qp)``, ``N`` = elements sharing one step, ``Qp = qmax``.

        Per-channel: ``N = numel/channels`` (weights: numel/out_channels). Per-tensor activations:
        ``N = numel/batch`` (``x.shape[0]``); per-tensor weights: ``N = numel``.
        """
        if self.channels:
            n = x.numel() / self.channels
        elif self.role == "act" and x.dim() > 0:
            n = x.numel() / max(x.shape[0], 1)
        else:
            n = x.numel()
        return 1.0 / math.sqrt(max(n, 1.0) * self.qmax)

    def _effective_step(self) -> torch.Tensor:
        return positive(self.step)

    def _offset_or_none(self):
        return None

    replays_cached = True

    def _quantize(self, x, cdtype, cached=None):
        s = self._effective_step().to(cdtype)
        off = self._offset_or_none()
        if off is not None:
            # act_zp="integer": the offset moves onto a multiple of s here, before the autograd function, so both
            # kernels compute the integer-zero-point grid and autograd adds the STE/product-rule offset gradients.
            off = self._zp_offset(off.to(cdtype), s)
        return LSQFakeQuantize.apply(
            x,
            s,
            off,
            self.qmin,
            self.qmax,
            self.grad_scale(x),
            bool(self.channels),
            cdtype,
            cached,
        )

    def step_size(self) -> torch.Tensor:
        """The positive step ``|s|`` (detached), shape ``(channels,)`` or ``(1,)``."""
        return self._effective_step().detach().clone()


class LSQQuantizer(_LSQBase):
    r"""LSQ fake quantizer (weights per output channel, activations per tensor).

    Forward / backward (see :class:`LSQFakeQuantize`), with ``v = x/s``, ``[n, p] = [qmin, qmax]``::

        y     = round(clamp(v, n, p)) * s
        dy/dx = 1 if n < v < p else 0
        dy/ds = g * (round(v) - v if n < v < p;  n if v <= n;  p if v >= p),   g = 1/sqrt(N * p)

    ``s`` is the learnable ``step`` (shape ``(channels,)`` or ``(1,)``), used as ``|step|`` floored at 1e-8.
    With a ``fixed_offset`` ``b`` (activations on an unsigned grid fed by SiLU, see :mod:`.grids`) the forward is
    ``y = round(clamp((x - b)/s, n, p))*s + b``: LSQ+'s arithmetic with a constant, unlearned offset. With
    ``act_zp="integer"`` the offset is ``b_int = s*round(b/s)`` (an integer zero point) and the step gradient gains
    ``round(b/s) * g * (1 if v <= n or v >= p else 0)`` (product rule, see :func:`.quantizers.integer_offset`).

    Init (:meth:`init_from`): ``s = 2*mean(|x|)/sqrt(p)`` per channel (weights) or over the tensor
    (activations), floored at 1e-8 so all-zero inputs give no NaN.
    """

    method = "lsq"

    def __init__(self, role="act", bits=4, channels=0, signed=True, fixed_offset: float = 0.0, act_zp: str = "float"):
        """See :func:`.registry.make_quantizer`; ``fixed_offset`` (activations) shifts the grid by a constant (not
        learned), ``act_zp="integer"`` rounds it to a multiple of the step."""
        super().__init__(role, bits, channels, signed)
        self.step = nn.Parameter(torch.ones(max(self.channels, 1)))
        self.fixed_offset = float(fixed_offset)  # plain attribute: part of the layer's configuration, not its state
        self.act_zp = _check_act_zp(act_zp)  # plain attribute as well (configuration)

    def _offset_or_none(self):
        b = getattr(self, "fixed_offset", 0.0)  # pickles written before the attribute existed have no offset
        return self.step.new_full((1,), b).detach() if b else None

    @torch.no_grad()
    def init_from(self, x):
        """``step = max(2*mean|x - b|/sqrt(qmax), 1e-8)`` (per channel if ``channels > 0``; ``b`` the fixed offset)."""
        self._check_input(x)
        x = x - getattr(self, "fixed_offset", 0.0)
        mean_abs = self._rows(x.detach()).abs().float().mean(1)
        self.step.copy_((2.0 * mean_abs / math.sqrt(self.qmax)).clamp_min(STEP_EPS))
        self._mark_initialized()
        return self

    def grid(self):
        """``scale = |step|``, ``offset = b`` (the fixed offset, usually 0; ``s*round(b/s)`` under
        ``act_zp="integer"``), ``k in [qmin, qmax]``."""
        s = self.step_size()
        return self._grid(s, self._zp_offset(torch.full_like(s, getattr(self, "fixed_offset", 0.0)), s), self.qmin,
                          self.qmax)

    def set_grid_offset(self, offset: float) -> bool:
        """Set the fixed offset ``b`` of an activation grid (weights have none and are left alone)."""
        if self.role != "act" or self.channels:
            return False
        self.fixed_offset = float(offset)
        return True


class LSQPlusQuantizer(_LSQBase):
    r"""LSQ+ fake quantizer: learnable step ``s`` and (activations) learnable float offset ``beta``.

    With ``v = (x - beta)/s`` and ``[n, p] = [qmin, qmax]`` of the module's signedness (the offset makes the
    grid asymmetric anyway; signed activations give the usual ``n = -2^(b-1)``)::

        y        = round(clamp(v, n, p)) * s + beta
        dy/dx    = 1 if n < v < p else 0
        dy/ds    = g * (round(v) - v if n < v < p;  n if v <= n;  p if v >= p)
        dy/dbeta = g * (0 if n < v < p else 1),      g = 1/sqrt(N * p)

    Tensors: ``step`` (parameter) and ``offset`` -- a parameter for activations, a zero non-learnable buffer
    for weights (LSQ+ uses ``beta = 0`` for weights).

    ``act_zp="integer"`` (activations): the forward uses ``beta_int = s*round(beta/s)`` in place of ``beta``, an
    integer zero point; ``dy/dbeta`` stays as above (straight-through rounding), ``dy/ds`` gains
    ``round(beta/s) * dy/dbeta`` (product rule with the rounded integer constant; see
    :func:`.quantizers.integer_offset`).

    Init (:meth:`init_from`):
        * weights, per channel: ``s = max(|mu - 3 sigma|, |mu + 3 sigma|) / 2^(b-1)`` (population std);
        * activations: min-max, ``s = (max - min)/(p - n)``, ``beta = min - n*s`` so the grid spans
          ``[min, max]``.
        ``s`` is floored at 1e-8 (constant or zero inputs).
    """

    method = "lsqplus"

    def __init__(self, role="act", bits=4, channels=0, signed=True, act_zp: str = "float"):
        """See :func:`.registry.make_quantizer`; ``act_zp="integer"`` rounds ``beta`` to a multiple of the step."""
        super().__init__(role, bits, channels, signed)
        self.act_zp = _check_act_zp(act_zp)  # plain attribute: configuration, not state
        c = max(self.channels, 1)
        self.step = nn.Parameter(torch.ones(c))
        if self.role == "act":
            self.offset = nn.Parameter(torch.zeros(c))
        else:
            self.register_buffer("offset", torch.zeros(c))

    def _offset_or_none(self):
        return self.offset if self.role == "act" else None

    @torch.no_grad()
    def init_from(self, x):
        """Weights: mu +- 3 sigma rule; activations: min-max (see class docstring)."""
        self._check_input(x)
        rows = self._rows(x.detach()).float()
        if self.role == "weight":
            mu, sigma = rows.mean(1), rows.std(1, correction=0)
            s = torch.maximum((mu - 3 * sigma).abs(), (mu + 3 * sigma).abs()) / (1 << (self.bits - 1))
            self.step.copy_(s.clamp_min(STEP_EPS))
            self.offset.zero_()
        else:
            lo, hi = rows.amin(1), rows.amax(1)
            s = ((hi - lo) / (self.qmax - self.qmin)).clamp_min(STEP_EPS)
            self.step.copy_(s)
            self.offset.copy_(lo - self.qmin * s)
        self._mark_initialized()
        return self

    def grid(self):
        """``scale = |step|``, ``offset = beta`` (``s*round(beta/s)`` under ``act_zp="integer"``), ``k`` in
        ``[qmin, qmax]``."""
        s = self.step_size()
        return self._grid(s, self._zp_offset(self.offset.detach(), s), self.qmin, self.qmax)

    @torch.no_grad()
    def set_grid_offset(self, offset: float) -> bool:
        """Set the learned activation offset ``beta`` (weights keep ``beta = 0``)."""
        if self.role != "act" or self.channels:
            return False
        self.offset.fill_(float(offset))
        return True


class ConvOutputQuantizer(LSQPlusQuantizer):
    r"""LSQ+ on a convolution's output (BatchNorm folded in, before the activation): ``qat_out_bits``.

    Integer convolution kernels (ONNX Runtime's ``QLinearConv``) requantize their int32 accumulator to the 8-bit type
    of their input; this quantizer is that step in training, so the model learns the grid the kernel writes. It is
    LSQ+'s arithmetic (learned step and offset, gradients in :class:`LSQFakeQuantize`) with an integer zero point that
    always fits the integer type: ``z = -clamp(round(beta/s), -qmax, -qmin)``, so ``z`` lies in ``[qmin, qmax]``
    (``[0, 255]`` for an unsigned 8-bit grid). The initial range always contains 0.

    Args:
        bits (int): Bit-width of the output grid (8: the integer kernels' output type).
        signed (bool): Signed grid; must match the conv's input grid (the kernels' input and output types agree).

    Examples:
        >>> q = ConvOutputQuantizer(8, signed=False)
        >>> _ = q(torch.linspace(-1.0, 3.0, 101))  # initialises from its first input: range [-1, 3]
        >>> g = q.grid()
        >>> round(float(-g["offset"] / g["scale"]))  # the zero point, an integer of the uint8 type
        64
    """

    def __init__(self, bits: int = 8, signed: bool = False):
        """An uninitialised per-tensor output quantizer (it initialises from its first input)."""
        super().__init__("act", bits, 0, signed, act_zp="integer")

    def _zp_offset(self, offset: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
        return integer_offset(offset, step, -self.qmax, -self.qmin)

    @torch.no_grad()
    def init_from(self, x):
        """Min-max over ``x`` widened to contain 0 (the zero point must be one of the grid's integers)."""
        self._check_input(x)
        lo, hi = min(float(x.min()), 0.0), max(float(x.max()), 0.0)
        s = max((hi - lo) / (self.qmax - self.qmin), STEP_EPS)
        self.step.fill_(s)
        self.offset.fill_(lo - self.qmin * s)
        self._mark_initialized()
        return self

