"""Q/DQ ONNX export: operator/type content, ONNX Runtime parity, CLI handler and error paths.

Models are built from yolov5s.yaml / yolo11s.yaml at IMGSZ (64 px) and made non-trivial before export: BN affines are
random (some negative scales, which exercises the mirrored-grid folding), BN running statistics come from the images,
N2UQ intervals are perturbed (non-uniform thresholds) and the Detect class biases are zeroed so that the untrained
head fires and the detection comparison of the parity check has boxes to compare.
"""

from __future__ import annotations

import ast
import copy
import json

import numpy as np
import onnx
import pytest
import torch
from conftest import IMGSZ
from onnx import numpy_helper

from ultralytics_gabfusion.quant.grids import SILU_MIN

from ultralytics_gabfusion.export import (
    ParityError,
    check_parity,
    export_main,
    export_qdq_onnx,
    load_images,
)

ANCHORS = sum((IMGSZ // s) ** 2 for s in (8, 16, 32))
NC = 16


# ------------------------------------------------------------------------------------------------ helpers
def build_quantized(cfg: str, method: str, bits: int, images: torch.Tensor, gab: bool = False, seed: int = 0,
                    layer_bits: dict | None = None, **policy):
    """A calibrated fake-quant DetectionModel with non-trivial BN, quantizer and head state (eval mode).

    ``policy``: further :func:`quantize_model` keywords (``act_grid``, ``act_zp``)."""
    from ultralytics.nn.tasks import DetectionModel

    from ultralytics_gabfusion.quant.convert import calibrate_activations, init_weight_quantizers, quantize_model

    torch.manual_seed(seed)
    m = DetectionModel(cfg, nc=NC, verbose=False)
    if gab:
        from ultralytics_gabfusion.fusion import insert_gabfusion

        insert_gabfusion(m, "balanced", form="paper" if gab == "paper" else "grad")
    g = torch.Generator().manual_seed(seed)
    for mod in m.modules():
        if isinstance(mod, torch.nn.BatchNorm2d):
            with torch.no_grad():
                mod.weight.copy_(torch.randn(mod.weight.shape, generator=g) * 0.5 + 0.8)  # ~5% negative
                mod.bias.copy_(torch.randn(mod.bias.shape, generator=g) * 0.2)
            mod.momentum = None  # cumulative average: running stats = mean of the batches below
            mod.reset_running_stats()
    for seq in m.model[-1].cv3:
        torch.nn.init.zeros_(seq[-1].bias)
    quantize_model(m, method, bits, bits, layer_bits=layer_bits, **policy)
    init_weight_quantizers(m)
    calibrate_activations(m, [images])
    m.train()
    with torch.no_grad():
        m(images)  # BN running statistics from the data (what a short training run would leave)
    if method == "n2uq":
        for mod in m.modules():
            if hasattr(mod, "intervals"):
                with torch.no_grad():
                    mod.intervals.mul_(torch.empty(mod.intervals.shape).uniform_(0.6, 1.4, generator=g))
    return m.eval()


def weight_dq_types(proto) -> dict:
    """{conv weight DequantizeLinear name: element type name of its integer initializer}."""
    inits = {i.name: i for i in proto.graph.initializer}
    out = {}
    for n in proto.graph.node:
        if n.op_type == "DequantizeLinear" and n.input[0] in inits and n.input[0].endswith("/w_int"):
            out[n.input[0]] = onnx.TensorProto.DataType.Name(inits[n.input[0]].data_type)
    return out


def act_q_types(proto) -> set:
    """Element types of the activation QuantizeLinear zero points (= the integer tensor types)."""
    inits = {i.name: i for i in proto.graph.initializer}
    return {onnx.TensorProto.DataType.Name(inits[n.input[2]].data_type) for n in proto.graph.node
            if n.op_type == "QuantizeLinear"}


@pytest.fixture(scope="module", autouse=True)
def _single_thread():
    """One intra-op thread for this module: at 64 px threading costs more than it saves, and on shared CI cores
    two spinning OpenMP threads per process made these tests 5-10x slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def images(tiny_data) -> torch.Tensor:
    """Two letterboxed validation images of the generated set, (2, 3, 64, 64) in [0, 1]."""
    return load_images(tiny_data, IMGSZ, n=2)


@pytest.fixture(scope="module")
def lsq_v5(images):
    """YOLOv5s LSQ W4A4, the model shared by the CLI / error-path tests."""
    return build_quantized("yolov5s.yaml", "lsq", 4, images)


@pytest.fixture(scope="module")
def lsq_v5_onnx(lsq_v5, images, tmp_path_factory):
    path = tmp_path_factory.mktemp("onnx") / "lsq_w4a4.onnx"
    info = export_qdq_onnx(lsq_v5, path, imgsz=IMGSZ, images=images, verbose=False)
    return path, info


# ------------------------------------------------------------------------------------------------ export + parity
def test_zero_point_snap_gives_integer_zero_points(lsq_v5, images, tmp_path):
    """zero_point=snap: the SiLU offset becomes the integer zero point round(0.2785/s) of a plain Q/DQ pair."""
    before = {n: q.fixed_offset for n, q in lsq_v5.named_modules() if hasattr(q, "fixed_offset")}
    info = export_qdq_onnx(lsq_v5, tmp_path / "snap.onnx", imgsz=IMGSZ, images=images, zero_point="snap",
                           verbose=False)
    assert {n: q.fixed_offset for n, q in lsq_v5.named_modules() if hasattr(q, "fixed_offset")} == before
    proto = onnx.load(str(tmp_path / "snap.onnx"))
    assert not [n.name for n in proto.graph.node if n.name.endswith("/ActSubOffset")]
    assert info["parity"]["ok"]  # against the snapped copy of the model
    a_zps = {i.name[: -len(".act/a_zero_point")]: int(numpy_helper.to_array(i))
             for i in proto.graph.initializer if i.name.endswith(".act/a_zero_point")}
    a_scales = {i.name[: -len(".act/a_scale")]: float(numpy_helper.to_array(i))
                for i in proto.graph.initializer if i.name.endswith(".act/a_scale")}
    assert a_zps["model.0.conv"] == 0 and len(a_zps) == len(info["layers"])
    for name, z in a_zps.items():
        if name != "model.0.conv":
            assert z == round(-SILU_MIN / a_scales[name]), name
    moved = {r["name"]: r for r in info["zero_points"]}
    assert len(moved) == len(info["layers"]) - 1 and all(abs(r["shift_steps"]) <= 0.5 for r in moved.values())
    assert any(r["shift_steps"] != 0 for r in moved.values())
    with pytest.raises(ValueError, match="zero_point="):
        export_qdq_onnx(lsq_v5, tmp_path / "bad.onnx", imgsz=IMGSZ, zero_point="round", verbose=False)
    assert not (tmp_path / "bad.onnx").exists()


@pytest.mark.parametrize("method,act_grid", [("lsq", "auto"), ("lsqplus", "auto"), ("pact", "signed")])
def test_integer_zero_points_export_exact_equals_snap(method, act_grid, images, tmp_path):
    """qat_act_zp=integer: every activation grid is already on an integer zero point, so snap_zero_points moves
    nothing and zero_point=exact writes the same plain Q/DQ graph as zero_point=snap, with parity."""
    from ultralytics_gabfusion.quant.grids import snap_zero_points

    m = build_quantized("yolov5n.yaml", method, 4, images, act_grid=act_grid, act_zp="integer")
    assert snap_zero_points(copy.deepcopy(m)) == []
    infos, graphs = {}, {}
    for zp in ("exact", "snap"):
        infos[zp] = export_qdq_onnx(m, tmp_path / f"{zp}.onnx", imgsz=IMGSZ, images=images, zero_point=zp,
                                    verbose=False)
        p = infos[zp]["parity"]
        assert p["ok"] and p["unmatched"] == 0, p
        g = onnx.load(str(tmp_path / f"{zp}.onnx")).graph
        graphs[zp] = ([(n.name, n.op_type, list(n.input), list(n.output), str(n.attribute)) for n in g.node],
                      {i.name: i.SerializeToString() for i in g.initializer})
    assert infos["snap"]["zero_points"] == [] and infos["exact"]["layers"] == infos["snap"]["layers"]
    assert graphs["exact"] == graphs["snap"]
    nodes, inits = graphs["exact"]
    assert not [n for n in nodes if n[0].endswith(("/ActSubOffset", "/ActAddOffset"))]  # no float offset around Q/DQ
    zps = {k: int(numpy_helper.to_array(onnx.TensorProto.FromString(v))) for k, v in inits.items()
           if k.endswith(".act/a_zero_point")}
    if act_grid == "signed":  # the symmetric signed grid: zero point 0, INT4 (the first conv reads the image: UINT8)
        assert set(zps.values()) == {0}
    else:  # the SiLU offset (LSQ) / learned beta (LSQ+) as integer zero points
        assert sum(z != 0 for z in zps.values()) >= len(zps) // 2


def test_lsq_w4a4_yolov5s(lsq_v5, lsq_v5_onnx, images):
    path, info = lsq_v5_onnx
    assert path.exists() and not list(path.parent.glob(".*.tmp.onnx"))
    p = info["parity"]
    assert p["ok"] and p["unmatched"] == 0 and p["layer_conv"]["value"] < p["layer_conv"]["limit"]
    assert p["detections_torch"] > 0, "the detection comparison must not be vacuous"
    assert info["output_shape"] == (1, 4 + NC, ANCHORS)
    proto = onnx.load(str(path))
    assert proto.opset_import[0].version == 21 and all(o.domain != "gabq" for o in proto.opset_import)
    assert info["silu"] == "standard" and "QuickGelu" not in info["ops"]  # no output quantizers: standard operators
    # the DFL decoder: softmax over the last axis and a MatMul instead of Ultralytics' fixed conv
    softmax = [n for n in proto.graph.node if n.op_type == "Softmax"]
    assert len(softmax) == 1 and softmax[0].attribute[0].i == -1 and info["ops"]["Conv"] == len(info["layers"])
    onnx.checker.check_model(proto, full_check=True)
    w = weight_dq_types(proto)
    rows = {r["name"]: r for r in info["layers"]}
    for name, r in rows.items():  # 4-bit convs: INT4 weights; first conv and Detect predictors: 8-bit
        assert w[f"{name}.weight/w_int"] == ("INT4" if r["w_bits"] == 4 else "INT8"), name
    # qat_act_grid=auto: every conv input of a plain YOLOv5 is a SiLU output (or the image): unsigned 4-bit grids in
    # UINT4 with zero point 0 and the fixed SiLU offset as Sub/Add, 8-bit image input and head predictors in UINT8
    assert act_q_types(proto) == {"UINT4", "UINT8"}
    offsets = [n.name for n in proto.graph.node if n.name.endswith("/ActSubOffset")]
    assert len(offsets) == len(rows) - 1 and not any(n.startswith("model.0.conv.") for n in offsets)
    assert info["zero_points"] == []
    assert "Clip" not in info["ops"]  # 4- and 8-bit grids fill their containers
    # Negative BN scales: integers negated where -k fits INT4, else a negative channel scale; zero points all 0
    # (what integer kernels need). build_quantized gives ~5% negative BN scales, and 4-bit LSQ clips at -8 often.
    inits = {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}
    zps = np.concatenate([v.ravel() for k, v in inits.items() if k.endswith("/w_zero_point")])
    assert set(np.unique(zps)) == {0}
    scales = np.concatenate([v.ravel() for k, v in inits.items() if k.endswith("/w_scale")])
    assert (scales < 0).any() and (scales < 0).mean() < 0.1
    assert all(v.min() >= -8 and v.max() <= 7 for k, v in inits.items()
               if k.endswith("/w_int") and w[k] == "INT4")
    meta = {m.key: m.value for m in proto.metadata_props}
    assert ast.literal_eval(meta["imgsz"]) == [IMGSZ, IMGSZ] and meta["stride"] == "32"
    assert len(ast.literal_eval(meta["names"])) == NC
    assert json.loads(meta["quantization"])["methods"] == ["lsq"]
    # the caller's model is untouched: still fake-quant with BN
    assert type(lsq_v5.model[1]).__name__ == "QuantConvBlock" and isinstance(lsq_v5.model[1].bn, torch.nn.BatchNorm2d)


@pytest.mark.parametrize(
    "cfg,method,bits,opts",
    [
        ("yolo11s.yaml", "lsq", 3, {}),
        ("yolo11s.yaml", "n2uq", 4, {}),
        ("yolov5s.yaml", "n2uq", 3, {}),
        ("yolov5s.yaml", "pact", 4, {"weight_offset": "widen"}),
        ("yolov5s.yaml", "lsqplus", 3, {"gab": "paper"}),
        ("yolov5s.yaml", "lsqplus", 4, {"zero_point": "snap", "int4": False}),
        ("yolov5s.yaml", "lsq", 4, {"gab": "grad"}),
    ],
)
def test_export_parity(cfg, method, bits, opts, images, tmp_path):
    opts = dict(opts)
    gab = opts.pop("gab", False)
    model = build_quantized(cfg, method, bits, images, gab=gab)
    path = tmp_path / "q.onnx"
    info = export_qdq_onnx(model, path, imgsz=IMGSZ, images=images, verbose=False, **opts)
    p = info["parity"]
    assert p["ok"] and p["unmatched"] == 0 and p["detections_torch"] > 0, p
    assert info["output_shape"] == (1, 4 + NC, ANCHORS)
    proto = onnx.load(str(path))
    ops = info["ops"]
    w = weight_dq_types(proto)
    rows = {r["name"]: r for r in info["layers"]}
    low = [n for n, r in rows.items() if r["w_bits"] == bits]
    assert low and all(r["w_bits"] in (bits, 8) for r in rows.values())
    if method in ("lsq", "lsqplus"):
        assert {w[f"{n}.weight/w_int"] for n in low} == ({"INT4"} if bits == 4 and opts.get("int4", True) else {"INT8"})
    elif method == "pact":  # widened DoReFa integers 2k-15 in [-15, 15]: INT8, no Add
        assert {w[f"{n}.weight/w_int"] for n in low} == {"INT8"} and all(rows[n]["weight_range"] == [-15, 15] for n in low)
    else:  # N2UQ grid -M + k*2M/L stored as UINT-b integers + per-channel Add
        assert {w[f"{n}.weight/w_int"] for n in low} == ({"UINT4"} if bits == 4 else {"UINT8"})
        assert all(rows[n]["weight_range"] == [0, 2**bits - 1] for n in low)
    if method == "n2uq":
        assert "QuantizeLinear" not in ops
        # 4/3-bit: Greater against the broadcast threshold vector + ReduceSum; 8-bit ends: binary search (Gather/Where)
        assert ops["ReduceSum"] == len(low) and ops["Greater"] > len(low) and ops["Where"] > 0
        assert ops["DequantizeLinear"] == 2 * len(rows)  # one per weight, one per activation count
    else:
        types = act_q_types(proto)
        if bits == 4 and opts.get("int4", True):
            assert "UINT4" in types or "INT4" in types
        else:  # 3-bit activations or int4=False: 8-bit container, range enforced by Clip between Q and DQ
            assert ops["Clip"] >= len(low) and not ({"INT4", "UINT4"} & types)
        if opts.get("zero_point") == "snap":  # learned offsets moved onto integer zero points: plain Q/DQ
            assert set(low) <= {r["name"] for r in info["zero_points"] if r["snapped"] is not None}
            assert not [n for n in proto.graph.node if n.name.endswith("/ActSubOffset")]
        elif method in ("lsqplus", "pact"):  # float offsets -> explicit Sub before Q, Add after DQ
            assert ops["Sub"] >= len(low)
        if bits == 4 and method in ("lsq", "pact"):  # the containers follow qat_act_grid=auto
            # signed grids only after the paper form's LayerNorm; the grad form feeds the next conv a plain concat
            assert "UINT4" in types and (("INT4" in types) == (gab == "paper"))
    if gab == "paper":
        assert ops.get("ReduceMean", 0) >= 8  # 4 channel LayerNorms, mean and variance each
    elif gab == "grad":
        assert ops.get("ReduceMean", 0) == 0  # exported as the plain Concat it computes


def test_export_mixed_bit_widths(images, tmp_path):
    """Per-layer bits (qat_layer_bits): every conv is exported with its own bit-width, range and container."""
    from ultralytics_gabfusion.quant.qconv import quant_convs

    model = build_quantized("yolov5s.yaml", "lsq", 4, images, layer_bits={2: 3, 4: 8, 6: 5, 17: 2})
    path = tmp_path / "mixed.onnx"
    info = export_qdq_onnx(model, path, imgsz=IMGSZ, images=images, verbose=False)
    assert info["parity"]["ok"] and info["parity"]["unmatched"] == 0, info["parity"]
    want = {n: (m.w_bits, m.a_bits) for n, m in quant_convs(model)}
    assert {r["name"]: (r["w_bits"], r["a_bits"]) for r in info["layers"]} == want
    assert {w for w, _ in want.values()} == {2, 3, 4, 5, 8}
    proto = onnx.load(str(path))
    inits = {i.name: i for i in proto.graph.initializer}
    types = weight_dq_types(proto)
    for n, (wb, _) in want.items():
        assert types[f"{n}.weight/w_int"] == ("INT4" if wb == 4 else "INT8"), (n, wb)
        ints = numpy_helper.to_array(inits[f"{n}.weight/w_int"]).astype(np.int64)
        assert ints.min() >= -(2 ** (wb - 1)) and ints.max() <= 2 ** (wb - 1) - 1, (n, wb, ints.min(), ints.max())
        if wb in (2, 3):  # the range is really used: not 8-bit integers in an 8-bit container
            assert ints.max() - ints.min() >= 2 ** wb - 2, (n, wb)


def test_yolo_loads_exported_onnx(lsq_v5_onnx, images, tiny_data):
    """Ultralytics' AutoBackend reads the metadata and predicts through ONNX Runtime."""
    from ultralytics import YOLO

    from ultralytics_gabfusion.export import _image_files

    path, _ = lsq_v5_onnx
    m = YOLO(str(path), task="detect")
    res = m.predict([str(f) for f in _image_files(tiny_data)[:2]], imgsz=IMGSZ, conf=0.25, verbose=False)
    assert len(res) == 2 and len(res[0].names) == NC and res[0].boxes.data.shape[1] == 6


def test_parity_catches_a_wrong_scale(lsq_v5, lsq_v5_onnx, images, tmp_path):
    path, _ = lsq_v5_onnx
    proto = onnx.load(str(path))
    scaled = 0
    for init in proto.graph.initializer:  # every activation scale 1.5x off: a wrong export must not pass parity
        if init.name.endswith("act/a_scale"):
            init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) * 1.5, init.name))
            scaled += 1
    if not scaled:
        pytest.fail("activation scale initializers not found")
    bad = tmp_path / "bad.onnx"
    onnx.save(proto, str(bad))
    r = check_parity(lsq_v5, bad, images, raise_error=False)
    assert not r["ok"] and r["layer_act"]["value"] > 0.1 > r["layer_act"]["limit"]
    with pytest.raises(ParityError, match="parity failed"):
        check_parity(lsq_v5, bad, images)


