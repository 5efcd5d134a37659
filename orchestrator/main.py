"""`uv run orchestrator --host H --port P`: serve the API and place tasks, configured by env."""

from __future__ import annotations

import argparse
import asyncio
import sys

import uvicorn

from flowmesh.config import environ, environment_help, setup_logging
from flowmesh.errors import ConfigError
from flowmesh.redis_conn import ENVIRONMENT as REDIS_ENVIRONMENT
from flowmesh.redis_conn import URL_HELP, RedisConfig, connect
from orchestrator.app import create_app
from orchestrator.settings import OrchestratorSettings

# What `orchestrator --help` lists: every variable OrchestratorSettings.from_env reads.
ENVIRONMENT = [
    ("REDIS_URL", URL_HELP),
    *REDIS_ENVIRONMENT,
    ("FLOWMESH_API_TOKEN", "bearer token, 16+ characters; unset: no auth, loopback only"),
    ("REDIS_KEY_PREFIX", "prefix of every Redis key; must match the workers' (default none)"),
    ("LOG_LEVEL", "DEBUG, INFO, WARNING, ERROR or CRITICAL (default INFO)"),
    ("FLOWMESH_MAX_BODY_BYTES", "largest request body (default 8388608)"),
    ("FLOWMESH_MAX_BATCH", "most specs in one request (default 10000)"),
    ("SCHEDULER_REFRESH_SEC", "how often the fleet is re-read and leases checked (default 1.0)"),
    ("WORKER_LEASE_INTERVALS", "heartbeat intervals (+1 s) before a worker is lost (default 2)"),
    ("FLOWMESH_IDEMPOTENCY_TTL_SEC", "how long an Idempotency-Key is remembered (default 86400)"),
    (
        "SCHEDULER_WARM_ROUTING",
        "prefer workers with the task's model loaded; false: by load only (default true)",
    ),
    ("FLOWMESH_WORKER_TOKEN", "the workers' own credential, 16+ characters; needed for uploads"),
    ("FLOWMESH_RESULTS_DIR", "where uploaded artifacts are kept (default ./results_orchestrator)"),
    ("FLOWMESH_MAX_UPLOAD_BYTES", "largest artifact upload, e.g. 64Gi (default 64Gi)"),
    ("FLOWMESH_RESULTS_RETENTION_SEC", "keep a finished task's uploads this long (default 7 days)"),
    ("FLOWMESH_RESULTS_RETENTION_INTERVAL_SEC", "how often old uploads are swept (default 60)"),
    ("ENABLE_ELASTIC_SCALING", "disable idle workers, enable them for a backlog (default true)"),
    ("ELASTIC_MIN_ACTIVE_WORKERS", "workers elastic scaling keeps enabled (default 1)"),
    ("ELASTIC_IDLE_SEC", "idle this long, a worker may be disabled (default 300)"),
    ("ELASTIC_COOLDOWN_SEC", "no worker is disabled this long after one was enabled (default 60)"),
    (
        "FLOWMESH_PIPELINE_SCAN_SEC",
        "re-evaluate every unfinished pipeline from Redis this often (default 5)",
    ),
]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="orchestrator",
        description="Serve the FlowMesh API and place tasks on workers.\n"
        "Configured by the environment, and --host/--port.",
        epilog=environment_help(ENVIRONMENT),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to bind (default 127.0.0.1; another needs FLOWMESH_API_TOKEN)",
    )
    parser.add_argument("--port", type=int, default=8000, help="port to listen on (default 8000)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        settings = OrchestratorSettings.from_env(environ(), host=args.host, port=args.port)
        setup_logging(settings.log_level, "orchestrator")
        # Fail before binding when Redis is missing or unreachable, with the variable named.
        asyncio.run(_check_redis(settings.redis))
    except ConfigError as exc:
        print(f"orchestrator: {exc}", file=sys.stderr)
        return 2
    uvicorn.run(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level.lower(),
        access_log=False,
    )
    return 0


async def _check_redis(config: RedisConfig) -> None:
    conn = await connect(config)
    await conn.aclose()


if __name__ == "__main__":
    sys.exit(main())
