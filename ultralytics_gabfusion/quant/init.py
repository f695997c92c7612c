"""Quantizer initialisation modes: the published inits (``qat_init=paper``) and their MSE refinement (``mse``).

Every method's published init derives its range from simple statistics: LSQ ``2 mean|x| / sqrt(Qp)``, LSQ+
``mu +- 3 sigma`` (weights) and min-max (activations), PACT the 99.9th percentile of ``|x|``, N2UQ ``mean|W|``
(weights) and the 0.1-99.9th percentile span (activations). On a trained detector these ranges are wrong in both
directions: trained weights reach 7x their ``3 sigma`` in some channels (LSQ+ and N2UQ clip them), and at 8 bits
LSQ's step is ~10x too coarse. ``qat_init=mse`` keeps each published init as the starting point and rescales the
quantizer's *range* by the factor that minimises the quantization MSE of its own forward on the tensor it was
initialised from (per channel for weights). Only the starting values change; each method's forward and gradients
are the published ones (N2UQ weights gain a per-channel constant ``w_gain`` on their ``mean|W|`` scale, 1 under
``paper``).

What the range factor ``c`` scales, per method:

* LSQ, LSQ+ weights: the step ``s``;
* LSQ+ activations: the step, keeping the centre of the grid ``beta + s (qmin+qmax)/2`` in place;
* PACT activations: ``alpha``; DoReFa weights have no range parameter (``max|W|``, no clipping) and stay as
  published;
* N2UQ activations: the input span around its centre (``beta1 /= c``, ``beta2 *= c``, ``s0`` moved so the centre
  stays); the error is measured after removing its mean, which the conv's ``input_shift`` absorbs;
* N2UQ weights: ``w_gain`` (the scale is ``w_gain * (2^b-1)/2^(b-1) * mean|W|``).

The search is coarse-to-fine over ``c``: 11 points from x0.03 to x10 (x1.78 apart), then 9 points from x0.75 to
x1.33 around the best (20 quantizer forwards per tensor).

Integer zero points (``qat_act_zp=integer``): the search runs the quantizer's own forward, so every candidate range
is scored with its offset already on a multiple of the step. Afterwards :func:`choose_zero_point` compares the two
multiples around the offset, ``s*floor(off/s)`` and ``s*ceil(off/s)``, and keeps the one with the lower quantization
error on the same tensor (the nearest one, which the forward would round to anyway, unless the other costs less).

Examples:
    >>> import torch
    >>> from ultralytics_gabfusion.quant import make_quantizer
    >>> from ultralytics_gabfusion.quant.init import refine_mse
    >>> w = torch.randn(8, 4, 3, 3)
    >>> w[0, 0, 0, 0] = 20.0  # an outlier the paper init of LSQ+ clips
    >>> q = make_quantizer("lsqplus", "weight", 8, channels=8).init_from(w)
    >>> before = float((q(w) - w).square().sum())
    >>> refine_mse(q, w)
    True
    >>> float((q(w) - w).square().sum()) < before
    True
"""

from __future__ import annotations

import math

import torch

from .quantizers import STEP_EPS, FakeQuantizer, positive

__all__ = ["INIT_MODES", "refine_mse", "quant_error", "choose_zero_point"]

INIT_MODES = ("mse", "paper")
_MSE_COARSE = torch.logspace(-1.5, 1.0, 11)  # range x 0.03 .. x 10 around the published init (x1.78 apart)
_MSE_FINE = torch.logspace(-0.125, 0.125, 9)  # then x0.75 .. x1.33 around the best coarse point
_MSE_MAX_SAMPLES = 1 << 16  # per-tensor inputs are subsampled for the search


def check_init_mode(init: str) -> str:
    """Return ``init`` if it is a known mode, else raise a one-line ``ValueError`` naming the allowed ones."""
    if init not in INIT_MODES:
        raise ValueError(f"init={init!r} is not a quantizer init mode: use one of {', '.join(INIT_MODES)}.")
    return init


def _range_setter(q: FakeQuantizer):
    """Return ``set(c)`` that scales ``q``'s range by the per-row factors ``c`` from its current state, or None.

    ``c`` has one entry per quantizer row (channels, or 1 per tensor); ``set(ones)`` restores the current state.
    """
    if q.method in ("lsq", "lsqplus"):
        s0 = positive(q.step).detach().clone()
        if q.method == "lsqplus" and q.role == "act":
            mid = (q.qmin + q.qmax) / 2.0
            centre = q.offset.detach() + mid * s0

            def set_lsqplus_act(c):
                q.step.copy_(s0 * c)
                q.offset.copy_(centre - mid * s0 * c)

            return set_lsqplus_act
        return lambda c: q.step.copy_((s0 * c).clamp_min(STEP_EPS))
    if q.method == "pact" and q.role == "act":
        a0 = positive(q.alpha).detach().clone()
        return lambda c: q.alpha.copy_((a0 * c).clamp_min(STEP_EPS))
    if q.method == "n2uq" and q.role == "act":
        b1, b2, st = positive(q.scale_in).detach().clone(), positive(q.scale_out).detach().clone(), q.start.detach().clone()
        span = q.intervals.detach().clamp_min(0).sum()  # scaled-domain length of all segments
        centre = (st + span / 2) / b1  # input-domain centre of the segments

        def set_n2uq_act(c):
            nb1 = b1 / c
            q.scale_in.copy_(nb1)
            q.scale_out.copy_(b2 * c)
            q.start.copy_(centre * nb1 - span / 2)

        return set_n2uq_act
    if q.method == "n2uq" and q.role == "weight":
        g0 = q.w_gain.detach().clone()
        return lambda c: q.w_gain.copy_(g0 * c)
    return None  # DoReFa weights: no range parameter


