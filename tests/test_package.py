"""The package's structure as users meet it: a light import, one validated config, state kept in float32."""

from __future__ import annotations

import copy

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

    conv = QuantConv2d(3, 4, 1, method="n2uq", w_bits=4, a_bits=4, bias=True)
    with torch.no_grad():
        conv.input_shift.fill_(0.1234567)
    conv.half()
    assert conv.weight.dtype == conv.bias.dtype == torch.float32  # a quantized conv keeps all of its own tensors
    assert conv.input_shift.dtype == torch.float32 and conv.input_shift.item() == torch.tensor(0.1234567).item()
    fp_conv = QuantConv2d(3, 4, 1, method=None).half()
    assert fp_conv.weight.dtype == torch.float16  # a conv without quantizers follows .half()

    g = GABFusion(1, n_branches=2, channels=8, form="paper")
    with torch.no_grad():
        g.norm.weight.add_(1e-4)
    w = g.norm.weight.detach().clone()
    g.half()
    assert g.norm.weight.dtype == torch.float32 and torch.equal(g.norm.weight, w)


def test_latent_weights_next_to_rounding_boundaries_survive_the_fp16_checkpoint(tmp_path):
    """After QAT many latent weights sit next to a rounding boundary; Ultralytics' fp16 save must not move them.

    Weights a hair above/below the midpoints between grid levels: rounded to float16 a share of them lands on the
    other side (checked), so a checkpoint written with ``.half()`` must keep the quantized conv's weight in float32
    for the reloaded model to quantize exactly like the one validated during training.
    """
    from ultralytics_gabfusion.quant.qconv import QuantConv2d

    torch.manual_seed(0)
    conv = QuantConv2d(16, 32, 3, method="lsq", w_bits=4, a_bits=4)
    q = conv.weight_quant
    q.init_from(conv.weight.detach())
    step = q.step_size().detach().reshape(-1, 1, 1, 1)
    k = torch.randint(-8, 7, conv.weight.shape).float()
    eps = torch.empty(conv.weight.shape).uniform_(1e-5, 3e-4) * torch.where(torch.rand(conv.weight.shape) < 0.5, -1, 1)
    with torch.no_grad():
        conv.weight.copy_((k + 0.5 + eps) * step)
    ref = conv.quantized_weight().detach().clone()
    flipped = (q(conv.weight.detach().half().float()) != ref).float().mean().item()
    assert flipped > 0.05  # plain fp16 rounding would change this many quantized weights

    torch.save({"model": copy.deepcopy(conv).half(), "train_args": {}}, tmp_path / "ckpt.pt")
    loaded = torch.load(tmp_path / "ckpt.pt", weights_only=False)["model"].float()
    assert loaded.weight.dtype == torch.float32 and torch.equal(loaded.weight, conv.weight)
    assert torch.equal(loaded.quantized_weight(), ref)
