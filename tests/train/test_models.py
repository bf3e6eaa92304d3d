"""Both students: forward, backward, any input size, and local encoder weights."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from train.config import Config, StudentConfig
from train.models import StudentOutput, WeightsError, build_student, locate

CFG = Config()
STUDENTS = {
    "deeplabv3plus-r18-os8": CFG.cnn,
    "deeplabv3plus-mnv2-os16": StudentConfig(backbone="mobilenetv2_100", output_stride=16),
    "segformer-b0": CFG.vit,
}


@pytest.fixture(scope="module", params=list(STUDENTS))
def student(request):
    torch.manual_seed(0)
    return request.param, build_student(STUDENTS[request.param], num_classes=5)


@pytest.mark.parametrize("size", [(64, 64), (45, 61), (33, 97)])
def test_forward_backward_any_size(student, size):
    _, model = student
    model.train()
    x = torch.randn(2, 3, *size, requires_grad=True)
    out = model(x)
    assert isinstance(out, StudentOutput)
    stride4 = out.low[0].shape[-2:]
    assert out.feat.shape == (2, 256, *stride4)
    assert out.logits.shape == (2, 5, *stride4)
    assert abs(stride4[0] - size[0] / 4) <= 1 and abs(stride4[1] - size[1] / 4) <= 1
    out.logits.square().mean().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    model.zero_grad()


def test_camvid_size_runs_in_eval(student):
    _, model = student
    with torch.no_grad():
        out = model.eval()(torch.randn(1, 3, 360, 480))
    assert out.logits.shape[-2:] == (90, 120)


def test_low_features_are_stage_ordered(student):
    name, model = student
    with torch.no_grad():
        out = model.eval()(torch.randn(2, 3, 64, 64))
    strides = [64 // f.shape[-1] for f in out.low]
    assert len(out.low) == 4 and strides[0] == 4 and strides == sorted(strides)
    if name == "segformer-b0":
        assert [f.shape[1] for f in out.low] == [32, 64, 160, 256]  # MiT-B0 widths
    if name == "deeplabv3plus-r18-os8":
        assert [f.shape[1] for f in out.low] == [64, 128, 256, 512] and strides == [4, 8, 8, 8]


def test_segformer_encoder_is_mit_b0_sized():
    model = build_student(CFG.vit, num_classes=19)
    assert sum(p.numel() for p in model.encoder.parameters()) == pytest.approx(3.32e6, rel=0.01)


@pytest.mark.parametrize("cfg", [CFG.cnn, CFG.vit], ids=["cnn", "vit"])
def test_local_encoder_weights_are_loaded(tmp_path, cfg):
    import timm

    kwargs = {"mlp_ratios": (4, 4, 4, 4)} if cfg.arch == "segformer" else {}
    torch.manual_seed(123)
    source = timm.create_model(cfg.backbone, pretrained=False, **kwargs)
    path = tmp_path / "encoder.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, path)
    torch.manual_seed(0)
    model = build_student(cfg, num_classes=3, init=path)
    source_values = [v for v in source.state_dict().values() if v.is_floating_point()]
    for name, value in model.encoder.named_parameters():  # the feature wrapper renames modules: match values
        assert any(v.shape == value.shape and torch.equal(v, value) for v in source_values), name
    fresh = build_student(cfg, num_classes=3)
    assert not torch.equal(next(fresh.encoder.parameters()), next(model.encoder.parameters()))


def test_missing_or_wrong_weights_are_reported(tmp_path):
    with pytest.raises(WeightsError, match=r"cnn\.weights: encoder weights not found"):
        locate(StudentConfig(weights=str(tmp_path / "none.safetensors")), "cnn")
    path = tmp_path / "bad.safetensors"
    save_file({"nonsense": torch.zeros(2)}, path)
    with pytest.raises(WeightsError, match=r"do not fit timm model 'resnet18': .* missing"):
        build_student(StudentConfig(), 3, init=path)


@pytest.mark.parametrize("name", ["deeplabv3plus-r18-os8", "segformer-b0"])
def test_decoder_width_is_configurable(name):
    cfg = StudentConfig(**{**STUDENTS[name].__dict__, "decoder_channels": 48})
    out = build_student(cfg, num_classes=5).eval()(torch.randn(1, 3, 64, 64))
    assert out.feat.shape == (1, 48, 16, 16) and out.logits.shape == (1, 5, 16, 16)
