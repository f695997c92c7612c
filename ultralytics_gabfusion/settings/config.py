"""The validated :class:`QATConfig` of one run, ``cfg=`` recipes, cross-key rules and the split of plugin keys."""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import yaml

from .base import OUT_QUANT_METHODS, SettingsError
from .keys import PLUGIN_DEFAULTS, PLUGIN_KEYS, SETTINGS, validate_settings


@dataclass(frozen=True)
class QATConfig:
    """The plugin's keys for one run, validated once (each value normalised, cross-key rules checked).

    Built from the user's keys by :meth:`from_keys` (defaults from :data:`SETTINGS`, the one place they are written);
    the model set-up (:mod:`ultralytics_gabfusion.qat_setup`) and the trainer read it by name. Field names are the
    plugin keys of :data:`SETTINGS`.

    Examples:
        >>> cfg = QATConfig.from_keys({"qat": "LSQ", "w_bits": 3, "a_bits": 3, "gab": "balanced"})
        >>> cfg.qat, cfg.w_bits, cfg.gab, cfg.quantized
        ('lsq', 3, 'balanced', True)
    """

    qat: str
    w_bits: int
    a_bits: int
    qat_first_bits: int
    qat_head_bits: int
    qat_skip: tuple | None
    qat_layer_bits: Any
    qat_bits_budget: Any
    qat_calib: int
    qat_init: str
    qat_act_grid: str
    qat_act_zp: str
    qat_out_bits: int
    qat_lr: float
    qat_kernel: str
    qat_bn: str
    qat_bn_recalib: int
    qat_ema_tau: Any
    gab: str
    gab_beta: float
    gab_eta: float
    gab_eps: float
    gab_tau: tuple | None
    gab_rms: bool
    gab_form: str | None
    gab_calib: bool
    ada: float
    ada_attn: str
    ada_div: str
    ada_layers: tuple | None
    ada_t: float | None
    teacher: str | None

    @classmethod
    def from_keys(cls, values) -> "QATConfig":
        """Validate the plugin keys of ``values`` (a dict or a namespace such as ``trainer.args``); defaults fill in.

        Raises:
            SettingsError: A bad value or contradicting keys, saying which key to change.
        """
        d = dict(values) if isinstance(values, dict) else dict(vars(values))
        v = {**PLUGIN_DEFAULTS, **validate_settings({k: d[k] for k in SETTINGS if k in d})}
        check_consistency(v)
        for k in ("qat_skip", "gab_tau", "ada_layers"):  # hashable and immutable, like the config itself
            v[k] = None if v[k] is None else tuple(v[k])
        return cls(**v)

    def as_dict(self) -> dict:
        """The keys and values as plain Python (lists, not tuples), as they are written to args.yaml."""
        return {f.name: list(v) if isinstance(v, tuple) else v
                for f in fields(self) for v in (getattr(self, f.name),)}

    @property
    def quantized(self) -> bool:
        """Whether convs are fake-quantized (``qat`` is not ``none``)."""
        return self.qat != "none"

    @property
    def fusion_options(self) -> dict:
        """Keyword arguments of GABFusion's balanced update (``gab_*`` keys)."""
        return {"beta": self.gab_beta, "eta": self.gab_eta, "eps": self.gab_eps,
                "tau": None if self.gab_tau is None else list(self.gab_tau), "rms": self.gab_rms}


assert [f.name for f in fields(QATConfig)] == list(SETTINGS), "QATConfig fields must be the plugin keys, in order"


