"""GABFusion: gradient-balanced replacement for the Concat fusion nodes of YOLO PAN/FPN necks.

Importing this package registers ``GABFusion`` as a model-YAML module name (see ``register_gabfusion``).

Trainer call order (see each function's docstring):

1. ``get_model``: build; ``insert_gabfusion(model, mode, **opts)`` for stock YAMLs or ``set_fusion_mode`` for
   ``-gab`` YAMLs; then load FP weights.
2. Before the EMA copy (FP start only): ``calibrate_identity(model, images)``.
3. Optimizer: ``fusion_parameters(model)`` (learned ``lam``) in a no-decay group.
4. Every optimizer step: ``update_fusion(model, grad_scale)`` before the step, ``sync_fusion_state(model, ema)``
   after the EMA update.
5. ``FusionTelemetry().attach(trainer)`` for the per-epoch CSV and the final plot.
6. Deployment: ``fold_gabfusion(model, images)``.

Examples:
    >>> from ultralytics.nn.tasks import DetectionModel
    >>> import ultralytics_gabfusion.fusion as gf
    >>> model = DetectionModel("yolov5s.yaml", nc=16, verbose=False)
    >>> gf.insert_gabfusion(model, "balanced")
    [12, 16, 19, 22]
"""

from .calibrate import DEFAULT_FOLD_TOL, FoldToleranceError, calibrate_identity, fold_gabfusion
from .graph import (
    detection_model,
    fusion_nodes,
    fusion_parameters,
    insert_gabfusion,
    neck_concat_indices,
    register_gabfusion,
    set_fusion_mode,
    sync_fusion_state,
    update_fusion,
)
from .modules import FUSION_MODES, ChannelLayerNorm, FoldedFusion, GABFusion
from .telemetry import COLUMNS, FusionTelemetry, node_rows

register_gabfusion()

__all__ = (
    "COLUMNS",
    "DEFAULT_FOLD_TOL",
    "FUSION_MODES",
    "ChannelLayerNorm",
    "FoldToleranceError",
    "FoldedFusion",
    "FusionTelemetry",
    "GABFusion",
    "calibrate_identity",
    "detection_model",
    "fold_gabfusion",
    "fusion_nodes",
    "fusion_parameters",
    "insert_gabfusion",
    "neck_concat_indices",
    "node_rows",
    "register_gabfusion",
    "set_fusion_mode",
    "sync_fusion_state",
    "update_fusion",
)
