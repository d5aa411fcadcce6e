"""The ensemble's "max" rule: each member standardised on clean images (on its worst benign
corruption, when given), the largest flags. Unlike the logistic stacker it keeps a member's view of
attacks the ensemble was not fitted on."""
from __future__ import annotations

import numpy as np
import pytest
from keras import ops

from detector.ensemble import EnsembleDetector
from doubles import SyntheticDetector


class Brightness(SyntheticDetector):
    def _score(self, x: np.ndarray) -> np.ndarray:
        return np.asarray(x, np.float64).reshape(len(x), -1).mean(axis=1)


class Contrast(SyntheticDetector):
    def _score(self, x: np.ndarray) -> np.ndarray:
        return 10.0 * np.asarray(x, np.float64).reshape(len(x), -1).std(axis=1)


@pytest.fixture()
def images() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    clean = rng.uniform(0.3, 0.5, (400, 4, 4, 1)).astype(np.float32)
    return {"clean": clean, "bright": clean + 0.4,  # what both rules are fitted on: only brightness tells it
            "contrasty": np.clip(0.4 + 4.0 * (clean - 0.4), 0.0, 1.0).astype(np.float32)}  # an unseen attack


@pytest.mark.parametrize("rule", ["logistic", "max"])
def test_max_keeps_a_members_view_of_unseen_attacks(rule, images):
    ensemble = EnsembleDetector([Brightness(), Contrast()], rule=rule)
    ensemble.fit(images["clean"][:200], images["bright"][:200], verbose=0).calibrate(images["clean"][200:], 0.05)
    assert ensemble.predict(images["bright"][200:]).mean() == 1.0
    caught = ensemble.predict(images["contrasty"][200:]).mean()
    if rule == "max":
        assert caught == 1.0
    else:  # the stacker weighs contrast by the seen attack, where it tells nothing
        assert caught < 0.5


def test_max_rule_is_the_largest_member_standardised_on_clean_images(images):
    clean = images["clean"]
    ensemble = EnsembleDetector([Brightness(), Contrast()], rule="max").fit(clean, images["bright"], verbose=0)
    members = ensemble.member_scores(clean)
    lower, upper = np.quantile(members, 0.95, axis=0), np.quantile(members, 0.99, axis=0)
    np.testing.assert_allclose(ensemble.score(images["contrasty"]),
                               ((ensemble.member_scores(images["contrasty"]) - lower) / (upper - lower)).max(axis=1))
    graph = ops.convert_to_numpy(ensemble.stack(ops.convert_to_tensor(members.astype(np.float32))))
    np.testing.assert_allclose(graph, ensemble.score(clean), rtol=1e-4, atol=1e-4)


class Corner(SyntheticDetector):
    """Like `margin`: a wide clean bulk and a top it cannot pass (0, where the corner pixel is 0.3)."""

    def _score(self, x: np.ndarray) -> np.ndarray:
        return -10.0 * (np.asarray(x, np.float64)[:, 0, 0, 0] - 0.3)


@pytest.mark.parametrize("n_others", [1, 3])
def test_max_rule_keeps_a_bounded_member_that_alone_sees_an_attack(n_others, images):
    """Images at the bounded member's top, ordinary for the others, are flagged: standardised at the
    median, its top mapped to about 1.1 while the others' tails set the threshold above that."""
    clean = images["clean"]
    at_top = clean.copy()
    at_top[:, 0, 0, 0] = 0.3
    others = [Contrast(), Brightness(), Contrast()][:n_others]
    ensemble = EnsembleDetector([Corner(), *others], rule="max").fit(clean[:200], images["bright"][:200], verbose=0)
    ensemble.calibrate(clean[200:], 0.05)
    assert ensemble.predict(at_top[200:]).mean() > 0.9


def _without_corner_noise(clean: np.ndarray, seed: int) -> np.ndarray:
    """A benign corruption for the test: pixel noise everywhere but the corner pixel `Corner` reads."""
    noise = np.random.default_rng(seed).normal(0.0, 0.1, clean.shape)
    noise[:, 0, 0, 0] = 0.0
    return np.clip(clean + noise, 0.0, 1.0).astype(np.float32)


