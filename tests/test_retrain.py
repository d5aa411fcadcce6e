"""Retraining every family: `input` is fine-tuned (tests/test_cli.py, tests/test_quarantine.py), the
others are fitted again on the new attack and the replayed datasets, with their own members, rule
and calibration, which needs the classifier."""
from __future__ import annotations

import numpy as np

from detector import Detector, load_detector
from detector.metrics import auroc
from foundation.models import load_model
from safetynet.cli import main
from training.detector import split_by_source


def _rows(table: str) -> dict[str, list[float]]:
    return {line.split()[0]: [float(v) for v in line.split()[1:]] for line in table.splitlines()
            if line.startswith(("new:", "replay:"))}


def test_retrain_fits_an_ensemble_again_with_its_members_and_rule(quickstart_dir, tmp_path, capsys):
    from attacks.dataset import load_adversarial_dataset

    model = str(quickstart_dir / "classifier.keras")
    datasets = [str(quickstart_dir / "datasets" / name) for name in ("fgsm", "pgd")]
    detector = tmp_path / "detector"
    assert main(["train-detector", "--family", "ensemble", "--model", model, "--adversarial", *datasets,
                 "--epochs", "4", "--out", str(detector)]) == 0
    assert main(["attack", "--model", model, "--attack", "pgd", "--eps", "1.5", "--norm", "2", "--steps", "10",
                 "--out", str(tmp_path / "pgd-l2")]) == 0
    before = sorted(p.read_bytes() for p in detector.rglob("*") if p.is_file())
    capsys.readouterr()
    # the ensemble reads the classifier: refused without it, one line, nothing written
    assert main(["retrain", "--detector", str(detector), "--adversarial", str(tmp_path / "pgd-l2")]) == 2
    assert "give --model" in capsys.readouterr().err and not (tmp_path / "detector.v2").exists()

    assert main(["retrain", "--detector", str(detector), "--adversarial", str(tmp_path / "pgd-l2"),
                 "--model", model]) == 0
    rows = _rows(capsys.readouterr().out)
    assert sorted(p.read_bytes() for p in detector.rglob("*") if p.is_file()) == before  # the old version is untouched
    classifier = load_model(model)
    old, new = load_detector(detector, classifier), load_detector(tmp_path / "detector.v2", classifier)
    assert (new.kind, new.rule, [m.kind for m in new.members]) == (old.kind, old.rule, [m.kind for m in old.members])
    assert new.calibration.target_fpr == old.calibration.target_fpr and new.calibration.fpr <= 0.05
    assert new.calibration.shifted_fpr == old.calibration.shifted_fpr
    assert new.info["version"] == 2 and [d["attack"]["attack"] for d in new.info["trained_on"]] == ["fgsm", "pgd", "pgd"]
    assert len(new.info["retrained_with_replay"]) == 2
    assert new.members[0].get_params()["epochs"] == 4  # fitted again as the members were
    new_before, new_after = rows["new:pgd:0"]
    assert new_after >= new_before + 0.1, rows  # 0.68 -> 0.88 when measured
    for name, (old_before, old_after) in rows.items():
        if name.startswith("replay:"):
            assert old_after >= old_before - 0.01, name
    # the refit learnt the new attack: its input member separates held-out PGD-L2 images from clean better
    split = split_by_source([load_adversarial_dataset(p) for p in [tmp_path / "pgd-l2", *datasets]], 0.2, 0)

    def separation(member: Detector) -> float:
        return auroc(np.asarray(member.score(split.x_clean_held_out)), np.asarray(member.score(split.adversarial_held_out[0])))

    assert separation(new.members[0]) > separation(old.members[0])  # 0.912 -> 0.927 when measured


def test_retraining_that_loses_detection_says_so_and_why():
    from training.retrain import retrain_lines

    report = {"before": {"new:cw:0": 0.989, "replay:fgsm:1": 1.0}, "after": {"new:cw:0": 0.734, "replay:fgsm:1": 1.0},
              "threshold_before": 1.117, "threshold_after": 1.376, "bound_by_after": "jpeg90+noise0.02"}
    lines = retrain_lines(report, "version 2 saved to d.v2")  # the MNIST ensemble retrained on CW, as measured
    assert lines[1].split() == ["new:cw:0", "0.9890", "0.7340"]
    assert lines[3] == "threshold 1.117 -> 1.376 (set by the cap on jpeg90+noise0.02); version 2 saved to d.v2"
    assert len(lines) == 5 and lines[4].startswith("warning: retraining lowered the held-out TPR of new:cw:0 from "
                                                   "0.9890 to 0.7340; the cap on jpeg90+noise0.02 set the threshold")
    kept = report | {"after": {"new:cw:0": 0.98, "replay:fgsm:1": 1.0}, "bound_by_after": "nominal"}
    lines = retrain_lines(kept, "saved")
    assert len(lines) == 4 and "(set by the target FPR)" in lines[3]  # a point's loss or less: no warning
    lost = kept | {"after": {"new:cw:0": 0.5, "replay:fgsm:1": 1.0}}
    assert retrain_lines(lost, "saved")[-1] == "warning: retraining lowered the held-out TPR of new:cw:0 from 0.9890 to 0.5000"
    few = kept | {"calibration_warnings": ["warning: 20 calibration images bound the FPR under jpeg90 only at 0.139"]}
    assert retrain_lines(few, "saved")[4:] == few["calibration_warnings"]  # the calibration's own warnings follow


def test_retrain_fits_a_joint_detector_again_around_its_member(digits, digits_classifier, tmp_path):
    """The robust guard's rule (`harden`): the member detector and the classifier's logit gap, fitted again."""
    from attacks import FGSM, PGD
    from attacks.dataset import ArraySource, generate_dataset, load_adversarial_dataset
    from training.detector import fit_detector
    from training.retrain import retrain_detector

    source = ArraySource(digits.x_train[:400], digits.y_train[:400])
    attacks = [FGSM(eps=0.3), PGD(eps=0.3, steps=5), PGD(eps=1.5, norm="2", steps=10)]
    for i, attack in enumerate(attacks):
        generate_dataset(digits_classifier, attack, source, tmp_path / str(i), progress=False)
    old_sets, new_sets = [load_adversarial_dataset(tmp_path / str(i)) for i in (0, 1)], [load_adversarial_dataset(tmp_path / "2")]
    joint = fit_detector(old_sets, family="joint", classifier=digits_classifier, epochs=2, verbose=0)
    retrained, report = retrain_detector(joint, new_sets, old_sets, classifier=digits_classifier, epochs=2, verbose=0)
    assert (retrained.kind, retrained.member.kind, retrained.info["version"]) == ("joint", "input", 2)
    assert retrained.member is not joint.member and set(report["after"]) == {"new:pgd:0", "replay:fgsm:1", "replay:pgd:2"}
    assert retrained.info["n_fit_adversarial"] > joint.info["n_fit_adversarial"]  # the new attack's images too
    assert retrained.calibration.target_fpr == joint.calibration.target_fpr and retrained.calibration.fpr <= 0.05
