"""Each dataset layout, built in its real folder structure inside the test, and its failure modes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from train.config import DataConfig
from train.data import DatasetError, build_dataset, pad_collate
from train.data.synthetic import CLASS_NAMES, generate, render
from train.data.transforms import IMAGENET_MEAN, IMAGENET_STD, TrainTransform, fit_scale, photometric_distortion
from train.data.voc import CLASSES as VOC_CLASSES


def save_png(path: Path, array: np.ndarray, mode: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array, mode).save(path)
    return path


def rgb(h: int = 6, w: int = 8, value: int = 100) -> np.ndarray:
    return np.full((h, w, 3), value, np.uint8)


def make_folder(root: Path, masks: dict[str, np.ndarray], names=("bg", "fg")) -> Path:
    for sample_id, mask in masks.items():
        save_png(root / "images" / f"{sample_id}.png", rgb(*mask.shape))
        save_png(root / "masks" / f"{sample_id}.png", mask)
    (root / "splits").mkdir(parents=True, exist_ok=True)
    (root / "splits" / "train.txt").write_text("\n".join(masks) + "\n")
    palette = [[i * 40, 0, 0] for i in range(len(names))]
    (root / "classes.json").write_text(json.dumps({"names": list(names), "palette": palette}))
    return root


def load(root: Path, fmt: str = "folder", split: str = "train", **kw):
    return build_dataset(DataConfig(format=fmt, root=str(root), **kw), split, train=False)


# --- generic folder format --------------------------------------------------------------------


def test_folder_reads_images_masks_and_classes(tmp_path):
    mask = np.array([[0, 1], [255, 1]], np.uint8)
    ds = load(make_folder(tmp_path, {"a": mask, "b": 1 - mask % 2}))
    assert len(ds) == 2 and ds.classes.names == ["bg", "fg"]
    image, target = ds[0]
    assert image.shape == (3, 2, 2) and image.dtype == torch.float32
    assert target.tolist() == [[0, 1], [255, 1]]
    expected = (100 / 255 - IMAGENET_MEAN[0]) / IMAGENET_STD[0]
    assert image[0, 0, 0].item() == pytest.approx(expected, abs=1e-5)


def test_folder_accepts_jpg_images(tmp_path):
    root = make_folder(tmp_path, {"a": np.zeros((4, 4), np.uint8)})
    Image.open(root / "images" / "a.png").save(root / "images" / "a.jpg")
    (root / "images" / "a.png").unlink()
    assert load(root).samples[0].image.name == "a.jpg"


@pytest.mark.parametrize(
    ("breakage", "message"),
    [
        (lambda r: None, None),
        (lambda r: (r / "splits" / "train.txt").unlink(), "split file not found"),
        (lambda r: (r / "masks" / "a.png").unlink(), "image without mask"),
        (lambda r: (r / "images" / "a.png").unlink(), "no image for id 'a'"),
        (lambda r: save_png(r / "masks" / "a.png", np.zeros((5, 8), np.uint8)), "differs from its image"),
        (lambda r: save_png(r / "masks" / "a.png", np.full((6, 8), 7, np.uint8)), "label values [7] outside 0..1"),
        (lambda r: save_png(r / "masks" / "a.png", rgb()), "single-channel"),
        (lambda r: (r / "images" / "a.png").write_bytes(b"not a png"), "cannot read"),
        (lambda r: (r / "classes.json").write_text("{"), "classes.json"),
    ],
)
def test_folder_errors_name_the_file(tmp_path, breakage, message):
    root = make_folder(tmp_path, {"a": np.zeros((6, 8), np.uint8)})
    breakage(root)
    if message is None:
        load(root).verify()  # the unbroken fixture is valid
        return
    with pytest.raises(DatasetError, match=message.replace("[", r"\[").replace("]", r"\]")) as err:
        load(root).verify()
    assert str(root) in str(err.value)


def test_missing_root_is_named(tmp_path):
    with pytest.raises(DatasetError, match=r"dataset root not found: .*nowhere"):
        load(tmp_path / "nowhere")


def test_truncated_image_fails_on_read(tmp_path):
    root = make_folder(tmp_path, {"a": np.zeros((64, 64), np.uint8)})
    noise = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    save_png(root / "images" / "a.png", noise)
    data = (root / "images" / "a.png").read_bytes()
    (root / "images" / "a.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(DatasetError, match=r"cannot read .*a\.png"):
        load(root).verify()


# --- Cityscapes -----------------------------------------------------------------------------------


def make_cityscapes(root: Path, train_ids: bool) -> Path:
    label_ids = np.array([[7, 26], [0, 33]], np.uint8)  # road, car, unlabeled, bicycle
    for city, frame in (("aachen", "aachen_000000_000019"), ("bochum", "bochum_000000_000313")):
        save_png(root / "leftImg8bit" / "train" / city / f"{frame}_leftImg8bit.png", rgb(2, 2))
        save_png(root / "gtFine" / "train" / city / f"{frame}_gtFine_labelIds.png", label_ids)
        if train_ids:
            save_png(
                root / "gtFine" / "train" / city / f"{frame}_gtFine_labelTrainIds.png",
                np.array([[0, 13], [255, 18]], np.uint8),
            )
    return root


@pytest.mark.parametrize("train_ids", [True, False])
def test_cityscapes_train_ids_or_mapped_label_ids(tmp_path, train_ids):
    ds = load(make_cityscapes(tmp_path, train_ids), "cityscapes")
    assert len(ds) == 2 and ds.classes.num_classes == 19
    assert ds[1][1].tolist() == [[0, 13], [255, 18]]
    suffix = "labelTrainIds" if train_ids else "labelIds"
    assert ds.samples[0].mask.name.endswith(f"_gtFine_{suffix}.png")


def test_cityscapes_missing_split(tmp_path):
    with pytest.raises(DatasetError, match=r"Cityscapes split not found: .*leftImg8bit/val"):
        load(make_cityscapes(tmp_path, True), "cityscapes", split="val")


# --- CamVid ----------------------------------------------------------------------------------------


def test_camvid_void_becomes_ignore(tmp_path):
    save_png(tmp_path / "val" / "0001TP_006690.png", rgb(2, 3))
    save_png(tmp_path / "valannot" / "0001TP_006690.png", np.array([[0, 10, 11], [3, 11, 8]], np.uint8))
    ds = load(tmp_path, "camvid", split="val")
    assert ds.classes.num_classes == 11
    assert ds[0][1].tolist() == [[0, 10, 255], [3, 255, 8]]


def test_camvid_label_above_void_is_rejected(tmp_path):
    save_png(tmp_path / "train" / "x.png", rgb(2, 2))
    save_png(tmp_path / "trainannot" / "x.png", np.full((2, 2), 12, np.uint8))
    with pytest.raises(DatasetError, match=r"label values \[12\].*trainannot/x\.png"):
        load(tmp_path, "camvid").verify()


def test_camvid_image_without_mask(tmp_path):
    save_png(tmp_path / "train" / "x.png", rgb(2, 2))
    (tmp_path / "trainannot").mkdir()
    with pytest.raises(DatasetError, match=r"image without mask: .*train/x\.png"):
        load(tmp_path, "camvid")


# --- PASCAL VOC ------------------------------------------------------------------------------------


def palette_png(path: Path, indices: np.ndarray) -> None:
    img = Image.fromarray(indices, "P")
    flat = [c for colour in VOC_CLASSES.palette for c in colour]
    img.putpalette(flat + [224, 224, 192] * (256 - len(VOC_CLASSES.palette)))
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)


def make_voc(root: Path, aug: bool) -> Path:
    voc = root / "VOCdevkit" / "VOC2012"
    seg = voc / "ImageSets" / "Segmentation"
    seg.mkdir(parents=True)
    (voc / "JPEGImages").mkdir()
    for i in ("2007_000032", "2007_000039"):
        Image.fromarray(rgb(3, 4)).save(voc / "JPEGImages" / f"{i}.jpg")
        palette_png(voc / "SegmentationClass" / f"{i}.png", np.array([[0, 1, 15, 255]] * 3, np.uint8))
    (seg / "val.txt").write_text("2007_000032\n2007_000039\n")
    if aug:
        save_png(voc / "SegmentationClassAug" / "2007_000039.png", np.array([[20, 0, 0, 0]] * 3, np.uint8))
        (seg / "train_aug.txt").write_text("2007_000039\n")
    return root / "VOCdevkit"


def test_voc_palette_masks_read_as_indices(tmp_path):
    ds = load(make_voc(tmp_path, aug=False), "voc", split="val")
    assert len(ds) == 2 and ds.classes.names[15] == "person"
    assert ds[0][1][0].tolist() == [0, 1, 15, 255]


def test_voc_train_aug_uses_sbd_masks(tmp_path):
    ds = load(make_voc(tmp_path, aug=True), "voc", split="train_aug")
    assert ds.samples[0].mask.parent.name == "SegmentationClassAug"
    assert ds[0][1][0].tolist() == [20, 0, 0, 0]


def test_voc_train_aug_missing_explains_sbd(tmp_path):
    with pytest.raises(DatasetError, match="train_aug needs SBD"):
        load(make_voc(tmp_path, aug=False), "voc", split="train_aug")


# --- transforms ------------------------------------------------------------------------------------


def test_train_transform_crops_pads_with_ignore_and_is_seeded():
    image, mask = rgb(10, 12), np.ones((10, 12), np.uint8)
    t = TrainTransform((24, 20), (1.0, 1.0))
    x, y = t(image, mask, np.random.default_rng(0))
    assert x.shape == (3, 24, 20) and y.shape == (24, 20)
    assert (y == 1).sum() == 10 * 12 and (y == 255).sum() == 24 * 20 - 120  # padding is ignore
    again = t(image, mask, np.random.default_rng(0))
    assert torch.equal(x, again[0]) and torch.equal(y, again[1])


def test_train_transform_scales_and_flips_image_and_mask_together():
    rng = np.random.default_rng(3)
    mask = np.kron(rng.random((4, 5)) > 0.5, np.ones((8, 8))).astype(np.uint8)  # 8x8 blocks
    image = np.repeat(mask[..., None] * 200, 3, axis=2).astype(np.uint8)
    t = TrainTransform((16, 16), (0.5, 2.0))
    for seed in range(20):
        x, y = t(image, mask, np.random.default_rng(seed))
        bright = x[0] > 0  # normalised 100/255 is about 0
        valid = y != 255
        agreement = (bright[valid] == (y[valid] == 1)).float().mean().item()
        assert agreement > 0.9  # only bilinear edge pixels may differ


def test_pad_collate_pads_masks_with_ignore():
    images, masks = pad_collate(
        [
            (torch.ones(3, 2, 3), torch.zeros(2, 3, dtype=torch.int64)),
            (torch.ones(3, 4, 2), torch.ones(4, 2, dtype=torch.int64)),
        ]
    )
    assert images.shape == (2, 3, 4, 3) and masks.shape == (2, 4, 3)
    assert masks[0, 3, 0] == 255 and masks[1, 0, 2] == 255 and images[0, :, 3].abs().sum() == 0


# --- the embedded synthetic dataset -----------------------------------------------------------------


def test_synthetic_is_deterministic_and_uses_every_class():
    a = render(np.random.default_rng([0, 0, 5]), 48, 64)
    b = render(np.random.default_rng([0, 0, 5]), 48, 64)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    seen = set()
    for i in range(40):
        seen |= set(np.unique(render(np.random.default_rng([0, 0, i]), 48, 64)[1]).tolist())
    assert seen == set(range(len(CLASS_NAMES)))


def test_synthetic_colour_does_not_give_the_class_away():
    """The mean colour of a class is near the mean colour of the others (colours are random)."""
    colours = {c: [] for c in range(1, len(CLASS_NAMES))}
    for i in range(60):
        image, mask = render(np.random.default_rng([0, 0, i]), 48, 64)
        for c in colours:
            if (mask == c).any():
                colours[c].append(image[mask == c].mean(0))
    means = np.array([np.mean(v, 0) for v in colours.values()])
    assert np.abs(means - means.mean(0)).max() < 40


def test_synthetic_written_in_folder_format(synthetic_root):
    ds = load(synthetic_root, split="val")
    ds.verify()
    assert len(ds) == 4 and ds.classes.names == CLASS_NAMES
    assert ds[0][0].shape == (3, 40, 56)
    assert len(load(synthetic_root, split="test")) == 3  # the held-out reporting split
    before = (synthetic_root / "images" / "val_00000.png").stat().st_mtime_ns
    generate(synthetic_root, num_train=16, num_val=4, height=40, width=56, seed=1, num_test=3)  # no rewrite
    assert (synthetic_root / "images" / "val_00000.png").stat().st_mtime_ns == before


def test_synthetic_rewrites_a_dataset_from_an_older_generator(tmp_path):
    import json

    generate(tmp_path, num_train=2, num_val=1, height=16, width=16, num_test=1)
    stamp = tmp_path / "synthetic.json"
    stamp.write_text(json.dumps({**json.loads(stamp.read_text()), "format": 1}))
    (tmp_path / "classes.json").write_text("{}")
    generate(tmp_path, num_train=2, num_val=1, height=16, width=16, num_test=1)
    assert json.loads((tmp_path / "classes.json").read_text())["names"] == CLASS_NAMES


def test_synthetic_splits_do_not_depend_on_each_other(tmp_path):
    """Adding the test split (or resizing one split) leaves the images of the others as they were."""
    generate(tmp_path / "a", num_train=2, num_val=2, height=16, width=16, num_test=0)
    generate(tmp_path / "b", num_train=3, num_val=2, height=16, width=16, num_test=2)
    for name in ("train_00001", "val_00001"):
        a, b = (np.asarray(Image.open(tmp_path / r / "images" / f"{name}.png")) for r in "ab")
        np.testing.assert_array_equal(a, b)


def test_synthetic_in_several_processes_writes_the_same_files(tmp_path):
    args = dict(num_train=5, num_val=2, height=24, width=32, num_test=2)
    generate(tmp_path / "one", **args)
    generate(tmp_path / "two", **args, jobs=2)
    files = sorted(p.relative_to(tmp_path / "one") for p in (tmp_path / "one").rglob("*") if p.is_file())
    assert len(files) == 2 * 9 + 3 + 2  # images and masks, split lists, classes.json and the stamp
    for f in files:
        assert (tmp_path / "one" / f).read_bytes() == (tmp_path / "two" / f).read_bytes(), f


def test_base_size_scales_from_the_fitted_image(monkeypatch):
    """mmseg's RandomResize: the image is fitted to (long, short) = (2048, 512), then scaled by the ratio."""
    sizes, resize = [], Image.Image.resize
    monkeypatch.setattr(Image.Image, "resize", lambda self, size, *a, **k: sizes.append(size) or resize(self, size, *a))
    t = TrainTransform((4, 4), (2.0, 2.0), base_size=(2048, 512))
    t(rgb(1000, 3000), np.zeros((1000, 3000), np.uint8), np.random.default_rng(0))
    assert sizes[0] == (2 * 1536, 2 * 512)  # the short side binds: 1000 -> 512, then x2
    assert fit_scale(500, 3000, (2048, 512)) == pytest.approx(2048 / 3000)  # a panorama: the long side binds
    assert fit_scale(375, 500, (512, 2048)) == pytest.approx(512 / 375)  # the order of the pair does not matter


