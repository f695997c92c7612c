"""Q/DQ ONNX export of segmentation and pose models: parity, Ultralytics' own ONNX format, ONNX Runtime predict/val.

Models: yolo11n-seg / yolo11n-pose (``kpt_shape [4, 3]``, the generated pose set's) at 64 px, W4A4 LSQ, made
non-trivial as in test_export.py (random BN affines with some negative scales, BN statistics from the images) and
with random class / mask-coefficient biases so that the head fires with distinct scores and masks have contrast.
"""

from __future__ import annotations

import onnx
import pytest
import torch
from conftest import IMGSZ
from onnx import helper, numpy_helper

from ultralytics_gabfusion.export import check_parity, export_qdq_onnx, load_images

NC = 16  # the generated set's classes
CFG = {"segment": "yolo11n-seg.yaml", "pose": "yolo11n-pose.yaml"}
KPT_SHAPE = (4, 3)  # the generated pose set's keypoints


def build_task_model(task: str, images: torch.Tensor | None = None, seed: int = 0):
    """A yolo11n seg/pose model; with ``images``: W4A4 LSQ, calibrated, non-trivial BN and head state (eval mode)."""
    from ultralytics.nn.tasks import PoseModel, SegmentationModel

    from ultralytics_gabfusion.quant.convert import calibrate_activations, init_weight_quantizers, quantize_model

    torch.manual_seed(seed)
    if task == "segment":
        m = SegmentationModel(CFG[task], nc=NC, verbose=False)
    else:
        m = PoseModel(CFG[task], nc=NC, data_kpt_shape=KPT_SHAPE, verbose=False)
    m.task = task
    if images is None:
        return m.eval()
    g = torch.Generator().manual_seed(seed)
    head = m.model[-1]
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.weight.copy_(torch.randn(mod.weight.shape, generator=g) * 0.5 + 0.8)  # ~5% negative
                mod.bias.copy_(torch.randn(mod.bias.shape, generator=g) * 0.2)
                mod.momentum = None  # cumulative average: running stats = mean of the batches below
                mod.reset_running_stats()
        for seq in head.cv3:
            seq[-1].bias.copy_(torch.randn(seq[-1].bias.shape, generator=g) * 2)  # confident, distinct scores
        for seq in head.cv2:  # DFL logits falling with the distance bin: boxes of ~2 strides instead of ~15
            seq[-1].bias.copy_(-0.5 * torch.arange(head.reg_max).repeat(4))
        if task == "segment":
            for seq in head.cv4:
                seq[-1].bias.copy_(torch.randn(seq[-1].bias.shape, generator=g) * 4)  # masks with contrast
    quantize_model(m, "lsq", 4, 4)
    init_weight_quantizers(m)
    calibrate_activations(m, [images])
    m.train()
    with torch.no_grad():
        m(images)  # BN running statistics from the data
    return m.eval()


def graph_outputs(path) -> list:
    """``[(name, shape)]`` of the graph outputs of an ONNX file."""
    proto = onnx.load(str(path))
    return [(o.name, [d.dim_value for d in o.type.tensor_type.shape.dim]) for o in proto.graph.output]


def metadata(path) -> dict:
    return {p.key: p.value for p in onnx.load(str(path)).metadata_props}


@pytest.fixture(scope="module", autouse=True)
def _single_thread():
    """One intra-op thread: at 64 px threading costs more than it saves on shared CI cores."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module", params=["segment", "pose"])
def exported(request, tmp_path_factory):
    """``(task, data.yaml, quantized model, onnx path, export info)``: a tiny generated set of the task, the W4A4
    model and its Q/DQ export with parity checked on two of the set's images."""
    from ultralytics_gabfusion.data import make_synthetic_dataset

    task = request.param
    out = tmp_path_factory.mktemp(f"mt-export-{task}")
    data = make_synthetic_dataset(out / "data", task=task, n_train=1, n_val=4, imgsz=IMGSZ, seed=0, max_objects=4,
                                  workers=0)
    images = load_images(data, IMGSZ, n=2)
    model = build_task_model(task, images)
    path = out / f"{task}-w4a4.onnx"
    info = export_qdq_onnx(model, path, imgsz=IMGSZ, images=images, verbose=False)
    return task, data, model, path, info