@pytest.mark.parametrize("anchored", [True, False])
def test_max_rule_scales_down_alone_a_member_that_flags_a_benign_corruption(anchored, images):
    """`Contrast` flags every noisy clean image. Under a 10% cap on noise, anchoring it on clean images
    only lifts the one threshold past `Corner`'s view of an attack (MNIST, retrained on CW-L2: 98.9%
    to 73.4%); anchored on its worst condition, it is scaled down alone and `Corner` keeps its view."""
    clean = images["clean"]
    at_top = clean.copy()
    at_top[:, 0, 0, 0] = 0.3
    fit_noisy, calibration_noisy = _without_corner_noise(clean[:200], 1), _without_corner_noise(clean[200:], 2)
    ensemble = EnsembleDetector([Corner(), Contrast()], rule="max")
    ensemble.fit(clean[:200], images["bright"][:200], verbose=0, **({"shifted": {"noise": fit_noisy}} if anchored else {}))
    ensemble.calibrate(clean[200:], 0.05, shifted={"noise": calibration_noisy}, shifted_fpr=0.10)
    assert ensemble.predict(calibration_noisy).mean() <= 0.10
    caught = ensemble.predict(at_top[200:]).mean()
    assert caught > 0.9 if anchored else caught < 0.1
    if anchored:  # each member's anchors are its quantiles on its worst condition
        worst = np.maximum(*(np.quantile(ensemble.member_scores(x), 0.95, axis=0) for x in (clean[:200], fit_noisy)))
        np.testing.assert_allclose(ensemble.arrays["score_mean"], worst)


def test_only_the_max_rule_takes_benignly_corrupted_anchors(images):
    ensemble = EnsembleDetector([Brightness(), Contrast()], rule="logistic")
    with pytest.raises(ValueError, match="anchor the max rule only"):
        ensemble.fit(images["clean"], images["bright"], shifted={"noise": images["clean"]}, verbose=0)


def test_max_rule_needs_enough_clean_images(images):
    ensemble = EnsembleDetector([Brightness(), Contrast()], rule="max")
    with pytest.raises(ValueError, match="at least 20 clean images"):
        ensemble.fit(images["clean"][:10], images["bright"][:10], verbose=0)
    with pytest.raises(ValueError, match="rule must be one of"):
        EnsembleDetector([Brightness(), Contrast()], rule="mean")


def test_fit_detector_refuses_an_unknown_rule_before_training_anything():
    from training.detector import fit_detector

    with pytest.raises(ValueError, match=r"ensemble_rule must be one of \['logistic', 'max'\], got 'mean'"):
        fit_detector([object()], family="ensemble", ensemble_rule="mean")  # never reaches the datasets


@pytest.mark.parametrize("augment", [True, False])
def test_fit_detector_anchors_the_max_rule_on_the_stacker_images_benign_versions(augment, quickstart_dir, monkeypatch):
    from attacks.dataset import load_adversarial_dataset
    from detector.benign_shift import AUGMENTATIONS
    from foundation.models import load_model
    from training.detector import fit_detector

    seen = {}
    fit = EnsembleDetector._fit

    def spy(self, x_clean, x_adversarial, **kwargs):
        seen.update(n_clean=len(x_clean), shifted=kwargs.get("shifted"))
        return fit(self, x_clean, x_adversarial, **kwargs)

    monkeypatch.setattr(EnsembleDetector, "_fit", spy)
    datasets = [load_adversarial_dataset(quickstart_dir / "datasets" / name) for name in ("fgsm", "pgd")]
    fit_detector(datasets, family="ensemble", classifier=load_model(quickstart_dir / "classifier.keras"),
                 members=["margin", "squeeze"], benign_augmentation=augment, verbose=0)
    if not augment:
        assert seen["shifted"] is None
        return
    # every corruption of each pristine stacker image: the stacker's clean images are those plus one copy each
    assert list(seen["shifted"]) == list(AUGMENTATIONS)
    assert {len(x) for x in seen["shifted"].values()} == {seen["n_clean"] // 2}