def test_failed_parity_writes_nothing(lsq_v5, images, tmp_path):
    out = tmp_path / "never.onnx"
    with pytest.raises(ParityError):
        export_qdq_onnx(lsq_v5, out, imgsz=IMGSZ, images=images, verbose=False, layer_floor=-1.0)
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------------------------ CLI handler
@pytest.fixture(scope="module")
def lsq_ckpt(lsq_v5, tmp_path_factory):
    """The LSQ model saved as Ultralytics saves checkpoints (half-precision module under 'model')."""
    path = tmp_path_factory.mktemp("ckpt") / "q.pt"
    model = copy.deepcopy(lsq_v5)
    model.args = {"imgsz": IMGSZ, "data": "synth"}
    torch.save({"model": model.half(), "train_args": {"imgsz": IMGSZ}, "epoch": -1}, path)
    return path


def test_export_main_quantized_checkpoint(lsq_ckpt, tiny_data, tmp_path, capsys):
    rc = export_main({"model": str(lsq_ckpt), "format": "onnx", "data": str(tiny_data), "save_dir": str(tmp_path)})
    out = capsys.readouterr().out
    assert rc == 0 and (tmp_path / "q.onnx").exists()
    assert "Parity (val images of data=" in out and "unmatched 0" in out
    # ONNX Runtime runs this Q/DQ file in float (no QLinearConv): the export says so and names the faster option
    assert "runs this Q/DQ file's" in out and "in float" in out and "format=openvino" in out
    proto = onnx.load(str(tmp_path / "q.onnx"))
    assert proto.graph.input[0].type.tensor_type.shape.dim[2].dim_value == IMGSZ  # imgsz from the checkpoint args


