"""`flowmesh`: submit tasks and watch them, inspect the fleet, or run the local demo."""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import sys
from pathlib import Path
from typing import Any, NoReturn

import yaml
from rich.console import Console
from rich.markup import escape

from flowmesh.client import ApiError, Client
from flowmesh.config import env_str, environ
from flowmesh.errors import ConfigError
from flowmesh.progress import watch, watch_pipeline
from flowmesh.status import TaskStatus

DEFAULT_URL = "http://127.0.0.1:8000"


class UsageError(Exception):
    """A command line that cannot work as given: one line on stderr, exit 2."""


class Failed(Exception):
    """A command that could not do its work, for a reason its message gives: exit 1."""


class Unreachable(Exception):
    """No answer from the orchestrator: refused, reset, timed out, or not HTTP (`cause`)."""

    def __init__(self, cause: Exception):
        super().__init__(str(cause))
        self.cause = cause


class _Client(Client):
    """The CLI's client: its failures to talk to the orchestrator are `Unreachable`, told
    apart from the CLI's own I/O errors (a file, a closed stdout)."""

    def _request(self, method: str, path: str, **kw: Any) -> tuple[int, Any]:
        try:
            return super()._request(method, path, **kw)
        except (OSError, http.client.HTTPException) as exc:
            raise Unreachable(exc) from exc


def _client(args: argparse.Namespace) -> Client:
    if args.token and any(ord(c) < 32 or ord(c) == 127 for c in args.token):
        # It could not be sent as a header; say so without repeating it.
        raise UsageError("the API token holds a control character (a newline?); check it")
    try:
        return _Client(args.url, args.token)
    except ValueError as exc:
        raise UsageError(f"{exc} (set FLOWMESH_URL or --url)") from None


def cmd_submit(args: argparse.Namespace, console: Console) -> int:
    path = Path(args.file)
    try:
        # `-`: the spec from standard input (a template filled in by sed, say).
        text = sys.stdin.read() if args.file == "-" else path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise UsageError(f"cannot read {path}: {reason}") from None
    content_type = "application/json" if path.suffix == ".json" else "application/yaml"
    if args.param:
        text, content_type = _with_params(text, args.param), "application/json"
    client = _client(args)
    try:
        reply = client.submit_document(text, content_type)
        if "pipeline_id" in reply:
            return _submitted_pipeline(client, reply, args, console)
        tasks = reply["tasks"]
        for t in tasks:
            console.print(f"submitted {t['task_id']} {escape(t.get('name') or '')} {t['status']}")
        if not args.wait:
            return 0
        final = watch(client, [t["task_id"] for t in tasks], console, timeout=args.timeout)
    finally:
        client.close()
    failed = [t for t in final if t["status"] != "DONE"]
    for t in final:
        if t["status"] == "DONE":
            console.print(
                f"[green]DONE[/] {t['task_id']} on {t['worker_id']}: "
                f"RESULTS_DIR/{t['task_id']}/responses.json"
            )
    return 1 if failed else 0


def _with_params(text: str, params: list[str]) -> str:
    """The pipeline document with `key=value` parameters set in `spec.params` (a value is
    read as YAML: `n=3` is a number, `prompts=[a, b]` a list), as JSON."""
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise UsageError(f"--param: cannot read the document: {exc}") from None
    spec = doc.get("spec") if isinstance(doc, dict) else None
    if not isinstance(spec, dict) or not ("stages" in spec or "graph" in spec):
        raise UsageError("--param sets a pipeline's parameters; this document is not a pipeline")
    values = spec.setdefault("params", {})
    if not isinstance(values, dict):
        raise UsageError("--param: the document's spec.params is not a mapping")
    for item in params:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise UsageError(f"--param {item!r}: expected key=value")
        try:
            values[key.strip()] = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as exc:
            raise UsageError(f"--param {key}: cannot read {raw!r}: {exc}") from None
    return json.dumps(doc, default=str)


