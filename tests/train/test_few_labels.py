"""Few labels, many images: the labelled subset, the unlabelled images, the pseudo-label terms and their teachers,
the `same` pair, and a few-labels run that resumes after SIGKILL on the same subset and unlabelled stream."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from tests.conftest import REPO, run_module, tiny_run_args, train_here
from train.checkpoint import load_state
from train.config import ConfigError, DataConfig, MethodConfig, load_config, slot_config
from train.data import DatasetError, build_dataset
from train.data.transforms import TrainTransform, normalise
from train.data.unlabeled import LABELED_FILE, UnlabeledDataset, labeled_subset, unlabeled_images
from train.losses import Geometry, Objective, Unlabeled, dml_loss, pixel_bsd_loss, pseudo_label_loss, region_bsd_loss
from train.models import DeepLabV3Plus, SegFormer, StudentOutput
from train.run_dir import load_students
from train.trainer import Trainer

K = 3


def one_hot(classes: torch.Tensor, margin: float = 4.0) -> torch.Tensor:
    return nn.functional.one_hot(classes, K).permute(0, 3, 1, 2).float() * margin


def data_cfg(root: Path, **kw) -> DataConfig:
    return DataConfig(root=str(root), crop_size=[32, 32], num_classes=5, **kw)


def split_of(root: Path):
    return build_dataset(DataConfig(root=str(root)), "train", train=True)


# --- the labelled subset ------------------------------------------------------------------------------------


def test_the_labelled_subset_follows_its_own_seed_and_a_smaller_one_lies_inside_a_larger_one(synthetic_root):
    split = split_of(synthetic_root)  # 16 images
    four, eight = (labeled_subset(split, data_cfg(synthetic_root, labeled=n)) for n in (4, 8))
    assert len(four) == 4 and len(eight) == 8 and set(four) < set(eight)
    assert labeled_subset(split, data_cfg(synthetic_root, labeled=0.25)) == four
    assert labeled_subset(split, data_cfg(synthetic_root, labeled=4, labeled_seed=1)) != four
    assert labeled_subset(split, data_cfg(synthetic_root)) == list(range(16))  # null: every image

    names = [split.samples[i].image for i in (3, 5)]
    listed = synthetic_root / "two.txt"
    listed.write_text(f"{names[0].relative_to(synthetic_root).as_posix()}\n\n{names[1].stem}\n")
    assert labeled_subset(split, data_cfg(synthetic_root, labeled="two.txt")) == [3, 5]


@pytest.mark.parametrize(
    ("labeled", "message"),
    [
        (0, r"data.labeled=0: keep at least one labelled image"),
        (1.5, r"data.labeled=1.5: a share of the train split is in \(0, 1\]"),
        (17, r"data.labeled=17: the train split .*:train has only 16 images"),
        ("missing.txt", r"data.labeled: no such file .*missing.txt"),
        ("bad.txt", r"bad.txt, line 2: 'nope' is not an image of"),
    ],
)
def test_a_labelled_count_that_cannot_be_kept_names_the_field(synthetic_root, labeled, message):
    split = split_of(synthetic_root)
    (synthetic_root / "bad.txt").write_text(f"{split.samples[0].image.stem}\nnope\n")
    with pytest.raises(ConfigError, match=message):
        labeled_subset(split, data_cfg(synthetic_root, labeled=labeled))


# --- the unlabelled images ----------------------------------------------------------------------------------


def test_the_unlabelled_pool_is_the_rest_of_the_split_and_every_image_of_the_folder_at_any_depth(
    synthetic_root, tmp_path
):
    split = split_of(synthetic_root)
    folder = tmp_path / "extra"
    for path in (folder / "a.png", folder / "city" / "b.jpg", folder / "city" / "deep" / "c.jpeg"):
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((40, 48, 3), 90, np.uint8)).save(path)
    (folder / "notes.txt").write_text("not an image")
    cfg = data_cfg(synthetic_root, labeled=4, unlabeled=str(folder))  # absolute: taken as it is
    labeled = labeled_subset(split, cfg)
    pool = unlabeled_images(split, labeled, cfg)
    assert len(pool) == 12 + 3 and pool[-3:] == sorted(pool[-3:])
    assert not {split.samples[i].image for i in labeled} & set(pool)
    assert unlabeled_images(split, labeled, data_cfg(synthetic_root, labeled=4)) == pool[:12]


def test_the_cityscapes_config_reads_train_extra_as_unlabelled_images(tmp_path):
    from tests.train.test_data import make_cityscapes, save_png

    root = make_cityscapes(tmp_path, train_ids=True)
    for city, n in (("augsburg", 2), ("bad-honnef", 1)):
        for i in range(n):
            save_png(
                root / "leftImg8bit" / "train_extra" / city / f"{city}_{i:06d}_leftImg8bit.png",
                np.zeros((4, 8, 3), np.uint8),
            )
    cfg = load_config(REPO / "configs/cityscapes-semi.yaml", [f"data.root={root}", "data.crop_size=[2,2]"]).data
    split = build_dataset(cfg, cfg.train_split, train=True)
    labeled = labeled_subset(split, cfg)  # 1/8 of 2 images: 1 (at least one)
    pool = unlabeled_images(split, labeled, cfg)
    assert len(labeled) == 1 and len(pool) == 1 + 3
    assert [p.parent.name for p in pool[1:]] == ["augsburg", "augsburg", "bad-honnef"]


def _broken(folder: Path, kind: str) -> Path:
    folder.mkdir(parents=True)
    Image.fromarray(np.full((40, 48, 3), 90, np.uint8)).save(folder / "fine.png")
    if kind == "mask":
        Image.fromarray(np.random.default_rng(0).integers(0, 5, (40, 48), dtype=np.uint8), "L").save(folder / "m.png")
    elif kind == "unreadable":
        (folder / "m.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    elif kind == "small":
        Image.fromarray(np.full((20, 48, 3), 90, np.uint8)).save(folder / "m.png")
    elif kind == "empty":
        (folder / "fine.png").unlink()
    return folder


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        ("mask", r"data.unlabeled: a mask, not an image \(one channel of class indices, mode L\): .*m.png"),
        ("unreadable", r"data.unlabeled: cannot read .*m.png"),
        ("small", r"data.unlabeled: image 48x20 is smaller than the crop 32x32 \(data.crop_size\): .*m.png"),
        ("empty", r"no images \(.png, .jpg, .jpeg\) in .*extra \(data.unlabeled\)"),
        ("missing", r"unlabelled image folder not found: .*extra \(data.unlabeled\)"),
    ],
)
def test_an_unlabelled_folder_that_cannot_be_trained_on_names_the_file(synthetic_root, tmp_path, kind, message):
    folder = _broken(tmp_path / "extra", kind) if kind != "missing" else tmp_path / "extra"
    split = split_of(synthetic_root)
    with pytest.raises(DatasetError, match=message):
        unlabeled_images(split, [0], data_cfg(synthetic_root, labeled=1, unlabeled=str(folder)))


def test_a_greyscale_photograph_is_not_taken_for_a_mask(synthetic_root, tmp_path):
    folder = tmp_path / "grey"
    folder.mkdir()
    Image.fromarray(np.linspace(0, 250, 40 * 48).reshape(40, 48).astype(np.uint8), "L").save(folder / "g.png")
    split = split_of(synthetic_root)
    assert len(unlabeled_images(split, list(range(16)), data_cfg(synthetic_root, unlabeled=str(folder)))) == 1


def test_unlabelled_views_share_their_crop_and_a_resumed_stream_sees_the_same_ones(tmp_path):
    path = tmp_path / "u.png"
    image = np.random.default_rng(0).integers(0, 255, (24, 40, 3), dtype=np.uint8)
    Image.fromarray(image).save(path)
    transform = TrainTransform((32, 32), (1.0, 1.0))  # a 24-row image: the crop's last 8 rows are padding
    dataset = UnlabeledDataset([path], transform, strong=True, name="u")
    weak, strong, pixels = dataset[(0, (3, 1, 4, 1))]
    again = dataset[(0, (3, 1, 4, 1))]
    assert all(torch.equal(a, b) for a, b in zip((weak, strong, pixels), again, strict=True))
    crop, _ = transform.crop(image, np.zeros((24, 40), np.uint8), np.random.default_rng((3, 1, 4, 1)))
    torch.testing.assert_close(weak, torch.from_numpy(normalise(crop).transpose(2, 0, 1).copy()))
    assert pixels.dtype == torch.bool and pixels[:24].all() and not pixels[24:].any()
    assert not torch.equal(weak, strong) and strong.shape == weak.shape
    (only_weak,) = UnlabeledDataset([path], transform, strong=False, name="u")[(0, (3, 1, 4, 1))][:1]
    assert torch.equal(only_weak, weak)


def test_check_data_reports_the_labelled_subset_and_the_unlabelled_folder(synthetic_root, tmp_path):
    folder = _broken(tmp_path / "extra", "mask")
    args = ["--config", str(REPO / "configs/synthetic.yaml"), f"data.root={synthetic_root}", "data.crop_size=[32,32]"]
    result = run_module("train.data.check", *args, "data.labeled=4", f"data.unlabeled={folder}", timeout=120)
    assert result.returncode == 1, result.stderr
    assert "train: 4 of 16 images keep their masks (data.labeled=4)" in result.stdout
    assert "unlabelled: 2 images in" in result.stdout and "1 problems" in result.stdout
    assert "a mask, not an image" in result.stderr and "m.png" in result.stderr


# --- the terms on unlabelled pixels -------------------------------------------------------------------------


def test_pseudo_labels_teach_the_teachers_confident_classes_only_averaged_over_every_unlabelled_pixel():
    target = torch.tensor([[[1, 1, 2, 2]]])  # 1 x 1 x 4
    teacher = one_hot(target).requires_grad_()
    teacher.data[..., 2:] = 0.1 * teacher.data[..., 2:]  # unsure on the last two pixels
    learner = torch.zeros(1, K, 1, 4, requires_grad=True)
    valid = torch.tensor([[[True, True, True, False]]])
    loss, kept = pseudo_label_loss(learner, teacher, valid, threshold=0.9)
    assert kept == pytest.approx(2 / 3)  # two of three valid pixels taught
    assert loss.item() == pytest.approx(2 * np.log(K) / 3)
    grad_l, grad_t = torch.autograd.grad(loss, (learner, teacher), allow_unused=True)
    assert grad_t is None  # the teacher only teaches
    assert (grad_l[0, 1, 0, :2] < 0).all() and (grad_l[..., 2:] == 0).all()  # class 1 pulled up where kept


def test_class_balance_gives_every_pseudo_class_the_same_total_weight():
    target = torch.tensor([[[0] * 9 + [1]]])
    teacher, valid = one_hot(target), torch.ones(1, 1, 10, dtype=torch.bool)
    learner = one_hot(torch.ones_like(target))  # wrong on the nine majority pixels, right on the one minority
    plain, _ = pseudo_label_loss(learner, teacher, valid)
    balanced, _ = pseudo_label_loss(learner, teacher, valid, balance="class")
    ce_wrong = nn.functional.cross_entropy(learner[..., :1], target[..., :1]).item()
    ce_right = nn.functional.cross_entropy(learner[..., -1:], target[..., -1:]).item()
    assert plain.item() == pytest.approx((9 * ce_wrong + ce_right) / 10)
    assert balanced.item() == pytest.approx((5 * ce_wrong + 5 * ce_right) / 10)  # each class weighs 5 pixels


def test_the_random_control_teaches_as_many_pixels_elsewhere():
    g = torch.Generator().manual_seed(0)
    teacher, learner = torch.randn(2, K, 8, 8, generator=g) * 3, torch.randn(2, K, 8, 8, generator=g)
    valid = torch.ones(2, 8, 8, dtype=torch.bool)
    _, kept = pseudo_label_loss(learner, teacher, valid, threshold=0.8)
    _, random_kept = pseudo_label_loss(learner, teacher, valid, threshold=0.8, selection="random", generator=g)
    assert 0 < kept < 1 and random_kept == kept


def test_pixel_bsd_at_unlabelled_pixels_lets_the_more_confident_student_teach():
    labels = torch.full((1, 1, 3), 255)
    unlabeled = torch.tensor([[[True, True, False]]])
    zc = torch.tensor([[[4.0, 0.5, 4.0]], [[0.0, 0.0, 0.0]], [[0.0, 0.0, 0.0]]])[None]  # sure, unsure, padding
    zv = torch.tensor([[[0.5, 4.0, 0.5]], [[0.0, 0.0, 0.0]], [[0.0, 0.0, 0.0]]])[None]
    _, stats = pixel_bsd_loss(zc, zv, labels, unlabeled=unlabeled)
    assert float(stats["pixel_cnn_to_vit"]) == 0.5 and float(stats["pixel_vit_to_cnn"]) == 0.5
    _, none = pixel_bsd_loss(zc, zv, labels, unlabeled=unlabeled, margin=5.0)  # no student sure enough
    assert float(none["pixel_cnn_to_vit"]) == 0 and float(none["pixel_vit_to_cnn"]) == 0
    assert pixel_bsd_loss(zc, zv, labels)[1]["pixel_cnn_to_vit"] == 0  # without the mask: no pixel counts


def test_region_bsd_in_unlabelled_regions_lets_the_more_confident_student_teach():
    labels = torch.full((1, 4, 8), 255)
    left = torch.zeros(1, 4, 8, dtype=torch.bool)
    left[..., :4] = True
    sure, unsure = one_hot(torch.zeros(1, 4, 8, dtype=torch.long)), torch.zeros(1, K, 4, 8)
    cnn = StudentOutput([], torch.randn(1, 6, 4, 8), torch.where(left[:, None], sure, unsure))
    vit = StudentOutput([], torch.randn(1, 6, 4, 8), torch.where(left[:, None], unsure, sure))
    _, stats = region_bsd_loss(cnn, vit, labels, region_size=4, unlabeled=torch.ones(1, 4, 8, dtype=torch.bool))
    assert {k: float(v) for k, v in stats.items()} == {"region_vit_to_cnn": 0.5, "region_cnn_to_vit": 0.5}
    loss, _ = region_bsd_loss(cnn, vit, labels, region_size=4)  # no labels, no unlabelled pixels: nothing
    assert loss == 0


def test_dml_counts_the_unlabelled_pixels_too():
    labels = torch.tensor([[[0, 255]]])
    zc, zv = torch.randn(1, K, 1, 2), torch.randn(1, K, 1, 2)
    unlabeled = torch.tensor([[[False, True]]])
    labelled_only = dml_loss(zc[..., :1], zv[..., :1], labels[..., :1])
    unlabelled_only = dml_loss(zc[..., 1:], zv[..., 1:], torch.zeros_like(labels[..., 1:]))
    both = dml_loss(zc, zv, labels, unlabeled=unlabeled)
    assert both.item() == pytest.approx((labelled_only + unlabelled_only).item() / 2)


def _objective(terms: list[str], **kw) -> Objective:
    cfg = MethodConfig(terms=terms, start=0, warmup=0, pseudo_threshold=0.5, **kw)
    return Objective(cfg, Geometry((64, 64), (8, 8), [64, 128, 256, 512], [32, 64, 160, 256]))


def _pair(rows: int = 2, labelled: int = 1):
    g = torch.Generator().manual_seed(2)
    b = labelled + rows

    def student(channels):
        low = [torch.randn(b, c, 4, 4, generator=g) for c in channels]
        return StudentOutput(low, torch.randn(b, 8, 4, 4, generator=g), torch.zeros(b, K, 4, 4, requires_grad=True))

    labels = torch.full((b, 16, 16), 255)
    labels[:labelled] = 0
    mask = torch.zeros(b, 16, 16, dtype=torch.bool)
    mask[labelled:] = True
    return student([64, 128, 256, 512]), student([32, 64, 160, 256]), labels, mask


@pytest.mark.parametrize(
    ("term", "source", "cnn_learns"),
    [("cross", "live", 2), ("cross", "ema", 2), ("self_training", "ema", 1), ("offline", "offline", 2)],
)
def test_each_pseudo_label_term_pairs_a_student_with_its_teacher(term, source, cnn_learns):
    """Teachers of the CNN slot say class 1, of the ViT slot class 2: cross teaching and offline distillation
    teach the CNN the ViT's class, self-training its own."""
    cnn, vit, labels, mask = _pair()
    rows = 2
    teachers = {source: (one_hot(torch.ones(rows, 4, 4, dtype=torch.long)), one_hot(torch.full((rows, 4, 4), 2)))}
    kw = {"cross_teacher": source} if term == "cross" else {"offline_run": "x"} if term == "offline" else {}
    objective = _objective([term], **kw)
    assert objective.teacher_sources == {source}
    if source == "live":  # the learners' own outputs are the live teachers
        cnn.logits.data[-rows:], vit.logits.data[-rows:] = teachers["live"][0][:, :, :4, :4], teachers["live"][1]
        teachers = {}
    losses, stats = objective(cnn, vit, labels, 0.5, Unlabeled(rows, mask, teachers))
    assert stats[f"{term}_kept_cnn"] == 1 and stats[f"{term}_kept_vit"] == 1
    grad = torch.autograd.grad(losses[term], cnn.logits)[0]
    assert grad[:1].abs().sum() == 0  # the labelled row is not pseudo-labelled
    assert (grad[-rows:].argmin(1) == cnn_learns).all()  # the class it is pulled towards


