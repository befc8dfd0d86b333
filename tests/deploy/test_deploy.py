"""The deployment files against the code, so that neither drifts from the other.

No database and no Docker engine: the Dockerfile is read line by line, the compose file and the
manifests with PyYAML, and everything they name (variables, commands, routes, ports, labels) is
checked against what the code really reads, runs and answers (tests/deploy/inventory.py).
"""

from __future__ import annotations

import dataclasses
import http.server
import importlib.util
import re
import socket
import threading
from collections.abc import Iterator
from types import ModuleType
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from services.common.settings import SettingsError, describe, from_env
from tests.conftest import ROOT
from tests.deploy import files, inventory
from tests.deploy.files import Container, Manifest
from tests.deploy.inventory import CLI, EXPORT, GATEWAY, PYTHON

LIVENESS = "/healthz"
"""Answers while the process runs, whatever the database does: restarting will not help it."""
READINESS = "/readyz"
"""Answers 200 once the database answers and every migration is applied."""

SERVICES = (EXPORT, GATEWAY)
GRACE_MARGIN = 5.0
"""Seconds on top of the longest shutdown the code allows (closing the database pool, the exit)."""
SECRET_VARIABLES = ("DATABASE_URL", "JWT_SECRET")
"""Variables whose values are secrets, whatever their prefix (a DSN carries a password)."""


def is_secret(name: str) -> bool:
    return any(name == s or name.endswith("_" + s) for s in SECRET_VARIABLES)


# ---- the code --------------------------------------------------------------------------------


def test_every_environment_lookup_in_the_code_can_be_listed() -> None:
    found = inventory.inventory()
    assert found.unlisted == [], "environment lookups that cannot be listed: " + "; ".join(
        found.unlisted
    )
    assert {s.programs for s in found.settings} == {frozenset({p}) for p in inventory.PROGRAMS}
    for program in inventory.PROGRAMS:
        assert "DATABASE_URL" in found.read_by(program)


def test_settings_read_what_describe_lists() -> None:
    """`from_env()` reads the variables `describe()` (the settings' own listing) names, and
    their fallbacks: the defaults taken from one are those of the other."""
    for settings in inventory.inventory().settings:
        recorder = inventory.RecordingEnvironment()
        from_env(settings.cls, settings.prefix, recorder)
        described = {row[0] for row in describe(settings.cls, settings.prefix)}
        fallbacks = {
            f.metadata["fallback"]
            for f in dataclasses.fields(settings.cls)
            if f.metadata.get("fallback")
        }
        assert set(recorder.asked) == described | fallbacks


# ---- CONFIGURATION.md ------------------------------------------------------------------------


def test_configuration_lists_exactly_the_variables_the_code_reads() -> None:
    rows = files.configuration_rows()
    names = [row.name for row in rows]
    assert len(names) == len(set(names)), "a variable has two rows"
    code = set(inventory.inventory().variables)
    missing = sorted(code - set(names))
    assert missing == [], f"read by the code, missing from CONFIGURATION.md: {missing}"
    unknown = sorted(set(names) - code)
    assert unknown == [], f"in CONFIGURATION.md, read by no code: {unknown}"


def _same_default(cell: str, default: str) -> bool:
    if not cell.startswith("`"):
        return False
    value = cell[1:].split("`", 1)[0]
    if default in ("True", "False"):
        return value == default.lower()
    try:
        return float(value) == float(default)
    except ValueError:
        return value == default


def test_configuration_defaults_and_readers_match_the_code() -> None:
    variables = inventory.inventory().variables
    for row in files.configuration_rows():
        variable = variables[row.name]
        assert row.read_by == variable.programs, f"{row.name}: read by {variable.programs}"
        assert row.meaning, f"{row.name}: say what it does"
        if variable.default in (None, "", "None"):
            assert not row.default.startswith("`"), f"{row.name} has no default value"
        else:
            assert _same_default(row.default, variable.default), (
                f"{row.name}: the code's default is {variable.default!r}, not {row.default!r}"
            )