def _submitted_pipeline(
    client: Client, view: dict[str, Any], args: argparse.Namespace, console: Console
) -> int:
    pipeline_id = view["pipeline_id"]
    replay = (
        " (already submitted with this Idempotency-Key)" if view.get("idempotent_replay") else ""
    )
    console.print(
        f"submitted pipeline {pipeline_id} {escape(view.get('name') or '')} "
        f"({len(view['stages'])} stage(s)){replay}"
    )
    if not args.wait:
        return 0
    view = watch_pipeline(client, pipeline_id, console, timeout=args.timeout)
    console.print(f"pipeline {pipeline_id}: {view['status']}")
    return 0 if view["status"] == "DONE" else 1


def cmd_pipeline(args: argparse.Namespace, console: Console) -> int:
    client = _client(args)
    try:
        if args.cancel:
            client.cancel_pipeline(args.pipeline_id)
            console.print(f"cancelled pipeline {args.pipeline_id}")
            return 0
        if args.wait:
            view = watch_pipeline(client, args.pipeline_id, console, timeout=args.timeout)
            return 0 if view["status"] == "DONE" else 1
        console.print_json(json.dumps(client.pipeline(args.pipeline_id)))
    finally:
        client.close()
    return 0


def cmd_pipelines(args: argparse.Namespace, console: Console) -> int:
    client = _client(args)
    try:
        page = client.pipelines(
            status=args.status, limit=args.limit, cursor=args.cursor, order=args.order
        )
    finally:
        client.close()
    for p in page["pipelines"]:
        stages = " ".join(f"{state}={n}" for state, n in sorted(p["stages"].items()))
        name = escape(p["name"] or "-")
        console.print(f"{p['pipeline_id']}  {p['status']:<9} {name:<20} {stages}")
    if page["next_cursor"]:
        again = " --order desc" if args.order == "desc" else ""
        console.print(f"(more: --cursor {page['next_cursor']}{again})")
    return 0


def cmd_worker(args: argparse.Namespace, console: Console) -> int:
    actions = [a for a in ("disable", "enable", "drain") if getattr(args, a)]
    if len(actions) != 1:
        raise UsageError("say what to do: exactly one of --disable, --enable, --drain")
    client = _client(args)
    try:
        client.worker_action(args.worker_id, actions[0])
    finally:
        client.close()
    done = {"disable": "disabled", "enable": "enabled", "drain": "asked to drain"}[actions[0]]
    console.print(f"worker {args.worker_id} {done}")
    return 0


def cmd_scale(args: argparse.Namespace, console: Console) -> int:
    from flowmesh.scale import LocalScaler, run

    if not environ().get("REDIS_URL"):
        raise UsageError(
            "flowmesh scale starts workers: set REDIS_URL for them (and the rest "
            "of the workers' settings) in its environment"
        )
    if not 0 <= args.min <= args.max or args.max < 1:
        raise UsageError(f"--min {args.min} --max {args.max}: need 0 <= min <= max, max >= 1")
    slots = args.slots or int(environ().get("WORKER_SLOTS") or 4)
    scaler = LocalScaler(
        client=_client(args),
        console=console,
        min_workers=args.min,
        max_workers=args.max,
        slots=max(slots, 1),
        idle_sec=args.idle_sec,
        log_dir=Path(args.log_dir),
    )
    try:
        return run(scaler, args.interval, args.stop_timeout)
    finally:
        scaler.client.close()


def cmd_status(args: argparse.Namespace, console: Console) -> int:
    client = _client(args)
    try:
        console.print_json(json.dumps(client.task(args.task_id)))
    finally:
        client.close()
    return 0


def cmd_tasks(args: argparse.Namespace, console: Console) -> int:
    client = _client(args)
    try:
        page = client.tasks(
            status=args.status,
            type=args.type,
            limit=args.limit,
            cursor=args.cursor,
            order=args.order,
        )
    finally:
        client.close()
    for t in page["tasks"]:
        console.print(
            f"{t['task_id']}  {t['status']:<10} {t['task_type']:<10} "
            f"attempts={t['attempts']} worker={t['worker_id'] or '-'}"
        )
    if page["next_cursor"]:
        again = " --order desc" if args.order == "desc" else ""
        console.print(f"(more: --cursor {page['next_cursor']}{again})")
    return 0


