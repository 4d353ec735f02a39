"""The deploy files name real commands, real settings and real probe paths.

There is no Docker engine or Kubernetes cluster here, so the files are checked for
what can be checked: they parse, every command they run is a real ``motionhook``
command (or gunicorn with this app and config), every ``MOTIONHOOK_*`` variable
they set is one the code reads, probes point at paths the processes serve, and the
container health check works against real processes.
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
import yaml
from flask import Flask
from standardwebhooks import Webhook
from werkzeug.test import Client

from service import metrics
from service.config import DEFAULTS, SENTRY_KEYS
from service.demo import start_receiver
from service.devstack import ROOT, SAMPLE_IMAGE, Process, Stack, answers, free_port, wait_until
from service.extension import Services

DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
WEB_ARGV = ["gunicorn", "service:create_app()", "-c", "deploy/gunicorn.conf.py"]
RELEASE_ARGV = ["motionhook", "db", "upgrade"]
WORKER_ARGV = ["motionhook", "worker"]
# Variables the code reads besides DEFAULTS (config.py, create_app, gunicorn.conf.py).
EXTRA_MOTIONHOOK_VARS = {
    "MOTIONHOOK_INSTANCE_PATH",
    "MOTIONHOOK_ALLOW_SQLITE_IN_PRODUCTION",
    "MOTIONHOOK_RATELIMIT_KEY_PREFIX",
}
KNOWN_MOTIONHOOK_VARS = {f"MOTIONHOOK_{key}" for key in DEFAULTS} | EXTRA_MOTIONHOOK_VARS


def load_all(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def assert_real_command(argv: list[str]) -> None:
    """A motionhook command (with its options) that the CLI accepts, or the web command."""
    if argv[0] == "gunicorn":
        assert argv == WEB_ARGV
        return
    assert argv[0] == "motionhook", argv
    result = subprocess.run(
        [sys.executable, "-m", "service.cli", *argv[1:], "--help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, f"{argv}: {result.stderr}"


def assert_known_variables(names: list[str], where: str) -> None:
    unknown = [n for n in names if n.startswith("MOTIONHOOK_") and n not in KNOWN_MOTIONHOOK_VARS]
    assert not unknown, f"{where} sets variables the code never reads: {unknown}"


def probe_paths(app: Flask) -> set[str]:
    return {rule.rule for rule in app.url_map.iter_rules()}


# -- Procfile and gunicorn -------------------------------------------------------------


def test_procfile_is_the_design_contract() -> None:
    entries = dict(
        line.split(": ", 1) for line in (ROOT / "Procfile").read_text().splitlines() if line
    )
    assert entries == {
        "release": "motionhook db upgrade",
        "web": "gunicorn 'service:create_app()' -c deploy/gunicorn.conf.py",
        "worker": "motionhook worker",
    }
    for command in entries.values():
        assert_real_command(shlex.split(command))


def test_gunicorn_config_reads_the_environment(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    import runpy

    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path / "prom"))
    monkeypatch.setenv("WEB_CONCURRENCY", "3")
    monkeypatch.setenv("GUNICORN_THREADS", "7")
    monkeypatch.setenv("FORWARDED_ALLOW_IPS", "*")
    monkeypatch.setenv("GUNICORN_GRACEFUL_TIMEOUT", "11")
    monkeypatch.setenv("PORT", "9999")
    monkeypatch.setenv("GUNICORN_WORKER_CLASS", "gthread")
    conf = runpy.run_path(str(DEPLOY / "gunicorn.conf.py"))
    assert (conf["workers"], conf["threads"], conf["worker_class"]) == (3, 7, "gthread")
    assert conf["preload_app"] is True
    assert conf["forwarded_allow_ips"] == "*"
    assert conf["graceful_timeout"] == 11
    assert conf["bind"] == "0.0.0.0:9999"
    access = conf["logconfig_dict"]["formatters"]["access"]["()"]
    assert access == "service.observability.AccessLogFormatter"
    for hook in ("on_starting", "child_exit", "on_exit"):
        assert callable(conf[hook])


def test_gunicorn_defaults_to_gevent_without_preloading(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    import runpy

    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path / "prom"))
    for name in ("GUNICORN_WORKER_CLASS", "GUNICORN_PRELOAD", "GUNICORN_WORKER_CONNECTIONS"):
        monkeypatch.delenv(name, raising=False)
    conf = runpy.run_path(str(DEPLOY / "gunicorn.conf.py"))
    assert (conf["worker_class"], conf["preload_app"]) == ("gevent", False)
    assert conf["worker_connections"] == 1000


def test_gunicorn_accepts_the_config_and_the_app(tmp_path: Path) -> None:
    env = {
        "PATH": str(Path(sys.executable).parent) + ":/usr/bin:/bin",
        "PROMETHEUS_MULTIPROC_DIR": str(tmp_path / "prom"),
        "MOTIONHOOK_INSTANCE_PATH": str(tmp_path / "instance"),
        "MOTIONHOOK_DATABASE_URL": f"sqlite:///{tmp_path / 'db.sqlite'}",
    }
    result = subprocess.run(
        [sys.executable, "-m", "gunicorn", "--check-config", *WEB_ARGV[1:]],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr


# -- Dockerfile ------------------------------------------------------------------------


def dockerfile() -> list[tuple[str, str]]:
    text = (DEPLOY / "Dockerfile").read_text().replace("\\\n", " ")
    instructions = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            instructions.append((keyword.upper(), rest.strip()))
    return instructions


def test_dockerfile_is_multi_stage_non_root_with_a_healthcheck() -> None:
    instructions = dockerfile()
    stages = [rest for keyword, rest in instructions if keyword == "FROM"]
    assert len(stages) >= 2 and all("slim" in stage for stage in stages)
    assert any("--from=build" in rest for keyword, rest in instructions if keyword == "COPY")
    user = [rest for keyword, rest in instructions if keyword == "USER"]
    assert user and user[-1].split(":")[0] not in ("0", "root")
    (healthcheck,) = [rest for keyword, rest in instructions if keyword == "HEALTHCHECK"]
    assert '["python", "deploy/healthcheck.py"]' in healthcheck
    (cmd,) = [rest for keyword, rest in instructions if keyword == "CMD"]
    assert yaml.safe_load(cmd) == WEB_ARGV


def test_dockerfile_copies_files_that_exist() -> None:
    for keyword, rest in dockerfile():
        if keyword != "COPY" or "--from=" in rest:
            continue
        *sources, _target = rest.split()
        for source in sources:
            assert (ROOT / source).exists(), source


# -- compose ---------------------------------------------------------------------------


def test_compose_runs_release_before_web_and_worker() -> None:
    (compose,) = load_all(DEPLOY / "compose.yaml")
    services = compose["services"]
    assert {"postgres", "release", "web", "worker", "minio"} <= set(services)
    assert services["release"]["command"] == RELEASE_ARGV
    assert services["web"]["command"] == WEB_ARGV
    assert services["worker"]["command"] == WORKER_ARGV
    for name in ("web", "worker"):
        condition = services[name]["depends_on"]["release"]["condition"]
        assert condition == "service_completed_successfully"
    assert services["release"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    build = services["web"]["build"]
    assert (DEPLOY / build["context"] / build["dockerfile"]).resolve() == DEPLOY / "Dockerfile"
    for name, service in services.items():
        command = service.get("command")
        if isinstance(command, list) and command[0] in ("motionhook", "gunicorn"):
            assert_real_command(command)
        assert_known_variables(list(service.get("environment", {})), f"compose {name}")
    worker_env = services["worker"]["environment"]
    assert worker_env["MOTIONHOOK_WORKER_METRICS_PORT"] == "9100"
    stop = int(services["worker"]["stop_grace_period"].rstrip("s"))
    assert stop > int(worker_env["MOTIONHOOK_SHUTDOWN_GRACE"])


@pytest.mark.skipif(shutil.which("docker-compose") is None, reason="docker-compose not installed")
def test_docker_compose_accepts_the_file(tmp_path: Path) -> None:
    # docker-compose 1.x predates the top-level ``name``; everything else it validates.
    text = (DEPLOY / "compose.yaml").read_text().replace("name: motionhook\n", "", 1)
    copy = DEPLOY / f".compose-check-{tmp_path.name}.yaml"
    copy.write_text(text)
    env = {"PATH": "/usr/bin:/bin"}  # nothing exported: compose must start without
    try:
        result = subprocess.run(
            [
                "docker-compose",
                "-f",
                str(copy),
                "--profile",
                "s3",
                "config",
                "--services",
            ],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
    finally:
        copy.unlink()
    assert result.returncode == 0, result.stderr
    assert set(result.stdout.split()) == {
        "postgres",
        "release",
        "web",
        "worker",
        "simulator",
        "minio",
        "minio-bucket",
    }


# Compose's interpolation: ${VAR}, ${VAR:-default}, ${VAR-default}, ${VAR:?error}, ${VAR?error}.
INTERPOLATION = re.compile(r"\$\{(\w+)(?:(:?[-?])([^}]*))?\}")
# Where the containers reach each other, and where the same processes listen here.
IN_CONTAINERS = {"web": "http://localhost:8000", "simulator": "http://web:8010"}
INSTANCE_VOLUME = "/var/lib/motionhook"


def with_nothing_exported(value: str) -> str:
    """A compose value as ``docker compose up`` reads it when no variable is exported."""

    def expand(match: re.Match[str]) -> str:
        name, operator, operand = match.groups()
        assert operator not in (":?", "?"), f"compose refuses to start without {name}"
        return operand or ""

    return INTERPOLATION.sub(expand, value)


def image_environment() -> dict[str, str]:
    """The ENV of the Dockerfile's last stage (what every container starts with)."""
    env: dict[str, str] = {}
    for keyword, rest in dockerfile():
        if keyword == "FROM":
            env = {}
        elif keyword == "ENV":
            env.update(pair.split("=", 1) for pair in shlex.split(rest))
    return env


