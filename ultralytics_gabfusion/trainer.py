"""``GABTrainer``: Ultralytics' ``DetectionTrainer`` with quantization-aware training, GABFusion and ADA.

All plugin settings are flat keys of ``self.args`` (see :mod:`ultralytics_gabfusion.settings`), so they reach
args.yaml, checkpoints, ``resume`` and the DDP worker like any Ultralytics key. With ``qat=none gab=off ada=0``
the trainer is the stock ``DetectionTrainer``.

Where each feature plugs into the Ultralytics lifecycle:

- structure (GABFusion insertion, quantized convs) in ``get_model``, before FP weights load; weight quantizers are
  initialised right after the load;
- data-dependent init (GABFusion LN identity fit, activation calibration) after the dataloaders exist and before
  ``ModelEMA`` copies the model (``_build_train_pipeline``);
- plugin parameters in their own optimizer groups (``build_optimizer``);
- the per-step GABFusion lambda update after each optimizer step (``optimizer_step``);
- the frozen ADA teacher and loss wrapper after ``_setup_train`` so EMA, checkpoints and DDP pickles never carry it.

Examples:
    >>> from ultralytics_gabfusion import GABTrainer
    >>> trainer = GABTrainer(overrides={"model": "fp.pt", "data": "data.yaml", "qat": "lsq", "w_bits": 4, "a_bits": 4})
    >>> trainer.train()  # doctest: +SKIP
"""

from __future__ import annotations

from copy import copy
from pathlib import Path

import torch
import torch.distributed as dist

from ultralytics.cfg import cfg2dict
from ultralytics.models.yolo.detect import DetectionTrainer, DetectionValidator
from ultralytics.nn.tasks import DetectionModel
from ultralytics.utils import DEFAULT_CFG, LOGGER, RANK, IterableSimpleNamespace, colorstr
from ultralytics.utils.torch_utils import unwrap_model

from .version import __version__
from .settings import (
    PLUGIN_DEFAULTS,
    PLUGIN_KEYS,
    check_consistency,
    read_recipe,
    strip_plugin_keys,
    validate_settings,
)

PREFIX = colorstr("gabfusion: ")


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