def test_export_main_quantized_other_format_raises(lsq_ckpt):
    with pytest.raises(ValueError, match="format=onnx"):
        export_main({"model": str(lsq_ckpt), "format": "torchscript"})


def test_export_main_fp_checkpoint_goes_to_ultralytics(tmp_path, monkeypatch):
    from ultralytics import YOLO
    from ultralytics.nn.tasks import DetectionModel

    path = tmp_path / "fp.pt"
    torch.save({"model": DetectionModel("yolov5s.yaml", nc=NC, verbose=False).half(), "train_args": {}}, path)
    calls = []
    monkeypatch.setattr(YOLO, "export", lambda self, **kw: calls.append(kw) or "fp.onnx")
    assert export_main({"model": str(path), "format": "onnx", "imgsz": IMGSZ}) == 0
    assert calls == [{"format": "onnx", "imgsz": IMGSZ}]


# ------------------------------------------------------------------------------------------------ bad input
def test_fp_model_raises():
    from ultralytics.nn.tasks import DetectionModel

    with pytest.raises(ValueError, match="has no quantized layers.*YOLO\\(model\\).export\\(format='onnx'\\)"):
        export_qdq_onnx(DetectionModel("yolov5s.yaml", nc=NC, verbose=False), "fp.onnx", imgsz=IMGSZ)


