"""Reading the deployment files: the Dockerfile (line by line), .dockerignore, the compose file,
the Kubernetes manifests and the configuration reference."""

from __future__ import annotations

import functools
import json
import re
import shlex
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tests.conftest import ROOT

DEPLOY = ROOT / "deploy"
DOCKERFILE = DEPLOY / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
COMPOSE = DEPLOY / "docker-compose.yml"
K8S = DEPLOY / "k8s"
KUSTOMIZATION = K8S / "kustomization.yaml"
CONFIGURATION = DEPLOY / "CONFIGURATION.md"

# ---- Dockerfile --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Instruction:
    keyword: str
    value: str
    stage: int
    """Index of the build stage (FROM) the instruction belongs to."""


def parse_dockerfile(text: str) -> list[Instruction]:
    """Instructions with continuation lines joined and comments dropped."""
    instructions: list[Instruction] = []
    stage = -1
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue  # also inside a continued instruction, as Docker does
        if line.endswith("\\"):
            pending += line[:-1].strip() + " "
            continue
        line, pending = pending + line, ""
        keyword, _, value = line.partition(" ")
        keyword = keyword.upper()
        if keyword == "FROM":
            stage += 1
        instructions.append(Instruction(keyword, value.strip(), stage))
    assert not pending, "the Dockerfile ends inside a continued line"
    return instructions


@dataclass(frozen=True)
class Dockerfile:
    instructions: list[Instruction]

    @property
    def final_stage(self) -> int:
        return max(i.stage for i in self.instructions)

    def stage_names(self) -> dict[str, int]:
        names = {}
        for i in self.instructions:
            if i.keyword == "FROM":
                words = i.value.split()
                if len(words) == 3 and words[1].upper() == "AS":
                    names[words[2]] = i.stage
        return names

    def of(self, keyword: str, stage: int | None = None) -> list[Instruction]:
        return [
            i
            for i in self.instructions
            if i.keyword == keyword and (stage is None or i.stage == stage)
        ]

    def env(self) -> dict[str, str]:
        """What the final stage's ENV instructions set."""
        values: dict[str, str] = {}
        for instruction in self.of("ENV", self.final_stage):
            tokens = shlex.split(instruction.value)
            if "=" not in tokens[0]:  # the old `ENV NAME value` form
                values[tokens[0]] = " ".join(tokens[1:])
            else:
                values.update(token.split("=", 1) for token in tokens)  # type: ignore[misc]
        return values

    def exec_form(self, keyword: str) -> list[str]:
        (instruction,) = self.of(keyword, self.final_stage)
        argv = json.loads(instruction.value)
        assert isinstance(argv, list), f"{keyword} must be in exec form (a JSON list)"
        return [str(a) for a in argv]

    def user(self) -> str:
        users = self.of("USER", self.final_stage)
        assert users, "the final stage sets no USER: the container would run as root"
        return users[-1].value

    def healthcheck(self) -> tuple[dict[str, str], list[str]]:
        """(options, command) of the final stage's HEALTHCHECK."""
        (instruction,) = self.of("HEALTHCHECK", self.final_stage)
        options, _, command = instruction.value.partition("CMD")
        parsed = dict(option.removeprefix("--").split("=", 1) for option in shlex.split(options))
        argv = json.loads(command)
        return parsed, [str(a) for a in argv]

    def copies(self, stage: int) -> list[tuple[list[str], str, dict[str, str]]]:
        """(sources, destination, options) of each COPY of a stage."""
        found = []
        for instruction in self.of("COPY", stage):
            words = shlex.split(instruction.value)
            options = dict(w.removeprefix("--").split("=", 1) for w in words if w.startswith("--"))
            paths = [w for w in words if not w.startswith("--")]
            found.append((paths[:-1], paths[-1], options))
        return found

    def copied_to(self, destination: str) -> str | None:
        """The build-context source copied to `destination` in the final stage, if any."""
        for sources, target, options in self.copies(self.final_stage):
            if "from" not in options and target == destination and len(sources) == 1:
                return sources[0]
        return None


@functools.cache
def dockerfile() -> Dockerfile:
    return Dockerfile(parse_dockerfile(DOCKERFILE.read_text()))


INTERPRETER_VARIABLES = frozenset({"PATH"})
"""Variables an image may set for the interpreter rather than for the services."""


def image_env() -> dict[str, str]:
    """The services' variables the image sets (what every container starts with)."""
    return {k: v for k, v in dockerfile().env().items() if k not in INTERPRETER_VARIABLES}


