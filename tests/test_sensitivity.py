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
    # the compute side: each layer's MACs, the uniform plan's bits and GBOPs against FP
    assert all(int(r_["macs"]) > 0 for r_ in rows) and 0 < info["compute"]["gbops"] < info["compute"]["fp_gbops"]
    assert info["compute"]["imgsz"] == IMGSZ and "Uniform W4A4 plan at 64 px: average weight bits" in r.stdout + r.stderr
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


# ------------------------------------------------------------------------------------ compute: MACs and BOPs
class _Tiny(torch.nn.Module):
    """Three convs whose MACs are easy to count by hand: strided 3x3, grouped 1x3, and a 1x1."""

    def __init__(self, pad_c=0):
        super().__init__()
        self.a = torch.nn.Conv2d(3, 4, 3, stride=2, padding=1)  # 16 px -> 8 px
        self.b = torch.nn.Conv2d(4, 8, (1, 3), padding=(0, 1), groups=2, bias=False)
        self.c = torch.nn.Conv2d(8, 2, 1 + 2 * pad_c)  # pad_c=1: a 3x3 'valid' conv (maps not proportional)

    def forward(self, x):
        return self.c(self.b(self.a(x)))


def test_conv_costs_and_bops_exact_by_hand():
    """MACs = out elements x in/groups x kH x kW; BOPs = MACs x W bits x A bits (FP and unplanned convs at 32)."""
    from ultralytics_gabfusion.quant.mixed import (
        average_act_bits,
        conv_costs,
        fp_bops,
        model_bops,
        plan_bops,
    )

    m = _Tiny()
    costs = conv_costs(m, 16, probe=None)
    # a: 4x8x8 outputs x 3*3*3; b: 8x8x8 x (4/2)*1*3; c: 2x8x8 x 8; act = each conv's input elements
    assert costs == {"a": {"macs": 256 * 27, "act": 3 * 16 * 16}, "b": {"macs": 512 * 6, "act": 4 * 8 * 8},
                     "c": {"macs": 128 * 8, "act": 8 * 8 * 8}}
    rows = [{"name": "a", "w_bits": 8, "a_bits": 8}, {"name": "b", "w_bits": 4, "a_bits": 3},
            {"name": "c", "w_bits": None, "a_bits": None}]
    assert plan_bops(rows, costs) == 6912.0 * 64 + 3072 * 12 + 1024 * 1024 == 1527808.0
    assert plan_bops(rows[:2], costs) == 1527808.0, "a conv missing from the plan (e.g. DFL) counts 32 x 32 bits"
    assert fp_bops(costs) == (6912 + 3072 + 1024) * 1024.0
    assert average_act_bits(rows, costs) == (768 * 8 + 256 * 3) / (768 + 256) == 6.75, "weighted by input elements"
    assert math.isnan(average_act_bits(rows[2:], costs))
    # the probe path (two small passes, scaled exactly) gives the numbers of a pass at imgsz
    assert conv_costs(m, 32) == conv_costs(m, 32, probe=None) and conv_costs(m, 32)["a"]["macs"] == 1024 * 27
    valid = _Tiny(pad_c=1)  # a 'valid' 3x3 conv: not proportional to the input side, so measured at imgsz itself
    assert conv_costs(valid, 32)["c"] == {"macs": 2 * 14 * 14 * 8 * 9, "act": 8 * 16 * 16}
    # a converted model: each conv at its own bits (first conv 8/8, the rest 4/4), quantizers left untouched
    q = copy.deepcopy(m)
    quantize_model(q, "lsq", 4, 4)
    q.train()
    assert model_bops(q, 16) == 6912.0 * 64 + 3072 * 16 + 1024 * 16
    assert q.training and q.b.training and not bool(q.b.act_quant.initialized), "flags restored, nothing initialised"
    assert model_bops(m, 16) == fp_bops(costs)


def test_conv_costs_yolov5n_probe_matches_full_pass(fp_v5n):
    from ultralytics_gabfusion.quant.mixed import conv_costs

    fast, full = conv_costs(fp_v5n, 160), conv_costs(fp_v5n, 160, probe=None)
    assert fast == full and len(full) == sum(isinstance(x, torch.nn.Conv2d) for x in fp_v5n.modules())
    assert fp_v5n.training is False


