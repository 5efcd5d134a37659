"""Redis as operators run it: TLS with a private CA (and client certificates), an ACL user,
and Sentinel failing the primary over in the middle of a run.

Real servers: the redis-server binary the suite uses (built with TLS on Debian/Ubuntu; the
TLS test skips, saying so, on a build without it), started here with certificates made by
`openssl`, and the same binary in Sentinel mode.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import redis

from flowmesh.embedded import EmbeddedRedis, find_redis_server, free_port
from flowmesh.errors import ConfigError
from tests.conftest import ROOT, _env, wait_until


def echo(message: object, delay: float = 0.0) -> dict:
    return {"spec": {"taskType": "echo", "echo": {"message": message, "delaySec": delay}}}


def make_certificates(folder: Path) -> dict[str, Path]:
    """A private CA, a server certificate for 127.0.0.1/localhost and a client certificate."""
    folder.mkdir()

    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=folder, check=True, capture_output=True)

    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=test CA",
        "-keyout", "ca.key", "-out", "ca.crt")  # fmt: skip
    (folder / "san.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    for name in ("server", "client"):
        run("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={name}",
            "-keyout", f"{name}.key", "-out", f"{name}.csr")  # fmt: skip
        run("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
            "-CAcreateserial", "-days", "2", "-extfile", "san.ext",
            "-out", f"{name}.crt")  # fmt: skip
    return {p.stem + p.suffix.replace(".", "_"): p for p in folder.iterdir()}


def tls_server(certs: dict[str, Path], *, verify_clients: bool) -> tuple[EmbeddedRedis, int]:
    """A started Redis serving TLS on a port of its own (its plain port stays on for the
    test's own checks); skips, saying why, where redis-server was built without TLS."""
    tls_port = free_port()
    server = EmbeddedRedis(
        args=[
            *("--tls-port", str(tls_port)),
            *("--tls-cert-file", str(certs["server_crt"])),
            *("--tls-key-file", str(certs["server_key"])),
            *("--tls-ca-cert-file", str(certs["ca_crt"])),
            *("--tls-auth-clients", "yes" if verify_clients else "no"),
        ]
    )
    try:
        server.start()
    except ConfigError as exc:
        pytest.skip(f"{server.binary} cannot serve TLS: {exc}")
    return server, tls_port


needs_tls = pytest.mark.skipif(
    shutil.which("openssl") is None, reason="openssl is needed to make test certificates"
)


def refused_at_start(args: list[str], **env: str) -> subprocess.CompletedProcess[str]:
    """Run an orchestrator or worker that must stop at start with a configuration error."""
    out = subprocess.run(
        [sys.executable, *args],
        env=_env(env),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 2, out
    return out


def wait_ready(client: redis.Redis, worker_id: str) -> None:
    def ready() -> bool:
        if not client.sismember("workers:ids", worker_id):
            return False
        states = json.loads(client.hget(f"worker:{worker_id}", "executor_states") or "{}")
        return bool(states) and all(s["state"] != "starting" for s in states.values())

    wait_until(ready, timeout=30, what=f"worker {worker_id} ready")


def assert_each_done_once(client: redis.Redis, ids: list[str]) -> None:
    for task_id in ids:
        task = client.hgetall(f"task:{task_id}")
        assert task["status"] == "DONE", (task_id, task.get("status"))
        outcomes = [h["outcome"] for h in json.loads(task["history"])]
        assert outcomes.count("done") == 1, (task_id, outcomes)
    finished = Counter(
        f["task_id"] for _, f in client.xrange("events") if f.get("type") == "task.finished"
    )
    assert all(finished[t] == 1 for t in ids), finished


# -- TLS ----------------------------------------------------------------------------------


@needs_tls
def test_tls_with_a_private_ca_and_client_certificates(start_orchestrator, start_worker, tmp_path):
    certs = make_certificates(tmp_path / "certs")
    server, tls_port = tls_server(certs, verify_clients=True)
    try:
        url = f"rediss://127.0.0.1:{tls_port}/0"
        tls = {
            "REDIS_URL": url,
            "REDIS_TLS_CA_FILE": str(certs["ca_crt"]),
            "REDIS_TLS_CERT_FILE": str(certs["client_crt"]),
            "REDIS_TLS_KEY_FILE": str(certs["client_key"]),
        }
        orch = start_orchestrator(**tls)
        start_worker("w1", wait=False, **tls)
        plain = redis.Redis(port=server.port, decode_responses=True)  # the test's own view
        wait_ready(plain, "w1")
        ids = orch.submit(*[echo(i) for i in range(10)])
        for task_id in ids:
            assert orch.wait(task_id)["status"] == "DONE"
        # Every connection of the fleet came in on the TLS port; the plain port has only the
        # test's own.
        clients = plain.client_list()
        on_tls = [c for c in clients if c["laddr"].endswith(f":{tls_port}")]
        assert len(on_tls) >= 3, clients  # orchestrator, worker, its heartbeat
        assert [c["id"] for c in clients if c not in on_tls] == [str(plain.client_id())]
        plain.close()
    finally:
        server.stop()


@needs_tls
def test_tls_without_the_ca_fails_at_start_naming_the_setting(tmp_path):
    certs = make_certificates(tmp_path / "certs")
    server, tls_port = tls_server(certs, verify_clients=False)
    try:
        out = refused_at_start(
            ["-m", "orchestrator.main", "--port", str(free_port())],
            REDIS_URL=f"rediss://127.0.0.1:{tls_port}/0",
        )
        assert "REDIS_TLS_CA_FILE" in out.stderr, out.stderr
        assert "certificate" in out.stderr
    finally:
        server.stop()


# -- ACL ----------------------------------------------------------------------------------

FLOWMESH_ACL = "on >s3cret-fleet-pass ~* &* +@all -@dangerous"


def test_an_acl_user_without_dangerous_commands_runs_the_fleet(start_orchestrator, start_worker):
    server = EmbeddedRedis().start()
    try:
        admin = redis.Redis(port=server.port, decode_responses=True)
        admin.execute_command("ACL", "SETUSER", "admin", "on", ">admin-pass", "~*", "&*", "+@all")
        admin.execute_command("ACL", "SETUSER", "flowmesh", *FLOWMESH_ACL.split())
        admin.execute_command("ACL", "SETUSER", "default", "off")
        admin.close()
        admin = redis.Redis(
            port=server.port, username="admin", password="admin-pass", decode_responses=True
        )
        with pytest.raises(redis.AuthenticationError):  # no anonymous access is left
            redis.Redis(port=server.port).ping()
        base = f"redis://127.0.0.1:{server.port}/0"
        # The orchestrator has the user in its URL; the worker gets it as a Kubernetes Secret
        # would hand it over, apart from the URL.
        orch = start_orchestrator(
            REDIS_URL=f"redis://flowmesh:s3cret-fleet-pass@127.0.0.1:{server.port}/0"
        )
        start_worker(
            "w1",
            wait=False,
            REDIS_URL=base,
            REDIS_USERNAME="flowmesh",
            REDIS_PASSWORD="s3cret-fleet-pass",
        )
        wait_ready(admin, "w1")
        ids = orch.submit(*[echo(i) for i in range(10)])
        for task_id in ids:
            assert orch.wait(task_id)["status"] == "DONE"
        (cancelled,) = orch.submit(echo("slow", delay=30))
        orch.wait(cancelled, ("RUNNING",))
        assert orch.http.post(f"/api/v1/tasks/{cancelled}/cancel").status_code == 200
        assert orch.wait(cancelled)["status"] == "CANCELLED"
        users = {c["user"] for c in admin.client_list() if c["id"] != str(admin.client_id())}
        assert users == {"flowmesh"}
        admin.close()
    finally:
        server.stop()


def test_a_wrong_password_is_refused_at_start_and_never_echoed():
    server = EmbeddedRedis().start()
    try:
        admin = redis.Redis(port=server.port)
        admin.execute_command("ACL", "SETUSER", "flowmesh", *FLOWMESH_ACL.split())
        admin.close()
        out = refused_at_start(
            ["-m", "worker.main"],
            REDIS_URL=f"redis://flowmesh:not-the-password@127.0.0.1:{server.port}/0",
            WORKER_EXECUTORS="echo",
        )
        assert "REDIS_URL=redis://flowmesh:***@127.0.0.1" in out.stderr, out.stderr
        assert "password" in out.stderr
        assert "not-the-password" not in out.stdout + out.stderr
    finally:
        server.stop()


# -- Sentinel -----------------------------------------------------------------------------


class Sentinel:
    """`redis-server --sentinel` watching one primary, quick to call it down."""

    def __init__(self, folder: Path, primary_port: int):
        folder.mkdir()
        self.port = free_port()
        conf = folder / "sentinel.conf"
        conf.write_text(
            f"port {self.port}\nbind 127.0.0.1\ndir {folder}\n"
            f"sentinel monitor fm 127.0.0.1 {primary_port} 1\n"
            "sentinel down-after-milliseconds fm 1000\n"
            "sentinel failover-timeout fm 10000\n"
        )
        self.log = folder / "sentinel.log"
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen(
                [find_redis_server(), str(conf), "--sentinel"], stdout=log, stderr=subprocess.STDOUT
            )
        self.client = redis.Redis(port=self.port, decode_responses=True)
        wait_until(self._answers, what="sentinel to answer")

    def _answers(self) -> bool:
        try:
            return bool(self.client.ping())
        except redis.ConnectionError:
            return False

    def primary_port(self) -> int:
        return int(self.client.execute_command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", "fm")[1])

    def replicas(self) -> list[dict]:
        rows = self.client.execute_command("SENTINEL", "REPLICAS", "fm")
        return [dict(zip(r[::2], r[1::2], strict=True)) if isinstance(r, list) else r for r in rows]

    def stop(self) -> None:
        self.client.close()
        self.proc.terminate()
        self.proc.wait(timeout=10)


def test_sentinel_fails_the_primary_over_mid_run_and_no_task_is_lost(
    start_orchestrator, start_worker, tmp_path
):
    fleet_processes = []
    primary = EmbeddedRedis().start()
    replica = EmbeddedRedis(args=["--replicaof", "127.0.0.1", str(primary.port)]).start()
    sentinel = Sentinel(tmp_path / "sentinel", primary.port)
    try:
        on_replica = redis.Redis(port=replica.port, decode_responses=True)
        wait_until(
            lambda: on_replica.info("replication")["master_link_status"] == "up",
            what="the replica in sync",
        )
        wait_until(
            lambda: any(r.get("flags") == "slave" for r in sentinel.replicas()),
            timeout=30,
            what="the sentinel to know the replica",
        )
        fleet = {
            "REDIS_URL": f"redis+sentinel://127.0.0.1:{sentinel.port}/fm/0",
            # Give up on a silent primary after 2 s (the default is 10); beats every 3 s, so
            # that a failover of a few seconds does not also expire the workers' leases.
            "REDIS_SOCKET_TIMEOUT_SEC": "2",
        }
        orch = start_orchestrator(**fleet)
        fleet_processes = [
            orch,
            *(
                start_worker(w, wait=False, HEARTBEAT_INTERVAL_SEC="3", **fleet)
                for w in ("w1", "w2")
            ),
        ]
        on_primary = redis.Redis(port=primary.port, decode_responses=True)
        for worker_id in ("w1", "w2"):
            wait_ready(on_primary, worker_id)
        ids = orch.submit(*[echo(i, delay=0.25) for i in range(80)])
        wait_until(lambda: on_primary.zcard("tasks:status:DONE") >= 10, what="some tasks done")
        # The primary's host freezes: it answers nothing and closes nothing, so every
        # connection to it must notice by itself. Its replica has every write it acknowledged
        # (they left on the same event-loop turn). It stays frozen to the end.
        primary.proc.send_signal(signal.SIGSTOP)  # type: ignore[union-attr]
        frozen_at = time.monotonic()
        wait_until(
            lambda: sentinel.primary_port() == replica.port,
            timeout=30,
            what="the sentinel to promote the replica",
        )
        promoted_in = time.monotonic() - frozen_at
        on_primary.close()
        wait_until(
            lambda: on_replica.zcard("tasks:status:DONE") == 80,
            timeout=90,
            what="all 80 tasks done on the new primary",
        )
        assert_each_done_once(on_replica, ids)
        # The fleet works on the new primary, the old one still frozen: new work is placed and
        # done, and a cancel reaches the worker (its control channel moved too).
        (after,) = orch.submit(echo("after the failover"))
        assert orch.wait(after)["status"] == "DONE"
        (slow,) = orch.submit(echo("to cancel", delay=60))
        orch.wait(slow, ("RUNNING",))
        assert orch.http.post(f"/api/v1/tasks/{slow}/cancel").status_code == 200
        assert orch.wait(slow)["status"] == "CANCELLED"
        wait_until(
            lambda: any(
                f"task {slow} attempt 1: stopping (cancelled)" in w.log()
                for w in fleet_processes[1:]
            ),
            timeout=30,
            what="the worker running it to stop it",
        )
        assert on_replica.info("replication")["role"] == "master"
        attempts = Counter(on_replica.hget(f"task:{t}", "attempts") for t in ids)
        print(f"replica promoted {promoted_in:.1f} s after the primary froze; attempts {attempts}")
        on_replica.close()
    finally:
        for proc in fleet_processes:  # while their Redis is still there to say goodbye to
            proc.stop()
        sentinel.stop()
        replica.stop()
        primary.stop()