def test_corrupt_checkpoint_raises(tmp_path):
    bad = tmp_path / "corrupt.pt"
    bad.write_bytes(b"this is not a checkpoint" * 10)
    with pytest.raises(ValueError, match="not a readable Ultralytics checkpoint"):
        export_qdq_onnx(bad, imgsz=IMGSZ)
    with pytest.raises(ValueError, match="not a readable Ultralytics checkpoint"):
        export_main({"model": str(bad), "format": "onnx"})
    other = tmp_path / "dict.pt"
    torch.save({"weights": torch.zeros(3)}, other)
    with pytest.raises(ValueError, match="not a readable Ultralytics checkpoint"):
        export_qdq_onnx(other, imgsz=IMGSZ)
    with pytest.raises(FileNotFoundError):
        export_qdq_onnx(tmp_path / "missing.pt", imgsz=IMGSZ)


def test_bad_options_raise(lsq_v5, tmp_path):
    with pytest.raises(ValueError, match="opset=21"):
        export_qdq_onnx(lsq_v5, tmp_path / "x.onnx", imgsz=IMGSZ, opset=17)
    with pytest.raises(ValueError, match="silu='fast'.*standard, ort"):
        export_qdq_onnx(lsq_v5, tmp_path / "x.onnx", imgsz=IMGSZ, silu="fast")
    with pytest.raises(ValueError, match="weight_offset"):
        export_qdq_onnx(lsq_v5, tmp_path / "x.onnx", imgsz=IMGSZ, weight_offset="round")
    with pytest.raises(ValueError, match="file= is required"):
        export_qdq_onnx(lsq_v5, imgsz=IMGSZ)
    assert list(tmp_path.iterdir()) == []