def cmd_workers(args: argparse.Namespace, console: Console) -> int:
    client = _client(args)
    try:
        workers = client.workers()
    finally:
        client.close()
    for w in workers:
        hw = w["hardware"]
        gpus = ", ".join(g["name"] for g in hw.get("gpus", [])) or "no GPU"
        states = w.get("executor_states", {})
        executors = ",".join(
            f"{name}({states[name]['state']})" if name in states else name
            for name in w["executors"]
        )
        console.print(
            f"{w['worker_id']}  {w['status']:<8} alive={w['alive']} "
            f"{hw.get('cpu_count')} CPU {hw.get('memory_total', 0) / 2**30:.1f} GiB {gpus}  "
            f"executors={executors} tags={','.join(w['tags']) or '-'} "
            f"running={w['running']}/{w['slots']}"
            + (f" DISABLED ({escape(w.get('disabled_reason') or '')})" if w.get("disabled") else "")
        )
        for name, state in states.items():
            if state.get("reason"):
                console.print(
                    f"  executor {name} {state['state']}: {state['reason']}", markup=False
                )
        loading = set(w.get("loading_models") or [])
        for model in [*w.get("loaded_models", []), *sorted(loading)]:
            console.print(
                f"  model {model} {'loading' if model in loading else 'loaded'}",
                markup=False,
                highlight=False,
            )
        for name, engines in (w.get("engines") or {}).items():
            for model, e in engines.items():
                console.print(
                    f"  engine {name} {model}: {e.get('state')}, "
                    f"{e.get('running', 0)}/{e.get('max_num_seqs', '?')} requests in the batch",
                    markup=False,
                    highlight=False,
                )
    return 0


def cmd_cancel(args: argparse.Namespace, console: Console) -> int:
    client = _client(args)
    try:
        reply = client.cancel(args.task_id)
    finally:
        client.close()
    console.print(f"{args.task_id} CANCELLED (was {reply['previous']})")
    return 0


def cmd_dead_letters(args: argparse.Namespace, console: Console) -> int:
    client = _client(args)
    try:
        if args.requeue:
            client.requeue(args.requeue)
            console.print(f"{args.requeue} requeued")
            return 0
        page = client.dead_letters_page(args.limit, args.cursor)
        for t in page["tasks"]:
            err = t.get("error") or {}
            console.print(
                f"{t['task_id']}  {t['task_type']:<10} attempts={t['attempts']} "
                f"{err.get('kind')}: {escape(str(err.get('message')))}"
            )
    finally:
        client.close()
    if page.get("next_cursor") is not None:
        console.print(f"(more: --cursor {page['next_cursor']})")
    return 0


def cmd_demo(args: argparse.Namespace, console: Console) -> int:
    from flowmesh.demo import DemoError, run_demo

    try:
        return run_demo(args, console)
    except DemoError as exc:
        raise Failed(str(exc)) from None


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line on stderr (exit 2), pointing at --help."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: {message} (see {self.prog} --help)\n")


def _status(value: str) -> str:
    try:
        return TaskStatus(value.upper()).value
    except ValueError:
        allowed = ", ".join(s.value for s in TaskStatus)
        raise argparse.ArgumentTypeError(
            f"unknown status {value!r}; allowed (any case): {allowed}"
        ) from None


