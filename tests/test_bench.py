"""``yolo-gab bench`` (paper table) and ``yolo-gab bench speed`` (step cost) at CI size on the CPU."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from conftest import IMGSZ, run_cli

TINY = ("synth_train=16", "synth_val=8", f"imgsz={IMGSZ}", "fp_epochs=1", "epochs=1", "methods=[lsq]", "bits=[4]",
        "models=[yolov5s]", "batch=8", "workers=0", "device=cpu", "seeds=[0]", "arms=[ptq,ptq_gab,baseline,gab,gab_ada]")
ARMS = ("ptq", "ptq_gab", "baseline", "gab", "gab_ada")


def _num(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


# ------------------------------------------------------------------------------------------- accuracy bench
@pytest.mark.slow
def test_bench_cli_tiny_table_and_resume(tmp_path):
    """FP + PTQ + three W4A4 LSQ arms from one FP checkpoint: table, JSON and charts are complete and consistent."""
    out = tmp_path / "bench"
    r = run_cli("bench", *TINY, f"out={out}")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    for f in ("bench.md", "bench.json", "bench.png", "curves.png"):
        assert (out / f).is_file() and (out / f).stat().st_size > 0, f

    md = (out / "bench.md").read_text()
    assert "| model | bits | method | arm | mAP50 | mAP50-95 | gap mAP50 | gap mAP50-95 | gain mAP50 |" in md
    assert "| yolov5s | FP | — | FP (reference) |" in md
    for label in ("PTQ (no training)", "PTQ+GABFusion (step 0)", "baseline QAT", "+GABFusion", "+GABFusion+ADA"):
        assert f"| yolov5s | W4A4 | lsq | {label} |" in md, label
    assert "| yolov5s | W4A4 | lsq | baseline QAT |" in r.stdout, "the table is printed at the end"

    res = json.loads((out / "bench.json").read_text())
    for key in ("settings", "environment", "data", "runs", "rows", "wall_s", "resumed", "failed"):
        assert key in res, key
    env = res["environment"]
    for key in ("hardware", "torch", "ultralytics", "ultralytics_gabfusion", "git_commit", "cpu"):
        assert key in env, key
    assert env["hardware"] and env["torch"] and env["ultralytics"]
    s = res["settings"]
    assert s["methods"] == ["lsq"] and s["bits"] == [4] and s["arms"] == list(ARMS) and s["seeds"] == [0]
    assert s["epochs"] == 1 and s["fp_epochs"] == 1 and Path(s["out"]).is_absolute()
    assert res["data"]["generated"] and res["data"]["n_train"] == 16 and res["failed"] == []

    runs = {r["id"]: r for r in res["runs"]}
    fp = runs["yolov5s-s0-fp"]
    assert fp["kind"] == "fp" and fp["status"] == "trained" and Path(fp["weights"]).is_file()
    for arm in ARMS:
        q = runs[f"yolov5s-s0-lsq-w4a4-{arm}"]
        assert q["status"] == "trained" and q["kind"] == "qat" and q["epochs_run"] == (0 if "ptq" in arm else 1)
        assert q["fp_weights"] == fp["weights"], "every arm starts from the same FP checkpoint"
        a = q["train_args"]
        assert (a["qat"], a["w_bits"], a["a_bits"], a["seed"]) == ("lsq", 4, 4, 0)
        assert a["gab"] == ("off" if arm in ("ptq", "baseline") else "balanced")
        assert a["ada"] == (0.1 if arm == "gab_ada" else 0.0) and a["ada_div"] == "kl"
        if arm == "gab_ada":  # per-epoch curves of the run, ADA's share of the gradient included
            assert set(q["per_epoch"]) == {"mAP50", "mAP50_95", "ada_ratio", "ada_grad_ratio"}
            # the tiny 1-epoch FP model gives ADA almost no signal (loss ratio ~1e-6, gradient share ~1e-16 or an
            # exact 0): here the columns are checked; the share's size is tested in test_training_features
            assert q["per_epoch"]["ada_ratio"][0] > 0 and 0 <= q["per_epoch"]["ada_grad_ratio"][0] < 1e3
        assert (a["optimizer"], a["lr0"], a["lrf"], a["momentum"], a["weight_decay"]) == \
            ("SGD", 0.00334, 0.15135, 0.74832, 0.00025), "the paper's optimiser"
    for r_ in runs.values():
        for k in ("mAP50", "mAP50_95", "precision", "recall", "train_wall_s", "val_wall_s", "wall_s"):
            assert _num(r_[k]), (r_["id"], k, r_[k])
        assert 0.0 <= r_["mAP50_95"] <= r_["mAP50"] <= 1.0
    # every run's args differ only where its arm differs (identical schedule and seed)
    base = runs["yolov5s-s0-lsq-w4a4-baseline"]["train_args"]
    for arm in ("ptq", "ptq_gab", "gab", "gab_ada"):
        other = runs[f"yolov5s-s0-lsq-w4a4-{arm}"]["train_args"]
        diff = {k for k in set(base) | set(other) if base.get(k) != other.get(k)}
        assert diff <= {"gab", "ada", "name"}, diff

    rows = {(r_["bits"], r_["method"], r_["arm"]): r_ for r_ in res["rows"]}
    assert set(rows) == {(None, None, "fp")} | {(4, "lsq", a) for a in ARMS}
    for key, row in rows.items():
        for m in ("mAP50", "mAP50_95"):
            assert _num(row[m]["mean"]) and row[m]["n"] == 1 and row[m]["std"] is None
            run = fp if key[2] == "fp" else runs[f"yolov5s-s0-lsq-w4a4-{key[2]}"]
            assert row[m]["mean"] == pytest.approx(run[m])
            assert row[f"gap_{m}"]["mean"] == pytest.approx(run[m] - fp[m]), "gap = arm - FP"
            p = runs["yolov5s-s0-lsq-w4a4-ptq"][m]
            if key[2] == "ptq_gab":  # a step-0 arm is compared with plain PTQ: the grad form changes nothing
                assert row[f"gain_{m}"]["mean"] == 0.0 and run[m] == p
            elif key[2] not in ("fp", "ptq"):
                b = runs["yolov5s-s0-lsq-w4a4-baseline"][m]
                assert row[f"gain_{m}"]["mean"] == pytest.approx(run[m] - b), "gain = arm - baseline"
            if key[2] not in ("fp", "ptq", "ptq_gab") and fp[m] - p > 1e-4:
                want = (run[m] - p) / (fp[m] - p)
                assert row[f"recovered_{m}"]["mean"] == pytest.approx(want), "recovered = (arm-ptq)/(fp-ptq)"

    # a second identical call reuses every stored run (resume) and says so
    r2 = run_cli("bench", *TINY, f"out={out}")
    assert r2.returncode == 0, r2.stderr[-3000:]
    res2 = json.loads((out / "bench.json").read_text())
    assert sorted(res2["resumed"]) == sorted(runs), "all runs were reused"
    assert all(x["cached"] for x in res2["runs"])
    assert [x["mAP50_95"] for x in res2["runs"]] == [x["mAP50_95"] for x in res["runs"]]
    assert "Reused stored results" in (out / "bench.md").read_text()

    # a bench that died before its last run: only the missing run is trained again
    (out / "results" / "yolov5s-s0-lsq-w4a4-gab_ada.json").unlink()
    (out / "bench.json").unlink()
    rr = run_cli("bench", *TINY, "report_only=True", f"out={out}")  # the report of what is there; nothing trained
    res_r = json.loads((out / "bench.json").read_text())
    assert rr.returncode == 1 and res_r["failed"] == ["yolov5s-s0-lsq-w4a4-gab_ada"], res_r["failed"]
    assert not (out / "results" / "yolov5s-s0-lsq-w4a4-gab_ada.json").exists()
    assert "| yolov5s | W4A4 | lsq | +GABFusion+ADA (failed seeds [0]) |" in (out / "bench.md").read_text()
    r3 = run_cli("bench", *TINY, f"out={out}")
    assert r3.returncode == 0, r3.stderr[-3000:]
    res3 = json.loads((out / "bench.json").read_text())
    assert sorted(res3["resumed"]) == sorted(set(runs) - {"yolov5s-s0-lsq-w4a4-gab_ada"})
    assert (out / "results" / "yolov5s-s0-lsq-w4a4-gab_ada.json").is_file()


def test_report_pairs_differences_per_seed():
    """Gap and gain are per-seed differences, then mean +- sample std; the markdown shows percentage points."""
    from ultralytics_gabfusion.bench.report import aggregate, markdown

    def rec(kind, seed, arm, m50, m5095, method=None, bits=None):
        return {"id": f"{arm}{seed}", "model": "yolov5s", "seed": seed, "kind": kind, "method": method, "bits": bits,
                "arm": arm, "status": "trained", "mAP50": m50, "mAP50_95": m5095, "epochs_run": 3}

    recs = [rec("fp", 0, "fp", 0.80, 0.60), rec("fp", 1, "fp", 0.70, 0.50)]
    recs += [rec("qat", 0, "baseline", 0.70, 0.40, "lsq", 4), rec("qat", 1, "baseline", 0.60, 0.30, "lsq", 4)]
    recs += [rec("qat", 0, "gab_ada", 0.75, 0.45, "lsq", 4), rec("qat", 1, "gab_ada", 0.62, 0.36, "lsq", 4)]
    s = {"models": ["yolov5s"], "seeds": [0, 1], "bits": [4], "methods": ["lsq"], "arms": ["baseline", "gab_ada"]}
    rows = {r["arm"]: r for r in aggregate(recs, s)}
    assert rows["fp"]["mAP50"]["mean"] == pytest.approx(0.75) and rows["fp"]["mAP50"]["std"] == pytest.approx(0.0707107)
    g = rows["gab_ada"]
    assert g["gap_mAP50_95"]["values"] == pytest.approx([-0.15, -0.14])
    assert g["gain_mAP50"]["values"] == pytest.approx([0.05, 0.02])
    assert g["gain_mAP50"]["mean"] == pytest.approx(0.035) and g["gain_mAP50"]["std"] == pytest.approx(0.0212132)
    assert rows["baseline"]["gap_mAP50"]["mean"] == pytest.approx(-0.10)
    result = {"settings": {**s, "imgsz": 64, "batch": 8, "fp_epochs": 1, "epochs": 1, "ada": 0.01},
              "environment": {"hardware": "cpu", "torch": "t", "ultralytics": "u", "ultralytics_gabfusion": "p",
                              "git_commit": None},
              "data": {"generated": True, "n_train": 16, "n_val": 8, "imgsz": 64}, "rows": list(rows.values()),
              "wall_s": 1.0}
    md = markdown(result)
    assert "| yolov5s | W4A4 | lsq | +GABFusion+ADA | 68.50 ± 9.19 | 40.50 ± 6.36 | -6.50 ± 2.12 | -14.50 ± 0.71 |" in md
    assert "+3.50 ± 2.12" in md and "mean ± std over seeds" in md


def test_sweep_table_and_size_plot(tmp_path):
    """Several bit-widths: a sweep section (size + each arm's mAP per bit-width) and the accuracy-vs-size plot."""
    from ultralytics_gabfusion.bench.report import aggregate, markdown, plot_size

    def rec(arm, bits, m50, size, kind="qat"):
        return {"id": f"{arm}{bits}", "model": "yolov5n", "seed": 0, "kind": kind, "method": None if kind == "fp" else
                "lsq", "bits": bits, "arm": arm, "status": "trained", "mAP50": m50, "mAP50_95": m50 / 2,
                "epochs_run": 0, "size_bytes": size}

    recs = [rec("fp", None, 0.9, 4096.0 * 1024, "fp"), rec("ptq", 8, 0.89, 1100.0 * 1024), rec("ptq", 4, 0.80, 600.0 * 1024),
            rec("baseline", 8, 0.9, 1100.0 * 1024), rec("baseline", 4, 0.85, 600.0 * 1024)]
    s = {"models": ["yolov5n"], "seeds": [0], "bits": [8, 4], "methods": ["lsq"], "arms": ["ptq", "baseline"]}
    rows = aggregate(recs, s)
    assert {(r["bits"], r["arm"]): r["size_bytes"] for r in rows} == {
        (None, "fp"): 4096 * 1024, (8, "ptq"): 1100 * 1024, (4, "ptq"): 600 * 1024, (8, "baseline"): 1100 * 1024,
        (4, "baseline"): 600 * 1024}
    result = {"settings": {**s, "imgsz": 64, "batch": 8, "fp_epochs": 1, "epochs": 1, "ada": 0.01},
              "environment": {"hardware": "cpu", "torch": "t", "ultralytics": "u", "ultralytics_gabfusion": "p",
                              "git_commit": None},
              "data": {"generated": True, "n_train": 16, "n_val": 8, "imgsz": 64}, "rows": rows, "wall_s": 1.0}
    md = markdown(result)
    assert "## Bit-width sweep" in md
    assert "| model | method | bits | size (KiB) | PTQ (no training) | baseline QAT |" in md
    assert "| yolov5n | — | FP32 | 4,096 | 90.00 / 45.00 (FP) | — |" in md
    assert "| yolov5n | lsq | W8A8 | 1,100 | 89.00 / 44.50 | 90.00 / 45.00 |" in md
    assert md.index("| yolov5n | lsq | W8A8 |") < md.index("| yolov5n | lsq | W4A4 |"), "highest bits first"
    assert plot_size(result, tmp_path / "size.png").stat().st_size > 0
    s1 = {**s, "bits": [4]}
    assert "## Bit-width sweep" not in markdown({**result, "settings": {**result["settings"], **s1}}), "one bit-width"
    assert plot_size({**result, "rows": [{**r, "size_bytes": None} for r in rows]}, tmp_path / "x.png") is None


@pytest.mark.slow
def test_bench_bit_sweep_sizes_from_checkpoints(tmp_path, tiny_data, fp_ckpt):
    """bits=[8,3] PTQ from one FP checkpoint: each run's size follows its convs' bits; sweep table and size plot."""
    import torch

    from ultralytics_gabfusion.quant.mixed import model_size_bytes

    out = tmp_path / "sweep"
    r = run_cli("bench", f"models=[{fp_ckpt['yolov5s']}]", f"data={tiny_data}", "bits=[8,3]", "arms=[ptq]",
                "methods=[lsq]", f"imgsz={IMGSZ}", "batch=8", "workers=0", "device=cpu", "qat_calib=1", f"out={out}")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    res = json.loads((out / "bench.json").read_text())
    runs = {x["arm"] + str(x["bits"]): x for x in res["runs"]}
    fp_params = sum(p.numel() for p in torch.load(fp_ckpt["yolov5s"], weights_only=False)["model"].parameters())
    assert runs["fpNone"]["size_bytes"] == 4 * fp_params
    for b in (8, 3):
        model = torch.load(runs[f"ptq{b}"]["weights"], weights_only=False)["ema"]
        assert runs[f"ptq{b}"]["size_bytes"] == model_size_bytes(model)
    assert 4 * fp_params > runs["ptq8"]["size_bytes"] > runs["ptq3"]["size_bytes"]
    md = (out / "bench.md").read_text()
    assert "## Bit-width sweep" in md and "| W3A3 |" in md and (out / "size.png").stat().st_size > 0


# --------------------------------------------------------------------------------------- refused settings
BAD = [
    (["methods=[lsq,lsq4]"], "lsq4"),
    (["bits=[4,9]"], "2..8"),
    (["arms=[baseline,gab_ada]", "ada=0"], "ada>0"),
    (["arms=[baseline,fused]"], "fused"),
    (["data=/nonexistent/data.yaml"], "not found"),
    (["seeds=[]"], "empty"),
    (["epochs=0"], "epochs=0"),
    (["fp_epochs=-1"], "fp_epochs"),
    (["models=[/nonexistent/fp.pt]"], "not an existing .pt"),
    (["models=[yolov5zz]"], "neither a known model YAML"),
    (["epoch=3"], "Did you mean 'epochs'"),
    (["seed=1"], "seeds="),
    (["preset=fast"], "preset=fast"),
    (["imgsz=100"], "multiple of 32"),
    (["task=segment"], "task=segment but models yolov5s (detect)"),
    (["task=obb"], "task=obb is not benchmarked"),
    (["models=[yolov5n,yolo11n-seg]"], "are of different tasks"),
    (["recipe=/nonexistent/recipe.yaml"], "recipe"),
    (["lr0=fast"], "lr0"),
    (["speed", "methods=[lsq,foo]"], "foo"),
    (["speed", "amp=True", "device=cpu"], "CUDA"),
    (["speed", "stepz=3"], "Did you mean 'steps'"),
    (["speed", "kernels=[reference,fused]"], "fused"),
    (["speed", "clock=gpu"], "clock"),
    (["speed", "interleave=True", "isolate=True"], "interleave"),
]


@pytest.mark.parametrize("args,msg", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bench_refuses_bad_settings(args, msg, tmp_path, capsys):
    from ultralytics_gabfusion.bench import bench_main

    out = tmp_path / "out"
    tail = [] if args[0] == "speed" else list(TINY)
    code = bench_main([*args[:1], *tail, *args[1:], f"out={out}"] if args[0] == "speed" else [*tail, *args, f"out={out}"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert msg in err, err
    assert "error:" in err and "Traceback" not in err
    assert not out.exists(), "nothing may be written for refused settings"


def test_bench_refuses_unusable_checkpoint(tmp_path, capsys):
    """A models entry that exists but is not a readable FP checkpoint is refused before anything runs."""
    from ultralytics_gabfusion.bench import bench_main

    bad = tmp_path / "fp.pt"
    bad.write_text("not a checkpoint")
    out = tmp_path / "out"
    assert bench_main([*TINY, f"models=[{bad}]", f"out={out}"]) == 2
    assert "not a usable FP checkpoint" in capsys.readouterr().err
    assert not out.exists()


def test_bench_cli_refusal_as_typed(tmp_path):
    """The exit status and message as a user sees them (fresh process)."""
    r = run_cli("bench", "methods=[lsq,pactt]", f"out={tmp_path / 'o'}", "device=cpu")
    assert r.returncode == 2 and "pactt" in r.stderr and "pact" in r.stderr
    assert not (tmp_path / "o").exists()
    r = run_cli("bench", "help")
    assert r.returncode == 0 and "fp_epochs" in r.stdout and "paper-voc" in r.stdout


def test_qat_args_precedence(tmp_path):
    """Paper schedule < method defaults < recipe < explicit keys < per-arm keys; fp_<key> only reaches the FP run."""
    from ultralytics_gabfusion.bench.accuracy import fp_train_args, qat_train_args, resolve_settings

    recipe = tmp_path / "r.yaml"
    recipe.write_text("qat: pact\nlr0: 0.001\nqat_lr: 0.5\nepochs: 99\n")
    s = resolve_settings([*TINY, "methods=[lsq,n2uq]", f"recipe={recipe}", "momentum=0.9", "fp_lr0=0.02",
                          f"out={tmp_path / 'o'}"])
    a = qat_train_args(s, "d.yaml", 0, "x", "n2uq", 3, "gab_ada")
    assert (a["qat"], a["w_bits"], a["gab"], a["ada"], a["ada_div"]) == ("n2uq", 3, "balanced", 0.1, "js")
    assert "gab_form" not in a  # the default form (grad); the paper arms name theirs
    assert qat_train_args(s, "d.yaml", 0, "x", "lsq", 4, "gab_paper_ada")["gab_form"] == "paper"
    assert (a["lr0"], a["qat_lr"], a["momentum"], a["epochs"], a["optimizer"]) == (0.001, 0.5, 0.9, 1, "SGD")
    f = fp_train_args(s, "d.yaml", 0, "fp")
    assert f["lr0"] == 0.02 and "momentum" not in f and "qat" not in f
    assert not (tmp_path / "o").exists()


# ------------------------------------------------------------------------------------------------ speed bench
@pytest.mark.slow
def test_speed_bench_cpu_tiny(tmp_path):
    from ultralytics_gabfusion.bench import bench_main

    out = tmp_path / "speed"
    # one method keeps the 7 isolated arm processes (each compiles its kernels) at ~half the suite time of two
    code = bench_main(["speed", "device=cpu", f"imgsz={IMGSZ}", "batch=2", "steps=2", "warmup=1",
                       "methods=[n2uq]", f"out={out}"])
    assert code == 0
    res = json.loads((out / "speed.json").read_text())
    assert res["environment"]["hardware"] and res["environment"]["torch"]
    assert "ru_maxrss" in res["memory_method"]
    rows = res["rows"]
    arms = {(r["arm"], r["method"], r["kernel"]) for r in rows}
    assert arms == {("fp", None, None)} | {(a, "n2uq", k) for a in ("q", "q+gab", "q+gab+ada")
                                           for k in ("reference", "compiled")}
    for r in rows:
        assert "error" not in r, r
        assert _num(r["step_ms"]) and r["step_ms"] > 0 and len(r["step_ms_all"]) == 2
        assert _num(r["peak_mib"]) and r["peak_mib"] > 0
        assert r["step_ratio"] > 0 and r["mem_ratio"] > 0
        if r["arm"] == "fp":
            assert r["step_ratio"] == 1.0 and r["mem_ratio"] == 1.0
        if r["arm"] == "q+gab+ada":
            assert r["ada_div"] == ("js" if r["method"] == "n2uq" else "kl")
    md = (out / "speed.md").read_text()
    assert "| yolov5s | fp | — | FP | — |" in md and "| yolov5s | q+gab+ada | n2uq | W4A4 | compiled |" in md
    assert "| yolov5s | q | n2uq | W4A4 | reference |" in md


# ------------------------------------------------------------------------------------- segmentation and pose
@pytest.mark.slow
def test_bench_segment_tiny(tmp_path):
    """A segmentation bench (task from the model): generated polygon labels, box and mask mAP per run, the mask table
    first with gaps/gains paired per seed, the box table after it, per-epoch mask curves; then report_only."""
    out = tmp_path / "seg"
    args = ("models=[cfg/models/yolov5n-seg.yaml]", "synth_train=8", "synth_val=4", f"imgsz={IMGSZ}", "fp_epochs=1",
            "epochs=1", "methods=[lsq]", "bits=[4]", "batch=4", "workers=0", "device=cpu", "seeds=[0]",
            "arms=[ptq,baseline,gab_ada]", "qat_calib=1", f"out={out}")
    r = run_cli("bench", *args)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    res = json.loads((out / "bench.json").read_text())
    assert res["settings"]["task"] == "segment" and res["data"]["task"] == "segment" and res["failed"] == []
    label = next((Path(res["data"]["yaml"]).parent / "labels" / "val").glob("*.txt")).read_text().splitlines()[0]
    assert len(label.split()) > 5 and len(label.split()) % 2 == 1, "polygon labels: cls x1 y1 x2 y2 ..."
    runs = {x["arm"]: x for x in res["runs"]}
    for x in runs.values():
        for k in ("mAP50", "mAP50_95", "mask_mAP50", "mask_mAP50_95"):
            assert _num(x[k]) and 0.0 <= x[k] <= 1.0, (x["id"], k)
    assert runs["gab_ada"]["train_args"]["gab"] == "balanced" and runs["gab_ada"]["train_args"]["ada"] == 0.1
    assert {"mask_mAP50", "mask_mAP50_95", "ada_grad_ratio"} <= set(runs["gab_ada"]["per_epoch"])
    rows = {x["arm"]: x for x in res["rows"]}
    for arm in ("ptq", "baseline", "gab_ada"):
        for m in ("mAP50_95", "mask_mAP50_95"):
            assert rows[arm][m]["mean"] == pytest.approx(runs[arm][m])
            assert rows[arm][f"gap_{m}"]["mean"] == pytest.approx(runs[arm][m] - runs["fp"][m])
    assert rows["gab_ada"]["gain_mask_mAP50"]["mean"] == pytest.approx(
        runs["gab_ada"]["mask_mAP50"] - runs["baseline"]["mask_mAP50"])
    md = (out / "bench.md").read_text()
    head = "| model | bits | method | arm | mask mAP50 | mask mAP50-95 | gap mask mAP50 | gap mask mAP50-95 |"
    assert head in md and md.index(head) < md.index("### Box mAP of the same runs")
    assert "| model | bits | method | arm | mAP50 | mAP50-95 | gap mAP50 |" in md
    fmt = lambda v: f"{100 * v:.2f}"  # noqa: E731
    g = runs["gab_ada"]
    assert f"| yolov5n-seg | W4A4 | lsq | +GABFusion+ADA | {fmt(g['mask_mAP50'])} | {fmt(g['mask_mAP50_95'])} |" in md
    assert f"| yolov5n-seg | W4A4 | lsq | +GABFusion+ADA | {fmt(g['mAP50'])} | {fmt(g['mAP50_95'])} |" in md
    for f in ("bench.png", "curves.png"):
        assert (out / f).stat().st_size > 0
    r2 = run_cli("bench", *args, "report_only=True")  # the same report from the stored results, nothing trained
    assert r2.returncode == 0 and json.loads((out / "bench.json").read_text())["rows"] == res["rows"]


def test_report_pose_tables_pair_task_metrics():
    """Pose rows: gaps and gains in the pose metric are per-seed differences, the pose table leads, box follows."""
    from ultralytics_gabfusion.bench.report import aggregate, markdown

    def rec(kind, seed, arm, box, pose, method=None, bits=None):
        return {"id": f"{arm}{seed}", "model": "yolo11n-pose", "seed": seed, "kind": kind, "method": method,
                "bits": bits, "arm": arm, "status": "trained", "mAP50": box, "mAP50_95": box / 2, "pose_mAP50": pose,
                "pose_mAP50_95": pose / 2, "epochs_run": 3}

    recs = [rec("fp", 0, "fp", 0.80, 0.60), rec("fp", 1, "fp", 0.70, 0.50)]
    recs += [rec("qat", 0, "ptq", 0.50, 0.20, "lsq", 4), rec("qat", 1, "ptq", 0.40, 0.10, "lsq", 4)]
    recs += [rec("qat", 0, "baseline", 0.70, 0.40, "lsq", 4), rec("qat", 1, "baseline", 0.60, 0.30, "lsq", 4)]
    recs += [rec("qat", 0, "gab", 0.72, 0.46, "lsq", 4), rec("qat", 1, "gab", 0.61, 0.34, "lsq", 4)]
    s = {"models": ["yolo11n-pose"], "seeds": [0, 1], "bits": [4], "methods": ["lsq"],
         "arms": ["ptq", "baseline", "gab"], "task": "pose"}
    rows = {r["arm"]: r for r in aggregate(recs, s)}
    g = rows["gab"]
    assert g["gap_pose_mAP50"]["values"] == pytest.approx([-0.14, -0.16])
    assert g["gain_pose_mAP50"]["values"] == pytest.approx([0.06, 0.04])
    assert g["gain_mAP50"]["values"] == pytest.approx([0.02, 0.01])
    assert g["recovered_pose_mAP50_95"]["values"] == pytest.approx([(0.23 - 0.1) / (0.3 - 0.1), (0.17 - 0.05) / 0.2])
    result = {"settings": {**s, "imgsz": 160, "batch": 16, "fp_epochs": 20, "epochs": 3, "ada": 0.1},
              "environment": {"hardware": "cpu", "torch": "t", "ultralytics": "u", "ultralytics_gabfusion": "p",
                              "git_commit": None},
              "data": {"generated": True, "n_train": 400, "n_val": 100, "imgsz": 160}, "rows": list(rows.values()),
              "wall_s": 1.0}
    md = markdown(result)
    pose_row = "| yolo11n-pose | W4A4 | lsq | +GABFusion | 40.00 ± 8.49 | 20.00 ± 4.24 | -15.00 ± 1.41 |"
    box_row = "| yolo11n-pose | W4A4 | lsq | +GABFusion | 66.50 ± 7.78 | 33.25 ± 3.89 | -8.50 ± 0.71 |"
    assert pose_row in md and box_row in md and md.index(pose_row) < md.index("### Box mAP") < md.index(box_row)
    assert "| model | bits | method | arm | pose mAP50 | pose mAP50-95 |" in md and "in pose mAP50-95" in md
