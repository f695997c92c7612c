"""The plugin's choice lists, its bit range, :class:`SettingsError` and :func:`one_line`: what every other settings
module imports."""

from __future__ import annotations

# The one list of quantizer names and the one bit range (quant.registry maps the names to classes).
QUANT_METHODS = ("lsq", "lsqplus", "pact", "n2uq")
QAT_METHODS = ("none", *QUANT_METHODS)
MIN_BITS, MAX_BITS = 2, 8
GAB_MODES = ("balanced", "learned", "off")
GAB_FORMS = ("grad", "paper")  # GABFusion: balancing in the backward pass only, or the paper's alpha + LayerNorm
ADA_ATTNS = ("simam", "qada")
ADA_DIVS = ("kl", "js")
ACT_GRIDS = ("auto", "signed", "unsigned")  # activation grids of quant.grids
ACT_ZPS = ("float", "integer")  # activation grid offsets in training: as they are, or on integer zero points
QAT_KERNELS = ("auto", "reference", "compiled")  # fake-quant kernels of quant.kernels
# Methods whose grids give integer zero points on both sides of a conv (what qat_out_bits needs): PACT's DoReFa
# weights sit on a half-integer zero point, N2UQ's activations on thresholds.
OUT_QUANT_METHODS = ("lsq", "lsqplus")


class SettingsError(ValueError):
    """A mistake in the user's keys or values, found before any work starts; commands print it without a traceback."""

    __module__ = "ultralytics_gabfusion.settings"  # its public home, as tracebacks and doctests name it


def one_line(e: BaseException) -> str:
    r"""``Type: message`` of an exception on one line, for the one-line errors that wrap a loader's own message.

    Examples:
        >>> one_line(ValueError("bad\n  header"))
        'ValueError: bad header'
    """
    return f"{type(e).__name__}: {' '.join(str(e).split())}"
