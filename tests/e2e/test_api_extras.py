"""The API's extras: Idempotency-Key reuse, newest-first listing, the access log, offline /docs."""

from __future__ import annotations

import json
import re

import httpx

from tests.conftest import wait_until

TOKEN = "extras-token-for-the-tests-0123456789abcdef"
WRONG = "not-the-token-but-close-0123456789abcdef"


def echo(message: str, **extra: object) -> dict[str, object]:
    return {"spec": {"taskType": "echo", "echo": {"message": message}, **extra}}


# -- Idempotency-Key ---------------------------------------------------------------------


def test_idempotency_key_reused_with_a_different_body_is_refused(orchestrator, rdb):
    key = {"Idempotency-Key": "nightly-42"}
    first = orchestrator.http.post("/api/v1/tasks", json=echo("a", priority=3), headers=key)
    assert first.status_code == 201, first.text
    ids = [t["task_id"] for t in first.json()["tasks"]]

    # The same request in another format, key order and spacing: a replay.
    yaml = "spec:\n  priority: 3\n  echo:   {message: a}\n  taskType: echo\n"
    same = orchestrator.http.post(
        "/api/v1/tasks",
        content=yaml,
        headers={**key, "Content-Type": "application/yaml"},
    )
    assert same.status_code == 200, same.text
    assert same.json()["idempotent_replay"] is True
    assert [t["task_id"] for t in same.json()["tasks"]] == ids

    # Another body under the same key: refused, nothing stored.
    other = orchestrator.http.post("/api/v1/tasks", json=echo("b", priority=3), headers=key)
    assert other.status_code == 422, other.text
    assert other.json()["detail"] == (
        "Idempotency-Key 'nightly-42' was already used for a different request "
        "(within FLOWMESH_IDEMPOTENCY_TTL_SEC=86400 s); use a new key"
    )
    assert "idempotent_replay" not in other.json()
    assert rdb.zcard("tasks:all") == 1
    assert sorted(rdb.keys("task:*")) == [f"task:{ids[0]}", f"task:{ids[0]}:spec"]
    assert "reused for a different request" in orchestrator.log()

    stored = rdb.hgetall("idempotency:nightly-42")
    assert json.loads(stored["task_ids"]) == ids
    assert re.fullmatch(r"[0-9a-f]{64}", stored["request_sha256"])
    assert 0 < rdb.ttl("idempotency:nightly-42") <= 86400


def test_idempotency_key_compares_the_whole_batch_in_order(orchestrator, rdb):
    key = {"Idempotency-Key": "batch-7"}
    batch = [echo("one"), echo("two")]
    assert orchestrator.http.post("/api/v1/tasks", json=batch, headers=key).status_code == 201
    assert orchestrator.http.post("/api/v1/tasks", json=batch, headers=key).status_code == 200
    for body in (batch[::-1], batch[:1], [*batch, echo("three")]):
        r = orchestrator.http.post("/api/v1/tasks", json=body, headers=key)
        assert r.status_code == 422, r.text
        assert "'batch-7' was already used for a different request" in r.json()["detail"]
    assert rdb.zcard("tasks:all") == 2


def test_idempotency_key_stored_before_the_hash_was_kept_still_replays(orchestrator, rdb):
    """A key written by an older orchestrator (a string holding the ids) stays valid
    through an upgrade until it expires."""
    (task_id,) = orchestrator.submit(echo("old"))
    rdb.set("idempotency:legacy", json.dumps([task_id]), ex=60)
    r = orchestrator.http.post(
        "/api/v1/tasks", json=echo("anything"), headers={"Idempotency-Key": "legacy"}
    )
    assert r.status_code == 200, r.text
    assert [t["task_id"] for t in r.json()["tasks"]] == [task_id]
    assert rdb.zcard("tasks:all") == 1


# -- listing order -----------------------------------------------------------------------


def pages(orch, **params: object) -> tuple[list[str], int]:
    seen: list[str] = []
    cursor = None
    count = 0
    while True:
        query = {**params, **({"cursor": cursor} if cursor else {})}
        r = orch.http.get("/api/v1/tasks", params=query)
        assert r.status_code == 200, r.text
        seen += [t["task_id"] for t in r.json()["tasks"]]
        count += 1
        cursor = r.json()["next_cursor"]
        if not cursor:
            return seen, count


def test_listing_newest_first_pages_with_a_cursor(orchestrator):
    ids = orchestrator.submit(*[echo(str(i)) for i in range(25)])
    assert pages(orchestrator, limit=10, order="desc") == (ids[::-1], 3)
    assert pages(orchestrator, limit=10, order="desc", status="PENDING") == (ids[::-1], 3)
    assert pages(orchestrator, limit=10, order="asc") == (ids, 3)
    assert pages(orchestrator, limit=10) == (ids, 3)  # asc by default, as before
    newest = orchestrator.http.get("/api/v1/tasks", params={"order": "desc", "limit": 1}).json()
    assert [t["task_id"] for t in newest["tasks"]] == [ids[-1]]


