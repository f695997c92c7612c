"""What keeps a QAT run from falling below its post-training-quantized start: BatchNorm handling and the EMA ramp.

QAT starts from a trained model whose BatchNorm running statistics and weights already fit each other. Three things
in Ultralytics' from-scratch training loop can undo that in the first epochs of a short fine-tuning run; each has a
plugin key (see ``docs/RESULTS.md`` section 15 for what each costs or gains):

- ``qat_bn_recalib=N`` (default 8): the BatchNorm statistics are re-estimated on ``N`` training batches (a plain
  average, quantizers on) at step 0 and, on the EMA model, before each validation, so they describe the quantized
  network that is validated. Ultralytics' running statistics are a momentum average over the last ~30 batches, taken
  while the weights moved; early in QAT that lag alone cost up to 11 mAP50 points.
- ``qat_bn=freeze``: BatchNorm layers normalise with their running statistics in training too (eval mode) and never
  update them after step 0. The training forward is then exactly the forward that is validated and deployed.
- ``qat_ema_tau=T``: the time constant (optimizer updates) of ``ModelEMA``'s decay ramp. Ultralytics' 2000 suits
  runs of many thousands of updates; a 10-epoch fine-tuning run of a few hundred updates then validates the raw
  weights. ``auto`` sizes the ramp to the run, so that the EMA averages about its last tenth.

Examples:
    >>> import torch.nn as nn
    >>> from ultralytics_gabfusion.stability import freeze_bn_stats
    >>> m = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)).train()
    >>> freeze_bn_stats(m)
    1
    >>> m[1].training, m[0].training
    (False, True)
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from .quant.qconv import quantizers_disabled

__all__ = ["freeze_bn_stats", "recalibrate_bn", "shift_bn_statistics", "bn_statistics", "fp_bn_statistics", "ema_decay",
           "auto_ema_tau", "BN_MODES"]

BN_MODES = ("train", "freeze")
EMA_MAX_DECAY = 0.9999  # Ultralytics' ModelEMA default
DEAD_VAR_RATIO = 0.01  # a re-estimated variance under 1 % of the previous one marks a channel quantization made constant


def _batchnorms(model: nn.Module):
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]


def freeze_bn_stats(model: nn.Module) -> int:
    """Put every BatchNorm of ``model`` in eval mode: running statistics used and kept, affine still trained.

    Args:
        model (nn.Module): Model already in train mode (call after ``model.train()``).

    Returns:
        (int): Number of BatchNorm layers frozen.
    """
    bns = _batchnorms(model)
    for m in bns:
        m.eval()
    return len(bns)


@torch.no_grad()
def recalibrate_bn(model: nn.Module, images) -> int:
    """Re-estimate the BatchNorm running statistics of ``model`` from ``images`` (plain average over the batches).

    The model runs in train mode (batch statistics, quantizers on, no gradients); each BatchNorm's running mean and
    variance are reset and accumulated with ``momentum=None`` (a cumulative average), then momentum and the train/eval
    flags of every module are restored. Channels whose new variance is below the layer's ``eps`` or below 1 % of the
    previous one (an input quantization made (nearly) constant, e.g. every value rounded to one level), or not
    finite, keep their previous statistics. Nothing else changes:
    quantizer parameters are not re-initialised.

    Args:
        model (nn.Module): The model whose statistics are re-estimated (normally the EMA model before validation).
        images (Iterable[torch.Tensor]): Image batches, float in [0, 1] or uint8 in [0, 255] (scaled here, batch by
            batch, so a cached uint8 set never exists on the device as float); moved to the model's device.

    Returns:
        (int): Number of batches used (0 leaves the model untouched).

    Examples:
        >>> import torch, torch.nn as nn
        >>> m = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4))
        >>> recalibrate_bn(m, [torch.rand(2, 3, 8, 8)])
        1
    """
    bns = _batchnorms(model)
    if not bns:
        return 0
    flags = {m: m.training for m in model.modules()}
    momenta = {m: m.momentum for m in bns}
    saved = {m: (m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone()) for m in bns}
    try:
        model.train()
        for m in bns:
            m.reset_running_stats()
            m.momentum = None
        param = next(model.parameters(), None)
        n = 0
        for x in images:
            if param is not None:
                x = x.to(param.device)
            x = x.float() / 255 if x.dtype == torch.uint8 else x
            model(x.to(param.dtype) if param is not None else x)
            n += 1
    finally:
        for m, mom in momenta.items():
            m.momentum = mom
        for m, t in flags.items():
            m.training = t
    for m, (mean, var, count) in saved.items():
        if n == 0:  # nothing seen: put the statistics back as they were
            m.running_mean.copy_(mean)
            m.running_var.copy_(var)
            m.num_batches_tracked.copy_(count)
            continue
        # A channel whose quantized input is (nearly) constant (everything rounded to one or two levels) re-estimates a
        # variance of ~0; normalising with it would amplify any later difference (another image, float rounding in an
        # exported file) by up to 1/sqrt(eps). Such channels (variance below eps or below 1 % of what it was), and
        # non-finite ones, keep the statistics they had.
        keep = (~torch.isfinite(m.running_var) | ~torch.isfinite(m.running_mean) | (m.running_var < m.eps)
                | (m.running_var < DEAD_VAR_RATIO * var))
        if keep.any():
            m.running_mean.copy_(torch.where(keep, mean, m.running_mean))
            m.running_var.copy_(torch.where(keep, var, m.running_var))
    return n


def bn_statistics(model: nn.Module) -> dict:
    """A copy of every BatchNorm's running statistics: ``{module: (running_mean, running_var)}``."""
    return {m: (m.running_mean.clone(), m.running_var.clone()) for m in _batchnorms(model)}


