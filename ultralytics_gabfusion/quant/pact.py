"""PACT (Choi et al., 2018) for activations and DoReFa (Zhou et al., 2016) for weights.

``make_quantizer("pact", "act", ...)`` gives a PACT activation quantizer with a learnable clipping level
``alpha``; ``make_quantizer("pact", "weight", ...)`` gives the DoReFa weight quantizer PACT is paired with.
The PACT gradients are computed in :meth:`PACTFakeQuantize.backward`.

With ``act_zp="integer"`` (``qat_act_zp=integer``) the activation grids that have an offset -- the canonical grid
shifted by a fixed SiLU offset, and the signed grid ``[-alpha, alpha]`` -- are computed as canonical PACT on the
input shifted by the offset on a multiple of the step (:meth:`PACTQuantizer._integer_offset`, in the module's
forward), so both kernels run the integer-zero-point grid and autograd supplies the offset's gradient.
"""

from __future__ import annotations

import torch
from torch import nn

from . import kernels
from .kernels import CompileFailed, kernel_for
from .quantizers import STEP_EPS, FakeQuantizer, _check_act_zp, integer_offset, positive, round_ste, row_quantile

__all__ = ["PACTFakeQuantize", "PACTQuantizer"]


class PACTFakeQuantize(torch.autograd.Function):
    r"""PACT fake quantization, canonical (unsigned) or signed, with PACT's STE gradients.

    ``L = 2^b - 1``. Canonical (``signed=False``), ``scale = alpha/L``::

        y        = round(clamp(x, 0, alpha) / scale) * scale
        dy/dx    = 1 if 0 <= x < alpha else 0
        dy/dalpha= 1 if x >= alpha else 0

    Signed (``signed=True``): 2^b levels spanning ``[-alpha, alpha]``, ``scale = 2*alpha/L``::

        y        = round((clamp(x, -alpha, alpha) + alpha) / scale) * scale - alpha
        dy/dx    = 1 if -alpha < x < alpha else 0
        dy/dalpha= 1 if x >= alpha;  -1 if x <= -alpha;  0 otherwise

    (STE: inside the clip the rounding is treated as identity, so alpha gets no gradient there.)
    Only ``x`` is saved.
    """

    @staticmethod
    def forward(ctx, x, alpha, levels, signed, per_channel, cdtype):
        """Fake-quantize raw ``x`` with the positive 1-D ``alpha`` (already in ``cdtype``)."""
        ctx.save_for_backward(x, alpha)
        ctx.conf = (signed, per_channel, cdtype)
        ctx.kernel = kernel_for(x)
        if ctx.kernel == "compiled":
            try:
                lv = kernels.scalar(levels, alpha.dtype, alpha.device)
                if per_channel:
                    y = kernels.run_compiled(kernels.pact_forward, x.reshape(x.shape[0], -1), alpha.view(-1, 1), lv,
                                             signed)
                    return y.view(x.shape)
                return kernels.run_compiled(kernels.pact_forward, kernels.flat(x), alpha, lv, signed).view(x.shape)
            except CompileFailed:
                ctx.kernel = "reference"
        a = _view(x, alpha, per_channel)
        xf = x.to(cdtype)
        if signed:
            scale = 2 * a / levels
            xc = torch.maximum(torch.minimum(xf, a), -a)  # clamp with tensor bounds
            return torch.round((xc + a) / scale) * scale - a
        scale = a / levels
        xc = torch.minimum(xf.clamp(min=0), a)
        return torch.round(xc / scale) * scale

    @staticmethod
    def backward(ctx, grad):
        """``(dx, dalpha)`` as in the class docstring."""
        x, alpha = ctx.saved_tensors
        signed, per_channel, cdtype = ctx.conf
        if ctx.kernel == "compiled":
            try:
                if per_channel:
                    rows = (x.shape[0], -1)
                    dx, da = kernels.run_compiled(kernels.pact_backward, x.reshape(rows), grad.reshape(rows),
                                                  alpha.view(-1, 1), signed, True)
                    dx = dx.view(x.shape)
                else:
                    dx, da = kernels.run_compiled(kernels.pact_backward, *kernels.flat(x, grad), alpha, signed,
                                                  False)
                    dx = dx.view(x.shape)
                need = ctx.needs_input_grad
                return dx if need[0] else None, da if need[1] else None, None, None, None, None
            except CompileFailed:
                pass
        a = _view(x, alpha, per_channel)
        xf = x.to(cdtype)
        above = xf >= a
        below = xf <= -a if signed else xf < 0
        dx = da = None
        if ctx.needs_input_grad[0]:
            dx = grad.masked_fill(above | below, 0).to(x.dtype)
        if ctx.needs_input_grad[1]:
            d = grad * above
            if signed:
                d = d - grad * below
            da = d.reshape(d.shape[0], -1).sum(1) if per_channel and d.dim() > 1 else d.sum().reshape(-1)
        return dx, da, None, None, None, None


