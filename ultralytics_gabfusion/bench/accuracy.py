"""``yolo-gab bench``: the paper-table benchmark (FP vs baseline QAT vs +GABFusion vs +GABFusion+ADA).

For each model and seed the FP model is trained once (or taken from a given ``.pt``) and validated; then, from
that same checkpoint and with the same schedule and seed, one QAT run per method x bit-width x arm is trained and
its ``best.pt`` is re-validated the same way as the FP model (``YOLO(best).val``, same data, size and batch), so
every number in the table is measured identically. Results go to ``out/bench.md``, ``out/bench.json`` and
``out/bench.png``, and the accuracy-vs-model-size plot ``out/size.png`` (size from the bit-width of each conv; with
several ``bits`` the table gains a bit-width sweep section); each finished run is stored in ``out/results/<run>.json`` so an interrupted benchmark resumes
where it stopped (a stored result is reused only when its settings fingerprint still matches).

Examples:
    yolo-gab bench preset=demo out=runs/demo                      # a few minutes on a laptop CPU (shipped FP model)
    yolo-gab bench preset=cpu-study out=runs/cpu-study            # ~2 h of CPU, 3 seeds, resumable
    yolo-gab bench models=[yolov5s] methods=[lsq,n2uq] bits=[4] seeds=[0,1,2]
    yolo-gab bench preset=paper-voc                                # VOC.yaml, 640 px, batch 64, early stopping
    yolo-gab bench models=[runs/fp/weights/best.pt] data=my.yaml   # QAT arms from your own FP checkpoint
    yolo-gab bench models=[fp.pt] data=my.yaml bits=[8,6,5,4,3,2] arms=[ptq,baseline,gab_ada]  # bit-width sweep
"""

from __future__ import annotations

import gc
import json
import shutil
import time
import traceback
from pathlib import Path
from typing import Any

from .. import zoo
from .common import (
    BenchError,
    as_float,
    as_int,
    as_int_list,
    as_list,
    as_str_list,
    environment,
    fingerprint,
    parse_tokens,
    resolve_device,
    unknown_key_error,
    write_json,
)

METHODS = ("lsq", "lsqplus", "pact", "n2uq")
ARMS = ("ptq", "baseline", "gab", "ada", "gab_ada")
ARM_SETTINGS = {  # arm -> (gab mode, uses ADA)
    "ptq": ("off", False),  # converted + calibrated, no training step: the drop QAT has to recover
    "baseline": ("off", False),
    "gab": ("balanced", False),
    "ada": ("off", True),
    "gab_ada": ("balanced", True),
}
ARM_LABELS = {"ptq": "PTQ (no training)", "baseline": "baseline QAT", "gab": "+GABFusion", "ada": "+ADA",
              "gab_ada": "+GABFusion+ADA"}

# The paper's QAT protocol = YOLOv5 hyp.VOC.yaml (method.md section 5), every key Ultralytics has, as in the
# cfg/qat recipes (their comment table says why box/cls keep Ultralytics' gains).
PAPER_SCHEDULE = {"optimizer": "SGD", "lr0": 0.00334, "lrf": 0.15135, "momentum": 0.74832, "weight_decay": 0.00025,
                  "warmup_epochs": 3.3835, "warmup_momentum": 0.59462, "warmup_bias_lr": 0.18657,
                  "hsv_h": 0.01041, "hsv_s": 0.54703, "hsv_v": 0.27739, "degrees": 0.0, "translate": 0.04591,
                  "scale": 0.75544, "shear": 0.0, "perspective": 0.0, "flipud": 0.0, "fliplr": 0.5,
                  "mosaic": 0.85834, "mixup": 0.04266, "copy_paste": 0.0}
# Per-method defaults, as in cfg/qat/*.yaml: N2UQ trains its quantizer tensors at lr/10 (reference code), and the
# paper found KL best for the uniform quantizers and JS for N2UQ.
METHOD_DEFAULTS = {
    "lsq": {"qat_lr": 1.0, "ada_div": "kl"},
    "lsqplus": {"qat_lr": 1.0, "ada_div": "kl"},
    "pact": {"qat_lr": 1.0, "ada_div": "kl"},
    "n2uq": {"qat_lr": 0.1, "ada_div": "js"},
}