def test_export_parity_and_ultralytics_onnx_format(exported, tmp_path):
    """Parity holds with detections, masks / keypoints compared; outputs and task metadata equal Ultralytics' export."""
    from ultralytics.engine.exporter import Exporter

    task, _, model, path, info = exported
    p = info["parity"]
    assert p["ok"] and p["task"] == task and p["detections_torch"] > 0 and p["unmatched"] == 0, p
    measures = ("mask",) if task == "segment" else ("kpt", "kpt_conf")
    for k in measures:
        assert p[f"{k}_diff"] <= 2 * p[f"ref_{k}_diff"] + 1e-3, p
    assert ("protos_max_abs_diff" in p) == (task == "segment")
    # the task head's output convs (mask coefficients and prototypes / keypoints) are 8-bit, the rest 4-bit INT4
    rows = {r["name"]: r for r in info["layers"]}
    head = "model.23."
    out_convs = [f"{head}cv4.{i}.2" for i in range(3)] + ([f"{head}proto.cv3.conv"] if task == "segment" else [])
    assert all(rows[n]["w_bits"] == 8 and rows[n]["a_bits"] == 8 for n in out_convs)
    assert rows[f"{head}cv4.0.0.conv"]["w_bits"] == 4 and "INT4" in info["int_types"]

    fp = build_task_model(task)  # Ultralytics' own format=onnx export of the same architecture, FP
    fp.pt_path = str(tmp_path / "fp.pt")
    ref = Exporter(overrides=dict(format="onnx", imgsz=IMGSZ, batch=1, device="cpu", simplify=False))(model=fp)
    assert graph_outputs(path) == graph_outputs(ref)
    ours, theirs = metadata(path), metadata(ref)
    keys = ("task", "stride", "imgsz", "batch", "names", "end2end", "channels") + (("kpt_shape",) if task == "pose" else ())
    for key in keys:
        assert ours[key] == theirs[key], key
    assert ("kpt_shape" in ours) == (task == "pose")


def _tamper(src, dst, output: str, factor):
    """Copy ``src`` with graph output ``output`` multiplied by ``factor`` (broadcast to its shape)."""
    proto = onnx.load(str(src))
    g = proto.graph
    for n in g.node:
        n.output[:] = [f"{o}_raw" if o == output else o for o in n.output]
    g.initializer.append(numpy_helper.from_array(factor.numpy().astype("float32"), f"{output}_factor"))
    g.node.append(helper.make_node("Mul", [f"{output}_raw", f"{output}_factor"], [output], name=f"{output}_tamper"))
    onnx.save(proto, str(dst))


def test_parity_refuses_wrong_masks_and_keypoints(exported, tmp_path):
    """Errors after the last conv (prototypes, keypoint decoding) pass the box/score and layer-local checks but not
    the mask / keypoint measures."""
    task, data, model, path, info = exported
    c = 4 + NC + (32 if task == "segment" else KPT_SHAPE[0] * KPT_SHAPE[1])
    if task == "segment":  # prototypes mirrored: every mask changes, boxes and scores do not
        output, factor, key = "output1", torch.tensor(-1.0), "mask"
    else:  # keypoint x, y scaled by 1.02 (< 1.3 px at 64 px), visibilities and boxes untouched
        factor = torch.ones(1, c, 1)
        factor[0, 4 + NC :: 3] = 1.02
        factor[0, 4 + NC + 1 :: 3] = 1.02
        output, key = "output0", "kpt"
    bad = tmp_path / "bad.onnx"
    _tamper(path, bad, output, factor)
    r = check_parity(model, bad, load_images(data, IMGSZ, n=2), raise_error=False)
    assert not r["ok"]
    assert r[f"{key}_diff"] > 2 * r[f"ref_{key}_diff"] + 1e-3, r
    assert r["score_diff"] == pytest.approx(info["parity"]["score_diff"]) and r["unmatched"] == 0
    assert r["layer_conv"]["value"] <= r["layer_conv"]["limit"]


