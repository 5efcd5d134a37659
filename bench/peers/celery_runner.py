"""Benchmark runner for Celery (https://docs.celeryq.dev), the common peer protocol.

Run with the celery venv's python, from the repo root:

    .bench/venvs/celery/bin/python bench/peers/celery_runner.py --redis-url URL \
        --mode {throughput,latency} --tasks N --workers K --out OUT.json [--pool {solo,prefork}]

Imports only celery (kombu) and redis-py. Worker processes are started with Celery's own
CLI (`python -m celery -A celery_runner worker ...`), each in its own process group, and
are killed at the end. The worker side reads its configuration from BENCH_* environment
variables, because the CLI builds the app when it imports this module.

Settings (the headline):
- `--pool=solo` (the default of `--pool` here): the task runs in the worker process
  itself. Measured faster than `--pool=prefork --concurrency=1` (the consumer hands each
  task to a forked child over a pipe and reads the result back) in throughput and latency,
  see the report; `--pool prefork` gives the other number.
- prefetch: Celery's default, `worker_prefetch_multiplier=4` (x concurrency 1);
- acks: Celery's default, early ack (`task_acks_late=False`);
- throughput mode: no result backend (`task_ignore_result=True`); latency mode: the Redis
  result backend on the same Redis, results read with `AsyncResult.get()` (pub/sub);
- default WARNING log level (no per-task log line); remote control off
  (`worker_enable_remote_control=False`, `--without-gossip --without-mingle`): no pidbox
  keys are left behind and nothing else shares the connection;
- client: `apply_async` in a loop on one producer (`app.producer_or_acquire()`): Celery has
  no bulk enqueue (a `group`/`chunks` is a different workload).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from contextlib import suppress
from importlib.metadata import version as pkg_version
from pathlib import Path
from typing import Any

import redis
from celery import Celery
from celery.signals import worker_ready

PEER = "celery"
HERE = Path(__file__).resolve().parent
TASK_NAME = "bench_task"

# ---- worker side (read when Celery's CLI imports this module) ----
RUN_ID = os.environ.get("BENCH_RUN_ID", "unset")
MODE = os.environ.get("BENCH_MODE", "throughput")
WORKER_REDIS_URL = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")


def queue_for(run_id: str) -> str:
    return f"bench-{run_id}"


def make_app(redis_url: str, run_id: str, mode: str) -> Celery:
    app = Celery(
        "celery_runner",
        broker=redis_url,
        backend=redis_url if mode == "latency" else None,
        set_as_current=False,
    )
    app.conf.update(
        task_default_queue=queue_for(run_id),
        task_ignore_result=(mode != "latency"),
        worker_enable_remote_control=False,
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
    )
    app.task(name=TASK_NAME)(bench_task)
    return app


_client: Any = None
_client_pid = -1


def _redis() -> Any:
    """One client per process (a prefork child must not share its parent's sockets)."""
    global _client, _client_pid
    if _client is None or _client_pid != os.getpid():
        _client = redis.Redis.from_url(WORKER_REDIS_URL)
        _client_pid = os.getpid()
    return _client


def bench_task(index: int, submitted_at: float) -> None:
    started = time.time()
    r = _redis()
    if MODE == "latency":
        r.rpush(f"bench:{RUN_ID}:start", f"{index}:{started!r}")
    r.incr(f"bench:{RUN_ID}:done")


app = make_app(WORKER_REDIS_URL, RUN_ID, MODE)


@worker_ready.connect
def _on_ready(**_: Any) -> None:
    redis.Redis.from_url(WORKER_REDIS_URL).incr(f"bench:{RUN_ID}:ready")


# ---- common harness (the same in every runner of the protocol) ----
DONE_POLL_S = 0.005
DONE_TIMEOUT_S = 300.0
READY_TIMEOUT_S = 60.0
WARMUP_TASKS = 20
RESULT_TIMEOUT_S = 30.0


def _die_with_parent() -> None:
    """Runs in the child before exec: SIGTERM it if the runner dies without cleaning up (Linux)."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except Exception:
        pass


def _descendants(pid: int) -> list[int]:
    """All live descendants of pid (from /proc), so children that left the group die too."""
    children: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
            ppid = int(stat[stat.rindex(")") + 2 :].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(d.name))
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def percentile(sorted_vals: list[float], q: float) -> float:
    return sorted_vals[round(q * (len(sorted_vals) - 1))]


class Workers:
    """Worker processes, each the leader of its own process group; logs go to a temp dir."""

    def __init__(self, cmds: list[list[str]], env: dict[str, str]):
        self.logdir = Path(tempfile.mkdtemp(prefix=f"bench-{PEER}-"))
        self.procs: list[subprocess.Popen] = []
        self.keep_logs = False
        for i, cmd in enumerate(cmds):
            with open(self.logdir / f"worker{i}.log", "wb") as log:  # Popen keeps its own copy
                self.procs.append(
                    subprocess.Popen(
                        cmd,
                        cwd=HERE,
                        env=env,
                        stdout=log,
                        stderr=subprocess.STDOUT,
                        stdin=subprocess.DEVNULL,
                        start_new_session=True,
                        preexec_fn=_die_with_parent,
                    )
                )

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
        # children that made their own process group (RQ's work horse) are found through /proc
        strays = {c for p in self.procs for c in _descendants(p.pid)}
        for p in self.procs:
            with suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGTERM)
        deadline = time.monotonic() + 5
        for p in self.procs:
            with suppress(subprocess.TimeoutExpired):
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
        strays |= {c for p in self.procs if p.poll() is None for c in _descendants(p.pid)}
        for p in self.procs:  # the whole group, children included, whatever state it is in
            with suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGKILL)
            with suppress(subprocess.TimeoutExpired):
                p.wait(timeout=5)
        for pid in strays:
            with suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if not self.keep_logs:
            shutil.rmtree(self.logdir, ignore_errors=True)


def wait_ready(r: redis.Redis, workers: Workers, run_id: str, k: int) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while int(r.get(f"bench:{run_id}:ready") or 0) < k:
        workers.check_alive()
        if time.monotonic() > deadline:
            workers.keep_logs = True
            raise RuntimeError(
                f"{PEER} workers not ready after {READY_TIMEOUT_S}s:\n{workers.log_tail()}"
            )
        time.sleep(0.05)


def cleanup(r: redis.Redis, run_id: str) -> None:
    """Delete only this run's keys: bench:<run_id>:* and the peer's keys named after the run."""
    for pattern in (f"bench:{run_id}:*", f"*bench-{run_id}*"):
        batch = []
        for key in r.scan_iter(match=pattern, count=1000):
            batch.append(key)
            if len(batch) >= 500:
                r.delete(*batch)
                batch = []
        if batch:
            r.delete(*batch)


def worker_env(args: argparse.Namespace, run_id: str, mode: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        BENCH_RUN_ID=run_id,
        BENCH_MODE=mode,
        BENCH_REDIS_URL=args.redis_url,
        PYTHONPATH=str(HERE) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else ""),
        PYTHONUNBUFFERED="1",
    )
    return env


def wait_done(r: redis.Redis, workers: Workers, run_id: str, n: int, t0: float) -> int:
    done_key = f"bench:{run_id}:done"
    while True:
        done = int(r.get(done_key) or 0)
        if done >= n or time.perf_counter() - t0 > DONE_TIMEOUT_S:
            return done
        workers.check_alive()
        time.sleep(DONE_POLL_S)


def start_times(r: redis.Redis, run_id: str, submitted: dict[int, float]) -> list[float]:
    start_ms = []
    for item in r.lrange(f"bench:{run_id}:start", 0, -1):
        idx, ts = item.decode().split(":", 1)
        if int(idx) in submitted:
            start_ms.append((float(ts) - submitted[int(idx)]) * 1000)
    if len(start_ms) != len(submitted):
        raise RuntimeError(f"expected {len(submitted)} start records, got {len(start_ms)}")
    return sorted(start_ms)


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


# ---- peer-specific client side ----
def worker_cmds(args: argparse.Namespace, run_id: str, k: int) -> list[list[str]]:
    return [
        [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "celery_runner",
            "worker",
            f"--pool={args.pool}",
            "--concurrency=1",
            "--loglevel=WARNING",
            "--without-gossip",
            "--without-mingle",
            "-n",
            f"bench-{run_id}-w{i}@%h",
        ]
        for i in range(k)
    ]


def settings_line(args: argparse.Namespace, mode: str) -> str:
    v = pkg_version
    parts = [
        f"celery {v('celery')} + kombu {v('kombu')} + redis-py {v('redis')}",
        "worker via celery CLI: "
        + (
            "pool=solo (task runs in the worker process)"
            if args.pool == "solo"
            else "pool=prefork, concurrency=1"
        ),
        "prefetch multiplier 4 (default)",
        "early ack (default)",
        "remote control/gossip/mingle off",
        "log level WARNING (default)",
    ]
    if mode == "latency":
        parts.append("result backend: Redis (same server), AsyncResult.get() (pub/sub)")
    else:
        parts.append("no result backend (task_ignore_result)")
        parts.append("client apply_async in a loop on one producer (no bulk API)")
    return "; ".join(parts)


def run_throughput(args: argparse.Namespace, run_id: str) -> dict:
    n, k = args.tasks, args.workers
    r = redis.Redis.from_url(args.redis_url)
    client = make_app(args.redis_url, run_id, "throughput")
    task = client.tasks[TASK_NAME]
    workers = Workers(worker_cmds(args, run_id, k), worker_env(args, run_id, "throughput"))
    try:
        wait_ready(r, workers, run_id, k)
        with client.producer_or_acquire() as producer:
            t0 = time.perf_counter()
            for i in range(n):
                task.apply_async((i, time.time()), task_id=f"bench-{run_id}-{i}", producer=producer)
            t_sub = time.perf_counter()
        done = wait_done(r, workers, run_id, n, t0)
        t_done = time.perf_counter()
    finally:
        workers.stop()
        cleanup(r, run_id)
        client.close()
        r.close()
    submit_sec = t_sub - t0
    total_sec = t_done - t0
    return {
        "system": PEER,
        "version": pkg_version("celery"),
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


def run_latency(args: argparse.Namespace, run_id: str) -> dict:
    n = args.tasks
    r = redis.Redis.from_url(args.redis_url)
    client = make_app(args.redis_url, run_id, "latency")
    task = client.tasks[TASK_NAME]
    workers = Workers(worker_cmds(args, run_id, 1), worker_env(args, run_id, "latency"))
    try:
        wait_ready(r, workers, run_id, 1)

        def one(index: int) -> tuple[float, float]:
            submitted_at = time.time()
            res = task.apply_async((index, submitted_at), task_id=f"bench-{run_id}-{index}")
            res.get(timeout=RESULT_TIMEOUT_S)
            seen = time.time()
            res.forget()  # drops the result key (cleanup would too); not timed
            return submitted_at, seen

        for w in range(WARMUP_TASKS):
            one(-1 - w)
        r.delete(f"bench:{run_id}:start")
        submitted: dict[int, float] = {}
        result_ms: list[float] = []
        for i in range(n):
            sub, seen = one(i)
            submitted[i] = sub
            result_ms.append((seen - sub) * 1000)
        start_ms = start_times(r, run_id, submitted)
    finally:
        workers.stop()
        cleanup(r, run_id)
        client.close()
        r.close()
    result_ms.sort()
    return {
        "system": PEER,
        "version": pkg_version("celery"),
        "mode": "latency",
        "tasks": n,
        "start_p50_ms": percentile(start_ms, 0.5),
        "start_p99_ms": percentile(start_ms, 0.99),
        "result_p50_ms": percentile(result_ms, 0.5),
        "result_p99_ms": percentile(result_ms, 0.99),
        "settings": settings_line(args, "latency"),
    }


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
        "--pool",
        choices=["solo", "prefork"],
        default="solo",
        help="worker pool (prefork runs with --concurrency=1); solo is the headline",
    )
    args = ap.parse_args(argv)
    if args.tasks < 1 or args.workers < 1:
        ap.error("--tasks and --workers must be >= 1")
    run_id = uuid.uuid4().hex[:12]
    # a SIGTERM from whoever runs us still unwinds through the finally blocks that stop the workers
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    runner = run_throughput if args.mode == "throughput" else run_latency
    res = runner(args, run_id)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=2) + "\n")
    print(summary(res), flush=True)
    return 0 if res.get("completed", res["tasks"]) >= res["tasks"] else 1


if __name__ == "__main__":
    sys.exit(main())
