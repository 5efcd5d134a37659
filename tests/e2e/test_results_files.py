"""Artifact uploads to the orchestrator and downloads with Range, over real HTTP, against a
real orchestrator, Redis and worker; and the worker's upload client (`upload_file`)."""

from __future__ import annotations

import contextlib
import hashlib
import os
import signal
import socket
import struct
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from flowmesh.embedded import free_port
from flowmesh.errors import ConfigError
from orchestrator.settings import OrchestratorSettings
from tests.conftest import Orchestrator, Proc, wait_until
from worker.artifacts.upload import (
    UploadFailed,
    UploadRefused,
    UploadSettings,
    upload_file,
)

API_TOKEN = "users-api-token-0123456789"
WORKER_TOKEN = "workers-own-token-0123456789"


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def echo(delay: float) -> dict:
    return {"spec": {"taskType": "echo", "echo": {"delaySec": delay}}}


def post(
    orch: Orchestrator,
    task_id: str,
    data: bytes,
    *,
    name: str = "model.tar.gz",
    attempt: int = 1,
    digest: str | None = None,
    token: str | None = WORKER_TOKEN,
    **kwargs: object,
) -> httpx.Response:
    headers = {"X-FlowMesh-Sha256": digest or sha(data)}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    return httpx.post(
        f"{orch.url}/api/v1/results/{task_id}/files",
        params={"name": name, "attempt": attempt},
        content=data,
        headers=headers,
        timeout=30,
        **kwargs,  # type: ignore[arg-type]
    )


def files_under(root: Path) -> set[Path]:
    return {p for p in root.rglob("*") if p.is_file()} if root.exists() else set()


@pytest.fixture
def orch_results(tmp_path: Path) -> Path:
    return tmp_path / "orchestrator-results"


@pytest.fixture
def start(
    start_orchestrator: Callable[..., Orchestrator], orch_results: Path
) -> Callable[..., Orchestrator]:
    def start(**env: str) -> Orchestrator:
        return start_orchestrator(
            token=API_TOKEN,
            FLOWMESH_WORKER_TOKEN=WORKER_TOKEN,
            FLOWMESH_RESULTS_DIR=str(orch_results),
            **env,
        )

    return start


@pytest.fixture
def orch(start: Callable[..., Orchestrator]) -> Orchestrator:
    return start()


@pytest.fixture
def running(
    start_worker: Callable[..., Proc],
) -> Iterator[Callable[[Orchestrator], str]]:
    """Submit a long echo task and wait until a worker runs it; cancelled at the end, so
    the worker stops at once."""
    made: list[tuple[Orchestrator, str]] = []
    worker: list[Proc] = []

    def run(orch: Orchestrator) -> str:
        if not worker:
            worker.append(start_worker("w1"))
        (task_id,) = orch.submit(echo(60))
        orch.wait(task_id, ("RUNNING",))
        made.append((orch, task_id))
        return task_id

    yield run
    for orch, task_id in made:
        if orch.alive():
            orch.http.post(f"/api/v1/tasks/{task_id}/cancel")