def compose_process(
    stack: Stack, services: dict[str, Any], name: str, database_url: str
) -> tuple[list[str], dict[str, str]]:
    """The command and environment of compose service ``name``, on loopback here.

    Only addresses change: the database, the instance volume (a folder shared by
    every process), and the hosts and ports the containers use for each other.
    """
    local = {IN_CONTAINERS["web"]: stack.web_url, IN_CONTAINERS["simulator"]: stack.sim_url}
    env = {**image_environment(), **services[name].get("environment", {})}
    for key, raw in env.items():
        value = with_nothing_exported(str(raw)).replace(INSTANCE_VOLUME, str(stack.instance))
        for remote, here in local.items():
            value = value.replace(remote, here)
        env[key] = value
    env["MOTIONHOOK_DATABASE_URL"] = database_url
    env["GUNICORN_BIND"] = f"127.0.0.1:{stack.web_port}"
    env["MOTIONHOOK_WORKER_METRICS_HOST"] = "127.0.0.1"
    if "MOTIONHOOK_WORKER_METRICS_PORT" in env:
        env["MOTIONHOOK_WORKER_METRICS_PORT"] = str(free_port())
    command = [str(part) for part in services[name]["command"]]
    if command[0] == "motionhook":
        command = [sys.executable, "-m", "service.cli", *command[1:]]
    else:
        command = [sys.executable, "-m", *command]
    if name == "simulator":
        command = [*command[: command.index("--host")], "--port", str(stack.sim_port)]
    return command, env


