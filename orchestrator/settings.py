"""The orchestrator's settings, built once from the environment and the command line."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from flowmesh.config import Env, env_bool, env_float, env_int, env_log_level, env_str
from flowmesh.errors import ConfigError


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class OrchestratorSettings:
    redis_url: str
    host: str
    port: int
    api_token: str | None
    key_prefix: str
    log_level: str
    max_body_bytes: int
    max_batch: int
    refresh_sec: float
    lease_intervals: float
    idempotency_ttl: int
    warm_routing: bool = True

    @classmethod
    def from_env(cls, env: Env, *, host: str, port: int) -> OrchestratorSettings:
        token = env_str(env, "FLOWMESH_API_TOKEN") or None
        if token is None and not is_loopback(host):
            raise ConfigError(
                f"refusing to listen on {host}: FLOWMESH_API_TOKEN is not set, so the API would "
                "be open to anyone who can reach it. Set FLOWMESH_API_TOKEN, or bind to "
                "127.0.0.1 for local-only use without auth."
            )
        if token is not None and len(token) < 16:
            raise ConfigError("FLOWMESH_API_TOKEN must be at least 16 characters long")
        return cls(
            redis_url=env_str(env, "REDIS_URL"),
            host=host,
            port=port,
            api_token=token,
            key_prefix=env_str(env, "REDIS_KEY_PREFIX"),
            log_level=env_log_level(env),
            max_body_bytes=env_int(env, "FLOWMESH_MAX_BODY_BYTES", 8 * 2**20, minimum=1024),
            max_batch=env_int(env, "FLOWMESH_MAX_BATCH", 10_000, minimum=1),
            refresh_sec=env_float(env, "SCHEDULER_REFRESH_SEC", 1.0, minimum=0.05),
            lease_intervals=env_float(env, "WORKER_LEASE_INTERVALS", 2.0, minimum=1.0),
            idempotency_ttl=env_int(env, "FLOWMESH_IDEMPOTENCY_TTL_SEC", 86_400, minimum=1),
            warm_routing=env_bool(env, "SCHEDULER_WARM_ROUTING", True),
        )