class GABTrainer(DetectionTrainer):
    """Detection trainer with fake-quantized convs (``qat``), GABFusion neck nodes (``gab``) and ADA (``ada``).

    Args:
        cfg (str | dict | SimpleNamespace): Base configuration; plugin defaults are added to it.
        overrides (dict): Ultralytics and plugin keys, e.g. ``{"qat": "n2uq", "w_bits": 3, "a_bits": 3}``.
        _callbacks (dict): Ultralytics callbacks.
    """

    def __init__(self, cfg=DEFAULT_CFG, overrides=None, _callbacks=None):
        overrides = dict(overrides or {})
        base = plugin_cfg(cfg)
        # Validate plugin values before Ultralytics creates the run directory, so a typo writes nothing.
        if overrides.get("cfg"):
            overrides = {**read_recipe(overrides.pop("cfg")), **overrides}
        merged = {**base, **overrides}
        validated = validate_settings(merged)
        overrides.update({k: v for k, v in validated.items() if k in overrides})
        check_consistency(validated)
        if not merged.get("resume"):
            teacher = self._check_teacher_source(merged)
            if teacher:  # recorded in args.yaml and checkpoints, so resume finds the same teacher
                overrides["teacher"] = teacher
        if RANK == -1:  # model, data, structure and teacher checks; DDP workers were checked by the launcher
            from .preflight import check_resume, preflight_train

            if merged.get("resume"):
                check_resume(overrides)
            else:
                preflight_train({**merged, **validated, **overrides}, overrides)
        super().__init__(base, overrides, _callbacks)
        for k, v in validate_settings(vars(self.args)).items():
            setattr(self.args, k, v)  # normalised values (e.g. resumed runs)
        if self.args.qat != "none":
            from .quant.kernels import set_qat_kernel

            set_qat_kernel(self.args.qat_kernel)  # process-wide; also in each DDP worker, which rebuilds the trainer
        self._ada = None
        if self.args.gab != "off":
            from .fusion import FusionTelemetry

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
        """Build the detection model, insert GABFusion, swap in quantized convs, then load FP weights.

        Args:
            cfg (str | dict): Model YAML.
            weights (nn.Module | None): Model whose weights are transferred (FP or an earlier QAT checkpoint).
            verbose (bool): Print model info and the per-layer precision table.

        Returns:
            (DetectionModel): The model to train.
        """
        verbose = verbose and RANK in {-1, 0}
        model = DetectionModel(cfg, nc=self.data["nc"], ch=self.data["channels"], verbose=verbose and RANK == -1)
        from ultralytics.nn.modules.head import Detect

        head = model.model[-1]
        if not isinstance(head, Detect):
            raise ValueError(
                f"GABTrainer trains detection models, but {cfg if isinstance(cfg, str) else 'this model'} ends in "
                f"{type(head).__name__}, not Detect. Use a detection YAML or checkpoint (e.g. yolov5s.yaml, yolo11s.yaml)."
            )
        model = self.set_model_names_for_load(model)
        args = self.args
        from .fusion import GABFusion, insert_gabfusion, set_fusion_mode

        has_gab = any(isinstance(m, GABFusion) for m in model.modules())
        opts = dict(beta=args.gab_beta, eta=args.gab_eta, eps=args.gab_eps, tau=args.gab_tau, rms=args.gab_rms)
        if args.gab != "off":
            nodes = insert_gabfusion(model, mode=args.gab, **opts)
            if verbose:
                LOGGER.info(f"{PREFIX}GABFusion ({args.gab}) at layers {nodes}")
        elif has_gab:
            set_fusion_mode(model, "off")
        if args.qat != "none":
            from .quant.convert import format_policy, quantize_model

            layer_bits = self._layer_bits(model, verbose)
            rows = quantize_model(
                model, args.qat, args.w_bits, args.a_bits, args.qat_first_bits, args.qat_head_bits, args.qat_skip,
                args.qat_act_grid, layer_bits,
            )
            if verbose:
                LOGGER.info(f"{PREFIX}W{args.w_bits}A{args.a_bits} {args.qat} precision policy:\n{format_policy(rows)}")
                LOGGER.info(f"{PREFIX}fake-quant kernels: qat_kernel={args.qat_kernel}")
        if weights:
            model.load(weights, verbose=verbose)
            has_trained_gab = any(isinstance(m, GABFusion) for m in weights.modules())
            model.gab_identity_pending = args.gab != "off" and args.gab_calib and not has_trained_gab
        if args.qat != "none":
            from .quant.convert import init_weight_quantizers

            init_weight_quantizers(model, only_uninitialized=True, init=args.qat_init)  # from the loaded weights, not the random init
        model.gabfusion = {"version": __version__, **{k: getattr(args, k) for k in sorted(PLUGIN_KEYS)}}
        return model

    def _layer_bits(self, model, verbose: bool) -> dict | None:
        """Resolve ``qat_layer_bits`` (mapping, or sensitivity CSV + ``qat_bits_budget``) on the float model; log it."""
        args = self.args
        value = getattr(args, "qat_layer_bits", None)
        if value is None:
            return None
        from .quant.convert import plan_policy
        from .quant.mixed import average_bits, plan_size_bytes, resolve_layer_bits

        def plan(lb):  # bits only: a fixed grid skips the activation-bound probe (a forward pass per call)
            return plan_policy(model, args.w_bits, args.a_bits, args.qat_first_bits, args.qat_head_bits, args.qat_skip,
                               "signed", lb)

        mapping = resolve_layer_bits(model, value, getattr(args, "qat_bits_budget", None), plan)
        if verbose:
            uni, mixed = plan({}), plan(mapping)
            src = f" from {value} under budget {args.qat_bits_budget}" if isinstance(value, str) else ""
            LOGGER.info(
                f"{PREFIX}mixed precision{src}: layer bits {mapping or '{} (nothing fits)'}; average weight bits "
                f"{average_bits(model, mixed):.3f} (uniform {average_bits(model, uni):.3f}), size "
                f"{plan_size_bytes(model, mixed) / 1024:.1f} KiB (uniform {plan_size_bytes(model, uni) / 1024:.1f} KiB)"
            )
        model.gabfusion_layer_bits = mapping  # the resolved mapping, kept with the model (and its checkpoints)
        return mapping

    def _build_train_pipeline(self):
        """Build loaders and optimizer, then run the data-dependent inits before ``ModelEMA`` copies the model."""
        super()._build_train_pipeline()
        own_shuffle_generator(self.train_loader)
        if not self.resume:
            self._calibrate()

    @torch.no_grad()
    def _calibrate(self):
        model = unwrap_model(self.model)
        need_gab = getattr(model, "gab_identity_pending", False)
        from .quant.qconv import quant_convs

        need_act = any(m.act_quant is not None and not bool(m.act_quant.initialized) for _, m in quant_convs(model))
        if not (need_gab or need_act):
            return
        n = self.args.qat_calib
        batch = max(self.batch_size // max(self.world_size, 1), 1)
        loader = self.get_dataloader(self.data["train"], batch_size=batch, rank=-1, mode="train")
        images = []
        for i, b in enumerate(loader):
            if i >= n:
                break
            images.append(self.preprocess_batch(b)["img"].float())
        if hasattr(loader, "close"):
            loader.close()
        calibrate_model(model, images, init=self.args.qat_init)


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
            from ultralytics.utils.patches import torch_load

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
            _truncate_results(self.csv, int(ckpt.get("epoch", -1)) + 1)
        if not state:
            if self.resume:
                LOGGER.warning(f"{PREFIX}{self.args.model} has no exact-resume state: training continues from its EMA "
                               "weights and fp16 optimizer state (Ultralytics' resume).")
            return
        unwrap_model(self.model).load_state_dict(state["model"])
        if self.ema:
            self.ema.ema.load_state_dict(state["ema"])
        self.optimizer.load_state_dict(state["optimizer"])
        gen = _shuffle_generator(self.train_loader)
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
            from ultralytics.utils.patches import torch_load

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
            _drop_resume_state(self.last)
        return super().final_eval()

    # ----------------------------------------------------------------------------------------------- optimizer
    def build_optimizer(self, model, name="auto", lr=0.001, momentum=0.9, decay=1e-5, iterations=1e5):
        """Ultralytics' optimizer with quantizer and fusion tensors moved to their own groups.

        Groups added: ``quant`` (steps, offsets, N2UQ intervals/scales; no decay; lr x ``qat_lr``), ``quant_decay``
        (PACT alpha; weight decay as its L2 penalty; lr x ``qat_lr``) and ``fusion`` (GABFusion LayerNorm affine and
        learned lambda; no decay). These are 1-D tensors and never go to Muon.
        """
        optimizer = super().build_optimizer(model, name, lr, momentum, decay, iterations)
        from .fusion import GABFusion
        from .quant.convert import quantizer_parameters

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
            from .fusion import update_fusion

            scale = self.scaler.get_scale() if self.scaler.is_enabled() else None
            update_fusion(unwrap_model(self.model), grad_scale=scale)  # every rank: one all-reduce keeps lambda equal
        super().optimizer_step()
        if self.args.gab != "off" and self.ema:
            from .fusion import sync_fusion_state

            sync_fusion_state(unwrap_model(self.model), self.ema.ema)

    # --------------------------------------------------------------------------------------------- ADA teacher
    def _setup_train(self):
        super()._setup_train()
        if self.args.ada > 0:
            self._setup_ada()

    def _setup_ada(self):
        from .distill import ADACriterion, ADALoss, check_teacher, default_layers, load_teacher

        student = unwrap_model(self.model)
        if not self.args.teacher:  # normally resolved in __init__; kept for trainers built from a bare namespace
            self.args.teacher = self._check_teacher_source(vars(self.args))
        teacher = load_teacher(self.args.teacher, device=self.device)
        layers = self.args.ada_layers or default_layers(student)
        check_teacher(student, teacher, layers)
        self._ada = ADALoss(
            teacher, layers, attn=self.args.ada_attn, div=self.args.ada_div, weight=self.args.ada,
            temperature=self.args.ada_t, quantizers=self._qada_quantizers(student, layers),
        )
        self._ada.attach(student)
        student.criterion = ADACriterion(student.init_criterion(), self._ada, student)
        LOGGER.info(
            f"{PREFIX}ADA {self.args.ada_attn}/{self.args.ada_div} weight {self.args.ada} on layers {layers}, "
            f"teacher {self.args.teacher}"
        )

    def validate(self):
        """Validate the EMA model; with ADA on, val/ada_loss is computed like the training term."""
        if self._ada is None or not self.ema:
            return super().validate()
        from .distill import ADACriterion

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
        """For ``ada_attn=qada``: the student's activation quantizer reading each supervised layer (else empty)."""
        return {j: _consumer_quantizer(model, j) for j in layers} if self.args.ada_attn == "qada" else {}

    # -------------------------------------------------------------------------------------------- validation
    def get_validator(self):
        """Ultralytics' ``DetectionValidator``, given args without plugin keys (it re-validates its args)."""
        args = IterableSimpleNamespace(**strip_plugin_keys(self.args))
        return DetectionValidator(self.test_loader, save_dir=self.save_dir, args=copy(args), _callbacks=self.callbacks)


# ---------------------------------------------------------------------------------------------------------- helpers
@torch.no_grad()
def calibrate_model(model, images: list, init: str = "mse") -> None:
    """Data-dependent inits before training: GABFusion LayerNorm fit (if pending) and activation quantizers.

    Under torch.distributed each rank passes its own batches; they are gathered first (batch ``k`` of every rank,
    concatenated in rank order), so every rank calibrates on the union exactly as one process holding all the
    images would, and rank 0's result is then broadcast to make the ranks bit-identical.

    Args:
        model (nn.Module): The (unwrapped) model to calibrate in place.
        images (list[Tensor]): This rank's preprocessed image batches.
        init (str): ``qat_init`` of the activation quantizers.
    """
    from .quant.qconv import quant_convs

    distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    if distributed:
        images = gather_batches(images)
    if getattr(model, "gab_identity_pending", False):
        from .fusion import calibrate_identity
        from .quant.qconv import quantizers_disabled

        with quantizers_disabled(model):
            err = calibrate_identity(model, torch.cat(images[:2]))
        model.gab_identity_pending = False
        out = err.get("output", {}) if isinstance(err, dict) else {}
        LOGGER.info(
            f"{PREFIX}GABFusion LayerNorm affine fitted to the replaced Concat outputs (relative output change "
            f"{out.get('before', float('nan')):.3g} -> {out.get('after', float('nan')):.3g})"
        )
    if any(m.act_quant is not None and not bool(m.act_quant.initialized) for _, m in quant_convs(model)):
        from .quant.convert import bn_statistics_trained, calibrate_activations

        bn = "eval" if bn_statistics_trained(model) else "batch"  # trained BN: what validation and export see
        k = calibrate_activations(model, images, init=init, bn=bn)
        LOGGER.info(f"{PREFIX}calibrated activation quantizers on {k} batches of {len(images[0])} images "
                    f"(BatchNorm on {'running' if bn == 'eval' else 'batch'} statistics)")
    if distributed:
        for t in list(model.parameters()) + list(model.buffers()):
            dist.broadcast(t.data, src=0)


def gather_batches(images: list) -> list:
    """All-gather a list of image batches: batch ``k`` of every rank, concatenated in rank order (sizes may differ)."""
    world = dist.get_world_size()
    dev = images[0].device if images else torch.device("cpu")
    n = torch.tensor([len(images)], dtype=torch.int64, device=dev)  # on the device: NCCL reduces CUDA tensors only
    counts = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(counts, n)
    k = min(int(c) for c in counts)  # every rank must take part in every gather
    out = []
    for b in images[:k]:
        sizes = [torch.zeros(1, dtype=torch.int64, device=dev) for _ in range(world)]
        dist.all_gather(sizes, torch.tensor([len(b)], dtype=torch.int64, device=dev))
        big = max(int(s) for s in sizes)
        pad = torch.zeros((big, *b.shape[1:]), dtype=b.dtype, device=b.device)
        pad[: len(b)] = b
        parts = [torch.empty_like(pad) for _ in range(world)]
        dist.all_gather(parts, pad)
        out.append(torch.cat([p[: int(s)] for p, s in zip(parts, sizes)]))
    return out


def quantizer_problems(model) -> list[str]:
    """Describe quantizers with a non-finite tensor, or whose ``step`` collapsed to the positivity floor.

    Quantizers use ``|step|`` floored at ``STEP_EPS`` (1e-8), so a raw step that changes sign is a valid step, and
    a single per-channel weight step at the floor is what an all-zero channel gets. A quantizer whose every step
    sits at the floor, however, maps its whole input to zero: the optimizer drove it there.

    Examples:
        >>> quantizer_problems(model)  # doctest: +SKIP
        ['model.2.cv1.conv.act_quant.step collapsed to |step| = 0 (floor 1e-08): its input quantizes to 0']
    """
    from .quant.convert import quantizers
    from .quant.quantizers import STEP_EPS

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


def atomic_replace(tmp: Path, dst: Path) -> None:
    """Flush ``tmp`` to disk and rename it over ``dst`` (atomic on POSIX and Windows): readers see old or new."""
    import os

    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, dst)