def test_uncalibrated_model_raises(tmp_path):
    from ultralytics.nn.tasks import DetectionModel

    from ultralytics_gabfusion.quant.convert import quantize_model

    m = DetectionModel("yolov5s.yaml", nc=NC, verbose=False)
    quantize_model(m, "lsq", 4, 4)
    with pytest.raises(ValueError, match="never initialised"):
        export_qdq_onnx(m, tmp_path / "x.onnx", imgsz=IMGSZ)


@pytest.mark.parametrize("bits", (8, 4))
def test_output_quantizers_give_onnx_runtime_integer_convolutions(bits, images, tmp_path):
    """qat_out_bits=8: every conv with quantized input and weight ends in a QuantizeLinear, so ONNX Runtime fuses
    DequantizeLinear -> Conv -> QuantizeLinear into QLinearConv (read from its optimised graph); 4-bit grids go into
    8-bit containers (no INT4 kernel), and the file computes what the fake-quant model computes (parity)."""
    import onnxruntime as ort

    from ultralytics_gabfusion.export.ort_kernels import ort_conv_kernels
    from ultralytics_gabfusion.quant.qconv import output_quantizers, quant_convs

    m = build_quantized("yolov5n.yaml", "lsq", bits, images, act_zp="integer", out_bits=8)
    both = [n for n, c in quant_convs(m) if c.act_quant is not None and c.weight_quant is not None]
    assert len(list(output_quantizers(m))) == len(both) > 0
    info = export_qdq_onnx(m, tmp_path / "q.onnx", imgsz=IMGSZ, images=images, verbose=False)
    assert info["parity"]["ok"] and info["parity"]["unmatched"] == 0, info["parity"]
    assert "INT4" not in info["int_types"] and "UINT4" not in info["int_types"]
    assert all(r["out"].startswith("QuantizeLinear/DequantizeLinear") for r in info["layers"] if r["name"] in both)
    kernels = ort_conv_kernels(tmp_path / "q.onnx")
    assert kernels.get("QLinearConv") == len(both), kernels
    # SiLU as ONNX Runtime's one-node QuickGelu (default with output quantizers); only the class-score Sigmoid stays
    silus = sum(isinstance(mod, torch.nn.SiLU) for _, mod in m.named_modules(remove_duplicate=False))
    assert info["silu"] == "ort" and info["ops"].get("QuickGelu") == silus > 0 and info["ops"].get("Sigmoid") == 1
    if bits == 8:  # the standard form computes the same outputs
        std = export_qdq_onnx(m, tmp_path / "std.onnx", imgsz=IMGSZ, silu="Standard", check=False, verbose=False)
        assert std["silu"] == "standard" and "QuickGelu" not in std["ops"] and std["ops"]["Sigmoid"] == silus + 1
        x = images[:1].numpy()
        y_ort, y_std = (ort.InferenceSession(str(tmp_path / f), providers=["CPUExecutionProvider"])
                        .run(None, {"images": x})[0] for f in ("q.onnx", "std.onnx"))
        np.testing.assert_allclose(y_ort, y_std, rtol=1e-5, atol=1e-4)


