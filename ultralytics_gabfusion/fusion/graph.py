"""Put GABFusion into Ultralytics models: YAML registration, in-place insertion, mode switches, per-step updates.

Two ways in:

- model YAMLs: after ``register_gabfusion()`` (run on import of ``ultralytics_gabfusion.fusion``) a head row
  ``[[-1, 6], 1, GABFusion, [1]]`` builds a GABFusion with the summed channel count and ``n_branches=len(f)``;
  optional args ``[1, mode]`` or ``[1, mode, {beta: 0.1, eta: 0.05, rms: true, form: paper}]``.
- stock models: ``insert_gabfusion(model)`` swaps every neck ``Concat`` in place (before FP weights load).

Examples:
    >>> from ultralytics.nn.tasks import DetectionModel
    >>> from ultralytics_gabfusion.fusion import insert_gabfusion, neck_concat_indices
    >>> model = DetectionModel("yolov5s.yaml", nc=16, verbose=False)
    >>> neck_concat_indices(model)
    [12, 16, 19, 22]
    >>> insert_gabfusion(model, mode="balanced")
    [12, 16, 19, 22]
"""

from __future__ import annotations

import copy
import functools

import torch
import torch.distributed as dist
import torch.nn as nn
from ultralytics.nn import tasks
from ultralytics.nn.modules import Concat
from ultralytics.utils import LOGGER
from ultralytics.utils.torch_utils import unwrap_model

from .modules import FoldedFusion, GABFusion, _check_mode

_OPT_KEYS = ("beta", "eta", "eps", "tau", "rms", "form")


def _type_name(cls) -> str:
    """The ``.type`` string Ultralytics would print for ``cls`` (its import path)."""
    return f"{cls.__module__}.{cls.__qualname__}"


def _concat_cls():
    return Concat


def detection_model(model) -> nn.Module:
    """Return the Ultralytics ``BaseModel`` inside a DDP/compile wrapper or a ``YOLO`` object."""
    model = unwrap_model(model)
    inner = getattr(model, "model", None)
    while not isinstance(inner, nn.Sequential) and isinstance(inner, nn.Module):
        # ultralytics.YOLO (itself an nn.Module) holds the DetectionModel at .model
        model = unwrap_model(inner)
        inner = getattr(model, "model", None)
    if not isinstance(getattr(model, "model", None), nn.Sequential):
        raise ValueError(f"{type(model).__name__} is not an Ultralytics YOLO model (no layer Sequential at .model).")
    return model


def fusion_nodes(model) -> list[GABFusion]:
    """All GABFusion modules of ``model`` (any nn.Module or YOLO wrapper), in layer order."""
    if not isinstance(model, nn.Module) and isinstance(getattr(model, "model", None), nn.Module):
        model = model.model
    return [m for m in unwrap_model(model).modules() if isinstance(m, GABFusion)]


def _model_name(model) -> str:
    y = getattr(model, "yaml", None) or {}
    return str(y.get("yaml_file") or type(model).__name__) if isinstance(y, dict) else type(model).__name__


def neck_concat_indices(model) -> list[int]:
    """Layer indices of the neck fusion nodes: top-level Concat (or GABFusion) layers after the backbone.

    Only layers of the model's Sequential are considered, so the internal concats of C3 / C3k2 / SPPF never
    appear. A node counts when its index is >= ``len(model.yaml["backbone"])`` and it has two or more inputs.

    Args:
        model: An Ultralytics DetectionModel (or YOLO wrapper / DDP-wrapped model).

    Returns:
        (list[int]): e.g. ``[12, 16, 19, 22]`` for yolov5s.yaml, ``[12, 15, 18, 21]`` for yolo11s.yaml.
    """
    model = detection_model(model)
    y = getattr(model, "yaml", None)
    n_backbone = len(y["backbone"]) if isinstance(y, dict) and "backbone" in y else 0
    kinds = (_concat_cls(), GABFusion)
    return [
        int(m.i)
        for m in model.model
        if isinstance(m, kinds)
        and getattr(m, "i", -1) >= n_backbone
        and isinstance(m.f, (list, tuple))
        and len(m.f) >= 2
    ]


