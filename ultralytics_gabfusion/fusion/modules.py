"""GABFusion modules: the node that replaces a neck ``Concat`` and its folded deployment form.

Two forms of the node, both with ``alpha = softmax(lam)``:

- ``form="grad"`` (the default): the forward is exactly the ``Concat`` it replaces; in training, the gradient that
  reaches branch ``i`` is multiplied by ``K * alpha_i`` (1 at the start). Inserting it into a trained model changes
  nothing at step 0, and there is nothing to fold for deployment.
- ``form="paper"``: the paper's ``y = LN_c(concat(alpha_1*F_1, ..., alpha_K*F_K))`` with a channels-first LayerNorm
  (statistics over C only, at every sample and pixel; per-channel affine). Inserted into a trained network it
  changes the network's function (docs/RESULTS.md measures by how much).

``lam`` is driven either by the closed-loop gradient balancer (``mode="balanced"``, lam is a buffer) or, in the
paper form, by backprop (``mode="learned"``, lam is an ``nn.Parameter``); ``mode="off"`` makes the node a plain
``Concat`` that still measures per-branch gradient norms (a baseline run's diagnostic).

Examples:
    >>> import torch
    >>> from ultralytics_gabfusion.fusion import GABFusion
    >>> node = GABFusion(n_branches=2, channels=24)
    >>> x = [torch.randn(2, 8, 4, 4), torch.randn(2, 16, 4, 4)]
    >>> torch.equal(node(x), torch.cat(x, 1))
    True
    >>> GABFusion(n_branches=2, channels=24, form="paper")(x).shape
    torch.Size([2, 24, 4, 4])
    >>> node.alpha.tolist()
    [0.5, 0.5]
"""

from __future__ import annotations

import contextlib
import math
from typing import Sequence

import torch
import torch.distributed as dist
import torch.nn as nn

from ..precision import KeepFP32, autocast_off
from ..settings import GAB_FORMS as FUSION_FORMS  # the one lists, validated there
from ..settings import GAB_MODES as FUSION_MODES
from ..settings import SETTINGS

_UNSET = object()  # "leave unchanged" marker of GABFusion.configure
_LEARNED_NEEDS_PAPER = ("GABFusion mode 'learned' trains alpha through the forward pass: it needs form 'paper' "
                        "(gab_form=paper), or use mode 'balanced'.")
LAM_MAX = 10.0  # |lam - mean(lam)| bound: alpha ratios up to e^20 stay > 0 in float32 (softmax cannot saturate to 0)


def _check_mode(mode) -> str:
    """Return ``mode`` normalised, or raise ValueError naming the allowed values."""
    m = str(mode).lower() if mode is not None else "none"
    if m not in FUSION_MODES:
        raise ValueError(f"GABFusion mode '{mode}' is not valid. Allowed values: {', '.join(FUSION_MODES)}.")
    return m


def _check_form(form) -> str:
    """Return ``form`` normalised, or raise ValueError naming the allowed values."""
    f = str(form).lower()
    if f not in FUSION_FORMS:
        raise ValueError(f"GABFusion form '{form}' is not valid. Allowed values: {', '.join(FUSION_FORMS)}.")
    return f


class _ScaleGrad(torch.autograd.Function):
    """Identity in the forward pass; the backward pass multiplies the incoming gradient by ``scale``."""

    @staticmethod
    def forward(ctx, x, scale):
        ctx.save_for_backward(scale)
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        (scale,) = ctx.saved_tensors
        return g * scale.to(g.dtype), None


