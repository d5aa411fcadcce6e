"""Tests for the detector families beyond `input`: activations, safetynet, mahalanobis, squeeze and
ensemble, on digits with the session's reference CNN and FGSM / PGD (eps 0.3) adversarials.

The digits training split is cut in three: members are fitted on FIT, calibrated on the clean images
of CAL, and ensembles are stacked on STACK; every AUROC is measured on the test split (clean vs
successful adversarial), which no detector has seen.
"""
from __future__ import annotations

import zipfile
from pathlib import Path

import keras
import numpy as np
import pytest
from scipy.ndimage import median_filter
from sklearn.metrics import roc_auc_score
from sklearn.svm import SVC

from attacks import FGSM, PGD
from detector import InputDetector, load_detector
from detector.activations import ActivationDetector
from detector.base import MANIFEST
from detector.ensemble import EnsembleDetector
from detector.mahalanobis import MahalanobisDetector, min_distance
from detector.margin import MarginDetector
from detector.odds import OddsDetector
from detector.squeeze import SqueezeDetector, bit_depth, graph_squeezer, median, parse_squeezer
from detector.svm import SafetyNetDetector, rbf_decision_function, squared_distances

EPS = 0.3
FIT, CAL, STACK = slice(0, 900), slice(900, 1150), slice(1150, None)
# held-out AUROC floors, set below what was measured (activations, safetynet 1.0; mahalanobis 0.99;
# squeeze with 1-bit depth 0.83 FGSM / 0.77 PGD: 8 x 8 digits leave squeezing little to work with)
FLOORS = {"activations": 0.95, "safetynet": 0.95, "mahalanobis": 0.95, "squeeze": 0.7}
MAKERS = {
    "activations": lambda clf: ActivationDetector(clf, epochs=10),
    "safetynet": lambda clf: SafetyNetDetector(clf),
    "mahalanobis": lambda clf: MahalanobisDetector(clf),
    "squeeze": lambda clf: SqueezeDetector(clf, squeezers=["bit_depth:1"]),
    "margin": lambda clf: MarginDetector(clf),  # not for FGSM / PGD: tests/test_margin.py
    "odds": lambda clf: OddsDetector(clf),  # tests/test_odds.py
}


def load(directory: Path, classifier: keras.Model | None) -> object:
    return load_detector(directory, classifier=classifier)


def auroc(clean: np.ndarray, adversarial: np.ndarray) -> float:
    return float(roc_auc_score(np.r_[np.zeros(len(clean)), np.ones(len(adversarial))], np.r_[clean, adversarial]))


def assert_no_pickle(directory: Path) -> None:
    """Only JSON, .keras archives (JSON + HDF5 weights) and .npz of plain arrays, at any depth."""
    files = [p for p in directory.rglob("*") if p.is_file()]
    assert files
    for path in files:
        assert path.suffix in (".json", ".keras", ".npz"), path
        if path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as data:
                for name in data.files:
                    assert data[name].dtype != object, (path, name)
        if path.suffix == ".keras":
            with zipfile.ZipFile(path) as archive:
                assert set(archive.namelist()) <= {"config.json", "metadata.json", "model.weights.h5"}, path


@pytest.fixture(scope="module")
def adversarial(digits, digits_classifier):
    """x_adv of FGSM and PGD for the training and test splits."""
    out = {}
    for attack in (FGSM(eps=EPS), PGD(eps=EPS)):
        train = attack(digits_classifier, digits.x_train, digits.y_train)
        test = attack(digits_classifier, digits.x_test, digits.y_test)
        assert test.success.mean() > 0.5
        out[attack.name] = (train.x_adv, test.x_adv[test.success])
    return out


def _adversarial_part(adversarial, rows: slice) -> np.ndarray:
    return np.concatenate([train[rows] for train, _ in adversarial.values()])


@pytest.fixture(scope="module")
def fitted(digits, digits_classifier, adversarial):
    detectors = {}
    for name, make in MAKERS.items():
        detector = make(digits_classifier).fit(digits.x_train[FIT], _adversarial_part(adversarial, FIT), verbose=0)
        detectors[name] = detector.calibrate(digits.x_train[CAL], 0.05)
    return detectors


def _held_out_auroc(detector, digits, adversarial) -> dict[str, float]:
    clean = detector.score(digits.x_test)
    return {name: auroc(clean, detector.score(test)) for name, (_, test) in adversarial.items()}


