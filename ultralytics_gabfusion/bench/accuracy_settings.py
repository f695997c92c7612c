"""Settings of ``yolo-gab bench``: defaults, presets, the help table and the checks run before anything starts.

:func:`resolve_settings` turns the ``key=value`` tokens into one normalised settings dict, or raises
:class:`~.common.BenchError` naming the key to fix; nothing is trained or written while it runs.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from ultralytics.cfg import check_cfg
from ultralytics.data.utils import check_det_dataset
from ultralytics.nn.tasks import yaml_model_load
from ultralytics.utils import DEFAULT_CFG_DICT, YAML
from ultralytics.utils.checks import check_yaml

from .. import zoo
from ..distill import load_teacher
from ..preflight import model_task
from ..provenance import PKG_ROOT
from ..settings import (
    ADA_DIVS,
    MAX_BITS,
    MIN_BITS,
    PLUGIN_KEYS,
    as_float,
    as_int,
    as_int_list,
    as_list,
    as_bool,
    as_str_list,
    parse_key_values,
    unknown_key_error,
    validate_settings,
)
from .arms import ARM_SETTINGS, ARMS, METHODS, SCHEDULES
from .common import BenchError, cli_value, resolve_device

DEFAULTS: dict[str, Any] = {
    "models": ["yolov5s"],
    "task": None,
    "methods": ["lsq", "n2uq"],
    "bits": [4],
    "arms": ["ptq", "ptq_gab", "baseline", "gab", "gab_ada"],
    "data": None,
    "synth_train": 4000,
    "synth_val": 500,
    "synth_max_objects": 12,
    "synth_min_size": 0,
    "imgsz": 512,
    "fp_epochs": 40,
    "epochs": 20,
    "time": None,
    "fp_time": None,
    "batch": 16,
    "seeds": [0],
    "device": None,
    "out": "runs/gab-bench",
    "ada": 0.1,
    "ada_div": None,
    "workers": None,
    "recipe": None,
    "schedule": "stable",
    "preset": None,
    "report_only": False,
}
HELP = {
    "models": "model names (-> <name>.yaml, trained from scratch) or FP .pt paths (taken as is)",
    "task": "detect, segment or pose: the models' task and the labels of the generated set (default: the models' "
            "task); segment/pose rows add mask/pose mAP to box mAP",
    "methods": "quantizers: lsq, lsqplus, pact, n2uq",
    "bits": "bit-widths 2..8, each run as WbAb",
    "arms": "trained: baseline (QAT), gab (+GABFusion), ada (+ADA), gab_ada (+GABFusion+ADA), gab_paper / "
            "gab_paper_ada (GABFusion in the paper's LayerNorm form); step 0 (calibrated, no training): ptq, ptq_gab, "
            "ptq_gab_paper",
    "data": "data YAML (VOC.yaml, coco.yaml, ...); default: the generated set under out/data",
    "synth_train": "training images of the generated set",
    "synth_val": "validation images of the generated set",
    "synth_max_objects": "most labelled objects per generated image",
    "synth_min_size": "smallest longest side of a generated object in px (0: the generator's size law)",
    "imgsz": "train/val image size (the generated set is rendered at this size)",
    "fp_epochs": "epochs of the FP run",
    "epochs": "epochs of every QAT run",
    "time": "optional hours per QAT run (Ultralytics time=, overrides epochs)",
    "fp_time": "optional hours for the FP run (Ultralytics time=)",
    "batch": "batch size of every run and of validation",
    "seeds": "seeds; FP and every QAT arm are trained once per seed",
    "device": "cpu, 0, 0,1 ... (default: 0 when CUDA is available, else cpu)",
    "out": "output directory (made absolute)",
    "ada": "ADA loss weight of the ada/gab_ada arms (0.1: ADA's gradient ~10 % of the detection gradient at the "
           "supervised features on the shipped model; paper 0.01: ~1 %)",
    "ada_div": "ADA divergence kl|js (default per method: kl for lsq/lsqplus/pact, js for n2uq)",
    "workers": "dataloader workers (default: Ultralytics')",
    "recipe": "cfg/qat recipe YAML applied to every QAT run (its qat/bits/gab/ada keys are set per arm)",
    "schedule": "QAT schedule every arm shares: stable (the recipes' default: hyp.VOC's optimiser, no warm-up, BatchNorm "
                "re-estimated at step 0 and before each validation) or paper (hyp.VOC literally: warm-up with bias lr "
                "0.187, BatchNorm statistics as Ultralytics keeps them)",
    "report_only": "write the report from the stored results of an earlier (possibly interrupted or parallel) bench "
                   "with the same settings; nothing is trained, missing runs are listed",
    "preset": "demo (shipped FP model, CPU minutes), demo-scratch (FP trained here), cpu-study (3 seeds, 3 epochs, "
              "~2 h CPU), study-long (3 seeds, 10 epochs, step-0 rows, GABFusion and ADA arms; ~2 h CPU), "
              "study-long-paper (its baseline with the paper's literal schedule), paper-voc (VOC.yaml, 640 px, batch "
              "64, early stopping, the paper's schedule), seg-cpu / pose-cpu (segmentation / pose from scratch on the "
              "generated set, 3 seeds, ~1 h CPU each)",
}
PRESETS: dict[str, dict] = {
    # The README's main command: from the shipped FP YOLOv5n (zoo), W4A4 LSQ PTQ, then baseline QAT and
    # +GABFusion+ADA with the recipes' (stable) schedule on half of the model's own 160 px generated set; a few CPU
    # minutes.
    "demo": {"models": ["yolov5n-synth160"], "imgsz": 160, "batch": 16, "epochs": 3, "fraction": 0.5,
             "methods": ["lsq"], "bits": [4], "arms": ["ptq", "ptq_gab", "baseline", "gab_ada"]},
    # The pipeline from scratch (no shipped model): FP yolov5n trained here for 40 epochs on 160 images at 128 px.
    # yolov5n is ~5x cheaper per image than yolov5s on a CPU; AdamW at lr 0.003 learns fastest from scratch in ~400
    # steps (Ultralytics' auto choice, lr 0.0005, stays at mAP ~0 that long). Absolute mAP stays small.
    "demo-scratch": {"models": ["yolov5n"], "synth_train": 160, "synth_val": 40, "imgsz": 128, "fp_epochs": 40,
                     "fp_optimizer": "AdamW", "fp_lr0": 0.003, "epochs": 5, "batch": 16, "methods": ["lsq"],
                     "bits": [4], "arms": ["ptq", "ptq_gab", "baseline", "gab_ada"]},
    # The CPU accuracy study (about two hours on 2 cores): every arm from the shipped FP model, 3 seeds, W4A4 and
    # W3A3, LSQ and N2UQ; 3 QAT epochs (~2.5 min a run) keep the 36 trained runs within that budget.
    # Resumable: rerun the same command and finished runs are reused.
    "cpu-study": {"models": ["yolov5n-synth160"], "imgsz": 160, "batch": 16, "epochs": 3, "fraction": 0.5,
                  "methods": ["lsq", "n2uq"], "bits": [4, 3],
                  "arms": ["ptq", "ptq_gab", "baseline", "gab", "gab_ada"],
                  "seeds": [0, 1, 2]},
    # The longer study (docs/RESULTS.md): W4A4 and W3A3 LSQ from the shipped FP model, 10 QAT epochs, 3 seeds, every
    # arm's step-0 model, GABFusion in its default (function-preserving) form with and without ADA (arms=[...,
    # ptq_gab_paper,gab_paper] adds the paper's LayerNorm form). ~2 h on 2 CPU cores in two processes (run it in the
    # background: it resumes), minutes on a GPU.
    "study-long": {"models": ["yolov5n-synth160"], "imgsz": 160, "batch": 16, "epochs": 10, "fraction": 0.5,
                   "methods": ["lsq"], "bits": [4, 3], "arms": ["ptq", "ptq_gab", "baseline", "gab", "gab_ada"],
                   "seeds": [0, 1, 2]},
    # The same study with the paper's literal schedule (hyp.VOC with its warm-up, Ultralytics' BatchNorm handling):
    # the schedule the recipes replaced, kept to compare against.
    "study-long-paper": {"models": ["yolov5n-synth160"], "imgsz": 160, "batch": 16, "epochs": 10, "fraction": 0.5,
                         "schedule": "paper", "methods": ["lsq"], "bits": [4, 3], "arms": ["ptq", "baseline"],
                         "seeds": [0, 1, 2]},
    # The paper's protocol: VOC, YOLOv5 hyp.VOC optimiser, batch 64, QAT with early stopping (patience is our
    # choice; the paper does not give it). FP from scratch needs ~300 epochs; pass models=fp.pt to skip it. The
    # paper's method is gab_paper_ada at its ADA weight 0.01; gab / gab_ada are this plugin's defaults (grad form; their
    # ADA then also runs at 0.01 here: pass ada=0.1 for the recommended weight, in a second out=).
    "paper-voc": {"data": "VOC.yaml", "imgsz": 640, "batch": 64, "fp_epochs": 300, "epochs": 100, "patience": 20,
                  "schedule": "paper",
                  "methods": ["n2uq", "pact", "lsq"], "bits": [4, 3], "ada": 0.01,
                  "arms": ["ptq", "ptq_gab", "ptq_gab_paper", "baseline", "gab", "gab_ada", "gab_paper",
                           "gab_paper_ada"]},
    # Segmentation and pose on 2 CPU cores, about an hour each for 3 seeds (no shipped FP model for these tasks: the
    # FP model is trained here per seed). The generated set of the shipped detector's kind (1-4 objects, >= 20 px; 16
    # classes) at 160 px, 400/100 images; FP from scratch with AdamW lr 0.003 (as demo-scratch), validated only at its
    # end; then W4A4 LSQ, 3 QAT epochs per arm. Measured on 2 cores: yolov5n-seg ~20 s per 400-image epoch (FP),
    # ~40 s (QAT); yolo11n-pose ~13 s (FP). Absolute mAP stays small (an FP model of ~10 CPU minutes).
    "seg-cpu": {"models": [str(PKG_ROOT / "cfg" / "models" / "yolov5n-seg.yaml")], "task": "segment",
                "synth_train": 400, "synth_val": 100, "synth_max_objects": 4, "synth_min_size": 20, "imgsz": 160,
                "batch": 16, "fp_epochs": 30, "fp_optimizer": "AdamW", "fp_lr0": 0.003, "fp_val": False, "epochs": 3,
                "methods": ["lsq"], "bits": [4],
                "arms": ["ptq", "ptq_gab", "baseline", "gab", "gab_ada"], "seeds": [0, 1, 2]},
    "pose-cpu": {"models": ["yolo11n-pose"], "task": "pose", "synth_train": 400, "synth_val": 100,
                 "synth_max_objects": 4, "synth_min_size": 20, "imgsz": 160, "batch": 16, "fp_epochs": 40,
                 "fp_optimizer": "AdamW", "fp_lr0": 0.003, "fp_val": False, "epochs": 3,
                 "methods": ["lsq"], "bits": [4], "arms": ["ptq", "ptq_gab", "baseline", "gab", "gab_ada"],
                 "seeds": [0, 1, 2]},
}
# Ultralytics keys the bench sets itself (with the key to use instead, if any).
RESERVED = {
    "model": "models", "seed": "seeds", "project": "out", "name": "out", "exist_ok": None, "resume": None,
    "mode": None, "trainer": None, "cfg": "recipe", "teacher": "models (the FP checkpoint is the teacher)",
    "qat": "methods", "w_bits": "bits", "a_bits": "bits", "gab": "arms", "save_dir": "out", "plots": None,
}
# Recipe keys the bench sets per run from its own settings (a recipe's values for them are ignored).
RECIPE_IGNORED = ("epochs", "time", "imgsz", "batch", "device", "data", "workers", "ada", "cfg")
SYNTH_MAX_OBJECTS = 12
SYNTH_SEED = 0


def help_text() -> str:
    """The key table printed by ``yolo-gab bench help``."""
    w = max(len(k) for k in DEFAULTS) + 2
    lines = ["yolo-gab bench key=value ...   (accuracy / paper table; 'yolo-gab bench speed help' for step cost)"]
    for k, v in DEFAULTS.items():
        lines.append(f"  {k:<{w}}{cli_value(v):<24}{HELP[k]}")
    lines.append("  Any other Ultralytics train key (lr0=, patience=, mosaic=, ...) or plugin key (qat_lr=, gab_eta=, "
                 "ada_attn=, ...) is passed to every QAT run; amp/cache/fraction also to the FP run; "
                 "fp_<key>= (fp_lr0=, fp_optimizer=, ...) to the FP run only.")
    for k, v in PRESETS.items():
        lines.append(f"  preset={k}: " + " ".join(f"{a}={cli_value(b)}" for a, b in v.items()))
    return "\n".join(lines)


# =========================================================================================== resolve_settings
def resolve_settings(argv: list[str]) -> dict:
    """Parse and check every setting; nothing is trained or written here.

    Args:
        argv (list[str]): ``key=value`` tokens after ``yolo-gab bench``.

    Returns:
        (dict): Normalised settings: the keys of ``DEFAULTS`` plus ``extra`` (passthrough train keys of the QAT
            runs), ``fp_extra`` (``fp_<key>`` keys of the FP run), ``explicit`` (keys the user or preset set),
            ``explicit_user`` (keys the user set) and resolved ``model_entries``/``recipe_cfg``.

    Raises:
        BenchError: Any inconsistent or unknown setting (exit status 2).
    """
    user = parse_key_values(argv)
    _refuse_unknown_keys(user)
    preset = _preset_name(user)
    given = {**(PRESETS[preset] if preset else {}), **user}
    s = {**DEFAULTS, **{k: v for k, v in given.items() if k in DEFAULTS}, "preset": preset}
    extra = {k: v for k, v in given.items() if k not in DEFAULTS and not k.startswith("fp_")}
    # fp_<key>=value: an Ultralytics train key for the FP run only (like fp_epochs / fp_time)
    fp_extra = {k[3:]: v for k, v in given.items() if k not in DEFAULTS and k.startswith("fp_")}

    _check_grid(s)
    _check_schedule(s)
    _check_ada(s)
    s["report_only"] = as_bool("report_only", s["report_only"])
    s["schedule"] = as_str_list("schedule", s["schedule"], tuple(SCHEDULES))[0]
    if s["workers"] is not None:
        s["workers"] = as_int("workers", s["workers"], 0)
    s["device"] = resolve_device("device", s["device"])
    s["out"] = _output_dir(s["out"])
    s["model_entries"] = _model_entries(s["models"])
    s["models"] = [m["label"] for m in s["model_entries"]]
    s["task"] = _task_setting(s["task"], s["model_entries"])
    s["data"] = _data_setting(s["data"], s["imgsz"])
    if s["data"] is not None:
        _check_data_task(s["data"], s["task"])
    s["recipe"], s["recipe_cfg"] = _load_recipe(s["recipe"])
    _check_passthrough(s["recipe_cfg"], extra, fp_extra)
    s["extra"] = extra
    s["fp_extra"] = fp_extra
    s["explicit"] = sorted(given)
    s["explicit_user"] = sorted(user)
    if s["data"] is None:
        synth_settings(s)  # refuse incompatible shipped models now, not after the first run
    return s


def _refuse_unknown_keys(user: dict) -> None:
    """Refuse keys the bench sets itself (naming the key to use instead) and keys nobody knows (closest match)."""
    valid = set(DEFAULTS) | set(DEFAULT_CFG_DICT) | set(PLUGIN_KEYS)
    fp_valid = {f"fp_{k}" for k in DEFAULT_CFG_DICT if k not in RESERVED and k not in DEFAULTS}
    for k in user:
        base = k[3:] if k.startswith("fp_") and k not in DEFAULTS else k
        if base in RESERVED:
            alt = RESERVED[base]
            raise BenchError(f"'{k}' is set by the bench itself" + (f"; use '{alt}=' instead." if alt else "."))
        if k not in valid and k not in fp_valid:
            raise unknown_key_error(k, valid | fp_valid, "bench")


def _preset_name(user: dict) -> str | None:
    """The lower-case name of the user's ``preset``, or None without one."""
    preset = user.get("preset")
    if preset is not None and str(preset).lower() not in PRESETS:
        raise BenchError(f"preset={preset} is unknown: use one of {', '.join(PRESETS)}.")
    return str(preset).lower() if preset else None