class ChannelLayerNorm(KeepFP32, nn.LayerNorm):
    """LayerNorm over the channel dimension only, separately at every (sample, y, x) location (ConvNeXt style).

    Not ``GroupNorm(1, C)``, which also pools over space. Subclassing ``nn.LayerNorm`` puts ``weight`` in
    Ultralytics' no-decay "bn" parameter group (``build_optimizer`` tests ``isinstance(module, nn.*Norm*)``)
    and ``bias`` in its bias group. Arithmetic is float32 with autocast off; the result keeps float32 (the caller
    casts).

    Args:
        channels (int): Number of channels C.
        eps (float): Variance epsilon (1e-5, as the paper).
        dim (int): Channel dimension of the input (1 for NCHW).

    Examples:
        >>> ln = ChannelLayerNorm(4)
        >>> y = ln(torch.randn(2, 4, 3, 3))
        >>> bool(y.mean(1).abs().max() < 1e-5)
        True
    """

    def __init__(self, channels: int, eps: float = 1e-5, dim: int = 1):
        super().__init__(int(channels), eps=eps, elementwise_affine=True)
        self.dim = dim

    def normalize(self, z: torch.Tensor) -> torch.Tensor:
        """Return the float32 normalised input (before the affine)."""
        d = self.dim % z.ndim
        with autocast_off(z.device.type):
            z = z.float()
            var, mu = torch.var_mean(z, dim=d, keepdim=True, correction=0)
            return (z - mu) * torch.rsqrt(var + self.eps)

    def affine(self, u: torch.Tensor) -> torch.Tensor:
        """Apply the per-channel affine to a normalised float32 tensor."""
        shape = [1] * u.ndim
        shape[self.dim % u.ndim] = -1
        with autocast_off(u.device.type):
            return u * self.weight.float().view(shape) + self.bias.float().view(shape)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """Normalise over channels and apply the affine (float32 result)."""
        return self.affine(self.normalize(z))