@pytest.mark.parametrize("family", sorted(FLOORS))
def test_family_detects_held_out_adversarials(family, fitted, digits, adversarial, digits_classifier):
    detector = fitted[family]
    assert detector.kind == family
    scores = detector.score(digits.x_test)
    assert scores.dtype == np.float64 and scores.shape == (len(digits.x_test),) and np.isfinite(scores).all()
    for attack, value in _held_out_auroc(detector, digits, adversarial).items():
        assert value > FLOORS[family], (family, attack, value)
    assert detector.calibration.fpr <= 0.05 and detector.calibration.n_clean == 250
    assert detector.predict(digits.x_test).mean() < 0.15  # about 5% on unseen clean images
    assert detector.classifier_fingerprint is not None


@pytest.mark.parametrize("family", sorted(MAKERS))
def test_family_save_load_round_trip(family, fitted, digits, digits_classifier, tmp_path):
    detector = fitted[family]
    detector.save(tmp_path / family)
    assert_no_pickle(tmp_path / family)
    loaded = load(tmp_path / family, digits_classifier)
    assert type(loaded) is type(detector)
    x = np.concatenate([digits.x_test, digits.x_train[:40]])
    np.testing.assert_array_equal(loaded.score(x), detector.score(x))
    assert loaded.get_params() == detector.get_params()
    assert loaded.calibration == detector.calibration
    assert loaded.classifier_fingerprint == detector.classifier_fingerprint
    with pytest.raises(ValueError, match=f"the {family} detector needs the classifier it was trained for"):
        load(tmp_path / family, None)
    other = keras.models.clone_model(digits_classifier)
    other.set_weights([w * 1.01 for w in digits_classifier.get_weights()])
    with pytest.raises(ValueError, match="different classifier"):
        load(tmp_path / family, other)


@pytest.mark.parametrize("family", sorted(MAKERS))
@pytest.mark.parametrize("shape", [(2, 9, 9, 1), (2, 8, 8, 3), (2, 8, 8)])
def test_family_rejects_wrong_image_shape(family, fitted, shape):
    with pytest.raises(ValueError, match="do not fit the classifier's input"):
        fitted[family].score(np.zeros(shape, np.float32))


@pytest.mark.parametrize("family", ["activations", "safetynet", "mahalanobis"])
def test_untrained_family_refuses_to_score_or_save(family, digits_classifier, tmp_path):
    """The fitted state is checked once, in the base class, for scoring, saving and fused graphs."""
    detector = MAKERS[family](digits_classifier)
    message = f"the {detector.kind} detector is untrained: call fit"
    with pytest.raises(ValueError, match=message):
        detector.score(np.zeros((2, 8, 8, 1), np.float32))
    with pytest.raises(ValueError, match=message):
        detector.save(tmp_path / "d")
    assert not (tmp_path / "d").exists()


@pytest.mark.parametrize("family", sorted(MAKERS))
def test_fit_checks_the_training_pair_before_training(family, digits_classifier):
    """Every family's fit goes through the base class: wrong shapes or too few images are refused
    with the same message before anything is trained."""
    detector = MAKERS[family](digits_classifier)
    with pytest.raises(ValueError, match=r"images of shape \(9, 9, 1\) do not fit the classifier's input \(8, 8, 1\)"):
        detector.fit(np.zeros((4, 9, 9, 1), np.float32), np.zeros((4, 9, 9, 1), np.float32))
    with pytest.raises(ValueError, match="fitting needs at least 2 clean and 2 adversarial images, got 4 and 1"):
        detector.fit(np.zeros((4, 8, 8, 1), np.float32), np.zeros((1, 8, 8, 1), np.float32))


SQUEEZER_SPECS = r"squeezers must be None or a non-empty list of squeezer specs: .*, got "