def read_recipe(path) -> dict:
    """Read a ``cfg=`` recipe: a YAML file of ``key: value`` pairs (its own ``cfg`` key is ignored).

    Raises:
        FileNotFoundError: The file does not exist.
        ValueError: Not a .yaml file, not parseable, or not a mapping.

    Examples:
        >>> read_recipe("cfg/qat/w4a4-lsq.yaml")["qat"]  # doctest: +SKIP
        'lsq'
    """
    p = Path(str(path))
    hint = "Pass a recipe YAML of key: value pairs, e.g. cfg=cfg/qat/w4a4-lsq.yaml"
    if not p.is_file():
        raise FileNotFoundError(f"cfg={path}: file not found. {hint}")
    if p.suffix not in (".yaml", ".yml"):
        raise SettingsError(f"cfg={path} is not a .yaml file. {hint}")

    try:
        recipe = yaml.safe_load(p.read_text(errors="replace"))
    except yaml.YAMLError as e:
        raise SettingsError(f"cfg={path} is not valid YAML ({str(e).splitlines()[0]}). {hint}") from None
    if recipe is None:
        return {}
    if not isinstance(recipe, dict):
        raise SettingsError(f"cfg={path} holds a {type(recipe).__name__}, not key: value pairs. {hint}")
    return {k: v for k, v in recipe.items() if k != "cfg"}


def check_consistency(args) -> None:
    """Cross-key checks that a single key's validator cannot do.

    Args:
        args: Namespace or dict holding the plugin keys.

    Raises:
        ValueError: When keys contradict each other, saying which key to change.
    """
    get = args.get if isinstance(args, dict) else (lambda k, d=None: getattr(args, k, d))
    layer_bits, budget = get("qat_layer_bits"), get("qat_bits_budget")
    if isinstance(layer_bits, str) and budget is None:
        raise SettingsError(f"'qat_layer_bits={layer_bits}' (a sensitivity CSV) needs qat_bits_budget= (average bits such "
                         "as 4.5, or a model size such as 600KB).")
    if budget is not None and not isinstance(layer_bits, str):
        raise SettingsError("'qat_bits_budget' applies to qat_layer_bits=<sensitivity.csv>; pass that CSV, or drop the "
                         "budget when giving a {layer: bits} mapping.")
    if get("gab") == "learned" and get("gab_form") == "grad":
        raise SettingsError("'gab=learned' trains alpha through the forward pass, which 'gab_form=grad' leaves untouched: "
                            "use gab_form=paper with gab=learned, or gab=balanced.")
    if get("qat_out_bits"):
        if get("qat") in (None, "none"):
            raise SettingsError("'qat_out_bits=8' quantizes the outputs of quantized convs: set qat=lsq|lsqplus too, "
                                "or drop qat_out_bits.")
        if get("qat") not in OUT_QUANT_METHODS:
            raise SettingsError(f"'qat_out_bits=8' needs integer zero points on both grids of a conv, which integer "
                                f"kernels consume; {get('qat')}'s {'thresholds' if get('qat') == 'n2uq' else 'DoReFa weight grid'} "
                                "has none: use qat=lsq|lsqplus, or qat_out_bits=0.")
        if get("qat_act_zp") == "float":
            raise SettingsError("'qat_out_bits=8' needs qat_act_zp=integer (a float grid offset keeps the convs off "
                                "integer kernels): drop qat_act_zp=float, or qat_out_bits=0.")
    if get("ada_attn") == "qada" and get("qat") == "none" and (get("ada") or 0) > 0:
        raise SettingsError("'ada_attn=qada' uses the student's quantizers: set qat=lsq|lsqplus|pact|n2uq or ada_attn=simam.")


def split_overrides(overrides: dict) -> tuple[dict, dict]:
    """Split a flat override dict into (plugin keys, Ultralytics keys)."""
    ours = {k: v for k, v in overrides.items() if k in PLUGIN_KEYS}
    theirs = {k: v for k, v in overrides.items() if k not in PLUGIN_KEYS}
    return ours, theirs


def strip_plugin_keys(args) -> dict:
    """Return Ultralytics-only args as a dict (for components that re-validate, such as validators)."""
    d = dict(vars(args)) if not isinstance(args, dict) else dict(args)
    return {k: v for k, v in d.items() if k not in PLUGIN_KEYS}
