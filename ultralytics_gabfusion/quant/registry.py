"""The quantizer factory: method names -> fake-quantizer classes (the method modules never import this one).

To add a quantizer: subclass :class:`.quantizers.FakeQuantizer` in a module of its own, add it to ``QUANTIZERS``
below and its name to ``settings.QUANT_METHODS``.

Examples:
    >>> from ultralytics_gabfusion.quant.registry import make_quantizer
    >>> make_quantizer("lsq", "weight", 4, channels=16)
    LSQQuantizer(method='lsq', role='weight', bits=4, signed=True, channels=16)
"""

from __future__ import annotations

import difflib

from ..settings import QUANT_METHODS
from .lsq import LSQPlusQuantizer, LSQQuantizer
from .n2uq import N2UQQuantizer
from .pact import PACTQuantizer
from .quantizers import FakeQuantizer

QUANTIZERS: dict[str, type[FakeQuantizer]] = {
    "lsq": LSQQuantizer,
    "lsqplus": LSQPlusQuantizer,
    "pact": PACTQuantizer,
    "n2uq": N2UQQuantizer,
}
assert tuple(QUANTIZERS) == QUANT_METHODS, "settings.QUANT_METHODS and QUANTIZERS must list the same methods"

# Methods whose activation quantizer takes ``act_zp`` (an affine grid offset that can sit on an integer zero point);
# N2UQ's thresholds have no such offset.
ACT_ZP_METHODS = ("lsq", "lsqplus", "pact")

# Spelling variants accepted by the factory; everything is normalised to QUANT_METHODS.
_METHOD_ALIASES = {"lsq+": "lsqplus", "lsq_plus": "lsqplus", "lsq-plus": "lsqplus"}


def check_method(method) -> str:
    """Normalise a quantizer method name (``"LSQ+"`` -> ``"lsqplus"``); raise ValueError naming the allowed ones."""
    name = _METHOD_ALIASES.get(str(method).strip().lower(), str(method).strip().lower())
    if name not in QUANTIZERS:
        hint = difflib.get_close_matches(str(method).lower(), QUANT_METHODS, n=1)
        hint = f" (did you mean {hint[0]!r}?)" if hint else ""
        raise ValueError(f"unknown quantizer method {method!r}{hint}; allowed methods: {', '.join(QUANT_METHODS)}")
    return name


def make_quantizer(
    method: str, role: str, bits: int, channels: int = 0, signed: bool = True, **kwargs
) -> FakeQuantizer:
    """Build a fake quantizer.

    Args:
        method: ``"lsq"``, ``"lsqplus"`` (alias ``"lsq+"``), ``"pact"`` (weights: DoReFa) or ``"n2uq"``.
        role: ``"weight"`` or ``"act"`` (alias ``"activation"``).
        bits: integer bit-width in 2..8.
        channels: 0 = per-tensor; C > 0 = per-channel along dim 0 (weights: ``weight.shape[0]``).
        signed: signed integer grid ``[-2^(b-1), 2^(b-1)-1]`` or unsigned ``[0, 2^b-1]``.
        **kwargs: method-specific options forwarded to the class (e.g. N2UQ ``weight_grad``; LSQ/PACT
            ``fixed_offset``; LSQ, LSQ+ and PACT ``act_zp``, see :data:`ACT_ZP_METHODS`).

    Returns:
        FakeQuantizer: an uninitialised quantizer (it initialises from its first input, or call ``init_from``).

    Raises:
        ValueError: unknown method/role, bits not an integer in 2..8, negative channels.
    """
    return QUANTIZERS[check_method(method)](role=role, bits=bits, channels=channels, signed=signed, **kwargs)


__all__ = ["ACT_ZP_METHODS", "QUANTIZERS", "check_method", "make_quantizer"]