DEFAULTS: dict[str, Any] = {
    "models": ["yolov5s"],
    "methods": ["lsq", "n2uq"],
    "bits": [4],
    "arms": ["baseline", "gab", "gab_ada"],
    "data": None,
    "synth_train": 4000,
    "synth_val": 500,
    "imgsz": 512,
    "fp_epochs": 40,
    "epochs": 20,
    "time": None,
    "fp_time": None,
    "batch": 16,
    "seeds": [0],
    "device": None,
    "out": "runs/gab-bench",
    "ada": 0.01,
    "ada_div": None,
    "workers": None,
    "recipe": None,
    "preset": None,
}
HELP = {
    "models": "model names (-> <name>.yaml, trained from scratch) or FP .pt paths (taken as is)",
    "methods": "quantizers: lsq, lsqplus, pact, n2uq",
    "bits": "bit-widths 2..8, each run as WbAb",
    "arms": "ptq (calibrated, no training), baseline (QAT), gab (+GABFusion), ada (+ADA), gab_ada (+GABFusion+ADA)",
    "data": "data YAML (VOC.yaml, coco.yaml, ...); default: the generated set under out/data",
    "synth_train": "training images of the generated set",
    "synth_val": "validation images of the generated set",
    "imgsz": "train/val image size (the generated set is rendered at this size)",
    "fp_epochs": "epochs of the FP run",
    "epochs": "epochs of every QAT run",
    "time": "optional hours per QAT run (Ultralytics time=, overrides epochs)",
    "fp_time": "optional hours for the FP run (Ultralytics time=)",
    "batch": "batch size of every run and of validation",
    "seeds": "seeds; FP and every QAT arm are trained once per seed",
    "device": "cpu, 0, 0,1 ... (default: 0 when CUDA is available, else cpu)",
    "out": "output directory (made absolute)",
    "ada": "ADA loss weight of the ada/gab_ada arms (paper 0.01)",
    "ada_div": "ADA divergence kl|js (default per method: kl for lsq/lsqplus/pact, js for n2uq)",
    "workers": "dataloader workers (default: Ultralytics')",
    "recipe": "cfg/qat recipe YAML applied to every QAT run (its qat/bits/gab/ada keys are set per arm)",
    "preset": "demo (shipped FP model, CPU minutes), demo-scratch (FP trained here), cpu-study (3 seeds, ~2 h "
              "CPU) or paper-voc (VOC.yaml, 640 px, batch 64, early stopping)",
}
PRESETS: dict[str, dict] = {
    # The README's main command: from the shipped FP YOLOv5n (zoo), W4A4 LSQ PTQ, then baseline QAT and
    # +GABFusion+ADA with the paper's schedule on half of the model's own 160 px generated set; a few CPU minutes.
    # warmup_epochs=0 in the CPU presets: Ultralytics warms up for at least 100 iterations, which would cover the
    # whole of such a short run, with a bias lr of 0.19 on an already trained model.
    "demo": {"models": ["yolov5n-synth160"], "imgsz": 160, "batch": 16, "epochs": 3, "fraction": 0.5,
             "warmup_epochs": 0, "methods": ["lsq"], "bits": [4], "arms": ["ptq", "baseline", "gab_ada"]},
    # The pipeline from scratch (no shipped model): FP yolov5n trained here for 40 epochs on 160 images at 128 px.
    # yolov5n is ~5x cheaper per image than yolov5s on a CPU; AdamW at lr 0.003 learns fastest from scratch in ~400
    # steps (Ultralytics' auto choice, lr 0.0005, stays at mAP ~0 that long). Absolute mAP stays small.
    "demo-scratch": {"models": ["yolov5n"], "synth_train": 160, "synth_val": 40, "imgsz": 128, "fp_epochs": 40,
                     "fp_optimizer": "AdamW", "fp_lr0": 0.003, "epochs": 5, "batch": 16, "methods": ["lsq"],
                     "bits": [4], "arms": ["ptq", "baseline", "gab_ada"]},
    # The CPU accuracy study (about two hours on 2 cores): every arm from the shipped FP model, 3 seeds, W4A4 and
    # W3A3, LSQ and N2UQ; 3 QAT epochs (~2.5 min a run) keep the 36 trained runs within that budget.
    # Resumable: rerun the same command and finished runs are reused.
    "cpu-study": {"models": ["yolov5n-synth160"], "imgsz": 160, "batch": 16, "epochs": 3, "fraction": 0.5,
                  "warmup_epochs": 0, "methods": ["lsq", "n2uq"], "bits": [4, 3],
                  "arms": ["ptq", "baseline", "gab", "gab_ada"],
                  "seeds": [0, 1, 2]},
    # The paper's protocol: VOC, YOLOv5 hyp.VOC optimiser, batch 64, QAT with early stopping (patience is our
    # choice; the paper does not give it). FP from scratch needs ~300 epochs; pass models=fp.pt to skip it.
    "paper-voc": {"data": "VOC.yaml", "imgsz": 640, "batch": 64, "fp_epochs": 300, "epochs": 100, "patience": 20,
                  "methods": ["n2uq", "pact", "lsq"], "bits": [4, 3],
                  "arms": ["ptq", "baseline", "gab", "gab_ada"]},
}
# Ultralytics keys the bench sets itself (with the key to use instead, if any).
RESERVED = {
    "model": "models", "seed": "seeds", "project": "out", "name": "out", "exist_ok": None, "resume": None,
    "mode": None, "trainer": None, "cfg": "recipe", "teacher": "models (the FP checkpoint is the teacher)",
    "qat": "methods", "w_bits": "bits", "a_bits": "bits", "gab": "arms", "save_dir": "out", "plots": None,
}
# Ultralytics keys that also apply to the FP run (compute/data handling); every other extra key is QAT-only.
SHARED_KEYS = {"amp", "cache", "fraction", "single_cls", "classes", "rect", "half", "deterministic", "verbose"}
SYNTH_MAX_OBJECTS = 12
SYNTH_SEED = 0


