"""The plugin's distributed paths in a real 2-process torch.distributed group (gloo, CPU).

Each rank holds different images. Calibration (``qat_setup.calibrate_model``: gather, GABFusion LayerNorm fit,
activation quantizers, broadcast) must leave both ranks with identical quantizer and fusion tensors, equal to one
process calibrating on the union. Three balanced GABFusion updates (``update_fusion``: one all-reduce of the
per-branch squared gradient norms) must leave both ranks with the same lambda as one process whose backward pass
covers the union. The loss is a per-image sum and BatchNorm is frozen, so each image's gradient does not depend on
the others; the all-reduce averages the squared norms over ranks, so ``grad_ema`` is the union's divided by
sqrt(world size), and lambda (a function of log-ratios between branches) is the same.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest
import torch

from conftest import ROOT

WORLD = 2
STEPS = 3

COMMON = r'''
import torch
from ultralytics.nn.tasks import DetectionModel
from ultralytics_gabfusion.fusion import insert_gabfusion, update_fusion
from ultralytics_gabfusion.quant.convert import init_weight_quantizers, quantize_model
from ultralytics_gabfusion.qat_setup import calibrate_model


def build():
    torch.manual_seed(0)
    m = DetectionModel("yolov5n.yaml", nc=16, verbose=False)
    insert_gabfusion(m, mode="balanced")
    quantize_model(m, "lsq", 4, 4, 8, 8, None)
    init_weight_quantizers(m, init="paper")
    m.gab_identity_pending = True
    return m


def images(rank):
    g = torch.Generator().manual_seed(100 + rank)
    return [torch.rand(2, 3, 64, 64, generator=g) for _ in range(2)], [torch.rand(2, 3, 64, 64, generator=g) for _ in range(%(steps)d)]


def tensors(o):
    if isinstance(o, torch.Tensor):
        return [o]
    vals = o.values() if isinstance(o, dict) else o if isinstance(o, (list, tuple)) else []
    return [t for v in vals for t in tensors(v)]


def gab_steps(m, batches):
    m.train()
    for mod in m.modules():  # frozen BN: no coupling between images through batch statistics
        if isinstance(mod, torch.nn.BatchNorm2d):
            mod.eval()
    for x in batches:
        out = m(x)
        loss = sum((t.float() ** 2).sum() for t in tensors(out))
        loss.backward()
        update_fusion(m)
        m.zero_grad(set_to_none=True)


def state(m):
    keep = ("quant", ".lam", ".grad_ema", ".n_updates", ".ln.")
    return {k: v.detach().clone() for k, v in m.state_dict().items() if any(s in k for s in keep)}
''' % {"steps": STEPS}

WORKER = COMMON + r'''
import os, sys
import torch.distributed as dist
rank = int(os.environ["RANK"])
dist.init_process_group("gloo", rank=rank, world_size=int(os.environ["WORLD_SIZE"]))
m = build()
calib, steps = images(rank)
calibrate_model(m, calib, init="paper")
after_calib = state(m)
gab_steps(m, steps)
torch.save({"calib": after_calib, "final": state(m)}, sys.argv[1])
dist.destroy_process_group()
'''


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_calibration_and_gabfusion_match_single_process_on_the_union(tmp_path):
    port = _free_port()
    procs = []
    for r in range(WORLD):
        env = {**os.environ, "PYTHONPATH": str(ROOT), "RANK": str(r), "WORLD_SIZE": str(WORLD),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"}
        procs.append(subprocess.Popen([sys.executable, "-c", WORKER, str(tmp_path / f"rank{r}.pt")], env=env,
                                      cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    for p in procs:
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]

    ns: dict = {}
    exec(COMMON, ns)  # the same model, data and steps in this single process, on the union
    m = ns["build"]()
    per_rank = [ns["images"](r) for r in range(WORLD)]
    union_calib = [torch.cat([c[k] for c, _ in per_rank]) for k in range(2)]
    union_steps = [torch.cat([s[k] for _, s in per_rank]) for k in range(STEPS)]
    ns["calibrate_model"](m, union_calib, init="paper")
    ref_calib = ns["state"](m)
    ns["gab_steps"](m, union_steps)
    ref = ns["state"](m)

    assert any(k.endswith("act_quant.step") for k in ref_calib) and any(k.endswith(".lam") for k in ref)
    for k in ref_calib:  # calibration: bit-identical ranks, equal to the union (same ops on the same batches)
        assert torch.equal(ranks[0]["calib"][k], ranks[1]["calib"][k]), f"ranks differ at {k}"
        torch.testing.assert_close(ranks[0]["calib"][k], ref_calib[k], rtol=1e-5, atol=1e-7, msg=k)
    for k in ref:
        a, b = ranks[0]["final"][k], ranks[1]["final"][k]
        assert torch.equal(a, b), f"ranks differ at {k} after the GABFusion updates"
        if k.endswith(".grad_ema"):
            torch.testing.assert_close(a * WORLD**0.5, ref[k], rtol=1e-4, atol=0, msg=k)
        elif k.endswith(".lam"):
            assert ref[k].abs().max() > 0, "lambda never moved: the test would prove nothing"
            torch.testing.assert_close(a, ref[k], rtol=0, atol=1e-5, msg=k)
        elif k.endswith(".n_updates"):
            assert int(a) == int(ref[k]) == STEPS
