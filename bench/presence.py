"""Presence under load: slow executor start-up on busy cores, and whether workers stay alive.

    uv run python -m bench.presence
    uv run python -m bench.presence --workers 2 --setup-sec 20 --burners 2 --tasks 60 --interval 1

Starts a private Redis, `--burners` busy-loop processes (before anything else, killed after
the run), an orchestrator and `--workers` workers with HEARTBEAT_INTERVAL_SEC=`--interval`
whose only executor (`bench/plugin/fm_bench_slow.py`) takes `--setup-sec` to start (the
first `--busy-sec` of it a busy loop, the rest asleep), and submits `--tasks` tasks at once,
before any executor is ready. While the fleet starts and drains it samples each worker's
heartbeat key (its value is the worker's wall-clock time of the beat) every 50 ms and the
API's executor states every 0.5 s. Prints the heartbeat gaps (p50 / p99 / max ms, per worker
and overall) against the lease (2 intervals + 1 s), `worker_lost` records, tasks DONE, the
attempts distribution and the time from each worker's start to its executor being ready.
"""

from __future__ import annotations

import argparse
import http.client
import itertools
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import redis

from bench.stats import percentile
from flowmesh.client import ApiError, Client
from flowmesh.embedded import EmbeddedRedis, free_port
from flowmesh.keys import Keys

PLUGIN = Path(__file__).resolve().parent / "plugin"
EXECUTOR = "bench_slow_start"
ROOT = Path(__file__).resolve().parent.parent


class Sampler:
    """Heartbeat values every 50 ms; executor states and a pending task's reason every 0.5 s.
    Two threads: a slow API reply on the loaded machine never delays a beat's sample."""

    def __init__(self, redis_url: str, keys: Keys, api: str, worker_ids: list[str]):
        self.r = redis.Redis.from_url(redis_url, decode_responses=True, socket_timeout=5)
        self.keys = keys
        self.client = Client(api, timeout=10)
        self.worker_ids = worker_ids
        self.probe: str | None = None
        self.halt = threading.Event()
        self.beats: dict[str, list[float]] = {w: [] for w in worker_ids}
        # worker -> [(state, since)] in the order first seen
        self.states: dict[str, list[tuple[str, float]]] = {w: [] for w in worker_ids}
        self.reasons: list[str] = []
        self.errors = 0
        self._threads = [
            threading.Thread(target=self._beat_loop, name="beat-sampler", daemon=True),
            threading.Thread(target=self._api_loop, name="api-sampler", daemon=True),
        ]

    def start(self) -> None:
        for t in self._threads:
            t.start()

    def stop(self) -> None:
        self.halt.set()
        for t in self._threads:
            if t.is_alive():
                t.join(timeout=10)

    def _beat_loop(self) -> None:
        hb_keys = [self.keys.heartbeat(w) for w in self.worker_ids]
        try:
            while not self.halt.is_set():
                try:
                    for wid, value in zip(self.worker_ids, self.r.mget(hb_keys), strict=True):
                        if value is not None:
                            beat = float(value)
                            seen = self.beats[wid]
                            if not seen or beat != seen[-1]:
                                seen.append(beat)
                except (redis.RedisError, OSError, ValueError):
                    self.errors += 1
                self.halt.wait(0.05)
        finally:
            self.r.close()

    def _api_loop(self) -> None:
        try:
            while not self.halt.is_set():
                try:
                    self._sample_api()
                except (OSError, ValueError, KeyError, http.client.HTTPException, ApiError):
                    self.errors += 1
                self.halt.wait(0.5)
        finally:
            self.client.close()

    def _sample_api(self) -> None:
        for w in self.client.workers():
            status = w.get("executor_states", {}).get(EXECUTOR)
            seen = self.states.get(w["worker_id"])
            if status and seen is not None and (not seen or seen[-1][0] != status["state"]):
                seen.append((status["state"], float(status.get("since", 0))))
        if self.probe:
            task = self.client.task(self.probe)
            reason = task.get("reason")
            if task["status"] == "PENDING" and reason and reason not in self.reasons:
                self.reasons.append(reason)

    def gaps(self, wid: str) -> list[float]:
        return [b - a for a, b in itertools.pairwise(self.beats[wid])]


def _lost(history: list[dict[str, Any]]) -> int:
    n = 0
    for entry in history:
        error = entry.get("error")
        kind = error.get("kind") if isinstance(error, dict) else None
        if entry.get("outcome") == "worker_lost" or kind == "worker_lost":
            n += 1
    return n


