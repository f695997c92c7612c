"""What the benchmarks compare: quantizer methods, the arms of the paper table and the QAT schedule they share.

Constants only (no imports beyond the plugin settings), so the settings, run and report modules of the benchmarks all
read them from here without importing each other.
"""

from __future__ import annotations

from ..settings import QUANT_METHODS

METHODS = QUANT_METHODS
ARMS = ("ptq", "baseline", "gab", "ada", "gab_ada")
ARM_SETTINGS = {  # arm -> (gab mode, uses ADA)
    "ptq": ("off", False),  # converted + calibrated, no training step: the drop QAT has to recover
    "baseline": ("off", False),
    "gab": ("balanced", False),
    "ada": ("off", True),
    "gab_ada": ("balanced", True),
}
ARM_LABELS = {"ptq": "PTQ (no training)", "baseline": "baseline QAT", "gab": "+GABFusion", "ada": "+ADA",
              "gab_ada": "+GABFusion+ADA"}

# The paper's QAT protocol = YOLOv5 hyp.VOC.yaml, every key Ultralytics has, as in the cfg/qat recipes (their
# comment table says why box/cls keep Ultralytics' gains).
PAPER_SCHEDULE = {"optimizer": "SGD", "lr0": 0.00334, "lrf": 0.15135, "momentum": 0.74832, "weight_decay": 0.00025,
                  "warmup_epochs": 3.3835, "warmup_momentum": 0.59462, "warmup_bias_lr": 0.18657,
                  "hsv_h": 0.01041, "hsv_s": 0.54703, "hsv_v": 0.27739, "degrees": 0.0, "translate": 0.04591,
                  "scale": 0.75544, "shear": 0.0, "perspective": 0.0, "flipud": 0.0, "fliplr": 0.5,
                  "mosaic": 0.85834, "mixup": 0.04266, "copy_paste": 0.0}
# Per-method defaults, as in cfg/qat/*.yaml: N2UQ trains its quantizer tensors at lr/10 (reference code), and the
# paper found KL best for the uniform quantizers and JS for N2UQ.
METHOD_DEFAULTS = {
    "lsq": {"qat_lr": 1.0, "ada_div": "kl"},
    "lsqplus": {"qat_lr": 1.0, "ada_div": "kl"},
    "pact": {"qat_lr": 1.0, "ada_div": "kl"},
    "n2uq": {"qat_lr": 0.1, "ada_div": "js"},
}

__all__ = ["ARMS", "ARM_LABELS", "ARM_SETTINGS", "METHODS", "METHOD_DEFAULTS", "PAPER_SCHEDULE"]