@pytest.mark.parametrize("value, want", [
    ("2.5GBOPs@160", ("bops", 2.5e9 * 16)), ("40GBOPs", ("bops", 40e9)), ("40 gbops", ("bops", 40e9)),
    ("800MBOPs@320", ("bops", 800e6 * 4)), ("1.5TBOPs", ("bops", 1.5e12)), ("7e5KBOPs", ("bops", 7e8)),
    ("2%BOPs", ("bops_fraction", 0.02)), ("100%BOPs", ("bops_fraction", 1.0)), (4.5, ("avg_bits", 4.5)),
    ("600KB", ("bytes", 600e3)),
])
def test_bits_budget_parses_bops(value, want):
    from ultralytics_gabfusion.settings import parse_bits_budget, validate_settings

    kind, x = parse_bits_budget(value)
    assert kind == want[0] and x == pytest.approx(want[1], rel=1e-15)
    assert validate_settings({"qat_bits_budget": value})["qat_bits_budget"] == (
        value if isinstance(value, float) else value.replace(" ", ""))


@pytest.mark.parametrize("value, msg", [
    ("2.5GFLOPs", "or a compute budget in bit-operations: 40GBOPs"),
    ("0GBOPs", "a BOPs budget is a positive number with a unit BOPs, KBOPs"),
    ("-1GBOPs", "a BOPs budget is a positive number"),
    ("xGBOPs", "a BOPs budget is a positive number"),
    ("2.5GBOPs@100", "must be a positive multiple of 32"),
    ("2.5GBOPs@big", "must be a positive multiple of 32"),
    ("0%BOPs", r"a percentage in \(0, 100\]"),
    ("150%BOPs", r"a percentage in \(0, 100\]"),
    ("2%BOPs@160", "without @imgsz"),
    (9, "qat_bits_budget=2.5GBOPs@160"),
])
def test_bits_budget_bad_bops_values_refused(value, msg):
    from ultralytics_gabfusion.settings import SettingsError, validate_settings

    with pytest.raises(SettingsError, match=msg):
        validate_settings({"qat_bits_budget": value})


def test_allocate_bits_under_bops_budget(fp_v5n, tmp_path):
    """Equal compute: from a W3A3 base, raise the most sensitive layers while the BOPs stay within uniform W4A4's."""
    from ultralytics_gabfusion.quant.mixed import BOPS_IMGSZ, conv_costs, fp_bops, plan_bops

    fp = fp_v5n

    def plan(base):
        return lambda lb: plan_policy(fp, base, base, act_grid="signed", layer_bits=lb)

    costs = conv_costs(fp, BOPS_IMGSZ)
    w4a4 = plan_bops(plan(4)({}), costs)
    scores = {layer: float(layer) for layer in range(1, 25)}
    scores[2] = 100.0
    mapping = allocate_bits(fp, scores, ("bops", w4a4), plan(3), costs)
    assert mapping[2] == 8, "the most sensitive layer first, at the highest bits that fit"
    assert plan_bops(plan(3)(mapping), costs) <= w4a4 * (1 + 1e-9)
    for layer in {r["layer"] for r in plan(3)({}) if r["role"] == "conv"} - set(mapping):  # greedy: nothing more fits
        assert plan_bops(plan(3)({**mapping, layer: 4}), costs) > w4a4
    # the same budget as a share of FP, as a string at 640 px and at 160 px (x16 fewer BOPs): the same plan
    assert allocate_bits(fp, scores, ("bops_fraction", w4a4 / fp_bops(costs)), plan(3)) == mapping
    csv_file = tmp_path / "sensitivity.csv"
    csv_file.write_text("layer,score\n" + "".join(f"{k},{v}\n" for k, v in scores.items()))
    for budget in (f"{w4a4!r}BOPs", f"{w4a4 / 16!r}BOPs@160", f"{100 * w4a4 / fp_bops(costs)!r}%BOPs"):
        assert resolve_layer_bits(fp, str(csv_file), budget, plan(3)) == mapping, budget
    msg = (r"qat_bits_budget=\S+ GBOPs at 640 px \(\S+ % of FP\) is below the uniform plan's \S+ GBOPs at 640 px "
           r"\(1.869 % of FP\)")
    with pytest.raises(ValueError, match=msg):
        allocate_bits(fp, scores, ("bops", w4a4 * 0.99), plan(4), costs)


