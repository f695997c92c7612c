"""Fake quantizers for very-low-bit QAT (LSQ, LSQ+, PACT/DoReFa, N2UQ); see docs/method.md section 4."""

from .lsq import LSQPlusQuantizer, LSQQuantizer
from .n2uq import N2UQQuantizer
from .pact import PACTQuantizer
from .quantizers import FakeQuantizer, make_quantizer

__all__ = [
    "FakeQuantizer",
    "make_quantizer",
    "LSQQuantizer",
    "LSQPlusQuantizer",
    "PACTQuantizer",
    "N2UQQuantizer",
]
