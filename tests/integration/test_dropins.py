"""The operator's drop-ins (asterisk-config/*.conf) in the real dev Asterisk.

The files are loaded as shipped, with their CHANGE-ME placeholders filled in and their
sections renamed (otp-trunk becomes otp-dropin-trunk, ...) so that they sit beside the
dev overlay's. They are written to the PBX root's etc/asterisk/otp-test/, which the dev
PBX's files pull in with #tryinclude (pbx.sh), and removed again after the tests.
The trunk's carrier is the field far end, which, like many carriers, ignores OPTIONS.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import re
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from panoramisk import Manager
from panoramisk.message import Message

from gateway.pbx import (
    AmiPbx,
    AmiSettings,
    CallEvent,
    CallEventKind,
    Dial,
    new_channel_id,
    originate_action,
)
from tests.conftest import DEV_CLI_PREFIX, phone_number, wire_record
from tests.farend import FarEnd
from tests.integration.ami_watch import AmiWatch

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
DROPINS = REPO / "asterisk-config"
DEV = DROPINS / "dev"
PBX_ROOT = Path(os.environ.get("OTP_PBX_CACHE", REPO / ".cache")) / "asterisk-root"
INCLUDED = PBX_ROOT / "etc" / "asterisk" / "otp-test"  # pbx.sh: #tryinclude "otp-test/<file>"
MESSAGES_LOG = PBX_ROOT / "var" / "log" / "asterisk" / "messages.log"
CLI_TIMEOUT_S = 30

# The field far end's behaviour for a dialled number ending in 6: 180 at once, then it
# waits for the CANCEL (tests/sipp/README.md).
RINGS = 6
# ... and for one ending in 3: 403 Forbidden, which raises DialEnd and HangupRequest.
REFUSES = 3
RING_SECONDS = 2.0
WIRE_TOLERANCE_S = 1.0  # how late Asterisk's CANCEL may reach the far end
# Asterisk's qualify_timeout when an AOR does not set one: an OPTIONS left unanswered
# this long marks the contact Unavailable.
DEFAULT_QUALIFY_TIMEOUT_S = 3.0
QUALIFY_MARGIN_S = 0.5
# The events the gateway's adapter uses: all its AMI user's filter lets through of a call.
GATEWAY_EVENTS = {"DialBegin", "Newstate", "DialState", "OriginateResponse", "Hangup"}
CDR_WAIT_S = 5.0  # Asterisk dispatches a CDR shortly after the channel hangs up

# What the test puts where the drop-ins say CHANGE-ME.
SECRETS = {
    "secret": "dropin-test-secret",
    "username": "dropin-test-account",
    "password": "dropin-test-password",
}
# AMI users the test adds beside the drop-in's: another application's user given the
# drop-in's template for other users, and a control that hears everything.
OTHER_USER = "otp-dropin-other"
EVERYONE_USER = "otp-dropin-everything"
OTHER_SECRET = "dropin-other-secret"  # noqa: S105 - loopback-only dev PBX user
# Dev PBX only: CDRs as Cdr events (asterisk-config/dev/cdr.conf, cdr_manager.conf).
CDR_WATCH_USER = "otp-cdr-watch"
CDR_WATCH_SECRET = "otp-dev-cdr-watch"  # noqa: S105 - the dev PBX's fixed loopback secret

_OPTION = re.compile(r"(?P<key>[^=]+?)\s*(?P<sep>=>?)\s*(?P<value>.*)")


@dataclasses.dataclass
class Section:
    """One [section] of an Asterisk config file, its lines in order."""

    name: str
    suffix: str  # what follows "[name]": "(!)" for a template, "(name)" to inherit one
    lines: list[tuple[str, str, str]]  # (key, "=" or "=>", value)

    def get(self, key: str) -> str | None:
        """The last value of `key`, as Asterisk reads it; None when unset."""
        values = [value for k, _, value in self.lines if k == key]
        return values[-1] if values else None


def parse_conf(text: str) -> list[Section]:
    """The active (uncommented) sections of an Asterisk config file."""
    sections: list[Section] = []
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.split(";", 1)[0].strip()
        if not line:
            continue
        if line.startswith("["):
            name, _, suffix = line[1:].partition("]")
            sections.append(Section(name, suffix.strip(), []))
            continue
        option = _OPTION.fullmatch(line)
        assert option and sections, f"line {number} is not a config line: {raw!r}"
        sections[-1].lines.append((option["key"], option["sep"], option["value"]))
    return sections


def render(sections: list[Section]) -> str:
    return "\n\n".join(
        "\n".join([f"[{s.name}]{s.suffix}", *(f"{k} {sep} {v}" for k, sep, v in s.lines)])
        for s in sections
    )


def of_type(sections: list[Section], kind: str) -> list[Section]:
    return [s for s in sections if s.get("type") == kind]


def renamed(name: str) -> str:
    return name.replace("otp-", "otp-dropin-", 1)


def fill_in(key: str, value: str, carrier: FarEnd) -> str:
    """`value` with its CHANGE-ME placeholder replaced by the test's carrier or secret."""
    if "CHANGE-ME" not in value:
        return value
    if key in SECRETS:
        return SECRETS[key]
    filled = value.replace("CHANGE-ME.carrier.example:5060", f"{carrier.host}:{carrier.port}")
    return filled.replace("CHANGE-ME.carrier.example", carrier.host)


