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
"""

from __future__ import annotations

import csv
import os
from pathlib import Path

import torch.nn as nn

from ..settings import parse_bits_budget
from .qconv import quant_convs
from .quantizers import FakeQuantizer

RAISE_LEVELS = (8, 7, 6, 5, 4, 3)  # bits tried for a sensitive layer, highest first (only those above its base)
FP_BITS = 32


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


def allocate_bits(model: nn.Module, scores: dict[int, float], budget: tuple[str, float], plan_fn) -> dict[int, int]:
    """Greedy allocation: most sensitive layer first, the highest bits in :data:`RAISE_LEVELS` that fit the budget.

    Args:
        model (nn.Module): The model to plan (float).
        scores (dict[int, float]): Sensitivity per layer (higher = hurts more when quantized).
        budget (tuple[str, float]): From :func:`~ultralytics_gabfusion.settings.parse_bits_budget`.
        plan_fn (Callable[[dict], list[dict]]): ``layer_bits -> rows`` (``plan_policy`` with the run's other keys;
            only the bits are read, so ``act_grid="signed"`` saves the probe forward pass of ``auto``).

    Returns:
        (dict[int, int]): ``{layer: bits}`` for the raised layers (possibly empty when nothing fits).

    Raises:
        ValueError: The base plan (no layer raised) already exceeds the budget.
    """
    kind, limit = budget

    def cost(rows):
        return average_bits(model, rows) if kind == "avg_bits" else plan_size_bytes(model, rows)

    base = plan_fn({})
    if cost(base) > limit * (1 + 1e-9):
        what = f"{cost(base):.3f} average bits" if kind == "avg_bits" else f"{cost(base):.0f} bytes"
        raise ValueError(f"qat_bits_budget={limit:g}{'' if kind == 'avg_bits' else ' bytes'} is below the uniform "
                         f"plan's {what}: raise the budget or lower w_bits.")
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


def resolve_layer_bits(model: nn.Module, value, budget, plan_fn) -> dict[int, int] | None:
    """The ``{layer: bits}`` mapping of the ``qat_layer_bits``/``qat_bits_budget`` settings (None when unset).

    Args:
        model (nn.Module): The float model about to be converted.
        value (dict | str | None): A mapping, or the path of a sensitivity CSV.
        budget: ``qat_bits_budget`` (needed with a CSV).
        plan_fn (Callable[[dict], list[dict]]): ``layer_bits -> rows`` with the run's other policy keys.
    """
    if value is None:
        return None
    if isinstance(value, dict):
        return {int(k): int(v) for k, v in value.items()}
    if budget is None:
        raise ValueError(f"qat_layer_bits={value} (a sensitivity CSV) needs qat_bits_budget= (average bits such as "
                         f"4.5, or a size such as 600KB).")
    return allocate_bits(model, read_sensitivity(value), parse_bits_budget(budget), plan_fn)


__all__ = ["allocate_bits", "average_bits", "model_size_bytes", "plan_size_bytes", "read_sensitivity",
           "resolve_layer_bits"]
