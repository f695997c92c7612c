"""GABTrainer spine and the yolo-gab CLI: settings, stock behaviour, checkpoints, CLI as typed by a user."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import IMGSZ, ROOT, run_cli, run_python, train_kwargs


# ----------------------------------------------------------------------------------------------------- settings
def test_settings_validation_messages():
    from ultralytics_gabfusion.settings import PLUGIN_DEFAULTS, validate_settings

    assert validate_settings({"qat": "LSQ", "w_bits": 3.0, "gab": "false"}) == {"qat": "lsq", "w_bits": 3, "gab": "off"}
    with pytest.raises(ValueError, match="2..8"):
        validate_settings({"w_bits": 9})
    with pytest.raises(ValueError, match="must be an integer"):
        validate_settings({"a_bits": 3.5})
    with pytest.raises(ValueError, match="lsqplus"):
        validate_settings({"qat": "lsq+"})
    with pytest.raises(ValueError, match="balanced"):
        validate_settings({"gab": "balance"})
    with pytest.raises(ValueError, match="simam"):
        validate_settings({"ada_attn": "cbam"})
    with pytest.raises(ValueError, match=">= 0"):
        validate_settings({"ada": -1})
    from ultralytics.utils import DEFAULT_CFG_DICT

    assert not set(PLUGIN_DEFAULTS) & set(DEFAULT_CFG_DICT), "plugin keys must not collide with Ultralytics keys"


def test_trainer_rejects_unknown_key_before_writing(tmp_path, tiny_data):
    from ultralytics_gabfusion import GABTrainer

    with pytest.raises(SyntaxError, match="w_bit"):
        GABTrainer(overrides={"model": "yolov5s.yaml", "data": str(tiny_data), "w_bit": 4, "project": str(tmp_path)})
    with pytest.raises(ValueError, match="2..8"):
        GABTrainer(overrides={"model": "yolov5s.yaml", "data": str(tiny_data), "w_bits": 1, "project": str(tmp_path)})
    assert not any(tmp_path.iterdir()), "a rejected configuration must not create a run directory"


def test_missing_teacher_is_a_clear_error(tmp_path, tiny_data):
    from ultralytics_gabfusion import GABTrainer

    with pytest.raises(ValueError, match="teacher="):
        GABTrainer(overrides={"model": "yolov5s.yaml", "data": str(tiny_data), "qat": "lsq", "ada": 0.01,
                              "project": str(tmp_path)})
    with pytest.raises(FileNotFoundError, match="teacher"):
        GABTrainer(overrides={"model": "yolov5s.yaml", "data": str(tiny_data), "qat": "lsq", "ada": 0.01,
                              "teacher": str(tmp_path / "nope.pt"), "project": str(tmp_path)})


# -------------------------------------------------------------------------------------------- stock behaviour
@pytest.mark.parametrize("arch", ["yolov5s", "yolo11s"])
def test_gabtrainer_trains_and_reloads(arch, tmp_path, tiny_data):
    """qat=none gab=off ada=0: trains like the stock trainer, writes results.csv and weights, reloads elsewhere."""
    from ultralytics_gabfusion import GABTrainer

    t = GABTrainer(overrides={"model": f"{arch}.yaml", "data": str(tiny_data), **train_kwargs(tmp_path, epochs=2)})
    t.train()
    run = Path(t.save_dir)
    assert (run / "results.csv").exists() and (run / "weights" / "best.pt").exists()
    lines = (run / "results.csv").read_text().strip().splitlines()
    assert len(lines) == 3 and "metrics/mAP50(B)" in lines[0]
    args = (run / "args.yaml").read_text()
    for key in ("qat: none", "w_bits: 4", "gab: 'off'", "ada: 0.0", "ada_attn: simam", "teacher: null"):
        assert key in args, key
    res = run_python(
        "from ultralytics import YOLO; m = YOLO(r'%s'); r = m.val(data=r'%s', imgsz=%d, batch=8, plots=False, "
        "device='cpu'); print('MAP', r.box.map50)" % (run / "weights" / "best.pt", tiny_data, IMGSZ)
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert "MAP" in res.stdout


def test_stock_equivalence_first_steps(tmp_path, tiny_data):
    """With the plugin off, GABTrainer and DetectionTrainer give identical losses and weights (same seed)."""
    from ultralytics.models.yolo.detect import DetectionTrainer

    from ultralytics_gabfusion import GABTrainer

    results = []
    for cls, name in ((DetectionTrainer, "stock"), (GABTrainer, "gab")):
        t = cls(overrides={"model": "yolov5s.yaml", "data": str(tiny_data),
                           **train_kwargs(tmp_path, name=name, val=False)})
        t.train()
        ck = torch.load(Path(t.save_dir) / "weights" / "last.pt", weights_only=False)
        results.append((ck["train_results"], ck["model"].state_dict()))
    (r0, sd0), (r1, sd1) = results
    assert r0["train/box_loss"] == r1["train/box_loss"]
    assert all(torch.equal(sd0[k], sd1[k]) for k in sd0)


def test_plugin_keys_survive_checkpoint_and_ddp_file(tmp_path, tiny_data):
    from ultralytics_gabfusion import GABTrainer
    from ultralytics_gabfusion.settings import PLUGIN_KEYS

    over = {"model": "yolov5s.yaml", "data": str(tiny_data), "qat": "lsq", "w_bits": 3, "a_bits": 3,
            "gab": "balanced", "qat_calib": 1, **train_kwargs(tmp_path, save_period=1)}
    t = GABTrainer(overrides=over)
    t.train()
    ck = torch.load(Path(t.save_dir) / "weights" / "epoch0.pt", weights_only=False)
    for k, v in (("qat", "lsq"), ("w_bits", 3), ("a_bits", 3), ("gab", "balanced")):
        assert ck["train_args"][k] == v
    assert ck["ema"].gabfusion["qat"] == "lsq" and ck["ema"].gabfusion["version"]

    # Simulate Ultralytics' DDP relaunch: the worker rebuilds the trainer from vars(args) and a plain default cfg.
    from ultralytics.utils import DEFAULT_CFG_DICT

    state = {k: v for k, v in vars(t.args).items()}
    cfg = DEFAULT_CFG_DICT.copy()
    cfg.update(save_dir="")
    worker = GABTrainer(cfg=cfg, overrides=state)
    for k in PLUGIN_KEYS:
        assert getattr(worker.args, k) == getattr(t.args, k), k


# --------------------------------------------------------------------------------------------------------- CLI
def test_cli_help_lists_plugin_keys():
    r = run_cli("help")
    assert r.returncode == 0
    for key in ("qat", "w_bits", "a_bits", "gab", "ada", "ada_attn", "ada_div", "teacher", "trainer="):
        assert key in r.stdout


def test_cli_unknown_key_fails_with_suggestion(tiny_data):
    r = run_cli("train", "model=yolov5s.yaml", f"data={tiny_data}", "w_bit=4")
    assert r.returncode != 0
    assert "w_bit" in r.stderr and "w_bits" in r.stderr
    r = run_cli("train", "model=yolov5s.yaml", f"data={tiny_data}", "qat=lsq+")
    assert r.returncode != 0 and "lsqplus" in r.stderr


def test_cli_plugin_keys_need_gab_trainer(tiny_data):
    r = run_cli("train", "trainer=default", "model=yolov5s.yaml", f"data={tiny_data}", "qat=lsq")
    assert r.returncode == 2 and "trainer=gab" in r.stderr
    r = run_cli("train", "trainer=nomodule", "model=yolov5s.yaml", f"data={tiny_data}")
    assert r.returncode == 2 and "package.module:Class" in r.stderr


def test_cli_train_with_recipe_custom_trainer_and_val(tmp_path, tiny_data):
    common = [f"data={tiny_data}", f"imgsz={IMGSZ}", "epochs=1", "batch=8", "workers=0", "device=cpu", "plots=False",
              f"project={tmp_path}", "exist_ok=True", "warmup_epochs=0", "mosaic=0.0"]
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("qat: pact\nw_bits: 4\na_bits: 4\nqat_calib: 1\nepochs: 5\n")
    r = run_cli("train", "trainer=gab", "model=yolov5s.yaml", f"cfg={recipe}", "name=gab", *common)
    assert r.returncode == 0, r.stderr[-3000:]
    args = (tmp_path / "gab" / "args.yaml").read_text()
    assert "qat: pact" in args and "epochs: 1" in args, "cfg= first, explicit args win"

    r = run_cli("train", "trainer=default", "model=yolov5s.yaml", "name=stock", *common)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "qat:" not in (tmp_path / "stock" / "args.yaml").read_text()

    pkg = tmp_path / "mytrainers"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "custom.py").write_text(
        "from ultralytics.models.yolo.detect import DetectionTrainer\n"
        "class Marked(DetectionTrainer):\n"
        "    def __init__(self, *a, **k):\n"
        "        super().__init__(*a, **k)\n"
        "        (self.save_dir / 'MARK').write_text('custom')\n"
    )
    import os
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{tmp_path}"}
    r = subprocess.run([sys.executable, "-m", "ultralytics_gabfusion", "train", "trainer=mytrainers.custom:Marked",
                        "model=yolov5s.yaml", "name=custom", *common], env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (tmp_path / "custom" / "MARK").exists()

    best = tmp_path / "gab" / "weights" / "best.pt"
    r = run_cli("val", f"model={best}", f"data={tiny_data}", f"imgsz={IMGSZ}", "batch=8", "device=cpu", "plots=False",
                f"project={tmp_path}", "name=val")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "all" in (r.stdout + r.stderr)


def test_python_module_entry_matches_console_script():
    r = run_python("import ultralytics_gabfusion.__main__")
    assert r.returncode == 0
    from importlib.metadata import entry_points

    eps = [e for e in entry_points(group="console_scripts") if e.name == "yolo-gab"]
    if eps:  # installed (pip install -e .): the console script points at the same function
        assert eps[0].value == "ultralytics_gabfusion.cli:entry"


def test_yolo_train_with_trainer_class(tmp_path, tiny_data):
    from ultralytics import YOLO

    from ultralytics_gabfusion import GABTrainer

    model = YOLO("yolov5s.yaml")
    model.train(trainer=GABTrainer, data=str(tiny_data), qat="lsq", qat_calib=1, **train_kwargs(tmp_path))
    assert isinstance(model.trainer, GABTrainer)
    assert json.dumps(model.trainer.args.qat) == '"lsq"'


def test_wrong_architecture_is_a_clear_error(tmp_path, tiny_data):
    from ultralytics_gabfusion import GABTrainer

    with pytest.raises(ValueError, match="classify model; GABTrainer trains detection models"):
        GABTrainer(overrides={"model": "yolo11n-cls.yaml", "data": str(tiny_data), "qat": "lsq",
                              **train_kwargs(tmp_path)})


# YOLOv5 data/hyps/hyp.VOC.yaml (ultralytics/yolov5 @ 61396b3) for every key Ultralytics has, except the loss gains
HYP_VOC = {"lr0": 0.00334, "lrf": 0.15135, "momentum": 0.74832, "weight_decay": 0.00025, "warmup_epochs": 3.3835,
           "warmup_momentum": 0.59462, "warmup_bias_lr": 0.18657, "hsv_h": 0.01041, "hsv_s": 0.54703,
           "hsv_v": 0.27739, "degrees": 0.0, "translate": 0.04591, "scale": 0.75544, "shear": 0.0, "perspective": 0.0,
           "flipud": 0.0, "fliplr": 0.5, "mosaic": 0.85834, "mixup": 0.04266, "copy_paste": 0.0}


def test_shipped_recipes_follow_the_stable_schedule_and_load_with_stock_keys_plus_ours():
    """Recipes = the bench's stable schedule = hyp.VOC except the keys whose comment row says why they differ."""
    import re

    from ultralytics.cfg import get_cfg
    from ultralytics.utils import YAML

    from ultralytics_gabfusion.bench.arms import PAPER_SCHEDULE, SCHEDULES, STABLE_SCHEDULE
    from ultralytics_gabfusion.settings import check_consistency, validate_settings
    from ultralytics_gabfusion.trainer import plugin_cfg

    assert PAPER_SCHEDULE == {"optimizer": "SGD", **HYP_VOC} and SCHEDULES["paper"]["qat_bn_recalib"] == 0
    differ = {k for k in HYP_VOC if STABLE_SCHEDULE[k] != HYP_VOC[k]}
    assert differ == {"warmup_epochs"}
    recipes = sorted((ROOT / "cfg" / "qat").glob("*.yaml"))
    assert len(recipes) == 8
    for f in recipes:
        r = YAML.load(f)
        text = f.read_text()
        cfg = get_cfg(plugin_cfg(), r)  # raises on any key that is neither Ultralytics' nor ours
        check_consistency(validate_settings(vars(cfg)))
        assert {k: r.get(k, HYP_VOC.get(k)) for k in STABLE_SCHEDULE} == STABLE_SCHEDULE, f.name
        assert (r["box"], r["cls"], r["optimizer"]) == (7.5, 0.5, "SGD"), f.name  # v8 loss gains (see the recipe)
        for k in HYP_VOC:
            row = re.search(rf"^#   {k} +(\S+) +(\S+)(.*)$", text, re.M)
            assert row, f"{f.name}: {k} missing from the comment table"
            if k in differ:
                assert row.group(3).strip(), f"{f.name}: the {k} row must say why it differs from hyp.VOC"