@torch.no_grad()
def fp_bn_statistics(model: nn.Module, images) -> dict:
    """The BatchNorm statistics of ``model`` with its quantizers off, re-estimated on ``images``.

    The model's own statistics are left as they were. Empty when ``images`` holds no batch.
    """
    saved = bn_statistics(model)
    with quantizers_disabled(model):
        n = recalibrate_bn(model, images)
    fp = bn_statistics(model) if n else {}
    _load_bn_statistics(saved)
    return fp


def _load_bn_statistics(stats: dict) -> None:
    for m, (mean, var) in stats.items():
        m.running_mean.copy_(mean)
        m.running_var.copy_(var)


@torch.no_grad()
def shift_bn_statistics(model: nn.Module, images, base: dict, fp: dict | None = None) -> int:
    """Step-0 re-estimation of a quantized model with trained statistics: ``base`` moved by the quantization shift.

    A plain re-estimation (:func:`recalibrate_bn`) replaces statistics that training averaged over a whole run with an
    estimate from a few augmented batches; where quantization changes little (W8A8) that sampling noise is all it
    adds, and it cost a trained detector 0.3 mAP50 and 13 % of its detections at W8A8 (docs/RESULTS.md 16). Here the
    same batches are run twice, quantizers off and on, and only the difference is applied to the trained statistics:
    ``mean = base_mean + (mean_q - mean_fp)``, ``var = base_var * var_q / var_fp``. At 8 bits the shift is ~0 and the
    model keeps its trained statistics; at 4 and 3 bits it carries the change that quantization makes.

    Args:
        model (nn.Module): A quantized model (its BatchNorm statistics are overwritten).
        images (Iterable[torch.Tensor]): Image batches, as for :func:`recalibrate_bn`.
        base (dict): :func:`bn_statistics` of the model before any re-estimation (the trained FP statistics).
        fp (dict | None): :func:`fp_bn_statistics` of the model on ``images``, when the caller already has it (the
            weights have not changed since); estimated here when None.

    Returns:
        (int): Number of batches used (0 leaves the model untouched).

    Examples:
        >>> import torch, torch.nn as nn
        >>> m = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4))
        >>> base = bn_statistics(m)
        >>> shift_bn_statistics(m, [torch.rand(2, 3, 8, 8)], base)  # no quantizers: no shift, statistics kept
        1
        >>> torch.equal(m[1].running_var, base[m[1]][1])
        True
    """
    images = list(images)
    fp = fp_bn_statistics(model, images) if fp is None else fp
    if not fp:
        return 0
    _load_bn_statistics(fp)  # channels made constant by quantization keep the FP estimate: no shift for them
    n = recalibrate_bn(model, images)
    for m, (mean_fp, var_fp) in fp.items():
        if m not in base:
            continue
        mean0, var0 = base[m]
        ok = var_fp > m.eps
        m.running_mean.copy_(torch.where(ok, mean0 + (m.running_mean - mean_fp), mean0))
        m.running_var.copy_(torch.where(ok, var0 * m.running_var / var_fp.clamp_min(m.eps), var0))
    return n


def auto_ema_tau(total_updates: int) -> float:
    """``qat_ema_tau=auto``: the ramp whose averaging window at the run's end is about a tenth of the run.

    Without the 0.9999 cap, ``d(x) = 1 - exp(-x / tau)`` averages over ``1 / (1 - d) = exp(x / tau)`` updates, so
    ``tau = T / ln(T / 10)`` gives a window of ``T / 10`` at the last update ``T`` (``tau = T`` for runs under ~27
    updates, where the window cannot shrink further). Too small a ``tau`` would freeze the EMA early in the run.

    Examples:
        >>> round(auto_ema_tau(80), 1)
        38.5
    """
    t = max(float(total_updates), 1.0)
    return t / max(math.log(t / 10.0), 1.0)


def ema_decay(tau: float, max_decay: float = EMA_MAX_DECAY):
    """Ultralytics' EMA decay ramp ``d(x) = max_decay * (1 - exp(-x / tau))`` with time constant ``tau``.

    Examples:
        >>> round(ema_decay(10.0)(10), 4)
        0.6321
    """
    tau = float(tau)
    return lambda x: max_decay * (1 - math.exp(-x / tau))
