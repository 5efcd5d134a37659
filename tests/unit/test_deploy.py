"""deploy/: the Kubernetes manifests against Kubernetes' schemas, compose and the Dockerfiles
parsed, and what they set (variables, commands, flags, ports, probes, grace periods, metric
names) checked against what the code reads. Offline: no cluster, no Docker."""

from __future__ import annotations

import ast
import json
import math
import re
import shlex
import tomllib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from flowmesh.spec import Requirements, parse_bytes
from orchestrator import main as orchestrator_main
from orchestrator.auth import OPEN_PATHS
from orchestrator.metrics import resource_class
from orchestrator.settings import OrchestratorSettings
from worker import main as worker_main
from worker.settings import WorkerSettings

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
DOCKER = DEPLOY / "docker"
# An older release many clusters still run, and the newest kubernetes-validate knows: an API
# that is too new, or one since removed, fails one of them.
K8S_VERSIONS = ["1.30", kubernetes_validate.latest_version()]
# API groups of the custom resources in deploy/k8s (no schema in kubernetes-validate):
# checked by hand below.
CRD_GROUPS = {"keda.sh"}
NAMESPACE = "flowmesh"

PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
SCRIPTS = set(PYPROJECT["project"]["scripts"])
EXTRAS = set(PYPROJECT["project"]["optional-dependencies"])
ORCHESTRATOR_ENV = {name for name, _ in orchestrator_main.ENVIRONMENT}
WORKER_ENV = {name for name, _ in worker_main.ENVIRONMENT}
# What the images set for other programs than FlowMesh.
THIRD_PARTY_ENV = {
    "PATH",
    "PYTHONUNBUFFERED",
    "HF_HOME",
    "NVIDIA_VISIBLE_DEVICES",
    "NVIDIA_DRIVER_CAPABILITIES",
}


# -- reading deploy/ --------------------------------------------------------------------------


def k8s_objects() -> list[tuple[str, dict[str, Any]]]:
    return [
        (path.name, doc)
        for path in sorted(K8S.glob("*.yaml"))
        for doc in yaml.safe_load_all(path.read_text())
        if doc
    ]


def objects_of(kind: str) -> list[dict[str, Any]]:
    return [doc for _, doc in k8s_objects() if doc["kind"] == kind]


def is_crd(doc: dict[str, Any]) -> bool:
    return doc["apiVersion"].split("/")[0] in CRD_GROUPS


def the_secret() -> dict[str, str]:
    [secret] = objects_of("Secret")
    data: dict[str, str] = secret["stringData"]
    return data


@dataclass
class Container:
    """A FlowMesh container in a workload: which program it runs, and where it is."""

    where: str
    pod: dict[str, Any]
    spec: dict[str, Any]

    @property
    def program(self) -> str:
        return str(self.spec["command"][0])


def flowmesh_containers() -> Iterator[Container]:
    """Every container of a Deployment that runs a FlowMesh console script (Redis does not)."""
    for doc in objects_of("Deployment"):
        pod = doc["spec"]["template"]["spec"]
        for c in pod["containers"]:
            if c.get("command", [""])[0] in SCRIPTS:
                yield Container(f"{doc['metadata']['name']}/{c['name']}", pod, c)


def kube_env(c: Container) -> dict[str, str]:
    """The container's environment as the kubelet would set it."""
    secret = the_secret()
    limits = c.spec.get("resources", {}).get("limits", {})
    env: dict[str, str] = {}
    for var in c.spec.get("env", []):
        if "value" in var:
            env[var["name"]] = var["value"]
        elif "secretKeyRef" in var["valueFrom"]:
            env[var["name"]] = secret[var["valueFrom"]["secretKeyRef"]["key"]]
        else:
            ref = var["valueFrom"]["resourceFieldRef"]
            quantity = str(limits[ref["resource"].removeprefix("limits.")])
            cpu = ref["resource"] == "limits.cpu"
            env[var["name"]] = str(cores(quantity) if cpu else parse_bytes(quantity))
    return env


