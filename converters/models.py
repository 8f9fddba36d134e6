"""Keras model builders: the reference CNN and the architectures named by training recipes.

Every model takes float input in [0, 1] (uint8 pixels times 1/255, see ``edgemed.preprocess.normalise``)
and ends in ``Dense(num_classes, softmax)``; the converter strips that softmax for quantized artifacts (see
``converters.convert``). Imports Keras, so only the host side loads this module.
"""

from __future__ import annotations

from typing import Any

import keras

from converters.recipe import Recipe


def reference_cnn(input_shape: tuple[int, int, int], num_classes: int) -> Any:
    """The reference CNN, exactly as specified, compiled with Adam and sparse categorical cross-entropy.

    Conv2D(32, 3x3, relu) -> MaxPool(2x2) -> Conv2D(64, 3x3, relu) -> MaxPool(2x2) -> Conv2D(64, 3x3, relu)
    -> Flatten -> Dense(64, relu) -> Dense(num_classes, softmax).

    Args:
        input_shape: ``(H, W, C)``; H and W at least 18 so the three 3x3 convolutions fit.
        num_classes: number of output classes.

    Returns:
        A compiled ``keras.Sequential``.
    """
    model = keras.Sequential(
        [
            keras.Input(shape=input_shape),
            keras.layers.Conv2D(32, (3, 3), activation="relu"),
            keras.layers.MaxPooling2D((2, 2)),
            keras.layers.Conv2D(64, (3, 3), activation="relu"),
            keras.layers.MaxPooling2D((2, 2)),
            keras.layers.Conv2D(64, (3, 3), activation="relu"),
            keras.layers.Flatten(),
            keras.layers.Dense(64, activation="relu"),
            keras.layers.Dense(num_classes, activation="softmax"),
        ],
        name="reference_cnn",
    )
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    return model


def wide_bn_gap(
    input_shape: tuple[int, int, int], num_classes: int, widths: list[int], bn_momentum: float, dropout: float
) -> Any:
    """Blocks of two Conv3x3-BN-ReLU then MaxPool, global average pooling, dropout, softmax.

    Global average pooling instead of Flatten keeps the classifier small (fewer weights to quantize) and makes
    the model insensitive to small shifts, which the augmentation also teaches.
    """
    inputs = keras.Input(shape=input_shape)
    x = inputs
    for i, width in enumerate(widths):
        for j in range(2):
            x = keras.layers.Conv2D(width, 3, padding="same", use_bias=False, name=f"conv{i}_{j}")(x)
            x = keras.layers.BatchNormalization(momentum=bn_momentum, name=f"bn{i}_{j}")(x)
            x = keras.layers.ReLU(name=f"relu{i}_{j}")(x)
        if i < len(widths) - 1:
            x = keras.layers.MaxPooling2D(2, name=f"pool{i}")(x)
    x = keras.layers.GlobalAveragePooling2D(name="gap")(x)
    if dropout:
        x = keras.layers.Dropout(dropout, name="dropout")(x)
    outputs = keras.layers.Dense(num_classes, activation="softmax", name="classifier")(x)
    return keras.Model(inputs, outputs, name="wide_bn_gap")


def mobilenetv2(
    input_shape: tuple[int, int, int], num_classes: int, alpha: float, bn_momentum: float, dropout: float
) -> Any:
    """MobileNetV2 with width multiplier ``alpha``, random initialisation, BatchNorm momentum ``bn_momentum``.

    Keras's default momentum (0.999) collapsed to a constant output when trained from scratch on a few hundred
    images; 0.9 lets the moving statistics follow the weights (``../shared/STACK.md``).
    """
    backbone = keras.applications.MobileNetV2(
        input_shape=input_shape, alpha=alpha, include_top=False, weights=None, pooling="avg"
    )
    for layer in backbone.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.momentum = bn_momentum
    inputs = keras.Input(shape=input_shape)
    # MobileNetV2 was designed for inputs in [-1, 1]; the device feeds [0, 1], so rescale inside the model.
    x = keras.layers.Rescaling(2.0, offset=-1.0, name="to_pm1")(inputs)
    x = backbone(x)
    if dropout:
        x = keras.layers.Dropout(dropout, name="dropout")(x)
    outputs = keras.layers.Dense(num_classes, activation="softmax", name="classifier")(x)
    return keras.Model(inputs, outputs, name=f"mobilenetv2_{alpha:g}")


def build_model(recipe: Recipe, input_shape: tuple[int, int, int], num_classes: int) -> Any:
    """Build and compile the model a recipe names.

    Raises:
        ValueError: the architecture cannot take this input size (message says which size works).
    """
    if recipe.architecture == "reference":
        if min(input_shape[:2]) < 18:
            raise ValueError(f"the reference CNN needs images of at least 18x18, got {input_shape[:2]}")
        model = reference_cnn(input_shape, num_classes)
    elif recipe.architecture == "wide_bn_gap":
        model = wide_bn_gap(input_shape, num_classes, recipe.widths, recipe.bn_momentum, recipe.dropout)
    else:
        if min(input_shape[:2]) < 32:
            raise ValueError(
                f"MobileNetV2 needs images of at least 32x32, got {input_shape[:2]}; "
                "use --recipe reference or bn_gap for small images"
            )
        model = mobilenetv2(input_shape, num_classes, recipe.alpha, recipe.bn_momentum, recipe.dropout)
    model.compile(
        optimizer=keras.optimizers.Adam(recipe.learning_rate),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    return model
