"""Plugin settings: every key the plugin adds to Ultralytics' flat argument namespace, in one place.

The keys, their validators, the ``key=value`` parsers and the validated :class:`QATConfig` are the one place where a
user's setting is checked, and this package imports no torch. Its modules import strictly downward:

- ``base``: the choice lists, the bit range and :class:`SettingsError`;
- ``values``: the value checks (``as_int``, ``check_bits``, ``parse_bits_budget``, ...);
- ``keys``: the key table :data:`SETTINGS` with :func:`validate_settings` and :func:`help_text`;
- ``config``: :class:`QATConfig`, ``cfg=`` recipes and the cross-key rules;
- ``parsing``: the ``key=value`` parsers.

Each key is a plain Ultralytics-style setting (``key=value`` on the CLI, a keyword in Python, a line in a YAML
recipe). This package defines their defaults, types and allowed values and validates them with messages that say
what to fix.

Examples:
    >>> from ultralytics_gabfusion.settings import PLUGIN_DEFAULTS, validate_settings
    >>> PLUGIN_DEFAULTS["qat"]
    'none'
    >>> validate_settings({"qat": "lsq", "w_bits": 4, "a_bits": 4})["qat"]
    'lsq'
"""

from __future__ import annotations

from .base import (
    ACT_GRIDS,
    ACT_ZPS,
    ADA_ATTNS,
    ADA_DIVS,
    GAB_FORMS,
    GAB_MODES,
    MAX_BITS,
    MIN_BITS,
    OUT_QUANT_METHODS,
    QAT_KERNELS,
    QAT_METHODS,
    QUANT_METHODS,
    SettingsError,
    one_line,
)
from .config import QATConfig, check_consistency, read_recipe, split_overrides, strip_plugin_keys
from .keys import KEYS_BEFORE_THEY_EXISTED, PLUGIN_DEFAULTS, PLUGIN_KEYS, SETTINGS, Setting, help_text, validate_settings
from .parsing import EXPORT_KEYS, parse_command, parse_key_values, unknown_key_error
from .values import (
    SIZE_UNITS,
    as_bool,
    as_float,
    as_int,
    as_int_list,
    as_list,
    as_str_list,
    check_bits,
    check_writable_dir,
    parse_bits_budget,
)

__all__ = [
    "ACT_GRIDS", "ACT_ZPS", "ADA_ATTNS", "ADA_DIVS", "EXPORT_KEYS", "GAB_FORMS", "GAB_MODES",
    "KEYS_BEFORE_THEY_EXISTED", "MAX_BITS", "MIN_BITS", "OUT_QUANT_METHODS", "PLUGIN_DEFAULTS", "PLUGIN_KEYS",
    "QAT_KERNELS", "QAT_METHODS", "QATConfig", "QUANT_METHODS", "SETTINGS",
    "SIZE_UNITS", "Setting", "SettingsError", "as_bool", "as_float", "as_int", "as_int_list", "as_list", "as_str_list",
    "check_bits", "check_consistency", "check_writable_dir", "help_text", "one_line", "parse_bits_budget", "parse_command",
    "parse_key_values", "read_recipe", "split_overrides", "strip_plugin_keys", "unknown_key_error",
    "validate_settings",
]
