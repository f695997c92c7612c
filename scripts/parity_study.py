"""Export parity study on a trained FP detector: a correct Q/DQ export vs one with a single scale off by 1%.

For each method and bit-width: PTQ (MSE init, calibration on ``calib`` train images), export with the parity check
off, then ``check_parity`` on ``n`` val images for the correct file and for copies where one conv's weight scale
(``layer``-th ``w_scale`` initializer, in graph order) is multiplied by ``1 + err``.

Usage:
    python scripts/parity_study.py model=/tmp/fp.pt data=datasets/synth-fp160/data.yaml bits=8,4 \
        methods=lsq,lsqplus,pact,n2uq n=8 calib=32 err=0.01 layers=10,30
"""

from __future__ import annotations

import copy
import json
import sys
import tempfile
from pathlib import Path

import onnx
import torch
from onnx import numpy_helper

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from ultralytics_gabfusion.offline import setup_offline_env  # noqa: E402

setup_offline_env()

from ultralytics.data.utils import check_det_dataset  # noqa: E402
from ultralytics.nn.tasks import load_checkpoint  # noqa: E402

from ultralytics_gabfusion.export import _image_files, check_parity, export_qdq_onnx, load_images  # noqa: E402
from ultralytics_gabfusion.quant.convert import calibrate_activations, init_weight_quantizers, quantize_model  # noqa: E402


def scaled_copy(path, out, layer, factor):
    proto = onnx.load(str(path))
    names = [i for i in proto.graph.initializer if i.name.endswith("/w_scale")]
    init = names[layer]
    init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) * factor, init.name))
    onnx.save(proto, str(out))
    return init.name


def main(argv):
    kv = dict(a.split("=", 1) for a in argv)
    data = check_det_dataset(kv["data"], autodownload=False)
    fp, _ = load_checkpoint(kv["model"])
    fp = fp.float().eval()
    imgsz = int(kv.get("imgsz", 160))
    x = load_images(_image_files(data["val"])[: int(kv.get("n", 8))], imgsz, n=int(kv.get("n", 8)))
    xc = load_images(_image_files(data["train"])[: int(kv.get("calib", 32))], imgsz, n=int(kv.get("calib", 32)))
    err = float(kv.get("err", 0.01))
    layers = [int(v) for v in kv.get("layers", "10,30").split(",")]
    tmp = Path(tempfile.mkdtemp())
    keys = ("ok", "score_diff", "ref_score_diff", "box_diff", "ref_box_diff", "unmatched", "ref_unmatched",
            "detections_torch", "anchors", "boxes_max_abs_diff_px", "layer_act", "layer_conv")
    for bits in [int(b) for b in kv.get("bits", "8,4").split(",")]:
        for method in kv.get("methods", "lsq,lsqplus,pact,n2uq").split(","):
            q = copy.deepcopy(fp)
            quantize_model(q, method, bits, bits)
            init_weight_quantizers(q)
            calibrate_activations(q, [xc[i : i + 16] for i in range(0, len(xc), 16)])
            f = tmp / f"{method}{bits}.onnx"
            export_qdq_onnx(q, f, imgsz=imgsz, check=False, verbose=False)
            r = check_parity(q, f, x, raise_error=False)
            print(json.dumps({"bits": bits, "method": method, "case": "correct", **{k: r[k] for k in keys}}), flush=True)
            for layer in layers:
                bad = tmp / "bad.onnx"
                name = scaled_copy(f, bad, layer, 1 + err)
                r = check_parity(q, bad, x, raise_error=False)
                print(json.dumps({"bits": bits, "method": method, "case": f"{name} x{1 + err}",
                                  **{k: r[k] for k in keys}}), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