@torch.no_grad()
def _probe_input_channels(layers: nn.Sequential, indices, ch_in: int, dim: int = 1) -> dict[int, list[int]]:
    """Input channel counts of the layers at ``indices``, learned from a tiny dry forward in eval mode.

    Runs Ultralytics' layer routing on zeros (no BN statistics change: eval mode, restored afterwards) and stops
    after the last requested layer, so the head never runs. 64 px covers stride-32 and stride-64 models; 256 px
    is tried if a shape mismatch shows a coarser stride.
    """
    want, last = set(indices), max(indices)
    p = next(layers.parameters(), None)
    device, dtype = (p.device, p.dtype) if p is not None else (torch.device("cpu"), torch.float32)
    modes = {m: m.training for m in layers.modules()}
    layers.eval()
    err = None
    try:
        for s in (64, 256):
            try:
                x, y, found = torch.zeros(1, ch_in, s, s, device=device, dtype=dtype), [], {}
                for m in layers:
                    if m.f != -1:
                        x = y[m.f] if isinstance(m.f, int) else [x if j == -1 else y[j] for j in m.f]
                    if m.i in want:
                        found[m.i] = [int(t.shape[getattr(m, "d", dim)]) for t in x]
                    if m.i >= last:
                        return found
                    x = m(x)
                    y.append(x)
            except RuntimeError as e:  # e.g. odd feature sizes that do not line up at this image size
                err = e
    finally:
        for m, t in modes.items():
            m.training = t
    raise RuntimeError(f"GABFusion could not infer the input channels of layers {sorted(want)}: {err}")


def _input_channels(model) -> int:
    y = getattr(model, "yaml", None)
    if isinstance(y, dict) and "channels" in y:
        return int(y["channels"])
    conv = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    return conv.in_channels if conv is not None else 3


def _make_node(old: nn.Module, channels: list[int], mode: str, opts: dict, device=None) -> GABFusion:
    """Build a GABFusion for the Concat ``old`` (same dimension, inputs, .i .f .type .np bookkeeping)."""
    dim = getattr(old, "d", 1)
    if mode == "learned" and "form" not in opts:
        opts = {**opts, "form": "paper"}  # learned alpha exists only in the paper form's forward pass
    node = GABFusion(dimension=dim, n_branches=len(channels), channels=sum(channels), mode=mode, **opts)
    if device is not None:
        node.to(device)  # float32 whatever the model dtype (see precision.KeepFP32)
    node.i, node.f = old.i, old.f
    node.type = _type_name(GABFusion)
    node.np = sum(x.numel() for x in node.parameters())
    return node


def _check_opts(opts: dict) -> dict:
    bad = sorted(set(opts) - set(_OPT_KEYS))
    if bad:
        raise ValueError(f"Unknown GABFusion option(s) {bad}. Allowed: {', '.join(_OPT_KEYS)}.")
    return opts


def _swap_layers(model_layers: nn.Sequential, indices, ch_in: int, mode: str, opts: dict):
    """Replace the Concat layers at ``indices`` of a layer Sequential with GABFusion nodes."""
    todo = [i for i in indices if not isinstance(model_layers[i], GABFusion)]
    if not todo:
        return {}
    chans = _probe_input_channels(model_layers, todo, ch_in, dim=1)
    p = next(model_layers.parameters(), None)
    for i in todo:
        model_layers[i] = _make_node(model_layers[i], chans[i], mode, opts, None if p is None else p.device)
    return {i: chans[i] for i in todo}


