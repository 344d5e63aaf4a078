"""The only code that speaks AMI: login, keepalive, reconnect, originate, call events.

panoramisk's protocol holds the connection and reads what the gateway does not follow;
this module owns the connection, because panoramisk's own `Manager` returns from
`connect()` before the login has succeeded, never checks its ping replies, reconnects at
a fixed pace, and re-sends unanswered actions after a reconnect (a second call for an
Originate). It writes its actions and matches their responses itself: panoramisk's
Action and Message objects cost about 40 us per action, and a call takes two.
"""

from __future__ import annotations

import asyncio
import enum
import itertools
import logging
import random
import re
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from panoramisk.ami_protocol import AMIProtocol
from panoramisk.message import Message

from gateway.outcomes import MAX_Q850_CAUSE
from gateway.tasks import cancel_and_wait, event_loop

log = logging.getLogger(__name__)
# panoramisk logs every AMI message at debug level. Those carry caller IDs, and a
# caller ID carries its code: the wire is never logged, at any level.
_wire_log = logging.getLogger(f"{__name__}.wire")
_wire_log.setLevel(logging.WARNING)

# An AMI login answers in milliseconds on a healthy PBX; five seconds covers a busy one.
LOGIN_TIMEOUT_S = 5.0
CONNECT_TIMEOUT_S = 5.0
# Originate with Async answers "queued" within about 1 ms; a PBX that takes seconds is
# overloaded and the call is better failed than left in doubt.
ACTION_TIMEOUT_S = 5.0
KEEPALIVE_INTERVAL_S = 5.0
KEEPALIVE_TIMEOUT_S = 3.0
# Reconnect backoff: doubling from 0.25 s, capped low. AMI is a local socket, a
# refused connect costs nothing, and calls wait for the PBX only calls.pbx_wait_seconds:
# the gateway must be back within seconds of Asterisk (plus settle_seconds).
RECONNECT_BASE_S = 0.25
RECONNECT_CAP_S = 2.0
# A failed OriginateResponse follows the channel's Hangup when a channel was made;
# when none was (unknown endpoint, no capacity) no Hangup ever comes. Wait this
# long for one before ending the call on the OriginateResponse alone.
ORIGINATE_FAILURE_GRACE_S = 1.0
# The longest unfinished AMI message the reader keeps, in characters (bytes, for the
# ASCII Asterisk writes). Asterisk's longest call events are a few KiB; a peer that sends
# more without the blank line that ends a message is broken or hostile, and waiting for
# the ping timeout would hold all of it: the connection is dropped, the supervisor
# reconnects.
MAX_MESSAGE_CHARS = 64 * 1024
# SIP response codes (RFC 3261, 7.2), for Hangup's TechCause.
MIN_SIP_CODE, MAX_SIP_CODE = 100, 699
# OriginateResponse's Reason is the AST_CONTROL_* value that ended the attempt (0-2
# digits); anything else from AMI is not put into a call's reason.
MAX_ORIGINATE_REASON = 99

# Originate's Timeout is a cap on the whole call, counted by Asterisk from its INVITE;
# the gateway ends calls by its own timers (ring time from alerting, the post-dial cap).
# Ring time (60) plus post-dial delay (60) plus the margin fit under this.
MAX_ORIGINATE_TIMEOUT_S = 180.0
# Asterisk's versions that read the advanced `eventfilter(...)` form of manager.conf
# (older ones skip those lines: the gateway then hears every event of the PBX), and the
# first that reports the SIP code (TechCause) on Hangup. Read in Asterisk's source.
EVENT_FILTER_SINCE = {18: (18, 26), 20: (20, 11), 21: (21, 6), 22: (22, 1)}
TECH_CAUSE_SINCE = (22, 7)
SUPPORTED_MAJORS = (18, 20, 21, 22)

# Q.850 cause of the gateway's own hangups (a ring timer, a cancel): normal clearing.
NORMAL_CLEARING = 16

