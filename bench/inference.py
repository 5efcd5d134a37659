"""Inference at fleet scale: FlowMesh in front of an engine, against the engine alone.

    uv run python -m bench --only inference          # the sections this environment runs
    python -m bench.inference --engine vllm          # in an environment with vLLM (.venv-vllm)
    python -m bench.inference --engine transformers --sections routing,merge

Sections, each in one run on this machine, same model and prompts:

- `throughput` (vLLM only): `--tasks` single-prompt tasks submitted at once through the API
  to one worker, against one `LLM.generate` call with the same prompts and against the same
  number of concurrent `AsyncLLM` requests, same engine settings. Output tokens/s, the
  fleet's ratio to the better raw figure, and the fleet's added latency per task (from
  submit to the result stored, minus the engine time the task reports).
- `merge`: the same number of tasks where every prompt appears 4 times (greedy decoding):
  executions performed (tasks that ran rather than received a twin's result) and output
  tokens/s per requested task.
- `routing`: 2 workers, 2 models, `--routing-tasks` tasks alternating between the models:
  model loads in the whole run (the (worker, model) pairs that ran tasks; with
  MAX_WARM_MODELS=2 nothing is evicted, so each is one load), with warm routing and with
  routing by load only (`SCHEDULER_WARM_ROUTING=false`).

The model is a random-weight Llama built here (`--hidden`, `--layers`; head size 64, which
vLLM's CPU kernels take), sized so raw vLLM needs several seconds for the work.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from bench.stats import percentile
from flowmesh.client import Client
from flowmesh.demo import stop_processes
from flowmesh.embedded import EmbeddedRedis, free_port

ROOT = Path(__file__).resolve().parent.parent
SECTIONS = ("throughput", "merge", "routing")
WORDS = [
    "the",
    "quick",
    "brown",
    "fox",
    "jumps",
    "over",
    "a",
    "lazy",
    "dog",
    "while",
    "river",
    "light",
    "falls",
    "on",
    "stone",
]


def build_model(path: Path, hidden: int, layers: int, seed: int = 0) -> Path:
    """A random-weight Llama (head size 64) with the tokenizer the tests train, saved."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from flowmesh.tiny_models import _save, _tokenizer

    tokenizer = _tokenizer(False)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=hidden // 64,
        num_key_value_heads=max(1, hidden // 128),
        max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    # EOS never wins: its logit is 0 while, of a thousand random others, some are always
    # above it; so every request generates its max_tokens, the same work everywhere.
    with torch.no_grad():
        model.lm_head.weight[tokenizer.eos_token_id].zero_()
    return _save(path, model, tokenizer)


def prompts(count: int, distinct: int | None = None) -> list[str]:
    distinct = distinct or count
    out = []
    for i in range(count):
        k = i % distinct
        out.append(" ".join(WORDS[(k + j) % len(WORDS)] for j in range(8)) + f" {k}")
    return out


def task(
    model: str, engine: str, prompt: str, max_tokens: int, merge: bool | None = None
) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "taskType": "inference",
        "model": {"source": {"identifier": model}, "engine": engine},
        "data": {"items": [prompt]},
        "inference": {"max_tokens": max_tokens, "temperature": 0},
    }
    if engine == "vllm":
        spec["model"]["vllm"] = VLLM_ENGINE
    if merge is not None:
        spec["merge"] = merge
    return {"apiVersion": "flowmesh/v1", "kind": "Task", "spec": spec}


# Engine settings for every vLLM engine here, the fleet's and the raw ones.
VLLM_ENGINE: dict[str, Any] = {"max_model_len": 512, "enforce_eager": True}


