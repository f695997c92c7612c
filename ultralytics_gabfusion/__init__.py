"""ultralytics-gabfusion: very-low-bit quantization-aware training for Ultralytics YOLO detection.

Importing the package registers ``GABFusion`` with Ultralytics' model parser (so ``*-gab.yaml`` models build, in
DDP workers too) and exposes the trainer.

Examples:
    >>> from ultralytics import YOLO
    >>> from ultralytics_gabfusion import GABTrainer
    >>> YOLO("fp.pt").train(trainer=GABTrainer, data="data.yaml", cfg="cfg/qat/w4a4-lsq.yaml")  # doctest: +SKIP
"""

__version__ = "0.1.0"

from .fusion import GABFusion, register_gabfusion  # noqa: E402

register_gabfusion()

from .trainer import GABTrainer  # noqa: E402

__all__ = ["GABTrainer", "GABFusion", "__version__"]
