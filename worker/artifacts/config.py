"""The worker's artifact settings, in one picklable value its executor processes get.

Built once from the environment (`ArtifactsConfig.from_env`) by the worker; a child
process receives it at its start and makes its own download cache from it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from flowmesh.config import Env, env_bytes, env_int, env_list, env_str
from worker.artifacts.archive import ArchiveSettings
from worker.artifacts.extract import ExtractLimits
from worker.artifacts.fetch import FetchSettings
from worker.artifacts.upload import UploadSettings


@dataclass(frozen=True)
class ArtifactsConfig:
    archive: ArchiveSettings
    fetch: FetchSettings
    # None without ORCHESTRATOR_BASE_URL: a task whose output goes over HTTP cannot run.
    upload: UploadSettings | None

    @classmethod
    def from_env(cls, env: Env, results_dir: Path) -> ArtifactsConfig:
        base_url = env_str(env, "ORCHESTRATOR_BASE_URL").rstrip("/")
        token = env_str(env, "FLOWMESH_WORKER_TOKEN") or None
        cache = env_str(env, "ARTIFACT_CACHE_DIR")
        default = ExtractLimits()
        limits = ExtractLimits(
            max_bytes=env_bytes(env, "ARTIFACT_MAX_EXTRACT_BYTES") or default.max_bytes,
            max_files=env_int(env, "ARTIFACT_MAX_EXTRACT_FILES", default.max_files, minimum=1),
        )
        fetch = FetchSettings(
            cache_dir=Path(cache).resolve() if cache else results_dir / ".artifact-cache",
            allowed_hosts=frozenset(h.lower() for h in env_list(env, "ARTIFACT_ALLOWED_HOSTS")),
            orchestrator_url=base_url or None,
            token=token,
            limits=limits,
        )
        upload = UploadSettings.from_env(env) if base_url else None
        return cls(archive=ArchiveSettings.from_env(env), fetch=fetch, upload=upload)

    def describe(self) -> dict[str, object]:
        """What the worker record shows: where uploads go and at what rate (no secrets)."""
        out: dict[str, object] = {
            "archive_format": self.archive.format,
            "archive_pigz": self.archive.use_pigz,
            "allowed_hosts": sorted(self.fetch.allowed_hosts),
        }
        if self.upload is not None:
            out["orchestrator"] = urlsplit(self.upload.base_url).netloc
            out.update(self.upload.describe())
        return out