@pytest.mark.parametrize("learners", ["cnn", "vit"])
def test_one_way_cross_teaching_leaves_the_teacher_untaught(learners):
    cnn, vit, labels, mask = _pair()
    cnn.logits.data[-2:] = one_hot(torch.ones(2, 4, 4, dtype=torch.long))
    vit.logits.data[-2:] = one_hot(torch.full((2, 4, 4), 2))
    losses, _ = _objective(["cross"], learners=learners)(cnn, vit, labels, 0.5, Unlabeled(2, mask, {}))
    grads = torch.autograd.grad(losses["cross"], [cnn.logits, vit.logits], allow_unused=True)
    taught = {name: g is not None and bool(g.abs().sum() > 0) for name, g in zip(("cnn", "vit"), grads, strict=True)}
    assert taught == {"cnn": learners == "cnn", "vit": learners == "vit"}


def test_a_fully_labelled_batch_leaves_the_pseudo_terms_nothing_to_teach():
    cnn, vit, labels, _ = _pair(rows=0, labelled=2)
    labels[:] = 1
    losses, _ = _objective(["cross", "pixel_bsd"])(cnn, vit, labels, 0.5)
    assert losses["cross"] == 0 and losses["cross"].requires_grad  # in the graph: gradient ratios still work
    alone, _ = _objective(["pixel_bsd"])(cnn, vit, labels, 0.5)
    torch.testing.assert_close(losses["pixel_bsd"], alone["pixel_bsd"])


