"""One probe forward pass over a model: a constant image, hooks on every conv, eval mode, flags restored.

Used by the activation-grid analysis (:func:`.grids.input_lower_bounds`) and the BOPs model
(:mod:`.mixed`), which both read what each ``nn.Conv2d`` sees in a single forward pass.

Examples:
    >>> seen = []
    >>> with conv_hooks(model, lambda name: lambda m, args: seen.append(name), pre=True):  # doctest: +SKIP
    ...     model(probe_image(model, 64))
"""

from __future__ import annotations

import contextlib
from typing import Callable

import torch
import torch.nn as nn


def probe_image(model: nn.Module, imgsz: int, value: float = 0.0) -> torch.Tensor:
    """A ``(1, ch, imgsz, imgsz)`` image filled with ``value``, on the model's device and in its float dtype."""
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    yml = getattr(model, "yaml", None)
    ch = int(yml.get("channels", 3) or 3) if isinstance(yml, dict) else 3
    return torch.full((1, ch, imgsz, imgsz), float(value), device=device, dtype=dtype)


@contextlib.contextmanager
def conv_hooks(model: nn.Module, make_hook: Callable[[str], Callable], pre: bool = False):
    """Within the context: ``make_hook(name)`` hooked on every ``nn.Conv2d`` (a forward pre-hook when ``pre``) and the
    model in eval mode (BatchNorm statistics untouched); afterwards the hooks are removed and every module's
    train/eval flag is restored, also when the forward raised."""
    convs = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    handles = [(m.register_forward_pre_hook if pre else m.register_forward_hook)(make_hook(n)) for n, m in convs]
    flags = {m: m.training for m in model.modules()}
    model.eval()
    try:
        yield
    finally:
        for h in handles:
            h.remove()
        for m, f in flags.items():
            m.training = f


__all__ = ["conv_hooks", "probe_image"]
