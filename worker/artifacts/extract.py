"""Extract a downloaded archive safely: nothing outside the target, no surprises, bounded size.

The archive streams (gzip through Python's zlib, zstd through `zstd -dc`) into tarfile with
its "data" filter plus our own checks, into a temporary directory next to the target that
is renamed into place once complete, so a reader never sees half an extraction.
"""

from __future__ import annotations

import contextlib
import os
import posixpath
import shutil
import subprocess
import tarfile
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, cast

from flowmesh.errors import FlowMeshError

CHUNK = 1 << 20
GZIP_MAGIC = b"\x1f\x8b"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
# What a tar stream may hold besides the members' data: a header and padding per member
# (long names add a header or two), read-ahead of one chunk, and some headroom.
_OVERHEAD_PER_MEMBER = 4 * 512
_SLACK = 4 * CHUNK


class ExtractError(FlowMeshError):
    """The archive could not be read (corrupt, truncated, a tool missing) or placed."""


class UnsafeArchive(FlowMeshError, ValueError):
    """A member breaks a safety rule; the message names the member and the rule."""


@dataclass(frozen=True)
class ExtractLimits:
    max_bytes: int = 200 * 2**30
    max_files: int = 100_000


def detect_format(path: Path) -> str:
    """ "gzip", "zstd" or "tar" (anything else is read as tar and fails there)."""
    with open(path, "rb") as f:
        head = f.read(4)
    if head.startswith(GZIP_MAGIC):
        return "gzip"
    if head == ZSTD_MAGIC:
        return "zstd"
    return "tar"


def extract_archive(archive: Path, dest: Path, limits: ExtractLimits) -> Path:
    """Extract `archive` into the new directory `dest`; return its single top-level
    directory if it has exactly one, else `dest`."""
    archive, dest = Path(archive), Path(dest)
    if dest.exists():
        raise ExtractError(f"cannot extract {archive.name} into {dest}: it already exists")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent))
    try:
        _extract_into(archive, tmp, limits)
        try:
            os.rename(tmp, dest)
        except OSError as exc:
            raise ExtractError(
                f"cannot move the extraction of {archive.name} to {dest}: {exc}"
            ) from exc
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return top_level(dest)


def top_level(root: Path) -> Path:
    entries = list(root.iterdir())
    if len(entries) == 1 and entries[0].is_dir() and not entries[0].is_symlink():
        return entries[0]
    return root


def _extract_into(archive: Path, tmp: Path, limits: ExtractLimits) -> None:
    fmt = detect_format(archive)
    tool: subprocess.Popen[bytes] | None = None
    with contextlib.ExitStack() as stack:
        errors = stack.enter_context(tempfile.TemporaryFile())
        raw = stack.enter_context(open(archive, "rb"))
        source: Any = raw
        command: list[str] | None = None
        if fmt == "zstd":
            binary = shutil.which("zstd")
            if binary is None:
                raise ExtractError(f"{archive.name} is zstd-compressed: install zstd to read it")
            command = [binary, "-dc", "-q"]
        elif fmt == "gzip":
            # Python's zlib inflates as fast as `pigz -dc` (inflate is single-threaded).
            source = _GunzipReader(raw)
        if command is not None:
            tool = subprocess.Popen(command, stdin=raw, stdout=subprocess.PIPE, stderr=errors)
            stack.callback(_stop, tool)
            source = tool.stdout
        checker = _Checker(limits)
        reader = cast(IO[bytes], _LimitedReader(source, checker))
        try:
            with tarfile.open(fileobj=reader, mode="r|", bufsize=CHUNK) as tar:
                tar.copybufsize = CHUNK  # type: ignore[attr-defined]  # 16 KiB by default
                tar.extractall(tmp, filter=checker)
        except (tarfile.TarError, EOFError, zlib.error) as exc:
            detail = ""
            if tool is not None:
                # A corrupt stream shows up in tarfile as a truncated one: say what the tool saw.
                _stop(tool)
                errors.seek(0)
                said = errors.read().decode(errors="replace").strip()
                detail = f" (zstd: {said})" if said and tool.returncode != 0 else ""
            raise ExtractError(f"cannot read {archive.name}: {exc}{detail}") from exc


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.stdout is not None:
        proc.stdout.close()  # a zstd still writing the stream's tail gets EPIPE and exits
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