def _check_grid(s: dict) -> None:
    """Normalise what is compared: ``methods``, ``bits``, ``arms`` and ``seeds``."""
    s["methods"] = as_str_list("methods", s["methods"], METHODS)
    s["bits"] = as_int_list("bits", s["bits"], MIN_BITS, MAX_BITS)
    s["arms"] = as_str_list("arms", s["arms"], ARMS)
    s["seeds"] = as_int_list("seeds", s["seeds"], 0)


def _check_schedule(s: dict) -> None:
    """Normalise image size, epochs, batch, generated-set sizes and time budgets."""
    s["imgsz"] = as_int("imgsz", s["imgsz"], 32)
    if s["imgsz"] % 32:
        raise BenchError(f"imgsz={s['imgsz']} must be a multiple of 32 (the largest YOLO stride).")
    for k in ("fp_epochs", "epochs", "batch", "synth_train", "synth_val", "synth_max_objects"):
        s[k] = as_int(k, s[k], 1)
    s["synth_min_size"] = as_int("synth_min_size", s["synth_min_size"], 0)
    for k in ("time", "fp_time"):
        s[k] = None if s[k] is None else as_float(k, s[k], 0.0, lo_open=True)


def _check_ada(s: dict) -> None:
    """Normalise ``ada`` (refusing 0 when an arm uses ADA) and ``ada_div``."""
    s["ada"] = as_float("ada", s["ada"], 0.0)
    ada_arms = [a for a in s["arms"] if ARM_SETTINGS[a][1]]
    if s["ada"] == 0 and ada_arms:
        raise BenchError(f"arms {ada_arms} use ADA but ada=0: set ada>0 (paper: 0.01) or drop those arms.")
    if s["ada_div"] is not None:
        s["ada_div"] = as_str_list("ada_div", s["ada_div"], ADA_DIVS)[0]