def test_upload_then_list_download_range_and_head(orch, running, orch_results):
    task_id = running(orch)
    data = os.urandom(300_000)
    r = post(orch, task_id, data)
    assert r.status_code == 201, r.text
    url = f"{orch.url}/api/v1/results/{task_id}/files/model.tar.gz"
    assert r.json() == {
        "name": "model.tar.gz",
        "size": len(data),
        "sha256": sha(data),
        "attempt": 1,
        "uploaded_at": r.json()["uploaded_at"],
        "url": url,
    }
    assert (orch_results / task_id / "model.tar.gz").read_bytes() == data

    listing = orch.http.get(f"/api/v1/results/{task_id}/files")
    assert listing.status_code == 200
    assert listing.json()["task_id"] == task_id
    assert [(f["name"], f["size"], f["sha256"], f["url"]) for f in listing.json()["files"]] == [
        ("model.tar.gz", len(data), sha(data), url)
    ]

    whole = orch.http.get(url)
    assert whole.status_code == 200
    assert whole.content == data
    assert whole.headers["x-flowmesh-sha256"] == sha(data)
    assert whole.headers["etag"] == f'"{sha(data)}"'
    assert whole.headers["accept-ranges"] == "bytes"

    for spec, start, end in (
        ("bytes=100-199", 100, 200),
        ("bytes=299000-", 299_000, 300_000),
        ("bytes=-10", 299_990, 300_000),
    ):
        part = orch.http.get(url, headers={"Range": spec})
        assert part.status_code == 206, spec
        assert part.content == data[start:end]
        assert part.headers["content-range"] == f"bytes {start}-{end - 1}/{len(data)}"
        assert part.headers["content-length"] == str(end - start)
    beyond = orch.http.get(url, headers={"Range": "bytes=300000-"})
    assert beyond.status_code == 416
    assert beyond.headers["content-range"] == f"bytes */{len(data)}"

    head = orch.http.head(url)
    assert head.status_code == 200
    assert head.content == b""
    assert head.headers["content-length"] == str(len(data))
    assert head.headers["x-flowmesh-sha256"] == sha(data)

    # The worker's own token reads too (a later stage's worker downloads the archive).
    by_worker = httpx.get(url, headers={"Authorization": f"Bearer {WORKER_TOKEN}"})
    assert by_worker.status_code == 200 and by_worker.content == data

    missing = orch.http.get(f"/api/v1/results/{task_id}/files/other.bin")
    assert missing.status_code == 404
    assert "other.bin" in missing.json()["detail"]
    assert orch.http.get("/api/v1/results/0123456789abcdef/files").status_code == 404


def test_a_restarted_upload_replaces_the_file(orch, running):
    task_id = running(orch)
    assert post(orch, task_id, b"first version").status_code == 201
    again = post(orch, task_id, b"second, longer version")
    assert again.status_code == 201
    got = orch.http.get(f"/api/v1/results/{task_id}/files/model.tar.gz")
    assert got.content == b"second, longer version"
    assert len(orch.http.get(f"/api/v1/results/{task_id}/files").json()["files"]) == 1


def test_a_sha256_mismatch_stores_nothing_and_keeps_the_earlier_file(orch, running, orch_results):
    task_id = running(orch)
    good = os.urandom(10_000)
    assert post(orch, task_id, good).status_code == 201
    bad = os.urandom(20_000)
    claimed = sha(b"something else")
    r = post(orch, task_id, bad, digest=claimed)
    assert r.status_code == 422
    assert claimed in r.json()["detail"] and sha(bad) in r.json()["detail"]
    assert orch.http.get(f"/api/v1/results/{task_id}/files/model.tar.gz").content == good
    assert {p.name for p in files_under(orch_results / task_id)} == {
        "model.tar.gz",
        "model.tar.gz.json",
    }

    no_header = httpx.post(
        f"{orch.url}/api/v1/results/{task_id}/files",
        params={"name": "x.bin", "attempt": 1},
        content=b"abc",
        headers={"Authorization": f"Bearer {WORKER_TOKEN}"},
    )
    assert no_header.status_code == 422
    assert "X-FlowMesh-Sha256" in no_header.json()["detail"]


