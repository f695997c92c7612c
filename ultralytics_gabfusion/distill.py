"""ADA: attention-distribution alignment between a frozen full-precision teacher and a quantized student.

This module implements method.md §3. A frozen full-precision (FP) teacher of the same architecture and the
quantized student see the same images; at a few supervision points (default: the Detect head inputs, i.e. the
neck outputs P3/P4/P5) each feature map X (B, C, H, W) is turned into a per-channel spatial attention
distribution, and the student's distribution R is pulled towards the teacher's P with KL(P || R) or a
Jensen-Shannon divergence.

Pipeline per supervision point::

    S = attention_scores(X, kind)          # pre-sigmoid score, (B, C, H, W)
    P = attention_distribution(S, T)       # sigmoid(S) / sum_hw sigmoid(S)   (paper, T=None)
                                           # softmax(S / T) over H x W        (sharper option, T > 0)
    d = divergence(P_teacher, R_student)   # (B, C): KL or JS summed over H x W
    l = reduce_point(d)                    # sum over channels, mean over batch -> scalar

    L_ADA = sum over supervision points of l;   loss = L_det + weight * L_ADA

Reduction (documented because the paper is silent): for every (image, channel) pair the divergence is summed
over the H x W positions (it is a divergence between two distributions over positions); it is then **summed over
channels**, **averaged over the batch**, and **summed over the supervision points**. With C = 128..512 channels per
point this keeps the term independent of the batch size but proportional to the network width.

Caveat (method.md §3): sigmoid of a non-negative score lies in [0.5, 1), so the paper's distributions are close to
uniform and L_ADA is tiny next to the detection loss. :class:`ADACriterion` records the ratio
weight * L_ADA / L_det (``pop_ratio``) so it can be logged, and ``temperature=T`` switches to the sharper
softmax(S / T) distribution.

Attention kinds:
    * ``simam`` (v1): E = (x - mu)^2 / (4 (var + 1e-4)) + 0.5 per channel (var over H x W with n = HW - 1).
    * ``qada`` (v2): S = log(1 + z^2) + gamma * log(1 + r^2) with z = |x - mu_c| / (sigma_c + k) and
      r = |x - Q(x)| / (s_c + k); r = 0 for the FP teacher. ``k`` is not given by the paper: we use
      ``QADA_K = 1e-4``, the same stabiliser SimAM uses, small next to typical feature deviations and quantizer
      steps (>= 1e-3) so it only guards against division by zero. Q(x) is evaluated under ``torch.no_grad`` with
      the quantizer temporarily in eval mode (so observers / running statistics are not updated twice) and is
      treated as a constant target: gradients reach the student feature through ``x`` in ``x - Q(x)`` but never
      the quantizer's parameters (the quantizer is trained by the detection loss through its own STE).

Safety: :class:`ADALoss` and :class:`ADACriterion` hold the teacher. They are plain Python objects (never
``nn.Module`` submodules), ``copy.deepcopy`` turns them into ``None`` (so an EMA copy of a model whose
``criterion`` is an :class:`ADACriterion` gets ``criterion=None``) and pickling them raises ``TypeError``, so the
teacher can never end up in an EMA copy or a checkpoint. The forward hooks they register deep-copy and pickle as an
inert no-op hook.

Numerics: every ADA computation runs in float32 with autocast disabled (AMP safe); the teacher forward itself
runs under the ambient autocast context, exactly like the student forward, and its features are cast to float32.

Examples:
    >>> teacher = load_teacher("runs/fp/weights/best.pt")
    >>> layers = default_layers(student)                          # e.g. [17, 20, 23] for yolov5s.yaml
    >>> check_teacher(student, teacher, layers)
    >>> ada = ADALoss(teacher, layers, attn="simam", div="kl", weight=0.01).attach(student)
    >>> student.criterion = ADACriterion(student.init_criterion(), ada, student)
    >>> loss, items = student.loss(batch)                         # items["ada_loss"] = weight * L_ADA
"""

from __future__ import annotations

import math
import operator
import os
import shutil
import tempfile
import weakref
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping

import torch
import torch.nn as nn

__all__ = [
    "ATTN_KINDS",
    "DIV_KINDS",
    "QADA_K",
    "SIMAM_LAMBDA",
    "ADACriterion",
    "ADALoss",
    "attention_distribution",
    "attention_scores",
    "check_teacher",
    "default_layers",
    "divergence",
    "is_quantized",
    "js_div",
    "kl_div",
    "load_teacher",
    "qada_attention",
    "qada_scores",
    "reduce_point",
    "simam_attention",
    "simam_scores",
]

