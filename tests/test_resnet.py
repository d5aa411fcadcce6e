"""The reference ResNet (`training.resnet`), its augmented one-cycle training (`training.augmented`)
and `train-classifier --architecture resnet`: tiny widths and few images, seconds."""
from __future__ import annotations

import keras
import numpy as np
import pytest

from foundation.models import load_model, save_model
from safetynet import arguments
from safetynet.cli import main
from training import classifier, resnet
from training.augmented import augmentation, train_augmented, training_wrapper
from training.resnet import build_resnet


@pytest.mark.parametrize("shape", [(8, 8, 1), (32, 32, 3)])
def test_builder_outputs_logits_of_the_right_shape(shape):
    model = build_resnet(shape, 10, width=4)
    logits = model.predict(np.random.default_rng(0).random((5, *shape), dtype=np.float32), verbose=0)
    assert logits.shape == (5, 10) and model.layers[-1].activation is keras.activations.linear
    assert not np.allclose(logits.sum(axis=1), 1.0)  # logits, not probabilities
    assert sum(isinstance(layer, keras.layers.Add) for layer in model.layers) == 2  # ResNet-9: two residual blocks
    assert sum(isinstance(layer, keras.layers.BatchNormalization) for layer in model.layers) == 8


def test_builder_refuses_bad_parameters():
    with pytest.raises(ValueError, match=r"^width must be >= 1, got 0$"):
        build_resnet((32, 32, 3), 10, width=0)
    with pytest.raises(ValueError, match=r"^residual must list one block count >= 0 per stage, got \(\)$"):
        build_resnet((32, 32, 3), 10, residual=())
    with pytest.raises(ValueError, match=r"^unknown architecture 'vgg': expected one of reference, resnet$"):
        classifier.build_classifier("vgg", (32, 32, 3), 10)


def test_build_classifier_seeds_the_initial_weights():
    first, again, other = (classifier.build_classifier("resnet", (8, 8, 1), 10, width=4, seed=seed).get_weights()
                           for seed in (1, 1, 2))
    assert all(np.array_equal(a, b) for a, b in zip(first, again, strict=True))
    assert not all(np.array_equal(a, b) for a, b in zip(first, other, strict=True))


def _shifted(image: np.ndarray, dy: int, dx: int) -> np.ndarray:
    """The image moved by (dy, dx) px with zero fill: zero padding and a crop."""
    height, width = image.shape[:2]
    padded = np.pad(image, ((abs(dy),) * 2, (abs(dx),) * 2, (0, 0)))
    return padded[abs(dy) - dy:abs(dy) - dy + height, abs(dx) - dx:abs(dx) - dx + width]


def test_augmentation_shifts_and_flips_in_training_only():
    x = np.random.default_rng(0).random((16, 32, 32, 3), dtype=np.float32)
    augment = augmentation((32, 32, 3), seed=3)
    trained_on = np.asarray(augment(x, training=True))
    assert np.array_equal(np.asarray(augment(x, training=False)), x)
    moved = 0
    for image, seen in zip(x, trained_on, strict=True):
        candidates = [(flip, dy, dx) for flip in (False, True) for dy in range(-4, 5) for dx in range(-4, 5)
                      if np.array_equal(seen, _shifted(image[:, ::-1] if flip else image, dy, dx))]
        assert candidates, "an augmented image is not a shift of at most 4 px (zero fill) of the image or its mirror"
        moved += (False, 0, 0) not in candidates
    assert moved >= 12 and mirrored(x, trained_on) >= 4
    digits = augmentation((8, 8, 1))
    assert (digits.shift, digits.flip) == (1, False)  # no flips for grayscale digits


def mirrored(x: np.ndarray, seen: np.ndarray) -> int:
    """How many images in `seen` are shifts of the mirrored image and of no unmirrored shift."""
    def shifts(image):
        return [_shifted(image, dy, dx) for dy in range(-4, 5) for dx in range(-4, 5)]
    return sum(any(np.array_equal(s, c) for c in shifts(i[:, ::-1])) and not any(np.array_equal(s, c) for c in shifts(i))
               for i, s in zip(x, seen, strict=True))


def test_augmented_training_changes_weights_not_inference(digits, tmp_path):
    x, y = digits.x_train[:256], digits.y_train[:256]
    trained = {}
    for augment in (False, True):
        keras.utils.set_random_seed(0)
        model = build_resnet(digits.input_shape, 10, width=4)
        trained[augment] = train_augmented(model, x, y, epochs=1, batch_size=64, augment=augment, verbose=0)
    plain, augmented = (trained[flag].get_weights() for flag in (False, True))
    assert any(not np.allclose(a, b) for a, b in zip(plain, augmented, strict=True))  # the batches differed
    model = trained[True]
    logits = model.predict(digits.x_test, verbose=0)
    assert np.array_equal(logits, model.predict(digits.x_test, verbose=0))
    wrapper = training_wrapper(model, augmentation(digits.input_shape))
    assert np.allclose(wrapper.predict(digits.x_test, verbose=0), logits, atol=1e-6)  # augmentation off at inference
    assert model.compiled is False and not any(layer.name == "augmentation" for layer in model.layers)
    path = save_model(model, tmp_path / "resnet.keras")
    assert np.array_equal(load_model(path).predict(digits.x_test, verbose=0), logits)  # load_model: safe_mode
    assert np.array_equal(keras.models.load_model(path, safe_mode=True).predict(digits.x_test, verbose=0), logits)


