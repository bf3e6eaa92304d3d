"""Typed experiment config: YAML file + dotted command-line overrides -> dataclasses.

The resolved config (with the dataset's classes filled in) is written to the run dir as
`config.yaml`, and is all that `export/` needs to rebuild both students.
"""

from __future__ import annotations

import copy
import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
    """A config file or override that does not fit the schema; the message names the field."""


@dataclass
class DataConfig:
    format: Literal["folder", "cityscapes", "camvid", "voc", "ade20k"] = "folder"  # the layout (docs/datasets.md)
    root: str = "data/synthetic"  # the dataset's folder
    train_split: str = "train"  # trained on
    eval_split: str = "val"  # evaluated during training: picks each student's best weights
    test_split: str | None = None  # held out: evaluated once at the end (best and last weights), for reporting
    crop_size: list[int] = field(default_factory=lambda: [512, 1024])  # H, W
    scale_range: list[float] = field(default_factory=lambda: [0.5, 2.0])  # random rescale of the image, then a crop
    base_size: list[int] | None = None  # [long, short]: the scale_range ratio applies to the image fitted to it
    cat_max_ratio: float = 1.0  # < 1: redraw a crop (up to 10 times) while one class covers more of it
    photometric: bool = False  # mmseg's PhotoMetricDistortion (brightness, contrast, saturation, hue)
    batch_size: int = 8  # labelled images a step, over all processes
    eval_batch_size: int = 1  # images an evaluation batch (padded to the largest)
    num_workers: int = 2  # data-loading processes
    eval_max_images: int | None = None  # evaluate on the first N eval images only (quick checks)
    verify: bool = True  # read every mask once before training, so bad labels fail at start
    # Few labels, many images (docs/method.md, "Few labels"): `labeled` keeps a subset of the train split's
    # masks (a count, a share in (0, 1], or a file of image names relative to `root`), drawn by `labeled_seed`
    # alone and written to the run dir as labeled.txt; the rest of the split joins `unlabeled`, a folder of
    # images without masks (searched recursively; relative to `root`). A batch holds `batch_size` labelled
    # images and `unlabeled_ratio` times as many unlabelled ones, when the method has a term that reads them.
    labeled: int | float | str | None = None
    labeled_seed: int = 0  # draws the labelled subset, apart from the run's seed
    unlabeled: str | None = None  # a folder of images without masks, relative to root
    unlabeled_ratio: float = 1.0  # unlabelled images a batch per labelled one
    # Filled from the dataset when a run starts; written to the run dir's config.yaml.
    num_classes: int | None = None
    class_names: list[str] | None = None
    palette: list[list[int]] | None = None

    def __post_init__(self) -> None:
        labeled = self.labeled
        if isinstance(labeled, int) and labeled < 1:
            raise ConfigError(f"data.labeled={labeled}: keep at least one labelled image (null: every image)")
        if isinstance(labeled, float) and not 0 < labeled <= 1:
            raise ConfigError(f"data.labeled={labeled}: a share of the train split is in (0, 1]")
        if self.unlabeled_ratio <= 0:
            raise ConfigError(f"data.unlabeled_ratio={self.unlabeled_ratio}: must be > 0")


@dataclass
class OptimizerConfig:
    name: Literal["sgd", "adamw"] = "sgd"  # the optimizer
    lr: float = 0.01  # encoder learning rate at its peak
    momentum: float = 0.9  # SGD only
    weight_decay: float = 5e-4  # AdamW: not on norms and biases
    head_lr_mult: float = 1.0  # decoder/classifier lr = lr * head_lr_mult
    warmup_iters: int = 0  # linear warm-up, then poly decay
    poly_power: float = 0.9  # poly decay to 0 at the last iteration
    grad_clip: float = 0.0  # max global gradient norm of this student's step (0: no clipping)