ATTN_KINDS = ("simam", "qada")
DIV_KINDS = ("kl", "js")
SIMAM_LAMBDA = 1e-4  # SimAM's regulariser lambda in E = (x-mu)^2 / (4 (var + lambda)) + 0.5
QADA_K = 1e-4  # Q-ADA stabiliser k (paper gives no value; see module docstring)
_TINY = 1e-12  # floor inside logs / denominators of the divergences
_QUANT_ATTRS = ("weight_quant",)  # attributes that mark a fake-quantized module of this project
_QUANT_PREFIXES = ("Quant", "FakeQuant")  # class-name prefixes of fake-quantized modules (ModelOpt, torch.ao, ours)


# ----------------------------------------------------------------------------------------------------------------------
# Pure tensor functions
# ----------------------------------------------------------------------------------------------------------------------
@contextmanager
def _fp32(device_type: str) -> Iterator[None]:
    """Disable autocast locally: the ADA statistics (variances, logs of ratios) are unreliable in fp16."""
    with torch.autocast(device_type=device_type, enabled=False):
        yield


def _check_4d(x: torch.Tensor, name: str = "x") -> None:
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{name} must be a (B, C, H, W) feature map, got {shape}")


def _channel_stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-(sample, channel) mean and unbiased variance over H x W (n = HW - 1, floored at 1 for 1x1 maps)."""
    n = max(x.shape[2] * x.shape[3] - 1, 1)
    mu = x.mean(dim=(2, 3), keepdim=True)
    var = (x - mu).pow(2).sum(dim=(2, 3), keepdim=True) / n
    return mu, var


def simam_scores(x: torch.Tensor) -> torch.Tensor:
    """SimAM energy-based importance E (pre-sigmoid score), method.md §3 ``simam``.

    E = (x - mu)^2 / (4 (var + 1e-4)) + 0.5 with mu, var per (sample, channel) over H x W and n = HW - 1.

    Args:
        x (torch.Tensor): Feature map (B, C, H, W), any float dtype.

    Returns:
        (torch.Tensor): Float32 scores E >= 0.5, same shape as ``x``.

    Examples:
        >>> E = simam_scores(torch.randn(2, 8, 4, 4))
        >>> bool((E >= 0.5).all())
        True
    """
    _check_4d(x)
    with _fp32(x.device.type):
        x = x.float()
        mu, var = _channel_stats(x)
        return (x - mu).pow(2) / (4 * (var + SIMAM_LAMBDA)) + 0.5


def simam_attention(x: torch.Tensor) -> torch.Tensor:
    """SimAM attention A = sigmoid(E) (v1 ADA).

    Args:
        x (torch.Tensor): Feature map (B, C, H, W).

    Returns:
        (torch.Tensor): Float32 attention in [0.5, 1), same shape as ``x``.

    Examples:
        >>> A = simam_attention(torch.randn(1, 4, 8, 8))
        >>> bool(((A >= 0.5) & (A <= 1)).all())
        True
    """
    return torch.sigmoid(simam_scores(x))


def _quantizer_step(quantizer: Any, step: Any, like: torch.Tensor) -> torch.Tensor | None:
    """Return the quantizer step broadcastable to ``like`` (B, C, H, W), or None when none exists."""
    if step is None and quantizer is not None and callable(getattr(quantizer, "step_size", None)):
        with torch.no_grad():
            step = quantizer.step_size()
    if step is None:
        return None
    s = torch.as_tensor(step).detach().to(device=like.device, dtype=torch.float32)
    if s.numel() == 1:
        return s.reshape(1, 1, 1, 1)
    if s.numel() == like.shape[1]:
        return s.reshape(1, -1, 1, 1)  # per-channel step
    raise ValueError(f"quantizer step has {s.numel()} elements; expected 1 or {like.shape[1]} (one per channel)")


def _quantize_detached(quantizer: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """Evaluate Q(x) as a constant: no grad, and quantizer modules temporarily in eval mode.

    Eval mode keeps training-time side effects (observers, running ranges, lazy init) from firing a second time
    on the same batch; the flags are restored afterwards.
    """
    modules = list(quantizer.modules()) if callable(getattr(quantizer, "modules", None)) else []
    flags = [m.training for m in modules]
    for m in modules:
        m.training = False  # set the flag directly: an overridden .eval()/.train() could have side effects
    try:
        with torch.no_grad():
            q = quantizer(x)
    finally:
        for m, f in zip(modules, flags):
            m.training = f
    if not isinstance(q, torch.Tensor) or q.shape != x.shape:
        raise ValueError("the qada quantizer must return a tensor shaped like its input (fake-quantized x)")
    return q.detach().float()


def qada_scores(
    x: torch.Tensor,
    step: torch.Tensor | float | None = None,
    quantizer: Callable[[torch.Tensor], torch.Tensor] | None = None,
    k: float = QADA_K,
    gamma: float = 1.0,
) -> torch.Tensor:
    """Q-ADA score S (pre-sigmoid), method.md §3 ``qada``.

    z = |x - mu_c| / (sigma_c + k); r = |x - Q(x)| / (s_c + k); S = log(1 + z^2) + gamma * log(1 + r^2).
    mu_c, sigma_c per (sample, channel) over H x W (sigma from the n = HW - 1 variance). r = 0 when ``quantizer`` is
    None (FP teacher). s_c is ``step`` if given, else ``quantizer.step_size()`` if the quantizer has one (shape (1,)
    or (C,)), else sigma_c. Q(x) is a detached target (see module docstring), so the residual carries gradient to
    ``x`` only.

    Args:
        x (torch.Tensor): Feature map (B, C, H, W).
        step (torch.Tensor | float, optional): Quantizer step overriding ``quantizer.step_size()``.
        quantizer (callable, optional): Fake quantizer returning Q(x) shaped like ``x``.
        k (float): Stabiliser added to sigma_c and s_c (default ``QADA_K`` = 1e-4).
        gamma (float): Weight of the quantization-residual term.

    Returns:
        (torch.Tensor): Float32 scores S >= 0, same shape as ``x``.

    Examples:
        >>> x = torch.randn(1, 2, 4, 4)
        >>> fq = lambda t: torch.round(t / 0.5) * 0.5
        >>> S = qada_scores(x, step=0.5, quantizer=fq)
        >>> S.shape
        torch.Size([1, 2, 4, 4])
    """
    _check_4d(x)
    with _fp32(x.device.type):
        x = x.float()
        mu, var = _channel_stats(x)
        # clamp before sqrt: a constant channel (var = 0) would otherwise give an infinite sqrt gradient
        sigma = var.clamp_min(_TINY).sqrt()
        z = (x - mu).abs() / (sigma + k)
        s = torch.log1p(z * z)
        if quantizer is not None:
            q = _quantize_detached(quantizer, x)
            sc = _quantizer_step(quantizer, step, x)
            sc = sigma.detach() if sc is None else sc
            r = (x - q).abs() / (sc + k)
            s = s + gamma * torch.log1p(r * r)
        return s


def qada_attention(
    x: torch.Tensor,
    step: torch.Tensor | float | None = None,
    quantizer: Callable[[torch.Tensor], torch.Tensor] | None = None,
    k: float = QADA_K,
    gamma: float = 1.0,
) -> torch.Tensor:
    """Q-ADA attention A = sigmoid(S) (v2 ADA); arguments as in :func:`qada_scores`.

    Examples:
        >>> A = qada_attention(torch.randn(1, 4, 8, 8))  # FP teacher: r = 0
        >>> bool((A >= 0.5).all())
        True
    """
    return torch.sigmoid(qada_scores(x, step=step, quantizer=quantizer, k=k, gamma=gamma))


def _check_choice(value: str, allowed: tuple[str, ...], what: str) -> str:
    v = str(value).lower()
    if v not in allowed:
        raise ValueError(f"unknown {what} {value!r}; allowed values: {', '.join(allowed)}")
    return v


def attention_scores(
    x: torch.Tensor,
    kind: str = "simam",
    *,
    step: torch.Tensor | float | None = None,
    quantizer: Callable[[torch.Tensor], torch.Tensor] | None = None,
    k: float = QADA_K,
    gamma: float = 1.0,
) -> torch.Tensor:
    """Pre-sigmoid attention score S of ``kind`` ('simam' or 'qada').

    ``step``, ``quantizer``, ``k`` and ``gamma`` only matter for 'qada' (see :func:`qada_scores`).

    Examples:
        >>> attention_scores(torch.randn(1, 2, 4, 4), "simam").shape
        torch.Size([1, 2, 4, 4])
    """
    kind = _check_choice(kind, ATTN_KINDS, "attention kind")
    if kind == "simam":
        return simam_scores(x)
    return qada_scores(x, step=step, quantizer=quantizer, k=k, gamma=gamma)


def attention_distribution(scores: torch.Tensor, temperature: float | None = None) -> torch.Tensor:
    """Per-channel spatial distribution from pre-sigmoid scores S.

    ``temperature=None`` (paper): P = sigmoid(S) / sum_hw sigmoid(S). ``temperature=T > 0`` (sharper option):
    P = softmax(S / T) over H x W. Takes scores rather than attentions so both options share one input.

    Args:
        scores (torch.Tensor): Scores (B, C, H, W) from :func:`attention_scores`.
        temperature (float, optional): Softmax temperature; None for the paper's normalised sigmoid.

    Returns:
        (torch.Tensor): Float32 (B, C, H, W), non-negative, summing to 1 over H x W for every (b, c).

    Examples:
        >>> P = attention_distribution(simam_scores(torch.randn(2, 3, 5, 5)))
        >>> torch.allclose(P.sum(dim=(2, 3)), torch.ones(2, 3))
        True
    """
    _check_4d(scores, "scores")
    if temperature is not None and not (float(temperature) > 0 and math.isfinite(float(temperature))):
        raise ValueError(f"temperature must be a positive number or None, got {temperature!r}")
    with _fp32(scores.device.type):
        s = scores.float()
        b, c, h, w = s.shape
        if temperature is None:
            a = torch.sigmoid(s)
            return a / a.sum(dim=(2, 3), keepdim=True).clamp_min(_TINY)
        return torch.softmax(s.reshape(b, c, h * w) / float(temperature), dim=-1).reshape(b, c, h, w)


def kl_div(p: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """KL(P || R) summed over H x W for every (b, c).

    Both inputs are clamped at 1e-12 inside the logs, so zeros are safe; P == R gives exactly 0.

    Args:
        p (torch.Tensor): Target distribution (B, C, H, W) (teacher).
        r (torch.Tensor): Approximating distribution (B, C, H, W) (student).

    Returns:
        (torch.Tensor): Float32 (B, C).

    Examples:
        >>> p = attention_distribution(torch.randn(1, 2, 3, 3))
        >>> kl_div(p, p).abs().max().item()
        0.0
    """
    _check_4d(p, "p")
    _check_4d(r, "r")
    with _fp32(p.device.type):
        p, r = p.float(), r.float()
        return (p * (p.clamp_min(_TINY).log() - r.clamp_min(_TINY).log())).sum(dim=(2, 3))


def js_div(p: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """Jensen-Shannon divergence 0.5 KL(P || M) + 0.5 KL(R || M), M = (P + R) / 2, summed over H x W per (b, c).

    Examples:
        >>> p = attention_distribution(torch.randn(1, 2, 3, 3))
        >>> js_div(p, p).abs().max().item()
        0.0
    """
    _check_4d(p, "p")
    _check_4d(r, "r")
    with _fp32(p.device.type):
        p, r = p.float(), r.float()
        m = 0.5 * (p + r)
        return 0.5 * kl_div(p, m) + 0.5 * kl_div(r, m)


def divergence(p: torch.Tensor, r: torch.Tensor, kind: str = "kl") -> torch.Tensor:
    """Dispatch to :func:`kl_div` ('kl') or :func:`js_div` ('js'); returns (B, C).

    Examples:
        >>> p = attention_distribution(torch.zeros(1, 1, 2, 2))
        >>> divergence(p, p, "js").shape
        torch.Size([1, 1])
    """
    kind = _check_choice(kind, DIV_KINDS, "divergence")
    return kl_div(p, r) if kind == "kl" else js_div(p, r)


def reduce_point(d: torch.Tensor) -> torch.Tensor:
    """Reduce one supervision point's (B, C) divergences: sum over channels, mean over batch -> scalar.

    :class:`ADALoss` then sums these scalars over the supervision points.

    Examples:
        >>> reduce_point(torch.tensor([[1.0, 2.0], [3.0, 4.0]])).item()
        5.0
    """
    if d.dim() != 2:
        raise ValueError(f"expected (B, C) divergences, got shape {tuple(d.shape)}")
    return d.sum(dim=1).mean(dim=0)


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


def _check_indices(layers: Iterable[int], n: int, who: str) -> list[int]:
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


def default_layers(model: nn.Module) -> list[int]:
    """Supervision points used by default: the Detect head inputs ``model.model[-1].f``.

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