def test_layer_check_ignores_float_residue_of_a_bias_that_rounds_to_zero():
    """A quantized conv output whose input is all zeros and whose folded bias rounds to 0 on the int32 grid: ONNX gives
    exact zeros, PyTorch BN(conv) + the rounding a residue of ~1e-9. That is no relative error (it refused real W3A3
    exports); a bias one grid step off still is."""
    from ultralytics_gabfusion.export.parity import _conv_check
    from ultralytics_gabfusion.quant.qconv import QuantConv2d, QuantConvBlock, add_output_quantizer, integer_bias

    torch.manual_seed(0)
    conv = QuantConv2d(4, 3, 3, padding=1, bias=False, method="lsq", w_bits=3, a_bits=3, a_zp="integer")
    bn = torch.nn.BatchNorm2d(3).eval()
    with torch.no_grad():
        bn.running_mean.copy_(torch.tensor([0.3, -0.2, 0.1]))
        bn.running_var.copy_(torch.tensor([1.7, 0.9, 2.3]))
        bn.bias.copy_(torch.tensor([0.29, -0.21, 0.13]))  # nearly cancels the mean: |bias| far below a grid step
    block = QuantConvBlock(conv, bn, torch.nn.SiLU())
    add_output_quantizer(block, 8)
    block.eval()(torch.rand(1, 4, 6, 6) * 5)  # initialises every quantizer
    exact, step = integer_bias(conv, bn)
    assert bool((torch.round(exact / step) == 0).all())
    qin, g = torch.zeros(1, 4, 6, 6), torch.Generator().manual_seed(0)
    err, _ = _conv_check(conv, bn, qin, torch.zeros(1, 3, 6, 6), g, 1e-6, int_bias=True)
    assert err < 1e-3
    err, _ = _conv_check(conv, bn, qin, torch.full((1, 3, 6, 6), float(step.max())), g, 1e-6, int_bias=True)
    assert err > 0.5
