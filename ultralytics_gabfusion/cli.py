"""The ``yolo-gab`` command: the ``yolo`` CLI grammar plus ``trainer=`` and the plugin keys.

Usage:
    yolo-gab train trainer=gab model=fp.pt data=data.yaml cfg=cfg/qat/w4a4-lsq.yaml epochs=50 gab=balanced ada=0.01
    yolo-gab train model=fp-seg.pt data=seg.yaml cfg=cfg/qat/w4a4-lsq.yaml        # segmentation / pose: same keys
    yolo-gab train trainer=default model=yolov5s.yaml data=data.yaml epochs=100    # the stock trainer of the task
    yolo-gab train trainer=my_pkg.trainers:MyTrainer model=... data=...           # any trainer class
    yolo-gab synth out=datasets/synth train=4000 val=500 imgsz=512 seed=0          # generate the synthetic set
    yolo-gab export model=best.pt format=onnx                                      # Q/DQ ONNX for quantized models
    yolo-gab bench ...  |  yolo-gab bench speed ...                                # paper-table / speed benchmarks
    yolo-gab sensitivity model=fp.pt data=data.yaml qat=lsq w_bits=4 a_bits=4      # per-layer sensitivity ranking
    yolo-gab help                                                                  # plugin keys and defaults
    yolo-gab val model=best.pt data=data.yaml                                      # any other mode: Ultralytics

``cfg=recipe.yaml`` is read first and explicit ``key=value`` arguments win, as in ``yolo``.
"""

from __future__ import annotations

import difflib
import importlib
import sys
from pathlib import Path

from .settings import PLUGIN_KEYS, SettingsError, help_text, parse_command, parse_key_values, split_overrides

TRAINER_HELP = ("trainer= takes gab (default: the plugin trainer of the model's task), default (Ultralytics' own trainer "
                "of the task) or package.module:ClassName")
PLUGIN_MODES = ("synth", "bench", "sensitivity")  # modes of yolo-gab itself (the rest go to Ultralytics)


# Ultralytics, torch and each subcommand's module are imported when a command is dispatched, not here, so that
# `yolo-gab help` and `yolo-gab synth` start without loading torch.

UsageError = SettingsError  # a command-line mistake: printed without a traceback, exit status 2
parse_args = parse_command  # the yolo-style command parser lives with the settings it validates


def resolve_trainer(spec, task: str = "detect"):
    """Return the trainer class for ``trainer=gab|default|package.module:Class`` and the model's ``task``.

    ``gab`` is the plugin trainer of the task (``GABTrainer``, ``GABSegmentationTrainer``, ``GABPoseTrainer``),
    ``default`` Ultralytics' own trainer of the task (``DetectionTrainer``, ``SegmentationTrainer``, ...); a class
    path is taken as given.
    """
    spec = "gab" if spec in (None, "") else spec
    if not isinstance(spec, str):
        return spec
    if spec.lower() == "gab":
        from .trainer import trainer_for

        try:
            return trainer_for(task=task)
        except ValueError as e:
            raise UsageError(str(e)) from None
    if spec.lower() == "default":
        from ultralytics.models import yolo

        stock = {"detect": yolo.detect.DetectionTrainer, "segment": yolo.segment.SegmentationTrainer,
                 "pose": yolo.pose.PoseTrainer, "obb": yolo.obb.OBBTrainer, "classify": yolo.classify.ClassificationTrainer}
        if task not in stock:
            raise UsageError(f"trainer=default covers the tasks {', '.join(stock)}; train a {task} model with "
                             "Ultralytics' own 'yolo train'.")
        return stock[task]
    if ":" not in spec:
        raise UsageError(f"trainer={spec} is not valid. {TRAINER_HELP}")
    mod_name, cls_name = spec.split(":", 1)
    try:
        cls = getattr(importlib.import_module(mod_name), cls_name)
    except (ImportError, AttributeError) as e:
        raise UsageError(f"trainer={spec}: cannot import {cls_name} from {mod_name} ({e}). {TRAINER_HELP}") from None
    return cls