@pytest.mark.parametrize(
    ("cls", "options", "message"),
    [
        (ActivationDetector, {"auto_layers": 0}, "auto_layers must be an integer >= 1, got 0"),
        (ActivationDetector, {"epochs": 0}, "epochs must be an integer >= 1, got 0"),
        (ActivationDetector, {"validation_fraction": 0.5}, r"validation_fraction must be a number in \(0, 0.5\), got 0.5"),
        (ActivationDetector, {"layers": "dense"}, "layers must be None or a non-empty list of distinct layer names, got 'dense'"),
        (SafetyNetDetector, {"quantiles": (0.5, 0.2)}, r"quantiles must be increasing values strictly between 0 and 1, got \(0.5, 0.2\)"),
        (SafetyNetDetector, {"quantiles": (1.0,)}, r"quantiles must be increasing values strictly between 0 and 1, got \(1.0,\)"),
        (SafetyNetDetector, {"C": 0.0}, "C must be a finite number > 0, got 0.0"),
        (SafetyNetDetector, {"gamma": "wide"}, r"gamma must be one of \['auto', 'scale'\] or a finite number > 0, got 'wide'"),
        (SafetyNetDetector, {"max_train": 2}, "max_train must be an integer >= 4, got 2"),
        (MahalanobisDetector, {"noise": -0.1}, "noise must be a finite number >= 0, got -0.1"),
        (MahalanobisDetector, {"covariance": "oas"}, r"covariance must be one of \['empirical', 'ledoit_wolf'\], got 'oas'"),
        (MahalanobisDetector, {"C": -1.0}, "C must be a finite number > 0, got -1.0"),
        (SqueezeDetector, {"squeezers": []}, SQUEEZER_SPECS + r"\[\]"),
        (SqueezeDetector, {"squeezers": ["median:4"]}, SQUEEZER_SPECS + r"\['median:4'\]"),
        (SqueezeDetector, {"squeezers": ["bit_depth:0"]}, SQUEEZER_SPECS + r"\['bit_depth:0'\]"),
        (SqueezeDetector, {"squeezers": ["blur:3"]}, SQUEEZER_SPECS + r"\['blur:3'\]"),
        (SqueezeDetector, {"squeezers": ["nl_means:13:3"]}, SQUEEZER_SPECS + r"\['nl_means:13:3'\]"),
        (SqueezeDetector, {"batch_size": 0}, "batch_size must be an integer >= 1, got 0"),
    ],
)
def test_families_reject_bad_hyperparameters(cls, options, message, digits_classifier):
    with pytest.raises(ValueError, match=f"^{cls.__name__}: {message}$"):
        cls(digits_classifier, **options)


def test_a_squeezer_window_larger_than_the_image_is_refused(digits_classifier):
    with pytest.raises(ValueError, match=r"squeezer 'median:9': a 9 x 9 window is larger than the \(8, 8\) image"):
        SqueezeDetector(digits_classifier, squeezers=["median:9"])


# --------------------------------------------------------------------------------------------
# activations: any functional or Sequential model, layers by name or automatic
# --------------------------------------------------------------------------------------------


def test_activations_unknown_layer_lists_available_layers(digits_classifier):
    with pytest.raises(ValueError, match="unknown layer.*no_such_layer.*available layers.*" + digits_classifier.layers[1].name):
        ActivationDetector(digits_classifier, layers=["no_such_layer"])


def test_activations_automatic_layers_skip_logits_and_dropout(fitted, digits_classifier):
    names = fitted["activations"].layers
    by_name = {layer.name: layer for layer in digits_classifier.layers}
    assert len(names) == 2 and digits_classifier.layers[-1].name not in names
    assert all(isinstance(by_name[n], (keras.layers.Conv2D, keras.layers.Dense, keras.layers.MaxPooling2D)) for n in names)


@pytest.fixture(scope="module")
def sequential_classifier(digits) -> keras.Model:
    """A Sequential CNN without an Input layer, built by calling it once."""
    keras.utils.set_random_seed(1)
    model = keras.Sequential([
        keras.layers.Conv2D(16, 3, padding="same", activation="relu"), keras.layers.MaxPooling2D(),
        keras.layers.Flatten(), keras.layers.Dense(64, activation="relu"), keras.layers.Dense(10),
    ])
    model(digits.x_train[:1])
    model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(digits.x_train, digits.y_train, epochs=15, batch_size=64, verbose=0)
    return model


@pytest.mark.parametrize("named", [True, False], ids=["named", "automatic"])
def test_activations_on_sequential_classifier(sequential_classifier, digits, named, tmp_path):
    layers = [sequential_classifier.layers[1].name, sequential_classifier.layers[3].name] if named else None
    x_adv = PGD(eps=EPS)(sequential_classifier, digits.x_train, digits.y_train).x_adv
    test = PGD(eps=EPS)(sequential_classifier, digits.x_test, digits.y_test)
    detector = ActivationDetector(sequential_classifier, layers=layers, epochs=8)
    if named:
        assert detector.layers == layers
    detector.fit(digits.x_train[FIT], x_adv[FIT], verbose=0)
    assert auroc(detector.score(digits.x_test), detector.score(test.x_adv[test.success])) > 0.9
    detector.save(tmp_path / "d")
    loaded = load(tmp_path / "d", sequential_classifier)
    np.testing.assert_array_equal(loaded.score(digits.x_test), detector.score(digits.x_test))


