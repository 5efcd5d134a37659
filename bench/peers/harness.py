"""The common harness of the peer runners (bench/peers/<peer>_runner.py).

Every runner is run as a script by its peer's venv python (which does not have the project
installed), so this module is imported as a sibling (`from harness import ...`): the runner's
directory is sys.path[0], and the workers get it on PYTHONPATH (see `worker_env`).
Standard library only; the Redis clients (redis-py, sync or asyncio) are passed in.

What is here: worker processes (each the leader of its own process group, stopped with
SIGTERM, a grace period, then SIGKILL to the group), readiness and completion waits on the
bench:<run_id>:* counters, the run's key cleanup, percentiles, the backlog mode's steps
(`Backlog`: Redis memory, CPU of a process tree from /proc, first start and last
completion), the result dicts, the one-line summary and the common command line (`main`).
"""

from __future__ import annotations

import argparse
import asyncio
import inspect
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from contextlib import suppress
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent  # the runners' directory: the workers' cwd

DONE_POLL_S = 0.005
DONE_TIMEOUT_S = 300.0
READY_TIMEOUT_S = 60.0
WARMUP_TASKS = 20
RESULT_TIMEOUT_S = 30.0
STOP_GRACE_S = 5.0  # SIGTERM, then SIGKILL to the process group


# ---- worker processes ----
def _die_with_parent() -> None:
    """Runs in the child before exec: SIGTERM it if the runner dies without cleaning up (Linux)."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except Exception:
        pass


CLK_TCK = os.sysconf("SC_CLK_TCK")


def _proc_table() -> dict[int, tuple[int, float]]:
    """pid -> (ppid, CPU seconds) of every live process, from /proc/<pid>/stat. The CPU is
    utime + stime + cutime + cstime: the process's own and that of the children it has
    reaped (a child that has ended is counted in its parent)."""
    table = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
            # after "(comm)": state ppid ... utime(11) stime(12) cutime(13) cstime(14)
            fields = stat[stat.rindex(")") + 2 :].split()
            table[int(d.name)] = (int(fields[1]), sum(map(int, fields[11:15])) / CLK_TCK)
        except (OSError, ValueError, IndexError):
            continue
    return table


def _tree(table: dict[int, tuple[int, float]], pid: int) -> list[int]:
    """All descendants of pid in `table` (a _proc_table)."""
    children: dict[int, list[int]] = {}
    for child, (ppid, _) in table.items():
        children.setdefault(ppid, []).append(child)
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def _descendants(pid: int) -> list[int]:
    """All live descendants of pid (from /proc), so children that left the group die too."""
    return _tree(_proc_table(), pid)


def tree_cpu(roots: dict[int, str]) -> dict[str, float]:
    """CPU seconds so far by kind: each root process (pid -> kind) under its kind, all its
    live descendants under "child" (children already reaped count with their parent)."""
    table = _proc_table()
    out: dict[str, float] = {}
    for root, kind in roots.items():
        if root not in table:
            continue
        out[kind] = out.get(kind, 0.0) + table[root][1]
        for c in _tree(table, root):
            out["child"] = out.get("child", 0.0) + table[c][1]
    return out


def _spawn(cmd: list[str], env: dict[str, str], log: Path, **kw: Any) -> subprocess.Popen:
    with open(log, "wb") as f:  # Popen keeps its own copy
        return subprocess.Popen(
            cmd,
            cwd=HERE,
            env=env,
            stdout=f,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            **kw,
        )


class _WorkersBase:
    """Worker processes, each the leader of its own process group; logs go to a temp dir."""

    def __init__(self, peer: str):
        self.peer = peer
        self.logdir = Path(tempfile.mkdtemp(prefix=f"bench-{peer}-"))
        self.procs: list[subprocess.Popen] = []
        self.keep_logs = False

    def check_alive(self) -> None:
        for i, p in enumerate(self.procs):
            if p.poll() is not None:
                self.keep_logs = True
                raise RuntimeError(
                    f"{self.peer} worker {i} exited with code {p.returncode}; logs in {self.logdir}"
                )

    def log_tail(self, n: int = 3000) -> str:
        out = []
        for f in sorted(self.logdir.glob("*.log")):
            out.append(f"--- {f}\n" + f.read_bytes()[-n:].decode(errors="replace"))
        return "\n".join(out)

    def not_ready(self) -> RuntimeError:
        self.keep_logs = True
        return RuntimeError(
            f"{self.peer} workers not ready after {READY_TIMEOUT_S}s:\n{self.log_tail()}"
        )

    def _drop_logs(self) -> None:
        if not self.keep_logs:
            shutil.rmtree(self.logdir, ignore_errors=True)


class Workers(_WorkersBase):
    """One process per command; each dies with the runner (PR_SET_PDEATHSIG). `stop` sends
    SIGTERM to the groups, then SIGKILLs them and every descendant found through /proc."""

    def __init__(self, peer: str, cmds: list[list[str]], env: dict[str, str]):
        super().__init__(peer)
        for i, cmd in enumerate(cmds):
            self.procs.append(
                _spawn(cmd, env, self.logdir / f"worker{i}.log", preexec_fn=_die_with_parent)
            )

    def stop(self) -> None:
        # children that made their own process group (RQ's work horse) are found through /proc
        strays = {c for p in self.procs for c in _descendants(p.pid)}
        for p in self.procs:
            with suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE_S
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
        self._drop_logs()


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


class WatchedWorkers(_WorkersBase):
    """K processes of one command, under a WATCHDOG. `stop` sends SIGTERM to each leader
    (which stops its own children), then SIGKILLs the groups. BENCH_KEEP_LOGS=1 (debugging)
    keeps the workers' logs."""

    def __init__(self, peer: str, cmd: list[str], env: dict[str, str], k: int):
        super().__init__(peer)
        self.keep_logs = os.environ.get("BENCH_KEEP_LOGS") == "1"
        if self.keep_logs:
            print(f"{peer} worker logs in {self.logdir}", file=sys.stderr)
        self.watchdog = subprocess.Popen(
            [sys.executable, "-c", WATCHDOG],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
            text=True,
        )
        for i in range(k):
            p = _spawn(cmd, env, self.logdir / f"worker{i}.log")
            self.procs.append(p)
            self.watchdog.stdin.write(f"{p.pid}\n")
            self.watchdog.stdin.flush()

    def stop(self) -> None:
        for p in self.procs:  # graceful: SIGTERM to the leader, which stops its own children
            with suppress(ProcessLookupError):
                os.kill(p.pid, signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE_S
        for p in self.procs:
            with suppress(subprocess.TimeoutExpired):
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
        for p in self.procs:  # the whole group, children included, whatever state it is in
            with suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGKILL)
            with suppress(subprocess.TimeoutExpired):
                p.wait(timeout=5)
        try:
            self.watchdog.stdin.write("done\n")
            self.watchdog.stdin.close()
            self.watchdog.wait(timeout=5)
        except (BrokenPipeError, subprocess.TimeoutExpired):
            self.watchdog.kill()
        self._drop_logs()