def cores(quantity: str) -> int:
    """A CPU quantity as a resourceFieldRef with the default divisor gives it: rounded up."""
    return math.ceil(float(quantity[:-1]) / 1000 if quantity.endswith("m") else float(quantity))


def named_port(pod: dict[str, Any], port: int | str) -> int:
    if isinstance(port, int):
        return port
    ports = [p for c in pod["containers"] for p in c.get("ports", [])]
    [number] = [p["containerPort"] for p in ports if p.get("name") == port]
    return int(number)


def compose() -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    return doc


COMPOSE_TOKENS = {
    "FLOWMESH_API_TOKEN": "compose-api-token-0123456789",
    "FLOWMESH_WORKER_TOKEN": "compose-worker-token-0123456789",
}


def compose_env(service: dict[str, Any]) -> dict[str, str]:
    """A service's environment with `${VAR:?message}` filled from COMPOSE_TOKENS."""
    env = service.get("environment", {})
    assert isinstance(env, Mapping), "write compose environments as mappings"
    resolved = {}
    for name, value in env.items():
        text = str(value)
        for var in re.findall(r"\$\{(\w+)", text):
            assert var in COMPOSE_TOKENS, f"compose reads ${var}: add it to .env.example too"
        resolved[name] = re.sub(r"\$\{(\w+)[^}]*\}", lambda m: COMPOSE_TOKENS[m[1]], text)
    return resolved


def seconds(duration: str | int) -> float:
    """A compose duration: 90s, 1m30s, 330s."""
    if isinstance(duration, int):
        return float(duration)
    parts = re.fullmatch(r"(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?", duration)
    assert parts and duration, f"cannot read duration {duration!r}"
    h, m, s = (int(p or 0) for p in parts.groups())
    return float(h * 3600 + m * 60 + s)


@dataclass
class Dockerfile:
    name: str
    instructions: list[tuple[str, str]]  # (INSTRUCTION, arguments), continuations joined

    def args(self, instruction: str) -> list[str]:
        return [a for i, a in self.instructions if i == instruction]

    def final_stage(self) -> list[tuple[str, str]]:
        last = max(n for n, (i, _) in enumerate(self.instructions) if i == "FROM")
        return self.instructions[last:]


def dockerfile(name: str) -> Dockerfile:
    text = (DOCKER / f"{name}.Dockerfile").read_text()
    lines = [line for line in text.splitlines() if not line.lstrip().startswith("#")]
    joined = re.sub(r"\\\n", " ", "\n".join(lines))
    instructions = []
    for line in joined.splitlines():
        if line.strip():
            instruction, _, rest = line.strip().partition(" ")
            instructions.append((instruction.upper(), " ".join(rest.split())))
    return Dockerfile(name, instructions)


DOCKERFILES = ["orchestrator", "worker-cpu", "worker-cuda"]


def metric_families() -> dict[str, set[str]]:
    """The families orchestrator/metrics.py exports, with their label names: each
    `GaugeMetricFamily("flowmesh_…", labels=[…])`, and the ones named in a comprehension,
    `GaugeMetricFamily(f"flowmesh_worker_{name}", …) for name, help in (("slots", …), …)`."""
    tree = ast.parse((ROOT / "orchestrator" / "metrics.py").read_text())

    def family(call: ast.Call) -> tuple[ast.expr, set[str]] | None:
        if not (isinstance(call.func, ast.Name) and call.func.id == "GaugeMetricFamily"):
            return None
        labels = next((k.value for k in call.keywords if k.arg == "labels"), None)
        names = ast.literal_eval(labels) if labels is not None else []
        return call.args[0], set(names)

    found: dict[str, set[str]] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and (f := family(node)) and isinstance(f[0], ast.Constant):
            found[str(f[0].value)] = f[1]
        if isinstance(node, ast.DictComp) and isinstance(node.value, ast.Call):
            f = family(node.value)
            if f and isinstance(f[0], ast.JoinedStr) and isinstance(f[0].values[0], ast.Constant):
                prefix = str(f[0].values[0].value)
                for row in ast.literal_eval(node.generators[0].iter):
                    found[f"{prefix}{row[0]}"] = f[1]
    return found


