"""edgemed.validation: the one strict base of settings models and the one formatter of their errors."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import BaseModel, Field, ValidationError, model_validator

from edgemed.config import DeviceProfile, RunConfig, load_profile
from edgemed.errors import ConfigError
from edgemed.inference import BackendConfig
from edgemed.manifest import Manifest
from edgemed.triage import ClassRule, StudyPolicy
from edgemed.validation import FrozenModel, StrictModel, describe, model_at, problems


def test_model_at_follows_fields_optionals_and_mappings() -> None:
    assert model_at(DeviceProfile, ()) is DeviceProfile
    assert model_at(DeviceProfile, ("inference",)) is BackendConfig
    assert model_at(DeviceProfile, ("triage", "rules", "malignant")) is ClassRule  # a dict's values
    assert model_at(DeviceProfile, ("triage", "study")) is StudyPolicy  # StudyPolicy | None
    assert model_at(DeviceProfile, ("run",)) is RunConfig
    assert model_at(DeviceProfile, ("device", "id")) is None  # a string, not a model
    assert model_at(DeviceProfile, ("nosuch",)) is None


class _Pair(StrictModel):
    low: float = Field(0.0, gt=-1)
    high: float = 1.0

    @model_validator(mode="after")
    def _ordered(self) -> _Pair:
        if self.low > self.high:
            raise ValueError("low must not exceed high")
        return self


def _error(data: dict[str, object]) -> ValidationError:
    with pytest.raises(ValidationError) as info:
        _Pair.model_validate(data)
    return info.value


def test_problems_are_plain_and_named() -> None:
    assert problems(_error({"hihg": 2}), _Pair) == [
        "hihg: unknown key; did you mean `high`? valid keys here: high, low"
    ]
    assert problems(_error({"low": 3, "high": 2})) == ["low must not exceed high"]  # no location, no prefix
    assert problems(_error({"low": -5})) == ["low: must be greater than -1 (got -5)"]
    assert problems(_error({"low": -5}), flags={"low": "--low"}) == ["--low (low): must be greater than -1 (got -5)"]


def test_describe_joins_and_caps() -> None:
    exc = _error({"a": 1, "b": 2, "c": 3})
    assert describe(exc, _Pair, limit=2).endswith("(+1 more)")
    assert describe(exc, _Pair, limit=2).count("unknown key") == 2


def _models_under(root: type[BaseModel]) -> set[type[BaseModel]]:
    """Every model class reachable from ``root`` through its fields (optionals, lists and mappings included)."""
    found: set[type[BaseModel]] = set()
    todo = [root]
    while todo:
        model = todo.pop()
        if model in found:
            continue
        found.add(model)
        for name in model.model_fields:
            for key in ([name], [name, 0], [name, "any-key"]):
                inner = model_at(model, key)
                if inner is not None:
                    todo.append(inner)
    return found


def test_every_settings_model_rejects_unknown_keys_through_the_one_base() -> None:
    from converters.gate import GateConfig
    from converters.recipe import Recipe

    models = _models_under(DeviceProfile) | _models_under(Manifest) | _models_under(GateConfig) | _models_under(Recipe)
    assert len(models) >= 20  # the walk reached the nested sections, not just the roots
    for model in models:
        assert issubclass(model, StrictModel), model
        if model is Manifest:  # newer converters may add top-level sections; the device keeps them
            continue
        with pytest.raises(ValidationError) as info:
            model.model_validate({"no_such_key": 1})
        assert any(e["type"] == "extra_forbidden" for e in info.value.errors()), model


def test_frozen_models_cannot_be_changed_after_validation() -> None:
    rule = ClassRule(level="urgent")
    assert isinstance(rule, FrozenModel)
    with pytest.raises(ValidationError, match="frozen"):
        rule.level = "routine"  # type: ignore[misc]
    assert issubclass(BackendConfig, FrozenModel) and issubclass(Manifest, FrozenModel)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("model: {path: [1, 2]}", "model.path: must be a path, written as text (got a list)"),
        ("model: {path: {a: 1}}", "model.path: must be a path, written as text (got a section of keys)"),
        ("quality: 5", "quality: must be a section of keys (key: value) (got 5)"),
        ("triage: [a]", "triage: must be a section of keys (key: value) (got a list)"),
        ("triage: {rules: [1]}", "triage.rules: must be a mapping (key: value) (got a list)"),
        ("triage: {rules: {malignant: urgent}}", "triage.rules.malignant: must be a section of keys (key: value)"),
        ("device: {id: d1, site: [x]}", "device.site: must be text (got a list)"),
    ],
)
def test_a_value_of_the_wrong_kind_is_named_in_the_files_own_words(tmp_path: Path, text: str, expected: str) -> None:
    profile = tmp_path / "p.yaml"
    profile.write_text("profile: t\n" + ("" if text.startswith("device:") else "device: {id: d1}\n") + text + "\n")
    with pytest.raises(ConfigError) as info:
        load_profile(profile)
    message = str(info.value)
    assert expected in message, message
    for boilerplate in ("Input ", "<class", "instance of", "valid dictionary", "pathlib"):
        assert boilerplate not in message, message


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "profile: t\ndevice: {id: d1\n",
            "expected ',' or '}', but got the end of the file at line 3, column 1 "
            "(while parsing a flow mapping starting at line 2, column 9)",
        ),
        ("profile: t\n  bad: : x\n", "mapping values are not allowed here at line 2, column 6"),
        (
            "profile: t\ndevice: {id: 'd1}\n",
            "found unexpected end of the file at line 3, column 1 "
            "(while scanning a quoted scalar starting at line 2, column 14)",
        ),
    ],
)
def test_a_file_that_is_not_yaml_says_where_in_one_line(tmp_path: Path, text: str, expected: str) -> None:
    profile = tmp_path / "p.yaml"
    profile.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_profile(profile)
    assert str(info.value) == f"profile {profile} is not valid YAML: {expected}"
    assert "<unicode string>" not in str(info.value) and "\n" not in str(info.value)