# ============================================================================================== settings
def help_text() -> str:
    """The key table printed by ``yolo-gab bench help``."""
    w = max(len(k) for k in DEFAULTS) + 2
    lines = ["yolo-gab bench key=value ...   (accuracy / paper table; 'yolo-gab bench speed help' for step cost)"]
    for k, v in DEFAULTS.items():
        lines.append(f"  {k:<{w}}{_cli_value(v):<24}{HELP[k]}")
    lines.append("  Any other Ultralytics train key (lr0=, patience=, mosaic=, ...) or plugin key (qat_lr=, gab_eta=, "
                 "ada_attn=, ...) is passed to every QAT run; amp/cache/fraction also to the FP run; "
                 "fp_<key>= (fp_lr0=, fp_optimizer=, ...) to the FP run only.")
    for k, v in PRESETS.items():
        lines.append(f"  preset={k}: " + " ".join(f"{a}={_cli_value(b)}" for a, b in v.items()))
    return "\n".join(lines)


def _cli_value(v) -> str:
    """A value as it is typed on the command line (lists as [a,b])."""
    return f"[{','.join(map(str, v))}]" if isinstance(v, (list, tuple)) else str(v)


def _model_entries(v) -> list[dict]:
    """Resolve ``models`` entries to {label, source, kind('yaml'|'pt')} and refuse unknown ones."""
    from ultralytics.nn.tasks import yaml_model_load

    out = []
    raws = [str(x).strip() for x in as_list("models", v) if str(x).strip()]
    if not raws:
        raise BenchError("'models' is empty: give at least one model, e.g. models=[yolov5s].")
    for raw in dict.fromkeys(raws):
        if raw in zoo.names():  # a shipped FP model: validated against its card, trained on a known generated set
            try:
                p = zoo.verify(raw)
            except ValueError as e:
                raise BenchError(f"models: {e}") from None
            out.append({"label": raw, "source": str(p), "kind": "pt", "zoo": raw})
            continue
        if raw.lower().endswith(".pt"):
            p = Path(raw).expanduser()
            if not p.is_file():
                raise BenchError(f"models: '{raw}' is not an existing .pt file (nothing is downloaded); pass a model "
                                 f"name such as yolov5s or the path of a trained FP checkpoint.")
            p = p.resolve()
            from ..distill import load_teacher

            try:  # readable, and full precision (it is also the ADA teacher); refuse now rather than after hours
                load_teacher(p, device="cpu")
            except (ValueError, FileNotFoundError) as e:
                why = str(e).split(". Pass teacher")[0].split(": pass teacher")[0]
                raise BenchError(f"models: '{raw}' is not a usable FP checkpoint: {why}.") from None
            label = p.parents[1].name if p.stem in ("best", "last") and len(p.parents) > 1 else p.stem
            out.append({"label": label, "source": str(p), "kind": "pt"})
            continue
        yaml_name = raw if raw.lower().endswith((".yaml", ".yml")) else f"{raw}.yaml"
        try:
            yaml_model_load(yaml_name)
        except Exception:
            raise BenchError(f"models: '{raw}' is neither a known model YAML ({yaml_name} not found) nor an existing "
                             f".pt file; use e.g. yolov5s, yolo11s, cfg/models/yolov5s-gab.yaml or path/to/fp.pt.") from None
        p = Path(yaml_name)
        source = str(p.resolve()) if p.exists() else yaml_name
        out.append({"label": p.stem, "source": source, "kind": "yaml"})
    labels = [m["label"] for m in out]
    dup = sorted({x for x in labels if labels.count(x) > 1})
    if dup:
        raise BenchError(f"models: {dup} appear more than once (labels come from file names); list each model once.")
    return out