def test_onnx_predict_and_val_through_ultralytics(exported, tmp_path):
    """YOLO("x.onnx") predicts what the fake-quant PyTorch model predicts (boxes, masks, keypoints) and validates."""
    from ultralytics import YOLO

    task, data, model, path, _ = exported
    img = sorted((data.parent / "images" / "val").iterdir())[0]
    kw = dict(imgsz=IMGSZ, conf=0.25, device="cpu", verbose=False)
    r_onnx = YOLO(str(path), task=task).predict(str(img), **kw)[0]
    pt = YOLO(CFG[task], task=task)
    pt.model = model  # the fake-quant model through the same predictor (AutoBackend leaves quantized blocks alone)
    r_pt = pt.predict(str(img), **kw)[0]
    assert len(r_onnx.boxes) == len(r_pt.boxes) > 0
    # match each ONNX detection to the PyTorch one with the same box, score, class (and keypoints): ties may reorder
    def rows(r):
        return r.boxes.data if task == "segment" else torch.cat([r.boxes.data, r.keypoints.data.flatten(1)], 1)

    d = torch.cdist(rows(r_onnx), rows(r_pt), compute_mode="donot_use_mm_for_euclid_dist")  # exact distances
    j = d.argmin(1)
    assert float(d.min(1).values.max()) < 1e-3 and len(set(j.tolist())) == len(j)
    if task == "segment":
        mo, mp = r_onnx.masks.data.float(), r_pt.masks.data.float()[j]
        assert mo.shape == (len(r_onnx.boxes), IMGSZ, IMGSZ)
        assert float((mo != mp).float().mean()) < 1e-3
        assert 0.01 < float(mp.mean()) < 0.99  # masks neither empty nor full
    else:
        assert tuple(r_onnx.keypoints.data.shape) == (len(r_onnx.boxes), *KPT_SHAPE)

    m = YOLO(str(path), task=task).val(data=str(data), imgsz=IMGSZ, batch=1, device="cpu", plots=False,
                                       verbose=False, project=str(tmp_path), name="val")
    task_metric = m.seg if task == "segment" else m.pose
    assert m.box.nc == NC and 0.0 <= task_metric.map50 <= 1.0 and 0.0 <= task_metric.map <= 1.0
    assert f"metrics/mAP50-95({'M' if task == 'segment' else 'P'})" in m.results_dict
    assert sum(m.nt_per_image) > 0  # the val labels were read (instances of the task present)


def test_yolo26_segment_head_exports_and_end2end_is_refused(tmp_path):
    """YOLO26's Segment26 (Proto26) exports with parity in its one-to-many mode; the end-to-end mode is refused."""
    from ultralytics.nn.tasks import SegmentationModel

    from ultralytics_gabfusion.export import generated_images
    from ultralytics_gabfusion.quant.convert import calibrate_activations, init_weight_quantizers, quantize_model

    torch.manual_seed(0)
    m = SegmentationModel("yolo26n-seg.yaml", nc=2, verbose=False)
    x = generated_images(IMGSZ, n=1)
    quantize_model(m, "lsq", 4, 4)
    init_weight_quantizers(m)
    calibrate_activations(m, [x])
    m.eval()
    info = export_qdq_onnx(m, tmp_path / "s26.onnx", imgsz=IMGSZ, images=x, verbose=False)
    assert info["parity"]["ok"] and "mask_diff" in info["parity"]
    assert [n for n, _ in graph_outputs(tmp_path / "s26.onnx")] == ["output0", "output1"]
    m.end2end = True
    with pytest.raises(ValueError, match="end-to-end"):
        export_qdq_onnx(m, tmp_path / "e2e.onnx", imgsz=IMGSZ, images=x, verbose=False)
    assert not (tmp_path / "e2e.onnx").exists()
