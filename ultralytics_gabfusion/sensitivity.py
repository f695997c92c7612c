"""Per-layer quantization sensitivity: which layers hurt most when quantized, ranked, as a table, a CSV and a plot.

``yolo-gab sensitivity model=fp.pt data=data.yaml qat=lsq w_bits=4 a_bits=4`` converts and calibrates the FP model
exactly like a QAT run's step 0 (:mod:`.ptq`), then quantizes **one Ultralytics layer at a time** (its weights, its
input activations, or both; every other conv stays in full precision, using the scales calibrated for the fully
quantized model) and measures how far the Detect outputs move from the FP model's on ``images`` validation images
(batched inference, no training):

- ``kl``: per anchor, the Bernoulli KL divergence of the class scores summed over classes, plus the KL divergence of
  the four DFL box distributions weighted by the FP anchor's highest class score (background anchors' boxes are never
  used), averaged over anchors and images;
- ``mse``: the relative mean squared error of the raw Detect outputs (box DFL logits and class logits),
  ``sum (y_q - y_fp)^2 / sum y_fp^2``;
- ``map`` (``metric=map``, slower): the mAP50 drop on the same images (Ultralytics' detection metrics); the proxies'
  Spearman rank correlation with it is recorded.

The ``score`` of a layer is its drop with weights and activations quantized, in the chosen ``metric``. Roles: ``backbone``
(the model YAML's backbone section), ``fusion`` (neck layers that read a neck Concat/GABFusion node, i.e. the convs
that consume the fused features), ``neck`` (other head-section layers) and ``head`` (Detect).

Outputs in the run directory (``project``/``name``, default ``runs/detect/sensitivity``), each written atomically:
``sensitivity.csv`` (input of ``qat_layer_bits=`` with ``qat_bits_budget=``), ``sensitivity.json`` (settings,
reference values, Spearman correlations) and ``sensitivity.png`` (layer index vs drop, coloured by role).

The compute side (:mod:`.quant.mixed`'s BOPs model, at the run's ``imgsz``): each row carries ``macs``, the MACs of
the layer's quantized convs for one image (raising a layer from ``b`` to ``r`` bits adds ``macs * (r*r - b*b)``
bit-operations), and ``compute`` in the JSON holds the uniform plan's average weight / activation bits and GBOPs
next to the FP model's GBOPs (also printed under the table).

Examples:
    >>> from ultralytics_gabfusion.sensitivity import layer_sensitivity
    >>> res = layer_sensitivity("fp.pt", data="data.yaml", qat="lsq", w_bits=4, a_bits=4)  # doctest: +SKIP
    >>> res["rows"][0]["layer"], res["csv"]  # doctest: +SKIP
    (17, PosixPath('runs/detect/sensitivity/sensitivity.csv'))
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from ultralytics.nn.modules.conv import Concat
from ultralytics.nn.modules.head import Detect
from ultralytics.utils import LOGGER, TQDM

from . import zoo
from .fusion import GABFusion
from .preflight import check_fp_checkpoint
from .quant.convert import _layer_index
from .quant.mixed import average_act_bits, average_bits, conv_costs, fp_bops, model_rows, plan_bops
from .quant.qconv import quant_convs
from .settings import SettingsError, parse_command, parse_key_values
from .trainer import GABTrainer

METRICS = ("kl", "mse", "map")
MODES = ("w", "a", "wa")  # weights only, input activations only, both
MODE_LABELS = {"w": "weights", "a": "activations", "wa": "weights+activations"}
ROLES = ("backbone", "neck", "fusion", "head")
ROLE_COLORS = {"backbone": "tab:blue", "neck": "tab:green", "fusion": "tab:orange", "head": "tab:red"}
DEFAULTS = {"metric": "kl", "images": 256}
_NO_TRAINING = {"epochs": 1, "plots": False, "val": False, "resume": False}


# ================================================================================================ model helpers
def layer_roles(model: torch.nn.Module) -> dict[int, str]:
    """``{layer index: role}`` for the top-level layers of an Ultralytics detection model (see module docstring)."""
    layers = model.model
    n_backbone = len((getattr(model, "yaml", None) or {}).get("backbone", [])) or 0
    fusion_nodes = {i for i, m in enumerate(layers) if i >= n_backbone and isinstance(m, (Concat, GABFusion))
                    and isinstance(m.f, (list, tuple)) and len(m.f) >= 2}
    roles = {}
    for i, m in enumerate(layers):
        srcs = [m.f] if isinstance(m.f, int) else list(m.f)
        srcs = [i + s if s < 0 else s for s in srcs]
        if isinstance(m, Detect):
            roles[i] = "head"
        elif i < n_backbone:
            roles[i] = "backbone"
        elif any(s in fusion_nodes for s in srcs):
            roles[i] = "fusion"
        else:
            roles[i] = "neck"
    return roles


def quantized_layers(model: torch.nn.Module) -> list[int]:
    """Top-level layer indices that hold at least one quantizer, in order."""
    out = {_layer_index(n) for n, m in quant_convs(model) if m.weight_quant is not None or m.act_quant is not None}
    return sorted(x for x in out if x is not None)


@contextlib.contextmanager
def only_quantized(model: torch.nn.Module, layers=None, weights: bool = True, acts: bool = True):
    """Inside the block, only the weight (``weights``) / input (``acts``) quantizers of ``layers`` are applied.

    Every other quantizer is detached for the duration (its conv runs in full precision) and put back afterwards.
    ``layers=None`` keeps all layers (so ``only_quantized(m, None, False, False)`` is the FP model).
    """
    removed = []
    for name, m in quant_convs(model):
        keep = layers is None or _layer_index(name) in layers
        for attr, on in (("weight_quant", weights), ("act_quant", acts)):
            q = getattr(m, attr)
            if q is not None and not (keep and on):
                removed.append((m, attr, q))
                setattr(m, attr, None)
    try:
        yield model
    finally:
        for m, attr, q in removed:
            setattr(m, attr, q)


def _raw_outputs(preds) -> tuple[torch.Tensor, torch.Tensor]:
    """(box DFL logits ``(B, 4*reg_max, N)``, class logits ``(B, nc, N)``) from a Detect model's eval output."""
    if isinstance(preds, (tuple, list)) and len(preds) > 1 and isinstance(preds[1], dict) and "boxes" in preds[1]:
        return preds[1]["boxes"].float(), preds[1]["scores"].float()
    raise ValueError("sensitivity needs an Ultralytics Detect head (DFL box and class logits in its eval output); "
                     "this model's head returns something else.")


