"""ADA: attention-distribution alignment between a frozen full-precision teacher and a quantized student.

ADA is the distillation term of the GABFusion paper. A frozen full-precision (FP) teacher of the same architecture
and the quantized student see the same images; at a few supervision points (default: the inputs of the Detect,
Segment or Pose head, i.e. the neck outputs P3/P4/P5) each feature map X (B, C, H, W) is turned into a per-channel spatial attention
distribution, and the student's distribution R is pulled towards the teacher's P with KL(P || R) or a
Jensen-Shannon divergence.

Pipeline per supervision point::

    S = attention_scores(X, kind)          # pre-sigmoid score, (B, C, H, W)
    P = attention_distribution(S, T)       # sigmoid(S) / sum_hw sigmoid(S)   (paper, T=None)
                                           # softmax(S / T) over H x W        (sharper option, T > 0)
    d = divergence(P_teacher, R_student)   # (B, C): KL or JS summed over H x W
    l = reduce_point(d)                    # sum over channels, mean over batch -> scalar

    L_ADA = sum over supervision points of l;   loss = L_task + weight * L_ADA   (detection, segmentation, pose)

Modules:
    * :mod:`.attention`: attention scores (``simam``, ``qada``) and distributions.
    * :mod:`.teacher`: loading the FP teacher and checking that it matches the student.
    * :mod:`.loss`: divergences, :class:`ADALoss` (hooks, teacher forward) and :class:`ADACriterion` (the
      Ultralytics criterion with the ADA term); also why the teacher never reaches an EMA copy or a checkpoint.

Examples:
    >>> teacher = load_teacher("runs/fp/weights/best.pt")
    >>> layers = default_layers(student)                          # e.g. [17, 20, 23] for yolov5s.yaml
    >>> check_teacher(student, teacher, layers)
    >>> ada = ADALoss(teacher, layers, attn="simam", div="kl", weight=0.01).attach(student)
    >>> student.criterion = ADACriterion(student.init_criterion(), ada, student)
    >>> loss, items = student.loss(batch)                         # items["ada_loss"] = weight * L_ADA
"""

from .attention import (
    ATTN_KINDS,
    QADA_K,
    SIMAM_LAMBDA,
    attention_distribution,
    attention_scores,
    qada_attention,
    qada_scores,
    simam_attention,
    simam_scores,
)
from .loss import (
    DIV_KINDS,
    ADACriterion,
    ADALoss,
    _inert_hook,  # noqa: F401 (pickled by this name in checkpoints of attached models)
    _make_inert_hook,  # noqa: F401 (idem)
    divergence,
    gradient_share,
    js_div,
    kl_div,
    reduce_point,
)
from .teacher import (
    check_layer_indices,
    check_teacher,
    default_layers,
    has_quant_modules,
    head_task,
    load_teacher,
)

is_quantized = has_quant_modules  # the earlier name (quant.qconv.is_quantized asks a narrower question: QuantConv2d)

__all__ = [
    "ATTN_KINDS",
    "DIV_KINDS",
    "QADA_K",
    "SIMAM_LAMBDA",
    "ADACriterion",
    "ADALoss",
    "attention_distribution",
    "attention_scores",
    "check_layer_indices",
    "check_teacher",
    "default_layers",
    "divergence",
    "gradient_share",
    "has_quant_modules",
    "head_task",
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
