"""Measure activation grids on a trained FP detector: per-layer quantization MSE and PTQ mAP50 per grid.

Part 1 (MSE): the FP input of every conv (except the first, which reads the image) is captured on validation images;
each is quantized per tensor at ``bits`` with LSQ (step by the MSE line search of ``qat_init=mse``) and PACT (its
99.9th-percentile init) on four grids:

- ``signed``: LSQ ``[-2^(b-1), 2^(b-1)-1]*s``; PACT ``[-alpha, alpha]``;
- ``unsigned``: LSQ ``[0, 2^b-1]*s``; PACT ``[0, alpha]`` (negative inputs clip to 0);
- ``offset``: the unsigned grid shifted by a fixed float offset of the SiLU minimum (-0.2785);
- ``zp``: LSQ only, the unsigned integer grid with the integer zero point ``z = ceil(0.2785/s)`` (levels
  ``(k - z)*s``, ``k in [0, 2^b-1]``: exact 0, and the SiLU range covered).

Reported: the mean over layers of MSE / E[x^2] and the geometric mean of MSE ratios to ``signed``, separately for
inputs with a finite lower bound (SiLU-fed, what ``qat_act_grid=auto`` makes unsigned) and unbounded ones.

Part 2 (PTQ): for each method and ``qat_act_grid`` value the FP model is quantized at W``bits``A``bits`` (policy
defaults: first conv and Detect predictors at 8 bits), calibrated on ``calib`` training batches (no training) and
validated with Ultralytics' validator on the val split.

Usage:
    python scripts/act_grid_measure.py model=/tmp/fp.pt data=datasets/synth-fp160/data.yaml imgsz=160 [bits=4]
        [n=32] [calib=4] [mse=1] [ptq=1] [methods=lsq,lsqplus,pact,n2uq] [grids=signed,unsigned0,auto]
    (grid unsigned0 = qat_act_grid=unsigned with the LSQ/PACT fixed offset removed)
"""

from __future__ import annotations

import copy
import json
import math
import sys
import time

import torch

SILU_MIN = -0.2784645427610738


def parse(argv):
    out = {}
    for a in argv:
        k, _, v = a.partition("=")
        out[k] = v
    return out


# ------------------------------------------------------------------------------------------------------- MSE part
def lsq_mse_step(x, lo, hi, zp_of=None):
    """MSE-optimal LSQ step by the coarse-to-fine search of refine_step_mse; ``zp_of(s)`` makes the range [-z, L-z]."""
    s0 = max(2 * float(x.abs().mean()) / math.sqrt(max(hi, 1)), 1e-8)

    def err(s):
        a, b = (lo, hi) if zp_of is None else (-zp_of(s), hi - zp_of(s))
        return float(((x / s).clamp(a, b).round() * s - x).square().mean())

    best = s0
    for grid in (torch.logspace(-1.5, 1.0, 11), torch.logspace(-0.125, 0.125, 9)):
        c0 = best
        cands = [c0 * float(c) for c in grid]
        best = min(cands, key=err)
    return best, err(best)


def pact_mse(x, bits, grid):
    L = (1 << bits) - 1
    q = 0.999
    if grid == "signed":
        a = float(torch.quantile(x.abs()[: 1 << 22], q))
        s = 2 * a / L
        y = ((x.clamp(-a, a) + a) / s).round() * s - a
    else:
        b = SILU_MIN if grid == "offset" else 0.0
        v = x - b
        a = float(torch.quantile(v.clamp(min=0)[: 1 << 22], q))
        s = a / L
        y = (v.clamp(0, a) / s).round() * s + b
    return float((y - x).square().mean())


def lsq_mse(x, bits, grid):
    n, p = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    L = (1 << bits) - 1
    if grid == "signed":
        return lsq_mse_step(x, n, p)[1]
    if grid == "unsigned":
        return lsq_mse_step(x, 0, L)[1]
    if grid == "offset":
        v = x - SILU_MIN
        s, _ = lsq_mse_step(v, 0, L)
        return float(((v / s).clamp(0, L).round() * s + SILU_MIN - x).square().mean())
    if grid == "zp":
        return lsq_mse_step(x, 0, L, zp_of=lambda s: min(math.ceil(-SILU_MIN / s - 1e-9), L))[1]
    raise ValueError(grid)