def image_uid() -> int:
    user = dockerfile().user().split(":")[0]
    assert user.isdigit(), f"USER {user}: use a numeric uid, so runAsNonRoot can check it"
    return int(user)


# ---- .dockerignore -----------------------------------------------------------------------------


def _pattern(pattern: str) -> re.Pattern[str]:
    """Docker's matching: `**` any number of folders, `*` and `?` never cross a `/`."""
    out = ""
    i = 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out)


@functools.cache
def dockerignore_rules() -> list[tuple[bool, re.Pattern[str]]]:
    rules = []
    for raw in DOCKERIGNORE.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        line = line.removeprefix("!").strip().strip("/")
        rules.append((negate, _pattern(line)))
    return rules


def ignored(path: str) -> bool:
    """Whether `path` (relative to the build context) is left out of the build context: the
    last pattern matching it, or one of its folders, decides."""
    parts = path.strip("/").split("/")
    prefixes = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    result = False
    for negate, pattern in dockerignore_rules():
        if any(pattern.fullmatch(p) for p in prefixes):
            result = not negate
    return result


# ---- compose -----------------------------------------------------------------------------------


@functools.cache
def compose() -> dict[str, Any]:
    document = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(document, dict)
    return document


def compose_services() -> dict[str, dict[str, Any]]:
    services = compose()["services"]
    assert isinstance(services, dict)
    return services


def is_ours(image: str | None) -> bool:
    return bool(image) and str(image).split(":")[0] == "exportlog"


def compose_environment(service: dict[str, Any]) -> dict[str, Any]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        return dict(item.split("=", 1) for item in env)
    assert isinstance(env, dict)
    return env


_INTERPOLATION = re.compile(r"\$\{(\w+)(?::?-([^}]*))?\}")


def interpolate(value: str) -> str:
    """A compose value as it would be with nothing set in the environment running compose."""
    return _INTERPOLATION.sub(lambda m: m.group(2) or f"unset-{m.group(1)}", value)


def compose_command(service: dict[str, Any]) -> list[str]:
    command = service.get("command")
    if command is None:
        return dockerfile().exec_form("CMD")
    if isinstance(command, str):
        return shlex.split(command)
    return [str(c) for c in command]


def duration_seconds(text: str) -> float:
    """A compose duration: `30s`, `1m30s`, `2m`."""
    total = 0.0
    units = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}
    matched = re.fullmatch(r"(?:\d+(?:\.\d+)?(?:ms|h|m|s))+", text)
    assert matched, f"not a duration: {text!r}"
    for number, unit in re.findall(r"(\d+(?:\.\d+)?)(ms|h|m|s)", text):
        total += float(number) * units[unit]
    return total


@dataclass(frozen=True)
class Mount:
    source: str
    target: str
    read_only: bool


def compose_mounts(service: dict[str, Any]) -> list[Mount]:
    mounts = []
    for volume in service.get("volumes") or []:
        if isinstance(volume, str):
            parts = volume.split(":")
            mounts.append(Mount(parts[0], parts[1], len(parts) > 2 and "ro" in parts[2]))
        else:
            mounts.append(Mount(volume["source"], volume["target"], bool(volume.get("read_only"))))
    return mounts


def published_ports(service: dict[str, Any]) -> list[tuple[str, int, int]]:
    """(host address, host port, container port) of each published port."""
    found = []
    for entry in service.get("ports") or []:
        parts = str(entry).split(":")
        assert len(parts) == 3, f"publish {entry!r} on an explicit address"
        found.append((parts[0], int(parts[1]), int(parts[2])))
    return found


# ---- Kubernetes --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Manifest:
    file: str
    doc: dict[str, Any]

    @property
    def kind(self) -> str:
        return str(self.doc["kind"])

    @property
    def name(self) -> str:
        return str(self.doc["metadata"]["name"])


def manifest_files() -> list[Path]:
    return sorted(p for p in K8S.iterdir() if p.suffix in (".yaml", ".yml") and p != KUSTOMIZATION)


@functools.cache
def manifests() -> list[Manifest]:
    found = []
    for path in manifest_files():
        for doc in yaml.safe_load_all(path.read_text()):
            if doc is not None:
                found.append(Manifest(path.name, doc))
    return found


def of_kind(kind: str) -> list[Manifest]:
    return [m for m in manifests() if m.kind == kind]


