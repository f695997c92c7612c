"""The ``key=value`` parsers of ``yolo-gab``: tokens to typed values, and a whole command line to (mode, overrides)."""

from __future__ import annotations

import difflib

from .base import SettingsError
from .config import read_recipe
from .keys import PLUGIN_KEYS, validate_settings

# Keys of ``yolo-gab export`` for quantized models (see export/command.py); not Ultralytics or training keys.
EXPORT_KEYS = ("zero_point", "int4", "silu")


def parse_key_values(tokens) -> dict:
    """Parse ``key=value`` tokens the way ``yolo`` does (``--key=value`` and ``key = value`` accepted).

    Values are typed by Ultralytics' own rules, so ``bits=[4,3]``, ``seed=0`` and ``device=0`` mean what they mean
    to ``yolo``; later tokens win.

    Args:
        tokens: Tokens, e.g. ``["methods=[lsq,n2uq]", "bits=4"]``.

    Returns:
        (dict): ``{key: parsed value}``.

    Raises:
        SettingsError: A token without ``=`` or whose value cannot be parsed.

    Examples:
        >>> parse_key_values(["bits=[4,3]", "--epochs=2"])
        {'bits': [4, 3], 'epochs': 2}
    """
    from ultralytics.cfg import merge_equals_args, parse_key_value_pair  # keeps `settings` importable without torch

    out = {}
    for a in merge_equals_args(list(tokens)):
        a = a[2:] if a.startswith("--") else a
        a = a[:-1] if a.endswith(",") else a
        if "=" not in a:
            raise SettingsError(f"'{a}' is not a key=value pair (e.g. epochs=3).")
        try:
            k, v = parse_key_value_pair(a)
        except (AssertionError, NameError, ValueError, SyntaxError) as e:
            raise SettingsError(f"could not parse '{a}': {e}") from None
        out[k] = v
    return out


def parse_command(argv: list[str]) -> tuple[str | None, dict]:
    """Parse ``yolo``-style tokens into (mode, overrides), reading ``cfg=`` first and letting explicit keys win.

    Args:
        argv (list[str]): Tokens after the program name, e.g. ``["train", "model=x.pt", "epochs=3"]``.

    Returns:
        (tuple[str | None, dict]): The mode (or None) and the overrides, plugin keys included.

    Raises:
        SettingsError: On unknown keys (with the closest valid key), missing '=' or bad values.
    """
    from ultralytics.cfg import MODES, TASKS, merge_equals_args, parse_key_value_pair  # settings stays torch-free
    from ultralytics.utils import DEFAULT_CFG_DICT

    mode, overrides, recipe = None, {}, {}
    for a in merge_equals_args(argv):
        a = a[2:] if a.startswith("--") else a
        a = a[:-1] if a.endswith(",") else a
        if "=" in a:
            try:
                k, v = parse_key_value_pair(a)
            except (NameError, SyntaxError, ValueError, AssertionError) as e:
                raise SettingsError(f"could not parse '{a}': {e}") from None
            if k == "cfg" and v is not None:
                try:
                    recipe = read_recipe(v)
                except (FileNotFoundError, ValueError) as e:
                    raise SettingsError(str(e)) from None
            else:
                overrides[k] = v
        elif a in MODES:
            mode = a
        elif a in TASKS:
            overrides["task"] = a
        elif a in DEFAULT_CFG_DICT and isinstance(DEFAULT_CFG_DICT[a], bool):
            overrides[a] = True  # bare boolean flag, e.g. 'resume'
        else:
            raise SettingsError(f"'{a}' is not a mode or key=value pair.{_suggest(a)}")
    overrides = {**recipe, **overrides}
    valid = set(DEFAULT_CFG_DICT) | set(PLUGIN_KEYS) | {"trainer", "task", "save_dir", "file"}
    if mode == "export":
        valid |= set(EXPORT_KEYS)
    bad = [k for k in overrides if k not in valid]
    if bad:
        raise SettingsError("\n".join(f"'{k}' is not a valid yolo-gab argument.{_suggest(k)}" for k in bad))
    try:
        validate_settings(overrides)
    except ValueError as e:
        raise SettingsError(str(e)) from None
    return mode, overrides


def _suggest(key: str) -> str:
    from ultralytics.utils import DEFAULT_CFG_DICT  # settings stays torch-free

    close = difflib.get_close_matches(key, list(DEFAULT_CFG_DICT) + sorted(PLUGIN_KEYS) + ["trainer"], n=3)
    return f" Similar arguments: {', '.join(close)}." if close else " Run 'yolo-gab help' for the plugin keys."


def unknown_key_error(key: str, valid, command: str) -> SettingsError:
    """A :class:`SettingsError` for an unknown key of ``yolo-gab COMMAND`` that names the closest valid key."""
    close = difflib.get_close_matches(key, sorted(valid), n=1, cutoff=0.5)
    hint = f" Did you mean '{close[0]}'?" if close else f" Run 'yolo-gab {command} help' for the keys."
    return SettingsError(f"'{key}' is not a valid '{command}' key.{hint}")
