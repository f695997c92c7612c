"""N2UQ (Liu et al., CVPR 2022): nonuniform-to-uniform quantization.

Activations: learnable nonuniform input thresholds, uniform output levels, generalised straight-through
estimator (:class:`N2UQFakeQuantize`, its ``backward`` is the GSTE). Weights: the paper's uniform
per-channel quantizer with a detached ``mean|W|`` scale (:class:`N2UQWeightFakeQuantize`).

Memory: the reference implementation loops over the 2^b levels with full-size ``torch.where``
temporaries kept for autograd, which exhausts an 80 GB GPU on YOLOv5s at batch 32. Here the forward is a
single ``torch.bucketize`` against the (2^b - 1)-element threshold vector, only ``x`` is saved, and the
backward re-bins ``x`` once, gathers per-bin constants by indexing and reduces parameter gradients with
two ``scatter_add_`` calls over 2^(b+1) bins -- O(numel) memory, independent of the bit-width.
"""

from __future__ import annotations

import torch
from torch import nn

from . import kernels
from .kernels import N2UQ_COMPILED_MAX_BITS, CompileFailed, kernel_for
from .quantizers import STEP_EPS, FakeQuantizer, QuantExportSpec, floor_ste, positive, row_quantile

__all__ = ["N2UQFakeQuantize", "N2UQWeightFakeQuantize", "N2UQQuantizer", "n2uq_boundaries"]

INTERVAL_FLOOR = 1e-3  # the paper's floor on the learned interval lengths a_i


def n2uq_boundaries(start: torch.Tensor, intervals: torch.Tensor):
    """Segment edges ``d`` (L+1,) and thresholds ``T`` (L,) in the ``beta1``-scaled domain.

    ``d_0 = s0``, ``d_i = d_{i-1} + a_i``; ``T_i`` is the midpoint of segment ``i`` (``d_{i-1} + a_i/2``,
    equal to the paper's recursion ``T_i = T_{i-1} + a_i/2 + a_{i+1}/2``). ``cummax`` guards the sort
    order ``bucketize`` needs against float rounding when ``|s0| >> a_i`` (a no-op otherwise).
    """
    d = torch.cat([start.reshape(1), start.reshape(1) + torch.cumsum(intervals, 0)])
    t = d[:-1] + intervals / 2
    return d, torch.cummax(t, 0).values