def worker_env(args: argparse.Namespace, run_id: str, mode: str, **extra: str) -> dict[str, str]:
    """The workers' environment: BENCH_* (run id, mode, Redis URL, extra) and HERE on PYTHONPATH."""
    env = dict(os.environ)
    env.update(
        BENCH_RUN_ID=run_id,
        BENCH_MODE=mode,
        BENCH_REDIS_URL=args.redis_url,
        **extra,
        PYTHONPATH=str(HERE) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else ""),
        PYTHONUNBUFFERED="1",
    )
    return env


# ---- Redis side: sync (redis.Redis) and asyncio (redis.asyncio.Redis) ----
def _patterns(run_id: str) -> tuple[str, str]:
    return (f"bench:{run_id}:*", f"*bench-{run_id}*")


def wait_ready(r: Any, workers: _WorkersBase, run_id: str, k: int) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while int(r.get(f"bench:{run_id}:ready") or 0) < k:
        workers.check_alive()
        if time.monotonic() > deadline:
            raise workers.not_ready()
        time.sleep(0.05)


async def async_wait_ready(r: Any, workers: _WorkersBase, run_id: str, k: int) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while int(await r.get(f"bench:{run_id}:ready") or 0) < k:
        workers.check_alive()
        if time.monotonic() > deadline:
            raise workers.not_ready()
        await asyncio.sleep(0.05)


