"""`uv run orchestrator --host H --port P`: serve the API and place tasks, configured by env."""

from __future__ import annotations

import argparse
import asyncio
import sys

import uvicorn

from flowmesh.config import environ, setup_logging
from flowmesh.errors import ConfigError
from flowmesh.redis_conn import connect
from orchestrator.app import create_app
from orchestrator.settings import OrchestratorSettings


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="orchestrator", description=__doc__)
    parser.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to bind (non-loopback needs FLOWMESH_API_TOKEN)",
    )
    parser.add_argument("--port", type=int, default=8000)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        settings = OrchestratorSettings.from_env(environ(), host=args.host, port=args.port)
        setup_logging(settings.log_level, "orchestrator")
        # Fail before binding when Redis is missing or unreachable, with the variable named.
        asyncio.run(_check_redis(settings.redis_url))
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


async def _check_redis(url: str) -> None:
    conn = await connect(url)
    await conn.aclose()


if __name__ == "__main__":
    sys.exit(main())
