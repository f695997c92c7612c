"""Model swap and precision policy: turn an Ultralytics detection, segmentation or pose model into a fake-quantized one.

The policy (paper silent; standard practice, configurable through the ``qat_*`` keys):

- the first conv of the network reads the image: ``qat_first_bits`` (default 8) for W and A, unsigned input;
- the output convs of the head (role ``head``), ``qat_head_bits`` (default 8) for W and A: the raw ``nn.Conv2d``
  predictors of Detect and its subclasses -- box and class (``cv2``/``cv3``), the mask coefficients of ``Segment``
  (``cv4``), the keypoints of ``Pose`` (``cv4``; YOLO26's ``Pose26``: ``cv4_kpts`` and the training-only
  ``cv4_sigma``), YOLO26's semantic logits (``proto.semseg``, training-only), the one-to-one copies of end-to-end
  heads -- and the conv that writes the mask prototypes (``Proto.cv3``, a ``Conv`` block: its BN and SiLU are kept).
  The precision table names what each of them predicts (see :data:`HEAD_OUTPUTS`);
- not quantized, because they are no ``nn.Conv2d``: the prototype upsampling ``nn.ConvTranspose2d`` of ``Proto``
  (listed below the precision table, see :func:`unquantized_layers`) and ``Pose26``'s training-only flow model
  (``nn.Linear``, part of the keypoint loss);
- DFL is never touched (a fixed, frozen projection);
- layers listed in ``qat_skip`` stay in full precision;
- every other conv (``Conv``/``DWConv`` blocks anywhere, including C3/C3k2/SPPF/C2PSA internals): ``w_bits``/``a_bits``;
- activation grids (``qat_act_grid``, see :mod:`.grids`): ``auto`` gives an unsigned grid to inputs fed by SiLU/ReLU
  outputs (or concats, pools, upsamples and sums of them) and a signed grid to the others (GABFusion/LayerNorm
  outputs, convs without activation); ``signed``/``unsigned`` force one grid on every conv but the first;
- activation grid offsets (``qat_act_zp``): ``float`` trains them as they are, ``integer`` on multiples of the step
  (integer zero points; LSQ, LSQ+ and PACT activation quantizers, see :func:`.quantizers.integer_offset`).

Examples:
    >>> from ultralytics.nn.tasks import DetectionModel
    >>> from ultralytics_gabfusion.quant.convert import quantize_model
    >>> model = DetectionModel("yolov5s.yaml", nc=16, verbose=False)
    >>> rows = quantize_model(model, "lsq", w_bits=4, a_bits=4)
    >>> rows[0]["w_bits"], rows[0]["a_bits"]
    (8, 8)
"""

from __future__ import annotations

import math
from typing import Iterable

import torch
import torch.nn as nn
from ultralytics.nn.modules.block import DFL, Proto
from ultralytics.nn.modules.conv import Conv, DWConv
from ultralytics.nn.modules.head import OBB, Detect, Pose, Segment

from ..settings import ACT_ZPS, OUT_QUANT_METHODS, check_bits
from .grids import ACT_GRIDS, fixed_offset, grid_signed, input_lower_bounds
from .init import check_init_mode, choose_zero_point, refine_mse
from .qconv import QuantConv2d, QuantConvBlock, add_output_quantizer, output_quantizers, quant_convs
from .quantizers import FakeQuantizer
from .registry import check_method

LAYER_ATTRS = ("i", "f", "type", "np")


CONV_BLOCKS = (Conv, DWConv)  # Ultralytics blocks whose .conv is swapped (BN and activation kept)

# What each output conv of a head predicts, by the head attribute holding it (one2one_* copies: the same outputs).
HEAD_OUTPUTS = {"cv2": "box", "cv3": "class", "cv4_kpts": "keypoints", "cv4_sigma": "keypoint sigmas (training)",
                "semseg": "semantic logits (training)", "proto": "mask prototypes"}
_CV4_OUTPUTS = ((Segment, "mask coefficients"), (Pose, "keypoints"), (OBB, "angles"))  # cv4 differs per head


