"""foundation.images: the one image decoder (bytes and files), and what it refuses."""
from __future__ import annotations

import cv2
import numpy as np
import pytest

from foundation.images import ImageError, decode_image, image_size, read_image

RGB = np.random.default_rng(0).integers(0, 256, (12, 20, 3), np.uint8)


def _encoded(suffix: str, image: np.ndarray) -> bytes:
    ok, data = cv2.imencode(suffix, image)
    assert ok
    return data.tobytes()


def test_channels_modes_give_hwc_in_rgb_order():
    png = _encoded(".png", cv2.cvtColor(RGB, cv2.COLOR_RGB2BGR))
    np.testing.assert_array_equal(decode_image(png, 3), RGB)
    np.testing.assert_array_equal(decode_image(png), RGB)
    grey = decode_image(png, 1)
    assert grey.shape == (12, 20, 1) and grey.dtype == np.uint8
    deep = decode_image(_encoded(".png", np.full((4, 6), 40_000, np.uint16)))
    assert deep.shape == (4, 6, 1) and deep.dtype == np.uint16 and deep.max() == 40_000  # as stored
    assert decode_image(_encoded(".png", np.full((4, 6), 40_000, np.uint16)), 3).dtype == np.uint8
    assert image_size(png) == (20, 12) and image_size(_encoded(".jpg", RGB)) == (20, 12)


@pytest.mark.parametrize("suffix", [".png", ".jpg"])
def test_truncated_files_are_refused_from_bytes_and_from_disk(tmp_path, suffix):
    """Refused by the end check, before OpenCV (which, depending on its build, fills in grey)."""
    data = _encoded(suffix, RGB)
    cut = data[: len(data) - 40]
    with pytest.raises(ImageError, match="the image is truncated"):
        decode_image(cut, 3)
    (tmp_path / f"cut{suffix}").write_bytes(cut)
    with pytest.raises(ImageError, match=rf"image file .*cut\{suffix} is truncated"):
        read_image(tmp_path / f"cut{suffix}")


def test_other_bytes_are_refused_with_their_name():
    with pytest.raises(ImageError, match=r"cannot decode the upload \(corrupt, or not an image\)"):
        decode_image(b"GIF89a-not-really", 3, what="the upload")
    with pytest.raises(ImageError, match="cannot decode the image"):
        decode_image(b"", 3)
    with pytest.raises(ValueError, match="channels must be 1, 3 or None"):
        decode_image(_encoded(".png", RGB), 4)


def test_max_pixels_reads_the_header_and_takes_png_and_jpeg_only():
    png = _encoded(".png", RGB)
    assert decode_image(png, 3, max_pixels=240).shape == (12, 20, 3)
    with pytest.raises(ImageError, match="is 20x12 pixels; at most 239 are accepted"):
        decode_image(png, 3, max_pixels=239)
    with pytest.raises(ImageError, match="is not a PNG or JPEG image"):
        decode_image(_encoded(".bmp", RGB), 3, max_pixels=10**6)
    assert decode_image(_encoded(".bmp", RGB), 3).shape == (12, 20, 3)  # without a limit, any format OpenCV reads
