"""Soak comparison: Celery (late ack, Redis broker) under SIGKILLed workers.

Measures, for Celery configured the way a user who wants "no lost task" would configure
it on Redis --

- `task_acks_late=True` (ack after the body ran, so a dead worker's task is redelivered),
- `task_reject_on_worker_lost=True` (re-queue when the pool child dies),
- `worker_prefetch_multiplier=1` (reserve one message at a time),
- `broker_transport_options={"visibility_timeout": ...}` only when asked for; otherwise
  kombu's default of 3600 s applies --

what happens when a worker (the whole prefork process group: parent and pool child, as
when a machine or container dies) is SIGKILLed mid-run: how many tasks are lost, how many
run to completion twice, and how long a killed task takes to start again elsewhere.

Each worker is a real `celery worker` subprocess (prefork, concurrency 1) on its own
queue name for this run; every `kill_every_sec` the oldest worker's process group gets
SIGKILL and a replacement starts at once. The task (`bench.celery_app.soak_task`) writes
its starts and completions to Redis itself (`bench:celery:*` keys), so the driver reads
facts, not Celery's view of them.

On Redis, a message a worker has taken but not acknowledged sits in kombu's `unacked`
hash; it goes back to the queue only when some consumer's `restore_visible` sweep finds
it older than the visibility timeout. kombu runs that sweep when a worker starts and then
periodically (`unacked_restore_interval`, default 10 s, scanning only on every
`unacked_restore_throttle`-th call, default 10, so about every 100 s). What that means
here (Celery 5.7 / kombu 5.7, measured with this module):

- default visibility timeout (3600 s): a killed task is not redelivered within any
  reasonable run; it counts as lost / unrecovered;
- `visibility_timeout=10`: while workers keep being replaced, each new worker's start-up
  sweep redelivers, so recovery is ~10-12 s after the kill; once nobody starts, the
  periodic scan (about every 100 s per worker) is what redelivers, so recovery of the last
  killed tasks took ~98 s in a 300-task run;
- a worker killed after the body finished but before its late ack reached Redis leaves the
  message unacked: it runs again after the visibility timeout (`doubled`); and
  `task_reject_on_worker_lost` does nothing here, because the parent dies with the child.

`restore_sweep_sec` (`--restore-sweep`) sets `unacked_restore_interval` with throttle 1, to
show the best case (recovery ~= visibility timeout); it is not part of the default row.

Used by `bench/soak.py` for its comparison row, or on its own:

    uv run --group bench python -m bench.soak_celery --redis-url redis://127.0.0.1:6380/0
"""

from __future__ import annotations

import argparse
import base64
import json
import math
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import redis

from bench.celery_app import (
    DEFAULT_VISIBILITY_TIMEOUT,
    DONE_KEY,
    KEY_PREFIX,
    START_LOG_KEY,
    STARTS_KEY,
    TASK_NAME,
    WORKER_KEY,
    make_app,
)

SYSTEM = "celery (acks_late, redis)"
PROJECT_ROOT = Path(__file__).resolve().parent.parent
POLL_SEC = 0.05
ACK_GRACE_SEC = 0.5
# kombu's Redis transport keeps one list per priority step: "<queue>" and
# "<queue>\x06\x16<priority>" (default steps 0, 3, 6, 9).
PRIORITY_SEP = "\x06\x16"
PRIORITY_STEPS = (3, 6, 9)
KOMBU_UNACKED = "unacked"
KOMBU_UNACKED_INDEX = "unacked_index"
KOMBU_UNACKED_MUTEX = "unacked_mutex"


@dataclass
class _Worker:
    name: str
    proc: subprocess.Popen[bytes]
    log_path: Path
    started: float


@dataclass
class _Kill:
    at: float  # time.time() just before the SIGKILL
    worker: str
    in_flight: list[str] = field(default_factory=list)


def _running(process: psutil.Process) -> bool:
    try:
        return bool(process.status() != psutil.STATUS_ZOMBIE)
    except psutil.Error:
        return False


def _sort_key(task_id: str) -> tuple[int, str]:
    return (int(task_id), "") if task_id.isdigit() else (-1, task_id)


