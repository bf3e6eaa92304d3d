from __future__ import annotations

import pytest

from tests.conftest import REPO
from train.config import Config, ConfigError, config_to_dict, load_config, save_config

REPO_CONFIGS = sorted(p.stem for p in (REPO / "configs").glob("*.yaml"))
assert REPO_CONFIGS, "no configs found"  # a glob that finds nothing would make the tests below collect nothing


@pytest.mark.parametrize("name", REPO_CONFIGS)
def test_shipped_configs_load(name):
    cfg = load_config(REPO / f"configs/{name}.yaml")
    assert cfg.cnn.arch == "deeplabv3plus" and cfg.vit.arch == "segformer"


@pytest.mark.parametrize("name", [n for n in REPO_CONFIGS if not n.startswith("synthetic")])
def test_real_dataset_configs_start_from_imagenet_with_the_reference_pipeline(name):
    from train.models.pretrained import hub_source

    cfg = load_config(REPO / f"configs/{name}.yaml")
    assert cfg.cnn.pretrained and cfg.vit.pretrained  # fine-tuning learning rates need ImageNet encoders
    assert hub_source(cfg.vit).startswith("nvidia/mit-b") and hub_source(cfg.cnn).startswith("timm/")
    assert cfg.data.photometric and cfg.data.cat_max_ratio == 0.75 and cfg.vit.optimizer.warmup_iters == 1500


def flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in tree.items():
        out |= flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {prefix + k: v}
    return out


def test_the_256_synthetic_config_is_the_demo_recipe_at_another_size():
    """The GPU protocol compares arms on the 64x64 recipe: only size and what runs on a GPU may differ."""
    demo, big = (flat(config_to_dict(load_config(REPO / f"configs/{n}.yaml"))) for n in ("synthetic", "synthetic-256"))
    assert {k for k in demo if demo[k] != big[k]} == {
        "name", "iterations", "checkpoint_interval", "device", "amp", "compile_losses",
        "data.root", "data.crop_size", "data.num_workers",
    }  # fmt: skip
    assert big["data.crop_size"] == [256, 256] and big["method.preset"] == "independent"


def test_overrides_are_typed_and_nested():
    cfg = load_config(
        REPO / "configs/synthetic.yaml", ["iterations=7", "data.crop_size=[32, 48]", "vit.optimizer.lr=1e-3"]
    )
    assert cfg.iterations == 7 and cfg.data.crop_size == [32, 48] and cfg.vit.optimizer.lr == 0.001


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("data.crop_sise=[1,2]", "unknown field 'data.crop_sise'"),
        ("iterations=many", "iterations: expected int"),
        ("amp=fp8", "amp: 'fp8' is not one of"),
        ("cnn.optimizer.name=lamb", "cnn.optimizer.name"),
        ("data.crop_size=[1,x]", r"data.crop_size\[1\]: expected int"),
        ("noequals", "not of the form key.sub=value"),
    ],
)
def test_bad_fields_are_named(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(REPO / "configs/synthetic.yaml", [override])


def test_missing_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match=r"config file not found: .*nope\.yaml"):
        load_config(tmp_path / "nope.yaml")


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(REPO / "configs/synthetic.yaml", ["data.num_classes=7", "data.class_names=[a,b]"])
    save_config(cfg, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == cfg
    assert Config().vit.optimizer.head_lr_mult == 10.0  # the SegFormer recipe: head at 10x the lr


def test_a_partial_student_section_keeps_its_own_students_defaults(tmp_path):
    """A `vit:` section that does not name its arch is still a SegFormer, with the ViT's recipe."""
    (tmp_path / "c.yaml").write_text("vit:\n  decoder_channels: 128\n  optimizer: {lr: 0.001}\n")
    cfg = load_config(tmp_path / "c.yaml")
    assert cfg.vit.arch == "segformer" and cfg.vit.backbone == "pvt_v2_b0" and cfg.vit.decoder_channels == 128
    assert (
        cfg.vit.optimizer.name == "adamw" and cfg.vit.optimizer.lr == 0.001 and cfg.vit.optimizer.warmup_iters == 1500
    )
    bare = load_config(None, ["vit.weights=/w/mit_b0.pth"])
    assert bare.vit.arch == "segformer" and bare.vit.weights == "/w/mit_b0.pth" and bare.cnn.arch == "deeplabv3plus"

    from train.models import build_student

    assert type(build_student(bare.vit, 3)).__name__ == "SegFormer"


def test_a_section_naming_the_other_students_architecture_is_an_error():
    with pytest.raises(ConfigError, match=r"vit.arch='deeplabv3plus': the vit student is a segformer"):
        load_config(None, ["vit.arch=deeplabv3plus"])
    with pytest.raises(ConfigError, match=r"cnn.arch='unet': the cnn student is a deeplabv3plus"):
        load_config(None, ["cnn.arch=unet"])


def test_the_complementary_config_is_the_demo_recipe_on_other_data():
    """The method's benchmark compares arms on the demo's recipe: only the data and the budget differ."""
    demo, comp = (
        flat(config_to_dict(load_config(REPO / f"configs/{n}.yaml"))) for n in ("synthetic", "synthetic-complementary")
    )
    differing = {k for k in demo if demo[k] != comp[k]}
    assert differing <= {"name", "iterations", "checkpoint_interval", "data.root", "data.eval_batch_size"}
