"""A trained detector through the MSE init, calibration and the Q/DQ export parity check.

``trained_fp`` (conftest) stands for a user's trained detector. Inference only, 2 images at 64 px per check.
"""

from __future__ import annotations

import copy

import onnx
import pytest
import torch
from conftest import IMGSZ
from onnx import numpy_helper

from ultralytics_gabfusion.export import ParityError, _image_files, check_parity, export_qdq_onnx, load_images

METHODS = ("lsq", "lsqplus", "pact", "n2uq")


@pytest.fixture(scope="module", autouse=True)
def _single_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def real(trained_fp, tiny_data):
    """(trained FP model in eval mode, 16 calibration images from the train split, 2 val images)."""
    from ultralytics.data.utils import check_det_dataset
    from ultralytics.nn.tasks import load_checkpoint

    model, _ = load_checkpoint(str(trained_fp))
    data = check_det_dataset(str(tiny_data), autodownload=False)
    calib = load_images(_image_files(data["train"])[:16], IMGSZ, n=16)
    return model.float().eval(), calib, load_images(tiny_data, IMGSZ, n=2)


def ptq(fp, method, bits, calib, init="mse"):
    """Post-training quantization of a copy of ``fp``: weight init, activation calibration, eval mode."""
    from ultralytics_gabfusion.quant.convert import calibrate_activations, init_weight_quantizers, quantize_model

    q = copy.deepcopy(fp)
    quantize_model(q, method, bits, bits)
    init_weight_quantizers(q, init=init)
    calibrate_activations(q, [calib], init=init)
    return q.eval()


@pytest.mark.parametrize("bits", (8, 4))
@pytest.mark.parametrize("method", METHODS)
def test_trained_model_exports(real, method, bits, tmp_path):
    fp, calib, val = real
    q = ptq(fp, method, bits, calib)
    info = export_qdq_onnx(q, tmp_path / "q.onnx", imgsz=IMGSZ, images=val, verbose=False)
    p = info["parity"]
    assert p["ok"] and (tmp_path / "q.onnx").exists(), p
    assert p["layers_checked"] >= 50  # every quantized conv of yolov5n was recomputed on the ONNX inputs
    assert p["layer_conv"]["value"] < 0.1 * p["layer_conv"]["limit"], p["layer_conv"]  # float-level agreement
    assert p["score_diff"] <= p["tol"]["ratio"] * p["ref_score_diff"] + p["tol"]["floor"]


def _scaled(path, out, suffix, index, factor):
    proto = onnx.load(str(path))
    inits = [i for i in proto.graph.initializer if i.name.endswith(suffix)]
    init = inits[index]
    init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) * factor, init.name))
    onnx.save(proto, str(out))
    return init.name.split("/")[0].rsplit(".", 1)[0]


@pytest.mark.parametrize(
    "method,bits,suffix",
    [("lsq", 8, "/w_scale"), ("n2uq", 4, "/w_scale"), ("lsqplus", 4, "/a_scale"), ("pact", 8, "/a_scale")],
)
def test_one_scale_off_by_one_percent_is_refused(real, method, bits, suffix, tmp_path):
    fp, calib, val = real
    q = ptq(fp, method, bits, calib)
    good = tmp_path / "good.onnx"
    export_qdq_onnx(q, good, imgsz=IMGSZ, check=False, verbose=False)
    bad = tmp_path / "bad.onnx"
    layer = _scaled(good, bad, suffix, 10, 1.01)  # a mid-backbone conv
    r = check_parity(q, bad, val, raise_error=False)
    assert not r["ok"]
    worst = r["layer_conv"] if suffix == "/w_scale" else r["layer_act"]
    assert worst["layer"] == layer and worst["value"] > worst["limit"], worst
    with pytest.raises(ParityError, match="layer-local mismatch: " + layer.replace(".", r"\.")):
        check_parity(q, bad, val)
