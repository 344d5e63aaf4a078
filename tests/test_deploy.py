"""Deployment files: the Dockerfiles, the compose files (docker-compose.yml, and
compose.cluster.yml with its gateway and haproxy configs) and the systemd unit."""

from __future__ import annotations

import configparser
import dataclasses
import re
import shlex
import subprocess
import sys
import urllib.parse
from pathlib import Path
from typing import Any

import pytest
import yaml

from gateway import config, listener
from gateway.__main__ import main
from gateway.store import sqlite_path

REPO = Path(__file__).resolve().parent.parent
DOCKERFILES = ("Dockerfile", "asterisk-config/docker/Dockerfile")
COMPOSE = REPO / "docker-compose.yml"
UNIT = REPO / "asterisk-config" / "systemd" / "otp-gateway.service"
HADOLINT = Path(sys.executable).parent / "hadolint"
REQUIRED_SECRETS = ("AMI_SECRET", "OTP_CODE_SECRET")
CLUSTER_DIR = REPO / "asterisk-config" / "docker"
CLUSTER_COMPOSE = CLUSTER_DIR / "compose.cluster.yml"
CLUSTER_CONFIG = CLUSTER_DIR / "config.cluster.yaml"
HAPROXY_CFG = CLUSTER_DIR / "haproxy.cfg"
# Where the official haproxy image reads its configuration.
HAPROXY_CFG_TARGET = "/usr/local/etc/haproxy/haproxy.cfg"
# Compose interpolation: ${NAME:?message} refuses to start without NAME, ${NAME:-x} defaults.
ENV_REF = re.compile(r"\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*):(?P<op>[?-])(?P<rest>[^}]*)\}")


@dataclasses.dataclass(frozen=True)
class ComposeFile:
    """A compose file of the repo, and the roles of its services."""

    path: Path
    gateways: tuple[str, ...]
    asterisks: tuple[str, ...]
    others: tuple[str, ...]
    config: Path  # the gateway config its gateways mount
    required_secrets: tuple[str, ...]

    def load(self) -> dict[str, Any]:
        doc: dict[str, Any] = yaml.safe_load(self.path.read_text())
        return doc

    def resolve(self, relative: str) -> Path:
        """A path of the file (a build context, a bind mount's source): relative to it."""
        return (self.path.parent / relative).resolve()


SINGLE = ComposeFile(
    COMPOSE,
    gateways=("gateway",),
    asterisks=("asterisk",),
    others=(),
    config=CLUSTER_DIR / "config.yaml",
    required_secrets=REQUIRED_SECRETS,
)
CLUSTER = ComposeFile(
    CLUSTER_COMPOSE,
    gateways=("gateway-a", "gateway-b"),
    asterisks=("asterisk-a", "asterisk-b"),
    others=("postgres", "lb"),
    config=CLUSTER_CONFIG,
    required_secrets=(*REQUIRED_SECRETS, "POSTGRES_PASSWORD"),
)


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return SINGLE.load()


@pytest.fixture(scope="module")
def cluster() -> dict[str, Any]:
    return CLUSTER.load()


@pytest.fixture(scope="module", params=[SINGLE, CLUSTER], ids=lambda f: f.path.name)
def compose_file(request: pytest.FixtureRequest) -> tuple[ComposeFile, dict[str, Any]]:
    """Each compose file, with its parsed document."""
    file: ComposeFile = request.param
    return file, file.load()


def dockerfile_setting(pattern: str) -> str:
    """The first match of `pattern`'s group in the gateway's Dockerfile."""
    match = re.search(pattern, (REPO / "Dockerfile").read_text(), re.MULTILINE)
    assert match, pattern
    return match.group(1)


def healthcheck(service: dict[str, Any]) -> str:
    test = service["healthcheck"]["test"]
    return test if isinstance(test, str) else " ".join(test)


def unit() -> configparser.ConfigParser:
    parsed = configparser.ConfigParser(strict=False, interpolation=None)
    parsed.optionxform = str  # type: ignore[assignment,method-assign]
    parsed.read_string(UNIT.read_text())
    return parsed


def environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment", {})
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {name: str(value) for name, value in env.items()}


def mounts(service: dict[str, Any]) -> dict[str, tuple[str, list[str]]]:
    """A service's volumes (short syntax): target -> (source, options)."""
    found = {}
    for volume in service.get("volumes", []):
        source, target, *options = volume.split(":")
        found[target] = (source, options)
    return found


def copied_sources(dockerfile: Path) -> list[str]:
    """The build-context paths the Dockerfile's COPY lines read (not --from= ones)."""
    sources: list[str] = []
    for line in dockerfile.read_text().splitlines():
        words = line.split()
        if not words or words[0] != "COPY" or any(w.startswith("--from=") for w in words):
            continue
        sources.extend(w for w in words[1:-1] if not w.startswith("--"))
    return sources


