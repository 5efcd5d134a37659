"""Per-task output files: `responses.json` and `manifest.json` under RESULTS_DIR/<task_id>/."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _write_atomic(path: Path, data: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False))
    os.replace(tmp, path)


def write_outputs(out_dir: Path, responses: dict[str, Any]) -> dict[str, Any]:
    """Write responses.json, then a manifest of every file in the task directory."""
    out_dir.mkdir(parents=True, exist_ok=True)
    _write_atomic(out_dir / "responses.json", responses)
    files = []
    for path in sorted(p for p in out_dir.rglob("*") if p.is_file()):
        rel = path.relative_to(out_dir).as_posix()
        if rel == "manifest.json" or rel.endswith(".tmp"):
            continue
        files.append({"path": rel, "size": path.stat().st_size, "sha256": _sha256(path)})
    manifest = {"task_id": responses["task_id"], "attempt": responses["attempt"], "files": files}
    _write_atomic(out_dir / "manifest.json", manifest)
    return manifest
