"""The benchmark suite: FlowMesh against the queues users would pick instead, on one Redis.

    uv run python -m bench                       # everything, 3 runs each, ~45 min
    uv run python -m bench --runs 1 --tasks 2000 # a quick look
    uv run python -m bench --only throughput,latency --peers celery,arq
    uv run --group bench python -m bench --only backlog --runs 2 --tasks 5000

Each peer runs from its own virtual environment (.bench/venvs/<peer>, made with uv from
bench/peers/requirements/<peer>.txt) against the same private Redis, with the same no-op task
that counts itself in Redis. Figures are the median of --runs runs with the spread (min-max);
ratios compare FlowMesh with the best peer of the same run. See bench/README.md.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from bench.idle import idle_cost
from bench.presence import print_presence, run_presence
from bench.raw_redis import pipelined, round_trip
from flowmesh.embedded import EmbeddedRedis

ROOT = Path(__file__).resolve().parent.parent
PEERS = ("celery", "dramatiq", "rq", "arq", "taskiq", "saq")
BACKLOG_PEERS = ("celery", "dramatiq", "taskiq", "saq")  # arq and RQ drain slowly: --peers
# The backlog section's systems: name -> (runner, its flags). Every system at its defaults;
# Celery on its threads pool (Celery's default concurrency, the CPUs), as in the table.
BACKLOG_VARIANTS = {
    "flowmesh": ("flowmesh", ["--defaults"]),
    "flowmesh-slots64": ("flowmesh", ["--defaults", "--slots", "64"]),
    "celery": ("celery", ["--pool", "threads", "--concurrency", "0"]),
}
SECTIONS = (
    "throughput",
    "latency",
    "backlog",
    "raw",
    "scheduler",
    "redis-memory",
    "idle",
    "presence",
    "inference",
    "artifacts",
    "training",
    "pipelines",
    "scale",
)


def run_system(
    system: str,
    python: str,
    redis_url: str,
    mode: str,
    tasks: int,
    workers: int,
    runner: str | None = None,
    extra: list[str] | None = None,
) -> dict[str, Any]:
    """One run of `runner` (default: the system's own) with the common flags and `extra`."""
    runner = runner or system
    target = (
        ["-m", "bench.flowmesh_runner"]
        if runner == "flowmesh"
        else [f"bench/peers/{runner}_runner.py"]
    )
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        proc = subprocess.run(
            [
                python,
                *target,
                "--redis-url",
                redis_url,
                "--mode",
                mode,
                "--tasks",
                str(tasks),
                "--workers",
                str(workers),
                "--out",
                out.name,
                *(extra or []),
            ],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=900,
        )
        if proc.returncode != 0:
            tail = (proc.stdout + proc.stderr).strip().splitlines()[-5:]
            return {"system": system, "error": " | ".join(tail)}
        return {**json.loads(Path(out.name).read_text()), "system": system}


def median_of(runs: list[dict[str, Any]], field: str) -> tuple[float, float, float] | None:
    values = [r[field] for r in runs if r.get(field) is not None]
    if not values:
        return None
    return statistics.median(values), min(values), max(values)


def fmt(stat: tuple[float, float, float] | None, digits: int = 0) -> str:
    if stat is None:
        return "failed"
    med, lo, hi = stat
    return f"{med:,.{digits}f} ({lo:,.{digits}f}-{hi:,.{digits}f})"


def pythons(peers: list[str]) -> dict[str, str]:
    found = {"flowmesh": sys.executable}
    from bench.peers.venv import ensure_venv

    for peer in peers:
        try:
            found[peer] = str(ensure_venv(peer, ROOT))
        except (OSError, subprocess.CalledProcessError) as exc:
            print(f"  {peer}: cannot build its venv ({exc}); skipped", flush=True)
    return found


def section_throughput(url: str, systems: dict[str, str], args: argparse.Namespace) -> None:
    for workers in (1, 2):
        print(
            f"\n## No-op throughput: {args.tasks} tasks, {workers} worker process(es); "
            f"tasks/s, median of {args.runs} (min-max)",
            flush=True,
        )
        rows = {}
        for system, python in systems.items():
            runs = [
                run_system(system, python, url, "throughput", args.tasks, workers)
                for _ in range(args.runs)
            ]
            rows[system] = runs
            err = next((r["error"] for r in runs if "error" in r), None)
            line = (
                f"  {system:<10} total {fmt(median_of(runs, 'throughput'))}   "
                f"submit {fmt(median_of(runs, 'submit_rate'))}"
            )
            print(line + (f"   ERROR {err}" if err else ""), flush=True)
        ratio_line(rows, "throughput", higher_is_better=True)
        settings_lines(rows)


def section_latency(url: str, systems: dict[str, str], args: argparse.Namespace) -> None:
    n = max(50, args.latency_tasks)
    print(
        f"\n## Idle latency: {n} tasks one at a time; ms, median of {args.runs} (min-max)",
        flush=True,
    )
    rows = {}
    for system, python in systems.items():
        runs = [run_system(system, python, url, "latency", n, 1) for _ in range(args.runs)]
        rows[system] = runs
        print(
            f"  {system:<10} start p50 {fmt(median_of(runs, 'start_p50_ms'), 2)}  "
            f"p99 {fmt(median_of(runs, 'start_p99_ms'), 2)}   result p50 "
            f"{fmt(median_of(runs, 'result_p50_ms'), 2)}  p99 "
            f"{fmt(median_of(runs, 'result_p99_ms'), 2)}",
            flush=True,
        )
    ratio_line(rows, "start_p50_ms", higher_is_better=False)
    settings_lines(rows)


def section_backlog(url: str, systems: dict[str, str], args: argparse.Namespace) -> None:
    """The pre-filled backlog: N no-op tasks enqueued one per request with no worker running,
    then K = 1 and 2 worker processes started; each system at its defaults (see
    BACKLOG_VARIANTS). Repeats go round the systems in turn, so drift hits all alike; each
    system's idle latency (the latency mode, --backlog-latency-tasks) completes the table."""
    n, lat_n = args.tasks, max(50, args.backlog_latency_tasks)
    names = [s for s in BACKLOG_VARIANTS if s.startswith("flowmesh")]
    names += [s for s in systems if s != "flowmesh"]
    print(
        f"\n## Pre-filled backlog: {n:,} no-op tasks enqueued one per request before any "
        f"worker starts, then 1 or 2 worker processes; median of {args.runs} [min-max]",
        flush=True,
    )
    runs: dict[int, dict[str, list[dict[str, Any]]]] = {1: {}, 2: {}}
    latency: dict[str, list[dict[str, Any]]] = {}
    for rep in range(args.runs):
        for name in names:
            runner, extra = BACKLOG_VARIANTS.get(name, (name, []))
            python = systems[runner]
            for k in (1, 2):
                res = run_system(name, python, url, "backlog", n, k, runner, extra)
                runs[k].setdefault(name, []).append(res)
                print(f"  run {rep + 1}: {name} {k} worker(s): {backlog_brief(res)}", flush=True)
            res = run_system(name, python, url, "latency", lat_n, 1, runner, extra)
            latency.setdefault(name, []).append(res)
            if "error" in res:
                print(f"  run {rep + 1}: {name} latency: ERROR {res['error']}", flush=True)
    both = {s: runs[1][s] + runs[2][s] for s in names}

    def cell(rows: list[dict[str, Any]], field: str, digits: int = 0) -> str:
        stat = median_of(rows, field)
        if stat is None:
            return "failed"
        med, lo, hi = stat
        return f"{med:,.{digits}f} [{lo:,.{digits}f}-{hi:,.{digits}f}]"

    def med(rows: list[dict[str, Any]], field: str, digits: int) -> str:
        stat = median_of(rows, field)
        return "failed" if stat is None else f"{stat[0]:,.{digits}f}"

    print(
        f"\n| system | 1 worker: steady tasks/s | 2 workers: steady tasks/s "
        f"| wall tasks/s, 1 / 2 workers | CPU ms per task (all its processes), 1 / 2 workers "
        f"| Redis B per pending task (MB after {n:,}) "
        f"| submit→start p50 / result p50 ms (idle, {lat_n} tasks) |\n" + "|---" * 7 + "|"
    )
    for s in names:
        print(
            f"| {s} | {cell(runs[1][s], 'steady')} | {cell(runs[2][s], 'steady')} "
            f"| {med(runs[1][s], 'wall', 0)} / {med(runs[2][s], 'wall', 0)} "
            f"| {med(runs[1][s], 'cpu_ms_per_task', 2)} / {med(runs[2][s], 'cpu_ms_per_task', 2)} "
            f"| {med(both[s], 'redis_bytes_per_task', 0)} ({med(both[s], 'redis_mb_added', 1)}) "
            f"| {med(latency[s], 'start_p50_ms', 2)} / {med(latency[s], 'result_p50_ms', 2)} |",
            flush=True,
        )
    print(
        "\n  CPU ms per task by process (median), 1 worker | 2 workers; 'drain': from the first "
        "completion seen to the last (no start-up); Redis server apart; first start: seconds "
        "from the workers' launch to the first task's start",
        flush=True,
    )
    for s in names:
        sides = []
        for k in (1, 2):
            split = ", ".join(f"{kind} {v:.2f}" for kind, v in median_by_kind(runs[k][s]).items())
            sides.append(
                f"{split or 'failed'}; drain {med(runs[k][s], 'drain_cpu_ms_per_task', 2)}; "
                f"Redis {med(runs[k][s], 'redis_cpu_ms_per_task', 2)}; "
                f"first start {med(runs[k][s], 'startup_sec', 1)} s"
            )
        print(
            f"  {s:<17} {' | '.join(sides)}; enqueue {med(both[s], 'enqueue_rate', 0)} tasks/s",
            flush=True,
        )
    for k in (1, 2):
        w = f"{k} worker{'s' if k > 1 else ''}"
        ratio_line(runs[k], "steady", True, f"steady, {w}")
        ratio_line(runs[k], "wall", True, f"wall, {w}")
        ratio_line(runs[k], "cpu_ms_per_task", False, f"CPU per task, {w}")
    ratio_line(both, "redis_bytes_per_task", False, "Redis per pending task")
    ratio_line(latency, "start_p50_ms", False, "submit→start p50")
    settings_lines(runs[1])
    for k in (1, 2):
        for s in names:
            for res in runs[k][s]:
                if "error" in res:
                    print(f"  ERROR {s} {k} worker(s): {res['error']}", flush=True)
                elif res["completed"] < res["tasks"]:
                    print(f"  INCOMPLETE {s} {k} worker(s): {res['completed']}/{res['tasks']}")


def backlog_brief(res: dict[str, Any]) -> str:
    if "error" in res:
        return f"ERROR {res['error']}"
    return (
        f"{res['completed']}/{res['tasks']} done; steady {res['steady']:,.0f}/s, wall "
        f"{res['wall']:,.0f}/s, CPU {res['cpu_ms_per_task']:.2f} ms/task, Redis "
        f"{res['redis_bytes_per_task']:,.0f} B/task, enqueue {res['enqueue_rate']:,.0f}/s"
    )


def median_by_kind(runs: list[dict[str, Any]]) -> dict[str, float]:
    """The median CPU ms per task of each process kind over the runs."""
    kinds: dict[str, list[float]] = {}
    for r in runs:
        for kind, v in r.get("cpu_ms_per_task_by_kind", {}).items():
            kinds.setdefault(kind, []).append(v)
    return {kind: statistics.median(v) for kind, v in kinds.items()}


def ratio_line(
    rows: dict[str, list[dict[str, Any]]],
    field: str,
    higher_is_better: bool,
    label: str = "",
) -> None:
    """FlowMesh's median against the best peer's, for each FlowMesh variant among the rows
    (the systems named flowmesh*); the ratio is > 1 when FlowMesh is better."""
    ours = {s: median_of(r, field) for s, r in rows.items() if s.startswith("flowmesh")}
    peers = {s: median_of(r, field) for s, r in rows.items() if not s.startswith("flowmesh")}
    found = {s: v for s, v in peers.items() if v is not None}
    if not found:
        return
    pick = max if higher_is_better else min
    best = pick(found, key=lambda s: found[s][0])
    value = found[best][0]
    named = bool(label) or len(ours) > 1
    parts = []
    for system, stat in ours.items():
        if stat is None or not stat[0] or not value:
            continue
        ratio = stat[0] / value if higher_is_better else value / stat[0]
        parts.append(f"{system} {ratio:.2f}x" if named else f"{ratio:.2f}x")
    if not parts:
        return
    head = f"{label}: " if label else ("" if named else "flowmesh ")
    print(
        f"  -> {head}vs best peer ({best}): {', '.join(parts)} "
        f"({'higher' if higher_is_better else 'lower'} is better)",
        flush=True,
    )


def settings_lines(rows: dict[str, list[dict[str, Any]]]) -> None:
    for system, runs in rows.items():
        s = next((r.get("settings") for r in runs if r.get("settings")), None)
        if s:
            print(f"     {system}: {s}")


def section_raw(url: str) -> None:
    print("\n## Redis itself", flush=True)
    rt = round_trip(url)
    pl = pipelined(url)
    print(
        f"  LPUSH+BRPOP one at a time: {rt['throughput']:,.0f} ops/s, "
        f"p50 {rt['p50_ms']:.3f} ms, p99 {rt['p99_ms']:.3f} ms"
    )
    print(f"  pipelined LPUSH + LPOP count: {pl['throughput']:,.0f} items/s", flush=True)


def section_scheduler() -> None:
    print("\n## Scheduler scale (in process, simulated fleet)", flush=True)
    subprocess.run([sys.executable, "-m", "bench.scheduler_scale"], cwd=ROOT, check=False)


def section_redis_memory(url: str) -> None:
    print("\n## Redis memory per pending task (100,000 echo tasks, no worker)", flush=True)
    out = subprocess.run(
        [sys.executable, "-m", "bench.redis_memory", "--redis-url", url, "--tasks", "100000"],
        cwd=ROOT,
        check=True,
        capture_output=True,
        text=True,
    )
    row = json.loads(out.stdout)
    print(
        f"  {row['bytes_per_task']:,.0f} B per pending echo task in Redis "
        f"(task hash of {row['hash_fields']} fields with a {row['spec_bytes']} B spec, "
        "plus its tasks:all, status and pending-queue entries)",
        flush=True,
    )


def section_idle(url: str, window: float) -> None:
    print(f"\n## Idle cost over {window:.0f}s", flush=True)
    for row in idle_cost(url, window=window):
        print(
            f"  {row['what']:<50} {row['cpu_sec_per_min']:.3f} CPU s/min "
            f"({row['core_percent']:.2f}% of one core)",
            flush=True,
        )


def section_presence(url: str) -> None:
    print("\n## Presence under load (bench/presence.py, defaults)", flush=True)
    print_presence(run_presence(url))


def section_inference() -> None:
    """bench/inference.py: with vLLM from the vLLM environment (.venv-vllm, made by .ci/run)
    when this one has none; else with the engine installed here."""
    vllm_python = ROOT / ".venv-vllm" / "bin" / "python"
    here = importlib.util.find_spec("vllm") is not None
    python = sys.executable if here or not vllm_python.exists() else str(vllm_python)
    subprocess.run([python, "-m", "bench.inference"], cwd=ROOT, check=False)


def section_artifacts(args: argparse.Namespace) -> None:
    """bench/artifacts.py (archive and extract: gzip, pigz, Python, zstd, tar) and
    bench/upload.py (HTTP upload to the orchestrator, unthrottled and throttled)."""
    from bench import artifacts, upload

    artifacts.main(["--size-mb", str(args.archive_mb)])
    upload.main([])


def section_training() -> None:
    """bench/training.py: a LoRA SFT through the fleet vs the same TRL script run directly."""
    subprocess.run([sys.executable, "-m", "bench.training"], cwd=ROOT, check=False)


def section_pipelines() -> None:
    """bench/pipelines.py: a 100-stage chain and a 1,000-wide fan-out with a join, as
    pipelines and as the client loops a user would write, on a fleet of its own."""
    subprocess.run([sys.executable, "-m", "bench.pipelines"], cwd=ROOT, check=False)


def section_scale() -> None:
    """bench/scale.py: 1,000 simulated workers and 100,000 tasks against a real orchestrator
    and a Redis of its own: orchestrator CPU, placement latency, Redis memory per worker and
    per task."""
    subprocess.run([sys.executable, "-m", "bench.scale"], cwd=ROOT, check=False)


def main() -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--tasks", type=int, default=10_000)
    p.add_argument("--latency-tasks", type=int, default=500)
    p.add_argument(
        "--backlog-latency-tasks", type=int, default=300, help="idle latency in the backlog table"
    )
    p.add_argument("--runs", type=int, default=3)
    p.add_argument(
        "--peers",
        help=f"default: {','.join(PEERS)}; for the backlog section {','.join(BACKLOG_PEERS)}",
    )
    p.add_argument("--only", default=",".join(SECTIONS), help=f"sections: {','.join(SECTIONS)}")
    p.add_argument("--idle-window", type=float, default=60.0)
    p.add_argument("--archive-mb", type=int, default=1024, help="weights archived (artifacts)")
    args = p.parse_args()
    only = {s.strip() for s in args.only.split(",") if s.strip()}
    chosen = [s.strip() for s in args.peers.split(",") if s.strip()] if args.peers else None
    peers = chosen or list(PEERS)
    backlog_peers = chosen or list(BACKLOG_PEERS)
    with EmbeddedRedis() as server:
        print(f"# FlowMesh benchmark: private Redis {server.url} ({server.binary})", flush=True)
        suite = only & {"throughput", "latency"}
        wanted = (peers if suite else []) + (backlog_peers if "backlog" in only else [])
        found = pythons(list(dict.fromkeys(wanted))) if suite or "backlog" in only else {}
        systems = {s: py for s, py in found.items() if s in ("flowmesh", *peers)}
        backlog_systems = {s: py for s, py in found.items() if s in ("flowmesh", *backlog_peers)}
        if "raw" in only:
            section_raw(server.url)
        if "throughput" in only:
            section_throughput(server.url, systems, args)
        if "latency" in only:
            section_latency(server.url, systems, args)
        if "backlog" in only:
            section_backlog(server.url, backlog_systems, args)
        if "scheduler" in only:
            section_scheduler()
        if "redis-memory" in only:
            section_redis_memory(server.url)
        if "idle" in only:
            section_idle(server.url, args.idle_window)
        if "presence" in only:
            section_presence(server.url)
        if "inference" in only:
            section_inference()
        if "artifacts" in only:
            section_artifacts(args)
        if "training" in only:
            section_training()
        if "pipelines" in only:
            section_pipelines()
        if "scale" in only:
            section_scale()
    return 0


if __name__ == "__main__":
    sys.exit(main())
