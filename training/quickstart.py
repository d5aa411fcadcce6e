"""`safetynet quickstart`: the whole path on one dataset, then the robust guard beside it.

classifier -> FGSM and PGD datasets -> detector -> evaluation report (the plain guard), then
`harden` from the same classifier (the robust guard), and one table with both guards' clean and
worst-case guarded accuracy, so the first run already shows what a detector alone keeps under an
attacker who knows it, and what a robust guard keeps.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path
from typing import Any

from detector.adaptive_evaluation import DEFAULT_ADAPTIVE
from training.attack_specs import default_attacks, default_eps
from training.data import load_dataset
from training.evaluate_stage import CHECKPOINTS, evaluate_stage
from training.harden import RECORD as HARDEN_RECORD
from training.harden import HardenSettings, harden
from training.classifier_stage import train_classifier_stage
from training.run_record import Stages, differences, new_record, read_record, run_identity
from training.workflow import Log, attack_stage, train_detector_stage

# 8x8 images with 17 grey levels (scikit-learn's digits): at eps 0.3 an attacker may redraw the digit,
# so the robust guard there defends the smaller budget
SMALL_IMAGE_ROBUST_EPS = 0.1
# the robust stage's adversarial fine-tuning: on digits robust validation accuracy still rises at 60
# epochs; 100 (patience 15) kept 81.9-83.3% worst-case guarded over three seeds where 60 (patience 10)
# kept 79.7-81.1% (docs/benchmarks.md)
ROBUST_EPOCHS, ROBUST_PATIENCE = 100, 15
# the run's record (`training.run_record`) and its stages, in order
RECORD, STAGES = "quickstart.json", ("classifier", "datasets", "detector", "evaluation", "robust")
# what a quickstart writes into its folder (evaluate_stage's report files included): all that --overwrite removes
OUTPUTS = ("classifier.keras", "datasets", "detector", "report.json", "report.md", "report.html", "plots", "robust",
           CHECKPOINTS, RECORD)


@dataclasses.dataclass(frozen=True)
class QuickstartPaths:
    classifier: Path
    datasets: list[Path]
    detector: Path
    report: Path
    robust: Path | None


def robust_eps(input_shape: tuple[int, ...], eps: float | None) -> float:
    """The robust guard's budget: `eps` when given, else the data's default (0.1 for images under 16x16)."""
    if eps is not None:
        return eps
    return SMALL_IMAGE_ROBUST_EPS if min(input_shape[:2]) < 16 else default_eps(input_shape)


def worst_case(report: dict[str, Any]) -> tuple[float, str]:
    """The lowest guarded accuracy over every attack in the report, adaptive rows included, and its row."""
    rows = {**report["attacks"], **(report.get("adaptive") or {}).get("attacks", {})}
    guarded = {name: row.get("worst_case_guarded_accuracy", row["guarded_accuracy"]) for name, row in rows.items()}
    name = min(guarded, key=guarded.__getitem__)
    return float(guarded[name]), name


def summary_table(reports: dict[str, dict[str, Any]]) -> str:
    """One row per guard: its eps, clean guarded accuracy and worst-case guarded accuracy."""
    lines = [f"{'guard':<32}{'eps':>8}{'clean guarded':>15}{'worst-case guarded':>20}  worst attack"]
    for label, report in reports.items():
        eps = max((row["eps"] for row in report["attacks"].values() if row.get("eps") is not None), default=None)
        value, name = worst_case(report)
        lines.append(f"{label:<32}{'n/a' if eps is None else format(eps, '.4g'):>8}"
                     f"{report['detector']['guarded_clean_accuracy']:>15.4f}{value:>20.4f}  {name}")
    return "\n".join(lines)


def quickstart(
    data_spec: str = "digits",
    out: str | os.PathLike = "runs/quickstart",
    *,
    eps: float | None = None,
    n_attack: int = 10_000,
    n_eval: int | None = None,
    adaptive_n: int = 1000,
    classifier_epochs: int = 10,
    detector_epochs: int = 10,
    target_fpr: float = 0.05,
    benign_augmentation: bool = True,
    shifted_fpr: float = 0.10,
    family: str = "input",
    robust: bool = True,
    hardening: HardenSettings | None = None,
    seed: int = 0,
    overwrite: bool = False,
    log: Log = print,
) -> QuickstartPaths:
    """The plain guard (classifier -> FGSM and PGD datasets -> `family` detector -> report), then,
    unless `robust` is False, the robust guard from the same classifier (`harden`, in `out`/robust;
    `hardening` overrides its settings) and the table of both. The same call after an interruption
    resumes (`quickstart.json` records the run: finished stages are kept, the datasets, the
    evaluation and the robust guard resume where they stopped). A finished run's outputs in `out`, or
    an interrupted run's with other settings, are refused, or removed first with `overwrite` (only
    the names in OUTPUTS: nothing else in `out`). `benign_augmentation` and `shifted_fpr` as in
    `fit_detector`, for both guards' detectors. Both evaluations run the adaptive suite on the first
    `adaptive_n` test images, the rest on `n_eval`."""
    out = Path(out)
    paths = QuickstartPaths(
        classifier=out / "classifier.keras",
        datasets=[out / "datasets" / "fgsm", out / "datasets" / "pgd"],
        detector=out / "detector",
        report=out / "report.json",
        robust=out / "robust" if robust else None,
    )
    existing = [out / name for name in OUTPUTS if (out / name).exists()]
    record = read_record(out / RECORD)
    interrupted = record is not None and not record.get("finished")
    if existing and not overwrite and not interrupted:
        raise FileExistsError(f"{existing[0]} already exists: rerun with --overwrite to replace the earlier run, or choose another --out")
    adaptive = dataclasses.replace(DEFAULT_ADAPTIVE, max_inputs=adaptive_n)  # checks adaptive_n before any work
    data = load_dataset(data_spec)
    identity = run_identity({"eps": eps, "n_attack": n_attack, "n_eval": n_eval, "adaptive_n": adaptive_n,
                             "classifier_epochs": classifier_epochs, "detector_epochs": detector_epochs,
                             "target_fpr": target_fpr, "benign_augmentation": benign_augmentation,
                             "shifted_fpr": shifted_fpr, "family": family, "robust": robust, "seed": seed,
                             "hardening": None if hardening is None else dataclasses.asdict(hardening)}, data)
    if interrupted and not overwrite:
        if record.get("identity") != identity:
            raise FileExistsError(f"{out} holds an interrupted quickstart with another {differences(record, identity)}: run "
                                  "that command again to resume it, rerun with --overwrite to start over, or choose another --out")
        log(f"resuming the interrupted quickstart in {out} (finished: {', '.join(record.get('done', [])) or 'no stage yet'})")
    else:
        for path in existing:
            log(f"removing the earlier run's {path}")
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()
        record = new_record(out / RECORD, identity)
    stages = Stages(out / RECORD, record, STAGES if robust else STAGES[:-1], log)
    if stages.begin("classifier", "classifier"):
        train_classifier_stage(data, paths.classifier, epochs=classifier_epochs, seed=seed, log=log)
        stages.finish("classifier")
    if stages.begin("datasets", "adversarial datasets"):
        for attack, path in zip(default_attacks(data.input_shape, eps), paths.datasets, strict=True):
            attack_stage(paths.classifier, data, attack, path, split="train", n=n_attack, log=log)
        stages.finish("datasets")
    if stages.begin("detector", "detector"):
        train_detector_stage(paths.datasets, paths.detector, family=family, model_path=paths.classifier,
                             target_fpr=target_fpr, epochs=detector_epochs, seed=seed,
                             benign_augmentation=benign_augmentation, shifted_fpr=shifted_fpr, log=log)
        stages.finish("detector")
    if stages.begin("evaluation", "evaluation"):
        evaluate_stage(paths.classifier, paths.detector, data, out, n=n_eval, adaptive=adaptive, log=log)
        stages.finish("evaluation")
    plain = json.loads(paths.report.read_text(encoding="utf-8"))  # both reports from their files, kept or new
    if paths.robust is not None:
        settings = hardening or HardenSettings(
            eps=robust_eps(data.input_shape, eps), epochs=ROBUST_EPOCHS, patience=ROBUST_PATIENCE, validation_n=min(500, len(data.x_train) // 5),
            n_attack=n_attack, detector_epochs=detector_epochs, target_fpr=target_fpr,
            benign_augmentation=benign_augmentation, shifted_fpr=shifted_fpr, seed=seed)
        if stages.begin("robust", f"robust guard (harden: adversarial fine-tuning at eps {settings.eps:g}, joint detector)"):
            if not (read_record(paths.robust / HARDEN_RECORD) or {}).get("finished"):  # else it ended as the run was cut off
                harden(paths.classifier, data, paths.robust, settings, n_eval=n_eval, adaptive=adaptive, log=log)
            stages.finish("robust")
        hardened = json.loads((paths.robust / "report" / "report.json").read_text(encoding="utf-8"))
        log("")
        log(summary_table({f"plain ({family} detector)": plain, "robust (harden, joint rule)": hardened}))
    stages.close()
    return paths