def _percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile of an already sorted, non-empty list."""
    rank = max(1, min(len(sorted_values), math.ceil(q / 100.0 * len(sorted_values))))
    return sorted_values[rank - 1]


def _settings_text(
    visibility_timeout: float | None, restore_sweep_sec: float | None, workers: int
) -> str:
    vt = (
        f"visibility_timeout={visibility_timeout:g}s"
        if visibility_timeout is not None
        else f"visibility_timeout={DEFAULT_VISIBILITY_TIMEOUT:g}s (default)"
    )
    sweep = (
        f"unacked_restore_interval={restore_sweep_sec:g}s, unacked_restore_throttle=1"
        if restore_sweep_sec is not None
        else "unacked restore sweep: kombu default (10s x throttle 10)"
    )
    return (
        f"task_acks_late=True, task_reject_on_worker_lost=True, worker_prefetch_multiplier=1, "
        f"{vt}, {sweep}; {workers} x prefork concurrency=1; "
        "kill = SIGKILL to the worker's process group"
    )


class _Fleet:
    """The worker subprocesses of one run."""

    def __init__(
        self,
        redis_url: str,
        queue: str,
        visibility_timeout: float | None,
        restore_sweep_sec: float | None,
        log_dir: Path,
    ):
        self.redis_url = redis_url
        self.queue = queue
        self.visibility_timeout = visibility_timeout
        self.restore_sweep_sec = restore_sweep_sec
        self.loglevel = "WARNING"
        self.log_dir = log_dir
        self.live: list[_Worker] = []  # oldest first
        self.dead: list[_Worker] = []
        self._seq = 0

    def start_one(self) -> _Worker:
        self._seq += 1
        name = f"w{self._seq}"
        env = dict(os.environ)
        env["FLOWMESH_BENCH_REDIS_URL"] = self.redis_url
        env["FLOWMESH_BENCH_WORKER"] = name
        for var, value in (
            ("FLOWMESH_BENCH_VISIBILITY_TIMEOUT", self.visibility_timeout),
            ("FLOWMESH_BENCH_RESTORE_SWEEP", self.restore_sweep_sec),
        ):
            env.pop(var, None)
            if value is not None:
                env[var] = repr(float(value))
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(PROJECT_ROOT), env.get("PYTHONPATH", "")) if p
        )
        args = [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "bench.celery_app",
            "worker",
            "--pool=prefork",
            "--concurrency=1",
            "-Q",
            self.queue,
            "-n",
            f"{name}-{self.queue}@%h",
            "--without-heartbeat",
            "--without-gossip",
            "--without-mingle",
            f"--loglevel={self.loglevel}",
        ]
        log_path = self.log_dir / f"{name}.log"
        with open(log_path, "wb") as out:
            proc = subprocess.Popen(
                args,
                cwd=PROJECT_ROOT,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group: parent + pool child
            )
        worker = _Worker(name, proc, log_path, time.time())
        self.live.append(worker)
        return worker

    @staticmethod
    def _kill_group(worker: _Worker) -> None:
        """SIGKILL the worker's whole process group and wait until it is gone."""
        pgid = worker.proc.pid  # start_new_session=True: the group is the worker's own
        try:
            children = psutil.Process(pgid).children(recursive=True)
        except psutil.Error:
            children = []
        with suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGKILL)
        worker.proc.wait()
        # The pool child is reaped by init, not by us (which can take a second or more);
        # it is dead, and can write nothing more, once it is a zombie.
        deadline = time.monotonic() + 2.0
        while children and time.monotonic() < deadline:
            children = [c for c in children if _running(c)]
            if children:
                time.sleep(0.005)

    def kill(self, worker: _Worker) -> None:
        self.live.remove(worker)
        self._kill_group(worker)
        self.dead.append(worker)

    def reap_exited(self, log: Callable[[str], None]) -> list[_Worker]:
        """Workers that exited on their own (not killed by us)."""
        gone = [w for w in self.live if w.proc.poll() is not None]
        for w in gone:
            self.live.remove(w)
            # The pool child may outlive its parent; the group goes with it.
            self._kill_group(w)
            self.dead.append(w)
            tail = w.log_path.read_text(errors="replace").strip().splitlines()[-5:]
            log(f"celery worker {w.name} exited by itself (rc={w.proc.returncode}): {tail}")
        return gone

    def stop_all(self) -> None:
        for w in list(self.live):
            self.kill(w)


@contextmanager
def _fleet(
    redis_url: str,
    queue: str,
    visibility_timeout: float | None,
    restore_sweep_sec: float | None,
    keep_logs: Path | None,
) -> Iterator[_Fleet]:
    with tempfile.TemporaryDirectory(prefix="flowmesh-soak-celery-") as tmp:
        log_dir = Path(tmp)
        if keep_logs is not None:
            log_dir = keep_logs
            log_dir.mkdir(parents=True, exist_ok=True)
        fleet = _Fleet(redis_url, queue, visibility_timeout, restore_sweep_sec, log_dir)
        if keep_logs is not None:
            fleet.loglevel = "INFO"
        try:
            yield fleet
        finally:
            fleet.stop_all()