def parser() -> argparse.ArgumentParser:
    env = environ()
    p = _Parser(prog="flowmesh", description=__doc__)
    p.add_argument(
        "--url",
        default=env_str(env, "FLOWMESH_URL", DEFAULT_URL),
        help="orchestrator URL (FLOWMESH_URL)",
    )
    p.add_argument(
        "--token",
        default=env_str(env, "FLOWMESH_API_TOKEN") or None,
        help="API token (FLOWMESH_API_TOKEN)",
    )
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("submit", help="submit a YAML/JSON task spec (or a batch)")
    s.add_argument("file", help="a .yaml or .json file, or - for standard input (YAML or JSON)")
    s.add_argument("--wait", action="store_true", help="show live progress until all finish")
    s.add_argument("--timeout", type=float, default=None, help="stop waiting after N seconds")
    s.add_argument(
        "--param",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a pipeline parameter (spec.params), the value read as YAML; repeatable",
    )
    s.set_defaults(func=cmd_submit)

    s = sub.add_parser("pipeline", help="show one pipeline, watch it, or cancel it")
    s.add_argument("pipeline_id")
    s.add_argument("--wait", action="store_true", help="show its stages live until it ends")
    s.add_argument("--timeout", type=float, default=None, help="stop waiting after N seconds")
    s.add_argument("--cancel", action="store_true", help="cancel it and every unfinished stage")
    s.set_defaults(func=cmd_pipeline)

    s = sub.add_parser("pipelines", help="list pipelines")
    s.add_argument(
        "--status",
        type=str.upper,
        choices=("RUNNING", "DONE", "FAILED", "CANCELLED"),
        help="only pipelines in this status",
    )
    s.add_argument("--limit", type=int, default=50)
    s.add_argument("--order", type=str.lower, choices=("asc", "desc"), default=None)
    s.add_argument("--cursor", help="the next page: the value printed after (more: --cursor …)")
    s.set_defaults(func=cmd_pipelines)

    s = sub.add_parser("status", help="show one task")
    s.add_argument("task_id")
    s.set_defaults(func=cmd_status)

    s = sub.add_parser("tasks", help="list tasks")
    statuses = ", ".join(status.value.lower() for status in TaskStatus)
    s.add_argument("--status", type=_status, help=f"only tasks in this status: {statuses}")
    s.add_argument("--type", help="only tasks of this taskType")
    s.add_argument("--limit", type=int, default=50, help="at most this many (1-1000, default 50)")
    s.add_argument(
        "--order",
        type=str.lower,
        choices=("asc", "desc"),
        default=None,
        help="asc: oldest first (the default), desc: newest first",
    )
    s.add_argument("--cursor", help="the next page: the value printed after (more: --cursor …)")
    s.set_defaults(func=cmd_tasks)

    s = sub.add_parser("cancel", help="cancel a pending or running task")
    s.add_argument("task_id")
    s.set_defaults(func=cmd_cancel)

    s = sub.add_parser("dead-letters", help="list tasks that failed for good, or requeue one")
    s.add_argument("--requeue", metavar="TASK_ID", help="put this task back in the queue")
    s.add_argument("--limit", type=int, default=100)
    s.add_argument("--cursor", help="the next page: the value printed after (more: --cursor …)")
    s.set_defaults(func=cmd_dead_letters)

    s = sub.add_parser("workers", help="list registered workers")
    s.set_defaults(func=cmd_workers)

    s = sub.add_parser(
        "scale",
        help="start and stop worker processes on this host from the orchestrator's backlog",
    )
    s.add_argument("--min", type=int, default=0, help="workers always running (default 0)")
    s.add_argument("--max", type=int, default=4, help="workers at most (default 4)")
    s.add_argument(
        "--slots", type=int, default=0, help="tasks per worker (default WORKER_SLOTS or 4)"
    )
    s.add_argument(
        "--idle-sec", type=float, default=60.0, help="idle this long, drain a worker (default 60)"
    )
    s.add_argument("--interval", type=float, default=1.0, help="seconds between looks (default 1)")
    s.add_argument("--log-dir", default="scale-logs", help="worker logs (default ./scale-logs)")
    s.add_argument(
        "--stop-timeout",
        type=float,
        default=120.0,
        help="on Ctrl-C, wait this long for the drained workers (default 120)",
    )
    s.set_defaults(func=cmd_scale)

    s = sub.add_parser("worker", help="disable, enable or drain a worker")
    s.add_argument("worker_id")
    s.add_argument(
        "--disable", action="store_true", help="take it out of placement (it stays registered)"
    )
    s.add_argument("--enable", action="store_true", help="put it back into placement")
    s.add_argument(
        "--drain",
        action="store_true",
        help="stop it as SIGTERM does: finish or hand back its tasks, deregister, exit",
    )
    s.set_defaults(func=cmd_worker)

    s = sub.add_parser("demo", help="start a local fleet (embedded Redis), run example tasks")
    s.add_argument("--workers", type=int, default=2, help="local worker processes (default 2)")
    s.add_argument("--tasks", type=int, default=8, help="echo tasks to run (default 8)")
    s.add_argument(
        "--model",
        default=None,
        help="hub id or local path for the inference example (default: a tiny "
        "random-weight model built on the spot, when the inference extra is "
        "installed)",
    )
    s.add_argument("--no-inference", action="store_true", help="skip the inference example")
    s.add_argument(
        "--keep",
        action="store_true",
        help="keep the fleet running after the examples, until Ctrl-C",
    )
    s.add_argument("--port", type=int, default=0, help="orchestrator port (default: a free one)")
    s.set_defaults(func=cmd_demo)
    return p


