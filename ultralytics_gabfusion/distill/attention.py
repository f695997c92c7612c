"""Attention maps of ADA: per-channel spatial attention distributions of (B, C, H, W) feature maps.

A feature map X is turned into a pre-sigmoid score S (:func:`attention_scores`), then into a distribution over the
H x W positions of every (image, channel) pair (:func:`attention_distribution`).

Attention kinds:
    * ``simam`` (v1): E = (x - mu)^2 / (4 (var + 1e-4)) + 0.5 per channel (var over H x W with n = HW - 1).
    * ``qada`` (v2): S = log(1 + z^2) + gamma * log(1 + r^2) with z = |x - mu_c| / (sigma_c + k) and
      r = |x - Q(x)| / (s_c + k); r = 0 for the FP teacher. ``k`` is not given by the paper: we use
      ``QADA_K = 1e-4``, the same stabiliser SimAM uses, small next to typical feature deviations and quantizer
      steps (>= 1e-3) so it only guards against division by zero. Q(x) is evaluated under ``torch.no_grad`` with
      the quantizer temporarily in eval mode (so observers / running statistics are not updated twice) and is
      treated as a constant target: gradients reach the student feature through ``x`` in ``x - Q(x)`` but never
      the quantizer's parameters (the quantizer is trained by the detection loss through its own STE).

Distributions: P = sigmoid(S) / sum_hw sigmoid(S) as in the paper, or softmax(S / T) over H x W with a temperature
T > 0 (sharper: sigmoid of a non-negative score lies in [0.5, 1), so the paper's distributions are close to uniform).

Numerics: every function here computes in float32 with autocast disabled (AMP safe).
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch

from ..precision import autocast_off
from ..settings import ADA_ATTNS

__all__ = [
    "ATTN_KINDS",
    "QADA_K",
    "SIMAM_LAMBDA",
    "attention_distribution",
    "attention_scores",
    "qada_attention",
    "qada_scores",
    "simam_attention",
    "simam_scores",
]

ATTN_KINDS = ADA_ATTNS  # the ada_attn choices of settings
SIMAM_LAMBDA = 1e-4  # SimAM's regulariser lambda in E = (x-mu)^2 / (4 (var + lambda)) + 0.5
QADA_K = 1e-4  # Q-ADA stabiliser k (paper gives no value; see module docstring)
_TINY = 1e-12  # floor inside logs, square roots and denominators (shared with the divergences)


def _check_4d(x: torch.Tensor, name: str = "x") -> None:
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{name} must be a (B, C, H, W) feature map, got {shape}")


def _channel_stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-(sample, channel) mean and unbiased variance over H x W (n = HW - 1, floored at 1 for 1x1 maps)."""
    n = max(x.shape[2] * x.shape[3] - 1, 1)
    mu = x.mean(dim=(2, 3), keepdim=True)
    var = (x - mu).pow(2).sum(dim=(2, 3), keepdim=True) / n
    return mu, var


def simam_scores(x: torch.Tensor) -> torch.Tensor:
    """SimAM energy-based importance E: the pre-sigmoid score of the v1 ``simam`` attention.

    E = (x - mu)^2 / (4 (var + 1e-4)) + 0.5 with mu, var per (sample, channel) over H x W and n = HW - 1.

    Args:
        x (torch.Tensor): Feature map (B, C, H, W), any float dtype.

    Returns:
        (torch.Tensor): Float32 scores E >= 0.5, same shape as ``x``.

    Examples:
        >>> E = simam_scores(torch.randn(2, 8, 4, 4))
        >>> bool((E >= 0.5).all())
        True
    """
    _check_4d(x)
    with autocast_off(x.device.type):
        x = x.float()
        mu, var = _channel_stats(x)
        return (x - mu).pow(2) / (4 * (var + SIMAM_LAMBDA)) + 0.5