def resolve_settings(argv: list[str]) -> dict:
    """Parse and check every setting; nothing is trained or written here.

    Args:
        argv: ``key=value`` tokens after ``yolo-gab bench``.

    Returns:
        (dict): Normalised settings: the keys of ``DEFAULTS`` plus ``extra`` (passthrough train keys),
            ``explicit`` (keys the user or preset set) and resolved ``model_entries``/``recipe_cfg``.

    Raises:
        BenchError: Any inconsistent or unknown setting (exit status 2).
    """
    from ultralytics.cfg import check_cfg
    from ultralytics.utils import DEFAULT_CFG_DICT

    from ..settings import PLUGIN_KEYS, validate_settings

    user = parse_tokens(argv)
    valid = set(DEFAULTS) | set(DEFAULT_CFG_DICT) | set(PLUGIN_KEYS)
    fp_valid = {f"fp_{k}" for k in DEFAULT_CFG_DICT if k not in RESERVED and k not in DEFAULTS}
    for k in user:
        base = k[3:] if k.startswith("fp_") and k not in DEFAULTS else k
        if base in RESERVED:
            alt = RESERVED[base]
            raise BenchError(f"'{k}' is set by the bench itself" + (f"; use '{alt}=' instead." if alt else "."))
        if k not in valid and k not in fp_valid:
            raise unknown_key_error(k, valid | fp_valid, "bench")
    preset = user.get("preset")
    if preset is not None and str(preset).lower() not in PRESETS:
        raise BenchError(f"preset={preset} is unknown: use one of {', '.join(PRESETS)}.")
    given = {**(PRESETS[str(preset).lower()] if preset else {}), **user}
    s = {**DEFAULTS, **{k: v for k, v in given.items() if k in DEFAULTS}}
    s["preset"] = str(preset).lower() if preset else None
    extra = {k: v for k, v in given.items() if k not in DEFAULTS and not k.startswith("fp_")}
    # fp_<key>=value: an Ultralytics train key for the FP run only (like fp_epochs / fp_time)
    fp_extra = {k[3:]: v for k, v in given.items() if k not in DEFAULTS and k.startswith("fp_")}

    s["methods"] = as_str_list("methods", s["methods"], METHODS)
    s["bits"] = as_int_list("bits", s["bits"], 2, 8)
    s["arms"] = as_str_list("arms", s["arms"], ARMS)
    s["seeds"] = as_int_list("seeds", s["seeds"], 0)
    s["imgsz"] = as_int("imgsz", s["imgsz"], 32)
    if s["imgsz"] % 32:
        raise BenchError(f"imgsz={s['imgsz']} must be a multiple of 32 (the largest YOLO stride).")
    s["fp_epochs"] = as_int("fp_epochs", s["fp_epochs"], 1)
    s["epochs"] = as_int("epochs", s["epochs"], 1)
    s["batch"] = as_int("batch", s["batch"], 1)
    s["synth_train"] = as_int("synth_train", s["synth_train"], 1)
    s["synth_val"] = as_int("synth_val", s["synth_val"], 1)
    for k in ("time", "fp_time"):
        s[k] = None if s[k] is None else as_float(k, s[k], 0.0, lo_open=True)
    s["ada"] = as_float("ada", s["ada"], 0.0)
    if s["ada"] == 0 and any(ARM_SETTINGS[a][1] for a in s["arms"]):
        bad = [a for a in s["arms"] if ARM_SETTINGS[a][1]]
        raise BenchError(f"arms {bad} use ADA but ada=0: set ada>0 (paper: 0.01) or drop those arms.")
    if s["ada_div"] is not None:
        s["ada_div"] = as_str_list("ada_div", s["ada_div"], ("kl", "js"))[0]
    if s["workers"] is not None:
        s["workers"] = as_int("workers", s["workers"], 0)
    s["device"] = resolve_device("device", s["device"])
    out = Path(str(s["out"])).expanduser().resolve()
    if out.exists() and not out.is_dir():
        raise BenchError(f"out={s['out']} is a file; pass a directory.")
    s["out"] = out
    s["model_entries"] = _model_entries(s["models"])
    s["models"] = [m["label"] for m in s["model_entries"]]

    # data: the generated set (rendered at imgsz) or a user YAML whose images must exist (or be downloadable)
    if s["data"] is None:
        if s["imgsz"] < 64:
            raise BenchError(f"imgsz={s['imgsz']}: the generated set needs imgsz >= 64; pass data= or a larger imgsz.")
    else:
        s["data"] = _check_data(str(s["data"]))

    # recipe: a YAML of Ultralytics/plugin keys; the per-arm keys are set by the bench
    s["recipe_cfg"] = {}
    if s["recipe"] is not None:
        from ultralytics.utils import YAML

        p = Path(str(s["recipe"])).expanduser()
        if not p.is_file():
            raise BenchError(f"recipe={s['recipe']}: file not found (e.g. recipe=cfg/qat/w4a4-lsq.yaml).")
        rec = YAML.load(p) or {}
        if not isinstance(rec, dict):
            raise BenchError(f"recipe={s['recipe']} is not a key: value YAML.")
        bad = [k for k in rec if k not in set(DEFAULT_CFG_DICT) | set(PLUGIN_KEYS)]
        if bad:
            raise BenchError(f"recipe={s['recipe']}: unknown keys {bad}.")
        s["recipe"] = str(p.resolve())
        s["recipe_cfg"] = {k: v for k, v in rec.items() if k not in RESERVED and k not in ("epochs", "time", "imgsz",
                                                                                          "batch", "device", "data",
                                                                                          "workers", "ada", "cfg")}

    # passthrough keys: Ultralytics keys checked by Ultralytics' own type checks, plugin keys by the plugin's
    ul = {k: v for k, v in {**s["recipe_cfg"], **extra}.items() if k not in PLUGIN_KEYS}
    try:
        check_cfg(dict(ul))
        check_cfg(dict(fp_extra))
        validate_settings({k: v for k, v in {**s["recipe_cfg"], **extra}.items() if k in PLUGIN_KEYS})
    except (TypeError, ValueError, SyntaxError) as e:
        raise BenchError(str(e)) from None
    if "patience" in extra:
        as_int("patience", extra["patience"], 1)
    s["extra"] = extra
    s["fp_extra"] = fp_extra
    s["explicit"] = sorted(given)
    s["explicit_user"] = sorted(user)
    if s["data"] is None:
        synth_settings(s)  # refuse incompatible shipped models now, not after the first run
    return s


