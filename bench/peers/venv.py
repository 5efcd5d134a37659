"""One virtual environment per benchmark peer, so its dependencies never clash with
FlowMesh's or another peer's.

    from bench.peers.venv import ensure_venv
    python = ensure_venv("celery", repo_root)   # -> <root>/.bench/venvs/celery/bin/python

The venv lives in `<root>/.bench/venvs/<peer>` and is built from
`<root>/bench/peers/requirements/<peer>.txt` with uv:

    uv venv --python 3.11 .bench/venvs/<peer>
    uv pip install --python .bench/venvs/<peer>/bin/python -r bench/peers/requirements/<peer>.txt

It is idempotent: the SHA-256 of the requirements file is stored in the venv
(`.bench-requirements.sha256`) after a successful install, and nothing is re-installed
while the file is unchanged. A changed file re-runs `uv pip install` into the same venv
(install, not sync: a package dropped from the file stays installed until the venv is
deleted; every file pins the full `uv pip freeze` set, so nothing else is ever missing).

Standard library only, so it can be imported from anywhere (also as a script:
`python bench/peers/venv.py celery [ROOT]` prints the python path).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

PYTHON_VERSION = "3.11"
HASH_FILE = ".bench-requirements.sha256"


def requirements_file(peer: str, root: Path) -> Path:
    return Path(root) / "bench" / "peers" / "requirements" / f"{peer}.txt"


def venv_dir(peer: str, root: Path) -> Path:
    return Path(root) / ".bench" / "venvs" / peer


def _uv() -> str:
    uv = shutil.which("uv")
    if uv is None:
        raise RuntimeError("uv is not on PATH (needed to build the benchmark peers' venvs)")
    return uv


def ensure_venv(peer: str, root: Path) -> Path:
    """Create or update the venv of `peer` under `root`; return its python's path."""
    root = Path(root).resolve()
    req = requirements_file(peer, root)
    if not req.is_file():
        raise FileNotFoundError(f"no requirements file for peer {peer!r}: {req}")
    venv = venv_dir(peer, root)
    python = venv / "bin" / "python"
    digest = hashlib.sha256(req.read_bytes()).hexdigest()
    stamp = venv / HASH_FILE
    if python.exists() and stamp.is_file() and stamp.read_text().strip() == digest:
        return python

    uv = _uv()
    # uv must not pick FlowMesh's own venv (VIRTUAL_ENV from `uv run`) for this one.
    env = {k: v for k, v in os.environ.items() if k != "VIRTUAL_ENV"}
    if not python.exists():  # missing, or a broken link to a removed interpreter
        venv.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            [uv, "venv", "--quiet", "--clear", "--python", PYTHON_VERSION, str(venv)],
            check=True,
            cwd=root,
            env=env,
        )
    stamp.unlink(missing_ok=True)  # an interrupted install must not look finished
    subprocess.run(
        [uv, "pip", "install", "--quiet", "--python", str(python), "-r", str(req)],
        check=True,
        cwd=root,
        env=env,
    )
    stamp.write_text(digest + "\n")
    return python


if __name__ == "__main__":
    if len(sys.argv) not in (2, 3):
        sys.exit("usage: python bench/peers/venv.py PEER [ROOT]")
    print(ensure_venv(sys.argv[1], Path(sys.argv[2]) if len(sys.argv) == 3 else Path.cwd()))
