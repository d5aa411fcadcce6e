"""The ensemble's "max" rule: each member standardised on clean images, the largest flags. Unlike the
logistic stacker it keeps a member's view of attacks the ensemble was not fitted on."""
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
