"""Benchmark reports: per-row aggregation over seeds, the markdown table and the grouped bar chart.

Differences are paired per seed before they are averaged: the gap to FP of an arm is ``arm - FP`` of the same
model and seed (negative = below FP), the gain over baseline is ``arm - baseline`` of the same model, seed, method
and bit-width, and the recovered share of the PTQ drop is ``(arm - ptq) / (FP - ptq)`` of the same seed (100 % =
back at FP; only where the PTQ arm ran and dropped). With several seeds a row shows mean +- sample standard deviation (ddof = 1) of the per-seed values.

Segmentation and pose benches (``task``) carry the task's metrics next to the box ones (``mask_mAP50``,
``pose_mAP50_95`` ...): their main table, plots and sweep are in the task metric, and a second table holds the box
metrics of the same runs.
"""

from __future__ import annotations

import csv
import math
import statistics
from pathlib import Path

import torch

from ..quant.mixed import model_bops
from .arms import ARM_LABELS, PAPER_SCHEDULE, STABLE_SCHEDULE, is_step0, start_arm

METRICS = ("mAP50", "mAP50_95")
METRIC_LABELS = {"mAP50": "mAP50", "mAP50_95": "mAP50-95"}
TASK_PREFIX = {"segment": "mask_", "pose": "pose_"}  # metric keys of the task's own mAP (see accuracy_runs)


def task_metrics(task: str | None) -> tuple[str, ...]:
    """The metric keys of a bench of ``task``: box mAP50 / mAP50-95, then the mask or pose ones."""
    p = TASK_PREFIX.get(task or "detect")
    return METRICS + ((f"{p}mAP50", f"{p}mAP50_95") if p else ())


def primary_prefix(settings: dict) -> str:
    """Prefix of the metrics a report leads with: ``""`` (box) for detection, ``mask_`` / ``pose_`` otherwise."""
    return TASK_PREFIX.get(settings.get("task") or "detect", "")


def metric_label(key: str) -> str:
    """``mask_mAP50_95`` -> ``mask mAP50-95`` (a table header / axis label)."""
    for p in TASK_PREFIX.values():
        if key.startswith(p):
            return f"{p[:-1]} {METRIC_LABELS[key[len(p):]]}"
    return METRIC_LABELS[key]


def summarize(values: list[float]) -> dict:
    """``{"mean", "std", "n", "values"}`` of finite per-seed values (std None for fewer than two)."""
    vals = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    if not vals:
        return {"mean": None, "std": None, "n": 0, "values": list(values)}
    return {"mean": statistics.fmean(vals), "std": statistics.stdev(vals) if len(vals) > 1 else None,
            "n": len(vals), "values": vals}


def _ok(r: dict) -> bool:
    return r.get("status") in ("trained", "given")  # a reused stored result keeps its original status


def annotate_stability(records: list[dict], s: dict) -> None:
    """Add ``stability`` to every trained QAT record: its validated epochs against its own step-0 (PTQ) start.

    ``stability = {"metric", "start", "lowest", "lowest_epoch", "below_start"}``: the step-0 arm's re-validated value
    of the task's mAP50 (None when that arm was not run), the lowest validated epoch (the EMA model Ultralytics
    validates after each epoch), its 1-based epoch, and how many epochs validated below the start (None without a
    start). Records without per-epoch values (a result stored by an older bench) get none.
    """
    m50 = primary_prefix(s) + "mAP50"
    ok = {(r["model"], r["seed"], r["method"], r["bits"], r["arm"]): r for r in records
          if _ok(r) and r.get("kind") == "qat"}
    for key, r in ok.items():
        curve = [v for v in ((r.get("per_epoch") or {}).get(m50) or []) if v is not None]
        if is_step0(r["arm"]) or not curve:
            continue
        start_rec = ok.get((*key[:4], start_arm(r["arm"])))
        start = start_rec.get(m50) if start_rec else None
        lowest = min(curve)
        r["stability"] = {"metric": m50, "start": start, "lowest": lowest, "lowest_epoch": curve.index(lowest) + 1,
                          "below_start": None if start is None else sum(v < start for v in curve)}