# -- Kubernetes: schemas and structure --------------------------------------------------------


def test_every_manifest_is_valid_against_the_kubernetes_schemas():
    objects = k8s_objects()
    assert {doc["kind"] for _, doc in objects} >= {
        "Namespace",
        "Secret",
        "StatefulSet",
        "Service",
        "Deployment",
        "ScaledObject",
    }
    for name, doc in objects:
        if is_crd(doc):
            continue
        for version in K8S_VERSIONS:
            try:
                # strict: an unknown field (a typo, a field in the wrong place) fails too.
                kubernetes_validate.validate(doc, version, strict=True)
            except kubernetes_validate.ValidationError as exc:
                path = ".".join(str(p) for p in exc.path)
                where = f"{name}: {doc['kind']}/{doc['metadata']['name']}"
                pytest.fail(f"{where} (Kubernetes {version}): {path}: {exc.message}")


def test_every_object_is_in_the_flowmesh_namespace_and_names_are_unique():
    seen = set()
    for name, doc in k8s_objects():
        meta = doc["metadata"]
        if doc["kind"] != "Namespace":
            assert meta.get("namespace") == NAMESPACE, f"{name}: {meta['name']}"
        key = (doc["kind"], meta["name"])
        assert key not in seen, f"{name}: {key} defined twice"
        seen.add(key)
    assert [doc["metadata"]["name"] for doc in objects_of("Namespace")] == [NAMESPACE]


def test_selectors_services_and_secret_references_line_up():
    workloads = objects_of("Deployment") + objects_of("StatefulSet")
    for w in workloads:
        labels = w["spec"]["template"]["metadata"]["labels"]
        assert w["spec"]["selector"]["matchLabels"].items() <= labels.items(), w["metadata"]
    for svc in objects_of("Service"):
        selector = svc["spec"]["selector"].items()
        [pod] = [
            w["spec"]["template"]
            for w in workloads
            if selector <= w["spec"]["template"]["metadata"]["labels"].items()
        ]
        for port in svc["spec"]["ports"]:
            named_port(pod["spec"], port["targetPort"])  # the name exists in the pod
    [redis] = objects_of("StatefulSet")
    assert redis["spec"]["serviceName"] in {s["metadata"]["name"] for s in objects_of("Service")}

    secret = the_secret()
    [secret_name] = [s["metadata"]["name"] for s in objects_of("Secret")]
    for w in workloads:
        for c in w["spec"]["template"]["spec"]["containers"]:
            for var in c.get("env", []):
                ref = var.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    assert ref["name"] == secret_name and ref["key"] in secret, var


def test_the_secret_holds_clearly_marked_placeholders_that_fit_together():
    secret = the_secret()
    assert set(secret) == {"api-token", "worker-token", "redis-password", "redis-url"}
    for key, value in secret.items():
        assert "CHANGE-ME" in value, f"{key}: a placeholder must say so"
    # The URL the FlowMesh pods use carries the password the Redis pod is started with.
    assert f":{secret['redis-password']}@" in secret["redis-url"]
    [redis] = objects_of("StatefulSet")
    [container] = redis["spec"]["template"]["spec"]["containers"]
    [auth] = [v for v in container["env"] if v["name"] == "REDISCLI_AUTH"]
    assert auth["valueFrom"]["secretKeyRef"]["key"] == "redis-password"
    assert '--requirepass "$REDISCLI_AUTH"' in " ".join(container["args"])


