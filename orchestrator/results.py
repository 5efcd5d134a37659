"""Routes under /api/v1/results: workers upload a task's artifacts (streamed to disk under
FLOWMESH_RESULTS_DIR/<task_id>/, checked against their sha256), users and workers download
them with Range; and the sweep that deletes them once their task is long finished or gone.

Who may call what is TokenAuth's business (orchestrator/auth.py): uploads take the worker
token only. A file is written to a temporary name and renamed into place, so a reader sees
the old file or the new one, never half of one.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Annotated, Any, BinaryIO

from fastapi import APIRouter, Header, HTTPException, Query, Request
from fastapi.responses import FileResponse
from redis.exceptions import RedisError
from starlette.requests import ClientDisconnect

from flowmesh.keys import Keys
from flowmesh.status import TERMINAL, TaskStatus
from orchestrator.fleet import Fleet

log = logging.getLogger(__name__)
router = APIRouter(prefix="/api/v1", tags=["results"])

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,199}")
NAME_RULE = (
    "a file name is 1-200 characters of letters, digits, '.', '_' and '-', starting with a "
    "letter or digit, without '..'"
)
# TaskStore.submit makes uuid4 hex ids; anything with a dot or a slash is refused outright.
TASK_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,127}")
SHA256 = re.compile(r"[0-9a-fA-F]{64}")
SHA_HEADER = "X-FlowMesh-Sha256"
META_DIR = ".meta"
UPLOADABLE = frozenset({TaskStatus.DISPATCHED, TaskStatus.RUNNING})
# Received chunks (uvicorn hands over ~64 KiB at a time) are gathered up to this size and
# then hashed and written on a thread while the next ones arrive: one thread hop per 4 MiB
# instead of per chunk, and the event loop never blocks on the disk.
FLUSH_BYTES = 4 << 20
# A .part file this old belongs to no upload in progress (one being written is touched
# every FLUSH_BYTES): the orchestrator died mid-upload. The sweep removes it.
STALE_PART_SEC = 3600.0

_UPLOAD_BODY = {
    "requestBody": {
        "required": True,
        "description": f"The file's bytes, raw (not multipart). Header {SHA_HEADER}: their sha256.",
        "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
    }
}


@dataclass(frozen=True)
class StoredFile:
    name: str
    size: int
    sha256: str
    attempt: int
    uploaded_at: float

    def view(self, request: Request, task_id: str) -> dict[str, Any]:
        return {**asdict(self), "url": file_url(request, task_id, self.name)}


def file_url(request: Request, task_id: str, name: str) -> str:
    base = str(request.base_url).rstrip("/")
    return f"{base}/api/v1/results/{task_id}/files/{name}"


class ResultsDir:
    """FLOWMESH_RESULTS_DIR: `<task_id>/<name>` and its sidecar `<task_id>/.meta/<name>.json`.
    Every path is built from a checked task id and name, and checked again to lie directly
    inside the task's folder."""

    def __init__(self, root: Path):
        self.root = root
        # One commit (two renames) at a time, so a file and its sidecar always match when
        # the same name is uploaded twice at once.
        self.commit_lock = asyncio.Lock()

    def task_dir(self, task_id: str) -> Path:
        check_task_id(task_id)
        path = self.root / task_id
        if path.parent != self.root:  # unreachable after the check; a second lock on the door
            raise HTTPException(422, f"task id {task_id!r} is not a task id")
        return path

    def path(self, task_id: str, name: str) -> Path:
        check_name(name)
        path = self.task_dir(task_id) / name
        if path.parent.parent != self.root:
            raise HTTPException(422, f"invalid file name {name!r}: {NAME_RULE}")
        return path

    def meta_path(self, task_id: str, name: str) -> Path:
        return self.path(task_id, name).parent / META_DIR / f"{name}.json"

    def read(self, task_id: str, name: str) -> StoredFile | None:
        """The file's record, when both it and the file are there."""
        try:
            raw = json.loads(self.meta_path(task_id, name).read_bytes())
            if not self.path(task_id, name).is_file():
                return None
            return StoredFile(**raw)
        except (OSError, ValueError, TypeError):
            return None

    def list(self, task_id: str) -> list[StoredFile]:
        meta = self.task_dir(task_id) / META_DIR
        try:
            names = sorted(p.name[: -len(".json")] for p in meta.iterdir())
        except FileNotFoundError:
            return []
        found = (self.read(task_id, n) for n in names if NAME.fullmatch(n) and ".." not in n)
        return [f for f in found if f is not None]

    def commit(self, task_id: str, part: Path, stored: StoredFile) -> None:
        """Rename the received file into place and write its sidecar (temp + rename too)."""
        target = self.path(task_id, stored.name)
        meta = self.meta_path(task_id, stored.name)
        meta.parent.mkdir(exist_ok=True)
        meta_part = meta.with_name(f".{meta.name}.{uuid.uuid4().hex}.part")
        meta_part.write_text(json.dumps(asdict(stored)))
        os.replace(part, target)
        os.replace(meta_part, meta)