def insert_gabfusion(model, mode: str = "balanced", **opts) -> list[int]:
    """Replace every neck Concat of an Ultralytics detection model with GABFusion, in place.

    Call before the FP weights load (the stock state_dict then loads key for key: the new nodes only add
    ``model.<i>.norm.weight/bias``, ``lam``, ``grad_ema`` and ``n_updates``). Channel widths come from a
    1x3x64x64 dry forward. Idempotent: nodes that already are GABFusion only get ``mode``/``opts``.

    Args:
        model: Ultralytics DetectionModel (or YOLO wrapper).
        mode (str): "balanced", "learned" or "off".
        **opts: GABFusion options ``beta, eta, eps, tau, rms, form`` (form: "grad", the default, or "paper").

    Returns:
        (list[int]): The fusion layer indices.

    Raises:
        ValueError: Unknown mode/option, or the model has no Concat after its backbone.

    Examples:
        >>> from ultralytics.nn.tasks import DetectionModel
        >>> model = DetectionModel("yolo11s.yaml", nc=16, verbose=False)
        >>> insert_gabfusion(model, "learned", beta=0.2)
        [12, 15, 18, 21]
    """
    mode = _check_mode(mode)
    _check_opts(opts)
    model = detection_model(model)
    idx = neck_concat_indices(model)
    if not idx:
        raise ValueError(
            f"model {_model_name(model)} has no Concat after the backbone; GABFusion needs a PAN/FPN neck; use gab=off"
        )
    _swap_layers(model.model, idx, _input_channels(model), mode, opts)
    set_fusion_mode(model, mode, **opts)
    return idx


def set_fusion_mode(model, mode: str, **opts) -> list[int]:
    """Set the mode (and options ``beta, eta, eps, tau, rms, form``) of every GABFusion in ``model``.

    For models built from the ``-gab`` YAMLs. Call before the optimizer and the EMA are created (learned mode
    turns ``lam`` into a Parameter).

    Returns:
        (list[int]): Layer indices of the nodes changed (``-1`` for a node without an ``.i``).
    """
    mode = _check_mode(mode)
    opts = dict(_check_opts(opts))
    form = opts.pop("form", None)
    out = []
    for node in fusion_nodes(model):
        # learned needs the paper form first; leaving learned must happen before a switch to the grad form
        if form is not None and mode == "learned":
            node.set_form(form)
        node.set_mode(mode)
        if form is not None:
            node.set_form(form)
        node.configure(**opts)
        node.np = sum(x.numel() for x in node.parameters())
        out.append(int(getattr(node, "i", -1)))
    return out


def fusion_parameters(model) -> list[nn.Parameter]:
    """The learned-mode ``lam`` Parameters of all nodes (put them in a no-decay group of their own)."""
    return [p for node in fusion_nodes(model) for p in node.fusion_parameters()]


@torch.no_grad()
def update_fusion(model, grad_scale=None) -> int:
    """Per optimizer step: update every GABFusion's gradient EMA (all modes) and lambda (balanced).

    Under torch.distributed all nodes' accumulators are averaged in a single all-reduce, so every rank applies the
    same update. Call it on every rank, after the step's backward passes (e.g. at the start of
    ``trainer.optimizer_step``), with ``grad_scale=trainer.scaler.get_scale()`` when AMP is on.

    Returns:
        (int): Number of nodes updated.
    """
    nodes = [n for n in fusion_nodes(model)]
    if not nodes:
        return 0
    distributed = dist.is_available() and dist.is_initialized()
    if distributed:
        # Every rank has the same nodes and backward count; reduce squared norms and element counts together.
        parts = [n.accumulators() for n in nodes]
        packed = torch.cat(parts)
        pend = torch.tensor([float(n.measured) for n in nodes], device=packed.device)
        dist.all_reduce(packed)
        dist.all_reduce(pend, op=dist.ReduceOp.MIN)
        packed /= dist.get_world_size()
        for n, chunk, p in zip(nodes, packed.split([len(x) for x in parts]), pend.tolist()):
            n.load_accumulators(chunk, measured=p > 0)  # some rank missed a branch: skip this step everywhere
    count = 0
    for n in nodes:
        norms = n.pending_norms(grad_scale)
        if norms is None:
            n.reset_accumulators()
            continue
        n.update_lambda(norms=norms)
        count += 1
    return count