def _check_data(data: str) -> str:
    """Refuse a data YAML that cannot be found, or whose images are missing when nothing may be downloaded."""
    import os

    from ultralytics.data.utils import check_det_dataset
    from ultralytics.utils.checks import check_yaml

    try:
        path = check_yaml(data)
    except Exception:
        raise BenchError(f"data={data}: YAML not found. Pass an Ultralytics data YAML (e.g. VOC.yaml, coco.yaml, "
                         f"path/to/data.yaml) or leave data unset for the generated set.") from None
    offline = os.environ.get("YOLO_OFFLINE", "").lower() in ("1", "true")
    try:
        check_det_dataset(path, autodownload=not offline)
    except Exception as e:
        why = str(e).splitlines()[0]
        raise BenchError(f"data={data}: {why}" + (" (offline: YOLO_OFFLINE=1, nothing is downloaded)." if offline
                                                   else "")) from None
    return str(Path(path).resolve())


# ================================================================================================= runs
def _train_common(s: dict, data: str, seed: int, name: str) -> dict:
    kw = {"data": data, "imgsz": s["imgsz"], "batch": s["batch"], "device": s["device"], "seed": seed,
          "deterministic": True, "plots": False, "project": str(s["out"] / "runs"), "name": name, "exist_ok": True}
    if s["workers"] is not None:
        kw["workers"] = s["workers"]
    return kw