@pytest.mark.parametrize(
    ("method", "message"),
    [
        ({"preset": "offline"}, r"method.offline_run: the offline term needs a finished run"),
        ({"preset": "bsd", "views": "weak_strong"}, r"method.views=weak_strong: only a term that reads a teacher"),
        ({"pseudo_threshold": 1.0}, r"method.pseudo_threshold=1.0: a probability in \[0, 1\)"),
        ({"ema_decay": 1.0}, r"method.ema_decay=1.0: in \[0, 1\)"),
    ],
)
def test_pseudo_label_options_that_cannot_apply_fail_at_start(method, message):
    with pytest.raises(ConfigError, match=message):
        Objective(MethodConfig(**method), Geometry((64, 64), (8, 8), [64] * 4, [32] * 4))


# --- the trainer ----------------------------------------------------------------------------------------------


def _trainer(root: Path, run: Path, *extra: str) -> Trainer:
    overrides = [*tiny_run_args(root), "data.verify=false", "seed=3", *extra]
    return Trainer(load_config(REPO / "configs/synthetic.yaml", overrides), run)


def test_a_pair_of_one_architecture_keeps_the_named_students_initialisation(synthetic_root, tmp_path):
    """method.pair=cnn|vit (the `same` baseline): the named student starts as in every other arm of the seed,
    its partner of the same kind from an initialisation of its own, and each slot trains with its recipe."""
    mixed = _trainer(synthetic_root, tmp_path / "m", "method.preset=independent").students
    for pair, kind in (("cnn", DeepLabV3Plus), ("vit", SegFormer)):
        trainer = _trainer(synthetic_root, tmp_path / pair, "method.preset=dml", f"method.pair={pair}")
        partner = "vit" if pair == "cnn" else "cnn"
        assert all(isinstance(m, kind) for m in trainer.students.values())
        own, other = trainer.students[pair].state_dict(), trainer.students[partner].state_dict()
        assert all(torch.equal(v, mixed[pair].state_dict()[k]) for k, v in own.items())
        assert not all(torch.equal(v, other[k]) for k, v in own.items() if v.is_floating_point())
        assert slot_config(trainer.cfg, partner) is getattr(trainer.cfg, pair)
        lr = trainer.slots[partner].optimizer.lr
        assert lr == getattr(trainer.cfg, pair).optimizer.lr