class Fleet:
    """A private Redis, an orchestrator and workers, stopped on exit."""

    def __init__(self, stack: ExitStack, scratch: Path, **orchestrator_env: str):
        self.redis = stack.enter_context(EmbeddedRedis())
        scratch.mkdir(parents=True, exist_ok=True)
        self.scratch = scratch
        self.procs: list[subprocess.Popen[bytes]] = []
        stack.callback(self.stop)
        port = free_port()
        self.env = {
            **os.environ,
            "REDIS_URL": self.redis.url,
            "PYTHONUNBUFFERED": "1",
            "HEARTBEAT_INTERVAL_SEC": "1",
            "RESULTS_DIR": str(scratch / "results"),
            "HF_HUB_OFFLINE": "1",
            "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "2"),
        }
        self._spawn(
            "orchestrator",
            ["-m", "orchestrator.main", "--port", str(port)],
            {"SCHEDULER_REFRESH_SEC": "0.2", **orchestrator_env},
        )
        self.client = Client(f"http://127.0.0.1:{port}")
        stack.callback(self.client.close)
        self._until(self.client.healthy, 60, "orchestrator")

    def _spawn(self, name: str, args: list[str], env: dict[str, str], nice: int = 0) -> None:
        prefix = ["nice", "-n", str(nice)] if nice else []
        with (self.scratch / f"{name}.log").open("ab") as log:  # the child keeps its own copy
            self.procs.append(
                subprocess.Popen(
                    [*prefix, sys.executable, *args],
                    env={**self.env, **env},
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    cwd=ROOT,
                    start_new_session=True,
                )
            )

    def worker(self, worker_id: str, executor: str, **env: str) -> None:
        # Niced, as the vLLM tests run it: a CPU engine keeps every core busy, and Redis and
        # the orchestrator must still answer (on a GPU machine the engine does not).
        self._spawn(
            worker_id,
            ["-m", "worker.main"],
            {"WORKER_ID": worker_id, "WORKER_EXECUTORS": executor, **env},
            nice=10,
        )

    def wait_ready(self, count: int, executor: str, timeout: float = 600) -> None:
        def ready() -> bool:
            states = [w["executor_states"].get(executor, {}) for w in self.client.workers()]
            return sum(s.get("state") == "ready" for s in states) >= count

        self._until(ready, timeout, f"{count} worker(s) with {executor} ready")

    def run(self, specs: list[dict[str, Any]], timeout: float = 1800) -> list[dict[str, Any]]:
        """Submit every spec in one request; wait for all; the tasks as the API shows them.
        Waits by long poll, one task at a time: polling lists would take CPU from the
        engine on a machine this small."""
        ids = [t["task_id"] for t in self.client.submit(specs)]
        deadline = time.monotonic() + timeout
        out = []
        for task_id in ids:
            while True:
                t = self.client.task(task_id, wait=30)
                if t["status"] in ("DONE", "FAILED", "CANCELLED"):
                    break
                if time.monotonic() > deadline:
                    raise TimeoutError(f"task {task_id} unfinished; see {self.scratch}")
            if t["status"] != "DONE":
                raise RuntimeError(
                    f"task {task_id} {t['status']}: {t['error']}; see {self.scratch}"
                )
            out.append(t)
        return out

    def _until(self, check: Any, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if any(p.poll() is not None for p in self.procs):
                raise RuntimeError(f"a fleet process exited waiting for {what}; see {self.scratch}")
            try:
                if check():
                    return
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"waiting for {what}; see {self.scratch}")
            time.sleep(0.5)

    def control_cpu(self) -> dict[str, float]:
        """CPU seconds used so far by the control plane: Redis, the orchestrator and each
        worker's own process (not its executor process, where the engine runs)."""
        import psutil

        pids = {"redis": self.redis.proc.pid if self.redis.proc else 0}
        pids |= {f"proc{i}": p.pid for i, p in enumerate(self.procs)}
        out: dict[str, float] = {}
        for name, pid in pids.items():
            try:
                t = psutil.Process(pid).cpu_times()
            except psutil.Error:
                continue
            out[name] = t.user + t.system
        return out

    def stop(self) -> None:
        stop_processes(self.procs, grace=30.0)


def output_tokens(tasks: list[dict[str, Any]]) -> int:
    return sum(int(t["result"]["usage"]["completion_tokens"]) for t in tasks)


def span(tasks: list[dict[str, Any]]) -> float:
    return max(t["finished_at"] for t in tasks) - min(t["created_at"] for t in tasks)


def added_latency_ms(tasks: list[dict[str, Any]]) -> tuple[float, float]:
    """Per task: submit to result stored, minus the time the executor reports for it."""
    extra = [
        1000 * (t["finished_at"] - t["created_at"] - t["result"]["timings"]["elapsed_sec"])
        for t in tasks
        if t["result"].get("timings")
    ]
    if not extra:
        raise RuntimeError(f"no task reported timings: {tasks[0]['result']}")
    return percentile(extra, 0.5), percentile(extra, 0.99)


# -- raw vLLM ------------------------------------------------------------------------------


