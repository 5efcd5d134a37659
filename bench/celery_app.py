"""The Celery app the soak comparison (`bench/soak_celery.py`) runs its workers with.

Configured from the environment, because the workers are separate processes started
with `celery -A bench.celery_app worker ...`:

- `FLOWMESH_BENCH_REDIS_URL`: the Redis broker (no result backend is used);
- `FLOWMESH_BENCH_VISIBILITY_TIMEOUT`: optional, seconds; when unset Celery/kombu's own
  default applies (3600 s on Redis);
- `FLOWMESH_BENCH_RESTORE_SWEEP`: optional, seconds; when set, kombu sweeps its unacked
  hash for expired messages that often (`unacked_restore_interval`, with
  `unacked_restore_throttle=1`) instead of its default of a scan about every 100 s;
- `FLOWMESH_BENCH_WORKER`: a short name for this worker, recorded with every task start.

The settings are those a user who wants "no task lost when a worker dies" would pick:
late acknowledgement, re-queue on a lost worker process, and one message reserved at a time.
"""

from __future__ import annotations

import os
import time
from typing import Any

import redis
from celery import Celery

STARTS_KEY = "bench:celery:starts"  # hash task_id -> how many times the body started
START_TS_KEY = "bench:celery:start_ts"  # hash task_id -> time.time() of the last start
WORKER_KEY = "bench:celery:worker"  # hash task_id -> worker that started it last
START_LOG_KEY = "bench:celery:start_log"  # list of "task_id worker time" for every start
DONE_KEY = "bench:celery:done"  # hash task_id -> how many times the body ran to the end
KEY_PREFIX = "bench:celery:"

TASK_NAME = "bench.celery_app.soak_task"
DEFAULT_VISIBILITY_TIMEOUT = 3600.0  # kombu's Redis transport default


def transport_options(
    visibility_timeout: float | None, restore_sweep_sec: float | None
) -> dict[str, float]:
    options: dict[str, float] = {}
    if visibility_timeout is not None:
        options["visibility_timeout"] = visibility_timeout
    if restore_sweep_sec is not None:
        options["unacked_restore_interval"] = restore_sweep_sec
        options["unacked_restore_throttle"] = 1
    return options


def make_app(
    redis_url: str,
    visibility_timeout: float | None = None,
    restore_sweep_sec: float | None = None,
) -> Celery:
    """A Celery app with the soak settings (the driver makes its own to publish)."""
    app = Celery("bench.celery_app", broker=redis_url, set_as_current=False)
    app.conf.update(
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_ignore_result=True,
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
        # No remote control: each killed worker would leave its pidbox binding behind
        # (and it plays no part in delivery or acknowledgement).
        worker_enable_remote_control=False,
    )
    options = transport_options(visibility_timeout, restore_sweep_sec)
    if options:
        app.conf.broker_transport_options = options
    return app


def _env_seconds(name: str) -> float | None:
    raw = os.environ.get(name, "").strip()
    return float(raw) if raw else None


app = make_app(
    os.environ.get("FLOWMESH_BENCH_REDIS_URL", "redis://127.0.0.1:6379/0"),
    _env_seconds("FLOWMESH_BENCH_VISIBILITY_TIMEOUT"),
    _env_seconds("FLOWMESH_BENCH_RESTORE_SWEEP"),
)

_client: Any = None
_client_pid = -1


def _redis() -> Any:
    """One client per process (prefork children must not share the parent's sockets)."""
    global _client, _client_pid
    if _client is None or _client_pid != os.getpid():
        _client = redis.Redis.from_url(
            os.environ["FLOWMESH_BENCH_REDIS_URL"], decode_responses=True
        )
        _client_pid = os.getpid()
    return _client


@app.task(name=TASK_NAME)
def soak_task(task_id: str, delay: float) -> None:
    r = _redis()
    worker = os.environ.get("FLOWMESH_BENCH_WORKER", "?")
    now = time.time()
    pipe = r.pipeline(transaction=True)
    pipe.hincrby(STARTS_KEY, task_id, 1)
    pipe.hset(START_TS_KEY, task_id, repr(now))
    pipe.hset(WORKER_KEY, task_id, worker)
    pipe.rpush(START_LOG_KEY, f"{task_id} {worker} {now!r}")
    pipe.execute()
    time.sleep(delay)
    r.hincrby(DONE_KEY, task_id, 1)