def fp_train_args(s: dict, data: str, seed: int, name: str) -> dict:
    """Keyword arguments of the FP run (Ultralytics defaults apart from the bench's shared keys)."""
    kw = _train_common(s, data, seed, name)
    kw["epochs"] = s["fp_epochs"]
    if s["fp_time"]:
        kw["time"] = s["fp_time"]
    kw.update({k: v for k, v in s["extra"].items() if k in SHARED_KEYS})
    kw.update(s["fp_extra"])
    return kw


def qat_train_args(s: dict, data: str, seed: int, name: str, method: str, bits: int, arm: str) -> dict:
    """Keyword arguments of one QAT run: paper schedule < method defaults < recipe < extra keys < per-arm keys."""
    gab, use_ada = ARM_SETTINGS[arm]
    kw = {**PAPER_SCHEDULE, "qat_lr": METHOD_DEFAULTS[method]["qat_lr"]}
    kw.update(s["recipe_cfg"])
    kw.update(s["extra"])
    kw.update(_train_common(s, data, seed, name))
    kw["epochs"] = s["epochs"]
    if s["time"]:
        kw["time"] = s["time"]
    kw.update({"qat": method, "w_bits": bits, "a_bits": bits, "gab": gab, "ada": s["ada"] if use_ada else 0.0})
    kw["ada_div"] = s["ada_div"] or s["recipe_cfg"].get("ada_div") or METHOD_DEFAULTS[method]["ada_div"]
    return kw


def _results_rows(run_dir: Path) -> int | None:
    f = run_dir / "results.csv"
    if not f.exists():
        return None
    return max(len([ln for ln in f.read_text().splitlines() if ln.strip()]) - 1, 0)


def _metrics_of(results) -> dict:
    rd = dict(getattr(results, "results_dict", {}) or {})
    return {
        "mAP50": float(rd.get("metrics/mAP50(B)", float("nan"))),
        "mAP50_95": float(rd.get("metrics/mAP50-95(B)", float("nan"))),
        "precision": float(rd.get("metrics/precision(B)", float("nan"))),
        "recall": float(rd.get("metrics/recall(B)", float("nan"))),
    }


def validate_weights(s: dict, weights: str, data: str, name: str) -> tuple[dict, float]:
    """Validate a checkpoint exactly like every other arm; returns (metrics, wall seconds)."""
    from ultralytics import YOLO

    t0 = time.perf_counter()
    kw = {"data": data, "imgsz": s["imgsz"], "batch": s["batch"], "device": s["device"].split(",")[0],
          "plots": False, "project": str(s["out"] / "val"), "name": name, "exist_ok": True, "split": "val",
          "verbose": False}  # no per-class table: the bench prints its own
    if s["workers"] is not None:
        kw["workers"] = s["workers"]
    r = YOLO(weights).val(**kw)
    return _metrics_of(r), time.perf_counter() - t0


def weights_size_bytes(weights: str) -> float:
    """Stored model size of a checkpoint from the bit-width of each conv (see :mod:`..quant.mixed`; FP at 32 bits)."""
    import torch

    from ..quant.mixed import model_size_bytes

    ckpt = torch.load(weights, map_location="cpu", weights_only=False)
    return model_size_bytes(ckpt.get("ema") or ckpt["model"])


def _free_memory() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _run(s: dict, rec: dict, fp: str, train_fn) -> dict:
    """Train (unless a stored result with the same fingerprint exists) and validate one run; never raises."""
    from ultralytics.utils import LOGGER

    res_file = s["out"] / "results" / f"{rec['id']}.json"
    if res_file.exists():
        try:
            old = json.loads(res_file.read_text())
        except (OSError, ValueError):
            old = None
        if old and old.get("fingerprint") == fp and old.get("status") in ("trained", "given") and \
                Path(old.get("weights", "")).is_file():
            LOGGER.info(f"bench: {rec['id']}: stored result reused ({res_file})")
            if old.get("size_bytes") is None:  # stored by a version without the size axis
                old["size_bytes"] = weights_size_bytes(old["weights"])
            return {**old, "cached": True}
        LOGGER.info(f"bench: {rec['id']}: stored result is stale or incomplete, running it again")
    rec.update({"fingerprint": fp, "cached": False, "error": None})
    try:
        t0 = time.perf_counter()
        rec.update(train_fn())
        rec["train_wall_s"] = round(time.perf_counter() - t0, 2) if rec["status"] == "trained" else 0.0
        metrics, vt = validate_weights(s, rec["weights"], rec["data"], rec["id"])
        rec.update(metrics)
        rec["size_bytes"] = weights_size_bytes(rec["weights"])
        rec["val_wall_s"] = round(vt, 2)
        rec["wall_s"] = round(rec["train_wall_s"] + vt, 2)
        write_json(res_file, rec)
    except Exception as e:  # one failed run must not lose the others: recorded, reported, exit status 1
        LOGGER.error(f"bench: {rec['id']} failed: {type(e).__name__}: {e}\n{traceback.format_exc()}")
        rec.update({"status": "failed", "error": f"{type(e).__name__}: {e}"})
    finally:
        _free_memory()
    return rec


