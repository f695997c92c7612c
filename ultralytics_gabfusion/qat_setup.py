"""The one model set-up path of QAT, driven by a validated :class:`~ultralytics_gabfusion.settings.QATConfig`.

Steps, in the order they must run (the trainer calls them at its lifecycle hooks, the speed benchmark through
:func:`prepare_qat_model` in one go):

1. :func:`build_structure`: GABFusion at the neck Concat nodes, quantized convs per the precision policy, the FP (or
   earlier QAT) weights loaded, weight quantizers initialised from those weights;
2. :func:`calibrate_model`: data-dependent inits (GABFusion LayerNorm identity fit, activation quantizers);
3. :func:`attach_ada`: the frozen FP teacher, the ADA loss and the criterion that adds it.

Examples:
    >>> from ultralytics.nn.tasks import DetectionModel
    >>> from ultralytics_gabfusion.settings import QATConfig
    >>> cfg = QATConfig.from_keys({"qat": "lsq", "w_bits": 4, "a_bits": 4, "gab": "balanced"})
    >>> model = build_structure(DetectionModel("yolov5n.yaml", nc=16, verbose=False), cfg)  # doctest: +SKIP
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from ultralytics.nn.modules.head import Detect
from ultralytics.utils import LOGGER, colorstr

from .distill import ADACriterion, ADALoss, check_teacher, default_layers
from .fusion import GABFusion, calibrate_identity, insert_gabfusion, set_fusion_mode
from .quant.convert import (
    bn_statistics_trained,
    calibrate_activations,
    format_policy,
    init_weight_quantizers,
    plan_policy,
    quantize_model,
    unquantized_layers,
)
from .quant.mixed import BOPS_IMGSZ, conv_costs, format_totals, fp_totals, plan_totals, resolve_layer_bits
from .quant.qconv import QuantConv2d, output_quantizers, quant_convs, quantizers_disabled
from .settings import QATConfig
from .stability import bn_statistics, fp_bn_statistics, recalibrate_bn, shift_bn_statistics
from .version import __version__

PREFIX = colorstr("gabfusion: ")


# ------------------------------------------------------------------------------------------------ structure
def build_structure(model, cfg: QATConfig, weights=None, verbose: bool = False, source: str | None = None):
    """Insert GABFusion, swap in quantized convs, load ``weights``, then initialise the weight quantizers.

    Args:
        model (DetectionModel): A freshly built float model (random init; ``SegmentationModel`` and ``PoseModel``
            too); changed in place.
        cfg (QATConfig): The run's plugin settings.
        weights (nn.Module | None): Model whose weights are transferred (FP or an earlier QAT checkpoint).
        verbose (bool): Log the fusion nodes and the per-layer precision table.
        source (str | None): Where the model came from (YAML or checkpoint), named in errors.

    Returns:
        (DetectionModel): ``model``, ready for calibration.

    Raises:
        ValueError: The model has no Detect-family head (Detect, Segment, Pose), or the precision policy cannot be
            applied.
    """
    head = model.model[-1]
    if not isinstance(head, Detect):
        raise ValueError(
            f"the plugin trains detection, segmentation and pose models, but {source or 'this model'} ends in "
            f"{type(head).__name__}, not a Detect, Segment or Pose head. Use e.g. yolov5s.yaml, yolo11n-seg.yaml, "
            f"yolo11n-pose.yaml or a checkpoint of one."
        )
    form = fusion_form(cfg, weights, source)
    if cfg.gab != "off":
        nodes = insert_gabfusion(model, mode=cfg.gab, form=form, **cfg.fusion_options)
        if verbose:
            LOGGER.info(f"{PREFIX}GABFusion ({cfg.gab}, form {form}) at layers {nodes}")
    elif any(isinstance(m, GABFusion) for m in model.modules()):
        set_fusion_mode(model, "off")
    if cfg.quantized:
        costs = conv_costs(model, BOPS_IMGSZ) if verbose else None  # float model, before the swap
        layer_bits = resolve_mixed_precision(model, cfg, verbose, costs)
        summary = precision_summary(model, cfg, layer_bits, costs) if verbose else ""
        rows = quantize_model(model, cfg.qat, cfg.w_bits, cfg.a_bits, cfg.qat_first_bits, cfg.qat_head_bits,
                              cfg.qat_skip, cfg.qat_act_grid, layer_bits, cfg.qat_act_zp, cfg.qat_out_bits)
        if verbose:
            table = format_policy(rows, unquantized_layers(model))
            LOGGER.info(f"{PREFIX}W{cfg.w_bits}A{cfg.a_bits} {cfg.qat} precision policy:\n{table}\n{summary}")
            LOGGER.info(f"{PREFIX}fake-quant kernels: qat_kernel={cfg.qat_kernel}; activation grid offsets: "
                        f"qat_act_zp={cfg.qat_act_zp}" + (f"; {cfg.qat_out_bits}-bit conv outputs (qat_out_bits)"
                                                          if cfg.qat_out_bits else ""))
    if weights:
        model.load(weights, verbose=verbose)
        has_trained_gab = any(isinstance(m, GABFusion) for m in weights.modules())
        model.gab_identity_pending = cfg.gab != "off" and form == "paper" and cfg.gab_calib and not has_trained_gab
    if cfg.quantized:  # from the loaded weights, not the random init
        init_weight_quantizers(model, only_uninitialized=True, init=cfg.qat_init)
    keys = {**cfg.as_dict(), "gab_form": form if cfg.gab != "off" else cfg.gab_form}  # the form actually built
    model.gabfusion = {"version": __version__, **dict(sorted(keys.items()))}  # saved in checkpoints
    return model


def fusion_form(cfg: QATConfig, weights=None, source: str | None = None) -> str:
    """The GABFusion form of the run: ``gab_form``, else the form already in ``weights``, else grad (paper if learned).

    Raises:
        ValueError: ``weights`` holds trained GABFusion nodes of another form than ``gab_form`` (switching would
            discard or invent the trained LayerNorm and change what the model computes).
    """
    have = sorted({n.form for n in (weights.modules() if weights is not None else ()) if isinstance(n, GABFusion)})
    if cfg.gab_form is None:
        return have[0] if len(have) == 1 else ("paper" if cfg.gab == "learned" else "grad")
    if cfg.gab != "off" and have and have != [cfg.gab_form]:
        raise ValueError(
            f"{source or 'the starting checkpoint'} holds GABFusion nodes of form {'/'.join(have)}, but "
            f"gab_form={cfg.gab_form}: pass gab_form={have[0]} (or omit it) to continue from it, or start from the FP "
            f"checkpoint to train the other form."
        )
    return cfg.gab_form


def _plan_fn(model, cfg: QATConfig):
    def plan(lb):  # bits only: a fixed grid skips the activation-bound probe (a forward pass per call)
        return plan_policy(model, cfg.w_bits, cfg.a_bits, cfg.qat_first_bits, cfg.qat_head_bits, cfg.qat_skip,
                           "signed", lb)

    return plan


def resolve_mixed_precision(model, cfg: QATConfig, verbose: bool = False, costs: dict | None = None) -> dict | None:
    """Resolve ``qat_layer_bits`` (mapping, or sensitivity CSV + ``qat_bits_budget``) on the float model; log it.

    Args:
        model (DetectionModel): The float model about to be converted.
        cfg (QATConfig): The run's settings.
        verbose (bool): Log the mapping with the plan's average W / A bits, GBOPs and size against uniform.
        costs (dict | None): ``quant.mixed.conv_costs(model, BOPS_IMGSZ)`` if already measured.
    """
    if cfg.qat_layer_bits is None:
        return None
    plan = _plan_fn(model, cfg)
    if costs is None and (verbose or "bops" in str(cfg.qat_bits_budget).lower()):
        costs = conv_costs(model, BOPS_IMGSZ)
    mapping = resolve_layer_bits(model, cfg.qat_layer_bits, cfg.qat_bits_budget, plan, costs)
    if verbose:
        uni, mixed = plan_totals(model, plan({}), costs), plan_totals(model, plan(mapping), costs)
        fp = fp_totals(model, costs)["bops"]
        src = f" from {cfg.qat_layer_bits} under budget {cfg.qat_bits_budget}" if isinstance(cfg.qat_layer_bits, str) else ""
        LOGGER.info(
            f"{PREFIX}mixed precision{src}: layer bits {mapping or '{} (nothing fits)'}; average weight bits "
            f"{mixed['w_bits']:.3f} (uniform {uni['w_bits']:.3f}), average activation bits {mixed['a_bits']:.3f} "
            f"(uniform {uni['a_bits']:.3f}), {mixed['bops'] / 1e9:.3f} GBOPs at {BOPS_IMGSZ} px = "
            f"{100 * mixed['bops'] / fp:.2f} % of FP (uniform {uni['bops'] / 1e9:.3f} GBOPs = "
            f"{100 * uni['bops'] / fp:.2f} %), size {mixed['size_bytes'] / 1024:.1f} KiB (uniform "
            f"{uni['size_bytes'] / 1024:.1f} KiB)"
        )
    model.gabfusion_layer_bits = mapping  # the resolved mapping, kept with the model (and its checkpoints)
    return mapping


def precision_summary(model, cfg: QATConfig, layer_bits: dict | None = None, costs: dict | None = None,
                      imgsz: int = BOPS_IMGSZ) -> str:
    """The footer of the precision table: this plan, uniform ``W{w_bits}A{a_bits}`` and FP32 side by side.

    Average weight bits, average activation bits, GBOPs, share of the FP BOPs and size (``quant.mixed``'s size and
    compute models), planned on the float ``model`` before the swap.

    Args:
        model (DetectionModel): The float model (with any GABFusion nodes) about to be converted.
        cfg (QATConfig): The run's settings.
        layer_bits (dict | None): The resolved mixed-precision mapping (None: uniform).
        costs (dict | None): ``conv_costs(model, imgsz)`` if already measured.
        imgsz (int): Input side the BOPs are counted at.

    Examples:
        >>> from ultralytics.nn.tasks import DetectionModel
        >>> cfg = QATConfig.from_keys({"qat": "lsq", "w_bits": 4, "a_bits": 4})
        >>> print(precision_summary(DetectionModel("yolov5n.yaml", nc=16, verbose=False), cfg))  # doctest: +SKIP
    """
    plan = _plan_fn(model, cfg)
    costs = costs if costs is not None else conv_costs(model, imgsz)
    entries = [("this plan" + ("" if layer_bits else " (uniform)"), plan_totals(model, plan(layer_bits or {}), costs)),
               (f"uniform W{cfg.w_bits}A{cfg.a_bits}", plan_totals(model, plan({}), costs)),
               ("FP32", fp_totals(model, costs))]
    return format_totals(entries, imgsz)


# ---------------------------------------------------------------------------------------------- calibration
def needs_calibration(model) -> bool:
    """Whether a GABFusion identity fit is pending or an activation quantizer has not been initialised."""
    return getattr(model, "gab_identity_pending", False) or activations_pending(model)


def activations_pending(model) -> bool:
    """Whether an activation quantizer (conv input or output) has not been initialised from data."""
    return any(m.act_quant is not None and not bool(m.act_quant.initialized) for _, m in quant_convs(model)) or any(
        not bool(q.initialized) for _, _, q in output_quantizers(model))


@torch.no_grad()
def calibrate_model(model, images: list, init: str = "mse", bn_images: list | None = None) -> None:
    """Data-dependent inits before training: GABFusion LayerNorm fit (if pending) and activation quantizers.

    With ``bn_images`` (``qat_bn_recalib``) the activation quantizers are calibrated twice around a re-estimation of
    the BatchNorm statistics: calibrate on the FP statistics, re-estimate the statistics of the quantized network,
    re-calibrate every activation quantizer on them, re-estimate once more. The FP statistics describe a network
    without quantization error; at W3A3 that mismatch alone cost ~18 mAP50 of the PTQ model (docs/RESULTS.md 15).
    Trained statistics are re-estimated as a shift (:func:`~.stability.shift_bn_statistics`): they move only by what
    quantization changes, so W8A8 keeps the FP model's statistics (docs/RESULTS.md 16).

    Under torch.distributed each rank passes its own batches; they are gathered first (batch ``k`` of every rank,
    concatenated in rank order), so every rank calibrates on the union exactly as one process holding all the
    images would, and rank 0's result is then broadcast to make the ranks bit-identical.

    Args:
        model (nn.Module): The (unwrapped) model to calibrate in place.
        images (list[Tensor]): This rank's preprocessed image batches.
        init (str): ``qat_init`` of the activation quantizers.
    """
    distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    if distributed:
        images = gather_batches(images)
    if getattr(model, "gab_identity_pending", False):
        with quantizers_disabled(model):
            err = calibrate_identity(model, torch.cat(images[:2]))
        model.gab_identity_pending = False
        out = err.get("output", {}) if isinstance(err, dict) else {}
        LOGGER.info(
            f"{PREFIX}GABFusion LayerNorm affine fitted to the replaced Concat outputs (relative output change "
            f"{out.get('before', float('nan')):.3g} -> {out.get('after', float('nan')):.3g})"
        )
    if activations_pending(model):
        bn = "eval" if bn_statistics_trained(model) else "batch"  # trained BN: what validation and export see
        k = calibrate_activations(model, images, init=init, bn=bn)
        LOGGER.info(f"{PREFIX}calibrated activation quantizers on {k} batches of {len(images[0])} images "
                    f"(BatchNorm on {'running' if bn == 'eval' else 'batch'} statistics)")
        if bn_images:
            # trained statistics: kept and moved by the shift quantization causes; fresh ones: plainly re-estimated
            base = bn_statistics(model) if bn == "eval" else None
            fp = fp_bn_statistics(model, bn_images) if base else None  # once: calibration leaves the weights alone

            def reestimate():
                return shift_bn_statistics(model, bn_images, base, fp) if base else recalibrate_bn(model, bn_images)

            reestimate()
            calibrate_activations(model, images, only_uninitialized=False, init=init, bn="eval")
            n = reestimate()
            LOGGER.info(f"{PREFIX}BatchNorm statistics of the quantized network re-estimated on {n} batches "
                        f"({'trained statistics moved by the quantization shift' if base else 'plain average'}), "
                        f"activation quantizers re-calibrated on them")
    if distributed:
        for t in list(model.parameters()) + list(model.buffers()):
            dist.broadcast(t.data, src=0)


def gather_batches(images: list) -> list:
    """All-gather a list of image batches: batch ``k`` of every rank, concatenated in rank order (sizes may differ)."""
    world = dist.get_world_size()
    dev = images[0].device if images else torch.device("cpu")
    n = torch.tensor([len(images)], dtype=torch.int64, device=dev)  # on the device: NCCL reduces CUDA tensors only
    counts = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(counts, n)
    k = min(int(c) for c in counts)  # every rank must take part in every gather
    out = []
    for b in images[:k]:
        sizes = [torch.zeros(1, dtype=torch.int64, device=dev) for _ in range(world)]
        dist.all_gather(sizes, torch.tensor([len(b)], dtype=torch.int64, device=dev))
        big = max(int(s) for s in sizes)
        pad = torch.zeros((big, *b.shape[1:]), dtype=b.dtype, device=b.device)
        pad[: len(b)] = b
        parts = [torch.empty_like(pad) for _ in range(world)]
        dist.all_gather(parts, pad)
        out.append(torch.cat([p[: int(s)] for p, s in zip(parts, sizes)]))
    return out


# ------------------------------------------------------------------------------------------------------ ADA
def attach_ada(student, teacher, cfg: QATConfig) -> ADALoss:
    """Check ``teacher`` against ``student``, build the ADA loss and wrap the student's criterion with it.

    Args:
        student (DetectionModel): The (unwrapped) model being trained.
        teacher (nn.Module): The frozen FP teacher (see :func:`~ultralytics_gabfusion.distill.load_teacher`).
        cfg (QATConfig): ``ada``, ``ada_attn``, ``ada_div``, ``ada_layers`` and ``ada_t`` are read.

    Returns:
        (ADALoss): The loss, attached to ``student`` (its criterion is an ``ADACriterion``).
    """
    layers = list(cfg.ada_layers) if cfg.ada_layers else default_layers(student)
    check_teacher(student, teacher, layers)
    ada = ADALoss(teacher, layers, attn=cfg.ada_attn, div=cfg.ada_div, weight=cfg.ada, temperature=cfg.ada_t,
                  quantizers=qada_quantizers(student, layers, cfg.ada_attn))
    ada.attach(student)
    student.criterion = ADACriterion(student.init_criterion(), ada, student)
    return ada


def qada_quantizers(model, layers, attn: str) -> dict:
    """For ``ada_attn=qada``: the student's activation quantizer reading each supervised layer (else empty)."""
    return {j: consumer_quantizer(model, j) for j in layers} if attn == "qada" else {}