def simam_attention(x: torch.Tensor) -> torch.Tensor:
    """SimAM attention A = sigmoid(E) (v1 ADA).

    Args:
        x (torch.Tensor): Feature map (B, C, H, W).

    Returns:
        (torch.Tensor): Float32 attention in [0.5, 1), same shape as ``x``.

    Examples:
        >>> A = simam_attention(torch.randn(1, 4, 8, 8))
        >>> bool(((A >= 0.5) & (A <= 1)).all())
        True
    """
    return torch.sigmoid(simam_scores(x))


def _quantizer_step(quantizer: Any, step: Any, like: torch.Tensor) -> torch.Tensor | None:
    """Return the quantizer step broadcastable to ``like`` (B, C, H, W), or None when none exists."""
    if step is None and quantizer is not None and callable(getattr(quantizer, "step_size", None)):
        with torch.no_grad():
            step = quantizer.step_size()
    if step is None:
        return None
    s = torch.as_tensor(step).detach().to(device=like.device, dtype=torch.float32)
    if s.numel() == 1:
        return s.reshape(1, 1, 1, 1)
    if s.numel() == like.shape[1]:
        return s.reshape(1, -1, 1, 1)  # per-channel step
    raise ValueError(f"quantizer step has {s.numel()} elements; expected 1 or {like.shape[1]} (one per channel)")