def _train_fp(s: dict, entry: dict, data: str, seed: int, run_id: str):
    def fn():
        from ultralytics import YOLO

        if entry["kind"] == "pt":
            return {"status": "given", "weights": _loadable_fp(entry, s), "epochs_run": None, "train_metrics": None}
        run_dir = s["out"] / "runs" / run_id
        shutil.rmtree(run_dir, ignore_errors=True)  # Ultralytics appends to an old results.csv otherwise
        model = YOLO(entry["source"])
        model.train(**fp_train_args(s, data, seed, run_id))
        return _after_train(model, run_dir)

    return fn


def _train_qat(s: dict, fp_weights: str, data: str, seed: int, run_id: str, method: str, bits: int, arm: str):
    def fn():
        from ultralytics import YOLO

        from ..trainer import GABTrainer

        run_dir = s["out"] / "runs" / run_id
        shutil.rmtree(run_dir, ignore_errors=True)
        model = YOLO(fp_weights)
        model.train(trainer=GABTrainer, **qat_train_args(s, data, seed, run_id, method, bits, arm))
        return _after_train(model, run_dir)

    return fn


def _quantize_ptq(s: dict, fp_weights: str, data: str, seed: int, run_id: str, method: str, bits: int):
    def fn():
        from ..ptq import post_training_quantize

        run_dir = s["out"] / "runs" / run_id
        shutil.rmtree(run_dir, ignore_errors=True)
        args = qat_train_args(s, data, seed, run_id, method, bits, "ptq")
        weights = post_training_quantize(fp_weights, **args)
        return {"status": "trained", "weights": str(weights), "epochs_run": 0, "train_metrics": None}

    return fn


def _after_train(model, run_dir: Path) -> dict:
    tr = model.trainer
    best = Path(tr.best) if Path(tr.best).is_file() else Path(tr.last)
    m = tr.metrics or {}
    return {
        "status": "trained",
        "weights": str(best),
        "epochs_run": _results_rows(run_dir),
        "train_metrics": {"mAP50": float(m.get("metrics/mAP50(B)", float("nan"))),
                          "mAP50_95": float(m.get("metrics/mAP50-95(B)", float("nan")))},
    }


def _loadable_fp(entry: dict, s: dict) -> str:
    """A path Ultralytics loads without renaming (it rewrites '.../yolov5s.pt' to 'yolov5su.pt' and downloads)."""
    from ultralytics.utils.checks import check_yolov5u_filename

    src = entry["source"]
    if check_yolov5u_filename(src, verbose=False) == src:
        return src
    link = s["out"] / "given" / entry["label"] / "fp.pt"
    link.parent.mkdir(parents=True, exist_ok=True)
    if not link.exists():
        try:
            link.symlink_to(src)
        except OSError:
            shutil.copyfile(src, link)
    return str(link)


def prepare_data(s: dict) -> tuple[str, dict]:
    """Return (data YAML, data record); generates the benchmark set under ``out/data`` when ``data`` is unset."""
    from ultralytics.utils import LOGGER

    if s["data"] is not None:
        return s["data"], {"yaml": s["data"], "generated": False}
    from ..data.synth import load_synth_info, make_synthetic_dataset

    kw = synth_settings(s)
    d = s["out"] / "data" / ("synth-" + "-".join(f"{k}{v}" for k, v in kw.items()))
    t0 = time.perf_counter()
    yaml_path = make_synthetic_dataset(d, workers=s["workers"], **kw)
    LOGGER.info(f"bench: data {yaml_path} ({time.perf_counter() - t0:.1f} s)")
    info = load_synth_info(yaml_path)
    return str(yaml_path), {"yaml": str(yaml_path), "generated": True, **kw, "synth": info}