def test_qat_act_grid_key_is_validated_and_listed():
    from ultralytics_gabfusion.quant.grids import ACT_GRIDS
    from ultralytics_gabfusion.settings import ACT_GRIDS as SETTING_GRIDS
    from ultralytics_gabfusion.settings import PLUGIN_DEFAULTS, help_text, validate_settings

    assert SETTING_GRIDS == ACT_GRIDS and PLUGIN_DEFAULTS["qat_act_grid"] == "auto"
    assert validate_settings({"qat_act_grid": "Unsigned"})["qat_act_grid"] == "unsigned"
    with pytest.raises(ValueError, match="'qat_act_grid=uint' is not valid. Allowed values: auto, signed, unsigned"):
        validate_settings({"qat_act_grid": "uint"})
    assert "qat_act_grid" in help_text()
    assert "`qat_act_grid`" in (ROOT / "README.md").read_text()


def test_qat_act_zp_key_reaches_config_and_every_activation_quantizer():
    """qat_act_zp: validated (float | integer), a QATConfig field, stored on every LSQ/LSQ+/PACT activation quantizer
    by the model set-up and recorded in model.gabfusion; N2UQ (thresholds, no offset grid) is left as it is."""
    import copy

    from ultralytics.nn.tasks import DetectionModel

    from ultralytics_gabfusion.qat_setup import build_structure
    from ultralytics_gabfusion.quant.qconv import quant_convs
    from ultralytics_gabfusion.settings import ACT_ZPS, PLUGIN_DEFAULTS, QATConfig, help_text, validate_settings

    assert ACT_ZPS == ("float", "integer") and PLUGIN_DEFAULTS["qat_act_zp"] == "integer"
    assert validate_settings({"qat_act_zp": "Integer"})["qat_act_zp"] == "integer"
    with pytest.raises(ValueError, match="'qat_act_zp=int' is not valid. Allowed values: float, integer. Did you mean"):
        validate_settings({"qat_act_zp": "int"})
    assert "qat_act_zp" in help_text() and "`qat_act_zp`" in (ROOT / "README.md").read_text()
    fp = DetectionModel("yolov5n.yaml", nc=2, verbose=False)
    for method, zp in (("lsq", "integer"), ("lsqplus", "integer"), ("pact", "integer"), ("n2uq", "integer"),
                       ("lsqplus", "float")):
        # qat_init=paper, qat_act_grid=unsigned: no MSE search over the weights, no grid probe (not what is tested)
        cfg = QATConfig.from_keys({"qat": method, "qat_act_zp": zp, "qat_init": "paper", "qat_act_grid": "unsigned"})
        m = build_structure(copy.deepcopy(fp), cfg)
        acts = [c.act_quant for _, c in quant_convs(m) if c.act_quant is not None]
        want = zp == "integer" and method != "n2uq"
        assert acts and all(q.integer_zero_point == want for q in acts), (method, zp)
        assert not any(c.weight_quant.integer_zero_point for _, c in quant_convs(m))
        assert m.gabfusion["qat_act_zp"] == zp


