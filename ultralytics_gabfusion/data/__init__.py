"""Datasets for the plugin: a deterministic synthetic detection, segmentation or pose set (numpy + OpenCV only)."""

from .synth import (
    CLASS_NAMES,
    TASKS,
    SynthConfig,
    SynthSample,
    label_sha256,
    load_synth_info,
    make_synthetic_dataset,
    render_sample,
    synth_main,
)

__all__ = [
    "CLASS_NAMES",
    "TASKS",
    "SynthConfig",
    "SynthSample",
    "label_sha256",
    "load_synth_info",
    "make_synthetic_dataset",
    "render_sample",
    "synth_main",
]
