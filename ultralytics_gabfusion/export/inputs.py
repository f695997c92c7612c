"""Inputs of the Q/DQ export: the quantized model (module or checkpoint) and the images of the parity check."""

from __future__ import annotations

import warnings
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn as nn
from ultralytics.data.augment import LetterBox
from ultralytics.data.utils import check_det_dataset
from ultralytics.nn.tasks import load_checkpoint
from ultralytics.utils.checks import check_imgsz

from ..quant.qconv import is_quantized
from ..settings import one_line

_IMG_SUFFIXES = {".bmp", ".dng", ".jpeg", ".jpg", ".mpo", ".png", ".tif", ".tiff", ".webp", ".pfm", ".heic"}


def load_quantized_model(model, require_quantized: bool = True) -> nn.Module:
    """Return an ``nn.Module`` from a model or an Ultralytics checkpoint path (float32, eval mode).

    Args:
        model (nn.Module | str | Path): A model, or a ``.pt`` checkpoint written by Ultralytics/the GAB trainer.
        require_quantized (bool): Raise if the model holds no quantized layers.

    Returns:
        (nn.Module): The model (the caller's object itself when a module was passed).

    Raises:
        FileNotFoundError: The path does not exist.
        ValueError: Not a readable Ultralytics checkpoint, or (``require_quantized``) a full-precision model.

    Examples:
        >>> load_quantized_model("yolov5s.yaml")  # doctest: +SKIP
        Traceback (most recent call last):
        ...
        ValueError: yolov5s.yaml is not a .pt checkpoint ...
    """
    if isinstance(model, (str, Path)):
        path = Path(model)
        if path.suffix != ".pt":
            raise ValueError(f"{model} is not a .pt checkpoint; pass a quantized checkpoint written by the GAB trainer.")
        if not path.is_file():
            raise FileNotFoundError(f"{model}: checkpoint not found (no weights are downloaded by the Q/DQ exporter).")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                model, _ = load_checkpoint(str(path))
        except Exception as e:  # torch/pickle raise many types on a corrupt file: report one clear error
            raise ValueError(f"{path} is not a readable Ultralytics checkpoint ({one_line(e)}).") from None
    if not isinstance(model, nn.Module):
        raise ValueError(f"expected a model or a .pt checkpoint path, got {type(model).__name__}.")
    if require_quantized and not is_quantized(model):
        raise ValueError(
            f"{type(model).__name__} has no quantized layers (no QuantConv2d with a weight or activation quantizer). "
            "The Q/DQ exporter is for QAT models; use YOLO(model).export(format='onnx') for FP models."
        )
    return model


def _image_files(source) -> list[Path]:
    """Image files from a directory, an image, a list, a ``.txt`` list or a data YAML (its ``val`` split)."""
    if isinstance(source, (list, tuple)):
        out = []
        for s in source:
            out += _image_files(s)
        return out
    p = Path(source)
    if p.suffix in (".yaml", ".yml"):
        data = check_det_dataset(str(p), autodownload=False)
        val = data.get("val") or data.get("test") or data.get("train")
        return _image_files(val)
    if p.is_dir():
        return sorted(f for f in p.rglob("*") if f.suffix.lower() in _IMG_SUFFIXES)
    if p.suffix == ".txt" and p.is_file():
        lines = [ln.strip() for ln in p.read_text().splitlines() if ln.strip()]
        return [Path(ln) if Path(ln).is_absolute() else (p.parent / ln).resolve() for ln in lines]
    if p.is_file() and p.suffix.lower() in _IMG_SUFFIXES:
        return [p]
    raise ValueError(f"no images found at {source}: pass image files, a directory, a .txt list or a data YAML.")


def load_images(source, imgsz=640, n: int = 8) -> torch.Tensor:
    """Load up to ``n`` images as Ultralytics predicts them: letterbox to ``imgsz`` (pad 114), RGB, CHW, /255.

    Args:
        source: Image path(s), a directory, a ``.txt`` list or a data YAML (its ``val`` images), or a float tensor
            ``(N, 3, H, W)`` in [0, 1] (returned as is).
        imgsz (int | tuple[int, int]): Target size (square int or (h, w)).
        n (int): Maximum number of images (the first ``n`` in sorted order).

    Returns:
        (torch.Tensor): float32 ``(N, 3, h, w)`` in [0, 1].

    Examples:
        >>> x = load_images("datasets/synth/data.yaml", imgsz=64, n=2)  # doctest: +SKIP
        >>> x.shape  # doctest: +SKIP
        torch.Size([2, 3, 64, 64])
    """
    if torch.is_tensor(source):
        return source.float()
    h, w = (imgsz, imgsz) if isinstance(imgsz, int) else tuple(imgsz)
    files = _image_files(source)[:n]
    if not files:
        raise ValueError(f"no images found at {source}.")
    lb = LetterBox(new_shape=(h, w), auto=False, stride=32)
    out = []
    for f in files:
        im = cv2.imread(str(f))
        if im is None:
            raise ValueError(f"cannot read image {f}")
        im = lb(image=im)
        out.append(torch.from_numpy(np.ascontiguousarray(im[..., ::-1].transpose(2, 0, 1))).float() / 255.0)
    return torch.stack(out)


def generated_images(imgsz=640, n: int = 4, seed: int = 0) -> torch.Tensor:
    """Deterministic synthetic test images (gradients, noise and filled shapes) for parity checks without data.

    They exercise the whole activation range of a network better than noise alone, but they are not natural
    images: prefer ``data=`` / real images for a meaningful detection comparison.
    """
    h, w = (imgsz, imgsz) if isinstance(imgsz, int) else tuple(imgsz)
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        base = np.stack([(xx / w), (yy / h), 0.5 + 0.5 * np.sin((xx + yy) / max(h, w) * 6.28)], -1) * 255
        im = (0.6 * base + 0.4 * rng.uniform(0, 255, (h, w, 3))).astype(np.uint8)
        for _ in range(int(rng.integers(2, 7))):
            color = tuple(int(c) for c in rng.integers(0, 256, 3))
            x0, y0 = int(rng.integers(0, w - 4)), int(rng.integers(0, h - 4))
            x1, y1 = min(w - 1, x0 + int(rng.integers(4, max(5, w // 2)))), min(h - 1, y0 + int(rng.integers(4, max(5, h // 2))))
            if rng.random() < 0.5:
                cv2.rectangle(im, (x0, y0), (x1, y1), color, -1)
            else:
                cv2.ellipse(im, ((x0 + x1) // 2, (y0 + y1) // 2), (max(1, (x1 - x0) // 2), max(1, (y1 - y0) // 2)), 0, 0,
                            360, color, -1)
        out.append(torch.from_numpy(np.ascontiguousarray(im.transpose(2, 0, 1))).float() / 255.0)
    return torch.stack(out)


def _imgsz_pair(imgsz, stride: int) -> tuple[int, int]:
    """``imgsz`` as ``(h, w)``, each rounded up to a multiple of ``stride`` (Ultralytics' check_imgsz)."""
    sz = check_imgsz(imgsz, stride=stride, min_dim=2)
    return (int(sz[0]), int(sz[1]))