def test_redis_is_durable_and_never_evicts():
    [redis] = objects_of("StatefulSet")
    [c] = redis["spec"]["template"]["spec"]["containers"]
    args = shlex.split(" ".join(c["args"]).removeprefix("exec "))
    assert args[0] == "redis-server"
    options = dict(zip(args[1::2], args[2::2], strict=True))
    assert options["--appendonly"] == "yes"
    assert options["--appendfsync"] == "everysec"
    assert options["--maxmemory-policy"] == "noeviction"
    assert options["--dir"] == c["volumeMounts"][0]["mountPath"] == "/data"
    # An AOF rewrite forks: maxmemory leaves the fork room under the container's limit.
    limit = parse_bytes(c["resources"]["limits"]["memory"])
    assert parse_bytes(options["--maxmemory"]) * 1.5 < limit
    assert redis["spec"]["volumeClaimTemplates"][0]["metadata"]["name"] == "data"


# -- Kubernetes: what the FlowMesh containers set is what the code reads ----------------------


def test_flowmesh_containers_run_console_scripts_with_real_flags_and_variables():
    containers = list(flowmesh_containers())
    assert sorted(c.program for c in containers) == ["orchestrator", "worker", "worker"]
    for c in containers:
        known = ORCHESTRATOR_ENV if c.program == "orchestrator" else WORKER_ENV
        names = [v["name"] for v in c.spec.get("env", [])]
        assert set(names) <= known, f"{c.where}: not read by {c.program}: {set(names) - known}"
        assert len(names) == len(set(names)), f"{c.where}: a variable set twice"
        # A flag the command does not take exits with a usage error here.
        module = orchestrator_main if c.program == "orchestrator" else worker_main
        module.parse_args(c.spec.get("args", []))


def test_the_orchestrator_settings_build_from_the_manifest_and_its_port_lines_up():
    [c] = [c for c in flowmesh_containers() if c.program == "orchestrator"]
    args = orchestrator_main.parse_args(c.spec["args"])
    # Raises ConfigError as the orchestrator would at start (short or equal tokens, no token
    # on 0.0.0.0, a bad number).
    settings = OrchestratorSettings.from_env(kube_env(c), host=args.host, port=args.port)
    assert settings.api_token and settings.worker_token
    assert settings.host == "0.0.0.0"
    assert [p["containerPort"] for p in c.spec["ports"]] == [settings.port]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        get = c.spec[probe]["httpGet"]
        assert get["path"] == "/healthz" and get["path"] in OPEN_PATHS, probe
        assert named_port(c.pod, get["port"]) == settings.port, probe
    [svc] = [s for s in objects_of("Service") if s["metadata"]["name"] == "flowmesh-orchestrator"]
    [port] = svc["spec"]["ports"]
    assert named_port(c.pod, port["targetPort"]) == settings.port
    # One scheduler: never two orchestrators, not even for a moment during an update.
    [deployment] = [d for d in objects_of("Deployment") if d["metadata"]["name"] in c.where]
    assert deployment["spec"]["replicas"] == 1
    assert deployment["spec"]["strategy"]["type"] == "Recreate"
    mounts = {m["mountPath"] for m in c.spec["volumeMounts"]}
    assert str(settings.results_dir) in mounts


def test_workers_drain_within_their_grace_period_and_reach_the_orchestrator():
    [svc] = [s for s in objects_of("Service") if s["metadata"]["name"] == "flowmesh-orchestrator"]
    orchestrator_url = f"http://{svc['metadata']['name']}:{svc['spec']['ports'][0]['port']}"
    workers = [c for c in flowmesh_containers() if c.program == "worker"]
    for c in workers:
        env = kube_env(c)
        settings = WorkerSettings.from_env(env)  # raises ConfigError on a bad value
        grace = c.pod["terminationGracePeriodSeconds"]
        # SIGTERM: running tasks get drain_timeout, then what is left is stopped within
        # cancel_grace and handed back; only then does the worker deregister and exit.
        assert grace > settings.drain_timeout + settings.cancel_grace, c.where
        assert settings.artifacts.fetch.orchestrator_url == orchestrator_url, c.where
        assert str(settings.results_dir) in {m["mountPath"] for m in c.spec["volumeMounts"]}
        limits = c.spec["resources"]["limits"]
        assert settings.memory == parse_bytes(limits["memory"]), c.where
        assert settings.cpus == float(limits["cpu"]), c.where
    gpu = [c for c in workers if "nvidia.com/gpu" in c.spec["resources"]["limits"]]
    assert len(gpu) == 1
    resources = gpu[0].spec["resources"]
    assert resources["requests"]["nvidia.com/gpu"] == resources["limits"]["nvidia.com/gpu"] >= 1


