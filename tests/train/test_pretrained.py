"""Initial encoder weights in the forms users have, checked by the features they produce (no hub, no download)."""

from __future__ import annotations

import logging
import re
from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.conftest import REPO, run_module, tiny_run_args
from train.config import StudentConfig, load_config
from train.models import WeightsError, build_student
from train.models.pretrained import _from_transformers, hub_source
from train.run_dir import load_student

transformers = pytest.importorskip("transformers")

VIT = load_config(None).vit  # segformer on pvt_v2_b0: MiT-B0
CNN = load_config(None).cnn
OFFLINE = {"HF_HUB_OFFLINE": "1"}


def mit(hidden_sizes=(32, 64, 160, 256), depths=(2, 2, 2, 2), seed=0):
    """transformers' MiT classifier, randomly initialised (the `nvidia/mit-b0` architecture)."""
    torch.manual_seed(seed)
    config = transformers.SegformerConfig(hidden_sizes=list(hidden_sizes), depths=list(depths), num_labels=10)
    return transformers.SegformerForImageClassification(config).eval()


def original_eps(model):
    """transformers builds every LayerNorm with eps 1e-5; NVlabs' MiT (and timm, and the student) use 1e-6
    in the blocks and after each stage. Align it, so that equal weights must give equal features."""
    for name, module in model.named_modules():
        block = re.search(r"(layernorm_before|layernorm_after|layer_norm_1|layer_norm_2)$", name)
        stage = re.search(r"(stages\.\d\.layer_norm|encoder\.layer_norm\.\d)$", name)
        if isinstance(module, torch.nn.LayerNorm) and (block or stage):
            module.eps = 1e-6
    return model


def assert_same_features(student, hf, tol=1e-5):
    x = torch.randn(2, 3, 67, 93)  # odd-sized: every stage rounds its size up
    with torch.no_grad():
        ours = student.eval().encoder(x)
        theirs = original_eps(hf).segformer(x, output_hidden_states=True).hidden_states
    assert len(ours) == len(theirs) == 4
    for a, b in zip(ours, theirs, strict=True):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, atol=tol, rtol=0)


@pytest.mark.parametrize("form", ["folder", "model.safetensors", "pytorch_model.bin without prefix"])
def test_transformers_checkpoint_gives_transformers_features(tmp_path, form):
    hf = mit()
    folder = tmp_path / "mit-b0"
    hf.save_pretrained(folder)  # as the hub stores nvidia/mit-b0: config.json + model.safetensors
    assert (folder / "config.json").is_file()
    init = folder
    if form == "model.safetensors":
        init = tmp_path / "alone" / "model.safetensors"
        init.parent.mkdir()
        init.write_bytes((folder / "model.safetensors").read_bytes())
    elif form.startswith("pytorch_model.bin"):  # SegformerModel's keys: no `segformer.` prefix, no classifier
        state = {k.removeprefix("segformer."): v for k, v in load_file(folder / "model.safetensors").items()}
        state = {k: v for k, v in state.items() if not k.startswith("classifier")}
        init = tmp_path / "pytorch_model.bin"
        torch.save(state, init)
    torch.manual_seed(1)
    assert_same_features(build_student(VIT, 3, init=init), hf)


def segformer(num_labels: int, decoder: int = 256, seed: int = 0):
    """transformers' SegFormer for segmentation (B0, `nvidia/segformer-b0-finetuned-*`'s architecture), random
    weights and batch-norm statistics."""
    torch.manual_seed(seed)
    config = transformers.SegformerConfig(num_labels=num_labels, decoder_hidden_size=decoder)
    model = transformers.SegformerForSemanticSegmentation(config).eval()
    bn = model.decode_head.batch_norm
    for scale, shift in ((bn.weight, bn.bias), (bn.running_var, bn.running_mean)):
        scale.data.uniform_(0.5, 2)
        shift.data.uniform_(-1, 1)
    return model


