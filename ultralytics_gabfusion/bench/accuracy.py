"""``yolo-gab bench``: the paper-table benchmark (FP vs baseline QAT vs +GABFusion vs +GABFusion+ADA).

For each model and seed the FP model is trained once (or taken from a given ``.pt``) and validated; then, from
that same checkpoint and with the same schedule and seed, one QAT run per method x bit-width x arm is trained and
its ``best.pt`` is re-validated the same way as the FP model (``YOLO(best).val``, same data, size and batch), so
every number in the table is measured identically. Results go to ``out/bench.md``, ``out/bench.json`` and
``out/bench.png``, and the accuracy-vs-model-size plot ``out/size.png`` (size from the bit-width of each conv; with
several ``bits`` the table gains a bit-width sweep section); each finished run is stored in
``out/results/<run>.json`` so an interrupted benchmark resumes where it stopped (a stored result is reused only when
its settings fingerprint still matches).

Settings and presets live in :mod:`.accuracy_settings`, the runs themselves in :mod:`.accuracy_runs`; this module
runs the whole benchmark and re-exports their public names.

Examples:
    yolo-gab bench preset=demo out=runs/demo                      # a few minutes on a laptop CPU (shipped FP model)
    yolo-gab bench preset=cpu-study out=runs/cpu-study            # ~2 h of CPU, 3 seeds, resumable
    yolo-gab bench models=[yolov5s] methods=[lsq,n2uq] bits=[4] seeds=[0,1,2]
    yolo-gab bench preset=paper-voc                                # VOC.yaml, 640 px, batch 64, early stopping
    yolo-gab bench models=[runs/fp/weights/best.pt] data=my.yaml   # QAT arms from your own FP checkpoint
    yolo-gab bench models=[fp.pt] data=my.yaml bits=[8,6,5,4,3,2] arms=[ptq,baseline,gab_ada]  # bit-width sweep
"""

from __future__ import annotations

import time
from pathlib import Path

from ultralytics.utils import LOGGER

from ..provenance import environment
from . import report
from .accuracy_runs import (
    SHARED_KEYS,
    fp_train_args,
    loadable_fp,
    prepare_data,
    qat_train_args,
    quantize_ptq,
    run_once,
    stable_args,
    train_fp,
    train_qat,
    val_key,
    validate_weights,
    weights_size_bytes,
)
from .accuracy_settings import (
    DEFAULTS,
    HELP,
    PRESETS,
    RESERVED,
    SYNTH_MAX_OBJECTS,
    SYNTH_SEED,
    help_text,
    resolve_settings,
    synth_settings,
)
from .arms import ARM_LABELS, ARM_SETTINGS, ARMS, METHOD_DEFAULTS, METHODS, PAPER_SCHEDULE, is_step0
from .common import fingerprint, write_json


