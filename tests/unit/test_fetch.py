"""The artifact cache against a real HTTP server: allow-list, token, checksums, one download."""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import socket
import tarfile
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from worker.artifacts.archive import ArchiveSettings, create_archive
from worker.artifacts.extract import ExtractLimits, UnsafeArchive
from worker.artifacts.fetch import ArtifactCache, FetchError, FetchSettings


@dataclass
class Server:
    root: Path
    url: str
    sha_headers: dict[str, str] = field(default_factory=dict)  # path -> X-FlowMesh-Sha256
    requests: list[tuple[str, str | None]] = field(default_factory=list)  # path, Authorization

    def gets(self, path: str) -> int:
        return sum(1 for p, _ in self.requests if p == path)


class Handler(SimpleHTTPRequestHandler):
    server_state: Server

    def do_GET(self) -> None:
        state = self.server_state
        state.requests.append((self.path, self.headers.get("Authorization")))
        if self.path == "/denied":
            body = json.dumps({"detail": "task t1 has no such file"}).encode()
            self.send_response(404)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            return
        if self.path.startswith("/redirect"):
            self.send_response(302)
            self.send_header("Location", "http://169.254.169.254/latest/meta-data")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        super().do_GET()

    def end_headers(self) -> None:
        sha = self.server_state.sha_headers.get(self.path)
        if sha:
            self.send_header("X-FlowMesh-Sha256", sha)
        super().end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        pass


def start(root: Path) -> tuple[ThreadingHTTPServer, Server]:
    root.mkdir(parents=True, exist_ok=True)
    state = Server(root=root, url="")
    handler = type("BoundHandler", (Handler,), {"server_state": state})
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), partial(handler, directory=str(root)))
    state.url = f"http://127.0.0.1:{httpd.server_address[1]}"
    threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True).start()
    return httpd, state


@pytest.fixture
def servers(tmp_path: Path) -> Iterator[tuple[Server, Server]]:
    """Two servers: the orchestrator, and another host that may be allowed."""
    a, orchestrator = start(tmp_path / "www-orch")
    b, other = start(tmp_path / "www-other")
    yield orchestrator, other
    for httpd in (a, b):
        httpd.shutdown()
        httpd.server_close()


@pytest.fixture
def server(servers: tuple[Server, Server]) -> Server:
    return servers[0]


def lora_archive(tmp_path: Path, dest: Path, fmt: str = "gzip") -> tuple[Path, str]:
    src = tmp_path / "build" / "final_lora"
    src.mkdir(parents=True, exist_ok=True)
    (src / "adapter_config.json").write_text('{"r": 16}')
    (src / "adapter_model.bin").write_bytes(bytes(range(256)) * 1000)
    info = create_archive(src, dest, ArchiveSettings(format=fmt))  # type: ignore[arg-type]
    return info.path, info.sha256


def cache_for(tmp_path: Path, server: Server, **kw: Any) -> ArtifactCache:
    settings: dict[str, Any] = {
        "cache_dir": tmp_path / "cache",
        "orchestrator_url": server.url,
        "token": "s3cret",
    }
    return ArtifactCache(FetchSettings(**{**settings, **kw}))


def test_download_extracts_once_and_is_reused(tmp_path: Path, server: Server) -> None:
    _, sha = lora_archive(tmp_path, server.root)
    server.sha_headers["/final_lora.tar.gz"] = sha
    cache = cache_for(tmp_path, server)
    url = f"{server.url}/final_lora.tar.gz"

    first = cache.resolve(url)
    assert first == tmp_path / "cache" / sha / "final_lora"
    assert (first / "adapter_config.json").read_text() == '{"r": 16}'
    assert cache.resolve(url) == first
    assert cache.resolve(url, sha) == first
    # A new cache object (another process) finds it on disk too.
    assert cache_for(tmp_path, server).resolve(url) == first
    assert server.gets("/final_lora.tar.gz") == 1
    assert list((tmp_path / "cache" / "tmp").iterdir()) == []


def test_known_sha_skips_the_download(tmp_path: Path, server: Server) -> None:
    path, sha = lora_archive(tmp_path, server.root)
    cache = cache_for(tmp_path, server)
    first = cache.resolve(str(path))  # a local archive with the same content
    assert cache.resolve(f"{server.url}/final_lora.tar.gz", sha) == first
    assert server.gets("/final_lora.tar.gz") == 0


