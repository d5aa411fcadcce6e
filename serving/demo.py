"""`safetynet demo`: the interactive epsilon demo, a Gradio page on localhost.

Choose or upload an image, an attack (FGSM or PGD, untargeted or towards a class) and eps; see the
original, the perturbation (amplified) and the adversarial image side by side, the classifier's
top-5 and the detector's verdict for both, and the Taylor picture: the attack objective along the
gradient-sign direction against its first-order approximation J(x) + eps * ||grad J||_1.
The work is done by `serving.demo_engine`; this module only lays out the page and wires events.
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from matplotlib.figure import Figure

from serving.demo_engine import ATTACKS, DemoEngine, DemoResult, Prediction, TaylorCurve

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # localhost demo: no telemetry calls
try:
    import gradio as gr
except ImportError as error:
    raise ImportError(f"the demo needs the demo extra: pip install 'safetynet[demo]' ({error})") from error

UNTARGETED = "untargeted"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
DISPLAY_SIZE = 224  # smaller images (digits, CIFAR) are shown enlarged, pixels kept sharp
_VERDICT_COLOURS = {"accepted": "#1a7f37", "rejected": "#cf222e", "flagged": "#9a6700", "no detector": "#57606a"}


def taylor_figure(curve: TaylorCurve, eps: float) -> Figure:
    """The attack objective along the gradient-sign direction and its first-order approximation,
    with the current eps marked (a pyplot-free Figure, safe in the server's worker threads)."""
    figure = Figure(figsize=(6.4, 3.0), layout="constrained")
    axes = figure.add_subplot()
    what = "-CE(target)" if curve.targeted else "CE(label)"
    axes.plot(curve.eps, curve.loss, "o-", markersize=3, label=f"J = {what} at x + eps sign(grad J)")
    axes.plot(curve.eps, curve.first_order, "--", label="first order: J(x) + eps ||grad J||_1")
    axes.axvline(eps, color="gray", linewidth=1, label=f"eps = {eps:.3f}")
    low, high = float(curve.loss.min()), float(curve.loss.max())
    margin = max(high - low, 1.0)
    axes.set_ylim(low - 0.25 * margin, high + 0.5 * margin)  # the linear term quickly leaves the plot
    axes.set_xlabel("eps (L-inf, image range [0, 1])")
    axes.set_ylabel("attack objective J")
    axes.legend(fontsize="small", loc="upper left")
    axes.grid(alpha=0.3)
    return figure


def display_image(image: np.ndarray) -> np.ndarray:
    """A float [0, 1] image as RGB uint8; a small one enlarged (nearest neighbour, a whole factor)
    towards DISPLAY_SIZE."""
    pixels = np.round(np.clip(image, 0.0, 1.0) * 255).astype(np.uint8)
    factor = DISPLAY_SIZE // min(pixels.shape[:2])
    if factor > 1:
        pixels = cv2.resize(pixels, None, fx=factor, fy=factor, interpolation=cv2.INTER_NEAREST)
    return pixels if pixels.ndim == 3 and pixels.shape[2] == 3 else np.repeat(pixels.reshape(*pixels.shape[:2], 1), 3, axis=2)


def verdict_html(prediction: Prediction, threshold: float | None) -> str:
    """The guard's verdict as a coloured line with the score against the threshold."""
    colour = _VERDICT_COLOURS[prediction.verdict]
    detail = "" if prediction.score is None else f" &nbsp;score {prediction.score:.3g} (threshold {threshold:.3g})"
    return f'<p class="verdict"><b style="color:{colour}">{prediction.verdict}</b>{detail}</p>'


def summary_markdown(result: DemoResult, attack: str, eps: float, target: str) -> str:
    """One line on what was run and how large the perturbation is."""
    goal = "untargeted" if target == UNTARGETED else f"target {target}"
    return (f"**{attack}**, {goal}, eps {eps:.3f} ({eps * 255:.1f}/255): L-inf {result.linf:.4f}, "
            f"L2 {result.l2:.3f}; perturbation shown x{result.amplification:.0f}")


def example_images(folder: str | os.PathLike | None) -> list[str]:
    """The image files in `folder` (sorted), or none when it is None or absent."""
    if folder is None or not Path(folder).is_dir():
        return []
    return [str(p) for p in sorted(Path(folder).iterdir()) if p.suffix.lower() in IMAGE_SUFFIXES]


class DemoPage:
    """The Gradio callbacks over one engine: plain functions of the components' values."""

    def __init__(self, engine: DemoEngine) -> None:
        self.engine = engine
        self.threshold = None if engine.guard is None else engine.guard.detector.threshold

    def prepare(self, path: str | None) -> np.ndarray | None:
        """An uploaded or example file as the classifier's input (None when the image is cleared)."""
        if path is None:
            return None
        try:
            return self.engine.prepare(path)
        except ValueError as error:
            raise gr.Error(str(error)) from None

    def update(self, image: np.ndarray | None, attack: str, eps: float, target: str) -> tuple[Any, ...]:
        """The images, top-5s, verdicts and summary for one (image, attack, eps, target)."""
        if image is None:
            return (None,) * 7 + ("Choose or upload an image.",)
        try:
            result = self.engine.update(image, attack, eps, self._target_index(target))
        except ValueError as error:
            raise gr.Error(str(error)) from None
        return (
            display_image(result.original), display_image(result.perturbation), display_image(result.adversarial),
            dict(result.before.top5), dict(result.after.top5),
            verdict_html(result.before, self.threshold), verdict_html(result.after, self.threshold),
            summary_markdown(result, attack, eps, target),
        )

    def plot(self, image: np.ndarray | None, eps: float, target: str) -> Figure | None:
        """The Taylor picture (a separate event after `update`: drawing it takes longer than the attack)."""
        if image is None:
            return None
        try:
            return taylor_figure(self.engine.taylor(image, self._target_index(target)), eps)
        except ValueError as error:
            raise gr.Error(str(error)) from None

    def _target_index(self, target: str) -> int | None:
        return None if target == UNTARGETED else self.engine.class_names.index(target)


def build_demo(engine: DemoEngine, examples: Sequence[str] = (), *, eps: float | None = None) -> gr.Blocks:
    """The demo page; the first example (if any) is shown on load, at `eps` (default eps_max / 10)."""
    page = DemoPage(engine)
    detector = "no detector" if engine.guard is None else f"detector: {engine.guard.detector.kind}"
    with gr.Blocks(title="safetynet: epsilon demo", analytics_enabled=False) as demo:
        gr.Markdown(f"## safetynet: adversarial examples, live\nclassifier input {engine.input_shape}, "
                    f"{len(engine.class_names)} classes; {detector}")
        prepared = gr.State(None)
        with gr.Row():
            source = gr.Image(value=examples[0] if examples else None, type="filepath", label="image",
                              sources=["upload"], height=DISPLAY_SIZE, elem_id="source")
            with gr.Column():
                attack = gr.Radio(list(ATTACKS), value=ATTACKS[0], label="attack", elem_id="attack")
                target = gr.Dropdown([UNTARGETED, *engine.class_names], value=UNTARGETED, label="target class",
                                     filterable=True, elem_id="target")
                eps_slider = gr.Slider(0.0, engine.eps_max, value=engine.eps_max / 10 if eps is None else eps,
                                       step=engine.eps_max / 100, label="eps", elem_id="eps")
                summary = gr.Markdown(elem_id="summary")
        if examples:
            gr.Examples(examples, inputs=source, label="examples")
        with gr.Row():
            shown = [gr.Image(label=label, format="png", height=DISPLAY_SIZE, interactive=False, elem_id=name)
                     for name, label in (("original", "original"), ("perturbation", "perturbation (amplified)"),
                                         ("adversarial", "adversarial"))]
        with gr.Row():
            with gr.Column():
                top_before = gr.Label(num_top_classes=5, label="before: top-5", elem_id="top5-before")
                verdict_before = gr.HTML(elem_id="verdict-before")
            with gr.Column():
                top_after = gr.Label(num_top_classes=5, label="after: top-5", elem_id="top5-after")
                verdict_after = gr.HTML(elem_id="verdict-after")
        taylor = gr.Plot(label="Taylor picture", format="png", elem_id="taylor")

        controls = [prepared, attack, eps_slider, target]
        outputs = [*shown, top_before, top_after, verdict_before, verdict_after, summary]
        for event in (source.change, demo.load):
            (event(page.prepare, source, prepared)
             .then(page.update, controls, outputs).then(page.plot, [prepared, eps_slider, target], taylor))
        for control in (attack, target, eps_slider):
            (control.change(page.update, controls, outputs, trigger_mode="always_last")
             .then(page.plot, [prepared, eps_slider, target], taylor))
    return demo


def launch(demo: gr.Blocks, *, host: str = "127.0.0.1", port: int = 7860, examples: Sequence[str] = (),
           block: bool = True) -> None:
    """Serve the page on host:port (no public share link; system fonts, so it works offline)."""
    theme = gr.themes.Default(font=["system-ui", "sans-serif"], font_mono=["monospace"])
    demo.launch(server_name=host, server_port=port, share=False, prevent_thread_lock=not block, quiet=not block,
                allowed_paths=sorted({str(Path(p).resolve().parent) for p in examples}), ssr_mode=False,
                footer_links=[], theme=theme)


def run_demo(*, guard: str | None = None, model: str | None = None, detector: str | None = None,
             examples: str | None = None, host: str = "127.0.0.1", port: int = 7860) -> None:
    """`safetynet demo`: build the engine (see `DemoEngine.from_options`), compile it, serve the page."""
    engine = DemoEngine.from_options(guard=guard, model=model, detector=detector)
    engine.warm_up()
    files = example_images(examples)
    if examples is not None and not files:
        print(f"no example images in {examples} (--examples); upload one on the page")
    print(f"safetynet demo on http://{host}:{port} (Ctrl+C to stop)")
    launch(build_demo(engine, files), host=host, port=port, examples=files)