def _queue_keys(queue: str) -> list[str]:
    return [queue] + [f"{queue}{PRIORITY_SEP}{p}" for p in PRIORITY_STEPS]


def _queue_len(r: Any, queue: str) -> int:
    pipe = r.pipeline(transaction=False)
    for key in _queue_keys(queue):
        pipe.llen(key)
    return sum(int(n) for n in pipe.execute())


def _message_task_id(message: dict[str, Any]) -> str:
    """Our task_id (first argument) from a kombu message as stored in Redis."""
    try:
        body = message["body"]
        if message.get("properties", {}).get("body_encoding") == "base64":
            body = base64.b64decode(body)
        args = json.loads(body)[0]  # Celery message protocol 2: [args, kwargs, embed]
        return str(args[0])
    except (KeyError, IndexError, TypeError, ValueError):
        return "?"


def _clear_kombu_leftovers(r: Any, queue: str) -> tuple[list[str], list[str]]:
    """Drop this run's queue and its messages still held in kombu's unacked hash.

    Returns the task_ids of this run's messages that were still unacknowledged (reserved
    by a worker that was killed, and not restored by any sweep yet), and of those still
    waiting in the queue. Other users' entries in the same hash are left alone.
    """
    queued: list[str] = []
    for key in _queue_keys(queue):
        for payload in r.lrange(key, 0, -1):
            try:
                queued.append(_message_task_id(json.loads(payload)))
            except (ValueError, TypeError):
                queued.append("?")
    stuck: list[str] = []
    stuck_ids: list[str] = []
    for tag, payload in r.hgetall(KOMBU_UNACKED).items():
        try:
            message, exchange, routing_key = json.loads(payload)
        except (ValueError, TypeError):
            continue
        if queue in (exchange, routing_key):
            stuck.append(tag)
            stuck_ids.append(_message_task_id(message))
    pipe = r.pipeline(transaction=False)
    for tag in stuck:
        pipe.hdel(KOMBU_UNACKED, tag)
        pipe.zrem(KOMBU_UNACKED_INDEX, tag)
    pipe.delete(*_queue_keys(queue), f"_kombu.binding.{queue}", f"_kombu.binding_permanent.{queue}")
    pipe.execute()
    return stuck_ids, queued


def _clear_bench_keys(r: Any) -> None:
    keys = list(r.scan_iter(match=f"{KEY_PREFIX}*", count=1000))
    if keys:
        r.delete(*keys)


def _progress(r: Any) -> tuple[int, int]:
    pipe = r.pipeline(transaction=False)
    pipe.hlen(DONE_KEY)
    pipe.llen(START_LOG_KEY)
    done, starts = pipe.execute()
    return int(done), int(starts)