def is_quantized(model: nn.Module) -> bool:
    """True if ``model`` contains fake-quantized modules (attribute ``weight_quant`` or class 'Quant*'/'FakeQuant*').

    Examples:
        >>> is_quantized(nn.Conv2d(3, 8, 3))
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
    from ultralytics.utils.checks import check_yolov5u_filename

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
    from ultralytics.nn.tasks import load_checkpoint

    try:
        with _loadable_path(path) as p:
            model, ckpt = load_checkpoint(p, device="cpu")
    except Exception as e:  # Ultralytics reports damaged files as TypeError/RuntimeError/...: one user-facing error
        raise ValueError(
            f"{path} is not a readable Ultralytics checkpoint ({type(e).__name__}: {e}). "
            f"Pass teacher= a full-precision checkpoint saved by Ultralytics, or set ada=0"
        ) from e
    if (isinstance(ckpt, dict) and ckpt.get("modelopt")) or is_quantized(model):
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
        ValueError: A layer index out of range, a layer output that is not a (B, C, H, W) tensor, or
            channel / spatial sizes that differ.

    Examples:
        >>> check_teacher(student, teacher, [17, 20, 23])
        {17: (128, 8, 8), 20: (256, 4, 4), 23: (512, 2, 2)}
    """
    s, t = _unwrap(student), _unwrap(teacher)
    layers = list(layers)
    if not layers:
        raise ValueError("no supervision layers given")
    _check_indices(layers, len(_layers_of(s, "student")), "student")
    layers = _check_indices(layers, len(_layers_of(t, "teacher")), "teacher")
    strides = [float(torch.as_tensor(getattr(m, "stride", 32.0)).max()) for m in (s, t)]
    g = int(max(max(strides), 1))
    size = int(math.ceil(max(int(imgsz), g) / g) * g)
    feats = {}
    with torch.no_grad(), _eval_mode(s, t):
        for name, m in (("student", s), ("teacher", t)):
            dev, dt = _param_like(m)
            feats[name] = _capture(m, layers, torch.zeros(1, 3, size, size, device=dev, dtype=dt))
    hint = (
        "Pass teacher= a full-precision checkpoint of the same architecture (e.g. the FP model QAT started from) "
        "or set ada=0"
    )
    shapes = {}
    for j in layers:
        ft, fs = feats["teacher"].get(j), feats["student"].get(j)
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