@torch.no_grad()
def sync_fusion_state(src, dst) -> int:
    """Copy the balancer state exactly from the training model to its EMA copy (in place).

    Ultralytics' ModelEMA lerps every float state_dict entry, which would lag ``lam``/``grad_ema`` behind the
    controller. Copied: ``grad_ema``, ``n_updates`` and, unless the node is in learned mode, ``lam``. A learned
    ``lam`` is a weight like any other and keeps its EMA average. In-place ``copy_`` keeps the tensors that
    ModelEMA caches. Call right after each ``ema.update`` (i.e. after ``optimizer_step``).

    Returns:
        (int): Number of nodes synchronised.
    """
    a, b = fusion_nodes(src), fusion_nodes(dst)
    if len(a) != len(b):
        raise ValueError(f"sync_fusion_state: {len(a)} GABFusion nodes in src but {len(b)} in dst.")
    for s, d in zip(a, b):
        d.grad_ema.copy_(s.grad_ema)
        d.n_updates.copy_(s.n_updates)
        if s.mode != "learned" and not isinstance(d.lam, nn.Parameter):
            d.lam.copy_(s.lam)
    return len(a)


# ---------------------------------------------------------------------------------------------- YAML registration
def _parse_gab_row(args) -> tuple[int, str, dict]:
    """YAML args of a GABFusion row -> (dimension, mode, opts)."""
    args = list(args or [])
    dim = int(args[0]) if args else 1
    mode = _check_mode(args[1]) if len(args) > 1 and args[1] is not None else "balanced"
    opts = dict(args[2]) if len(args) > 2 and args[2] else {}
    if len(args) > 3:
        raise ValueError(f"GABFusion YAML args are [dimension, mode, {{options}}], got {args}.")
    return dim, mode, _check_opts(opts)


def register_gabfusion() -> None:
    """Make ``GABFusion`` usable as a module name in Ultralytics model YAMLs (idempotent).

    ``ultralytics.nn.tasks.parse_model`` only does channel bookkeeping for classes it knows, and an unknown
    multi-input module crashes at ``c2 = ch[f]``. The wrapper installed here rewrites each GABFusion row as a
    ``Concat`` row with the same ``from`` and dimension (so upstream bookkeeping is identical, including
    ``c2 = sum(ch[x] for x in f)``), calls the original ``parse_model``, then swaps the built Concat at those
    indices for a GABFusion with the summed channel count (from a 64 px dry forward) and ``n_branches=len(f)``.
    The model's ``yaml`` keeps the GABFusion rows, so rebuilding from it (checkpoints, DDP workers) goes
    through the same path. ``tasks.GABFusion`` / ``tasks.FoldedFusion`` are also set for name lookups.
    """
    tasks.GABFusion = GABFusion
    tasks.FoldedFusion = FoldedFusion
    if getattr(tasks.parse_model, "_gabfusion_wrapper", False):
        return
    original = tasks.parse_model

    @functools.wraps(original)
    def parse_model(d, ch, verbose=True):
        rows = d.get("backbone", []) + d.get("head", [])
        gab = {i: _parse_gab_row(r[3]) for i, r in enumerate(rows) if r[2] in ("GABFusion", GABFusion)}
        if not gab:
            return original(d, ch, verbose=verbose)
        d = copy.deepcopy(d)
        nb = len(d.get("backbone", []))
        for i, (dim, _, _) in gab.items():
            part, j = ("backbone", i) if i < nb else ("head", i - nb)
            row = d[part][j]
            d[part][j] = [row[0], row[1], "Concat", [dim]]
        layers, save = original(d, ch, verbose=verbose)
        chans = _probe_input_channels(layers, list(gab), ch, dim=1)
        for i, (dim, mode, opts) in gab.items():
            layers[i] = _make_node(layers[i], chans[i], mode, opts)
        if verbose:
            desc = ", ".join(f"{i} ({'+'.join(map(str, chans[i]))}, {gab[i][1]})" for i in gab)
            LOGGER.info(f"GABFusion replaced the Concat rows built above at layers: {desc}")
        return layers, save

    parse_model._gabfusion_wrapper = True
    tasks.parse_model = parse_model
