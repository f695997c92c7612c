"""The plugin's trainers: Ultralytics' task trainers with quantization-aware training, GABFusion and ADA.

One plugin layer, :class:`GABTrainerMixin`, sits on top of an Ultralytics task trainer:

- :class:`GABTrainer` = mixin + ``DetectionTrainer`` (detection; the class of every earlier run),
- :class:`GABSegmentationTrainer` = mixin + ``SegmentationTrainer`` (instance segmentation, ``Segment`` heads),
- :class:`GABPoseTrainer` = mixin + ``PoseTrainer`` (keypoints, ``Pose`` heads).

:func:`trainer_for` returns the class for a model or task (``yolo-gab train`` uses it). ``GABTrainer`` also dispatches:
built for a segmentation or pose model (``GABTrainer(overrides={"model": "yolo11n-seg.yaml", ...})`` or
``YOLO("seg.pt").train(trainer=GABTrainer)``), it returns the trainer of that task, so code written for detection
keeps working. The subclasses do not dispatch: a task they do not train is an error naming the class to use.

All plugin settings are flat keys of ``self.args`` (see :mod:`ultralytics_gabfusion.settings`), so they reach
args.yaml, checkpoints, ``resume`` and the DDP worker like any Ultralytics key. With ``qat=none gab=off ada=0``
each trainer is its stock task trainer.

Where each feature plugs into the Ultralytics lifecycle (the same for every task):

- structure (GABFusion insertion, quantized convs) in ``get_model``, on the task's own float model before FP weights
  load; weight quantizers are initialised right after the load;
- data-dependent init (GABFusion LN identity fit, activation calibration) after the dataloaders exist and before
  ``ModelEMA`` copies the model (``_build_train_pipeline``);
- plugin parameters in their own optimizer groups (``build_optimizer``);
- the per-step GABFusion lambda update after each optimizer step (``optimizer_step``);
- the frozen ADA teacher and loss wrapper after ``_setup_train`` so EMA, checkpoints and DDP pickles never carry it;
  the task's loss (detection, segmentation or pose) plus the ADA term on the head inputs.

Examples:
    >>> from ultralytics_gabfusion import GABTrainer, trainer_for
    >>> trainer = GABTrainer(overrides={"model": "fp.pt", "data": "data.yaml", "qat": "lsq", "w_bits": 4, "a_bits": 4})
    >>> trainer.train()  # doctest: +SKIP
    >>> trainer_for(task="pose").__name__
    'GABPoseTrainer'
"""

from __future__ import annotations

from pathlib import Path

import torch
from ultralytics.cfg import cfg2dict
from ultralytics.models.yolo.detect import DetectionTrainer
from ultralytics.models.yolo.pose import PoseTrainer
from ultralytics.models.yolo.segment import SegmentationTrainer
from ultralytics.utils import DEFAULT_CFG, LOGGER, RANK, IterableSimpleNamespace
from ultralytics.utils.patches import torch_load
from ultralytics.utils.torch_utils import unwrap_model

from .distill import ADACriterion, load_teacher
from .fusion import FusionTelemetry, GABFusion, sync_fusion_state, update_fusion
from .preflight import TASK_TRAINERS, check_resume, model_task, preflight_train, task_noun
from .qat_setup import (
    PREFIX,
    attach_ada,
    build_structure,
    calibrate_model,
    needs_calibration,
    qada_quantizers,
)
from .quant.convert import quantizer_parameters, quantizers
from .quant.kernels import set_qat_kernel
from .quant.quantizers import STEP_EPS
from .resume import (
    atomic_replace,
    drop_resume_state,
    own_shuffle_generator,
    resume_state,
    rng_fork,
    set_rng_state,
    shuffle_generator,
    truncate_results,
)
from .stability import auto_ema_tau, ema_decay, freeze_bn_stats, recalibrate_bn
from .settings import KEYS_BEFORE_THEY_EXISTED, PLUGIN_DEFAULTS, QATConfig, read_recipe, strip_plugin_keys