# ----------------------------------------------------------------------------------------------------------------------
# Hooks
# ----------------------------------------------------------------------------------------------------------------------
def _inert_hook(module: nn.Module, inputs: Any, output: Any) -> None:
    """Stand-in for a capture hook in a deep copy or unpickled model: does nothing."""
    return None


def _make_inert_hook() -> Callable[..., None]:
    return _inert_hook


class _CaptureHook:
    """Forward hook storing a layer output in its ADALoss (held by weak reference, never copied or pickled)."""

    __slots__ = ("owner", "key", "layer")

    def __init__(self, owner: "ADALoss", key: int, layer: int) -> None:
        self.owner = weakref.ref(owner)
        self.key = key
        self.layer = layer

    def __call__(self, module: nn.Module, inputs: Any, output: Any) -> None:
        owner = self.owner()
        if owner is not None:
            owner._feats.setdefault(self.key, {})[self.layer] = output

    def __deepcopy__(self, memo: dict) -> Callable[..., None]:
        return _inert_hook  # an EMA copy must not write into the original's feature slot

    def __reduce__(self) -> tuple:
        return _make_inert_hook, ()


# ----------------------------------------------------------------------------------------------------------------------
# Loss objects
# ----------------------------------------------------------------------------------------------------------------------
def _forward_layers(model: nn.Module, x: torch.Tensor, layers: list[int]) -> dict[int, torch.Tensor]:
    """Ultralytics ``_predict_once`` truncated after the last supervision layer (the teacher's head is skipped)."""
    want, last = set(layers), max(layers)
    save = set(getattr(model, "save", ()))
    y: list[Any] = []
    out: dict[int, torch.Tensor] = {}
    for i, m in enumerate(model.model):
        f = getattr(m, "f", -1)
        if f != -1:
            x = y[f] if isinstance(f, int) else [x if j == -1 else y[j] for j in f]
        x = m(x)
        y.append(x if getattr(m, "i", i) in save else None)
        if i in want:
            out[i] = x
        if i >= last:
            break
    return out