def adapt(sections: list[Section], carrier: FarEnd, names: set[str]) -> list[Section]:
    """The sections renamed (`names` and references to them), placeholders filled in."""
    adapted = []
    for section in sections:
        name = renamed(section.name) if section.name in names else section.name
        suffix = re.sub(
            r"\((?P<parent>[^)!]+)\)",
            lambda m: f"({renamed(m['parent'])})" if m["parent"] in names else m[0],
            section.suffix,
        )
        lines = [
            (key, sep, renamed(value) if value in names else fill_in(key, value, carrier))
            for key, sep, value in section.lines
        ]
        adapted.append(Section(name, suffix, lines))
    leftover = [f"[{s.name}] {k}" for s in adapted for k, _, v in s.lines if "CHANGE-ME" in v]
    assert not leftover, f"placeholders this test does not fill in: {leftover}"
    return adapted


def asterisk(command: str) -> str:
    """The output of an Asterisk CLI command on the dev PBX."""
    result = subprocess.run(
        ["chroot", str(PBX_ROOT), "/usr/sbin/asterisk", "-rx", command],
        capture_output=True,
        text=True,
        timeout=CLI_TIMEOUT_S,
    )
    assert result.returncode == 0, f"asterisk -rx {command!r}: {result.stdout}{result.stderr}"
    return result.stdout


def reload_all() -> None:
    # A reload skips a file whose modification time has not changed.
    for name in ("pjsip", "manager", "extensions"):
        (PBX_ROOT / "etc" / "asterisk" / f"{name}.conf").touch()
    asterisk("module reload res_pjsip.so")
    asterisk("manager reload")
    asterisk("dialplan reload")


@dataclasses.dataclass(frozen=True)
class Dropins:
    """The AMI users of the loaded drop-ins; each dials through the drop-in's trunk."""

    gateway: AmiSettings  # the drop-in's AMI user, dialling through the drop-in's trunk
    other: AmiSettings  # another application's user, given the drop-in's template
    everyone: AmiSettings  # a user without any filter: what there was to hide