def test_uploads_take_the_worker_credential_only(orch, running, orch_results):
    task_id = running(orch)
    anonymous = post(orch, task_id, b"data", token=None)
    assert anonymous.status_code == 401
    assert "FLOWMESH_WORKER_TOKEN" in anonymous.json()["detail"]
    # Refused before its body is read: the connection closes rather than take the rest.
    assert anonymous.headers["connection"] == "close"
    wrong = post(orch, task_id, b"data", token="not-the-token-at-all-xx")
    assert wrong.status_code == 401
    by_user = post(orch, task_id, b"data", token=API_TOKEN)
    assert by_user.status_code == 403
    assert "FLOWMESH_WORKER_TOKEN" in by_user.json()["detail"]
    assert API_TOKEN not in by_user.text and WORKER_TOKEN not in by_user.text
    assert not files_under(orch_results)

    # The worker token opens the results routes and nothing else.
    as_worker = httpx.Client(
        base_url=orch.url, headers={"Authorization": f"Bearer {WORKER_TOKEN}"}, timeout=30
    )
    with as_worker:
        assert as_worker.get(f"/api/v1/results/{task_id}/files").status_code == 200
        for method, path in (
            ("GET", f"/api/v1/tasks/{task_id}"),
            ("POST", f"/api/v1/tasks/{task_id}/cancel"),
            ("GET", "/api/v1/workers"),
            ("GET", "/docs"),
        ):
            r = as_worker.request(method, path)
            assert r.status_code == 403, path
            assert "/api/v1/results/" in r.json()["detail"]
    assert orch.task(task_id)["status"] == "RUNNING"
    assert "upload with the API token" in orch.log()
    assert API_TOKEN not in orch.log() and WORKER_TOKEN not in orch.log()


def test_without_a_worker_token_uploads_are_refused_even_without_auth(
    start_orchestrator, running, orch_results
):
    orch = start_orchestrator(FLOWMESH_RESULTS_DIR=str(orch_results))  # no auth at all
    task_id = running(orch)
    r = post(orch, task_id, b"data", token=None)
    assert r.status_code == 403
    assert "set FLOWMESH_WORKER_TOKEN" in r.json()["detail"]
    assert not files_under(orch_results)
    assert orch.http.get(f"/api/v1/results/{task_id}/files").status_code == 200


def test_a_finished_task_takes_no_upload(orch, start_worker, orch_results):
    start_worker("w1")
    (task_id,) = orch.submit(echo(0))
    assert orch.wait(task_id)["status"] == "DONE"
    r = post(orch, task_id, b"late")
    assert r.status_code == 409
    assert r.json()["detail"] == (
        f"task {task_id} is DONE: uploads are refused for a finished task"
    )
    assert r.headers["connection"] == "close"
    unknown = post(orch, "0123456789abcdef0123456789abcdef", b"data")
    assert unknown.status_code == 404
    assert not files_under(orch_results)


def test_a_superseded_attempt_takes_no_upload(orch, start_worker, orch_results):
    w1 = start_worker("w1")
    (task_id,) = orch.submit(echo(60))
    orch.wait(task_id, ("RUNNING",))
    start_worker("w2")
    w1.signal(signal.SIGKILL)
    wait_until(
        lambda: (t := orch.task(task_id))["attempts"] == 2 and t["status"] == "RUNNING",
        what="the task re-placed on w2",
    )
    stale = post(orch, task_id, b"from the dead attempt", attempt=1)
    assert stale.status_code == 409
    assert stale.json()["detail"] == "attempt 1 is superseded by attempt 2"
    assert not files_under(orch_results / task_id)
    assert post(orch, task_id, b"from the live one", attempt=2).status_code == 201
    assert orch.http.post(f"/api/v1/tasks/{task_id}/cancel").status_code == 200


BAD_NAMES = ("../escape", "a/b", "..", ".hidden", "/etc/passwd", "x..y", "a\\b", "", "é.bin")


def test_a_bad_file_name_is_refused_and_nothing_is_written(orch, running, tmp_path):
    task_id = running(orch)
    before = files_under(tmp_path)
    for name in BAD_NAMES:
        r = post(orch, task_id, b"payload", name=name)
        assert r.status_code == 422, (name, r.text)
        assert "invalid file name" in r.json()["detail"]
    assert {p for p in files_under(tmp_path) - before if "logs" not in p.parts} == set()


