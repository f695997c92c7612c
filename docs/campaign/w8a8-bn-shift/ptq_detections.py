"""W8A8 PTQ per method on the shipped model: FP detections kept (IoU>0.7, same class) on val images."""
import os, sys, glob, json, torch
from pathlib import Path
from ultralytics import YOLO
from ultralytics.utils.metrics import box_iou
from ultralytics_gabfusion.ptq import post_training_quantize
from ultralytics_gabfusion import zoo
import plainbn, deltabn  # noqa
DATA = "/work/study2/data/synth-n_train1000-n_val200-imgsz160-seed0-max_objects4-min_size20/data.yaml"
imgs = sorted(glob.glob(str(Path(DATA).parent / "images/val/*")))[:int(sys.argv[2]) if len(sys.argv) > 2 else 200]
methods = sys.argv[1].split(",")
import yaml; extra = {k: yaml.safe_load(v) for k, v in (kv.split("=") for kv in sys.argv[3:])}
tag = "-".join(sys.argv[3:]).replace("=", "") + os.environ.get("GAB_PLAIN", "") + ("delta" if os.environ.get("GAB_DELTA") else "")
fp = YOLO(str(zoo.path("yolov5n-synth160")))
def dets(m):
    return [(r.boxes.xyxy.clone(), r.boxes.cls.clone(), r.boxes.conf.clone()) for r in m.predict(imgs, imgsz=160, conf=0.25, verbose=False, batch=16)]
ref = dets(fp)
n_ref = sum(len(b) for b, _, _ in ref)
out = {}
for meth in methods:
    f = post_training_quantize(str(zoo.path("yolov5n-synth160")), f"/work/w8/{meth}{tag}.pt", **{**dict(data=DATA, qat=meth, w_bits=8, a_bits=8,
                               imgsz=160, batch=16, workers=0, fraction=0.5, seed=0, project="/work/w8/runs", name=meth + tag, exist_ok=True), **extra})
    q = YOLO(str(f))
    got = dets(q)
    lost = 0; worst = []
    for i, ((b0, c0, s0), (b1, c1, s1)) in enumerate(zip(ref, got)):
        if len(b0) == 0: continue
        iou = box_iou(b0, b1) if len(b1) else torch.zeros(len(b0), 0)
        same = (c0[:, None] == c1[None]) if len(b1) else iou.bool()
        ok = ((iou > 0.7) & same).any(1) if len(b1) else torch.zeros(len(b0), dtype=bool)
        lost += int((~ok).sum())
        if (~ok).any(): worst.append((i, s0[~ok].tolist()))
    mp = q.val(data=DATA, imgsz=160, batch=16, workers=0, verbose=False, plots=False, project="/work/w8/runs", name="val", exist_ok=True).box.map50
    out[meth] = {"mAP50": round(100 * mp, 2), "lost": lost, "fp_dets": n_ref, "examples": worst[:5]}
    print(meth, extra, out[meth], flush=True)
json.dump(out, open(f"/work/w8/res-{'-'.join(methods)}{tag}.json", "w"), indent=1)