def run_presence(
    redis_url: str,
    *,
    workers: int = 2,
    setup_sec: float = 20.0,
    busy_sec: float = 2.0,
    burners: int = 2,
    tasks: int = 60,
    interval: float = 1.0,
    delay: float = 0.2,
) -> dict[str, Any]:
    logs = Path(tempfile.mkdtemp(prefix="flowmesh-presence-"))
    prefix = f"fmpresence{uuid.uuid4().hex[:6]}:"
    keys = Keys(prefix)
    env = {
        **os.environ,
        "REDIS_URL": redis_url,
        "REDIS_KEY_PREFIX": prefix,
        "PYTHONUNBUFFERED": "1",
        "LOG_LEVEL": "INFO",
        "PYTHONPATH": str(PLUGIN),
        "RESULTS_DIR": str(logs / "results"),
        "FLOWMESH_BENCH_SETUP_SEC": str(setup_sec),
        "FLOWMESH_BENCH_BUSY_SEC": str(busy_sec),
    }
    env.pop("FLOWMESH_API_TOKEN", None)
    port = free_port()
    api = f"http://127.0.0.1:{port}"
    worker_ids = [f"presence-{i}" for i in range(workers)]
    procs: dict[str, subprocess.Popen[bytes]] = {}
    burner_procs: list[subprocess.Popen[bytes]] = []
    spawned: dict[str, float] = {}

    def spawn(name: str, args: list[str], **extra: str) -> None:
        with (logs / f"{name}.log").open("ab") as fh:
            procs[name] = subprocess.Popen(
                [sys.executable, *args],
                env={**env, **extra},
                stdout=fh,
                stderr=subprocess.STDOUT,
                cwd=ROOT,
            )
        spawned[name] = time.time()

    r = redis.Redis.from_url(redis_url, decode_responses=True)
    client = Client(api, timeout=60)
    sampler = Sampler(redis_url, keys, api, worker_ids)
    try:
        burner_procs = [
            subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(burners)
        ]
        spawn("orchestrator", ["-m", "orchestrator.main", "--port", str(port)])
        deadline = time.monotonic() + 60
        while not client.healthy():
            if time.monotonic() > deadline or procs["orchestrator"].poll() is not None:
                raise RuntimeError(f"orchestrator did not start; logs in {logs}")
            time.sleep(0.2)
        sampler.start()  # before the workers: their registration is the first beat seen
        for wid in worker_ids:
            spawn(
                wid,
                ["-m", "worker.main"],
                WORKER_ID=wid,
                WORKER_EXECUTORS=EXECUTOR,
                HEARTBEAT_INTERVAL_SEC=str(interval),
            )
        submitted_at = time.time()
        spec = {"spec": {"taskType": EXECUTOR, EXECUTOR: {"delaySec": delay}}}
        ids = [t["task_id"] for t in client.submit([spec] * tasks)]
        sampler.probe = ids[0]

        deadline = time.monotonic() + 3 * setup_sec + tasks * delay + 120
        while True:
            done = r.zcard(keys.tasks_by_status("DONE"))
            failed = r.zcard(keys.tasks_by_status("FAILED"))
            if done + failed >= tasks:
                break
            dead = [n for n, p in procs.items() if p.poll() is not None]
            if time.monotonic() > deadline or dead:
                print(f"  stopped waiting ({done} DONE; exited: {dead}); logs in {logs}")
                break
            time.sleep(0.5)
        drained_at = time.time()
        burners_alive = all(p.poll() is None for p in burner_procs)
        sampler.stop()
        rows = [client.task(t) for t in ids]
    finally:
        sampler.stop()
        for p in burner_procs:
            p.kill()
        for p in procs.values():
            if p.poll() is None:
                p.terminate()
        for p in [*burner_procs, *procs.values()]:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        client.close()
        r.close()

    def text(name: str) -> str:
        return (logs / f"{name}.log").read_text(errors="replace")

    per_worker = {}
    for wid in worker_ids:
        states = sampler.states[wid]
        ready = next((since for state, since in states if state == "ready"), None)
        beats = sampler.beats[wid]
        per_worker[wid] = {
            "gaps": sampler.gaps(wid),
            "beats": len(beats),
            "registered_sec": beats[0] - spawned[wid] if beats else None,
            "ready_sec": ready - spawned[wid] if ready else None,
            "states": [s for s, _ in states],
            "early_dispatches": sum(
                1
                for t in rows
                if t.get("worker_id") == wid
                and t.get("dispatched_at")
                and (ready is None or t["dispatched_at"] < ready)
            ),
            "registering_again": text(wid).count("registering again"),
        }
    return {
        "workers": per_worker,
        "lease_sec": 2 * interval + 1.0,
        "worker_lost_records": sum(_lost(t.get("history") or []) for t in rows),
        "orchestrator_lost_lines": [ln for ln in text("orchestrator").splitlines() if "lost" in ln],
        "statuses": Counter(t["status"] for t in rows),
        "attempts": Counter(t["attempts"] for t in rows),
        "reasons": sampler.reasons,
        "drain_sec": drained_at - submitted_at,
        "burners_alive": burners_alive,
        "sampler_errors": sampler.errors,
        "logs": str(logs),
        "settings": {
            "workers": workers,
            "setup_sec": setup_sec,
            "busy_sec": busy_sec,
            "burners": burners,
            "cores": os.cpu_count(),
            "tasks": tasks,
            "interval": interval,
            "delay": delay,
        },
    }


