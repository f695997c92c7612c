"""Precision helpers shared by the quantizers, GABFusion and ADA: float32 state and float32 arithmetic under AMP.

Ultralytics saves checkpoints as ``deepcopy(ema).half()`` and trains under autocast. Quantizer steps, GABFusion's
``lam`` and LayerNorm affine, and ADA's statistics (variances, logs of ratios) lose too much in float16, so the
modules holding them keep their own tensors in float32 (:class:`KeepFP32`) and compute with autocast off
(:func:`autocast_off`).
"""

from __future__ import annotations

import contextlib

import torch

LOW_PRECISION = (torch.float16, torch.bfloat16)


def autocast_off(device_type: str):
    """A context that disables autocast on ``device_type`` (a no-op context where autocast does not know the device).

    Examples:
        >>> with autocast_off("cpu"):
        ...     y = torch.ones(2) * 3
    """
    available = getattr(torch.amp, "is_autocast_available", None)  # torch >= 2.4
    if available is not None and not available(device_type):
        return contextlib.nullcontext()
    try:
        return torch.autocast(device_type=device_type, enabled=False)
    except (RuntimeError, ValueError):
        return contextlib.nullcontext()


class KeepFP32:
    """Mixin for ``nn.Module``: ``.half()`` / ``.bfloat16()`` leave the module's own float32 tensors in float32.

    Float32 parameters and buffers are restored bit-exactly from their originals after ``fn`` (only its device move
    is kept); a tensor of another dtype that ``fn`` made float16/bfloat16 is cast up to float32. Device moves and
    float64 are untouched; children handle their own tensors. ``fp32_names`` limits this to the named tensors
    (None: all of the module's own parameters and buffers).
    """

    fp32_names: tuple[str, ...] | None = None

    def _apply(self, fn, recurse=True):
        with kept_fp32(self, self.fp32_names):
            return super()._apply(fn, recurse)


@contextlib.contextmanager
def kept_fp32(module: torch.nn.Module, names: tuple[str, ...] | None = None):
    """Inside the block, ``module``'s own float32 tensors may be cast (``.half()``); on exit they are float32 again.

    Restored bit-exactly from the originals (only a device move is kept); a tensor that was not float32 before and
    is float16/bfloat16 now is cast up to float32. ``names`` limits this to the named parameters and buffers.

    Examples:
        >>> bn = torch.nn.BatchNorm2d(4)
        >>> with kept_fp32(bn):
        ...     _ = bn.half()
        >>> bn.weight.dtype
        torch.float32
    """
    own = [("p", k, t) for k, t in module._parameters.items()] + [("b", k, t) for k, t in module._buffers.items()]
    own = [(kind, k, t) for kind, k, t in own if t is not None and (names is None or k in names)]
    # detach() now: nn.Module._apply may swap a Parameter's data in place; the alias keeps the fp32 storage
    keep = {(kind, k): t.detach() for kind, k, t in own if t.dtype == torch.float32}
    yield module
    for kind, k, _ in own:
        new = module._parameters[k] if kind == "p" else module._buffers[k]
        if new is None or new.dtype not in LOW_PRECISION:
            continue
        old = keep.get((kind, k))
        restored = old.to(device=new.device) if old is not None else new.detach().float()
        if kind == "p":
            new.data = restored
            if new.grad is not None and new.grad.dtype in LOW_PRECISION:
                new.grad = new.grad.float()
        else:
            module._buffers[k] = restored


__all__ = ["LOW_PRECISION", "KeepFP32", "autocast_off", "kept_fp32"]
