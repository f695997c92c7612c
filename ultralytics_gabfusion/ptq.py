"""Post-training quantization: the QAT starting point, saved as a checkpoint without a single training step.

``post_training_quantize`` builds exactly what a QAT run starts from (same conversion, weight-quantizer init and
activation calibration, done by :class:`~ultralytics_gabfusion.trainer.GABTrainer`'s own set-up) and writes it as
an Ultralytics checkpoint. Validating it shows the accuracy drop that QAT is there to recover, measured the same
way as every trained arm (``YOLO(ptq.pt).val``).

Examples:
    >>> from ultralytics_gabfusion.ptq import post_training_quantize
    >>> ckpt = post_training_quantize("fp.pt", data="data.yaml", qat="lsq", w_bits=4, a_bits=4)  # doctest: +SKIP
    >>> YOLO(ckpt).val(data="data.yaml")  # doctest: +SKIP
"""

from __future__ import annotations

import os
from copy import deepcopy
from datetime import datetime
from pathlib import Path

import torch
from ultralytics.utils import LOGGER

from .preflight import check_fp_checkpoint
from .trainer import GABTrainer
from .version import __version__

# Keys that make no sense for a run without training steps (the optimiser is built but never stepped).
_NO_TRAINING = {"epochs": 1, "plots": False, "val": False, "resume": False}


def post_training_quantize(model: str | os.PathLike, file: str | os.PathLike | None = None, **overrides) -> Path:
    """Convert and calibrate an FP checkpoint as a QAT run would, and save it without training.

    Args:
        model: FP ``.pt`` checkpoint.
        file: Output checkpoint; default ``<save_dir>/weights/ptq.pt`` of the run directory the trainer creates
            (``project=``/``name=`` choose it, as for training).
        **overrides: Ultralytics and plugin keys, as for ``GABTrainer`` (``data``, ``qat``, ``w_bits``, ``a_bits``,
            ``qat_calib``, ``imgsz``, ``batch``, ``gab`` ...). ``qat`` must not be ``none``.

    Returns:
        (Path): The checkpoint, loadable with ``YOLO(path)`` wherever the package is installed.

    Raises:
        ValueError: ``qat`` missing or ``none``, ``model`` already quantized, or any invalid plugin key (raised before
            anything is written).
    """
    if str(overrides.get("qat", "none")).lower() == "none":
        raise ValueError("post_training_quantize needs a quantizer: pass qat=lsq|lsqplus|pact|n2uq (and w_bits, "
                         "a_bits).")
    check_fp_checkpoint(model, "model", "post-training quantization",
                        "pass the FP checkpoint it was made from (the trainer would otherwise take it as a QAT run to "
                        "continue)")
    if float(overrides.get("ada", 0) or 0) > 0:
        overrides["ada"] = 0.0  # no loss is computed: a teacher would be loaded for nothing
    trainer = GABTrainer(overrides={**overrides, "model": str(model), **_NO_TRAINING})
    trainer._setup_train()  # conversion, weight init, calibration: exactly the QAT run's step 0
    ema = trainer.ema.ema if trainer.ema else trainer.model
    out = Path(file) if file is not None else Path(trainer.wdir) / "ptq.pt"
    out.parent.mkdir(parents=True, exist_ok=True)
    ckpt = {
        "epoch": -1,
        "best_fitness": None,
        "model": None,
        "ema": deepcopy(ema).half(),  # quantizer and fusion state stay fp32 (their _apply keeps it)
        "updates": 0,
        "optimizer": None,
        "train_args": vars(trainer.args),
        "train_metrics": None,
        "date": datetime.now().isoformat(),
        "version": __version__,
        "license": "AGPL-3.0 (https://ultralytics.com/license)",
    }
    tmp = out.with_name(f".{out.name}.tmp")
    torch.save(ckpt, tmp)
    tmp.replace(out)  # atomic: an interrupted save never leaves a truncated checkpoint under the final name
    LOGGER.info(f"ptq: W{trainer.args.w_bits}A{trainer.args.a_bits} {trainer.args.qat} model written to {out}")
    return out


__all__ = ["post_training_quantize"]
