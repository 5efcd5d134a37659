"""Reading settings from the environment, with errors that name the variable.

Each process builds one typed settings object at start-up from these helpers
(`worker.settings`, `orchestrator.settings`); nothing else reads `os.environ`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping

from flowmesh.errors import ConfigError
from flowmesh.spec import parse_bytes

Env = Mapping[str, str]


def env_str(env: Env, name: str, default: str = "") -> str:
    return env.get(name, "").strip() or default


def env_float(
    env: Env, name: str, default: float, *, minimum: float | None = None, exclusive: bool = False
) -> float:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"{name} must be a number, got {raw!r}") from None
    if minimum is not None and (value <= minimum if exclusive else value < minimum):
        sign = ">" if exclusive else ">="
        raise ConfigError(f"{name} must be {sign} {minimum:g}, got {raw!r}")
    return value


def env_int(
    env: Env, name: str, default: int, *, minimum: int | None = None, maximum: int | None = None
) -> int:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"{name} must be an integer, got {raw!r}") from None
    if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        raise ConfigError(f"{name} must be between {minimum} and {maximum}, got {raw!r}")
    return value


def env_bool(env: Env, name: str, default: bool) -> bool:
    raw = env.get(name, "").strip().lower()
    if not raw:
        return default
    if raw in ("1", "true", "yes", "on"):
        return True
    if raw in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"{name} must be one of 1/true/yes/on or 0/false/no/off, got {raw!r}")


def env_list(env: Env, name: str) -> tuple[str, ...]:
    return tuple(p.strip() for p in env.get(name, "").split(",") if p.strip())


def env_bytes(env: Env, name: str) -> int | None:
    raw = env.get(name, "").strip()
    if not raw:
        return None
    try:
        return int(parse_bytes(raw))
    except ValueError as exc:
        raise ConfigError(f"{name}: {exc}") from None


LOG_LEVELS = ("CRITICAL", "ERROR", "WARNING", "INFO", "DEBUG")


def env_log_level(env: Env) -> str:
    level = env_str(env, "LOG_LEVEL", "INFO").upper()
    if level not in LOG_LEVELS:
        raise ConfigError(f"LOG_LEVEL must be one of {', '.join(LOG_LEVELS)}, got {level!r}")
    return level


def setup_logging(level: str, component: str) -> None:
    logging.basicConfig(
        level=level,
        format=f"%(asctime)s %(levelname)-7s {component} %(name)s: %(message)s",
    )
    # Request logs from httpx are noise at INFO in every process that uses it.
    logging.getLogger("httpx").setLevel(max(logging.WARNING, logging.getLevelName(level)))


def environ() -> Env:
    return os.environ


def environment_help(variables: list[tuple[str, str]]) -> str:
    """The epilog of a command's --help: each environment variable it reads, one per line."""
    width = max(len(name) for name, _ in variables) + 2
    rows = "\n".join(f"  {name:<{width}}{text}" for name, text in variables)
    return f"environment variables:\n{rows}"