def check_task_id(task_id: str) -> None:
    if not TASK_ID.fullmatch(task_id):
        raise HTTPException(
            422,
            f"invalid task id {task_id!r}: a task id is 1-128 letters, digits, '_' and '-'",
        )


def check_name(name: str) -> None:
    if not NAME.fullmatch(name) or ".." in name:
        raise HTTPException(422, f"invalid file name {name!r}: {NAME_RULE}")


def _results(request: Request) -> ResultsDir:
    value: ResultsDir = request.app.state.results
    return value


def _fleet(request: Request) -> Fleet:
    value: Fleet = request.app.state.fleet
    return value


async def _check_attempt(request: Request, task_id: str, attempt: int) -> None:
    """404 for an unknown task; 409 unless `attempt` is the task's live attempt."""
    task = await _fleet(request).store.get(task_id)
    if task is None:
        raise HTTPException(404, f"task {task_id} not found")
    status = TaskStatus(task["status"])
    if status in TERMINAL:
        raise HTTPException(
            409, f"task {task_id} is {status.value}: uploads are refused for a finished task"
        )
    if status not in UPLOADABLE:
        raise HTTPException(
            409, f"task {task_id} is {status.value}: uploads come from the attempt running it"
        )
    current = int(task["attempts"])
    if attempt != current:
        raise HTTPException(
            409,
            f"attempt {attempt} is superseded by attempt {current}"
            if attempt < current
            else f"attempt {attempt} of task {task_id} does not exist (current: {current})",
        )


class _TooLarge(Exception):
    pass


def _write(fh: BinaryIO, digest: Any, chunks: list[bytes]) -> None:
    for chunk in chunks:
        digest.update(chunk)  # releases the GIL on large buffers, as the write does
    fh.writelines(chunks)  # not b''.join: that would copy every byte once more


async def _receive(request: Request, part: Path, limit: int) -> tuple[int, str]:
    """Stream the body into `part`; its size and sha256. Never more than ~2 x FLUSH_BYTES
    in memory, whatever the upload's size."""
    digest = hashlib.sha256()
    size = 0
    chunks: list[bytes] = []
    buffered = 0
    writing: asyncio.Future[None] | None = None
    fh = await asyncio.to_thread(part.open, "wb")
    try:
        async for chunk in request.stream():
            if not chunk:
                continue
            size += len(chunk)
            if size > limit:
                raise _TooLarge(size)
            chunks.append(chunk)
            buffered += len(chunk)
            if buffered >= FLUSH_BYTES:
                if writing is not None:
                    await writing
                writing = asyncio.ensure_future(asyncio.to_thread(_write, fh, digest, chunks))
                chunks, buffered = [], 0
        if writing is not None:
            await writing
            writing = None
        if chunks:
            await asyncio.to_thread(_write, fh, digest, chunks)
    finally:
        if writing is not None:  # cut off mid-write: let the thread finish before closing
            with contextlib.suppress(Exception):
                await writing
        await asyncio.to_thread(fh.close)
    return size, digest.hexdigest()


def _closing(exc: HTTPException) -> HTTPException:
    """A refusal sent before the body is read closes the connection: else uvicorn would
    read and drop the rest of the body, and the client (httpx reads no reply before its
    body is sent) would send it all, gigabytes maybe, to learn that it was refused."""
    exc.headers = {**(exc.headers or {}), "Connection": "close"}
    return exc


