"""Mixed precision: per-layer bit-widths, model size, and a bit allocation under a budget from a sensitivity ranking.

``qat_layer_bits`` sets the W and A bits of the *ordinary* convs of whole Ultralytics layers (the convs that would
otherwise use ``w_bits``/``a_bits``); the first conv and the Detect predictors keep ``qat_first_bits`` /
``qat_head_bits`` and ``qat_skip`` still wins. It is either a mapping ``{layer: bits}`` or the ``sensitivity.csv``
written by ``yolo-gab sensitivity`` together with ``qat_bits_budget``; then :func:`allocate_bits` raises the most
sensitive layers first to 8 bits (or the highest of 7, 6, 5 ... that still fits) while the budget holds.

Size model (used by the budget and by the bench's size axis): every conv weight at its weight bit-width (32 bits
when it is not quantized), every other parameter (biases, BatchNorm, LayerNorm) at 32 bits; quantizer parameters
(steps, offsets: ~1-2 % of a 4-bit YOLOv5n) are left out, so a plan and the converted model have the same size.
Activation bits do not change the stored size. The *average bits* of a plan are the weight bits averaged over the
elements of all quantized conv weights (ends included).

Compute model (the activation side, used by BOPs budgets, the precision summary, the sensitivity output and the
bench's sweep): for one ``imgsz x imgsz`` image, every ``nn.Conv2d`` that runs in the forward pass has

- ``MACs = out_channels x H_out x W_out x (in_channels / groups) x kH x kW`` (output sizes from one forward pass with
  hooks, :func:`conv_costs`);
- ``BOPs = MACs x w_bits x a_bits`` (bit-operations), a conv without a weight or input quantizer (``qat_skip``, the
  DFL projection, an FP model) at 32 bits on that side; the plan's BOPs are the sum over the convs (other operations
  -- BatchNorm, activations, concatenations, Detect's decoding -- are not counted).

The *average activation bits* are the input bits averaged over the activation elements each quantized conv reads
(its input tensor, ``in_channels x H_in x W_in``; a tensor read by two convs counts twice): the activation
counterpart of the weight average, i.e. the mean bit-width of the activation traffic into the convs. BOPs are
reported at a 640 px input (:data:`BOPS_IMGSZ`, Ultralytics' GFLOPs convention) unless a size is given; the share
of the FP model's BOPs does not depend on the input size.

Examples:
    >>> from ultralytics.nn.tasks import DetectionModel
    >>> from ultralytics_gabfusion.quant.convert import plan_policy
    >>> from ultralytics_gabfusion.quant.mixed import average_bits, plan_size_bytes
    >>> model = DetectionModel("yolov5n.yaml", nc=16, verbose=False)
    >>> rows = plan_policy(model, 4, 4, layer_bits={9: 8})
    >>> [r["w_bits"] for r in rows if r["layer"] == 9]
    [8, 8]
    >>> round(average_bits(model, rows), 2) > 4
    True
    >>> costs = conv_costs(model, 640)
    >>> plan_bops(rows, costs) < plan_bops(plan_policy(model, 8, 8), costs)
    True
"""

from __future__ import annotations

import csv
import os
from pathlib import Path

import torch
import torch.nn as nn

from ..settings import parse_bits_budget
from .probe import conv_hooks, probe_image
from .qconv import quant_convs, quantizers_disabled
from .quantizers import FakeQuantizer

RAISE_LEVELS = (8, 7, 6, 5, 4, 3)  # bits tried for a sensitive layer, highest first (only those above its base)
FP_BITS = 32
BOPS_IMGSZ = 640  # input side at which BOPs budgets and the precision summary count (settings.parse_bits_budget too)


def _weight_numel(model: nn.Module, rows: list[dict]) -> dict[str, int]:
    mods = dict(model.named_modules())
    return {r["name"]: mods[r["name"]].weight.numel() for r in rows}