class N2UQFakeQuantize(torch.autograd.Function):
    r"""N2UQ activation fake quantization with the generalised STE.

    Inputs: ``s0`` (1,), floored intervals ``a`` (L,) with ``L = 2^b - 1``, ``beta1``, ``beta2`` (1,) -- all
    already positive/floored and in the compute dtype. ``Delta = 2/L``.

    Forward::

        x'    = beta1 * x
        d_0   = s0,  d_i = d_{i-1} + a_i,   T_i = d_{i-1} + a_i/2      (i = 1..L, segment midpoints)
        count = #{i : x' > T_i}                                        (x' == T_i does not count)
        y     = count * Delta * beta2

    Backward (generalised STE). On segment ``i`` (``d_{i-1} <= x' < d_i``) the surrogate of ``count*Delta``
    is ``S = (x' - d_{i-1})/a_i * Delta + (i-1)*Delta`` and ``y ~= beta2 * S``; with upstream gradient ``G``::

        dL/dx     = G * beta2 * beta1 * Delta / a_i          (chain through x' = beta1*x)
        dL/dbeta1 = sum G * beta2 * Delta / a_i * x
        dL/da_i   = sum_{seg i} -G * beta2 * Delta * (x' - d_{i-1}) / a_i^2
                    + sum_{seg k > i} -G * beta2 * Delta / a_k    (a_i shifts every later segment)
        dL/ds0    = sum_{all segments k} -G * beta2 * Delta / a_k
        dL/dbeta2 = sum G * count * Delta                    (everywhere: y is linear in beta2)

    All terms except ``dbeta2`` are zero below ``s0`` and at/above ``d_L``.

    Implementation: backward bins ``x'`` once against the merged, sorted boundary vector
    ``[d_0, T_1+, d_1, T_2+, ..., T_L+, d_L]`` (``T+ = nextafter(T, inf)``, so ``x' >= T+`` <=> ``x' > T``,
    consistent with forward). Bin ``j`` lies in segment ``(j+1)//2`` (bins 0 and 2L+1 are outside) and has
    ``count = j//2``. Per-bin constants (1/a, d_{i-1}) are gathered by index; per-bin sums of ``G`` and of
    ``G*(x'-d)/a^2`` come from two 1-D ``scatter_add_`` calls (deterministic on CUDA under
    ``torch.use_deterministic_algorithms``), spread over the leading rows of ``x`` to avoid atomic
    contention on 2L+2 addresses; the rest is arithmetic on 2L+2 numbers.
    """

    @staticmethod
    def forward(ctx, x, start, intervals, beta1, beta2, cdtype):
        """Fake-quantize raw ``x``; returns ``count*Delta*beta2`` in ``cdtype``."""
        ctx.save_for_backward(x, start, intervals, beta1, beta2)
        ctx.cdtype = cdtype
        delta = 2.0 / intervals.numel()
        _, thr = n2uq_boundaries(start, intervals)
        ctx.kernel = kernel_for(x) if intervals.numel() < (1 << N2UQ_COMPILED_MAX_BITS) else "reference"
        if ctx.kernel == "compiled":
            try:
                return kernels.run_compiled(kernels.n2uq_forward, x, thr, beta1, beta2 * delta)
            except CompileFailed:
                ctx.kernel = "reference"
        xs = x.to(cdtype) * beta1
        count = torch.bucketize(xs.contiguous(), thr, right=False, out_int32=True)  # = #{T < x'}
        del xs
        return count.to(cdtype).mul_(beta2 * delta)

    @staticmethod
    def backward(ctx, grad):
        """Generalised STE, see the class docstring."""
        x, start, intervals, beta1, beta2 = ctx.saved_tensors
        cdtype = ctx.cdtype
        L = intervals.numel()
        delta = 2.0 / L
        d, thr = n2uq_boundaries(start, intervals)
        thr_plus = torch.nextafter(thr, torch.full_like(thr, float("inf")))
        merged = torch.stack([thr_plus, d[1:]], 1).reshape(-1)  # T1+, d1, T2+, d2, ...
        merged = torch.cummax(torch.cat([d[:1], merged]), 0).values  # sorted, length 2L+1

        # Per-bin tables (length 2L+2): bin j is in segment (j+1)//2; bins 0 and 2L+1 are outside.
        nb = 2 * L + 2
        inv_a = torch.zeros(nb, dtype=cdtype, device=x.device)
        inv_a[1:-1] = (1.0 / intervals).repeat_interleave(2)
        seg_start = torch.zeros(nb, dtype=cdtype, device=x.device)
        seg_start[1:-1] = d[:-1].repeat_interleave(2)
        count = torch.arange(nb, device=x.device, dtype=cdtype).div_(2).floor_()
        g = grad.reshape(-1)
        bscale = beta2 * delta  # 1-element tensor
        need = ctx.needs_input_grad

        elementwise = None
        if ctx.kernel == "compiled":  # the same per-element quantities as below, in one fused pass
            try:
                j, w, r = kernels.run_compiled(kernels.n2uq_backward, x.reshape(-1), g, merged, inv_a, seg_start,
                                                   beta1)
                j = j.long()  # scatter_add_ indices
                dx = (w * (beta1 * bscale)).reshape(x.shape).to(x.dtype) if need[0] else None
                dbeta1 = (torch.dot(w, x.reshape(-1).to(cdtype)) * bscale).reshape(1) if need[3] else None
                elementwise = dx, dbeta1, r
                del w
            except CompileFailed:
                pass
        if elementwise is None:
            xf = x.to(cdtype).reshape(-1)
            xs = xf * beta1
            j = torch.bucketize(xs.contiguous(), merged, right=True)  # #{boundaries <= x'} in [0, 2L+1] (int64)
            w = g * inv_a[j]  # G / a_i on segments, 0 outside
            dx = (w * (beta1 * bscale)).reshape(x.shape).to(x.dtype) if need[0] else None
            dbeta1 = (torch.dot(w, xf) * bscale).reshape(1) if need[3] else None
            # G*(x'-d_{i-1})/a_i^2 per element, for da_i's own-segment term (reuses w's memory)
            r = w.mul_((xs - seg_start[j]).mul_(inv_a[j])) if need[2] else None
            del w, xs

        ds0 = da = dbeta2 = None
        if need[1] or need[2] or need[4]:
            # Spread the histogram over `rows` copies (one per leading (batch, channel) row of x) so that
            # millions of GPU atomic adds do not all contend for the same 2L+2 addresses; the copies are
            # summed afterwards. In place on j (its bin values are no longer needed): no extra full-size tensor.
            rows = _histogram_rows(x.shape, nb)
            if rows > 1:
                j.view(rows, -1).add_(torch.arange(0, rows * nb, nb, device=x.device).unsqueeze(1))

            def per_bin(src):
                out = torch.zeros(rows * nb, dtype=cdtype, device=x.device).scatter_add_(0, j, src)
                return out.view(rows, nb).sum(0)

            sum_g = per_bin(g)
            if need[4]:
                dbeta2 = (torch.dot(sum_g, count) * delta).reshape(1)
            # U_k = sum_{seg k} G*beta2*Delta/a_k  (the -dL/ds0 contribution of segment k)
            u = (sum_g * inv_a)[1:-1].view(L, 2).sum(1) * bscale
            if need[1]:
                ds0 = -u.sum().reshape(1)
            if need[2]:
                own = per_bin(r)[1:-1].view(L, 2).sum(1)
                later = u.flip(0).cumsum(0).flip(0) - u  # sum_{k > i} U_k
                da = -(own * bscale) - later
        return dx, ds0, da, dbeta1, dbeta2, None