def test_concurrent_resolves_download_once(tmp_path: Path, server: Server) -> None:
    lora_archive(tmp_path, server.root, fmt="zstd")
    url = f"{server.url}/final_lora.tar.zst"
    with ThreadPoolExecutor(6) as pool:
        # Separate caches: separate lock file descriptions, as separate processes have.
        results = list(pool.map(lambda _: cache_for(tmp_path, server).resolve(url), range(6)))
    assert len(set(results)) == 1 and results[0].name == "final_lora"
    assert server.gets("/final_lora.tar.zst") == 1


def test_host_not_allowed_is_refused_before_connecting(tmp_path: Path, server: Server) -> None:
    cache = cache_for(tmp_path, server)
    # The host does not even resolve: the error must be the allow-list's, not DNS's.
    with pytest.raises(FetchError, match=r"host 'nowhere\.invalid' is not allowed") as err:
        cache.resolve("http://nowhere.invalid/model.tar.gz")
    assert "ARTIFACT_ALLOWED_HOSTS" in str(err.value)
    # Same host as the orchestrator on another port is another origin.
    with pytest.raises(FetchError, match="not allowed"):
        cache.resolve("http://127.0.0.1:1/model.tar.gz")
    with pytest.raises(FetchError, match="only local paths and http"):
        cache.resolve("file:///etc/passwd")
    assert server.requests == []


def test_token_goes_to_the_orchestrator_only(
    tmp_path: Path, servers: tuple[Server, Server]
) -> None:
    orchestrator, other = servers
    (orchestrator.root / "a.jsonl").write_text('{"q": 1}\n')
    (other.root / "b.jsonl").write_text('{"q": 2}\n')
    other_host = other.url.removeprefix("http://")
    cache = cache_for(tmp_path, orchestrator, allowed_hosts=frozenset({other_host}))

    a = cache.resolve(f"{orchestrator.url}/a.jsonl")
    b = cache.resolve(f"{other.url}/b.jsonl")
    assert a.read_text() == '{"q": 1}\n' and a.name == "a.jsonl"
    assert b.read_text() == '{"q": 2}\n' and b.name == "b.jsonl"
    assert a.parent.name == hashlib.sha256(b'{"q": 1}\n').hexdigest()
    assert orchestrator.requests == [("/a.jsonl", "Bearer s3cret")]
    assert other.requests == [("/b.jsonl", None)]


def test_allowed_host_without_port_allows_any_port(
    tmp_path: Path, servers: tuple[Server, Server]
) -> None:
    orchestrator, other = servers
    (other.root / "c.json").write_text("{}")
    cache = cache_for(
        tmp_path, orchestrator, orchestrator_url=None, allowed_hosts=frozenset({"127.0.0.1"})
    )
    assert cache.resolve(f"{other.url}/c.json").read_text() == "{}"
    assert other.requests == [("/c.json", None)]


def test_sha_mismatch_from_the_server_header(tmp_path: Path, server: Server) -> None:
    lora_archive(tmp_path, server.root)
    server.sha_headers["/final_lora.tar.gz"] = "0" * 64
    cache = cache_for(tmp_path, server)
    with pytest.raises(
        FetchError, match=r"X-FlowMesh-Sha256 expected 0{64}, downloaded [0-9a-f]{64}"
    ):
        cache.resolve(f"{server.url}/final_lora.tar.gz")
    assert list((tmp_path / "cache" / "tmp").iterdir()) == []
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == ["locks", "tmp"]


def test_sha_mismatch_from_the_caller(tmp_path: Path, server: Server) -> None:
    _, sha = lora_archive(tmp_path, server.root)
    cache = cache_for(tmp_path, server)
    with pytest.raises(FetchError, match=f"the caller expected {'1' * 64}, downloaded {sha}"):
        cache.resolve(f"{server.url}/final_lora.tar.gz", "1" * 64)
    assert list((tmp_path / "cache" / "tmp").iterdir()) == []
    # The right digest works, and a cached URL with another expected digest is fetched again.
    assert cache.resolve(f"{server.url}/final_lora.tar.gz", sha).name == "final_lora"
    with pytest.raises(FetchError, match="mismatch"):
        cache.resolve(f"{server.url}/final_lora.tar.gz", "2" * 64)
    assert server.gets("/final_lora.tar.gz") == 3