def test_precision_table_shows_activation_bits_and_bops(fp_v5n, tmp_path):
    """The precision table (and the mixed-precision line) prints avg W / A bits and GBOPs of plan, uniform and FP."""
    import logging

    from ultralytics.utils import LOGGER

    from ultralytics_gabfusion.qat_setup import build_structure, precision_summary
    from ultralytics_gabfusion.quant.mixed import conv_costs, fp_totals, plan_totals
    from ultralytics_gabfusion.settings import QATConfig

    f = tmp_path / "sensitivity.csv"
    f.write_text("layer,score\n4,0.9\n17,0.5\n9,0.1\n")
    cfg = QATConfig.from_keys({"qat": "lsq", "w_bits": 4, "a_bits": 4, "qat_layer_bits": str(f),
                               "qat_bits_budget": "2.3%BOPs"})
    fp = copy.deepcopy(fp_v5n)
    records = []
    handler = logging.Handler()
    handler.emit = lambda rec: records.append(rec.getMessage())
    LOGGER.addHandler(handler)
    try:
        build_structure(fp, cfg, verbose=True)
    finally:
        LOGGER.removeHandler(handler)
    log = "\n".join(records)
    mapping = fp.gabfusion_layer_bits
    assert mapping and set(mapping) <= {4, 17, 9}
    costs = conv_costs(fp_v5n, 640)
    plan = plan_totals(fp_v5n, plan_policy(fp_v5n, 4, 4, act_grid="signed", layer_bits=mapping), costs)
    uni = plan_totals(fp_v5n, plan_policy(fp_v5n, 4, 4, act_grid="signed"), costs)
    full = fp_totals(fp_v5n, costs)
    assert plan["bops"] <= 0.023 * full["bops"] and plan["a_bits"] > uni["a_bits"] > 4 and plan["bops"] > uni["bops"]
    table = log[log.index("precision policy:"):]
    assert "  avg W bits  avg A bits      GBOPs   % of FP   size KiB" in table
    assert "(BOPs = MACs x W bits x A bits, 640 px input)" in table
    for label, t in (("this plan", plan), ("uniform W4A4", uni), ("FP32", full)):
        line = next(x for x in table.splitlines() if x.startswith(label))
        assert f"{t['w_bits']:.3f}" in line and f"{t['a_bits']:.3f}" in line and f"{t['bops'] / 1e9:.3f}" in line, line
    assert "100.00%" in table and f"{100 * uni['bops'] / full['bops']:.2f}%" in table
    mixed_line = next(x for x in records if "mixed precision from" in x)
    assert (f"average activation bits {plan['a_bits']:.3f} (uniform {uni['a_bits']:.3f})" in mixed_line
            and f"{plan['bops'] / 1e9:.3f} GBOPs at 640 px" in mixed_line), mixed_line
    uniform_only = precision_summary(fp_v5n, QATConfig.from_keys({"qat": "lsq", "w_bits": 3, "a_bits": 3}))
    assert uniform_only.splitlines()[1].startswith("this plan (uniform)") and "uniform W3A3" in uniform_only