def _histogram_rows(shape, bins, max_cells=1 << 21):
    """How many leading rows of ``x`` (dim 0, or dims 0 and 1) the backward histogram is spread over.

    Returns 1 (no spreading) for 1-D inputs or when ``rows * bins`` would exceed ``max_cells``.
    """
    rows = shape[0] if len(shape) >= 2 else 1
    if len(shape) >= 3 and rows * shape[1] * bins <= max_cells:
        rows *= shape[1]
    return rows if 1 < rows and rows * bins <= max_cells else 1


class N2UQWeightFakeQuantize(torch.autograd.Function):
    r"""N2UQ weight fake quantization, ``L = 2^b - 1``, ``SF`` detached::

        W' = clip(W/SF, -1, 1);  q = round((W'+1)*L/2) * 2/L - 1;  y = SF*q
        backward ("ste"):       dy/dW = 1            (identity onto W/SF, scaled back by SF)
        backward ("reference"): dy/dW = 1/SF         (the official code: y.detach() - W/SF detach + W/SF)

    In both modes the gradient also passes outside the clip, as in the official code.
    """

    @staticmethod
    def forward(ctx, w, sf, levels, grad_mode, cached=None):
        """``sf`` is broadcastable against ``w`` and positive; ``cached``: the earlier output for the same ``w``."""
        ctx.grad_mode = grad_mode
        if grad_mode == "reference":
            ctx.save_for_backward(sf)
        if cached is not None:
            return cached.view_as(cached)
        half = levels / 2.0
        q = torch.round((w / sf).clamp_(-1.0, 1.0).add_(1.0).mul_(half)).div_(half).sub_(1.0)
        return q.mul_(sf)

    @staticmethod
    def backward(ctx, grad):  # noqa: D102
        if ctx.grad_mode == "reference":
            (sf,) = ctx.saved_tensors
            return grad / sf, None, None, None, None
        return grad, None, None, None, None