class EpochShuffleSampler(torch.utils.data.Sampler):
    """One random permutation of ``range(n)`` per pass, drawn from ``generator`` when the pass starts.

    torch's ``RandomSampler`` draws a second, unused permutation lazily when a pass ends, i.e. at the start of the
    next epoch, so the generator state saved at an epoch's end is one draw short of what the next epoch uses. Here
    the state saved at an epoch's end is exactly the state the next permutation is drawn from.
    """

    def __init__(self, n: int, generator: torch.Generator):
        self.n, self.generator = n, generator

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        yield from torch.randperm(self.n, generator=self.generator).tolist()


def _shuffle_generator(loader):
    """The generator the train loader's :class:`EpochShuffleSampler` draws permutations from (or None)."""
    batch = getattr(getattr(loader, "batch_sampler", None), "sampler", None)  # _RepeatSampler -> BatchSampler
    sampler = getattr(batch, "sampler", None)
    return sampler.generator if isinstance(sampler, EpochShuffleSampler) else None


def own_shuffle_generator(loader) -> None:
    """Shuffle the train loader with an :class:`EpochShuffleSampler` whose generator a resumed run can restore.

    DataLoader shares one generator between the sampler's permutations and each iterator's base seed; an iterator
    is re-created on resume and at ``close_mosaic``, which would shift the permutations. The new generator starts
    where the shared one is after the first iterator's seed draw, so the first epoch's permutation is Ultralytics'
    own (later ones differ from stock: stock also draws the unused permutation described above).
    """
    batch = getattr(getattr(loader, "batch_sampler", None), "sampler", None)
    rs = getattr(batch, "sampler", None)
    if type(rs) is not torch.utils.data.RandomSampler or rs.replacement or rs._num_samples is not None:
        return
    if rs.generator is None or rs.generator is not getattr(loader, "generator", None):
        return
    own = torch.Generator()
    own.set_state(rs.generator.get_state())
    torch.empty((), dtype=torch.int64).random_(generator=own)  # the base-seed draw of the first iterator
    batch.sampler = EpochShuffleSampler(len(rs.data_source), own)