def test_sensitivity_compute_columns(fp_v5n):
    """sensitivity rows carry each layer's MACs; the JSON/table the uniform plan's avg bits and GBOPs vs FP."""
    from ultralytics_gabfusion.quant.mixed import average_bits, conv_costs, model_bops, model_rows
    from ultralytics_gabfusion.quant.qconv import quant_convs
    from ultralytics_gabfusion.sensitivity import _rank_rows, compute_summary, format_table, quantized_layers

    q = _quantized(fp_v5n)
    costs = conv_costs(q, IMGSZ)
    c = compute_summary(q, costs, IMGSZ)
    assert c["gbops"] == model_bops(q, IMGSZ) / 1e9 and c["w_bits"] == average_bits(q, model_rows(q))
    assert c["fp_gbops"] == pytest.approx(1024 * sum(v["macs"] for v in costs.values()) / 1e9, rel=1e-15)
    layers = quantized_layers(q)
    res = {(la, mo): {"kl": 1.0 / (la + 1), "mse": 0.0} for la in layers for mo in ("w", "a", "wa")}
    rows = _rank_rows(q, layers, layer_roles(q), res, "kl", costs)
    by = {r["layer"]: r for r in rows}
    assert by[2]["macs"] == sum(v["macs"] for n, v in costs.items() if n.startswith("model.2."))
    assert sum(r["macs"] for r in rows) == sum(costs[n]["macs"] for n, _ in quant_convs(q))
    info = {"w_bits": 4, "a_bits": 4, "qat": "lsq", "metric": "kl", "images": 2, "rows": rows,
            "reference": {"all": {"kl": 0.1, "mse": 0.1}}, "compute": c}
    txt = format_table(info)
    assert "MMACs" in txt and f"{by[2]['macs'] / 1e6:.2f}" in txt
    assert f"Uniform W4A4 plan at {IMGSZ} px: average weight bits {c['w_bits']:.3f}, average activation bits" in txt


def test_sweep_table_and_size_plot_gain_gbops(tmp_path, fp_v5n):
    """With the runs' checkpoints at hand the sweep gains a GBOPs column and size.png a row of panels vs GBOPs."""
    from PIL import Image

    from ultralytics_gabfusion.bench.report import aggregate, markdown, plot_size
    from ultralytics_gabfusion.quant.mixed import model_bops

    ckpts, gb = {}, {}
    for bits in (None, 8, 4):
        m = copy.deepcopy(fp_v5n)
        if bits:
            quantize_model(m, "lsq", bits, bits)
        ckpts[bits] = tmp_path / f"w{bits}.pt"
        torch.save({"model": None, "ema": m.half()} if bits else {"model": m.half()}, ckpts[bits])
        gb[bits] = model_bops(m.float(), IMGSZ) / 1e9

    def rec(arm, bits, m50, kind="qat"):
        return {"id": f"{arm}{bits}", "model": "yolov5n", "seed": 0, "kind": kind, "method": None if kind == "fp"
                else "lsq", "bits": bits, "arm": arm, "status": "trained", "mAP50": m50, "mAP50_95": m50 / 2,
                "epochs_run": 0, "size_bytes": 1024.0 * (bits or 32), "weights": str(ckpts[bits])}

    recs = [rec("fp", None, 0.9, "fp"), rec("ptq", 8, 0.89), rec("ptq", 4, 0.8), rec("baseline", 8, 0.9),
            rec("baseline", 4, 0.85)]
    s = {"models": ["yolov5n"], "seeds": [0], "bits": [8, 4], "methods": ["lsq"], "arms": ["ptq", "baseline"]}
    result = {"settings": {**s, "imgsz": IMGSZ, "batch": 8, "fp_epochs": 1, "epochs": 1, "ada": 0.01},
              "environment": {"hardware": "cpu", "torch": "t", "ultralytics": "u", "ultralytics_gabfusion": "p",
                              "git_commit": None},
              "data": {"generated": True, "n_train": 16, "n_val": 8, "imgsz": IMGSZ}, "rows": aggregate(recs, s),
              "runs": recs, "wall_s": 1.0}
    md = markdown(result)
    assert "| model | method | bits | size (KiB) | GBOPs | PTQ (no training) | baseline QAT |" in md
    assert f"| yolov5n | — | FP32 | 32 | {gb[None]:,.3f} | 90.00 / 45.00 (FP) | — |" in md
    assert f"| yolov5n | lsq | W4A4 | 4 | {gb[4]:,.3f} | 80.00 / 40.00 | 85.00 / 42.50 |" in md
    assert gb[None] > gb[8] > gb[4] > 0 and f"one {IMGSZ} px image" in md
    assert Image.open(plot_size(result, tmp_path / "size.png")).size[1] > 1.8 * Image.open(
        plot_size({**result, "runs": []}, tmp_path / "size1.png")).size[1], "a second row of panels (vs GBOPs)"
    assert "GBOPs" not in markdown({**result, "runs": []}), "no checkpoints: the table as before"