# Asterisk's ChannelState values (include/asterisk/channelstate.h).
_STATE_RINGING = "5"
_STATE_UP = "6"
_CALL_EVENTS = ("DialBegin", "Newstate", "DialState", "Hangup", "OriginateResponse", "UserEvent")
# The UserEvent the voice call's dialplan raises once it has said the code in full
# (asterisk-config/extensions.conf, [otp-voice]).
SPOKEN_USER_EVENT = "OtpSpoken"

_NUMBER = re.compile(r"\+?[0-9]{1,20}")
_CODE = re.compile(r"[0-9]{1,16}")
_LOCALE = re.compile(r"[a-z]{2,3}(_[A-Z]{2})?")
_CONTEXT = re.compile(r"[A-Za-z0-9_-]{1,64}")
# Bounds on what a voice call's dialplan is told (the config's are narrower).
MAX_REPEAT = 10
MAX_VOICE_SECONDS = 600
_CHANNEL_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")
# Every call the gateway places has a ChannelId (Asterisk's Uniqueid) starting with
# this. The AMI user's event filter (asterisk-config/manager.conf) passes only events
# of such channels: on a PBX that carries other traffic, the gateway hears its own
# calls and nothing else.
CHANNEL_ID_PREFIX = "otp-"
_UNSAFE = re.compile(r"[\r\n]")


def new_channel_id() -> str:
    """A fresh id for a call: its ChannelId on the PBX, and its id in the store."""
    return CHANNEL_ID_PREFIX + uuid.uuid4().hex


class PbxError(Exception):
    """The PBX could not do what was asked."""


class PbxUnavailable(PbxError):
    """No logged-in AMI connection."""


class PbxNotLoggedIn(PbxUnavailable):
    """Not logged in when the action was to be sent: nothing reached Asterisk (a call may
    go to another node)."""


class OriginateRefused(PbxError):
    """Asterisk answered the Originate action with an error."""


class UnsafeAmiValue(ValueError):
    """A value that must not be put into an AMI action."""


class CallEventKind(enum.StrEnum):
    """What the PBX reported about one call."""

    # DialBegin: Asterisk sends the INVITE now (after its Originate queue). Post-dial
    # delay counts from here.
    INVITED = "invited"
    RINGING = "ringing"  # 180, or Newstate Ringing
    PROGRESS = "progress"  # 183 without 180: many mobile networks alert this way
    ANSWERED = "answered"  # the channel went Up
    SPOKEN = "spoken"  # a voice call's dialplan said the code in full (UserEvent OtpSpoken)
    HANGUP = "hangup"  # the channel is gone: the call's last event
    # Not about one call: AMI (re)connected; events of calls live before may be lost.
    CONNECTED = "connected"


@dataclass(frozen=True, slots=True)
class CallEvent:
    """One step of a call, correlated by the ChannelId given at Originate."""

    channel_id: str
    kind: CallEventKind
    at: float  # wall clock, seconds
    cause: int | None = None  # Q.850 hangup cause
    sip_code: int | None = None  # the SIP response behind the hangup, where known
    reason: str | None = None  # why a call ended without a channel hangup


@dataclass(frozen=True, slots=True)
class Speech:
    """What a voice call's dialplan says once answered, and where it runs."""

    context: str  # the dialplan context (voice.context)
    code: str  # the digits to say
    locale: str  # the channel's language: which digits/N prompts
    repeat: int  # how many times
    # Asterisk's own cap on the answered call (TIMEOUT(absolute)): a backstop, later
    # than the gateway's hangup at voice.max_seconds.
    max_seconds: int


@dataclass(frozen=True, slots=True)
class Dial:
    """A call to place: ring-and-hang-up, or with `speech` a voice call that says a code."""

    channel_id: str
    number: str  # destination as the trunk expects it, digits with an optional +
    caller_id: str  # digits with an optional +: the pool number carrying the code
    # Originate's Timeout: Asterisk ends the call this long after its INVITE whatever
    # the gateway does (a backstop; the gateway's own timers end it first).
    timeout_seconds: float
    speech: Speech | None = None
    # The Originate channel template when not the node's (a pool's own trunk).
    channel: str | None = None