def resume_state(trainer) -> dict:
    """fp32 training model, EMA and optimizer state plus RNG streams at the end of an epoch (for exact resume)."""
    from copy import deepcopy

    def fp32(sd):
        return {k: v.detach().clone() for k, v in sd.items()}

    gen = _shuffle_generator(trainer.train_loader)
    return {
        "epoch": trainer.epoch,
        "model": fp32(unwrap_model(trainer.model).state_dict()),
        "ema": fp32(trainer.ema.ema.state_dict()) if trainer.ema else None,
        "optimizer": deepcopy(trainer.optimizer.state_dict()),
        "rng": get_rng_state(),
        "shuffle": gen.get_state() if gen is not None else None,
    }


def get_rng_state() -> dict:
    """Python, NumPy and torch (CPU and CUDA) random states."""
    import random

    import numpy as np

    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(state: dict) -> None:
    """Restore :func:`get_rng_state`'s output (CUDA states only when the device count matches)."""
    import random

    import numpy as np

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda")
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)


def _truncate_results(csv: Path, last_epoch: int) -> None:
    """Keep the header and the rows of epochs <= ``last_epoch`` (1-based, as written) of a results.csv."""
    lines = csv.read_text().splitlines(keepends=True)
    keep = lines[:1] + [ln for ln in lines[1:] if ln.strip() and float(ln.split(",", 1)[0]) <= last_epoch]
    if len(keep) != len(lines):
        tmp = csv.with_name(csv.name + ".tmp")
        tmp.write_text("".join(keep))
        atomic_replace(tmp, csv)


