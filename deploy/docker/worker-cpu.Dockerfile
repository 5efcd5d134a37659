# syntax=docker/dockerfile:1
# A FlowMesh worker for machines without a GPU: the inference and training extras.
#
# The build context is the repository root, not this folder:
#   docker build -f deploy/docker/worker-cpu.Dockerfile -t flowmesh-worker-cpu .
# BuildKit reads worker-cpu.Dockerfile.dockerignore beside this file (<Dockerfile>.dockerignore
# wins over a .dockerignore at the context's root), which lets through only what is copied below.
#
# PyPI's torch brings its CUDA libraries (~4 GB) even where there is no GPU, and the lock pins
# that torch, so this image carries them too (the README's "Two commands on a fresh machine"
# says how to swap in the CPU-only torch by hand).

ARG PYTHON_IMAGE=python:3.11-slim-bookworm
ARG UV_IMAGE=ghcr.io/astral-sh/uv:0.13.9

FROM ${UV_IMAGE} AS uv

FROM ${PYTHON_IMAGE} AS build
COPY --from=uv /uv /usr/local/bin/uv
# One virtual environment at a fixed path, bytecode compiled here once, files copied out of
# the cache mount (they cannot be hard-linked into a layer), and the image's own Python.
ENV UV_PROJECT_ENVIRONMENT=/opt/flowmesh \
    UV_COMPILE_BYTECODE=1 \
    UV_LINK_MODE=copy \
    UV_PYTHON_DOWNLOADS=never \
    UV_PYTHON=/usr/local/bin/python3.11
WORKDIR /src
# Dependencies first, from the lock alone: this layer is rebuilt only when uv.lock changes.
RUN --mount=type=cache,target=/root/.cache/uv \
    --mount=type=bind,source=pyproject.toml,target=pyproject.toml \
    --mount=type=bind,source=uv.lock,target=uv.lock \
    uv sync --frozen --no-dev --no-install-project --no-editable --extra inference --extra training
COPY pyproject.toml uv.lock README.md ./
COPY flowmesh/ flowmesh/
COPY orchestrator/ orchestrator/
COPY worker/ worker/
COPY executors/ executors/
# The project as a wheel (--no-editable): the runtime stage takes the environment alone.
RUN --mount=type=cache,target=/root/.cache/uv \
    uv sync --frozen --no-dev --no-editable --extra inference --extra training

FROM ${PYTHON_IMAGE}
# pigz and zstd: model archives are written with `tar | pigz` (or zstd); tini: PID 1 that
# passes SIGTERM to the worker and reaps what its executor processes leave behind.
RUN apt-get update \
    && apt-get install -y --no-install-recommends pigz zstd tini \
    && rm -rf /var/lib/apt/lists/*
RUN groupadd --system --gid 10001 flowmesh \
    && useradd --system --uid 10001 --gid flowmesh --create-home \
       --home-dir /var/lib/flowmesh --shell /usr/sbin/nologin flowmesh
COPY --from=build /opt/flowmesh /opt/flowmesh
# The console scripts are run straight from the environment, not through `uv run`: uv would
# sync the project's default `dev` group at every start.
ENV PATH=/opt/flowmesh/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    RESULTS_DIR=/var/lib/flowmesh/results \
    HF_HOME=/var/lib/flowmesh/huggingface
# Numeric, so that Kubernetes' runAsNonRoot can check it.
USER 10001:10001
WORKDIR /var/lib/flowmesh
# RESULTS_DIR (task outputs, the artifact cache) and the Hugging Face cache: mount volumes here.
# Made here, owned by flowmesh, so that new Docker volumes mounted on them are too.
RUN mkdir -p /var/lib/flowmesh/results /var/lib/flowmesh/huggingface
# No HEALTHCHECK: a worker serves no port. Its liveness is its heartbeat in Redis, which the
# orchestrator watches (a worker whose beats stop has its tasks re-placed), and a worker
# that cannot go on exits, so the container's restart policy applies.
ENTRYPOINT ["tini", "--"]
# SIGTERM: stop taking work, let running tasks finish within WORKER_DRAIN_TIMEOUT_SEC (default
# 60 s), hand back the rest; give the container longer than that to stop.
CMD ["worker"]
