"""A stand-in for the PBX adapter (the `Pbx` Protocol of gateway/pbx.py) in unit tests.

Each call's fate is a script of steps chosen by the dialled number's last digit (the
SIPp far end's behaviours, tests/sipp/README.md) or by a callback. Timing is in PBX
seconds, multiplied by `time_scale` so a 1 s ring lasts 0.05 s in a test.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

from gateway.pbx import (
    AmiSettings,
    CallEvent,
    CallEventKind,
    Dial,
    PbxNotLoggedIn,
    PbxUnavailable,
    originate_action,
)

# Every Dial is turned into the Originate the real adapter would send, so a value the
# real adapter refuses (UnsafeAmiValue) is refused here too.
FAKE_AMI = AmiSettings("127.0.0.1", 5038, "otp-gateway", "fake-secret")
# A far end answers the INVITE (180, 183 or a final response) after this many PBX seconds.
REPLY_S = 0.1
# The SIPp far end's digit 2 sends 200 OK 500 ms after 180 Ringing.
ANSWER_AFTER_S = 0.5
# The voice far end hears the code in full (the dialplan's OtpSpoken) this long after
# its answer.
SPEAK_S = 2.0
# A network that ends an unanswered ring itself (cause 19) does so after this long;
# the gateway's own ring timer (real seconds) comes later in a unit test.
NETWORK_RING_S = 1.0
# Q.850 causes Asterisk reports.
NORMAL_CLEARING = 16  # our own Hangup of a call, and the BYE after an answer
NO_ANSWER = 19  # Asterisk's own CANCEL at the Originate Timeout (TechCause 480)

# How often `until` looks again at state changed by other tasks.
POLL_S = 0.005
WAIT_S = 5.0

RINGING = CallEventKind.RINGING
PROGRESS = CallEventKind.PROGRESS
ANSWERED = CallEventKind.ANSWERED
SPOKEN = CallEventKind.SPOKEN
HANGUP = CallEventKind.HANGUP


@dataclass(frozen=True, slots=True)
class Step:
    """One event of a scripted call, `after` PBX seconds after the previous one."""

    after: float
    kind: CallEventKind
    cause: int | None = None
    sip_code: int | None = None


# The steps of a call, or the exception its originate raises (e.g. OriginateRefused).
Fate = Sequence[Step] | BaseException
Script = Callable[[Dial], Fate]


def ring_timeout(dial: Dial, alert: CallEventKind = RINGING) -> tuple[Step, ...]:
    """Alerts (180 or 183), then the network ends the unanswered ring (480)."""
    return (Step(REPLY_S, alert), Step(NETWORK_RING_S, HANGUP, NO_ANSWER, 480))


def rings_until_hung_up(dial: Dial) -> tuple[Step, ...]:
    """Alerts and keeps ringing until `hangup` (a far end that never times out)."""
    return (Step(REPLY_S, RINGING),)


def listened(dial: Dial) -> tuple[Step, ...]:
    """A voice call: alerts, is answered, says the code in full, and the user hangs up."""
    return (
        Step(REPLY_S, RINGING),
        Step(ANSWER_AFTER_S, ANSWERED),
        Step(SPEAK_S, SPOKEN),
        Step(0, HANGUP, NORMAL_CLEARING),
    )


def talks_on(dial: Dial) -> tuple[Step, ...]:
    """A voice call answered and spoken, whose far end never hangs up."""
    return (Step(REPLY_S, RINGING), Step(ANSWER_AFTER_S, ANSWERED), Step(SPEAK_S, SPOKEN))


def rejected(cause: int, sip_code: int | None) -> tuple[Step, ...]:
    """A final response before any alerting."""
    return (Step(REPLY_S, HANGUP, cause, sip_code),)


# Last digit -> (Q.850 cause, SIP code), as measured on the dev PBX (tests/sipp/README.md).
REJECTIONS = {
    "3": (17, 486),
    "4": (1, 404),
    "5": (21, 603),
    "6": (34, 503),
    "7": (28, 484),
    "8": (19, 480),
}


def by_last_digit(dial: Dial) -> Fate:
    """The SIPp far end's behaviour for the dialled number's last digit."""
    digit = dial.number[-1]
    if digit == "0":
        return ring_timeout(dial)
    if digit == "1":  # 183 only, until the gateway's ring timer hangs up
        return (Step(REPLY_S, PROGRESS),)
    if digit == "2":
        return (
            Step(REPLY_S, RINGING),
            Step(ANSWER_AFTER_S, ANSWERED),
            Step(0, HANGUP, NORMAL_CLEARING),
        )
    if digit == "9":  # 100 Trying only: nothing alerts until the gateway's cap
        return ()
    return rejected(*REJECTIONS.get(digit, REJECTIONS["4"]))


def voice_listened(dial: Dial) -> Fate:
    """The SIPp far ends: a flash call by its number's last digit (by_last_digit), and
    every voice call listened to (the voice far end answers them)."""
    return listened(dial) if dial.speech is not None else by_last_digit(dial)


_serial = itertools.count(1)


def fresh_mobile(last_digit: str = "0") -> str:
    """A valid Indonesian mobile (E.164), new each time; the last digit picks its fate."""
    return f"+62812{next(_serial):06d}{last_digit}"


T = TypeVar("T")


async def until(probe: Callable[[], Awaitable[T]], timeout: float = WAIT_S) -> T:
    """Poll `probe` until it returns something truthy, and return that.

    For state other tasks change without telling anyone: rows in the store.
    """
    async with asyncio.timeout(timeout):
        while not (found := await probe()):
            await asyncio.sleep(POLL_S)
    return found


@dataclass(frozen=True, slots=True)
class Originated:
    """A Dial the fake was given, when (monotonic seconds), and what originate raised."""

    dial: Dial
    at: float
    error: BaseException | None


class FakePbx:
    """Plays scripted calls behind the same contract as gateway.pbx.AmiPbx."""

    def __init__(
        self,
        script: Script = by_last_digit,
        *,
        time_scale: float = 0.05,
        connected: bool = True,
    ) -> None:
        self.script = script
        self.time_scale = time_scale
        self._connected = connected
        self._down_since = time.monotonic()
        self.originated: list[Originated] = []
        self.hangups: list[str] = []  # every hangup asked for, live call or not
        # The cause Asterisk reports for our Hangup: 16, or 21 when it lands before the
        # INVITE has left (seen on the dev PBX).
        self.hangup_cause = NORMAL_CLEARING
        self.adopted: list[str] = []
        self._adopted_live: set[str] = set()
        self.max_live = 0
        self.trunk = "fake-trunk"
        self._live: dict[str, asyncio.Task[None]] = {}
        self._events: asyncio.Queue[CallEvent] = asyncio.Queue()

    @property
    def connected(self) -> bool:
        return self._connected

    @connected.setter
    def connected(self, up: bool) -> None:
        if self._connected and not up:
            self._down_since = time.monotonic()
        self._connected = up

    @property
    def down_for(self) -> float:
        return 0.0 if self._connected else time.monotonic() - self._down_since

    def lost_ami(self, seconds_ago: float) -> None:
        """AMI went away `seconds_ago` and has not come back."""
        self._connected = False
        self._down_since = time.monotonic() - seconds_ago

    @property
    def dials(self) -> list[Dial]:
        """Every Dial received, placed or refused."""
        return [o.dial for o in self.originated]

    @property
    def placed(self) -> list[Dial]:
        """The Dials that became calls."""
        return [o.dial for o in self.originated if o.error is None]

    @property
    def live(self) -> set[str]:
        """Channel ids of calls not yet hung up."""
        return set(self._live)

    async def originate(self, dial: Dial) -> None:
        """Validate like the real adapter, then play the call's script in the background."""
        at = time.monotonic()
        try:
            originate_action(FAKE_AMI, dial)
            if not self.connected:
                raise PbxNotLoggedIn("not connected to AMI")
            fate = self.script(dial)
            if isinstance(fate, BaseException):
                raise fate
        except BaseException as exc:
            self.originated.append(Originated(dial, at, exc))
            raise
        self.originated.append(Originated(dial, at, None))
        self._live[dial.channel_id] = asyncio.create_task(
            self._play(dial.channel_id, fate), name=f"fake-call-{dial.channel_id}"
        )
        self.max_live = max(self.max_live, len(self._live))

    async def hangup(self, channel_id: str, placed_elsewhere: bool = False) -> bool:
        """End a live call with `hangup_cause`, as Asterisk does for a Hangup action."""
        self.hangups.append(channel_id)
        if channel_id not in self._live:
            return False  # the real adapter ignores calls it does not know (or that ended)
        if not self.connected:
            raise PbxUnavailable("not connected to AMI")
        self._live[channel_id].cancel()
        self._end(channel_id, self.hangup_cause, None)
        return True

    async def next_event(self) -> CallEvent:
        return await self._events.get()

    async def wait_connected(self, timeout: float) -> None:
        """Like the adapter: wait for `connected`, or raise PbxUnavailable."""
        try:
            async with asyncio.timeout(timeout):
                while not self.connected:
                    await asyncio.sleep(0.01)
        except TimeoutError:
            raise PbxUnavailable(f"no AMI login within {timeout}s") from None

    async def call_exists(self, channel_id: str) -> bool:
        if not self.connected:
            raise PbxUnavailable("not connected to AMI")
        return channel_id in self._live or channel_id in self._adopted_live

    def adopt(self, channel_id: str) -> None:
        """Follow a call placed before a restart (or by another gateway): on the PBX
        until end_adopted, which plays its Hangup."""
        self.adopted.append(channel_id)
        self._adopted_live.add(channel_id)

    def end_adopted(self, channel_id: str, cause: int, sip_code: int | None) -> None:
        """The Hangup of a call adopted after a restart (no script ever played it)."""
        assert channel_id in self.adopted
        self._adopted_live.discard(channel_id)
        self._events.put_nowait(
            CallEvent(channel_id, HANGUP, time.time(), cause=cause, sip_code=sip_code)
        )

    async def close(self) -> None:
        """Stop every scripted call still playing."""
        tasks = list(self._live.values())
        self._live.clear()
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _play(self, channel_id: str, steps: Sequence[Step]) -> None:
        for step in steps:
            await asyncio.sleep(step.after * self.time_scale)
            if step.kind is HANGUP:
                self._end(channel_id, step.cause, step.sip_code)
                return
            self._events.put_nowait(CallEvent(channel_id, step.kind, time.time()))

    def _end(self, channel_id: str, cause: int | None, sip_code: int | None) -> None:
        if self._live.pop(channel_id, None) is None:
            return
        self._events.put_nowait(
            CallEvent(channel_id, HANGUP, time.time(), cause=cause, sip_code=sip_code)
        )
