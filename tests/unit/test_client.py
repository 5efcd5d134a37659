"""flowmesh.client against a real HTTP server: keep-alive reuse, a server that closed the
connection meanwhile, errors and the token."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from flowmesh.client import ApiError, Client


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive unless told otherwise
    server: _Server

    def do_GET(self) -> None:
        self.server.seen.append((self.path, self.headers.get("Authorization"), self.client_address))
        status, body = (
            (404, {"detail": "task 'x' not found"})
            if "missing" in self.path
            else (
                200,
                {"workers": [], "path": self.path},
            )
        )
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)
        # Close without saying so (no `Connection: close`), as a server's idle timeout does.
        self.close_connection = self.server.drop_after_reply

    def log_message(self, *args: object) -> None:
        pass


class _Server(ThreadingHTTPServer):
    seen: list[tuple[str, str | None, tuple[str, int]]]
    drop_after_reply: bool
    closed: threading.Event

    def shutdown_request(self, request: Any) -> None:
        super().shutdown_request(request)  # the socket is closed only here
        self.closed.set()


@pytest.fixture
def server() -> Iterator[_Server]:
    srv = _Server(("127.0.0.1", 0), _Handler)
    srv.seen, srv.drop_after_reply, srv.closed = [], False, threading.Event()
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


def _url(srv: _Server) -> str:
    return f"http://127.0.0.1:{srv.server_address[1]}"


def test_requests_share_one_connection_and_carry_the_token(server: _Server) -> None:
    with Client(_url(server), token="s3cret") as client:
        assert client.workers() == []
        assert client.tasks(status="DONE", type=None)["path"] == "/api/v1/tasks?status=DONE"
    (_, auth1, addr1), (_, auth2, addr2) = server.seen
    assert auth1 == auth2 == "Bearer s3cret"
    assert addr1 == addr2  # same client port: the connection was kept


def test_a_connection_the_server_closed_is_replaced_before_the_next_request(
    server: _Server,
) -> None:
    server.drop_after_reply = True
    with Client(_url(server)) as client:
        client.workers()
        assert server.closed.wait(5)
        assert client.workers() == []  # not RemoteDisconnected
    assert len(server.seen) == 2  # each request sent once
    assert server.seen[0][2] != server.seen[1][2]


def test_error_replies_raise_with_status_and_detail(server: _Server) -> None:
    with Client(_url(server)) as client, pytest.raises(ApiError) as err:
        client.task("missing")
    assert err.value.status == 404
    assert "task 'x' not found" in str(err.value)


def test_long_poll_asks_the_server_to_wait(server: _Server) -> None:
    with Client(_url(server)) as client:
        client.task("abc", wait=2.5)
    assert server.seen[0][0] == "/api/v1/tasks/abc?wait=2.5"


def test_health_is_false_when_nothing_listens() -> None:
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    port = srv.server_address[1]
    srv.server_close()
    assert Client(f"http://127.0.0.1:{port}").healthy() is False


def test_a_url_without_scheme_is_refused() -> None:
    with pytest.raises(ValueError, match="http"):
        Client("localhost:8000")


def test_works_when_its_socket_number_is_above_1023(server: _Server) -> None:
    import resource
    import socket

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 1100:
        pytest.skip(f"the hard open-files limit here ({hard}) is below 1100")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 1100), hard))
    held = [socket.socket() for _ in range(1030)]  # push the next descriptors past 1023
    try:
        with Client(_url(server)) as client:
            client.workers()
            assert client._conn is not None and client._conn.sock.fileno() > 1023
            assert client.workers() == []  # the stale-connection check ran on a high fd
    finally:
        for s in held:
            s.close()
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_task_ids_are_quoted_into_the_path(server: _Server) -> None:
    with Client(_url(server)) as client:
        client.task("../workers x")
    assert server.seen[0][0] == "/api/v1/tasks/..%2Fworkers%20x"