def test_http_errors_say_what_the_server_said(tmp_path: Path, server: Server) -> None:
    cache = cache_for(tmp_path, server)
    with pytest.raises(FetchError, match="HTTP 404: task t1 has no such file"):
        cache.resolve(f"{server.url}/denied")
    with pytest.raises(FetchError, match=r"HTTP 302 redirect to 'http://169\.254.* not followed"):
        cache.resolve(f"{server.url}/redirect")
    with pytest.raises(FetchError, match="HTTP 404"):
        cache.resolve(f"{server.url}/missing.tar.gz")


def test_errors_and_logs_never_show_a_urls_query_or_password(
    tmp_path: Path, server: Server, caplog: pytest.LogCaptureFixture
) -> None:
    # A presigned URL's signature is a secret: kept out of task errors and the worker log.
    cache = cache_for(tmp_path, server)
    secret = "X-Amz-Signature=s3cr3t"
    host = server.url.split("://", 1)[1]
    with caplog.at_level("DEBUG"), pytest.raises(FetchError) as err:
        cache.resolve(f"http://user:hunter2@{host}/missing.tar.gz?{secret}")
    assert "/missing.tar.gz?…" in str(err.value)
    for text in (str(err.value), caplog.text):
        assert "s3cr3t" not in text and "hunter2" not in text


def test_download_size_limit(tmp_path: Path, server: Server) -> None:
    (server.root / "big.parquet").write_bytes(b"\0" * 100_000)
    cache = cache_for(tmp_path, server, limits=ExtractLimits(max_bytes=50_000))
    with pytest.raises(FetchError, match="over max_bytes=50000"):
        cache.resolve(f"{server.url}/big.parquet")


def test_local_inputs(tmp_path: Path, server: Server) -> None:
    cache = cache_for(tmp_path, server)
    folder = tmp_path / "model"
    folder.mkdir()
    data = tmp_path / "data.jsonl"
    data.write_text("{}\n")
    assert cache.resolve(str(folder)) == folder
    assert cache.resolve(str(data)) == data
    with pytest.raises(FetchError, match="does not exist"):
        cache.resolve(str(tmp_path / "nope"))
    # A sha256 given for a local file is checked too; a directory has none to check.
    good = hashlib.sha256(b"{}\n").hexdigest()
    assert cache.resolve(str(data), good) == data
    with pytest.raises(FetchError, match="sha256 mismatch"):
        cache.resolve(str(data), "0" * 64)
    with pytest.raises(FetchError, match="is a directory: a sha256 checks a file"):
        cache.resolve(str(folder), good)

    path, sha = lora_archive(tmp_path, tmp_path / "archives", fmt="tar")
    top = cache.resolve(str(path))
    assert top == tmp_path / "cache" / sha / "final_lora"
    assert cache.resolve(str(path), sha) == top
    with pytest.raises(FetchError, match="sha256 mismatch"):
        cache.resolve(str(path), "f" * 64)
    with pytest.raises(FetchError, match="64 hex digits"):
        cache.resolve(str(path), "abc")


def test_unsafe_download_is_refused_and_not_cached(tmp_path: Path, server: Server) -> None:
    evil = server.root / "evil.tar.gz"
    with tarfile.open(evil, "w:gz") as tar:
        info = tarfile.TarInfo("final_lora/../../escape.txt")
        info.size = 4
        tar.addfile(info, io.BytesIO(b"evil"))
    cache = cache_for(tmp_path, server)
    with pytest.raises(
        FetchError, match=r"cannot extract evil\.tar\.gz: unsafe archive member"
    ) as err:
        cache.resolve(f"{server.url}/evil.tar.gz")
    assert isinstance(err.value.__cause__, UnsafeArchive)
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == ["locks", "tmp"]
    assert not (tmp_path / "escape.txt").exists()


def test_a_killed_processs_partial_downloads_are_swept(tmp_path: Path, server: Server) -> None:
    import os
    import time

    root = tmp_path / "cache"
    (root / "tmp").mkdir(parents=True)
    old_part, new_part = root / "tmp" / "a.part", root / "tmp" / "b.part"
    old_dir = root / ".abc.x.part"
    for p in (old_part, new_part):
        p.write_bytes(b"half")
    old_dir.mkdir()
    hour_ago = time.time() - 3700
    for p in (old_part, old_dir):
        os.utime(p, (hour_ago, hour_ago))
    cache_for(tmp_path, server)
    assert not old_part.exists() and not old_dir.exists()
    assert new_part.exists()  # perhaps another process's download in progress