def head_outputs(model: nn.Module) -> dict[str, str]:
    """The output convs of every Detect-family head of ``model``: ``{conv name: what it predicts}``.

    They are the raw ``nn.Conv2d`` inside the head (DFL excluded) and the conv of ``Proto.cv3`` (the mask prototypes;
    a ``Conv`` block). See the module docstring for the policy they follow. Float and converted models give the same
    names.

    Examples:
        >>> from ultralytics.nn.tasks import SegmentationModel
        >>> outs = head_outputs(SegmentationModel("yolo11n-seg.yaml", nc=2, verbose=False))
        >>> outs["model.23.cv4.0.2"], outs["model.23.proto.cv3.conv"]
        ('mask coefficients', 'mask prototypes')
    """
    out = {}
    for hname, head in model.named_modules():
        if not isinstance(head, Detect):
            continue
        blocks = (*CONV_BLOCKS, QuantConvBlock)
        in_block = {f"{hname}.{n}.conv" for n, m in head.named_modules() if isinstance(m, blocks)}
        dfl = [f"{hname}.{n}." for n, m in head.named_modules() if isinstance(m, DFL)]
        for n, m in head.named_modules():
            full = f"{hname}.{n}"
            if isinstance(m, Proto):
                out[f"{full}.cv3.conv"] = HEAD_OUTPUTS["proto"]
            elif isinstance(m, nn.Conv2d) and full not in in_block and not any(full.startswith(d) for d in dfl):
                attr = n.removeprefix("one2one_").split(".")[0]
                attr = "semseg" if ".semseg." in f".{n}." else attr
                cv4 = next((what for cls, what in _CV4_OUTPUTS if isinstance(head, cls)), attr)
                out[full] = cv4 if attr == "cv4" else HEAD_OUTPUTS.get(attr, attr)
    return out


def unquantized_layers(model: nn.Module) -> dict[str, str]:
    """Convolution-like modules that the policy leaves in full precision because they are no ``nn.Conv2d``.

    Returns:
        (dict[str, str]): ``{name: reason}``, e.g. the ``nn.ConvTranspose2d`` that upsamples ``Segment``'s mask
        prototypes.
    """
    return {n: f"{type(m).__name__}, {'mask prototype upsampling' if n.endswith('proto.upsample') else 'no Conv2d'}"
            for n, m in model.named_modules() if isinstance(m, nn.modules.conv._ConvTransposeNd)}


def _layer_index(name: str) -> int | None:
    parts = name.split(".")
    return int(parts[1]) if len(parts) > 1 and parts[0] == "model" and parts[1].isdigit() else None


def plan_policy(model: nn.Module, w_bits: int, a_bits: int, first_bits: int = 8, head_bits: int = 8, skip=None,
                act_grid: str = "auto", layer_bits: dict | None = None):
    """Decide the bits and activation grid of every quantizable conv without changing the model.

    Args:
        model (nn.Module): An Ultralytics ``DetectionModel``, ``SegmentationModel`` or ``PoseModel`` (or any model with
            ``.model`` layers).
        w_bits (int): Weight bits of ordinary convs.
        a_bits (int): Activation bits of ordinary convs.
        first_bits (int): Bits of the first conv (0 = same as ordinary).
        head_bits (int): Bits of the head's output convs (:func:`head_outputs`; 0 = same as ordinary).
        skip (Iterable[int] | None): Layer indices kept in full precision.
        act_grid (str): ``auto``, ``signed`` or ``unsigned`` (see :func:`.grids.grid_signed`).
        layer_bits (dict[int, int] | None): Mixed precision, ``{layer: bits}``: W and A bits of the ordinary convs of
            those layers (not the first conv / head outputs, which follow ``first_bits`` / ``head_bits``; ``skip``
            wins). See :mod:`.mixed`.

    Returns:
        (list[dict]): One row per conv in forward order: name, layer, role (``first``, ``head`` or ``conv``), output
        (what a ``head`` conv predicts, else None), w_bits, a_bits, a_signed and a_min (the lower bound of the conv's
        input found by :func:`.grids.input_lower_bounds`, ``-inf`` when unbounded, None when ``act_grid`` is not
        ``auto``).
    """
    if act_grid not in ACT_GRIDS:
        raise ValueError(f"qat_act_grid={act_grid!r} is not valid. Allowed values: {', '.join(ACT_GRIDS)}.")
    skip = set(skip or [])
    rows, first_done = [], False
    in_dfl = {name for name, m in model.named_modules() if isinstance(m, DFL)}
    outputs = head_outputs(model)
    for name, m in model.named_modules():
        if not isinstance(m, nn.Conv2d) or any(name.startswith(d + ".") for d in in_dfl):
            continue
        layer = _layer_index(name)
        role = "head" if name in outputs else "conv"
        wb, ab = w_bits, a_bits
        if not first_done:
            role, first_done = "first", True
            wb, ab = (first_bits or w_bits), (first_bits or a_bits)
        elif role == "head" and head_bits:
            wb = ab = head_bits
        elif role == "conv" and layer_bits and layer in layer_bits:
            wb = ab = layer_bits[layer]
        if layer in skip:
            wb = ab = None
        rows.append({"name": name, "layer": layer, "role": role, "output": outputs.get(name) if role == "head" else None,
                     "w_bits": wb, "a_bits": ab})
    if not rows:
        raise ValueError(
            f"{type(model).__name__} has no nn.Conv2d layers to quantize: qat= needs an Ultralytics detection, "
            "segmentation or pose model (e.g. yolov5s.yaml, yolo11n-seg.yaml or a trained .pt); set qat=none for this model."
        )
    if layer_bits:
        _check_layer_bits(layer_bits, rows)
    bounds = input_lower_bounds(model) if act_grid == "auto" else None
    for r in rows:
        r["a_min"] = None if bounds is None else bounds.get(r["name"], -math.inf)  # not run in the probe: signed
        r["a_signed"] = grid_signed(act_grid, -math.inf if r["a_min"] is None else r["a_min"], r["role"])
    return rows