def test_flowmesh_pods_run_as_the_images_non_root_user():
    for c in flowmesh_containers():
        assert c.pod["securityContext"]["runAsNonRoot"] is True, c.where
        assert c.pod["securityContext"]["runAsUser"] == 10001, c.where
        assert c.spec["securityContext"]["allowPrivilegeEscalation"] is False, c.where
    for name in DOCKERFILES:
        assert dockerfile(name).args("USER")[-1] == "10001:10001", name


# -- KEDA -------------------------------------------------------------------------------------

# KEDA's ScaledObject spec and its Prometheus scaler's settings (keda.sh/docs, 2.x): a typo
# there is silently ignored by the cluster, so it is caught here.
SCALED_OBJECT_FIELDS = {
    "scaleTargetRef",
    "pollingInterval",
    "cooldownPeriod",
    "initialCooldownPeriod",
    "idleReplicaCount",
    "minReplicaCount",
    "maxReplicaCount",
    "fallback",
    "advanced",
    "triggers",
}
PROMETHEUS_SCALER_FIELDS = {
    "serverAddress",
    "query",
    "queryParameters",
    "threshold",
    "activationThreshold",
    "namespace",
    "customHeaders",
    "ignoreNullValues",
    "unsafeSsl",
    "timeout",
}


def test_each_worker_deployment_is_scaled_by_keda_on_the_backlog_metric():
    families = metric_families()
    assert families["flowmesh_backlog_tasks"] == {"executor", "resource_class"}
    classes = {
        resource_class(Requirements(executor="echo")),
        resource_class(Requirements(executor="echo", gpu_count=1)),
    }
    workers = {
        d["metadata"]["name"]: d
        for d in objects_of("Deployment")
        if d["spec"]["template"]["spec"]["containers"][0].get("command") == ["worker"]
    }
    scaled = objects_of("ScaledObject")
    assert sorted(s["spec"]["scaleTargetRef"]["name"] for s in scaled) == sorted(workers)
    for s in scaled:
        assert s["apiVersion"] == "keda.sh/v1alpha1"
        assert set(s["spec"]) <= SCALED_OBJECT_FIELDS, set(s["spec"]) - SCALED_OBJECT_FIELDS
        target = s["spec"]["scaleTargetRef"]
        assert target.get("kind", "Deployment") == "Deployment"
        # A replicas field in the Deployment would be reset by every re-apply.
        assert "replicas" not in workers[target["name"]]["spec"], target["name"]
        assert 0 <= s["spec"]["minReplicaCount"] <= s["spec"]["maxReplicaCount"]
        [trigger] = s["spec"]["triggers"]
        assert trigger["type"] == "prometheus"
        meta = trigger["metadata"]
        assert set(meta) <= PROMETHEUS_SCALER_FIELDS, set(meta) - PROMETHEUS_SCALER_FIELDS
        assert meta["serverAddress"].startswith("http")
        assert float(meta["threshold"]) > 0 and isinstance(meta["threshold"], str)
        query = meta["query"]
        assert "flowmesh_backlog_tasks" in query
        for metric, selector in re.findall(r"\b(flowmesh_\w+)\{([^}]*)\}", query):
            assert metric in families, f"{s['metadata']['name']}: no metric {metric}"
            for label, value in re.findall(r'(\w+)=~?"([^"]*)"', selector):
                assert label in families[metric], f"{metric} has no label {label}"
                if label == "resource_class":
                    assert value in classes
                if label == "worker":
                    # Worker ids start with the pod's name, which starts with the Deployment's.
                    assert value == f"{target['name']}-.*", value
        assert query.count("(") == query.count(")")