def closed_origin() -> str:
    """An http origin on this host where nothing listens: any request there fails."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def tree(root: Path) -> dict[str, bytes | None]:
    """Every entry under `root`: files with their bytes, directories as None."""
    return {
        str(p.relative_to(root)): p.read_bytes() if p.is_file() else None
        for p in sorted(root.rglob("*"))
    }


def test_an_adopted_archive_resolves_as_its_download_would_without_one(
    tmp_path: Path, server: Server
) -> None:
    made = tmp_path / "build" / "final_lora"
    (made / "sub").mkdir(parents=True)
    (made / "sub" / "tokenizer.json").write_text("{}")
    archive, sha = lora_archive(tmp_path, server.root)
    downloaded = cache_for(tmp_path, server, cache_dir=tmp_path / "downloads").resolve(
        f"{server.url}/final_lora.tar.gz"
    )

    origin = closed_origin()
    url = f"{origin}/api/v1/results/train-1/files/final_lora.tar.gz"
    for extracted in (made, None):  # the directory linked in, or the archive extracted
        root = tmp_path / f"cache-{extracted is None}"
        cache = cache_for(tmp_path, server, cache_dir=root, orchestrator_url=origin)
        cache.adopt(url, sha, archive, extracted)
        got = cache.resolve(url)
        assert got.relative_to(root) == downloaded.relative_to(tmp_path / "downloads")
        assert tree(got) == tree(downloaded) == tree(made)
        assert cache.resolve(url, sha) == got
        # Adopting again changes nothing; another process finds it on disk too.
        cache.adopt(url, sha, archive, extracted)
        again = cache_for(tmp_path, server, cache_dir=root, orchestrator_url=origin)
        assert again.resolve(url) == got and tree(got) == tree(made)
        assert not list(root.glob(".*.part"))
    linked = tmp_path / "cache-False" / sha / "final_lora" / "adapter_model.bin"
    assert linked.stat().st_ino == (made / "adapter_model.bin").stat().st_ino
    assert server.gets("/final_lora.tar.gz") == 1  # the one real download above


def test_an_adopted_url_with_another_expected_sha_is_fetched_again(tmp_path: Path) -> None:
    archive, sha = lora_archive(tmp_path, tmp_path / "out")
    origin = closed_origin()
    url = f"{origin}/api/v1/results/train-1/files/final_lora.tar.gz"
    cache = ArtifactCache(FetchSettings(cache_dir=tmp_path / "cache", orchestrator_url=origin))
    cache.adopt(url, sha, archive, tmp_path / "build" / "final_lora")
    # As for a cached download: another digest is not taken from the cache but fetched,
    # and here nothing answers.
    with pytest.raises(FetchError, match="failed: ConnectError") as err:
        cache.resolve(url, "2" * 64)
    assert err.value.retryable
    assert cache.resolve(url, sha).name == "final_lora"


def test_linking_falls_back_to_copying(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    archive, sha = lora_archive(tmp_path, tmp_path / "out")
    made = tmp_path / "build" / "final_lora"

    def cross_device(src: str, dst: str) -> None:
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(os, "link", cross_device)
    origin = closed_origin()
    url = f"{origin}/final_lora.tar.gz"
    cache = ArtifactCache(FetchSettings(cache_dir=tmp_path / "cache", orchestrator_url=origin))
    cache.adopt(url, sha, archive, made)
    got = cache.resolve(url)
    assert tree(got) == tree(made)
    assert (got / "adapter_model.bin").stat().st_ino != (made / "adapter_model.bin").stat().st_ino


def test_a_failed_adoption_is_logged_and_costs_a_download_only(
    tmp_path: Path, server: Server, caplog: pytest.LogCaptureFixture
) -> None:
    archive, sha = lora_archive(tmp_path, server.root)
    url = f"{server.url}/final_lora.tar.gz"
    cache = cache_for(tmp_path, server)
    cache.adopt(url, sha, tmp_path / "gone.tar.gz")
    cache.adopt(url, sha, archive, tmp_path / "gone")
    cache.adopt(url, "not-a-digest", archive)
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 3
    assert all("could not keep" in w for w in warnings)
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == ["locks"]
    assert cache.resolve(url) == tmp_path / "cache" / sha / "final_lora"
    assert server.gets("/final_lora.tar.gz") == 1