def _drop_resume_state(f: Path) -> None:
    from ultralytics.utils.patches import torch_load

    ckpt = torch_load(f, map_location="cpu")
    if isinstance(ckpt, dict) and "gab_resume" in ckpt:
        del ckpt["gab_resume"]
        tmp = f.with_name(f.name + ".tmp")
        torch.save(ckpt, tmp)
        atomic_replace(tmp, f)


def _consumer_quantizer(model, layer: int):
    """``Q(x)`` of the Detect-head conv that reads layer ``layer``'s output (for qada's r term), or None.

    Returns the conv's :class:`~.quant.qconv.ConvInputQuantizer`: the tensor the conv really consumes, including
    N2UQ's ``input_shift``.
    """
    from .quant.qconv import QuantConv2d

    head = model.model[-1]
    try:
        idx = list(head.f).index(layer)
    except ValueError:
        return None
    for seq in (getattr(head, "cv2", None), getattr(head, "cv3", None)):
        if seq is None:
            continue
        for m in seq[idx].modules():
            if isinstance(m, QuantConv2d) and m.act_quant is not None:
                return m.input_quantizer()
    return None


def _log_ada_ratio(trainer):
    """Callback: log the epoch's mean ratio of the weighted ADA term to the detection loss (and add it to results.csv)."""
    crit = getattr(unwrap_model(trainer.model), "criterion", None)
    if crit is None or not hasattr(crit, "pop_ratio"):
        return
    ratio = crit.pop_ratio()
    if ratio is not None:
        trainer.lr["ada/ratio"] = round(float(ratio), 6)  # saved with the lr columns of results.csv
        LOGGER.info(f"{PREFIX}weighted ADA / detection loss = {ratio:.3g}")


__all__ = ["GABTrainer", "plugin_cfg"]