# -- compose ----------------------------------------------------------------------------------


def test_compose_runs_redis_the_orchestrator_and_two_cpu_workers():
    services = compose()["services"]
    assert {"redis", "orchestrator", "worker-cpu", "worker-cuda"} <= set(services)

    redis = services["redis"]
    assert redis["image"].startswith("redis:7")
    command = redis["command"]
    options = dict(zip(command[1::2], command[2::2], strict=True))
    assert command[0] == "redis-server"
    assert options["--appendonly"] == "yes"
    assert options["--appendfsync"] == "everysec"
    assert options["--maxmemory-policy"] == "noeviction"
    assert redis["healthcheck"]["test"] == ["CMD", "redis-cli", "ping"]

    orch = services["orchestrator"]
    assert orch["command"][0] in SCRIPTS
    args = orchestrator_main.parse_args(orch["command"][1:])
    env = compose_env(orch)
    assert set(env) <= ORCHESTRATOR_ENV, set(env) - ORCHESTRATOR_ENV
    assert {"REDIS_URL", "FLOWMESH_API_TOKEN", "FLOWMESH_WORKER_TOKEN"} <= set(env)
    settings = OrchestratorSettings.from_env(env, host=args.host, port=args.port)
    assert any(p.endswith(f":{settings.port}") for p in orch["ports"])
    check = " ".join(orch["healthcheck"]["test"])
    assert f"127.0.0.1:{settings.port}/healthz" in check and "/healthz" in OPEN_PATHS
    assert str(settings.results_dir) in {v.split(":")[1] for v in orch["volumes"]}
    assert orch["depends_on"]["redis"]["condition"] == "service_healthy"

    assert services["worker-cpu"]["deploy"]["replicas"] == 2
    for name in ("worker-cpu", "worker-cuda"):
        worker = services[name]
        assert worker["command"] == ["worker"]
        env = compose_env(worker)
        assert set(env) <= WORKER_ENV, f"{name}: {set(env) - WORKER_ENV}"
        assert {"REDIS_URL", "ORCHESTRATOR_BASE_URL", "FLOWMESH_WORKER_TOKEN"} <= set(env)
        ws = WorkerSettings.from_env(env)
        assert ws.redis.url == settings.redis.url
        assert ws.artifacts.fetch.orchestrator_url == f"http://orchestrator:{settings.port}"
        assert env["FLOWMESH_WORKER_TOKEN"] == COMPOSE_TOKENS["FLOWMESH_WORKER_TOKEN"]
        assert str(ws.results_dir) in {v.split(":")[1] for v in worker["volumes"]}
        grace = seconds(worker["stop_grace_period"])
        assert grace > ws.drain_timeout + ws.cancel_grace, name


