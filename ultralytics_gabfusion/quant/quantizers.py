"""Fake-quantizer base class and the helpers shared by the methods (the factory is :mod:`.registry`).

The four methods live in one file each so that every formula has exactly one visible home:

* :mod:`.lsq`  -- LSQ and LSQ+ (``LSQFakeQuantize.backward`` is where their gradients are computed),
* :mod:`.pact` -- PACT for activations and DoReFa for weights,
* :mod:`.n2uq` -- N2UQ (``N2UQFakeQuantize.backward`` holds the generalised STE).

Conventions shared by all quantizers:

* ``torch.round`` (round half to even); clamping happens before rounding; pass-through masks are decided
  on the unrounded scaled value.
* Arithmetic runs in float32 even under AMP (float64 inputs stay float64), the result is cast back to
  the input dtype.
* Learnable positive quantities (steps, alpha, N2UQ scales) are made positive in forward with
  ``t.abs().clamp_min(eps)`` (:func:`positive`): the gradient of ``abs`` keeps the sign consistent if an
  optimizer step overshoots below zero, and the ``eps`` floor (1e-8) only bites on a degenerate
  parameter. N2UQ intervals use the paper's 1e-3 floor with a straight-through gradient
  (:func:`floor_ste`) so an interval that touched the floor can grow back.
* Quantizer state is kept in float32: ``.half()`` (Ultralytics saves checkpoints that way) does not
  downcast it, see :meth:`FakeQuantizer._apply`.
* Activation grid offsets (LSQ+'s ``beta``, the LSQ/PACT SiLU offset, signed PACT's ``-alpha``) are used as they
  are (``act_zp="float"``, the default) or, with ``act_zp="integer"`` (the ``qat_act_zp`` key), on the nearest
  multiple of the step, ``s*round(off/s)`` (:func:`integer_offset`): an integer zero point, so the fake-quant
  forward is the grid that integer runtimes execute.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass

import torch
from torch import nn

from ..precision import LOW_PRECISION, KeepFP32, autocast_off
from ..settings import ACT_ZPS, MAX_BITS, MIN_BITS, QUANT_METHODS

__all__ = [
    "FakeQuantizer",
    "QuantExportSpec",
    "QUANT_METHODS",
    "QUANT_ROLES",
    "MIN_BITS",
    "MAX_BITS",
    "STEP_EPS",
    "ACT_ZPS",
    "integer_offset",
    "positive",
    "floor_ste",
    "round_ste",
    "row_quantile",
]

QUANT_ROLES = ("weight", "act")
# Floor for steps / alpha / scales, in forward and in the data-driven inits (all-zero inputs).
STEP_EPS = 1e-8

# Spelling variants accepted by the constructors; normalised to QUANT_ROLES.
_ROLE_ALIASES = {"activation": "act", "activations": "act", "weights": "weight"}
# Quantile inits look at most this many elements per row: kthvalue over a 100M-element activation
# would cost time and memory for no gain in the estimate.
_QUANTILE_MAX_ELEMS = 1 << 22


# ----------------------------------------------------------------------------------------------------------
# Small autograd helpers shared by the methods
# ----------------------------------------------------------------------------------------------------------
def positive(t: torch.Tensor, eps: float = STEP_EPS) -> torch.Tensor:
    """Return ``|t|`` floored at ``eps`` (differentiable through ``abs``; zero gradient below ``eps``)."""
    return t.abs().clamp_min(eps)


class _FloorSTE(torch.autograd.Function):
    """``clamp_min(t, floor)`` in forward, identity gradient in backward."""

    @staticmethod
    def forward(ctx, t, floor):  # noqa: D102
        return t.clamp_min(floor)

    @staticmethod
    def backward(ctx, grad):  # noqa: D102
        return grad, None


def floor_ste(t: torch.Tensor, floor: float) -> torch.Tensor:
    """Floor ``t`` at ``floor`` with a straight-through gradient (so a floored value can recover)."""
    return _FloorSTE.apply(t, floor)


class _RoundSTE(torch.autograd.Function):
    """``round(clamp(v, lo, hi))`` in forward, identity gradient in backward (straight-through)."""

    @staticmethod
    def forward(ctx, v, lo, hi):  # noqa: D102
        return torch.round(v.clamp(lo, hi))

    @staticmethod
    def backward(ctx, grad):  # noqa: D102
        return grad, None, None


def round_ste(v: torch.Tensor, lo: float | None = None, hi: float | None = None) -> torch.Tensor:
    """Round half to even after an optional clamp; gradient passes straight through both."""
    return _RoundSTE.apply(v, lo, hi)


def integer_offset(offset: torch.Tensor, step: torch.Tensor, lo: int | None = None, hi: int | None = None) -> torch.Tensor:
    r"""The grid offset on the nearest multiple of the step: ``off_int = s * round(off/s)`` (``act_zp="integer"``).

    The grid ``off_int + k*s`` is ``(k - z)*s`` with the integer zero point ``z = -round(off/s)``. Gradients (the value
    is exactly ``s*round(off/s)``)::

        d off_int / d off = 1              straight-through: a learned offset (LSQ+'s beta) learns as unrounded
        d off_int / d s   = round(off/s)   product rule, the rounded integer held constant

    so a quantizer's step gets the asymmetric-LSQ gradient of a grid with an integer zero point. A constant offset
    (the LSQ/PACT SiLU offset) passes ``off`` without gradient and only the step term remains. ``lo``/``hi`` bound
    ``round(off/s)`` (a zero point that must fit the grid's integer type, see :class:`.lsq.ConvOutputQuantizer`).
    """
    k = torch.round(offset.detach() / step.detach())
    if lo is not None or hi is not None:
        k = k.clamp(lo, hi)
    return step * k + (offset - offset.detach())  # + 0 in value; carries the straight-through gradient to off


def row_quantile(x2d: torch.Tensor, q: float) -> torch.Tensor:
    """Per-row ``q``-quantile (nearest rank) of a 2-D tensor via ``kthvalue``.

    ``torch.quantile`` refuses inputs above 2**24 elements, so this uses ``kthvalue`` on (at most
    ``_QUANTILE_MAX_ELEMS`` evenly strided) elements of each row. Computed in float32 or wider.
    """
    x2d = x2d.detach()
    if not x2d.is_floating_point() or x2d.dtype in LOW_PRECISION:
        x2d = x2d.float()
    n = x2d.shape[1]
    if n > _QUANTILE_MAX_ELEMS:
        x2d = x2d[:, :: -(-n // _QUANTILE_MAX_ELEMS)]
        n = x2d.shape[1]
    k = min(max(int(round(q * (n - 1))) + 1, 1), n)
    return x2d.kthvalue(k, dim=1).values


# ----------------------------------------------------------------------------------------------------------
# Argument validation
# ----------------------------------------------------------------------------------------------------------
def _check_bits(bits) -> int:
    # Stricter than the user-facing setting (which takes "4" or 4.0 from a CLI or YAML): the API wants an int.
    if isinstance(bits, bool) or not isinstance(bits, numbers.Integral):
        raise ValueError(f"bits must be an integer in {MIN_BITS}..{MAX_BITS}, got {bits!r} ({type(bits).__name__})")
    if not MIN_BITS <= int(bits) <= MAX_BITS:
        raise ValueError(f"bits must be an integer in {MIN_BITS}..{MAX_BITS}, got {bits}")
    return int(bits)


def _check_role(role) -> str:
    name = _ROLE_ALIASES.get(str(role).strip().lower(), str(role).strip().lower())
    if name not in QUANT_ROLES:
        raise ValueError(f"unknown quantizer role {role!r}; allowed roles: {', '.join(QUANT_ROLES)}")
    return name


def _check_act_zp(act_zp) -> str:
    name = str(act_zp).strip().lower()
    if name not in ACT_ZPS:
        raise ValueError(f"act_zp={act_zp!r} is not valid; allowed: {', '.join(ACT_ZPS)}")
    return name


def _check_channels(channels) -> int:
    if isinstance(channels, bool) or not isinstance(channels, numbers.Integral):
        raise ValueError(
            f"channels must be a non-negative integer (0 = per-tensor, C>0 = per-channel along dim 0), got {channels!r}"
        )
    if channels < 0:
        raise ValueError(
            f"channels must be a non-negative integer (0 = per-tensor, C>0 = per-channel along dim 0), got {channels}"
        )
    return int(channels)


# ----------------------------------------------------------------------------------------------------------
# Export description
# ----------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class QuantExportSpec:
    """What an exporter needs to reproduce a quantizer's output exactly (see :meth:`FakeQuantizer.export_spec`).

    ``kind="uniform"``: every output equals ``offset + k*scale``, ``k`` an integer in ``[qmin, qmax]``.
    ``kind="nonuniform"`` (N2UQ activations): ``count = #{i: input_scale*x > thresholds[i]}`` (an input exactly at a
    threshold does not count), output ``offset + count*scale``, ``count`` in ``[qmin, qmax]``.

    Attributes:
        kind (str): ``"uniform"`` or ``"nonuniform"``.
        bits (int): bit-width of the integers ``k`` / ``count``.
        scale (Tensor): output step, shape ``(channels,)`` or ``(1,)`` (detached).
        offset (Tensor): output offset, same shape as ``scale``.
        qmin (int): lowest integer.
        qmax (int): highest integer.
        axis (int | None): 0 when ``scale``/``offset`` are per output channel, None per tensor.
        input_scale (Tensor | None): nonuniform only: factor applied to the input before the comparison, ``(1,)``.
        thresholds (Tensor | None): nonuniform only: the ``qmax - qmin`` non-decreasing thresholds, in the
            ``input_scale``-scaled domain.
    """

    kind: str
    bits: int
    scale: torch.Tensor
    offset: torch.Tensor
    qmin: int
    qmax: int
    axis: int | None
    input_scale: torch.Tensor | None = None
    thresholds: torch.Tensor | None = None


# ----------------------------------------------------------------------------------------------------------
# Base class
# ----------------------------------------------------------------------------------------------------------
class FakeQuantizer(KeepFP32, nn.Module):
    """Base class of all fake quantizers (quantize-dequantize with a training surrogate gradient).

    Subclasses implement :meth:`init_from` (data-driven init of their state from a tensor),
    :meth:`_quantize` (the fake-quant arithmetic on a tensor already in the compute dtype),
    :meth:`step_size` and, for uniform-output quantizers, :meth:`grid`.

    Per-channel quantizers (``channels > 0``) act along dim 0 (weights: output channels); their learnable
    tensors are 1-D of shape ``(channels,)`` and are broadcast internally. Per-tensor ones have shape
    ``(1,)``.

    Attributes:
        method (str): ``"lsq"``, ``"lsqplus"``, ``"pact"`` or ``"n2uq"``.
        role (str): ``"weight"`` or ``"act"``.
        bits (int): bit-width, 2..8.
        signed (bool): integer grid signedness (``qmin``/``qmax``); methods with a fixed grid say how they
            use it.
        channels (int): 0 for per-tensor, else the size of dim 0.
        decay_params (tuple[str, ...]): names of parameters that belong in a weight-decayed optimizer
            group (PACT's ``alpha``); empty for the others.
        act_zp (str): ``"float"`` or ``"integer"`` (activations of LSQ, LSQ+ and PACT: the grid offset used on the
            nearest multiple of the step, see :func:`integer_offset`); a constructor argument of those classes.
        initialized (Tensor): persistent ``uint8`` scalar buffer, 1 once :meth:`init_from` ran (saved in the
            state_dict so a loaded quantizer is not re-initialised by its first forward).
    """

    method: str = ""
    decay_params: tuple = ()
    # "integer": activation grid offsets rounded to multiples of the step (set by the classes that have an offset).
    # A class attribute, so quantizers pickled before it existed read "float".
    act_zp: str = "float"

    def __init__(self, role: str = "act", bits: int = 4, channels: int = 0, signed: bool = True):
        """Validate and store the configuration; subclasses register their tensors afterwards."""
        super().__init__()
        self.role = _check_role(role)
        self.bits = _check_bits(bits)
        self.channels = _check_channels(channels)
        self.signed = bool(signed)
        self.register_buffer("initialized", torch.zeros((), dtype=torch.uint8))
        # Python-side mirror of `initialized`: reading a CUDA buffer in every forward would force a device
        # sync per quantizer (and a graph break under torch.compile). Reset when a state_dict is loaded.
        self._init_cached = False

    # ---------------------------------------------------------------- grid bounds
    @property
    def qmin(self) -> int:
        """Lowest integer of the grid: ``-2**(b-1)`` if signed else 0."""
        return -(1 << (self.bits - 1)) if self.signed else 0

    @property
    def qmax(self) -> int:
        """Highest integer of the grid: ``2**(b-1)-1`` if signed else ``2**b-1``."""
        return (1 << (self.bits - 1)) - 1 if self.signed else (1 << self.bits) - 1

    @property
    def levels(self) -> int:
        """Number of output levels, ``2**b``."""
        return 1 << self.bits

    def extra_repr(self) -> str:  # noqa: D102
        return (
            f"method={self.method!r}, role={self.role!r}, bits={self.bits}, signed={self.signed}, "
            f"channels={self.channels}" + (", act_zp='integer'" if self.integer_zero_point else "")
        )

    @property
    def integer_zero_point(self) -> bool:
        """Whether this is an activation quantizer whose grid offset is rounded to a multiple of its step."""
        return self.role == "act" and getattr(self, "act_zp", "float") == "integer"

    def _zp_offset(self, offset: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
        """``offset`` as the forward uses it: :func:`integer_offset` under ``act_zp="integer"``, else unchanged."""
        return integer_offset(offset, step) if self.integer_zero_point else offset

    # ---------------------------------------------------------------- init state
    @property
    def is_initialized(self) -> bool:
        """Whether :meth:`init_from` ran (or initialised state was loaded)."""
        if not self._init_cached:
            self._init_cached = bool(self.initialized.item())
        return self._init_cached

    def _mark_initialized(self) -> None:
        self.initialized.fill_(1)
        self._init_cached = True

    def init_from(self, x: torch.Tensor) -> "FakeQuantizer":
        """Overwrite the quantizer state from tensor ``x`` (no grad) and mark it initialised."""
        raise NotImplementedError

    def _load_from_state_dict(self, *args, **kwargs):
        # The loaded `initialized` value may differ from the cached flag.
        self._init_cached = False
        super()._load_from_state_dict(*args, **kwargs)

    # ---------------------------------------------------------------- dtype policy
    def _apply(self, fn, recurse=True):
        # float32 state under .half() (Ultralytics' checkpoint format): see precision.KeepFP32
        super()._apply(fn, recurse)
        self._wq_cache = None
        return self

    # ---------------------------------------------------------------- forward
    def _check_input(self, x: torch.Tensor) -> None:
        if self.channels and (x.dim() == 0 or x.shape[0] != self.channels):
            raise ValueError(
                f"{type(self).__name__} is per-channel with channels={self.channels} along dim 0, "
                f"got input of shape {tuple(x.shape)}"
            )

    def _bcast(self, p: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """View a ``(channels,)`` / ``(1,)`` tensor so it broadcasts against ``x`` along dim 0."""
        if self.channels and x.dim() > 1:
            return p.view(-1, *([1] * (x.dim() - 1)))
        return p

    def _rows(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` as a 2-D (rows, elements) view: one row per channel, or a single row if per-tensor."""
        return x.reshape(self.channels, -1) if self.channels else x.reshape(1, -1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Fake-quantize ``x`` (lazy :meth:`init_from` on the first call), computing in float32 or wider."""
        if not torch.is_tensor(x) or not x.is_floating_point():
            raise ValueError(f"{type(self).__name__} expects a floating-point tensor, got {type(x).__name__}")
        self._check_input(x)
        if x.numel() == 0:
            return x.clone()
        if not self.is_initialized:
            self.init_from(x)
        cdtype = torch.promote_types(x.dtype, torch.float32)
        key = cached = None
        if self.role == "weight":
            key = self._weight_key(x)
            if key is not None and self._wq_cache is not None and self._wq_cache[0] == key:
                cached = self._wq_cache[1]
                if not torch.is_grad_enabled() or not (x.requires_grad or any(p.requires_grad for p in self.parameters())):
                    return cached  # nothing to differentiate: the cached output itself
                if not self.replays_cached:
                    cached = None
        with autocast_off(x.device.type):
            y = self._quantize(x, cdtype) if cached is None else self._quantize(x, cdtype, cached=cached)
        y = y.to(x.dtype)
        if key is not None and cached is None:
            self._wq_cache = (key, y.detach())
        return y

    def _quantize(self, x: torch.Tensor, cdtype: torch.dtype, cached=None) -> torch.Tensor:
        """Fake-quantize raw ``x``; return it in ``cdtype`` (subclasses cast ``x``/params to ``cdtype``).

        ``cached`` (only passed to classes with ``replays_cached``): the earlier output for the same unchanged
        weight and parameters; the autograd function returns it instead of recomputing, gradients unchanged.
        """
        raise NotImplementedError

    # ---------------------------------------------------------------- weight cache
    # Weights change only at optimizer steps, so a weight quantizer's output is cached and reused by every later
    # call (gradient-accumulation micro-batches, validation batches) until the weight or a quantizer tensor
    # changes. The key holds each input tensor's storage address and version counter (bumped by every in-place
    # update: optimizer steps, EMA updates, load_state_dict, init_from), so no explicit invalidation is needed.
    _wq_cache = None
    replays_cached = False  # whether _quantize accepts ``cached`` with the gradients still computed

    def _weight_key(self, x: torch.Tensor) -> tuple:
        tensors = [x, *self._parameters.values()]
        tensors = [t for t in tensors if t is not None]
        tensors += [b for n, b in self._buffers.items() if n != "w_scale" and b is not None]  # w_scale: an output
        if any(t.is_inference() for t in tensors):  # inference tensors have no version counter: do not cache
            return None
        return (tuple(x.shape), x.dtype, torch.is_inference_mode_enabled(),
                tuple((t.data_ptr(), t._version) for t in tensors))

    def clear_weight_cache(self) -> None:
        """Drop the cached weight output (it is also invalidated automatically when any input changes)."""
        self._wq_cache = None

    def __getstate__(self):
        state = super().__getstate__()
        if state.get("_wq_cache") is not None:  # never pickled or deep-copied (checkpoints, EMA copies)
            state = {**state, "_wq_cache": None}
        return state

    # ---------------------------------------------------------------- export helpers
    def step_size(self) -> torch.Tensor:
        """Effective quantization step in the input domain, shape ``(channels,)`` or ``(1,)`` (detached)."""
        raise NotImplementedError

    def grid(self) -> dict:
        """Affine integer grid of the output: every output equals ``offset + k*scale``, k in [qmin, qmax].

        Returns:
            dict: ``{"scale": Tensor, "offset": Tensor, "qmin": int, "qmax": int, "axis": 0 | None}``;
            ``scale``/``offset`` are detached float tensors of shape ``(channels,)`` or ``(1,)``.
        """
        raise NotImplementedError

    def set_grid_offset(self, offset: float) -> bool:
        """Move a per-tensor activation grid to ``offset + k*scale`` (same scale and range); False if it cannot move.

        Used to give a grid an integer zero point for deployment (:func:`.grids.snap_zero_points`). Only quantizers
        whose offset is a free value (LSQ/PACT fixed offsets, LSQ+'s learned beta) can move; the others return False.
        """
        return False

    def _grid(self, scale, offset, qmin, qmax) -> dict:
        scale = scale.detach().reshape(-1).clone()
        offset = torch.as_tensor(offset, dtype=scale.dtype, device=scale.device).detach().reshape(-1)
        offset = offset.expand_as(scale).clone() if offset.numel() == 1 else offset.clone()
        return {"scale": scale, "offset": offset, "qmin": int(qmin), "qmax": int(qmax),
                "axis": 0 if self.channels else None}

    @torch.no_grad()
    def export_spec(self, dtype: torch.dtype = torch.float32) -> QuantExportSpec:
        """Describe the output grid for export: the uniform :meth:`grid`, its tensors cast to ``dtype``.

        Methods whose output is not a uniform function of the input (N2UQ activations) override this. A weight
        quantizer that records its scale in forward (PACT/DoReFa, N2UQ) describes the grid of its last forward.

        Args:
            dtype (torch.dtype): dtype of the returned tensors.

        Returns:
            (QuantExportSpec): ``kind="uniform"`` with the grid's scale, offset, integer range and axis.
        """
        g = self.grid()
        return QuantExportSpec(kind="uniform", bits=self.bits, scale=g["scale"].to(dtype), offset=g["offset"].to(dtype),
                               qmin=g["qmin"], qmax=g["qmax"], axis=g["axis"])
