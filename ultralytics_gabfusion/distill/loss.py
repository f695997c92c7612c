"""The ADA loss: divergences between teacher and student attention distributions, and their wiring into training.

Per supervision point the teacher's distribution P and the student's R (see :mod:`.attention`) are compared with
KL(P || R) or a Jensen-Shannon divergence; :class:`ADALoss` captures the student features through forward hooks,
runs the teacher and sums the points, and :class:`ADACriterion` appends the weighted term to the Ultralytics
detection loss.

Reduction (documented because the paper is silent): for every (image, channel) pair the divergence is summed
over the H x W positions (it is a divergence between two distributions over positions); it is then **summed over
channels**, **averaged over the batch**, and **summed over the supervision points**. With C = 128..512 channels per
point this keeps the term independent of the batch size but proportional to the network width.

Caveat: sigmoid of a non-negative score lies in [0.5, 1), so the paper's distributions are close to uniform and
L_ADA is tiny next to the detection loss. :class:`ADACriterion` records the ratio weight * L_ADA / L_det
(``pop_ratio``) so it can be logged, and ``temperature=T`` switches to the sharper softmax(S / T) distribution.

Safety: :class:`ADALoss` and :class:`ADACriterion` hold the teacher. They are plain Python objects (never
``nn.Module`` submodules), ``copy.deepcopy`` turns them into ``None`` (so an EMA copy of a model whose
``criterion`` is an :class:`ADACriterion` gets ``criterion=None``) and pickling them raises ``TypeError``, so the
teacher can never end up in an EMA copy or a checkpoint. The forward hooks they register deep-copy and pickle as an
inert no-op hook.

Numerics: every ADA computation runs in float32 with autocast disabled (AMP safe); the teacher forward itself
runs under the ambient autocast context, exactly like the student forward, and its features are cast to float32.
"""

from __future__ import annotations

import math
import weakref
from typing import Any, Callable, Iterable, Mapping

import torch
import torch.nn as nn

from ..precision import autocast_off
from ..settings import ADA_DIVS
from .attention import (
    _TINY,
    ATTN_KINDS,
    QADA_K,
    _check_4d,
    _check_choice,
    attention_distribution,
    qada_scores,
    simam_scores,
)
from .teacher import _layers_of, _param_like, _unwrap, check_layer_indices, has_quant_modules

__all__ = ["DIV_KINDS", "GRAD_SHARE_EVERY", "ADACriterion", "ADALoss", "divergence", "gradient_share", "js_div", "kl_div",
           "reduce_point"]

GRAD_SHARE_EVERY = 10  # ADA's gradient share is measured on the first training batch of an epoch and every 10th after

DIV_KINDS = ADA_DIVS  # the ada_div choices of settings


