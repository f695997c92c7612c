"""Fake quantizers for very-low-bit QAT (LSQ, LSQ+, PACT/DoReFa, N2UQ), the quantized conv and the model swap."""

from .lsq import LSQPlusQuantizer, LSQQuantizer
from .n2uq import N2UQQuantizer
from .pact import PACTQuantizer
from .quantizers import FakeQuantizer
from .registry import QUANTIZERS, make_quantizer

__all__ = [
    "FakeQuantizer",
    "make_quantizer",
    "QUANTIZERS",
    "LSQQuantizer",
    "LSQPlusQuantizer",
    "PACTQuantizer",
    "N2UQQuantizer",
]
