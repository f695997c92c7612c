"""Per-layer sensitivity (``yolo-gab sensitivity``) and mixed precision (``qat_layer_bits`` / ``qat_bits_budget``)."""

from __future__ import annotations

import copy
import csv
import json
import math

import numpy as np
import pytest
import torch
from conftest import IMGSZ, run_cli

from ultralytics_gabfusion.quant.convert import (
    calibrate_activations,
    init_weight_quantizers,
    plan_policy,
    quantize_model,
)
from ultralytics_gabfusion.quant.mixed import (
    allocate_bits,
    average_bits,
    model_size_bytes,
    plan_size_bytes,
    read_sensitivity,
    resolve_layer_bits,
)
from ultralytics_gabfusion.sensitivity import OutputDivergence, layer_roles, only_quantized, spearman

NC = 16


def _fp_model(cfg="yolov5n.yaml"):
    from ultralytics.nn.tasks import DetectionModel

    torch.manual_seed(0)
    return DetectionModel(cfg, nc=NC, verbose=False).eval()


def _quantized(fp, method="lsq", bits=4, layer_bits=None):
    m = copy.deepcopy(fp)
    quantize_model(m, method, bits, bits, layer_bits=layer_bits)
    init_weight_quantizers(m)
    calibrate_activations(m, [torch.rand(2, 3, IMGSZ, IMGSZ, generator=torch.Generator().manual_seed(1))])
    return m.eval()


@pytest.fixture(scope="module")
def fp_v5n():
    """An untrained YOLOv5n (eval mode); tests that change it take a deepcopy."""
    return _fp_model()


# ------------------------------------------------------------------------------------------------ sensitivity
def test_spearman_matches_pearson_of_average_ranks():
    x = [0.3, 1.0, 1.0, 2.5, -1.0, 4.0]
    y = [1.0, 3.0, 2.0, 4.0, 0.5, 2.0]

    def avg_ranks(v):
        v = np.asarray(v)
        return np.array([np.mean(np.nonzero(np.sort(v) == e)[0]) for e in v])

    want = np.corrcoef(avg_ranks(x), avg_ranks(y))[0, 1]
    assert spearman(x, y) == pytest.approx(want, abs=1e-12)
    assert spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert math.isnan(spearman([1, 2], [1, 2])) and math.isnan(spearman([1, 1, 1], [1, 2, 3]))


def test_output_divergence_matches_formula_float64():
    g = torch.Generator().manual_seed(0)
    rb, rs = torch.randn(2, 4 * 3, 5, generator=g), torch.randn(2, 2, 5, generator=g)
    qb, qs = rb + 0.3 * torch.randn(rb.shape, generator=g), rs + 0.3 * torch.randn(rs.shape, generator=g)
    d = OutputDivergence()
    d.update((rb, rs), (qb, qs))
    res = d.result()
    kl = 0.0
    R, S, Q, QS = (t.double().numpy() for t in (rb, rs, qb, qs))
    for b in range(2):
        per_anchor = []
        for a in range(5):
            p = 1 / (1 + np.exp(-S[b, :, a]))
            q = 1 / (1 + np.exp(-QS[b, :, a]))
            k = float(np.sum(p * np.log(p / q) + (1 - p) * np.log((1 - p) / (1 - q))))
            for side in range(4):
                lp = R[b, side * 3:(side + 1) * 3, a]
                lq = Q[b, side * 3:(side + 1) * 3, a]
                pp, pq = np.exp(lp) / np.exp(lp).sum(), np.exp(lq) / np.exp(lq).sum()
                k += p.max() * float(np.sum(pp * np.log(pp / pq)))
            per_anchor.append(k)
        kl += np.mean(per_anchor)
    assert res["kl"] == pytest.approx(kl / 2, rel=1e-5)
    mse = (np.sum((Q - R) ** 2) + np.sum((QS - S) ** 2)) / (np.sum(R**2) + np.sum(S**2))
    assert res["mse"] == pytest.approx(mse, rel=1e-5)


