"""Reading untrusted image files safely: every failure is an `ImageError` that says what is wrong.

The pixel limit is checked from the header, before any pixel is decoded (decompression bombs);
EXIF orientation is applied so photos come out upright; grayscale, RGBA, palette, CMYK and 16-bit
images become 8-bit RGB.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

DEFAULT_MAX_PIXELS = 40_000_000  # 40 MP: larger than any camera photo a demo sees, far below a bomb
MIN_SIDE = 8  # smaller images hold nothing to segment


class ImageError(ValueError):
    """An input that is not a usable image; the message is meant for the end user."""


def read_image(path: str | Path, max_pixels: int = DEFAULT_MAX_PIXELS, name: str | None = None) -> np.ndarray:
    """Decode `path` into an upright RGB uint8 array (H, W, 3). `name`: how to call the file in errors."""
    path = Path(path)
    name = name or path.name
    try:
        size = path.stat().st_size
    except OSError as e:
        raise ImageError(f"{name}: cannot be read ({e.strerror})") from None
    if size == 0:
        raise ImageError(f"{name}: the file is empty")
    try:
        with Image.open(path) as im:
            w, h = im.size
            if w * h > max_pixels:
                raise ImageError(f"{name}: {w}x{h} pixels is over this server's limit of {max_pixels:,} pixels")
            if min(w, h) < MIN_SIDE:
                raise ImageError(f"{name}: {w}x{h} pixels is too small (at least {MIN_SIDE}x{MIN_SIDE})")
            im.load()
            return to_rgb(ImageOps.exif_transpose(im))
    except ImageError:
        raise
    except (UnidentifiedImageError, Image.DecompressionBombError) as e:
        reason = "not an image in a format this server reads" if isinstance(e, UnidentifiedImageError) else str(e)
        raise ImageError(f"{name}: {reason}") from None
    except (OSError, SyntaxError, ValueError) as e:  # what Pillow raises for truncated or corrupt data
        raise ImageError(f"{name}: the image data is truncated or corrupt ({e})") from None


def to_rgb(im: Image.Image) -> np.ndarray:
    """Any Pillow mode to RGB uint8; deep integer modes are scaled down rather than clipped."""
    if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        pixels = np.asarray(im, dtype=np.float64)
        top = 65535.0 if im.mode.startswith("I;16") or pixels.max(initial=0) > 255 else 255.0
        gray = np.clip(pixels / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return np.repeat(gray[..., None], 3, axis=2)
    if im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")  # Pillow warns when palette transparency is dropped directly
    return np.asarray(im.convert("RGB"), dtype=np.uint8)