@pytest.mark.e2e
def test_compose_runs_with_nothing_exported_on_secrets_made_once(
    tmp_path: Path, stack_database_url: str
) -> None:
    """The compose services' own commands, run outside containers with no variable
    exported: release generates the secrets in the instance volume, and web, worker
    and simulator complete a job with them (a callback verified, a webhook signed)."""
    (compose,) = load_all(DEPLOY / "compose.yaml")
    services = compose["services"]
    for name in ("release", "web", "worker"):
        assert f"instance:{INSTANCE_VOLUME}" in services[name]["volumes"], name
    stack = Stack(tmp_path / "instance")
    stack.env = {k: v for k, v in stack.env.items() if not k.startswith("MOTIONHOOK_")}

    def spawn(name: str) -> Process:
        argv, env = compose_process(stack, services, name, stack_database_url)
        return stack.spawn(name, argv, env)

    server, received = start_receiver()
    try:
        release = spawn("release")
        assert release.popen.wait(120) == 0, release.log()
        secrets = {
            name: (stack.instance / name).read_text()
            for name in ("api_token", "callback_secret", "webhook_secret")
        }
        for name in secrets:
            assert (stack.instance / name).stat().st_mode & 0o777 == 0o600, name
        simulator = spawn("simulator")
        wait_until(lambda: answers(f"{stack.sim_url}/_sim/knobs"), timeout=60, message="simulator")
        web = spawn("web")
        wait_until(lambda: answers(f"{stack.web_url}/readyz"), timeout=60, message="web")
        spawn("worker")
        assert simulator.popen.poll() is None and web.popen.poll() is None

        with SAMPLE_IMAGE.open("rb") as image:
            submitted = requests.post(
                f"{stack.web_url}/v1/jobs",
                headers={"Authorization": f"Bearer {secrets['api_token'].strip()}"},
                data={
                    "prompt": "a slow pan",
                    "width": 128,
                    "height": 128,
                    "num_frames": 8,
                    "webhook_url": f"http://127.0.0.1:{server.server_port}/hook",
                },
                files={"image": image},
                timeout=10,
            )
        assert submitted.status_code == 202, submitted.text
        verifier = Webhook(secrets["webhook_secret"].strip())
        while True:
            headers, body = received.get(timeout=60)
            event = verifier.verify(body, headers)
            if event["type"] == "job.completed":
                break
        assert event["data"]["id"] == submitted.json()["id"]
        assert all((stack.instance / name).read_text() == value for name, value in secrets.items())
    finally:
        stack.kill()
        server.shutdown()


