"""Benchmark runner for SAQ (Simple Async Queue) on Redis, the common peer protocol.

Run with the saq venv's python, from the repo root:

    .bench/venvs/saq/bin/python bench/peers/saq_runner.py --redis-url URL \
        --mode {throughput,latency} --tasks N --workers K --out OUT.json

Imports only saq and redis-py. Each worker process is SAQ's own CLI,
`python -m saq saq_runner.settings` (--workers 1, one asyncio process), with the defaults:
concurrency=10, dequeue_timeout=0 (BLMOVE that blocks until a job comes: no poll delay),
job ttl 600 s, WARNING logging (nothing per job). The worker side reads its configuration
from BENCH_* environment variables, because the CLI imports this module to find `settings`.

Latency mode waits with queue.apply(..., poll_interval=0.001): SAQ's apply/map polls the
job every poll_interval (default 0.5 s). `--tuned` is accepted for symmetry with the other
runners and changes nothing here.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from importlib.metadata import version as pkg_version
from pathlib import Path

import redis.asyncio as aioredis
from saq import Queue

PEER = "saq"
HERE = Path(__file__).resolve().parent

# ---- worker side (read when SAQ's CLI imports this module) ----
RUN_ID = os.environ.get("BENCH_RUN_ID", "unset")
MODE = os.environ.get("BENCH_MODE", "throughput")
WORKER_REDIS_URL = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")

APPLY_POLL_INTERVAL = 0.001  # client side, latency mode; SAQ's default is 0.5 s


def queue_name(run_id: str) -> str:
    return f"bench-{run_id}"


async def bench_task(ctx: dict, *, index: int, submitted_at: float) -> None:
    started = time.time()
    r = ctx["worker"].queue.redis
    if MODE == "latency":
        await r.rpush(f"bench:{RUN_ID}:start", f"{index}:{started!r}")
    await r.incr(f"bench:{RUN_ID}:done")


async def _startup(ctx: dict) -> None:
    await ctx["worker"].queue.redis.incr(f"bench:{RUN_ID}:ready")


settings = {
    "queue": Queue.from_url(WORKER_REDIS_URL, name=queue_name(RUN_ID)),
    "functions": [("bench_task", bench_task)],
    "startup": _startup,
}


# ---- common harness (the same in every runner of the protocol) ----
SUBMIT_CHUNK = 100  # concurrent enqueues in flight (asyncio.gather in bounded chunks)
DONE_POLL_S = 0.005
DONE_TIMEOUT_S = 300.0
READY_TIMEOUT_S = 60.0
WARMUP_TASKS = 20
RESULT_TIMEOUT_S = 30.0
STOP_GRACE_S = 5.0  # SIGTERM, then SIGKILL to the process group


# A watchdog in its own session: reads the workers' process-group ids on stdin; if its stdin
# closes without "done" (the runner was SIGKILLed, by a timeout say), it SIGKILLs those groups.
WATCHDOG = r"""
import os, signal, sys
pgids = []
for line in sys.stdin:
    line = line.strip()
    if line == "done":
        sys.exit(0)
    if line:
        pgids.append(int(line))
