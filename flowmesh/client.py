"""A small HTTP client for the orchestrator API, used by the CLI and the demo."""

from __future__ import annotations

from typing import Any

import httpx


class ApiError(Exception):
    def __init__(self, status: int, body: Any):
        self.status = status
        self.body = body
        detail = body.get("detail") if isinstance(body, dict) else body
        super().__init__(f"HTTP {status}: {detail}")


class Client:
    def __init__(self, url: str, token: str | None = None, timeout: float = 30.0):
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.http = httpx.Client(base_url=url.rstrip("/"), headers=headers, timeout=timeout)

    def close(self) -> None:
        self.http.close()

    def _check(self, r: httpx.Response) -> Any:
        try:
            body = r.json()
        except ValueError:
            body = r.text
        if r.status_code >= 400:
            raise ApiError(r.status_code, body)
        return body

    def submit_text(
        self, text: str, content_type: str = "application/yaml"
    ) -> list[dict[str, Any]]:
        r = self.http.post(
            "/api/v1/tasks", content=text.encode(), headers={"Content-Type": content_type}
        )
        return list(self._check(r)["tasks"])

    def submit(self, specs: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return list(self._check(self.http.post("/api/v1/tasks", json=specs))["tasks"])

    def task(self, task_id: str) -> dict[str, Any]:
        return dict(self._check(self.http.get(f"/api/v1/tasks/{task_id}")))

    def tasks(self, **params: Any) -> dict[str, Any]:
        clean = {k: v for k, v in params.items() if v is not None}
        return dict(self._check(self.http.get("/api/v1/tasks", params=clean)))

    def cancel(self, task_id: str) -> dict[str, Any]:
        return dict(self._check(self.http.post(f"/api/v1/tasks/{task_id}/cancel")))

    def dead_letters(self, limit: int = 100) -> list[dict[str, Any]]:
        r = self.http.get("/api/v1/dead-letters", params={"limit": limit})
        return list(self._check(r)["tasks"])

    def requeue(self, task_id: str) -> dict[str, Any]:
        return dict(self._check(self.http.post(f"/api/v1/dead-letters/{task_id}/requeue")))

    def workers(self) -> list[dict[str, Any]]:
        return list(self._check(self.http.get("/api/v1/workers"))["workers"])

    def healthy(self) -> bool:
        try:
            return self.http.get("/healthz", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False
