from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from serve.images import ImageError, read_image, to_rgb
from tests.serve.conftest import bad_inputs, convertible_inputs


def test_every_bad_input_is_an_image_error_naming_the_file(tmp_path):
    messages = {}
    for kind, path in bad_inputs(tmp_path).items():
        with pytest.raises(ImageError) as e:
            read_image(path, max_pixels=1_000_000)
        assert path.name in str(e.value), kind
        messages[kind] = str(e.value)
    assert "empty" in messages["empty"]
    assert "not an image" in messages["not an image"]
    assert "truncated" in messages["truncated"]
    assert "too small" in messages["1x1"]
    assert "1,000,000" in messages["over the pixel limit"]


def test_the_pixel_limit_is_checked_before_decoding(tmp_path):
    # Header says 4000x4000; the data is cut after 100 bytes: a decode would fail as truncated.
    path = tmp_path / "big.png"
    Image.new("RGB", (4000, 4000)).save(path)
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(ImageError, match="over this server's limit"):
        read_image(path, max_pixels=1_000_000)


def test_modes_become_rgb_and_exif_rotation_is_applied(tmp_path):
    files = convertible_inputs(tmp_path)
    for kind, path in files.items():
        image = read_image(path)
        assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3, kind
    assert read_image(files["exif-rotated"]).shape == (64, 48, 3)
    assert read_image(files["grayscale"]).shape == (48, 64, 3)


def test_16_bit_images_are_scaled_not_clipped():
    deep = Image.fromarray(np.array([[0, 32768, 65535]], dtype=np.uint16))
    assert to_rgb(deep)[0, :, 0].tolist() == [0, 128, 255]


def test_rgba_drops_alpha_and_keeps_colour():
    rgba = np.zeros((2, 2, 4), dtype=np.uint8)
    rgba[..., 0] = 200
    assert to_rgb(Image.fromarray(rgba))[0, 0].tolist() == [200, 0, 0]