def test_activations_named_layers_on_functional_classifier(digits_classifier, digits, adversarial):
    name = next(layer.name for layer in digits_classifier.layers if isinstance(layer, keras.layers.Dense))
    detector = ActivationDetector(digits_classifier, layers=[name], epochs=10)
    detector.fit(digits.x_train[FIT], _adversarial_part(adversarial, FIT), verbose=0)
    assert detector.model.inputs[0].shape[1:] == digits_classifier.get_layer(name).output.shape[1:]
    assert min(_held_out_auroc(detector, digits, adversarial).values()) > 0.9


def test_unbuilt_sequential_classifier_is_refused():
    model = keras.Sequential([keras.layers.Flatten(), keras.layers.Dense(10)])
    with pytest.raises(ValueError, match="no defined input"):
        ActivationDetector(model)


# --------------------------------------------------------------------------------------------
# safetynet: codes and the numpy RBF decision function
# --------------------------------------------------------------------------------------------


def test_rbf_decision_function_matches_sklearn():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 7))
    y = (x[:, 0] * x[:, 1] + 0.3 * rng.normal(size=300) > 0).astype(int)
    for gamma in (0.05, 0.7):
        svm = SVC(kernel="rbf", gamma=gamma, C=2.0, tol=1e-8).fit(x, y)
        ours = rbf_decision_function(x[:50], svm.support_vectors_, svm.dual_coef_, svm.intercept_, gamma, batch_size=16)
        np.testing.assert_allclose(ours, svm.decision_function(x[:50]), rtol=1e-9, atol=1e-9)
        # the precomputed-kernel fit that SafetyNetDetector uses is the same SVM (up to solver tolerance)
        kernel_svm = SVC(kernel="precomputed", C=2.0, tol=1e-8).fit(np.exp(-gamma * squared_distances(x, x)), y)
        again = rbf_decision_function(x[:50], x[kernel_svm.support_], kernel_svm.dual_coef_, kernel_svm.intercept_, gamma)
        np.testing.assert_allclose(again, ours, rtol=1e-6, atol=1e-6)


def test_safetynet_codes_are_discrete_and_fit_is_bounded(fitted, digits, digits_classifier, adversarial):
    detector = fitted["safetynet"]
    codes = detector.codes(digits.x_test)
    assert set(np.unique(codes)) <= {0.0, 1.0, 2.0} and {0.0, 1.0, 2.0} <= set(np.unique(codes))
    small = SafetyNetDetector(digits_classifier, max_train=100).fit(digits.x_train[FIT], _adversarial_part(adversarial, FIT), verbose=0)
    assert len(small.arrays["support_vectors"]) <= 100


# --------------------------------------------------------------------------------------------
# mahalanobis
# --------------------------------------------------------------------------------------------


def test_min_distance_matches_brute_force():
    rng = np.random.default_rng(1)
    f, means = rng.normal(size=(20, 5)), rng.normal(size=(4, 5))
    a = rng.normal(size=(5, 5))
    precision = a @ a.T + np.eye(5)
    brute = np.array([min((row - m) @ precision @ (row - m) for m in means) for row in f])
    np.testing.assert_allclose(min_distance(f, means, precision), brute, rtol=1e-10)


def test_mahalanobis_labels_and_input_noise(digits, digits_classifier, adversarial, tmp_path):
    x_adv = _adversarial_part(adversarial, FIT)
    with pytest.raises(ValueError, match="y_clean"):
        MahalanobisDetector(digits_classifier).fit(digits.x_train[FIT], x_adv, y_clean=digits.y_train[:5])
    detector = MahalanobisDetector(digits_classifier, noise=0.01).fit(digits.x_train[FIT], x_adv, y_clean=digits.y_train[FIT])
    assert detector.arrays["means_0"].shape[0] == 10
    assert min(_held_out_auroc(detector, digits, adversarial).values()) > 0.9
    detector.save(tmp_path / "d")
    assert_no_pickle(tmp_path / "d")
    np.testing.assert_array_equal(load(tmp_path / "d", digits_classifier).score(digits.x_test), detector.score(digits.x_test))


# --------------------------------------------------------------------------------------------
# squeeze
# --------------------------------------------------------------------------------------------