# ---- Dockerfile ------------------------------------------------------------------------------


def test_dockerfile_is_multi_stage_and_installs_the_package_without_extras() -> None:
    docker = files.dockerfile()
    names = docker.stage_names()
    assert docker.final_stage >= 1, "build in one stage, run in another"
    installs = [
        i for i in docker.of("RUN") if "pip install" in i.value and i.stage < docker.final_stage
    ]
    assert installs, "no `pip install` in a build stage"
    for install in installs:
        words = install.value.split()
        assert "." in words, "install the package from the build context: pip install ."
        assert "-e" not in words, "not an editable install"
        assert "--editable" not in words, "not an editable install"
        assert not any(w.startswith(".[") for w in words), "no extras in the image"
    assert not [i for i in docker.of("RUN", docker.final_stage) if "pip install" in i.value]
    froms = [options.get("from") for _s, _d, options in docker.copies(docker.final_stage)]
    assert any(f in names and names[f] < docker.final_stage for f in froms), (
        "the final stage copies the installed environment from a build stage"
    )


def test_dockerfile_runs_as_an_unprivileged_user() -> None:
    assert files.image_uid() != 0


def test_dockerfile_sets_only_variables_the_services_read() -> None:
    read = inventory.inventory().read_by(EXPORT) | inventory.inventory().read_by(GATEWAY)
    unread = sorted(set(files.image_env()) - read)
    assert unread == [], f"the Dockerfile sets variables no service reads: {unread}"
    for program in SERVICES:
        inventory.config_of(program, files.image_env())  # values the settings accept


def test_dockerfile_exposes_the_services_ports() -> None:
    exposed = {
        int(p.split("/")[0]) for i in files.dockerfile().of("EXPOSE") for p in i.value.split()
    }
    ports = {inventory.config_of(p, files.image_env()).port for p in SERVICES}
    assert exposed == ports


def test_dockerfile_default_command_is_a_service() -> None:
    argv = files.dockerfile().exec_form("CMD")
    assert inventory.program_of(argv) in SERVICES
    assert not files.dockerfile().of("ENTRYPOINT"), "commands in compose and k8s replace CMD"


async def test_dockerfile_healthcheck_asks_a_route_both_services_answer() -> None:
    docker = files.dockerfile()
    options, argv = docker.healthcheck()
    assert argv[0] == PYTHON
    script = docker.copied_to(argv[1])
    assert script is not None, f"{argv[1]} is not copied into the image"
    assert (ROOT / script).is_file()
    path = argv[2] if len(argv) > 2 else READINESS
    for program in SERVICES:
        assert await inventory.route(program, path), f"the {program} has no route {path}"
    assert {"interval", "timeout"} <= set(options)


def test_build_context_holds_what_the_build_needs_and_nothing_private() -> None:
    docker = files.dockerfile()
    project = inventory.pyproject()
    setuptools = project["tool"]["setuptools"]
    package_dirs = setuptools.get("package-dir", {})
    needed = ["pyproject.toml", project["project"]["readme"]]
    needed += [package_dirs.get(p, p.replace(".", "/")) for p in setuptools["packages"]]
    context_sources = [
        source
        for stage in range(docker.final_stage + 1)
        for sources, _dest, options in docker.copies(stage)
        if "from" not in options
        for source in sources
    ]
    for path in needed:
        assert any(
            path == s.rstrip("/") or path.startswith(s.rstrip("/") + "/") for s in context_sources
        ), f"{path} is not copied into the build stage"
    for source in context_sources:
        source = source.rstrip("/")
        assert (ROOT / source).exists(), f"COPY {source}: no such file"
        assert not files.ignored(source), f"COPY {source}, but .dockerignore leaves it out"
        if (ROOT / source).is_dir():
            for child in (ROOT / source).rglob("*.py"):
                if "__pycache__" not in child.parts:
                    relative = child.relative_to(ROOT).as_posix()
                    assert not files.ignored(relative), f"{relative} left out of the context"
    for private in (
        ".git/config",
        ".data/dev-jwt-secret",
        ".venv/bin/python",
        "tests/conftest.py",
        "exportlog.egg-info/PKG-INFO",
        "services/__pycache__/cli.cpython-312.pyc",
    ):
        assert files.ignored(private), f".dockerignore lets {private} into the build context"