class ADALoss:
    """ADA distillation term between a frozen FP teacher and attached students.

    A plain object (not an ``nn.Module``) so the teacher is never registered as a submodule; deep copies are
    ``None`` and pickling raises ``TypeError``.

    Args:
        teacher (nn.Module): FP teacher of the same architecture (frozen here: eval, requires_grad False).
        layers (Iterable[int]): Supervision layer indices (same in teacher and student).
        attn (str): 'simam' (v1) or 'qada' (v2).
        div (str): 'kl' (KL(P || R), teacher P) or 'js'.
        weight (float): Loss weight w (paper 0.01).
        temperature (float, optional): None for sigmoid/sum distributions, T > 0 for softmax(S / T).
        quantizers (Mapping[int, callable], optional): {layer: quantizer or None} for the student's qada residual
            term (ignored by simam; the teacher always has r = 0).
        gamma (float): qada residual weight.
        k (float): qada stabiliser.

    Examples:
        >>> ada = ADALoss(teacher, [17, 20, 23], attn="qada", div="js", quantizers={17: q17}).attach(student)
        >>> _ = student(img)
        >>> weighted, raw = ada(student, img)
    """

    def __init__(
        self,
        teacher: nn.Module,
        layers: Iterable[int],
        attn: str = "simam",
        div: str = "kl",
        weight: float = 0.01,
        temperature: float | None = None,
        quantizers: Mapping[int, Any] | None = None,
        gamma: float = 1.0,
        k: float = QADA_K,
    ) -> None:
        self.attn = _check_choice(attn, ATTN_KINDS, "attention kind (attn)")
        self.div = _check_choice(div, DIV_KINDS, "divergence (div)")
        if not (float(weight) >= 0 and math.isfinite(float(weight))):
            raise ValueError(f"ADA weight must be a finite number >= 0, got {weight!r}")
        if temperature is not None and not (float(temperature) > 0 and math.isfinite(float(temperature))):
            raise ValueError(f"temperature must be a positive number or None, got {temperature!r}")
        teacher = _unwrap(teacher)
        self.layers = _check_indices(list(dict.fromkeys(layers)), len(_layers_of(teacher, "teacher")), "teacher")
        if not self.layers:
            raise ValueError("no supervision layers given")
        if is_quantized(teacher):
            raise ValueError("teacher must be full precision: it contains fake-quantized modules")
        self.teacher = teacher.eval().requires_grad_(False)
        self.weight = float(weight)
        self.temperature = None if temperature is None else float(temperature)
        self.quantizers = {int(j): q for j, q in (quantizers or {}).items()}
        self.gamma = float(gamma)
        self.k = float(k)
        self._feats: dict[int, dict[int, Any]] = {}  # id(student) -> {layer: output of the last forward}
        self._handles: dict[int, tuple[weakref.ref, list]] = {}  # id(student) -> (model ref, hook handles)

    # -- pickling / copying guards --------------------------------------------------------------------------------
    def __deepcopy__(self, memo: dict) -> None:
        return None

    def __reduce__(self) -> tuple:
        raise TypeError("ADALoss holds the teacher and must never be pickled into a checkpoint")

    def __getstate__(self) -> dict:
        raise TypeError("ADALoss holds the teacher and must never be pickled into a checkpoint")

    # -- hooks ----------------------------------------------------------------------------------------------------
    def attach(self, student: nn.Module) -> "ADALoss":
        """Register capture hooks on ``student.model[j]`` for every supervision layer; returns self.

        Several students (training model, EMA model) can be attached at once; their features are kept apart by
        ``id(model)``. Attaching the same model twice is a no-op.
        """
        m = _unwrap(student)
        key = id(m)
        if key in self._handles:
            ref, _ = self._handles[key]
            if ref() is m:
                return self
            self._drop(key)  # stale entry of a garbage-collected model that reused the id
        seq = _layers_of(m, "student")
        _check_indices(self.layers, len(seq), "student")
        handles = [seq[j].register_forward_hook(_CaptureHook(self, key, j)) for j in self.layers]
        self._handles[key] = (weakref.ref(m), handles)
        return self

    def _drop(self, key: int) -> None:
        _, handles = self._handles.pop(key, (None, []))
        for h in handles:
            h.remove()
        self._feats.pop(key, None)

    def detach(self, student: nn.Module | None = None) -> "ADALoss":
        """Remove the hooks of ``student`` (or of every attached student when None) and drop stored features."""
        keys = list(self._handles) if student is None else [id(_unwrap(student))]
        for key in keys:
            self._drop(key)
        return self

    def clear(self, student: nn.Module | None = None) -> None:
        """Drop captured student features (all, or one student's) without removing hooks; frees their memory."""
        if student is None:
            self._feats.clear()
        else:
            self._feats.pop(id(_unwrap(student)), None)

    def is_attached(self, student: nn.Module) -> bool:
        """Whether capture hooks are registered on ``student``."""
        m = _unwrap(student)
        entry = self._handles.get(id(m))
        return entry is not None and entry[0]() is m

    # -- loss -----------------------------------------------------------------------------------------------------
    def teacher_features(self, img: torch.Tensor) -> dict[int, torch.Tensor]:
        """Teacher features at the supervision layers for ``img`` (no grad, eval mode, teacher dtype).

        The teacher is moved to ``img``'s device on first use (the trainer only needs to build it on the CPU).
        """
        t = self.teacher
        dev, dt = _param_like(t)
        if dev != img.device:
            t.to(img.device)
        t.eval()
        # inference mode: no autograd bookkeeping or version counters for the teacher's activations. Its outputs are
        # only read by the ADA arithmetic (never saved for backward), which inference tensors allow outside the mode.
        with torch.inference_mode():
            return _forward_layers(t, img.to(dtype=dt), self.layers)

    def _match_memory_format(self, student: nn.Module) -> None:
        """Give the teacher the student's memory format (channels_last when the trainer set it, on CUDA)."""
        w = next((p for p in student.parameters() if p.dim() == 4), None)
        if w is None:
            return
        fmt = torch.channels_last if not w.is_contiguous() and w.is_contiguous(memory_format=torch.channels_last) \
            else torch.contiguous_format
        if getattr(self, "_teacher_format", None) != fmt:
            self.teacher.to(memory_format=fmt)
            self._teacher_format = fmt

    def _scores(self, x: torch.Tensor, quantizer: Any) -> torch.Tensor:
        if self.attn == "simam":
            return simam_scores(x)
        return qada_scores(x, quantizer=quantizer, k=self.k, gamma=self.gamma)

    def __call__(self, student: nn.Module, img: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """ADA loss for the student's last forward on ``img``.

        The student's captured features are consumed (so a stale forward can never be reused and the memory is
        released after the backward pass).

        Args:
            student (nn.Module): An attached student whose forward on ``img`` has just run.
            img (torch.Tensor): The input batch (B, 3, H, W) that forward saw.

        Returns:
            (tuple[torch.Tensor, torch.Tensor]): (weight * L, L), float32 scalars; L carries the student's graph.

        Raises:
            RuntimeError: Hooks not attached, student forward not run, or feature shapes that do not match.
        """
        m = _unwrap(student)
        key = id(m)
        if not self.is_attached(m):
            raise RuntimeError("ADA hooks are not attached to this model: call ADALoss.attach(model) first")
        feats = self._feats.pop(key, None)
        missing = [j for j in self.layers if feats is None or j not in feats]
        if missing:
            raise RuntimeError(
                f"no student features captured at layers {missing}: run the student forward on this batch "
                f"before computing the ADA loss (features are consumed by each ADA call)"
            )
        self._match_memory_format(m)
        tfeats = self.teacher_features(img)
        with _fp32(img.device.type):
            total = None
            for j in self.layers:
                fs, ft = feats[j], tfeats[j]
                if not isinstance(fs, torch.Tensor) or fs.dim() != 4:
                    raise RuntimeError(f"student layer {j} output is not a (B, C, H, W) feature map")
                if fs.shape != ft.shape:
                    raise RuntimeError(
                        f"ADA feature shapes differ at layer {j}: teacher {tuple(ft.shape)}, student "
                        f"{tuple(fs.shape)} (was the student forward run on this img? is the teacher the right model?)"
                    )
                fs = fs.float()
                ft = ft.to(device=fs.device, dtype=torch.float32)
                p = attention_distribution(self._scores(ft, None), self.temperature)
                r = attention_distribution(self._scores(fs, self.quantizers.get(j)), self.temperature)
                d = reduce_point(divergence(p, r, self.div))
                total = d if total is None else total + d
        return self.weight * total, total

    def __repr__(self) -> str:
        return (
            f"ADALoss(layers={self.layers}, attn={self.attn!r}, div={self.div!r}, weight={self.weight}, "
            f"temperature={self.temperature}, gamma={self.gamma}, k={self.k}, attached={len(self._handles)})"
        )


class ADACriterion:
    """Ultralytics detection criterion plus the ADA term.

    ``base(preds, batch)`` returns ``(loss_vec * batch_size, items)`` with ``loss_vec`` = (box, cls, dfl) and
    ``items`` = {"box_loss", "cls_loss", "dfl_loss"} (``v8DetectionLoss`` in ultralytics 8.4.190). This wrapper
    returns ``cat(loss_vec * batch_size, [batch_size * weight * L_ADA])`` (so ``loss.sum()`` = det + bs * w * L)
    and ``items`` with an extra detached ``"ada_loss"`` = w * L. Unknown attributes are read from ``base``.

    Args:
        base (callable): The detection criterion (e.g. ``model.init_criterion()``).
        ada (ADALoss): The ADA loss, attached to ``student``.
        student (nn.Module): The model whose forward produced ``preds``.

    Examples:
        >>> model.criterion = ADACriterion(model.init_criterion(), ada.attach(model), model)
        >>> loss, items = model.loss(batch)
        >>> trainer_log["ada_ratio"] = model.criterion.pop_ratio()
    """

    def __init__(self, base: Callable, ada: ADALoss, student: nn.Module) -> None:
        self.base = base
        self.ada = ada
        self.student = _unwrap(student)
        self._ratio_sum: torch.Tensor | None = None
        self._ratio_n = 0
        self.weighted_sum, self.calls = 0.0, 0  # unrounded mean of the weighted term (Ultralytics logs 5 decimals)

    def __deepcopy__(self, memo: dict) -> None:
        return None

    def __reduce__(self) -> tuple:
        raise TypeError("ADACriterion holds the ADA teacher and must never be pickled into a checkpoint")

    def __getstate__(self) -> dict:
        raise TypeError("ADACriterion holds the ADA teacher and must never be pickled into a checkpoint")

    def __getattr__(self, name: str) -> Any:
        # only reached for attributes not found normally; guard 'base' itself (e.g. during a failed unpickle)
        if name == "base" or name.startswith("__"):
            raise AttributeError(name)
        return getattr(self.base, name)

    def update(self) -> None:
        """Pass-through to ``base.update()`` when the base criterion has one (e.g. E2E loss schedules)."""
        if hasattr(self.base, "update"):
            self.base.update()

    def __call__(self, preds: Any, batch: dict[str, Any]) -> tuple[torch.Tensor, Any]:
        """Detection loss with the ADA term appended; see the class docstring for the format."""
        loss, items = self.base(preds, batch)
        img = batch["img"]
        bs = img.shape[0]
        if self.ada.weight == 0:
            self.ada.clear(self.student)  # consume the features like a real call would, skip the teacher forward
            weighted = torch.zeros((), device=loss.device, dtype=torch.float32)
        else:
            weighted, _ = self.ada(self.student, img)
        ada_total = (weighted * bs).to(device=loss.device, dtype=loss.dtype).reshape(1)
        det = loss.reshape(-1)
        ratio = ada_total.detach()[0] / det.detach().sum().abs().clamp_min(_TINY)
        self._ratio_sum = ratio if self._ratio_sum is None else self._ratio_sum + ratio  # no host sync per step
        self._ratio_n += 1
        if not self.student.training:  # validation: keep the exact mean (one host sync per val batch only)
            self.weighted_sum += float(weighted)
            self.calls += 1
        if isinstance(items, dict):
            items = {**items, "ada_loss": weighted.detach().to(loss.device)}
        elif isinstance(items, torch.Tensor):
            items = torch.cat((items.reshape(-1), weighted.detach().to(items).reshape(1)))
        return torch.cat((det, ada_total)), items

    def pop_ratio(self) -> float | None:
        """Mean of weighted ADA / detection loss over the calls since the last pop (None if none); resets it."""
        if self._ratio_n == 0 or self._ratio_sum is None:
            return None
        value = float(self._ratio_sum) / self._ratio_n
        self._ratio_sum, self._ratio_n = None, 0
        return value

    def __repr__(self) -> str:
        return f"ADACriterion(base={type(self.base).__name__}, ada={self.ada!r})"
