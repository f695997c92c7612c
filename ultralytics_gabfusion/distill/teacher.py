"""Teacher side of ADA: loading the frozen FP teacher and checking that it matches the quantized student.

The teacher must be a full-precision checkpoint of the student's architecture and task (normally the FP model QAT
started from): :func:`load_teacher` refuses quantized models (:func:`has_quant_modules`) and :func:`check_teacher`
refuses a teacher of another task (:func:`head_task`: a segmentation teacher for a pose student, ...) and runs one
dummy forward through both models to compare their features at the supervision points (:func:`default_layers`: the
inputs of the Detect, Segment or Pose head). The small model helpers here (unwrapping DDP / ``torch.compile``, layer lists, index checks)
are shared with the loss.
"""

from __future__ import annotations

import math
import operator
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable, Iterator

import torch
import torch.nn as nn
from ultralytics.nn.modules.head import OBB, Classify, Detect, Pose, Segment
from ultralytics.nn.tasks import load_checkpoint
from ultralytics.utils.checks import check_yolov5u_filename

from ..settings import one_line

__all__ = ["check_layer_indices", "check_teacher", "default_layers", "has_quant_modules", "head_task", "load_teacher"]

_HEAD_TASKS = ((Segment, "segment"), (Pose, "pose"), (OBB, "obb"), (Detect, "detect"), (Classify, "classify"))

_QUANT_ATTRS = ("weight_quant",)  # attributes that mark a fake-quantized module of this project
_QUANT_PREFIXES = ("Quant", "FakeQuant")  # class-name prefixes of fake-quantized modules (ModelOpt, torch.ao, ours)


# ----------------------------------------------------------------------------------------------------------------------
# Model helpers
# ----------------------------------------------------------------------------------------------------------------------
def _unwrap(model: nn.Module) -> nn.Module:
    """Strip DataParallel / DistributedDataParallel / torch.compile wrappers."""
    while True:
        if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        else:
            return model


def _layers_of(model: nn.Module, who: str) -> nn.Module:
    seq = getattr(model, "model", None)
    if not isinstance(seq, (nn.Sequential, nn.ModuleList)):
        raise TypeError(f"the {who} must be an Ultralytics model with a .model layer list, got {type(model).__name__}")
    return seq


def check_layer_indices(layers: Iterable[int], n: int, who: str) -> list[int]:
    """``layers`` as plain ints in ``0..n-1``; ValueError naming ``who`` (student, teacher, model) otherwise."""
    out = []
    for j in layers:
        try:
            if isinstance(j, bool):
                raise TypeError
            j = operator.index(j)  # int, numpy integer, 0-d integer tensor
        except TypeError:
            raise ValueError(f"layer indices must be integers, got {j!r}") from None
        if not 0 <= j < n:
            raise ValueError(f"layer index {j} is out of range: the {who} has {n} layers (0..{n - 1})")
        out.append(j)
    return out


def head_task(model: nn.Module) -> str | None:
    """The task of an Ultralytics model from the type of its last layer (subclasses first: Segment before Detect).

    Returns None for a model without a layer list or with a head of another kind.

    Examples:
        >>> head_task(SegmentationModel("yolo11n-seg.yaml", nc=2, verbose=False))
        'segment'
    """
    seq = getattr(_unwrap(model), "model", None)
    if not isinstance(seq, (nn.Sequential, nn.ModuleList)) or not len(seq):
        return None
    return next((task for cls, task in _HEAD_TASKS if isinstance(seq[-1], cls)), None)


def default_layers(model: nn.Module) -> list[int]:
    """Supervision points used by default: the head inputs ``model.model[-1].f`` (Detect, Segment or Pose).

    Examples:
        >>> default_layers(DetectionModel("yolov5s.yaml", nc=4, verbose=False))
        [17, 20, 23]
    """
    head = _layers_of(_unwrap(model), "model")[-1]
    f = getattr(head, "f", None)
    if f is None:
        raise ValueError(f"the last layer ({type(head).__name__}) has no .f input list; pass layers explicitly")
    f = [f] if isinstance(f, int) else list(f)
    head_index = len(_layers_of(_unwrap(model), "model")) - 1
    return [head_index + j if j < 0 else j for j in f]  # -1 means "the layer before the head": make it absolute