def mse_part(model, imgs, bits, max_elems=1 << 20):
    from ultralytics_gabfusion.quant.grids import input_lower_bounds

    bounds = input_lower_bounds(model)
    feats = {}
    hooks = []
    first = None
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Conv2d) and "dfl" not in name:
            first = first or name
            hooks.append(m.register_forward_pre_hook(lambda mod, a, name=name: feats.setdefault(name, []).append(a[0].detach().float().reshape(-1))))
    with torch.no_grad():
        for i in range(0, len(imgs), 8):
            model(imgs[i : i + 8])
    for h in hooks:
        h.remove()
    rows = []
    for name, parts in feats.items():
        if name == first:
            continue
        x = torch.cat(parts)
        if x.numel() > max_elems:
            x = x[:: x.numel() // max_elems + 1]
        e2 = float(x.square().mean())
        row = {"name": name, "lb": bounds.get(name, -math.inf), "min": float(x.min()), "neg_frac": float((x < 0).float().mean()),
               "neg_energy": float(x.clamp(max=0).square().mean()) / e2}
        for g in ("signed", "unsigned", "offset", "zp"):
            row[f"lsq_{g}"] = lsq_mse(x, bits, g) / e2
        for g in ("signed", "unsigned", "offset"):
            row[f"pact_{g}"] = pact_mse(x, bits, g) / e2
        rows.append(row)
    return rows


def summarize(rows):
    out = {}
    for kind, sel in (("bounded", [r for r in rows if math.isfinite(r["lb"])]), ("unbounded", [r for r in rows if not math.isfinite(r["lb"])])):
        if not sel:
            continue
        d = {"layers": len(sel), "neg_frac": sum(r["neg_frac"] for r in sel) / len(sel)}
        for m, grids in (("lsq", ("signed", "unsigned", "offset", "zp")), ("pact", ("signed", "unsigned", "offset"))):
            for g in grids:
                k = f"{m}_{g}"
                d[f"{k}_relmse"] = sum(r[k] for r in sel) / len(sel)
                d[f"{k}_vs_signed"] = math.exp(sum(math.log(r[k] / r[f"{m}_signed"]) for r in sel) / len(sel))
                d[f"{k}_best_layers"] = sum(all(r[k] <= r[f"{m}_{o}"] for o in grids) for r in sel)
        out[kind] = d
    return out


# ------------------------------------------------------------------------------------------------------- PTQ part
def ptq_map50(fp_model, data, imgsz, method, bits, grid, calib_imgs):
    from ultralytics.models.yolo.detect import DetectionValidator
    from ultralytics.cfg import get_cfg

    from ultralytics_gabfusion.quant.convert import calibrate_activations, init_weight_quantizers, quantize_model

    m = copy.deepcopy(fp_model).float()
    quantize_model(m, method, bits, bits, act_grid="unsigned" if grid == "unsigned0" else grid)
    if grid == "unsigned0":  # plain unsigned grid: LSQ/PACT without the fixed SiLU offset (negatives clip to 0)
        for q in m.modules():
            if hasattr(q, "fixed_offset"):
                q.fixed_offset = 0.0
    init_weight_quantizers(m)
    calibrate_activations(m, calib_imgs)
    m.eval()
    args = get_cfg(overrides=dict(data=data, imgsz=imgsz, batch=16, device="cpu", plots=False, verbose=False, workers=0,
                                  half=False, mode="val"))
    v = DetectionValidator(args=args)
    res = v(model=m)
    return float(res["metrics/mAP50(B)"])


def main(argv):
    a = parse(argv)
    torch.manual_seed(0)
    from ultralytics import YOLO
    from ultralytics.data.utils import check_det_dataset

    from ultralytics_gabfusion.export import load_images

    imgsz, bits = int(a.get("imgsz", 160)), int(a.get("bits", 4))
    fp = YOLO(a["model"]).model.float().eval()
    data = check_det_dataset(a["data"])
    t0 = time.time()
    imgs = load_images(a["data"], imgsz=imgsz, n=int(a.get("n", 32)))
    report = {"bits": bits, "imgsz": imgsz, "n_images": len(imgs)}
    if a.get("mse", "1") != "0":
        rows = mse_part(fp, imgs, bits)
        report["mse_layers"] = rows
        report["mse_summary"] = summarize(rows)
        print(json.dumps(report["mse_summary"], indent=1), flush=True)
        print(f"mse part {time.time() - t0:.0f}s", flush=True)
    if a.get("ptq", "1") != "0":
        from pathlib import Path

        train_dir = Path(data["train"])
        calib = load_images(train_dir, imgsz=imgsz, n=8 * int(a.get("calib", 4)))
        calib = [calib[i : i + 8] for i in range(0, len(calib), 8)]
        report["ptq"] = {}
        for method in a.get("methods", "lsq,lsqplus,pact,n2uq").split(","):
            for grid in a.get("grids", "signed,unsigned0,auto").split(","):
                t = time.time()
                r = ptq_map50(fp, a["data"], imgsz, method, bits, grid, calib)
                report["ptq"][f"{method}/{grid}"] = r
                print(f"PTQ W{bits}A{bits} {method:8s} {grid:9s} mAP50 {r:.4f} ({time.time() - t:.0f}s)", flush=True)
        fpm = ptq_fp(fp, a["data"], imgsz)
        report["ptq"]["fp"] = fpm
        print(f"FP mAP50 {fpm:.4f}", flush=True)
    out = a.get("out")
    if out:
        with open(out, "w") as f:
            json.dump(report, f, indent=1)


def ptq_fp(fp_model, data, imgsz):
    from ultralytics.cfg import get_cfg
    from ultralytics.models.yolo.detect import DetectionValidator

    args = get_cfg(overrides=dict(data=data, imgsz=imgsz, batch=16, device="cpu", plots=False, verbose=False, workers=0,
                                  half=False, mode="val"))
    return float(DetectionValidator(args=args)(model=copy.deepcopy(fp_model))["metrics/mAP50(B)"])


if __name__ == "__main__":
    main(sys.argv[1:])