def test_layer_roles_yolov5_with_and_without_gabfusion(fp_v5n):
    from ultralytics_gabfusion.fusion import insert_gabfusion

    fp = copy.deepcopy(fp_v5n)
    want = {**{i: "backbone" for i in range(10)}, 10: "neck", 14: "neck", 18: "neck", 21: "neck",
            13: "fusion", 17: "fusion", 20: "fusion", 23: "fusion", 24: "head"}
    roles = layer_roles(fp)
    assert {k: roles[k] for k in want} == want
    insert_gabfusion(fp, "balanced")
    roles = layer_roles(fp)
    assert {k: roles[k] for k in want} == want


def test_only_quantized_applies_exactly_one_layers_quantizers(fp_v5n):
    fp = fp_v5n
    q = _quantized(fp)
    x = torch.rand(2, 3, IMGSZ, IMGSZ, generator=torch.Generator().manual_seed(2))

    def raw(model):  # the Detect inputs: the outputs of an untrained head are bias-dominated, too flat to compare
        return torch.cat([f.flatten() for f in model(x)[1]["feats"]])

    def rel(a, b):
        return float((a - b).norm() / b.norm())

    with torch.no_grad():
        full = raw(q)
        with only_quantized(q, None, False, False):
            assert rel(raw(q), raw(fp)) < 1e-5, "nothing quantized = the FP model"
        layer = 2  # on the dominant path of an untrained net (deeper branches shrink towards 0)
        ref = copy.deepcopy(fp)  # FP model whose layer-2 conv weights are replaced by their quantized values
        qmods = dict(q.named_modules())
        for name, mod in ref.named_modules():
            if isinstance(mod, torch.nn.Conv2d) and name.startswith(f"model.{layer}."):
                mod.weight.copy_(qmods[name].quantized_weight())
        with only_quantized(q, {layer}, True, False):
            assert rel(raw(q), raw(ref)) < 1e-5, "weights of layer 2 only"
        with only_quantized(q, {layer}, False, True):
            out_a = raw(q)
        assert min(rel(out_a, raw(fp)), rel(out_a, raw(ref)), rel(raw(ref), raw(fp)), rel(full, out_a)) > 1e-3
        assert torch.equal(raw(q), full), "every quantizer is back after the block"