def test_cat_max_ratio_avoids_crops_of_one_class():
    mask = np.zeros((64, 64), np.uint8)
    mask[:, 48:] = 1  # class 1 only in the right quarter
    image = rgb(64, 64)
    plain, balanced = TrainTransform((16, 16), (1.0, 1.0)), TrainTransform((16, 16), (1.0, 1.0), cat_max_ratio=0.75)

    def mixed(t):
        crops = [t(image, mask, np.random.default_rng(seed))[1] for seed in range(40)]
        return np.mean([len(torch.unique(y)) > 1 for y in crops])

    assert mixed(balanced) > mixed(plain) + 0.3


def test_photometric_distortion_changes_colour_only_and_is_seeded():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)
    outputs = [photometric_distortion(image, np.random.default_rng(seed)) for seed in range(8)]
    assert all(o.shape == image.shape and o.dtype == np.uint8 for o in outputs)
    assert sum(not np.array_equal(o, image) for o in outputs) >= 6  # each step has probability 0.5
    assert np.array_equal(photometric_distortion(image, np.random.default_rng(3)), outputs[3])
    t = TrainTransform((20, 30), (1.0, 1.0), photometric=True)
    x1, y1 = t(image, np.ones((20, 30), np.uint8), np.random.default_rng(5))
    x2, y2 = t(image, np.ones((20, 30), np.uint8), np.random.default_rng(5))
    assert torch.equal(x1, x2) and torch.equal(y1, y2) and (y1 == 1).all()  # masks untouched


