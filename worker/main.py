"""`uv run worker` (or `uv run python worker/main.py`): start one worker from the environment."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys

from executors.registry import available
from flowmesh.config import environ, environment_help, setup_logging
from flowmesh.errors import ConfigError
from flowmesh.loop import run
from flowmesh.redis_conn import ENVIRONMENT as REDIS_ENVIRONMENT
from flowmesh.redis_conn import URL_HELP, check_server, connect
from worker.settings import WorkerSettings
from worker.worker import Worker

log = logging.getLogger("worker")

# What `worker --help` lists: every variable WorkerSettings.from_env reads (the README's table).
ENVIRONMENT = [
    ("REDIS_URL", URL_HELP),
    *REDIS_ENVIRONMENT,
    ("RESULTS_DIR", "task outputs go to RESULTS_DIR/<task_id>/ (default ./results_workers)"),
    ("TASK_TOPIC", "inbox stream prefix: <TASK_TOPIC>:inbox:<WORKER_ID> (default tasks)"),
    ("HEARTBEAT_INTERVAL_SEC", "seconds between heartbeats (default 30)"),
    ("WORKER_ID", "stable id: letters, digits, - _ . @ (default <hostname>-<random>)"),
    ("WORKER_TAGS", "comma-separated tags for spec.resources.tags (default none)"),
    ("LOG_LEVEL", "DEBUG, INFO, WARNING, ERROR or CRITICAL (default INFO)"),
    ("WORKER_COST_PER_HOUR", "USD per hour, reported and used as a tie-breaker (default 1.0)"),
    ("WORKER_SLOTS", "tasks run at once (default 4, or a batching executor's max_concurrency)"),
    ("WORKER_PREFETCH", "tasks queued in the inbox beyond the slots (default slots, max 64)"),
    ("WORKER_EXECUTORS", "comma-separated executors to offer (default all available)"),
    ("WORKER_CPUS", "CPUs to offer, capping the detected count (default detected)"),
    ("WORKER_MEMORY", "RAM to offer, e.g. 16Gi, capping the detected total (default detected)"),
    ("WORKER_DRAIN_TIMEOUT_SEC", "on SIGTERM, how long running tasks may finish (default 60)"),
    ("WORKER_CANCEL_GRACE_SEC", "time to stop after a cancel/timeout before a kill (default 5)"),
    ("WORKER_GPUS", "GPUs by NVML index or UUID (default CUDA_VISIBLE_DEVICES, else all)"),
    ("CUDA_VISIBLE_DEVICES", "the GPUs the worker keeps to when WORKER_GPUS is unset"),
    ("MAX_WARM_MODELS", "models the inference executor keeps loaded (default 2)"),
    ("REDIS_KEY_PREFIX", "prefix of every Redis key; must match the orchestrator's (default none)"),
    ("FLOWMESH_FAILPOINTS", "crash tests only: before_settle:S, train_step:S (default none)"),
    ("ORCHESTRATOR_BASE_URL", "orchestrator URL for artifact uploads and downloads (default none)"),
    ("FLOWMESH_WORKER_TOKEN", "the workers' credential for uploads (default none)"),
    ("WORKER_NETWORK_BANDWIDTH_BYTES_PER_SEC", "upload throttle, e.g. 10Mi (default none)"),
    ("WORKER_UPLOAD_RETRIES", "upload retries after the first try (default 20, ~8 min)"),
    ("WORKER_UPLOAD_TIMEOUT_SEC", "upload connect/read timeout (default 60)"),
    ("MODEL_ARCHIVE_USE_PIGZ", "1/0: archive with pigz (default 1; Python fallback without it)"),
    ("MODEL_ARCHIVE_COMPRESSION_LEVEL", "gzip level 0-9 (default 6)"),
    ("MODEL_ARCHIVE_PIGZ_THREADS", "pigz threads (default all CPUs)"),
    ("MODEL_ARCHIVE_PIGZ_BIN", "pigz executable (default pigz)"),
    ("MODEL_ARCHIVE_TAR_BIN", "tar executable (default tar)"),
    ("MODEL_ARCHIVE_FORMAT", "gzip, zstd (fast) or tar (uncompressed) (default gzip)"),
    ("MODEL_ARCHIVE_ZSTD_LEVEL", "zstd level 1-19 (default 1)"),
    ("ARTIFACT_CACHE_DIR", "download cache (default RESULTS_DIR/.artifact-cache)"),
    ("ARTIFACT_ALLOWED_HOSTS", "other hosts (host or host:port) to download from"),
    ("ARTIFACT_MAX_EXTRACT_BYTES", "largest archive extracted, e.g. 200Gi (default 200Gi)"),
    ("ARTIFACT_MAX_EXTRACT_FILES", "most files in an archive (default 100000)"),
]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="worker",
        description="Start one worker: it registers in Redis, beats, and runs the tasks placed\n"
        "on it until SIGTERM or Ctrl-C, which let running tasks finish first.\n"
        "Configured by the environment only.",
        epilog=environment_help(ENVIRONMENT),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    return parser.parse_args(argv)


async def serve(settings: WorkerSettings) -> None:
    conn = await connect(settings.redis)
    await check_server(conn)
    executors = available(set(settings.executors) if settings.executors else None)
    if not executors:
        raise ConfigError("no executor is available on this worker (see the log lines above)")
    log.info("worker %s connected to %s", settings.worker_id, settings.redis)
    worker = Worker(settings, conn, executors)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, worker.request_stop)
    try:
        await worker.run()
    finally:
        await conn.aclose()


def main(argv: list[str] | None = None) -> int:
    parse_args(argv)
    try:
        settings = WorkerSettings.from_env(environ())
        setup_logging(settings.log_level, f"worker[{settings.worker_id}]")
        run(serve(settings))
    except ConfigError as exc:
        print(f"worker: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
