"""The built-in reward functions GRPO and PPO score completions with.

A spec names rewards from this registry and gives their parameters (`training.rewards`);
it never carries code. Each function maps completions to floats in [0, 1] and takes the
keyword arguments TRL's GRPOTrainer passes (`prompts`, `completions`, dataset columns).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from flowmesh.spec import Bool, Float, Int

RewardFn = Callable[..., list[float]]


class _Reward(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    weight: Float = Field(1.0, ge=-100, le=100)


class LengthReward(_Reward):
    """1 for a completion of `target` characters, falling linearly to 0 at twice as far."""

    name: Literal["length"]
    target: Int = Field(ge=1, le=100_000)


class ContainsReward(_Reward):
    """1 when the completion contains `keyword`, else 0."""

    name: Literal["contains"]
    keyword: str = Field(min_length=1, max_length=1000)
    case_sensitive: Bool = False


class FormatReward(_Reward):
    """1 when `pattern` (a Python regular expression) matches the completion, else 0."""

    name: Literal["format"]
    pattern: str = Field(min_length=1, max_length=1000)
    # search: anywhere in the completion; fullmatch: the whole completion.
    mode: Literal["search", "fullmatch"] = "search"

    @field_validator("pattern")
    @classmethod
    def _compiles(cls, value: str) -> str:
        try:
            re.compile(value)
        except re.error as exc:
            raise ValueError(f"not a valid regular expression: {exc}") from exc
        return value


RewardSpec = Annotated[LengthReward | ContainsReward | FormatReward, Field(discriminator="name")]


def _text(completion: Any) -> str:
    """A completion as text: TRL passes a string, or a list of messages for chat data."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, list):
        return "".join(str(m.get("content", "")) for m in completion if isinstance(m, dict))
    return str(completion)


def build(spec: LengthReward | ContainsReward | FormatReward) -> RewardFn:
    """The reward function a spec entry stands for (weights are applied by the caller)."""
    if isinstance(spec, LengthReward):
        target = spec.target

        def length(completions: list[Any], **_: Any) -> list[float]:
            return [max(0.0, 1.0 - abs(len(_text(c)) - target) / target) for c in completions]

        return length
    if isinstance(spec, ContainsReward):
        keyword = spec.keyword if spec.case_sensitive else spec.keyword.lower()
        fold = (lambda s: s) if spec.case_sensitive else str.lower

        def contains(completions: list[Any], **_: Any) -> list[float]:
            return [1.0 if keyword in fold(_text(c)) else 0.0 for c in completions]

        return contains
    pattern = re.compile(spec.pattern)
    match = pattern.fullmatch if spec.mode == "fullmatch" else pattern.search

    def format(completions: list[Any], **_: Any) -> list[float]:
        return [1.0 if match(_text(c)) else 0.0 for c in completions]

    return format


def combined(specs: list[LengthReward | ContainsReward | FormatReward]) -> RewardFn:
    """One function giving the weighted sum of several rewards (PPO's scalar reward)."""
    fns = [(build(s), s.weight) for s in specs]

    def reward(completions: list[Any], **kwargs: Any) -> list[float]:
        total = [0.0] * len(completions)
        for fn, weight in fns:
            for i, value in enumerate(fn(completions, **kwargs)):
                total[i] += weight * value
        return total

    return reward