def has_quant_modules(model: nn.Module) -> bool:
    """True if ``model`` contains fake-quantized modules (attribute ``weight_quant`` or class 'Quant*'/'FakeQuant*').

    Examples:
        >>> has_quant_modules(nn.Conv2d(3, 8, 3))
        False
    """
    for m in model.modules():
        if type(m).__name__.startswith(_QUANT_PREFIXES) or any(hasattr(m, a) for a in _QUANT_ATTRS):
            return True
    return False


@contextmanager
def _loadable_path(path: Path) -> Iterator[str]:
    """Yield a path that Ultralytics loads as-is.

    ``attempt_download_asset`` renames 'yolov5s.pt' to 'yolov5su.pt' (when the path contains no 'u') and would try
    to download the renamed file; a neutral link name in a temp dir avoids that rewrite.
    """
    if check_yolov5u_filename(str(path), verbose=False) == str(path):
        yield str(path)
        return
    with tempfile.TemporaryDirectory(prefix="gabf_teacher_") as d:
        link = Path(d) / "teacher.pt"
        try:
            os.symlink(path.resolve(), link)
        except OSError:
            shutil.copyfile(path, link)  # file systems without symlinks
        yield str(link)


def load_teacher(path: str | Path, device: str | torch.device = "cpu") -> nn.Module:
    """Load a frozen full-precision teacher from an Ultralytics checkpoint.

    Uses ``ultralytics.nn.tasks.load_checkpoint`` (EMA weights if present, else model) on the CPU, then moves the
    model to ``device`` (so a bad device is not misreported as a bad file). Never downloads anything.

    Args:
        path (str | Path): Local ``*.pt`` Ultralytics checkpoint of the FP model.
        device (str | torch.device): Device for the teacher.

    Returns:
        (nn.Module): The teacher, float32, eval mode, ``requires_grad=False`` everywhere.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: Not a readable Ultralytics checkpoint, or the model is itself quantized.

    Examples:
        >>> teacher = load_teacher("runs/fp/weights/best.pt", device="cuda:0")
    """
    if path is None or not str(path) or not Path(path).is_file():
        raise FileNotFoundError(f"teacher checkpoint {path} not found: pass teacher=path/to/fp.pt or set ada=0")
    path = Path(path)
    if path.suffix.lower() != ".pt":
        raise ValueError(f"{path} is not a readable Ultralytics checkpoint: expected a *.pt file")
    try:
        with _loadable_path(path) as p:
            model, ckpt = load_checkpoint(p, device="cpu")
    except Exception as e:  # Ultralytics reports damaged files as TypeError/RuntimeError/...: one user-facing error
        raise ValueError(
            f"{path} is not a readable Ultralytics checkpoint ({one_line(e)}). "
            f"Pass teacher= a full-precision checkpoint saved by Ultralytics, or set ada=0"
        ) from e
    if (isinstance(ckpt, dict) and ckpt.get("modelopt")) or has_quant_modules(model):
        raise ValueError(
            f"teacher must be full precision: {path} contains a quantized model. Pass teacher= the FP checkpoint "
            f"the QAT run started from, or set ada=0"
        )
    model.pt_path = str(path)
    return model.float().to(device).eval().requires_grad_(False)


@contextmanager
def _eval_mode(*models: nn.Module) -> Iterator[None]:
    """Put models in eval mode and restore every module's own training flag afterwards (mixed states survive)."""
    saved = [(m, m.training) for model in models for m in model.modules()]
    for model in models:
        model.eval()
    try:
        yield
    finally:
        for m, f in saved:
            m.training = f


def _capture(model: nn.Module, layers: list[int], x: torch.Tensor) -> dict[int, Any]:
    """Full forward of ``model`` on ``x`` recording the outputs of ``layers`` through temporary hooks."""
    out: dict[int, Any] = {}
    seq = _layers_of(model, "model")
    handles = [
        seq[j].register_forward_hook(lambda _m, _i, o, j=j: out.__setitem__(j, o)) for j in layers
    ]
    try:
        model(x)
    finally:
        for h in handles:
            h.remove()
    return out


