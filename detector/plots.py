"""The report's figures, drawn from report.json alone (so any report can be re-plotted), as PNGs
with matplotlib's Agg backend (no display needed), each written atomically.

roc.png (ROC per attack), histograms.png (clean vs adversarial scores per attack, with the
threshold), cross_attack.png (the cross-attack AUROC heat map), guarded_vs_eps.png (guarded
accuracy against eps for attacks evaluated at several eps), taylor.png (the loss along the FGSM
direction beside its first-order prediction). A figure whose data is absent is not drawn.
"""
from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.figure import Figure

from foundation.storage import atomic_write


def _rows(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Every attack row, the adaptive ones after the others."""
    return {**report["attacks"], **(report.get("adaptive") or {}).get("attacks", {})}


def roc_figure(report: dict[str, Any]) -> Figure | None:
    curves = {k: c["roc"] for k, c in report.get("curves", {}).items() if c.get("roc")}
    if not curves:
        return None
    figure, axes = plt.subplots(figsize=(6, 5))
    for name, roc in curves.items():
        axes.plot(roc["fpr"], roc["tpr"], label=name, linestyle="--" if name.startswith("adaptive") else "-")
    axes.axvline(report["detector"]["target_fpr"], color="grey", linewidth=0.8, label="target FPR")
    axes.plot([0, 1], [0, 1], color="lightgrey", linewidth=0.8)
    axes.set(xlabel="false-positive rate (clean test images)", ylabel="true-positive rate (turned examples)",
             title=f"ROC: {report['detector']['kind']} detector on {report['data']}", xlim=(0, 1), ylim=(0, 1.01))
    axes.legend(fontsize=8, loc="lower right")
    return figure


def histogram_figure(report: dict[str, Any]) -> Figure | None:
    histograms = {k: c["histogram"] for k, c in report.get("curves", {}).items() if c.get("histogram")}
    if not histograms:
        return None
    columns = min(3, len(histograms))
    rows = math.ceil(len(histograms) / columns)
    figure, grid = plt.subplots(rows, columns, figsize=(4.5 * columns, 3.2 * rows), squeeze=False)
    for axes, (name, h) in zip(grid.flat, histograms.items()):
        # each side as a fraction of its own images: 10,000 clean images would flatten 50 adversarial ones
        clean, adversarial = (np.asarray(h[side], np.float64) for side in ("clean", "adversarial"))
        axes.stairs(clean / max(clean.sum(), 1.0), h["edges"], label="clean", fill=True, alpha=0.5)
        axes.stairs(adversarial / max(adversarial.sum(), 1.0), h["edges"], label="adversarial (turned)", fill=True, alpha=0.5)
        axes.axvline(report["detector"]["threshold"], color="black", linewidth=1, label="threshold")
        axes.set(title=f"{name}\n{clean.sum():.0f} clean, {adversarial.sum():.0f} adversarial",
                 xlabel="detector score", ylabel="fraction of each side's images")
    for axes in list(grid.flat)[len(histograms):]:
        axes.axis("off")
    grid.flat[0].legend(fontsize=7)
    figure.tight_layout()
    return figure


def cross_attack_figure(report: dict[str, Any]) -> Figure | None:
    matrix = report.get("cross_attack")
    if not matrix:
        return None
    values = [[math.nan if v is None else v for v in row] for row in matrix["auroc"]]
    figure, axes = plt.subplots(figsize=(1.2 * len(matrix["test"]) + 3, 0.8 * len(matrix["train"]) + 2.5))
    image = axes.imshow(values, vmin=0.5, vmax=1.0, cmap="viridis")
    for i, row in enumerate(values):
        for j, value in enumerate(row):
            axes.text(j, i, "n/a" if math.isnan(value) else f"{value:.3f}", ha="center", va="center",
                      color="white" if not math.isnan(value) and value < 0.8 else "black", fontsize=8)
    axes.set_xticks(range(len(matrix["test"])), matrix["test"], rotation=30, ha="right")
    axes.set_yticks(range(len(matrix["train"])), matrix["train"])
    axes.set(xlabel="tested on", ylabel="trained on", title="cross-attack AUROC")
    figure.colorbar(image, ax=axes)
    figure.tight_layout()
    return figure


def eps_groups(report: dict[str, Any]) -> dict[str, list[tuple[float, float]]]:
    """(eps, guarded accuracy) per attack configuration evaluated at two or more eps values,
    labelled by the attack's name (and norm, and a count when two configurations share them)."""
    groups: dict[str, tuple[str, list[tuple[float, float]]]] = {}
    for row in _rows(report).values():
        if row.get("eps") is None:
            continue
        params = {k: v for k, v in row["params"].items() if k not in ("eps", "step_size", "threshold", "score_scale")}
        label = params["attack"] + ("" if params.get("norm", "inf") == "inf" else f" L{params['norm']}")
        groups.setdefault(json.dumps(params, sort_keys=True), (label, []))[1].append((row["eps"], row["guarded_accuracy"]))
    named: dict[str, list[tuple[float, float]]] = {}
    for label, points in groups.values():
        if len({eps for eps, _ in points}) > 1:
            named[label if label not in named else f"{label} #{len(named) + 1}"] = sorted(points)
    return named


def guarded_vs_eps_figure(report: dict[str, Any]) -> Figure | None:
    groups = eps_groups(report)
    if not groups:
        return None
    figure, axes = plt.subplots(figsize=(6, 4.5))
    for name, points in groups.items():
        axes.plot(*zip(*points), marker="o", label=name, linestyle="--" if name.startswith("adaptive") else "-")
    axes.set(xlabel="eps", ylabel="guarded accuracy", ylim=(0, 1.02), title="guarded accuracy against the attack budget")
    axes.legend(fontsize=8)
    return figure


def taylor_figure(report: dict[str, Any]) -> Figure | None:
    taylor = report.get("taylor")
    if not taylor or not taylor["loss"]:
        return None
    figure, axes = plt.subplots(figsize=(6, 4.5))
    for index, (loss, first_order) in enumerate(zip(taylor["loss"], taylor["first_order"])):
        line, = axes.plot(taylor["eps"], loss, label=f"input {index}: L(x + eps sign g)")
        axes.plot(taylor["eps"], first_order, linestyle="--", color=line.get_color(), label=f"input {index}: L(x) + eps |g|_1")
    axes.set(xlabel="eps", ylabel="cross-entropy loss", title="loss along the FGSM direction vs first order")
    axes.legend(fontsize=7)
    return figure


FIGURES: dict[str, Callable[[dict[str, Any]], Figure | None]] = {
    "roc.png": roc_figure, "histograms.png": histogram_figure, "cross_attack.png": cross_attack_figure,
    "guarded_vs_eps.png": guarded_vs_eps_figure, "taylor.png": taylor_figure,
}


def write_plots(report: dict[str, Any], directory: str | os.PathLike) -> list[Path]:
    """Draw every figure the report has data for into `directory` (removing a figure left there by an
    earlier report that this one has no data for); return the files written."""
    written = []
    for name, draw in FIGURES.items():
        figure = draw(report)
        if figure is None:
            (Path(directory) / name).unlink(missing_ok=True)
            continue
        try:
            written.append(atomic_write(Path(directory) / name, lambda temp, f=figure: f.savefig(temp, format="png", dpi=100)))
        finally:
            plt.close(figure)
    return written
