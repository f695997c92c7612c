"""Checks of a training configuration that run before anything is written, scanned or calibrated.

Ultralytics creates the run folder (``args.yaml``, ``weights/``) before it reads the data YAML, and the plugin's
model-dependent checks (teacher, ``ada_layers``, GABFusion's Concat nodes, ``qat_layer_bits``) would otherwise run
after the dataset scan and calibration. :func:`preflight_train` does all of them first, on the model structure alone
(a dummy forward at 64 px), so a mistake costs seconds and leaves no run folder behind. Every error names the key or
file and says what to pass instead.

Examples:
    >>> from ultralytics_gabfusion.preflight import preflight_train
    >>> preflight_train({"model": "yolov5s.yaml", "data": "data.yaml", "qat": "lsq", "gab": "balanced"})  # doctest: +SKIP
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from ultralytics.data.utils import IMG_FORMATS, check_det_dataset, img2label_paths
from ultralytics.nn.tasks import (
    DetectionModel,
    PoseModel,
    SegmentationModel,
    guess_model_task,
    load_checkpoint,
    yaml_model_load,
)
from ultralytics.utils import YAML
from ultralytics.utils.checks import check_file
from ultralytics.utils.patches import torch_load

from .distill import check_layer_indices, check_teacher, default_layers, has_quant_modules, load_teacher
from .fusion import GABFusion, insert_gabfusion
from .qat_setup import fusion_form, resolve_mixed_precision
from .quant.convert import plan_policy
from .settings import (
    KEYS_BEFORE_THEY_EXISTED,
    PLUGIN_DEFAULTS,
    PLUGIN_KEYS,
    QATConfig,
    check_writable_dir,
    one_line,
    validate_settings,
)

# Keys that only mean something with the feature on: set explicitly without it they would be silently ignored.
# Recipes carry ada_div for runs with and without ada, so only keys no recipe sets alone are checked for ADA.
NEEDS_QAT = ("w_bits", "a_bits", "qat_first_bits", "qat_head_bits", "qat_skip", "qat_init", "qat_lr", "qat_out_bits")  # not qat_calib: GABFusion's LN fit uses it
NEEDS_ADA = ("ada_layers", "teacher")
# Keys that define the quantized structure of a checkpoint: training it further with other values is a new model.
QUANT_STRUCTURE = ("qat", "w_bits", "a_bits", "qat_first_bits", "qat_head_bits", "qat_skip", "qat_out_bits")
_LABEL_SAMPLE = 200  # label files read per split: catches a wrong `names:` list without reading a large set

# The tasks the plugin trains: the float model class Ultralytics builds for each, and the plugin trainer's name
# (trainer.GAB_TRAINERS holds the classes; named here for messages, the trainer module asserts they agree).
TASK_MODELS = {"detect": DetectionModel, "segment": SegmentationModel, "pose": PoseModel}
TASK_TRAINERS = {"detect": "GABTrainer", "segment": "GABSegmentationTrainer", "pose": "GABPoseTrainer"}
_NOUNS = {"detect": "detection", "segment": "segmentation"}
_EXAMPLES = {"detect": "yolov5s.yaml, yolo11s.yaml", "segment": "yolo11n-seg.yaml, cfg/models/yolov5n-seg.yaml",
             "pose": "yolo11n-pose.yaml"}


def task_noun(task: str) -> str:
    """``detection``, ``segmentation``, ``pose``, ... for messages."""
    return _NOUNS.get(task, task)


def check_explicit_keys(overrides: dict, merged: dict) -> None:
    """Refuse feature keys given explicitly while their feature is off (they would change nothing).

    Args:
        overrides (dict): The keys the user passed (CLI, recipe or keywords), not the defaults.
        merged (dict): Validated settings (defaults and overrides).

    Raises:
        ValueError: Naming the ignored keys and the switch that turns them on.
    """
    def given(keys):
        return [k for k in keys if k in overrides and overrides[k] != PLUGIN_DEFAULTS[k]]

    if merged.get("qat", "none") == "none" and (bad := given(NEEDS_QAT)):
        raise ValueError(f"{bad} only apply to quantization-aware training, but qat=none: add qat=lsq|lsqplus|pact|n2uq "
                         f"(or cfg=cfg/qat/w4a4-lsq.yaml), or drop {bad}.")
    if not merged.get("ada") and (bad := given(NEEDS_ADA)):
        raise ValueError(f"{bad} only apply to ADA distillation, but ada=0: add ada=0.01 (the paper's weight), or drop {bad}.")


def load_model_file(model: Any, key: str = "model"):
    """Return ``(nn.Module | None, yaml_dict)`` for a ``.pt`` checkpoint or model YAML, with one clear error if unusable.

    Raises:
        FileNotFoundError: The file does not exist (nothing is downloaded).
        ValueError: A directory, an unreadable/truncated checkpoint, a YAML that is not a model definition.
    """
    if model is None or str(model) == "":
        raise ValueError(f"{key}= is missing: pass a model YAML (e.g. yolov5s.yaml, from scratch) or an FP checkpoint (fp.pt).")
    path = Path(str(model))
    if path.is_dir():
        raise ValueError(f"{key}={model} is a directory: pass a .pt checkpoint (e.g. {path / 'weights' / 'best.pt'}) or a model YAML.")
    if path.suffix == ".pt":
        if not path.is_file():
            raise FileNotFoundError(f"{key}={model}: file not found (nothing is downloaded); pass an existing .pt checkpoint.")

        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                net, _ = load_checkpoint(str(path), device="cpu")
        except Exception as e:  # truncated zip, pickle of something else, format mismatch: one clear message
            raise ValueError(f"{key}={model} is not a readable Ultralytics checkpoint ({one_line(e)}). "
                             "Pass a .pt written by Ultralytics or yolo-gab (an interrupted copy is often truncated).") from None
        return net, dict(getattr(net, "yaml", {}) or {})
    if path.suffix not in (".yaml", ".yml"):
        raise ValueError(f"{key}={model} is neither a .pt checkpoint nor a model .yaml.")

    try:
        cfg = yaml_model_load(str(path))  # also resolves scaled names: yolov5n.yaml -> yolov5.yaml, scale n
    except FileNotFoundError:
        raise FileNotFoundError(f"{key}={model}: model YAML not found (neither on disk nor among Ultralytics' model "
                                "YAMLs such as yolov5s.yaml, yolo11s.yaml).") from None
    except Exception as e:
        raise ValueError(f"{key}={model} is not a readable model YAML ({one_line(e)}).") from None
    if not isinstance(cfg, dict) or "backbone" not in cfg or "head" not in cfg:
        raise ValueError(f"{key}={model} is not a model definition (no 'backbone:'/'head:' lists); a data YAML goes in data=.")
    return None, cfg


def check_fp_checkpoint(model: Any, key: str = "model", use: str = "", hint: str = ""):
    """Load ``model`` (a ``.pt`` checkpoint) and refuse it when it is quantized: where an FP model is the starting point
    or the reference (sensitivity, post-training quantization, bench deploy's ``model=``).

    ``preflight_train`` lets a quantized checkpoint through when its own qat/w_bits/a_bits are given (QAT goes on);
    these commands have no such case.

    Args:
        model: The checkpoint path.
        key (str): The key that named it, for the message.
        use (str): What needs the FP model, e.g. ``"sensitivity"``.
        hint (str): What to pass instead, appended to the message.

    Returns:
        (nn.Module | None): The loaded FP model; None for a model YAML (no weights to check).

    Raises:
        FileNotFoundError | ValueError: As :func:`load_model_file`, or a quantized model.
    """
    net, _ = load_model_file(model, key)
    if net is not None and has_quant_modules(net):
        raise ValueError(f"{key}={model} is a quantized checkpoint; {use or 'this command'} needs the FP model"
                         f"{': ' + hint if hint else ''}.")
    return net


def _task_of(net, cfg: dict) -> str | None:
    try:
        return guess_model_task(net if net is not None else cfg)  # None for a YAML whose head name says nothing
    except Exception:
        return None


def model_task(model) -> str | None:
    """The Ultralytics task of a model YAML, ``.pt`` checkpoint or loaded model, from its head (as ``YOLO(model)``
    guesses it).

    None when the head does not tell (a YAML head module named neither Detect, Segment, Pose, ...): Ultralytics then
    assumes ``detect`` unless ``task=`` says otherwise.

    Raises:
        FileNotFoundError | ValueError: As :func:`load_model_file`.

    Examples:
        >>> model_task("yolo11n-pose.yaml")
        'pose'
    """
    if isinstance(model, nn.Module):  # already loaded: no second read of its file
        return _task_of(model, {})
    return _task_of(*load_model_file(model))


def check_task(model: Any, have: str, want: str, trainer: str | None = None) -> None:
    """Refuse a model whose task (``have``) is not the trainer's (``want``), naming the trainer to use instead.

    Raises:
        ValueError: E.g. "model=yolo11n-seg.yaml is a segment model; GABTrainer trains detection models. ...".
    """
    if have == want or have is None:  # an unknown head: the task the user chose decides
        return
    trainer = trainer or TASK_TRAINERS.get(want, "this trainer")
    if have in TASK_TRAINERS:
        hint = (f"Use {TASK_TRAINERS[have]} (trainer_for(model) returns it; yolo-gab train picks it from the model), "
                f"or a {task_noun(want)} model such as {_EXAMPLES[want]}.")
    else:
        hint = (f"The plugin trains detection, segmentation and pose models ({', '.join(TASK_TRAINERS.values())}): "
                f"use e.g. {_EXAMPLES['detect']}, {_EXAMPLES['segment']} or {_EXAMPLES['pose']}.")
    raise ValueError(f"model={model} is a {have} model; {trainer} trains {task_noun(want)} models. {hint}")


def build_float_model(task: str, cfg: dict, nc: int, data: dict | None = None):
    """A float model of ``task`` from a model YAML dict, as the task trainer builds it (pose: the data's kpt_shape)."""
    kw = {"data_kpt_shape": tuple(data["kpt_shape"])} if task == "pose" and (data or {}).get("kpt_shape") else {}
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        return TASK_MODELS[task](cfg, nc=nc, verbose=False, **kw)  # (a build runs a 256 px forward)


def check_data(data: Any, imgsz: Any = None, task: str = "detect") -> dict:
    """Resolve a detection, segmentation or pose data YAML without scanning it: YAML readable, image folders present,
    labels in range and of the task's format.

    A sample of up to 200 label files per split is read: a class id outside ``names`` (a systematically wrong
    ``names:`` list or dataset) is an error here instead of thousands of skipped images later. For ``task=pose`` the
    YAML needs ``kpt_shape`` and every sampled label line ``5 + K * D`` numbers (class, box, keypoints); for
    ``task=segment`` a split whose sampled labels are all boxes (5 numbers, no polygon) is a detection set.

    Returns:
        (dict): The resolved data dict (``nc``, ``names``, ``train``, ``val``), or ``{}`` for a dataset Ultralytics
        will download itself (a YAML with ``download:`` whose images are not on disk yet).

    Raises:
        FileNotFoundError: The YAML or an image folder does not exist.
        ValueError: A malformed YAML, no images, labels out of range.
    """
    if data in (None, ""):
        raise ValueError("data= is missing: pass a detection data YAML, e.g. data=datasets/synth/data.yaml.")
    s = str(data)
    if "://" in s:
        return {}
    if not Path(s).exists():
        try:
            s = check_file(s, hard=True, download=False)
        except Exception:
            raise FileNotFoundError(f"data={data}: data YAML not found. Pass the path of a detection data YAML "
                                    "(make one with 'yolo-gab synth out=datasets/synth').") from None
    if Path(s).is_file() and Path(s).suffix not in (".yaml", ".yml"):
        raise ValueError(f"data={data} is not a .yaml data file.")
    try:
        raw = YAML.load(s) if Path(s).is_file() else {}
    except Exception as e:
        raise ValueError(f"data={data}: not readable YAML ({one_line(e)}).") from None
    if Path(s).is_file() and not isinstance(raw, dict):
        raise ValueError(f"data={data} must hold 'key: value' pairs (path, train, val, names), not a {type(raw).__name__}.")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            d = check_det_dataset(s, autodownload=False)
    except Exception as e:
        if raw.get("download"):
            return {}  # Ultralytics fetches it during setup
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"data={data}: {msg}. Fix the YAML's path/train/val entries.") from None
    nc = int(d["nc"])
    kpt = _check_kpt_shape(data, d) if task == "pose" else None
    for split in ("train", "val"):
        entries = d.get(split)
        entries = entries if isinstance(entries, list) else [entries]
        files = []
        for e in entries:
            p = Path(str(e))
            if p.is_dir():
                files += sorted(f for f in p.rglob("*") if f.suffix[1:].lower() in IMG_FORMATS)
            elif p.is_file() and p.suffix == ".txt":
                root = p.parent
                for line in p.read_text().splitlines():
                    line = line.strip()
                    if line:
                        f = Path(line)
                        files.append(f if f.is_absolute() else (root / f).resolve())
            elif p.is_file():
                files.append(p)
            else:
                raise FileNotFoundError(f"data={data}: {split} images '{p}' not found. Fix '{split}:' in the YAML.")
        if not files:
            raise ValueError(f"data={data}: no images in the {split} split ({', '.join(map(str, entries))}). "
                             "Put images there or point '{split}:' at the image folder.")
        step = max(len(files) // _LABEL_SAMPLE, 1)
        lines_seen, polygons = 0, 0
        for lb in img2label_paths([str(f) for f in files[::step][:_LABEL_SAMPLE]]):
            lp = Path(lb)
            if not lp.is_file():
                continue  # an image without a label file is a background image
            for n, line in enumerate(lp.read_text().splitlines(), 1):
                parts = line.split()
                if not parts:
                    continue
                lines_seen, polygons = lines_seen + 1, polygons + (len(parts) > 6)
                if kpt and len(parts) != 5 + kpt[0] * kpt[1]:
                    raise ValueError(
                        f"data={data}: {lp} line {n} has {len(parts)} numbers, but kpt_shape {list(kpt)} needs "
                        f"5 + {kpt[0]}*{kpt[1]} = {5 + kpt[0] * kpt[1]} (class, box x y w h, then x y"
                        f"{' visible' if kpt[1] == 3 else ''} per keypoint). Fix kpt_shape in the YAML or the labels.")
                try:
                    cls = float(parts[0])
                except ValueError:
                    raise ValueError(f"data={data}: {lp} line {n} does not start with a class id: '{line[:60]}'.") from None
                if cls != int(cls) or not 0 <= cls < nc:
                    raise ValueError(f"data={data}: {lp} line {n} has class {parts[0]}, but the YAML names {nc} classes "
                                     f"(0..{nc - 1}). List every class under 'names:' or fix the labels.")
        if task == "segment" and lines_seen and not polygons:
            raise ValueError(f"data={data}: the {split} labels are boxes only (class x y w h), but a segmentation model "
                             "trains on polygons (class x1 y1 x2 y2 ...). Pass a segmentation data set, or train a "
                             "detection model on this one.")
    return d


def _check_kpt_shape(data: Any, d: dict) -> tuple[int, int]:
    """``kpt_shape`` of a pose data YAML as ``(K, D)``; a clear error when it is missing or malformed."""
    shape = d.get("kpt_shape")
    if shape is None:
        raise ValueError(f"data={data} has no kpt_shape, but a pose model trains on keypoints: pass a pose data YAML "
                         "with 'kpt_shape: [K, 3]' (K keypoints, x y visible) and 'flip_idx', or train a detection "
                         "model on this data.")
    if (not isinstance(shape, (list, tuple)) or len(shape) != 2 or not all(isinstance(v, int) for v in shape)
            or shape[0] < 1 or shape[1] not in (2, 3)):
        raise ValueError(f"data={data}: kpt_shape={shape} must be [K, 2] or [K, 3] (K keypoints, x y [visible]).")
    return int(shape[0]), int(shape[1])


def check_imgsz(imgsz: Any, stride: int = 32) -> None:
    """Refuse an image size that is not a multiple of the model's largest stride (Ultralytics would silently round)."""
    sizes = imgsz if isinstance(imgsz, (list, tuple)) else [imgsz]
    for s in sizes:
        if isinstance(s, bool) or not isinstance(s, (int, float)) or int(s) != s or s <= 0 or int(s) % stride:
            lo = max(int(float(s)) // stride * stride, stride) if isinstance(s, (int, float)) and not isinstance(s, bool) else stride
            raise ValueError(f"imgsz={imgsz} must be a positive multiple of the model's largest stride {stride}: "
                             f"use e.g. imgsz={lo} or imgsz={lo + stride}.")


def check_resume(overrides: dict) -> None:
    """For ``resume``: the checkpoint must be readable and the plugin keys may not change.

    Raises:
        FileNotFoundError | ValueError: Naming the checkpoint or the changed keys.
    """
    resume = overrides.get("resume")
    path = resume if isinstance(resume, (str, Path)) and str(resume) not in ("True", "true") else overrides.get("model")
    if path is None or not str(path).endswith(".pt"):
        return  # Ultralytics picks the latest run itself
    if not Path(str(path)).is_file():
        raise FileNotFoundError(f"resume: checkpoint {path} not found; pass model=path/to/weights/last.pt of the run.")

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ckpt = torch_load(str(path), map_location="cpu")
        saved = ckpt["train_args"]
    except Exception as e:
        raise ValueError(f"resume: {path} is not a readable training checkpoint ({type(e).__name__}). "
                         "Resume from the run's weights/last.pt.") from None
    if ckpt.get("optimizer") is None or ckpt.get("epoch", -1) < 0:
        raise ValueError(f"resume: {path} is a finished (stripped) checkpoint with no optimizer state: nothing to resume. "
                         f"Start a new run with model={path}.")

    given = validate_settings({k: v for k, v in overrides.items() if k in PLUGIN_KEYS})
    before = validate_settings({k: saved.get(k, PLUGIN_DEFAULTS[k]) for k in given})
    changed = [f"{k}={given[k]} (run: {before[k]})" for k in given if given[k] != before[k]]
    if changed:
        raise ValueError(f"resume continues a run with its own settings; these differ: {', '.join(changed)}. Drop them, "
                         f"or start a new run from the checkpoint with model={path}.")


def preflight_train(merged: dict, overrides: dict, task: str = "detect", trainer: str | None = None) -> None:
    """Run every check of a new plugin run that needs no run folder: model, task, data, structure, teacher.

    Args:
        merged (dict): Validated Ultralytics + plugin settings.
        overrides (dict): The keys the user passed explicitly.
        task (str): The trainer's task (``detect``, ``segment``, ``pose``): the model, the data and the ADA teacher must
            be of it.
        trainer (str | None): The trainer's class name, for messages.

    Raises:
        ValueError | FileNotFoundError: With the key or file and what to do.
    """
    check_explicit_keys(overrides, merged)
    net, cfg = load_model_file(merged.get("model"))
    check_task(merged.get("model"), _task_of(net, cfg), task, trainer)
    data = check_data(merged.get("data"), merged.get("imgsz"), task)
    check_imgsz(merged.get("imgsz", 640))

    nc = data.get("nc") or (getattr(net, "nc", None) if net is not None else cfg.get("nc", 80))
    if task == "pose" and net is not None and data.get("kpt_shape") and merged.get("qat", "none") != "none":
        have = list(getattr(net, "kpt_shape", None) or getattr(net.model[-1], "kpt_shape", ()) or ())
        if have and have != list(data["kpt_shape"]):
            raise ValueError(
                f"model={merged.get('model')} predicts kpt_shape {have}, but data={merged.get('data')} has "
                f"{list(data['kpt_shape'])}: QAT would start the keypoint predictors from random weights. Start QAT "
                f"from an FP model trained on this data (train one first with qat=none or trainer=default).")
    if net is not None and has_quant_modules(net):
        was = dict(getattr(net, "gabfusion", None) or {})
        diff = [f"{k}={merged.get(k)} (checkpoint: {was.get(k, KEYS_BEFORE_THEY_EXISTED.get(k))})" for k in QUANT_STRUCTURE
                if was and merged.get(k) != was.get(k, KEYS_BEFORE_THEY_EXISTED.get(k))]
        if merged.get("qat") == "none" or diff:
            raise ValueError(
                f"model={merged.get('model')} is already quantized ({was.get('qat', '?')} W{was.get('w_bits', '?')}"
                f"A{was.get('a_bits', '?')}); requested {', '.join(diff) or 'qat=none'}. Start from the FP checkpoint "
                f"to quantize differently, or pass the checkpoint's own qat/w_bits/a_bits to train it further.")
    student = net if net is not None else build_float_model(task, cfg, nc, data)
    n_layers = len(student.model)
    if merged.get("qat_skip"):
        check_layer_indices(merged["qat_skip"], n_layers, "model")
    if merged.get("gab", "off") != "off":
        fusion_form(QATConfig.from_keys(merged), net, merged.get("model"))  # a trained node of another form: refused
        if not any(isinstance(m, GABFusion) for m in student.modules()):
            try:
                insert_gabfusion(student, mode=merged["gab"])
            except ValueError as e:
                raise ValueError(f"gab={merged['gab']}: {e} Use a model with a fusion neck (yolov5s.yaml, yolo11s.yaml) or gab=off.") from None
    check_layer_bits(merged, student if net is None or not has_quant_modules(net) else None, cfg, nc, task, data)
    if merged.get("ada"):
        _check_teacher_matches(student, merged, nc, data)


def check_layer_bits(merged: dict, model, cfg: dict, nc: int, task: str = "detect", data: dict | None = None) -> None:
    """Resolve ``qat_layer_bits`` as the trainer will (``qat_setup.resolve_mixed_precision``); plan the convs with it.

    A mapping naming a layer without an ordinary conv, a CSV that is not a ``sensitivity.csv`` or a budget below the
    uniform plan would otherwise only fail in ``get_model``, after Ultralytics made the run folder. The plan is the
    conversion's own (``quant.convert.plan_policy``, which refuses such layers), minus its activation-bound probe.

    Args:
        merged (dict): Validated settings (``qat_layer_bits`` already parsed).
        model (nn.Module | None): The float model (with any GABFusion nodes); None to build one from ``cfg``.
        cfg (dict): The model YAML dict, for ``model=None``.
        nc (int): Number of classes, for ``model=None``.
        task (str): The model's task, for ``model=None``.
        data (dict | None): The resolved data dict (pose: ``kpt_shape``), for ``model=None``.

    Raises:
        ValueError | FileNotFoundError: From the resolution, naming ``qat_layer_bits`` and what can be set.
    """
    config = QATConfig.from_keys(merged)
    if not config.quantized or config.qat_layer_bits is None:
        return
    if model is None:  # a quantized checkpoint: the trainer plans on a fresh float build of its YAML, so do the same
        model = build_float_model(task, cfg, nc, data)
    mapping = resolve_mixed_precision(model, config)  # sets model.gabfusion_layer_bits: only on this throwaway copy
    plan_policy(model, config.w_bits, config.a_bits, config.qat_first_bits, config.qat_head_bits, config.qat_skip,
                "signed", mapping)  # a fixed grid: bits only, no probe forward


def _check_teacher_matches(student, merged: dict, nc: int, data: dict) -> None:
    teacher_path = merged.get("teacher") or merged.get("model")
    teacher = load_teacher(teacher_path)
    layers = merged.get("ada_layers") or default_layers(student)
    try:
        check_layer_indices(layers, len(student.model), "student")
    except ValueError as e:
        raise ValueError(f"ada_layers={layers}: {e}. Pick layers of the model (default: the head inputs).") from None
    t_nc = getattr(teacher, "nc", None) or len(getattr(teacher, "names", {}) or {})
    if data and t_nc and int(t_nc) != int(nc):
        raise ValueError(f"teacher {teacher_path} predicts {t_nc} classes, but data={merged.get('data')} has {nc}: "
                         "the teacher must be the FP model trained on this dataset. Pass teacher= that checkpoint or set ada=0.")
    check_teacher(student, teacher, layers)


__all__ = ["TASK_MODELS", "TASK_TRAINERS", "build_float_model", "check_data", "check_writable_dir", "check_explicit_keys",
           "check_fp_checkpoint", "check_imgsz", "check_layer_bits", "check_resume", "check_task", "load_model_file",
           "model_task", "preflight_train", "task_noun"]