for g in pgids:
    try:
        os.killpg(g, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
"""


def percentile(sorted_vals: list[float], q: float) -> float:
    return sorted_vals[round(q * (len(sorted_vals) - 1))]


class Workers:
    """K worker processes, each the leader of its own process group; logs go to a temp dir."""

    def __init__(self, cmd: list[str], env: dict[str, str], k: int):
        self.logdir = Path(tempfile.mkdtemp(prefix=f"bench-{PEER}-"))
        self.procs: list[subprocess.Popen] = []
        # BENCH_KEEP_LOGS=1 (debugging) keeps the workers' logs
        self.keep_logs = os.environ.get("BENCH_KEEP_LOGS") == "1"
        if self.keep_logs:
            print(f"{PEER} worker logs in {self.logdir}", file=sys.stderr)
        self.watchdog = subprocess.Popen(
            [sys.executable, "-c", WATCHDOG],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
            text=True,
        )
        for i in range(k):
            with open(self.logdir / f"worker{i}.log", "wb") as log:
                p = subprocess.Popen(
                    cmd,
                    cwd=HERE,
                    env=env,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    start_new_session=True,
                )
            self.procs.append(p)
            self.watchdog.stdin.write(f"{p.pid}\n")
            self.watchdog.stdin.flush()

    def check_alive(self) -> None:
        for i, p in enumerate(self.procs):
            if p.poll() is not None:
                self.keep_logs = True
                raise RuntimeError(
                    f"{PEER} worker {i} exited with code {p.returncode}; logs in {self.logdir}"
                )

    def log_tail(self, n: int = 3000) -> str:
        out = []
        for f in sorted(self.logdir.glob("*.log")):
            out.append(f"--- {f}\n" + f.read_bytes()[-n:].decode(errors="replace"))
        return "\n".join(out)

    def stop(self) -> None:
        for p in self.procs:  # graceful: SIGTERM to the leader, which stops its own children
            with contextlib.suppress(ProcessLookupError):
                os.kill(p.pid, signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE_S
        for p in self.procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
        for p in self.procs:  # the whole group, children included, whatever state it is in
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(timeout=5)
        try:
            self.watchdog.stdin.write("done\n")
            self.watchdog.stdin.close()
            self.watchdog.wait(timeout=5)
        except (BrokenPipeError, subprocess.TimeoutExpired):
            self.watchdog.kill()
        if not self.keep_logs:
            shutil.rmtree(self.logdir, ignore_errors=True)


async def wait_ready(r: aioredis.Redis, workers: Workers, run_id: str, k: int) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while int(await r.get(f"bench:{run_id}:ready") or 0) < k:
        workers.check_alive()
        if time.monotonic() > deadline:
            workers.keep_logs = True
            raise RuntimeError(
                f"{PEER} workers not ready after {READY_TIMEOUT_S}s:\n{workers.log_tail()}"
            )
        await asyncio.sleep(0.05)


async def cleanup(r: aioredis.Redis, run_id: str) -> None:
    """Delete only this run's keys: bench:<run_id>:* and the peer's keys named after the run."""
    for pattern in (f"bench:{run_id}:*", f"*bench-{run_id}*"):
        batch = []
        async for key in r.scan_iter(match=pattern, count=1000):
            batch.append(key)
            if len(batch) >= 500:
                await r.delete(*batch)
                batch = []
        if batch:
            await r.delete(*batch)


def worker_env(args: argparse.Namespace, run_id: str, mode: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        BENCH_RUN_ID=run_id,
        BENCH_MODE=mode,
        BENCH_REDIS_URL=args.redis_url,
        BENCH_TUNED="1" if args.tuned else "0",
        PYTHONPATH=str(HERE) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else ""),
        PYTHONUNBUFFERED="1",
    )
    return env


# ---- peer-specific client side ----
def worker_cmd() -> list[str]:
    return [sys.executable, "-m", "saq", "saq_runner.settings"]


def settings_line(args: argparse.Namespace, mode: str) -> str:
    s = (
        f"saq {pkg_version('saq')} + redis-py {pkg_version('redis')}; "
        f"worker via saq CLI, 1 asyncio process each, concurrency=10 (default), "
        f"dequeue_timeout=0 (default: blocking BLMOVE), job ttl 600s (default), "
        f"WARNING logging (default); client queue.enqueue (no bulk API), {SUBMIT_CHUNK} concurrent "
        f"(SAQ caps in-flight enqueues at max_concurrent_ops=20, default)"
    )
    if mode == "latency":
        s += f"; result via queue.apply(poll_interval={APPLY_POLL_INTERVAL}) (default 0.5s)"
    if args.tuned:
        s += "; --tuned: no poll delay to tune, same as default"
    return s


async def run_throughput(args: argparse.Namespace, run_id: str) -> dict:
    n, k = args.tasks, args.workers
    r = aioredis.Redis.from_url(args.redis_url)
    queue = Queue.from_url(args.redis_url, name=queue_name(run_id))
    await queue.connect()
    workers = Workers(worker_cmd(), worker_env(args, run_id, "throughput"), k)
    try:
        await wait_ready(r, workers, run_id, k)
        t0 = time.perf_counter()
        for lo in range(0, n, SUBMIT_CHUNK):
            await asyncio.gather(
                *(
                    queue.enqueue("bench_task", index=i, submitted_at=time.time())
                    for i in range(lo, min(n, lo + SUBMIT_CHUNK))
                )
            )
        t_sub = time.perf_counter()
        done_key = f"bench:{run_id}:done"
        done = 0
        while True:
            done = int(await r.get(done_key) or 0)
            if done >= n or time.perf_counter() - t0 > DONE_TIMEOUT_S:
                break
            workers.check_alive()
            await asyncio.sleep(DONE_POLL_S)
        t_done = time.perf_counter()
    finally:
        workers.stop()
        await cleanup(r, run_id)
        await queue.disconnect()
        await r.aclose()
    submit_sec = t_sub - t0
    total_sec = t_done - t0
    return {
        "system": PEER,
        "version": pkg_version("saq"),
        "mode": "throughput",
        "tasks": n,
        "workers": k,
        "completed": done,
        "submit_sec": submit_sec,
        "submit_rate": n / submit_sec,
        "total_sec": total_sec,
        "throughput": n / total_sec,
        "settings": settings_line(args, "throughput"),
    }


async def run_latency(args: argparse.Namespace, run_id: str) -> dict:
    n = args.tasks
    r = aioredis.Redis.from_url(args.redis_url)
    queue = Queue.from_url(args.redis_url, name=queue_name(run_id))
    await queue.connect()
    workers = Workers(worker_cmd(), worker_env(args, run_id, "latency"), 1)
    start_key = f"bench:{run_id}:start"
    try:
        await wait_ready(r, workers, run_id, 1)

        async def one(index: int) -> tuple[float, float]:
            submitted_at = time.time()
            await queue.apply(
                "bench_task",
                timeout=RESULT_TIMEOUT_S,
                poll_interval=APPLY_POLL_INTERVAL,
                index=index,
                submitted_at=submitted_at,
            )
            return submitted_at, time.time()

        for w in range(WARMUP_TASKS):
            await one(-1 - w)
        await r.delete(start_key)
        submitted: dict[int, float] = {}
        result_ms: list[float] = []
        for i in range(n):
            sub, seen = await one(i)
            submitted[i] = sub
            result_ms.append((seen - sub) * 1000)
        raw = await r.lrange(start_key, 0, -1)
    finally:
        workers.stop()
        await cleanup(r, run_id)
        await queue.disconnect()
        await r.aclose()
    start_ms = []
    for item in raw:
        idx, ts = item.decode().split(":", 1)
        if int(idx) in submitted:
            start_ms.append((float(ts) - submitted[int(idx)]) * 1000)
    start_ms.sort()
    result_ms.sort()
    if len(start_ms) != n:
        raise RuntimeError(f"expected {n} start records, got {len(start_ms)}")
    return {
        "system": PEER,
        "version": pkg_version("saq"),
        "mode": "latency",
        "tasks": n,
        "start_p50_ms": percentile(start_ms, 0.5),
        "start_p99_ms": percentile(start_ms, 0.99),
        "result_p50_ms": percentile(result_ms, 0.5),
        "result_p99_ms": percentile(result_ms, 0.99),
        "settings": settings_line(args, "latency"),
    }


def summary(res: dict) -> str:
    head = f"{res['system']} {res['version']} {res['mode']}: "
    if res["mode"] == "throughput":
        return head + (
            f"{res['completed']}/{res['tasks']} tasks, {res['workers']} worker(s): "
            f"submit {res['submit_rate']:.0f}/s ({res['submit_sec']:.2f}s), "
            f"total {res['total_sec']:.2f}s = {res['throughput']:.0f} tasks/s"
        )
    return head + (
        f"{res['tasks']} tasks: start p50 {res['start_p50_ms']:.2f} ms "
        f"p99 {res['start_p99_ms']:.2f} ms; result p50 {res['result_p50_ms']:.2f} ms "
        f"p99 {res['result_p99_ms']:.2f} ms"
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=f"{PEER} benchmark runner (common peer protocol)")
    ap.add_argument("--redis-url", required=True)
    ap.add_argument("--mode", choices=["throughput", "latency"], required=True)
    ap.add_argument("--tasks", type=int, required=True)
    ap.add_argument(
        "--workers", type=int, default=1, help="worker processes (throughput mode; latency uses 1)"
    )
    ap.add_argument("--out", required=True)
    ap.add_argument(
        "--tuned", action="store_true", help="accepted for symmetry; changes nothing for saq"
    )
    args = ap.parse_args(argv)
    if args.tasks < 1 or args.workers < 1:
        ap.error("--tasks and --workers must be >= 1")
    run_id = uuid.uuid4().hex[:12]
    # a SIGTERM from whoever runs us still unwinds through the finally blocks that stop the workers
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    runner = run_throughput if args.mode == "throughput" else run_latency
    res = asyncio.run(runner(args, run_id))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=2) + "\n")
    print(summary(res), flush=True)
    return 0 if res.get("completed", res["tasks"]) >= res["tasks"] else 1


if __name__ == "__main__":
    sys.exit(main())