def _output_dir(out: Any) -> Path:
    """``out`` as an absolute path; refused when it names an existing file."""
    p = Path(str(out)).expanduser().resolve()
    if p.exists() and not p.is_dir():
        raise BenchError(f"out={out} is a file; pass a directory.")
    return p


def _model_entries(v: Any) -> list[dict]:
    """Resolve ``models`` entries to {label, source, kind('yaml'|'pt')} and refuse unknown ones."""
    raws = [str(x).strip() for x in as_list("models", v) if str(x).strip()]
    if not raws:
        raise BenchError("'models' is empty: give at least one model, e.g. models=[yolov5s].")
    out = []
    for raw in dict.fromkeys(raws):
        if raw in zoo.names():
            out.append(_shipped_model(raw))
        elif raw.lower().endswith(".pt"):
            out.append(_checkpoint_model(raw))
        else:
            out.append(_yaml_model(raw))
    labels = [m["label"] for m in out]
    dup = sorted({x for x in labels if labels.count(x) > 1})
    if dup:
        raise BenchError(f"models: {dup} appear more than once (labels come from file names); list each model once.")
    return out


def _shipped_model(name: str) -> dict:
    """A shipped FP model: validated against its card, trained on a known generated set."""
    try:
        p = zoo.verify(name)
    except ValueError as e:
        raise BenchError(f"models: {e}") from None
    return {"label": name, "source": str(p), "kind": "pt", "zoo": name}


