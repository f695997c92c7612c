"""ultralytics-gabfusion: very-low-bit quantization-aware training for Ultralytics YOLO detection, segmentation and pose.

Importing the package is light (no torch, no Ultralytics): the public names below load on first use.
``import ultralytics_gabfusion`` is enough for ``*-gab.yaml`` models and GABFusion checkpoints to build: ``GABFusion``
is registered with Ultralytics' model parser at once if Ultralytics is already imported, otherwise as soon as it
is (see :mod:`ultralytics_gabfusion.register`).

Examples:
    >>> from ultralytics import YOLO
    >>> from ultralytics_gabfusion import GABTrainer
    >>> YOLO("fp.pt").train(trainer=GABTrainer, data="data.yaml", cfg="cfg/qat/w4a4-lsq.yaml")  # doctest: +SKIP
"""

from .register import install as _install_registration
from .version import __version__

# Public name -> module that defines it, imported on first access (PEP 562).
_LAZY = {
    "GABTrainer": "trainer",
    "GABSegmentationTrainer": "trainer",
    "GABPoseTrainer": "trainer",
    "trainer_for": "trainer",
    "GABFusion": "fusion",
    "QATConfig": "settings",
    "post_training_quantize": "ptq",
}

__all__ = ("__version__", *_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value  # later lookups skip this function
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted({*globals(), *_LAZY})


# Last, so that the package is complete when Ultralytics is already loaded and this imports .fusion right away.
_install_registration()