class OutputDivergence:
    """Accumulates the ``kl`` and ``mse`` proxies of quantized Detect outputs against the FP ones, batch by batch."""

    def __init__(self):
        self.kl_sum, self.n, self.se, self.ref_sq = 0.0, 0, 0.0, 0.0

    def update(self, ref: tuple[torch.Tensor, torch.Tensor], out: tuple[torch.Tensor, torch.Tensor]) -> None:
        """Add one batch: ``ref``/``out`` are :func:`_raw_outputs` of the FP and the quantized model."""
        (rb, rs), (qb, qs) = ref, out
        b, c, n = rb.shape
        lp = F.log_softmax(rb.view(b, 4, c // 4, n), 2)
        lq = F.log_softmax(qb.view(b, 4, c // 4, n), 2)
        kl_box = (lp.exp() * (lp - lq)).sum(2).sum(1)  # (B, N)
        p = torch.sigmoid(rs)
        kl_cls = (p * (F.logsigmoid(rs) - F.logsigmoid(qs)) + (1 - p) * (F.logsigmoid(-rs) - F.logsigmoid(-qs))).sum(1)
        kl = kl_cls + p.amax(1) * kl_box  # a background anchor's box is never used: weight it by the FP confidence
        self.kl_sum += float(kl.mean(1).sum())
        self.n += b
        self.se += float((qb - rb).square().sum() + (qs - rs).square().sum())
        self.ref_sq += float(rb.square().sum() + rs.square().sum())

    def result(self) -> dict:
        """``{"kl": mean per image, "mse": relative MSE}``."""
        kl = max(self.kl_sum / max(self.n, 1), 0.0)  # >= 0; float32 rounding gives -1e-14 for identical outputs
        return {"kl": kl, "mse": self.se / self.ref_sq if self.ref_sq else float("nan")}


# ============================================================================================== measurement
def _batches(trainer, n_images: int) -> list[dict]:
    """The first ``n_images`` validation images as preprocessed batches (kept in memory, reused for every config)."""
    out, seen = [], 0
    validator = trainer.validator
    validator.device = trainer.device
    for batch in trainer.test_loader:
        batch = validator.preprocess(batch)
        k = min(len(batch["img"]), n_images - seen)
        if k < len(batch["img"]):
            keep = batch["batch_idx"] < k
            batch = {**batch, "img": batch["img"][:k], "batch_idx": batch["batch_idx"][keep],
                     "cls": batch["cls"][keep], "bboxes": batch["bboxes"][keep],
                     **{key: batch[key][:k] for key in ("im_file", "ori_shape", "ratio_pad") if key in batch}}
        out.append(batch)
        seen += k
        if seen >= n_images:
            break
    return out


@torch.inference_mode()
def _evaluate(model, batches, ref=None, validator=None, data=None) -> dict:
    """One pass over the cached batches: the ``kl``/``mse`` proxies against ``ref`` (FP raw outputs) and, with a
    ``validator``, mAP50 through Ultralytics' detection postprocess and metrics."""
    div = OutputDivergence() if ref is not None else None
    if validator is not None:
        validator.training = True  # in-memory model: no AutoBackend, no JSON/plots, metrics only
        validator.data, validator.args.plots = data, False
        validator.init_metrics(model)
    for i, b in enumerate(batches):
        preds = model(b["img"])
        if div is not None:
            div.update(ref[i], _raw_outputs(preds))
        if validator is not None:
            validator.update_metrics(validator.postprocess(preds), b)
    out = div.result() if div is not None else {}
    if validator is not None:
        out["mAP50"] = float(validator.get_stats().get("metrics/mAP50(B)", float("nan")))
    return out


def spearman(x: list[float], y: list[float]) -> float:
    """Spearman rank correlation (average ranks for ties; nan for fewer than 3 pairs or a constant input).

    Examples:
        >>> spearman([1, 2, 3, 4], [10, 20, 30, 40])
        1.0
        >>> spearman([1, 2, 3, 4], [4, 3, 2, 1])
        -1.0
    """

    def ranks(v):
        order = sorted(range(len(v)), key=lambda i: v[i])
        r = [0.0] * len(v)
        i = 0
        while i < len(v):
            j = i
            while j + 1 < len(v) and v[order[j + 1]] == v[order[i]]:
                j += 1
            for k in range(i, j + 1):
                r[order[k]] = (i + j) / 2
            i = j + 1
        return r

    pairs = [(a, b) for a, b in zip(x, y) if math.isfinite(a) and math.isfinite(b)]
    if len(pairs) < 3:
        return float("nan")
    rx, ry = ranks([a for a, _ in pairs]), ranks([b for _, b in pairs])
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    sx = math.sqrt(sum((a - mx) ** 2 for a in rx))
    sy = math.sqrt(sum((b - my) ** 2 for b in ry))
    return cov / (sx * sy) if sx and sy else float("nan")


def layer_sensitivity(model: str | os.PathLike, metric: str = "kl", images: int = 256, **overrides) -> dict:
    """Measure, rank and report the quantization sensitivity of every layer of an FP model.

    Args:
        model: FP ``.pt`` checkpoint (or the name of a shipped model, see :mod:`.zoo`).
        metric (str): Ranking metric: ``kl``, ``mse`` (output proxies) or ``map`` (mAP50 drop; also validates the
            proxies' ranking by Spearman correlation).
        images (int): Validation images used (the first ones of the val split).
        **overrides: ``data`` and the quantization keys as for QAT (``qat``, ``w_bits``, ``a_bits``,
            ``qat_first_bits``, ``qat_calib``, ``qat_act_grid``, ``gab`` ...), plus ``imgsz``, ``batch``, ``device``,
            ``project``/``name`` (run directory).

    Returns:
        (dict): ``rows`` (ranked, one per layer), ``reference`` (FP / fully quantized values), ``spearman``,
            ``save_dir`` and the paths ``csv``, ``json``, ``png``.

    Raises:
        ValueError: Bad ``metric``/``images``, ``qat`` missing, or any invalid key (before anything is written).
    """
    metric = str(metric).lower()
    if metric not in METRICS:
        raise ValueError(f"metric={metric} is not valid: use one of {', '.join(METRICS)} (kl/mse: fast output proxies, "
                         f"map: mAP50 drop).")
    if isinstance(images, bool) or not isinstance(images, int) or images < 1:
        raise ValueError(f"images={images!r} must be a positive integer (validation images to measure on).")
    if str(overrides.get("qat", "none")).lower() == "none":
        raise ValueError("sensitivity needs a quantizer: pass qat=lsq|lsqplus|pact|n2uq (and w_bits/a_bits).")
    if overrides.get("qat_layer_bits") is not None:
        raise ValueError("sensitivity measures the uniform policy: drop qat_layer_bits/qat_bits_budget from this command.")

    if str(model) in zoo.names():
        model = zoo.verify(str(model))
    if not Path(str(model)).is_file():
        raise FileNotFoundError(f"model={model}: file not found; pass a trained FP .pt checkpoint.")
    check_fp_checkpoint(model, "model", "sensitivity",
                        "pass the FP checkpoint it was made from (each layer is quantized in turn from FP)")
    overrides = {"name": "sensitivity", **overrides, "ada": 0.0}
    t0 = time.perf_counter()
    trainer = GABTrainer(overrides={**overrides, "model": str(model), **_NO_TRAINING})
    trainer._setup_train()  # conversion, weight init, calibration: exactly the QAT run's step 0
    qmodel = (trainer.ema.ema if trainer.ema else trainer.model).eval()
    batches = _batches(trainer, images)
    n_img = sum(len(b["img"]) for b in batches)
    roles = layer_roles(qmodel)
    layers = quantized_layers(qmodel)
    args = trainer.args
    val = (trainer.validator, trainer.data) if metric == "map" else (None, None)
    with only_quantized(qmodel, None, False, False), torch.inference_mode():
        ref = [_raw_outputs(qmodel(b["img"])) for b in batches]
        fp_map = _evaluate(qmodel, batches, None, *val).get("mAP50")
    reference = {"fp": {"mAP50": fp_map}, "all": _evaluate(qmodel, batches, ref, *val)}
    configs = [(layer, mode) for layer in layers for mode in MODES]
    results: dict[tuple[int, str], dict] = {}
    for layer, mode in TQDM(configs, desc=f"sensitivity W{args.w_bits}A{args.a_bits} {args.qat} ({metric})"):
        with only_quantized(qmodel, {layer}, "w" in mode, "a" in mode):
            r = _evaluate(qmodel, batches, ref, *val)
        if metric == "map":
            r["drop"] = fp_map - r["mAP50"]
        results[(layer, mode)] = r
    imgsz = int(args.imgsz if isinstance(args.imgsz, int) else max(args.imgsz))
    costs = conv_costs(qmodel, imgsz)
    rows = _rank_rows(qmodel, layers, roles, results, metric, costs)
    corr = {}
    if metric == "map":
        drops = [results[c]["drop"] for c in configs]
        for p in ("kl", "mse"):
            corr[p] = {"all": spearman([results[c][p] for c in configs], drops),
                       "wa": spearman([results[(la, "wa")][p] for la in layers], [results[(la, "wa")]["drop"] for la in layers])}
    info = {
        "format": "ultralytics-gabfusion sensitivity v1",
        "model": str(model), "data": str(args.data), "qat": args.qat, "w_bits": args.w_bits, "a_bits": args.a_bits,
        "qat_first_bits": args.qat_first_bits, "qat_head_bits": args.qat_head_bits, "qat_act_grid": args.qat_act_grid,
        "qat_act_zp": args.qat_act_zp,
        "gab": args.gab, "imgsz": args.imgsz, "metric": metric, "images": n_img, "seed": args.seed,
        "reference": reference, "spearman": corr, "compute": compute_summary(qmodel, costs, imgsz),
        "wall_s": round(time.perf_counter() - t0, 1), "rows": rows,
    }
    save_dir = Path(trainer.save_dir)
    paths = write_reports(info, save_dir)
    LOGGER.info(format_table(info))
    LOGGER.info(f"sensitivity: {len(layers)} layers x {len(MODES)} modes on {n_img} images in {info['wall_s']:.0f} s; "
                f"results in {save_dir} ({', '.join(p.name for p in paths.values())})")
    return {**info, "save_dir": save_dir, **paths}


def compute_summary(qmodel, costs: dict, imgsz: int) -> dict:
    """The uniform plan's average weight / activation bits and GBOPs, and the FP model's GBOPs, at ``imgsz``.

    Args:
        qmodel (nn.Module): The converted model (its convs' own bits).
        costs (dict): ``quant.mixed.conv_costs(qmodel, imgsz)``.
        imgsz (int): The input side the costs were measured at.
    """
    rows = model_rows(qmodel)
    gbops, fp = plan_bops(rows, costs) / 1e9, fp_bops(costs) / 1e9
    return {"imgsz": imgsz, "w_bits": average_bits(qmodel, rows), "a_bits": average_act_bits(rows, costs),
            "gbops": gbops, "fp_gbops": fp, "fraction_of_fp": gbops / fp if fp else float("nan")}


def _rank_rows(model, layers, roles, results, metric, costs: dict | None = None) -> list[dict]:
    key = "drop" if metric == "map" else metric
    rows = []
    qnames = [n for n, _ in quant_convs(model)]
    for layer in layers:
        m = model.model[layer]
        kind = str(getattr(m, "type", type(m).__name__)).rsplit(".", 1)[-1]  # Ultralytics' name (Conv, C3, ...)
        row = {"layer": layer, "role": roles.get(layer, "neck"), "type": kind,
               "params": sum(p.numel() for n, p in m.named_parameters() if n.endswith("weight") and p.dim() == 4),
               "macs": sum(costs[n]["macs"] for n in qnames if _layer_index(n) == layer and n in costs) if costs else None,
               "score": results[(layer, "wa")][key]}
        for p in ("kl", "mse") + (("mAP50", "drop") if metric == "map" else ()):
            for mode in MODES:
                row[f"{p}_{mode}"] = results[(layer, mode)][p]
        rows.append(row)
    rows.sort(key=lambda r: -r["score"] if math.isfinite(r["score"]) else math.inf)
    for i, r in enumerate(rows, 1):
        r["rank"] = i
    return rows


# ================================================================================================== reports
def format_table(info: dict) -> str:
    """The ranked table printed at the end of a run."""
    metric = info["metric"]
    unit = "mAP50 drop (pts)" if metric == "map" else metric
    head = f"{'rank':>4} {'layer':>5}  {'role':<8} {'type':<10}{'conv params':>12}{'MMACs':>9}  " + "".join(
        f"{MODE_LABELS[m] if m != 'wa' else 'both':>14}" for m in MODES)
    lines = [f"Layer sensitivity, W{info['w_bits']}A{info['a_bits']} {info['qat']}, one layer quantized at a time, "
             f"{unit} vs FP on {info['images']} val images (score = both):", head]
    key = "drop" if metric == "map" else metric
    scale = 100.0 if metric == "map" else 1.0
    for r in info["rows"]:
        vals = "".join(f"{scale * r[f'{key}_{m}']:>14.4g}" for m in MODES)
        macs = "" if r.get("macs") is None else f"{r['macs'] / 1e6:.2f}"
        lines.append(f"{r['rank']:>4} {r['layer']:>5}  {r['role']:<8} {r['type']:<10}{r['params']:>12}{macs:>9}  {vals}")
    ref = info["reference"]
    if metric == "map":
        lines.append(f"FP mAP50 {ref['fp']['mAP50']:.4f}; all layers quantized {ref['all']['mAP50']:.4f}")
        for p, c in info["spearman"].items():
            lines.append(f"Spearman({p} proxy, mAP50 drop): {c['wa']:+.3f} over layers (both), {c['all']:+.3f} over all "
                         f"{len(info['rows']) * len(MODES)} configurations")
    lines.append(f"All layers quantized: kl {ref['all']['kl']:.4g}, mse {ref['all']['mse']:.4g}")
    c = info.get("compute")
    if c:
        lines.append(f"Uniform W{info['w_bits']}A{info['a_bits']} plan at {c['imgsz']} px: average weight bits "
                     f"{c['w_bits']:.3f}, average activation bits {c['a_bits']:.3f}, {c['gbops']:.4g} GBOPs = "
                     f"{100 * c['fraction_of_fp']:.2f} % of FP ({c['fp_gbops']:.4g} GBOPs); raising a layer from b to r "
                     f"bits adds MMACs x (r*r - b*b) MBOPs")
    return "\n".join(lines)


def _atomic_bytes(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)  # an interrupted run never leaves a truncated file under the final name
    return path


def write_reports(info: dict, save_dir: Path) -> dict:
    """Write ``sensitivity.csv``, ``sensitivity.json`` and ``sensitivity.png`` atomically; returns their paths."""
    rows = info["rows"]
    buf = io.StringIO()
    first = ("rank", "layer", "role", "type", "params", "macs", "score")
    fields = [k for k in first if k in rows[0]] + [k for k in rows[0] if k not in first]
    w = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})
    out = {"csv": _atomic_bytes(save_dir / "sensitivity.csv", buf.getvalue().encode()),
           "json": _atomic_bytes(save_dir / "sensitivity.json",
                                 (json.dumps(info, indent=2, default=str) + "\n").encode())}
    out["png"] = _atomic_bytes(save_dir / "sensitivity.png", plot(info))
    return out


def plot(info: dict) -> bytes:
    """PNG bytes: layer index vs drop (both quantized: bars; weights / activations only: markers), coloured by role."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    metric = info["metric"]
    key = "drop" if metric == "map" else metric
    scale = 100.0 if metric == "map" else 1.0
    rows = sorted(info["rows"], key=lambda r: r["layer"])
    fig, ax = plt.subplots(figsize=(max(6.0, 0.38 * len(rows) + 2), 4))
    xs = [r["layer"] for r in rows]
    ax.bar(xs, [scale * r[f"{key}_wa"] for r in rows], color=[ROLE_COLORS[r["role"]] for r in rows], width=0.7)
    ax.scatter(xs, [scale * r[f"{key}_w"] for r in rows], marker="v", color="k", s=16, zorder=3)
    ax.scatter(xs, [scale * r[f"{key}_a"] for r in rows], marker="o", facecolors="none", color="k", s=16, zorder=3)
    if metric != "map" and all(scale * r[f"{key}_{m}"] > 0 for r in rows for m in MODES):
        ax.set_yscale("log")
    handles = [Patch(color=ROLE_COLORS[k], label=k) for k in ROLES if any(r["role"] == k for r in rows)]
    handles += [plt.Line2D([], [], marker="v", color="k", ls="", label="weights only"),
                plt.Line2D([], [], marker="o", mfc="none", color="k", ls="", label="activations only")]
    ax.legend(handles=handles, fontsize=8, ncol=2)
    ax.set_xticks(xs)
    ax.set_xlabel("layer index")
    ax.set_ylabel({"kl": "output KL vs FP", "mse": "relative output MSE vs FP", "map": "mAP50 drop (points)"}[metric])
    ax.set_title(f"W{info['w_bits']}A{info['a_bits']} {info['qat']}: one layer quantized at a time "
                 f"(bars: weights+activations)", fontsize=9)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    return buf.getvalue()


# ====================================================================================================== CLI
def sensitivity_main(argv: list[str]) -> int:
    """``yolo-gab sensitivity key=value ...``: the ``metric=`` and ``images=`` keys plus the QAT/Ultralytics keys."""
    if argv and argv[0] in ("help", "-h", "--help"):
        print(__doc__.split("Examples:")[0].strip())
        print("\nKeys: model=fp.pt data=data.yaml qat= w_bits= a_bits= metric=kl|mse|map (default kl) "
              "images=256, and any QAT/Ultralytics key (imgsz, batch, device, project, name, qat_calib, ...).")
        return 0
    own = {k: v for k, v in parse_key_values([a for a in argv if a.split("=", 1)[0] in DEFAULTS]).items()}
    _, overrides = parse_command([a for a in argv if a.split("=", 1)[0] not in DEFAULTS])
    model = overrides.pop("model", None)
    if model is None:
        raise SettingsError("sensitivity needs model=, the FP checkpoint to analyse, e.g. model=runs/detect/train/weights/best.pt")
    if overrides.get("data") is None:
        raise SettingsError("sensitivity needs data=, the data YAML whose val images are measured.")
    overrides.pop("mode", None)
    layer_sensitivity(model, metric=own.get("metric", DEFAULTS["metric"]), images=own.get("images", DEFAULTS["images"]),
                      **overrides)
    return 0


__all__ = ["OutputDivergence", "compute_summary", "layer_roles", "layer_sensitivity", "only_quantized", "quantized_layers", "spearman",
           "sensitivity_main"]