def named(kind: str, name: str) -> Manifest:
    found = [m for m in of_kind(kind) if m.name == name]
    assert len(found) == 1, f"expected one {kind} named {name}, found {len(found)}"
    return found[0]


def pod_spec(manifest: Manifest) -> dict[str, Any]:
    spec = manifest.doc["spec"]["template"]["spec"]
    assert isinstance(spec, dict)
    return spec


def pod_labels(manifest: Manifest) -> dict[str, str]:
    labels = manifest.doc["spec"]["template"]["metadata"]["labels"]
    assert isinstance(labels, dict)
    return labels


def workloads() -> list[Manifest]:
    return [m for m in manifests() if m.kind in ("Deployment", "StatefulSet", "DaemonSet", "Job")]


@dataclass
class Container:
    workload: Manifest
    spec: dict[str, Any]
    env: dict[str, str] = field(default_factory=dict)
    """Everything the container's process finds in its environment, later sources winning: the
    image's ENV, then envFrom, then env."""
    set_here: dict[str, str] = field(default_factory=dict)
    """What `env:` entries set directly on the container."""
    sources: list[tuple[str, str]] = field(default_factory=list)
    """(kind, name) of each ConfigMap and Secret in envFrom."""

    @property
    def argv(self) -> list[str]:
        command = self.spec.get("command")
        args = self.spec.get("args")
        if command is None:
            command = dockerfile().exec_form("CMD") if args is None else []
        return [str(a) for a in [*command, *(args or [])]]

    @property
    def label(self) -> str:
        return f"{self.workload.kind}/{self.workload.name}:{self.spec['name']}"


def data_of(kind: str, name: str) -> dict[str, str]:
    manifest = named(kind, name)
    data = dict(manifest.doc.get("data") or {})
    data.update(manifest.doc.get("stringData") or {})
    return data


def containers() -> Iterator[Container]:
    for workload in workloads():
        spec = pod_spec(workload)
        for container_spec in [*spec.get("initContainers", []), *spec["containers"]]:
            container = Container(workload, container_spec, env=dict(image_env()))
            for source in container_spec.get("envFrom", []):
                if "configMapRef" in source:
                    kind, name = "ConfigMap", source["configMapRef"]["name"]
                else:
                    kind, name = "Secret", source["secretRef"]["name"]
                container.sources.append((kind, name))
                container.env.update(data_of(kind, name))
            for entry in container_spec.get("env", []):
                if "value" in entry:
                    value = entry["value"]
                else:
                    ref = entry["valueFrom"]
                    if "secretKeyRef" in ref:
                        value = data_of("Secret", ref["secretKeyRef"]["name"])[
                            ref["secretKeyRef"]["key"]
                        ]
                    elif "configMapKeyRef" in ref:
                        value = data_of("ConfigMap", ref["configMapKeyRef"]["name"])[
                            ref["configMapKeyRef"]["key"]
                        ]
                    else:
                        value = "from-the-downward-api"
                container.set_here[entry["name"]] = value
                container.env[entry["name"]] = value
            yield container


def selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    match = selector.get("matchLabels", selector)
    assert "matchExpressions" not in selector, "matchExpressions are not checked here"
    return bool(match) and all(labels.get(k) == v for k, v in match.items())


# ---- CONFIGURATION.md --------------------------------------------------------------------------


@dataclass(frozen=True)
class Row:
    name: str
    default: str
    meaning: str
    read_by: frozenset[str]


def configuration_tables() -> list[list[list[str]]]:
    """Each Markdown table of the reference, as rows of cells (header and rule dropped)."""
    tables: list[list[list[str]]] = []
    current: list[list[str]] | None = None
    for line in CONFIGURATION.read_text().splitlines():
        if line.startswith("|"):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if current is None:
                current = []
                tables.append(current)
                continue  # the header
            if all(re.fullmatch(r":?-+:?", c) for c in cells):
                continue
            current.append(cells)
        else:
            current = None
    return tables


def configuration_rows() -> list[Row]:
    tables = configuration_tables()
    assert len(tables) == 1, f"CONFIGURATION.md should hold one table, it holds {len(tables)}"
    rows = []
    for cells in tables[0]:
        assert len(cells) == 4, f"a row of four cells expected: {cells}"
        name = re.fullmatch(r"`([A-Z][A-Z0-9_]*)`", cells[0])
        assert name, f"the first cell names one variable in backticks: {cells[0]!r}"
        readers = frozenset(r.strip() for r in cells[3].split(","))
        rows.append(Row(name.group(1), cells[1], cells[2], readers))
    return rows