# -- Render ----------------------------------------------------------------------------


def test_render_blueprint_names_real_commands_and_paths(app: Flask) -> None:
    (blueprint,) = load_all(DEPLOY / "render.yaml")
    services = {service["name"]: service for service in blueprint["services"]}
    web, worker = services["motionhook-web"], services["motionhook-worker"]
    assert shlex.split(web["dockerCommand"]) == WEB_ARGV
    assert shlex.split(web["preDeployCommand"]) == RELEASE_ARGV
    assert shlex.split(worker["dockerCommand"]) == WORKER_ARGV
    assert web["healthCheckPath"] in probe_paths(app)
    for service in (web, worker):
        assert (ROOT / service["dockerfilePath"]).is_file()
    names = [var["key"] for group in blueprint["envVarGroups"] for var in group["envVars"]]
    names += [
        var["key"]
        for service in services.values()
        for var in service.get("envVars", [])
        if "key" in var
    ]
    assert_known_variables(names, "render.yaml")


# -- Kubernetes ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def manifests() -> dict[tuple[str, str], dict[str, Any]]:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    found = {}
    for resource in kustomization["resources"]:
        for doc in load_all(K8S / resource):
            found[(doc["kind"], doc["metadata"]["name"])] = doc
    return found


def container(manifest: dict[str, Any]) -> dict[str, Any]:
    (only,) = manifest["spec"]["template"]["spec"]["containers"]
    return only  # type: ignore[no-any-return]