def run_celery_soak(
    redis_url: str,
    *,
    tasks: int = 2000,
    workers: int = 3,
    kill_every_sec: float = 3.0,
    delay_range: tuple[float, float] = (0.01, 0.05),
    visibility_timeout: float | None = None,
    max_wall_sec: float = 180.0,
    log: Callable[[str], None] = print,
    seed: int = 0,
    restore_sweep_sec: float | None = None,
    keep_logs: Path | None = None,
) -> dict[str, Any]:
    """Run the soak and return the comparison row (see the module docstring).

    `restore_sweep_sec` (not one of the settings the comparison is about; off by default)
    makes kombu look for expired unacked messages that often instead of its default
    (a scan about every 100 s), to see how close recovery can get to the visibility timeout.
    `keep_logs`: a directory to keep the workers' logs in (default: a temporary one).

    `unrecovered_after_sec` is the shortest time any never-restarted killed task had
    waited since its kill when the run ended (so every one of them waited at least that).
    """
    if tasks < 1 or workers < 1:
        raise ValueError("tasks and workers must be at least 1")
    rng = random.Random(seed)
    queue = f"flowmesh-bench-celery-{uuid.uuid4().hex[:10]}"
    r = redis.Redis.from_url(redis_url, decode_responses=True)
    _clear_bench_keys(r)
    producer = make_app(redis_url, visibility_timeout, restore_sweep_sec)
    kills: list[_Kill] = []
    stall_sec = max(1.0, 20 * delay_range[1])
    t0 = time.time()
    try:
        with _fleet(redis_url, queue, visibility_timeout, restore_sweep_sec, keep_logs) as fleet:
            for _ in range(workers):
                fleet.start_one()
            with producer.connection_for_write() as conn:
                for i in range(tasks):
                    producer.send_task(
                        TASK_NAME,
                        args=[str(i), rng.uniform(*delay_range)],
                        queue=queue,
                        connection=conn,
                    )
            log(
                f"celery soak: {tasks} tasks on queue {queue}, {workers} workers, "
                f"kill every {kill_every_sec:g}s, visibility_timeout="
                f"{visibility_timeout if visibility_timeout is not None else 'default'}, "
                f"restore sweep={restore_sweep_sec if restore_sweep_sec is not None else 'default'}"
            )
            killing = True
            next_kill: float | None = None  # the kill clock starts at the first task start
            last_sig = (-1, -1)
            last_change = time.time()
            deadline = t0 + max_wall_sec
            while True:
                now = time.time()
                done, starts = _progress(r)
                if done >= tasks or now >= deadline:
                    break
                if (done, starts) != last_sig:
                    last_sig, last_change = (done, starts), now
                for _gone in fleet.reap_exited(log):
                    fleet.start_one()
                if killing and next_kill is None and starts > 0:
                    next_kill = now + kill_every_sec
                if killing and now - last_change >= stall_sec and _queue_len(r, queue) == 0:
                    # Nothing left to hand out and nothing moving: what remains is held by
                    # killed workers, behind the visibility timeout.
                    killing = False
                    log(
                        f"celery soak: stop killing at +{now - t0:.1f}s: {tasks - done} "
                        f"tasks not done, queue empty, no progress for {stall_sec:g}s"
                    )
                if killing and next_kill is not None and now >= next_kill and fleet.live:
                    victim = fleet.live[0]
                    kill = _Kill(at=time.time(), worker=victim.name)
                    fleet.kill(victim)
                    fleet.start_one()
                    time.sleep(POLL_SEC)  # let Redis apply anything sent before the kill
                    pipe = r.pipeline(transaction=True)
                    pipe.hgetall(STARTS_KEY)
                    pipe.hgetall(DONE_KEY)
                    pipe.hgetall(WORKER_KEY)
                    started, finished, who = pipe.execute()
                    kill.in_flight = sorted(
                        (
                            tid
                            for tid, w in who.items()
                            if w == victim.name
                            and int(started.get(tid, 0)) > 0
                            and int(finished.get(tid, 0)) == 0
                        ),
                        key=int,
                    )
                    kills.append(kill)
                    log(
                        f"celery soak: kill #{len(kills)} {victim.name} at +{kill.at - t0:.1f}s, "
                        f"in flight: {kill.in_flight}"
                    )
                    next_kill = max(next_kill + kill_every_sec, time.time())
                    continue
                time.sleep(POLL_SEC)
            t_end = time.time()
            # Let the live workers' last acknowledgements reach Redis before they go, so
            # what is left in kombu's unacked hash is only what the killed workers held.
            time.sleep(ACK_GRACE_SEC)
        # Workers are all gone now: what is still unacked stays unacked.
        stuck_unacked, still_queued = _clear_kombu_leftovers(r, queue)
        mutex_ttl = int(r.ttl(KOMBU_UNACKED_MUTEX)) if r.exists(KOMBU_UNACKED_MUTEX) else None
        pipe = r.pipeline(transaction=True)
        pipe.hgetall(DONE_KEY)
        pipe.lrange(START_LOG_KEY, 0, -1)
        finished, start_log = pipe.execute()
    finally:
        producer.close()
        r.close()

    starts_by_task: dict[str, list[float]] = {}
    starts_detail: dict[str, list[str]] = {}
    for entry in start_log:
        tid, worker, ts = entry.split(" ")
        starts_by_task.setdefault(tid, []).append(float(ts))
        starts_detail.setdefault(tid, []).append(f"{worker}@+{float(ts) - t0:.2f}s")
    recoveries: list[float] = []
    unrecovered: list[float] = []
    for kill in kills:
        for tid in kill.in_flight:
            later = [ts for ts in starts_by_task.get(tid, []) if ts > kill.at]
            if later:
                recoveries.append(min(later) - kill.at)
            else:
                unrecovered.append(t_end - kill.at)
    recoveries.sort()
    completed = sum(1 for n in finished.values() if int(n) >= 1)
    doubled = sum(1 for n in finished.values() if int(n) >= 2)
    never_started = tasks - len(starts_by_task)
    log(
        f"celery soak: {sum(len(k.in_flight) for k in kills)} task runs killed, "
        f"{len(recoveries)} restarted, {len(unrecovered)} not; {never_started} tasks never "
        f"started; {len(stuck_unacked)} messages still in kombu's unacked hash at the end"
    )
    if mutex_ttl is not None:
        log(
            f"celery soak: kombu's restore mutex ({KOMBU_UNACKED_MUTEX}) is still held at the "
            f"end (ttl {mutex_ttl}s): a worker killed during its restore sweep blocks all sweeps"
        )
    missing = {str(i) for i in range(tasks)} - {t for t, n in finished.items() if int(n) >= 1}
    vanished = missing - set(stuck_unacked) - set(still_queued)
    if vanished:
        log(
            f"celery soak: never completed and no longer in Redis (neither queued nor unacked): "
            f"{sorted(vanished, key=_sort_key)}"
        )
    if still_queued:
        log(f"celery soak: still in the queue at the end: {sorted(still_queued, key=_sort_key)}")
    if doubled:
        twice = sorted((tid for tid, n in finished.items() if int(n) >= 2), key=_sort_key)
        killed_at = ", ".join(f"{k.worker}@+{k.at - t0:.2f}s" for k in kills)
        log(
            "celery soak: completed more than once (starts): "
            + "; ".join(f"{tid} ({', '.join(starts_detail.get(tid, []))})" for tid in twice)
            + f"; kills: {killed_at}"
        )
    if stuck_unacked:
        ran = [tid for tid in stuck_unacked if int(finished.get(tid, 0)) >= 1]
        log(
            f"celery soak: unacked at the end: {sorted(stuck_unacked, key=_sort_key)}; of "
            f"these {len(ran)} had completed (ack lost with the worker: they would run "
            "again once restored)"
        )
    return {
        "system": SYSTEM,
        "tasks": tasks,
        "completed": completed,
        "lost": tasks - completed,
        "doubled": doubled,
        "kills": len(kills),
        "recovery_p50_sec": _percentile(recoveries, 50) if recoveries else None,
        "recovery_p99_sec": _percentile(recoveries, 99) if recoveries else None,
        "unrecovered_after_sec": min(unrecovered) if unrecovered else None,
        "wall_sec": t_end - t0,
        "settings": _settings_text(visibility_timeout, restore_sweep_sec, workers),
    }


