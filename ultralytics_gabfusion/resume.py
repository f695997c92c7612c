"""Exact resume of QAT runs: atomic checkpoint writes, the fp32 training state and the RNG streams.

Ultralytics keeps only the fp16 EMA and an fp16 optimizer in ``last.pt`` and restarts a resumed run from the EMA
weights. :class:`~ultralytics_gabfusion.trainer.GABTrainer` adds ``gab_resume`` (:func:`resume_state`) so an
interrupted run continues bit for bit, writes checkpoints atomically (:func:`atomic_replace`) and shuffles with a
generator it can restore (:func:`own_shuffle_generator`).
"""

from __future__ import annotations

import contextlib
import os
import random
from copy import deepcopy
from pathlib import Path

import numpy as np
import torch
from ultralytics.utils.patches import torch_load
from ultralytics.utils.torch_utils import unwrap_model


def atomic_replace(tmp: Path, dst: Path) -> None:
    """Flush ``tmp`` to disk and rename it over ``dst`` (atomic on POSIX and Windows): readers see old or new."""
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


def shuffle_generator(loader):
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
    def fp32(sd):
        return {k: v.detach().clone() for k, v in sd.items()}

    gen = shuffle_generator(trainer.train_loader)
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
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(state: dict) -> None:
    """Restore :func:`get_rng_state`'s output (CUDA states only when the device count matches)."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda")
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)


@contextlib.contextmanager
def rng_fork(seed: int):
    """Run the block with Python, NumPy and torch seeded by ``seed``, then put every random stream back as it was.

    What the block draws is the same in a fresh and in a resumed run, and the run's own streams are untouched by it.

    Examples:
        >>> with rng_fork(0):
        ...     a = torch.rand(1)
        >>> with rng_fork(0):
        ...     b = torch.rand(1)
        >>> bool(a == b)
        True
    """
    state = get_rng_state()
    try:
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)
        yield
    finally:
        set_rng_state(state)


def truncate_results(csv: Path, last_epoch: int) -> None:
    """Keep the header and the rows of epochs <= ``last_epoch`` (1-based, as written) of a results.csv."""
    lines = csv.read_text().splitlines(keepends=True)
    keep = lines[:1] + [ln for ln in lines[1:] if ln.strip() and float(ln.split(",", 1)[0]) <= last_epoch]
    if len(keep) != len(lines):
        tmp = csv.with_name(csv.name + ".tmp")
        tmp.write_text("".join(keep))
        atomic_replace(tmp, csv)


def drop_resume_state(f: Path) -> None:
    """Remove ``gab_resume`` from a finished checkpoint (rewritten atomically)."""
    ckpt = torch_load(f, map_location="cpu")
    if isinstance(ckpt, dict) and "gab_resume" in ckpt:
        del ckpt["gab_resume"]
        tmp = f.with_name(f.name + ".tmp")
        torch.save(ckpt, tmp)
        atomic_replace(tmp, f)


__all__ = ["EpochShuffleSampler", "atomic_replace", "drop_resume_state", "get_rng_state", "own_shuffle_generator",
           "resume_state", "set_rng_state", "shuffle_generator", "rng_fork", "truncate_results"]