def test_cli_names_agree_with_the_library():
    assert arguments.ARCHITECTURES == classifier.ARCHITECTURES and arguments.RESNET_WIDTH == resnet.RESNET_WIDTH
    assert arguments.OPTIMIZERS == classifier.OPTIMIZERS


def test_cli_architecture_flags_reach_the_stage(monkeypatch, tmp_path):
    from training import classifier_stage

    seen = []
    monkeypatch.setattr(classifier_stage, "train_classifier_stage", lambda *args, **kwargs: seen.append(kwargs))
    out = str(tmp_path / "m.keras")
    assert main(["train-classifier", "--out", out]) == 0
    assert main(["train-classifier", "--out", out, "--architecture", "resnet", "--width", "8", "--no-augment"]) == 0
    assert main(["train-classifier", "--out", out, "--architecture", "resnet", "--augment"]) == 0
    assert [(kw["architecture"], kw["width"], kw["augment"]) for kw in seen] == [
        ("reference", 64, None), ("resnet", 8, False), ("resnet", 64, True)]


def test_cli_trains_and_saves_a_resnet(tmp_path, capsys):
    out = tmp_path / "resnet.keras"
    assert main(["train-classifier", "--architecture", "resnet", "--width", "4", "--epochs", "1", "--batch-size", "256",
                 "--out", str(out)]) == 0
    assert "training resnet classifier on digits" in capsys.readouterr().out
    model = load_model(out)
    assert model.name == "resnet" and model.output_shape == (None, 10)
    assert not any(layer.name == "augmentation" for layer in model.layers)
    assert main(["train-classifier", "--augment", "--epochs", "1", "--out", str(tmp_path / "ref.keras")]) == 2
    assert "augment is for the resnet architecture's standard training and for adversarial training" in capsys.readouterr().err


def test_stage_augments_resnet_training_unless_told_not(digits, monkeypatch, tmp_path):
    from training import classifier_stage

    seen = []

    def record(model, x, y, *, augment, **kwargs):
        seen.append((model.name, augment, kwargs["epochs"]))
        return model

    monkeypatch.setattr(classifier_stage, "train_augmented", record)
    for augment in (None, False, True):
        classifier_stage.train_classifier_stage(digits, tmp_path / "m.keras", architecture="resnet", width=4, epochs=3,
                                                        augment=augment, log=lambda line: None)
    assert seen == [("resnet", True, 3), ("resnet", False, 3), ("resnet", True, 3)]
    shifted = []

    def adversarial(x, y, classes, attack, *, model, augment, **kwargs):
        shifted.append(augment)
        raise RuntimeError("recorded")

    monkeypatch.setattr(classifier_stage, "train_adversarial", adversarial)
    for augment in (None, True):  # adversarial training shifts only when asked, before each batch's attack
        with pytest.raises(RuntimeError, match="recorded"):
            classifier_stage.train_classifier_stage(digits, tmp_path / "m.keras", architecture="resnet", adversarial="fgsm_rs",
                                                            augment=augment, log=lambda line: None)
    assert shifted == [False, True]
    with pytest.raises(ValueError, match="^augment is for the resnet architecture's standard training and for adversarial "
                       "training: not for the reference CNN's standard training or adversarial_data$"):
        classifier_stage.train_classifier_stage(digits, tmp_path / "m.keras", architecture="resnet", adversarial_data=["x"],
                                                        augment=True, log=lambda line: None)


def test_an_interrupted_resnet_training_resumes_and_other_settings_start_over(digits, monkeypatch, tmp_path):
    """The stage keeps each epoch beside the model file: the same call after an interruption runs only
    the epochs left; a call with other settings starts from the first epoch; the folder goes once the
    model is saved."""
    from training import classifier_stage
    from training.resume import EpochCheckpoint

    class Cut(Exception):
        pass

    out, progress = tmp_path / "m.keras", tmp_path / "m.progress"
    begun: list[int] = []

    def cut_at(epoch_to_cut: int | None):
        def on_epoch_begin(self, epoch, logs=None):
            begun.append(epoch)
            if epoch == epoch_to_cut:
                raise Cut
        return on_epoch_begin

    def train(lines: list[str], epochs: int = 3) -> None:
        classifier_stage.train_classifier_stage(digits, out, architecture="resnet", width=4, epochs=epochs, batch_size=256,
                                                robust_n=0, log=lines.append)

    with monkeypatch.context() as patch:
        patch.setattr(EpochCheckpoint, "on_epoch_begin", cut_at(2), raising=False)
        with pytest.raises(Cut):
            train([])
        assert begun == [0, 1, 2] and (progress / "state.json").is_file() and not out.exists()
        lines: list[str] = []
        patch.setattr(EpochCheckpoint, "on_epoch_begin", cut_at(None), raising=False)
        train(lines)
        assert begun[3:] == [2] and f"resumed from {progress} after epoch 2 (continuing)" in lines
    assert out.is_file() and not progress.exists()

    with monkeypatch.context() as patch:
        patch.setattr(EpochCheckpoint, "on_epoch_begin", cut_at(1), raising=False)
        with pytest.raises(Cut):
            train([])
        begun.clear()
        lines = []
        patch.setattr(EpochCheckpoint, "on_epoch_begin", cut_at(None), raising=False)
        train(lines, epochs=2)
        assert begun == [0, 1]
        assert f"{progress} holds the progress of another run (other settings or data): starting from the first epoch" in lines
