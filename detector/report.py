"""An evaluation report as files: report.json (the data), report.md (its tables), PNG figures
(`detector.plots`) and, optionally, report.html (tables and figures in one self-contained page).

The tables are built once as (title, header, rows, notes) and rendered to Markdown or HTML, so the
two never disagree. Every file is written atomically.
"""
from __future__ import annotations

import base64
import os
from html import escape
from pathlib import Path
from typing import Any

from detector.evaluation import display_name, write_report
from detector.plots import write_plots
from foundation.storage import atomic_write

Table = tuple[str, list[str], list[list[str]], list[str]]
PLOTS = "plots"


def _number(value: Any, digits: int = 4) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return "yes" if value else "no"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def _summary(report: dict[str, Any]) -> Table:
    det = report["detector"]
    low, high = det["clean_fpr_interval"]
    rows = [
        ["data", f"{report['data']} (n = {report['n']} test images)"],
        ["classifier clean accuracy", _number(report["classifier"]["clean_accuracy"])],
        ["detector", f"{det['kind']}, threshold {det['threshold']:.6g}"],
        ["clean FPR (target)", (f"{det['clean_fpr']:.4f} (95% CI {low:.4f}-{high:.4f}; target {det['target_fpr']:.3f}, "
                                f"calibration {_number(det['calibration_fpr'])} on {det.get('calibrated_on', 'held-out sources')})")],
        ["guarded clean accuracy", _number(det["guarded_clean_accuracy"])],
    ]
    if det.get("clean_fpr_shifted"):  # the clean FPR on benign corruptions of the same images
        rows.append(["clean FPR under benign shift", ", ".join(f"{name} {fpr:.4f}" for name, fpr in det["clean_fpr_shifted"].items())])
    if "gradient_masking_check" in det:
        rows.append(["gradient masking check", "FLAGGED (see the adaptive table)" if det["gradient_masking_check"] else "passed"])
    return "Summary", ["measure", "value"], rows, []


def _attacks(report: dict[str, Any]) -> Table:
    header = ["attack", "eps", "success", "AUROC", "AUROC (all)", "TPR", "TPR (all)", "TPR @1% FPR", "TPR @5% FPR",
              "guarded acc", "mean L-inf", "mean L2"]
    rows = [[display_name(name, r), _number(r["eps"], 4), _number(r["success_rate"]), _number(r["auroc"]), _number(r["auroc_all"]),
             _number(r["tpr"]), _number(r["tpr_all"]), _number(r["tpr_at_1pct_fpr"]), _number(r["tpr_at_5pct_fpr"]),
             _number(r["guarded_accuracy"]), _number(r["mean_linf"]), _number(r["mean_l2"])]
            for name, r in report["attacks"].items()]
    notes = [("Positives: the adversarial examples each attack turned, successful from a clean image the classifier got "
              "right ('all': every adversarial example); negatives: every clean "
              "test image. TPR at the calibrated threshold; TPR @x% FPR off the ROC curve on the test clean images. "
              "Guarded accuracy: rejected or classified correctly (true label, also for targeted attacks).")]
    return "Attacks (non-adaptive)", header, rows, notes


def _adaptive(report: dict[str, Any]) -> Table | None:
    section = report.get("adaptive")
    if not section:
        return None
    stand_in = section["stand_in"]
    header = ["adaptive attack", "inputs", "guarded acc", "strongest alone", "non-adaptive (strongest)", "drop",
              "worst case", "AUROC", "TPR", "gradient masking check"]
    rows = [[name, str(r["n"]), _number(r["guarded_accuracy"]), r.get("strongest", "n/a"),
             f"{_number(r['non_adaptive_guarded_accuracy'])} ({r['non_adaptive_attack']})",
             _number(r["guarded_accuracy_drop"]), _number(r["worst_case_guarded_accuracy"]), _number(r["auroc"]),
             _number(r["tpr"]), "FLAGGED" if r["gradient_masking_check"] else "passed"]
            for name, r in section["attacks"].items()]
    notes = [("Worst case per input over the adaptive suite (each attack's own row in the next table): an input "
              "counts as broken when any attack found a point within the budget that the classifier misclassifies "
              f"and the detector lets through. The detector's stand-in: {stand_in['method']} (agrees with the real "
              f"detector's decision on {stand_in['decision_agreement']:.4f} of {stand_in['n_checked']} images). "
              "Results are judged by the real detector and classifier.")]
    notes += [f"{name}: {r['note']}" for name, r in section["attacks"].items() if r.get("note")]
    return "Adaptive attacks (the attacker knows the detector)", header, rows, notes


