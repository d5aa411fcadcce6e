"""Benign corruptions (JPEG, noise, shifts, resizing) and the clean FPR under them."""
from __future__ import annotations

import numpy as np
import pytest
from doubles import SyntheticDetector

from attacks import FGSM
from detector.benign_shift import AUGMENTATIONS, BENIGN_SHIFTS, augment_benign, jpeg, shift, shifted_fprs
from detector.evaluation import evaluate, format_table
from detector.report import markdown


class OffTheDigitsGrid(SyntheticDetector):
    """How far pixels lie from the 17 grey levels of scikit-learn's digits (multiples of 1/16): 0 on
    every clean digit and after whole-pixel shifts, above 0 after noise, JPEG or interpolation."""

    def _score(self, x: np.ndarray) -> np.ndarray:
        levels = np.asarray(x, np.float64) * 16.0
        return np.abs(levels - np.round(levels)).reshape(len(x), -1).max(axis=1) - 1e-3


@pytest.fixture(scope="module")
def colour() -> np.ndarray:
    """Smooth 16x16 colour images (gradients), where JPEG at quality 90 changes little."""
    ramp = np.linspace(0.1, 0.9, 16, dtype=np.float32)
    base = np.stack([ramp[None, :].repeat(16, 0), ramp[:, None].repeat(16, 1), 0.5 * np.ones((16, 16), np.float32)], -1)
    return np.stack([np.clip(base * s, 0, 1) for s in (0.6, 0.8, 1.0, 1.1)]).astype(np.float32)


@pytest.mark.parametrize("name", list(BENIGN_SHIFTS))
def test_each_shift_keeps_shape_and_range_and_changes_the_images(name, digits, colour):
    for x in (digits.x_test[:32], colour):
        shifted = BENIGN_SHIFTS[name](x, np.random.default_rng(0))
        assert shifted.shape == x.shape and shifted.dtype == x.dtype
        assert shifted.min() >= 0.0 and shifted.max() <= 1.0
        change = np.abs(shifted - x).mean()
        assert 0.0 < change < 0.4, (name, change)  # a 1-2 px shift of an 8x8 digit moves a lot of ink


def test_jpeg_is_deterministic_and_keeps_colours_in_their_channels(colour):
    first, second = jpeg(colour, np.random.default_rng(0)), jpeg(colour, np.random.default_rng(1))
    np.testing.assert_array_equal(first, second)
    # a red/green/blue swap would move the channel means far apart
    np.testing.assert_allclose(first.mean(axis=(0, 1, 2)), colour.mean(axis=(0, 1, 2)), atol=0.02)


def test_shift_moves_the_content_by_whole_pixels(digits):
    x = digits.x_test[:16]
    moved = shift(x, np.random.default_rng(3), 1)
    for image, after in zip(x, moved, strict=True):
        matches = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if (dy, dx) != (0, 0)
                   and np.allclose(np.roll(image, (dy, dx), axis=(0, 1))[1:-1, 1:-1], after[1:-1, 1:-1])]
        assert matches, "each image is its own copy moved by one pixel (inside the replicated border)"


def test_augment_benign_appends_one_corrupted_copy_of_each_image_drawn_from_every_shift(digits):
    x = digits.x_test[:200]
    augmented = augment_benign(x, np.random.default_rng(0))
    assert augmented.shape == (400, *x.shape[1:]) and augmented.dtype == np.float32
    np.testing.assert_array_equal(augmented[:200], x)
    copies = augmented[200:]
    assert (np.abs(copies - x).reshape(200, -1).max(axis=1) > 0).all()
    assert copies.min() >= 0.0 and copies.max() <= 1.0
    np.testing.assert_array_equal(augment_benign(x, np.random.default_rng(0)), augmented)  # seeded
    # whole-pixel shifts keep the digits' 1/16 grey levels, noise, JPEG and resizing leave them
    on_grid = OffTheDigitsGrid()._score(copies) < 0
    assert AUGMENTATIONS == tuple(BENIGN_SHIFTS)
    assert 0.2 < on_grid.mean() < 0.5  # 2 of the 6 corruptions
    with pytest.raises(ValueError, match="benign augmentation needs float NHWC images in \\[0, 1\\]"):
        augment_benign(x[0], np.random.default_rng(0))


def test_shifted_fprs_count_the_clean_images_flagged_after_each_shift(digits):
    detector = OffTheDigitsGrid()
    x = digits.x_test[:200]
    detector.calibrate(x, target_fpr=0.05)
    fprs = shifted_fprs(detector, x)
    assert set(fprs) == {*BENIGN_SHIFTS, "max"}
    assert fprs["shift1"] == fprs["shift2"] == 0.0  # whole pixels, still on the grid
    assert fprs["noise0.02"] == fprs["jpeg90"] == fprs["resize0.75"] == fprs["max"] == 1.0
    with pytest.raises(ValueError, match="images in \\[0, 1\\]"):
        shifted_fprs(detector, x * 2.0)


def test_evaluate_reports_the_shifted_fpr_beside_the_nominal_one(digits, digits_classifier):
    detector = OffTheDigitsGrid()
    x, y = digits.x_test[:100], digits.y_test[:100]
    detector.calibrate(x, target_fpr=0.05)
    report = evaluate(digits_classifier, detector, x, y, [FGSM(eps=0.1)], data="d", adaptive=None,
                      taylor_inputs=0, progress=False)
    section = report["detector"]
    assert {"clean_fpr", "clean_fpr_interval", "calibration_fpr"} <= set(section)  # the existing keys stay
    assert section["clean_fpr_shifted"] == shifted_fprs(detector, x)
    assert "clean FPR under benign shifts: jpeg90" in format_table(report)
    assert "| clean FPR under benign shift | jpeg90 1.0000, noise0.02 1.0000, shift1 0.0000" in markdown(report, [])
