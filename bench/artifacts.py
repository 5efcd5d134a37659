"""Archiving a checkpoint: the worker's methods against `tar | gzip -6` by hand.

    uv run --extra inference python -m bench.artifacts --size-mb 1024

On SIZE_MB of fp16 normal weights in a few shard files (about as compressible as a real
checkpoint), per method: archive MB/s (source bytes / seconds), ratio (source / archive),
extraction MB/s through the worker's safe extractor, and archive speed against the baseline.
MB = 2^20 bytes. The source is in the page cache for every method.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from worker.artifacts.archive import ArchiveSettings, create_archive
from worker.artifacts.extract import ExtractLimits, extract_archive

MiB = 1 << 20
SHARD_MB = 256
BASELINE = "tar+gzip -6"


def make_checkpoint(root: Path, size_mb: int) -> Path:
    model = root / "final_model"
    model.mkdir(parents=True)
    shards = max(1, -(-size_mb // SHARD_MB))
    rng = np.random.default_rng(0)
    left = size_mb * MiB // 2  # fp16 values
    for i in range(shards):
        count = min(left, SHARD_MB * MiB // 2)
        left -= count
        path = model / f"model-{i + 1:05d}-of-{shards:05d}.bin"
        with open(path, "wb") as f:
            for start in range(0, count, 16 * MiB):
                n = min(16 * MiB, count - start)
                (rng.standard_normal(n, dtype=np.float32) * 0.02).astype(np.float16).tofile(f)
    (model / "config.json").write_text(json.dumps({"hidden_size": 4096, "torch_dtype": "float16"}))
    return model


def _baseline(src: Path, out: Path) -> tuple[Path, float]:
    path = out / f"{src.name}.tar.gz"
    started = time.monotonic()
    subprocess.run(
        f"tar -C '{src.parent}' -cf - '{src.name}' | gzip -6 > '{path}'",
        shell=True,
        check=True,
    )
    return path, time.monotonic() - started


def run(size_mb: int = 1024, workdir: Path | None = None) -> list[dict[str, Any]]:
    scratch = Path(tempfile.mkdtemp(prefix="flowmesh-bench-artifacts-", dir=workdir))
    try:
        src = make_checkpoint(scratch / "src", size_mb)
        source = sum(p.stat().st_size for p in src.iterdir())
        methods: list[tuple[str, ArchiveSettings | None]] = [
            (BASELINE, None),
            ("tar+pigz -6", ArchiveSettings(compression_level=6)),
            ("python gzip -6", ArchiveSettings(use_pigz=False, compression_level=6)),
            ("tar+zstd -1", ArchiveSettings(format="zstd")),
            ("tar", ArchiveSettings(format="tar")),
        ]
        rows: list[dict[str, Any]] = []
        for i, (name, settings) in enumerate(methods):
            out = scratch / f"out-{i}"
            out.mkdir()
            if settings is None:
                path, seconds = _baseline(src, out)
                made = "tar|gzip"
            else:
                info = create_archive(src, out, settings)
                path, seconds, made = info.path, info.seconds, info.method
            size = path.stat().st_size
            started = time.monotonic()
            extract_archive(path, scratch / f"x-{i}", ExtractLimits())
            extract_seconds = time.monotonic() - started
            rows.append(
                {
                    "method": name,
                    "made_by": made,
                    "source_bytes": source,
                    "archive_bytes": size,
                    "archive_seconds": seconds,
                    "archive_mb_s": source / MiB / seconds,
                    "ratio": source / size,
                    "extract_seconds": extract_seconds,
                    "extract_mb_s": source / MiB / extract_seconds,
                }
            )
            shutil.rmtree(out)
            shutil.rmtree(scratch / f"x-{i}")
        base = rows[0]["archive_mb_s"]
        for row in rows:
            row["vs_baseline"] = row["archive_mb_s"] / base
        return rows
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def print_table(rows: list[dict[str, Any]], size_mb: int) -> None:
    cpus = len(os.sched_getaffinity(0))
    print(f"\n## Archiving {size_mb} MB of fp16 weights ({cpus} CPUs)")
    print(f"| method | archive MB/s | ratio | extract MB/s | archive speed vs {BASELINE} |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['method']} | {r['archive_mb_s']:,.1f} | {r['ratio']:.3f} | "
            f"{r['extract_mb_s']:,.1f} | {r['vs_baseline']:.2f}x |"
        )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--size-mb", type=int, default=1024, help="checkpoint size (default 1024)")
    p.add_argument("--workdir", type=Path, default=None, help="scratch space (default: TMPDIR)")
    p.add_argument("--json", type=Path, default=None, help="also write the rows here")
    args = p.parse_args(argv)
    rows = run(args.size_mb, args.workdir)
    print_table(rows, args.size_mb)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
