"""Turn a task's input (a local path or an http(s) URL) into a local path, downloading and
extracting each archive once into the worker's cache.

Only the orchestrator's origin and ARTIFACT_ALLOWED_HOSTS may be fetched (checked before
any connection; redirects are not followed), and the bearer token goes to the orchestrator
only. Every download is hashed and checked against what the caller and the server say.

An archive this worker made and uploaded itself is adopted (`adopt`): its URL resolves
to a local copy laid out as a download would give, hard-linked from the directory it was
made of, with no download.

Cache layout (safe for several processes at once: flock per entry, rename into place):
    <sha256>/         an extracted archive, or the one downloaded file
    <sha256>.json     {"kind": "archive"|"file", "path": what resolve returns, relative}
    urls/<sha256 of the URL>.json   {"sha256": ..., "url": ...}
    locks/, tmp/      lock files, downloads in progress
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import httpx

from flowmesh.errors import FlowMeshError
from worker.artifacts.extract import (
    ExtractError,
    ExtractLimits,
    UnsafeArchive,
    extract_archive,
    top_level,
)
from worker.outputs import file_sha256

log = logging.getLogger(__name__)

CHUNK = 1 << 20
ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".tar.zst", ".tar.zstd", ".tar")
DATA_SUFFIXES = frozenset({".jsonl", ".json", ".parquet", ".csv", ".tsv", ".txt", ".arrow"})
DEFAULT_PORTS = {"http": 80, "https": 443}
SHA256 = re.compile(r"^[0-9a-f]{64}$")
SHA_HEADER = "X-FlowMesh-Sha256"

Origin = tuple[str, str, int]


# httpx logs every request's whole URL at INFO, query and all (a presigned URL's
# signature): our own lines say what was fetched, shortened (`shown`).
logging.getLogger("httpx").setLevel(logging.WARNING)
logging.getLogger("httpcore").setLevel(logging.WARNING)


def shown(url: str) -> str:
    """A URL fit for a log line or an error a user reads: no user, password, query or
    fragment (a presigned URL's signature lives there)."""
    if "://" not in url:
        return url
    parts = urlsplit(url)
    host = parts.hostname or ""
    netloc = f"{host}:{parts.port}" if parts.port else host
    hidden = "?…" if parts.query or parts.fragment else ""
    return f"{parts.scheme}://{netloc}{parts.path}{hidden}"


class FetchError(FlowMeshError):
    """An input could not be had: not allowed, not there, not what was expected, or not
    safe to extract (then an UnsafeArchive is its __cause__). `retryable`: a network
    failure or a server error, which a later try may not meet."""

    def __init__(self, message: str, *, retryable: bool = False):
        super().__init__(message)
        self.retryable = retryable


@dataclass(frozen=True)
class FetchSettings:
    cache_dir: Path
    allowed_hosts: frozenset[str] = frozenset()  # "host" (any port) or "host:port"
    orchestrator_url: str | None = None
    token: str | None = None  # sent to the orchestrator's origin only
    limits: ExtractLimits = field(default_factory=ExtractLimits)
    timeout: float = 60


def _origin(url: str) -> Origin:
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in DEFAULT_PORTS or not parts.hostname:
        raise FetchError(f"cannot fetch {shown(url)!r}: only http:// and https:// URLs with a host")
    try:
        port = parts.port or DEFAULT_PORTS[scheme]
    except ValueError:
        raise FetchError(f"cannot fetch {shown(url)!r}: bad port") from None
    return scheme, parts.hostname.lower(), port


def _host_entry(entry: str) -> tuple[str, int | None]:
    entry = entry.strip().lower()
    parts = urlsplit(entry if "://" in entry else f"//{entry}")
    try:
        port = parts.port
    except ValueError:
        port = None
    return parts.hostname or entry, port


def is_archive_name(name: str) -> bool:
    return name.lower().endswith(ARCHIVE_SUFFIXES)


def _sniff_archive(path: Path) -> bool:
    with open(path, "rb") as f:
        head = f.read(262)
    return head[:2] == b"\x1f\x8b" or head[:4] == b"\x28\xb5\x2f\xfd" or head[257:262] == b"ustar"


def _write_json(path: Path, value: dict[str, Any]) -> None:
    part = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}")
    part.write_text(json.dumps(value))
    os.replace(part, path)


