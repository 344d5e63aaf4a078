"""The command line: check-config and keys, run as an operator would."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SECRETS = {"AMI_SECRET": "ami-secret-for-cli-tests", "OTP_CODE_SECRET": "code-secret-for-cli-tests"}


def gateway(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway", *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={"PATH": "/usr/bin:/bin", **(env or {})},
        timeout=60,
    )


@pytest.fixture
def config_file(tmp_path: Path) -> Path:
    text = (REPO / "config.example.yaml").read_text()
    path = tmp_path / "config.yaml"
    path.write_text(text.replace("var/gateway.sqlite3", str(tmp_path / "gw.sqlite3")))
    return path


def test_check_config_summarises_a_valid_file_without_secrets(config_file: Path) -> None:
    result = gateway("check-config", "--config", str(config_file), env=SECRETS)
    assert result.returncode == 0, result.stderr
    assert "pool default: +6221500XXXX, 10000 codes (13.3 bits)" in result.stdout
    for secret in SECRETS.values():
        assert secret not in result.stdout + result.stderr


def test_check_config_lists_every_problem_with_its_key_path(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(
        "asterisk: {secret: '${AMI_SECRET}', port: 99999}\n"
        "pools: [{name: tiny, numbers: ['+622150001234']}]\n"
        "calls: {ring_seconds: 99, colour: blue}\n"
    )
    result = gateway("check-config", "--config", str(path))
    assert result.returncode == 1
    for expected in (
        "asterisk.secret: environment variable AMI_SECRET is not set",
        "security: required",
        "calls.colour: unknown key",
    ):
        assert expected in result.stderr


def test_low_entropy_pool_needs_the_override_and_then_warns(tmp_path: Path) -> None:
    path = tmp_path / "low.yaml"
    pool = "{name: tiny, numbers: ['+622150001234', '+622150005678'], code_length: 4%s}"
    base = "asterisk: {secret: s}\nsecurity: {code_secret: 0123456789abcdef}\npools: [%s]\n"
    path.write_text(base % (pool % ""))
    refused = gateway("check-config", "--config", str(path))
    assert refused.returncode == 1
    assert "only 2 codes" in refused.stderr
    path.write_text(base % (pool % ", allow_low_entropy: true"))
    accepted = gateway("check-config", "--config", str(path))
    assert accepted.returncode == 0, accepted.stderr
    assert "warning: allow_low_entropy" in accepted.stdout
    assert "wins 1 time in" in accepted.stdout


def test_check_config_warns_when_sandbox_numbers_are_on(config_file: Path) -> None:
    with config_file.open("a") as out:
        out.write('test_numbers:\n  "+6281200000001": "4321"\n')
    result = gateway("check-config", "--config", str(config_file), env=SECRETS)
    assert result.returncode == 0, result.stderr
    assert "warning: test_numbers is set: 1 phones are never called" in result.stdout


def test_keys_create_list_revoke(config_file: Path) -> None:
    args = ("--config", str(config_file))
    created = gateway("keys", "create", "checkout", *args, env=SECRETS)
    assert created.returncode == 0, created.stderr
    key = created.stdout.strip().splitlines()[-1]
    assert key.startswith("otpk_") and len(key) > 40

    listed = gateway("keys", "list", *args, env=SECRETS)
    assert "checkout" in listed.stdout and "active" in listed.stdout
    assert key not in listed.stdout

    # The main file and its WAL: a fresh write may still sit in the WAL.
    stored = b"".join(p.read_bytes() for p in config_file.parent.glob("gw.sqlite3*"))
    assert b"checkout" in stored
    assert key.encode() not in stored

    revoked = gateway("keys", "revoke", "checkout", *args, env=SECRETS)
    assert revoked.returncode == 0
    assert "revoked" in gateway("keys", "list", *args, env=SECRETS).stdout
    again = gateway("keys", "revoke", "checkout", *args, env=SECRETS)
    assert again.returncode == 1


def test_check_config_shows_the_guessing_odds(config_file: Path) -> None:
    result = gateway("check-config", "--config", str(config_file), env=SECRETS)
    assert result.returncode == 0, result.stderr
    assert "1 in 500 (0.2%) per 30 days through one API key" in result.stdout


def test_keys_have_a_scope_verify_unless_admin_is_asked_for(config_file: Path) -> None:
    args = ("--config", str(config_file))
    assert gateway("keys", "create", "checkout", *args, env=SECRETS).returncode == 0
    admin = gateway("keys", "create", "ops", "--scope", "admin", *args, env=SECRETS)
    assert admin.returncode == 0, admin.stderr
    assert "scope admin" in admin.stdout
    refused = gateway("keys", "create", "root", "--scope", "root", *args, env=SECRETS)
    assert refused.returncode == 2
    assert "invalid choice" in refused.stderr

    listed = gateway("keys", "list", *args, env=SECRETS).stdout.splitlines()
    scopes = {line.split("\t")[1]: line.split("\t")[4] for line in listed}
    assert scopes == {"checkout": "verify", "ops": "admin"}


def test_numbers_check_reports_a_csv_offline(tmp_path: Path) -> None:
    source = tmp_path / "numbers.csv"
    source.write_text("phone\n+6281234567890\n0817 1234 5678\n+62215551234\n+62812\nhello\n")
    report = tmp_path / "report.csv"
    result = gateway("numbers", "check", str(source), "--output", str(report), "--region", "ID")
    assert result.returncode == 0, result.stderr
    lines = report.read_text().splitlines()
    assert lines[0] == "input,e164,valid,type,reason,carrier,region"
    assert lines[1:] == [
        "+6281234567890,+6281234567890,true,mobile,,Telkomsel,ID",
        "0817 1234 5678,+6281712345678,true,mobile,,XL,ID",
        "+62215551234,+62215551234,true,fixed_line,,,ID",
        "+62812,,false,,too_short,,",
        "hello,,false,,not_a_number,,",
    ]
    assert "Checked 5 numbers: 3 valid" in result.stderr


def unused_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.parametrize("command", [("run",), ("keys", "list")])
def test_an_unreachable_database_stops_the_command_naming_the_key(
    config_file: Path, command: tuple[str, ...]
) -> None:
    """Nothing listens on the port: the command exits 1 at once, saying which key and
    where, and never shows the password."""
    port = unused_port()
    url = f"postgresql://otp:pg-password-never-shown@127.0.0.1:{port}/otp"
    text = config_file.read_text()
    config_file.write_text(text.replace(f"sqlite:///{config_file.parent}/gw.sqlite3", url))
    assert url in config_file.read_text()
    result = gateway(*command, "--config", str(config_file), env=SECRETS)
    assert result.returncode == 1
    output = result.stdout + result.stderr
    assert f"database.url: cannot connect to 127.0.0.1:{port}/otp" in output
    assert "pg-password-never-shown" not in output
    assert "Traceback" not in output


def test_check_config_and_run_refuse_two_nodes_of_one_name(tmp_path: Path) -> None:
    path = tmp_path / "nodes.yaml"
    path.write_text(
        "asterisk:\n  secret: s\n  nodes: [{name: a, port: 5038}, {name: a, port: 5039}]\n"
        "security: {code_secret: 0123456789abcdef}\n"
        "pools: [{name: p, prefix: '+6221500'}]\n"
    )
    for command in ("check-config", "run"):
        result = gateway(command, "--config", str(path))
        assert result.returncode == 1, command
        assert "asterisk.nodes[1].name: 'a' is also asterisk.nodes[0]'s name" in result.stderr


def test_config_reference_prints_checks_and_needs_no_config() -> None:
    printed = gateway("config-reference")
    assert printed.returncode == 0, printed.stderr
    assert "==> docs/operator/configuration.md, between its markers <==" in printed.stdout
    assert "| `http.port` | `8080` | 1-65535 | listen port |" in printed.stdout
    assert "==> config.example.yaml <==" in printed.stdout
    assert printed.stdout.endswith((REPO / "config.example.yaml").read_text())
    checked = gateway("config-reference", "--check")
    assert checked.returncode == 0, checked.stderr
    both = gateway("config-reference", "--check", "--write")
    assert both.returncode == 2
    assert "not allowed with argument" in both.stderr