def quantize_model(model: nn.Module, method: str, w_bits: int = 4, a_bits: int = 4, first_bits: int = 8,
                   head_bits: int = 8, skip=None, act_grid: str = "auto", layer_bits: dict | None = None,
                   act_zp: str = "float", out_bits: int = 0) -> list[dict]:
    """Swap every quantizable conv of ``model`` in place for its fake-quantized version.

    ``Conv``/``DWConv`` blocks become :class:`QuantConvBlock` (keeping ``.i .f .type .np`` on top-level layers),
    raw ``nn.Conv2d`` become :class:`QuantConv2d`; parameter names are unchanged so FP checkpoints load.

    Args:
        model (nn.Module): The model to convert (structure changes belong before FP weights load).
        method (str): lsq, lsqplus, pact or n2uq.
        w_bits (int): Weight bits, 2..8.
        a_bits (int): Activation bits, 2..8.
        first_bits (int): Bits of the first conv (0 = w_bits/a_bits).
        head_bits (int): Bits of the head's output convs (box, class, mask coefficients and prototypes, keypoints;
            0 = w_bits/a_bits).
        skip (Iterable[int] | None): Layer indices to leave in full precision.
        act_grid (str): Activation grids: ``auto`` (from what feeds each conv), ``signed`` or ``unsigned``.
        layer_bits (dict[int, int] | None): Per-layer bits of the ordinary convs (mixed precision, see :func:`plan_policy`).
        act_zp (str): Activation grid offsets in training: ``float`` or ``integer`` (multiples of the step).
        out_bits (int): 0, or the bits of a quantizer on the output of every conv whose input and weight are
            quantized (``qat_out_bits``: the grid an integer conv kernel writes; needs ``act_zp="integer"`` and a
            uniform method, not n2uq).

    Returns:
        (list[dict]): The per-layer policy table (see :func:`format_policy`).

    Raises:
        ValueError: On an unknown method or grid, bits outside 2..8, or a model without convs.
    """
    w_bits, a_bits = check_bits("w_bits", w_bits), check_bits("a_bits", a_bits)
    if act_zp not in ACT_ZPS:
        raise ValueError(f"qat_act_zp={act_zp!r} is not valid. Allowed values: {', '.join(ACT_ZPS)}.")
    check_out_bits(out_bits, method, act_zp)
    if any(isinstance(m, QuantConv2d) for m in model.modules()):
        raise ValueError("model is already quantized; build a fresh model (or load its checkpoint) instead of converting twice.")
    rows = plan_policy(model, w_bits, a_bits, first_bits, head_bits, skip, act_grid, layer_bits)
    by_name = {r["name"]: r for r in rows}
    block_types = CONV_BLOCKS
    for r in rows:
        r["method"] = method if (r["w_bits"] or r["a_bits"]) else "fp"
        lb = -math.inf if r["a_min"] is None else r["a_min"]
        r["a_offset"] = fixed_offset(method, r["a_signed"], lb) if r["role"] != "first" and r["a_bits"] else 0.0

    def swap(parent: nn.Module, prefix: str):
        for child_name, child in list(parent.named_children()):
            full = f"{prefix}.{child_name}" if prefix else child_name
            if type(child) in block_types and full + ".conv" in by_name:
                r = by_name[full + ".conv"]
                qconv = QuantConv2d.from_float(child.conv, method if r["method"] != "fp" else None, r["w_bits"], r["a_bits"],
                                           r["a_signed"], r["a_offset"], act_zp)
                new = QuantConvBlock(qconv, child.bn, child.act)
            elif isinstance(child, nn.Conv2d) and not isinstance(child, QuantConv2d) and full in by_name:
                r = by_name[full]
                new = QuantConv2d.from_float(child, method if r["method"] != "fp" else None, r["w_bits"], r["a_bits"],
                                         r["a_signed"], r["a_offset"], act_zp)
            else:
                swap(child, full)
                continue
            for a in LAYER_ATTRS:
                if hasattr(child, a):
                    setattr(new, a, getattr(child, a))
            if out_bits:
                add_output_quantizer(new, out_bits)
            setattr(parent, child_name, new)

    swap(model, "")
    return rows