class N2UQQuantizer(FakeQuantizer):
    r"""N2UQ quantizer: nonuniform thresholds for activations, uniform grid for weights.

    **Activations** (``role="act"``, per tensor only): see :class:`N2UQFakeQuantize` for the exact
    forward/backward. Learnable ``start`` (s0, (1,)), ``intervals`` (a, (2^b-1,)), ``scale_in`` (beta1, (1,)),
    ``scale_out`` (beta2, (1,)). In forward ``a`` is floored at 1e-3 with a straight-through gradient,
    ``beta1``/``beta2`` are used as ``|.|`` floored at 1e-8. Output levels are ``k*Delta*beta2``,
    ``k = 0..2^b-1`` (unsigned; ``signed`` is ignored). Thresholds: :meth:`thresholds`. The reference
    trains these parameters at lr/10.

    Init (:meth:`init_from`), from ``lo``/``hi`` = the 0.1th/99.9th percentiles (``init_percentile``;
    set it to 1.0 for min/max) of the calibration input, negative SiLU/LN values included:
    ``span = max(hi - lo, 1e-4*max(|lo|,|hi|), 1e-8)``, ``beta1 = 2/span``, ``a_i = Delta = 2/(2^b-1)``,
    ``s0 = beta1*lo``, ``beta2 = 1/beta1``. The segments then tile ``[lo, hi]`` uniformly (total length 2 in
    the scaled domain) and the output levels are ``k*span/(2^b-1)``: the input's scale, shifted so that
    ``lo`` maps to 0 (N2UQ has no output offset).

    **Weights** (``role="weight"``): see :class:`N2UQWeightFakeQuantize`;
    ``SF = (2^b-1)/2^(b-1) * mean|W|`` per output channel (per tensor if ``channels == 0``), detached,
    floored at 1e-8. Output ``-SF + k*2SF/(2^b-1)``, ``k = 0..2^b-1``. Gradient: ``weight_grad="ste"``
    (default) gives ``dy/dW = 1`` everywhere (inside and outside the clip); ``"reference"`` reproduces the
    official code's ``1/SF`` (a ~1/(2 mean|W|) gradient amplification that SGD recipes do not expect).
    No learnable tensors; the buffer ``w_scale`` holds the last forward's SF for :meth:`grid`. The buffer
    ``w_gain`` (per channel, 1 = the paper's scale) multiplies SF; the MSE init (:mod:`.init`) sets it so that
    channels with outlying weights are not clipped: ``SF = w_gain * (2^b-1)/2^(b-1) * mean|W|``.
    """

    method = "n2uq"
    init_percentile = 0.999

    def __init__(self, role="act", bits=4, channels=0, signed=True, weight_grad: str = "ste"):
        """See :func:`.registry.make_quantizer`; ``weight_grad`` is ``"ste"`` or ``"reference"`` (weights only)."""
        super().__init__(role, bits, channels, signed)
        if weight_grad not in ("ste", "reference"):
            raise ValueError(f"weight_grad must be 'ste' or 'reference', got {weight_grad!r}")
        self.weight_grad = weight_grad
        L = self._L
        if self.role == "act":
            if self.channels:
                raise ValueError(
                    "N2UQ activation quantizers are per-tensor only: use channels=0 "
                    f"(got channels={self.channels})"
                )
            self.start = nn.Parameter(torch.full((1,), -1.0))
            self.intervals = nn.Parameter(torch.full((L,), 2.0 / L))
            self.scale_in = nn.Parameter(torch.ones(1))
            self.scale_out = nn.Parameter(torch.ones(1))
        else:
            self.register_buffer("w_scale", torch.ones(max(self.channels, 1)))
            self.register_buffer("w_gain", torch.ones(max(self.channels, 1)))

    def extra_repr(self) -> str:  # noqa: D102
        s = super().extra_repr()
        return s + f", weight_grad={self.weight_grad!r}" if self.role == "weight" else s

    @property
    def _L(self) -> int:
        return (1 << self.bits) - 1

    @property
    def delta(self) -> float:
        """Output level spacing before ``beta2``: ``2/(2^b-1)``."""
        return 2.0 / self._L

    # ------------------------------------------------------------------ init
    @torch.no_grad()
    def init_from(self, x):
        """Activations: percentile-range init (class docstring); weights: record ``SF``."""
        self._check_input(x)
        if self.role == "act":
            flat = x.detach().reshape(1, -1).float()
            lo = row_quantile(flat, 1.0 - self.init_percentile)[0]
            hi = row_quantile(flat, self.init_percentile)[0]
            span = torch.maximum(hi - lo, 1e-4 * torch.maximum(lo.abs(), hi.abs())).clamp_min(STEP_EPS)
            beta1 = 2.0 / span
            self.scale_in.fill_(beta1)
            self.scale_out.fill_(1.0 / beta1)
            self.start.fill_(beta1 * lo)
            self.intervals.fill_(self.delta)
        else:
            self.w_gain.fill_(1.0)  # the paper's scale; qat_init=mse rescales it afterwards
            self.w_scale.copy_(self._sf(x.detach().float()))
        self._mark_initialized()
        return self

    def _sf(self, w):
        gamma = self._L / (1 << (self.bits - 1))
        gain = getattr(self, "w_gain", None)  # absent in modules pickled before it existed (= 1)
        sf = gamma * self._rows(w).abs().mean(1)
        return (sf * gain.to(sf.dtype) if gain is not None else sf).clamp_min(STEP_EPS)

    # ------------------------------------------------------------------ forward
    def _act_params(self, cdtype):
        return (
            self.start.to(cdtype),
            floor_ste(self.intervals, INTERVAL_FLOOR).to(cdtype),
            positive(self.scale_in).to(cdtype),
            positive(self.scale_out).to(cdtype),
        )

    replays_cached = True

    def _quantize(self, x, cdtype, cached=None):
        if self.role == "act":
            s0, a, b1, b2 = self._act_params(cdtype)
            return N2UQFakeQuantize.apply(x, s0, a, b1, b2, cdtype)
        w = x.to(cdtype)
        if cached is not None:  # weight unchanged: w_scale already holds its SF
            sf = self.w_scale.to(cdtype)
        else:
            sf = self._sf(w.detach())
            with torch.no_grad():
                self.w_scale.copy_(sf)
        return N2UQWeightFakeQuantize.apply(w, self._bcast(sf, w), self._L, self.weight_grad, cached)

    # ------------------------------------------------------------------ export
    @torch.no_grad()
    def thresholds(self) -> torch.Tensor:
        """Activations: the 2^b-1 input-domain thresholds ``T_i / beta1`` (increasing, detached).

        The forward output is ``count * Delta * beta2`` with ``count = sum_i (x > T_i)``: an input exactly
        at a threshold does not exceed it. (The forward compares ``beta1*x > T_i``; dividing by ``beta1``
        can move a threshold by one ulp, which only matters for inputs within an ulp of it.)
        """
        if self.role != "act":
            raise ValueError("thresholds() exists for N2UQ activation quantizers only (role='act')")
        s0, a, b1, _ = self._act_params(self.start.dtype)
        return n2uq_boundaries(s0, a)[1] / b1

    @torch.no_grad()
    def step_size(self):
        """Acts: mean input-domain interval ``mean(a)/beta1``; weights: grid spacing ``2*SF/(2^b-1)``."""
        if self.role == "act":
            _, a, b1, _ = self._act_params(self.start.dtype)
            return (a.mean() / b1).reshape(1)
        return 2 * self.w_scale.detach().clone() / self._L

    @torch.no_grad()
    def grid(self):
        """Output grid. Acts: ``k*Delta*beta2``, offset 0; weights: ``-SF + k*2SF/L``. ``k in [0, 2^b-1]``."""
        if self.role == "act":
            s = (positive(self.scale_out) * self.delta).reshape(1)
            return self._grid(s, torch.zeros_like(s), 0, self._L)
        return self._grid(2 * self.w_scale / self._L, -self.w_scale, 0, self._L)

    @torch.no_grad()
    def export_spec(self, dtype: torch.dtype = torch.float32) -> QuantExportSpec:
        """Weights: the uniform grid. Activations: the nonuniform thresholds, as the forward evaluates them.

        Args:
            dtype (torch.dtype): compute dtype of the parameters (the forward's ``cdtype``) and of the tensors.

        Returns:
            (QuantExportSpec): for activations ``kind="nonuniform"``: ``input_scale = beta1``, ``thresholds`` the
            2^b-1 segment midpoints in the ``beta1``-scaled domain, ``scale = beta2*Delta``, offset 0, count in
            ``[0, 2^b-1]``.
        """
        if self.role != "act":
            return super().export_spec(dtype)
        s0, a, b1, b2 = self._act_params(dtype)
        _, thr = n2uq_boundaries(s0, a)
        scale = (b2 * self.delta).reshape(1)  # exactly the forward's `beta2 * delta`
        return QuantExportSpec(kind="nonuniform", bits=self.bits, scale=scale, offset=torch.zeros_like(scale), qmin=0,
                               qmax=self._L, axis=None, input_scale=b1.reshape(1), thresholds=thr)