@pytest.fixture(scope="module")
def dropins(dev_pbx: AmiSettings, field_end: FarEnd) -> Iterator[Dropins]:
    """The three drop-ins loaded into the dev PBX, then (after the module) removed."""
    pjsip = parse_conf((DROPINS / "pjsip.conf").read_text())
    manager = parse_conf((DROPINS / "manager.conf").read_text())
    extensions = parse_conf((DROPINS / "extensions.conf").read_text())
    section_names = {s.name for s in pjsip + manager + extensions} - {"general"}

    # What the README tells an operator whose Asterisk has a UDP transport already:
    # leave the drop-in's out and point the endpoint at the existing one.
    (transport,) = of_type(pjsip, "transport")
    (dev_transport,) = of_type(parse_conf((DEV / "pjsip.conf").read_text()), "transport")
    pjsip.remove(transport)
    (endpoint,) = of_type(pjsip, "endpoint")
    assert endpoint.get("transport") == transport.name
    endpoint.lines = [
        (key, sep, dev_transport.name if key == "transport" else value)
        for key, sep, value in endpoint.lines
    ]
    section_names.discard(transport.name)

    (template,) = [s for s in manager if s.suffix == "(!)"]
    (user,) = [s for s in manager if s.name != "general" and not s.suffix]
    local = [
        ("secret", "=", OTHER_SECRET),
        ("deny", "=", "0.0.0.0/0.0.0.0"),
        ("permit", "=", "127.0.0.1/255.255.255.255"),
        ("read", "=", "all"),
        ("write", "=", ""),
    ]
    test_users = [
        Section(OTHER_USER, f"({renamed(template.name)})", local),
        Section(EVERYONE_USER, "", local),
    ]

    for name in ("pjsip", "manager", "extensions"):
        hook = f'#tryinclude "otp-test/{name}.conf"'
        installed = (PBX_ROOT / "etc" / "asterisk" / f"{name}.conf").read_text()
        assert hook in installed, f"the dev PBX's {name}.conf lacks {hook!r}: run pbx.sh up"
    log_start = MESSAGES_LOG.stat().st_size if MESSAGES_LOG.exists() else 0
    INCLUDED.mkdir(exist_ok=True)
    files = {
        "pjsip.conf": adapt(pjsip, field_end, section_names),
        "manager.conf": adapt(manager, field_end, section_names) + test_users,
        "extensions.conf": adapt(extensions, field_end, section_names),
    }
    try:
        for file, sections in files.items():
            (INCLUDED / file).write_text(render(sections) + "\n")
        reload_all()
        trunk = renamed(endpoint.name)
        shown = asterisk(f"pjsip show endpoint {trunk}")
        assert renamed(endpoint.get("context") or "") in shown, f"{trunk} did not load: {shown}"
        shown = asterisk(f"manager show user {renamed(user.name)}")
        assert "read perm: system,call" in shown, shown
        for context in (renamed(s.name) for s in extensions if s.name in section_names):
            assert f"'{context}'" in asterisk(f"dialplan show {context}"), context
        # Asterisk qualifies an AOR that has qualify_frequency at a random moment within
        # that period, and a contact left silent for qualify_timeout is then Unavailable:
        # the state of a trunk that has been up a while. Bring that moment forward.
        (aor,) = of_type(pjsip, "aor")
        asterisk(f"pjsip qualify {trunk}")
        qualify_timeout = float(aor.get("qualify_timeout") or DEFAULT_QUALIFY_TIMEOUT_S)
        time.sleep(qualify_timeout + QUALIFY_MARGIN_S)
        warnings = [
            line
            for line in new_log_lines(log_start)
            if re.search(r"WARNING|ERROR", line) and re.search(r"otp-(test|dropin)|filter", line)
        ]
        assert not warnings, "Asterisk warned about the drop-ins:\n" + "\n".join(warnings)

        def ami(username: str, secret: str) -> AmiSettings:
            return dataclasses.replace(
                dev_pbx,
                username=username,
                secret=secret,
                channel=f"PJSIP/{{number}}@{trunk}",
            )

        yield Dropins(
            gateway=ami(renamed(user.name), SECRETS["secret"]),
            other=ami(OTHER_USER, OTHER_SECRET),
            everyone=ami(EVERYONE_USER, OTHER_SECRET),
        )
    finally:
        for file in files:
            (INCLUDED / file).unlink(missing_ok=True)
        reload_all()
        assert "Unable to find object" in asterisk(f"pjsip show endpoint {renamed(endpoint.name)}")
        assert OTHER_USER not in asterisk("manager show users")