def _checkpoint_model(raw: str) -> dict:
    """A user's FP ``.pt``, checked now to be readable and full precision (it is also the ADA teacher)."""
    p = Path(raw).expanduser()
    if not p.is_file():
        raise BenchError(f"models: '{raw}' is not an existing .pt file (nothing is downloaded); pass a model "
                         f"name such as yolov5s or the path of a trained FP checkpoint.")
    p = p.resolve()
    try:  # refuse now rather than after hours of training
        load_teacher(p, device="cpu")
    except (ValueError, FileNotFoundError) as e:
        why = str(e).split(". Pass teacher")[0].split(": pass teacher")[0]
        raise BenchError(f"models: '{raw}' is not a usable FP checkpoint: {why}.") from None
    label = p.parents[1].name if p.stem in ("best", "last") and len(p.parents) > 1 else p.stem
    return {"label": label, "source": str(p), "kind": "pt"}


def _yaml_model(raw: str) -> dict:
    """A model YAML (name or path), trained from scratch by the FP run."""
    yaml_name = raw if raw.lower().endswith((".yaml", ".yml")) else f"{raw}.yaml"
    try:
        yaml_model_load(yaml_name)
    except Exception:
        raise BenchError(f"models: '{raw}' is neither a known model YAML ({yaml_name} not found) nor an existing "
                         f".pt file; use e.g. yolov5s, yolo11s, cfg/models/yolov5s-gab.yaml or path/to/fp.pt.") from None
    p = Path(yaml_name)
    source = str(p.resolve()) if p.exists() else yaml_name
    return {"label": p.stem, "source": source, "kind": "yaml"}