@pytest.mark.slow
def test_sensitivity_cli_tiny(tmp_path, tiny_data, fp_ckpt):
    """The CLI as typed: ranked table, CSV (input of qat_layer_bits), JSON with Spearman, PNG; mAP validation."""
    r = run_cli("sensitivity", f"model={fp_ckpt['yolov5s']}", f"data={tiny_data}", "qat=lsq", "w_bits=4", "a_bits=4",
                "metric=map", "images=6", f"imgsz={IMGSZ}", "batch=4", "workers=0", "device=cpu", "qat_calib=1",
                f"project={tmp_path}", "name=sens", "exist_ok=True")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    out = tmp_path / "sens"
    assert "Layer sensitivity, W4A4 lsq" in r.stdout + r.stderr and "Spearman(kl proxy" in r.stdout + r.stderr
    for f in ("sensitivity.csv", "sensitivity.json", "sensitivity.png"):
        assert (out / f).stat().st_size > 0, f
    assert not list(out.glob(".*.tmp")), "no temporary files left"
    with open(out / "sensitivity.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    info = json.loads((out / "sensitivity.json").read_text())
    # every conv-bearing layer of yolov5s once; ranked by the mAP50 drop of weights+activations
    assert [int(r_["layer"]) for r_ in sorted(rows, key=lambda r_: int(r_["layer"]))] == \
        [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 13, 14, 17, 18, 20, 21, 23, 24]
    scores = [float(r_["score"]) for r_ in rows]
    assert scores == sorted(scores, reverse=True) and [int(r_["rank"]) for r_ in rows] == list(range(1, 20))
    for r_ in rows:
        assert float(r_["score"]) == pytest.approx(float(r_["drop_wa"]), abs=1e-5)
        assert float(r_["drop_wa"]) == pytest.approx(info["reference"]["fp"]["mAP50"] - float(r_["mAP50_wa"]), abs=1e-5)
        assert float(r_["kl_wa"]) >= 0 and float(r_["mse_wa"]) >= 0
    assert info["images"] == 6 and set(info["spearman"]) == {"kl", "mse"}
    assert read_sensitivity(out / "sensitivity.csv")[int(rows[0]["layer"])] == pytest.approx(scores[0], abs=1e-5)


def test_sensitivity_bad_input_is_one_line_and_writes_nothing(tmp_path, tiny_data):
    r = run_cli("sensitivity", f"model={tmp_path / 'nope.pt'}", f"data={tiny_data}", "qat=lsq", "metric=acc",
                f"project={tmp_path}", "name=s")
    assert r.returncode != 0 and "metric=acc is not valid" in r.stderr and "Traceback" not in r.stderr
    r = run_cli("sensitivity", f"data={tiny_data}", "qat=lsq", f"project={tmp_path}", "name=s")
    assert r.returncode == 2 and "sensitivity needs model=" in r.stderr
    assert not (tmp_path / "s").exists()


# --------------------------------------------------------------------------------------------- mixed precision
def test_layer_bits_policy_and_size_model(fp_v5n):
    fp = fp_v5n
    rows = plan_policy(fp, 4, 4, layer_bits={9: 8, 24: 6, 13: 3})
    by = [(r["layer"], r["role"], r["w_bits"], r["a_bits"]) for r in rows]
    assert all((w, a) == (8, 8) for la, role, w, a in by if la == 9)
    assert all((w, a) == (3, 3) for la, role, w, a in by if la == 13)
    assert all((w, a) == ((8, 8) if role == "head" else (6, 6)) for la, role, w, a in by if la == 24), \
        "Detect predictors keep qat_head_bits"
    assert all((w, a) == (4, 4) for la, role, w, a in by if la not in (0, 9, 13, 24))
    # size: conv weights at their bits, everything else (biases, BN) at 32 bits, quantizer steps not counted
    mods = dict(fp.named_modules())
    conv_bits = sum(mods[r["name"]].weight.numel() * r["w_bits"] for r in rows)
    other = sum(p.numel() for p in fp.parameters()) - sum(mods[r["name"]].weight.numel() for r in rows)
    assert plan_size_bytes(fp, rows) == (conv_bits + 32 * other) / 8
    assert model_size_bytes(fp) == 4 * sum(p.numel() for p in fp.parameters())
    for method in ("lsq", "n2uq"):
        q = copy.deepcopy(fp)
        quantize_model(q, method, 4, 4, layer_bits={9: 8, 24: 6, 13: 3})
        assert model_size_bytes(q) == plan_size_bytes(fp, rows), method
    n = {r["name"]: mods[r["name"]].weight.numel() for r in rows}
    assert average_bits(fp, rows) == pytest.approx(sum(n[r["name"]] * r["w_bits"] for r in rows) / sum(n.values()))
    with pytest.raises(ValueError, match=r"names layers \[0\] that hold no conv at w_bits"):
        plan_policy(fp, 4, 4, layer_bits={0: 8})
    with pytest.raises(ValueError, match="use integers in 2..8"):
        plan_policy(fp, 4, 4, layer_bits={9: 9})


def test_allocate_bits_raises_most_sensitive_first_within_budget(fp_v5n):
    fp = fp_v5n

    def plan(lb):
        return plan_policy(fp, 4, 4, act_grid="signed", layer_bits=lb)

    scores = {layer: float(layer) for layer in range(1, 25)}  # higher index = more sensitive
    scores[2] = 100.0  # small layer made the most sensitive
    base = average_bits(fp, plan({}))
    mapping = allocate_bits(fp, scores, ("avg_bits", base + 0.5), plan)
    assert mapping[2] == 8, "the most sensitive layer goes to 8 bits"
    assert average_bits(fp, plan(mapping)) <= base + 0.5 + 1e-9
    # greedy: a layer left at 4 bits could not have been raised even to 5 (the budget only shrank after its turn)
    settable = {r["layer"] for r in plan({}) if r["role"] == "conv"}
    left = settable - set(mapping)
    assert left, "the budget does not cover every layer"
    for layer in left:
        assert average_bits(fp, plan({**mapping, layer: 5})) > base + 0.5
    size = plan_size_bytes(fp, plan({}))
    mb = allocate_bits(fp, scores, ("bytes", size + 4096), plan)
    assert mb and plan_size_bytes(fp, plan(mb)) <= size + 4096
    with pytest.raises(ValueError, match="below the uniform plan"):
        allocate_bits(fp, scores, ("avg_bits", 3.5), plan)


@pytest.mark.parametrize(
    "values, msg",
    [
        ({"qat_layer_bits": {17: 9}}, "use an integer in 2..8"),
        ({"qat_layer_bits": {"x": 8}}, "is not a layer index"),
        ({"qat_layer_bits": "{17: 8"}, "is not a valid mapping"),
        ({"qat_layer_bits": "missing.csv"}, "file not found"),
        ({"qat_layer_bits": 4}, "must be a mapping"),
        ({"qat_bits_budget": 9}, "average bit-width must be in 2..8"),
        ({"qat_bits_budget": "12 parsecs"}, "is not valid: give an average bit-width"),
    ],
)
def test_mixed_precision_settings_refused(values, msg):
    from ultralytics_gabfusion.settings import validate_settings

    with pytest.raises(ValueError, match=msg):
        validate_settings(values)


def test_mixed_precision_settings_consistency(tmp_path, fp_v5n):
    from ultralytics_gabfusion.settings import check_consistency, validate_settings

    f = tmp_path / "sensitivity.csv"
    f.write_text("rank,layer,score\n1,17,0.5\n")
    assert validate_settings({"qat_layer_bits": "{17: 8, 20: 6}"})["qat_layer_bits"] == {17: 8, 20: 6}
    assert validate_settings({"qat_bits_budget": "1.5KiB"})["qat_bits_budget"] == "1.5KiB"
    with pytest.raises(ValueError, match="needs qat_bits_budget"):
        check_consistency({"qat_layer_bits": str(f), "qat_bits_budget": None})
    with pytest.raises(ValueError, match="applies to qat_layer_bits=<sensitivity.csv>"):
        check_consistency({"qat_layer_bits": {17: 8}, "qat_bits_budget": 4.5})
    check_consistency({"qat_layer_bits": str(f), "qat_bits_budget": 4.5})
    bad = tmp_path / "other.csv"
    bad.write_text("a,b\n1,2\n")
    with pytest.raises(ValueError, match="columns layer, score"):
        resolve_layer_bits(fp_v5n, str(bad), 4.5, None)


def test_ptq_with_sensitivity_csv_and_budget(tmp_path, tiny_data, fp_ckpt):
    """End to end through the trainer: the CSV + budget become per-layer bits in the saved model."""
    from ultralytics_gabfusion.ptq import post_training_quantize
    from ultralytics_gabfusion.quant.convert import _layer_index
    from ultralytics_gabfusion.quant.qconv import quant_convs

    f = tmp_path / "sensitivity.csv"
    f.write_text("rank,layer,role,score\n1,17,fusion,0.9\n2,2,backbone,0.5\n3,9,backbone,0.1\n")
    ckpt = post_training_quantize(fp_ckpt["yolov5s"], data=str(tiny_data), qat="lsq", w_bits=4, a_bits=4,
                                  qat_layer_bits=str(f), qat_bits_budget=4.2, imgsz=IMGSZ, batch=4, workers=0,
                                  device="cpu", qat_calib=1, project=str(tmp_path), name="ptq", exist_ok=True)
    model = torch.load(ckpt, weights_only=False)["ema"]
    bits = {}
    for name, m in quant_convs(model):
        bits.setdefault(_layer_index(name), set()).add((m.w_bits, m.a_bits))
    assert model.gabfusion_layer_bits[17] == 8 and bits[17] == {(8, 8)}, "the most sensitive layer at 8 bits"
    assert bits[10] == {(4, 4)} and bits[0] == {(8, 8)}
    assert average_bits(model, [{"name": n, "w_bits": m.w_bits} for n, m in quant_convs(model)]) <= 4.2
