"""The paper's diagnostic: per-node deep/shallow gradient-norm ratio and alpha, logged per epoch.

Rows go to ``<save_dir>/gabfusion.csv``; at the end of training ``gabfusion.png`` (ratio and alpha per node over
epochs) is written next to Ultralytics' plots and a one-line summary per node is logged. Gradient norms are the
nodes' ``grad_ema`` (measured in every mode, also "learned" and "off"), so the trainer must call
``update_fusion`` once per optimizer step.

Examples:
    >>> from ultralytics_gabfusion.fusion import FusionTelemetry
    >>> tel = FusionTelemetry()
    >>> tel.attach(trainer)  # registers on_train_epoch_end / on_train_end  # doctest: +SKIP
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

from ultralytics.utils import LOGGER, RANK

from .graph import fusion_nodes

COLUMNS = ("epoch", "layer", "branch", "source_layer", "role", "grad_ema", "alpha", "deep_shallow_ratio", "mode")


def _sources(node) -> list[int]:
    """Absolute layer index of each input (-1 and other negative 'from' entries resolved as parse_model does)."""
    i, f = int(getattr(node, "i", 0)), getattr(node, "f", None)
    f = list(f) if isinstance(f, (list, tuple)) else list(range(-node.n_branches, 0))
    return [i + j if j < 0 else j for j in f]


def node_rows(model, epoch: int) -> list[dict]:
    """Telemetry rows of every GABFusion in ``model`` for ``epoch``.

    Deep branch = the input from the most recent layer (largest source index: the upsampled or strided path);
    the others are shallow (skips). ``deep_shallow_ratio = grad_ema[deep] / mean(grad_ema[shallow])``, NaN until
    the first update.
    """
    rows = []
    for node in fusion_nodes(model):
        src = _sources(node)
        deep = max(range(len(src)), key=lambda k: src[k])
        g = [float(v) for v in node.grad_ema.detach().cpu()]
        a = [float(v) for v in node.alpha.cpu()]
        sh = [g[k] for k in range(len(g)) if k != deep]
        mean_sh = sum(sh) / len(sh) if sh else float("nan")
        ratio = g[deep] / mean_sh if sh and mean_sh > 0 and int(node.n_updates) > 0 else float("nan")
        for k in range(len(src)):
            rows.append(
                {
                    "epoch": epoch,
                    "layer": int(getattr(node, "i", -1)),
                    "branch": k,
                    "source_layer": src[k],
                    "role": "deep" if k == deep else "shallow",
                    "grad_ema": g[k],
                    "alpha": a[k],
                    "deep_shallow_ratio": ratio,
                    "mode": node.mode,
                }
            )
    return rows


def _is_main_process() -> bool:
    return RANK in {-1, 0}


class FusionTelemetry:
    """Ultralytics callbacks that log GABFusion balance per epoch (only RANK -1/0 writes).

    Args:
        csv_name (str): CSV file name inside ``trainer.save_dir``.
        png_name (str): Plot file name inside ``trainer.save_dir``.

    Examples:
        >>> from types import SimpleNamespace
        >>> tel = FusionTelemetry()
        >>> fake = SimpleNamespace(save_dir=Path("runs/x"), model=model, epoch=0)  # doctest: +SKIP
        >>> tel.on_train_epoch_end(fake)  # appends rows to runs/x/gabfusion.csv  # doctest: +SKIP
        >>> tel.on_train_end(fake)  # writes runs/x/gabfusion.png and logs a summary  # doctest: +SKIP
    """

    def __init__(self, csv_name: str = "gabfusion.csv", png_name: str = "gabfusion.png"):
        self.csv_name, self.png_name = csv_name, png_name

    def attach(self, trainer) -> FusionTelemetry:
        """Register ``on_train_epoch_end`` and ``on_train_end`` on an Ultralytics trainer."""
        trainer.add_callback("on_train_epoch_end", self.on_train_epoch_end)
        trainer.add_callback("on_train_end", self.on_train_end)
        return self

    def on_train_epoch_end(self, trainer) -> list[dict]:
        """Append this epoch's rows (epoch numbered from 1 like results.csv) for every node of ``trainer.model``."""
        rows = node_rows(trainer.model, int(trainer.epoch) + 1)
        if not rows or not _is_main_process():
            return rows
        path = Path(trainer.save_dir) / self.csv_name
        path.parent.mkdir(parents=True, exist_ok=True)
        new = not path.exists() or path.stat().st_size == 0
        with open(path, "a", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=COLUMNS)
            if new:
                w.writeheader()
            w.writerows(rows)
        return rows

    def read(self, save_dir) -> dict:
        """Read the CSV into ``{layer: {"epochs": [...], "ratio": [...], "alpha": {branch: [...]}, ...}}``.

        The last row of a repeated (epoch, layer, branch) wins (resumed runs rewrite epochs).
        """
        path = Path(save_dir) / self.csv_name
        if not path.exists():
            return {}
        last = {}
        with open(path, newline="") as fh:
            for r in csv.DictReader(fh):
                last[(int(r["epoch"]), int(r["layer"]), int(r["branch"]))] = r
        out = {}
        for (ep, layer, br), r in sorted(last.items()):
            d = out.setdefault(layer, {"epochs": [], "ratio": [], "alpha": {}, "role": {}, "source": {}, "mode": ""})
            if not d["epochs"] or d["epochs"][-1] != ep:
                d["epochs"].append(ep)
                d["ratio"].append(float(r["deep_shallow_ratio"]))
            d["alpha"].setdefault(br, []).append(float(r["alpha"]))
            d["role"][br], d["source"][br], d["mode"] = r["role"], int(r["source_layer"]), r["mode"]
        return out

    def on_train_end(self, trainer):
        """Write the ratio/alpha plot next to Ultralytics' plots and log a per-node summary."""
        if not _is_main_process():
            return None

        data = self.read(trainer.save_dir)
        if not data:
            return None
        png = Path(trainer.save_dir) / self.png_name
        self.plot(data, png)
        LOGGER.info(f"GABFusion summary ({png.name}; ratio = deep/shallow gradient norm, balanced ~ 1):")
        for layer, d in data.items():
            alpha = ", ".join(f"{d['role'][b]}({d['source'][b]})={v[-1]:.3f}" for b, v in sorted(d["alpha"].items()))
            r = d["ratio"][-1]
            LOGGER.info(f"  layer {layer} [{d['mode']}]: alpha {alpha}; ratio {'n/a' if math.isnan(r) else f'{r:.3f}'}")
        return png

    @staticmethod
    def plot(data: dict, path: Path):
        """Two panels: deep/shallow ratio per node, and alpha per node and branch, over epochs (Agg, no pyplot)."""
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        fig = Figure(figsize=(10, 4), tight_layout=True)
        FigureCanvasAgg(fig)
        ax1, ax2 = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
        for layer, d in data.items():
            ax1.plot(d["epochs"], d["ratio"], marker=".", label=f"layer {layer}")
            for b, v in sorted(d["alpha"].items()):
                ax2.plot(d["epochs"][: len(v)], v, marker=".", ls="-" if d["role"][b] == "deep" else "--",
                         label=f"{layer} {d['role'][b]} ({d['source'][b]})")
        ax1.axhline(1.0, color="gray", lw=0.8, ls=":")
        ax1.set(title="deep / shallow gradient norm", xlabel="epoch", ylabel="ratio")
        ax2.set(title="alpha = softmax(lambda)", xlabel="epoch", ylabel="alpha")
        ax1.legend(fontsize=7)
        ax2.legend(fontsize=6, ncol=2)
        fig.savefig(path, dpi=150)