def consumer_quantizer(model, layer: int):
    """``Q(x)`` of the head conv (box branch, else class branch) that reads layer ``layer``'s output (for qada's r
    term), or None.

    Returns the conv's :class:`~.quant.qconv.ConvInputQuantizer`: the tensor the conv really consumes, including
    N2UQ's ``input_shift``.
    """
    head = model.model[-1]
    try:
        idx = list(head.f).index(layer)
    except ValueError:
        return None
    for seq in (getattr(head, "cv2", None), getattr(head, "cv3", None)):
        if seq is None:
            continue
        for m in seq[idx].modules():
            if isinstance(m, QuantConv2d) and m.act_quant is not None:
                return m.input_quantizer()
    return None


# ------------------------------------------------------------------------------------------------- all of it
def prepare_qat_model(model, cfg: QATConfig, images: list, weights=None, teacher=None, device=None):
    """Run the whole set-up on ``model`` in order: structure, weight load and init, calibration, ADA.

    Args:
        model (DetectionModel): A freshly built float model.
        cfg (QATConfig): The run's plugin settings.
        images (list[Tensor]): Preprocessed image batches for calibration (``cfg.qat_calib`` of them are used).
        weights (nn.Module | None): Weights to load after the structure change.
        teacher (nn.Module | None): FP teacher; required when ``cfg.ada > 0``.
        device (str | torch.device | None): Where the model is calibrated and trained (None: where it is), as the
            trainer does: the structure is built first, then the model moves, then calibration runs there.

    Returns:
        (tuple): ``(model, ada)``; ``ada`` is None without ADA.
    """
    build_structure(model, cfg, weights)
    if device is not None:
        model.to(device)
        images = [x.to(device) for x in images]
    if needs_calibration(model):
        calibrate_model(model, images[: cfg.qat_calib], init=cfg.qat_init)
    if cfg.ada > 0:
        if teacher is None:
            raise ValueError("ADA needs a full-precision teacher: pass teacher= or set ada=0.")
        return model, attach_ada(model, teacher if device is None else teacher.to(device), cfg)
    return model, None


__all__ = ["attach_ada", "build_structure", "calibrate_model", "consumer_quantizer", "fusion_form", "gather_batches",
           "needs_calibration", "precision_summary", "prepare_qat_model", "qada_quantizers", "resolve_mixed_precision"]