class Pbx(Protocol):
    """What the dialer needs from a PBX; a fake stands in for it in unit tests."""

    @property
    def connected(self) -> bool: ...

    @property
    def down_for(self) -> float: ...

    @property
    def trunk(self) -> str: ...

    async def originate(self, dial: Dial) -> None: ...

    async def hangup(self, channel_id: str, placed_elsewhere: bool = False) -> bool: ...

    async def next_event(self) -> CallEvent: ...

    async def wait_connected(self, timeout: float) -> None: ...

    def adopt(self, channel_id: str) -> None: ...

    async def call_exists(self, channel_id: str) -> bool: ...


@dataclass(frozen=True, slots=True)
class AmiSettings:
    """Where and how to reach Asterisk's manager interface."""

    host: str
    port: int
    username: str
    secret: str
    channel: str = "PJSIP/{number}@otp-trunk"
    # AMI answers logins before Asterisk has finished booting, and until then PJSIP
    # drops SIP responses (a call would lose its 180). Asterisk says when boot has ended
    # (FullyBooted, at login to a user with the `system` read class); without that class
    # nothing says it, and the gateway waits this long after each login instead.
    settle_seconds: float = 2.0
    name: str = "asterisk"  # the node's name, in logs


def check_number(value: str, what: str) -> str:
    """Return `value` if it is digits with an optional leading +, else raise."""
    if not _NUMBER.fullmatch(value):
        raise UnsafeAmiValue(f"{what} must be digits with an optional leading +")
    return value


def check_text(value: str, what: str) -> str:
    """Return `value` if it holds no line break (an AMI header injection), else raise."""
    if _UNSAFE.search(value) or not value.isprintable():
        raise UnsafeAmiValue(f"{what} must be one line of printable text")
    return value


def trunk_name(channel: str) -> str:
    """The PJSIP endpoint a channel template dials through, named in logs and metrics.

    `PJSIP/{number}@otp-trunk` and `PJSIP/otp-trunk/sip:{number}@host` are both otp-trunk.
    """
    rest = channel.removeprefix("PJSIP/")
    first = rest.split("/", 1)[0]
    return first.split("@", 1)[1] if "@" in first else first


def version_gaps(version: str) -> list[str]:
    """What the gateway lacks on this Asterisk version (CoreSettings' AsteriskVersion)."""
    found = re.search(r"(\d+)\.(\d+)", version)
    if found is None:
        return [f"Asterisk version {version!r} not recognised; assuming 22.7 or newer"]
    major, minor = int(found[1]), int(found[2])
    gaps = []
    if major < SUPPORTED_MAJORS[0] or (major < 22 and major not in SUPPORTED_MAJORS):
        gaps.append(f"Asterisk {major} is not supported (18, 20, 21 and 22 are)")
    filter_since = EVENT_FILTER_SINCE.get(major)
    if major <= 22 and (filter_since is None or (major, minor) < filter_since):
        gaps.append(
            "this version skips manager.conf's eventfilter(...) lines (they need 18.26, "
            "20.11, 21.6 or 22.1): the gateway hears every event of the PBX, and still "
            "follows only its own calls, at some CPU cost"
        )
    if (major, minor) < TECH_CAUSE_SINCE:
        gaps.append(
            "this version does not report the SIP code on Hangup (TechCause, from 22.7): "
            "a trunk's 401/403/407 then look like a user's decline (rejected, not "
            "trunk_rejected)"
        )
    return gaps


def originate_action(settings: AmiSettings, dial: Dial) -> dict[str, str]:
    """The Originate action for `dial`, every value checked before it reaches AMI."""
    if not _CHANNEL_ID.fullmatch(dial.channel_id):
        raise UnsafeAmiValue("channel_id must be 1-64 letters, digits, '.', '_' or '-'")
    number = check_number(dial.number, "number")
    caller_id = check_number(dial.caller_id, "caller_id")
    if not 0 < dial.timeout_seconds <= MAX_ORIGINATE_TIMEOUT_S:
        raise UnsafeAmiValue(f"timeout_seconds must be in (0, {MAX_ORIGINATE_TIMEOUT_S:g}]")
    action = {
        "Action": "Originate",
        "Channel": check_text((dial.channel or settings.channel).format(number=number), "channel"),
        "CallerID": f"<{caller_id}>",
        "Timeout": str(round(dial.timeout_seconds * 1000)),
        # The caller ID carries the code: keep the call out of the CDR, which would
        # store it for anyone who reads the PBX's call records.
        "Variable": "CDR_PROP(disable)=1",
        # An answered call runs Hangup at once: the far end gets a BYE, not a conversation.
        "Application": "Hangup",
        # panoramisk would send Python's True as "True"; Asterisk wants the string.
        "Async": "true",
        "ChannelId": dial.channel_id,
    }
    if dial.speech is not None:
        del action["Application"]
        action.update(_speech(dial.speech))
    return action