def delete_matching(r: Any, pattern: str) -> None:
    """Delete every key matching `pattern`, 500 per DEL."""
    batch = []
    for key in r.scan_iter(match=pattern, count=1000):
        batch.append(key)
        if len(batch) >= 500:
            r.delete(*batch)
            batch = []
    if batch:
        r.delete(*batch)


async def async_delete_matching(r: Any, pattern: str) -> None:
    """`delete_matching` with an asyncio client."""
    batch = []
    async for key in r.scan_iter(match=pattern, count=1000):
        batch.append(key)
        if len(batch) >= 500:
            await r.delete(*batch)
            batch = []
    if batch:
        await r.delete(*batch)


def cleanup(r: Any, run_id: str) -> None:
    """Delete only this run's keys: bench:<run_id>:* and the peer's keys named after the run."""
    for pattern in _patterns(run_id):
        delete_matching(r, pattern)


async def async_cleanup(r: Any, run_id: str) -> None:
    """`cleanup` with an asyncio client."""
    for pattern in _patterns(run_id):
        await async_delete_matching(r, pattern)


def wait_done(r: Any, workers: _WorkersBase, run_id: str, n: int, t0: float) -> int:
    done_key = f"bench:{run_id}:done"
    while True:
        done = int(r.get(done_key) or 0)
        if done >= n or time.perf_counter() - t0 > DONE_TIMEOUT_S:
            return done
        workers.check_alive()
        time.sleep(DONE_POLL_S)


async def async_wait_done(r: Any, workers: _WorkersBase, run_id: str, n: int, t0: float) -> int:
    done_key = f"bench:{run_id}:done"
    while True:
        done = int(await r.get(done_key) or 0)
        if done >= n or time.perf_counter() - t0 > DONE_TIMEOUT_S:
            return done
        workers.check_alive()
        await asyncio.sleep(DONE_POLL_S)


def measure(one: Callable[[int], tuple[float, float]], r: Any, run_id: str, n: int):
    """Latency mode: WARMUP_TASKS warm-up calls of one(index) -> (submitted_at, seen), the start
    records dropped, then n timed calls. Returns ({index: submitted_at}, result latencies ms)."""
    for w in range(WARMUP_TASKS):
        one(-1 - w)
    r.delete(f"bench:{run_id}:start")
    submitted: dict[int, float] = {}
    result_ms: list[float] = []
    for i in range(n):
        sub, seen = one(i)
        submitted[i] = sub
        result_ms.append((seen - sub) * 1000)
    return submitted, result_ms


async def async_measure(
    one: Callable[[int], Awaitable[tuple[float, float]]], r: Any, run_id: str, n: int
):
    """`measure` with an async one() and an asyncio client."""
    for w in range(WARMUP_TASKS):
        await one(-1 - w)
    await r.delete(f"bench:{run_id}:start")
    submitted: dict[int, float] = {}
    result_ms: list[float] = []
    for i in range(n):
        sub, seen = await one(i)
        submitted[i] = sub
        result_ms.append((seen - sub) * 1000)
    return submitted, result_ms


def start_ms_from(raw: list[bytes], submitted: dict[int, float]) -> list[float]:
    """Start latencies (ms, sorted) from the bench:<run_id>:start records ("index:started")."""
    start_ms = []
    for item in raw:
        idx, ts = item.decode().split(":", 1)
        if int(idx) in submitted:
            start_ms.append((float(ts) - submitted[int(idx)]) * 1000)
    if len(start_ms) != len(submitted):
        raise RuntimeError(f"expected {len(submitted)} start records, got {len(start_ms)}")
    return sorted(start_ms)


def start_times(r: Any, run_id: str, submitted: dict[int, float]) -> list[float]:
    return start_ms_from(r.lrange(f"bench:{run_id}:start", 0, -1), submitted)


# ---- backlog mode ----
BACKLOG_SETTLE_S = 0.5  # after the last enqueue, before used_memory is read again

_first_start_noted = False


def first_start() -> bool:
    """Backlog mode, in a worker process: True the first time the process starts a task (the
    task then RPUSHes its start time to bench:<run_id>:first), False afterwards, so that a
    process records once, not once per task. Threads may race to a second record: harmless,
    the earliest is taken. A process forked per task (RQ's work horse) records every time."""
    global _first_start_noted
    if _first_start_noted:
        return False
    _first_start_noted = True
    return True