def test_traversal_through_the_path_never_reads_or_writes_outside(orch, running, tmp_path):
    task_id = running(orch)
    secret = tmp_path / "secret.txt"
    secret.write_text("do not serve me")
    assert post(orch, task_id, b"ok").status_code == 201
    before = files_under(tmp_path)
    for raw in (
        f"/api/v1/results/{task_id}/files/..%2F..%2Fsecret.txt",
        f"/api/v1/results/{task_id}/files/%2E%2E%2F%2E%2E%2Fsecret.txt",
        f"/api/v1/results/{task_id}/files/%2F{secret}",
        "/api/v1/results/..%2F..%2F/files/secret.txt",
        "/api/v1/results/%2E%2E/files/secret.txt",
    ):
        for token in (API_TOKEN, WORKER_TOKEN):
            r = httpx.get(httpx.URL(orch.url + raw), headers={"Authorization": f"Bearer {token}"})
            assert r.status_code in (403, 404, 422), (raw, r.status_code)
            assert b"do not serve me" not in r.content
    for task in ("..%2F..%2Fevil", "%2E%2E", "abc.def", "a%5Cb"):
        r = httpx.post(
            httpx.URL(f"{orch.url}/api/v1/results/{task}/files?name=x.bin&attempt=1"),
            content=b"evil",
            headers={
                "Authorization": f"Bearer {WORKER_TOKEN}",
                "X-FlowMesh-Sha256": sha(b"evil"),
            },
        )
        assert r.status_code in (403, 404, 422), (task, r.status_code)
    after = files_under(tmp_path)
    assert {p for p in after - before if "logs" not in p.parts} == set()


def test_size_limit_by_content_length_and_while_streaming(start, running, orch_results):
    # The 1 KiB limit on other bodies does not apply to uploads, which have their own.
    orch = start(FLOWMESH_MAX_UPLOAD_BYTES="64Ki", FLOWMESH_MAX_BODY_BYTES="1024")
    task_id = running(orch)
    assert post(orch, task_id, os.urandom(32 << 10), name="fits.bin").status_code == 201

    too_big = os.urandom(100 << 10)
    r = post(orch, task_id, too_big, name="big.bin")
    assert r.status_code == 413
    assert "FLOWMESH_MAX_UPLOAD_BYTES" in r.json()["detail"]

    def chunks() -> Iterator[bytes]:  # no Content-Length: caught while streaming
        for i in range(0, len(too_big), 8192):
            yield too_big[i : i + 8192]

    streamed = httpx.post(
        f"{orch.url}/api/v1/results/{task_id}/files",
        params={"name": "big.bin", "attempt": 1},
        content=chunks(),
        headers={"Authorization": f"Bearer {WORKER_TOKEN}", "X-FlowMesh-Sha256": sha(too_big)},
    )
    assert streamed.status_code == 413
    assert "FLOWMESH_MAX_UPLOAD_BYTES" in streamed.json()["detail"]
    wait_until(
        lambda: (
            {p.name for p in files_under(orch_results / task_id)} == {"fits.bin", "fits.bin.json"}
        ),
        what="only the file that fits",
    )


def settings(orch: Orchestrator, **kw: object) -> UploadSettings:
    return UploadSettings(base_url=orch.url, token=WORKER_TOKEN, **kw)  # type: ignore[arg-type]


def test_upload_file_streams_a_file_the_orchestrator_serves_back(orch, running, tmp_path):
    task_id = running(orch)
    path = tmp_path / "final_model.tar.gz"
    data = os.urandom(3 << 20)
    path.write_bytes(data)
    info = upload_file(path, task_id=task_id, attempt=1, settings=settings(orch))
    assert (info.name, info.size, info.sha256, info.tries) == (
        "final_model.tar.gz",
        len(data),
        sha(data),
        1,
    )
    assert info.url == f"{orch.url}/api/v1/results/{task_id}/files/final_model.tar.gz"
    assert info.bytes_per_sec > 0 and info.seconds > 0
    assert orch.http.get(info.url).content == data

    throttled = settings(orch, bandwidth_bytes_per_sec=4_000_000)
    info = upload_file(path, task_id=task_id, attempt=1, name="copy.bin", settings=throttled)
    assert info.name == "copy.bin" and info.bytes_per_sec > 0  # speed: see bench/upload.py
    assert throttled.describe()["bandwidth_bytes_per_sec"] == 4_000_000
    assert WORKER_TOKEN not in repr(throttled) and WORKER_TOKEN not in str(throttled.describe())