def raw_generate(model: str, texts: list[str], max_tokens: int) -> tuple[float, int]:
    """One LLM.generate call with every prompt: (seconds, output tokens)."""
    from vllm import LLM, SamplingParams

    llm = LLM(model=model, **VLLM_ENGINE)
    params = SamplingParams(max_tokens=max_tokens, temperature=0)
    llm.generate(texts[:2], params)  # warm-up, as the fleet's engine is warm
    started = time.monotonic()
    outs = llm.generate(texts, params)
    elapsed = time.monotonic() - started
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    del llm
    return elapsed, tokens


def raw_async(model: str, texts: list[str], max_tokens: int) -> tuple[float, int]:
    """As many concurrent AsyncLLM requests: (seconds, output tokens)."""
    from vllm import SamplingParams
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.v1.engine.async_llm import AsyncLLM

    async def main() -> tuple[float, int]:
        engine = AsyncLLM.from_engine_args(AsyncEngineArgs(model=model, **VLLM_ENGINE))
        params = SamplingParams(max_tokens=max_tokens, temperature=0)

        async def one(text: str) -> int:
            last = None
            async for out in engine.generate(text, params, uuid.uuid4().hex):
                last = out
            return len(last.outputs[0].token_ids) if last else 0

        await one(texts[0])  # warm-up
        started = time.monotonic()
        counts = await asyncio.gather(*(one(t) for t in texts))
        elapsed = time.monotonic() - started
        engine.shutdown()
        return elapsed, sum(counts)

    return asyncio.run(main())


# -- sections ------------------------------------------------------------------------------


def section_throughput(args: argparse.Namespace, model: str, scratch: Path) -> None:
    texts = prompts(args.tasks)
    print(f"\n## Fleet vs raw vLLM ({args.tasks} prompts x {args.max_tokens} tokens)", flush=True)
    results: list[tuple[str, float, int]] = []
    # Each raw engine in a process of its own, so it is gone before the next starts.
    for name, fn in (("raw LLM.generate", "raw_generate"), ("raw AsyncLLM", "raw_async")):
        out = subprocess.run(
            [
                sys.executable,
                "-c",
                f"import json,sys; from bench.inference import {fn}; "
                f"print(json.dumps({fn}(sys.argv[1], json.loads(sys.argv[2]), {args.max_tokens})))",
                model,
                json.dumps(texts),
            ],
            cwd=ROOT,
            capture_output=True,
            text=True,
            env={**os.environ, "VLLM_CPU_KVCACHE_SPACE": "2"},
        )
        if out.returncode != 0:
            print(f"{name}: failed: {out.stderr.strip().splitlines()[-3:]}")
            continue
        seconds, tokens = json.loads(out.stdout.strip().splitlines()[-1])
        results.append((name, seconds, tokens))
    with ExitStack() as stack:
        fleet = Fleet(stack, scratch / "fleet-throughput")
        fleet.worker("w1", "vllm")
        fleet.wait_ready(1, "vllm")
        fleet.run([task(model, "vllm", texts[0], 4)])  # load the model: the raw runs warm up too
        before = fleet.control_cpu()
        tasks = fleet.run([task(model, "vllm", t, args.max_tokens) for t in texts])
        after = fleet.control_cpu()
        fleet_sec = span(tasks)
        control = sum(after[k] - before.get(k, 0.0) for k in after)
        p50, p99 = added_latency_ms(tasks)
        results.append(("FlowMesh (API, 1 worker)", fleet_sec, output_tokens(tasks)))
    best = max((tok / sec for name, sec, tok in results if name.startswith("raw")), default=0.0)
    print("| system | seconds | output tokens | tokens/s | vs best raw |")
    print("|---|---|---|---|---|")
    for name, sec, tok in results:
        ratio = f"{(tok / sec) / best:.2f}x" if best else "-"
        print(f"| {name} | {sec:.2f} | {tok:,} | {tok / sec:,.0f} | {ratio} |")
    print(
        f"FlowMesh added latency per task (submit to stored, minus engine time): p50 {p50:.0f} ms, "
        f"p99 {p99:.0f} ms"
    )
    cores = os.cpu_count() or 1
    print(
        f"CPU the control plane (Redis, orchestrator, worker process) took during the fleet run: "
        f"{control:.2f} s of {fleet_sec * cores:.1f} core-seconds ({cores} cores), time a CPU "
        "engine did not get; on a GPU the engine does not share the cores"
    )