def _speech(speech: Speech) -> dict[str, str]:
    """The Originate headers of a voice call: answered, it runs `speech.context`, told
    by channel variables what to say (Asterisk splits Variable at commas: every value is
    checked to hold none)."""
    if not _CONTEXT.fullmatch(speech.context):
        raise UnsafeAmiValue("context must be 1-64 letters, digits, '_' or '-'")
    if not _CODE.fullmatch(speech.code):
        raise UnsafeAmiValue("code must be 1-16 digits")
    if not _LOCALE.fullmatch(speech.locale):
        raise UnsafeAmiValue("locale must be a language code such as en or id")
    if not 1 <= speech.repeat <= MAX_REPEAT:
        raise UnsafeAmiValue(f"repeat must be 1-{MAX_REPEAT}")
    if not 1 <= speech.max_seconds <= MAX_VOICE_SECONDS:
        raise UnsafeAmiValue(f"max_seconds must be 1-{MAX_VOICE_SECONDS}")
    return {
        "Context": speech.context,
        "Exten": "s",
        "Priority": "1",
        "Variable": (
            f"CDR_PROP(disable)=1,CHANNEL(language)={speech.locale},OTP_CODE={speech.code},"
            f"OTP_REPEAT={speech.repeat},OTP_MAX={speech.max_seconds}"
        ),
    }


class Reply(dict[str, Any]):
    """The message that answered an action: its headers, as Asterisk wrote them."""

    @property
    def success(self) -> bool:
        """As panoramisk judges it: Success, Follows or Goodbye, or an event."""
        return "Event" in self or self.get("Response") in _SUCCESS_RESPONSES


_SUCCESS_RESPONSES = ("Success", "Follows", "Goodbye")
# ActionIDs unique to this process: an event carrying an ActionID (an Originate's
# OriginateResponse) goes to every AMI session that may read it, so another gateway
# on the same Asterisk hears ours; a random part keeps its actions from taking them.
_ACTION_ID_PREFIX = f"otp-gw/{uuid.uuid4().hex[:16]}/"
_action_ids = (f"{_ACTION_ID_PREFIX}{n}" for n in itertools.count(1))


def _headers(block: str) -> dict[str, str]:
    """One AMI message's headers; a header that comes twice keeps its last value."""
    return dict(line.split(": ", 1) for line in block.split("\r\n") if ": " in line)


