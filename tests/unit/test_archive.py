"""Archives made with each method, read back by the safe extractor; hostile archives refused."""

from __future__ import annotations

import gzip
import hashlib
import io
import logging
import os
import shutil
import tarfile
import zlib
from pathlib import Path

import pytest

from flowmesh.errors import ConfigError
from worker.artifacts.archive import ArchiveError, ArchiveSettings, create_archive
from worker.artifacts.extract import (
    ExtractError,
    ExtractLimits,
    UnsafeArchive,
    detect_format,
    extract_archive,
)

needs_pigz = pytest.mark.skipif(shutil.which("pigz") is None, reason="pigz is not installed")
needs_zstd = pytest.mark.skipif(shutil.which("zstd") is None, reason="zstd is not installed")


def make_tree(root: Path) -> Path:
    src = root / "final_lora"
    (src / "sub").mkdir(parents=True)
    (src / "adapter_config.json").write_text('{"r": 8}')
    (src / "weights.bin").write_bytes(os.urandom(300_000))
    (src / "sub" / "notes.txt").write_text(
        "\n".join(f"line {i} {i * i % 997}" for i in range(20_000))
    )
    (src / "empty").mkdir()
    (src / "link.txt").symlink_to("sub/notes.txt")
    return src


def tree(root: Path) -> dict[str, bytes | str]:
    out: dict[str, bytes | str] = {}
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        if path.is_symlink():
            out[rel] = f"-> {os.readlink(path)}"
        elif path.is_file():
            out[rel] = path.read_bytes()
        else:
            out[rel] = "dir"
    return out


METHODS = [
    pytest.param(ArchiveSettings(), "tar+pigz", ".tar.gz", marks=needs_pigz, id="pigz"),
    pytest.param(ArchiveSettings(use_pigz=False), "python", ".tar.gz", id="python"),
    pytest.param(
        ArchiveSettings(pigz_bin="/nonexistent/pigz"), "python", ".tar.gz", id="no-pigz-binary"
    ),
    pytest.param(
        ArchiveSettings(format="zstd"), "tar+zstd", ".tar.zst", marks=needs_zstd, id="zstd"
    ),
    pytest.param(ArchiveSettings(format="tar"), "tar", ".tar", id="tar"),
    pytest.param(
        ArchiveSettings(format="tar", tar_bin="/nonexistent/tar"), "python", ".tar", id="python-tar"
    ),
]


@pytest.mark.parametrize(("settings", "method", "suffix"), METHODS)
def test_round_trip(tmp_path: Path, settings: ArchiveSettings, method: str, suffix: str) -> None:
    src = make_tree(tmp_path / "src")
    info = create_archive(src, tmp_path / "out", settings)

    assert info.method == method
    assert info.path == tmp_path / "out" / f"final_lora{suffix}"
    assert info.name == info.path.name
    assert info.size == info.path.stat().st_size
    assert info.sha256 == hashlib.sha256(info.path.read_bytes()).hexdigest()
    assert info.source_bytes == sum(
        p.stat().st_size for p in src.rglob("*") if p.is_file() and not p.is_symlink()
    )
    assert [p.name for p in (tmp_path / "out").iterdir()] == [info.path.name]  # no temp left
    with tarfile.open(info.path) if suffix != ".tar.zst" else _zstd_tar(info.path) as tar:
        names = tar.getnames()
    assert all(n == "final_lora" or n.startswith("final_lora/") for n in names)
    assert names == sorted(names) or method == "python"  # python's order is depth-first

    top = extract_archive(info.path, tmp_path / "x", ExtractLimits())
    assert top == tmp_path / "x" / "final_lora"
    assert tree(top) == tree(src)


def _zstd_tar(path: Path) -> tarfile.TarFile:
    import subprocess

    data = subprocess.run(["zstd", "-dc", str(path)], capture_output=True, check=True).stdout
    return tarfile.open(fileobj=io.BytesIO(data))


