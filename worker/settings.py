"""The worker's settings, built once from the environment (the seed README's variables)."""

from __future__ import annotations

import socket
import uuid
from dataclasses import dataclass
from pathlib import Path

from flowmesh.config import (
    Env,
    env_bytes,
    env_float,
    env_int,
    env_list,
    env_log_level,
    env_str,
)
from flowmesh.errors import ConfigError
from flowmesh.failpoints import parse_failpoints
from flowmesh.keys import heartbeat_ttl
from flowmesh.redis_conn import RedisConfig
from worker.artifacts.config import ArtifactsConfig


@dataclass(frozen=True)
class WorkerSettings:
    redis: RedisConfig
    results_dir: Path
    task_topic: str
    heartbeat_interval: float
    worker_id: str
    tags: tuple[str, ...]
    log_level: str
    cost_per_hour: float
    slots: int  # 0 (unset): sized from the executors, see worker.worker.default_slots
    # Tasks the orchestrator may queue in the inbox beyond the slots; None (unset): as many
    # as the slots, up to 64 (see worker.worker.default_prefetch).
    prefetch: int | None
    executors: frozenset[str] | None
    cpus: float | None
    memory: int | None
    key_prefix: str
    drain_timeout: float
    cancel_grace: float
    # WORKER_GPUS as written (indices or UUIDs); resolved against NVML at start.
    gpus: str
    # CUDA_VISIBLE_DEVICES the worker was started with (None: unset), used when WORKER_GPUS
    # is not: a worker confined to some GPUs (a container runtime, a batch system) keeps to them.
    inherited_gpus: str | None
    max_warm_models: int
    # Fault injection for the crash tests: {"before_settle": seconds} pauses there.
    failpoints: dict[str, float]
    # Archives, uploads to the orchestrator, downloads and their cache (worker/artifacts/).
    artifacts: ArtifactsConfig

    @property
    def heartbeat_ttl(self) -> int:
        return heartbeat_ttl(self.heartbeat_interval)

    @classmethod
    def from_env(cls, env: Env) -> WorkerSettings:
        results_dir = Path(env_str(env, "RESULTS_DIR", "./results_workers")).resolve()
        worker_id = env_str(env, "WORKER_ID") or f"{socket.gethostname()}-{uuid.uuid4().hex[:8]}"
        if not all(c.isalnum() or c in "-_.@" for c in worker_id):
            raise ConfigError(
                f"WORKER_ID may hold letters, digits and - _ . @ only, got {worker_id!r}"
            )
        topic = env_str(env, "TASK_TOPIC", "tasks")
        if ":" in topic or " " in topic:
            raise ConfigError(f"TASK_TOPIC may not contain ':' or spaces, got {topic!r}")
        only = env_list(env, "WORKER_EXECUTORS")
        cpus = env_float(env, "WORKER_CPUS", 0.0, minimum=0.0)
        return cls(
            redis=RedisConfig.from_env(env),
            results_dir=results_dir,
            task_topic=topic,
            heartbeat_interval=env_float(
                env, "HEARTBEAT_INTERVAL_SEC", 30.0, minimum=0.0, exclusive=True
            ),
            worker_id=worker_id,
            tags=env_list(env, "WORKER_TAGS"),
            log_level=env_log_level(env),
            cost_per_hour=env_float(env, "WORKER_COST_PER_HOUR", 1.0, minimum=0.0),
            slots=env_int(env, "WORKER_SLOTS", 0, minimum=1, maximum=4096),
            prefetch=(
                env_int(env, "WORKER_PREFETCH", 0, minimum=0, maximum=4096)
                if env_str(env, "WORKER_PREFETCH")
                else None
            ),
            executors=frozenset(only) if only else None,
            cpus=cpus or None,
            memory=env_bytes(env, "WORKER_MEMORY"),
            key_prefix=env_str(env, "REDIS_KEY_PREFIX"),
            drain_timeout=env_float(env, "WORKER_DRAIN_TIMEOUT_SEC", 60.0, minimum=0.0),
            cancel_grace=env_float(env, "WORKER_CANCEL_GRACE_SEC", 5.0, minimum=0.0),
            gpus=env_str(env, "WORKER_GPUS"),
            inherited_gpus=env.get("CUDA_VISIBLE_DEVICES"),
            max_warm_models=env_int(env, "MAX_WARM_MODELS", 2, minimum=1, maximum=64),
            failpoints=parse_failpoints(env_str(env, "FLOWMESH_FAILPOINTS")),
            artifacts=ArtifactsConfig.from_env(env, results_dir),
        )
