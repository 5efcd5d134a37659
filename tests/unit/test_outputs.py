"""responses.json and manifest.json: what a task's directory holds after it ran."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from worker.outputs import write_outputs


def responses(task_id: str = "t1", **extra: object) -> dict:
    return {"task_id": task_id, "attempt": 1, "status": "DONE", "result": {"x": 1}, **extra}


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_fresh_directory_manifest_lists_responses_with_its_real_hash(tmp_path):
    out = tmp_path / "results" / "t1"  # RESULTS_DIR itself does not exist yet
    manifest = write_outputs(out, responses())
    assert json.loads((out / "responses.json").read_text())["result"] == {"x": 1}
    assert manifest["files"] == [
        {
            "path": "responses.json",
            "size": (out / "responses.json").stat().st_size,
            "sha256": sha(out / "responses.json"),
        }
    ]
    assert json.loads((out / "manifest.json").read_text()) == manifest


def test_files_the_executor_wrote_are_in_the_manifest_sorted_with_hashes(tmp_path):
    out = tmp_path / "t2"
    (out / "artifacts" / "deep").mkdir(parents=True)
    (out / "artifacts" / "deep" / "w.bin").write_bytes(b"\x00" * 5000)
    (out / "notes.txt").write_text("hello")
    (out / "link").symlink_to("/etc/hostname")  # a link is not listed (nor followed)
    manifest = write_outputs(out, responses("t2"))
    paths = [f["path"] for f in manifest["files"]]
    assert paths == ["artifacts/deep/w.bin", "notes.txt", "responses.json"]
    by_path = {f["path"]: f for f in manifest["files"]}
    assert by_path["artifacts/deep/w.bin"]["size"] == 5000
    assert by_path["notes.txt"]["sha256"] == sha(out / "notes.txt")
    assert by_path["responses.json"]["sha256"] == sha(out / "responses.json")


def test_rewriting_replaces_both_files_whole(tmp_path):
    out = tmp_path / "t3"
    write_outputs(out, responses("t3", result={"long": "x" * 10_000}))
    manifest = write_outputs(out, responses("t3", status="FAILED", result=None))
    assert json.loads((out / "responses.json").read_text())["status"] == "FAILED"
    (entry,) = manifest["files"]
    assert entry["sha256"] == sha(out / "responses.json")
    assert json.loads((out / "manifest.json").read_text()) == manifest