def haproxy_sections(text: str) -> dict[str, list[list[str]]]:
    """haproxy.cfg as section header ("backend gateways") -> its lines' words."""
    sections: dict[str, list[list[str]]] = {}
    lines: list[list[str]] = []
    for line in text.splitlines():
        words = line.split("#", 1)[0].split()
        if not words:
            continue
        if line[0].isspace():
            lines.append(words)
        else:
            lines = sections.setdefault(" ".join(words), [])
    return sections


@pytest.mark.parametrize("dockerfile", DOCKERFILES)
def test_dockerfile_passes_hadolint_without_a_finding(dockerfile: str) -> None:
    result = subprocess.run(
        [str(HADOLINT), "--no-color", "--failure-threshold", "error", dockerfile],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    # Warnings and infos do not fail the threshold; none is the standard kept.
    assert result.stdout + result.stderr == ""


def test_compose_builds_the_gateway_and_asterisk(
    compose_file: tuple[ComposeFile, dict[str, Any]],
) -> None:
    file, doc = compose_file
    services = doc["services"]
    assert set(services) == {*file.gateways, *file.asterisks, *file.others}
    for names, dockerfile in ((file.gateways, "Dockerfile"), (file.asterisks, DOCKERFILES[1])):
        for name in names:
            build = services[name]["build"]
            context = file.resolve(build["context"])
            assert (context / build.get("dockerfile", "Dockerfile")).resolve() == REPO / dockerfile
            for source in copied_sources(REPO / dockerfile):
                assert (context / source).exists(), f"{name}: {source} is not in its context"
    for gateway in file.gateways:
        for asterisk in file.asterisks:
            assert asterisk in services[gateway]["depends_on"], gateway


def test_compose_gateway_is_health_checked_on_healthz(
    compose_file: tuple[ComposeFile, dict[str, Any]],
) -> None:
    file, doc = compose_file
    for gateway in file.gateways:
        assert "/healthz" in healthcheck(doc["services"][gateway]), gateway


def test_compose_mounts_a_config_file_of_the_repo_where_the_image_reads_it(
    compose_file: tuple[ComposeFile, dict[str, Any]],
) -> None:
    file, doc = compose_file
    config_path = dockerfile_setting(r"OTP_GATEWAY_CONFIG=(\S+)")
    for gateway in file.gateways:
        source, options = mounts(doc["services"][gateway])[config_path]
        assert file.resolve(source) == file.config, gateway
        assert file.config.is_file()
        assert options == ["ro"], gateway


def test_compose_keeps_the_sqlite_state_in_a_named_volume(compose: dict[str, Any]) -> None:
    state_path = dockerfile_setting(r'^VOLUME \["([^"]+)"\]')
    source, _ = mounts(compose["services"]["gateway"])[state_path]
    assert source in compose["volumes"], "the state is a named volume"


def test_compose_publishes_ports_on_loopback_only(
    compose_file: tuple[ComposeFile, dict[str, Any]],
) -> None:
    _, doc = compose_file
    for name, service in doc["services"].items():
        assert service.get("network_mode") != "host", name
        for port in service.get("ports", []):
            host_ip = port.get("host_ip") if isinstance(port, dict) else str(port).split(":")[0]
            assert host_ip == "127.0.0.1", f"{name}: {port}"


def test_compose_takes_secrets_from_the_environment_only(
    compose_file: tuple[ComposeFile, dict[str, Any]],
) -> None:
    file, doc = compose_file
    for name, service in doc["services"].items():
        for variable, value in environment(service).items():
            if "SECRET" not in variable and "PASSWORD" not in variable:
                continue
            ref = ENV_REF.fullmatch(value)
            assert ref and ref["name"] == variable, f"{name}: {variable} is written literally"
            if variable in file.required_secrets:
                assert ref["op"] == "?", f"{name}: {variable} must be required with ${{...:?}}"
    for gateway in file.gateways:
        for variable in file.required_secrets:
            assert variable in environment(doc["services"][gateway]), gateway
    for asterisk in file.asterisks:
        assert "AMI_SECRET" in environment(doc["services"][asterisk]), asterisk


def test_compose_gateway_config_loads_with_the_compose_environment(
    compose: dict[str, Any],
) -> None:
    gateway = compose["services"]["gateway"]
    environ = {}
    for variable, value in environment(gateway).items():
        ref = ENV_REF.fullmatch(value)
        assert ref, variable
        # What compose passes: a value for a required variable, the default for others.
        environ[variable] = "a-long-random-value-for-tests" if ref["op"] == "?" else ref["rest"]
    mounted = next(v.split(":")[0] for v in gateway["volumes"] if "config.yaml" in v)

    cfg = config.load(REPO / mounted, environ)

    assert cfg.asterisk.host in compose["services"]
    assert cfg.http.host == "0.0.0.0"  # noqa: S104 - inside the container; published on loopback
    assert any(port.endswith(f":{cfg.http.port}") for port in gateway["ports"])
    assert f":{cfg.http.port}/healthz" in healthcheck(gateway)
    state_path = dockerfile_setting(r'^VOLUME \["([^"]+)"\]')
    assert Path(sqlite_path(config.database_url(cfg.database))).parent == Path(state_path)


def test_systemd_unit_runs_the_gateway_as_its_own_user() -> None:
    parsed = unit()
    service = parsed["Service"]

    argv = shlex.split(service["ExecStart"])
    assert argv[1:4] == ["-m", "gateway", "run"]
    assert service["User"] not in ("", "root")
    assert service["Restart"] == "on-failure"
    assert service["EnvironmentFile"]
    assert service["NoNewPrivileges"] == "yes"
    assert service["ProtectSystem"] == "strict"
    assert "asterisk.service" in parsed["Unit"]["After"]


def test_systemd_unit_flags_are_the_gateways(tmp_path: Path) -> None:
    """The CLI accepts ExecStart's arguments: it gets to reading the (missing) config."""
    argv = shlex.split(unit()["Service"]["ExecStart"])
    args = [tmp_path / "absent.yaml" if arg.endswith(".yaml") else arg for arg in argv[3:]]
    assert main([str(arg) for arg in args]) == 1


def _seconds(value: str) -> float:
    """A systemd or Compose duration in seconds: 150, 150s, 2min 30s, 2m30s."""
    units = {"": 1, "s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600}
    parts = re.findall(r"(\d+(?:\.\d+)?)\s*([a-z]*)", value)
    assert parts, value
    return sum(float(n) * units[unit] for n, unit in parts)


def _longest_configs() -> list[config.Config]:
    """The defaults, and the call settings at their maxima (which a config may set)."""
    base = config.load(
        REPO / "config.example.yaml", {"AMI_SECRET": "x", "OTP_CODE_SECRET": "y" * 16}
    )
    calls = config.CallsConfig(
        max_ring_seconds=config.MAX_RING_SECONDS,
        max_post_dial_seconds=config.MAX_POST_DIAL_SECONDS,
    )
    return [base, dataclasses.replace(base, calls=calls)]


def test_systemd_unit_waits_for_the_longest_shutdown() -> None:
    stop = _seconds(unit()["Service"]["TimeoutStopSec"])
    for cfg in _longest_configs():
        assert stop > config.shutdown_seconds(cfg), cfg.calls


def test_compose_waits_for_the_longest_shutdown(
    compose_file: tuple[ComposeFile, dict[str, Any]],
) -> None:
    file, doc = compose_file
    for gateway in file.gateways:
        grace = _seconds(doc["services"][gateway]["stop_grace_period"])
        for cfg in _longest_configs():
            assert grace > config.shutdown_seconds(cfg), (gateway, cfg.calls)


def test_systemd_unit_allows_the_open_files_the_connections_need() -> None:
    needed = (
        config.HttpConfig().max_connections
        + listener.OPERATOR_MAX_CONNECTIONS
        + listener.RESERVED_FILES
    )
    assert int(unit()["Service"]["LimitNOFILE"]) >= needed


def test_the_state_directory_is_for_the_gateways_user_alone() -> None:
    assert unit()["Service"]["StateDirectoryMode"] == "0700"
    assert unit()["Service"]["UMask"] == "0077"
    assert "-m 0700 /var/lib/otp-gateway" in (REPO / "Dockerfile").read_text()


def test_compose_publishes_the_operator_listener_on_loopback_only(
    compose: dict[str, Any],
) -> None:
    gateway = compose["services"]["gateway"]
    mounted = next(v.split(":")[0] for v in gateway["volumes"] if "config.yaml" in v)
    environ = {"AMI_SECRET": "x", "OTP_CODE_SECRET": "y" * 16}
    cfg = config.load(REPO / mounted, environ)
    # Inside the container it listens on every address; the host publishes it on loopback.
    assert cfg.http.operator_host == "0.0.0.0"  # noqa: S104
    published = [str(port).split("#")[0].strip() for port in gateway["ports"]]
    assert f"127.0.0.1:{cfg.http.operator_port}:{cfg.http.operator_port}" in published
    assert str(cfg.http.operator_port) in dockerfile_setting(r"^EXPOSE (.+)$").split()


def _compose_environ(service: dict[str, Any]) -> dict[str, str]:
    """What compose passes a service: a value for a required variable, the default for
    an optional one, and a literal as written."""
    environ = {}
    for variable, value in environment(service).items():
        ref = ENV_REF.fullmatch(value)
        if ref is None:
            environ[variable] = value
        else:
            environ[variable] = "a0long0random0value0for0tests" if ref["op"] == "?" else ref["rest"]
    return environ


def test_cluster_runs_postgres_for_the_gateways_and_an_lb_in_front(
    cluster: dict[str, Any],
) -> None:
    services = cluster["services"]
    postgres = services["postgres"]
    assert re.fullmatch(r"postgres:\d+", postgres["image"]), "pinned by major"
    assert "ports" not in postgres, "only the gateways reach the database"
    assert "pg_isready" in healthcheck(postgres)
    (source, _), *_ = mounts(postgres).values()
    assert source in cluster["volumes"], "the database is a named volume"
    for gateway in CLUSTER.gateways:
        assert services[gateway]["depends_on"]["postgres"]["condition"] == "service_healthy"
        assert "ports" not in services[gateway] or all(
            not str(port).split("#")[0].strip().endswith(":8080")
            for port in services[gateway]["ports"]
        ), f"{gateway}: the API is reached through the lb only"
    names = [environment(services[g])["OTP_INSTANCE_NAME"] for g in CLUSTER.gateways]
    assert names == list(CLUSTER.gateways)

    lb = services["lb"]
    assert re.fullmatch(r"haproxy:\d+\.\d+", lb["image"]), "pinned by major"
    source, options = mounts(lb)[HAPROXY_CFG_TARGET]
    assert CLUSTER.resolve(source) == HAPROXY_CFG
    assert options == ["ro"]
    assert lb["ports"] == ["127.0.0.1:8080:8080"]


def test_cluster_lb_checks_readyz_on_both_gateways_round_robin(
    cluster: dict[str, Any],
) -> None:
    sections = haproxy_sections(HAPROXY_CFG.read_text())
    lb_port = cluster["services"]["lb"]["ports"][0].rsplit(":", 1)[1]
    (frontend,) = (lines for name, lines in sections.items() if name.startswith("frontend "))
    assert ["bind", f":{lb_port}"] in frontend
    (backend_name,) = (words[1] for words in frontend if words[0] == "default_backend")
    backend = sections[f"backend {backend_name}"]

    assert ["balance", "roundrobin"] in backend
    assert ["option", "httpchk", "GET", "/readyz"] in backend
    assert ["http-check", "expect", "status", "200"] in backend
    servers = {words[2]: words[3:] for words in backend if words[0] == "server"}
    gateway_port = dockerfile_setting(r"^EXPOSE (\d+)")
    assert set(servers) == {f"{g}:{gateway_port}" for g in CLUSTER.gateways}
    for address, options in servers.items():
        assert "check" in options, address

    defaults = {words[1]: words[2] for words in sections["defaults"] if words[0] == "timeout"}
    # The gateway's own 503 (after http.request_timeout_seconds) reaches the client.
    assert _seconds(defaults["server"]) > config.HttpConfig().request_timeout_seconds
    (hard_stop,) = (words[1] for words in sections["global"] if words[0] == "hard-stop-after")
    assert _seconds(hard_stop) < _seconds(cluster["services"]["lb"]["stop_grace_period"])


# Needs asterisk.nodes in gateway.config (added alongside this example): a gateway
# without it fails here with "asterisk.nodes: unknown key".
@pytest.mark.parametrize("gateway", CLUSTER.gateways)
def test_cluster_gateway_config_parses_with_the_compose_environment(
    cluster: dict[str, Any], gateway: str
) -> None:
    service = cluster["services"][gateway]
    environ = _compose_environ(service)
    assert {"AMI_SECRET", "OTP_CODE_SECRET", "POSTGRES_PASSWORD", "OTP_INSTANCE_NAME"} <= set(
        environ
    )
    assert len(environ["OTP_CODE_SECRET"]) >= 16

    cfg = config.parse(CLUSTER_CONFIG.read_text(), environ)

    assert config.instance_name(cfg) == gateway
    assert {node.host for node in config.nodes(cfg)} == set(CLUSTER.asterisks)
    url = urllib.parse.urlsplit(config.database_url(cfg.database))
    postgres = environment(cluster["services"]["postgres"])
    assert url.hostname == "postgres"
    assert url.username == postgres["POSTGRES_USER"]
    assert url.path == f"/{postgres['POSTGRES_DB']}"
    assert url.password == environ["POSTGRES_PASSWORD"]
    assert cfg.http.host == "0.0.0.0"  # noqa: S104 - inside the container; the lb reaches it
    assert f":{cfg.http.port}/healthz" in healthcheck(service)
    assert f"{gateway}:{cfg.http.port}" in HAPROXY_CFG.read_text()
    published = [str(port).split("#")[0].strip() for port in service["ports"]]
    assert any(p.endswith(f":{cfg.http.operator_port}") for p in published)