def _view(x, p, per_channel):
    return p.view((-1,) + (1,) * (x.dim() - 1)) if per_channel and x.dim() > 1 else p


class PACTQuantizer(FakeQuantizer):
    r"""PACT activation quantizer (``role="act"``) / DoReFa weight quantizer (``role="weight"``).

    **Activations** -- see :class:`PACTFakeQuantize` for the exact forward and gradients. ``signed=False``
    is canonical PACT (``[0, alpha]``, 2^b levels); ``signed=True`` (the factory default, needed for SiLU
    and LayerNorm outputs) clips to ``[-alpha, alpha]`` with 2^b levels ``-alpha + k*2alpha/(2^b-1)``,
    ``k = 0..2^b-1`` (symmetric, hence no exact zero level). A canonical quantizer with ``fixed_offset`` ``b``
    (SiLU-fed inputs, see :mod:`.grids`) computes ``b + PACT(x - b)``: levels ``b + k*alpha/L``, clip ``[b, b+alpha]``. Learnable ``alpha``: shape ``(1,)``
    (or ``(channels,)`` along dim 0), used as ``|alpha|`` floored at 1e-8. PACT regularises alpha with an
    L2 penalty: put it in a weight-decayed optimizer group (``decay_params = ("alpha",)``).

    ``act_zp="integer"`` (integer zero points; :meth:`_integer_offset`), ``s`` the step:

    * canonical grid with a fixed offset ``b``, ``s = alpha/L``: ``b_int = s*round(b/s)``,
      ``y = b_int + PACT(x - b_int)``; alpha's gradient gains ``round(b/s)/L`` per clipped element (product rule);
    * signed grid, ``s = 2*alpha/L``: the offset ``-alpha = -(L/2)*s`` is tied to the step, and round-half-to-even
      of ``L/2`` is ``2^(b-1)`` for every b, so ``off_int = -2^(b-1)*s`` exactly and
      ``y = off_int + PACT(x - off_int)`` with clip level ``2*alpha``: the symmetric signed integer grid
      ``k*s``, ``k in [-2^(b-1), 2^(b-1)-1]`` (zero point 0; clip ``[-alpha - s/2, alpha - s/2]``). alpha's
      gradient: ``2`` per element above the clip, ``-2^b/L`` per element outside it (the chain rule through ``s``).

    Init (:meth:`init_from`): ``alpha`` = the 99.9th percentile (``init_percentile``) of ``|x|`` (signed)
    or of ``max(x, 0)`` (canonical), falling back to the max if that is 0, floored at 1e-8. The percentile
    keeps a few outliers from wasting the 2^b levels.

    **Weights (DoReFa)**, per output channel (per tensor if ``channels == 0``), ``L = 2^b - 1``::

        t   = tanh(w);  M = max|t| (detached);  M_w = max|w| (detached)
        r   = t / (2M) + 1/2                                  in [0, 1]
        w_q = M_w * (2 * round(L*r)/L - 1)                    (DoReFa output scaled back to [-M_w, M_w])
        dw_q/dw = (M_w / M) * (1 - t^2)                       (STE through round; exact through tanh)

    ``M`` and ``M_w`` are treated as constants in backward (like N2UQ's detached scale); ``signed`` is
    ignored (the DoReFa grid is always symmetric). No learnable tensors; the buffer ``w_scale`` (= M_w,
    floored at 1e-8) holds the last forward's scale for :meth:`grid` / :meth:`step_size`.
    """

    method = "pact"
    decay_params = ("alpha",)
    init_percentile = 0.999

    def __init__(self, role="act", bits=4, channels=0, signed=True, fixed_offset: float = 0.0, act_zp: str = "float"):
        """See :func:`.registry.make_quantizer`; ``fixed_offset`` ``b`` (canonical activations):
        ``y = PACT(x - b) + b``; ``act_zp="integer"``: grid offsets on multiples of the step (class docstring)."""
        super().__init__(role, bits, channels, signed)
        c = max(self.channels, 1)
        self.fixed_offset = float(fixed_offset) if not self.signed else 0.0  # plain attribute: configuration
        self.act_zp = _check_act_zp(act_zp)  # plain attribute: configuration
        if self.role == "act":
            self.alpha = nn.Parameter(torch.ones(c))
        else:
            self.decay_params = ()  # DoReFa has no alpha
            self.register_buffer("w_scale", torch.ones(c))

    @property
    def _L(self) -> int:
        return (1 << self.bits) - 1

    # ------------------------------------------------------------------ init
    @torch.no_grad()
    def init_from(self, x):
        """Activations: percentile init of ``alpha``; weights: record ``M_w`` (see class docstring)."""
        self._check_input(x)
        rows = self._rows(x.detach()).float()
        if self.role == "act":
            mag = rows.abs() if self.signed else (rows - getattr(self, "fixed_offset", 0.0)).clamp(min=0)
            a = row_quantile(mag, self.init_percentile)
            a = torch.where(a > 0, a, mag.amax(1))
            self.alpha.copy_(a.clamp_min(STEP_EPS))
        else:
            self.w_scale.copy_(rows.abs().amax(1).clamp_min(STEP_EPS))
        self._mark_initialized()
        return self

    # ------------------------------------------------------------------ forward
    def _quantize(self, x, cdtype, cached=None):
        if self.role == "act":
            alpha = positive(self.alpha).to(cdtype)
            b = getattr(self, "fixed_offset", 0.0)
            if self.integer_zero_point and (b or self.signed):
                # act_zp="integer": canonical PACT (clip level L*s) around the offset on a multiple of s, computed here
                # before the autograd function so both kernels get it; autograd adds the offset's gradient
                off = self._bcast(self._integer_offset(alpha), x)
                span = 2 * alpha if self.signed else alpha
                y = PACTFakeQuantize.apply(x.to(cdtype) - off, span, self._L, False, bool(self.channels), cdtype)
                return y + off
            if b:  # canonical PACT on the shifted input: clip to [b, b + alpha]
                return PACTFakeQuantize.apply(x.to(cdtype) - b, alpha, self._L, False, bool(self.channels), cdtype) + b
            return PACTFakeQuantize.apply(x, alpha, self._L, self.signed, bool(self.channels), cdtype)
        return self._dorefa(x.to(cdtype))

    def _integer_offset(self, alpha: torch.Tensor) -> torch.Tensor:
        """The activation grid offset on a multiple of the step, from ``|alpha|`` (see the class docstring).

        Signed: ``-2^(b-1) * 2*alpha/L`` (the rounding of ``-L/2`` is fixed, so it is not recomputed from floats that
        could land either side of the tie); canonical: ``integer_offset(b, alpha/L)``.
        """
        if self.signed:
            return -(1 << (self.bits - 1)) * (2 * alpha / self._L)
        return integer_offset(torch.full_like(alpha, getattr(self, "fixed_offset", 0.0)), alpha / self._L)

    def _dorefa(self, w):
        L = self._L
        t = torch.tanh(w)
        rows_t = self._rows(t.detach())
        m = self._bcast(rows_t.abs().amax(1).clamp_min(STEP_EPS), w)
        m_w = self._rows(w.detach()).abs().amax(1).clamp_min(STEP_EPS)
        with torch.no_grad():
            self.w_scale.copy_(m_w)
        r = t / (2 * m) + 0.5
        q = round_ste(r * L, 0.0, float(L)) / L
        return self._bcast(m_w, w) * (2 * q - 1)

    # ------------------------------------------------------------------ export
    def step_size(self):
        """Acts: ``alpha/L`` (canonical) or ``2*alpha/L`` (signed); weights: ``2*M_w/L``. Detached."""
        if self.role == "act":
            a = positive(self.alpha).detach()
            return (2 * a if self.signed else a) / self._L
        return 2 * self.w_scale.detach() / self._L

    def grid(self):
        """Acts: canonical ``k*alpha/L``, signed ``-alpha + k*2alpha/L``; weights ``-M_w + k*2M_w/L``.

        ``k`` in ``[0, 2^b-1]`` in every case. The weight grid is the one of the last forward. Under
        ``act_zp="integer"``: canonical ``b_int + k*alpha/L``; signed ``k*2alpha/L``, ``k`` in
        ``[-2^(b-1), 2^(b-1)-1]``.
        """
        s = self.step_size()
        if self.role == "act" and self.integer_zero_point:
            if self.signed:
                h = 1 << (self.bits - 1)
                return self._grid(s, torch.zeros_like(s), -h, h - 1)
            return self._grid(s, self._integer_offset(positive(self.alpha).detach()), 0, self._L)
        if self.role == "act":
            off = -positive(self.alpha).detach() if self.signed else torch.full_like(s, getattr(self, "fixed_offset", 0.0))
        else:
            off = -self.w_scale.detach()
        return self._grid(s, off, 0, self._L)

    def set_grid_offset(self, offset: float) -> bool:
        """Set the fixed offset ``b`` of a canonical activation grid; the signed grid ``[-alpha, alpha]`` cannot move."""
        if self.role != "act" or self.signed or self.channels:
            return False
        self.fixed_offset = float(offset)
        return True
