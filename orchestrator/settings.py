"""The orchestrator's settings, built once from the environment and the command line.

Artifact uploads (orchestrator/results.py) read:
- FLOWMESH_WORKER_TOKEN: the workers' own bearer token (16+ characters, not the API token),
  accepted only on /api/v1/results/ routes; required for uploads (unset: uploads refused).
- FLOWMESH_RESULTS_DIR: where uploaded files are kept, one folder per task
  (default ./results_orchestrator, made absolute at start).
- FLOWMESH_MAX_UPLOAD_BYTES: the largest upload, a number or a size such as 10Gi
  (default 64Gi); FLOWMESH_MAX_BODY_BYTES does not apply to uploads.
- FLOWMESH_RESULTS_RETENTION_SEC: how long a finished task's files are kept (default 604800,
  7 days); files of a task no longer in Redis go at the next sweep.
- FLOWMESH_RESULTS_RETENTION_INTERVAL_SEC: how often the sweep runs (default 60).

Pipelines (orchestrator/pipelines/) read FLOWMESH_PIPELINE_SCAN_SEC: how often every
unfinished pipeline is re-evaluated from task state in Redis (default 5; task events make
it prompt, this makes it certain, and it enforces waitTimeoutSec).
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from pathlib import Path

from flowmesh.config import (
    Env,
    env_bool,
    env_bytes,
    env_float,
    env_int,
    env_log_level,
    env_str,
)
from flowmesh.errors import ConfigError
from flowmesh.redis_conn import RedisConfig
from orchestrator.scaling import ScalingSettings


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class OrchestratorSettings:
    redis: RedisConfig
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
    worker_token: str | None = None
    results_dir: Path = field(default_factory=lambda: Path("results_orchestrator").resolve())
    max_upload_bytes: int = 64 * 2**30
    results_retention_sec: float = 7 * 86_400.0
    results_retention_interval_sec: float = 60.0
    pipeline_scan_sec: float = 5.0
    scaling: ScalingSettings = field(default_factory=ScalingSettings)

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
        worker_token = env_str(env, "FLOWMESH_WORKER_TOKEN") or None
        if worker_token is not None and len(worker_token) < 16:
            raise ConfigError("FLOWMESH_WORKER_TOKEN must be at least 16 characters long")
        if worker_token is not None and worker_token == token:
            raise ConfigError(
                "FLOWMESH_WORKER_TOKEN must differ from FLOWMESH_API_TOKEN: workers hold a "
                "credential of their own, good for uploads and nothing else"
            )
        max_upload = env_bytes(env, "FLOWMESH_MAX_UPLOAD_BYTES")
        if max_upload is not None and max_upload < 1:
            raise ConfigError("FLOWMESH_MAX_UPLOAD_BYTES must be at least 1 byte")
        return cls(
            redis=RedisConfig.from_env(env),
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
            worker_token=worker_token,
            results_dir=Path(env_str(env, "FLOWMESH_RESULTS_DIR", "./results_orchestrator"))
            .expanduser()
            .resolve(),
            max_upload_bytes=64 * 2**30 if max_upload is None else max_upload,
            results_retention_sec=env_float(
                env, "FLOWMESH_RESULTS_RETENTION_SEC", 7 * 86_400.0, minimum=0
            ),
            results_retention_interval_sec=env_float(
                env, "FLOWMESH_RESULTS_RETENTION_INTERVAL_SEC", 60.0, minimum=0.05
            ),
            pipeline_scan_sec=env_float(env, "FLOWMESH_PIPELINE_SCAN_SEC", 5.0, minimum=0.05),
            scaling=ScalingSettings.from_env(env),
        )