def _load_healthcheck() -> ModuleType:
    path = files.DEPLOY / "healthcheck.py"
    spec = importlib.util.spec_from_file_location("deploy_healthcheck", path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def fake_service() -> Iterator[tuple[int, dict[str, int]]]:
    """An HTTP server on a free port answering each path with the status the test sets."""
    statuses: dict[str, int] = {}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(statuses.get(self.path, 404))
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield int(server.server_address[1]), statuses
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize("variable", ["EXPORT_PORT", "GATEWAY_PORT"])
def test_healthcheck_script_finds_the_service_on_either_port(
    monkeypatch: pytest.MonkeyPatch, fake_service: tuple[int, dict[str, int]], variable: str
) -> None:
    port, statuses = fake_service
    for name in ("EXPORT_PORT", "GATEWAY_PORT"):
        monkeypatch.setenv(name, str(port if name == variable else _free_port()))
    script = _load_healthcheck()
    statuses[READINESS] = 200
    assert script.main(["healthcheck.py"]) == 0, "readiness is the default"
    assert script.main(["healthcheck.py", LIVENESS]) == 1
    statuses[LIVENESS] = 200
    assert script.main(["healthcheck.py", LIVENESS]) == 0
    statuses[READINESS] = 503
    assert script.main(["healthcheck.py", READINESS]) == 1


def test_healthcheck_script_fails_when_nothing_listens(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EXPORT_PORT", str(_free_port()))
    monkeypatch.setenv("GATEWAY_PORT", str(_free_port()))
    assert _load_healthcheck().main(["healthcheck.py"]) == 1


# ---- compose ---------------------------------------------------------------------------------


def _ours() -> dict[str, dict[str, Any]]:
    return {n: s for n, s in files.compose_services().items() if files.is_ours(s.get("image"))}


def _by_program(program: str) -> dict[str, dict[str, Any]]:
    return {
        n: s
        for n, s in _ours().items()
        if inventory.program_of(files.compose_command(s)) == program
    }


def _compose_env(service: dict[str, Any]) -> dict[str, str]:
    env = dict(files.image_env())
    env.update(
        {k: files.interpolate(str(v)) for k, v in files.compose_environment(service).items()}
    )
    return env


def _migrations(services: dict[str, dict[str, Any]]) -> list[str]:
    return [
        name
        for name, s in services.items()
        if files.compose_command(s)[:2] == ["exportlog", "migrate"]
    ]


def test_compose_runs_the_whole_stack() -> None:
    services = files.compose_services()
    assert len(_by_program(EXPORT)) == 2, "two export processes"
    assert len(_by_program(GATEWAY)) == 2, "two gateways"
    assert len(_migrations(_ours())) == 1, "one migration step: exportlog migrate"
    databases = [n for n, s in services.items() if str(s.get("image", "")).startswith("postgres:")]
    assert len(databases) == 1, "PostgreSQL from the official image"
    assert services[databases[0]].get("healthcheck", {}).get("test"), "PostgreSQL healthcheck"
    for name, service in _ours().items():
        build = service.get("build")
        if build:
            assert (files.COMPOSE.parent / build["context"] / build["dockerfile"]).resolve() == (
                files.DOCKERFILE.resolve()
            ), f"{name} builds another Dockerfile"
    assert set(services) == set(_ours()) | set(databases), "a service of an unknown image"


@pytest.mark.parametrize("name", sorted(files.compose_services()))
def test_compose_service_sets_only_what_its_program_reads(name: str) -> None:
    service = files.compose_services()[name]
    environment = files.compose_environment(service)
    for key, value in environment.items():
        assert isinstance(value, str), f"{name}: {key} must be a string (quote it)"
    if not files.is_ours(service.get("image")):
        return
    argv = files.compose_command(service)
    program = inventory.program_of(argv)
    read = inventory.inventory().read_by(program) if program != PYTHON else set()
    unread = sorted(set(environment) - read)
    assert unread == [], f"{name} runs the {program}, which reads none of {unread}"
    if "user" in service:
        assert _not_root(service["user"]), f"{name} runs as root"
    if program == CLI:
        inventory.check_cli_arguments(argv[1:])
    elif program == PYTHON:
        inventory.check_python_code(argv[2])
    else:
        _check_service_accepts(program, _compose_env(service))


def _not_root(user: Any) -> bool:
    return str(user).split(":")[0] not in ("0", "root")


def _check_service_accepts(program: str, env: dict[str, str]) -> None:
    """The settings convert and the service starts building itself with them (no database)."""
    config = inventory.config_of(program, env)
    assert config.database_url, "no DSN"
    if program == EXPORT:
        from services.export.app import create_app

        create_app(config)
    else:
        from services.gateway.server import Gateway

        Gateway(config)


def test_compose_settings_reject_a_bad_value() -> None:
    """The checks above would catch a value the service refuses."""
    with pytest.raises(SettingsError):
        inventory.config_of(GATEWAY, {"GATEWAY_CLOSE_TIMEOUT": "five"})
    with pytest.raises(ValueError, match="EXPORT_NOTIFY"):
        _check_service_accepts(
            EXPORT, {"DATABASE_URL": "x", "JWT_SECRET": "y", "EXPORT_NOTIFY": "z"}
        )


def test_compose_depends_on_with_conditions() -> None:
    services = files.compose_services()
    one_shots = set(_migrations(_ours())) | set(_by_program(PYTHON))
    databases = set(services) - set(_ours())
    for name, service in services.items():
        depends = service.get("depends_on") or {}
        assert isinstance(depends, dict), f"{name}: depends_on needs conditions"
        for target, spec in depends.items():
            assert target in services, f"{name} depends on a missing {target}"
            expected = (
                "service_completed_successfully" if target in one_shots else "service_healthy"
            )
            assert spec.get("condition") == expected, f"{name} -> {target}: {expected}"
            if target not in databases and target not in one_shots:
                assert not services[target].get("healthcheck", {}).get("disable")
        if name in one_shots:
            assert service.get("restart") == "no", f"{name} runs once"
            assert service.get("healthcheck", {}).get("disable") is True

    def reaches(name: str, target: str) -> bool:
        return any(
            t == target or reaches(t, target) for t in services[name].get("depends_on") or {}
        )

    (migrate,) = _migrations(_ours())
    for program in SERVICES:
        for name in _by_program(program):
            assert reaches(name, migrate), f"{name} may start before the migrations"
    for database in databases:
        assert reaches(migrate, database)


def test_compose_database_url_reaches_the_database() -> None:
    services = files.compose_services()
    (database,) = set(services) - set(_ours())
    postgres = files.compose_environment(services[database])
    for name, service in _ours().items():
        dsn = _compose_env(service).get("DATABASE_URL")
        if dsn is None:
            continue
        parts = urlsplit(dsn)
        assert parts.hostname == database, f"{name}: DATABASE_URL names {parts.hostname}"
        assert parts.username == postgres["POSTGRES_USER"]
        assert parts.password == postgres["POSTGRES_PASSWORD"]
        assert parts.path.lstrip("/") == postgres["POSTGRES_DB"]


async def test_compose_ports_and_urls_match_the_services() -> None:
    services = _ours()
    gateways = _by_program(GATEWAY)
    exports = _by_program(EXPORT)
    for name, service in {**exports, **gateways}.items():
        program = inventory.program_of(files.compose_command(service))
        port = inventory.config_of(program, _compose_env(service)).port
        published = files.published_ports(service)
        assert published, f"{name} publishes no port"
        assert {container for _a, _h, container in published} == {port}, name
    for name, service in exports.items():
        url = urlsplit(inventory.config_of(EXPORT, _compose_env(service)).gateway_url)
        assert url.scheme == "ws"
        assert await inventory.route(GATEWAY, url.path), f"{name}: no gateway route {url.path}"
        owners = [
            g
            for g, s in gateways.items()
            for address, host_port, _c in files.published_ports(s)
            if host_port == url.port and address in (url.hostname, "0.0.0.0")
        ]
        assert len(owners) == 1, f"{name}: EXPORT_GATEWAY_URL reaches no published gateway"
        assert await inventory.route(EXPORT, "/demo/"), "the demo page"
    for name, service in gateways.items():
        url = urlsplit(inventory.config_of(GATEWAY, _compose_env(service)).export_url)
        assert url.scheme == "http"
        assert url.hostname in exports, f"{name}: GATEWAY_EXPORT_URL names {url.hostname}"
        target = services[url.hostname]
        assert url.port == inventory.config_of(EXPORT, _compose_env(target)).port


def test_compose_export_volumes_cover_what_it_writes() -> None:
    exports = _by_program(EXPORT)
    shared: set[tuple[str, str]] | None = None
    for name, service in exports.items():
        config = inventory.config_of(EXPORT, _compose_env(service))
        mounts = files.compose_mounts(service)
        writable = {m.target: m.source for m in mounts if not m.read_only}
        everything = {m.target: m.source for m in mounts}
        assert service.get("read_only") is True, f"{name}: read-only root file system"
        assert config.work_root in writable, f"{name}: EXPORT_WORK_ROOT is not a volume"
        assert config.archive_root in writable, f"{name}: EXPORT_ARCHIVE_ROOT is not a volume"
        assert config.data_root in everything, f"{name}: EXPORT_DATA_ROOT is not a volume"
        volumes = {
            (config.archive_root, writable[config.archive_root]),
            (config.data_root, everything[config.data_root]),
        }
        assert shared is None or volumes == shared, "the exports share archives and projects"
        shared = volumes
    for name, service in _by_program(PYTHON).items():
        code = files.compose_command(service)[2]
        data_root = inventory.config_of(EXPORT, _compose_env(service)).data_root
        assert f'"{data_root}"' in code or f"'{data_root}'" in code, name
        (mount,) = [m for m in files.compose_mounts(service) if m.target == data_root]
        assert shared is not None
        assert (data_root, mount.source) in shared, f"{name} fills another volume"


def test_compose_stop_grace_covers_the_shutdown() -> None:
    for name, service in _by_program(GATEWAY).items():
        close = inventory.config_of(GATEWAY, _compose_env(service)).close_timeout
        need = inventory.gateway_shutdown_seconds(close) + GRACE_MARGIN
        grace = files.duration_seconds(service.get("stop_grace_period", "10s"))
        assert grace >= need, f"{name}: stop_grace_period {grace} s < {need} s"
    for name, service in _by_program(EXPORT).items():
        need = inventory.export_shutdown_seconds() + GRACE_MARGIN
        grace = files.duration_seconds(service.get("stop_grace_period", "10s"))
        assert grace >= need, f"{name}: stop_grace_period {grace} s < {need} s"


# ---- Kubernetes ------------------------------------------------------------------------------


def _containers() -> list[Container]:
    return list(files.containers())


def _program(container: Container) -> str:
    return inventory.program_of(container.argv)


def _deployment_of(program: str) -> Manifest:
    found = [
        m
        for m in files.of_kind("Deployment")
        if any(_program(c) == program for c in _containers() if c.workload == m)
    ]
    assert len(found) == 1, f"one Deployment runs the {program}"
    return found[0]


def _container_of(program: str) -> Container:
    (container,) = [c for c in _containers() if _program(c) == program]
    return container


def test_manifests_are_namespace_free_and_all_listed() -> None:
    kustomization = yaml.safe_load(files.KUSTOMIZATION.read_text())
    listed = set(kustomization["resources"])
    assert listed == {p.name for p in files.manifest_files()}
    for manifest in files.manifests():
        assert manifest.kind != "Namespace"
        assert "namespace" not in manifest.doc["metadata"], f"{manifest.file}: {manifest.name}"
    kinds = sorted(m.kind for m in files.manifests())
    for kind in (
        "ConfigMap",
        "Secret",
        "Job",
        "HorizontalPodAutoscaler",
    ):
        assert kind in kinds
    assert kinds.count("Deployment") == 2
    assert kinds.count("PodDisruptionBudget") == 2
    assert kinds.count("Service") == 2


def test_k8s_images_are_this_version_of_the_image() -> None:
    version = inventory.pyproject()["project"]["version"]
    for container in _containers():
        assert container.spec["image"] == f"exportlog:{version}", container.label
    kustomization = yaml.safe_load(files.KUSTOMIZATION.read_text())
    for image in kustomization.get("images", []):
        assert image["name"] == "exportlog"
        assert image.get("newTag", version) == version


@pytest.mark.parametrize("container", _containers(), ids=lambda c: c.label)
def test_k8s_container_sets_only_what_its_program_reads(container: Container) -> None:
    program = _program(container)
    read = inventory.inventory().read_by(program)
    unread = sorted(set(container.set_here) - read)
    assert unread == [], f"{container.label} runs the {program}, which reads none of {unread}"
    for key, value in container.env.items():
        assert isinstance(value, str), f"{container.label}: {key} must be a string (quote it)"
    if program == CLI:
        inventory.check_cli_arguments(container.argv[1:])
        inventory.config_of(CLI, container.env)
        assert container.env.get("DATABASE_URL"), "the migration needs DATABASE_URL"
    else:
        _check_service_accepts(program, container.env)


def test_k8s_configmaps_and_secrets_hold_variables_their_users_read() -> None:
    users: dict[tuple[str, str], set[str]] = {}
    for container in _containers():
        for source in container.sources:
            users.setdefault(source, set()).update(
                inventory.inventory().read_by(_program(container))
            )
    for kind in ("ConfigMap", "Secret"):
        for manifest in files.of_kind(kind):
            key = (kind, manifest.name)
            assert key in users, f"{kind} {manifest.name} is used by no container"
            data = files.data_of(kind, manifest.name)
            unread = sorted(set(data) - users[key])
            assert unread == [], f"{kind} {manifest.name}: no container using it reads {unread}"
            for name in data:
                assert is_secret(name) == (kind == "Secret"), f"{name} belongs in a {kind}"
    for program in SERVICES:
        env = _container_of(program).env
        assert inventory.config_of(program, env).jwt_secret, f"the {program} needs a secret"


@pytest.mark.parametrize("container", _containers(), ids=lambda c: c.label)
def test_k8s_container_runs_as_non_root_with_a_read_only_root(container: Container) -> None:
    pod = files.pod_spec(container.workload).get("securityContext", {})
    own = container.spec.get("securityContext", {})
    assert own.get("runAsNonRoot", pod.get("runAsNonRoot")) is True, container.label
    uid = own.get("runAsUser", pod.get("runAsUser", files.image_uid()))
    assert uid != 0, container.label
    assert uid == files.image_uid(), "the image's folders belong to its USER"
    assert own.get("privileged") is not True
    assert own.get("allowPrivilegeEscalation") is False, container.label
    assert own.get("readOnlyRootFilesystem") is True, container.label
    assert "ALL" in own.get("capabilities", {}).get("drop", []), container.label
    assert files.pod_spec(container.workload).get("automountServiceAccountToken") is False


@pytest.mark.parametrize("container", _containers(), ids=lambda c: c.label)
def test_k8s_container_has_requests_and_limits(container: Container) -> None:
    resources = container.spec.get("resources", {})
    for kind in ("requests", "limits"):
        assert {"cpu", "memory"} <= set(resources.get(kind, {})), f"{container.label}: {kind}"


def _port_number(container: Container, port: int | str) -> int:
    if isinstance(port, int):
        return port
    (number,) = [p["containerPort"] for p in container.spec["ports"] if p.get("name") == port]
    return int(number)


@pytest.mark.parametrize("program", SERVICES)
async def test_k8s_deployment_probes_and_ports_match_the_service(program: str) -> None:
    deployment = _deployment_of(program)
    container = _container_of(program)
    assert deployment.doc["spec"]["replicas"] == 2
    port = inventory.config_of(program, container.env).port
    assert [p["containerPort"] for p in container.spec["ports"]] == [port]
    assert await inventory.route(program, LIVENESS)
    assert await inventory.route(program, READINESS)
    for probe, path in (("readinessProbe", READINESS), ("livenessProbe", LIVENESS)):
        get = container.spec[probe]["httpGet"]
        assert get["path"] == path, f"{program} {probe}"
        assert _port_number(container, get["port"]) == port, f"{program} {probe} port"


def test_k8s_services_select_their_deployment_and_reach_its_port() -> None:
    deployments = {p: _deployment_of(p) for p in SERVICES}
    for service in files.of_kind("Service"):
        selector = service.doc["spec"]["selector"]
        matched = [
            p for p, d in deployments.items() if files.selects(selector, files.pod_labels(d))
        ]
        assert len(matched) == 1, f"Service {service.name} selects {matched}"
        container = _container_of(matched[0])
        port = inventory.config_of(matched[0], container.env).port
        for entry in service.doc["spec"]["ports"]:
            assert _port_number(container, entry.get("targetPort", entry["port"])) == port


def _service_for(program: str) -> list[Manifest]:
    labels = files.pod_labels(_deployment_of(program))
    return [s for s in files.of_kind("Service") if files.selects(s.doc["spec"]["selector"], labels)]


async def test_k8s_urls_between_the_services() -> None:
    gateway_env = _container_of(GATEWAY).env
    url = urlsplit(inventory.config_of(GATEWAY, gateway_env).export_url)
    (service,) = _service_for(EXPORT)
    assert (url.scheme, url.hostname) == ("http", service.name), "GATEWAY_EXPORT_URL"
    assert url.port in [p["port"] for p in service.doc["spec"]["ports"]]
    public = urlsplit(inventory.config_of(EXPORT, _container_of(EXPORT).env).gateway_url)
    assert public.scheme in ("ws", "wss")
    assert await inventory.route(GATEWAY, public.path), "EXPORT_GATEWAY_URL names no gateway route"
    assert _service_for(GATEWAY)


def test_k8s_pdbs_hpa_and_spread_select_their_deployment() -> None:
    deployments = {p: _deployment_of(p) for p in SERVICES}
    budgets = files.of_kind("PodDisruptionBudget")
    for program, deployment in deployments.items():
        labels = files.pod_labels(deployment)
        assert files.selects(deployment.doc["spec"]["selector"], labels)
        mine = [b for b in budgets if files.selects(b.doc["spec"]["selector"], labels)]
        assert len(mine) == 1, f"one PodDisruptionBudget for the {program}"
        others = [d for p, d in deployments.items() if p != program]
        for other in others:
            assert not files.selects(mine[0].doc["spec"]["selector"], files.pod_labels(other))
        assert mine[0].doc["spec"]["minAvailable"] < deployment.doc["spec"]["replicas"], (
            "a budget that allows no disruption blocks every node drain"
        )
        for spread in files.pod_spec(deployment).get("topologySpreadConstraints", []):
            assert files.selects(spread["labelSelector"], labels)
    (hpa,) = files.of_kind("HorizontalPodAutoscaler")
    target = hpa.doc["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", deployments[GATEWAY].name)
    spec = hpa.doc["spec"]
    replicas = deployments[GATEWAY].doc["spec"]["replicas"]
    assert spec["minReplicas"] == replicas <= spec["maxReplicas"]
    for metric in spec["metrics"]:
        name = metric["resource"]["name"]
        assert name in _container_of(GATEWAY).spec["resources"]["requests"], name


def _pre_stop_seconds(container: Container) -> float:
    pre_stop = container.spec.get("lifecycle", {}).get("preStop")
    if not pre_stop:
        return 0.0
    if "sleep" in pre_stop:
        return float(pre_stop["sleep"]["seconds"])
    command = pre_stop["exec"]["command"]
    assert command[0] == "sleep", f"{container.label}: preStop {command}"
    return float(command[1])


@pytest.mark.parametrize("program", SERVICES)
def test_k8s_grace_period_covers_the_shutdown(program: str) -> None:
    container = _container_of(program)
    if program == GATEWAY:
        close = inventory.config_of(GATEWAY, container.env).close_timeout
        shutdown = inventory.gateway_shutdown_seconds(close)
    else:
        shutdown = inventory.export_shutdown_seconds()
    need = _pre_stop_seconds(container) + shutdown + GRACE_MARGIN
    grace = files.pod_spec(_deployment_of(program))["terminationGracePeriodSeconds"]
    assert need <= grace <= need + 30, f"{program}: grace {grace} s for a {need} s shutdown"


def test_k8s_export_writes_only_to_volumes() -> None:
    container = _container_of(EXPORT)
    deployment = _deployment_of(EXPORT)
    config = inventory.config_of(EXPORT, container.env)
    mounts = {m["mountPath"]: m for m in container.spec["volumeMounts"]}
    volumes = {v["name"]: v for v in files.pod_spec(deployment)["volumes"]}
    for path in (config.work_root, config.archive_root):
        assert path in mounts, f"{path} is not a volume"
        assert not mounts[path].get("readOnly"), f"{path}: the export writes there"
    assert config.data_root in mounts, "EXPORT_DATA_ROOT is not a volume"
    for mount in mounts.values():
        assert mount["name"] in volumes
    claims = {c.name: c for c in files.of_kind("PersistentVolumeClaim")}
    for path in (config.archive_root, config.data_root):
        volume = volumes[mounts[path]["name"]]
        # Every replica serves downloads and sweeps the same archives: one shared volume.
        claim = claims[volume["persistentVolumeClaim"]["claimName"]]
        assert "ReadWriteMany" in claim.doc["spec"]["accessModes"], path


def test_k8s_migration_job() -> None:
    (job,) = files.of_kind("Job")
    (container,) = [c for c in _containers() if c.workload == job]
    assert container.argv[:2] == ["exportlog", "migrate"]
    assert files.pod_spec(job)["restartPolicy"] in ("OnFailure", "Never")
    export = inventory.config_of(EXPORT, _container_of(EXPORT).env)
    assert export.migrate is False, "the Job migrates: replicas should not race to"


MENTIONED_COMMAND = re.compile(r"\bexportlog ([a-z]+(?: (?:--?[a-z-]+|[a-z0-9]+))*)")


def test_exportlog_commands_mentioned_in_deploy_parse() -> None:
    """Comments and docs under deploy/ tell people to run `exportlog ...`: those must exist."""
    for path in sorted(p for p in files.DEPLOY.rglob("*") if p.is_file()):
        for match in MENTIONED_COMMAND.finditer(path.read_text()):
            inventory.check_cli_arguments(match.group(1).split())
