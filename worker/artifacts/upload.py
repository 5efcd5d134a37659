"""Upload one file to the orchestrator, `POST /api/v1/results/{task_id}/files`: streamed from
disk, throttled to WORKER_NETWORK_BANDWIDTH_BYTES_PER_SEC for real, and restarted from byte 0
on a cut connection, a timeout, a 5xx or a 429, with exponential backoff.

Any other refusal (401, 403, 404, 409, 413, 422) is permanent and raises UploadRefused with
the orchestrator's own words; running out of tries raises UploadFailed.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

import httpx

from flowmesh.config import Env, env_bytes, env_float, env_int, env_str
from flowmesh.errors import ConfigError, FlowMeshError
from worker.outputs import file_sha256

logger = logging.getLogger(__name__)

SHA_HEADER = "X-FlowMesh-Sha256"
CHUNK_BYTES = 1 << 20
# Throttled, the body goes out in small pieces, so the rate is even over each second
# rather than in 1 MiB bursts.
THROTTLED_CHUNK_BYTES = 64 << 10
BACKOFF_START_SEC = 0.5
BACKOFF_CAP_SEC = 30.0

Log = logging.Logger | logging.LoggerAdapter[Any]


class UploadError(FlowMeshError):
    """An upload did not happen."""


class UploadRefused(UploadError):
    """The orchestrator refused the upload for good (a 4xx other than 429): trying again
    would not help. `detail` is its explanation."""

    def __init__(self, status: int, detail: str):
        super().__init__(f"HTTP {status}: {detail}")
        self.status = status
        self.detail = detail


class UploadFailed(UploadError):
    """Every try failed on something that might have passed (network, 5xx, 429)."""


@dataclass(frozen=True)
class UploadSettings:
    base_url: str
    token: str | None = field(default=None, repr=False)
    bandwidth_bytes_per_sec: int | None = None
    retries: int = 20  # tries after the first: with the backoff, about 8 minutes
    timeout: float = 60.0

    @classmethod
    def from_env(cls, env: Env) -> UploadSettings:
        """ORCHESTRATOR_BASE_URL (required), FLOWMESH_WORKER_TOKEN,
        WORKER_NETWORK_BANDWIDTH_BYTES_PER_SEC (a number or a size such as 10Mi; unset or
        0: no throttle), WORKER_UPLOAD_RETRIES (20), WORKER_UPLOAD_TIMEOUT_SEC (60)."""
        base_url = env_str(env, "ORCHESTRATOR_BASE_URL").rstrip("/")
        parts = urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ConfigError(
                f"ORCHESTRATOR_BASE_URL must be the orchestrator's http(s):// URL, got {base_url!r}"
            )
        bandwidth = env_bytes(env, "WORKER_NETWORK_BANDWIDTH_BYTES_PER_SEC")
        return cls(
            base_url=base_url,
            token=env_str(env, "FLOWMESH_WORKER_TOKEN") or None,
            bandwidth_bytes_per_sec=bandwidth or None,
            retries=env_int(env, "WORKER_UPLOAD_RETRIES", 20, minimum=0, maximum=1000),
            timeout=env_float(env, "WORKER_UPLOAD_TIMEOUT_SEC", 60.0, minimum=0, exclusive=True),
        )

    def describe(self) -> dict[str, Any]:
        """What the worker record shows about its uploads (never the token)."""
        return {
            "bandwidth_bytes_per_sec": self.bandwidth_bytes_per_sec,
            "upload_retries": self.retries,
            "upload_auth": self.token is not None,
        }


@dataclass(frozen=True)
class UploadInfo:
    name: str
    url: str  # where the orchestrator serves it
    size: int
    sha256: str
    seconds: float  # the whole call: hashing, every try and the waits between them
    tries: int
    bytes_per_sec: float  # the rate of the try that succeeded


def _body(path: Path, size: int, rate: int | None) -> Iterator[bytes]:
    """The file's first `size` bytes in chunks. Throttled, each chunk waits until the
    average rate since the first one, counting it, is within `rate`: one sleep makes up for
    every earlier delay (a slow disk, a busy socket) instead of adding to them."""
    chunk_size = THROTTLED_CHUNK_BYTES if rate else CHUNK_BYTES
    sent = 0
    start = time.monotonic()
    with path.open("rb") as fh:
        while sent < size:
            chunk = fh.read(min(chunk_size, size - sent))
            if not chunk:
                raise UploadFailed(f"{path} shrank to {sent} bytes while being uploaded")
            if rate:
                wait = start + (sent + len(chunk)) / rate - time.monotonic()
                if wait > 0:
                    time.sleep(wait)
            yield chunk
            sent += len(chunk)


def _detail(reply: httpx.Response) -> str:
    try:
        detail = reply.json().get("detail")
    except (ValueError, AttributeError):
        detail = None
    return str(detail) if detail is not None else reply.text[:500] or reply.reason_phrase


def _retry_after(reply: httpx.Response) -> float:
    try:
        return min(float(reply.headers.get("retry-after", "")), BACKOFF_CAP_SEC)
    except ValueError:
        return 0.0


def upload_file(
    path: Path,
    *,
    task_id: str,
    attempt: int,
    name: str | None = None,
    settings: UploadSettings,
    sha256: str | None = None,
    log: Log | None = None,
) -> UploadInfo:
    """Upload `path` as the task's file `name` (default: the file's name) for `attempt`.
    `sha256` saves hashing the file again when the caller knows it."""
    log = log or logger
    name = name or path.name
    started = time.monotonic()
    size = path.stat().st_size
    sha256 = sha256 or file_sha256(path)
    url = f"{settings.base_url}/api/v1/results/{quote(task_id, safe='')}/files"
    headers = {
        SHA_HEADER: sha256,
        "Content-Length": str(size),  # lets the orchestrator refuse an oversized file up front
        "Content-Type": "application/octet-stream",
    }
    if settings.token:
        headers["Authorization"] = f"Bearer {settings.token}"
    params = {"name": name, "attempt": str(attempt)}
    rate = settings.bandwidth_bytes_per_sec
    delay = BACKOFF_START_SEC
    tries = 0
    problem = ""
    with httpx.Client(timeout=settings.timeout) as client:
        while True:
            tries += 1
            wait = delay
            try_started = time.monotonic()
            try:
                reply = client.post(
                    url, params=params, headers=headers, content=_body(path, size, rate)
                )
            except httpx.TransportError as exc:
                problem = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            else:
                if reply.status_code in (200, 201):
                    elapsed = time.monotonic() - try_started
                    body = reply.json()
                    log.debug("uploaded %s (%d bytes) in %d tries", name, size, tries)
                    return UploadInfo(
                        name=name,
                        url=str(body.get("url") or f"{url}/{name}"),
                        size=size,
                        sha256=sha256,
                        seconds=time.monotonic() - started,
                        tries=tries,
                        bytes_per_sec=size / elapsed if elapsed > 0 else float(size),
                    )
                detail = _detail(reply)
                if reply.status_code < 500 and reply.status_code != 429:
                    raise UploadRefused(reply.status_code, detail)
                problem = f"HTTP {reply.status_code}: {detail}"
                wait = max(delay, _retry_after(reply))
            if tries > settings.retries:
                break
            log.warning(
                "upload of %s for task %s attempt %d, try %d failed: %s; again from byte 0 "
                "in %.1fs",
                name,
                task_id,
                attempt,
                tries,
                problem,
                wait,
            )
            time.sleep(wait)
            delay = min(delay * 2, BACKOFF_CAP_SEC)
    raise UploadFailed(f"upload of {name} to {url} failed after {tries} tries: {problem}")