def test_k8s_web_deployment_probes_paths_the_app_serves(
    manifests: dict[tuple[str, str], dict[str, Any]], app: Flask
) -> None:
    web = container(manifests[("Deployment", "motionhook-web")])
    assert web["command"] == WEB_ARGV
    ports = {port["name"]: port["containerPort"] for port in web["ports"]}
    assert web["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert web["readinessProbe"]["httpGet"]["path"] == "/readyz"
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        get = web[probe]["httpGet"]
        assert get["path"] in probe_paths(app)
        assert get["port"] in ports
    env = {item["name"]: item.get("value") for item in web["env"]}
    assert ports["http"] == int(env["PORT"])
    service = manifests[("Service", "motionhook-web")]
    assert service["spec"]["ports"][0]["targetPort"] == "http"


def test_k8s_worker_deployment_probes_its_own_endpoint(
    manifests: dict[tuple[str, str], dict[str, Any]], services: Services
) -> None:
    deployment = manifests[("Deployment", "motionhook-worker")]
    worker = container(deployment)
    assert worker["command"] == WORKER_ARGV
    env = {item["name"]: item.get("value") for item in worker["env"]}
    port = {p["name"]: p["containerPort"] for p in worker["ports"]}["metrics"]
    assert int(env["MOTIONHOOK_WORKER_METRICS_PORT"]) == port
    endpoint = Client(metrics.worker_wsgi_app(services, metrics.Heartbeat()))
    for probe in ("livenessProbe", "readinessProbe"):
        get = worker[probe]["httpGet"]
        assert get["port"] == "metrics"
        assert endpoint.get(get["path"]).status_code == 200
    config = manifests[("ConfigMap", "motionhook-config")]["data"]
    grace = deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert grace > int(config["MOTIONHOOK_SHUTDOWN_GRACE"])


def test_k8s_migration_job_and_settings(manifests: dict[tuple[str, str], dict[str, Any]]) -> None:
    job = container(manifests[("Job", "motionhook-migrate")])
    assert job["command"] == RELEASE_ARGV
    for manifest in manifests.values():
        if manifest["kind"] in ("Deployment", "Job"):
            spec = manifest["spec"]["template"]["spec"]
            assert spec["securityContext"]["runAsNonRoot"] is True
            one = container(manifest)
            assert one["image"] == "motionhook"
            assert_real_command(one["command"])
            assert_known_variables([e["name"] for e in one.get("env", [])], "k8s env")
    config = manifests[("ConfigMap", "motionhook-config")]["data"]
    assert_known_variables(list(config), "k8s ConfigMap")
    (secret,) = load_all(K8S / "secret.example.yaml")
    assert_known_variables(list(secret["stringData"]), "k8s Secret")


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl not installed")
def test_kustomize_renders_the_manifests() -> None:
    kubectl = shutil.which("kubectl")
    assert kubectl
    result = subprocess.run(
        [kubectl, "kustomize", str(K8S)], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    kinds = sorted(doc["kind"] for doc in yaml.safe_load_all(result.stdout) if doc)
    assert kinds == sorted(
        ["ConfigMap", "Job", "Deployment", "Service", "PodDisruptionBudget", "Deployment"]
    )
    assert "registry.example.com/motionhook:0.1.0" in result.stdout


# -- the container health check against real processes ---------------------------------


def healthcheck(env: dict[str, str]) -> int:
    base = {"PATH": "/usr/bin:/bin"}
    result = subprocess.run(
        [sys.executable, str(DEPLOY / "healthcheck.py")],
        env={**base, **env},
        capture_output=True,
        timeout=30,
    )
    return result.returncode


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[Stack]:
    processes = Stack(tmp_path / "stack", env={"WEB_CONCURRENCY": "1"}, simulator=False)
    processes.migrate()
    yield processes
    processes.kill()


@pytest.mark.e2e
def test_healthcheck_script_checks_web_and_worker(stack: Stack) -> None:
    assert healthcheck({"PORT": str(free_port())}) == 1  # nothing listening
    stack.start_web()
    assert healthcheck({"PORT": str(stack.web_port)}) == 0
    worker_port = str(free_port())
    stack.start_worker(
        {
            "MOTIONHOOK_WORKER_METRICS_PORT": worker_port,
            "MOTIONHOOK_WORKER_METRICS_HOST": "127.0.0.1",
        }
    )

    def worker_healthy() -> bool:
        env = {"PORT": str(stack.web_port), "MOTIONHOOK_WORKER_METRICS_PORT": worker_port}
        return healthcheck(env) == 0

    wait_until(worker_healthy, timeout=60, message="the worker's /healthz")


# -- the operating docs ----------------------------------------------------------------


def documented_metric_names() -> set[str]:
    return set(re.findall(r"`(motionhook_[a-z_]+)`", (ROOT / "README.md").read_text()))


def exported_metric_names(services: Services) -> set[str]:
    families = [*metrics.REGISTRY.collect(), *metrics.DatabaseCollector(services.db).collect()]
    return {
        family.name + ("_total" if family.type == "counter" else "")
        for family in families
        if family.name.startswith("motionhook_")
    }


def test_every_metric_and_variable_is_documented(services: Services) -> None:
    text = (ROOT / "README.md").read_text()
    exported = exported_metric_names(services)
    assert exported, "no motionhook metrics exported"
    assert exported <= documented_metric_names(), exported - documented_metric_names()
    prefixed = {f"MOTIONHOOK_{key}" for key in DEFAULTS if key not in SENTRY_KEYS}
    for name in sorted(prefixed | EXTRA_MOTIONHOOK_VARS | set(SENTRY_KEYS)):
        assert f"`{name}`" in text, f"{name} is not documented"