def section_merge(args: argparse.Namespace, model: str, engine: str, scratch: Path) -> None:
    texts = prompts(args.tasks, distinct=args.tasks // 4)
    print(f"\n## Task merge: {args.tasks} tasks, each prompt 4 times ({engine})", flush=True)
    with ExitStack() as stack:
        fleet = Fleet(stack, scratch / "fleet-merge")
        fleet.worker("w1", EXECUTOR[engine])
        fleet.wait_ready(1, EXECUTOR[engine])
        fleet.run([task(model, engine, texts[0] + " warm", 4)])
        tasks = fleet.run([task(model, engine, t, args.max_tokens) for t in texts])
    executed = sum(1 for t in tasks if not t["result"].get("executed_by"))
    merged = sum(1 for t in tasks if (t.get("merge") or {}).get("merged"))
    seconds = span(tasks)
    print(
        "| tasks | executions performed (target) | tasks in merged deliveries | seconds "
        "| output tokens/s per requested task |"
    )
    print("|---|---|---|---|---|")
    print(
        f"| {len(tasks)} | {executed} ({args.tasks // 4}) | {merged} | {seconds:.2f} "
        f"| {output_tokens(tasks) / seconds:,.0f} |"
    )


def section_routing(args: argparse.Namespace, engine: str, scratch: Path) -> None:
    count = args.routing_tasks
    print(f"\n## Warm routing: 2 workers, 2 models, {count} tasks ({engine})", flush=True)
    models = [
        str(build_model(scratch / f"routing-{i}", 64 if engine != "vllm" else 128, 1, i))
        for i in range(2)
    ]
    # The order (alternating), and the same tasks shuffled: with strict alternation
    # and equal loads, ranking by load pairs each model with one worker by luck of the tie.
    alternating = [i % 2 for i in range(count)]
    shuffled = alternating[:]
    random.Random(1).shuffle(shuffled)
    print("| order | routing | model loads (target 2) | tasks per worker and model | seconds |")
    print("|---|---|---|---|---|")
    for order, which in (("alternating", alternating), ("shuffled", shuffled)):
        for label, warm in (("warm (default)", "true"), ("by load only", "false")):
            with ExitStack() as stack:
                fleet = Fleet(
                    stack, scratch / f"fleet-routing-{order}-{warm}", SCHEDULER_WARM_ROUTING=warm
                )
                for w in ("w1", "w2"):
                    fleet.worker(w, EXECUTOR[engine], MAX_WARM_MODELS="2")
                fleet.wait_ready(2, EXECUTOR[engine])
                # Merge off: routing alone decides where each task goes.
                texts = prompts(count)
                tasks = fleet.run(
                    [task(models[m], engine, texts[i], 4, merge=False) for i, m in enumerate(which)]
                )
            # With MAX_WARM_MODELS=2 nothing is evicted, so each (worker, model) pair that
            # ran a task is one load of that model on that worker.
            pairs: dict[tuple[str, int], int] = {}
            for t in tasks:
                pair = (t["worker_id"], models.index(t["result"]["model"]))
                pairs[pair] = pairs.get(pair, 0) + 1
            spread = ", ".join(f"{w} model {m}: {n}" for (w, m), n in sorted(pairs.items()))
            print(
                f"| {order} | {label} | {len(pairs)} | {spread} | {span(tasks):.1f} |", flush=True
            )


EXECUTOR = {"vllm": "vllm", "transformers": "inference"}


def main(argv: list[str] | None = None) -> int:
    has_vllm = importlib.util.find_spec("vllm") is not None
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument(
        "--engine", choices=("vllm", "transformers"), default="vllm" if has_vllm else "transformers"
    )
    p.add_argument("--sections", default=",".join(SECTIONS))
    p.add_argument("--tasks", type=int, default=256)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--routing-tasks", type=int, default=200)
    args = p.parse_args(argv)
    sections = {s.strip() for s in args.sections.split(",") if s.strip()}
    # Kept when a section fails: the fleet's logs are there.
    scratch = Path(tempfile.mkdtemp(prefix="flowmesh-bench-inference-"))
    if args.engine == "transformers" and "throughput" in sections:
        print(
            "\n## Fleet vs raw vLLM: skipped (vLLM is not installed in this environment; "
            "run it from .venv-vllm, see bench/README.md)"
        )
        sections.discard("throughput")
    model = str(build_model(scratch / "model", args.hidden, args.layers))
    if "throughput" in sections:
        section_throughput(args, model, scratch)
    if "merge" in sections:
        section_merge(args, model, args.engine, scratch)
    if "routing" in sections:
        section_routing(args, args.engine, scratch)
    shutil.rmtree(scratch, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
