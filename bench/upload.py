"""Artifact uploads over loopback: `upload_file` to a real orchestrator, unthrottled and
throttled (WORKER_NETWORK_BANDWIDTH_BYTES_PER_SEC), and the download back with GET.

    uv run python -m bench.upload                      # 512 MB unthrottled, 100 MB at 10 MB/s
    uv run python -m bench.upload --size-mb 128 --bandwidth 5000000

A private Redis, an orchestrator (FLOWMESH_RESULTS_DIR in a temporary directory) and one
echo worker running a long echo task, the task the uploads are for: the orchestrator
takes uploads only from the attempt running a task. The file is random bytes (so nothing
compresses it along the way). MB is 10^6 bytes. The unthrottled figures are the median of
--runs rounds after one unmeasured warm-up upload; the throttled one is a single upload.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from flowmesh.client import Client
from flowmesh.demo import stop_processes
from flowmesh.embedded import EmbeddedRedis, free_port
from worker.artifacts.upload import UploadSettings, file_sha256, upload_file

ROOT = Path(__file__).resolve().parent.parent
API_TOKEN = "bench-api-token-0123456789"
WORKER_TOKEN = "bench-worker-token-0123456789"
THROTTLED_MB = 100


def _random_file(path: Path, size: int) -> Path:
    block = os.urandom(16 << 20)
    with path.open("wb") as fh:
        left = size
        while left:
            n = min(left, len(block))
            fh.write(block[:n])
            left -= n
            block = hashlib.sha512(block[:64]).digest() + block[64:]  # no two blocks alike
    return path


def _until(check: Any, timeout: float, what: str, procs: list[subprocess.Popen[bytes]]) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        if any(p.poll() is not None for p in procs):
            raise RuntimeError(f"a process exited while waiting for {what}")
        try:
            value = check()
            if value:
                return value
        except (OSError, httpx.HTTPError):
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"waiting for {what}")
        time.sleep(0.2)


def _download(url: str, token: str) -> tuple[float, str, int]:
    """Seconds, sha256 and size of a GET of `url`, the body hashed as it arrives."""
    digest = hashlib.sha256()
    size = 0
    started = time.perf_counter()
    with httpx.stream(
        "GET", url, headers={"Authorization": f"Bearer {token}"}, timeout=60
    ) as reply:
        reply.raise_for_status()
        for chunk in reply.iter_raw(1 << 20):
            digest.update(chunk)
            size += len(chunk)
    return time.perf_counter() - started, digest.hexdigest(), size


def run(size_mb: int = 512, bandwidth: int = 10_000_000, runs: int = 3) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    procs: list[subprocess.Popen[bytes]] = []
    with EmbeddedRedis() as server, tempfile.TemporaryDirectory(prefix="flowmesh-upload-") as tmp:
        scratch = Path(tmp)
        port = free_port()
        env = {
            **os.environ,
            "REDIS_URL": server.url,
            "PYTHONUNBUFFERED": "1",
            "LOG_LEVEL": "WARNING",
            "FLOWMESH_API_TOKEN": API_TOKEN,
            "FLOWMESH_WORKER_TOKEN": WORKER_TOKEN,
            "FLOWMESH_RESULTS_DIR": str(scratch / "orchestrator-results"),
            "SCHEDULER_REFRESH_SEC": "0.2",
            "HEARTBEAT_INTERVAL_SEC": "1",
            "RESULTS_DIR": str(scratch / "worker-results"),
            "WORKER_ID": "bench-upload",
            "WORKER_EXECUTORS": "echo",
        }
        try:
            for name, args in (
                ("orchestrator", ["-m", "orchestrator.main", "--port", str(port)]),
                ("worker", ["-m", "worker.main"]),
            ):
                with (scratch / f"{name}.log").open("ab") as log:
                    procs.append(
                        subprocess.Popen(
                            [sys.executable, *args],
                            env=env,
                            stdout=log,
                            stderr=subprocess.STDOUT,
                            cwd=ROOT,
                            start_new_session=True,
                        )
                    )
            base = f"http://127.0.0.1:{port}"
            with Client(base, token=API_TOKEN) as client:
                _until(client.healthy, 60, "the orchestrator", procs)
                spec = {"spec": {"taskType": "echo", "echo": {"delaySec": 3600}}}
                task_id = client.submit(spec)[0]["task_id"]
                _until(
                    lambda: client.task(task_id)["status"] == "RUNNING",
                    60,
                    "a running task",
                    procs,
                )
                rows = _measure(scratch, base, task_id, size_mb, bandwidth, runs)
                client.cancel(task_id)
        finally:
            stop_processes(procs, grace=5.0)
    return rows


def _spread(values: list[float]) -> str:
    return f"median of {len(values)}, {min(values):.0f}-{max(values):.0f}"


def _measure(
    scratch: Path, base: str, task_id: str, size_mb: int, bandwidth: int, runs: int
) -> list[dict[str, Any]]:
    big = _random_file(scratch / "artifact.bin", size_mb * 1_000_000)
    small_mb = min(THROTTLED_MB, size_mb)
    small = _random_file(scratch / "throttled.bin", small_mb * 1_000_000)
    os.sync()  # the source files' write-back would compete with the uploads' writes
    plain = UploadSettings(base_url=base, token=WORKER_TOKEN)
    sha = file_sha256(big)
    up, down = [], []
    # One unmeasured round first, as for every figure here: in a VM, the first touch of
    # the page cache's new pages costs the kernel several times the copy itself.
    upload_file(big, task_id=task_id, attempt=1, name="warm-up.bin", settings=plain, sha256=sha)
    for _ in range(runs):
        info = upload_file(big, task_id=task_id, attempt=1, settings=plain, sha256=sha)
        up.append(info.bytes_per_sec / 1e6)
        seconds, digest, size = _download(info.url, API_TOKEN)
        assert digest == sha and size == info.size, "the download differs from the upload"
        down.append(size / seconds / 1e6)
    ranged = httpx.get(
        info.url,
        headers={"Authorization": f"Bearer {API_TOKEN}", "Range": "bytes=-1000000"},
        timeout=60,
    )
    assert ranged.status_code == 206 and ranged.content == big.read_bytes()[-1_000_000:]
    throttled = UploadSettings(base_url=base, token=WORKER_TOKEN, bandwidth_bytes_per_sec=bandwidth)
    info = upload_file(small, task_id=task_id, attempt=1, settings=throttled)
    return [
        {
            "case": "upload, unthrottled",
            "mb": size_mb,
            "mb_per_sec": statistics.median(up),
            "target": ">= 300",
            "deviation_pct": None,
            "note": _spread(up),
        },
        {
            "case": "download (GET), sha256 on arrival",
            "mb": size_mb,
            "mb_per_sec": statistics.median(down),
            "target": "-",
            "deviation_pct": None,
            "note": _spread(down),
        },
        {
            "case": f"upload, throttled to {bandwidth / 1e6:g} MB/s",
            "mb": small_mb,
            "mb_per_sec": info.bytes_per_sec / 1e6,
            "target": f"{bandwidth / 1e6:g} +- 5 %",
            "deviation_pct": (info.bytes_per_sec / bandwidth - 1) * 100,
            "note": f"{info.seconds:.2f} s in all, sha256 included",
        },
    ]


def print_table(rows: list[dict[str, Any]]) -> None:
    cols = ["case", "mb", "mb_per_sec", "target", "deviation_pct", "note"]
    cells = [
        [
            str(r["case"]),
            str(r["mb"]),
            f"{r['mb_per_sec']:.1f}",
            str(r["target"]),
            "-" if r["deviation_pct"] is None else f"{r['deviation_pct']:+.2f}",
            str(r["note"]),
        ]
        for r in rows
    ]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    print("  ".join(c.ljust(w) for c, w in zip(cols, widths, strict=True)))
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--size-mb", type=int, default=512, help="unthrottled upload size (MB)")
    p.add_argument(
        "--bandwidth",
        type=int,
        default=10_000_000,
        help=f"throttled rate, bytes/s, for a {THROTTLED_MB} MB upload",
    )
    p.add_argument("--runs", type=int, default=3, help="unthrottled uploads and downloads")
    args = p.parse_args(argv)
    print_table(run(args.size_mb, args.bandwidth, args.runs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