def check_out_bits(out_bits, method: str, act_zp: str) -> None:
    """Refuse a ``qat_out_bits`` that integer conv kernels cannot execute, saying what to change."""
    if out_bits in (0, None):
        return
    if isinstance(out_bits, bool) or out_bits != 8:
        raise ValueError(f"qat_out_bits={out_bits!r} is not valid: use 0 (off) or 8 (the output type of integer conv "
                         "kernels).")
    if check_method(method) not in OUT_QUANT_METHODS:
        raise ValueError(f"qat_out_bits=8 needs integer zero points on both grids of a conv, which integer kernels "
                         f"consume; {check_method(method)} has none: use qat=lsq or lsqplus, or qat_out_bits=0.")
    if act_zp != "integer":
        raise ValueError("qat_out_bits=8 needs qat_act_zp=integer: a float grid offset puts a float Sub/Add between "
                         "the quantizer and the conv, so no integer kernel can take the conv.")


def _check_layer_bits(layer_bits: dict, rows: list[dict]) -> None:
    """Refuse ``qat_layer_bits`` entries with bad bits or naming layers that hold no ordinary conv."""
    bad = {k: v for k, v in layer_bits.items() if isinstance(v, bool) or not isinstance(v, int) or not 2 <= v <= 8}
    if bad:
        raise ValueError(f"qat_layer_bits={layer_bits}: bits {bad} are not supported; use integers in 2..8.")
    ordinary = sorted({r["layer"] for r in rows if r["role"] == "conv" and r["layer"] is not None})
    missing = sorted(set(layer_bits) - set(ordinary))
    if missing:
        raise ValueError(
            f"qat_layer_bits names layers {missing} that hold no conv at w_bits/a_bits (the first conv and the head's "
            f"output convs follow qat_first_bits/qat_head_bits); layers that can be set: {ordinary}."
        )


def format_policy(rows: list[dict], unquantized: dict[str, str] | None = None) -> str:
    """Render the per-layer policy as a table: layer, module, W bits, A bits, A grid, input min, quantizer.

    ``unquantized`` (:func:`unquantized_layers`) adds a row per full-precision module that is no ``nn.Conv2d``, with
    the reason, after the convs.

    The quantizer column names the role of the first conv and of the head's output convs and, for the latter, what
    they predict, e.g. ``lsq (head) mask prototypes``. ``A grid`` is ``signed`` or ``unsigned`` (``-`` for a full-precision input), followed by the fixed offset of an
    LSQ/PACT unsigned grid (e.g. ``unsigned-0.2785``); ``input min`` is the lower bound of
    the conv's input found by the grid analysis (``-inf``: unbounded, e.g. a GABFusion output; blank when the grid
    was forced by ``qat_act_grid=signed|unsigned``).
    """
    head = f"{'layer':>5}  {'module':<34}{'W bits':>7}{'A bits':>7}  {'A grid':<16}{'input min':>10}  quantizer"
    lines = [head]
    for r in rows:
        layer = "" if r["layer"] is None else r["layer"]
        grid = "-" if not r["a_bits"] else ("signed" if r["a_signed"] else "unsigned")
        if r.get("a_offset"):
            grid += f"{r['a_offset']:+.4g}"
        lo = "" if r.get("a_min") is None else f"{r['a_min']:.4g}"
        lines.append(
            f"{layer!s:>5}  {r['name']:<34}{r['w_bits'] or 'fp'!s:>7}{r['a_bits'] or 'fp'!s:>7}  {grid:<16}{lo:>10}  "
            f"{r['method']}{' (' + r['role'] + ')' if r['role'] != 'conv' else ''}"
            f"{' ' + r['output'] if r.get('output') else ''}"
        )
    for name, why in (unquantized or {}).items():
        layer = _layer_index(name)
        lines.append(f"{'' if layer is None else layer!s:>5}  {name:<34}{'fp':>7}{'fp':>7}  {'-':<16}{'':>10}  "
                     f"not quantized ({why})")
    return "\n".join(lines)