# ------------------------------------------------------------------------------------------ task (segment, pose)
BENCH_TASKS = ("detect", "segment", "pose")  # the tasks the plugin trains (and the generated set labels)
_TASK_MODELS = {"detect": "yolov5n, yolo11n", "segment": "yolo11n-seg, cfg/models/yolov5n-seg.yaml",
                "pose": "yolo11n-pose, yolov8n-pose"}


def _task_setting(task: Any, entries: list[dict]) -> str:
    """The bench's task: ``task=`` if given, else the models' own; every model must be of that task.

    Each entry gets its ``task`` (from its head; a YAML whose head says nothing counts as detect, as in Ultralytics).
    """
    if task is not None:
        task = str(task).strip().lower()
        if task not in BENCH_TASKS:
            raise BenchError(f"task={task} is not benchmarked: use one of {', '.join(BENCH_TASKS)}.")
    for e in entries:
        try:
            e["task"] = model_task(e["source"]) or "detect"
        except (FileNotFoundError, ValueError) as err:
            raise BenchError(f"models: {err}") from None
    tasks = sorted({e["task"] for e in entries})
    got = ", ".join(f"{e['label']} ({e['task']})" for e in entries)
    if task is None and len(tasks) > 1:
        raise BenchError(f"models {got} are of different tasks: bench one task at a time.")
    want = task or tasks[0]
    if want not in BENCH_TASKS:
        raise BenchError(f"models {got}: the bench trains {', '.join(BENCH_TASKS)} models.")
    if any(e["task"] != want for e in entries):
        example = _TASK_MODELS[want].split(",")[0]
        raise BenchError(f"task={want} but models {got}: use {want} models, e.g. models=[{example}].")
    return want


