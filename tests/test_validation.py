"""edgemed.validation: the one formatter of pydantic errors (locations, plain wording, nearest valid key)."""

from __future__ import annotations

import pytest
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from edgemed.config import DeviceProfile, RunConfig
from edgemed.inference import BackendConfig
from edgemed.triage import ClassRule, StudyPolicy
from edgemed.validation import describe, model_at, problems


def test_model_at_follows_fields_optionals_and_mappings() -> None:
    assert model_at(DeviceProfile, ()) is DeviceProfile
    assert model_at(DeviceProfile, ("inference",)) is BackendConfig
    assert model_at(DeviceProfile, ("triage", "rules", "malignant")) is ClassRule  # a dict's values
    assert model_at(DeviceProfile, ("triage", "study")) is StudyPolicy  # StudyPolicy | None
    assert model_at(DeviceProfile, ("run",)) is RunConfig
    assert model_at(DeviceProfile, ("device", "id")) is None  # a string, not a model
    assert model_at(DeviceProfile, ("nosuch",)) is None


class _Pair(BaseModel):
    model_config = ConfigDict(extra="forbid")
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