def plan_size_bytes(model: nn.Module, rows: list[dict]) -> float:
    """Stored size in bytes of ``model`` quantized by plan ``rows`` (see the module docstring for the size model).

    Args:
        model (nn.Module): The model the rows were planned on (float or already converted: same parameters).
        rows (list[dict]): :func:`~.convert.plan_policy` rows (``name``, ``w_bits``).

    Returns:
        (float): Bytes: conv weights at their bits, everything else at 32 bits.
    """
    numel = _weight_numel(model, rows)
    total = sum(p.numel() for p in model.parameters())
    conv_bits = sum(numel[r["name"]] * (r["w_bits"] or FP_BITS) for r in rows)
    return (conv_bits + FP_BITS * (total - sum(numel.values()))) / 8


def model_size_bytes(model: nn.Module) -> float:
    """Stored size in bytes of a (converted or float) model: quantized conv weights at their bits, the rest at 32.

    Examples:
        >>> from ultralytics.nn.tasks import DetectionModel
        >>> m = DetectionModel("yolov5n.yaml", nc=16, verbose=False)
        >>> model_size_bytes(m) == 4 * sum(p.numel() for p in m.parameters())
        True
    """
    saved = 0.0
    for _, m in quant_convs(model):
        if m.weight_quant is not None:
            saved += m.weight.numel() * (FP_BITS - m.w_bits) / 8
        if m.input_shift is not None:
            saved += FP_BITS / 8 * m.input_shift.numel()
    quant_params = sum(p.numel() for q in model.modules() if isinstance(q, FakeQuantizer) for p in q.parameters())
    return FP_BITS / 8 * (sum(p.numel() for p in model.parameters()) - quant_params) - saved


def average_bits(model: nn.Module, rows: list[dict]) -> float:
    """Weight bits averaged over the elements of every quantized conv weight of plan ``rows`` (nan if none)."""
    numel = _weight_numel(model, rows)
    q = [r for r in rows if r["w_bits"]]
    n = sum(numel[r["name"]] for r in q)
    return sum(numel[r["name"]] * r["w_bits"] for r in q) / n if n else float("nan")