def synth_settings(s: dict) -> dict:
    """Settings of the generated set: a shipped model's own data (its card), else ``synth_*`` and ``imgsz``."""
    cards = {m["zoo"]: zoo.card(m["zoo"])["data"] for m in s["model_entries"] if m.get("zoo")}
    if cards:
        if len({json.dumps(c, sort_keys=True) for c in cards.values()}) > 1:
            raise BenchError(f"models {sorted(cards)} were trained on different generated sets; bench them separately "
                             f"or pass data=.")
        given = [k for k in ("synth_train", "synth_val") if k in s.get("explicit_user", ())]
        if given:
            raise BenchError(f"{given} cannot change the generated set of the shipped model(s) {sorted(cards)} (their "
                             f"FP accuracy is defined on it); use fraction= to train QAT on part of it.")
        return dict(next(iter(cards.values())))
    return {"n_train": s["synth_train"], "n_val": s["synth_val"], "imgsz": s["imgsz"], "seed": SYNTH_SEED,
            "max_objects": SYNTH_MAX_OBJECTS}


def run_bench(s: dict) -> int:
    """Run the whole benchmark for resolved settings ``s``; returns the exit status (1 if any run failed)."""
    from ultralytics.utils import LOGGER

    from . import report

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
            fp_fp = fingerprint({"source": entry["source"], "args": _stable(fp_args), "data": data_info,
                                 "val": _val_key(s)})
            rec = {"id": fp_id, "model": entry["label"], "seed": seed, "kind": "fp", "method": None, "bits": None,
                   "arm": "fp", "data": data, "train_args": fp_args}
            LOGGER.info(f"bench: ---- {fp_id} ----")
            fp_rec = _run(s, rec, fp_fp, _train_fp(s, entry, data, seed, fp_id))
            records.append(fp_rec)
            qat_plan = [(m, b, a) for m in s["methods"] for b in s["bits"] for a in s["arms"]]
            if fp_rec["status"] == "failed":
                for m, b, a in qat_plan:
                    records.append({"id": f"{entry['label']}-s{seed}-{m}-w{b}a{b}-{a}", "model": entry["label"],
                                    "seed": seed, "kind": "qat", "method": m, "bits": b, "arm": a,
                                    "status": "skipped", "error": "FP run failed"})
                continue
            fp_weights = _loadable_fp({"source": fp_rec["weights"], "label": entry["label"]}, s)
            for method, bits, arm in qat_plan:
                run_id = f"{entry['label']}-s{seed}-{method}-w{bits}a{bits}-{arm}"
                args = qat_train_args(s, data, seed, run_id, method, bits, arm)
                fpr = fingerprint({"fp": fp_rec["fingerprint"], "args": _stable(args), "val": _val_key(s)})
                rec = {"id": run_id, "model": entry["label"], "seed": seed, "kind": "qat", "method": method,
                       "bits": bits, "arm": arm, "data": data, "train_args": args, "fp_weights": fp_weights}
                LOGGER.info(f"bench: ---- {run_id} ----")
                fn = (_quantize_ptq(s, fp_weights, data, seed, run_id, method, bits) if arm == "ptq" else
                      _train_qat(s, fp_weights, data, seed, run_id, method, bits, arm))
                records.append(_run(s, rec, fpr, fn))
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
        "failed": [r["id"] for r in records if r.get("status") in ("failed", "skipped")],
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


def _stable(args: dict | None) -> dict | None:
    """Train args without those that cannot change the result (so a resumed bench may use other worker counts)."""
    return None if args is None else {k: v for k, v in args.items() if k not in ("workers", "verbose")}


def _val_key(s: dict) -> dict:
    """What the re-validation depends on (part of every run's fingerprint)."""
    return {"imgsz": s["imgsz"], "batch": s["batch"], "split": "val"}


def accuracy_main(argv: list[str]) -> int:
    """``yolo-gab bench key=value ...``: check every setting, then run; see the module docstring."""
    if argv and argv[0] in ("help", "-h", "--help"):
        print(help_text())
        return 0
    s = resolve_settings(argv)  # BenchError -> exit 2 in bench_main, before anything is written
    return run_bench(s)


__all__ = ["DEFAULTS", "PRESETS", "accuracy_main", "resolve_settings", "run_bench", "qat_train_args", "help_text"]
