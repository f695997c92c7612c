"""Fake-quantized convolutions: the modules that replace Ultralytics' ``Conv`` blocks and raw ``nn.Conv2d`` layers.

``QuantConv2d`` is an ``nn.Conv2d`` that fake-quantizes its input activation and its weight before the convolution.
``QuantConvBlock`` replaces an Ultralytics ``Conv``/``DWConv`` (conv + BN + act) with the same child names
(``conv``, ``bn``, ``act``), so FP checkpoints load key for key. It deliberately does *not* subclass ``Conv``:
Ultralytics' ``fuse()`` folds BN into any ``Conv`` by building a fresh ``nn.Conv2d``, which would silently drop
the quantizers in validation, export and ``YOLO("best.pt")``.

Examples:
    >>> import torch
    >>> from ultralytics_gabfusion.quant.qconv import QuantConv2d
    >>> conv = QuantConv2d(8, 16, 3, padding=1, method="lsq", w_bits=4, a_bits=4)
    >>> conv(torch.randn(2, 8, 16, 16)).shape
    torch.Size([2, 16, 16, 16])
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn as nn

from ..precision import KeepFP32, kept_fp32
from ..settings import OUT_QUANT_METHODS
from .lsq import ConvOutputQuantizer
from .registry import ACT_ZP_METHODS, check_method, make_quantizer

# Bumped when the pickled layout of these modules changes; checked when a checkpoint is unpickled.
FORMAT_VERSION = 1


class QuantConv2d(KeepFP32, nn.Conv2d):
    """``nn.Conv2d`` with a per-output-channel weight quantizer and a per-tensor input quantizer.

    Forward: ``y = conv2d(Qa(x) + input_shift, Qw(W), b)``. ``input_shift`` exists only for N2UQ activations, whose
    output levels start at 0 whatever the input range: after calibration it holds the offset that puts the
    quantized activation back on the input's scale (it is learnable, trained with the quantizer parameters), so a
    network whose inputs can be negative (SiLU, LayerNorm) keeps its function at step 0.

    Args:
        *args: ``nn.Conv2d`` positional arguments.
        method (str | None): Quantizer (lsq, lsqplus, pact, n2uq); None leaves the conv in full precision.
        w_bits (int | None): Weight bits; None keeps the weight in full precision.
        a_bits (int | None): Activation bits; None keeps the input in full precision.
        a_signed (bool): Whether the input can be negative (selects the signed grid).
        a_offset (float): Fixed grid offset of an LSQ/PACT activation quantizer (see :func:`.grids.fixed_offset`).
        a_zp (str): ``float`` or ``integer``: the activation quantizer's grid offset in training (``qat_act_zp``;
            LSQ, LSQ+ and PACT, see :func:`.quantizers.integer_offset`).
        **kwargs: ``nn.Conv2d`` keyword arguments.
    """

    @property
    def fp32_names(self) -> tuple[str, ...] | None:
        """Tensors that stay float32 when Ultralytics saves the model with ``.half()`` (None: all of the conv's own).

        A quantized conv keeps its weight, bias and N2UQ ``input_shift`` in float32: at 2-4 bits a float16 rounding
        of any of them moves some values across a rounding boundary of the grids downstream, and the saved model
        would not be the one validated during training (see :class:`QuantConvBlock`). A float conv follows ``.half()``.
        """
        quantized = getattr(self, "weight_quant", None) is not None or getattr(self, "act_quant", None) is not None
        return None if quantized else ("input_shift",)

    def __init__(self, *args, method=None, w_bits=None, a_bits=None, a_signed=True, a_offset=0.0, a_zp="float",
                 **kwargs):
        super().__init__(*args, **kwargs)
        self.method = method
        self.format_version = FORMAT_VERSION
        self.quant_enabled = True  # switched off by `quantizers_disabled` (e.g. while calibrating GABFusion)
        self.weight_quant = make_quantizer(method, "weight", w_bits, channels=self.out_channels) if method and w_bits else None
        extra = {"fixed_offset": a_offset} if a_offset else {}  # LSQ/PACT on an unsigned grid after SiLU
        if a_zp != "float" and method and check_method(method) in ACT_ZP_METHODS:
            extra["act_zp"] = a_zp  # stored on the quantizer: pickled with the model, read by its forward
        self.act_quant = make_quantizer(method, "act", a_bits, channels=0, signed=a_signed, **extra) if method and a_bits else None
        if self.act_quant is not None and method == "n2uq":
            self.input_shift = nn.Parameter(torch.zeros(1))
        else:
            self.register_parameter("input_shift", None)

    @classmethod
    def from_float(cls, conv: nn.Conv2d, method, w_bits, a_bits, a_signed=True, a_offset=0.0,
                   a_zp="float") -> "QuantConv2d":
        """Build a ``QuantConv2d`` that shares ``conv``'s weight and bias tensors (no copy)."""
        q = cls(
            conv.in_channels,
            conv.out_channels,
            conv.kernel_size,
            stride=conv.stride,
            padding=conv.padding,
            dilation=conv.dilation,
            groups=conv.groups,
            bias=conv.bias is not None,
            padding_mode=conv.padding_mode,
            method=method,
            w_bits=w_bits,
            a_bits=a_bits,
            a_signed=a_signed,
            a_offset=a_offset,
            a_zp=a_zp,
            device=conv.weight.device,
            dtype=conv.weight.dtype,
        )
        q.weight = conv.weight
        if conv.bias is not None:
            q.bias = conv.bias
        return q

    @property
    def w_bits(self):
        """Weight bits, or None when the weight is full precision."""
        return self.weight_quant.bits if self.weight_quant is not None else None

    @property
    def a_bits(self):
        """Activation bits, or None when the input is full precision."""
        return self.act_quant.bits if self.act_quant is not None else None

    def quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        """Return the fake-quantized input the convolution sees."""
        if self.act_quant is None or not self.quant_enabled:
            return x
        x = self.act_quant(x)
        if self.input_shift is not None:
            x = x + self.input_shift.to(x.dtype)
        return x

    def input_quantizer(self) -> "ConvInputQuantizer | None":
        """The map ``x -> quantize_input(x)`` as a quantizer object (None without an activation quantizer).

        Q-ADA's residual ``x - Q(x)`` must measure the tensor this conv really consumes: for N2UQ that is
        ``act_quant(x) + input_shift``, not ``act_quant(x)``, whose levels start at 0 whatever the input range.
        """
        return ConvInputQuantizer(self) if self.act_quant is not None else None

    def quantized_weight(self) -> torch.Tensor:
        """Return the fake-quantized weight."""
        if self.weight_quant is None or not self.quant_enabled:
            return self.weight
        return self.weight_quant(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Quantize input and weight, convolve, then quantize the output if this conv has ``out_quant``."""
        x = self.quantize_input(x)
        w = self.quantized_weight().to(x.dtype)
        b = self.bias.to(x.dtype) if self.bias is not None else None
        return quantize_output(self, self._conv_forward(x, w, b), self)

    def __setstate__(self, state):
        version = state.get("format_version", 0)
        if version != FORMAT_VERSION:
            raise RuntimeError(
                f"This checkpoint holds quantized layers of format {version}, but the installed ultralytics-gabfusion "
                f"reads format {FORMAT_VERSION}. Install the plugin version that wrote it, or retrain/re-export."
            )
        super().__setstate__(state)

    def extra_repr(self):
        return super().extra_repr() + f", method={self.method}, w_bits={self.w_bits}, a_bits={self.a_bits}"


class ConvInputQuantizer:
    """``Q(x)`` exactly as a :class:`QuantConv2d` consumes it: ``act_quant(x)`` (``+ input_shift`` for N2UQ).

    A plain object (not an ``nn.Module``, so it is never registered as a submodule or saved): calling it runs
    ``conv.quantize_input``; :meth:`step_size` is the activation quantizer's input-domain step and :meth:`modules`
    its modules (so a caller can switch them to eval mode around a side-effect-free evaluation).

    Examples:
        >>> conv = QuantConv2d(4, 4, 1, method="n2uq", w_bits=4, a_bits=4)
        >>> q = conv.input_quantizer()
        >>> x = torch.randn(1, 4, 3, 3)
        >>> bool(torch.equal(q(x), conv.quantize_input(x)))
        True
    """

    def __init__(self, conv: QuantConv2d):
        self.conv = conv

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv.quantize_input(x)

    def step_size(self) -> torch.Tensor:
        """The activation quantizer's step in the input domain (detached), shape ``(1,)``."""
        return self.conv.act_quant.step_size()

    def modules(self):
        """The modules whose train/eval flag governs ``Q``: the activation quantizer's."""
        return self.conv.act_quant.modules()

    def __repr__(self) -> str:
        return f"ConvInputQuantizer({self.conv.act_quant!r}, input_shift={self.conv.input_shift is not None})"


class QuantConvBlock(nn.Module):
    """Quantized replacement of Ultralytics ``Conv``/``DWConv``: ``act(bn(QuantConv2d(x)))``.

    Child names match ``Conv`` (``conv``, ``bn``, ``act``) so FP state dicts load unchanged. BN stays a separate
    train-mode layer during QAT; for export it folds exactly into the per-channel weight scale.
    """

    def __init__(self, conv: QuantConv2d, bn: nn.Module, act: nn.Module):
        super().__init__()
        self.conv, self.bn, self.act = conv, bn, act

    def _apply(self, fn, recurse=True):
        """``.half()`` leaves the BatchNorm float32, as the quantized conv's own tensors.

        Ultralytics saves checkpoints as ``deepcopy(ema).half()``. At low bit-widths a float16 rounding of the BN
        scale and shift moves some activations across a rounding boundary of the next layer's quantizer, and the
        changes compound through the network: the reloaded checkpoint validated up to a few mAP points away from the
        same weights validated in memory during training. Kept in float32, the round trip is exact.
        """
        if not recurse:
            return super()._apply(fn, recurse)
        with kept_fp32(self.bn):
            return super()._apply(fn, recurse)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply quantized conv, batch norm, the output quantizer if any (``out_quant``) and activation."""
        return self.act(quantize_output(self, self.bn(self.conv(x)), self.conv))


def add_output_quantizer(module: nn.Module, bits: int) -> ConvOutputQuantizer | None:
    """Give a :class:`QuantConvBlock` (after its BN) or a bare :class:`QuantConv2d` an output quantizer (``qat_out_bits``).

    Only convs whose input and weight are both quantized on a uniform grid get one: that is what an integer conv
    kernel consumes. Its signedness follows the input grid (the kernel's input and output types agree).

    Returns:
        (ConvOutputQuantizer | None): The new quantizer, or None when the conv does not qualify.
    """
    conv = module.conv if isinstance(module, QuantConvBlock) else module
    if conv.act_quant is None or conv.weight_quant is None or conv.method not in OUT_QUANT_METHODS:
        return None
    module.out_quant = ConvOutputQuantizer(bits, signed=conv.act_quant.qmin < 0).to(conv.weight.device)
    return module.out_quant


def quantize_output(module: nn.Module, y: torch.Tensor, conv: QuantConv2d) -> torch.Tensor:
    """``module.out_quant(y)`` when ``module`` has an output quantizer and ``conv``'s quantizers are on, else ``y``.

    The folded bias is first put on the int32 grid an integer kernel adds to its accumulator (:func:`integer_bias`);
    at 4 bits that grid is coarse enough to move outputs across the 8-bit output grid's rounding boundaries.
    """
    q = getattr(module, "out_quant", None)  # modules pickled before output quantizers existed have none
    if q is None or not conv.quant_enabled:
        return y
    shift = bias_rounding(conv, getattr(module, "bn", None))
    return q(y + shift.to(y.dtype).view(1, -1, *([1] * (y.dim() - 2))))


def bias_rounding(conv: QuantConv2d, bn: nn.Module | None = None) -> torch.Tensor:
    """``round(b/step)*step - b`` per channel (float64): what putting the folded bias on its int32 grid adds to the
    conv output (:func:`integer_bias`)."""
    bias, step = integer_bias(conv, bn)
    return torch.round(bias / step) * step - bias


@torch.no_grad()
def integer_bias(conv: QuantConv2d, bn: nn.Module | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The folded bias of ``conv`` (+ ``bn`` on its running statistics) and its int32 step, float64 per channel.

    The step is ``input step x |folded weight step|`` (``|gamma|/sqrt(var + eps) x`` the weight quantizer's step, in
    float32 as the export stores it): the scale of an integer conv's accumulator. The export writes
    ``round(bias/step)`` as the int32 bias (:class:`~ultralytics_gabfusion.export.nodes._BiasSpec`).
    """
    c = conv.out_channels
    b = conv.bias.detach().double() if conv.bias is not None else torch.zeros(c, dtype=torch.float64, device=conv.weight.device)
    f = torch.ones_like(b)
    if isinstance(bn, nn.modules.batchnorm._BatchNorm) and bn.running_var is not None:
        f = torch.rsqrt(bn.running_var.detach().double() + bn.eps)
        if bn.affine:
            f = f * bn.weight.detach().double()
        b = (b - bn.running_mean.detach().double()) * f + (bn.bias.detach().double() if bn.affine else 0.0)
    sw = conv.weight_quant.grid()["scale"].double().to(b.device)
    sw_folded = (f.abs() * sw).float().double()
    sw_folded = torch.where(sw_folded == 0, sw, sw_folded)  # gamma = 0: the export keeps the quantizer's step
    sx = conv.act_quant.grid()["scale"].float().double().to(b.device)  # a tensor: no device sync in the forward
    return b, sw_folded * sx


def output_quantizers(model: nn.Module):
    """Yield ``(name, module, quantizer)`` for every conv output quantizer (blocks and bare quantized convs)."""
    for name, m in model.named_modules():
        q = getattr(m, "out_quant", None) if isinstance(m, (QuantConvBlock, QuantConv2d)) else None
        if q is not None:
            yield name, m, q


@contextlib.contextmanager
def quantizers_disabled(model: nn.Module):
    """Run ``model`` in full precision inside the block (quantizers neither applied nor lazily initialised)."""
    convs = [m for _, m in quant_convs(model)]
    for m in convs:
        m.quant_enabled = False
    try:
        yield model
    finally:
        for m in convs:
            m.quant_enabled = True


def quant_convs(model: nn.Module):
    """Yield ``(name, QuantConv2d)`` for every quantized conv in ``model``."""
    for name, m in model.named_modules():
        if isinstance(m, QuantConv2d):
            yield name, m


def is_quantized(model: nn.Module) -> bool:
    """Return True if ``model`` contains at least one quantized conv."""
    return any(m.weight_quant is not None or m.act_quant is not None for _, m in quant_convs(model))


__all__ = ["ConvInputQuantizer", "QuantConv2d", "QuantConvBlock", "quant_convs", "quantizers_disabled", "is_quantized",
           "FORMAT_VERSION", "add_output_quantizer", "bias_rounding", "integer_bias", "output_quantizers", "quantize_output"]
