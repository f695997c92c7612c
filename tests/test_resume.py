"""Kill and resume, atomic checkpoints, and recovery from a non-finite loss, on a QAT run with GABFusion and ADA.

A run killed with SIGKILL (in the middle of epoch 2, or while it writes last.pt at the end of epoch 2) and resumed
must end in exactly the state of an uninterrupted run of the same seed: training weights with every quantizer step
and GABFusion buffer, EMA weights and optimizer state, bit for bit on CPU.
"""

from __future__ import annotations

import math
from copy import deepcopy
from pathlib import Path

import pytest
import torch

from conftest import ROOT, run_python, train_kwargs

QAT = dict(qat="lsq", w_bits=4, a_bits=4, gab="balanced", ada=0.01, qat_calib=1)


@pytest.fixture(scope="module")
def fp_pt(tmp_path_factory) -> Path:
    """An untrained yolov5n FP checkpoint (16 classes): the QAT start and the ADA teacher."""
    from ultralytics.nn.tasks import DetectionModel
    from ultralytics.utils import DEFAULT_CFG_DICT

    torch.manual_seed(0)
    m = DetectionModel("yolov5n.yaml", nc=16, verbose=False)
    f = tmp_path_factory.mktemp("resume-fp") / "fp.pt"
    torch.save({"epoch": -1, "model": m.half(), "train_args": {**DEFAULT_CFG_DICT, "imgsz": 64}}, f)
    return f


def _kw(tmp: Path, fp: Path, data: Path, epochs: int = 2, **plugin) -> dict:
    # nbs == batch: one optimizer step per batch, so no gradient is half-accumulated across the epoch boundary
    return dict(model=str(fp), data=str(data), **train_kwargs(tmp, epochs=epochs, batch=8, nbs=8, val=False),
                **{**QAT, **plugin})


def _state(trainer) -> dict:
    """fp32 copies of everything a continuation depends on."""
    from ultralytics.utils.torch_utils import unwrap_model

    return {"model": deepcopy(unwrap_model(trainer.model).state_dict()),
            "ema": deepcopy(trainer.ema.ema.state_dict()),
            "optimizer": deepcopy(trainer.optimizer.state_dict()["state"]),
            "results": (Path(trainer.save_dir) / "results.csv").read_text()}


def _capture_end(trainer, out: dict):
    def cb(t):
        if t.epoch == t.epochs - 1:
            out.update(_state(t))

    trainer.add_callback("on_fit_epoch_end", cb)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, fp_pt, tiny_data) -> dict:
    from ultralytics_gabfusion import GABTrainer

    t = GABTrainer(overrides=_kw(tmp_path_factory.mktemp("ref"), fp_pt, tiny_data))
    out = {}
    _capture_end(t, out)
    t.train()
    return out


KILLERS = {
    # SIGKILL after the first batch of epoch 2 (epoch index 1)
    "mid-epoch-2": """
def kill(t):
    if t.epoch == 1:
        os.kill(os.getpid(), signal.SIGKILL)
trainer.add_callback("on_train_batch_end", kill)
""",
    # SIGKILL halfway through writing the checkpoint bytes at the end of epoch 2
    "during-save-of-epoch-2": """
_write = pathlib.Path.write_bytes
def write_bytes(self, data):
    if trainer.epoch == 1 and self.name.startswith("last.pt"):
        with open(self, "wb") as f:
            f.write(data[: len(data) // 2]); f.flush()
        os.kill(os.getpid(), signal.SIGKILL)
    return _write(self, data)
pathlib.Path.write_bytes = write_bytes
""",
}


@pytest.mark.parametrize("when", list(KILLERS))
def test_sigkill_then_resume_matches_uninterrupted_run(when, tmp_path, fp_pt, tiny_data, reference):
    from ultralytics.utils.patches import torch_load

    from ultralytics_gabfusion import GABTrainer

    kw = _kw(tmp_path, fp_pt, tiny_data)
    code = (f"import os, signal, pathlib\nfrom ultralytics_gabfusion import GABTrainer\n"
            f"trainer = GABTrainer(overrides={kw!r})\n{KILLERS[when]}\ntrainer.train()\n")
    res = run_python(code, timeout=600)
    assert res.returncode == -9, f"the run was not killed: rc={res.returncode}\n{res.stderr[-3000:]}"
    last = tmp_path / "run" / "weights" / "last.pt"
    ckpt = torch_load(last, map_location="cpu")  # readable: the interrupted save never touched it
    assert ckpt["epoch"] == 0 and "gab_resume" in ckpt
    if when.startswith("during-save"):
        assert (last.parent / "last.pt.tmp").exists(), "the kill should have hit the temporary file"

    t = GABTrainer(overrides={"resume": str(last)})
    out = {}
    _capture_end(t, out)
    t.train()
    for part in ("model", "ema"):
        ref, got = reference[part], out[part]
        assert ref.keys() == got.keys()
        bad = [k for k in ref if not torch.equal(ref[k], got[k])]
        assert not bad, f"{part} differs from the uninterrupted run at {bad[:5]} ({len(bad)} tensors)"
    assert any(".lam" in k for k in out["model"]) and any("step" in k for k in out["model"])  # fusion + quantizers
    for i, (a, b) in enumerate(zip(reference["optimizer"].values(), out["optimizer"].values())):
        for k in a:
            assert torch.equal(torch.as_tensor(a[k]), torch.as_tensor(b[k])), f"optimizer state {i}/{k} differs"
    ref_rows = [r.split(",") for r in reference["results"].strip().splitlines()]
    got_rows = [r.split(",") for r in out["results"].strip().splitlines()]
    assert len(got_rows) == 3
    cols = ref_rows[0]
    losses = [j for j, c in enumerate(cols) if c.strip().startswith("train/")]
    for j in losses:  # epoch 2's losses are those of the uninterrupted run
        assert float(got_rows[2][j]) == pytest.approx(float(ref_rows[2][j]), rel=1e-6), cols[j]
    tcol = cols.index("time")
    assert float(got_rows[2][tcol]) > float(got_rows[1][tcol]), "results.csv time must continue after resume"


