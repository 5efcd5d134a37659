"""The upload client's settings and its throttled body (no network: see
tests/e2e/test_results_files.py for uploads to a real orchestrator)."""

from __future__ import annotations

import hashlib
import os
import pickle

import pytest

from flowmesh.errors import ConfigError
from worker.artifacts.upload import (
    CHUNK_BYTES,
    THROTTLED_CHUNK_BYTES,
    UploadFailed,
    UploadSettings,
    _body,
    file_sha256,
)

BASE = {"ORCHESTRATOR_BASE_URL": "http://orchestrator:8000/"}


def test_from_env_reads_the_readme_variables():
    s = UploadSettings.from_env(
        {
            **BASE,
            "FLOWMESH_WORKER_TOKEN": "secret-worker-token",
            "WORKER_NETWORK_BANDWIDTH_BYTES_PER_SEC": "10Mi",
            "WORKER_UPLOAD_RETRIES": "2",
            "WORKER_UPLOAD_TIMEOUT_SEC": "5",
        }
    )
    assert s == UploadSettings(
        base_url="http://orchestrator:8000",
        token="secret-worker-token",
        bandwidth_bytes_per_sec=10 * 2**20,
        retries=2,
        timeout=5.0,
    )
    assert "secret-worker-token" not in repr(s)
    assert s.describe() == {
        "bandwidth_bytes_per_sec": 10 * 2**20,
        "upload_retries": 2,
        "upload_auth": True,
    }
    assert pickle.loads(pickle.dumps(s)) == s  # it travels to executor processes


def test_defaults_and_zero_bandwidth_mean_no_throttle():
    s = UploadSettings.from_env({**BASE, "WORKER_NETWORK_BANDWIDTH_BYTES_PER_SEC": "0"})
    assert (s.token, s.bandwidth_bytes_per_sec, s.retries, s.timeout) == (None, None, 20, 60.0)


@pytest.mark.parametrize(
    ("env", "variable"),
    [
        ({"ORCHESTRATOR_BASE_URL": ""}, "ORCHESTRATOR_BASE_URL"),
        ({"ORCHESTRATOR_BASE_URL": "orchestrator:8000"}, "ORCHESTRATOR_BASE_URL"),
        ({**BASE, "WORKER_NETWORK_BANDWIDTH_BYTES_PER_SEC": "fast"}, "WORKER_NETWORK_BANDWIDTH"),
        ({**BASE, "WORKER_UPLOAD_RETRIES": "-1"}, "WORKER_UPLOAD_RETRIES"),
        ({**BASE, "WORKER_UPLOAD_TIMEOUT_SEC": "0"}, "WORKER_UPLOAD_TIMEOUT_SEC"),
    ],
)
def test_a_bad_value_names_its_variable(env, variable):
    with pytest.raises(ConfigError, match=variable):
        UploadSettings.from_env(env)


def test_body_yields_the_file_in_chunks_sized_for_the_throttle(tmp_path):
    path = tmp_path / "f.bin"
    data = os.urandom(3 * CHUNK_BYTES + 5)
    path.write_bytes(data)
    plain = list(_body(path, len(data), None))
    assert b"".join(plain) == data
    assert max(map(len, plain)) == CHUNK_BYTES
    throttled = list(_body(path, len(data), 10**12))  # a rate that never sleeps
    assert b"".join(throttled) == data
    assert max(map(len, throttled)) == THROTTLED_CHUNK_BYTES
    assert file_sha256(path) == hashlib.sha256(data).hexdigest()


def test_body_fails_when_the_file_shrinks(tmp_path):
    path = tmp_path / "f.bin"
    path.write_bytes(b"short")
    with pytest.raises(UploadFailed, match="shrank"):
        list(_body(path, 100, None))
