"""The interface every detector family shares, and its one on-disk layout.

A detector directory holds `manifest.json` (family, format version, threshold and the false-positive
rate it achieved, classifier fingerprint, hyper-parameters, training notes, versions) plus the
family's model files (`.keras`, `.npz`). Nothing in it is ever unpickled or evaluated.
"""
from __future__ import annotations

import abc
import os
from pathlib import Path
from typing import Any, ClassVar, Mapping

import keras
import numpy as np
from keras import ops

from detector.calibration import Calibration, calibrate_threshold, capped_calibration, flagged
from detector.features import check_training_pair, image_shape
from foundation.models import logits_model
from foundation.storage import atomic_directory, atomic_write_json, read_json
from foundation.validation import Parameterized

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
FAMILIES: dict[str, type[Detector]] = {}  # kind -> family; the package (detector/__init__.py) lists them


class Detector(Parameterized, abc.ABC):
    """Scores inputs (higher = more suspicious) and flags those above a clean-calibrated threshold.

    Families implement `_fit` and `_score`; `fit` checks the training pair and `score` the fitted
    state here, once for all of them. `learned` names the attribute that holds what `fit` learns
    (None when there is nothing to learn). A family declares its parameters in
    `_parameter_constraints` and stores them with `self._set_params(locals())`; `get_params` gives
    them to the manifest ("hyperparameters") and `_load_files` back to the constructor."""

    kind: ClassVar[str]
    uses_classifier: ClassVar[bool] = False  # families that read the classifier get it again at load time
    learned: ClassVar[str | None] = None

    def __init__(self) -> None:
        self.calibration: Calibration | None = None
        self.classifier_fingerprint: str | None = None
        self.info: dict[str, Any] = {}

    def image_shape(self) -> tuple[int | None, ...] | None:
        """The image shape the detector reads: its classifier's input, when it reads one (None: any,
        as long as clean and adversarial images agree)."""
        classifier = getattr(self, "classifier", None)
        return None if classifier is None else image_shape(classifier)

    def fit(self, x_clean: np.ndarray, x_adversarial: np.ndarray, **fit_params: Any) -> "Detector":
        """Learn to tell clean images (label 0) from adversarial ones (label 1); both sets are checked
        before anything is trained. `fit_params` are the family's (e.g. `verbose`)."""
        expected = self.image_shape()
        if expected is None and np.shape(x_clean)[1:] != np.shape(x_adversarial)[1:]:
            raise ValueError(f"clean images {np.shape(x_clean)[1:]} and adversarial images "
                             f"{np.shape(x_adversarial)[1:]} differ in shape")
        x_clean, x_adversarial = check_training_pair(
            x_clean, x_adversarial, np.shape(x_clean)[1:] if expected is None else expected)
        self._fit(x_clean, x_adversarial, **fit_params)
        return self

    @abc.abstractmethod
    def _fit(self, x_clean: np.ndarray, x_adversarial: np.ndarray, **fit_params: Any) -> None:
        """Learn from the checked training pair."""

    def check_fitted(self) -> None:
        """Raise unless `fit` has run (or the detector was loaded)."""
        if self.learned is not None and getattr(self, self.learned, None) is None:
            raise ValueError(f"the {self.kind} detector is untrained: call fit(...) or load a saved one")

    def score(self, x: np.ndarray) -> np.ndarray:
        """One float per input; higher means more likely adversarial."""
        self.check_fitted()
        return self._score(x)

    @abc.abstractmethod
    def _score(self, x: np.ndarray) -> np.ndarray:
        """The family's score of `x` (the detector is fitted)."""

    def _plain(self, value: Any) -> Any:
        """As `Parameterized._plain`; a member detector is recorded by its kind (it is saved whole
        in a directory of its own)."""
        return value.kind if isinstance(value, Detector) else super()._plain(value)

    @abc.abstractmethod
    def _save_files(self, directory: Path) -> None:
        """Write the family's model files into `directory`."""

    @classmethod
    @abc.abstractmethod
    def _load_files(cls, directory: Path, params: dict[str, Any], **context: Any) -> "Detector":
        """Rebuild the detector from its `params` (`get_params()` as saved) and model files
        (families with `uses_classifier` receive `classifier=` in `context`)."""

    def score_graph(self, images: Any) -> Any | None:
        """The score in keras.ops on a (symbolic) batch of images, equal to `score()` in the forward
        pass; steps without a useful gradient carry their BPDA rule beside them (`gradient`). None
        where the family has no exact graph (OpenCV's non-local means, Lee et al.'s noise step)."""
        return None

    def gradient(self) -> str:
        """How the adaptive attacks differentiate `score_graph`: "white-box" (exactly) or "bpda"."""
        return "white-box"

    def scoring_model(self, classifier: keras.Model | None) -> keras.Model | None:
        """One Keras model from images to {"logits": the classifier's logits, "score": `score()`}
        ("logits" left out when `classifier` is None), so that a guard runs one compiled graph per
        batch and can export it as a single SavedModel; None when `score_graph` is None."""
        self.check_fitted()
        shape = self.image_shape()
        if shape is None or type(self).score_graph is Detector.score_graph:
            return None
        inputs = keras.Input(shape, name="images")
        score = self.score_graph(inputs)
        if score is None:
            return None
        outputs = {"score": ops.reshape(score, (-1,))}
        if classifier is not None:
            outputs = {"logits": logits_model(classifier)(inputs)} | outputs
        return keras.Model(inputs, outputs, name=f"{self.kind}_scoring")

    @property
    def threshold(self) -> float:
        if self.calibration is None:
            raise ValueError("the detector is not calibrated: call calibrate(clean_x, target_fpr) first")
        return self.calibration.threshold

    def calibrate(self, clean_x: np.ndarray, target_fpr: float = 0.05, *,
                  shifted: Mapping[str, np.ndarray] | None = None, shifted_fpr: float = 0.10) -> "Detector":
        """Set the threshold so that about `target_fpr` of clean images are flagged; with `shifted`
        (name -> benignly corrupted clean images), also each corruption's FPR at most `shifted_fpr`
        with 95% confidence (the smallest threshold meeting every cap; `detector.calibration.capped_calibration`)."""
        scores = self.score(clean_x)
        if shifted is None:
            self.calibration = calibrate_threshold(scores, target_fpr)
        else:
            shifted_scores = {name: self.score(x) for name, x in shifted.items()}
            self.calibration = capped_calibration(scores, shifted_scores, target_fpr, shifted_fpr)
        return self

    def predict(self, x: np.ndarray) -> np.ndarray:
        """True where the input is flagged as adversarial (NaN scores are flagged: fail closed)."""
        threshold = self.threshold  # raises before scoring when uncalibrated
        return flagged(self.score(x), threshold)

    def save(self, directory: str | os.PathLike) -> Path:
        """Write the detector directory atomically (an existing one is replaced whole)."""
        self.check_fitted()
        manifest = {
            "format_version": FORMAT_VERSION,
            "kind": self.kind,
            "calibration": None if self.calibration is None else self.calibration.to_json(),
            "classifier_fingerprint": self.classifier_fingerprint,
            "hyperparameters": self.get_params(),
            "info": self.info,
            "versions": {"keras": keras.__version__, "numpy": np.__version__},
        }
        with atomic_directory(directory) as temp:
            self._save_files(temp)
            atomic_write_json(temp / MANIFEST, manifest)
        return Path(directory)

    @staticmethod
    def read_manifest(directory: str | os.PathLike) -> dict[str, Any]:
        directory = Path(directory)
        if not directory.is_dir():
            raise FileNotFoundError(f"detector directory not found: {directory}")
        manifest = read_json(directory / MANIFEST, "detector manifest")
        version = manifest.get("format_version")
        if not isinstance(version, int) or version > FORMAT_VERSION:
            raise ValueError(
                f"detector {directory} has format version {version!r}; this safetynet reads "
                f"versions up to {FORMAT_VERSION} (upgrade safetynet to load it)"
            )
        return manifest

    @classmethod
    def _from_manifest(cls, directory: Path, manifest: dict[str, Any], classifier: keras.Model | None = None) -> "Detector":
        context = {"classifier": classifier} if cls.uses_classifier else {}
        detector = cls._load_files(directory, manifest.get("hyperparameters", {}), **context)
        calibration = manifest.get("calibration")
        detector.calibration = None if calibration is None else Calibration.from_json(calibration)
        detector.classifier_fingerprint = manifest.get("classifier_fingerprint")
        detector.info = manifest.get("info", {})
        return detector


def load_detector(directory: str | os.PathLike, classifier: keras.Model | None = None) -> Detector:
    """Load any detector family from its directory (the manifest says which). Families that read
    the classifier's activations or outputs need `classifier`, checked against their fingerprint.
    Here, beside the interface, so that the families holding members (ensemble, joint) load them
    without importing the package that lists them."""
    manifest = Detector.read_manifest(directory)
    kind = manifest.get("kind")
    if kind not in FAMILIES:
        raise ValueError(f"detector {directory} is of unknown kind {kind!r}; known: {sorted(FAMILIES)}")
    return FAMILIES[kind]._from_manifest(Path(directory), manifest, classifier=classifier)