def new_log_lines(start: int) -> list[str]:
    with MESSAGES_LOG.open("rb") as log:
        log.seek(start)
        return log.read().decode("utf-8", "replace").splitlines()


@contextlib.asynccontextmanager
async def ami_session(settings: AmiSettings) -> AsyncIterator[Manager]:
    """A plain panoramisk session, logged in, to send actions the adapter does not."""
    manager = Manager(
        host=settings.host,
        port=settings.port,
        username=settings.username,
        secret=settings.secret,
        ping_delay=3600,
        reconnect_timeout=3600,
    )
    manager.loop = asyncio.get_running_loop()
    await manager.connect()
    try:
        async with asyncio.timeout(5):
            while not manager.authenticated:
                await asyncio.sleep(0.02)
        yield manager
    finally:
        manager.close()


def watch(settings: AmiSettings) -> AmiWatch:
    return AmiWatch(settings.host, settings.port, settings.username, settings.secret)


async def originate(ami: Manager, settings: AmiSettings, dial: Dial, keep_cdr: bool) -> None:
    """The gateway's Originate for `dial`; with `keep_cdr`, without CDR_PROP(disable)."""
    action = originate_action(settings, dial)
    if keep_cdr:
        assert action.pop("Variable") == "CDR_PROP(disable)=1"
    reply = await ami.send_action(action, as_list=False)
    assert reply.success, reply


def about(events: list[Message], dial: Dial) -> list[Message]:
    """The events that name `dial`'s channel or carry its caller ID, in any header."""
    return [
        e for e in events if any(dial.channel_id in v or dial.caller_id in v for v in e.values())
    ]


def names(events: list[Message]) -> set[str]:
    return {e["Event"] for e in events}


async def until_hangup(pbx: AmiPbx, channel_id: str, timeout: float) -> list[CallEvent]:
    seen: list[CallEvent] = []
    async with asyncio.timeout(timeout):
        while not seen or seen[-1].kind is not CallEventKind.HANGUP:
            event = await pbx.next_event()
            if event.channel_id == channel_id:
                seen.append(event)
    return seen


def caller_id(code: int) -> str:
    return f"{DEV_CLI_PREFIX}{code:04d}"


async def test_a_call_through_the_drop_ins_reaches_a_carrier_that_ignores_options(
    dropins: Dropins, field_end: FarEnd
) -> None:
    dial = Dial(new_channel_id(), phone_number(RINGS), caller_id(4821), RING_SECONDS)
    pbx = AmiPbx(dropins.gateway)
    await pbx.start()
    try:
        await pbx.wait_connected(10)
        async with watch(dropins.gateway) as heard:
            await pbx.originate(dial)
            events = await until_hangup(pbx, dial.channel_id, RING_SECONDS + 10)
            await asyncio.sleep(0.2)
    finally:
        await pbx.close()

    record = await wire_record(field_end, dial.number, lambda r: r.canceled_at is not None)
    assert record.from_user == dial.caller_id
    assert record.sent_at(180) is not None
    assert record.canceled_at is not None
    rang_for = record.canceled_at - record.invited_at
    assert RING_SECONDS - 0.1 <= rang_for <= RING_SECONDS + WIRE_TOLERANCE_S
    assert [e.kind for e in events] == [
        CallEventKind.INVITED,
        CallEventKind.RINGING,
        CallEventKind.HANGUP,
    ]

    # The drop-in's AMI user: write `reporting` lets the gateway read the version...
    assert pbx.version, "CoreSettings refused: the user lacks write = reporting"
    # ... read `system` and the include filter bring FullyBooted at login, and the
    # filter passes the five events the adapter uses, of its own calls only.
    assert "FullyBooted" in names(heard.events)
    assert names(heard.events) <= {"FullyBooted", *GATEWAY_EVENTS}
    assert names(heard.of_calls({dial.channel_id})) == GATEWAY_EVENTS