def _too_large(size: int, limit: int) -> HTTPException:
    return HTTPException(
        413,
        f"upload of {size} bytes exceeds the limit of {limit} bytes (FLOWMESH_MAX_UPLOAD_BYTES)",
    )


@router.post(
    "/results/{task_id}/files",
    status_code=201,
    openapi_extra=_UPLOAD_BODY,
    summary="Upload one of a task's artifacts (worker token only; raw body, sha256 header)",
)
async def upload(
    request: Request,
    task_id: str,
    name: Annotated[str, Query(description=NAME_RULE)],
    attempt: Annotated[int, Query(ge=1, description="the uploading attempt (fencing)")],
    sha256: Annotated[str | None, Header(alias=SHA_HEADER)] = None,
) -> Any:
    results = _results(request)
    limit: int = request.app.state.settings.max_upload_bytes
    try:
        target = results.path(task_id, name)  # 422 on a bad id or name
        if sha256 is None or not SHA256.fullmatch(sha256):
            raise HTTPException(
                422, f"header {SHA_HEADER} is required: the body's sha256, 64 hexadecimal digits"
            )
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise _too_large(int(declared), limit)
        await _check_attempt(request, task_id, attempt)
    except HTTPException as exc:
        raise _closing(exc) from None
    expected = sha256.lower()

    started = time.perf_counter()
    await asyncio.to_thread(target.parent.mkdir, parents=True, exist_ok=True)
    part = target.with_name(f".{name}.{uuid.uuid4().hex}.part")
    committed = False
    try:
        try:
            size, actual = await _receive(request, part, limit)
        except _TooLarge as exc:
            raise _closing(_too_large(int(exc.args[0]), limit)) from None
        except OSError as exc:  # the disk is full, most likely: worth a retry later
            log.error("upload %s/%s attempt %d: cannot write: %s", task_id, name, attempt, exc)
            raise _closing(
                HTTPException(507, f"the orchestrator cannot store {name}: {exc.strerror or exc}")
            ) from None
        except ClientDisconnect:
            # No one reads this reply; it makes the access log's line say what happened.
            log.warning("upload %s/%s attempt %d: cut off by the client", task_id, name, attempt)
            raise HTTPException(
                400, "the upload was cut off before its end; nothing was stored"
            ) from None
        if actual != expected:
            raise HTTPException(
                422,
                f"sha256 mismatch for {name}: {SHA_HEADER} says {expected}, the "
                f"{size} bytes received hash to {actual}; nothing was stored",
            )
        # The task may have moved on while the bytes came in (re-placed, cancelled).
        await _check_attempt(request, task_id, attempt)
        stored = StoredFile(name, size, actual, attempt, time.time())
        async with results.commit_lock:
            await asyncio.to_thread(results.commit, task_id, part, stored)
        committed = True
    finally:
        if not committed:
            with contextlib.suppress(FileNotFoundError):
                await asyncio.to_thread(part.unlink)
    seconds = time.perf_counter() - started
    log.info(
        "upload %s/%s attempt %d: %d bytes in %.2fs (%.1f MB/s) sha256 %s",
        task_id,
        name,
        attempt,
        size,
        seconds,
        size / seconds / 1e6 if seconds else 0.0,
        actual[:12],
    )
    return stored.view(request, task_id)


@router.get("/results/{task_id}/files", summary="List a task's uploaded files")
async def list_files(request: Request, task_id: str) -> Any:
    results = _results(request)
    check_task_id(task_id)
    files = await asyncio.to_thread(results.list, task_id)
    if not files and await _fleet(request).store.get(task_id) is None:
        raise HTTPException(404, f"task {task_id} not found")
    return {"task_id": task_id, "files": [f.view(request, task_id) for f in files]}


class _FileResponse(FileResponse):
    chunk_size = 1 << 20  # Starlette's 64 KiB costs a thread hop per 64 KiB sent


