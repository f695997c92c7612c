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

from . import __version__
from .settings import PLUGIN_DEFAULTS, PLUGIN_KEYS, check_consistency, strip_plugin_keys, validate_settings

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
            from ultralytics.utils import YAML
            from ultralytics.utils.checks import check_yaml

            recipe = YAML.load(check_yaml(overrides.pop("cfg")))
            overrides = {**{k: v for k, v in recipe.items() if k != "cfg"}, **overrides}
        merged = {**base, **overrides}
        validated = validate_settings(merged)
        overrides.update({k: v for k, v in validated.items() if k in overrides})
        check_consistency(validated)
        if not merged.get("resume"):
            teacher = self._check_teacher_source(merged)
            if teacher:  # recorded in args.yaml and checkpoints, so resume finds the same teacher
                overrides["teacher"] = teacher
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

            rows = quantize_model(
                model, args.qat, args.w_bits, args.a_bits, args.qat_first_bits, args.qat_head_bits, args.qat_skip
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

    def _build_train_pipeline(self):
        """Build loaders and optimizer, then run the data-dependent inits before ``ModelEMA`` copies the model."""
        super()._build_train_pipeline()
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
        if need_gab:
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
        if need_act:
            from .quant.convert import calibrate_activations

            k = calibrate_activations(model, images, init=self.args.qat_init)
            LOGGER.info(f"{PREFIX}calibrated activation quantizers on {k} batches of {batch} images")
        if self.world_size > 1 and dist.is_initialized():  # every rank must start from rank 0's calibration
            for t in list(model.parameters()) + list(model.buffers()):
                dist.broadcast(t.data, src=0)

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
        ema.criterion = ADACriterion(ema.init_criterion(), self._ada, ema)
        try:
            return super().validate()
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
def _consumer_quantizer(model, layer: int):
    """The activation quantizer that reads layer ``layer``'s output in the Detect head (for qada's r term)."""
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
                return m.act_quant
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
