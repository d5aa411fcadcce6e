"""torchattacks 3.5 (PyTorch) as a peer, on a PyTorch twin that carries the Keras benchmark model's weights.

Imported by benchmarks/attacks.py only when `torch` and `torchattacks` are importable; never a
dependency of the project. The twin is `benchmark_models.cifar_cnn()` rebuilt in NCHW with the same
weights (the benchmark records the largest logit difference to show it is faithful). torchattacks
runs at its defaults, as its documentation uses it: eager PyTorch, no torch.compile.
"""
from __future__ import annotations

import time
from typing import Any, Callable

import keras
import numpy as np
import torch
import torchattacks

# cifar_cnn's layer sequence (InputLayer left out); the twin supports exactly this
STRUCTURE = ("Conv2D", "Conv2D", "MaxPooling2D", "Conv2D", "Conv2D", "MaxPooling2D", "Flatten", "Dense", "Dense")


def default_device() -> str:
    """"cuda" when PyTorch sees a GPU, else "cpu"."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def _activation(layer: keras.layers.Layer) -> str:
    return str(layer.get_config()["activation"])


def _check_structure(model: keras.Model) -> list[keras.layers.Layer]:
    """The model's layers, after checking they are cifar_cnn's (ValueError with the reason if not)."""
    layers = [layer for layer in model.layers if not isinstance(layer, keras.layers.InputLayer)]
    names = tuple(type(layer).__name__ for layer in layers)
    if names != STRUCTURE:
        raise ValueError(f"torch_twin supports the layers {STRUCTURE} (benchmark_models.cifar_cnn); got {names}")
    if len(model.input_shape) != 4 or None in model.input_shape[1:]:
        raise ValueError(f"torch_twin needs a fixed NHWC image input; got input shape {model.input_shape}")
    for layer in layers:
        config = layer.get_config()
        problem = None
        if config.get("data_format", "channels_last") != "channels_last":
            problem = "data_format must be channels_last"
        elif isinstance(layer, keras.layers.Conv2D) and (
            tuple(config["kernel_size"]) != (3, 3) or tuple(config["strides"]) != (1, 1)
            or tuple(config["dilation_rate"]) != (1, 1) or config["padding"] != "same"
            or config.get("groups", 1) != 1 or _activation(layer) != "relu"
        ):
            problem = "Conv2D must be 3x3, stride 1, dilation 1, padding 'same', one group, relu"
        elif isinstance(layer, keras.layers.MaxPooling2D) and (
            tuple(config["pool_size"]) != (2, 2) or tuple(config["strides"]) != (2, 2) or config["padding"] != "valid"
        ):
            problem = "MaxPooling2D must be 2x2, stride 2, padding 'valid'"
        elif isinstance(layer, keras.layers.Dense):
            wanted = "linear" if layer is layers[-1] else "relu"
            if _activation(layer) != wanted:
                problem = f"this Dense layer's activation must be {wanted} (the model outputs logits)"
        if problem:
            raise ValueError(f"torch_twin: layer {layer.name!r}: {problem}; got {config}")
    return layers


def torch_twin(model: keras.Model, device: str) -> torch.nn.Module:
    """cifar_cnn in PyTorch (NCHW input in [0, 1], logits out) with the Keras model's weights, in eval mode on device.

    Conv kernels go HWIO -> OIHW. Keras flattens NHWC activations and torch NCHW ones, so the first
    Dense layer's input rows are permuted from (h, w, c) order to (c, h, w) order. Parameters are
    frozen (requires_grad off): the attacks need only the input gradient.
    """
    layers = _check_structure(model)
    height, width = model.input_shape[1:3]
    modules: list[torch.nn.Module] = []
    flattened = False
    for layer in layers:
        weights = [np.asarray(w, dtype="float32") for w in layer.get_weights()]
        if isinstance(layer, keras.layers.Conv2D):
            kernel = weights[0]
            conv = torch.nn.Conv2d(kernel.shape[2], kernel.shape[3], 3, padding=1, bias=len(weights) == 2)
            conv.weight.data = torch.from_numpy(np.ascontiguousarray(kernel.transpose(3, 2, 0, 1)))
            if conv.bias is not None:
                conv.bias.data = torch.from_numpy(weights[1].copy())
            modules += [conv, torch.nn.ReLU()]
            channels = kernel.shape[3]
        elif isinstance(layer, keras.layers.MaxPooling2D):
            modules.append(torch.nn.MaxPool2d(2))
            height, width = height // 2, width // 2
        elif isinstance(layer, keras.layers.Flatten):
            modules.append(torch.nn.Flatten())
        else:
            kernel = weights[0]
            if not flattened:
                kernel = kernel.reshape(height, width, channels, -1).transpose(2, 0, 1, 3).reshape(kernel.shape)
                flattened = True
            dense = torch.nn.Linear(kernel.shape[0], kernel.shape[1], bias=len(weights) == 2)
            dense.weight.data = torch.from_numpy(np.ascontiguousarray(kernel.T))
            if dense.bias is not None:
                dense.bias.data = torch.from_numpy(weights[1].copy())
            modules.append(dense)
            if layer is not layers[-1]:
                modules.append(torch.nn.ReLU())
    twin = torch.nn.Sequential(*modules).to(device).eval()
    twin.requires_grad_(False)
    return twin


def _to_torch(x: np.ndarray, device: str) -> torch.Tensor:
    """NHWC numpy images -> contiguous NCHW float32 tensor on device (transposed there)."""
    return torch.from_numpy(np.asarray(x, dtype="float32")).to(device).permute(0, 3, 1, 2).contiguous()


def _to_numpy(x: torch.Tensor) -> np.ndarray:
    """NCHW tensor -> NHWC numpy images on the host."""
    return x.permute(0, 2, 3, 1).contiguous().cpu().numpy()


def _labels(y: np.ndarray, device: str) -> torch.Tensor:
    return torch.from_numpy(np.asarray(y)).to(device, dtype=torch.long)


def max_logit_difference(model: keras.Model, twin: torch.nn.Module, x: np.ndarray, device: str) -> float:
    """Largest |Keras logit - twin logit| over the NHWC batch x (~1e-5 when the twin is faithful)."""
    expected = np.asarray(model.predict(x, batch_size=256, verbose=0), dtype="float64")
    with torch.no_grad():
        actual = twin(_to_torch(x, device)).cpu().numpy().astype("float64")
    return float(np.max(np.abs(expected - actual)))


def _best_time(run: Callable[[], Any], repeats: int, device: str) -> float:
    """Best wall-clock time of `repeats` runs after one warm-up run, waiting for the GPU before each stop."""

    def timed() -> float:
        start = time.perf_counter()
        run()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        return time.perf_counter() - start

    timed()
    return min(timed() for _ in range(repeats))


def torchattacks_rates(
    model: keras.Model, x: np.ndarray, y: np.ndarray, batch: int, repeats: int, eps: float, device: str
) -> dict[str, Any]:
    """Images/s of torchattacks FGSM and PGD-10 (alpha 2.5 eps / 10, random start) on the twin of model.

    "fgsm"/"pgd10": NCHW batches already on device, adversarial images left there. "*_numpy_io": NHWC
    numpy in, NHWC numpy out, as our attacks take and return them. Also the twin's logit difference on
    the first batch and the fraction of x that each attack's images make the Keras model misclassify.
    """
    twin = torch_twin(model, device)
    attacks = {
        "fgsm": torchattacks.FGSM(twin, eps=eps),
        "pgd10": torchattacks.PGD(twin, eps=eps, alpha=2.5 * eps / 10, steps=10, random_start=True),
    }
    slices = [slice(i, i + batch) for i in range(0, len(x), batch)]
    on_device = [(_to_torch(x[s], device), _labels(y[s], device)) for s in slices]
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    result: dict[str, Any] = {}
    for name, attack in attacks.items():
        result[name] = len(x) / _best_time(lambda a=attack: [a(xb, yb) for xb, yb in on_device], repeats, device)
        result[f"{name}_numpy_io"] = len(x) / _best_time(
            lambda a=attack: [_to_numpy(a(_to_torch(x[s], device), _labels(y[s], device))) for s in slices],
            repeats, device,
        )
    torch.manual_seed(0)  # PGD's random start
    for name, attack in attacks.items():
        x_adv = np.concatenate([_to_numpy(attack(xb, yb)) for xb, yb in on_device])
        predicted = np.argmax(model.predict(x_adv, batch_size=batch, verbose=0), axis=1)
        result[f"{name}_success_rate"] = float(np.mean(predicted != np.asarray(y)))
    result.update(
        max_logit_difference=max_logit_difference(model, twin, x[:batch], device),
        device=device,
        torch=torch.__version__,
        torchattacks=torchattacks.__version__,
    )
    return result