def _param_like(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    p = next(model.parameters(), None)
    if p is None:
        return torch.device("cpu"), torch.float32
    return p.device, (p.dtype if p.dtype.is_floating_point else torch.float32)


def check_teacher(
    student: nn.Module, teacher: nn.Module, layers: Iterable[int], imgsz: int = 64
) -> dict[int, tuple[int, int, int]]:
    """Check that the teacher produces features shaped like the student's at every supervision point.

    Runs one dummy forward (1 x 3 x imgsz x imgsz, rounded up to a multiple of the largest stride) through both
    models under ``torch.no_grad`` in eval mode, restoring every module's train/eval flag afterwards. Call it after
    any quantizer calibration: a student quantizer that initialises itself lazily would do so on this dummy input.

    Args:
        student (nn.Module): The (quantized) student model.
        teacher (nn.Module): The FP teacher.
        layers (Iterable[int]): Supervision layer indices.
        imgsz (int): Dummy image size.

    Returns:
        (dict[int, tuple[int, int, int]]): {layer: (C, H, W)} of the matching features.

    Raises:
        ValueError: A teacher of another task (:func:`head_task`), a layer index out of range, a layer output that
            is not a (B, C, H, W) tensor, or channel / spatial sizes that differ.

    Examples:
        >>> check_teacher(student, teacher, [17, 20, 23])
        {17: (128, 8, 8), 20: (256, 4, 4), 23: (512, 2, 2)}
    """
    s, t = _unwrap(student), _unwrap(teacher)
    s_task, t_task = head_task(s), head_task(t)
    if s_task and t_task and s_task != t_task:
        name = getattr(t, "pt_path", None)
        raise ValueError(
            f"teacher{f' {name}' if name else ''} is a {t_task} model, but the student is a {s_task} model: ADA's "
            f"teacher must be the full-precision model of the same task (normally the FP checkpoint QAT starts from). "
            f"Pass teacher= a {s_task} checkpoint or set ada=0"
        )
    layers = list(layers)
    if not layers:
        raise ValueError("no supervision layers given")
    check_layer_indices(layers, len(_layers_of(s, "student")), "student")
    layers = check_layer_indices(layers, len(_layers_of(t, "teacher")), "teacher")
    strides = [float(torch.as_tensor(getattr(m, "stride", 32.0)).max()) for m in (s, t)]
    g = int(max(max(strides), 1))
    size = int(math.ceil(max(int(imgsz), g) / g) * g)
    feats = {}
    with torch.no_grad(), _eval_mode(s, t):
        for name, m in (("student", s), ("teacher", t)):
            dev, dt = _param_like(m)
            feats[name] = _capture(m, layers, torch.zeros(1, 3, size, size, device=dev, dtype=dt))
    return _compare_features(feats["teacher"], feats["student"], layers, size)


def _compare_features(
    tfeats: dict[int, Any], sfeats: dict[int, Any], layers: list[int], size: int
) -> dict[int, tuple[int, int, int]]:
    """{layer: (C, H, W)} of teacher and student features that match; ValueError at the first that does not."""
    hint = (
        "Pass teacher= a full-precision checkpoint of the same architecture (e.g. the FP model QAT started from) "
        "or set ada=0"
    )
    shapes = {}
    for j in layers:
        ft, fs = tfeats.get(j), sfeats.get(j)
        for name, f in (("teacher", ft), ("student", fs)):
            if not isinstance(f, torch.Tensor) or f.dim() != 4:
                raise ValueError(
                    f"layer {j} of the {name} does not output a (B, C, H, W) feature map "
                    f"(got {type(f).__name__}); choose other supervision layers. {hint}"
                )
        if ft.shape[1] != fs.shape[1]:
            raise ValueError(
                f"teacher does not match the student at layer {j}: teacher has {ft.shape[1]} channels, "
                f"student {fs.shape[1]}. {hint}"
            )
        if ft.shape[2:] != fs.shape[2:]:
            raise ValueError(
                f"teacher does not match the student at layer {j}: teacher feature is "
                f"{tuple(ft.shape[2:])} (H, W), student {tuple(fs.shape[2:])} at a {size}px input. {hint}"
            )
        shapes[j] = tuple(int(v) for v in fs.shape[1:])
    return shapes