def test_compose_gpu_worker_reserves_nvidia_gpus_behind_a_profile():
    cuda = compose()["services"]["worker-cuda"]
    assert cuda["profiles"] == ["gpu"]  # `docker compose up` alone starts no GPU worker
    [device] = cuda["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
    assert cuda["build"]["dockerfile"].endswith("worker-cuda.Dockerfile")


def test_compose_builds_from_the_repository_root_and_its_env_example_names_its_tokens():
    for name, service in compose()["services"].items():
        if "build" in service:
            # Without `image:` Compose names the image itself and never pulls that name.
            assert "image" not in service, name
            context = (DEPLOY / service["build"]["context"]).resolve()
            assert context == ROOT, name
            assert (context / service["build"]["dockerfile"]).is_file(), name
    assert ".env" in (DEPLOY / ".gitignore").read_text().split()
    example = (DEPLOY / ".env.example").read_text()
    for var in COMPOSE_TOKENS:
        assert re.search(rf"^{var}=", example, re.M), var


# -- Dockerfiles ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", DOCKERFILES)
def test_dockerfile_installs_the_locked_project_and_runs_as_non_root(name):
    df = dockerfile(name)
    assert df.instructions[0][0] in {"ARG", "FROM"} and df.args("FROM")
    final = df.final_stage()
    users = [a for i, a in final if i == "USER"]
    assert users and users[-1].split(":")[0] not in {"root", "0"}, name

    syncs = [a for _, a in df.instructions if "uv sync" in a]
    assert len(syncs) == 2, "dependencies alone, then the project"
    want = set() if name == "orchestrator" else {"inference", "training"}
    for sync in syncs:
        assert "--frozen" in sync and "--no-dev" in sync, sync
        extras = set(re.findall(r"--extra[ =](\S+)", sync))
        assert extras <= EXTRAS, f"no such extra: {extras - EXTRAS}"
        assert extras == want, sync

    # Every path copied from the build context exists and gets through the ignore file.
    ignore = (DOCKER / f"{name}.Dockerfile.dockerignore").read_text().splitlines()
    allowed = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
    assert "*" in ignore, "the ignore file lets through only what is named"
    for arguments in df.args("COPY"):
        if arguments.startswith("--from"):
            continue
        *sources, _ = arguments.split()
        for source in sources:
            assert (ROOT / source).exists(), source
            assert source.rstrip("/") in allowed, f"{source} is left out of the context"
    for mount in re.findall(r"type=bind,source=([^,\s]+)", " ".join(df.args("RUN"))):
        assert mount in allowed, mount

    # The command is a console script, with flags it takes.
    cmd = json.loads(df.args("CMD")[-1])
    entrypoint = json.loads(df.args("ENTRYPOINT")[-1]) if df.args("ENTRYPOINT") else []
    assert entrypoint in ([], ["tini", "--"]), entrypoint
    assert cmd[0] in SCRIPTS, cmd
    (orchestrator_main if cmd[0] == "orchestrator" else worker_main).parse_args(cmd[1:])

    # What the image sets for the program is a variable something in it reads.
    for env in (a for i, a in final if i == "ENV"):
        for var in re.findall(r"(?:^|\s)(\w+)=", env):
            assert var in ORCHESTRATOR_ENV | WORKER_ENV | THIRD_PARTY_ENV, var


def test_the_orchestrator_image_checks_healthz_on_the_port_it_serves():
    df = dockerfile("orchestrator")
    port = orchestrator_main.parse_args(json.loads(df.args("CMD")[-1])[1:]).port
    assert df.args("EXPOSE") == [str(port)]
    [check] = df.args("HEALTHCHECK")
    assert f"http://127.0.0.1:{port}/healthz" in check


@pytest.mark.parametrize("name", ["worker-cpu", "worker-cuda"])
def test_worker_images_have_the_archivers_and_an_init(name):
    df = dockerfile(name)
    installs = " ".join(a for i, a in df.final_stage() if i == "RUN" and "apt-get install" in a)
    for package in ("pigz", "zstd", "tini"):
        assert re.search(rf"\b{package}\b", installs), package
    if name == "worker-cuda":
        assert all(f.split()[-1] == "${CUDA_IMAGE}" or " AS " in f for f in df.args("FROM"))
        [default] = [a for a in df.args("ARG") if a.startswith("CUDA_IMAGE=")]
        assert default.startswith("CUDA_IMAGE=nvidia/cuda:")


def test_prometheus_scrapes_metrics_with_the_api_token():
    config = yaml.safe_load((DEPLOY / "prometheus" / "scrape-config.yaml").read_text())
    [job] = config["scrape_configs"]
    assert job["metrics_path"] == "/metrics" and "/metrics" not in OPEN_PATHS
    assert job["authorization"]["type"] == "Bearer"
    assert job["authorization"]["credentials_file"].endswith("/api-token")
    [svc] = [s for s in objects_of("Service") if s["metadata"]["name"] == "flowmesh-orchestrator"]
    target = f"{svc['metadata']['name']}.{NAMESPACE}.svc:{svc['spec']['ports'][0]['port']}"
    assert job["static_configs"][0]["targets"] == [target]