def aggregate(records: list[dict], s: dict) -> list[dict]:
    """Table rows: one FP reference row per model, then one row per model x bits x method x arm.

    Args:
        records: Per-run records (``kind`` fp/qat, ``seed``, ``mAP50``, ``mAP50_95``, ``status``...).
        s: Resolved settings (for the row order).

    Returns:
        (list[dict]): Rows with ``model, bits, method, arm, seeds`` and, for each metric m, ``m`` (summary),
            ``gap_m`` (arm - FP) and ``gain_m`` (arm - baseline; None without a baseline arm).
    """
    ok = [r for r in records if _ok(r)]
    metrics = task_metrics(s.get("task"))
    m50 = primary_prefix(s) + "mAP50"
    fp = {(r["model"], r["seed"]): r for r in ok if r["kind"] == "fp"}
    qat = {(r["model"], r["seed"], r["method"], r["bits"], r["arm"]): r for r in ok if r["kind"] == "qat"}
    rows = []
    for model in s["models"]:
        seeds = [sd for sd in s["seeds"] if (model, sd) in fp]
        row = {"model": model, "bits": None, "method": None, "arm": "fp", "label": "FP (reference)",
               "seeds": seeds, "failed_seeds": [sd for sd in s["seeds"] if sd not in seeds]}
        for m in metrics:
            row[m] = summarize([fp[(model, sd)].get(m) for sd in seeds])
            row[f"gap_{m}"] = summarize([0.0 for _ in seeds])
            row[f"gain_{m}"] = None
            row[f"recovered_{m}"] = None
        row["epochs_run"] = [fp[(model, sd)].get("epochs_run") for sd in seeds]
        row["size_bytes"] = _size([fp[(model, sd)] for sd in seeds])
        rows.append(row)
        for bits in s["bits"]:
            for method in s["methods"]:
                for arm in s["arms"]:
                    keys = [(model, sd, method, bits, arm) for sd in s["seeds"]]
                    have = [k for k in keys if k in qat and (model, k[1]) in fp]
                    row = {"model": model, "bits": bits, "method": method, "arm": arm, "label": ARM_LABELS[arm],
                           "seeds": [k[1] for k in have], "failed_seeds": [k[1] for k in keys if k not in have]}
                    for m in metrics:
                        row[m] = summarize([qat[k].get(m) for k in have])
                        row[f"gap_{m}"] = summarize([_diff(qat[k], fp[(model, k[1])], m) for k in have])
                        ref = "ptq" if is_step0(arm) else "baseline"  # a step-0 arm is compared with plain PTQ
                        base = [(k, (model, k[1], method, bits, ref)) for k in have]
                        base = [(k, b) for k, b in base if b in qat]
                        row[f"gain_{m}"] = summarize([_diff(qat[k], qat[b], m) for k, b in base]) if \
                            ref in s["arms"] else None
                        row[f"recovered_{m}"] = _recovered(qat, fp, have, m) if not is_step0(arm) else None
                    row["epochs_run"] = [qat[k].get("epochs_run") for k in have]
                    row["size_bytes"] = _size([qat[k] for k in have])
                    stab = [qat[k].get("stability") for k in have]
                    if any(stab):
                        row["stability"] = {
                            "seeds": [k[1] for k, st in zip(have, stab) if st],
                            "start": [st["start"] for st in stab if st],
                            "lowest": summarize([st["lowest"] for st in stab if st]),
                            "lowest_epoch": [st["lowest_epoch"] for st in stab if st],
                            "below_start": [st["below_start"] for st in stab if st],
                            "final": [qat[k].get(m50) for k, st in zip(have, stab) if st]}
                    rows.append(row)
    return rows


def _diff(a: dict, b: dict, m: str) -> float | None:
    """``a[m] - b[m]`` (None when either run lacks the metric, e.g. a stored result of another task)."""
    return None if a.get(m) is None or b.get(m) is None else a[m] - b[m]


def _size(recs: list[dict]) -> float | None:
    """Model size in bytes of a row (the same for every seed; None when no run recorded it)."""
    sizes = [r["size_bytes"] for r in recs if r.get("size_bytes") is not None]
    return statistics.fmean(sizes) if sizes else None