def _used_memory(r: Any) -> int:
    return int(r.info("memory")["used_memory"])


def _redis_cpu(r: Any) -> float:
    info = r.info("cpu")
    return float(info["used_cpu_sys"]) + float(info["used_cpu_user"])


class Backlog:
    """Backlog mode, in steps around what the runner does itself (enqueue N tasks one per
    call, start K workers):

        bl = Backlog(r, run_id, n)   # r: a *sync* redis-py client, in async runners too
        bl.before()                  # Redis used_memory; the enqueue clock starts
        ... enqueue N tasks, one per request, in order ...
        bl.enqueued()                # used_memory again
        bl.drain(lambda: Workers(...))   # CPU baseline, the workers, until N are done
        ...                          # and in the runner's finally: bl.stop()
        return bl.result(peer, version, k, settings)

    `others` are the system's processes already running (FlowMesh's orchestrator: pid ->
    kind), counted from the launch on like the workers. The workers' object needs `procs`
    (their Popen objects, kind "worker"; their descendants are "child") and `check_alive()`.
    Nothing else runs in the client during the drain, so blocking reads are fine there."""

    def __init__(self, r: Any, run_id: str, n: int, others: dict[int, str] | None = None):
        self.r, self.run_id, self.n = r, run_id, n
        self.roots = dict(others or {})
        self.workers: Any = None

    def before(self) -> None:
        with suppress(Exception):  # allocator pages freed by earlier runs
            self.r.execute_command("MEMORY", "PURGE")
        self.mem_before = _used_memory(self.r)
        self.t_enqueue = time.perf_counter()

    def enqueued(self) -> None:
        self.enqueue_sec = time.perf_counter() - self.t_enqueue
        time.sleep(BACKLOG_SETTLE_S)  # writes the system makes after replying
        self.mem_after = _used_memory(self.r)

    def drain(self, start: Callable[[], Any]) -> None:
        """Start the workers (`start()`: the CPU baseline is taken just before) and wait
        until the counter reaches N. The workers are stopped by `stop`, in the runner's
        `finally`, whatever happened."""
        self.cpu0 = tree_cpu(self.roots)
        self.redis_cpu0 = _redis_cpu(self.r)
        self.t_launch = time.time()
        self.workers = workers = start()
        self.roots.update({p.pid: "worker" for p in workers.procs})
        done_key = f"bench:{self.run_id}:done"
        deadline = time.monotonic() + DONE_TIMEOUT_S
        self.cpu_first: dict[str, float] | None = None
        self.done_first = 0
        while True:
            done = int(self.r.get(done_key) or 0)
            if done and self.cpu_first is None:  # the drain proper starts: workers are up
                self.cpu_first, self.done_first = tree_cpu(self.roots), done
            if done >= self.n or time.monotonic() > deadline:
                break
            workers.check_alive()
            time.sleep(DONE_POLL_S)
        self.t_done = time.time()
        self.cpu1 = tree_cpu(self.roots)
        self.redis_cpu1 = _redis_cpu(self.r)
        self.done = done
        firsts = [float(x) for x in self.r.lrange(f"bench:{self.run_id}:first", 0, -1)]
        self.t_first = min(firsts) if firsts else float("nan")

    def stop(self) -> None:
        if self.workers is not None:
            self.workers.stop()

    def result(self, peer: str, version: str, k: int, settings: str) -> dict:
        done = max(1, self.done)
        cpu = {kind: sec - self.cpu0.get(kind, 0.0) for kind, sec in self.cpu1.items()}
        first = self.cpu_first or {}
        drain_cpu = sum(self.cpu1.values()) - sum(first.values())
        drained = self.done - self.done_first
        steady_sec = self.t_done - self.t_first
        wall_sec = self.t_done - self.t_launch
        added = self.mem_after - self.mem_before
        return {
            "system": peer,
            "version": version,
            "mode": "backlog",
            "tasks": self.n,
            "workers": k,
            "completed": self.done,
            "enqueue_sec": self.enqueue_sec,
            "enqueue_rate": self.n / self.enqueue_sec,
            "redis_mb_added": added / 2**20,
            "redis_bytes_per_task": added / self.n,
            "startup_sec": self.t_first - self.t_launch,
            "steady_sec": steady_sec,
            "steady": self.done / steady_sec,
            "wall_sec": wall_sec,
            "wall": self.done / wall_sec,
            "cpu_ms_per_task": sum(cpu.values()) * 1000 / done,
            "cpu_ms_per_task_by_kind": {kind: sec * 1000 / done for kind, sec in cpu.items()},
            "drain_cpu_ms_per_task": drain_cpu * 1000 / drained if drained > 0 else None,
            "redis_cpu_ms_per_task": (self.redis_cpu1 - self.redis_cpu0) * 1000 / done,
            "settings": settings,
        }


