"""Per-task output files: `responses.json` and `manifest.json` under RESULTS_DIR/<task_id>/.

Written by the executor child right after `run` returns (so the worker's event loop does
no file I/O per task), and by the worker only when it overrides the child's record (a
timeout, a crash). Both files are complete before the result is recorded in Redis, so a
reader who sees DONE sees whole files; a crash part-way leaves the task unrecorded and
its retry rewrites them.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any

RESPONSES = "responses.json"
MANIFEST = "manifest.json"


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _write(path: str, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
    finally:
        os.close(fd)


def _files(root: str, rel: str = "") -> list[tuple[str, str]]:
    """Every file under `root` as (relative posix path, absolute path), sorted."""
    out: list[tuple[str, str]] = []
    with os.scandir(os.path.join(root, rel) if rel else root) as it:
        for entry in it:
            name = f"{rel}/{entry.name}" if rel else entry.name
            if entry.is_dir(follow_symlinks=False):
                out.extend(_files(root, name))
            elif entry.is_file(follow_symlinks=False):
                out.append((name, entry.path))
    return sorted(out)


def summary(
    *,
    task_id: str,
    attempt: int,
    worker_id: str,
    task_type: str,
    started_at: float,
    elapsed: float,
    result: Any,
    error: dict[str, Any] | None,
) -> dict[str, Any]:
    """The content of responses.json for one attempt; FAILED when there is an error."""
    return {
        "task_id": task_id,
        "attempt": attempt,
        "worker_id": worker_id,
        "task_type": task_type,
        "status": "FAILED" if error else "DONE",
        "started_at": started_at,
        "finished_at": time.time(),
        "elapsed_sec": elapsed,
        "result": result,
        "error": error,
    }


def write_outputs(out_dir: Path | str, responses: dict[str, Any]) -> dict[str, Any]:
    """Write responses.json, then a manifest (path, size, sha256) of every file in the
    task directory. responses.json is hashed from the bytes in hand, not read back."""
    root = os.fspath(out_dir)
    try:
        os.mkdir(root)
        fresh = True  # made just now: the executor wrote nothing, nothing to list
    except FileExistsError:
        fresh = False
    except FileNotFoundError:
        os.makedirs(root, exist_ok=True)  # RESULTS_DIR itself is new
        fresh = False
    data = json.dumps(responses, ensure_ascii=False).encode()
    _write(os.path.join(root, RESPONSES), data)
    files = []
    for rel, path in [(RESPONSES, "")] if fresh else _files(root):
        if rel == MANIFEST:
            continue
        if rel == RESPONSES:
            files.append(
                {"path": rel, "size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
            )
        else:
            files.append({"path": rel, "size": os.path.getsize(path), "sha256": _sha256(path)})
    manifest = {"task_id": responses["task_id"], "attempt": responses["attempt"], "files": files}
    _write(os.path.join(root, MANIFEST), json.dumps(manifest).encode())
    return manifest
