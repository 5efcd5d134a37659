"""Scale: a thousand simulated workers and 100,000 tasks against a real orchestrator and Redis.

    uv run python -m bench.scale                          # 1,000 workers, 100,000 tasks (~75 s)
    uv run python -m bench.scale --workers 100,300,1000   # one fresh fleet per size (~3.5 min)
    uv run python -m bench.scale --quick                  # 100 workers, 5,000 tasks: a smoke run
    uv run python -m bench --only scale

A private Redis and a real orchestrator process (`bench.inference.Fleet`, with the
orchestrator's defaults: SCHEDULER_REFRESH_SEC=1). The workers are simulated in this process,
on asyncio, through the worker's own code: each creates its inbox stream and group and
registers with `flowmesh.workers.register` (the record a real worker writes, its executor
`starting`), beats with `flowmesh.workers.beat` every HEARTBEAT_INTERVAL_SEC (30 s, beats
spread over the interval), and reads its inbox as itself, as `Worker._inbox_loop` does
(XREADGROUP COUNT=free slots BLOCK 1000 on a connection of its own). Every delivery "runs" at
once and is started and settled with `TaskStore.start` and `TaskStore.settle_many`, one call
each per read, so the orchestrator sees real `task.finished` events and frees slots. HTTP
submits come from a client process of their own.

Phases, each measured on its own: registration; an idle fleet (the orchestrator's fleet
refresh, also run alone in the client process with the orchestrator's own `Fleet.refresh`);
--tasks echo tasks submitted in batches while every executor is still `starting`, so they
stay PENDING (Redis bytes per pending task); the executors turn `ready` (one beat each, as a
real worker's presence thread does) and the backlog drains; then tasks at a steady --rate
into a fleet with free slots, whose created -> dispatched time is placement latency; last,
what the finished tasks leave in Redis.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import random
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import Executor, ProcessPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from bench.inference import Fleet
from bench.stats import percentile
from flowmesh import __version__, workers
from flowmesh.client import Client
from flowmesh.keys import INBOX_GROUP, Keys, heartbeat_ttl
from flowmesh.redis_conn import client as redis_client
from flowmesh.status import ExecutorState, TaskStatus, WorkerStatus
from flowmesh.store import Delivery, Ending, TaskStore
from flowmesh.workers import ExecutorStatus, WorkerPresence, WorkerRecord
from orchestrator.fleet import Fleet as OrchestratorFleet
from worker.hardware import Hardware, Nvml, sample_load

KEYS = Keys()  # bench.inference.Fleet uses no key prefix
TOPIC = "tasks"  # TASK_TOPIC's default
# What the echo executor returns for a spec with no message and no data, as its child encodes it.
RESULT_JSON = json.dumps({"message": None, "items": [], "delaySec": 0.0})
ECHO = {"spec": {"taskType": "echo"}}
TIMES = ("created_at", "dispatched_at", "started_at", "finished_at")


# -- the simulated fleet -------------------------------------------------------------
@dataclass
class SimWorker:
    record: WorkerRecord
    next_beat: float = 0.0
    running: set[str] = field(default_factory=set)

    @property
    def worker_id(self) -> str:
        return self.record.worker_id


def make_workers(n: int, interval: float, rng: random.Random) -> list[SimWorker]:
    """Varied capacity, slots and tags; every worker offers `echo`."""
    gpus = Nvml().gpus()  # none on this machine
    out = []
    for i in range(n):
        worker_id = f"sim-{i:05d}"
        hardware = Hardware(
            hostname=f"node-{i:05d}",
            platform="Linux-x86_64",
            cpu_count=float(rng.choice([8, 16, 32, 64])),
            memory_total=rng.choice([32, 64, 256]) * 2**30,
            gpus=gpus,
        )
        record = WorkerRecord(
            worker_id=worker_id,
            inbox=KEYS.inbox(TOPIC, worker_id),
            hostname=hardware.hostname,
            pid=100_000 + i,
            version=__version__,
            hardware=hardware.to_dict(),
            tags=rng.choice([[], [], ["eu"], ["us", "spot"], ["fast-disk"]]),
            executors=["echo"],
            slots=rng.choice([4, 8, 12, 16]),
            heartbeat_interval=interval,
            started_at=time.time(),
            protocol=workers.PROTOCOL,
            artifacts={
                "archive_format": "gzip",
                "archive_pigz": True,
                "allowed_hosts": [],
                "results_dir": "/var/lib/flowmesh/results",
            },
        )
        out.append(SimWorker(record))
    return out


class Simulator:
    """N workers' registrations, heartbeats and inbox loops, on one asyncio connection pool."""

    def __init__(self, redis_url: str, fleet: list[SimWorker], interval: float):
        # Every worker holds a connection in its blocking read, as a real one does; its
        # start and settle calls take another while the read is not pending.
        self.conn = aioredis.Redis.from_url(
            redis_url, decode_responses=True, max_connections=2 * len(fleet) + 64
        )
        self.store = TaskStore(self.conn, KEYS)
        self.fleet = fleet
        self.interval = interval
        self.ttl = heartbeat_ttl(interval)
        self.ready = False
        self.since = time.time()
        self.load = sample_load(Nvml())
        self.beats = 0
        self.unregistered = 0  # beats answered "not registered": the orchestrator lost us
        self.dropped = 0  # deliveries start.lua refused
        self._loops: list[asyncio.Task[None]] = []

    def presence(self, w: SimWorker) -> WorkerPresence:
        state = ExecutorState.READY if self.ready else ExecutorState.STARTING
        return WorkerPresence(
            status=WorkerStatus.BUSY if w.running else WorkerStatus.IDLE,
            running=len(w.running),
            current_tasks=sorted(w.running),
            loaded_models=[],
            executor_states={"echo": ExecutorStatus(state, self.since)},
            devices={},
            load=self.load,
            cost_accrued=0.0,
        )

    async def register(self, w: SimWorker) -> None:
        """What worker.presence.Presence.register does, on the async client."""
        try:
            await self.conn.xgroup_create(w.record.inbox, INBOX_GROUP, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise
        async with self.conn.pipeline(transaction=True) as pipe:
            workers.register(pipe, KEYS, w.record, self.presence(w), self.ttl)
            await pipe.execute()

    async def register_all(self, concurrency: int = 16) -> float:
        """Register every worker, `concurrency` at a time; seconds taken. Beats are then
        spread evenly over one interval."""
        gate = asyncio.Semaphore(concurrency)

        async def one(w: SimWorker) -> None:
            async with gate:
                await self.register(w)

        started = time.perf_counter()
        await asyncio.gather(*(one(w) for w in self.fleet))
        took = time.perf_counter() - started
        now = time.monotonic()
        for i, w in enumerate(self.fleet):
            w.next_beat = now + self.interval * (i + 1) / len(self.fleet)
        return took

    def start(self) -> None:
        self._loops = [asyncio.create_task(self._heartbeats(), name="heartbeats")]
        self._loops += [asyncio.create_task(self._inbox(w)) for w in self.fleet]

    async def stop(self) -> None:
        for t in self._loops:
            t.cancel()
        await asyncio.gather(*self._loops, return_exceptions=True)
        await self.conn.aclose()

    async def _beat(self, due: list[SimWorker], changed: bool = False) -> None:
        async with self.conn.pipeline(transaction=False) as pipe:
            for w in due:
                workers.beat(
                    pipe, KEYS, w.worker_id, self.presence(w), self.ttl, executors_changed=changed
                )
            replies = await pipe.execute()
        per = len(replies) // len(due)
        self.beats += len(due)
        self.unregistered += sum(1 for r in replies[::per] if not r)

    async def _heartbeats(self) -> None:
        while True:
            await asyncio.sleep(0.1)
            now = time.monotonic()
            due = [w for w in self.fleet if w.next_beat <= now]
            if due:
                for w in due:
                    w.next_beat += self.interval
                await self._beat(due)

    async def executors_ready(self) -> None:
        """Every worker's executor turns ready: each beats at once with `executors_changed`,
        as a real worker's presence thread does (a `worker.ready` event each)."""
        self.ready, self.since = True, time.time()
        await self._beat(self.fleet, changed=True)

    async def _inbox(self, w: SimWorker) -> None:
        """The worker's inbox loop (worker.worker.Worker._inbox_loop): read as itself, up
        to its free slots, blocking 1 s; start what it read, "run" it, settle it."""
        inbox = w.record.inbox
        while True:
            free = w.record.slots - len(w.running)
            reply = await self.conn.xreadgroup(
                INBOX_GROUP, w.worker_id, {inbox: ">"}, count=free, block=1000
            )
            entries = reply[0][1] if reply else []
            batch = [d for sid, f in entries if f for d in Delivery.from_entry(sid, f)]
            if batch:
                await self._run(w, batch)

    async def _run(self, w: SimWorker, batch: list[Delivery]) -> None:
        """Start a read's deliveries in one script call, run them (instantly), settle them
        in one: the real worker's calls, without its executor process."""
        outcomes = await self.store.start(w.worker_id, [(d.task_id, d.attempt) for d in batch])
        started = [d for d, o in zip(batch, outcomes, strict=True) if o.ok]
        dropped = [d.stream_id for d, o in zip(batch, outcomes, strict=True) if not o.ok]
        if dropped:
            self.dropped += len(dropped)
            await self.conn.xack(w.record.inbox, INBOX_GROUP, *dropped)
        w.running.update(d.task_id for d in started)
        endings = [
            Ending(
                d.task_id,
                d.attempt,
                TaskStatus.DONE,
                result_json=RESULT_JSON,
                stream_id=d.stream_id,
            )
            for d in started
        ]
        if endings:
            await self.store.settle_many(w.worker_id, endings, inbox=w.record.inbox)
        w.running.difference_update(d.task_id for d in started)


# -- measuring -----------------------------------------------------------------------
class Clock:
    """CPU seconds of the orchestrator, Redis and this process, and wall time."""

    def __init__(self, fleet: Fleet):
        self.fleet = fleet
        self.me = psutil.Process()

    def read(self) -> dict[str, float]:
        cpu = self.fleet.control_cpu()  # proc0: the orchestrator
        mine = self.me.cpu_times()
        return {
            "orchestrator": cpu["proc0"],
            "redis": cpu["redis"],
            "simulator": mine.user + mine.system,
            "wall": time.perf_counter(),
        }

    @staticmethod
    def spent(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
        return {k: after[k] - before[k] for k in before}


async def redis_memory(conn: aioredis.Redis) -> tuple[int, int, int]:
    """(data bytes, client connection bytes, connections): used_memory less what Redis
    holds for client connections (their buffers), after MEMORY PURGE."""
    await conn.execute_command("MEMORY", "PURGE")
    info = await conn.info("memory")
    clients = int(info["mem_clients_normal"])
    connected = int((await conn.info("clients"))["connected_clients"])
    return int(info["used_memory"]) - clients, clients, connected


async def commands_served(conn: aioredis.Redis) -> int:
    """Every command Redis has run; Lua's own calls count too, as in bench/pipelines.py."""
    return sum(int(v["calls"]) for v in (await conn.info("commandstats")).values())


async def memory_usage(conn: aioredis.Redis, keys: list[str]) -> int:
    total = 0
    for i in range(0, len(keys), 1000):
        async with conn.pipeline(transaction=False) as pipe:
            for key in keys[i : i + 1000]:
                pipe.execute_command("MEMORY", "USAGE", key, "SAMPLES", "0")
            total += sum(int(r or 0) for r in await pipe.execute())
    return total


async def task_times(conn: aioredis.Redis, ids: list[str]) -> list[dict[str, float]]:
    """Each task's timestamps; every task must be DONE at its first attempt."""
    out = []
    for i in range(0, len(ids), 1000):
        async with conn.pipeline(transaction=False) as pipe:
            for task_id in ids[i : i + 1000]:
                pipe.hmget(KEYS.task(task_id), ["status", "attempts", *TIMES])
            rows = await pipe.execute()
        for task_id, (status, attempts, *values) in zip(ids[i:], rows, strict=False):
            if status != "DONE" or attempts != "1":
                raise RuntimeError(f"task {task_id} is {status} after {attempts} attempt(s)")
            out.append(dict(zip(TIMES, map(float, values), strict=True)))
    return out


async def wait_done(conn: aioredis.Redis, total: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    key = KEYS.tasks_by_status(TaskStatus.DONE)
    while await conn.zcard(key) < total:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{await conn.zcard(key)} of {total} tasks DONE after {timeout}s")
        await asyncio.sleep(0.1)


# -- the client process: HTTP submits and the refresh probe, off the simulator's loop ----
def submit_batches(url: str, n: int, batch: int) -> list[str]:
    with Client(url) as client:
        return [
            t["task_id"]
            for i in range(0, n, batch)
            for t in client.submit([ECHO] * min(batch, n - i))
        ]


def submit_paced(url: str, rate: float, seconds: float) -> list[str]:
    """`rate` tasks/s for `seconds`, a batch every 0.1 s, as many clients would send them."""
    per = max(1, round(rate / 10))
    ids: list[str] = []
    with Client(url) as client:
        start = time.monotonic()
        for tick in range(round(seconds * 10)):
            time.sleep(max(0.0, start + tick / 10 - time.monotonic()))
            ids += [t["task_id"] for t in client.submit([ECHO] * per)]
    return ids


def probe_refresh(redis_url: str, rounds: int = 5) -> tuple[float, float]:
    """The orchestrator's own fleet refresh (`orchestrator.fleet.Fleet.refresh`: every
    worker record, heartbeat TTL and task set read and parsed) run alone in this process:
    median wall and CPU ms."""

    async def run() -> tuple[float, float]:
        conn = redis_client(redis_url)
        probe = OrchestratorFleet(conn, KEYS)
        probe._reap_after = float("inf")  # a probe: never declare anyone lost
        walls, cpus = [], []
        for _ in range(rounds):
            wall, cpu = time.perf_counter(), time.process_time()
            await probe.refresh()
            walls.append(1000 * (time.perf_counter() - wall))
            cpus.append(1000 * (time.process_time() - cpu))
        await conn.aclose()
        return statistics.median(walls), statistics.median(cpus)

    return asyncio.run(run())


# -- one fleet size, phase by phase ----------------------------------------------------
class Run:
    def __init__(self, fleet: Fleet, args: argparse.Namespace, n: int, pool: Executor):
        self.fleet, self.args, self.n, self.pool = fleet, args, n, pool
        self.url = f"http://127.0.0.1:{fleet.client._port}"  # Fleet keeps no URL of its own
        self.conn = redis_client(fleet.redis.url)
        rng = random.Random(n)
        self.sim = Simulator(fleet.redis.url, make_workers(n, args.heartbeat, rng), args.heartbeat)
        self.clock = Clock(fleet)
        self.row: dict[str, float] = {"workers": n, "tasks": args.tasks}

    async def client(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self.pool, fn, *args)

    async def measure(self) -> dict[str, float]:
        try:
            data, clients, connected = await redis_memory(self.conn)
            await self.register()
            data1, clients1, connected1 = await redis_memory(self.conn)
            self.row["bytes_per_worker"] = (data1 - data) / self.n
            self.row["bytes_per_connection"] = (clients1 - clients) / (connected1 - connected)
            await self.idle()
            backlog = await self.submit()
            data2, *_ = await redis_memory(self.conn)
            self.row["bytes_per_pending"] = (data2 - data1) / self.args.tasks
            await self.drain(backlog)
            steady = await self.steady()
            await self.kept(data1, backlog, self.args.tasks + len(steady))
            return self.row
        finally:
            await self.sim.stop()
            await self.conn.aclose()

    async def register(self) -> None:
        self.row["register_sec"] = await self.sim.register_all()
        self.row["slots"] = sum(w.record.slots for w in self.sim.fleet)
        self.sim.start()
        await asyncio.sleep(2.0)  # the orchestrator takes in the registrations

    async def idle(self) -> None:
        """Idle, the orchestrator's work is its fleet refresh, once per SCHEDULER_REFRESH_SEC."""
        before = self.clock.read()
        await asyncio.sleep(self.args.idle_sec)
        spent = self.clock.spent(before, self.clock.read())
        row, wall = self.row, spent["wall"]
        row["idle_orch_pct"] = 100 * spent["orchestrator"] / wall
        row["idle_redis_pct"] = 100 * spent["redis"] / wall
        row["idle_sim_pct"] = 100 * spent["simulator"] / wall
        row["idle_refresh_cpu_ms"] = 1000 * spent["orchestrator"] * self.args.refresh_sec / wall
        row["refresh_wall_ms"], row["refresh_cpu_ms"] = await self.client(
            probe_refresh, self.fleet.redis.url
        )

    async def submit(self) -> list[str]:
        """The backlog, while every executor is still starting: it stays PENDING."""
        tasks = self.args.tasks
        before = self.clock.read()
        ids: list[str] = await self.client(submit_batches, self.url, tasks, self.args.batch)
        spent = self.clock.spent(before, self.clock.read())
        self.row["submit_rate"] = tasks / spent["wall"]
        self.row["submit_orch_us"] = 1e6 * spent["orchestrator"] / tasks
        self.row["submit_redis_us"] = 1e6 * spent["redis"] / tasks
        await asyncio.sleep(2.0)  # the orchestrator's first round writes the tasks' reason
        pending = await self.conn.zcard(KEYS.pending_queue)
        if pending != tasks:
            raise RuntimeError(f"{pending} of {tasks} tasks pending before the drain")
        return ids

    async def drain(self, backlog: list[str]) -> None:
        tasks, row = self.args.tasks, self.row
        before, commands = self.clock.read(), await commands_served(self.conn)
        ready_at = time.time()
        await self.sim.executors_ready()
        await wait_done(self.conn, tasks, timeout=600)
        spent = self.clock.spent(before, self.clock.read())
        row["drain_commands"] = (await commands_served(self.conn) - commands) / tasks
        times = await task_times(self.conn, backlog)
        first = min(t["dispatched_at"] for t in times)
        row["drain_rate"] = tasks / (max(t["finished_at"] for t in times) - first)
        for what in ("orchestrator", "redis", "simulator"):
            row[f"drain_{what}_us"] = 1e6 * spent[what] / tasks
        row["drain_orch_pct"] = 100 * spent["orchestrator"] / spent["wall"]
        row["first_dispatch_ms"] = 1000 * (first - ready_at)
        row["all_placed_sec"] = max(t["dispatched_at"] for t in times) - ready_at

    async def steady(self) -> list[str]:
        """Tasks at --rate into a fleet with free slots: created -> dispatched is placement."""
        await asyncio.sleep(1.0)
        before = self.clock.read()
        ids: list[str] = await self.client(
            submit_paced, self.url, self.args.rate, self.args.paced_sec
        )
        await wait_done(self.conn, self.args.tasks + len(ids), timeout=300)
        spent = self.clock.spent(before, self.clock.read())
        times = await task_times(self.conn, ids)
        row = self.row
        row["paced_rate"] = len(ids) / spent["wall"]
        placement = [1000 * (t["dispatched_at"] - t["created_at"]) for t in times]
        row["place_p50_ms"] = percentile(placement, 0.5) or 0.0
        row["place_p90_ms"] = percentile(placement, 0.9) or 0.0
        row["place_p99_ms"] = percentile(placement, 0.99) or 0.0
        starts = [1000 * (t["started_at"] - t["dispatched_at"]) for t in times]
        row["start_p50_ms"] = percentile(starts, 0.5) or 0.0
        row["paced_orch_pct"] = 100 * spent["orchestrator"] / spent["wall"]
        row["paced_orch_us"] = 1e6 * spent["orchestrator"] / len(ids)
        return ids

    async def kept(self, data_before: int, backlog: list[str], done: int) -> None:
        """What the finished tasks leave in Redis: nothing here expires them."""
        conn, row = self.conn, self.row
        data, *_ = await redis_memory(conn)
        row["bytes_per_done"] = (data - data_before) / done
        inboxes = await memory_usage(conn, [w.record.inbox for w in self.sim.fleet])
        row["inbox_bytes_per_done"] = inboxes / done
        row["events_mb"] = await memory_usage(conn, [KEYS.events]) / 2**20
        sample = random.Random(0).sample(backlog, min(200, len(backlog)))
        hashes = await memory_usage(conn, [KEYS.task(t) for t in sample])
        row["task_hash_bytes"] = hashes / len(sample)
        row["used_memory_mb"] = int((await conn.info("memory"))["used_memory"]) / 2**20
        row["beats"] = self.sim.beats
        row["lost"] = self.n - await conn.scard(KEYS.worker_ids) + self.sim.unregistered
        row["dropped"] = self.sim.dropped


def run_size(args: argparse.Namespace, n: int) -> dict[str, float]:
    scratch = Path(tempfile.mkdtemp(prefix="flowmesh-bench-scale-"))
    try:
        with ExitStack() as stack:
            # The orchestrator's defaults (bench.inference.Fleet would refresh every 0.2 s).
            fleet = Fleet(stack, scratch, SCHEDULER_REFRESH_SEC=str(args.refresh_sec))
            spawn = multiprocessing.get_context("spawn")
            with ProcessPoolExecutor(1, mp_context=spawn) as pool:
                row = asyncio.run(Run(fleet, args, n, pool).measure())
        shutil.rmtree(scratch, ignore_errors=True)
        return row
    except BaseException:
        print(f"logs kept in {scratch}", file=sys.stderr)
        raise


# -- the table -----------------------------------------------------------------------
ROWS: list[tuple[str, str, str]] = [
    # (label, key, format)
    ("slots in the fleet (4-16 per worker)", "slots", ",.0f"),
    ("register N workers (s; 16 at a time)", "register_sec", ".2f"),
    ("Redis bytes per registered worker (keys)", "bytes_per_worker", ",.0f"),
    ("Redis bytes per client connection (1 per simulated worker)", "bytes_per_connection", ",.0f"),
    ("idle: orchestrator CPU (% of a core)", "idle_orch_pct", ".1f"),
    ("idle: orchestrator CPU per fleet refresh (ms)", "idle_refresh_cpu_ms", ".1f"),
    ("idle: Redis CPU (% of a core)", "idle_redis_pct", ".1f"),
    ("idle: simulated workers' CPU (% of a core)", "idle_sim_pct", ".1f"),
    ("one fleet refresh alone, wall / CPU (ms)", "refresh", ""),
    ("submit: tasks/s (HTTP, one client)", "submit_rate", ",.0f"),
    ("submit: orchestrator CPU per task (us)", "submit_orch_us", ".0f"),
    ("submit: Redis CPU per task (us)", "submit_redis_us", ".0f"),
    ("Redis bytes per pending task", "bytes_per_pending", ",.0f"),
    ("drain: tasks/s (first dispatch to last finish)", "drain_rate", ",.0f"),
    ("drain: orchestrator CPU per task (us)", "drain_orchestrator_us", ".0f"),
    ("drain: orchestrator busy (% of a core)", "drain_orch_pct", ".0f"),
    ("drain: Redis CPU per task (us)", "drain_redis_us", ".0f"),
    ("drain: simulated workers' CPU per task (us)", "drain_simulator_us", ".0f"),
    ("drain: Redis commands per task (Lua's own included)", "drain_commands", ".1f"),
    ("drain: executors ready -> first dispatch (ms)", "first_dispatch_ms", ".0f"),
    ("drain: executors ready -> last task placed (s)", "all_placed_sec", ".1f"),
    ("steady: tasks/s submitted", "paced_rate", ",.0f"),
    ("steady: placement p50 / p90 / p99 (ms)", "place", ""),
    ("steady: dispatched -> started p50 (ms; the simulator)", "start_p50_ms", ".1f"),
    ("steady: orchestrator CPU per task (us)", "paced_orch_us", ".0f"),
    ("steady: orchestrator busy (% of a core)", "paced_orch_pct", ".0f"),
    ("Redis bytes per finished task, all kept", "bytes_per_done", ",.0f"),
    ("  of which its inbox entry (never trimmed)", "inbox_bytes_per_done", ",.0f"),
    ("  a DONE task's hash (MEMORY USAGE)", "task_hash_bytes", ",.0f"),
    ("events stream at the end (MiB)", "events_mb", ".1f"),
    ("Redis used_memory at the end (MiB)", "used_memory_mb", ",.0f"),
    ("heartbeats / workers lost / starts refused", "health", ""),
]


def cell(runs: list[dict[str, float]], key: str, fmt: str) -> str:
    def one(k: str, f: str) -> str:
        values = [r[k] for r in runs]
        med = statistics.median(values)
        if len(values) == 1:
            return format(med, f)
        return f"{format(med, f)} ({format(min(values), f)}-{format(max(values), f)})"

    if key == "refresh":
        return f"{one('refresh_wall_ms', '.0f')} / {one('refresh_cpu_ms', '.0f')}"
    if key == "place":
        return " / ".join(one(f"place_p{q}_ms", ".1f") for q in (50, 90, 99))
    if key == "health":
        r = runs[-1]
        return f"{r['beats']:,.0f} / {r['lost']:.0f} / {r['dropped']:.0f}"
    return one(key, fmt)


def print_table(results: dict[int, list[dict[str, float]]], args: argparse.Namespace) -> None:
    cores = psutil.cpu_count() or 1
    print(
        f"\n## Scale: simulated workers against a real orchestrator and Redis ({cores} cores; "
        f"{args.tasks:,} echo tasks in HTTP batches of {args.batch}; heartbeat "
        f"{args.heartbeat:g} s; SCHEDULER_REFRESH_SEC={args.refresh_sec:g}; steady phase "
        f"{args.rate:,.0f} tasks/s for {args.paced_sec:g} s"
        + (f"; median (min-max) of {args.repeats} runs" if args.repeats > 1 else "")
        + ")\n"
    )
    sizes = sorted(results)
    print("| | " + " | ".join(f"{n:,} workers" for n in sizes) + " |")
    print("|---|" + "---|" * len(sizes))
    for label, key, fmt in ROWS:
        print(f"| {label} | " + " | ".join(cell(results[n], key, fmt) for n in sizes) + " |")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workers", default="1000", help="simulated workers; a list runs each size")
    p.add_argument("--tasks", type=int, default=100_000, help="the backlog drained per size")
    p.add_argument("--repeats", type=int, default=1, help="fresh fleets per size")
    p.add_argument("--batch", type=int, default=1000, help="specs per HTTP submit")
    p.add_argument("--rate", type=float, default=1000, help="steady phase: tasks/s")
    p.add_argument("--paced-sec", type=float, default=10.0, help="steady phase: seconds")
    p.add_argument("--idle-sec", type=float, default=10.0, help="idle window measured")
    p.add_argument("--heartbeat", type=float, default=30.0, help="HEARTBEAT_INTERVAL_SEC")
    p.add_argument("--refresh-sec", type=float, default=1.0, help="SCHEDULER_REFRESH_SEC")
    p.add_argument("--quick", action="store_true", help="100 workers, 5,000 tasks, short phases")
    args = p.parse_args(argv)
    if args.quick:
        args.workers, args.tasks, args.idle_sec, args.paced_sec = "100", 5000, 3.0, 3.0
    sizes = [int(s) for s in args.workers.split(",") if s.strip()]
    results: dict[int, list[dict[str, float]]] = {}
    for _ in range(args.repeats):  # in turns, so that every size sees the same drift
        for n in sizes:
            print(f"  {n:,} workers, {args.tasks:,} tasks...", flush=True)
            results.setdefault(n, []).append(run_size(args, n))
    print_table(results, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