def _link_or_copy(src: str, dst: str) -> str:
    """A hard link where the file system allows one (no copy of a model's gigabytes), else
    a copy (the cache on another file system)."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)
    return dst


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


# A partial download or extraction this old was left by a process that died.
STALE_SEC = 3600


class ArtifactCache:
    def __init__(self, settings: FetchSettings):
        self.settings = settings
        self.root = Path(settings.cache_dir)
        self._orchestrator: Origin | None = None
        if settings.orchestrator_url:
            try:
                self._orchestrator = _origin(settings.orchestrator_url)
            except FetchError:
                raise FetchError(
                    f"ORCHESTRATOR_BASE_URL {settings.orchestrator_url!r} is not an http(s) URL"
                ) from None
        self._allowed = [_host_entry(h) for h in settings.allowed_hosts if h.strip()]
        self._sweep_stale()

    def _sweep_stale(self) -> None:
        """Downloads and extractions a killed process left half done (older than an hour:
        a live one's are younger, or still growing)."""
        cutoff = time.time() - STALE_SEC
        for leftover in [*self.root.glob("tmp/*.part"), *self.root.glob(".*.part")]:
            with contextlib.suppress(OSError):
                if leftover.stat().st_mtime < cutoff:
                    if leftover.is_dir():
                        shutil.rmtree(leftover, ignore_errors=True)
                    else:
                        leftover.unlink()

    def resolve(self, source: str, sha256: str | None = None) -> Path:
        expected = sha256.strip().lower() if sha256 else None
        if expected is not None and not SHA256.match(expected):
            raise FetchError(f"sha256 for {shown(source)!r} must be 64 hex digits, got {sha256!r}")
        scheme = urlsplit(source).scheme.lower() if "://" in source else ""
        if scheme in DEFAULT_PORTS:
            return self._url(source, expected)
        if scheme:
            raise FetchError(f"cannot fetch {shown(source)!r}: only local paths and http(s) URLs")
        return self._local(Path(source).expanduser(), expected)

    # -- local paths ---------------------------------------------------------------------
    def _local(self, path: Path, expected: str | None) -> Path:
        if path.is_dir():
            if expected is not None:
                raise FetchError(
                    f"{str(path)!r} is a directory: a sha256 checks a file or an archive"
                )
            return path
        if not path.is_file():
            raise FetchError(f"input {str(path)!r} does not exist")
        if not is_archive_name(path.name):
            if expected is not None and (digest := file_sha256(path)) != expected:
                raise FetchError(f"sha256 mismatch for {path}: expected {expected}, got {digest}")
            return path
        st = path.stat()
        # Hashing a large archive takes seconds: remember it for this very file version.
        key = f"file:{path.absolute()}:{st.st_size}:{st.st_mtime_ns}"
        found = self._known(key, expected)
        if found is not None:
            return found
        digest = file_sha256(path)
        if expected is not None and digest != expected:
            raise FetchError(f"sha256 mismatch for {path}: expected {expected}, got {digest}")
        result = self._store(digest, path, path.name, archive=True, keep_source=True)
        self._remember(key, digest)
        return result

    # -- URLs ----------------------------------------------------------------------------
    def check_allowed(self, url: str) -> Origin:
        origin = _origin(url)
        if origin == self._orchestrator:
            return origin
        _, host, port = origin
        if any(h == host and (p is None or p == port) for h, p in self._allowed):
            return origin
        orchestrator = (
            "none configured"
            if self._orchestrator is None
            else ("{}://{}:{}".format(*self._orchestrator))
        )
        raise FetchError(
            f"host {host!r} is not allowed: only the orchestrator ({orchestrator}) and "
            f"ARTIFACT_ALLOWED_HOSTS may be fetched from; set ARTIFACT_ALLOWED_HOSTS="
            f"{host}:{port} to allow it"
        )

    def _url(self, url: str, expected: str | None) -> Path:
        origin = self.check_allowed(url)  # before any connection
        key = f"url:{url}"
        found = self._known(key, expected)
        if found is not None:
            return found
        with self._url_lock(key):
            found = self._known(key, expected)  # another process may just have fetched it
            if found is not None:
                return found
            name = Path(unquote(urlsplit(url).path)).name or "download"
            part, digest = self._download(url, origin, expected)
            try:
                archive = is_archive_name(name) or (
                    Path(name).suffix.lower() not in DATA_SUFFIXES and _sniff_archive(part)
                )
                result = self._store(digest, part, name, archive=archive, keep_source=False)
            finally:
                part.unlink(missing_ok=True)
            self._remember(key, digest)
            return result

    def _download(self, url: str, origin: Origin, expected: str | None) -> tuple[Path, str]:
        headers = {}
        if self.settings.token and origin == self._orchestrator:
            headers["Authorization"] = f"Bearer {self.settings.token}"
        limit = self.settings.limits.max_bytes
        tmp = self.root / "tmp"
        tmp.mkdir(parents=True, exist_ok=True)
        part = tmp / f"{uuid.uuid4().hex}.part"
        digest = hashlib.sha256()
        size = 0
        started = time.monotonic()
        try:
            with (
                httpx.Client(follow_redirects=False, timeout=self.settings.timeout) as client,
                client.stream("GET", url, headers=headers) as reply,
            ):
                self._check_reply(url, reply)
                claimed = reply.headers.get(SHA_HEADER, "").strip().lower() or None
                with open(part, "wb") as out:
                    for chunk in reply.iter_bytes(CHUNK):
                        size += len(chunk)
                        if size > limit:
                            raise FetchError(
                                f"GET {shown(url)}: download passed max_bytes={limit} bytes"
                            )
                        digest.update(chunk)
                        out.write(chunk)
            got = digest.hexdigest()
            for what, want in (("the caller", expected), (f"the server's {SHA_HEADER}", claimed)):
                if want is not None and want != got:
                    raise FetchError(
                        f"sha256 mismatch for {shown(url)}: {what} expected {want}, "
                        f"downloaded {got}"
                    )
        except httpx.HTTPError as exc:
            part.unlink(missing_ok=True)
            raise FetchError(
                f"GET {shown(url)} failed: {type(exc).__name__}: {exc}", retryable=True
            ) from exc
        except BaseException:
            part.unlink(missing_ok=True)
            raise
        seconds = time.monotonic() - started
        log.info(
            "downloaded %s: %d bytes in %.2fs (%.1f MB/s), sha256 %s",
            shown(url),
            size,
            seconds,
            size / max(seconds, 1e-9) / 1e6,
            got[:12],
        )
        return part, got

    def _check_reply(self, url: str, reply: httpx.Response) -> None:
        if reply.is_redirect:
            where = reply.headers.get("location", "?")
            raise FetchError(
                f"GET {shown(url)}: HTTP {reply.status_code} redirect to {shown(where)!r} is "
                "not followed; use the final URL"
            )
        if reply.status_code != 200:
            body = b""
            for chunk in reply.iter_bytes():
                body += chunk
                if len(body) > 65536:
                    break
            detail: Any = body[:500].decode(errors="replace")
            with contextlib.suppress(ValueError):
                parsed = json.loads(body)
                if isinstance(parsed, dict) and "detail" in parsed:
                    detail = parsed["detail"]
            raise FetchError(
                f"GET {shown(url)} failed: HTTP {reply.status_code}: {detail}",
                retryable=reply.status_code >= 500 or reply.status_code == 429,
            )
        length = reply.headers.get("content-length")
        limit = self.settings.limits.max_bytes
        if length and length.isdigit() and int(length) > limit:
            raise FetchError(f"GET {shown(url)}: {length} bytes is over max_bytes={limit}")

    # -- archives this worker made --------------------------------------------------------
    def adopt(self, url: str, sha256: str, archive: Path, extracted: Path | None = None) -> None:
        """Record that `url` holds `archive` (content `sha256`), which this worker made and
        uploaded there, so that resolve(url) needs no download. `extracted`: the directory
        the archive was made of, linked into the cache as extracting the archive would lay
        it out; without it, the archive is extracted. A failure is logged, never raised:
        it costs a later download at most."""
        try:
            digest = sha256.strip().lower()
            if not SHA256.match(digest):
                raise FetchError(f"sha256 must be 64 hex digits, got {sha256!r}")
            key = f"url:{url}"
            with self._url_lock(key):  # as a download of this URL takes
                self._store(
                    digest, archive, archive.name, archive=True, keep_source=True, tree=extracted
                )
                self._remember(key, digest)
        except Exception as exc:  # the cache saves a download; the task must not fail for it
            log.warning(
                "could not keep %s in the artifact cache for %s: %s: %s",
                archive.name,
                shown(url),
                type(exc).__name__,
                exc,
            )
            return
        log.info("cached %s as %s (made here, no download)", shown(url), digest[:12])

    # -- the cache -----------------------------------------------------------------------
    def cached(self, digest: str) -> Path | None:
        """What resolve returns for content `digest`, if the cache holds it complete."""
        meta = _read_json(self.root / f"{digest}.json")
        if meta is None or not isinstance(meta.get("path"), str):
            return None
        path = self.root / meta["path"]
        return path if path.exists() else None

    def _known(self, key: str, expected: str | None) -> Path | None:
        if expected is not None and (found := self.cached(expected)) is not None:
            return found
        index = _read_json(self._index(key))
        digest = index.get("sha256") if index else None
        if not isinstance(digest, str) or (expected is not None and digest != expected):
            return None
        return self.cached(digest)

    def _remember(self, key: str, digest: str) -> None:
        path = self._index(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        _write_json(path, {"sha256": digest, "source": key})

    def _index(self, key: str) -> Path:
        return self.root / "urls" / f"{hashlib.sha256(key.encode()).hexdigest()}.json"

    def _store(
        self,
        digest: str,
        file: Path,
        name: str,
        *,
        archive: bool,
        keep_source: bool,
        tree: Path | None = None,
    ) -> Path:
        """Put content `digest` into the cache once: `file` extracted (an archive) or
        moved/copied in, or, given `tree` (the directory the archive `file` was made of),
        that tree linked in the same layout extracting `file` would give."""
        with self._lock(digest):
            found = self.cached(digest)
            if found is not None:
                return found
            entry = self.root / digest
            if entry.exists():  # a process died before writing the entry's .json
                shutil.rmtree(entry)
            started = time.monotonic()
            if tree is not None:
                result = _link_tree(tree, entry)
                log.info("linked %s into %s in %.2fs", tree, result, time.monotonic() - started)
            elif archive:
                try:
                    result = extract_archive(file, entry, self.settings.limits)
                except (ExtractError, UnsafeArchive) as exc:
                    raise FetchError(f"cannot extract {name}: {exc}") from exc
                log.info("extracted %s into %s in %.2fs", name, result, time.monotonic() - started)
            else:
                staging = Path(
                    tempfile.mkdtemp(prefix=f".{digest}.", suffix=".part", dir=self.root)
                )
                try:
                    (shutil.copyfile if keep_source else os.replace)(file, staging / name)
                    os.rename(staging, entry)
                except BaseException:
                    shutil.rmtree(staging, ignore_errors=True)
                    raise
                result = entry / name
            _write_json(
                self.root / f"{digest}.json",
                {
                    "kind": "archive" if archive else "file",
                    "path": str(result.relative_to(self.root)),
                },
            )
            return result

    def _url_lock(self, key: str) -> contextlib.AbstractContextManager[None]:
        return self._lock(f"url-{hashlib.sha256(key.encode()).hexdigest()}")

    @contextlib.contextmanager
    def _lock(self, name: str) -> Iterator[None]:
        locks = self.root / "locks"
        locks.mkdir(parents=True, exist_ok=True)
        fd = os.open(locks / f"{name}.lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing releases the lock


def _link_tree(src: Path, entry: Path) -> Path:
    """`src` laid out in the new directory `entry` as extracting its archive would
    (`entry/<src name>/...`, as create_archive names the members), staged beside it and
    renamed into place; returns what extract_archive would."""
    if not src.is_dir():
        raise FetchError(f"{src} is not a directory")
    staging = Path(tempfile.mkdtemp(prefix=f".{entry.name}.", suffix=".part", dir=entry.parent))
    try:
        shutil.copytree(src, staging / src.name, symlinks=True, copy_function=_link_or_copy)
        os.rename(staging, entry)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return top_level(entry)