def test_nan_loss_recovers_quantizer_and_fusion_state(tmp_path, fp_pt, tiny_data):
    """Ultralytics reloads last.pt after a non-finite epoch loss: quantizer steps and GABFusion buffers come back too
    (they are in the checkpointed state), and training continues to the end."""
    from ultralytics.utils.torch_utils import unwrap_model

    from ultralytics_gabfusion import GABTrainer

    t = GABTrainer(overrides=_kw(tmp_path, fp_pt, tiny_data, epochs=3))
    saved, seen = {}, {}

    def remember(tr):  # the state last.pt holds after epoch 1
        if tr.epoch == 0:
            saved.update({k: v.detach().clone() for k, v in unwrap_model(tr.model).state_dict().items()
                          if k.endswith((".step", ".lam", ".grad_ema", ".n_updates"))})

    def poison(tr):  # epoch 2: a step of the training model goes bad and the epoch's last loss is NaN
        if tr.epoch == 1 and not seen.get("poisoned"):
            seen["poisoned"] = True
            q = next(v for k, v in unwrap_model(tr.model).state_dict().items() if k.endswith(".step"))
            q.fill_(123.0)
            tr.loss = torch.tensor(float("nan"))

    def after_recovery(tr):
        if tr.epoch == 1 and seen.get("poisoned") and "restored" not in seen:
            seen["restored"] = {k: v.detach().clone() for k, v in unwrap_model(tr.model).state_dict().items() if k in saved}

    t.add_callback("on_model_save", remember)
    t.add_callback("on_train_epoch_end", poison)
    t.add_callback("on_train_epoch_start", after_recovery)
    t.train()
    assert seen.get("poisoned") and "restored" in seen, "no recovery happened"
    assert t.nan_recovery_attempts == 0 and t.epoch == 2, "training must continue to the last epoch"
    assert saved and any(k.endswith(".lam") for k in saved)
    for k, v in saved.items():
        assert torch.equal(seen["restored"][k].float(), v.float()), f"{k} was not restored from last.pt"
    lines = (Path(t.save_dir) / "results.csv").read_text().strip().splitlines()
    assert len(lines) == 4 and all(math.isfinite(float(x)) for x in lines[-1].split(",")[1:4])


def test_collapsed_quantizer_step_stops_with_a_clear_message(tmp_path, fp_pt, tiny_data):
    """An activation step driven to zero maps its input to 0 (no NaN, just a dead layer): it is reported by name with
    what to change. In the first epoch there is no last.pt to go back to, so training stops. A raw step that only
    changed sign is a valid step (quantizers use |step|) and is not reported."""
    from ultralytics.utils.torch_utils import unwrap_model

    from ultralytics_gabfusion import GABTrainer
    from ultralytics_gabfusion.trainer import quantizer_problems

    t = GABTrainer(overrides=_kw(tmp_path, fp_pt, tiny_data, epochs=1, ada=0.0, gab="off"))

    def collapse(tr):
        steps = [(k, v) for k, v in unwrap_model(tr.model).named_parameters() if k.endswith("act_quant.step")]
        steps[0][1].data.fill_(-0.25)  # sign flip: fine
        steps[1][1].data.fill_(0.0)  # collapse
        tr.collapsed = (steps[0][0], steps[1][0])

    t.add_callback("on_train_epoch_end", collapse)
    with pytest.raises(FloatingPointError, match="qat_lr") as e:
        t.train()
    flipped, collapsed = t.collapsed
    assert collapsed in str(e.value) and flipped not in str(e.value)
    assert len(quantizer_problems(unwrap_model(t.model))) == 1