def test_squeezers_do_what_they_say():
    rng = np.random.default_rng(2)
    x = rng.uniform(size=(3, 12, 12, 1)).astype(np.float32)
    np.testing.assert_array_equal(bit_depth(x, 1), (x >= 0.5).astype(np.float32))
    assert len(np.unique(bit_depth(x, 3))) <= 8
    np.testing.assert_allclose(median(x, 3), median_filter(x, size=(1, 3, 3, 1), mode="nearest"), atol=1e-7)
    # 2 x 2 (Xu et al.'s CIFAR-10 squeezer): the upper middle of each pixel with its upper-left neighbours
    padded = np.pad(x, ((0, 0), (1, 0), (1, 0), (0, 0)), mode="edge")
    window = np.stack([padded[:, :-1, :-1], padded[:, :-1, 1:], padded[:, 1:, :-1], padded[:, 1:, 1:]])
    np.testing.assert_array_equal(median(x, 2), np.sort(window, axis=0)[2])
    for size in (2, 3):  # the scoring graph's keras.ops version (white-box attacks) squeezes the same
        np.testing.assert_allclose(keras.ops.convert_to_numpy(graph_squeezer(f"median:{size}")(x)), median(x, size), atol=1e-7)
    colour = rng.uniform(size=(2, 16, 16, 3)).astype(np.float32)
    assert parse_squeezer("nl_means:13:3:2")(colour).shape == colour.shape


def test_squeeze_defaults_by_channel_count_and_zero_score_on_fixed_points(digits, digits_classifier):
    assert SqueezeDetector(digits_classifier).squeezers == ["bit_depth:1", "median:3"]
    colour = keras.Sequential([keras.Input((16, 16, 3)), keras.layers.Flatten(), keras.layers.Dense(4)])
    assert SqueezeDetector(colour).squeezers == ["bit_depth:5", "median:2", "nl_means:13:3:2"]
    detector = SqueezeDetector(digits_classifier, squeezers=["bit_depth:1"]).fit(digits.x_train[:10], digits.x_train[10:20])
    binary = (digits.x_test[:20] >= 0.5).astype(np.float32)  # unchanged by 1-bit squeezing
    np.testing.assert_array_equal(detector.score(binary), np.zeros(20))
    assert (detector.score(digits.x_test) >= 0).all() and (detector.score(digits.x_test) <= 2).all()


# --------------------------------------------------------------------------------------------
# ensemble
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("rule", ["logistic", "max"])
@pytest.mark.parametrize("members", [("activations", "mahalanobis"), ("mahalanobis", "squeeze")])
def test_ensemble_is_at_least_as_good_as_its_worst_member(members, rule, fitted, digits, digits_classifier, adversarial, tmp_path):
    ensemble = EnsembleDetector([fitted[m] for m in members], rule=rule)
    ensemble.fit(digits.x_train[STACK], _adversarial_part(adversarial, STACK)).calibrate(digits.x_train[CAL], 0.05)
    ours = _held_out_auroc(ensemble, digits, adversarial)
    for attack, value in ours.items():
        worst = min(_held_out_auroc(fitted[m], digits, adversarial)[attack] for m in members)
        assert value >= worst - 1e-9, (attack, value, worst)
    ensemble.save(tmp_path / "e")
    assert_no_pickle(tmp_path / "e")
    assert sorted(p.name for p in (tmp_path / "e").iterdir()) == sorted([MANIFEST, "member_0", "member_1", "stacker.npz"])
    loaded = load(tmp_path / "e", digits_classifier)
    assert [m.kind for m in loaded.members] == list(members)
    assert loaded.get_params() == ensemble.get_params()
    np.testing.assert_array_equal(loaded.score(digits.x_test), ensemble.score(digits.x_test))
    with pytest.raises(ValueError, match="needs the classifier it was trained for"):
        load(tmp_path / "e", None)


def test_ensemble_mixes_families_with_and_without_a_classifier(fitted, digits, digits_classifier, adversarial, tmp_path):
    """An `input` member (no classifier) beside a `squeeze` member: loading hands the classifier to
    the member that needs it only."""
    member = InputDetector(epochs=2).fit(digits.x_train[FIT], _adversarial_part(adversarial, FIT), verbose=0)
    ensemble = EnsembleDetector([member, fitted["squeeze"]]).fit(digits.x_train[STACK], _adversarial_part(adversarial, STACK), verbose=0)
    ensemble.save(tmp_path / "e")
    assert_no_pickle(tmp_path / "e")
    loaded = load(tmp_path / "e", digits_classifier)
    assert [m.kind for m in loaded.members] == ["input", "squeeze"]
    np.testing.assert_array_equal(loaded.score(digits.x_test), ensemble.score(digits.x_test))


def test_ensemble_needs_two_fitted_members(fitted):
    with pytest.raises(ValueError, match="at least 2"):
        EnsembleDetector([fitted["squeeze"]])
    with pytest.raises(ValueError, match="the ensemble detector is untrained"):
        EnsembleDetector([fitted["squeeze"], fitted["mahalanobis"]]).score(np.zeros((2, 8, 8, 1), np.float32))
