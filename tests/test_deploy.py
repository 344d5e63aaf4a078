"""Deployment files: the Dockerfiles, docker-compose.yml and the systemd unit."""

from __future__ import annotations

import configparser
import dataclasses
import re
import shlex
import subprocess
import sys
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
# Compose interpolation: ${NAME:?message} refuses to start without NAME, ${NAME:-x} defaults.
ENV_REF = re.compile(r"\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*):(?P<op>[?-])(?P<rest>[^}]*)\}")


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())
    return doc


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


def test_compose_builds_the_gateway_and_asterisk(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert set(services) == {"asterisk", "gateway"}
    for name, dockerfile in (("gateway", "Dockerfile"), ("asterisk", DOCKERFILES[1])):
        build = services[name]["build"]
        built = (REPO / build["context"] / build.get("dockerfile", "Dockerfile")).resolve()
        assert built == REPO / dockerfile
    depends_on = services["gateway"]["depends_on"]
    assert "asterisk" in depends_on


def test_compose_gateway_is_health_checked_on_healthz(compose: dict[str, Any]) -> None:
    assert "/healthz" in healthcheck(compose["services"]["gateway"])


def test_compose_mounts_a_config_file_of_the_repo_where_the_image_reads_it(
    compose: dict[str, Any],
) -> None:
    config_path = dockerfile_setting(r"OTP_GATEWAY_CONFIG=(\S+)")
    state_path = dockerfile_setting(r'^VOLUME \["([^"]+)"\]')
    mounts = {}
    for volume in compose["services"]["gateway"]["volumes"]:
        source, target, *options = volume.split(":")
        mounts[target] = (source, options)
    source, options = mounts[config_path]
    assert (REPO / source).is_file()
    assert options == ["ro"]
    source, _ = mounts[state_path]
    assert source in compose["volumes"], "the state is a named volume"


def test_compose_publishes_ports_on_loopback_only(compose: dict[str, Any]) -> None:
    for name, service in compose["services"].items():
        assert service.get("network_mode") != "host", name
        for port in service.get("ports", []):
            host_ip = port.get("host_ip") if isinstance(port, dict) else str(port).split(":")[0]
            assert host_ip == "127.0.0.1", f"{name}: {port}"


def test_compose_takes_secrets_from_the_environment_only(compose: dict[str, Any]) -> None:
    for name, service in compose["services"].items():
        for variable, value in environment(service).items():
            if "SECRET" not in variable:
                continue
            ref = ENV_REF.fullmatch(value)
            assert ref and ref["name"] == variable, f"{name}: {variable} is written literally"
            if variable in REQUIRED_SECRETS:
                assert ref["op"] == "?", f"{name}: {variable} must be required with ${{...:?}}"
    for variable in REQUIRED_SECRETS:
        assert variable in environment(compose["services"]["gateway"])
    assert "AMI_SECRET" in environment(compose["services"]["asterisk"])


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


def test_compose_waits_for_the_longest_shutdown(compose: dict[str, Any]) -> None:
    grace = _seconds(compose["services"]["gateway"]["stop_grace_period"])
    for cfg in _longest_configs():
        assert grace > config.shutdown_seconds(cfg), cfg.calls


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