def _serve(request: Request, task_id: str, name: str) -> FileResponse:
    results = _results(request)
    stored = results.read(task_id, name)
    if stored is None:
        raise HTTPException(404, f"task {task_id} has no file named {name!r}")
    # Starlette's FileResponse answers Range (206, 416) and HEAD; the ETag is the content's.
    return _FileResponse(
        results.path(task_id, name),
        media_type="application/octet-stream",
        filename=name,
        headers={SHA_HEADER: stored.sha256, "ETag": f'"{stored.sha256}"'},
    )


@router.get(
    "/results/{task_id}/files/{name}",
    summary="Download an uploaded file (Range: bytes=a-b, a- or -n; ETag is its sha256)",
    response_class=FileResponse,
)
async def download(request: Request, task_id: str, name: str) -> FileResponse:
    return _serve(request, task_id, name)


@router.head(
    "/results/{task_id}/files/{name}",
    summary="An uploaded file's size, sha256 and ETag, without its bytes",
    response_class=FileResponse,
)
async def download_head(request: Request, task_id: str, name: str) -> FileResponse:
    return _serve(request, task_id, name)


# -- retention ---------------------------------------------------------------------------


def _task_dirs(root: Path) -> list[str]:
    try:
        return [p.name for p in root.iterdir() if p.is_dir() and TASK_ID.fullmatch(p.name)]
    except FileNotFoundError:
        return []


def _last_change(folder: Path) -> float | None:
    """The newest modification time of a task folder or anything in it."""
    try:
        times = [folder.stat().st_mtime]
        times += [p.stat().st_mtime for p in folder.rglob("*")]
    except FileNotFoundError:
        return None
    return max(times)


def _remove_stale_parts(root: Path, task_ids: list[str], now: float) -> None:
    for task_id in task_ids:
        for folder in (root / task_id, root / task_id / META_DIR):
            with contextlib.suppress(FileNotFoundError):
                for p in folder.glob(".*.part"):
                    with contextlib.suppress(FileNotFoundError):
                        if now - p.stat().st_mtime > STALE_PART_SEC:
                            p.unlink()


async def sweep(
    conn: Any, keys: Keys, root: Path, retention_sec: float, now: float | None = None
) -> list[str]:
    """Delete the folders of tasks finished more than `retention_sec` ago, and of tasks no
    longer in Redis whose files are that old; the ids of those deleted."""
    now = time.time() if now is None else now
    task_ids = await asyncio.to_thread(_task_dirs, root)
    expired = []
    for start in range(0, len(task_ids), 1000):
        batch = task_ids[start : start + 1000]
        async with conn.pipeline(transaction=False) as pipe:
            for task_id in batch:
                pipe.hmget(keys.task(task_id), "status", "finished_at", "updated_at")
            rows = await pipe.execute()
        for task_id, (status, finished, updated) in zip(batch, rows, strict=True):
            if status is None:
                # Unknown to Redis: a task deleted, or an orchestrator pointed at another
                # Redis or key prefix by mistake. Only files untouched for the retention
                # period go, so a misconfiguration never wipes recent uploads.
                changed = await asyncio.to_thread(_last_change, root / task_id)
                if changed is not None and changed + retention_sec <= now:
                    expired.append(task_id)
                continue
            ended = finished or updated
            if status in TERMINAL and ended and float(ended) + retention_sec <= now:
                expired.append(task_id)
    for task_id in expired:
        await asyncio.to_thread(shutil.rmtree, root / task_id, True)
    kept = sorted(set(task_ids) - set(expired))
    await asyncio.to_thread(_remove_stale_parts, root, kept, now)
    return expired


async def retention_loop(
    conn: Any, keys: Keys, root: Path, retention_sec: float, interval_sec: float
) -> None:
    while True:
        try:
            removed = await sweep(conn, keys, root, retention_sec)
        except (RedisError, OSError) as exc:
            log.warning("results retention sweep failed, retrying in %gs: %s", interval_sec, exc)
        except Exception:
            log.exception("results retention sweep crashed, retrying in %gs", interval_sec)
        else:
            if removed:
                log.info(
                    "results retention: deleted the files of %d task(s) finished more than "
                    "%gs ago or gone from Redis: %s",
                    len(removed),
                    retention_sec,
                    ", ".join(removed[:10]) + (" ..." if len(removed) > 10 else ""),
                )
        await asyncio.sleep(interval_sec)