# The orchestrator's answers that mean "the request was wrong": a usage error, exit 2.
_BAD_REQUEST = frozenset({400, 413, 415, 422})


def _detail(body: Any) -> str:
    """The server's explanation: its `detail`, with FastAPI's validation lists as
    `field: message`."""
    detail = body.get("detail", body) if isinstance(body, dict) else body
    if isinstance(detail, list):
        parts = []
        for err in detail:
            if isinstance(err, dict) and "msg" in err:
                loc = [str(x) for x in err.get("loc", []) if x not in ("query", "body", "path")]
                parts.append(f"{'.'.join(loc)}: {err['msg']}" if loc else str(err["msg"]))
            else:
                parts.append(str(err))
        detail = "; ".join(parts)
    return " ".join(str(detail).split()) or "(no detail)"


def _api_error(exc: ApiError, args: argparse.Namespace) -> tuple[int, list[str]]:
    """Exit code and lines for an error answer: the first says what is wrong and what to do."""
    if exc.status == 401:
        if args.token:
            what = f"the orchestrator at {args.url} rejected the API token (HTTP 401)"
        else:
            what = f"the orchestrator at {args.url} requires an API token (HTTP 401)"
        return 1, [
            f"{what}; set FLOWMESH_API_TOKEN (or pass --token) to the token it was started with"
        ]
    code = 2 if exc.status in _BAD_REQUEST else 1
    errors = exc.body.get("errors") if isinstance(exc.body, dict) else None
    if isinstance(errors, list) and len(errors) > 1:  # a rejected spec: a line per problem
        lines = [f"HTTP {exc.status}: {len(errors)} problems:"]
        lines += [f"  {e.get('loc')}: {e.get('msg')}" for e in errors if isinstance(e, dict)]
        return code, lines
    return code, [f"HTTP {exc.status}: {_detail(exc.body)}"]


def _unreachable(exc: Exception, args: argparse.Namespace) -> str:
    if isinstance(exc, http.client.HTTPException) and not isinstance(exc, OSError):
        return (
            f"{args.url} did not answer as a FlowMesh orchestrator "
            f"({type(exc).__name__}); set FLOWMESH_URL (or --url) to the orchestrator's URL"
        )
    if isinstance(exc, ConnectionRefusedError):
        return (
            f"cannot connect to the orchestrator at {args.url}: connection refused; start one "
            "with `uv run orchestrator` (or `uv run flowmesh demo --keep`), or set FLOWMESH_URL "
            "(or --url) to a running one"
        )
    reason = (exc.strerror if isinstance(exc, OSError) else None) or str(exc)
    reason = reason or type(exc).__name__
    return (
        f"cannot reach the orchestrator at {args.url}: {reason}; check FLOWMESH_URL (or --url) "
        "and that the orchestrator is running (`uv run orchestrator`)"
    )


def run(args: argparse.Namespace, console: Console) -> int:
    """Run the chosen command; every command's errors end here as a few lines on stderr
    (exit 2 for a usage error, 1 otherwise), never a traceback."""
    prog = f"flowmesh {args.command}"
    try:
        code: int = args.func(args, console)
        return code
    except KeyboardInterrupt:
        return 130
    except (UsageError, ConfigError) as exc:
        code, lines = 2, [str(exc)]
    except Failed as exc:
        code, lines = 1, [str(exc)]
    except ApiError as exc:
        code, lines = _api_error(exc, args)
    except Unreachable as exc:
        code, lines = 1, [_unreachable(exc.cause, args)]
    except BrokenPipeError:  # stdout closed early (`flowmesh tasks | head`): nothing to say
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except (OSError, http.client.HTTPException) as exc:  # the demo's own fleet, a file
        code, lines = 1, [f"{type(exc).__name__}: {exc}"]
    lines[0] = f"{prog}: {lines[0]}"
    print("\n".join(lines), file=sys.stderr)
    return code


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    # soft_wrap: a line stays one line when piped (`flowmesh tasks | grep …`), not cut at 80.
    return run(args, Console(soft_wrap=True))


if __name__ == "__main__":
    sys.exit(main())