def test_listing_order_must_be_asc_or_desc(orchestrator):
    orchestrator.submit(echo("x"))
    r = orchestrator.http.get("/api/v1/tasks", params={"order": "newest"})
    assert r.status_code == 422, r.text
    (error,) = r.json()["detail"]
    assert error["loc"] == ["query", "order"]
    assert "'asc'" in error["msg"] and "'desc'" in error["msg"]


# -- access log --------------------------------------------------------------------------


def access_lines(orch) -> list[str]:
    return [line for line in orch.log().splitlines() if "orchestrator.access" in line]


def test_access_log_warns_of_refused_requests_and_never_logs_secrets(start_orchestrator):
    orch = start_orchestrator(token=TOKEN)
    assert httpx.get(f"{orch.url}/api/v1/workers").status_code == 401
    wrong = {"Authorization": f"Bearer {WRONG}"}
    assert httpx.get(f"{orch.url}/api/v1/tasks?limit=5", headers=wrong).status_code == 401
    r = orch.http.get("/api/v1/tasks", params={"status": "PENDING", "access_token": "leak-me-1"})
    assert r.status_code == 200
    # Names a mask would not guess, and a bare value, are kept out too.
    assert orch.http.get("/api/v1/tasks?bearer=leak-me-2&leak-me-3").status_code == 200

    wait_until(lambda: len(access_lines(orch)) >= 4, what="four access-log lines")
    lines = access_lines(orch)
    (missing,) = [line for line in lines if "/api/v1/workers" in line]
    assert "WARNING" in missing and " 401 " in missing
    assert "refused: no Authorization header" in missing
    (refused,) = [line for line in lines if "/api/v1/tasks?limit=5" in line]
    assert "WARNING" in refused and " 401 " in refused and "refused: wrong API token" in refused
    assert "GET " in refused and "ms client=127.0.0.1:" in refused
    (ok,) = [line for line in lines if "status=PENDING" in line]
    assert "INFO" in ok and " 200 " in ok
    assert "GET /api/v1/tasks?status=PENDING&*=*** 200 " in ok

    log = orch.log()
    for secret in (TOKEN, WRONG, "leak-me-1", "leak-me-2", "leak-me-3", "Bearer"):
        assert secret not in log, secret


def test_access_log_names_other_refusals_and_skips_health_probes(start_orchestrator):
    orch = start_orchestrator(FLOWMESH_MAX_BODY_BYTES="2048")
    r = orch.http.post(
        "/api/v1/tasks", content="x" * 5000, headers={"Content-Type": "application/yaml"}
    )
    assert r.status_code == 413
    assert orch.http.get("/api/v1/tasks/nope").status_code == 404
    wait_until(lambda: len(access_lines(orch)) >= 2, what="two access-log lines")
    lines = access_lines(orch)
    assert any("INFO" in x and "POST /api/v1/tasks 413 " in x for x in lines), lines
    assert any("INFO" in x and "GET /api/v1/tasks/nope 404 " in x for x in lines), lines
    assert not any("/healthz" in x for x in lines)  # probed at start: DEBUG only
    assert "uvicorn.access" not in orch.log()  # one line per request, not two


# -- offline /docs -----------------------------------------------------------------------

ASSET = re.compile(r"""(?:src|href)\s*=\s*["']([^"']+)["']|(?:url)\s*:\s*["']([^"']+)["']""")


def test_docs_load_their_assets_from_the_orchestrator(start_orchestrator):
    orch = start_orchestrator(token=TOKEN)
    kinds = {".js": "javascript", ".css": "text/css", ".png": "image/png", ".json": "json"}
    for page in ("/docs", "/redoc"):
        r = orch.http.get(page)
        assert r.status_code == 200, page
        html = r.text
        assert not re.search(r"https?://", html), (page, html)
        urls = [a or b for a, b in ASSET.findall(html)]
        assert any(u.endswith(".js") for u in urls), (page, urls)
        for url in urls:
            assert url.startswith("/"), url
            asset = orch.http.get(url)
            assert asset.status_code == 200, url
            suffix = url[url.rindex(".") :]
            assert kinds[suffix] in asset.headers["content-type"], (url, asset.headers)
            assert asset.content
            # Behind the token, like /docs itself.
            assert httpx.get(orch.url + url).status_code == 401, url
    html = orch.http.get("/docs").text
    assert "/docs/static/swagger-ui-bundle.js" in html
    assert "/docs/static/swagger-ui.css" in html
    assert '"validatorUrl": null' in html  # no badge fetched from validator.swagger.io
    assert httpx.get(f"{orch.url}/docs").status_code == 401
    assert httpx.get(f"{orch.url}/docs/static/swagger-ui-bundle.js").status_code == 401
