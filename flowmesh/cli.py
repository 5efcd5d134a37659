"""`flowmesh`: submit tasks and watch them, inspect the fleet, or run the local demo."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from rich.console import Console

from flowmesh.client import ApiError, Client
from flowmesh.config import env_str, environ
from flowmesh.progress import watch

DEFAULT_URL = "http://127.0.0.1:8000"


def _client(args: argparse.Namespace) -> Client:
    return Client(args.url, args.token)


def cmd_submit(args: argparse.Namespace, console: Console) -> int:
    path = Path(args.file)
    if not path.is_file():
        console.print(f"[red]no such file: {path}[/]")
        return 2
    text = path.read_text()
    content_type = "application/json" if path.suffix == ".json" else "application/yaml"
    client = _client(args)
    try:
        tasks = client.submit_text(text, content_type)
        for t in tasks:
            console.print(f"submitted {t['task_id']} {t.get('name') or ''} {t['status']}")
        if not args.wait:
            return 0
        final = watch(client, [t["task_id"] for t in tasks], console, timeout=args.timeout)
    except ApiError as exc:
        console.print(f"[red]{exc}[/]")
        for err in exc.body.get("errors", []) if isinstance(exc.body, dict) else []:
            console.print(f"  [red]{err['loc']}[/]: {err['msg']}")
        return 2
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


def cmd_status(args: argparse.Namespace, console: Console) -> int:
    client = _client(args)
    try:
        console.print_json(json.dumps(client.task(args.task_id)))
    except ApiError as exc:
        console.print(f"[red]{exc}[/]")
        return 1
    finally:
        client.close()
    return 0


def cmd_tasks(args: argparse.Namespace, console: Console) -> int:
    client = _client(args)
    try:
        page = client.tasks(status=args.status, type=args.type, limit=args.limit)
    finally:
        client.close()
    for t in page["tasks"]:
        console.print(
            f"{t['task_id']}  {t['status']:<10} {t['task_type']:<10} "
            f"attempts={t['attempts']} worker={t['worker_id'] or '-'}"
        )
    if page["next_cursor"]:
        console.print(f"(more: --cursor {page['next_cursor']})")
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
        )
        for name, state in states.items():
            if state.get("reason"):
                console.print(
                    f"  executor {name} {state['state']}: {state['reason']}", markup=False
                )
    return 0


def cmd_cancel(args: argparse.Namespace, console: Console) -> int:
    client = _client(args)
    try:
        reply = client.cancel(args.task_id)
    except ApiError as exc:
        console.print(f"[red]{exc}[/]")
        return 1
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
        for t in client.dead_letters(args.limit):
            err = t.get("error") or {}
            console.print(
                f"{t['task_id']}  {t['task_type']:<10} attempts={t['attempts']} "
                f"{err.get('kind')}: {err.get('message')}"
            )
    except ApiError as exc:
        console.print(f"[red]{exc}[/]")
        return 1
    finally:
        client.close()
    return 0


def cmd_demo(args: argparse.Namespace, console: Console) -> int:
    from flowmesh.demo import run_demo

    return run_demo(args, console)


def parser() -> argparse.ArgumentParser:
    env = environ()
    p = argparse.ArgumentParser(prog="flowmesh", description=__doc__)
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
    s.add_argument("file")
    s.add_argument("--wait", action="store_true", help="show live progress until all finish")
    s.add_argument("--timeout", type=float, default=None, help="stop waiting after N seconds")
    s.set_defaults(func=cmd_submit)

    s = sub.add_parser("status", help="show one task")
    s.add_argument("task_id")
    s.set_defaults(func=cmd_status)

    s = sub.add_parser("tasks", help="list tasks")
    s.add_argument("--status")
    s.add_argument("--type")
    s.add_argument("--limit", type=int, default=50)
    s.set_defaults(func=cmd_tasks)

    s = sub.add_parser("cancel", help="cancel a pending or running task")
    s.add_argument("task_id")
    s.set_defaults(func=cmd_cancel)

    s = sub.add_parser("dead-letters", help="list tasks that failed for good, or requeue one")
    s.add_argument("--requeue", metavar="TASK_ID", help="put this task back in the queue")
    s.add_argument("--limit", type=int, default=100)
    s.set_defaults(func=cmd_dead_letters)

    s = sub.add_parser("workers", help="list registered workers")
    s.set_defaults(func=cmd_workers)

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


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    console = Console()
    try:
        code: int = args.func(args, console)
    except KeyboardInterrupt:
        return 130
    return code


if __name__ == "__main__":
    sys.exit(main())