class _Checker:
    """A tarfile filter: our rules and limits first (clear messages), then the data filter."""

    def __init__(self, limits: ExtractLimits):
        self.limits = limits
        self.files = 0
        self.bytes = 0
        # Symlinks extracted so far (normalised names): nothing may be written through one.
        self.symlinks: set[str] = set()

    def _through_symlink(self, name: str) -> str | None:
        """The symlink member an entry's path would pass through, if any."""
        parts = posixpath.normpath(name).split("/")
        for i in range(1, len(parts)):
            prefix = "/".join(parts[:i])
            if prefix in self.symlinks:
                return prefix
        return None

    def __call__(self, member: tarfile.TarInfo, path: str) -> tarfile.TarInfo:
        name = member.name

        def refuse(rule: str) -> UnsafeArchive:
            return UnsafeArchive(f"unsafe archive member {name!r}: {rule}")

        self.files += 1
        if self.files > self.limits.max_files:
            raise refuse(f"more than max_files={self.limits.max_files} members")
        if name.startswith("/") or os.path.isabs(name):
            raise refuse("absolute path")
        if ".." in name.replace("\\", "/").split("/"):
            raise refuse("path with a '..' component leaves the archive root")
        if member.ischr() or member.isblk() or member.isfifo():
            raise refuse("device or fifo members are not allowed")
        if member.issym() or member.islnk():
            kind = "symlink" if member.issym() else "hard link"
            target = member.linkname
            if target.startswith("/") or os.path.isabs(target):
                raise refuse(f"{kind} target {target!r} is absolute")
            # No '..' in a link target at all: with links in the way, where '..' leads is
            # not what its text says (a chain of links resolves out of the root even when
            # each step looks inside; CVE-2025-4517 bypasses the data filter that way).
            if ".." in target.replace("\\", "/").split("/"):
                raise refuse(f"{kind} target {target!r} has a '..' component")
            base = posixpath.dirname(name) if member.issym() else ""
            via = self._through_symlink(posixpath.join(base, target))
            if via is not None:
                raise refuse(f"{kind} target {target!r} passes through the symlink {via!r}")
        via = self._through_symlink(name)
        if via is not None:
            raise refuse(f"its path passes through the symlink {via!r}")
        if member.issym():
            self.symlinks.add(posixpath.normpath(name))
        # Every type counts: tarfile writes members of unknown types as regular files.
        self.bytes += member.size
        if self.bytes > self.limits.max_bytes:
            raise refuse(f"total size {self.bytes} bytes exceeds max_bytes={self.limits.max_bytes}")
        try:
            return tarfile.data_filter(member, path)
        except tarfile.FilterError as exc:
            raise refuse(str(exc)) from exc


class _LimitedReader:
    """Counts the uncompressed tar stream against what the members seen so far account
    for, so data hidden from the member checks (a huge pax or long-name header, which
    tarfile reads into memory) stops within a few MiB."""

    def __init__(self, source: IO[bytes], checker: _Checker):
        self.source = source
        self.checker = checker
        self.count = 0

    def read(self, size: int = -1) -> bytes:
        data = self.source.read(size if size >= 0 else CHUNK)
        self.count += len(data)
        accounted = self.checker.bytes + self.checker.files * _OVERHEAD_PER_MEMBER + _SLACK
        if self.count > accounted:
            raise UnsafeArchive(
                f"unsafe archive: its tar stream passed {self.count} bytes while its members "
                f"account for {accounted - _SLACK} (data hidden in headers)"
            )
        return data


class _GunzipReader:
    """gzip (one member or several, as pigz and cat may make) decompressed as it is read."""

    def __init__(self, raw: IO[bytes]):
        self.raw = raw
        self.inflate = zlib.decompressobj(31)
        self.buffer = b""
        self.done = False

    def read(self, size: int = -1) -> bytes:
        size = size if size > 0 else CHUNK
        while len(self.buffer) < size and not self.done:
            self._fill(size)
        data, self.buffer = self.buffer[:size], self.buffer[size:]
        return data

    def _fill(self, size: int) -> None:
        if self.inflate.unconsumed_tail:
            self.buffer += self.inflate.decompress(self.inflate.unconsumed_tail, size)
            return
        if self.inflate.eof:
            rest = self.inflate.unused_data
            if not rest:
                rest = self.raw.read(CHUNK)
            if not rest:
                self.done = True
                return
            self.inflate = zlib.decompressobj(31)
            self.buffer += self.inflate.decompress(rest, size)
            return
        compressed = self.raw.read(CHUNK)
        if not compressed:
            raise EOFError("the gzip stream is truncated")
        # max_length bounds what one call inflates: a bomb cannot blow up memory here.
        self.buffer += self.inflate.decompress(compressed, size)
