"""Post-training quantization study on a trained FP detector: detections kept and mAP50 per method and init.

For each method, bit-width, quantizer init (``paper`` / ``mse``) and calibration BatchNorm mode (``eval`` /
``batch``): quantize a copy of the FP model, initialise its weight quantizers, calibrate its activation quantizers
on the first ``calib`` train images (plain letterboxed images, batches of 16), then on the val images count the FP
detections (conf >= 0.25, NMS IoU 0.7) reproduced by the quantized model (same class, IoU > 0.7) and compute mAP50
against the labels.

Usage:
    python scripts/ptq_study.py model=/tmp/fp.pt data=datasets/synth-fp160/data.yaml bits=8,4 \
        methods=lsq,lsqplus,pact,n2uq inits=paper,mse bn=eval calib=64 val=200 out=/tmp/ptq.json
"""

from __future__ import annotations

import copy
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from ultralytics_gabfusion.offline import setup_offline_env  # noqa: E402

setup_offline_env()

from ultralytics.data.utils import check_det_dataset  # noqa: E402
from ultralytics.nn.tasks import load_checkpoint  # noqa: E402
from ultralytics.utils.metrics import ap_per_class, box_iou  # noqa: E402
from ultralytics.utils.nms import non_max_suppression  # noqa: E402
from ultralytics.utils.ops import xywh2xyxy  # noqa: E402

from ultralytics_gabfusion.export import _image_files, load_images  # noqa: E402
from ultralytics_gabfusion.quant.convert import calibrate_activations, init_weight_quantizers, quantize_model  # noqa: E402


def parse(argv):
    kv = dict(a.split("=", 1) for a in argv)
    return {
        "model": kv["model"], "data": kv["data"], "bits": [int(b) for b in kv.get("bits", "8,4").split(",")],
        "methods": kv.get("methods", "lsq,lsqplus,pact,n2uq").split(","), "inits": kv.get("inits", "paper,mse").split(","),
        "bn": kv.get("bn", "eval").split(","), "calib": int(kv.get("calib", 64)), "val": int(kv.get("val", 200)),
        "imgsz": int(kv.get("imgsz", 160)), "out": kv.get("out"),
    }


def labels_of(files):
    out = []
    for f in files:
        lab = Path(str(f).replace("/images/", "/labels/")).with_suffix(".txt")
        a = np.loadtxt(lab, ndmin=2) if lab.exists() and lab.stat().st_size else np.zeros((0, 5))
        out.append(torch.from_numpy(a).float())
    return out


@torch.no_grad()
def predict(model, x, conf, bs=8):
    model.eval()
    outs = []
    for i in range(0, len(x), bs):
        y = model(x[i : i + bs])
        y = y[0] if isinstance(y, (list, tuple)) else y
        # no NMS time limit: on a loaded CPU it would silently drop the detections of the remaining images
        outs += non_max_suppression(y.float(), conf_thres=conf, iou_thres=0.7, max_det=300, max_time_img=1e3)
    return outs


def kept(fp_dets, q_dets, iou=0.7):
    n = k = 0
    for a, b in zip(fp_dets, q_dets):
        n += len(a)
        if not len(a) or not len(b):
            continue
        ious = box_iou(a[:, :4], b[:, :4]) * (a[:, 5:6] == b[:, 5].view(1, -1))
        used = set()
        for i in ious.max(1).values.argsort(descending=True).tolist():
            j = [j for j in ious[i].argsort(descending=True).tolist() if j not in used][:1]
            if j and ious[i, j[0]] > iou:
                used.add(j[0])
                k += 1
    return k, n


def map50(dets, labels, imgsz):
    tps, confs, pcls, tcls = [], [], [], []
    for d, lab in zip(dets, labels):
        gt = xywh2xyxy(lab[:, 1:5] * imgsz)
        tcls.append(lab[:, 0])
        tp = torch.zeros(len(d), 1, dtype=torch.bool)
        if len(d) and len(gt):
            ious = box_iou(gt, d[:, :4]) * (lab[:, 0:1] == d[:, 5].view(1, -1))
            used_g = set()
            for j in d[:, 4].argsort(descending=True).tolist():
                g = [g for g in ious[:, j].argsort(descending=True).tolist() if g not in used_g][:1]
                if g and ious[g[0], j] >= 0.5:
                    used_g.add(g[0])
                    tp[j, 0] = True
        tps.append(tp)
        confs.append(d[:, 4])
        pcls.append(d[:, 5])
    r = ap_per_class(torch.cat(tps).numpy(), torch.cat(confs).numpy(), torch.cat(pcls).numpy(), torch.cat(tcls).numpy())
    ap = r[5]  # (nc, 10) at IoU 0.5:0.95 steps; here only the 0.5 column is meaningful
    return float(ap[:, 0].mean()) if len(ap) else 0.0


def main(argv):
    s = parse(argv)
    torch.manual_seed(0)
    data = check_det_dataset(s["data"], autodownload=False)
    fp, _ = load_checkpoint(s["model"])
    fp = fp.float().eval()
    val_files = _image_files(data["val"])[: s["val"]]
    xv = load_images(val_files, s["imgsz"], n=len(val_files))
    labels = labels_of(val_files)
    xc = load_images(_image_files(data["train"])[: s["calib"]], s["imgsz"], n=s["calib"])
    calib = [xc[i : i + 16] for i in range(0, len(xc), 16)]
    fp_dets = predict(fp, xv, 0.25)
    fp_all = predict(fp, xv, 0.001)
    rows = [{"arm": "FP", "dets": sum(len(d) for d in fp_dets), "map50": map50(fp_all, labels, s["imgsz"])}]
    print(json.dumps(rows[0]), flush=True)
    for bits in s["bits"]:
        for method in s["methods"]:
            for init in s["inits"]:
                for bn in s["bn"]:
                    t0 = time.time()
                    q = copy.deepcopy(fp)
                    quantize_model(q, method, bits, bits)
                    init_weight_quantizers(q, init=init)
                    calibrate_activations(q, calib, init=init, bn=bn)
                    dets = predict(q, xv, 0.001)
                    k, n = kept(fp_dets, [d[d[:, 4] >= 0.25] for d in dets])  # = NMS at 0.25 (greedy by score)
                    row = {"bits": bits, "method": method, "init": init, "bn": bn, "kept": k, "of": n,
                           "kept_frac": k / max(n, 1), "map50": map50(dets, labels, s["imgsz"]),
                           "sec": round(time.time() - t0, 1)}
                    rows.append(row)
                    print(json.dumps(row), flush=True)
    if s["out"]:
        Path(s["out"]).write_text(json.dumps({"settings": s, "rows": rows}, indent=1))


if __name__ == "__main__":
    main(sys.argv[1:])