class GABFusion(KeepFP32, nn.Module):
    """Gradient-balanced fusion node, ``alpha = softmax(lam)``; forward ``concat(F_i)`` (form "grad") or
    ``LN_c(concat(alpha_i * F_i))`` (form "paper").

    Drop-in replacement for an Ultralytics neck ``Concat`` (same inputs, same output channel count). In the "grad"
    form the forward is the plain concat and, in training, the gradient reaching branch ``i`` is scaled by
    ``K * alpha_i``: the closed loop below then drives the same per-branch gradient norms as the paper form's alpha,
    without changing what the network computes (at ``alpha_i = 1/K`` the node is exactly the Concat, forward and
    backward).

    Gradient measurement: in training mode with grad enabled, each branch input passes through an identity view
    (a detached leaf for inputs from frozen layers) with a tensor hook that adds ``||dL/dF_i||^2`` (the gradient
    at the branch input, before alpha, through this node only) and its element count to per-step accumulators. ``update_lambda()`` (once per optimizer step, all
    modes) turns them into ``G_i`` and the EMA ``grad_ema``; only ``mode="balanced"`` then moves ``lam``:
    ``e_i = log(Gbar_i+eps) - mean_j log(Gbar_j+eps) - tau_i``, ``lam_i -= eta * e_i``. Our addition (paper
    silent): lam is re-centred (softmax invariant) and bounded to ``+-LAM_MAX`` so an unstable ``eta`` can never
    drive a branch's alpha to exactly 0; with the defaults the bound is never reached (|lam| ~ log of the
    gradient ratio).

    Args:
        dimension (int): Concatenation (channel) dimension, as ``Concat``'s argument.
        n_branches (int): Number of inputs K.
        channels (int | None): Total output channels C; None creates the LayerNorm lazily at the first forward
            (or from a loaded state_dict). Pass it when known: lazily created parameters miss an optimizer built
            before the first forward.
        mode (str): "balanced" (default), "learned" (paper form only) or "off".
        beta (float): EMA factor of the gradient norms, in (0, 1].
        eta (float): Step size of the lambda update (balanced), >= 0.
        eps (float): Epsilon inside log(G + eps), > 0.
        tau (float | Sequence[float] | None): Per-branch log-ratio targets (None = 0).
        rms (bool): Use size-normalised norms ``||g|| / sqrt(numel)`` (nodes joining unequal widths, YOLO11).
        form (str): "grad" (default: function-preserving, balancing in the backward pass) or "paper" (alpha and
            LayerNorm in the forward pass).

    Attributes:
        lam (torch.Tensor): float32 logits (buffer in balanced/off, ``nn.Parameter`` in learned).
        grad_ema (torch.Tensor): float32 EMA of the per-branch gradient norms (0 until the first update).
        n_updates (torch.Tensor): int64 count of EMA updates (not averaged by Ultralytics' ModelEMA).
        norm (ChannelLayerNorm | None): The LayerNorm of the paper form (gamma=1, beta=0 at init, eps 1e-5); None
            in the "grad" form.

    Examples:
        >>> node = GABFusion(n_branches=2, channels=8, mode="learned", form="paper")
        >>> [p is node.lam for p in node.fusion_parameters()]
        [True]
        >>> GABFusion(mode="fast")
        Traceback (most recent call last):
        ...
        ValueError: GABFusion mode 'fast' is not valid. Allowed values: balanced, learned, off.
    """

    form = "paper"  # nodes pickled before the "grad" form existed unpickle without __init__: they are paper form

    def __init__(
        self,
        dimension=1,
        n_branches=2,
        channels=None,
        mode="balanced",
        beta=0.1,
        eta=0.05,
        eps=1e-12,
        tau=None,
        rms=False,
        form="grad",
    ):
        super().__init__()
        if isinstance(dimension, bool) or not isinstance(dimension, int):
            raise ValueError(f"GABFusion dimension must be an int (the Concat dimension), got {dimension!r}.")
        if isinstance(n_branches, bool) or not isinstance(n_branches, int) or n_branches < 1:
            raise ValueError(f"GABFusion n_branches must be a positive int, got {n_branches!r}.")
        if channels is not None and (isinstance(channels, bool) or int(channels) != channels or channels < 1):
            raise ValueError(f"GABFusion channels must be a positive int or None, got {channels!r}.")
        self.d = dimension
        self.n_branches = n_branches
        self.mode = _check_mode(mode)
        self.tau = (0.0,) * n_branches
        self.configure(beta=beta, eta=eta, eps=eps, tau=tau, rms=rms)
        self.channels = None if channels is None else int(channels)
        self.norm = None
        self.form = "grad"
        self.register_buffer("lam", torch.zeros(n_branches, dtype=torch.float32))
        self.register_buffer("grad_ema", torch.zeros(n_branches, dtype=torch.float32))
        self.register_buffer("n_updates", torch.zeros((), dtype=torch.int64))
        # Per-step accumulators (sum over micro-batches); not in state_dict, so ModelEMA and checkpoints skip them.
        self.register_buffer("_grad_sq", torch.zeros(n_branches, dtype=torch.float32), persistent=False)
        self._grad_numel = [0] * n_branches
        self._pending = 0  # backward passes accumulated since the last update (python int: no device sync)
        self._bypass = False  # calibration: behave exactly as the Concat this node replaced
        self.set_form(form)
        self.set_mode(self.mode)

    # ------------------------------------------------------------------ configuration
    def configure(self, beta=None, eta=None, eps=None, tau=_UNSET, rms=None):
        """Set the balancer options; None (and an omitted ``tau``) leaves an option unchanged, ``tau=None`` means 0.

        Raises:
            ValueError: If an option is out of range.
        """
        # the ranges of the gab_beta / gab_eta / gab_eps settings (one validator for the keys and the YAML args)
        if beta is not None:
            self.beta = SETTINGS["gab_beta"].check("GABFusion beta", beta)
        if eta is not None:
            self.eta = SETTINGS["gab_eta"].check("GABFusion eta", eta)
        if eps is not None:
            self.eps = SETTINGS["gab_eps"].check("GABFusion eps", eps)
        if tau is _UNSET:
            pass
        elif tau is None:
            self.tau = (0.0,) * self.n_branches
        else:
            t = [float(tau)] * self.n_branches if isinstance(tau, (int, float)) else [float(v) for v in tau]
            if len(t) != self.n_branches:
                raise ValueError(f"GABFusion tau needs {self.n_branches} values (one per branch), got {tau!r}.")
            self.tau = tuple(t)
        if rms is not None:
            self.rms = bool(rms)
        return self

    def set_form(self, form: str) -> GABFusion:
        """Switch between the "grad" and "paper" forms (before weights load and before the optimizer is built).

        To "paper": a fresh identity LayerNorm is created (when the channel count is known, else lazily). To "grad":
        the LayerNorm is dropped (its parameters would be unused). ``lam`` and the gradient EMA are kept.

        Raises:
            ValueError: Unknown form, or "grad" while the node is in learned mode (nothing in the forward pass would
                give ``lam`` a gradient).
        """
        form = _check_form(form)
        if form == "grad" and getattr(self, "mode", None) == "learned":
            raise ValueError(_LEARNED_NEEDS_PAPER)
        if form == self.form and (form == "grad" or self.norm is not None):
            return self
        if form == "paper":
            ch = getattr(self, "channels", None)
            self.norm = ChannelLayerNorm(ch, dim=self.d).to(self.lam.device) if ch is not None else None
        else:
            if self.norm is not None and getattr(self, "channels", None) is None:
                self.channels = int(self.norm.normalized_shape[0])
            self.norm = None
        self.form = form
        return self

    def set_mode(self, mode: str) -> GABFusion:
        """Switch between balanced / learned / off; ``lam`` keeps its values and its state_dict key.

        In learned mode ``lam`` becomes an ``nn.Parameter`` (give it to the optimizer without weight decay, see
        ``fusion_parameters``); otherwise it is a buffer, invisible to ``model.parameters()``. Switch before the
        optimizer and Ultralytics' ModelEMA are built: both keep references to the tensors.

        Raises:
            ValueError: Unknown mode, or "learned" in the "grad" form.
        """
        if _check_mode(mode) == "learned" and self.form == "grad":
            raise ValueError(_LEARNED_NEEDS_PAPER)
        self.mode = _check_mode(mode)
        lam = self.lam.detach().clone().float()
        is_param = "lam" in self._parameters
        if self.mode == "learned" and not is_param:
            del self._buffers["lam"]
            self.lam = nn.Parameter(lam)
        elif self.mode != "learned" and is_param:
            del self._parameters["lam"]
            self.register_buffer("lam", lam)
        return self

    def fusion_parameters(self) -> list[nn.Parameter]:
        """Trainable fusion logits (``[lam]`` in learned mode, else ``[]``): no weight decay, own lr group."""
        return [self.lam] if isinstance(self.lam, nn.Parameter) else []

    def norm_parameters(self) -> list[nn.Parameter]:
        """LayerNorm affine ``[gamma, beta]`` (Ultralytics already puts them in its no-decay groups)."""
        return [] if self.norm is None else [self.norm.weight, self.norm.bias]

    def alpha_t(self) -> torch.Tensor:
        """Differentiable float32 alpha: softmax of the centred logits, clamped to ``+-LAM_MAX``."""
        lam = self.lam.float()
        return torch.softmax((lam - lam.mean()).clamp(-LAM_MAX, LAM_MAX), 0)

    @property
    def alpha(self) -> torch.Tensor:
        """Branch weights softmax(lam), float32, detached (on the simplex: strictly positive, sum 1)."""
        return self.alpha_t().detach()

    def extra_repr(self) -> str:
        """Summary shown by ``print(model)``."""
        return f"dimension={self.d}, n_branches={self.n_branches}, mode={self.mode}, form={self.form}, rms={self.rms}"

    # ------------------------------------------------------------------ forward
    def _ensure_norm(self, channels: int, device):
        if self.norm is None:  # lazy creation (channels unknown at construction)
            self.norm = ChannelLayerNorm(channels, dim=self.d).to(device)
        elif self.norm.normalized_shape[0] != channels:
            raise RuntimeError(
                f"GABFusion (layer {getattr(self, 'i', '?')}) was built for {self.norm.normalized_shape[0]} channels "
                f"but received {channels}."
            )

    def _probe(self, x: list[torch.Tensor]) -> list[torch.Tensor]:
        """Attach the per-branch gradient meters (training with grad only)."""
        if not (self.training and torch.is_grad_enabled()):
            return x
        out = []
        for i, xi in enumerate(x):
            if xi.requires_grad:
                # A view is a new autograd node used only here: its hook sees dL/dF_i through this fusion node,
                # not the gradient of other consumers of the same tensor (e.g. YOLOv5's layer 10 feeds two nodes).
                xi = xi.view_as(xi)
            else:
                # Branch from frozen layers: a detached leaf still gets dL/dF_i (upstream is unaffected), so the
                # balancer never sees a spurious zero norm.
                xi = xi.detach().requires_grad_(True)
            xi.register_hook(self._make_hook(i))
            out.append(xi)
        return out

    def _make_hook(self, i: int):
        def hook(g):
            # one fused pass in fp32 over the gradient (no fp32 copy or squared temporary, also under AMP)
            dt = None if g.dtype == torch.float64 else torch.float32  # float64 cannot be narrowed inside the norm
            self._grad_sq[i] += torch.linalg.vector_norm(g.detach(), dtype=dt).float().square()
            self._grad_numel[i] += g.numel()
            self._pending += 1
            return None

        return hook

    def scaled_concat(self, x: Sequence[torch.Tensor]) -> torch.Tensor:
        """Return ``concat(alpha_i * F_i)`` in float32 (autocast off)."""
        d = self.d % x[0].ndim
        with autocast_off(x[0].device.type):
            z = torch.cat([xi.float() for xi in x], d)
            alpha = self.alpha_t()
            scale = torch.cat([alpha[i].expand(xi.shape[d]) for i, xi in enumerate(x)])  # no host->device copy
            shape = [1] * z.ndim
            shape[d] = -1
            return z * scale.view(shape)

    def forward(self, x: list[torch.Tensor]) -> torch.Tensor:
        """Fuse the branch list ``x``; output has the dtype of ``x[0]``."""
        if len(x) != self.n_branches:
            i = getattr(self, "i", "?")
            raise RuntimeError(f"GABFusion (layer {i}) expects {self.n_branches} inputs, got {len(x)}.")
        x = self._probe(list(x))
        if self.mode == "off" or self._bypass:
            return torch.cat(x, self.d)
        if self.form == "grad":
            if self.training and torch.is_grad_enabled():
                scale = self.alpha_t().detach() * self.n_branches  # mean 1: the total gradient keeps its size
                x = [_ScaleGrad.apply(xi, scale[i]) if xi.requires_grad else xi for i, xi in enumerate(x)]
            return torch.cat(x, self.d)
        self._ensure_norm(sum(xi.shape[self.d] for xi in x), x[0].device)
        return self.norm(self.scaled_concat(x)).to(x[0].dtype)

    # ------------------------------------------------------------------ balancer
    def pending_norms(self, grad_scale=None) -> torch.Tensor | None:
        """Per-branch gradient norms G_i accumulated since the last update (None unless every branch was measured)."""
        if not self.measured:
            return None
        g = self._grad_sq.clamp_min(0).sqrt()
        if self.rms:
            g = g / torch.tensor([math.sqrt(max(n, 1)) for n in self._grad_numel], device=g.device)
        return g if grad_scale is None else g / grad_scale

    @property
    def measured(self) -> bool:
        """Whether every branch received a gradient since the last update (python state: no device sync)."""
        return self._pending > 0 and min(self._grad_numel) > 0

    def accumulators(self) -> torch.Tensor:
        """This step's squared gradient norms and element counts per branch, packed as ``(2 * n_branches,)``.

        The packed form is what ranks all-reduce so that every rank applies the same update.
        """
        numel = torch.tensor(self._grad_numel, dtype=torch.float32, device=self._grad_sq.device)
        return torch.cat([self._grad_sq, numel])

    def load_accumulators(self, packed: torch.Tensor, measured: bool = True) -> None:
        """Replace the accumulators by ``packed`` (from :meth:`accumulators`, e.g. averaged over ranks).

        ``measured=False`` (some rank missed a branch) makes the next update a no-op on every rank.
        """
        m = self.n_branches
        self._grad_sq.copy_(packed[:m])
        self._grad_numel = [int(round(v)) for v in packed[m : 2 * m].tolist()] if measured else [0] * m
        self._pending = int(measured)

    @contextlib.contextmanager
    def bypassed(self):
        """Within the context the node computes exactly the Concat it replaced (used while fitting its LayerNorm)."""
        self._bypass = True
        try:
            yield self
        finally:
            self._bypass = False

    def reset_accumulators(self):
        """Drop the accumulated gradient norms (start of a new optimizer step)."""
        self._grad_sq.zero_()
        self._grad_numel = [0] * self.n_branches
        self._pending = 0

    @torch.no_grad()
    def update_lambda(self, grad_scale=None, norms: torch.Tensor | None = None, sync: bool = True):
        """Apply one EMA (+ lambda in balanced mode) update from the accumulated norms, then reset them.

        Call once per optimizer step, after the backward passes of that step. No-op (accumulators reset) unless
        every branch received a gradient.
        Non-finite norms (an AMP overflow step that the GradScaler skips) leave the state unchanged, decided on
        device without a host sync. Under an initialised torch.distributed group the squared norms are averaged
        over ranks first so every rank keeps the same lambda (all ranks must call this together).

        Args:
            grad_scale (float | torch.Tensor | None): AMP loss scale used in the backward passes (makes
                ``grad_ema`` comparable across steps; the lambda update itself is scale invariant).
            norms (torch.Tensor | None): Precomputed (already reduced) norms; used by ``update_fusion``.
            sync (bool): All-reduce across ranks when distributed (ignored when ``norms`` is given).

        Returns:
            (torch.Tensor | None): The norms G_i used, or None if nothing was accumulated.
        """
        if norms is None:
            if not self.measured:
                self.reset_accumulators()
                return None
            if sync and dist.is_available() and dist.is_initialized():
                packed = self.accumulators()
                dist.all_reduce(packed)
                packed /= dist.get_world_size()
                self.load_accumulators(packed)
            norms = self.pending_norms(grad_scale)
        self.reset_accumulators()
        g = norms.to(self.grad_ema.device, torch.float32)
        ok = torch.isfinite(g).all()
        first = self.n_updates == 0
        ema = torch.where(first, g, (1.0 - self.beta) * self.grad_ema + self.beta * g)
        self.grad_ema.copy_(torch.where(ok, ema, self.grad_ema))
        if self.mode == "balanced":
            logg = torch.log(self.grad_ema + self.eps)
            tau = torch.tensor(self.tau, dtype=torch.float32, device=logg.device)
            e = logg - logg.mean() - tau
            lam = self.lam - self.eta * e
            lam = (lam - lam.mean()).clamp(-LAM_MAX, LAM_MAX)  # softmax-invariant centring; bounded (see LAM_MAX)
            self.lam.copy_(torch.where(ok, lam, self.lam))
        self.n_updates.add_(ok.long())
        return g

    # ------------------------------------------------------------------ loading
    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # Lazily built node: create the LayerNorm from the checkpoint's shape so the load succeeds.
        w = state_dict.get(prefix + "norm.weight")
        if self.norm is None and w is not None and self.form == "paper":
            self.norm = ChannelLayerNorm(w.shape[0], dim=self.d).to(self.lam.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class FoldedFusion(nn.Module):
    """Deployment form of a trained GABFusion: ``y_c = w_c * concat(F)_c + b_c`` (alpha folded into ``w``).

    Args:
        weight (torch.Tensor): Per-channel scale, shape (C,).
        bias (torch.Tensor): Per-channel offset, shape (C,).
        dimension (int): Concatenation dimension.
        n_branches (int): Number of inputs.
        alpha (torch.Tensor | None): The alpha that was folded (kept for the record).

    Examples:
        >>> f = FoldedFusion(torch.full((4,), 2.0), torch.zeros(4))
        >>> f([torch.ones(1, 2, 1, 1), torch.ones(1, 2, 1, 1)]).flatten().tolist()
        [2.0, 2.0, 2.0, 2.0]
    """

    def __init__(self, weight, bias, dimension=1, n_branches=2, alpha=None):
        super().__init__()
        self.d = dimension
        self.n_branches = n_branches
        self.weight = nn.Parameter(torch.as_tensor(weight, dtype=torch.float32).detach().clone())
        self.bias = nn.Parameter(torch.as_tensor(bias, dtype=torch.float32).detach().clone())
        a = torch.full((n_branches,), 1.0 / n_branches) if alpha is None else torch.as_tensor(alpha).float()
        self.register_buffer("alpha", a.detach().clone())

    def forward(self, x: list[torch.Tensor]) -> torch.Tensor:
        """Concatenate and apply the fixed per-channel affine (in the input dtype)."""
        z = torch.cat(x, self.d)
        shape = [1] * z.ndim
        shape[self.d % z.ndim] = -1
        return z * self.weight.to(z.dtype).view(shape) + self.bias.to(z.dtype).view(shape)