def _adaptive_suite(report: dict[str, Any]) -> Table | None:
    section = report.get("adaptive")
    if not section or not any("suite" in r for r in section["attacks"].values()):
        return None
    header = ["budget", "attack", "guarded acc", "success", "inputs won", "steps", "restarts", "lambdas", "targets"]
    rows = [[name, attack, _number(own["guarded_accuracy"]), _number(own["success_rate"]), str(own["won"]),
             str(own["steps"]), str(own["restarts"]), _number(own["params"].get("lambdas")),
             str(own.get("target_classes", "n/a"))]
            for name, r in section["attacks"].items() for attack, own in r.get("suite", {}).items()]
    settings = section["settings"]
    notes = [("adaptive_pgd: PGD on the classifier's loss minus lambda x softplus of the detector's margin "
              f"({settings.get('loss')} loss), one run per lambda. apgd_ce / apgd_dlr: APGD on min(classifier margin, "
              "lambda x detector margin), random restarts per lambda; apgd_dlr_targeted: the same, targeted at each of "
              "the classifier's most likely other classes in turn. orthogonal_pgd / selective_pgd: Bryniarski et al. "
              "2022; orthogonal_pgd_warm: orthogonal PGD from an APGD-CE example against the classifier alone. "
              "restarts counts every run (lambdas x random starts). An input is won by the attack that broke it "
              "with the lowest detector score.")]
    return "Adaptive suite (each attack alone)", header, rows, notes


def _cross_attack(report: dict[str, Any]) -> Table | None:
    matrix = report.get("cross_attack")
    if not matrix:
        return None
    rows = [[f"{train} (clean FPR {_number(fpr, 3)})", *(f"{_number(a, 3)} / {_number(t, 3)}" for a, t in zip(aurocs, tprs))]
            for train, fpr, aurocs, tprs in zip(matrix["train"], matrix["clean_fpr"], matrix["auroc"], matrix["tpr"])]
    notes = [(f"Cells: AUROC / TPR of an input detector trained on the row's attack ({matrix['n_train']} training "
              f"images each), calibrated at {matrix['target_fpr']} FPR on held-out clean images.")]
    return "Cross-attack matrix (trained on the row, tested on the column)", ["trained on", *matrix["test"]], rows, notes


def _reproducibility(report: dict[str, Any]) -> Table:
    info = report.get("reproducibility", {})
    rows = [[key, " ".join(value) if key == "command" and value else str(value)]
            for key, value in info.items() if key != "versions"]
    rows += [[f"version: {name}", version] for name, version in info.get("versions", {}).items()]
    return "Reproducibility", ["item", "value"], rows, []


def tables(report: dict[str, Any]) -> list[Table]:
    """Every table of the report, in order; absent sections are left out."""
    built = [_summary(report), _attacks(report), _adaptive(report), _adaptive_suite(report), _cross_attack(report),
             _reproducibility(report)]
    return [table for table in built if table is not None]


def _md_cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def markdown(report: dict[str, Any], figures: list[str]) -> str:
    """report.md: the tables, then the figures (paths relative to the report)."""
    lines = [f"# Evaluation report: {report['detector']['kind']} detector on {report['data']}", ""]
    for title, header, rows, notes in tables(report):
        lines += [f"## {title}", "", "| " + " | ".join(map(_md_cell, header)) + " |",
                  "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(map(_md_cell, row)) + " |" for row in rows]
        lines += [""] + [f"{note}\n" for note in notes]
    if figures:
        lines += ["## Figures", ""] + [f"![{Path(f).stem}]({f})\n" for f in figures]
    return "\n".join(lines)


def html_page(report: dict[str, Any], figures: dict[str, bytes]) -> str:
    """report.html: the same tables and the figures embedded (one file to send around)."""
    parts = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>safetynet report: {escape(report['data'])}</title>",
             ("<style>body{font-family:sans-serif;max-width:1100px;margin:auto}table{border-collapse:collapse}"
              "td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}td:first-child{text-align:left}</style>"),
             f"</head><body><h1>Evaluation report: {escape(report['detector']['kind'])} detector on {escape(report['data'])}</h1>"]
    for title, header, rows, notes in tables(report):
        parts.append(f"<h2>{escape(title)}</h2><table><tr>{''.join(f'<th>{escape(h)}</th>' for h in header)}</tr>")
        parts += [f"<tr>{''.join(f'<td>{escape(str(c))}</td>' for c in row)}</tr>" for row in rows]
        parts.append("</table>" + "".join(f"<p>{escape(n)}</p>" for n in notes))
    for name, data in figures.items():
        parts.append(f"<h2>{escape(name)}</h2><img alt='{escape(name)}' src='data:image/png;base64,{base64.b64encode(data).decode()}'>")
    return "\n".join(parts + ["</body></html>"])


def write_report_files(report: dict[str, Any], out_dir: str | os.PathLike, *, html: bool = False) -> dict[str, Path]:
    """Write report.json, the figures under plots/, report.md and (with `html`) report.html into
    `out_dir`; return their paths by name."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file; the report needs a folder")
    paths = {"report.json": write_report(report, out)}
    figures = write_plots(report, out / PLOTS)
    paths |= {f"{PLOTS}/{p.name}": p for p in figures}
    text = markdown(report, [f"{PLOTS}/{p.name}" for p in figures])
    paths["report.md"] = atomic_write(out / "report.md", lambda temp: temp.write_text(text, encoding="utf-8"))
    if html:
        page = html_page(report, {p.name: p.read_bytes() for p in figures})
        paths["report.html"] = atomic_write(out / "report.html", lambda temp: temp.write_text(page, encoding="utf-8"))
    return paths