def test_every_arm_of_a_few_labels_seed_shares_the_students_the_subset_and_the_streams(synthetic_root, tmp_path):
    arms = {
        "supervised": ["method.preset=independent"],
        "method": ["method.preset=full", "method.views=weak_strong", "method.cross_teacher=ema"],
        "self": ["method.preset=self"],
    }
    trainers = {n: _trainer(synthetic_root, tmp_path / n, "data.labeled=6", *a) for n, a in arms.items()}
    states = {n: t.students.state_dict() for n, t in trainers.items()}
    for name in ("method", "self"):
        assert all(torch.equal(v, states["supervised"][k]) for k, v in states[name].items()), name
        assert trainers[name].labeled == trainers["supervised"].labeled and len(trainers[name].labeled) == 6
        assert len(trainers[name].unlabeled_set) == 10
    assert trainers["supervised"].unlabeled_set is None  # CE alone: no unlabelled image is read
    ema = trainers["self"].teachers.ema
    assert ema is not None and not any(p.requires_grad for p in ema.parameters())
    labelled = [next(iter(t.train_loader()))[1] for t in trainers.values()]
    assert all(torch.equal(labelled[0], other) for other in labelled[1:])
    weak, strong, _ = next(iter(trainers["method"].unlabeled_loader()))
    (plain, _) = next(iter(trainers["self"].unlabeled_loader()))
    assert torch.equal(weak, plain) and not torch.equal(weak, strong)