async def test_other_ami_users_given_the_template_hear_nothing_of_the_gateways_calls(
    dropins: Dropins, field_end: FarEnd
) -> None:
    # A ringing call and a refused one each: together they raise every kind of call
    # event (DialEnd and HangupRequest come only with the refusal). Placed without
    # CDR_PROP(disable), as an older gateway did, so that each also leaves a Cdr event.
    ours = [
        Dial(new_channel_id(), phone_number(digit), caller_id(9600 + digit), RING_SECONDS)
        for digit in (RINGS, REFUSES)
    ]
    theirs = [
        Dial(uuid.uuid4().hex, phone_number(digit), caller_id(9700 + digit), RING_SECONDS)
        for digit in (RINGS, REFUSES)
    ]
    async with (
        watch(dropins.other) as other,
        watch(dropins.everyone) as everyone,
        ami_session(dropins.gateway) as ami,
    ):
        for dial in ours + theirs:
            await originate(ami, dropins.gateway, dial, keep_cdr=True)
        for dial in ours + theirs:
            await wire_record(field_end, dial.number, timeout=RING_SECONDS + 5)
        async with asyncio.timeout(CDR_WAIT_S):
            while not all("Cdr" in names(about(everyone.events, d)) for d in ours + theirs):
                await asyncio.sleep(0.05)
        await asyncio.sleep(0.2)

    heard_of_ours = [e for dial in ours for e in about(everyone.events, dial)]
    assert {
        "Newchannel",
        "NewCallerid",
        "DialBegin",
        "DialState",
        "DialEnd",
        "Newstate",
        "OriginateResponse",
        "HangupRequest",
        "Hangup",
        "Cdr",
    } <= names(heard_of_ours), "nothing to hide: the calls did not happen as planned"
    leaked = [dict(e) for dial in ours for e in about(other.events, dial)]
    assert leaked == [], "another AMI user heard of the gateway's calls"
    # The filter takes nothing else away: the other application's calls reach it whole.
    for dial in theirs:
        assert names(about(other.events, dial)) == names(about(everyone.events, dial))


async def test_the_gateways_originate_leaves_no_cdr(
    dev_pbx: AmiSettings, field_end: FarEnd
) -> None:
    settings = dataclasses.replace(dev_pbx, channel="PJSIP/{number}@otp-field")
    unrecorded = Dial(new_channel_id(), phone_number(RINGS), caller_id(9801), RING_SECONDS)
    recorded = Dial(new_channel_id(), phone_number(RINGS), caller_id(9802), RING_SECONDS)
    cdr_watch = dataclasses.replace(dev_pbx, username=CDR_WATCH_USER, secret=CDR_WATCH_SECRET)
    async with watch(cdr_watch) as cdrs, ami_session(settings) as ami:
        await originate(ami, settings, unrecorded, keep_cdr=False)
        await originate(ami, settings, recorded, keep_cdr=True)
        async with asyncio.timeout(RING_SECONDS + CDR_WAIT_S):
            while not about(cdrs.events, recorded):
                await asyncio.sleep(0.05)
        await asyncio.sleep(0.5)  # the two calls ended together: the other CDR would be here

    (cdr,) = about(cdrs.events, recorded)
    assert cdr["Event"] == "Cdr"
    assert cdr["Source"] == recorded.caller_id, "a CDR keeps the caller ID, and so the code"
    assert about(cdrs.events, unrecorded) == []


def test_the_dev_gateway_user_is_the_operators_but_for_the_secret() -> None:
    shipped = {s.name: s for s in parse_conf((DROPINS / "manager.conf").read_text())}
    dev = {s.name: s for s in parse_conf((DEV / "manager.conf").read_text())}
    assert dev["general"].lines == shipped["general"].lines
    without_secret = [
        [line for line in sections["otp-gateway"].lines if line[0] != "secret"]
        for sections in (shipped, dev)
    ]
    assert without_secret[0] == without_secret[1]