@torch.no_grad()
def _measure_costs(model: nn.Module, imgsz: int) -> dict[str, dict[str, int]]:
    """:func:`conv_costs` by one forward pass at ``imgsz`` (eval mode, quantizers off, flags restored)."""
    costs: dict[str, dict[str, int]] = {}

    def record(name):
        def hook(m, args, out):
            kh, kw = m.kernel_size
            c = costs.setdefault(name, {"macs": 0, "act": 0})  # a conv run twice counts twice
            c["macs"] += out[0].numel() * (m.in_channels // m.groups) * kh * kw
            c["act"] += args[0][0].numel()

        return hook

    with conv_hooks(model, record), quantizers_disabled(model):
        model(probe_image(model, imgsz))
    return costs


def conv_costs(model: nn.Module, imgsz: int = BOPS_IMGSZ, probe: int | None = 64) -> dict[str, dict[str, int]]:
    """Per ``nn.Conv2d`` of ``model``: its MACs and the activation elements it reads, for one ``imgsz`` image.

    ``macs = out_channels * H_out * W_out * (in_channels // groups) * kH * kW`` and ``act = in_channels * H_in * W_in``,
    from the shapes seen by forward hooks in one forward pass (eval mode, quantizers off, no state changed). Convs
    that do not run are absent.

    With ``probe``, the pass runs at ``probe`` and ``2 * probe`` px instead of ``imgsz`` when every count grows
    exactly 4x between the two (each feature map side proportional to the input side, as for YOLO models at
    multiples of their stride) and ``imgsz`` is a multiple of ``probe / 2``; the counts are then scaled by
    ``(imgsz / probe) ** 2`` in integer arithmetic (the same numbers as a pass at ``imgsz``, at a fraction of the
    cost). Otherwise the pass runs at ``imgsz``.

    Args:
        model (nn.Module): An Ultralytics model, float or converted.
        imgsz (int): Side of the square input image.
        probe (int | None): Side of the small probe image; None always measures at ``imgsz``.

    Returns:
        (dict[str, dict[str, int]]): ``{conv name: {"macs": int, "act": int}}``.
    """
    imgsz = int(imgsz)
    if probe and imgsz != probe and imgsz % max(probe // 2, 1) == 0:
        a, b = _measure_costs(model, probe), _measure_costs(model, 2 * probe)
        num, den = imgsz * imgsz, probe * probe
        if a.keys() == b.keys() and all(b[n][k] == 4 * v and (v * num) % den == 0 for n in a for k, v in a[n].items()):
            return {n: {k: v * num // den for k, v in c.items()} for n, c in a.items()}
    return _measure_costs(model, imgsz)


def _bits(r: dict, key: str) -> int:
    return r.get(key) or FP_BITS


def plan_bops(rows: list[dict], costs: dict[str, dict[str, int]]) -> float:
    """Bit-operations of plan ``rows``: ``sum MACs * w_bits * a_bits`` over every conv in ``costs``.

    A conv without weight (activation) bits in ``rows`` -- full precision, or not in the plan at all such as the
    DFL projection -- counts 32 bits on that side. Exact (integer sum, one conversion to float).

    Args:
        rows (list[dict]): :func:`~.convert.plan_policy` rows (``name``, ``w_bits``, ``a_bits``).
        costs (dict): :func:`conv_costs` of the model at the input size of interest.
    """
    by = {r["name"]: r for r in rows}
    return float(sum(c["macs"] * _bits(by.get(n, {}), "w_bits") * _bits(by.get(n, {}), "a_bits")
                     for n, c in costs.items()))


def fp_bops(costs: dict[str, dict[str, int]]) -> float:
    """Bit-operations of the FP model: every conv at 32-bit weights and 32-bit activations."""
    return float(sum(c["macs"] for c in costs.values()) * FP_BITS * FP_BITS)


def average_act_bits(rows: list[dict], costs: dict[str, dict[str, int]]) -> float:
    """Input bits averaged over the activation elements read by every conv of ``rows`` with an input quantizer.

    Weighted by ``costs[name]["act"]`` (the conv's input elements); nan when no conv quantizes its input.
    """
    q = [r for r in rows if r.get("a_bits") and r["name"] in costs]
    n = sum(costs[r["name"]]["act"] for r in q)
    return sum(costs[r["name"]]["act"] * r["a_bits"] for r in q) / n if n else float("nan")


def model_rows(model: nn.Module) -> list[dict]:
    """Plan-like rows (``name``, ``w_bits``, ``a_bits``) of a converted model's quantized convs."""
    return [{"name": n, "w_bits": m.w_bits, "a_bits": m.a_bits} for n, m in quant_convs(model)]


def model_bops(model: nn.Module, imgsz: int = BOPS_IMGSZ) -> float:
    """Bit-operations of a converted (or float) model for one ``imgsz`` image: each conv at its own bits.

    Examples:
        >>> from ultralytics.nn.tasks import DetectionModel
        >>> m = DetectionModel("yolov5n.yaml", nc=16, verbose=False)
        >>> model_bops(m, 64) == fp_bops(conv_costs(m, 64))
        True
    """
    return plan_bops(model_rows(model), conv_costs(model, imgsz))


def plan_totals(model: nn.Module, rows: list[dict], costs: dict[str, dict[str, int]]) -> dict:
    """``{"w_bits", "a_bits", "bops", "size_bytes"}`` of plan ``rows`` (averages as in the module docstring).

    Args:
        model (nn.Module): The float model the rows were planned on (for weight sizes).
        rows (list[dict]): :func:`~.convert.plan_policy` rows.
        costs (dict): :func:`conv_costs` of ``model``.
    """
    return {"w_bits": average_bits(model, rows), "a_bits": average_act_bits(rows, costs),
            "bops": plan_bops(rows, costs), "size_bytes": plan_size_bytes(model, rows)}


def fp_totals(model: nn.Module, costs: dict[str, dict[str, int]]) -> dict:
    """:func:`plan_totals` of the FP model: 32-bit weights and activations everywhere."""
    return {"w_bits": float(FP_BITS), "a_bits": float(FP_BITS), "bops": fp_bops(costs),
            "size_bytes": FP_BITS / 8 * sum(p.numel() for p in model.parameters())}


def format_totals(entries: list[tuple[str, dict]], imgsz: int = BOPS_IMGSZ) -> str:
    """A small table of :func:`plan_totals` rows: average W / A bits, GBOPs, share of FP BOPs, size.

    Args:
        entries (list[tuple[str, dict]]): ``(label, totals)``; the share is taken against the row labelled ``FP32``
            (or the last row).
        imgsz (int): The input side the BOPs were counted at (named in the header).
    """
    ref = next((t for label, t in entries if label == "FP32"), entries[-1][1])["bops"]
    width = max(len(label) for label, _ in entries) + 2
    lines = [f"{'':<{width}}{'avg W bits':>12}{'avg A bits':>12}{'GBOPs':>11}{'% of FP':>10}{'size KiB':>11}   "
             f"(BOPs = MACs x W bits x A bits, {imgsz} px input)"]
    for label, t in entries:
        share = 100 * t["bops"] / ref if ref else float("nan")
        lines.append(f"{label:<{width}}{t['w_bits']:>12.3f}{t['a_bits']:>12.3f}{t['bops'] / 1e9:>11.3f}"
                     f"{share:>9.2f}%{t['size_bytes'] / 1024:>11.1f}")
    return "\n".join(lines)


def read_sensitivity(path: str | os.PathLike) -> dict[int, float]:
    """``{layer: score}`` from a ``sensitivity.csv`` written by ``yolo-gab sensitivity`` (columns ``layer``, ``score``).

    Raises:
        FileNotFoundError: No such file.
        ValueError: The file lacks the ``layer``/``score`` columns or holds no rows.
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"qat_layer_bits={path}: file not found; pass the sensitivity.csv that 'yolo-gab "
                                f"sensitivity' wrote, or a mapping such as {{17: 8, 20: 8}}.")
    with open(p, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows or not {"layer", "score"} <= set(rows[0]):
        raise ValueError(f"qat_layer_bits={path}: expected the CSV of 'yolo-gab sensitivity' (columns layer, score, "
                         f"...), found columns {list(rows[0]) if rows else 'none'}.")
    try:
        return {int(r["layer"]): float(r["score"]) for r in rows}
    except ValueError as e:
        raise ValueError(f"qat_layer_bits={path}: unreadable row ({e}).") from None


def _budget_text(kind: str, limit: float, fp: float | None = None) -> str:
    share = f" ({100 * limit / fp:.4g} % of FP)" if kind == "bops" and fp else ""
    return {"avg_bits": f"{limit:g} average weight bits", "bytes": f"{limit:.0f} bytes",
            "bops": f"{limit / 1e9:.4g} GBOPs at {BOPS_IMGSZ} px{share}",
            "bops_fraction": f"{100 * limit:.4g} % of the FP model's BOPs"}[kind]


def allocate_bits(model: nn.Module, scores: dict[int, float], budget: tuple[str, float], plan_fn,
                  costs: dict | None = None) -> dict[int, int]:
    """Greedy allocation: most sensitive layer first, the highest bits in :data:`RAISE_LEVELS` that fit the budget.

    A raised layer gets those bits for its weights *and* its input activations, so under a BOPs budget it costs
    ``MACs x (b*b - w*a)`` more bit-operations. To compare a mixed plan with a uniform one at equal compute (or
    size), start from lower base bits and give the uniform plan's BOPs as the budget, e.g. ``w_bits=3 a_bits=3
    qat_bits_budget=<the BOPs of uniform W4A4>``: a budget equal to the base plan's own cost leaves nothing to raise.

    Args:
        model (nn.Module): The model to plan (float).
        scores (dict[int, float]): Sensitivity per layer (higher = hurts more when quantized).
        budget (tuple[str, float]): From :func:`~ultralytics_gabfusion.settings.parse_bits_budget`: ``avg_bits``
            (average weight bits), ``bytes`` (:func:`plan_size_bytes`), ``bops`` (:func:`plan_bops` at
            :data:`BOPS_IMGSZ`) or ``bops_fraction`` (:func:`plan_bops` / :func:`fp_bops`).
        plan_fn (Callable[[dict], list[dict]]): ``layer_bits -> rows`` (``plan_policy`` with the run's other keys;
            only the bits are read, so ``act_grid="signed"`` saves the probe forward pass of ``auto``).
        costs (dict | None): :func:`conv_costs` of ``model`` at :data:`BOPS_IMGSZ` (measured when a BOPs budget
            needs them and none are given).

    Returns:
        (dict[int, int]): ``{layer: bits}`` for the raised layers (possibly empty when nothing fits).

    Raises:
        ValueError: The base plan (no layer raised) already exceeds the budget.
    """
    kind, limit = budget
    if kind in ("bops", "bops_fraction") and costs is None:
        costs = conv_costs(model, BOPS_IMGSZ)
    fp = fp_bops(costs) if kind in ("bops", "bops_fraction") else None

    def cost(rows):
        if kind == "avg_bits":
            return average_bits(model, rows)
        if kind == "bytes":
            return plan_size_bytes(model, rows)
        return plan_bops(rows, costs) / (fp if kind == "bops_fraction" else 1.0)

    base = plan_fn({})
    if cost(base) > limit * (1 + 1e-9):
        raise ValueError(f"qat_bits_budget={_budget_text(kind, limit, fp)} is below the uniform plan's "
                         f"{_budget_text(kind, cost(base), fp)}: raise the budget or lower w_bits/a_bits.")
    base_bits = {}
    for r in base:
        if r["role"] == "conv" and r["w_bits"]:
            base_bits[r["layer"]] = max(base_bits.get(r["layer"], 0), r["w_bits"], r["a_bits"] or 0)
    mapping: dict[int, int] = {}
    for layer in sorted((k for k in scores if k in base_bits), key=lambda k: -scores[k]):
        for b in (b for b in RAISE_LEVELS if b > base_bits[layer]):
            trial = {**mapping, layer: b}
            if cost(plan_fn(trial)) <= limit * (1 + 1e-9):
                mapping = trial
                break
    return mapping


def resolve_layer_bits(model: nn.Module, value, budget, plan_fn, costs: dict | None = None) -> dict[int, int] | None:
    """The ``{layer: bits}`` mapping of the ``qat_layer_bits``/``qat_bits_budget`` settings (None when unset).

    Args:
        model (nn.Module): The float model about to be converted.
        value (dict | str | None): A mapping, or the path of a sensitivity CSV.
        budget: ``qat_bits_budget`` (needed with a CSV).
        plan_fn (Callable[[dict], list[dict]]): ``layer_bits -> rows`` with the run's other policy keys.
        costs (dict | None): :func:`conv_costs` of ``model`` at :data:`BOPS_IMGSZ`, if already measured.
    """
    if value is None:
        return None
    if isinstance(value, dict):
        return {int(k): int(v) for k, v in value.items()}
    if budget is None:
        raise ValueError(f"qat_layer_bits={value} (a sensitivity CSV) needs qat_bits_budget= (average bits such as "
                         f"4.5, a size such as 600KB, or bit-operations such as 2.5GBOPs@160 or 1.8%BOPs).")
    return allocate_bits(model, read_sensitivity(value), parse_bits_budget(budget), plan_fn, costs)


__all__ = ["BOPS_IMGSZ", "allocate_bits", "average_act_bits", "average_bits", "conv_costs", "format_totals", "fp_bops",
           "fp_totals", "model_bops", "model_rows", "model_size_bytes", "plan_bops", "plan_size_bytes", "plan_totals",
           "read_sensitivity", "resolve_layer_bits"]
