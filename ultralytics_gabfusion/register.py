"""Register ``GABFusion`` with Ultralytics' YAML parser as soon as both this package and Ultralytics are loaded.

``import ultralytics_gabfusion`` must be enough for ``YOLO("yolov5s-gab.yaml")``, yet the package import has to stay
free of torch and Ultralytics (``yolo-gab synth`` and the data generator never need them). The registration
(``fusion.register_gabfusion``, run by importing :mod:`ultralytics_gabfusion.fusion`) replaces
``ultralytics.nn.tasks.parse_model``; every model build looks that name up at call time, so it covers ``YOLO``
objects created before or after it. So :func:`install` registers at once when ``ultralytics.nn.tasks`` is already
imported (torch is then loaded anyway: the fusion import is cheap), and otherwise leaves a one-shot import hook
that registers right after ``ultralytics.nn.tasks`` finishes executing, whoever imports it. The hook then imports
only what ``tasks`` itself has already loaded (torch, ``ultralytics.nn.modules``, ``ultralytics.utils``), so it is
safe in the middle of Ultralytics' own import chain. A process that never imports Ultralytics never pays for it.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys

TASKS = "ultralytics.nn.tasks"  # the module whose parse_model the registration wraps


def _register() -> None:
    importlib.import_module(f"{__package__}.fusion")  # its import runs register_gabfusion() (idempotent)


class _AfterTasksImport(importlib.abc.MetaPathFinder):
    """Meta-path finder that adds :func:`_register` to the end of ``ultralytics.nn.tasks``' execution, once."""

    def find_spec(self, fullname, path, target=None):
        """Return the normal spec of ``ultralytics.nn.tasks`` with a registering ``exec_module``; None otherwise."""
        if fullname != TASKS:
            return None
        _uninstall()  # one shot, and lets the normal finders below find the real spec
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        run = spec.loader.exec_module

        def exec_module(module):
            run(module)
            _register()

        # Patched on this spec's own loader instance (not wrapped), so module.__loader__ stays the real loader
        # and tracebacks, inspect.getsource and pickling by reference see nothing unusual.
        spec.loader.exec_module = exec_module
        return spec


_HOOK = _AfterTasksImport()


def _uninstall() -> None:
    if _HOOK in sys.meta_path:
        sys.meta_path.remove(_HOOK)


def install() -> None:
    """Register ``GABFusion`` now if ``ultralytics.nn.tasks`` is imported, else when it is (idempotent)."""
    if hasattr(sys.modules.get(TASKS), "parse_model"):  # fully executed, not half-way through its own import
        _register()
    elif _HOOK not in sys.meta_path:
        sys.meta_path.insert(0, _HOOK)  # ahead of the path finder, which would otherwise load tasks unhooked