def _recovered(qat: dict, fp: dict, have: list, m: str) -> dict | None:
    """Per-seed share of the PTQ drop an arm recovers, ``(arm - ptq) / (FP - ptq)``; None without a PTQ drop."""
    vals = []
    for k in have:
        p = qat.get((*k[:4], "ptq"))
        f = fp.get((k[0], k[1]))
        if p is None or f is None or _diff(f, p, m) is None or not f[m] - p[m] > 1e-4:  # no drop: nothing to recover
            continue
        vals.append((qat[k][m] - p[m]) / (f[m] - p[m]))
    return summarize(vals) if vals else None


def _fmt(summary: dict | None, scale: float = 100.0, signed: bool = False) -> str:
    if not summary or summary.get("mean") is None:
        return "—"
    f = "{:+.2f}" if signed else "{:.2f}"
    txt = f.format(summary["mean"] * scale)
    if summary.get("std") is not None:
        txt += f" ± {summary['std'] * scale:.2f}"
    return txt


def markdown(result: dict) -> str:
    """The benchmark table (percentage points) with the settings that produced it."""
    s, env, rows = result["settings"], result["environment"], result["rows"]
    multi = len(s["seeds"]) > 1
    data = result["data"]
    data_txt = (f"generated set {data['n_train']}/{data['n_val']} images at {data['imgsz']} px" if data.get("generated")
                else f"{data['yaml']}")
    if data.get("generated") and (data.get("task") or data.get("min_size")):  # a non-default set says how it differs
        data_txt += (f" ({data.get('task', 'detect')} labels, 1-{data.get('max_objects')} objects per image"
                     + (f", objects >= {data['min_size']} px" if data.get("min_size") else "") + ")")
    lines = [
        "# ultralytics-gabfusion benchmark",
        "",
        f"- data: {data_txt}; imgsz {s['imgsz']}, batch {s['batch']}",
        f"- models: {', '.join(s['models'])}; methods {', '.join(s['methods'])}; bits "
        f"{', '.join(f'W{b}A{b}' for b in s['bits'])}",
        ("- FP: given checkpoint(s)" if all(m.get("kind") == "pt" for m in result.get("models") or [{}]) else
         f"- FP: {s['fp_epochs']} epochs" + (f" (time budget {s['fp_time']} h)" if s.get("fp_time") else ""))
        + (f" ({', '.join(f'{k}={v}' for k, v in s['fp_extra'].items())})" if s.get("fp_extra") else "")
        + f"; QAT: {s['epochs']} epochs" + (f" (time budget {s['time']} h)" if s.get("time") else "")
        + (f", recipe {s['recipe']}" if s.get("recipe") else "")
        + (", the paper's literal schedule (hyp.VOC with warm-up; Ultralytics' BatchNorm handling)"
           if s.get("schedule") == "paper" else
           ", the recipes' stable schedule (hyp.VOC with " +
           ", ".join(f"{k}={v}" for k, v in STABLE_SCHEDULE.items() if PAPER_SCHEDULE.get(k) != v) + ")")
        + f"; ADA weight {s['ada']}",
        f"- seeds: {s['seeds']}" + (" (mean ± std over seeds)" if multi else " (one seed: run-to-run spread unmeasured)"),
        f"- hardware: {env['hardware']}; torch {env['torch']}, ultralytics {env['ultralytics']}, plugin "
        f"{env['ultralytics_gabfusion']}, commit {env['git_commit'] or 'unknown'}; wall {result['wall_s']:.0f} s",
    ]
    given = [m["label"] for m in result.get("models", []) if m.get("kind") == "pt"]
    if given:
        lines.append(f"- FP checkpoints taken as given (not trained here): {', '.join(given)}")
    qat_extra = {k: v for k, v in (s.get("extra") or {}).items() if k not in ("workers", "verbose")}
    if qat_extra:
        lines.append(f"- extra QAT keys: {', '.join(f'{k}={v}' for k, v in qat_extra.items())}")
    if s.get("preset") in ("demo", "demo-scratch"):
        lines.append("- demo preset: one seed and a few CPU minutes of QAT; it shows the pipeline and how much of the "
                     "PTQ drop QAT wins back, not whether one arm beats another (preset=cpu-study measures that "
                     "over 3 seeds)")
    prefix = primary_prefix(s)
    if prefix:
        lines.append(f"- task: {s['task']}: {metric_label(prefix + 'mAP50')} / {metric_label(prefix + 'mAP50_95')} "
                     "first (gaps, gains and recovered share in that metric), box mAP of the same runs below")
    lines += ["", *_table(rows, prefix)]
    if prefix:
        lines += ["", "### Box mAP of the same runs", "", *_table(rows, "")]
    stab = stability_table(rows, prefix)
    if stab:
        lines += ["", *stab]
    if len(s["bits"]) > 1:
        lines += ["", *sweep_table(result)]
    if result.get("resumed"):
        lines += ["", f"Reused stored results (resumed bench): {', '.join(result['resumed'])}"]
    if result.get("failed"):
        lines += ["", f"Failed or skipped runs (see bench.json): {', '.join(result['failed'])}"]
    return "\n".join(lines) + "\n"