def _check_data_task(data: str, task: str) -> None:
    """Refuse a pose bench on a data YAML without ``kpt_shape`` (Ultralytics would fail after the FP run)."""
    if task == "pose" and not (YAML.load(data) or {}).get("kpt_shape"):
        raise BenchError(f"data={data} has no kpt_shape: task=pose needs a pose data set (kpt_shape: [n, 2|3]).")


def _data_setting(data: Any, imgsz: int) -> str | None:
    """``data``: None for the generated set (rendered at ``imgsz``), else a checked data YAML path."""
    if data is None:
        if imgsz < 64:
            raise BenchError(f"imgsz={imgsz}: the generated set needs imgsz >= 64; pass data= or a larger imgsz.")
        return None
    return _check_data(str(data))


def _check_data(data: str) -> str:
    """Refuse a data YAML that cannot be found, or whose images are missing when nothing may be downloaded."""
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


def _load_recipe(recipe: Any) -> tuple[str | None, dict]:
    """``(absolute path, keys applied to every QAT run)`` of a recipe YAML; ``(None, {})`` without one.

    The keys the bench sets per run (method, bits, arm, schedule length, data, device...) are left out.
    """
    if recipe is None:
        return None, {}
    p = Path(str(recipe)).expanduser()
    if not p.is_file():
        raise BenchError(f"recipe={recipe}: file not found (e.g. recipe=cfg/qat/w4a4-lsq.yaml).")
    rec = YAML.load(p) or {}
    if not isinstance(rec, dict):
        raise BenchError(f"recipe={recipe} is not a key: value YAML.")
    bad = [k for k in rec if k not in set(DEFAULT_CFG_DICT) | set(PLUGIN_KEYS)]
    if bad:
        raise BenchError(f"recipe={recipe}: unknown keys {bad}.")
    return str(p.resolve()), {k: v for k, v in rec.items() if k not in RESERVED and k not in RECIPE_IGNORED}