def test_offline_teachers_are_a_finished_runs_students_frozen(synthetic_root, trained_run, tmp_path):
    trainer = _trainer(synthetic_root, tmp_path / "o", "method.preset=offline", f"method.offline_run={trained_run}")
    frozen, saved = trainer.teachers._offline, load_students(trained_run)
    for name in ("cnn", "vit"):
        assert all(torch.equal(v, saved[name].state_dict()[k]) for k, v in frozen[name].state_dict().items())
        assert not any(p.requires_grad for p in frozen[name].parameters())
    assert "teachers" not in "".join(trainer.teachers.state_dict())  # nothing of them in a checkpoint
    with pytest.raises(ConfigError, match=r"method.offline_run='/no/run': not a run dir"):
        _trainer(synthetic_root, tmp_path / "p", "method.preset=offline", "method.offline_run=/no/run")


def _iteration(path: Path) -> int:
    try:
        return load_state(path)["iteration"]
    except Exception:
        return -1


def test_a_few_labels_run_resumed_after_sigkill_reaches_the_same_weights_and_teachers(synthetic_root, tmp_path):
    few = ["data.labeled=6", "method.terms=[cross,self_training,pixel_bsd]", "method.views=weak_strong"]
    few += ["method.cross_teacher=ema", "method.start=0", "method.pseudo_threshold=0.3"]
    few += [*tiny_run_args(synthetic_root, 6, checkpoint_interval=2), "log_interval=5"]

    def args(run: Path) -> list[str]:
        return ["--config", "configs/synthetic.yaml", "--run-dir", str(run), *few]

    straight = train_here(*args(tmp_path / "straight"))
    assert straight.returncode == 0, straight.stderr[-3000:]
    assert "6 of the train split labelled, 10 unlabelled (4 a batch)" in straight.stderr

    killed = tmp_path / "killed"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "train", *args(killed)], cwd=REPO, env=env, stderr=subprocess.DEVNULL
    )
    deadline = time.monotonic() + 300
    while _iteration(killed / "checkpoint" / "last.safetensors") < 2:
        assert proc.poll() is None and time.monotonic() < deadline, "training ended before it could be killed"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    (killed / LABELED_FILE).write_text("".join(reversed((killed / LABELED_FILE).read_text().splitlines(True))))
    resumed = train_here("--resume", str(killed))
    assert resumed.returncode == 0, resumed.stderr[-3000:]

    a, b = (load_state(run / "checkpoint" / "last.safetensors") for run in (tmp_path / "straight", killed))
    assert a["iteration"] == b["iteration"] == 6
    for part in ("students", "teachers"):
        flat_a, flat_b = (json.loads(json.dumps({k: 0 for k in s[part]})) for s in (a, b))
        assert flat_a == flat_b
        for key, value in a[part].items():
            torch.testing.assert_close(b[part][key], value, rtol=1e-4, atol=1e-5, msg=f"{part} {key}")
    assert len((killed / LABELED_FILE).read_text().splitlines()) == 6


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["data.labeled=0"], "data.labeled=0: keep at least one labelled image"),
        (["data.labeled=500", "method.preset=cross"], "data.labeled=500: the train split"),
        (["data.unlabeled=nowhere", "method.preset=cross"], "unlabelled image folder not found"),
        (["data.unlabeled_ratio=0"], "data.unlabeled_ratio=0.0: must be > 0"),
        (["method.preset=offline"], "method.offline_run: the offline term needs a finished run"),
    ],
)
def test_few_labels_bad_input_exits_before_training_with_a_clear_message(
    synthetic_root, tmp_path, capsys, args, message
):
    from train.__main__ import main

    run = tmp_path / "run"
    argv = ["--config", str(REPO / "configs/synthetic.yaml"), "--run-dir", str(run)]
    code = main([*argv, *tiny_run_args(synthetic_root), *args])
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err
    assert not (run / "checkpoint").exists()
