"""An executor's options section: every unknown key is an error at any depth, aliases are
accepted, and a plugin validator that raises anything becomes a problem, not a crash."""

from __future__ import annotations

from typing import Any

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, field_validator

from executors.base import Executor
from flowmesh.spec import parse_task


class Sampling(BaseModel):
    temperature: float = 1.0


class Stage(BaseModel):
    name: str


class Options(BaseModel):
    sampling: Sampling = Field(default_factory=Sampling)
    maybe: Sampling | None = None
    stages: list[Stage] = []
    by_name: dict[str, Stage] = {}
    lr: float = Field(1e-4, validation_alias=AliasChoices("lr", "learning_rate"))
    strict: Strict | None = None
    loose: Loose | None = None

    @field_validator("stages")
    @classmethod
    def no_boom(cls, value: list[Stage]) -> list[Stage]:
        if any(s.name == "boom" for s in value):
            raise TypeError("a validator that raises the wrong kind of error")
        return value


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")
    x: int = 0


class Loose(BaseModel):
    model_config = ConfigDict(extra="allow")


Options.model_rebuild()


class Plugin(Executor):
    name = "plugin"
    options = Options

    def run(self, task: Any) -> dict[str, Any]:
        return {}


def problems(section: Any) -> dict[str, str]:
    body = parse_task({"spec": {"taskType": "plugin", "plugin": section}}).spec
    return dict(Plugin.check_options(body))


def test_a_clean_section_passes_and_aliases_are_accepted() -> None:
    assert problems({"sampling": {"temperature": 0.5}, "learning_rate": 0.1}) == {}
    assert problems({"lr": 0.1, "loose": {"anything": 1}}) == {}


def test_unknown_keys_are_errors_at_every_depth() -> None:
    found = problems(
        {
            "sampling": {"temprature": 0.5},
            "maybe": {"tmp": 1},
            "stages": [{"name": "a"}, {"name": "b", "nmae": "c"}],
            "by_name": {"first": {"name": "a", "x": 1}},
            "strict": {"y": 1},
            "top": True,
        }
    )
    assert set(found) == {
        "spec.plugin.sampling.temprature",
        "spec.plugin.maybe.tmp",
        "spec.plugin.stages[1].nmae",
        "spec.plugin.by_name.first.x",
        "spec.plugin.strict.y",  # reported once, by pydantic itself
        "spec.plugin.top",
    }


def test_a_validator_raising_anything_is_a_problem_naming_the_section() -> None:
    found = problems({"stages": [{"name": "boom"}]})
    assert "wrong kind of error" in found["spec.plugin"]


def test_a_section_that_is_not_an_object_names_the_section() -> None:
    assert set(problems("fast")) == {"spec.plugin"}


def test_fields_that_would_be_ignored_are_refused() -> None:
    import pytest

    from executors.echo import EchoExecutor
    from executors.transformers_inference import InferenceOptions
    from flowmesh.spec import SpecError

    gpu = {"taskType": "echo", "resources": {"hardware": {"gpu": {"type": "H100"}}}}
    with pytest.raises(SpecError, match=r"gpu.count of 1 or more"):
        parse_task({"spec": gpu})
    echo = parse_task({"spec": {"taskType": "echo", "model": {"source": {"identifier": "m"}}}})
    assert dict(EchoExecutor.check_options(echo.spec)) == {
        "spec.model": "executor 'echo' takes no model"
    }
    with pytest.raises(ValueError, match="less than or equal"):
        InferenceOptions(seed=2**64)
