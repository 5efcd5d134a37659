"""`uv run worker` (or `uv run python worker/main.py`): start one worker from the environment."""

from __future__ import annotations

import asyncio
import logging
import signal
import sys

from executors.registry import available
from flowmesh.config import environ, setup_logging
from flowmesh.errors import ConfigError
from flowmesh.loop import run
from flowmesh.redis_conn import check_server, connect, redact
from worker.settings import WorkerSettings
from worker.worker import Worker

log = logging.getLogger("worker")


async def serve(settings: WorkerSettings) -> None:
    conn = await connect(settings.redis_url)
    await check_server(conn)
    executors = available(set(settings.executors) if settings.executors else None)
    if not executors:
        raise ConfigError("no executor is available on this worker (see the log lines above)")
    log.info("worker %s connected to %s", settings.worker_id, redact(settings.redis_url))
    worker = Worker(settings, conn, executors)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, worker.request_stop)
    try:
        await worker.run()
    finally:
        await conn.aclose()


def main() -> int:
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
