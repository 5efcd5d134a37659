"""Connecting to Redis from a URL, with errors that say what to fix."""

from __future__ import annotations

import logging

import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from flowmesh.errors import ConfigError

log = logging.getLogger(__name__)


def redact(url: str) -> str:
    """The URL without its password, for logs and error messages."""
    if "@" not in url or "://" not in url:
        return url
    scheme, rest = url.split("://", 1)
    creds, host = rest.rsplit("@", 1)
    user = creds.split(":", 1)[0]
    return f"{scheme}://{user + ':' if user else ''}***@{host}"


def client(url: str) -> aioredis.Redis:
    return aioredis.Redis.from_url(
        url,
        decode_responses=True,
        health_check_interval=30,
        socket_keepalive=True,
        retry_on_timeout=True,
    )


async def connect(url: str | None, *, variable: str = "REDIS_URL") -> aioredis.Redis:
    """A connected client, or ConfigError naming the variable and the cause."""
    if not url:
        raise ConfigError(
            f"{variable} is not set: point it at your Redis server, "
            "e.g. export REDIS_URL=redis://localhost:6379/0 "
            "(or run `uv run flowmesh demo`, which starts an embedded Redis)"
        )
    try:
        conn = client(url)
    except ValueError as exc:
        raise ConfigError(f"{variable}={redact(url)} is not a valid Redis URL: {exc}") from None
    try:
        await conn.ping()
    except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
        await conn.aclose()
        raise ConfigError(f"cannot reach Redis at {variable}={redact(url)}: {exc}") from None
    return conn


async def check_server(conn: aioredis.Redis) -> None:
    """Warn about server settings that can lose tasks."""
    try:
        policy = (await conn.config_get("maxmemory-policy")).get("maxmemory-policy")
    except ResponseError:  # CONFIG may be disabled by ACL on managed Redis
        return
    if policy and policy != "noeviction":
        log.warning(
            "Redis maxmemory-policy is %r: Redis may evict task keys under memory pressure. "
            "Set it to 'noeviction'.",
            policy,
        )