def _quantize_detached(quantizer: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """Evaluate Q(x) as a constant: no grad, and quantizer modules temporarily in eval mode.

    Eval mode keeps training-time side effects (observers, running ranges, lazy init) from firing a second time
    on the same batch; the flags are restored afterwards.
    """
    modules = list(quantizer.modules()) if callable(getattr(quantizer, "modules", None)) else []
    flags = [m.training for m in modules]
    for m in modules:
        m.training = False  # set the flag directly: an overridden .eval()/.train() could have side effects
    try:
        with torch.no_grad():
            q = quantizer(x)
    finally:
        for m, f in zip(modules, flags):
            m.training = f
    if not isinstance(q, torch.Tensor) or q.shape != x.shape:
        raise ValueError("the qada quantizer must return a tensor shaped like its input (fake-quantized x)")
    return q.detach().float()


def qada_scores(
    x: torch.Tensor,
    step: torch.Tensor | float | None = None,
    quantizer: Callable[[torch.Tensor], torch.Tensor] | None = None,
    k: float = QADA_K,
    gamma: float = 1.0,
) -> torch.Tensor:
    """Q-ADA score S: the pre-sigmoid score of the v2 ``qada`` attention.

    z = |x - mu_c| / (sigma_c + k); r = |x - Q(x)| / (s_c + k); S = log(1 + z^2) + gamma * log(1 + r^2).
    mu_c, sigma_c per (sample, channel) over H x W (sigma from the n = HW - 1 variance). r = 0 when ``quantizer`` is
    None (FP teacher). s_c is ``step`` if given, else ``quantizer.step_size()`` if the quantizer has one (shape (1,)
    or (C,)), else sigma_c. Q(x) is a detached target (see module docstring), so the residual carries gradient to
    ``x`` only.

    Args:
        x (torch.Tensor): Feature map (B, C, H, W).
        step (torch.Tensor | float, optional): Quantizer step overriding ``quantizer.step_size()``.
        quantizer (callable, optional): Fake quantizer returning Q(x) shaped like ``x``.
        k (float): Stabiliser added to sigma_c and s_c (default ``QADA_K`` = 1e-4).
        gamma (float): Weight of the quantization-residual term.

    Returns:
        (torch.Tensor): Float32 scores S >= 0, same shape as ``x``.

    Examples:
        >>> x = torch.randn(1, 2, 4, 4)
        >>> fq = lambda t: torch.round(t / 0.5) * 0.5
        >>> S = qada_scores(x, step=0.5, quantizer=fq)
        >>> S.shape
        torch.Size([1, 2, 4, 4])
    """
    _check_4d(x)
    with autocast_off(x.device.type):
        x = x.float()
        mu, var = _channel_stats(x)
        # clamp before sqrt: a constant channel (var = 0) would otherwise give an infinite sqrt gradient
        sigma = var.clamp_min(_TINY).sqrt()
        z = (x - mu).abs() / (sigma + k)
        s = torch.log1p(z * z)
        if quantizer is not None:
            q = _quantize_detached(quantizer, x)
            sc = _quantizer_step(quantizer, step, x)
            sc = sigma.detach() if sc is None else sc
            r = (x - q).abs() / (sc + k)
            s = s + gamma * torch.log1p(r * r)
        return s


def qada_attention(
    x: torch.Tensor,
    step: torch.Tensor | float | None = None,
    quantizer: Callable[[torch.Tensor], torch.Tensor] | None = None,
    k: float = QADA_K,
    gamma: float = 1.0,
) -> torch.Tensor:
    """Q-ADA attention A = sigmoid(S) (v2 ADA); arguments as in :func:`qada_scores`.

    Examples:
        >>> A = qada_attention(torch.randn(1, 4, 8, 8))  # FP teacher: r = 0
        >>> bool((A >= 0.5).all())
        True
    """
    return torch.sigmoid(qada_scores(x, step=step, quantizer=quantizer, k=k, gamma=gamma))


def _check_choice(value: str, allowed: tuple[str, ...], what: str) -> str:
    v = str(value).lower()
    if v not in allowed:
        raise ValueError(f"unknown {what} {value!r}; allowed values: {', '.join(allowed)}")
    return v


def attention_scores(
    x: torch.Tensor,
    kind: str = "simam",
    *,
    step: torch.Tensor | float | None = None,
    quantizer: Callable[[torch.Tensor], torch.Tensor] | None = None,
    k: float = QADA_K,
    gamma: float = 1.0,
) -> torch.Tensor:
    """Pre-sigmoid attention score S of ``kind`` ('simam' or 'qada').

    ``step``, ``quantizer``, ``k`` and ``gamma`` only matter for 'qada' (see :func:`qada_scores`).

    Examples:
        >>> attention_scores(torch.randn(1, 2, 4, 4), "simam").shape
        torch.Size([1, 2, 4, 4])
    """
    kind = _check_choice(kind, ATTN_KINDS, "attention kind")
    if kind == "simam":
        return simam_scores(x)
    return qada_scores(x, step=step, quantizer=quantizer, k=k, gamma=gamma)


def attention_distribution(scores: torch.Tensor, temperature: float | None = None) -> torch.Tensor:
    """Per-channel spatial distribution from pre-sigmoid scores S.

    ``temperature=None`` (paper): P = sigmoid(S) / sum_hw sigmoid(S). ``temperature=T > 0`` (sharper option):
    P = softmax(S / T) over H x W. Takes scores rather than attentions so both options share one input.

    Args:
        scores (torch.Tensor): Scores (B, C, H, W) from :func:`attention_scores`.
        temperature (float, optional): Softmax temperature; None for the paper's normalised sigmoid.

    Returns:
        (torch.Tensor): Float32 (B, C, H, W), non-negative, summing to 1 over H x W for every (b, c).

    Examples:
        >>> P = attention_distribution(simam_scores(torch.randn(2, 3, 5, 5)))
        >>> torch.allclose(P.sum(dim=(2, 3)), torch.ones(2, 3))
        True
    """
    _check_4d(scores, "scores")
    if temperature is not None and not (float(temperature) > 0 and math.isfinite(float(temperature))):
        raise ValueError(f"temperature must be a positive number or None, got {temperature!r}")
    with autocast_off(scores.device.type):
        s = scores.float()
        b, c, h, w = s.shape
        if temperature is None:
            a = torch.sigmoid(s)
            return a / a.sum(dim=(2, 3), keepdim=True).clamp_min(_TINY)
        return torch.softmax(s.reshape(b, c, h * w) / float(temperature), dim=-1).reshape(b, c, h, w)