def test_upload_file_refusals_are_permanent_and_carry_the_reason(orch, running, tmp_path):
    task_id = running(orch)
    path = tmp_path / "a.bin"
    path.write_bytes(b"x" * 1000)
    with pytest.raises(UploadRefused) as refused:
        upload_file(path, task_id=task_id, attempt=7, settings=settings(orch))
    assert refused.value.status == 409
    assert "attempt 7" in refused.value.detail
    with pytest.raises(UploadRefused) as by_user:
        upload_file(
            path,
            task_id=task_id,
            attempt=1,
            settings=UploadSettings(base_url=orch.url, token=API_TOKEN),
        )
    assert by_user.value.status == 403 and "FLOWMESH_WORKER_TOKEN" in by_user.value.detail
    with pytest.raises(UploadRefused) as bad_sha:
        upload_file(path, task_id=task_id, attempt=1, settings=settings(orch), sha256="0" * 64)
    assert bad_sha.value.status == 422


def test_upload_file_gives_up_after_its_retries(tmp_path):
    path = tmp_path / "a.bin"
    path.write_bytes(b"x")
    nobody = UploadSettings(base_url=f"http://127.0.0.1:{free_port()}", token="t", retries=1)
    with pytest.raises(UploadFailed, match="after 2 tries: ConnectError"):
        upload_file(path, task_id="t1", attempt=1, settings=nobody)


class CutFirstConnection:
    """A TCP relay in front of the orchestrator that cuts its first connection once the
    client has sent `cut_after` bytes: a network failure in the middle of an upload."""

    def __init__(self, target_port: int, cut_after: int):
        self.target_port = target_port
        self.cut_after = cut_after
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.connections = 0
        self.threads: list[threading.Thread] = []
        self._start(self._accept)

    def _start(self, target: Callable[..., None], *args: object) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True)
        self.threads.append(thread)
        thread.start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            self.connections += 1
            limit = self.cut_after if self.connections == 1 else None
            self._start(self._relay, client, limit)

    def _relay(self, client: socket.socket, limit: int | None) -> None:
        upstream = socket.create_connection(("127.0.0.1", self.target_port))
        with client, upstream:
            back = threading.Thread(target=self._pipe, args=(upstream, client, None))
            back.start()
            self._pipe(client, upstream, limit)
            back.join()

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket, limit: int | None) -> None:
        seen = 0
        try:
            while data := src.recv(65536):
                dst.sendall(data)
                seen += len(data)
                if limit is not None and seen >= limit:
                    for s in (src, dst):  # reset, not a clean close
                        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                        s.shutdown(socket.SHUT_RDWR)
                    return
            dst.shutdown(socket.SHUT_WR)
        except OSError:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self.server.close()
        for thread in self.threads:
            thread.join(timeout=10)


def test_upload_file_restarts_from_byte_0_after_a_cut(orch, running, tmp_path, orch_results):
    task_id = running(orch)
    path = tmp_path / "final_lora.tar.gz"
    data = os.urandom(4 << 20)
    path.write_bytes(data)
    relay = CutFirstConnection(int(orch.url.rsplit(":", 1)[1]), cut_after=1 << 20)
    try:
        info = upload_file(
            path,
            task_id=task_id,
            attempt=1,
            settings=UploadSettings(base_url=f"http://127.0.0.1:{relay.port}", token=WORKER_TOKEN),
        )
    finally:
        relay.close()
    assert info.tries == 2 and relay.connections == 2
    assert orch.http.get(f"/api/v1/results/{task_id}/files/final_lora.tar.gz").content == data
    # The cut upload's partial file is gone too.
    wait_until(
        lambda: (
            {p.name for p in files_under(orch_results / task_id)}
            == {"final_lora.tar.gz", "final_lora.tar.gz.json"}
        ),
        what="the partial upload removed",
    )
    assert "cut off by the client" in orch.log()


