"""Archive a directory (`final_lora/` → `final_lora.tar.gz`) fast, and say how it was made.

gzip goes through `tar | pigz` when pigz is there (the seed README's MODEL_ARCHIVE_*
variables), else through Python's tarfile and zlib; zstd through `tar | zstd`. The archive
is hashed as it is written and appears under its final name only when it is complete.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import logging
import os
import shutil
import stat
import subprocess
import tarfile
import tempfile
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import IO, Any, Literal, cast

from flowmesh.config import env_bool, env_int, env_str
from flowmesh.errors import ConfigError, FlowMeshError

log = logging.getLogger(__name__)

Format = Literal["gzip", "zstd", "tar"]
FORMATS: tuple[Format, ...] = ("gzip", "zstd", "tar")
SUFFIXES: dict[Format, str] = {"gzip": ".tar.gz", "zstd": ".tar.zst", "tar": ".tar"}
CHUNK = 1 << 20

# Each reason to fall back to Python is logged once per process, not once per archive.
_fallbacks_logged: set[str] = set()


class ArchiveError(FlowMeshError):
    """The archive could not be made; the message says why (a tool's stderr included)."""


@dataclass(frozen=True)
class ArchiveSettings:
    use_pigz: bool = True
    compression_level: int = 6
    pigz_threads: int | None = None
    pigz_bin: str = "pigz"
    tar_bin: str = "tar"
    format: Format = "gzip"
    zstd_level: int = 1

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> ArchiveSettings:
        threads = env_int(env, "MODEL_ARCHIVE_PIGZ_THREADS", 0, minimum=1, maximum=1024)
        fmt = env_str(env, "MODEL_ARCHIVE_FORMAT", "gzip").lower()
        if fmt not in FORMATS:
            raise ConfigError(
                f"MODEL_ARCHIVE_FORMAT must be one of {', '.join(FORMATS)}, got {fmt!r}"
            )
        return cls(
            use_pigz=env_bool(env, "MODEL_ARCHIVE_USE_PIGZ", True),
            compression_level=env_int(
                env, "MODEL_ARCHIVE_COMPRESSION_LEVEL", 6, minimum=0, maximum=9
            ),
            pigz_threads=threads or None,
            pigz_bin=env_str(env, "MODEL_ARCHIVE_PIGZ_BIN", "pigz"),
            tar_bin=env_str(env, "MODEL_ARCHIVE_TAR_BIN", "tar"),
            format=cast(Format, fmt),
            zstd_level=env_int(env, "MODEL_ARCHIVE_ZSTD_LEVEL", 1, minimum=1, maximum=19),
        )


@dataclass(frozen=True)
class ArchiveInfo:
    path: Path
    name: str  # the archive's file name, e.g. final_lora.tar.gz
    size: int
    sha256: str
    format: Format
    method: str  # "tar+pigz", "python", "tar+zstd" or "tar"
    seconds: float
    source_bytes: int


class _HashingWriter:
    """A file that hashes and counts what is written to it (tarfile and gzip write here)."""

    def __init__(self, raw: IO[bytes]):
        self.raw = raw
        self.digest = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> int:
        self.digest.update(data)
        self.size += len(data)
        return self.raw.write(data)

    def flush(self) -> None:
        self.raw.flush()


def create_archive(src_dir: Path, dest_dir: Path, settings: ArchiveSettings) -> ArchiveInfo:
    src_dir = Path(src_dir).absolute()
    if not src_dir.is_dir():
        raise ArchiveError(f"cannot archive {src_dir}: not a directory")
    if dest_dir.absolute().resolve().is_relative_to(src_dir.resolve()):
        raise ArchiveError(f"cannot archive {src_dir} into itself ({dest_dir})")
    source_bytes = _check_source(src_dir)
    name = src_dir.name + SUFFIXES[settings.format]
    dest_dir.mkdir(parents=True, exist_ok=True)
    final = dest_dir / name
    part = dest_dir / f".{name}.{uuid.uuid4().hex[:8]}.part"
    started = time.monotonic()
    try:
        with open(part, "wb") as raw:
            out = _HashingWriter(raw)
            method = _write(src_dir, out, settings)
        os.replace(part, final)
    except BaseException:
        part.unlink(missing_ok=True)
        raise
    return ArchiveInfo(
        path=final,
        name=name,
        size=out.size,
        sha256=out.digest.hexdigest(),
        format=settings.format,
        method=method,
        seconds=time.monotonic() - started,
        source_bytes=source_bytes,
    )


def _write(src: Path, out: _HashingWriter, settings: ArchiveSettings) -> str:
    tar = shutil.which(settings.tar_bin)
    if settings.format == "zstd":
        zstd = shutil.which("zstd")
        if zstd is None:
            raise ArchiveError(
                "MODEL_ARCHIVE_FORMAT=zstd needs the zstd binary on PATH "
                "(apt-get install zstd), or set MODEL_ARCHIVE_FORMAT=gzip"
            )
        if tar is None:
            raise ArchiveError(
                f"MODEL_ARCHIVE_FORMAT=zstd needs tar: {settings.tar_bin!r} not found"
            )
        _pipeline(
            [_tar_command(tar, src), [zstd, f"-{settings.zstd_level}", "-T0", "-q", "-c"]], out
        )
        return "tar+zstd"
    if settings.format == "tar":
        if tar is not None:
            _pipeline([_tar_command(tar, src)], out)
            return "tar"
        _fallback(f"tar binary {settings.tar_bin!r} not found")
        _python_tar(src, out, None)
        return "python"
    pigz = shutil.which(settings.pigz_bin) if settings.use_pigz else None
    if pigz is not None and tar is not None:
        threads = settings.pigz_threads or len(os.sched_getaffinity(0))
        pigz_cmd = [pigz, f"-{settings.compression_level}", "-p", str(threads), "-c"]
        _pipeline([_tar_command(tar, src), pigz_cmd], out)
        return "tar+pigz"
    if not settings.use_pigz:
        _fallback("MODEL_ARCHIVE_USE_PIGZ is off")
    elif pigz is None:
        _fallback(f"pigz binary {settings.pigz_bin!r} not found (MODEL_ARCHIVE_PIGZ_BIN)")
    else:
        _fallback(f"tar binary {settings.tar_bin!r} not found (MODEL_ARCHIVE_TAR_BIN)")
    _python_tar(src, out, settings.compression_level)
    return "python"


def _fallback(reason: str) -> None:
    if reason not in _fallbacks_logged:
        _fallbacks_logged.add(reason)
        log.warning("archiving with Python's tarfile and zlib (single core): %s", reason)


def _check_source(src: Path) -> int:
    """Refuse what would not extract safely elsewhere; return the bytes of regular files."""
    total = 0
    for root, dirs, files in os.walk(src):
        for entry in (*dirs, *files):
            path = os.path.join(root, entry)
            st = os.lstat(path)
            if stat.S_ISLNK(st.st_mode):
                target = os.readlink(path)
                resolved = os.path.normpath(os.path.join(root, target))
                if os.path.isabs(target) or os.path.commonpath([resolved, src]) != str(src):
                    raise ArchiveError(
                        f"cannot archive {src}: symlink {os.path.relpath(path, src)!r} "
                        f"is absolute or points outside it ({target!r})"
                    )
            elif stat.S_ISREG(st.st_mode):
                total += st.st_size
            elif not stat.S_ISDIR(st.st_mode):
                raise ArchiveError(
                    f"cannot archive {src}: {os.path.relpath(path, src)!r} is not a regular "
                    "file, directory or symlink"
                )
    return total


@lru_cache(maxsize=8)
def _is_gnu_tar(tar: str) -> bool:
    try:
        proc = subprocess.run([tar, "--version"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return "GNU tar" in proc.stdout


def _tar_command(tar: str, src: Path) -> list[str]:
    # GNU tar can sort members and drop the builder's user names; others archive as they go.
    extra = ["--sort=name", "--owner=0", "--group=0", "--numeric-owner"] if _is_gnu_tar(tar) else []
    return [tar, *extra, "-C", str(src.parent), "-cf", "-", "--", src.name]


def _pipeline(commands: list[list[str]], out: _HashingWriter) -> None:
    """Run `a | b | ...`, streaming the last one's stdout through `out`."""
    procs: list[subprocess.Popen[bytes]] = []
    with contextlib.ExitStack() as stack:
        errors = [stack.enter_context(tempfile.TemporaryFile()) for _ in commands]
        stack.callback(_reap, procs)
        stdin: IO[bytes] | None = None
        for cmd, err in zip(commands, errors, strict=True):
            proc = subprocess.Popen(cmd, stdin=stdin, stdout=subprocess.PIPE, stderr=err)
            if stdin is not None:
                stdin.close()  # the next process owns it now; a dead reader gives tar SIGPIPE
            procs.append(proc)
            stdin = proc.stdout
        assert stdin is not None
        while chunk := stdin.read(CHUNK):
            out.write(chunk)
        for proc, cmd, err in zip(procs, commands, errors, strict=True):
            if proc.wait() != 0:
                err.seek(0)
                detail = err.read().decode(errors="replace").strip()
                raise ArchiveError(
                    f"{Path(cmd[0]).name} exited with {proc.returncode}: {detail or 'no stderr'}"
                )


def _reap(procs: list[subprocess.Popen[bytes]]) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()


def _python_tar(src: Path, out: _HashingWriter, level: int | None) -> None:
    def anonymous(info: tarfile.TarInfo) -> tarfile.TarInfo:
        info.uid = info.gid = 0
        info.uname = info.gname = ""
        return info

    with contextlib.ExitStack() as stack:
        sink: Any = out
        if level is not None:
            sink = stack.enter_context(
                gzip.GzipFile(filename="", mode="wb", fileobj=sink, compresslevel=level, mtime=0)
            )
        # tarfile sorts directory listings itself; bufsize sets the size of its writes.
        tar = stack.enter_context(tarfile.open(fileobj=sink, mode="w|", bufsize=CHUNK))
        tar.add(src, arcname=src.name, filter=anonymous)
