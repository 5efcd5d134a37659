"""Benchmark runner for RQ (https://python-rq.org), the common peer protocol.

Run with the rq venv's python, from the repo root:

    .bench/venvs/rq/bin/python bench/peers/rq_runner.py --redis-url URL \
        --mode {throughput,latency} --tasks N --workers K --out OUT.json \
        [--worker-class {default,simple}] [--result-wait {poll,block}]

Imports only rq and redis-py. Workers are started with RQ's own CLI
(`python -m rq.cli worker -u URL QUEUE`), each in its own process group, and are killed
at the end (RQ's work horses make their own process group: they are found through /proc
and killed too). The task reads the run id and mode from BENCH_* environment variables.

Settings (the headline):
- the default `rq.Worker`: it forks a work horse for every job (RQ's natural setting, and
  its cost); `--worker-class simple` runs `rq.SimpleWorker` (no fork, the job runs in the
  worker process), which is not the headline;
- one job at a time per worker, no prefetch (the worker pops one job with a blocking read);
- RQ's default result storage (every job's result kept 500 s, `result_ttl`), default INFO
  logging (a few log lines per job);
- client: `Queue.enqueue_many` (one pipeline per chunk of SUBMIT_CHUNK jobs);
- latency mode: `job.latest_result()` polled every 1 ms (`--result-wait block` uses
  `job.latest_result(timeout=...)`, a blocking XREAD on the result stream, instead).
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

import redis
from rq import Queue, Worker, get_current_job
from rq.worker import WorkerStatus

PEER = "rq"
HERE = Path(__file__).resolve().parent
TASK = "rq_runner.bench_task"  # by import path: the client runs this file as __main__
SUBMIT_CHUNK = 100  # jobs per enqueue_many call (one pipeline each)
RESULT_POLL_S = 0.001

# ---- worker side (read when RQ's work horse imports this module) ----
RUN_ID = os.environ.get("BENCH_RUN_ID", "unset")
MODE = os.environ.get("BENCH_MODE", "throughput")


def queue_for(run_id: str) -> str:
    return f"bench-{run_id}"


def bench_task(index: int, submitted_at: float) -> None:
    started = time.time()
    r = get_current_job().connection  # the worker's own connection
    if MODE == "latency":
        r.rpush(f"bench:{RUN_ID}:start", f"{index}:{started!r}")
    r.incr(f"bench:{RUN_ID}:done")


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
WORKER_CLASSES = {"default": "rq.Worker", "simple": "rq.SimpleWorker"}


def worker_cmds(args: argparse.Namespace, run_id: str, k: int) -> list[list[str]]:
    return [
        [
            sys.executable,
            "-m",
            "rq.cli",
            "worker",
            "-u",
            args.redis_url,
            "-w",
            WORKER_CLASSES[args.worker_class],
            "-n",
            f"bench-{run_id}-w{i}",
            queue_for(run_id),
        ]
        for i in range(k)
    ]


def wait_rq_ready(r: redis.Redis, workers: Workers, queue: Queue, k: int) -> None:
    """Ready: k workers registered on the queue, all idle (waiting in their blocking pop)."""
    deadline = time.monotonic() + READY_TIMEOUT_S
    while True:
        ws = Worker.all(connection=r, queue=queue)
        if len(ws) >= k and all(w.get_state() == WorkerStatus.IDLE for w in ws):
            return
        workers.check_alive()
        if time.monotonic() > deadline:
            workers.keep_logs = True
            raise RuntimeError(
                f"{PEER} workers not ready after {READY_TIMEOUT_S}s:\n{workers.log_tail()}"
            )
        time.sleep(0.05)


def rq_cleanup(r: redis.Redis, run_id: str, queue: Queue) -> None:
    cleanup(r, run_id)
    # the shared sets that name this run's queue and workers
    r.srem("rq:queues", queue.key)
    stale = [m for m in r.smembers("rq:workers") if f"bench-{run_id}".encode() in m]
    if stale:
        r.srem("rq:workers", *stale)


def settings_line(args: argparse.Namespace, mode: str) -> str:
    if args.worker_class == "default":
        wc = "rq.Worker (default: forks a work horse per job)"
    else:
        wc = "rq.SimpleWorker (NOT the default: no fork, job runs in the worker process)"
    parts = [
        f"rq {pkg_version('rq')} + redis-py {pkg_version('redis')}",
        f"worker via rq CLI: {wc}",
        "one job at a time, no prefetch (BLMOVE to an intermediate queue, no explicit ack)",
        "results kept 500 s (default result_ttl)",
        "INFO logging (default)",
    ]
    if mode == "latency":
        if args.result_wait == "poll":
            parts.append(f"result: job.latest_result() polled every {RESULT_POLL_S * 1000:g} ms")
        else:
            parts.append("result: job.latest_result(timeout=...) (blocking XREAD)")
    else:
        parts.append(f"client Queue.enqueue_many in chunks of {SUBMIT_CHUNK}")
    return "; ".join(parts)


def run_throughput(args: argparse.Namespace, run_id: str) -> dict:
    n, k = args.tasks, args.workers
    r = redis.Redis.from_url(args.redis_url)
    q = Queue(queue_for(run_id), connection=r)
    workers = Workers(worker_cmds(args, run_id, k), worker_env(args, run_id, "throughput"))
    try:
        wait_rq_ready(r, workers, q, k)
        t0 = time.perf_counter()
        for lo in range(0, n, SUBMIT_CHUNK):
            q.enqueue_many(
                [
                    Queue.prepare_data(TASK, (i, time.time()), job_id=f"bench-{run_id}-{i}")
                    for i in range(lo, min(n, lo + SUBMIT_CHUNK))
                ]
            )
        t_sub = time.perf_counter()
        done = wait_done(r, workers, run_id, n, t0)
        t_done = time.perf_counter()
    finally:
        workers.stop()
        rq_cleanup(r, run_id, q)
        r.close()
    submit_sec = t_sub - t0
    total_sec = t_done - t0
    return {
        "system": PEER,
        "version": pkg_version("rq"),
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
    q = Queue(queue_for(run_id), connection=r)
    workers = Workers(worker_cmds(args, run_id, 1), worker_env(args, run_id, "latency"))
    try:
        wait_rq_ready(r, workers, q, 1)

        def one(index: int) -> tuple[float, float]:
            submitted_at = time.time()
            job = q.enqueue(TASK, index, submitted_at, job_id=f"bench-{run_id}-{index}")
            if args.result_wait == "block":
                res = job.latest_result(timeout=int(RESULT_TIMEOUT_S))
            else:
                deadline = time.monotonic() + RESULT_TIMEOUT_S
                while (res := job.latest_result()) is None and time.monotonic() < deadline:
                    time.sleep(RESULT_POLL_S)
            seen = time.time()
            if res is None:
                raise RuntimeError(f"no result for job {job.id} after {RESULT_TIMEOUT_S}s")
            if res.type != res.Type.SUCCESSFUL:
                raise RuntimeError(f"job {job.id} failed: {res.exc_string}")
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
        rq_cleanup(r, run_id, q)
        r.close()
    result_ms.sort()
    return {
        "system": PEER,
        "version": pkg_version("rq"),
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
        "--worker-class",
        choices=sorted(WORKER_CLASSES),
        default="default",
        help="rq.Worker (default, the headline: forks per job) or rq.SimpleWorker (no fork)",
    )
    ap.add_argument(
        "--result-wait",
        choices=["poll", "block"],
        default="poll",
        help="latency mode: poll latest_result() every 1 ms (headline) or block on it",
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