@dataclass
class StudentConfig:
    arch: str = "deeplabv3plus"  # the architecture of its student in STUDENTS (a slot holds its own kind)
    backbone: str = "resnet18"  # the timm encoder
    output_stride: int | None = 8  # CNN encoders only; pvt_v2 has a fixed stride of 32
    decoder_channels: int = 256  # width of the decoder feature `feat` (ASPP / All-MLP), docs/method.md
    # A ViT encoder's block and stage LayerNorm eps (null: timm's 1e-6, as NVlabs' MiT): transformers' SegFormer
    # runs with 1e-5, which a model trained there keeps when imported (python -m export --from-transformers)
    norm_eps: float | None = None
    # Initial encoder weights (train/models/pretrained.py): ImageNet weights from the Hugging Face hub
    # (timm's for CNNs, nvidia/mit-bN for the SegFormer), or a local file/folder (timm, torchvision,
    # transformers or NVlabs MiT form), which wins over `pretrained`. Only a new run reads them.
    pretrained: bool = False
    weights: str | None = None
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)


# The two students, by name: each one's architecture, backbone and recipe (docs/method.md). A config section
# `cnn:` / `vit:` overrides these field by field; every stage reads the names from here.
STUDENTS = {
    "cnn": StudentConfig(),  # DeepLabV3+ ResNet-18, output stride 8; SGD 0.01, poly 0.9
    "vit": StudentConfig(  # SegFormer-B0 (MiT-B0 = timm's pvt_v2_b0); AdamW 6e-5, head x10, 1500-iteration warm-up
        arch="segformer",
        backbone="pvt_v2_b0",
        output_stride=None,
        optimizer=OptimizerConfig(
            name="adamw", lr=6e-5, weight_decay=0.01, head_lr_mult=10.0, warmup_iters=1500, poly_power=1.0
        ),
    ),
}


@dataclass
class EvalConfig:
    mode: Literal["whole", "slide"] = "whole"  # the whole image at once, or sliding windows
    crop_size: list[int] | None = None  # slide window size (H, W); defaults to the train crop
    stride: list[int] | None = None  # slide step; defaults to 2/3 of the window
    scale: list[int] | None = None  # [long, short]: images rescaled to fit it; predictions resized back to the labels