def train(overrides: dict) -> None:
    """Run ``mode=train`` with the selected trainer through ``YOLO(model, task=task).train(trainer=...)``.

    The task is the model's (its YAML or checkpoint head, as Ultralytics guesses it); ``task=`` may name it, but a
    task that contradicts the model's head is refused.
    """
    from ultralytics import YOLO

    from . import fusion  # noqa: F401 - registers GABFusion, so *-gab.yaml models build with any trainer
    from .trainer import GABTrainerMixin

    spec = overrides.pop("trainer", None)
    ours, _ = split_overrides(overrides)
    if ours and str(spec).lower() == "default":
        raise UsageError(f"plugin keys {sorted(ours)} need trainer=gab (got trainer=default).")
    model = overrides.pop("model", None)
    if model is None:
        raise UsageError("train needs model=, e.g. model=yolov5s.yaml (from scratch) or model=fp.pt (QAT from FP).")
    if str(model).endswith(".pt") and not Path(str(model)).exists():
        raise UsageError(f"model={model}: file not found (no weights are downloaded by yolo-gab train).")
    from .preflight import check_resume, model_task

    if overrides.get("resume"):
        check_resume({**overrides, "model": model})  # Ultralytics would start a new run from a finished checkpoint
    task = model_task(model)  # also refuses a directory or truncated .pt: one line here, not a traceback from YOLO
    given = overrides.pop("task", None)
    if given and task and given != task:
        raise UsageError(f"task={given}, but model={model} is a {task} model (its head decides): drop task= or pass a "
                         f"{given} model YAML or checkpoint.")
    task = given or task or "detect"  # a head that names no task: task= decides, else detect (as Ultralytics)
    trainer = resolve_trainer(spec, task)
    if ours and not (isinstance(trainer, type) and issubclass(trainer, GABTrainerMixin)):
        raise UsageError(f"plugin keys {sorted(ours)} need trainer=gab (got trainer={trainer.__name__}).")
    overrides.pop("mode", None)
    YOLO(model, task=task).train(trainer=trainer, **overrides)


def delegate(argv: list[str]) -> None:
    """Hand a command to Ultralytics' own entrypoint unchanged (``val``, ``predict``, ``settings``, ...)."""
    from ultralytics.cfg import entrypoint

    from . import fusion  # noqa: F401 - registers GABFusion, so *-gab.yaml models build in val/predict/export

    sys.argv[:] = ["yolo", *argv]  # Ultralytics reads the shared sys.argv list
    entrypoint()


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``yolo-gab`` and ``python -m ultralytics_gabfusion``; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if not argv or argv[0] in {"help", "-h", "--help"}:
            from ultralytics.cfg import CLI_HELP_MSG

            print(__doc__.split("\n\n", 1)[1].strip() if __doc__ else "")
            print(help_text())
            if argv:
                print(CLI_HELP_MSG)
            return 0
        if argv[0] == "synth":
            from .data.synth import synth_main

            synth_main(parse_key_values(argv[1:]))
            return 0
        if argv[0] == "bench":
            from .bench import bench_main

            return bench_main(argv[1:]) or 0
        if argv[0] == "sensitivity":
            from .sensitivity import sensitivity_main

            return sensitivity_main(argv[1:]) or 0
        _check_mode(argv)
        if "export" in argv:
            _, overrides = parse_args(argv)
            from .export import export_main

            return export_main(overrides) or 0
        if "train" in argv:
            _, overrides = parse_args(argv)
            train(overrides)
            return 0
        ours = [a.split("=", 1)[0] for a in argv if "=" in a and a.split("=", 1)[0] in PLUGIN_KEYS | {"trainer"}]
        if ours:
            raise UsageError(f"{sorted(set(ours))} apply to 'yolo-gab train' only; remove them from this command.")
        delegate(argv)
        return 0
    except UsageError as e:
        print(f"yolo-gab: error: {e}", file=sys.stderr)
        return 2
    except (ValueError, TypeError, SyntaxError, OSError) as e:  # bad input found by a check: no traceback
        print(f"yolo-gab: error: {e}", file=sys.stderr)
        return 1


def _check_mode(argv: list[str]) -> None:
    """Refuse a bare word that is no mode, task or Ultralytics command (``tran``), naming the closest mode."""
    from ultralytics.cfg import MODES, TASKS
    from ultralytics.utils import DEFAULT_CFG_DICT

    special = {"checks", "version", "settings", "cfg", "login", "logout", "copy-cfg", "solutions", "help"}
    for a in argv:
        word = a[2:] if a.startswith("--") else a
        if word in special or word.rstrip("s") + "s" in special or word[:1] == "-":
            return  # an Ultralytics command: it parses the rest itself
        if "=" in a or word in MODES or word in TASKS:
            continue
        if word in DEFAULT_CFG_DICT and isinstance(DEFAULT_CFG_DICT[word], bool):
            continue  # bare boolean flag such as 'resume'
        close = difflib.get_close_matches(word, [*MODES, *PLUGIN_MODES], n=1, cutoff=0.6)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise UsageError(f"'{a}' is not a mode or key=value pair.{hint} Modes: {', '.join([*MODES, *PLUGIN_MODES])}.")


def entry() -> None:
    """Console-script wrapper: exit with :func:`main`'s status."""
    sys.exit(main())