def _ms(values: list[float], q: float) -> str:
    v = percentile(values, q)
    return "-" if v is None else f"{v * 1000:,.0f}"


def _sec(v: float | None) -> str:
    return "-" if v is None else f"{v:.1f}"


def print_presence(res: dict[str, Any]) -> None:
    s = res["settings"]
    print(
        f"  {s['workers']} workers, HEARTBEAT_INTERVAL_SEC={s['interval']:g} "
        f"(lease {res['lease_sec']:g} s), executor setup {s['setup_sec']:g} s "
        f"({s['busy_sec']:g} s of it busy), {s['burners']} CPU burners on {s['cores']} cores "
        f"(running to the end: {'yes' if res['burners_alive'] else 'NO'}), "
        f"{s['tasks']} tasks of {s['delay']:g} s submitted before any executor was ready",
        flush=True,
    )
    head = ("worker", "beats", "gap p50", "p99", "max ms", "registered", "ready s", "early")
    line = "  {:<12} {:>6} {:>8} {:>7} {:>7}   {:>10} {:>8} {:>6}"
    print(line.format(*head))
    everything: list[float] = []
    for wid, w in res["workers"].items():
        g = w["gaps"]
        everything += g
        print(
            line.format(
                wid,
                w["beats"],
                _ms(g, 0.5),
                _ms(g, 0.99),
                _ms(g, 1.0),
                _sec(w["registered_sec"]),
                _sec(w["ready_sec"]),
                w["early_dispatches"],
            )
        )
    n = sum(w["beats"] for w in res["workers"].values())
    print(line.format("overall", n, *(_ms(everything, q) for q in (0.5, 0.99, 1.0)), "", "", ""))
    print(
        "  (registered / ready: seconds from the worker's start to its first beat / to its"
        " executor being ready; early: tasks dispatched to it before that, should be 0)"
    )
    attempts = ", ".join(f"{k}: {v}" for k, v in sorted(res["attempts"].items()))
    statuses = ", ".join(f"{k} {v}" for k, v in sorted(res["statuses"].items()))
    print(
        f"  worker_lost records {res['worker_lost_records']}; "
        f"orchestrator 'lost' lines {len(res['orchestrator_lost_lines'])}; "
        f"'registering again' {sum(w['registering_again'] for w in res['workers'].values())}"
    )
    print(
        f"  tasks: {statuses}; attempts {{{attempts}}}; "
        f"drained {res['drain_sec']:.1f} s after submit"
    )
    print(
        "  executor states seen: "
        + "; ".join(f"{wid} {' -> '.join(w['states'])}" for wid, w in res["workers"].items())
    )
    waiting = [r for r in res["reasons"] if "ready" in r]
    if waiting:
        print(f"  pending reason meanwhile: {waiting[0]}")
    print(f"  logs: {res['logs']}", flush=True)


def main() -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--setup-sec", type=float, default=20.0)
    p.add_argument("--busy-sec", type=float, default=2.0)
    p.add_argument("--burners", type=int, default=2)
    p.add_argument("--tasks", type=int, default=60)
    p.add_argument("--interval", type=float, default=1.0)
    p.add_argument("--delay", type=float, default=0.2, help="each task's run time, s")
    p.add_argument("--redis-url", help="an existing Redis (default: a private one)")
    p.add_argument("--json", action="store_true", help="also print the raw result as JSON")
    args = p.parse_args()
    kw = {
        "workers": args.workers,
        "setup_sec": args.setup_sec,
        "busy_sec": args.busy_sec,
        "burners": args.burners,
        "tasks": args.tasks,
        "interval": args.interval,
        "delay": args.delay,
    }
    print("## Presence under load: slow executor start, busy cores", flush=True)
    if args.redis_url:
        res = run_presence(args.redis_url, **kw)
    else:
        with EmbeddedRedis() as server:
            res = run_presence(server.url, **kw)
    print_presence(res)
    if args.json:
        print(json.dumps(res, default=str))
    lost = res["worker_lost_records"] or res["orchestrator_lost_lines"]
    return 1 if lost or res["statuses"].get("DONE", 0) != args.tasks else 0


if __name__ == "__main__":
    sys.exit(main())
