"""After an executor's run: archive `final_model/` and `final_lora/`, upload them when the
task's output goes over HTTP, and say where they are in the result.

Runs in the executor's child process, after `run` returned and before the result is
recorded, so a reader who sees DONE can download the archive. An upload that fails is
retried on its own (`upload_file`); the training is never run again for it.

Result fields, for each final directory `<d>` (final_model, final_lora) the run wrote:
`<d>_path` and `<d>_archive_path` (absolute, where they are once the attempt's files are
the task's: RESULTS_DIR/<task_id>/artifacts/), `<d>_archive_sha256`, `<d>_archive_size`,
with HTTP also `<d>_archive_url`; and `archives.<d>` with how it was made and sent.
An uploaded archive goes into the worker's artifact cache too, so a later task here that
takes its URL as input (a pipeline's next stage) finds it without a download.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from executors.base import ExecutorError, PermanentError, RetryableError, TaskContext
from worker.artifacts.archive import create_archive
from worker.artifacts.config import ArtifactsConfig
from worker.artifacts.fetch import ArtifactCache
from worker.artifacts.upload import UploadError, UploadRefused, upload_file

FINAL_DIRS = ("final_model", "final_lora")


class UploadUnavailable(ExecutorError):
    """The task's output goes over HTTP and this worker cannot upload: another may."""


def wants_http(ctx: TaskContext) -> bool:
    output = ctx.body.output
    return output is not None and output.destination.type == "http"


def check_destination(ctx: TaskContext, config: ArtifactsConfig | None) -> None:
    """Before the run: a task whose archives must be uploaded fails at once (and goes to
    another worker) when this one has no orchestrator to upload to."""
    if wants_http(ctx) and (config is None or config.upload is None):
        raise UploadUnavailable(
            "spec.output.destination.type is http, but this worker has no "
            "ORCHESTRATOR_BASE_URL to upload its archives to"
        )


def final_dirs(ctx: TaskContext) -> list[str]:
    """The final directories the run wrote, of FINAL_DIRS. Asked after every task: most
    write no artifacts at all, and then this is one failed lookup, not one per name."""
    root = os.path.join(ctx.work_dir, "artifacts")  # ctx.artifacts_dir, without pathlib
    try:
        names = os.listdir(root)
    except OSError:
        return []
    return [d for d in FINAL_DIRS if d in names and os.path.isdir(os.path.join(root, d))]


def publish(
    ctx: TaskContext,
    result: Any,
    config: ArtifactsConfig,
    task_dir: Path,
    cache: ArtifactCache | None = None,
) -> Any:
    """`result` with the run's final directories archived (and uploaded) and where they
    are; as it is when the run wrote none. `task_dir`: RESULTS_DIR/<task_id>. `cache`:
    the worker's artifact cache, which adopts each uploaded archive."""
    finals = final_dirs(ctx)
    if not finals:
        return result
    log = ctx.log
    out: dict[str, Any] = dict(result) if isinstance(result, dict) else {"value": result}
    archives: dict[str, Any] = dict(out.get("archives") or {})
    for name in finals:
        info = create_archive(ctx.artifacts_dir / name, ctx.artifacts_dir, config.archive)
        log.info(
            "archived %s: %s, %d bytes (%.1f MB/s, %s)",
            name,
            info.path.name,
            info.size,
            info.source_bytes / max(info.seconds, 1e-9) / 1e6,
            info.method,
        )
        final = task_dir / "artifacts"
        out[f"{name}_path"] = str(final / name)
        out[f"{name}_archive_path"] = str(final / info.path.name)
        out[f"{name}_archive_sha256"] = info.sha256
        out[f"{name}_archive_size"] = info.size
        entry: dict[str, Any] = {
            "file": info.path.name,
            "format": info.format,
            "method": info.method,
            "source_bytes": info.source_bytes,
            "archive_sec": round(info.seconds, 3),
        }
        if wants_http(ctx):
            assert config.upload is not None  # check_destination ran before the task
            try:
                sent = upload_file(
                    info.path,
                    task_id=ctx.task_id,
                    attempt=ctx.attempt,
                    settings=config.upload,
                    sha256=info.sha256,
                    log=log,
                )
            except UploadRefused as exc:
                # The orchestrator will never take it (superseded, finished, too large, a
                # wrong worker token): another attempt would train again for nothing.
                raise PermanentError(f"upload of {info.path.name} refused: {exc}") from exc
            except UploadError as exc:
                # Retried for WORKER_UPLOAD_RETRIES with backoff and still failing. Another
                # attempt resumes from the final checkpoint (with save_steps) and uploads.
                raise RetryableError(f"upload of {info.path.name} failed: {exc}") from exc
            out[f"{name}_archive_url"] = sent.url
            if cache is not None:
                cache.adopt(sent.url, info.sha256, info.path, ctx.artifacts_dir / name)
            entry["upload"] = {
                "seconds": round(sent.seconds, 3),
                "bytes_per_sec": round(sent.bytes_per_sec),
                "tries": sent.tries,
            }
            log.info(
                "uploaded %s to %s in %.2fs (%.1f MB/s, %d tries)",
                info.path.name,
                sent.url,
                sent.seconds,
                sent.bytes_per_sec / 1e6,
                sent.tries,
            )
        archives[name] = entry
    out["archives"] = archives
    return out