# ---- results ----
def percentile(sorted_vals: list[float], q: float) -> float:
    return sorted_vals[round(q * (len(sorted_vals) - 1))]


def throughput_result(
    peer: str,
    version: str,
    n: int,
    k: int,
    done: int,
    t0: float,
    t_sub: float,
    t_done: float,
    settings: str,
) -> dict:
    submit_sec = t_sub - t0
    total_sec = t_done - t0
    return {
        "system": peer,
        "version": version,
        "mode": "throughput",
        "tasks": n,
        "workers": k,
        "completed": done,
        "submit_sec": submit_sec,
        "submit_rate": n / submit_sec,
        "total_sec": total_sec,
        "throughput": n / total_sec,
        "settings": settings,
    }


def latency_result(
    peer: str,
    version: str,
    n: int,
    start_ms: list[float],
    result_ms: list[float],
    settings: str,
) -> dict:
    result_ms = sorted(result_ms)
    return {
        "system": peer,
        "version": version,
        "mode": "latency",
        "tasks": n,
        "start_p50_ms": percentile(start_ms, 0.5),
        "start_p99_ms": percentile(start_ms, 0.99),
        "result_p50_ms": percentile(result_ms, 0.5),
        "result_p99_ms": percentile(result_ms, 0.99),
        "settings": settings,
    }


def summary(res: dict) -> str:
    head = f"{res['system']} {res['version']} {res['mode']}: "
    if res["mode"] == "backlog":
        split = ", ".join(f"{k} {v:.3f}" for k, v in res["cpu_ms_per_task_by_kind"].items())
        return head + (
            f"{res['completed']}/{res['tasks']} tasks, {res['workers']} worker(s): "
            f"enqueue {res['enqueue_rate']:.0f}/s, Redis {res['redis_bytes_per_task']:.0f} B "
            f"per pending task; steady {res['steady']:.0f} tasks/s, wall {res['wall']:.0f} "
            f"tasks/s; CPU {res['cpu_ms_per_task']:.3f} ms per task ({split})"
        )
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


# ---- command line ----
Runner = Callable[[argparse.Namespace, str], Any]  # -> dict, or a coroutine giving one


def main(
    peer: str,
    run_throughput: Runner,
    run_latency: Runner,
    add_args: Callable[[argparse.ArgumentParser], None] | None = None,
    argv: list[str] | None = None,
    *,
    run_backlog: Runner | None = None,
) -> int:
    """The common command line: parse, run one mode, write --out, print the summary line.
    add_args adds the peer's own flags; async runners are run with asyncio.run."""
    runners = {"throughput": run_throughput, "latency": run_latency}
    if run_backlog is not None:
        runners["backlog"] = run_backlog
    ap = argparse.ArgumentParser(description=f"{peer} benchmark runner (common peer protocol)")
    ap.add_argument("--redis-url", required=True)
    ap.add_argument("--mode", choices=list(runners), required=True)
    ap.add_argument("--tasks", type=int, required=True)
    ap.add_argument(
        "--workers",
        type=int,
        default=1,
        help="worker processes (throughput and backlog modes; latency uses 1)",
    )
    ap.add_argument("--out", required=True)
    if add_args is not None:
        add_args(ap)
    args = ap.parse_args(argv)
    if args.tasks < 1 or args.workers < 1:
        ap.error("--tasks and --workers must be >= 1")
    run_id = uuid.uuid4().hex[:12]
    # a SIGTERM from whoever runs us still unwinds through the finally blocks that stop the workers
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    res = runners[args.mode](args, run_id)
    if inspect.iscoroutine(res):
        res = asyncio.run(res)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=2) + "\n")
    print(summary(res), flush=True)
    return 0 if res.get("completed", res["tasks"]) >= res["tasks"] else 1