class _Protocol(AMIProtocol):  # type: ignore[misc]  # panoramisk is untyped
    """panoramisk's protocol, writing actions and reading their responses and the call
    events without its Action and Message classes.

    panoramisk makes a case-insensitive dict of every message, header by header, and of
    every action: it was the most costly part of the gateway's AMI work. Actions, their
    responses and the few events calls are followed by are plain dicts here; any other
    event takes panoramisk's own path (a Shutdown ends the connection). As panoramisk
    does with `as_list=False`, the first message carrying an action's ActionID answers
    it; a later one is an event like any other.
    """

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self.version: str | None = None  # Asterisk's AMI version, from its banner
        self.waiting: dict[str, asyncio.Future[Reply]] = {}

    def request(self, fields: Mapping[str, str], future: asyncio.Future[Reply]) -> str:
        """Write an action (values already checked); `future` gets its answer. Returns
        its ActionID."""
        action_id = next(_action_ids)
        self.waiting[action_id] = future
        text = "".join(f"{key}: {value}\r\n" for key, value in fields.items())
        self.transport.write(f"{text}ActionID: {action_id}\r\n\r\n".encode(self.encoding))
        return action_id

    def _answer(self, action_id: str | None, reply: Mapping[str, Any]) -> bool:
        """Give `reply` to the action waiting on `action_id`; False if none is."""
        future = self.waiting.pop(action_id, None) if action_id else None
        if future is None:
            return False
        if not future.done():
            future.set_result(Reply(reply))
        return True

    def data_received(self, data: bytes) -> None:
        text = data.decode(getattr(self, "encoding", "ascii"), "ignore")
        if self.version is None and text.startswith("Asterisk Call Manager/"):
            banner, _, text = text.partition("\r\n")  # the first answer may follow it
            self.version = banner.partition("/")[2].strip()
        if self.queue:
            text = self.queue.popleft() + text
        blocks = text.split("\r\n\r\n")
        unfinished = blocks.pop()
        if len(unfinished) <= MAX_MESSAGE_CHARS:
            self.queue.append(unfinished)
        else:
            log.warning(
                "AMI sent over %d characters without an end of message: dropping the connection",
                MAX_MESSAGE_CHARS,
            )
            self.transport.close()  # connection_lost follows: the supervisor reconnects
        for block in blocks:
            block = block.strip()
            if block.startswith("Response: "):
                headers = _headers(block)
                self._answer(headers.get("ActionID"), headers)
                continue  # no action waits for it: a late answer, dropped
            if block.startswith("Event: "):
                end = block.find("\r\n")
                if block[7 : end if end != -1 else None] in _CALL_EVENTS:
                    headers = _headers(block)
                    if not self._answer(headers.get("ActionID"), headers):
                        self.factory.dispatch(headers)
                    continue
            message = Message.from_line(block)
            if message is not None and not self._answer(message.id, dict(message.items())):
                self.handle_message(message)


class _Session:
    """The `factory` panoramisk's protocol reports to: one per TCP connection."""

    def __init__(
        self, on_event: Callable[[Mapping[str, str]], None], on_lost: Callable[[], None]
    ) -> None:
        self._on_event = on_event
        self._on_lost = on_lost
        # panoramisk re-queues unanswered actions that are not "forgetable" and sends
        # them again after a reconnect. Every action is forgetable here: a re-sent
        # Originate would ring the phone twice.
        self.forgetable_actions = _Forget()
        self.awaiting_actions: list[Any] = []

    def dispatch(self, message: Mapping[str, str]) -> None:
        self._on_event(message)

    def connection_lost(self, exc: object) -> None:
        self._on_lost()


class _Forget:
    def __contains__(self, item: object) -> bool:
        return True


@dataclass
class _Call:
    seen: set[CallEventKind] = field(default_factory=set)