@dataclass
class MethodConfig:
    """The collaborative objective (docs/method.md): a preset, or an explicit list of terms, and each
    term's options. Distillation runs from `start` on, ramped up linearly over `warmup` (shares of
    training). The defaults are chosen by measurement under a paired-seed protocol (docs/method.md lists
    each against the reading of the paper it replaces; benchmarks/results/ holds the runs)."""

    preset: str = "full"  # a name of train.losses.PRESETS (docs/method.md lists them)
    terms: list[str] | None = None  # names of train.losses.TERMS; overrides the preset
    # reliable: the selective terms transfer where one student is the more reliable (the method);
    # random: as many regions and pixels in each direction, chosen at random (the control)
    selection: Literal["reliable", "random"] = "reliable"
    # both: each student learns from the other (the method); cnn / vit: only that one does, the other's
    # side of every term carries no gradient (one-way distillation, the same terms and selection)
    learners: Literal["both", "cnn", "vit"] = "both"
    # mixed: a CNN and a ViT (the method); cnn / vit: two students of that architecture, the other slot holding
    # a second one with an initialisation of its own (the `same` baseline: is the peer's difference what helps?)
    pair: Literal["mixed", "cnn", "vit"] = "mixed"
    start: float = 0.25  # share of iterations before any distillation (CE alone)
    warmup: float = 0.1  # share of iterations over which every distillation weight ramps up from 0
    hfd_weight: float = 0.2  # HFD's weight
    hfd_stages: list[int] = field(default_factory=lambda: [1])  # encoder stages, 1 = stride 4
    hfd_distance: Literal["mse", "cosine", "cwd"] = "mse"  # per position, or channel-wise distributions (cwd)
    hfd_decay: Literal["none", "linear", "cosine"] = "none"  # HFD's weight decays to 0 at the end of training
    region_weight: float = 1.0  # region-wise BSD's weight
    region_size: int = 8  # k x k cells of the stride-4 grid
    region_criterion: Literal["ce", "entropy"] = "ce"  # who teaches a region: lower CE, or lower entropy (label-free)
    region_distance: Literal["mse", "cosine", "cwd"] = "mse"  # how the learner's feature is pulled to the teacher's
    region_margin: float = 0.1  # the teacher's mean CE (or entropy) in a region must be lower by this (nats)
    region_adapter: bool = True  # learner-side 1x1 conv + BN from a student's decoder feature to the other's
    pixel_weight: float = 1.0  # pixel-wise BSD's weight
    pixel_criterion: Literal["correct_then_ce", "ce"] = "correct_then_ce"  # the right student teaches, or lower CE
    pixel_margin: float = 0.5  # where both students are right, the teacher's CE must be lower by this (nats)
    pixel_norm: Literal["active", "valid"] = "valid"  # average each direction over all labelled pixels, or its own
    temperature: float = 1.0  # softmax temperature of pixel-wise BSD and DML (their KL is scaled by T^2)
    dml_weight: float = 1.0  # DML's weight
    cwd_temperature: float = 4.0  # softmax temperature of the `cwd` feature distance
    # Pseudo-label terms on unlabelled pixels (cross, self_training, offline): a teacher's class where its
    # probability reaches pseudo_threshold; `class` balance gives each pseudo-class the same total weight.
    pseudo_weight: float = 0.1  # the pseudo-label term's weight
    pseudo_threshold: float = 0.9  # a teacher's class counts where its probability reaches this
    pseudo_balance: Literal["none", "class"] = "none"  # class: each pseudo-class gets the same total weight
    cross_teacher: Literal["live", "ema"] = "live"  # cross: the peer itself, or its moving average
    ema_decay: float = 0.99  # the moving-average teachers (self_training; cross with cross_teacher=ema)
    # same: the teachers see what the learners see; weak_strong: the teachers a weakly augmented view, the
    # learners a strongly augmented one of the same crop (colour, greyscale, blur)
    views: Literal["same", "weak_strong"] = "same"
    offline_run: str | None = None  # offline: a finished run dir whose students teach, frozen

    def __post_init__(self) -> None:
        def need(ok: bool, name: str, what: str) -> None:
            if not ok:
                raise ConfigError(f"method.{name}={getattr(self, name)!r}: {what}")

        need(0 <= self.start < 1, "start", "distillation must start before the end of training (0 <= start < 1)")
        need(0 <= self.warmup <= 1, "warmup", "a share of training (0-1)")
        weights = ("hfd_weight", "region_weight", "pixel_weight", "dml_weight", "pseudo_weight")
        for name in ("region_margin", "pixel_margin", *weights):
            need(getattr(self, name) >= 0, name, "must be >= 0")
        need(0 <= self.pseudo_threshold < 1, "pseudo_threshold", "a probability in [0, 1)")
        need(0 <= self.ema_decay < 1, "ema_decay", "in [0, 1)")
        for name in ("temperature", "cwd_temperature"):
            need(getattr(self, name) > 0, name, "must be > 0")
        need(self.region_size >= 1, "region_size", "must be >= 1")