def test_retention_deletes_finished_and_unknown_tasks_files_only(start, running, orch_results):
    stray = orch_results / "0123456789abcdef0123456789abcdef"
    stray.mkdir(parents=True)
    (stray / "left-over.bin").write_bytes(b"from a task Redis no longer knows")
    orch = start(FLOWMESH_RESULTS_RETENTION_SEC="0", FLOWMESH_RESULTS_RETENTION_INTERVAL_SEC="0.1")
    wait_until(lambda: not stray.exists(), what="the unknown task's folder removed")
    keep, drop = running(orch), running(orch)
    assert post(orch, keep, b"keep me").status_code == 201
    assert post(orch, drop, b"drop me").status_code == 201
    assert orch.http.post(f"/api/v1/tasks/{drop}/cancel").status_code == 200
    wait_until(lambda: not (orch_results / drop).exists(), what="the cancelled task's files gone")
    assert "results retention: deleted the files of 1 task(s)" in orch.log()
    assert orch.http.get(f"/api/v1/results/{keep}/files/model.tar.gz").content == b"keep me"
    assert orch.http.get(f"/api/v1/results/{drop}/files").json()["files"] == []


def test_settings_refuse_a_worker_token_that_is_the_api_token_or_short():
    env = {"REDIS_URL": "redis://x", "FLOWMESH_API_TOKEN": API_TOKEN}
    with pytest.raises(ConfigError, match="FLOWMESH_WORKER_TOKEN must differ"):
        OrchestratorSettings.from_env(
            {**env, "FLOWMESH_WORKER_TOKEN": API_TOKEN}, host="127.0.0.1", port=1
        )
    with pytest.raises(ConfigError, match="FLOWMESH_WORKER_TOKEN must be at least 16"):
        OrchestratorSettings.from_env(
            {**env, "FLOWMESH_WORKER_TOKEN": "short"}, host="127.0.0.1", port=1
        )
    with pytest.raises(ConfigError, match="FLOWMESH_MAX_UPLOAD_BYTES"):
        OrchestratorSettings.from_env(
            {**env, "FLOWMESH_MAX_UPLOAD_BYTES": "lots"}, host="127.0.0.1", port=1
        )
    s = OrchestratorSettings.from_env(
        {**env, "FLOWMESH_MAX_UPLOAD_BYTES": "10Gi", "FLOWMESH_RESULTS_DIR": "rel/dir"},
        host="127.0.0.1",
        port=1,
    )
    assert s.max_upload_bytes == 10 * 2**30
    assert s.results_dir.is_absolute() and s.results_dir.parts[-2:] == ("rel", "dir")
    assert s.results_retention_sec == 7 * 86_400


def test_retention_keeps_recent_files_of_a_task_redis_does_not_know(redis_url, tmp_path):
    # An orchestrator pointed at another Redis (or key prefix) by mistake sees every task
    # folder as unknown: files younger than the retention period must survive that.
    import asyncio
    import time

    import redis.asyncio as aioredis

    from flowmesh.keys import Keys
    from orchestrator.results import sweep

    root = tmp_path / "store"
    folder = root / "0123456789abcdef0123456789abcdef"
    folder.mkdir(parents=True)
    (folder / "final_lora.tar.gz").write_bytes(b"recent upload")

    async def run(now: float) -> list[str]:
        conn = aioredis.from_url(redis_url, decode_responses=True)
        try:
            return await sweep(conn, Keys("another-prefix:"), root, 3600, now=now)
        finally:
            await conn.aclose()

    assert asyncio.run(run(time.time())) == []
    assert (folder / "final_lora.tar.gz").read_bytes() == b"recent upload"
    assert asyncio.run(run(time.time() + 7200)) == [folder.name]
    assert not folder.exists()
