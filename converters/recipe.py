"""Training recipes as data: a YAML file per recipe in ``converters/recipes/``, chosen by name.

A recipe says which architecture to build and how to train it (epochs, batch size, learning rate,
augmentation, class weights, BatchNorm momentum), so trying a new configuration is a file edit, not a code
change. ``best.yaml`` holds only ``alias: NAME``: ``--recipe best`` always means the recipe the accuracy
benchmark chose.
A path to a YAML file outside the package is accepted too. This module does not import TensorFlow.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import Field, ValidationError

from edgemed.errors import ConfigError
from edgemed.validation import StrictModel, describe, describe_yaml_error

RECIPE_DIR = Path(__file__).resolve().parent / "recipes"


class Augmentation(StrictModel):
    """Random changes applied to each training batch (never to validation, test or calibration images)."""

    hflip: bool = Field(False, description="mirror left-right with probability 0.5")
    vflip: bool = Field(False, description="mirror top-bottom with probability 0.5")
    rot90: bool = Field(False, description="rotate by a random multiple of 90 degrees (square images only)")
    shift_fraction: float = Field(0.0, ge=0.0, le=0.5, description="max shift as a fraction of the side")
    brightness: float = Field(0.0, ge=0.0, le=1.0, description="max additive brightness change")
    contrast: float = Field(0.0, ge=0.0, le=1.0, description="max relative contrast change around the mean")


class Recipe(StrictModel):
    """One training configuration."""

    name: str = Field(description="recipe name, as passed to --recipe")
    description: str = Field("", description="one line for --help and reports")
    architecture: Literal["reference", "wide_bn_gap", "mobilenetv2"] = Field(description="model family")
    widths: list[int] = Field(default_factory=lambda: [32, 64, 128], description="filters per block")
    alpha: float = Field(0.35, gt=0.0, description="MobileNetV2 width multiplier")
    bn_momentum: float = Field(0.9, gt=0.0, lt=1.0, description="BatchNorm moving-average momentum")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="dropout before the classifier")
    epochs: int = Field(30, gt=0, description="maximum epochs; early stopping usually ends sooner")
    batch_size: int = Field(32, gt=0, description="images per gradient step")
    learning_rate: float = Field(1e-3, gt=0.0, description="Adam learning rate")
    patience: int = Field(5, gt=0, description="epochs without improvement of `monitor` before stopping")
    monitor: Literal["val_loss", "val_auc"] = Field("val_loss", description="what early stopping watches")
    reduce_lr_patience: int | None = Field(
        None, gt=0, description="halve the learning rate after this many epochs without improvement"
    )
    class_weight: Literal["none", "balanced"] = Field("none", description="'balanced': 1/count")
    augmentation: Augmentation = Field(default_factory=Augmentation, description="training-time augmentation")


def available_recipes() -> list[str]:
    """Names of the recipes shipped in ``converters/recipes/`` (including ``best``)."""
    return sorted(p.stem for p in RECIPE_DIR.glob("*.yaml"))


def load_recipe(name_or_path: str) -> Recipe:
    """Load a recipe by name (``reference``, ``bn_gap``, ``mobilenetv2``, ``best``) or from a YAML path.

    Raises:
        ConfigError: unknown name, unreadable file, or invalid fields (the message names the field).
    """
    path = Path(name_or_path)
    if not (path.suffix in (".yaml", ".yml") and path.is_file()):
        path = RECIPE_DIR / f"{name_or_path}.yaml"
        if not path.is_file():
            known = ", ".join(available_recipes())
            raise ConfigError(f"unknown recipe {name_or_path!r}; choose one of {known} or a .yaml path")
    raw = _read_yaml(path)
    if set(raw) == {"alias"}:
        target = str(raw["alias"])
        if target == path.stem:
            raise ConfigError(f"recipe {path} is an alias of itself; name another recipe")
        return load_recipe(target)
    try:
        return Recipe.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(f"recipe {path} is invalid: {describe(exc, Recipe, limit=1)}") from exc


def _read_yaml(path: Path) -> dict[str, object]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read recipe {path} ({exc.strerror}); check the path") from exc
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"recipe {path} is not valid YAML: {describe_yaml_error(exc)}") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"recipe {path} must be a YAML mapping of settings")
    return raw
