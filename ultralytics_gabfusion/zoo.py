"""FP detectors shipped with the package: a trained starting point for QAT that needs no download.

Each model lives in ``ultralytics_gabfusion/assets/`` as ``<name>.pt`` (an Ultralytics checkpoint, fp16) beside
``<name>.json``, its card: the command that trained it, the generated data set it was trained on (so that set can
be re-made byte for byte), seeds, commit, sha256 and its validation mAP. ``yolo-gab bench models=[<name>]`` and
``model=<name>`` in the demo use them; the card's data settings say which generated set to validate on.

Examples:
    >>> from ultralytics_gabfusion import zoo
    >>> zoo.names()
    ['yolov5n-synth160']
    >>> ckpt = zoo.path("yolov5n-synth160")  # doctest: +SKIP
    >>> zoo.card("yolov5n-synth160")["metrics"]["mAP50"]  # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from pathlib import Path

import torch
from ultralytics import YOLO
from ultralytics.utils import YAML

from .data.synth import make_synthetic_dataset
from .provenance import cpu_name, epochs_run, git_commit

ASSETS = Path(__file__).resolve().parent / "assets"


def names() -> list[str]:
    """Names of the shipped FP models (those with both a checkpoint and a card)."""
    return sorted(p.stem for p in ASSETS.glob("*.json") if (ASSETS / f"{p.stem}.pt").is_file())


def path(name: str) -> Path:
    """The checkpoint of shipped model ``name``.

    Args:
        name (str): A name from :func:`names`.

    Returns:
        (Path): The ``.pt`` file in the package's assets.

    Raises:
        KeyError: ``name`` is not shipped (the message lists the names that are).
    """
    p = ASSETS / f"{name}.pt"
    if not p.is_file() or not (ASSETS / f"{name}.json").is_file():
        raise KeyError(f"'{name}' is not a shipped FP model; shipped: {', '.join(names()) or 'none'}")
    return p


def card(name: str) -> dict:
    """The card of shipped model ``name``: command, data settings, seed, commit, sha256, metrics.

    Args:
        name (str): A name from :func:`names`.

    Returns:
        (dict): The parsed ``<name>.json``.

    Raises:
        KeyError: ``name`` is not shipped.
    """
    path(name)
    return json.loads((ASSETS / f"{name}.json").read_text())


def sha256(file: str | os.PathLike) -> str:
    """Hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(file, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def verify(name: str) -> Path:
    """Return the checkpoint of ``name`` after checking its bytes against the card's sha256.

    Args:
        name (str): A name from :func:`names`.

    Returns:
        (Path): The checked ``.pt`` file.

    Raises:
        KeyError: ``name`` is not shipped.
        ValueError: The file was changed or truncated (reinstall the package, or republish the model).
    """
    p = path(name)
    want = card(name).get("sha256")
    if want and sha256(p) != want:
        raise ValueError(f"{p} does not match the sha256 in its card ({want[:12]}...): the file is damaged or was "
                         f"replaced; reinstall the package or republish it with scripts/train_fp_model.sh")
    return p


def make_data(name: str, out: str | os.PathLike, workers: int | None = None) -> Path:
    """Generate (or reuse) the validation/training set ``name`` was trained on.

    Args:
        name (str): A name from :func:`names`.
        out (str | os.PathLike): Directory of the generated set.
        workers (int | None): Rendering processes (None: the generator's default).

    Returns:
        (Path): The set's data.yaml.
    """
    return make_synthetic_dataset(out, workers=workers, **card(name)["data"])


def publish(run_dir: str | os.PathLike, name: str, command: str, data: dict, max_mb: float = 8.0) -> Path:
    """Copy a finished FP run's ``best.pt`` into the package as shipped model ``name`` and write its card.

    The metrics in the card are measured here, by validating the shipped file itself on the run's val set with the
    run's image size and batch (the same way the tests check it).

    Args:
        run_dir: Ultralytics run directory holding ``weights/best.pt`` and ``args.yaml``.
        name: Asset name (file stem).
        command: The command that trained it, recorded verbatim.
        data: Keyword arguments of :func:`~ultralytics_gabfusion.data.make_synthetic_dataset` that made its data.
        max_mb: Refuse checkpoints larger than this (the package stays small).

    Returns:
        (Path): The shipped checkpoint.
    """
    run = Path(run_dir)
    best = run / "weights" / "best.pt"
    if not best.is_file():
        raise FileNotFoundError(f"{best} not found: the FP run has not finished (rerun scripts/train_fp_model.sh)")
    ckpt = torch.load(best, map_location="cpu", weights_only=False)
    if ckpt.get("optimizer") is not None:
        raise ValueError(f"{best} still holds optimizer state: the run did not finish (Ultralytics strips best.pt "
                         f"when training ends)")
    size = best.stat().st_size / 2**20
    if size > max_mb:
        raise ValueError(f"{best} is {size:.1f} MB, over the {max_mb} MB the package may carry")
    args = YAML.load(run / "args.yaml")
    ASSETS.mkdir(parents=True, exist_ok=True)
    dst = ASSETS / f"{name}.pt"
    tmp = dst.with_name(f".{dst.name}.tmp")
    tmp.write_bytes(best.read_bytes())
    tmp.replace(dst)
    metrics = YOLO(str(dst)).val(data=args["data"], imgsz=args["imgsz"], batch=args["batch"], workers=0,
                                 plots=False, verbose=False, project=str(run / "publish-val"), exist_ok=True)
    rd = metrics.results_dict
    info = {
        "name": name,
        "architecture": Path(str(args["model"])).stem,
        "command": command,
        "data": data,
        "train": {k: args.get(k) for k in ("epochs", "imgsz", "batch", "optimizer", "lr0", "seed", "deterministic")},
        "epochs_run": epochs_run(run),
        "val": {"imgsz": args["imgsz"], "batch": args["batch"], "split": "val"},
        "metrics": {"mAP50": round(float(rd["metrics/mAP50(B)"]), 5),
                    "mAP50_95": round(float(rd["metrics/mAP50-95(B)"]), 5)},
        "sha256": sha256(dst),
        "bytes": dst.stat().st_size,
        "commit": (git_commit() or "")[:7] or None,
        "hardware": f"CPU {cpu_name()}, {os.cpu_count()} cores",
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    (ASSETS / f"{name}.json").write_text(json.dumps(info, indent=2) + "\n")
    return dst


def _main(argv: list[str]) -> int:
    """``python -m ultralytics_gabfusion.zoo publish RUN_DIR NAME 'COMMAND' key=value...`` (data settings)."""
    if len(argv) < 4 or argv[0] != "publish":
        print("usage: python -m ultralytics_gabfusion.zoo publish RUN_DIR NAME 'COMMAND' n_train=.. n_val=.. "
              "imgsz=.. seed=.. max_objects=.. min_size=..", file=sys.stderr)
        return 2
    data = {k: int(v) for k, v in (a.split("=", 1) for a in argv[4:])}
    print(publish(argv[1], argv[2], argv[3], data))
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
