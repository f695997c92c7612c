"""What the benchmarks compare: quantizer methods, the arms of the paper table and the QAT schedule they share.

Constants only (no imports beyond the plugin settings), so the settings, run and report modules of the benchmarks all
read them from here without importing each other.
"""

from __future__ import annotations

from ..settings import QUANT_METHODS

METHODS = QUANT_METHODS
# arm -> (gab mode, uses ADA, GABFusion form or None for the default, trained). Every trained arm has a step-0 arm
# (ptq for baseline / ada, ptq_gab for gab / gab_ada, ptq_gab_paper for the paper-form arms): the same conversion,
# calibration and GABFusion insertion with no training step, so a table shows where each arm starts and what training
# added.
ARM_SETTINGS = {
    "ptq": ("off", False, None, False),  # converted + calibrated, no training step: the drop QAT has to recover
    "ptq_gab": ("balanced", False, None, False),  # step 0 of gab / gab_ada (default, function-preserving form)
    "ptq_gab_paper": ("balanced", False, "paper", False),  # step 0 of gab_paper (LayerNorm fitted to the Concat)
    "baseline": ("off", False, None, True),
    "gab": ("balanced", False, None, True),
    "ada": ("off", True, None, True),
    "gab_ada": ("balanced", True, None, True),
    "gab_paper": ("balanced", False, "paper", True),
    "gab_paper_ada": ("balanced", True, "paper", True),
}
ARMS = tuple(ARM_SETTINGS)
ARM_LABELS = {"ptq": "PTQ (no training)", "ptq_gab": "PTQ+GABFusion (step 0)",
              "ptq_gab_paper": "PTQ+GABFusion paper (step 0)", "baseline": "baseline QAT", "gab": "+GABFusion",
              "ada": "+ADA", "gab_ada": "+GABFusion+ADA", "gab_paper": "+GABFusion (paper form)",
              "gab_paper_ada": "+GABFusion (paper form)+ADA"}


def is_step0(arm: str) -> bool:
    """Whether ``arm`` is a step-0 (no training) arm."""
    return not ARM_SETTINGS[arm][3]


def start_arm(arm: str) -> str:
    """The step-0 arm a trained arm starts from (same conversion, calibration and GABFusion form); a step-0 arm: itself.

    Examples:
        >>> start_arm("gab_ada"), start_arm("ada"), start_arm("gab_paper")
        ('ptq_gab', 'ptq', 'ptq_gab_paper')
    """
    gab, _, form, trained = ARM_SETTINGS[arm]
    if not trained:
        return arm
    return "ptq" if gab == "off" else ("ptq_gab_paper" if form == "paper" else "ptq_gab")


# The paper's QAT protocol = YOLOv5 hyp.VOC.yaml, every key Ultralytics has, as in the cfg/qat recipes (their
# comment table says why box/cls keep Ultralytics' gains).
PAPER_SCHEDULE = {"optimizer": "SGD", "lr0": 0.00334, "lrf": 0.15135, "momentum": 0.74832, "weight_decay": 0.00025,
                  "warmup_epochs": 3.3835, "warmup_momentum": 0.59462, "warmup_bias_lr": 0.18657,
                  "hsv_h": 0.01041, "hsv_s": 0.54703, "hsv_v": 0.27739, "degrees": 0.0, "translate": 0.04591,
                  "scale": 0.75544, "shear": 0.0, "perspective": 0.0, "flipud": 0.0, "fliplr": 0.5,
                  "mosaic": 0.85834, "mixup": 0.04266, "copy_paste": 0.0}
# The recipes' schedule (cfg/qat/*.yaml, docs/RESULTS.md section 15): hyp.VOC's optimiser and augmentation, without the
# warm-up (its bias lr 0.187 is a from-scratch value), BatchNorm statistics re-estimated at step 0 and before each
# validation. 'paper' is hyp.VOC literally, with Ultralytics' BatchNorm handling.
STABLE_SCHEDULE = {**PAPER_SCHEDULE, "warmup_epochs": 0, "qat_bn_recalib": 8}
SCHEDULES = {"stable": STABLE_SCHEDULE, "paper": {**PAPER_SCHEDULE, "qat_bn_recalib": 0}}
# Per-method defaults, as in cfg/qat/*.yaml: N2UQ trains its quantizer tensors at lr/10 (reference code), and the
# paper found KL best for the uniform quantizers and JS for N2UQ.
METHOD_DEFAULTS = {
    "lsq": {"qat_lr": 1.0, "ada_div": "kl"},
    "lsqplus": {"qat_lr": 1.0, "ada_div": "kl"},
    "pact": {"qat_lr": 1.0, "ada_div": "kl"},
    "n2uq": {"qat_lr": 0.1, "ada_div": "js"},
}

__all__ = ["ARMS", "ARM_LABELS", "ARM_SETTINGS", "METHODS", "METHOD_DEFAULTS", "PAPER_SCHEDULE", "SCHEDULES",
           "STABLE_SCHEDULE", "is_step0", "start_arm"]