def run_bench(s: dict) -> int:
    """Run the whole benchmark for resolved settings ``s``.

    Args:
        s (dict): Settings from :func:`resolve_settings`.

    Returns:
        (int): Exit status: 0, or 1 when any run failed or was skipped (the others are still reported).
    """
    t_start = time.perf_counter()
    s["out"].mkdir(parents=True, exist_ok=True)
    env = environment(s["device"])
    LOGGER.info(f"bench: {env['hardware']}, torch {env['torch']}, ultralytics {env['ultralytics']}, "
                f"commit {env['git_commit']}")
    data, data_info = prepare_data(s)
    records = []
    for entry in s["model_entries"]:
        for seed in s["seeds"]:
            fp_id = f"{entry['label']}-s{seed}-fp"
            fp_args = None if entry["kind"] == "pt" else fp_train_args(s, data, seed, fp_id)
            fp_fp = fingerprint({"source": entry["source"], "args": stable_args(fp_args), "data": data_info,
                                 "val": val_key(s)})
            rec = {"id": fp_id, "model": entry["label"], "seed": seed, "kind": "fp", "method": None, "bits": None,
                   "arm": "fp", "data": data, "train_args": fp_args}
            LOGGER.info(f"bench: ---- {fp_id} ----")
            fp_rec = run_once(s, rec, fp_fp, train_fp(s, entry, data, seed, fp_id))
            records.append(fp_rec)
            qat_plan = [(m, b, a) for m in s["methods"] for b in s["bits"] for a in s["arms"]]
            if fp_rec["status"] in ("failed", "missing"):
                for m, b, a in qat_plan:
                    records.append({"id": f"{entry['label']}-s{seed}-{m}-w{b}a{b}-{a}", "model": entry["label"],
                                    "seed": seed, "kind": "qat", "method": m, "bits": b, "arm": a,
                                    "status": "skipped", "error": "FP run failed"})
                continue
            fp_weights = loadable_fp({"source": fp_rec["weights"], "label": entry["label"]}, s)
            for method, bits, arm in qat_plan:
                run_id = f"{entry['label']}-s{seed}-{method}-w{bits}a{bits}-{arm}"
                args = qat_train_args(s, data, seed, run_id, method, bits, arm)
                fpr = fingerprint({"fp": fp_rec["fingerprint"], "args": stable_args(args), "val": val_key(s)})
                rec = {"id": run_id, "model": entry["label"], "seed": seed, "kind": "qat", "method": method,
                       "bits": bits, "arm": arm, "data": data, "train_args": args, "fp_weights": fp_weights}
                LOGGER.info(f"bench: ---- {run_id} ----")
                fn = (quantize_ptq(s, fp_weights, data, seed, run_id, method, bits, arm) if is_step0(arm) else
                      train_qat(s, fp_weights, data, seed, run_id, method, bits, arm))
                records.append(run_once(s, rec, fpr, fn))
    report.annotate_stability(records, s)
    rows = report.aggregate(records, s)
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in s.items() if k not in ("model_entries",)}
    result = {
        "format": "ultralytics-gabfusion bench v1",
        "units": "metrics are fractions (0-1) as Ultralytics reports them; bench.md shows percentage points",
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "settings": settings,
        "models": s["model_entries"],
        "environment": env,
        "data": data_info,
        "runs": records,
        "rows": rows,
        "wall_s": round(time.perf_counter() - t_start, 2),
        "resumed": [r["id"] for r in records if r.get("cached")],
        "failed": [r["id"] for r in records if r.get("status") in ("failed", "skipped", "missing")],
    }
    write_json(s["out"] / "bench.json", result)
    table = report.markdown(result)
    (s["out"] / "bench.md").write_text(table)
    for name, fn in (("bench.png", report.plot), ("curves.png", report.plot_curves), ("size.png", report.plot_size)):
        try:
            fn(result, s["out"] / name)
        except Exception as e:  # a plotting problem must not hide the numbers
            LOGGER.warning(f"bench: {name} not written ({type(e).__name__}: {e})")
    print(table, flush=True)
    LOGGER.info(f"bench: results in {s['out']} (bench.md, bench.json, bench.png, curves.png, size.png); "
                f"{result['wall_s']:.0f} s")
    if result["failed"]:
        LOGGER.error(f"bench: {len(result['failed'])} run(s) failed or were skipped: {result['failed']}")
        return 1
    return 0


def accuracy_main(argv: list[str]) -> int:
    """``yolo-gab bench key=value ...``: check every setting, then run; see the module docstring.

    Args:
        argv (list[str]): Tokens after ``bench`` (``help`` prints the key table).

    Returns:
        (int): Exit status of :func:`run_bench` (0 for ``help``).

    Raises:
        BenchError: A bad setting, before anything is trained or written (``bench_main`` exits with status 2).
    """
    if argv and argv[0] in ("help", "-h", "--help"):
        print(help_text())
        return 0
    s = resolve_settings(argv)  # BenchError -> exit 2 in bench_main, before anything is written
    return run_bench(s)


# The accuracy benchmark's public names, most defined in .arms, .accuracy_settings and .accuracy_runs: all of them
# import from here, as callers and scripts expect.
__all__ = [
    "ARMS", "ARM_LABELS", "ARM_SETTINGS", "DEFAULTS", "HELP", "METHODS", "METHOD_DEFAULTS", "PAPER_SCHEDULE", "is_step0",
    "PRESETS", "RESERVED", "SHARED_KEYS", "SYNTH_MAX_OBJECTS", "SYNTH_SEED", "accuracy_main", "fp_train_args",
    "help_text", "loadable_fp", "prepare_data", "qat_train_args", "quantize_ptq", "resolve_settings", "run_bench",
    "run_once", "stable_args", "synth_settings", "train_fp", "train_qat", "val_key", "validate_weights",
    "weights_size_bytes",
]