def test_fallback_says_why_once(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    src = make_tree(tmp_path / "src")
    settings = ArchiveSettings(pigz_bin=str(tmp_path / "no-such-pigz"))
    with caplog.at_level(logging.WARNING, logger="worker.artifacts.archive"):
        create_archive(src, tmp_path / "a", settings)
        create_archive(src, tmp_path / "b", settings)
    said = [r.getMessage() for r in caplog.records if "no-such-pigz" in r.getMessage()]
    assert len(said) == 1 and "not found" in said[0]


@pytest.mark.parametrize(
    "settings",
    [
        pytest.param(ArchiveSettings(), marks=needs_pigz, id="pigz"),
        pytest.param(ArchiveSettings(use_pigz=False), id="python"),
    ],
)
def test_compression_level_is_honoured(tmp_path: Path, settings: ArchiveSettings) -> None:
    src = tmp_path / "final_model"
    src.mkdir()
    text = "\n".join(f"{i} {i * 7919 % 10007} token_{i % 1013} weight" for i in range(200_000))
    (src / "data.txt").write_text(text)
    fast = create_archive(
        src, tmp_path / "l1", ArchiveSettings(**{**vars(settings), "compression_level": 1})
    )
    best = create_archive(
        src, tmp_path / "l9", ArchiveSettings(**{**vars(settings), "compression_level": 9})
    )
    assert best.size < fast.size * 0.9


def test_pigz_thread_count_and_failure_stderr(tmp_path: Path) -> None:
    src = make_tree(tmp_path / "src")
    fake = tmp_path / "pigz"
    fake.write_text("#!/bin/sh\ncat >/dev/null\necho 'pigz: out of cheese' >&2\nexit 3\n")
    fake.chmod(0o755)
    with pytest.raises(ArchiveError, match="pigz exited with 3: pigz: out of cheese"):
        create_archive(src, tmp_path / "out", ArchiveSettings(pigz_bin=str(fake)))
    assert list((tmp_path / "out").iterdir()) == []


def test_symlink_out_of_source_is_refused(tmp_path: Path) -> None:
    src = make_tree(tmp_path / "src")
    (src / "escape").symlink_to("/etc/passwd")
    with pytest.raises(ArchiveError, match="symlink 'escape' is absolute or points outside"):
        create_archive(src, tmp_path / "out", ArchiveSettings())
    (src / "escape").unlink()
    (src / "up").symlink_to("../../elsewhere")
    with pytest.raises(ArchiveError, match="symlink 'up' is absolute or points outside"):
        create_archive(src, tmp_path / "out", ArchiveSettings())
    (src / "up").unlink()
    with pytest.raises(ArchiveError, match="into itself"):
        create_archive(src, src / "archives", ArchiveSettings())


def test_missing_zstd_binary_is_a_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = make_tree(tmp_path / "src")
    monkeypatch.setenv("PATH", str(tmp_path / "empty-path"))
    with pytest.raises(ArchiveError, match="needs the zstd binary"):
        create_archive(src, tmp_path / "out", ArchiveSettings(format="zstd"))


# -- MODEL_ARCHIVE_* ---------------------------------------------------------------------
def test_settings_from_env() -> None:
    assert ArchiveSettings.from_env({}) == ArchiveSettings()
    settings = ArchiveSettings.from_env(
        {
            "MODEL_ARCHIVE_USE_PIGZ": "false",
            "MODEL_ARCHIVE_COMPRESSION_LEVEL": "9",
            "MODEL_ARCHIVE_PIGZ_THREADS": "4",
            "MODEL_ARCHIVE_PIGZ_BIN": "/opt/pigz",
            "MODEL_ARCHIVE_TAR_BIN": "gtar",
            "MODEL_ARCHIVE_FORMAT": "ZSTD",
        }
    )
    assert settings == ArchiveSettings(
        use_pigz=False,
        compression_level=9,
        pigz_threads=4,
        pigz_bin="/opt/pigz",
        tar_bin="gtar",
        format="zstd",
    )
    for word, value in (("1", True), ("yes", True), ("0", False), ("no", False)):
        assert ArchiveSettings.from_env({"MODEL_ARCHIVE_USE_PIGZ": word}).use_pigz is value


@pytest.mark.parametrize(
    ("name", "value", "allowed"),
    [
        ("MODEL_ARCHIVE_USE_PIGZ", "maybe", "1/true"),
        ("MODEL_ARCHIVE_COMPRESSION_LEVEL", "10", "between 0 and 9"),
        ("MODEL_ARCHIVE_COMPRESSION_LEVEL", "fast", "integer"),
        ("MODEL_ARCHIVE_PIGZ_THREADS", "0", "between 1"),
        ("MODEL_ARCHIVE_FORMAT", "bz2", "gzip, zstd, tar"),
    ],
)
def test_bad_env_value_names_variable(name: str, value: str, allowed: str) -> None:
    with pytest.raises(ConfigError) as err:
        ArchiveSettings.from_env({name: value})
    assert name in str(err.value) and repr(value) in str(err.value) and allowed in str(err.value)


# -- hostile archives --------------------------------------------------------------------
def hostile(path: Path, *members: tuple[tarfile.TarInfo, bytes]) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for info, data in members:
            info.size = len(data) if info.isreg() else 0
            tar.addfile(info, io.BytesIO(data) if info.isreg() else None)
    return path


def member(name: str, kind: bytes = tarfile.REGTYPE, link: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = link
    info.mode = 0o644
    return info


def assert_nothing_left(out: Path, outside: Path) -> None:
    assert list(out.iterdir()) == []  # no dest, no temp dir next to it
    assert list(outside.iterdir()) == [], f"written outside: {list(outside.iterdir())}"


HOSTILE = [
    ("dotdot", [("ok/a.txt", tarfile.REGTYPE, ""), ("ok/../../x", tarfile.REGTYPE, "")], "'..'"),
    ("absolute", [("/etc/passwd", tarfile.REGTYPE, "")], "absolute path"),
    ("symlink-abs", [("ok/etc", tarfile.SYMTYPE, "/etc")], "symlink target '/etc' is absolute"),
    ("symlink-up", [("ok/up", tarfile.SYMTYPE, "../../outside")], "has a '..' component"),
    # Each link looks harmless alone; through them, writes land elsewhere (CVE-2025-4517's
    # shape): refused whatever Python's data filter would make of it.
    (
        "write-through-symlink",
        [
            ("ok/sub", tarfile.DIRTYPE, ""),
            ("ok/l", tarfile.SYMTYPE, "sub"),
            ("ok/l/x", tarfile.REGTYPE, ""),
        ],
        "passes through the symlink 'ok/l'",
    ),
    (
        "symlink-via-symlink",
        [("ok/a", tarfile.SYMTYPE, "b"), ("ok/c", tarfile.SYMTYPE, "a/d")],
        "passes through the symlink 'ok/a'",
    ),
    ("symlink-inside-dotdot", [("ok/d/l", tarfile.SYMTYPE, "../e")], "has a '..' component"),
    ("hardlink-abs", [("ok/pw", tarfile.LNKTYPE, "/etc/passwd")], "hard link target '/etc/passwd'"),
    ("hardlink-up", [("ok/pw", tarfile.LNKTYPE, "../outside/x")], "hard link target"),
    ("device", [("ok/null", tarfile.CHRTYPE, "")], "device or fifo"),
    ("fifo", [("ok/pipe", tarfile.FIFOTYPE, "")], "device or fifo"),
]


@pytest.mark.parametrize(("case", "members", "rule"), HOSTILE, ids=[h[0] for h in HOSTILE])
def test_hostile_members_are_refused(
    tmp_path: Path, case: str, members: list[tuple[str, bytes, str]], rule: str
) -> None:
    archive = hostile(
        tmp_path / f"{case}.tar.gz",
        *[(member(name, kind, link), b"evil") for name, kind, link in members],
    )
    out, outside = tmp_path / "out", tmp_path / "outside"
    (out / "deep").mkdir(parents=True)
    outside.mkdir()
    with pytest.raises(UnsafeArchive) as err:
        extract_archive(archive, out / "deep" / "dest", ExtractLimits())
    assert rule in str(err.value)
    assert "unsafe archive member" in str(err.value)
    assert_nothing_left(out / "deep", outside)
    assert not (out / "x").exists() and not (tmp_path / "x").exists()


def test_too_many_files(tmp_path: Path) -> None:
    archive = hostile(tmp_path / "many.tar.gz", *[(member(f"d/{i}"), b"x") for i in range(11)])
    (tmp_path / "out").mkdir()
    with pytest.raises(UnsafeArchive, match="more than max_files=10 members"):
        extract_archive(archive, tmp_path / "out" / "dest", ExtractLimits(max_files=10))
    assert list((tmp_path / "out").iterdir()) == []


def test_total_size_over_limit(tmp_path: Path) -> None:
    blob = b"\0" * 600_000
    archive = hostile(tmp_path / "big.tar.gz", *[(member(f"d/{i}"), blob) for i in range(3)])
    (tmp_path / "out").mkdir()
    with pytest.raises(UnsafeArchive, match=r"'d/1': total size 1200000 bytes exceeds max_bytes"):
        extract_archive(archive, tmp_path / "out" / "dest", ExtractLimits(max_bytes=1_000_000))
    assert list((tmp_path / "out").iterdir()) == []


def zero_bomb(path: Path, claimed: int) -> Path:
    """A real .tar.gz of one member of `claimed` zero bytes, made in a blink: after a full
    flush deflate restarts, so every MiB of zeros compresses to the very same bytes."""
    info = member("bomb/zeros.bin")
    info.size = claimed
    header = info.tobuf(tarfile.GNU_FORMAT)
    mib = 1 << 20
    z = zlib.compressobj(9, zlib.DEFLATED, -15)
    with open(path, "wb") as f:
        f.write(gzip.compress(b"")[:10])  # a gzip header
        f.write(z.compress(header) + z.flush(zlib.Z_FULL_FLUSH))
        block = z.compress(b"\0" * mib) + z.flush(zlib.Z_FULL_FLUSH)
        for _ in range(claimed // mib):
            f.write(block)
        f.write(z.flush())
        # The trailer's CRC is wrong: nothing may read that far.
        f.write((0).to_bytes(4, "little") + (claimed & 0xFFFFFFFF).to_bytes(4, "little"))
    return path


def test_zero_bomb_is_refused_before_filling_the_disk(tmp_path: Path) -> None:
    bomb = zero_bomb(tmp_path / "bomb.tar.gz", 10 * 2**30)
    assert bomb.stat().st_size < 20 * 2**20
    (tmp_path / "out").mkdir()
    with pytest.raises(
        UnsafeArchive, match=r"'bomb/zeros.bin': total size \d+ bytes exceeds max_bytes"
    ):
        extract_archive(bomb, tmp_path / "out" / "dest", ExtractLimits(max_bytes=50 * 2**20))
    assert list((tmp_path / "out").iterdir()) == []


def test_data_hidden_in_a_header_is_refused(tmp_path: Path) -> None:
    # tarfile reads a pax header whole into memory before any filter sees its member: the
    # stream count stops it within a few MiB.
    info = member("ok/a.txt")
    info.pax_headers = {"comment": "x" * (16 * 2**20)}
    path = tmp_path / "pax.tar.gz"
    with (
        gzip.open(path, "wb", compresslevel=1) as gz,
        tarfile.open(fileobj=gz, mode="w:", format=tarfile.PAX_FORMAT) as tar,
    ):
        tar.addfile(info, io.BytesIO(b""))
    (tmp_path / "out").mkdir()
    with pytest.raises(UnsafeArchive, match="data hidden in headers"):
        extract_archive(path, tmp_path / "out" / "dest", ExtractLimits())
    assert list((tmp_path / "out").iterdir()) == []


def test_corrupt_archive_is_an_extract_error(tmp_path: Path) -> None:
    src = make_tree(tmp_path / "src")
    info = create_archive(src, tmp_path / "a", ArchiveSettings(use_pigz=False))
    broken = tmp_path / "broken.tar.gz"
    broken.write_bytes(info.path.read_bytes()[: info.size // 2])
    (tmp_path / "out").mkdir()
    with pytest.raises(ExtractError, match=r"broken\.tar\.gz"):
        extract_archive(broken, tmp_path / "out" / "dest", ExtractLimits())
    assert list((tmp_path / "out").iterdir()) == []


def test_existing_destination_is_not_touched(tmp_path: Path) -> None:
    src = make_tree(tmp_path / "src")
    info = create_archive(src, tmp_path / "a", ArchiveSettings(format="tar"))
    (tmp_path / "dest").mkdir()
    (tmp_path / "dest" / "keep").write_text("mine")
    with pytest.raises(ExtractError, match="already exists"):
        extract_archive(info.path, tmp_path / "dest", ExtractLimits())
    assert (tmp_path / "dest" / "keep").read_text() == "mine"


def test_several_top_level_entries_return_dest(tmp_path: Path) -> None:
    archive = hostile(tmp_path / "flat.tar.gz", (member("a.txt"), b"a"), (member("b.txt"), b"b"))
    assert extract_archive(archive, tmp_path / "dest", ExtractLimits()) == tmp_path / "dest"
    assert detect_format(archive) == "gzip"
