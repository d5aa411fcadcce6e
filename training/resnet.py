"""A small residual network for image classifiers (logits out), after the DAWNBench ResNet-9 of
David Page ("How to train your ResNet", 2018: 94% on CIFAR-10 in 24 epochs at width 64).

Layout: a prep convolution of `width` channels, then one stage per entry of `residual`, each a
convolution that doubles the channels, max-pooling (while the image is at least 2 px across, so 8x8
digits work too) and that many residual blocks of two convolutions; global average pooling and a
linear layer of logits. Every convolution is conv -> BatchNorm -> ReLU. Only Keras built-in layers,
so the saved `.keras` file loads with `safe_mode`.
"""
from __future__ import annotations

from collections.abc import Sequence

import keras

RESNET_WIDTH = 64  # Page's width: the prep layer's channels; the stages have 2x, 4x, 8x
RESNET_RESIDUAL = (1, 0, 1)  # residual blocks per stage: ResNet-9 (1 + 3 + 2 x 2 convolutions + the logits)
BATCHNORM_MOMENTUM = 0.9  # statistics that follow a short, fast schedule (Keras' default 0.99 lags)


def _conv_bn(x: keras.KerasTensor, filters: int, name: str) -> keras.KerasTensor:
    """3x3 convolution (no bias: BatchNorm has one), BatchNorm, ReLU."""
    x = keras.layers.Conv2D(filters, 3, padding="same", use_bias=False, kernel_initializer="he_normal", name=f"{name}_conv")(x)
    x = keras.layers.BatchNormalization(momentum=BATCHNORM_MOMENTUM, name=f"{name}_bn")(x)
    return keras.layers.ReLU(name=f"{name}_relu")(x)


def build_resnet(
    input_shape: tuple[int, ...],
    num_classes: int,
    *,
    width: int = RESNET_WIDTH,
    residual: Sequence[int] = RESNET_RESIDUAL,
) -> keras.Model:
    """ResNet-9 by default; `width` scales every layer's channels (16 or 32 for CPUs), `residual`
    sets the number of stages (its length) and the residual blocks in each."""
    if len(input_shape) != 3 or min(input_shape) < 1:
        raise ValueError(f"input_shape must be (height, width, channels), got {tuple(input_shape)}")
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2, got {num_classes}")
    if width < 1:
        raise ValueError(f"width must be >= 1, got {width}")
    if not residual or any(blocks < 0 for blocks in residual):
        raise ValueError(f"residual must list one block count >= 0 per stage, got {tuple(residual)}")
    inputs = keras.Input(input_shape, name="image")
    x = _conv_bn(inputs, width, "prep")
    for stage, blocks in enumerate(residual, start=1):
        x = _conv_bn(x, width * 2**stage, f"stage{stage}")
        if min(x.shape[1], x.shape[2]) >= 2:
            x = keras.layers.MaxPooling2D(name=f"stage{stage}_pool")(x)
        for block in range(1, blocks + 1):
            name = f"stage{stage}_res{block}"
            branch = _conv_bn(_conv_bn(x, x.shape[-1], f"{name}a"), x.shape[-1], f"{name}b")
            x = keras.layers.Add(name=f"{name}_add")([x, branch])
    x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    outputs = keras.layers.Dense(num_classes, name="logits")(x)
    return keras.Model(inputs, outputs, name="resnet")