def test_a_transformers_segformer_is_the_vit_decode_head_included(tmp_path, caplog):
    """Exactly transformers' logits (its LayerNorm eps, its stage order in the fuse layer), from the folder
    `save_pretrained` writes; another class count keeps the head but not the classifier; another width is named."""
    hf = segformer(19)
    hf.save_pretrained(tmp_path / "hf")
    vit = replace(VIT, norm_eps=1e-5)
    x = torch.randn(2, 3, 67, 93)
    with torch.no_grad():
        ours = build_student(vit, 19, init=tmp_path / "hf").eval()(x).logits
        theirs = hf(pixel_values=x).logits
    assert ours.shape == theirs.shape == (2, 19, 17, 24)
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)

    with caplog.at_level(logging.INFO, logger="train.models.pretrained"):
        five = build_student(vit, 5, init=tmp_path / "hf").state_dict()
    assert "its classifier has 19 classes, this run 5: left out" in caplog.text
    saved = load_file(tmp_path / "hf" / "model.safetensors")  # the hub's naming
    assert torch.equal(five["decoder.proj.2.weight"][:, :, 0, 0], saved["decode_head.linear_c.2.proj.weight"])
    assert torch.equal(five["decoder.fuse.1.running_var"], saved["decode_head.batch_norm.running_var"])
    with pytest.raises(WeightsError, match=r"decode head is 256 wide .*set vit.decoder_channels=256"):
        build_student(replace(vit, decoder_channels=128), 19, init=tmp_path / "hf")


def test_nvlabs_mit_checkpoint_gives_the_same_features(tmp_path):
    hf = mit()
    hf.save_pretrained(tmp_path / "hf")
    nvlabs = _from_transformers(load_file(tmp_path / "hf" / "model.safetensors"))
    # NVlabs' mix_transformer.py naming, every tensor of it
    pattern = (
        r"patch_embed[1-4]\.(proj|norm)\.(weight|bias)|norm[1-4]\.(weight|bias)"
        r"|block[1-4]\.\d\.(norm1|norm2|attn\.(q|kv|proj|sr|norm)|mlp\.(fc1|fc2|dwconv\.dwconv))\.(weight|bias)"
    )
    # 24 embedding and stage norms; 20 per block, 16 in stage 4 (reduction ratio 1: no sr, no attn.norm)
    assert all(re.fullmatch(pattern, k) for k in nvlabs) and len(nvlabs) == 24 + 6 * 20 + 2 * 16
    assert nvlabs["block1.0.attn.kv.weight"].shape == (64, 32)
    path = tmp_path / "mit_b0.pth"
    torch.save({"state_dict": {**nvlabs, "head.weight": torch.zeros(1000, 256)}}, path)  # wrapped, classifier
    assert_same_features(build_student(VIT, 3, init=path), hf)


def test_timm_and_torchvision_files_still_load(tmp_path):
    import timm

    torch.manual_seed(5)
    source = timm.create_model("resnet18")
    path = tmp_path / "resnet18.pth"
    torch.save(source.state_dict(), path)  # torchvision's naming is timm's for ResNets
    source.eval()
    model = build_student(CNN, 3, init=path).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        expected = source.layer1(source.maxpool(source.act1(source.bn1(source.conv1(x)))))
        assert torch.equal(model.encoder(x)[0], expected)


def test_another_mit_size_is_refused_with_what_the_file_holds(tmp_path):
    mit(hidden_sizes=(64, 128, 320, 512)).save_pretrained(tmp_path / "mit-b1")
    with pytest.raises(WeightsError) as e:
        build_student(VIT, 3, init=tmp_path / "mit-b1")
    message = str(e.value)
    assert str(tmp_path / "mit-b1" / "model.safetensors") in message
    assert "MiT-B1" in message and "pvt_v2_b0 is MiT-B0" in message and "another shape" in message


def test_bad_files_are_refused_naming_the_file(tmp_path):
    mit().save_pretrained(tmp_path / "hf")
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes((tmp_path / "hf" / "model.safetensors").read_bytes()[:5000])
    with pytest.raises(WeightsError, match=f"cannot read encoder weights {re.escape(str(truncated))}"):
        build_student(VIT, 3, init=truncated)
    # a CNN's weights for the ViT
    import timm

    cnn_file = tmp_path / "resnet18.safetensors"
    save_file({k: v.contiguous() for k, v in timm.create_model("resnet18").state_dict().items()}, cnn_file)
    with pytest.raises(WeightsError, match=rf"{re.escape(str(cnn_file))} \(timm naming\) do not fit .*missing"):
        build_student(VIT, 3, init=cnn_file)
    with pytest.raises(WeightsError, match=r"must hold one of model\.safetensors"):
        build_student(VIT, 3, init=tmp_path)