def quantizers(model: nn.Module, role: str | None = None) -> Iterable[tuple[str, FakeQuantizer]]:
    """Yield ``(name, quantizer)`` for every fake quantizer in ``model`` (optionally of one role)."""
    for name, m in model.named_modules():
        if isinstance(m, FakeQuantizer) and (role is None or m.role == role):
            yield name, m


@torch.no_grad()
def init_weight_quantizers(model: nn.Module, only_uninitialized: bool = False, init: str = "mse") -> int:
    """Initialise weight quantizers from their conv's current (loaded) weight; returns how many.

    Args:
        model (nn.Module): A quantized model.
        only_uninitialized (bool): Keep quantizers that were already initialised (e.g. loaded from a QAT checkpoint).
        init (str): ``mse`` (published init with its range refined by an MSE search, see :mod:`.init`) or ``paper``.
    """
    check_init_mode(init)
    n = 0
    for _, m in quant_convs(model):
        if m.weight_quant is not None and not (only_uninitialized and bool(m.weight_quant.initialized)):
            w = m.weight.detach().float()
            m.weight_quant.init_from(w)
            if init == "mse":
                refine_mse(m.weight_quant, w)
            n += 1
    return n


CALIB_BN_MODES = ("auto", "eval", "batch")
_SHIFT_SAMPLES = 1 << 16  # input samples kept per batch and N2UQ conv to set its input_shift


def _average_n2uq_range(q: FakeQuantizer, old: dict, k: int) -> None:
    """Running mean over ``k+1`` batches of an N2UQ activation range, taken in the input domain.

    ``old`` holds the parameters averaged over the first ``k`` batches, ``q`` the init of the new batch. The start
    ``s0/beta1`` and the span ``sum(a)/beta1`` are averaged; ``beta1``, ``s0`` and ``beta2`` follow from them (with
    ``beta1*beta2`` kept), so the averaged segments cover the averaged input range.
    """
    def lo_span(start, intervals, b1):
        b1 = b1.abs().clamp_min(1e-8)
        return start / b1, intervals.clamp_min(0).sum() / b1

    lo0, w0 = lo_span(old["start"], old["intervals"], old["scale_in"])
    lo1, w1 = lo_span(q.start.detach(), q.intervals.detach(), q.scale_in.detach())
    lo, w = (lo0 * k + lo1) / (k + 1), (w0 * k + w1) / (k + 1)
    prod = (old["scale_in"] * old["scale_out"]).abs()
    intervals = (old["intervals"] * k + q.intervals.detach()) / (k + 1)
    b1 = intervals.clamp_min(0).sum() / w
    q.intervals.copy_(intervals)
    q.scale_in.copy_(b1)
    q.scale_out.copy_(prod / b1)
    q.start.copy_(b1 * lo)


def bn_statistics_trained(model: nn.Module) -> bool:
    """Whether the BatchNorm running statistics of ``model`` were learned (not the fresh mean 0, variance 1).

    ``num_batches_tracked`` cannot tell: Ultralytics saves the EMA model, whose integer buffers are never updated.
    """
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None]
    return any(bool((m.running_mean != 0).any() or (m.running_var != 1).any()) for m in bns)


