# syntax=docker/dockerfile:1
# A FlowMesh worker for NVIDIA GPUs: the inference and training extras on a CUDA base image.
#
# The build context is the repository root, not this folder:
#   docker build -f deploy/docker/worker-cuda.Dockerfile -t flowmesh-worker-cuda .
# BuildKit reads worker-cuda.Dockerfile.dockerignore beside this file (<Dockerfile>.dockerignore
# wins over a .dockerignore at the context's root), which lets through only what is copied below.
#
# torch from PyPI carries its own CUDA 13 runtime libraries; the base image gives the rest:
# the settings that have the NVIDIA container toolkit mount the host's driver and NVML
# (NVIDIA_VISIBLE_DEVICES, NVIDIA_DRIVER_CAPABILITIES) and its check that the driver is new
# enough for CUDA 13 (R580 or later). Ubuntu 24.04 ships no Python 3.11, so uv installs one.

ARG CUDA_IMAGE=nvidia/cuda:13.0.2-base-ubuntu24.04
ARG UV_IMAGE=ghcr.io/astral-sh/uv:0.13.9

FROM ${UV_IMAGE} AS uv

FROM ${CUDA_IMAGE} AS build
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/*
COPY --from=uv /uv /usr/local/bin/uv
# One virtual environment at a fixed path, on a Python uv installs at a fixed path (both are
# copied as they are into the runtime stage), bytecode compiled here once, files copied out
# of the cache mount (they cannot be hard-linked into a layer).
ENV UV_PROJECT_ENVIRONMENT=/opt/flowmesh \
    UV_PYTHON_INSTALL_DIR=/opt/python \
    UV_PYTHON_PREFERENCE=only-managed \
    UV_PYTHON=3.11 \
    UV_COMPILE_BYTECODE=1 \
    UV_LINK_MODE=copy
RUN uv python install 3.11
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

FROM ${CUDA_IMAGE}
# pigz and zstd: model archives are written with `tar | pigz` (or zstd); tini: PID 1 that
# passes SIGTERM to the worker and reaps what its executor processes (torchrun) leave behind.
RUN apt-get update \
    && apt-get install -y --no-install-recommends pigz zstd tini ca-certificates \
    && rm -rf /var/lib/apt/lists/*
RUN groupadd --system --gid 10001 flowmesh \
    && useradd --system --uid 10001 --gid flowmesh --create-home \
       --home-dir /var/lib/flowmesh --shell /usr/sbin/nologin flowmesh
COPY --from=build /opt/python /opt/python
COPY --from=build /opt/flowmesh /opt/flowmesh
# The console scripts are run straight from the environment, not through `uv run` (no uv
# here): uv would sync the project's default `dev` group at every start.
ENV PATH=/opt/flowmesh/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    RESULTS_DIR=/var/lib/flowmesh/results \
    HF_HOME=/var/lib/flowmesh/huggingface \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility
# Numeric, so that Kubernetes' runAsNonRoot can check it.
USER 10001:10001
WORKDIR /var/lib/flowmesh
# RESULTS_DIR (task outputs, checkpoints, the artifact cache) and the Hugging Face cache:
# mount volumes here. Made here, owned by flowmesh, so that new Docker volumes are too.
RUN mkdir -p /var/lib/flowmesh/results /var/lib/flowmesh/huggingface
# No HEALTHCHECK: a worker serves no port. Its liveness is its heartbeat in Redis, which the
# orchestrator watches (a worker whose beats stop has its tasks re-placed), and a worker
# that cannot go on exits, so the container's restart policy applies.
ENTRYPOINT ["tini", "--"]
# SIGTERM: stop taking work, let running tasks finish within WORKER_DRAIN_TIMEOUT_SEC (default
# 60 s), hand back the rest; give the container longer than that to stop. Without
# WORKER_GPUS the worker takes the GPUs it is given (CUDA_VISIBLE_DEVICES, else all it sees).
CMD ["worker"]