def test_hub_sources():
    assert hub_source(VIT) == "nvidia/mit-b0"  # not timm's pvt_v2_b0 (MLP ratio 8 in stages 1-2)
    assert hub_source(CNN) == "timm/resnet18.a1_in1k"
    assert hub_source(StudentConfig(backbone="resnet18.tv_in1k")) == "timm/resnet18.tv_in1k"


@pytest.mark.parametrize(("student", "repo"), [("vit", "nvidia/mit-b0"), ("cnn", "timm/resnet18.a1_in1k")])
def test_pretrained_without_hub_fails_before_reading_data(tmp_path, student, repo):
    args = ["train", "--config", "configs/synthetic.yaml", "--run-dir", str(tmp_path / "run")]
    env = {**OFFLINE, "HF_HUB_CACHE": str(tmp_path / "empty-cache")}
    result = run_module(*args, f"{student}.pretrained=true", f"data.root={tmp_path / 'no-data'}", env_extra=env)
    assert result.returncode == 2
    err = result.stderr
    assert repo in err and f"{student}.weights=DIR" in err and "cannot be fetched" in err
    assert "no-data" not in err  # the data was never looked at


def test_export_needs_only_the_run_dir(synthetic_root, tmp_path):
    """A run started from weight files exports with the files gone and no hub, also when its config says
    pretrained=true (a run started from hub weights)."""
    import timm

    mit().save_pretrained(tmp_path / "mit-b0")
    torch.manual_seed(0)
    cnn_file = tmp_path / "resnet18.safetensors"
    save_file({k: v.contiguous() for k, v in timm.create_model("resnet18").state_dict().items()}, cnn_file)
    run = tmp_path / "run"
    args = ["--config", str(REPO / "configs" / "synthetic.yaml"), "--run-dir", str(run)]
    overrides = [*tiny_run_args(synthetic_root, iterations=2), f"cnn.weights={cnn_file}"]
    result = run_module("train", *args, *overrides, f"vit.weights={tmp_path / 'mit-b0'}", env_extra=OFFLINE)
    assert result.returncode == 0, result.stderr[-3000:]
    log = result.stderr  # what the run trains on, said before the first step
    assert "train 16, val 4, test 3 images" in log and "5 classes: background, solid" in log
    assert re.search(
        rf"device cpu \(\d+ threads\), (fp32|autocast bfloat16), torch {re.escape(torch.__version__)}\n", log
    )
    assert f"cnn: deeplabv3plus on resnet18, encoder from {cnn_file}" in log
    assert f"vit: segformer on pvt_v2_b0, encoder from {tmp_path / 'mit-b0'}" in log
    assert log.index("encoder from") < log.index("it 1/2")

    cnn_file.unlink()
    for f in (tmp_path / "mit-b0").iterdir():
        f.unlink()
    config = run / "config.yaml"
    config.write_text(config.read_text().replace("pretrained: false", "pretrained: true"))
    export = ["export", "--run", str(run), "--students", "cnn", "--variants", "fp32", "--parity-images", "2"]
    export += ["--batch-sizes", "1", "--no-openvino", "--no-size-sweep"]  # what it reads, not what it gates
    result = run_module(*export, env_extra=OFFLINE, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (run / "export" / "cnn" / "model.fp32.onnx").is_file()
    saved = load_file(run / "vit.safetensors")  # the ViT: what the export builds it with (its trace costs 4x the CNN's)
    assert all(torch.equal(v, saved[k]) for k, v in load_student(run, "vit").state_dict().items())


def test_resume_does_not_need_the_initial_weights(synthetic_root, tmp_path):
    mit().save_pretrained(tmp_path / "mit-b0")
    run = tmp_path / "run"
    args = ["--config", str(REPO / "configs" / "synthetic.yaml"), "--run-dir", str(run)]
    overrides = [*tiny_run_args(synthetic_root, iterations=2), f"vit.weights={tmp_path / 'mit-b0'}"]
    assert run_module("train", *args, *overrides, env_extra=OFFLINE).returncode == 0
    (tmp_path / "mit-b0" / "model.safetensors").unlink()
    result = run_module("train", "--resume", str(run), "iterations=4", env_extra=OFFLINE)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "from the checkpoint" in result.stderr
