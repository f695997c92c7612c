"""The package's structure as users meet it: a light import, one validated config, state kept in float32."""

from __future__ import annotations

import pytest
import torch
from conftest import run_python


def test_import_is_light_and_registration_happens_with_fusion():
    """Importing the package or its data generator loads no torch/Ultralytics; importing fusion registers GABFusion."""
    r = run_python(
        "import sys\n"
        "import ultralytics_gabfusion, ultralytics_gabfusion.data.synth, ultralytics_gabfusion.settings\n"
        "assert 'torch' not in sys.modules and 'ultralytics' not in sys.modules, sorted(sys.modules)\n"
        "print(ultralytics_gabfusion.__version__)\n"
        "from ultralytics_gabfusion import GABTrainer\n"
        "from ultralytics.nn import tasks\n"
        "assert getattr(tasks.parse_model, '_gabfusion_wrapper', False)\n"
        "from ultralytics import YOLO\n"
        "m = YOLO('cfg/models/yolov5s-gab.yaml')\n"
        "print(type(m.model.model[12]).__name__)\n"
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.split()[-1] == "GABFusion"


@pytest.mark.parametrize(
    "imports",
    [
        "import ultralytics_gabfusion\nfrom ultralytics import YOLO\n",  # the package first: the import hook
        "from ultralytics import YOLO\nbefore = YOLO('yolov5s.yaml')\nimport ultralytics_gabfusion\n",  # at once
    ],
    ids=["package-first", "ultralytics-first"],
)
def test_package_import_alone_builds_gab_yaml(imports):
    """Issue 23.1: ``import ultralytics_gabfusion`` (no .fusion) is enough for the -gab YAMLs, in either order."""
    r = run_python(
        imports + "import sys\n"
        "assert 'ultralytics_gabfusion.trainer' not in sys.modules\n"  # no public name was touched
        "for yaml in ('cfg/models/yolov5s-gab.yaml', 'cfg/models/yolo11s-gab.yaml'):\n"
        "    print(type(YOLO(yaml).model.model[12]).__name__)\n"
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.split()[-2:] == ["GABFusion", "GABFusion"]


def test_qat_config_validates_once_and_normalises():
    from ultralytics_gabfusion.settings import PLUGIN_DEFAULTS, QATConfig, SettingsError

    cfg = QATConfig.from_keys({"qat": "N2UQ", "w_bits": 3.0, "a_bits": 3, "gab": "false", "qat_skip": [0, 23],
                               "epochs": 5})  # Ultralytics keys are ignored
    assert (cfg.qat, cfg.w_bits, cfg.a_bits, cfg.gab, cfg.qat_skip) == ("n2uq", 3, 3, "off", (0, 23))
    assert cfg.as_dict()["qat_skip"] == [0, 23] and cfg.quantized
    assert QATConfig.from_keys({}).as_dict() == PLUGIN_DEFAULTS
    with pytest.raises(SettingsError, match="2..8"):
        QATConfig.from_keys({"w_bits": 9})
    with pytest.raises(SettingsError, match="applies to qat_layer_bits=<sensitivity.csv>"):
        QATConfig.from_keys({"qat": "lsq", "qat_bits_budget": 4.5})  # a budget without the CSV it applies to
    with pytest.raises(AttributeError):
        cfg.w_bits = 4  # frozen


def test_one_method_list_and_bit_range():
    from ultralytics_gabfusion.quant.registry import QUANTIZERS, make_quantizer
    from ultralytics_gabfusion.settings import MAX_BITS, MIN_BITS, QAT_METHODS, QUANT_METHODS

    assert tuple(QUANTIZERS) == QUANT_METHODS and QAT_METHODS == ("none", *QUANT_METHODS)
    for method in QUANT_METHODS:
        assert make_quantizer(method, "weight", MIN_BITS, channels=2).method == method
        with pytest.raises(ValueError, match=f"{MIN_BITS}..{MAX_BITS}"):
            make_quantizer(method, "act", MAX_BITS + 1)


def test_quantizer_and_fusion_state_survive_half_bit_exactly():
    """Ultralytics saves checkpoints with .half(): float32 quantizer/fusion state must come back unchanged."""
    from ultralytics_gabfusion.fusion import GABFusion
    from ultralytics_gabfusion.quant import make_quantizer
    from ultralytics_gabfusion.quant.qconv import QuantConv2d

    q = make_quantizer("lsqplus", "weight", 4, channels=3).init_from(torch.randn(3, 8) / 3)
    before = {k: v.clone() for k, v in q.state_dict().items()}
    q.half()
    assert all(torch.equal(before[k], v) and v.dtype == before[k].dtype for k, v in q.state_dict().items())

    conv = QuantConv2d(3, 4, 1, method="n2uq", w_bits=4, a_bits=4)
    with torch.no_grad():
        conv.input_shift.fill_(0.1234567)
    conv.half()
    assert conv.weight.dtype == torch.float16  # the conv itself follows .half()
    assert conv.input_shift.dtype == torch.float32 and conv.input_shift.item() == torch.tensor(0.1234567).item()

    g = GABFusion(1, n_branches=2, channels=8, form="paper")
    with torch.no_grad():
        g.norm.weight.add_(1e-4)
    w = g.norm.weight.detach().clone()
    g.half()
    assert g.norm.weight.dtype == torch.float32 and torch.equal(g.norm.weight, w)
