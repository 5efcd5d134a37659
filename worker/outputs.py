"""A task's files under RESULTS_DIR/<task_id>/, and the one finaliser that writes them.

Each attempt works in its own directory, `attempts/<n>/` (the executor's `artifacts/`,
its `logs/`). When the attempt ends, `finalise` decides where its outcome goes:

- an attempt whose outcome counts (it is the newest one and was not stopped for a reason
  outside the task) becomes the top level: its `artifacts/` and `logs/` move up, and
  `responses.json` and `manifest.json` are written beside them. Files an earlier attempt
  had there move aside to `attempts/<m>/` first, so every attempt stays readable.
- any other attempt (cancelled, superseded, handed back, interrupted, or older than the
  files already on top) writes its `responses.json` and `manifest.json` into
  `attempts/<n>/` only, never over the attempt that counts.

The manifest names the attempt the top-level files belong to. Files are complete before
the result is recorded in Redis, so a reader who sees DONE sees whole files.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

RESPONSES = "responses.json"
MANIFEST = "manifest.json"
ATTEMPTS = "attempts"
# What an attempt leaves at the top level when it counts, in the order it is moved aside
# later: the manifest last, so top-level files without a manifest are never an attempt's
# whole set (a crash part-way leaves them as orphans, see `_clear_orphans`).
TOP_LEVEL = (RESPONSES, "logs", "artifacts", MANIFEST)
ORPHANS = "orphaned"


def attempt_dir(task_dir: Path | str, attempt: int) -> Path:
    # One parse of one string: each `/` of pathlib parses again (a no-op task's child
    # spent more on paths than on writing its files).
    return Path(f"{os.fspath(task_dir)}/{ATTEMPTS}/{attempt}")


def file_sha256(path: str | Path) -> str:
    """The sha256 of a file's bytes, as hex (manifests, archives, uploads, downloads)."""
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def _write(path: str, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
    finally:
        os.close(fd)


def _write_replace(path: str, data: bytes) -> None:
    """Write whole or not at all: a reader (or a crash) never sees half a manifest."""
    tmp = f"{path}.tmp"
    _write(tmp, data)
    os.replace(tmp, path)


def _move(src: str, dest: str) -> None:
    """Move a file or directory over whatever is at `dest`; a source another process moved
    first (two workers sharing RESULTS_DIR) is not an error."""
    if os.path.isdir(dest) and not os.path.islink(dest):
        shutil.rmtree(dest, ignore_errors=True)
    with contextlib.suppress(FileNotFoundError):
        os.replace(src, dest)


def _files(root: str, rel: str = "", skip: frozenset[str] = frozenset()) -> list[tuple[str, str]]:
    """Every file under `root` as (relative posix path, absolute path), sorted; top-level
    entries named in `skip` are left out."""
    out: list[tuple[str, str]] = []
    with os.scandir(os.path.join(root, rel) if rel else root) as it:
        for entry in it:
            if not rel and entry.name in skip:
                continue
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


def top_attempt(task_dir: Path | str) -> int | None:
    """The attempt the top-level files belong to, or None when there are none."""
    try:
        with open(os.path.join(task_dir, MANIFEST), "rb") as fh:
            return int(json.load(fh)["attempt"])
    except FileNotFoundError:
        return None
    except (ValueError, KeyError, TypeError):
        return 0  # unreadable: any attempt may replace it


def _move_aside(root: str, attempt: int) -> None:
    """Move the top-level files of `attempt` into attempts/<attempt>/."""
    dest = os.path.join(root, ATTEMPTS, str(attempt))
    for name in TOP_LEVEL:
        src = os.path.join(root, name)
        if os.path.lexists(src):
            os.makedirs(dest, exist_ok=True)
            _move(src, os.path.join(dest, name))


def _clear_orphans(root: str) -> None:
    """Top-level files with no manifest: an attempt that crashed while finalising left them
    (its outcome was never recorded). Kept under attempts/orphaned/, not deleted."""
    for name in TOP_LEVEL:
        src = os.path.join(root, name)
        if os.path.lexists(src):
            dest = os.path.join(root, ATTEMPTS, ORPHANS, f"{time.time():.6f}")
            os.makedirs(dest, exist_ok=True)
            _move(src, os.path.join(dest, name))


def _manifest(root: str, responses: dict[str, Any], data: bytes, listing: bool) -> bytes:
    """manifest.json: path, size and sha256 of every file of the attempt (responses.json
    hashed from the bytes in hand), and which attempt the files belong to."""
    files = [{"path": RESPONSES, "size": len(data), "sha256": hashlib.sha256(data).hexdigest()}]
    kept: list[int] = []
    if listing:
        for rel, path in _files(root, skip=frozenset({RESPONSES, MANIFEST, ATTEMPTS})):
            files.append({"path": rel, "size": os.path.getsize(path), "sha256": file_sha256(path)})
        files.sort(key=lambda f: str(f["path"]))
        attempts = os.path.join(root, ATTEMPTS)
        if os.path.isdir(attempts):
            kept = sorted(int(n) for n in os.listdir(attempts) if n.isdigit())
    manifest = {
        "task_id": responses["task_id"],
        "attempt": responses["attempt"],
        "status": responses["status"],
        "files": files,
        "earlier_attempts": [n for n in kept if n != responses["attempt"]],
    }
    return json.dumps(manifest).encode()


def finalise(task_dir: Path | str, responses: dict[str, Any], *, counts: bool) -> bool:
    """Write one attempt's outcome (see the module docstring). Returns whether its files
    are now the task's top-level files."""
    root = os.fspath(task_dir)
    attempt = int(responses["attempt"])
    try:
        os.mkdir(root)
        fresh = True  # made just now: no executor files, no earlier attempt
    except FileExistsError:
        fresh = False
    except FileNotFoundError:
        os.makedirs(root, exist_ok=True)  # RESULTS_DIR itself is new
        fresh = True
    data = json.dumps(responses, ensure_ascii=False).encode()
    if fresh and counts:
        _write(os.path.join(root, RESPONSES), data)
        _write(os.path.join(root, MANIFEST), _manifest(root, responses, data, listing=False))
        return True
    work = os.path.join(root, ATTEMPTS, str(attempt))
    on_top = None if fresh else top_attempt(root)
    if counts and (on_top is None or on_top <= attempt):
        if on_top is not None and on_top < attempt:
            _move_aside(root, on_top)
        elif on_top is None:
            _clear_orphans(root)
        if os.path.isdir(work):
            # Its own files move up; an earlier write of its outcome into its directory
            # (it was first recorded as stopped) would contradict the top level.
            for name in (RESPONSES, MANIFEST):
                with contextlib.suppress(FileNotFoundError):
                    os.remove(os.path.join(work, name))
            for name in ("logs", "artifacts"):
                src = os.path.join(work, name)
                if os.path.isdir(src):
                    _move(src, os.path.join(root, name))
            _remove_if_empty(work)
        _write(os.path.join(root, RESPONSES), data)
        manifest = _manifest(root, responses, data, listing=True)
        _write_replace(os.path.join(root, MANIFEST), manifest)
        return True
    os.makedirs(work, exist_ok=True)
    _write(os.path.join(work, RESPONSES), data)
    _write_replace(os.path.join(work, MANIFEST), _manifest(work, responses, data, listing=True))
    return False


def demote(task_dir: Path | str, attempt: int) -> bool:
    """The attempt turned out not to count (Redis said a newer attempt exists, or it was
    stopped after its files were written): move its top-level files into
    attempts/<attempt>/. Files of any other attempt are left alone."""
    root = os.fspath(task_dir)
    if top_attempt(root) != attempt:
        return False
    _move_aside(root, attempt)
    return True


def _remove_if_empty(path: str) -> None:
    try:
        os.rmdir(path)
        os.rmdir(os.path.dirname(path))  # attempts/ itself, when no other attempt is kept
    except OSError:
        pass
