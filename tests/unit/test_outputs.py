"""A task's directory: the attempt that counts on top, every other attempt beside it."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from worker.outputs import attempt_dir, demote, finalise, top_attempt


def responses(task_id: str = "t1", attempt: int = 1, **extra: object) -> dict:
    return {
        "task_id": task_id,
        "attempt": attempt,
        "status": "DONE",
        "result": {"x": attempt},
        **extra,
    }


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def manifest(task_dir: Path) -> dict:
    return json.loads((task_dir / "manifest.json").read_text())


def test_fresh_directory_manifest_lists_responses_with_its_real_hash(tmp_path):
    out = tmp_path / "results" / "t1"  # RESULTS_DIR itself does not exist yet
    assert finalise(out, responses(), counts=True)
    assert json.loads((out / "responses.json").read_text())["result"] == {"x": 1}
    m = manifest(out)
    assert m["attempt"] == 1
    assert m["files"] == [
        {
            "path": "responses.json",
            "size": (out / "responses.json").stat().st_size,
            "sha256": sha(out / "responses.json"),
        }
    ]


def test_the_attempts_artifacts_and_logs_move_up_and_are_in_the_manifest(tmp_path):
    out = tmp_path / "t2"
    work = attempt_dir(out, 1)
    (work / "artifacts" / "deep").mkdir(parents=True)
    (work / "artifacts" / "deep" / "w.bin").write_bytes(b"\x00" * 5000)
    (work / "logs").mkdir()
    (work / "logs" / "executor.log").write_text("loading\n")
    (work / "artifacts" / "link").symlink_to("/etc/hostname")  # never listed nor followed
    finalise(out, responses("t2"), counts=True)
    assert (out / "artifacts" / "deep" / "w.bin").stat().st_size == 5000
    assert not (out / "attempts").exists()  # nothing else of attempt 1 was left there
    by_path = {f["path"]: f for f in manifest(out)["files"]}
    assert sorted(by_path) == ["artifacts/deep/w.bin", "logs/executor.log", "responses.json"]
    assert by_path["logs/executor.log"]["sha256"] == sha(out / "logs" / "executor.log")


def test_a_later_attempt_takes_the_top_and_the_earlier_one_is_kept_beside_it(tmp_path):
    out = tmp_path / "t3"
    (attempt_dir(out, 1) / "logs").mkdir(parents=True)
    (attempt_dir(out, 1) / "logs" / "executor.log").write_text("attempt 1 failed\n")
    finalise(out, responses("t3", 1, status="FAILED", result=None), counts=True)
    (attempt_dir(out, 2) / "artifacts").mkdir(parents=True)
    (attempt_dir(out, 2) / "artifacts" / "model.bin").write_bytes(b"w")
    finalise(out, responses("t3", 2), counts=True)
    assert json.loads((out / "responses.json").read_text())["attempt"] == 2
    assert manifest(out)["attempt"] == 2
    assert manifest(out)["earlier_attempts"] == [1]
    assert not (out / "logs").exists()  # attempt 2 wrote no log: attempt 1's is not on top
    earlier = attempt_dir(out, 1)
    assert json.loads((earlier / "responses.json").read_text())["status"] == "FAILED"
    assert (earlier / "logs" / "executor.log").read_text() == "attempt 1 failed\n"


def test_an_attempt_that_does_not_count_never_overwrites_the_one_that_does(tmp_path):
    out = tmp_path / "t4"
    finalise(out, responses("t4", 2), counts=True)
    # A superseded attempt 1 finishing late, and a cancelled attempt 3:
    assert not finalise(out, responses("t4", 1), counts=True)
    assert not finalise(out, responses("t4", 3, status="FAILED"), counts=False)
    assert top_attempt(out) == 2
    assert json.loads((out / "responses.json").read_text())["result"] == {"x": 2}
    assert json.loads((attempt_dir(out, 1) / "responses.json").read_text())["attempt"] == 1
    assert json.loads((attempt_dir(out, 3) / "manifest.json").read_text())["attempt"] == 3


def test_demote_moves_only_that_attempts_files_aside(tmp_path):
    out = tmp_path / "t5"
    finalise(out, responses("t5", 1), counts=True)
    assert not demote(out, 2)
    assert top_attempt(out) == 1
    assert demote(out, 1)
    assert top_attempt(out) is None
    assert json.loads((attempt_dir(out, 1) / "responses.json").read_text())["attempt"] == 1


def test_the_same_attempt_rewrites_its_own_files_whole(tmp_path):
    out = tmp_path / "t6"
    finalise(out, responses("t6", result={"long": "x" * 10_000}), counts=True)
    finalise(out, responses("t6", status="FAILED", result=None), counts=True)
    assert json.loads((out / "responses.json").read_text())["status"] == "FAILED"
    (entry,) = manifest(out)["files"]
    assert entry["sha256"] == sha(out / "responses.json")


def test_a_stop_recorded_after_the_attempt_wrote_its_own_directory_leaves_no_contradiction(
    tmp_path,
):
    # A timeout lands after the attempt's outcome went into attempts/1 as not counting;
    # the worker then finalises the timeout, which counts: one story, on top.
    out = tmp_path / "t7"
    (attempt_dir(out, 1) / "logs").mkdir(parents=True)
    (attempt_dir(out, 1) / "logs" / "executor.log").write_text("working\n")
    finalise(out, responses("t7", 1), counts=False)
    finalise(out, responses("t7", 1, status="FAILED", result=None), counts=True)
    assert json.loads((out / "responses.json").read_text())["status"] == "FAILED"
    assert (out / "logs" / "executor.log").read_text() == "working\n"
    assert not attempt_dir(out, 1).exists()


def test_files_left_on_top_without_a_manifest_are_kept_aside_not_taken_or_deleted(tmp_path):
    # A crash while an attempt was finalising left its files on top, unrecorded.
    out = tmp_path / "t8"
    (out / "artifacts").mkdir(parents=True)
    (out / "artifacts" / "half.bin").write_bytes(b"x")
    finalise(out, responses("t8", 2), counts=True)
    assert [f["path"] for f in manifest(out)["files"]] == ["responses.json"]
    (kept,) = (out / "attempts" / "orphaned").iterdir()
    assert (kept / "artifacts" / "half.bin").read_bytes() == b"x"
