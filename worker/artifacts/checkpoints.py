"""A training task's checkpoints across attempts: resume, not restart.

Each attempt's trainer writes `checkpoint-<step>/` directories under its own
`attempts/<n>/checkpoints/`; they stay there when the attempt ends (they are not the
task's artifacts). When the task's output goes over HTTP, each one is also archived and
uploaded to the orchestrator in the background as `checkpoint-<step>.tar.gz`, so it
survives the loss of this worker's disk.

A later attempt, on this worker or any other, asks for `latest()`: the highest step
among the complete local checkpoints of earlier attempts and the uploaded ones (an
uploaded one is downloaded, checked and extracted into the worker's cache).
"""

from __future__ import annotations

import contextlib
import os
import queue
import re
import shutil
import threading
from pathlib import Path
from typing import Any

import httpx

from executors.base import Checkpoints, RetryableError
from worker.artifacts.archive import create_archive
from worker.artifacts.config import ArtifactsConfig
from worker.artifacts.fetch import ArtifactCache
from worker.artifacts.upload import upload_file
from worker.outputs import ATTEMPTS

STEP = re.compile(r"^checkpoint-(\d+)(?:\.tar(?:\.gz|\.zst)?)?$")
# What makes an HF Trainer checkpoint whole: the Trainer writes it last.
COMPLETE_MARKER = "trainer_state.json"


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:  # another filesystem, or links not allowed
        shutil.copy2(src, dst)


def _step(name: str) -> int | None:
    match = STEP.match(name)
    return int(match.group(1)) if match else None


class TaskCheckpoints(Checkpoints):
    def __init__(
        self,
        *,
        task_id: str,
        attempt: int,
        task_dir: Path,
        upload: bool,
        config: ArtifactsConfig,
        cache: ArtifactCache,
        log: Any,
    ):
        self.task_id = task_id
        self.attempt = attempt
        self.task_dir = task_dir
        self.upload = upload
        self.config = config
        self.cache = cache
        self.log = log
        self._queue: queue.SimpleQueue[Path | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._failed: list[str] = []
        self._dropping = False

    # -- an earlier attempt's ------------------------------------------------------------
    def _local(self) -> list[tuple[int, Path]]:
        found = []
        for path in (self.task_dir / ATTEMPTS).glob("*/checkpoints/checkpoint-*"):
            step = _step(path.name)
            if step is not None and path.is_dir() and (path / COMPLETE_MARKER).is_file():
                found.append((step, path))
        return found

    def _remote(self) -> list[tuple[int, str, str]]:
        up = self.config.upload
        if not self.upload or up is None:
            return []
        headers = {"Authorization": f"Bearer {up.token}"} if up.token else {}
        url = f"{up.base_url}/api/v1/results/{self.task_id}/files"
        try:
            reply = httpx.get(url, headers=headers, timeout=up.timeout)
        except httpx.HTTPError as exc:
            raise RetryableError(f"listing the task's uploaded checkpoints failed: {exc}") from exc
        if reply.status_code == 404:
            return []
        if reply.status_code != 200:
            raise RetryableError(
                f"listing the task's uploaded checkpoints: HTTP {reply.status_code} {reply.text}"
            )
        found = []
        for f in reply.json().get("files", []):
            step = _step(str(f.get("name")))
            if step is not None:
                found.append((step, str(f["url"]), str(f["sha256"])))
        return found

    def latest(self) -> Path | None:
        local = self._local()
        remote = self._remote()
        best_local = max(local, default=None, key=lambda c: c[0])
        best_remote = max(remote, default=None, key=lambda c: c[0])
        if best_remote is not None and (best_local is None or best_remote[0] > best_local[0]):
            step, url, sha = best_remote
            self.log.info("checkpoint at step %d: downloading it from the orchestrator", step)
            try:
                return self.cache.resolve(url, sha)
            except Exception as exc:
                if getattr(exc, "retryable", False):  # the network: a later attempt may do
                    raise RetryableError(f"downloading checkpoint-{step} failed: {exc}") from exc
                # A damaged upload: an older checkpoint (or none) rather than no training.
                self.log.warning(
                    "checkpoint-%d cannot be used (%s); not resuming from it", step, exc
                )
        return best_local[1] if best_local is not None else None

    # -- this attempt's ------------------------------------------------------------------
    def saved(self, path: Path) -> None:
        if not self.upload or self.config.upload is None:
            return
        # A snapshot of hard links, taken now: the trainer may delete the directory (its
        # save_total_limit) while the upload still reads it.
        snapshot = self._outbox / path.name
        shutil.rmtree(snapshot, ignore_errors=True)
        shutil.copytree(path, snapshot, copy_function=_link_or_copy)
        if self._thread is None:
            self._thread = threading.Thread(target=self._uploader, name="checkpoints", daemon=True)
            self._thread.start()
        self._queue.put(snapshot)

    @property
    def _outbox(self) -> Path:
        return self.task_dir / ATTEMPTS / str(self.attempt) / "checkpoint-uploads"

    def _uploader(self) -> None:
        assert self.config.upload is not None
        outbox = self._outbox
        while (path := self._queue.get()) is not None:
            if self._dropping:
                shutil.rmtree(path, ignore_errors=True)
                continue
            try:
                info = create_archive(path, outbox, self.config.archive)
                sent = upload_file(
                    info.path,
                    task_id=self.task_id,
                    attempt=self.attempt,
                    settings=self.config.upload,
                    sha256=info.sha256,
                    log=self.log,
                )
                self.log.info("checkpoint %s uploaded (%s)", path.name, sent.url)
            except Exception as exc:  # the training goes on; flush() reports it
                self.log.warning("checkpoint %s not uploaded: %s", path.name, exc)
                self._failed.append(f"{path.name}: {exc}")
            finally:
                # The trainer's own directory stays (a local resume reads it); the snapshot
                # and its archive were only for the upload.
                shutil.rmtree(path, ignore_errors=True)
                for leftover in outbox.glob(f"{path.name}.tar*"):
                    leftover.unlink(missing_ok=True)

    def flush(self) -> None:
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join()
            self._thread = None
        self._tidy()
        if self._failed:
            # Not the task's failure: its final model is there. A later attempt would only
            # resume from an older checkpoint.
            self.log.warning("%d checkpoint upload(s) failed: %s", len(self._failed), self._failed)

    def discard(self) -> None:
        # Queued snapshots are dropped; one being uploaded finishes in its daemon thread
        # (or dies with the process), the task does not wait for it.
        self._dropping = True
        self._queue.put(None)
        self._thread = None

    def _tidy(self) -> None:
        with contextlib.suppress(OSError):
            self._outbox.rmdir()  # empty once every snapshot was sent
