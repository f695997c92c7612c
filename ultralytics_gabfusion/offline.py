"""Offline set-up for scripts, tests and demos: no weight, font, dataset or pip downloads.

Ultralytics reads these variables when it is first imported, so call :func:`setup_offline_env` before importing
``ultralytics`` (or export the same variables in the shell). Nothing is written to the user's global config.

Examples:
    >>> from ultralytics_gabfusion.offline import setup_offline_env
    >>> cfg_dir = setup_offline_env("/tmp/yolo-config")
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path


def setup_offline_env(config_dir: str | os.PathLike | None = None) -> Path:
    """Point Ultralytics at a local config dir with an Arial.ttf and disable online probes and auto-installs.

    Args:
        config_dir (str | PathLike | None): Directory for Ultralytics settings and fonts; default
            ``$YOLO_CONFIG_DIR`` or ``./.yolo_config``.

    Returns:
        (Path): The config directory in use.
    """
    config_dir = Path(config_dir or os.environ.get("YOLO_CONFIG_DIR") or Path.cwd() / ".yolo_config").resolve()
    font_dir = config_dir / "Ultralytics"
    font_dir.mkdir(parents=True, exist_ok=True)
    font = font_dir / "Arial.ttf"
    if not font.exists():
        import matplotlib

        # Any TTF named Arial.ttf stops Ultralytics' font download; matplotlib ships DejaVuSans.
        shutil.copyfile(Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans.ttf", font)
    os.environ["YOLO_CONFIG_DIR"] = str(config_dir)
    os.environ["YOLO_OFFLINE"] = "1"
    os.environ["YOLO_AUTOINSTALL"] = "false"
    return config_dir