# --- ADE20K ----------------------------------------------------------------------------------------


def make_ade20k(root: Path) -> Path:
    ade = root / "ADEChallengeData2016"
    for split in ("training", "validation"):
        for name, mask in (("ADE_a", np.zeros((2, 3), np.uint8)), ("ADE_b", np.array([[0, 1, 150], [12, 255, 3]]))):
            (ade / "images" / split).mkdir(parents=True, exist_ok=True)
            Image.fromarray(rgb(2, 3)).save(ade / "images" / split / f"{name}.jpg")
            save_png(ade / "annotations" / split / f"{name}.png", mask.astype(np.uint8))
    return root


def test_ade20k_reduces_the_zero_label(tmp_path):
    ds = load(make_ade20k(tmp_path), "ade20k", split="validation")  # the archive's parent is accepted
    assert len(ds) == 2 and ds.classes.num_classes == 150 and ds.classes.names[:3] == ["wall", "building", "sky"]
    assert ds[1][1].tolist() == [[255, 0, 149], [11, 255, 2]]  # 0 "other" -> ignore, k -> k - 1


def test_ade20k_label_above_150_is_rejected_and_missing_folders_are_named(tmp_path):
    root = make_ade20k(tmp_path) / "ADEChallengeData2016"
    save_png(root / "annotations" / "training" / "ADE_a.png", np.full((2, 3), 151, np.uint8))
    with pytest.raises(DatasetError, match=r"label values \[150\].*ADE_a\.png"):
        load(root, "ade20k", split="training").verify()
    with pytest.raises(DatasetError, match=r"ADE20K images \(ADEChallengeData2016/images/<split>\) not found: .*test"):
        load(root, "ade20k", split="test")