def plugin_cfg(cfg=DEFAULT_CFG) -> dict:
    """Return ``cfg`` (path, dict or namespace) as a dict that also holds every plugin key's default.

    Ultralytics' ``get_cfg`` rejects override keys that the base cfg lacks; the plugin keys are valid because they are
    in the base cfg built here (also for the DDP worker, which passes a plain ``DEFAULT_CFG_DICT`` copy).
    """
    base = cfg2dict(cfg if cfg is not None else DEFAULT_CFG)
    base = dict(base)
    for k, v in PLUGIN_DEFAULTS.items():
        base.setdefault(k, v)
    return base


class GABTrainerMixin:
    """What the plugin adds to an Ultralytics task trainer: fake-quantized convs (``qat``), GABFusion neck nodes
    (``gab``), ADA (``ada``), exact resume and atomic checkpoints.

    Put it first in the bases of a ``DetectionTrainer`` subclass (``class T(GABTrainerMixin, SegmentationTrainer)``) and
    set :attr:`TASK`; everything else comes from the task trainer (its model class, dataset, loss, validator, plots).

    Args:
        cfg (str | dict | SimpleNamespace): Base configuration; plugin defaults are added to it.
        overrides (dict): Ultralytics and plugin keys, e.g. ``{"qat": "n2uq", "w_bits": 3, "a_bits": 3}``.
        _callbacks (dict): Ultralytics callbacks.
    """

    TASK = "detect"  # the Ultralytics task of the trainer underneath (preflight refuses models of another task)

    def __init__(self, cfg=DEFAULT_CFG, overrides=None, _callbacks=None):
        overrides = dict(overrides or {})
        base = plugin_cfg(cfg)
        # Validate plugin values before Ultralytics creates the run directory, so a typo writes nothing.
        if overrides.get("cfg"):
            overrides = {**read_recipe(overrides.pop("cfg")), **overrides}
        merged = {**base, **overrides}
        config = QATConfig.from_keys(merged)  # every plugin key validated once, before any directory exists
        overrides.update({k: v for k, v in config.as_dict().items() if k in overrides})
        if not merged.get("resume"):
            teacher = self._check_teacher_source(merged)
            if teacher:  # recorded in args.yaml and checkpoints, so resume finds the same teacher
                overrides["teacher"] = teacher
        if RANK == -1:  # model, data, structure and teacher checks; DDP workers were checked by the launcher
            if merged.get("resume"):
                check_resume(overrides)
            else:
                preflight_train({**merged, **config.as_dict(), **overrides}, overrides, task=self.TASK,
                                trainer=type(self).__name__)
        super().__init__(base, overrides, _callbacks)
        if self.resume:  # a run saved before a key existed resumes as it was trained
            for k, v in KEYS_BEFORE_THEY_EXISTED.items():
                if k not in vars(self.args):
                    setattr(self.args, k, v)
        # the run's config: from the final args (a resumed run's come from its checkpoint), normalised back into them
        self.qat_config = QATConfig.from_keys(self.args)
        for k, v in self.qat_config.as_dict().items():
            setattr(self.args, k, v)
        if self.qat_config.quantized:
            set_qat_kernel(self.args.qat_kernel)  # process-wide; also in each DDP worker, which rebuilds the trainer
        self._ada = None
        self._bn_images = []
        if self.args.gab != "off":
            FusionTelemetry().attach(self)  # on_train_epoch_end (CSV) and on_train_end (PNG, summary)
        if self.args.ada > 0:
            self.add_callback("on_train_epoch_end", _log_ada_ratio)

    # ------------------------------------------------------------------------------------------------ settings
    @staticmethod
    def _check_teacher_source(args: dict) -> str | None:
        """Return the ADA teacher path (``teacher=`` or the FP ``.pt`` QAT starts from); fail early if there is none."""
        if not args.get("ada"):
            return None
        teacher = args.get("teacher") or (str(args.get("model")) if str(args.get("model", "")).endswith(".pt") else None)
        if teacher is None:
            raise ValueError(
                "ADA needs a full-precision teacher: pass teacher=path/to/fp.pt (or start QAT from an FP .pt, which "
                "then serves as the teacher), or set ada=0."
            )
        if not Path(teacher).exists():
            raise FileNotFoundError(f"teacher checkpoint '{teacher}' not found: pass teacher=path/to/fp.pt or set ada=0.")
        return str(Path(teacher).resolve())

    # ----------------------------------------------------------------------------------------------- structure
    def get_model(self, cfg=None, weights=None, verbose=True):
        """Build the task's float model, insert GABFusion, swap in quantized convs, then load FP weights.

        Args:
            cfg (str | dict): Model YAML.
            weights (nn.Module | None): Model whose weights are transferred (FP or an earlier QAT checkpoint).
            verbose (bool): Print model info and the per-layer precision table.

        Returns:
            (DetectionModel | SegmentationModel | PoseModel): The model to train.
        """
        verbose = verbose and RANK in {-1, 0}
        model = super().get_model(cfg, weights=None, verbose=verbose)  # the task trainer's model, no weights yet
        return build_structure(model, self.qat_config, weights, verbose=verbose, source=cfg if isinstance(cfg, str) else None)

    def _build_train_pipeline(self):
        """Build loaders and optimizer, then run the data-dependent inits before ``ModelEMA`` copies the model."""
        super()._build_train_pipeline()
        own_shuffle_generator(self.train_loader)
        # kept as uint8 on the CPU (a batch of 16 at 640 px is ~20 MB): the same batches at step 0 and before every
        # validation, in a fresh and in a resumed run (augmentation drawn from seeded, then restored, RNG streams)
        n = self.args.qat_bn_recalib if self.qat_config.quantized else 0  # a float run keeps Ultralytics' behaviour
        if n:
            with rng_fork(self.args.seed + 1 + max(RANK, 0)):
                self._bn_images = self._train_images(n, raw=True)
        if not self.resume:
            self._calibrate()

    @torch.no_grad()
    def _calibrate(self):
        model = unwrap_model(self.model)
        if not needs_calibration(model):
            return
        calibrate_model(model, self._train_images(self.args.qat_calib), init=self.args.qat_init,
                        bn_images=self._bn_images)

    @torch.no_grad()
    def _train_images(self, n: int, raw: bool = False) -> list:
        """The first ``n`` batches of a fresh training loader (the run's augmentation), preprocessed unless ``raw``."""
        batch = max(self.batch_size // max(self.world_size, 1), 1)
        loader = self.get_dataloader(self.data["train"], batch_size=batch, rank=-1, mode="train")
        images = []
        for i, b in enumerate(loader):
            if i >= n:
                break
            images.append(b["img"].clone() if raw else self.preprocess_batch(b)["img"].float())
        if hasattr(loader, "close"):
            loader.close()
        return images

    def _model_train(self):
        """Ultralytics' train mode; with ``qat_bn=freeze`` every BatchNorm then normalises with its running statistics."""
        super()._model_train()
        if self.args.qat_bn == "freeze":
            freeze_bn_stats(self.model)

    # ------------------------------------------------------------------------------------ checkpoints, resume
    def save_model(self):
        """Ultralytics' checkpoints, written atomically; ``last.pt`` also carries the exact-resume state.

        Each file is written to ``<name>.tmp`` and renamed over the old one, so a kill during the save leaves the
        previous ``last.pt``/``best.pt`` readable. Ultralytics keeps only the fp16 EMA and an fp16 optimizer, and a
        resumed run restarts from the EMA weights; ``gab_resume`` adds what an identical continuation needs (see
        :func:`resume_state`). ``final_eval`` strips it with the optimizer.
        """
        final = (self.last, self.best)
        self.last, self.best = (p.with_name(p.name + ".tmp") for p in final)
        try:
            saved = super().save_model()
        finally:
            tmp_last, tmp_best = self.last, self.best
            self.last, self.best = final
        if tmp_last.exists():
            ckpt = torch_load(tmp_last, map_location="cpu")
            ckpt["gab_resume"] = resume_state(self)
            torch.save(ckpt, tmp_last)
        for tmp, dst in ((tmp_last, self.last), (tmp_best, self.best)):
            if tmp.exists():
                atomic_replace(tmp, dst)
        return saved

    def resume_training(self, ckpt):
        """Ultralytics' resume, then the exact fp32 state of ``gab_resume`` (model, EMA, optimizer, RNG streams)."""
        super().resume_training(ckpt)
        state = (ckpt or {}).get("gab_resume") if self.resume else None
        done = (ckpt or {}).get("train_results") or {}
        elapsed = float((done.get("time") or [0.0])[-1] or 0.0)

        def continue_clock(trainer):  # results.csv 'time' counts from the start of the first session
            trainer.train_time_start -= elapsed

        if self.resume and elapsed:
            self.add_callback("on_train_start", continue_clock)
        if self.resume and self.csv.exists():  # rows of epochs after the checkpoint (a kill during its save) go
            truncate_results(self.csv, int(ckpt.get("epoch", -1)) + 1)
        if not state:
            if self.resume:
                LOGGER.warning(f"{PREFIX}{self.args.model} has no exact-resume state: training continues from its EMA "
                               "weights and fp16 optimizer state (Ultralytics' resume).")
            return
        unwrap_model(self.model).load_state_dict(state["model"])
        if self.ema:
            self.ema.ema.load_state_dict(state["ema"])
        self.optimizer.load_state_dict(state["optimizer"])
        gen = shuffle_generator(self.train_loader)
        if gen is not None and state.get("shuffle") is not None:
            gen.set_state(state["shuffle"])

        def restore_rng(trainer):  # at the epoch start, after setup has drawn whatever it draws
            set_rng_state(state["rng"])
            trainer.callbacks["on_train_epoch_start"].remove(restore_rng)

        self.add_callback("on_train_epoch_start", restore_rng)

    def _handle_nan_recovery(self, epoch):
        """Ultralytics' recovery from a non-finite loss (reload last.pt), extended to broken quantizers.

        A quantizer whose step collapsed (<= 0) or whose tensors became non-finite is reported by name and handled
        like a non-finite loss; with no earlier epoch to go back to, training stops with that message. After a
        reload, the exact fp32 state of ``gab_resume`` replaces the EMA weights Ultralytics loads, so the training
        model, its quantizers and GABFusion buffers and the optimizer are those of the last good epoch.
        """
        bad = quantizer_problems(unwrap_model(self.model)) if RANK in {-1, 0} else []
        if bad:
            msg = (f"quantizer state broke in epoch {epoch + 1}: {'; '.join(bad[:5])}"
                   f"{f' (+{len(bad) - 5} more)' if len(bad) > 5 else ''}. The quantizer learning rate is too high "
                   f"for these tensors: lower qat_lr (now {self.args.qat_lr}) or lr0.")
            if epoch == self.start_epoch or not self.last.exists():
                raise FloatingPointError(msg)
            LOGGER.warning(f"{PREFIX}{msg} Recovering from {self.last}.")
            self.loss = torch.tensor(float("nan"), device=self.device)
        recovered = super()._handle_nan_recovery(epoch)
        if recovered:
            state = torch_load(self.last, map_location="cpu").get("gab_resume")
            if state:
                unwrap_model(self.model).load_state_dict(state["model"])
                if self.ema:
                    self.ema.ema.load_state_dict(state["ema"])
                self.optimizer.load_state_dict(state["optimizer"])
        return recovered

    def final_eval(self):
        """Drop the exact-resume state from the finished checkpoints, then Ultralytics' final validation."""
        if self.last.exists():
            drop_resume_state(self.last)
        return super().final_eval()

    # ----------------------------------------------------------------------------------------------- optimizer
    def build_optimizer(self, model, name="auto", lr=0.001, momentum=0.9, decay=1e-5, iterations=1e5):
        """Ultralytics' optimizer with quantizer and fusion tensors moved to their own groups.

        Groups added: ``quant`` (steps, offsets, N2UQ intervals/scales; no decay; lr x ``qat_lr``), ``quant_decay``
        (PACT alpha; weight decay as its L2 penalty; lr x ``qat_lr``) and ``fusion`` (GABFusion LayerNorm affine and
        learned lambda; no decay). These are 1-D tensors and never go to Muon.
        """
        optimizer = super().build_optimizer(model, name, lr, momentum, decay, iterations)
        m = unwrap_model(model)
        q_plain, q_decay = quantizer_parameters(m)
        fusion = [p for mod in m.modules() if isinstance(mod, GABFusion) for p in mod.parameters()]
        moved = {id(p) for p in q_plain + q_decay + fusion}
        if not moved:
            return optimizer
        template = None
        for g in optimizer.param_groups:
            g["params"] = [p for p in g["params"] if id(p) not in moved]
            if g.get("param_group") == "bias" and template is None:
                template = {k: v for k, v in g.items() if k not in ("params", "param_group", "initial_lr", "lr", "weight_decay", "use_muon")}
        template = template or {k: v for k, v in optimizer.defaults.items() if k not in ("params", "lr", "weight_decay")}
        base_lr = self.args.lr0  # 'optimizer=auto' has written its choice back here; MuSGD boosts some groups x3
        lr_q = base_lr * self.args.qat_lr
        extra = {"use_muon": False} if any("use_muon" in g for g in optimizer.param_groups) else {}
        for params, group, g_lr, g_decay in (
            (q_plain, "quant", lr_q, 0.0),
            (q_decay, "quant_decay", lr_q, decay),
            (fusion, "fusion", base_lr, 0.0),
        ):
            if params:
                optimizer.add_param_group({**template, **extra, "params": params, "lr": g_lr, "weight_decay": g_decay, "param_group": group})
        LOGGER.info(
            f"{PREFIX}optimizer groups: {len(q_plain)} quant(decay=0.0, lr x{self.args.qat_lr}), "
            f"{len(q_decay)} quant_decay(decay={decay}), {len(fusion)} fusion(decay=0.0)"
        )
        return optimizer

    def optimizer_step(self):
        """GABFusion gradient-norm EMA and lambda update, the optimizer step, then lambda mirrored into the EMA model."""
        if self.args.gab != "off":
            scale = self.scaler.get_scale() if self.scaler.is_enabled() else None
            update_fusion(unwrap_model(self.model), grad_scale=scale)  # every rank: one all-reduce keeps lambda equal
        super().optimizer_step()
        if self.args.gab != "off" and self.ema:
            sync_fusion_state(unwrap_model(self.model), self.ema.ema)

    # --------------------------------------------------------------------------------------------- ADA teacher
    def _setup_train(self):
        super()._setup_train()
        if self.ema and self.args.qat_ema_tau is not None:
            self.ema.decay = ema_decay(self._ema_tau())
        if self.args.ada > 0:
            self._setup_ada()

    def _ema_tau(self) -> float:
        """``qat_ema_tau`` in optimizer updates (``auto``: sized to this run's updates, see :func:`auto_ema_tau`)."""
        if self.args.qat_ema_tau != "auto":
            return float(self.args.qat_ema_tau)
        updates = self.epochs * max(len(self.train_loader) // max(self.accumulate, 1), 1)
        tau = auto_ema_tau(updates)
        LOGGER.info(f"{PREFIX}EMA ramp: qat_ema_tau=auto -> {tau:.1f} updates (run: ~{updates} optimizer updates)")
        return tau

    def _setup_ada(self):
        student = unwrap_model(self.model)
        if not self.args.teacher:  # normally resolved in __init__; kept for trainers built from a bare namespace
            self.args.teacher = self._check_teacher_source(vars(self.args))
        self._ada = attach_ada(student, load_teacher(self.args.teacher, device=self.device), self.qat_config)
        LOGGER.info(
            f"{PREFIX}ADA {self.args.ada_attn}/{self.args.ada_div} weight {self.args.ada} on layers {self._ada.layers}, "
            f"teacher {self.args.teacher}"
        )

    def validate(self):
        """Validate the EMA model; with ADA on, val/ada_loss is computed like the training term.

        With ``qat_bn_recalib=N`` (and BatchNorm not frozen) the EMA model's BatchNorm statistics are first re-estimated
        on N training batches (the checkpoint saved after this validation keeps them).
        """
        if self.ema and self._bn_images and self.args.qat_bn != "freeze":  # frozen: step-0 statistics kept
            recalibrate_bn(self.ema.ema, self._bn_images)
        if self._ada is None or not self.ema:
            return super().validate()
        ema = self.ema.ema
        self._ada.quantizers.update(self._qada_quantizers(ema, self._ada.layers))
        self._ada.attach(ema)
        crit = ema.criterion = ADACriterion(ema.init_criterion(), self._ada, ema)
        try:
            metrics, fitness = super().validate()
            if metrics is not None and crit.calls:  # the validator rounds to 5 decimals: ~1e-7 would read 0
                metrics["val/ada_loss"] = float(f"{crit.weighted_sum / crit.calls:.5g}")
            return metrics, fitness
        finally:
            ema.criterion = None
            self._ada.detach(ema)
            self._ada.quantizers.update(self._qada_quantizers(unwrap_model(self.model), self._ada.layers))

    def _qada_quantizers(self, model, layers) -> dict:
        return qada_quantizers(model, layers, self.args.ada_attn)

    # -------------------------------------------------------------------------------------------- validation
    def get_validator(self):
        """The task trainer's validator, given args without plugin keys (it re-validates its args)."""
        args = self.args
        self.args = IterableSimpleNamespace(**strip_plugin_keys(args))  # the task trainer copies self.args into it
        try:
            return super().get_validator()
        finally:
            self.args = args


class GABTrainer(GABTrainerMixin, DetectionTrainer):
    """Detection trainer with fake-quantized convs (``qat``), GABFusion neck nodes (``gab``) and ADA (``ada``).

    Built for a segmentation or pose model (``task=`` in ``overrides``, else the task of the model YAML/checkpoint),
    it returns a :class:`GABSegmentationTrainer` / :class:`GABPoseTrainer` instead (logged), so
    ``YOLO("seg.pt").train(trainer=GABTrainer, ...)`` and ``GABTrainer(overrides=...)`` work for every task.

    Examples:
        >>> t = GABTrainer(overrides={"model": "yolo11n-seg.yaml", "data": "seg.yaml", "qat": "lsq"})  # doctest: +SKIP
        >>> type(t).__name__  # doctest: +SKIP
        'GABSegmentationTrainer'
    """

    TASK = "detect"

    def __new__(cls, cfg=DEFAULT_CFG, overrides=None, _callbacks=None):
        if cls is GABTrainer and RANK == -1:  # DDP workers are built with the class the launcher chose
            task = requested_task(cfg, overrides)
            if task != "detect" and task in GAB_TRAINERS:
                target = GAB_TRAINERS[task]
                LOGGER.info(f"{PREFIX}{task} model: training with {target.__name__}")
                return target(cfg, overrides, _callbacks)  # not a GABTrainer: Python does not call __init__ again
        return super().__new__(cls)


class GABSegmentationTrainer(GABTrainerMixin, SegmentationTrainer):
    """Instance-segmentation trainer (``Segment`` heads) with the plugin's QAT, GABFusion and ADA.

    Examples:
        >>> GABSegmentationTrainer(overrides={"model": "fp-seg.pt", "data": "seg.yaml", "qat": "lsq"}).train()  # doctest: +SKIP
    """

    TASK = "segment"


class GABPoseTrainer(GABTrainerMixin, PoseTrainer):
    """Pose trainer (``Pose`` heads, data with ``kpt_shape``) with the plugin's QAT, GABFusion and ADA.

    Examples:
        >>> GABPoseTrainer(overrides={"model": "fp-pose.pt", "data": "pose.yaml", "qat": "lsq"}).train()  # doctest: +SKIP
    """

    TASK = "pose"


GAB_TRAINERS = {"detect": GABTrainer, "segment": GABSegmentationTrainer, "pose": GABPoseTrainer}
assert {t: c.__name__ for t, c in GAB_TRAINERS.items()} == TASK_TRAINERS  # the names preflight's messages use


def trainer_for(model=None, task: str | None = None) -> type:
    """The plugin trainer class for ``task``, else for the task of ``model`` (a model YAML or ``.pt`` checkpoint).

    Args:
        model (str | Path | None): Model YAML or checkpoint; its head decides the task (as Ultralytics guesses it).
        task (str | None): ``detect``, ``segment`` or ``pose``; wins over the model's.

    Returns:
        (type): :class:`GABTrainer`, :class:`GABSegmentationTrainer` or :class:`GABPoseTrainer`.

    Raises:
        ValueError: A task the plugin does not train (classify, obb, ...), or neither argument.

    Examples:
        >>> trainer_for("yolo11n-seg.yaml").__name__
        'GABSegmentationTrainer'
    """
    if task is None:
        if model is None:
            raise ValueError("trainer_for needs a model (YAML or .pt) or task=detect|segment|pose.")
        task = model_task(model) or "detect"  # a head that names no task: detect, as Ultralytics assumes
    if task not in GAB_TRAINERS:
        kinds = ", ".join(f"{task_noun(t)} ({c.__name__})" for t, c in GAB_TRAINERS.items())
        raise ValueError(f"task={task}: the plugin trains {kinds} models; train {task} models with trainer=default "
                         "(Ultralytics' own trainer).")
    return GAB_TRAINERS[task]


def requested_task(cfg=DEFAULT_CFG, overrides=None) -> str | None:
    """The task a trainer is asked for: ``task=`` of ``overrides``, else the model's, else ``task`` of a custom ``cfg``.

    The model (``model=``, or the checkpoint of ``resume=``) is read as Ultralytics guesses tasks (the head of the YAML
    or checkpoint); None when nothing says (an unreadable model is reported by the trainer's preflight).
    """
    overrides = dict(overrides or {})
    given = {} if cfg is DEFAULT_CFG or cfg is None else cfg2dict(cfg)
    if overrides.get("task"):
        return overrides["task"]
    resume = overrides.get("resume")
    model = resume if isinstance(resume, (str, Path)) and str(resume).endswith(".pt") else overrides.get("model")
    if model:
        try:
            return model_task(model)
        except (OSError, ValueError):
            return None
    return given.get("task")


# ---------------------------------------------------------------------------------------------------------- helpers
def quantizer_problems(model) -> list[str]:
    """Describe quantizers with a non-finite tensor, or whose ``step`` collapsed to the positivity floor.

    Quantizers use ``|step|`` floored at ``STEP_EPS`` (1e-8), so a raw step that changes sign is a valid step, and
    a single per-channel weight step at the floor is what an all-zero channel gets. A quantizer whose every step
    sits at the floor, however, maps its whole input to zero: the optimizer drove it there.

    Examples:
        >>> quantizer_problems(model)  # doctest: +SKIP
        ['model.2.cv1.conv.act_quant.step collapsed to |step| = 0 (floor 1e-08): its input quantizes to 0']
    """
    out = []
    for name, q in quantizers(model):
        for n, t in list(q.named_parameters(recurse=False)) + list(q.named_buffers(recurse=False)):
            t = t.detach()
            if not t.is_floating_point():
                continue
            if not torch.isfinite(t).all():
                out.append(f"{name}.{n} is not finite")
            elif n == "step" and bool(getattr(q, "initialized", True)) and (t.abs() <= 2 * STEP_EPS).all():
                out.append(f"{name}.{n} collapsed to |step| = {float(t.abs().max()):.3g} (floor {STEP_EPS:g}): "
                           "its input quantizes to 0")
    return out


def _log_ada_ratio(trainer):
    """Callback: log the epoch's mean ratio of the weighted ADA term to the task loss (and add it to results.csv)."""
    crit = getattr(unwrap_model(trainer.model), "criterion", None)
    if crit is None or not hasattr(crit, "pop_ratio"):
        return
    ratio = crit.pop_ratio()
    share = crit.pop_grad_share() if hasattr(crit, "pop_grad_share") else None
    if ratio is not None:  # saved with the lr columns of results.csv; significant digits, so a small ratio is not 0
        trainer.lr["ada/ratio"] = float(f"{float(ratio):.6g}")
    if share is not None:
        trainer.lr["ada/grad_ratio"] = float(f"{float(share):.6g}")
    if ratio is not None or share is not None:
        what = task_noun(getattr(trainer.args, "task", "detect"))
        LOGGER.info(f"{PREFIX}weighted ADA / {what} loss = {ratio if ratio is not None else float('nan'):.3g}; "
                    f"ADA / {what} gradient norm at the supervised features = "
                    f"{share if share is not None else float('nan'):.3g}")


__all__ = ["GAB_TRAINERS", "GABPoseTrainer", "GABSegmentationTrainer", "GABTrainer", "GABTrainerMixin", "plugin_cfg",
           "requested_task", "trainer_for"]