class AmiPbx:
    """A supervised AMI connection that places calls and reports their events."""

    def __init__(self, settings: AmiSettings) -> None:
        self.settings = settings
        self._events: asyncio.Queue[CallEvent] = asyncio.Queue()
        self._calls: dict[str, _Call] = {}
        self._protocol: _Protocol | None = None
        self._pending: set[asyncio.Future[Reply]] = set()
        self._logged_in = asyncio.Event()
        self._lost = asyncio.Event()
        self._supervisor: asyncio.Task[None] | None = None
        self._booted = asyncio.Event()  # FullyBooted came on this connection
        self.reconnects = 0
        self.events_received = 0  # every AMI event this session was sent
        self._down_since = time.monotonic()  # not logged in yet
        self.version: str | None = None  # Asterisk's, once read at login
        self.trunk = trunk_name(settings.channel)

    _loop = event_loop  # the loop it runs on, asked for once

    @property
    def connected(self) -> bool:
        """True while a logged-in AMI connection is up."""
        return self._logged_in.is_set()

    @property
    def down_for(self) -> float:
        """Seconds since AMI was last logged in (or since start); 0 while it is."""
        return 0.0 if self.connected else time.monotonic() - self._down_since

    async def start(self) -> None:
        """Start connecting in the background; see `wait_connected`."""
        if self._supervisor is None:
            self._supervisor = asyncio.create_task(self._supervise(), name="ami-supervisor")

    async def wait_connected(self, timeout: float) -> None:
        """Wait until logged in, or raise PbxUnavailable."""
        try:
            await asyncio.wait_for(self._logged_in.wait(), timeout)
        except TimeoutError:
            raise PbxUnavailable(f"no AMI login within {timeout}s") from None

    async def close(self) -> None:
        """Stop reconnecting and close the connection."""
        await cancel_and_wait(self._supervisor)
        self._supervisor = None
        self._drop_connection()

    async def originate(self, dial: Dial) -> None:
        """Place `dial`; returns once Asterisk has queued it, never waiting for the ring."""
        action = originate_action(self.settings, dial)
        self._calls[dial.channel_id] = _Call()
        try:
            reply = await self._send(action)
        except BaseException:
            self._calls.pop(dial.channel_id, None)
            raise
        if not reply.success:
            self._calls.pop(dial.channel_id, None)
            raise OriginateRefused(reply.get("Message", "refused"))

    async def hangup(self, channel_id: str, placed_elsewhere: bool = False) -> bool:
        """Hang up a call placed by `originate` (cancels it while ringing), or with
        `placed_elsewhere`, one another gateway placed on this Asterisk.

        False when Asterisk has no such channel (yet: an Originate it still queues) or
        the call has ended here already."""
        if channel_id not in self._calls and not placed_elsewhere:
            return False
        if not _CHANNEL_ID.fullmatch(channel_id):
            raise UnsafeAmiValue("bad channel_id")
        # Asterisk looks a channel up by name or by Uniqueid, which is our ChannelId.
        # Without a cause the Hangup event says 0; 16 is what the gateway means.
        reply = await self._send(
            {"Action": "Hangup", "Channel": channel_id, "Cause": str(NORMAL_CLEARING)}
        )
        if not reply.success:
            log.info(
                "hangup of %s: %s",
                channel_id,
                reply.get("Message", "refused"),
                extra={"call_id": channel_id},
            )
        return bool(reply.success)

    async def next_event(self) -> CallEvent:
        """The next event of any call placed here."""
        return await self._events.get()

    def adopt(self, channel_id: str) -> None:
        """Follow the events of a call an earlier process placed (after a restart)."""
        if _CHANNEL_ID.fullmatch(channel_id):
            self._calls.setdefault(channel_id, _Call())

    async def call_exists(self, channel_id: str) -> bool:
        """Whether Asterisk still has the call's channel (the Status action)."""
        if not _CHANNEL_ID.fullmatch(channel_id):
            raise UnsafeAmiValue("bad channel_id")
        reply = await self._send({"Action": "Status", "Channel": channel_id})
        if reply.success:
            return True
        if "no such channel" in reply.get("Message", "").lower():
            return False
        raise PbxError(f"Status refused: {reply.get('Message', '')}")

    # -- connection ------------------------------------------------------------

    async def _supervise(self) -> None:
        attempt = 0
        while True:
            try:
                await self._connect()
                attempt = 0
                log.info(
                    "AMI of node %s logged in at %s:%s",
                    self.settings.name,
                    self.settings.host,
                    self.settings.port,
                )
                await self._keepalive()
            except (OSError, TimeoutError, PbxError) as exc:
                log.warning(
                    "AMI connection to node %s at %s:%s failed: %s",
                    self.settings.name,
                    self.settings.host,
                    self.settings.port,
                    exc,
                )
            self._drop_connection()
            delay = min(RECONNECT_CAP_S, RECONNECT_BASE_S * 2**attempt)
            delay *= random.uniform(0.5, 1.0)  # noqa: S311 - jitter, not a secret
            attempt += 1
            self.reconnects += 1
            log.info("AMI of node %s reconnecting in %.1fs", self.settings.name, delay)
            await asyncio.sleep(delay)

    async def _connect(self) -> None:
        loop = self._loop
        self._lost.clear()
        self._booted.clear()
        _, protocol = await asyncio.wait_for(
            loop.create_connection(_Protocol, self.settings.host, self.settings.port),
            CONNECT_TIMEOUT_S,
        )
        protocol.factory = _Session(self._on_message, self._on_lost)
        protocol.encoding = "utf8"
        protocol.log = _wire_log
        self._protocol = protocol
        reply = await self._send(
            {
                "Action": "Login",
                "Username": check_text(self.settings.username, "username"),
                "Secret": check_text(self.settings.secret, "secret"),
                "Events": "on",
            },
            timeout=LOGIN_TIMEOUT_S,
            require_login=False,
        )
        if not reply.success:
            # The secret stays out of the message; Asterisk's reason does not hold it.
            raise PbxError(
                f"AMI login as {self.settings.username!r} refused: {reply.get('Message', '')}"
            )
        await self._wait_booted()
        if self._lost.is_set():
            raise PbxUnavailable("AMI connection lost while waiting for Asterisk to boot")
        await self._read_version()
        if self._lost.is_set():
            raise PbxUnavailable("AMI connection lost while logging in")
        self._logged_in.set()
        self._events.put_nowait(CallEvent("", CallEventKind.CONNECTED, time.time()))

    async def _wait_booted(self) -> None:
        """Wait for Asterisk's FullyBooted, at most settle_seconds.

        Asterisk sends it at login to a user with the `system` read class once booted,
        or later when boot ends. A user without that class never gets it: the wait then
        ends after settle_seconds, the old guess."""
        if not self.settings.settle_seconds:
            return
        booted = asyncio.ensure_future(self._booted.wait())
        lost = asyncio.ensure_future(self._lost.wait())
        try:
            await asyncio.wait(
                (booted, lost),
                timeout=self.settings.settle_seconds,
                return_when=asyncio.FIRST_COMPLETED,
            )
        finally:
            booted.cancel()
            lost.cancel()
        if not self._booted.is_set() and not self._lost.is_set():
            log.warning(
                "no FullyBooted from Asterisk within %ss of login; placing calls anyway "
                "(give the AMI user read = call,system to wait for the real boot signal)",
                self.settings.settle_seconds,
            )

    async def _read_version(self) -> None:
        """Read Asterisk's version once logged in and say what the gateway will lack."""
        try:
            reply = await self._send(
                {"Action": "CoreSettings"}, timeout=LOGIN_TIMEOUT_S, require_login=False
            )
        except TimeoutError:
            log.warning("Asterisk did not answer CoreSettings within %ss", LOGIN_TIMEOUT_S)
            return
        if not reply.success:
            log.info(
                "cannot read Asterisk's version (CoreSettings needs write = reporting); "
                "see the supported versions in asterisk-config/README.md"
            )
            return
        version = str(reply.get("AsteriskVersion", ""))
        if version != self.version:
            self.version = version
            gaps = version_gaps(version)
            for gap in gaps:
                log.warning("Asterisk %s: %s", version, gap)
            if not gaps:
                log.info("Asterisk %s: every feature the gateway uses is there", version)

    async def _keepalive(self) -> None:
        """Ping until a reply is late or the connection drops."""
        while True:
            try:
                await asyncio.wait_for(self._lost.wait(), KEEPALIVE_INTERVAL_S)
            except TimeoutError:
                pass  # a quiet interval: time to ping
            else:
                raise PbxUnavailable("AMI connection lost")
            try:
                await self._send({"Action": "Ping"}, timeout=KEEPALIVE_TIMEOUT_S)
            except TimeoutError:
                raise PbxUnavailable(f"no Ping reply within {KEEPALIVE_TIMEOUT_S}s") from None

    def _on_lost(self) -> None:
        """The TCP connection is gone: fail the actions waiting on it now, not at their
        timeouts (panoramisk forgets them without an answer)."""
        self._lost.set()
        for future in self._pending:
            if not future.done():
                future.set_exception(PbxUnavailable("AMI connection lost"))

    def _drop_connection(self) -> None:
        if self._logged_in.is_set():
            self._down_since = time.monotonic()
        self._logged_in.clear()
        protocol, self._protocol = self._protocol, None
        if protocol is not None and not protocol.closed:
            protocol.factory = None  # a late connection_lost must not reach us
            protocol.waiting.clear()
            protocol.transport.close()
            protocol.closed = True
        for future in self._pending:
            if not future.done():
                future.set_exception(PbxUnavailable("AMI connection lost"))
        self._pending.clear()

    async def _send(
        self,
        fields: dict[str, str],
        timeout: float = ACTION_TIMEOUT_S,
        require_login: bool = True,
    ) -> Reply:
        protocol = self._protocol
        if protocol is None or (require_login and not self._logged_in.is_set()):
            raise PbxNotLoggedIn("not connected to AMI")
        for key, value in fields.items():
            check_text(value, key)
        future: asyncio.Future[Reply] = self._loop.create_future()
        action_id = protocol.request(fields, future)
        self._pending.add(future)
        # Not asyncio.timeout: a timer on the future is all it takes, at a fraction of
        # the cost (two actions per call).
        expiry = self._loop.call_later(timeout, _expire, future)
        try:
            return await future
        finally:
            expiry.cancel()
            self._pending.discard(future)
            if not future.done():
                protocol.waiting.pop(action_id, None)
                future.cancel()

    # -- events ----------------------------------------------------------------

    def _on_message(self, message: Mapping[str, str]) -> None:
        """Turn an AMI event into a CallEvent; runs inline in the protocol's reader."""
        self.events_received += 1
        name = message.get("Event", "")
        if name not in _CALL_EVENTS:
            if name == "FullyBooted":
                self._booted.set()
            return
        if name in ("DialState", "DialBegin"):
            channel_id = message.get("DestUniqueid", "")
        else:
            channel_id = message.get("Uniqueid", "")
        call = self._calls.get(channel_id)
        if call is None:
            return
        kind: CallEventKind | None = None
        if name == "DialBegin":
            kind = CallEventKind.INVITED
        elif name == "Newstate":
            state = message.get("ChannelState", "")
            kind = {_STATE_RINGING: CallEventKind.RINGING, _STATE_UP: CallEventKind.ANSWERED}.get(
                state
            )
        elif name == "DialState":
            kind = {
                "RINGING": CallEventKind.RINGING,
                "PROGRESS": CallEventKind.PROGRESS,
                "ANSWER": CallEventKind.ANSWERED,
            }.get(message.get("DialStatus", ""))
        elif name == "UserEvent":
            if message.get("UserEvent") == SPOKEN_USER_EVENT:
                kind = CallEventKind.SPOKEN
        elif name == "Hangup":
            self._end_call(
                channel_id,
                _number_in(message.get("Cause"), 0, MAX_Q850_CAUSE),
                _number_in(message.get("TechCause"), MIN_SIP_CODE, MAX_SIP_CODE),
            )
            return
        elif name == "OriginateResponse" and message.get("Response") != "Success":
            self._loop.call_later(
                ORIGINATE_FAILURE_GRACE_S,
                self._end_call,
                channel_id,
                None,
                None,
                _originate_failure(message.get("Reason")),
            )
            return
        if kind is not None and kind not in call.seen:
            call.seen.add(kind)
            self._events.put_nowait(CallEvent(channel_id, kind, time.time()))

    def _end_call(
        self, channel_id: str, cause: int | None, sip_code: int | None, reason: str | None = None
    ) -> None:
        if channel_id not in self._calls:
            return  # already ended
        self._events.put_nowait(
            CallEvent(
                channel_id,
                CallEventKind.HANGUP,
                time.time(),
                cause=cause,
                sip_code=sip_code,
                reason=reason,
            )
        )
        # Only once its end is on the way to the dialer: a call is never dropped unended.
        del self._calls[channel_id]


def _expire(future: asyncio.Future[Reply]) -> None:
    if not future.done():
        future.set_exception(TimeoutError())


_ASCII_NUMBER = re.compile(r"[0-9]{1,3}")


def _number_in(value: object, low: int, high: int) -> int | None:
    """`value` as a number if it is 1-3 ASCII digits in [low, high], else None.

    Not int(): it reads digits of any script, signs, spaces, underscores and numbers of
    any size, none of which Asterisk writes."""
    if not isinstance(value, str) or not _ASCII_NUMBER.fullmatch(value):
        return None
    number = int(value)
    return number if low <= number <= high else None


def _originate_failure(reason: object) -> str:
    """A call's reason for a failed OriginateResponse, from a known set."""
    number = _number_in(reason, 0, MAX_ORIGINATE_REASON)
    return f"originate_failed:{'unknown' if number is None else number}"
