"""The evaluate stage: a saved classifier and detector under the evaluated attacks and the adaptive
suite on the test split (and, on request, the cross-attack matrix) -> report.json, report.md, plots/.

Progress shows as each attack's live bar on a terminal, and as one sparse bar per stage in logs.
"""
from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path
from typing import Any, Sequence

from tqdm.auto import tqdm

from attacks import Attack
from detector import load_detector
from detector.adaptive_evaluation import DEFAULT_ADAPTIVE, AdaptiveSettings
from detector.cross_attack import cross_attack_matrix
from detector.evaluation import attack_label, check_match, evaluate, format_table, run_attacks
from detector.report import write_report_files
from foundation.models import load_model
from foundation.storage import remembered_fingerprints
from training.attack_specs import resolve_attack, sweep_eps, trained_attacks
from training.calibration_images import CalibrationImages
from training.detector import make_detector
from training.workflow import Data, Log, as_dataset, select

CHECKPOINTS = "adaptive-progress"  # the folder in --out where finished adaptive attacks wait for the report


def _progress(desc: str, total: int | None = None) -> bool | tqdm:
    """Each attack's live bar on a terminal; in logs and CI one bar for the stage that writes a line
    at most every 30 s, so a stage of minutes still shows that it moves and how fast."""
    if sys.stderr.isatty():
        return True
    return tqdm(total=total, desc=desc, unit="img", mininterval=30, file=sys.stderr, ascii=True)


def _close(bar: bool | tqdm) -> None:
    if isinstance(bar, tqdm):
        bar.close()


@remembered_fingerprints()  # the classifier is hashed once: by the detector's load and by evaluate
def evaluate_stage(
    model_path: str | os.PathLike,
    detector_dir: str | os.PathLike,
    data: Data,
    out: str | os.PathLike,
    *,
    attacks: Sequence[Attack | str] | None = None,
    n: int | None = None,
    batch_size: int = 256,
    targets: str | None = None,
    eps_sweep: Sequence[float] | None = None,
    adaptive: AdaptiveSettings | None = DEFAULT_ADAPTIVE,
    cross_attack: bool = False,
    cross_attack_n: int = 2000,
    cross_attack_epochs: int = 3,
    html: bool = False,
    seed: int = 0,
    command: Sequence[str] | None = None,
    log: Log = print,
) -> dict[str, Any]:
    """Evaluate detection on the test split (attacks default to those the detector was trained on),
    under adaptive attacks too unless `adaptive` is None; write report.json, report.md, plots/ (and
    report.html) into `out`. `eps_sweep` runs every attack with an eps at each value; `cross_attack`
    trains an `input` detector per attack on `cross_attack_n` training images for the cross-attack
    matrix. Everything is checked before any attack runs."""
    model = load_model(model_path)
    detector = load_detector(detector_dir, classifier=model)
    check_match(model, detector)
    data = as_dataset(data)
    attacks = [resolve_attack(a, data) for a in attacks] if attacks else trained_attacks(detector_dir)
    if not attacks:
        raise ValueError("no attacks to evaluate: name them, or use a detector whose manifest lists its attacks")
    if eps_sweep:
        attacks = sweep_eps(attacks, eps_sweep, data)
    if targets not in (None, "random", "least_likely"):
        raise ValueError(f"targets must be 'random' or 'least_likely', got {targets!r}")
    if Path(out).exists() and not Path(out).is_dir():
        raise ValueError(f"--out {out} is a file; the report needs a folder")
    if cross_attack and cross_attack_epochs < 1:
        raise ValueError(f"cross_attack_epochs must be >= 1, got {cross_attack_epochs}")
    x, y, _ = select(data, "test", n)
    named = detector.info.get("calibration_images")
    if named and CalibrationImages.parse(named).overlaps(data.name, "test", len(x)):
        raise ValueError(f"the detector's threshold was set on {named}, which includes some of the {len(x)} test images "
                         "evaluated here: evaluate other images (fewer with --n) or calibrate on others")
    x_train, y_train, _ = select(data, "train", cross_attack_n) if cross_attack else (None, None, None)
    log(f"attacking {len(x)} test images: {', '.join(attack_label(a) for a in attacks)}")
    bar = _progress("attacks", len(x) * len(attacks))
    results = run_attacks(model, x, y, attacks, targets=targets, batch_size=batch_size, progress=bar)
    _close(bar)
    checkpoints = Path(out) / CHECKPOINTS
    if adaptive is not None:
        log(f"adaptive attacks that know the detector ({', '.join(adaptive.suite)}, {adaptive.steps} steps) on up to "
            f"{min(len(x), adaptive.max_inputs or len(x))} test images: the longest part (each finished attack and target is kept in "
            f"{checkpoints}: the same command resumes an interrupted run)")
    bar = _progress("adaptive attacks")
    report = evaluate(model, detector, x, y, attacks, data=data.name, results=results, targets=targets,
                      adaptive=adaptive, seed=seed, command=command, batch_size=batch_size, progress=bar,
                      checkpoints=checkpoints)
    _close(bar)
    if cross_attack:
        log(f"cross-attack matrix: one input detector per attack on {len(x_train)} training images")
        report["cross_attack"] = cross_attack_matrix(
            model, dict(zip(report["attacks"], attacks)), dict(zip(report["attacks"], results)), x, y,
            lambda clean, adversarial: make_detector("input", None, epochs=cross_attack_epochs, seed=seed).fit(clean, adversarial, verbose=0),
            x_train=x_train, y_train=y_train, target_fpr=detector.calibration.target_fpr, seed=seed, batch_size=batch_size,
        )
    paths = write_report_files(report, out, html=html)
    shutil.rmtree(checkpoints, ignore_errors=True)  # the report holds what they were for
    log(format_table(report))
    log(f"report written to {paths['report.json']} (+ {', '.join(name for name in paths if name != 'report.json')})")
    return report