@torch.no_grad()
def quant_error(q: FakeQuantizer, x: torch.Tensor) -> torch.Tensor:
    """Per-row sum of squared errors ``(q(x) - x)^2`` (rows = channels, or one row per tensor).

    N2UQ activations are compared after removing the mean error, which the conv's ``input_shift`` absorbs.
    """
    err = q(x).float() - x.float()
    rows = err.reshape(q.channels, -1) if q.channels else err.reshape(1, -1)
    if q.method == "n2uq" and q.role == "act":
        rows = rows - rows.mean(1, keepdim=True)
    return rows.square().sum(1)


def _search_sample(q: FakeQuantizer, x: torch.Tensor) -> torch.Tensor:
    """``x`` in float32; per-tensor inputs above ``_MSE_MAX_SAMPLES`` elements subsampled (seeded) for the searches."""
    x = x.detach().float()
    if not q.channels and x.numel() > _MSE_MAX_SAMPLES:
        # Random (seeded) rather than strided: a stride can alias with the channel/row layout of the tensor.
        gen = torch.Generator(device=x.device).manual_seed(0)
        x = x.reshape(-1)[torch.randint(x.numel(), (_MSE_MAX_SAMPLES,), generator=gen, device=x.device)]
    return x


@torch.no_grad()
def refine_mse(q: FakeQuantizer, x: torch.Tensor) -> bool:
    """Rescale an initialised quantizer's range to minimise its quantization MSE on ``x`` (see module docstring).

    Args:
        q (FakeQuantizer): A quantizer already initialised from ``x`` (``init_from``); changed in place.
        x (torch.Tensor): The tensor it quantizes (weights: the conv weight; activations: a calibration input).

    Returns:
        (bool): True if the range was searched, False for quantizers without a range parameter (DoReFa weights).
    """
    setter = _range_setter(q)
    if setter is None:
        return False
    x = _search_sample(q, x)
    rows = max(q.channels, 1)
    best = torch.ones(rows, device=x.device)
    best_err = None
    for grid in (_MSE_COARSE, _MSE_FINE):
        centre = best.clone()
        for f in grid.tolist():
            c = centre * f
            setter(c)
            err = quant_error(q, x)
            if best_err is None:
                best_err, best = err, c
            else:
                better = err < best_err
                best_err = torch.where(better, err, best_err)
                best = torch.where(better, c, best)
    setter(best)
    q(x)  # weight quantizers whose scale is recomputed in forward (N2UQ) record it for grid()/export
    return True


def _free_offset(q: FakeQuantizer) -> float | None:
    """The unrounded grid offset of a per-tensor activation quantizer that :meth:`set_grid_offset` can move, or None.

    LSQ+'s ``beta`` and the LSQ/PACT fixed offset; signed PACT's offset is tied to its step (zero point ``2^(b-1)``).
    """
    if q.role != "act" or q.channels or (q.method == "pact" and q.signed):
        return None
    if q.method == "lsqplus":
        return float(q.offset.detach().reshape(()))
    return getattr(q, "fixed_offset", None) if q.method in ("lsq", "pact") else None


@torch.no_grad()
def choose_zero_point(q: FakeQuantizer, x: torch.Tensor) -> bool:
    """``qat_act_zp=integer``: put the offset on whichever of ``s*floor(off/s)``, ``s*ceil(off/s)`` quantizes ``x``
    with the lower error (:func:`quant_error`); see the module docstring.

    The forward rounds ``off/s`` to the nearest integer; only when the other neighbour costs less on ``x`` is the offset
    set to it (exactly ``s*k``, so the forward keeps it while ``s`` stays put). Quantizers without an integer zero
    point or without a free offset (signed PACT, N2UQ, weights) are left alone.

    Args:
        q (FakeQuantizer): An initialised activation quantizer (range already chosen); changed in place.
        x (torch.Tensor): The calibration input it quantizes.

    Returns:
        (bool): True if the offset was moved to the other neighbour.
    """
    off = _free_offset(q) if q.integer_zero_point else None
    if off is None:
        return False
    s = float(q.step_size().reshape(()))
    lo, hi = math.floor(off / s), math.ceil(off / s)
    if lo == hi:
        return False
    x = _search_sample(q, x)
    err = {}
    for k in (lo, hi):
        q.set_grid_offset(k * s)
        err[k] = float(quant_error(q, x).sum())
    best = min((lo, hi), key=lambda k: (err[k], k != round(off / s)))  # a tie keeps the nearest
    if best == round(off / s):
        q.set_grid_offset(off)  # the forward rounds to it already: leave the offset as it was
        return False
    q.set_grid_offset(best * s)
    return True