@torch.no_grad()
def calibrate_activations(model: nn.Module, batches: Iterable[torch.Tensor], only_uninitialized: bool = True,
                          init: str = "mse", bn: str = "auto") -> int:
    """Initialise activation quantizers from data, progressively through the network.

    Each activation quantizer is re-initialised from its input on every batch and the inits are averaged over batches;
    downstream quantizers see the already-quantized upstream outputs. Under ``qat_act_zp=integer`` with ``init=mse``,
    each batch then sets the averaged offset on the cheaper of its two neighbouring multiples of the step
    (:func:`.init.choose_zero_point`), so the last batch decides. For N2UQ the conv's ``input_shift`` is set to the
    mean difference between input and quantized input over all calibration batches, with the final thresholds.
    BatchNorm running statistics are never changed.

    Args:
        model (nn.Module): A quantized model.
        batches (Iterable[Tensor]): Preprocessed image batches (float, 0..1, on the model's device).
        only_uninitialized (bool): Skip quantizers that are already initialised (e.g. loaded from a checkpoint).
        init (str): ``mse`` (published init with its range refined by an MSE search, see :mod:`.init`) or ``paper``.
        bn (str): How BatchNorm normalises during calibration. ``eval``: with its running statistics, the activations
            validation and export see (right for a trained model). ``batch``: with each batch's statistics
            (momentum 0, running statistics untouched), the activations a train-mode step sees; for models whose
            running statistics mean nothing yet (built from a YAML). ``auto``: ``eval`` when the BatchNorm running statistics
            were learned (:func:`bn_statistics_trained`), else ``batch``.

    Returns:
        (int): Number of batches used.
    """
    check_init_mode(init)
    if bn not in CALIB_BN_MODES:
        raise ValueError(f"bn={bn!r} is not a calibration BatchNorm mode: use one of {', '.join(CALIB_BN_MODES)}.")
    if bn == "auto":
        bn = "eval" if bn_statistics_trained(model) else "batch"
    targets = {}
    for _, m in quant_convs(model):
        q = m.act_quant
        if q is not None and not (only_uninitialized and bool(q.initialized)):
            targets[id(q)] = (m, q)
    outs = [q for _, _, q in output_quantizers(model) if not (only_uninitialized and bool(q.initialized))]
    if not targets and not outs:
        return 0
    was_training = model.training
    bn_momenta = {}
    if bn == "batch":
        for mod in model.modules():
            if isinstance(mod, nn.modules.batchnorm._BatchNorm):
                bn_momenta[mod] = mod.momentum
                mod.momentum = 0.0
    state = {"k": 0}
    samples = {}  # N2UQ: input samples of every batch, for an input_shift that matches the final thresholds
    gen = torch.Generator().manual_seed(0)

    def init_step(q, x):  # this batch's init of q, averaged with the earlier batches'
        k = state["k"]
        old = {n: p.detach().clone() for n, p in q.named_parameters()}
        q.init_from(x)
        if init == "mse":
            refine_mse(q, x)
        if k:
            if q.method == "n2uq":  # average the input-domain start and span: start and beta1 are not linear in them
                _average_n2uq_range(q, old, k)
            else:
                for n, p in q.named_parameters():
                    p.copy_((old[n] * k + p) / (k + 1))
        if init == "mse" and q.integer_zero_point:  # qat_act_zp=integer: floor or ceil of off/s, on the averaged range
            choose_zero_point(q, x)

    def pre_hook(conv, args):
        m, q = targets[id(conv.act_quant)]
        x = args[0].detach().float()
        init_step(q, x)
        if m.input_shift is not None:
            flat = x.reshape(-1)
            if flat.numel() > _SHIFT_SAMPLES:
                flat = flat[torch.randint(flat.numel(), (_SHIFT_SAMPLES,), generator=gen).to(flat.device)]
            samples.setdefault(id(m), []).append(flat)
            xs = torch.cat(samples[id(m)])
            m.input_shift.copy_((xs.mean() - q(xs).mean()).reshape(1))

    def out_hook(q, args):  # output quantizers (qat_out_bits) see the BN-folded conv output: hooked on themselves
        if not state.get("busy"):  # the MSE search calls q itself
            state["busy"] = True
            try:
                init_step(q, args[0].detach().float())
            finally:
                state["busy"] = False

    handles = [m.register_forward_pre_hook(pre_hook) for m, _ in targets.values()]
    handles += [q.register_forward_pre_hook(out_hook) for q in outs]
    model.train(bn == "batch")
    try:
        for img in batches:
            model(img)
            state["k"] += 1
    finally:
        for h in handles:
            h.remove()
        for mod, mom in bn_momenta.items():
            mod.momentum = mom
        model.train(was_training)
    return state["k"]


def quantizer_parameters(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """Split quantizer parameters into (no-decay, decay) lists.

    PACT's clipping level ``alpha`` takes the L2 penalty of the paper (listed in the quantizer's ``decay_params``);
    every other quantizer tensor (steps, offsets, N2UQ intervals/scales, the N2UQ input shift) is not decayed.
    """
    no_decay, decay, seen = [], [], set()
    for _, q in quantizers(model):
        names = set(getattr(q, "decay_params", ()))
        for n, p in q.named_parameters(recurse=False):
            (decay if n in names else no_decay).append(p)
            seen.add(id(p))
    for _, m in quant_convs(model):
        if m.input_shift is not None and id(m.input_shift) not in seen:
            no_decay.append(m.input_shift)
    return no_decay, decay