def format_table(row: dict[str, Any]) -> str:
    def fmt(value: Any) -> str:
        if value is None:
            return "-"
        if isinstance(value, float):
            return f"{value:.3f}"
        return str(value)

    width = max(len(k) for k in row)
    return "\n".join(f"{k.ljust(width)}  {fmt(v)}" for k, v in row.items())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.soak_celery",
        description="Celery (acks_late, Redis) under SIGKILLed workers: lost, doubled, "
        "recovery latency.",
    )
    parser.add_argument(
        "--redis-url", help="Redis to use (default: start a private one for the run)"
    )
    parser.add_argument("--tasks", type=int, default=2000)
    parser.add_argument("--workers", type=int, default=3)
    parser.add_argument("--kill-every", type=float, default=3.0, help="seconds between kills")
    parser.add_argument("--delay-min", type=float, default=0.01)
    parser.add_argument("--delay-max", type=float, default=0.05)
    parser.add_argument(
        "--visibility-timeout", type=float, default=None, help="seconds (default: Celery's)"
    )
    parser.add_argument(
        "--restore-sweep",
        type=float,
        default=None,
        help="seconds between kombu's unacked sweeps (default: kombu's, ~100 s between scans)",
    )
    parser.add_argument("--max-wall", type=float, default=180.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--keep-logs", type=Path, default=None, help="keep worker logs here")
    args = parser.parse_args(argv)

    def run(url: str) -> dict[str, Any]:
        return run_celery_soak(
            url,
            tasks=args.tasks,
            workers=args.workers,
            kill_every_sec=args.kill_every,
            delay_range=(args.delay_min, args.delay_max),
            visibility_timeout=args.visibility_timeout,
            max_wall_sec=args.max_wall,
            seed=args.seed,
            restore_sweep_sec=args.restore_sweep,
            keep_logs=args.keep_logs,
        )

    if args.redis_url:
        row = run(args.redis_url)
    else:
        from flowmesh.embedded import EmbeddedRedis

        with EmbeddedRedis() as embedded:
            row = run(embedded.url)
    print(format_table(row))
    return 0


if __name__ == "__main__":
    sys.exit(main())