def _table(rows: list[dict], prefix: str) -> list[str]:
    """Markdown lines of the per-arm table in the metrics ``prefix + mAP50`` / ``prefix + mAP50_95``."""
    m50, m95 = prefix + "mAP50", prefix + "mAP50_95"
    l50, l95 = metric_label(m50), metric_label(m95)
    lines = [
        "mAP in percentage points; gap = arm − FP (same seed), gain = arm − baseline QAT (same seed), "
        f"recovered = share of the PTQ drop won back, (arm − PTQ) / (FP − PTQ) in {l95} (same seed).",
        "",
        f"| model | bits | method | arm | {l50} | {l95} | gap {l50} | gap {l95} | gain {l50} | gain {l95} | "
        "recovered | epochs |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        bits = "FP" if r["bits"] is None else f"W{r['bits']}A{r['bits']}"
        method = r["method"] or "—"
        ep = sorted({e for e in r.get("epochs_run") or [] if e is not None})
        ep_txt = "/".join(map(str, ep)) if ep else "—"
        gap50 = "—" if r["arm"] == "fp" else _fmt(r.get(f"gap_{m50}"), signed=True)
        gap = "—" if r["arm"] == "fp" else _fmt(r.get(f"gap_{m95}"), signed=True)
        gain50 = "—" if r["arm"] in ("fp", "baseline", "ptq") else _fmt(r.get(f"gain_{m50}"), signed=True)
        gain = "—" if r["arm"] in ("fp", "baseline", "ptq") else _fmt(r.get(f"gain_{m95}"), signed=True)
        if r["arm"] not in ("fp", "baseline", "ptq") and is_step0(r["arm"]) and gain50 != "—":
            gain50, gain = f"{gain50} (vs PTQ)", f"{gain} (vs PTQ)"
        rec = r.get(f"recovered_{m95}")
        rec_txt = "—" if not rec or rec.get("mean") is None else _fmt(rec, scale=100.0) + " %"
        note = f" (failed seeds {r['failed_seeds']})" if r["failed_seeds"] else ""
        lines.append(f"| {r['model']} | {bits} | {method} | {r['label']}{note} | {_fmt(r.get(m50))} | "
                     f"{_fmt(r.get(m95))} | {gap50} | {gap} | {gain50} | {gain} | {rec_txt} | {ep_txt} |")
    return lines


def stability_table(rows: list[dict], prefix: str = "") -> list[str]:
    """Markdown lines: each trained arm's validated epochs against its own step-0 start, per seed (empty if none)."""
    rows = [r for r in rows if r.get("stability")]
    if not rows:
        return []
    l50 = metric_label(prefix + "mAP50")

    def seeds(vals, f="{:.2f}", scale=100.0):
        return " / ".join("—" if v is None else f.format(v * scale) for v in vals)

    lines = [f"### Stability: every validated epoch against the run's own step-0 start ({l50}, per seed)", "",
             "start = the arm's step-0 model (PTQ, or PTQ+GABFusion for GABFusion arms); lowest = the lowest "
             "validated epoch (epoch in brackets); below = epochs validated below the start; final = the re-validated "
             "best.pt.", "",
             "| model | bits | method | arm | seeds | start | lowest (epoch) | epochs below start | final |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        st = r["stability"]
        lowest = " / ".join(f"{100 * v:.2f} ({e})" for v, e in zip(st["lowest"]["values"], st["lowest_epoch"]))
        below = " / ".join("—" if b is None else str(b) for b in st["below_start"])
        lines.append(f"| {r['model']} | W{r['bits']}A{r['bits']} | {r['method']} | {r['label']} | "
                     f"{'/'.join(map(str, st['seeds']))} | {seeds(st['start'])} | {lowest} | {below} | "
                     f"{seeds(st['final'])} |")
    return lines


def _kib(size: float | None) -> str:
    return "—" if size is None else f"{size / 1024:,.0f}"


_GBOPS: dict = {}  # (checkpoint, mtime, imgsz) -> GBOPs: a report renders the table and the plot from the same runs


def _weights_gbops(weights, imgsz: int) -> float | None:
    """GBOPs of a checkpoint's model for one ``imgsz`` image, each conv at its own bits (None when unreadable)."""
    try:
        f = Path(weights)
        key = (str(f.resolve()), f.stat().st_mtime_ns, int(imgsz))
    except (OSError, TypeError, ValueError):
        return None
    if key not in _GBOPS:
        try:
            ckpt = torch.load(f, map_location="cpu", weights_only=False)
            _GBOPS[key] = model_bops((ckpt.get("ema") or ckpt["model"]).float(), int(imgsz)) / 1e9
        except Exception:  # noqa: BLE001 -- a checkpoint that cannot be read must not hide the table
            _GBOPS[key] = None
    return _GBOPS[key]


def _sweep_gbops(result: dict) -> dict:
    """``{(model, bits, method): GBOPs}`` of the sweep (FP: ``(model, None, None)``), from each one's first finished
    run whose checkpoint is still on disk (the arms of a bit-width share its precision plan), at the bench's imgsz."""
    imgsz, out = result["settings"].get("imgsz"), {}
    for r in result.get("runs") or []:
        qat = r.get("kind") == "qat"
        key = (r.get("model"), r.get("bits") if qat else None, r.get("method") if qat else None)
        if key in out or not _ok(r) or not r.get("weights") or not imgsz:
            continue
        g = _weights_gbops(r["weights"], imgsz)
        if g is not None:
            out[key] = g
    return out


def sweep_table(result: dict) -> list[str]:
    """Markdown lines of the bit-width sweep: per model and method, one row per bit-width (plus FP), model size,
    GBOPs (when the runs' checkpoints are at hand) and mAP50 / mAP50-95 of each arm."""
    s, rows = result["settings"], result["rows"]
    arms = s["arms"]
    m50, m95 = (primary_prefix(s) + k for k in METRICS)
    gbops = _sweep_gbops(result)
    g_head, g_sep = (" GBOPs |", "---|") if gbops else ("", "")

    def g_cell(key):
        return (f" {gbops[key]:,.3f} |" if key in gbops else " — |") if gbops else ""

    lines = ["## Bit-width sweep", "",
             "Model size: conv weights at their bit-width, other parameters at 32 bits (FP: everything at 32 bits); "
             + (f"GBOPs: bit-operations for one {s.get('imgsz')} px image, MACs x weight bits x activation bits summed "
                "over the convs (unquantized convs at 32 x 32); " if gbops else "")
             + f"{metric_label(m50)} / {metric_label(m95)} in percentage points.", "",
             "| model | method | bits | size (KiB) |" + g_head + " " + " | ".join(ARM_LABELS[a] for a in arms) + " |",
             "|---|---|---|---|" + g_sep + "---|" * len(arms)]
    for model in s["models"]:
        by = {(r["bits"], r["method"], r["arm"]): r for r in rows if r["model"] == model}
        fp = by.get((None, None, "fp"))
        if fp:
            val = f"{_fmt(fp.get(m50))} / {_fmt(fp.get(m95))} (FP)"
            lines.append(f"| {model} | — | FP32 | {_kib(fp.get('size_bytes'))} |{g_cell((model, None, None))} "
                         + " | ".join([val] + ["—"] * (len(arms) - 1)) + " |")
        for method in s["methods"]:
            for b in sorted(s["bits"], reverse=True):
                cells = [by.get((b, method, a)) for a in arms]
                size = next((c.get("size_bytes") for c in cells if c and c.get("size_bytes") is not None), None)
                vals = [f"{_fmt(c.get(m50))} / {_fmt(c.get(m95))}" if c else "—" for c in cells]
                lines.append(f"| {model} | {method} | W{b}A{b} | {_kib(size)} |{g_cell((model, b, method))} "
                             + " | ".join(vals) + " |")
    return lines


def plot_size(result: dict, path: Path) -> Path | None:
    """Accuracy vs model size: mAP50 and mAP50-95 (panels) against the size in KiB (log axis), one line per
    model/method/arm through its bit-widths (labelled), FP as a star; a second row of panels against GBOPs (one
    image at the bench's imgsz, log axis) when the runs' checkpoints are at hand. None when no run recorded a size."""
    import matplotlib  # slow to import: loaded only when a plot is drawn

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in result["rows"] if r.get("size_bytes") is not None]
    if not rows:
        return None
    s = result["settings"]
    gbops = _sweep_gbops(result)
    xaxes = [(lambda r: r["size_bytes"] / 1024, "model size (KiB; conv weights at their bit-width)")]
    if gbops:
        xaxes.append((lambda r: gbops.get((r["model"], r["bits"], r["method"])),
                      f"GBOPs (one {s.get('imgsz')} px image; MACs x W bits x A bits)"))
    fig, axes = plt.subplots(len(xaxes), 2, figsize=(11, 4.2 * len(xaxes)), squeeze=False)
    for ax_row, (xf, xlabel) in zip(axes, xaxes):
        for ax, m in zip(ax_row, [primary_prefix(s) + k for k in METRICS]):
            for model in s["models"]:
                fp = next((r for r in rows if r["model"] == model and r["arm"] == "fp"), None)
                if fp and (fp.get(m) or {}).get("mean") is not None and xf(fp) is not None:
                    ax.scatter([xf(fp)], [100 * fp[m]["mean"]], marker="*", s=140, color="k", zorder=4,
                               label=f"FP32{' ' + model if len(s['models']) > 1 else ''}")
                for method in s["methods"]:
                    for arm in s["arms"]:
                        pts = sorted((xf(r), 100 * r[m]["mean"], r["bits"]) for r in rows
                                     if (r["model"], r["method"], r["arm"]) == (model, method, arm)
                                     and (r.get(m) or {}).get("mean") is not None and xf(r) is not None)
                        if not pts:
                            continue
                        label = f"{ARM_LABELS[arm]}, {method}{', ' + model if len(s['models']) > 1 else ''}"
                        line, = ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=4, label=label)
                        for x, y, b in pts:
                            ax.annotate(f"W{b}", (x, y), textcoords="offset points", xytext=(3, 3), fontsize=7,
                                        color=line.get_color())
            ax.set_xscale("log")
            ax.set_xlabel(xlabel)
            ax.set_ylabel(f"val {metric_label(m)} (%)")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
    fig.suptitle("accuracy vs model size" + (" and vs compute (BOPs)" if gbops else ""), fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot(result: dict, path: Path) -> Path:
    """Grouped bars of mAP50-95 (the task's: mask / pose for those benches) per method/bit-width (one bar per arm,
    error bars over seeds) with the FP line."""
    import matplotlib  # slow to import: loaded only when a plot is drawn

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, s = result["rows"], result["settings"]
    models = s["models"]
    arms = s["arms"]
    m95 = primary_prefix(s) + "mAP50_95"
    groups = [(b, m) for b in s["bits"] for m in s["methods"]]
    fig, axes = plt.subplots(1, len(models), figsize=(max(4.0, 1.6 * len(groups) * max(len(arms), 1) / 2 + 2) *
                                                      len(models), 4), squeeze=False)
    width = 0.8 / max(len(arms), 1)
    for ax, model in zip(axes[0], models):
        by = {(r["bits"], r["method"], r["arm"]): r for r in rows if r["model"] == model}
        lows = []
        for j, arm in enumerate(arms):
            xs, ys, es = [], [], []
            for i, (b, m) in enumerate(groups):
                r = by.get((b, m, arm))
                mean = r[m95]["mean"] if r else None
                xs.append(i + (j - (len(arms) - 1) / 2) * width)
                ys.append(100 * mean if mean is not None else 0.0)
                es.append(100 * r[m95]["std"] if r and r[m95]["std"] is not None else 0.0)
            ax.bar(xs, ys, width, yerr=es if any(es) else None, label=ARM_LABELS[arm], capsize=3)
            lows += [y - e for y, e in zip(ys, es) if y > 0]
        fp = by.get((None, None, "fp"))
        if fp and fp[m95]["mean"] is not None:
            ax.axhline(100 * fp[m95]["mean"], color="k", ls="--", lw=1, label="FP")
        ax.set_xticks(range(len(groups)))
        ax.set_xticklabels([f"{m}\nW{b}A{b}" for b, m in groups])
        ax.set_ylabel(f"{metric_label(m95)} (%)")
        ax.set_title(model)
        if lows:  # start near the lowest bar so differences of a point stay visible (the axis says where)
            ax.set_ylim(bottom=max(0.0, 5 * (min(lows) // 5) - 5))
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _epoch_curve(weights: str | None, column: str = "metrics/mAP50(B)") -> list[float]:
    """Per-epoch values of ``column`` from the results.csv of the run that wrote ``weights`` (empty if none)."""
    if not weights:
        return []
    f = Path(weights).parents[1] / "results.csv"
    if not f.is_file():
        return []
    with open(f, newline="") as fh:
        rows = list(csv.DictReader(fh))
    out = []
    for r in rows:
        r = {k.strip(): v for k, v in r.items() if k}
        try:
            out.append(float(r[column]))
        except (KeyError, TypeError, ValueError):
            return []
    return out


def plot_curves(result: dict, path: Path) -> Path | None:
    """mAP50 (the task's) per QAT epoch, arms overlaid (mean over seeds, band = min..max), one panel per
    model/bits/method.

    The FP value is a dashed line and the PTQ value a dotted one (epoch 0, before any training step).
    Returns None when no run left a results.csv (e.g. all results were reused from another machine).
    """
    import matplotlib  # slow to import: loaded only when a plot is drawn

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [r for r in result["runs"] if _ok(r)]
    s = result["settings"]
    m50 = primary_prefix(s) + "mAP50"
    column = {"": "metrics/mAP50(B)", "mask_": "metrics/mAP50(M)", "pose_": "metrics/mAP50(P)"}[primary_prefix(s)]
    panels = [(mo, b, me) for mo in s["models"] for b in s["bits"] for me in s["methods"]]
    curves = {}
    for r in runs:
        if r["kind"] == "qat" and not is_step0(r["arm"]):
            c = _epoch_curve(r.get("weights"), column)
            if c:
                curves.setdefault((r["model"], r["bits"], r["method"], r["arm"]), []).append(c)
    if not curves:
        return None
    from matplotlib.ticker import MaxNLocator  # matplotlib loads only when a plot is drawn

    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6), squeeze=False)
    for ax, (mo, b, me) in zip(axes[0], panels):
        for arm in s["arms"]:
            cs = curves.get((mo, b, me, arm))
            if not cs:
                continue
            n = min(len(c) for c in cs)
            ep = list(range(1, n + 1))
            mean = [100 * statistics.fmean(c[i] for c in cs) for i in range(n)]
            ax.plot(ep, mean, marker="o", ms=3, label=ARM_LABELS[arm])
            if len(cs) > 1:
                ax.fill_between(ep, [100 * min(c[i] for c in cs) for i in range(n)],
                                [100 * max(c[i] for c in cs) for i in range(n)], alpha=0.2)
        by = {(r["bits"], r["method"], r["arm"]): r for r in result["rows"] if r["model"] == mo}
        fp, ptq = by.get((None, None, "fp")), by.get((b, me, "ptq"))
        if fp and fp[m50]["mean"] is not None:
            ax.axhline(100 * fp[m50]["mean"], color="k", ls="--", lw=1, label="FP")
        if ptq and ptq[m50]["mean"] is not None:
            ax.axhline(100 * ptq[m50]["mean"], color="gray", ls=":", lw=1, label="PTQ")
        ax.set_title(f"{mo} W{b}A{b} {me}")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("QAT epoch")
        ax.set_ylabel(f"val {metric_label(m50)} (%)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


__all__ = ["aggregate", "annotate_stability", "markdown", "metric_label", "plot", "plot_curves", "plot_size",
           "primary_prefix", "stability_table", "summarize", "sweep_table", "task_metrics"]