@dataclass
class Config:
    name: str = "run"  # the run dir's name under runs/ (unless --run-dir)
    seed: int = 0  # the students' initialisation and the batch order (every arm of a comparison shares it)
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    iterations: int = 80_000  # training steps (one batch each)
    eval_interval: int = 4_000  # steps between evaluations on data.eval_split (each keeps a student's best weights)
    checkpoint_interval: int = 1_000  # steps between resumable checkpoints (checkpoint/last.safetensors)
    log_interval: int = 50  # steps between log lines, TensorBoard scalars and gradient-ratio diagnostics
    amp: Literal["bf16", "fp16", "none"] = "bf16"  # CUDA; on a CPU bf16 where native (AVX512-BF16, AMX), else fp32
    channels_last: bool = True  # CUDA only
    cudnn_benchmark: bool = True  # CUDA only: autotuned convolutions (false: bitwise-repeatable GPU runs)
    compile_losses: bool = True  # CUDA only: torch.compile fuses the loss terms' full-resolution element-wise work
    method: MethodConfig = field(default_factory=MethodConfig)
    data: DataConfig = field(default_factory=DataConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    cnn: StudentConfig = field(default_factory=lambda: copy.deepcopy(STUDENTS["cnn"]))
    vit: StudentConfig = field(default_factory=lambda: copy.deepcopy(STUDENTS["vit"]))


def slot_config(cfg: Config, slot: str) -> StudentConfig:
    """The student a slot (`cnn`, `vit`) holds: its own section, or with method.pair=cnn|vit that student's."""
    return getattr(cfg, slot if cfg.method.pair == "mixed" else cfg.method.pair)


def _check_value(value: Any, hint: Any, where: str) -> Any:
    """Validate `value` against a type hint of the schema; returns the (possibly converted) value."""
    origin = typing.get_origin(hint)
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return _from_dict(hint, value, f"{where}.")
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _check_value(value, arg, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0])
    if origin is Literal:
        if value not in typing.get_args(hint):
            raise ConfigError(f"{where}: {value!r} is not one of {list(typing.get_args(hint))}")
        return value
    if origin is list:
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        (item,) = typing.get_args(hint)
        return [_check_value(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if hint is float and isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str):  # YAML 1.1 reads `1e-3` as a string
        try:
            return float(value)
        except ValueError:
            pass
    if hint in (int, str, bool) and type(value) is hint:
        return value
    raise ConfigError(f"{where}: expected {getattr(hint, '__name__', hint)}, got {value!r}")


def _from_dict(cls: type, values: dict, where: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    for key in values:
        if key not in known:
            raise ConfigError(f"unknown field '{where}{key}' (known: {', '.join(sorted(known))})")
    kwargs = {k: _check_value(v, hints[k], f"{where}{k}") for k, v in values.items()}
    return cls(**kwargs)


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    node = tree
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override '{dotted}': '{part}' is not a section")
    node[leaf] = value


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> Config:
    """Read a YAML config and apply `key.sub=value` overrides (values parsed as YAML)."""
    tree: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        tree = yaml.safe_load(path.read_text()) or {}
        if not isinstance(tree, dict):
            raise ConfigError(f"{path}: expected a mapping at the top level")
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override '{item}' is not of the form key.sub=value")
        _set_dotted(tree, key.strip(), yaml.safe_load(raw))
    try:
        for name in STUDENTS:
            tree[name] = _student_section(name, tree.get(name))
        return _from_dict(Config, tree)
    except ConfigError as e:
        raise ConfigError(f"{path or 'config'}: {e}") from None


def _student_section(name: str, given: Any) -> dict:
    """A student's section on top of that student's own defaults (a `vit:` section that sets only its decoder
    width is still a SegFormer); naming another student's architecture is an error."""
    if given is None:
        given = {}
    if not isinstance(given, dict):
        raise ConfigError(f"{name}: expected a mapping, got {given!r}")
    defaults = dataclasses.asdict(STUDENTS[name])
    arch = given.get("arch", defaults["arch"])
    if arch != defaults["arch"]:
        kinds = ", ".join(f"{n}: {s.arch}" for n, s in STUDENTS.items())
        raise ConfigError(f"{name}.arch={arch!r}: the {name} student is a {defaults['arch']} ({kinds})")
    optimizer = given.get("optimizer", {})
    if isinstance(optimizer, dict):
        optimizer = {**defaults["optimizer"], **optimizer}
    return {**defaults, **given, "optimizer": optimizer}


def config_to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def save_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