def _check_passthrough(recipe_cfg: dict, extra: dict, fp_extra: dict) -> None:
    """Check passthrough keys: Ultralytics keys with Ultralytics' own type checks, plugin keys with the plugin's."""
    qat_keys = {**recipe_cfg, **extra}
    try:
        check_cfg({k: v for k, v in qat_keys.items() if k not in PLUGIN_KEYS})
        check_cfg(dict(fp_extra))
        validate_settings({k: v for k, v in qat_keys.items() if k in PLUGIN_KEYS})
    except (TypeError, ValueError, SyntaxError) as e:
        raise BenchError(str(e)) from None
    if "patience" in extra:
        as_int("patience", extra["patience"], 1)


def synth_settings(s: dict) -> dict:
    """Settings of the generated set: a shipped model's own data (its card), else ``synth_*`` and ``imgsz``.

    Args:
        s (dict): Resolved settings (``model_entries``, ``synth_train``, ``synth_val``, ``imgsz``, ``explicit_user``).

    Returns:
        (dict): Keyword arguments of :func:`~ultralytics_gabfusion.data.make_synthetic_dataset`.

    Raises:
        BenchError: Shipped models trained on different sets, or ``synth_*`` given with a shipped model.
    """
    cards = {m["zoo"]: zoo.card(m["zoo"])["data"] for m in s["model_entries"] if m.get("zoo")}
    if cards:
        if len({json.dumps(c, sort_keys=True) for c in cards.values()}) > 1:
            raise BenchError(f"models {sorted(cards)} were trained on different generated sets; bench them separately "
                             f"or pass data=.")
        given = [k for k in ("synth_train", "synth_val", "synth_max_objects", "synth_min_size")
                 if k in s.get("explicit_user", ())]
        if given:
            raise BenchError(f"{given} cannot change the generated set of the shipped model(s) {sorted(cards)} (their "
                             f"FP accuracy is defined on it); use fraction= to train QAT on part of it.")
        return dict(next(iter(cards.values())))
    kw = {"n_train": s["synth_train"], "n_val": s["synth_val"], "imgsz": s["imgsz"], "seed": SYNTH_SEED,
          "max_objects": s.get("synth_max_objects", SYNTH_MAX_OBJECTS)}
    # only what differs from the original set's settings is added: earlier sets keep their directory and fingerprint
    if s.get("synth_min_size"):
        kw["min_size"] = s["synth_min_size"]
    if s.get("task", "detect") != "detect":
        kw["task"] = s["task"]
    return kw


__all__ = ["DEFAULTS", "HELP", "PRESETS", "RESERVED", "help_text", "resolve_settings", "synth_settings"]