# ----------------------------------------------------------------------------------------------------------------------
# Divergences
# ----------------------------------------------------------------------------------------------------------------------
def kl_div(p: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """KL(P || R) summed over H x W for every (b, c).

    Both inputs are clamped at 1e-12 inside the logs, so zeros are safe; P == R gives exactly 0.

    Args:
        p (torch.Tensor): Target distribution (B, C, H, W) (teacher).
        r (torch.Tensor): Approximating distribution (B, C, H, W) (student).

    Returns:
        (torch.Tensor): Float32 (B, C).

    Examples:
        >>> p = attention_distribution(torch.randn(1, 2, 3, 3))
        >>> kl_div(p, p).abs().max().item()
        0.0
    """
    _check_4d(p, "p")
    _check_4d(r, "r")
    with autocast_off(p.device.type):
        p, r = p.float(), r.float()
        return (p * (p.clamp_min(_TINY).log() - r.clamp_min(_TINY).log())).sum(dim=(2, 3))


def js_div(p: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """Jensen-Shannon divergence 0.5 KL(P || M) + 0.5 KL(R || M), M = (P + R) / 2, summed over H x W per (b, c).

    Examples:
        >>> p = attention_distribution(torch.randn(1, 2, 3, 3))
        >>> js_div(p, p).abs().max().item()
        0.0
    """
    _check_4d(p, "p")
    _check_4d(r, "r")
    with autocast_off(p.device.type):
        p, r = p.float(), r.float()
        m = 0.5 * (p + r)
        return 0.5 * kl_div(p, m) + 0.5 * kl_div(r, m)


def divergence(p: torch.Tensor, r: torch.Tensor, kind: str = "kl") -> torch.Tensor:
    """Dispatch to :func:`kl_div` ('kl') or :func:`js_div` ('js'); returns (B, C).

    Examples:
        >>> p = attention_distribution(torch.zeros(1, 1, 2, 2))
        >>> divergence(p, p, "js").shape
        torch.Size([1, 1])
    """
    kind = _check_choice(kind, DIV_KINDS, "divergence")
    return kl_div(p, r) if kind == "kl" else js_div(p, r)


def reduce_point(d: torch.Tensor) -> torch.Tensor:
    """Reduce one supervision point's (B, C) divergences: sum over channels, mean over batch -> scalar.

    :class:`ADALoss` then sums these scalars over the supervision points.

    Examples:
        >>> reduce_point(torch.tensor([[1.0, 2.0], [3.0, 4.0]])).item()
        5.0
    """
    if d.dim() != 2:
        raise ValueError(f"expected (B, C) divergences, got shape {tuple(d.shape)}")
    return d.sum(dim=1).mean(dim=0)


def gradient_share(ada_term: torch.Tensor, det_term: torch.Tensor, features: list) -> torch.Tensor | None:
    """``||dL_ada/dF|| / ||dL_det/dF||`` at the supervised feature maps F (all points together), or None.

    Both gradients are full derivatives (also through later neck layers that read F), computed with
    ``torch.autograd.grad`` on the retained graph: nothing accumulates into parameter ``.grad``, and the training
    backward that follows is unchanged.

    Args:
        ada_term (torch.Tensor): The weighted ADA term as it enters the training loss.
        det_term (torch.Tensor): The detection loss as it enters the training loss.
        features (list[torch.Tensor]): Student feature maps (with graph).

    Returns:
        (torch.Tensor | None): Float32 scalar on the features' device (no host sync), or None when no feature
            requires grad.

    Examples:
        >>> f = torch.ones(1, 1, 2, 2, requires_grad=True)
        >>> float(gradient_share((0.5 * f).sum(), (2 * f).sum(), [f]))
        0.25
    """
    fs = [f for f in features if isinstance(f, torch.Tensor) and f.requires_grad]
    if not fs:
        return None

    def norm(term):
        if not term.requires_grad:
            return torch.zeros((), device=fs[0].device)
        gs = torch.autograd.grad(term, fs, retain_graph=True, allow_unused=True)
        return torch.sqrt(sum((g.float().square().sum() for g in gs if g is not None),
                              torch.zeros((), device=fs[0].device)))

    with autocast_off(fs[0].device.type):
        return norm(ada_term) / norm(det_term).clamp_min(_TINY)


# ----------------------------------------------------------------------------------------------------------------------
# Hooks
# ----------------------------------------------------------------------------------------------------------------------
def _inert_hook(module: nn.Module, inputs: Any, output: Any) -> None:
    """Stand-in for a capture hook in a deep copy or unpickled model: does nothing."""
    return None


def _make_inert_hook() -> Callable[..., None]:
    return _inert_hook


# Checkpoints of attached models store these two by name: pickle them as ``ultralytics_gabfusion.distill.<name>``
# (re-exported there), the name older checkpoints use too, so checkpoints stay readable across versions.
_inert_hook.__module__ = _make_inert_hook.__module__ = __package__


class _CaptureHook:
    """Forward hook storing a layer output in its ADALoss (held by weak reference, never copied or pickled)."""

    __slots__ = ("owner", "key", "layer")

    def __init__(self, owner: "ADALoss", key: int, layer: int) -> None:
        self.owner = weakref.ref(owner)
        self.key = key
        self.layer = layer

    def __call__(self, module: nn.Module, inputs: Any, output: Any) -> None:
        owner = self.owner()
        if owner is not None:
            owner._feats.setdefault(self.key, {})[self.layer] = output

    def __deepcopy__(self, memo: dict) -> Callable[..., None]:
        return _inert_hook  # an EMA copy must not write into the original's feature slot

    def __reduce__(self) -> tuple:
        return _make_inert_hook, ()


# ----------------------------------------------------------------------------------------------------------------------
# Loss objects
# ----------------------------------------------------------------------------------------------------------------------
def _forward_layers(model: nn.Module, x: torch.Tensor, layers: list[int]) -> dict[int, torch.Tensor]:
    """Ultralytics ``_predict_once`` truncated after the last supervision layer (the teacher's head is skipped)."""
    want, last = set(layers), max(layers)
    save = set(getattr(model, "save", ()))
    y: list[Any] = []
    out: dict[int, torch.Tensor] = {}
    for i, m in enumerate(model.model):
        f = getattr(m, "f", -1)
        if f != -1:
            x = y[f] if isinstance(f, int) else [x if j == -1 else y[j] for j in f]
        x = m(x)
        y.append(x if getattr(m, "i", i) in save else None)
        if i in want:
            out[i] = x
        if i >= last:
            break
    return out


class ADALoss:
    """ADA distillation term between a frozen FP teacher and attached students.

    A plain object (not an ``nn.Module``) so the teacher is never registered as a submodule; deep copies are
    ``None`` and pickling raises ``TypeError``.

    Args:
        teacher (nn.Module): FP teacher of the same architecture (frozen here: eval, requires_grad False).
        layers (Iterable[int]): Supervision layer indices (same in teacher and student).
        attn (str): 'simam' (v1) or 'qada' (v2).
        div (str): 'kl' (KL(P || R), teacher P) or 'js'.
        weight (float): Loss weight w (paper 0.01).
        temperature (float, optional): None for sigmoid/sum distributions, T > 0 for softmax(S / T).
        quantizers (Mapping[int, callable], optional): {layer: quantizer or None} for the student's qada residual
            term (ignored by simam; the teacher always has r = 0).
        gamma (float): qada residual weight.
        k (float): qada stabiliser.

    Examples:
        >>> ada = ADALoss(teacher, [17, 20, 23], attn="qada", div="js", quantizers={17: q17}).attach(student)
        >>> _ = student(img)
        >>> weighted, raw = ada(student, img)
    """

    def __init__(
        self,
        teacher: nn.Module,
        layers: Iterable[int],
        attn: str = "simam",
        div: str = "kl",
        weight: float = 0.01,
        temperature: float | None = None,
        quantizers: Mapping[int, Any] | None = None,
        gamma: float = 1.0,
        k: float = QADA_K,
    ) -> None:
        self.attn = _check_choice(attn, ATTN_KINDS, "attention kind (attn)")
        self.div = _check_choice(div, DIV_KINDS, "divergence (div)")
        if not (float(weight) >= 0 and math.isfinite(float(weight))):
            raise ValueError(f"ADA weight must be a finite number >= 0, got {weight!r}")
        if temperature is not None and not (float(temperature) > 0 and math.isfinite(float(temperature))):
            raise ValueError(f"temperature must be a positive number or None, got {temperature!r}")
        teacher = _unwrap(teacher)
        self.layers = check_layer_indices(list(dict.fromkeys(layers)), len(_layers_of(teacher, "teacher")), "teacher")
        if not self.layers:
            raise ValueError("no supervision layers given")
        if has_quant_modules(teacher):
            raise ValueError("teacher must be full precision: it contains fake-quantized modules")
        self.teacher = teacher.eval().requires_grad_(False)
        self.weight = float(weight)
        self.temperature = None if temperature is None else float(temperature)
        self.quantizers = {int(j): q for j, q in (quantizers or {}).items()}
        self.gamma = float(gamma)
        self.k = float(k)
        self._feats: dict[int, dict[int, Any]] = {}  # id(student) -> {layer: output of the last forward}
        self._handles: dict[int, tuple[weakref.ref, list]] = {}  # id(student) -> (model ref, hook handles)

    # -- pickling / copying guards --------------------------------------------------------------------------------
    def __deepcopy__(self, memo: dict) -> None:
        return None

    def __reduce__(self) -> tuple:
        raise TypeError("ADALoss holds the teacher and must never be pickled into a checkpoint")

    def __getstate__(self) -> dict:
        raise TypeError("ADALoss holds the teacher and must never be pickled into a checkpoint")

    # -- hooks ----------------------------------------------------------------------------------------------------
    def attach(self, student: nn.Module) -> "ADALoss":
        """Register capture hooks on ``student.model[j]`` for every supervision layer; returns self.

        Several students (training model, EMA model) can be attached at once; their features are kept apart by
        ``id(model)``. Attaching the same model twice is a no-op.
        """
        m = _unwrap(student)
        key = id(m)
        if key in self._handles:
            ref, _ = self._handles[key]
            if ref() is m:
                return self
            self._drop(key)  # stale entry of a garbage-collected model that reused the id
        seq = _layers_of(m, "student")
        check_layer_indices(self.layers, len(seq), "student")
        handles = [seq[j].register_forward_hook(_CaptureHook(self, key, j)) for j in self.layers]
        self._handles[key] = (weakref.ref(m), handles)
        return self

    def _drop(self, key: int) -> None:
        _, handles = self._handles.pop(key, (None, []))
        for h in handles:
            h.remove()
        self._feats.pop(key, None)

    def detach(self, student: nn.Module | None = None) -> "ADALoss":
        """Remove the hooks of ``student`` (or of every attached student when None) and drop stored features."""
        keys = list(self._handles) if student is None else [id(_unwrap(student))]
        for key in keys:
            self._drop(key)
        return self

    def clear(self, student: nn.Module | None = None) -> None:
        """Drop captured student features (all, or one student's) without removing hooks; frees their memory."""
        if student is None:
            self._feats.clear()
        else:
            self._feats.pop(id(_unwrap(student)), None)

    def is_attached(self, student: nn.Module) -> bool:
        """Whether capture hooks are registered on ``student``."""
        m = _unwrap(student)
        entry = self._handles.get(id(m))
        return entry is not None and entry[0]() is m

    # -- loss -----------------------------------------------------------------------------------------------------
    def teacher_features(self, img: torch.Tensor) -> dict[int, torch.Tensor]:
        """Teacher features at the supervision layers for ``img`` (no grad, eval mode, teacher dtype).

        The teacher is moved to ``img``'s device on first use (the trainer only needs to build it on the CPU).
        """
        t = self.teacher
        dev, dt = _param_like(t)
        if dev != img.device:
            t.to(img.device)
        t.eval()
        # inference mode: no autograd bookkeeping or version counters for the teacher's activations. Its outputs are
        # only read by the ADA arithmetic (never saved for backward), which inference tensors allow outside the mode.
        with torch.inference_mode():
            return _forward_layers(t, img.to(dtype=dt), self.layers)

    def _match_memory_format(self, student: nn.Module) -> None:
        """Give the teacher the student's memory format (channels_last when the trainer set it, on CUDA)."""
        w = next((p for p in student.parameters() if p.dim() == 4), None)
        if w is None:
            return
        fmt = torch.channels_last if not w.is_contiguous() and w.is_contiguous(memory_format=torch.channels_last) \
            else torch.contiguous_format
        if getattr(self, "_teacher_format", None) != fmt:
            self.teacher.to(memory_format=fmt)
            self._teacher_format = fmt

    def _scores(self, x: torch.Tensor, quantizer: Any) -> torch.Tensor:
        if self.attn == "simam":
            return simam_scores(x)
        return qada_scores(x, quantizer=quantizer, k=self.k, gamma=self.gamma)

    def __call__(self, student: nn.Module, img: torch.Tensor, return_features: bool = False) -> tuple:
        """ADA loss for the student's last forward on ``img``.

        The student's captured features are consumed (so a stale forward can never be reused and the memory is
        released after the backward pass).

        Args:
            student (nn.Module): An attached student whose forward on ``img`` has just run.
            img (torch.Tensor): The input batch (B, 3, H, W) that forward saw.

            return_features (bool): Also return the student's supervised feature maps (with their graph), in
                ``self.layers`` order, e.g. to measure gradients at them.

        Returns:
            (tuple): (weight * L, L), float32 scalars; L carries the student's graph; plus the feature list when
                ``return_features``.

        Raises:
            RuntimeError: Hooks not attached, student forward not run, or feature shapes that do not match.
        """
        m = _unwrap(student)
        key = id(m)
        if not self.is_attached(m):
            raise RuntimeError("ADA hooks are not attached to this model: call ADALoss.attach(model) first")
        feats = self._feats.pop(key, None)
        missing = [j for j in self.layers if feats is None or j not in feats]
        if missing:
            raise RuntimeError(
                f"no student features captured at layers {missing}: run the student forward on this batch "
                f"before computing the ADA loss (features are consumed by each ADA call)"
            )
        self._match_memory_format(m)
        tfeats = self.teacher_features(img)
        with autocast_off(img.device.type):
            total = None
            for j in self.layers:
                fs, ft = feats[j], tfeats[j]
                if not isinstance(fs, torch.Tensor) or fs.dim() != 4:
                    raise RuntimeError(f"student layer {j} output is not a (B, C, H, W) feature map")
                if fs.shape != ft.shape:
                    raise RuntimeError(
                        f"ADA feature shapes differ at layer {j}: teacher {tuple(ft.shape)}, student "
                        f"{tuple(fs.shape)} (was the student forward run on this img? is the teacher the right model?)"
                    )
                fs = fs.float()
                ft = ft.to(device=fs.device, dtype=torch.float32)
                p = attention_distribution(self._scores(ft, None), self.temperature)
                r = attention_distribution(self._scores(fs, self.quantizers.get(j)), self.temperature)
                d = reduce_point(divergence(p, r, self.div))
                total = d if total is None else total + d
        if return_features:
            return self.weight * total, total, [feats[j] for j in self.layers]
        return self.weight * total, total

    def __repr__(self) -> str:
        return (
            f"ADALoss(layers={self.layers}, attn={self.attn!r}, div={self.div!r}, weight={self.weight}, "
            f"temperature={self.temperature}, gamma={self.gamma}, k={self.k}, attached={len(self._handles)})"
        )


class ADACriterion:
    """Ultralytics detection criterion plus the ADA term (the segmentation and pose criteria work the same way).

    ``base(preds, batch)`` returns ``(loss_vec * batch_size, items)`` with ``loss_vec`` = (box, cls, dfl) and
    ``items`` = {"box_loss", "cls_loss", "dfl_loss"} (``v8DetectionLoss`` in ultralytics 8.4.190). This wrapper
    returns ``cat(loss_vec * batch_size, [batch_size * weight * L_ADA])`` (so ``loss.sum()`` = det + bs * w * L)
    and ``items`` with an extra detached ``"ada_loss"`` = w * L. Unknown attributes are read from ``base``.

    In training it also measures ADA's share of the gradient at the supervised features (:func:`gradient_share`,
    on the first batch after each :meth:`pop_grad_share` and every ``GRAD_SHARE_EVERY``-th batch after it: two
    partial backward passes each time), read per epoch with :meth:`pop_grad_share`.

    Args:
        base (callable): The task criterion (e.g. ``model.init_criterion()``: ``v8DetectionLoss``,
            ``v8SegmentationLoss``, ``v8PoseLoss``; their loss vectors differ, the wrapper only appends to them).
        ada (ADALoss): The ADA loss, attached to ``student``.
        student (nn.Module): The model whose forward produced ``preds``.

    Examples:
        >>> model.criterion = ADACriterion(model.init_criterion(), ada.attach(model), model)
        >>> loss, items = model.loss(batch)
        >>> trainer_log["ada_ratio"] = model.criterion.pop_ratio()
    """

    def __init__(self, base: Callable, ada: ADALoss, student: nn.Module) -> None:
        self.base = base
        self.ada = ada
        self.student = _unwrap(student)
        self._ratio_sum: torch.Tensor | None = None
        self._ratio_n = 0
        self._share_sum: torch.Tensor | None = None
        self._share_n = 0
        self._train_calls = 0  # training calls since the last pop_grad_share (decides which batches are measured)
        self.weighted_sum, self.calls = 0.0, 0  # unrounded mean of the weighted term (Ultralytics logs 5 decimals)

    def __deepcopy__(self, memo: dict) -> None:
        return None

    def __reduce__(self) -> tuple:
        raise TypeError("ADACriterion holds the ADA teacher and must never be pickled into a checkpoint")

    def __getstate__(self) -> dict:
        raise TypeError("ADACriterion holds the ADA teacher and must never be pickled into a checkpoint")

    def __getattr__(self, name: str) -> Any:
        # only reached for attributes not found normally; guard 'base' itself (e.g. during a failed unpickle)
        if name == "base" or name.startswith("__"):
            raise AttributeError(name)
        return getattr(self.base, name)

    def update(self) -> None:
        """Pass-through to ``base.update()`` when the base criterion has one (e.g. E2E loss schedules)."""
        if hasattr(self.base, "update"):
            self.base.update()

    def __call__(self, preds: Any, batch: dict[str, Any]) -> tuple[torch.Tensor, Any]:
        """Detection loss with the ADA term appended; see the class docstring for the format."""
        loss, items = self.base(preds, batch)
        img = batch["img"]
        bs = img.shape[0]
        det = loss.reshape(-1)
        if self.ada.weight == 0:
            self.ada.clear(self.student)  # consume the features like a real call would, skip the teacher forward
            weighted = torch.zeros((), device=loss.device, dtype=torch.float32)
        else:
            weighted, _, feats = self.ada(self.student, img, return_features=True)
            if self.student.training and torch.is_grad_enabled():
                if self._train_calls % GRAD_SHARE_EVERY == 0:
                    share = gradient_share(weighted * bs, det.sum(), feats)
                    if share is not None:
                        share = share.detach()
                        self._share_sum = share if self._share_sum is None else self._share_sum + share
                        self._share_n += 1
                self._train_calls += 1
        ada_total = (weighted * bs).to(device=loss.device, dtype=loss.dtype).reshape(1)
        ratio = ada_total.detach()[0] / det.detach().sum().abs().clamp_min(_TINY)
        self._ratio_sum = ratio if self._ratio_sum is None else self._ratio_sum + ratio  # no host sync per step
        self._ratio_n += 1
        if not self.student.training:  # validation: keep the exact mean (one host sync per val batch only)
            self.weighted_sum += float(weighted)
            self.calls += 1
        if isinstance(items, dict):
            items = {**items, "ada_loss": weighted.detach().to(loss.device)}
        elif isinstance(items, torch.Tensor):
            items = torch.cat((items.reshape(-1), weighted.detach().to(items).reshape(1)))
        return torch.cat((det, ada_total)), items

    def pop_ratio(self) -> float | None:
        """Mean of weighted ADA / detection loss over the calls since the last pop (None if none); resets it."""
        if self._ratio_n == 0 or self._ratio_sum is None:
            return None
        value = float(self._ratio_sum) / self._ratio_n
        self._ratio_sum, self._ratio_n = None, 0
        return value

    def pop_grad_share(self) -> float | None:
        """Mean gradient share ``||dL_ada/dF|| / ||dL_det/dF||`` over the measured batches since the last pop.

        None if none was measured; resets the mean and the batch counter (the next batch is measured).
        """
        value = None if self._share_n == 0 or self._share_sum is None else float(self._share_sum) / self._share_n
        self._share_sum, self._share_n, self._train_calls = None, 0, 0
        return value

    def __repr__(self) -> str:
        return f"ADACriterion(base={type(self.base).__name__}, ada={self.ada!r})"