def test_qat_out_bits_key_puts_an_output_quantizer_on_every_integer_conv():
    """qat_out_bits: 0 or 8, a QATConfig field; 8 gives every conv whose input and weight are quantized (blocks after
    their BN, the head's bare convs on their own output) an 8-bit output quantizer of the input's signedness, recorded
    in model.gabfusion; the default adds none."""
    import copy

    from ultralytics.nn.tasks import DetectionModel

    from ultralytics_gabfusion.qat_setup import build_structure
    from ultralytics_gabfusion.quant.qconv import QuantConvBlock, output_quantizers, quant_convs
    from ultralytics_gabfusion.settings import PLUGIN_DEFAULTS, QATConfig, help_text, validate_settings

    assert PLUGIN_DEFAULTS["qat_out_bits"] == 0 and validate_settings({"qat_out_bits": "8"})["qat_out_bits"] == 8
    with pytest.raises(ValueError, match="'qat_out_bits=7' is not valid: use 0"):
        validate_settings({"qat_out_bits": 7})
    assert "qat_out_bits" in help_text() and "`qat_out_bits`" in (ROOT / "README.md").read_text()
    fp = DetectionModel("yolov5n.yaml", nc=2, verbose=False)
    keys = {"qat": "lsq", "qat_init": "paper", "qat_act_grid": "unsigned"}
    assert not list(output_quantizers(build_structure(copy.deepcopy(fp), QATConfig.from_keys(keys))))
    m = build_structure(copy.deepcopy(fp), QATConfig.from_keys({**keys, "qat_out_bits": 8}))
    outs = {name: (mod, q) for name, mod, q in output_quantizers(m)}
    both = [n for n, c in quant_convs(m) if c.act_quant is not None and c.weight_quant is not None]
    assert len(outs) == len(both) and m.gabfusion["qat_out_bits"] == 8
    assert any(isinstance(mod, QuantConvBlock) for mod, _ in outs.values())
    assert any(not isinstance(mod, QuantConvBlock) for mod, _ in outs.values())  # Detect's bare output convs
    for mod, q in outs.values():
        conv = mod.conv if isinstance(mod, QuantConvBlock) else mod
        assert q.bits == 8 and q.signed == (conv.act_quant.qmin < 0)

