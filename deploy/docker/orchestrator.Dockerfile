# syntax=docker/dockerfile:1
# The FlowMesh orchestrator: the HTTP API and the scheduler. It needs no extra (no torch).
#
# The build context is the repository root, not this folder:
#   docker build -f deploy/docker/orchestrator.Dockerfile -t flowmesh-orchestrator .
# BuildKit reads orchestrator.Dockerfile.dockerignore beside this file (<Dockerfile>.dockerignore
# wins over a .dockerignore at the context's root), which lets through only what is copied below.

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
    uv sync --frozen --no-dev --no-install-project --no-editable
COPY pyproject.toml uv.lock README.md ./
COPY flowmesh/ flowmesh/
COPY orchestrator/ orchestrator/
COPY worker/ worker/
COPY executors/ executors/
# The project as a wheel (--no-editable): the runtime stage takes the environment alone.
RUN --mount=type=cache,target=/root/.cache/uv \
    uv sync --frozen --no-dev --no-editable

FROM ${PYTHON_IMAGE}
RUN groupadd --system --gid 10001 flowmesh \
    && useradd --system --uid 10001 --gid flowmesh --create-home \
       --home-dir /var/lib/flowmesh --shell /usr/sbin/nologin flowmesh
COPY --from=build /opt/flowmesh /opt/flowmesh
# The console scripts are run straight from the environment, not through `uv run`: uv would
# sync the project's default `dev` group at every start (and the process it starts would not
# be PID 1, which is who `docker stop` and Kubernetes send SIGTERM to).
ENV PATH=/opt/flowmesh/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    FLOWMESH_RESULTS_DIR=/var/lib/flowmesh/results
# Numeric, so that Kubernetes' runAsNonRoot can check it.
USER 10001:10001
WORKDIR /var/lib/flowmesh
# Uploaded artifacts (checkpoints, model archives): mount a volume here to keep them. Made
# here, owned by flowmesh, so that a new Docker volume mounted on it is too.
RUN mkdir -p /var/lib/flowmesh/results
EXPOSE 8000
# /healthz needs no token; it answers 503 while Redis is unreachable. The port is the one in
# CMD: change both together. (No curl in the slim image: Python's urllib does.)
HEALTHCHECK --interval=15s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=4)"]
# Without FLOWMESH_API_TOKEN the orchestrator refuses to listen on 0.0.0.0, and says why.
CMD ["orchestrator", "--host", "0.0.0.0", "--port", "8000"]
