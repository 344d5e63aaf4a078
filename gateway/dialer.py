"""The call queue: pacing (calls per second, calls at once) and each call's lifecycle."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from gateway.caller_health import PoolChange, RouteReport, route_verdict
from gateway.config import CallsConfig
from gateway.logs import call_ids
from gateway.nodes import Node, Nodes
from gateway.outcomes import (
    CANCELED,
    DELIVERED_OUTCOMES,
    UNCERTAIN_OUTCOMES,
    Heard,
    Outcome,
    followed,
    health_of,
)
from gateway.pbx import (
    NORMAL_CLEARING,
    CallEvent,
    CallEventKind,
    Dial,
    PbxError,
    PbxNotLoggedIn,
    Speech,
    trunk_name,
)
from gateway.store import (
    NOT_PENDING,
    TAKEN,
    CallEventRecord,
    CallStatus,
    Channel,
    Store,
    VerificationStatus,
)
from gateway.tasks import cancel_and_wait, event_loop

log = logging.getLogger(__name__)

# A call with no Hangup this long after its cap is given up as lost: Asterisk hangs up
# within a second of its Timeout, so 30 s means the events are gone.
LOST_CALL_GRACE_S = 30.0
SWEEP_INTERVAL_S = 1.0
# The gateway hangs a call up itself at its cap; Asterisk's Timeout, this much later,
# ends it when the gateway cannot (AMI lost), and never races the gateway's own timer.
PBX_CAP_MARGIN_S = 2.0
# A timer's hangup that Asterisk could not do (no channel yet, AMI away) is tried again
# this often, until the call ends or Asterisk's own Timeout ends it.
HANGUP_RETRY_S = 1.0
# A cancel of another gateway's call that found no channel on its node(s) is sent again
# after these pauses: its owner's Originate may still be on its way or queued there.
OWNER_HANGUP_RETRIES_S = (0.1, 0.4, 1.5)
# AMI sends events and responses in order: a Hangup that came before the answer to
# "does the PBX still have this call" is in the event queue; this lets it be handled.
HANGUP_SETTLE_S = 0.2
# A call its node could not take (AMI lost between the choice and the Originate) waits
# this long for another node; the call's own wait for a PBX has been spent already.
MOVE_WAIT_S = 1.0

RINGING = CallEventKind.RINGING


@dataclass(frozen=True, slots=True)
class CallJob:
    """A call to place for a verification."""

    call_id: str
    verification_id: str
    dial_number: str  # formatted for the trunk
    cli: str  # E.164, for the pool; kept in memory only, as it carries the code
    cli_dial: str  # formatted for the trunk
    pool: str
    ring_seconds: float
    queued_at: float = 0.0  # wall clock; how long it may wait for a PBX counts from here
    # The destination's carrier uses 183 for real ringing (numbers.early_media_is_alerting).
    early_media_is_alerting: bool = False
    channel: Channel = Channel.FLASHCALL
    # A voice call: what its dialplan says (the code: kept in memory only), and the
    # longest it may last once answered (voice.max_seconds).
    speech: Speech | None = None
    answered_cap: float = 0.0
    # Its verification has a step after this one: started at once when this call
    # fails, `fallback_after` seconds after it delivers (None: only when asked).
    has_next: bool = False
    fallback_after: float | None = None
    # A flash call: its pool's trunk when not the node's (pools[].channel), and what its
    # end will say of the pool's route to the carrier (`delivered` is filled in then).
    trunk_channel: str | None = None
    route: RouteReport | None = None

    @property
    def voice(self) -> bool:
        return self.channel is Channel.VOICE


@dataclass(slots=True)
class _LiveCall:
    job: CallJob
    node: Node  # the Asterisk node it is placed on, and followed on
    dialed_at: float
    # When Asterisk sent the INVITE (DialBegin); until known, the Originate's time.
    invited_at: float | None = None
    rang: bool = False  # 180
    progress: bool = False  # 183
    answered: bool = False
    answered_at: float | None = None
    spoken: bool = False  # a voice call's dialplan said the code in full
    # Adopted after a restart while still "dialing": whether it rang before the
    # restart is unknown (those events went with the old process).
    alert_unknown: bool = False
    # Hung up by the gateway (a cancel, or a newer verification for the phone).
    canceled: bool = False
    # Canceled before Asterisk had its channel: the Hangup is sent again until one lands.
    hangup_owed: bool = False
    # Hung up by the gateway's timer: ring_seconds after alerting, or at the cap.
    timed_out: bool = False
    timer: asyncio.TimerHandle | None = None

    @property
    def ring_started(self) -> bool:
        """A 180 or a 183 came: the ring time runs."""
        return self.rang or self.progress


EndedCallback = Callable[[CallJob, Outcome], Awaitable[None]]


class CallMetrics(Protocol):
    """What the dialer reports as calls progress (gateway.metrics.Metrics)."""

    def call_ringing(self, since_request: float) -> None: ...
    def call_ended(self, outcome: str, cause: int | None) -> None: ...
    def trunk_rejected(self, trunk: str, sip_code: int | None) -> None: ...
    def pbx_connected(self, node: str) -> None: ...
    def call_placed(self, node: str) -> None: ...


class _NoMetrics:
    def call_ringing(self, since_request: float) -> None:
        pass

    def call_ended(self, outcome: str, cause: int | None) -> None:
        pass

    def trunk_rejected(self, trunk: str, sip_code: int | None) -> None:
        pass

    def pbx_connected(self, node: str) -> None:
        pass

    def call_placed(self, node: str) -> None:
        pass


class Reservation:
    """A call's place in the dialer, held while its create is stored.

    Used as a context manager: `place` hands the stored call over (on the node held, or
    to the queue when none was free); leaving the block without placing, on an error
    or a refusal, gives the place back."""

    def __init__(self, dialer: Dialer, node: Node | None, at: float) -> None:
        self._dialer = dialer
        self._node = node
        self._at = at
        self._settled = False

    @property
    def node(self) -> str | None:
        """The node the call is stored dialing on; None: it is stored queued."""
        return self._node.name if self._node is not None else None

    def place(self, job: CallJob) -> None:
        """Hand the stored call over: placed now on the node held, or queued."""
        assert not self._settled, "a reservation is placed or given back once"
        self._settled = True
        if self._node is None:
            self._dialer.submit(job)
        else:
            self._dialer._settle(self._node, job, self._at)

    def give_back(self) -> None:
        if self._settled:
            return
        self._settled = True
        if self._node is not None:
            self._dialer._settle(self._node, None, self._at)

    def __enter__(self) -> Reservation:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.give_back()


class Dialer:
    """Places queued calls through the PBX and writes each call's fate to the store."""

    def __init__(
        self,
        nodes: Nodes,
        store: Store,
        config: CallsConfig,
        release_cli: Callable[[str, str], None],
        on_ended: EndedCallback | None = None,
        metrics: CallMetrics | None = None,
        owner: str = "gateway",
    ) -> None:
        # This gateway's name (instance.name): its calls are stored with it, and only
        # calls still its own are dialed.
        self.owner = owner
        self.nodes = nodes
        self._metrics = metrics or _NoMetrics()
        self._store = store
        self.on_ended = on_ended
        # Told of the pool states a call's end changed (gateway.alerts.Alerts).
        self.on_pool_change: Callable[[list[PoolChange]], None] | None = None
        self._release_cli = release_cli
        self._queue: asyncio.Queue[CallJob] = asyncio.Queue()
        self._pbx_wait = config.pbx_wait_seconds
        self._max_post_dial = config.max_post_dial_seconds
        self._draining = False
        self._idle = asyncio.Event()  # set when the last live call ends
        # Places claimed by creates not yet stored (placed or given back): drain waits.
        self._claims = 0
        self._claims_settled = asyncio.Event()
        self._claims_settled.set()
        self._live: dict[str, _LiveCall] = {}
        self._waiting: set[str] = set()  # queued, or taken off the queue and not yet placed
        # Off the queue, its dialing not yet written; or stored dialing by its create,
        # its Originate not yet sent.
        self._placing: set[str] = set()
        self._canceled: set[str] = set()
        self._tasks: list[asyncio.Task[None]] = []  # the loops
        self._dial_task: asyncio.Task[None] | None = None  # the loop that takes the queue
        self._placing_tasks: set[asyncio.Task[None]] = set()  # calls being placed
        self._event_tasks: set[asyncio.Task[None]] = set()  # events, timers, hangups

    _loop = event_loop  # the loop it runs on, asked for once

    @property
    def queued(self) -> int:
        """Calls waiting to be placed (queued, or waiting for a slot)."""
        return len(self._waiting)

    @property
    def pbx_down_for(self) -> float:
        """Seconds every node has been unreachable; 0 while AMI to any is logged in."""
        return self.nodes.down_for

    def follows(self, call_id: str) -> bool:
        """Whether this dialer has the call in hand: queued, being placed, or live."""
        return (
            call_id in self._live
            or call_id in self._waiting
            or call_id in self._placing
            or call_id in self._canceled
        )

    @property
    def in_flight(self) -> int:
        """Calls placed and not yet ended."""
        return len(self._live)

    def on_node(self, node: Node) -> tuple[int, int]:
        """Calls placed on `node` and not yet ended, and how many of them ring now."""
        live = [c for c in self._live.values() if c.node is node]
        return len(live), sum(1 for c in live if c.ring_started and not c.answered)

    def start(self) -> None:
        """Start placing calls and following their events."""
        self._dial_task = asyncio.create_task(self._dial_loop(), name="dialer-dial")
        self._tasks.append(self._dial_task)
        self._tasks.append(asyncio.create_task(self._sweep_loop(), name="dialer-sweep"))
        for node in self.nodes.all:
            self._tasks.append(
                asyncio.create_task(self._event_loop(node), name=f"dialer-events-{node.name}")
            )

    async def stop(self) -> None:
        """Stop every task this dialer started."""
        for live in self._live.values():
            if live.timer is not None:
                live.timer.cancel()
        await cancel_and_wait(*self._tasks, *self._placing_tasks, *self._event_tasks)
        self._tasks.clear()

    def _spawn(
        self, work: Coroutine[Any, Any, None], into: set[asyncio.Task[None]] | None = None
    ) -> None:
        """Run `work` beside the loops, kept in `into` (default: the event tasks) until
        it ends. Tasks start in the order they are made, and each asks the store for its
        writes before it first waits: the store runs them in that order, so the events
        of one call are written in the order they came."""
        tasks = self._event_tasks if into is None else into
        task = self._loop.create_task(work)
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    async def adopt(
        self,
        job: CallJob,
        dialed_at: float,
        ringing_at: float | None,
        rang: bool,
        node_name: str | None = None,
        answered_at: float | None = None,
        spoken: bool = False,
    ) -> None:
        """Follow a call an earlier process placed on node `node_name`: never dialed
        again, closed by its Hangup if the node still has it, else as lost once its cap
        has passed. Its ring time runs on from `ringing_at` (its first 180 or 183, if it
        had one); `rang`: that was a 180. A voice call answered at `answered_at` talks
        on to its answered cap; `spoken`: it had said the code."""
        node = self.nodes.get(node_name)
        if node is None:
            # Stored before nodes had names, or on a node no longer configured: the
            # first node is asked; if it has no such call, the call is closed as lost.
            node = self.nodes.all[0]
            if node_name is not None:
                log.warning(
                    "call %s: placed on node %s, which is not configured here; following it on %s",
                    job.call_id,
                    node_name,
                    node.name,
                    extra=_ids(job),
                )
        self.nodes.occupy(node)
        live = _LiveCall(
            job,
            node=node,
            dialed_at=dialed_at,
            rang=rang,
            progress=ringing_at is not None and not rang,
            alert_unknown=ringing_at is None,
            answered=answered_at is not None,
            answered_at=answered_at if job.voice else None,
            spoken=spoken,
        )
        self._live[job.call_id] = live
        node.pbx.adopt(job.call_id)
        self._arm(live, ringing_at)
        if node.pbx.connected:
            # Adopted from a gateway that died: its Hangup may have come before this
            # one followed the call. (At start, the first login reconciles instead.)
            self._spawn(self._reconcile_one(job.call_id, live))

    def cap_seconds(self, ring_seconds: float) -> float:
        """The longest a call may last: post-dial delay, then the ring time."""
        return self._max_post_dial + ring_seconds

    def _pbx_timeout(self, ring_seconds: float) -> float:
        """Originate's Timeout: the cap, and the margin that lets the gateway go first."""
        return self.cap_seconds(ring_seconds) + PBX_CAP_MARGIN_S

    def _span(self, job: CallJob) -> float:
        """The longest `job` can last from its Originate: a voice call talks on after
        its answer."""
        return self._pbx_timeout(job.ring_seconds) + job.answered_cap

    def _arm(self, live: _LiveCall, alerted_at: float | None = None) -> None:
        """(Re)set the timer that hangs `live` up: ring_seconds after `alerted_at`, and
        never later than its cap."""
        if live.timed_out or live.hangup_owed:
            return  # hung up already: a 180 crossing the CANCEL changes nothing
        started = live.invited_at or live.dialed_at
        deadline = started + self.cap_seconds(live.job.ring_seconds)
        if alerted_at is not None:
            deadline = min(deadline, alerted_at + live.job.ring_seconds)
        if live.answered_at is not None:
            # A voice call once answered: voice.max_seconds, whatever the dialplan does.
            deadline = live.answered_at + live.job.answered_cap
        if live.timer is not None:
            live.timer.cancel()
        live.timer = self._loop.call_later(max(0.0, deadline - time.time()), self._time_out, live)

    def _time_out(self, live: _LiveCall) -> None:
        """The ring time (or the cap) has run out: hang the call up."""
        live.timer = None
        if self._live.get(live.job.call_id) is not live or live.canceled:
            return
        live.timed_out = True
        self._spawn(self._hang_up(live))

    async def _try_hang_up(self, live: _LiveCall) -> bool:
        """Hang `live` up; False when Asterisk has no such channel (yet) or AMI failed."""
        job = live.job
        try:
            return await live.node.pbx.hangup(job.call_id)
        except (PbxError, TimeoutError) as exc:
            log.warning("call %s: hangup failed: %s", job.call_id, exc, extra=_ids(job))
            return False

    async def _hang_up(self, live: _LiveCall) -> None:
        done = await self._try_hang_up(live)
        if not done and self._live.get(live.job.call_id) is live and not live.canceled:
            # No channel yet (Asterisk still queues the Originate: its DialBegin re-arms
            # the timer) or no AMI: not timed out until a hangup lands. Try again.
            live.timed_out = False
            if live.timer is None:
                live.timer = self._loop.call_later(HANGUP_RETRY_S, self._time_out, live)

    def _owe_hangup(self, live: _LiveCall) -> None:
        """A cancel's Hangup found no channel: send it again in a moment (or at the
        call's DialBegin, whichever comes first)."""
        live.hangup_owed = True
        if live.timer is not None:
            live.timer.cancel()
        live.timer = self._loop.call_later(HANGUP_RETRY_S, self._pay_hangup, live)

    def _pay_hangup(self, live: _LiveCall) -> None:
        if live.timer is not None:
            live.timer.cancel()  # called at the DialBegin: the retry is not needed
        live.timer = None
        if self._live.get(live.job.call_id) is live:
            self._spawn(self._hang_up_canceled(live))

    async def _hang_up_canceled(self, live: _LiveCall) -> None:
        if await self._try_hang_up(live):
            live.hangup_owed = False
        elif self._live.get(live.job.call_id) is live and live.timer is None:
            self._owe_hangup(live)

    async def drain(self, timeout: float) -> None:
        """Stop placing calls and wait, at most `timeout`, for the live ones to end.

        Calls still queued stay queued in the store: the next start resumes them.
        """
        self._draining = True
        if self._dial_task is not None:
            self._dial_task.cancel()
        # A create that claimed a place before draining began is still being stored;
        # once stored it is placed, and followed below like the others.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._claims_settled.wait(), timeout)
        # Calls already being placed finish placing (their dialing commit is written):
        # stopped halfway, they would be closed as lost at the next start.
        if self._placing_tasks:
            await asyncio.wait(self._placing_tasks, timeout=timeout)
        if self._live:
            self._idle.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._idle.wait(), timeout)
        # A call that has just ended may still be writing its outcome (a lazy write),
        # logging it and telling its webhook: that finishes too.
        if self._event_tasks:
            await asyncio.wait(self._event_tasks, timeout=timeout)
        if self._live:
            log.warning(
                "shutdown: %d calls still live; their outcomes are left to the next start",
                len(self._live),
            )

    @property
    def draining(self) -> bool:
        """True once shutdown has begun."""
        return self._draining

    def reserve(self, at: float) -> Reservation:
        """A place for one call, held while its create is stored (see Reservation).

        When nothing is waiting and a node's channels and pacing allow, the place is on
        that node now: the call is stored already dialing there (its dialing written in
        the same commit as its creation: one commit less on the way to the phone).
        Otherwise the reservation holds no node and the call goes to the queue.
        """
        node = None
        if self._tasks and not self._draining and not self._waiting:
            node = self.nodes.take_now()
        if node is not None:
            self._claims += 1
            self._claims_settled.clear()
        return Reservation(self, node, at)

    def _settle(self, node: Node, job: CallJob | None, at: float) -> None:
        """A reservation on `node` ends: its call placed there (stored dialing at `at`),
        or (no job) its place given back."""
        if job is None:
            self.nodes.give_back(node)
        else:
            # Until its task runs, a cancel (a newer create for the phone) keeps it
            # from the PBX as it would a queued call.
            self._placing.add(job.call_id)
            self._spawn(self._place_or_abandon(job, node, at), self._placing_tasks)
        self._claims -= 1
        if not self._claims:
            self._claims_settled.set()

    def submit(self, job: CallJob) -> None:
        """Queue a call; it is placed as pacing allows."""
        self._waiting.add(job.call_id)
        self._queue.put_nowait(job)

    async def cancel(self, call_id: str, node_name: str | None = None) -> None:
        """Hang up a live call, or keep a queued one from being placed. `node_name`:
        the node the store says it is on (None: not known, or not placed yet)."""
        live = self._live.get(call_id)
        if live is not None:
            # Marked first: the Hangup event can come before hangup() returns. A hangup
            # that failed (AMI gone) leaves the call to ring out or be found lost.
            live.canceled = True
            try:
                done = await live.node.pbx.hangup(call_id)
            except (PbxError, TimeoutError):
                live.canceled = False
                return
            if not done and self._live.get(call_id) is live:
                # No channel yet: Asterisk still queues the Originate. Hung up as soon
                # as it has one (its DialBegin), else tried again in a moment.
                self._owe_hangup(live)
        elif call_id in self._waiting or call_id in self._placing:
            # Closed when the dial loop (or the placing, before its Originate) reaches
            # it; it no longer counts as waiting.
            self._waiting.discard(call_id)
            self._canceled.add(call_id)
        else:
            # Another gateway sharing the database owns it: if it is on a node, hang
            # it up there (its owner records the end); if still queued, its owner's
            # claim finds the verification canceled and never dials it. A node not
            # known: every node is asked (a Hangup of a channel it lacks does nothing).
            node = self.nodes.get(node_name)
            targets = (node,) if node is not None else self.nodes.all
            if not await self._hang_up_for_owner(call_id, targets):
                # No channel: its owner may be sending the Originate, or Asterisk still
                # queue it (or it was never placed, or has ended: a few Hangups refused).
                self._spawn(self._hang_up_for_owner_later(call_id, targets))

    async def _hang_up_for_owner(self, call_id: str, targets: Sequence[Node]) -> bool:
        """Hang up another gateway's call on the first of `targets` that has it; False
        when none does."""
        for target in targets:
            if not target.pbx.connected:
                continue
            try:
                if await target.pbx.hangup(call_id, placed_elsewhere=True):
                    return True
            except (PbxError, TimeoutError) as exc:
                log.warning(
                    "call %s: hangup on node %s for its owner failed: %s",
                    call_id,
                    target.name,
                    exc,
                )
        return False

    async def _hang_up_for_owner_later(self, call_id: str, targets: Sequence[Node]) -> None:
        for pause in OWNER_HANGUP_RETRIES_S:
            await asyncio.sleep(pause)
            if await self._hang_up_for_owner(call_id, targets):
                return

    async def _dial_loop(self) -> None:
        while True:
            job = await self._queue.get()
            if await self._skip_canceled(job):
                continue
            # Nothing is dropped while every node is away: the call waits for one,
            # within a bound.
            deadline = (job.queued_at or time.time()) + self._pbx_wait
            node = await self.nodes.take(deadline)
            if node is None:
                log.warning(
                    "call %s: no PBX within %ss", job.call_id, self._pbx_wait, extra=_ids(job)
                )
                self._waiting.discard(job.call_id)
                self._canceled.discard(job.call_id)
                await self._finish(job, Outcome.ERROR, None, None, "pbx_unavailable")
                continue
            if await self._skip_canceled(job):  # canceled while it waited for a node
                self.nodes.release(node)
                continue
            self._waiting.discard(job.call_id)
            self._placing.add(job.call_id)  # a cancel still keeps it from the PBX
            # Placing waits for a commit and for AMI's answer: calls overlap in that
            # time (placed one by one, that time capped the rate: make bench).
            self._spawn(self._place_or_abandon(job, node), self._placing_tasks)

    async def _place_or_abandon(
        self, job: CallJob, node: Node, dialed_at: float | None = None
    ) -> None:
        try:
            await self._place(job, node, dialed_at)
        except Exception:
            self._placing.discard(job.call_id)
            # A store failure must not stop the others: this call ends as an error
            # (if it got as far as live).
            log.exception("call %s: could not be placed", job.call_id, extra=_ids(job))
            await self._abandon(job, node)

    async def _skip_canceled(self, job: CallJob) -> bool:
        """Close `job` without placing it if it was canceled; True if so."""
        if job.call_id not in self._canceled:
            return False
        self._canceled.discard(job.call_id)
        self._waiting.discard(job.call_id)
        await self._finish(job, Outcome.ERROR, None, None, CANCELED)
        return True

    async def _place(self, job: CallJob, node: Node, dialed_at: float | None = None) -> None:
        """Place `job` on `node`, whose channel it holds; `dialed_at`: it was claimed,
        and is stored as dialing there already."""
        claim = None
        if dialed_at is None:
            dialed_at = time.time()
            # Written before the Originate: after a crash a call marked dialing is
            # reconciled, never dialed again. Only a call still this gateway's is dialed.
            claim = await self._store.claim_call(job.call_id, self.owner, dialed_at, node.name)
        self._placing.discard(job.call_id)
        if claim == TAKEN:
            log.warning(
                "call %s: adopted by another gateway; not dialed here", job.call_id, extra=_ids(job)
            )
            self._canceled.discard(job.call_id)
            self.nodes.release(node)
            self._release_cli(job.pool, job.cli)
            return
        if claim == NOT_PENDING or job.call_id in self._canceled:
            # Canceled while it waited or was claimed, here or through another gateway
            # (stored dialing by its create: superseded before this task ran).
            self._canceled.discard(job.call_id)
            self.nodes.release(node)
            await self._finish(job, Outcome.ERROR, None, None, CANCELED)
            return
        live = self._go_live(job, node, dialed_at)
        await self._originate(live)

    def _go_live(self, job: CallJob, node: Node, dialed_at: float) -> _LiveCall:
        live = _LiveCall(job, node=node, dialed_at=dialed_at)
        self._live[job.call_id] = live
        self._arm(live)
        return live

    async def _originate(self, live: _LiveCall) -> None:
        job = live.job
        dial = Dial(
            job.call_id,
            job.dial_number,
            job.cli_dial,
            self._pbx_timeout(job.ring_seconds),
            job.speech,
            job.trunk_channel,
        )
        while True:
            node = live.node
            try:
                await node.pbx.originate(dial)
            except PbxNotLoggedIn as exc:
                # Nothing reached the node: the call moves to another one that is up.
                if await self._move(live, str(exc)):
                    continue
                await self._end(job.call_id, None, None, "pbx_unavailable")
            except PbxError as exc:
                log.warning(
                    "call %s: originate on node %s failed: %s",
                    job.call_id,
                    node.name,
                    exc,
                    extra=_ids(job),
                )
                reason = "pbx_unavailable" if not node.pbx.connected else "originate_refused"
                await self._end(job.call_id, None, None, reason)
            except ValueError as exc:  # UnsafeAmiValue: a bug upstream, never sent
                log.error(
                    "call %s: refused unsafe AMI value: %s", job.call_id, exc, extra=_ids(job)
                )
                await self._end(job.call_id, None, None, "invalid_dial")
            else:
                node.placed += 1
                self._metrics.call_placed(node.name)
                log.debug("call %s: placed on node %s", job.call_id, node.name, extra=_ids(job))
            return

    async def _move(self, live: _LiveCall, why: str) -> bool:
        """Move a call its node could not take (not logged in, nothing sent) to another
        node; False when none is up within a moment."""
        job, lost = live.job, live.node
        other = await self.nodes.take(time.time() + MOVE_WAIT_S, exclude=lost)
        if other is None or self._live.get(job.call_id) is not live or live.canceled:
            if other is not None:
                self.nodes.release(other)
            log.warning(
                "call %s: node %s cannot take it (%s), and no other node can",
                job.call_id,
                lost.name,
                why,
                extra=_ids(job),
            )
            return False
        # Stored on its new node before it is placed there: whoever follows it after
        # a crash asks the right node.
        await self._store.move_call(job.call_id, other.name)
        live.node = other
        self.nodes.release(lost)
        log.warning(
            "call %s: node %s cannot take it (%s); placing it on node %s",
            job.call_id,
            lost.name,
            why,
            other.name,
            extra=_ids(job),
        )
        return True

    async def _abandon(self, job: CallJob, node: Node) -> None:
        """Close a call that failed inside the gateway, as best the store allows."""
        try:
            if job.call_id in self._live:
                await self._end(job.call_id, None, None, "gateway_error")
            else:
                self.nodes.release(node)
                await self._finish(job, Outcome.ERROR, None, None, "gateway_error")
        except Exception:
            log.exception("call %s: could not be closed", job.call_id, extra=_ids(job))

    async def _event_loop(self, node: Node) -> None:
        while True:
            # Each event without waiting for the one before it to be written (one at
            # a time, the writes capped the rate); see _spawn for the order kept.
            self._spawn(self._handle_logged(node, await node.pbx.next_event()))

    async def _handle_logged(self, node: Node, event: CallEvent) -> None:
        try:
            await self._handle_event(
                node,
                event.channel_id,
                event.kind,
                event.at,
                event.cause,
                event.sip_code,
                event.reason,
            )
        except Exception:
            live = self._live.get(event.channel_id)
            log.exception(
                "call %s: event %s not recorded",
                event.channel_id,
                event.kind,
                extra=_ids(live.job) if live else call_ids(call_id=event.channel_id),
            )

    async def _handle_event(
        self,
        node: Node,
        call_id: str,
        kind: CallEventKind,
        at: float,
        cause: int | None,
        sip_code: int | None,
        reason: str | None,
    ) -> None:
        if kind is CallEventKind.CONNECTED:
            self._metrics.pbx_connected(node.name)
            await self._reconcile(node, at)
            return
        live = self._live.get(call_id)
        if live is None or live.node is not node:
            return
        alerting = kind in (RINGING, CallEventKind.PROGRESS)
        if kind is CallEventKind.INVITED:
            # Asterisk may have queued the Originate for a while: the cap counts from
            # the INVITE, as Asterisk's own Timeout does. Nothing to write.
            live.invited_at = at
            if live.hangup_owed:  # canceled before Asterisk had its channel
                self._pay_hangup(live)
            elif not live.ring_started:
                self._arm(live)
        elif alerting:
            # The first 180 or 183, or a 180 after a 183 (the handset alerts now): the
            # ring time counts from here. A 183 may be a ringback tone with the phone
            # ringing behind it. Alerting that crossed the gateway's CANCEL, or a 183
            # after alerting, goes on the timeline only.
            first = not live.ring_started
            news = not live.timed_out and (first or (kind is RINGING and not live.rang))
            if news:
                live.rang = live.rang or kind is RINGING
                live.progress = live.progress or kind is not RINGING
                self._arm(live, at)
            if news and first:
                await self._store.call_progress(call_id, CallStatus.RINGING, "ringing_at", at, kind)
                if live.job.queued_at:
                    self._metrics.call_ringing(at - live.job.queued_at)
            else:
                await self._store.add_call_event(CallEventRecord(call_id, at, kind, None, None))
        elif kind is CallEventKind.HANGUP:
            await self._end(call_id, cause, sip_code, reason, at)
        else:
            if kind is CallEventKind.ANSWERED and not live.answered:
                live.answered = True
                if live.job.voice:
                    live.answered_at = at
                    self._arm(live)
            live.spoken = live.spoken or kind is CallEventKind.SPOKEN
            await self._store.add_call_event(CallEventRecord(call_id, at, kind, None, None))

    async def _reconcile(self, node: Node, connected_at: float) -> None:
        """After an AMI (re)connection to `node`, close its calls Asterisk no longer has:
        their Hangup came while the gateway could not hear it."""
        for call_id, live in list(self._live.items()):
            # Placed on this connection: its events are not lost.
            if live.node is node and live.dialed_at < connected_at:
                await self._reconcile_one(call_id, live)

    async def _reconcile_one(self, call_id: str, live: _LiveCall) -> None:
        """Close `live` if its node no longer has it: its Hangup came unheard."""
        try:
            exists = await live.node.pbx.call_exists(call_id)
        except PbxError as exc:
            log.warning("call %s: cannot reconcile: %s", call_id, exc, extra=_ids(live.job))
            return  # the sweep closes it after its ring time
        if not exists:
            # A Hangup that came before the answer is handled first: it knows more.
            await asyncio.sleep(HANGUP_SETTLE_S)
        if not exists and self._live.get(call_id) is live:
            log.warning(
                "call %s: gone from the PBX while this gateway did not follow it",
                call_id,
                extra=_ids(live.job),
            )
            await self._end(call_id, None, None, "pbx_lost")

    async def _end(
        self,
        call_id: str,
        cause: int | None,
        sip_code: int | None,
        reason: str | None,
        at: float | None = None,
    ) -> None:
        live = self._live.pop(call_id, None)
        if live is None:
            return
        if live.timer is not None:
            live.timer.cancel()
        self.nodes.release(live.node)
        if _hung_up_elsewhere(live, cause, sip_code, reason):
            # Not this gateway's hangup: another's, that a cancel reached (any gateway
            # answers any request), or an operator's.
            found = await self._store.verification(live.job.verification_id)
            live.canceled = found is not None and found[0].status is VerificationStatus.CANCELED
        heard = Heard(
            rang=live.rang,
            progress=live.progress,
            answered=live.answered,
            cause=cause,
            sip_code=sip_code,
            timed_out=_ended_by_timer(live, cause, sip_code, reason),
            spoken=live.spoken,
        )
        outcome, reason = followed(
            heard,
            reason=reason,
            early_media_is_alerting=live.job.early_media_is_alerting,
            alert_unknown=live.alert_unknown,
            canceled=live.canceled,
            voice=live.job.voice,
        )
        if outcome is Outcome.TRUNK_REJECTED:
            trunk = trunk_name(live.job.trunk_channel or "") or live.node.pbx.trunk
            self._metrics.trunk_rejected(trunk, sip_code)
            log.error(
                "call %s: trunk %s of node %s refused the call with SIP %s: check the "
                "trunk's account, its caller-ID rules and its call rate",
                call_id,
                trunk,
                live.node.name,
                sip_code,
                extra=_ids(live.job),
            )
        try:
            await self._finish(live.job, outcome, cause, sip_code, reason, at=at, node=live.node)
        finally:
            # Only once the outcome is written: shutdown stops the dialer when idle.
            if not self._live:
                self._idle.set()

    async def _finish(
        self,
        job: CallJob,
        outcome: Outcome,
        cause: int | None,
        sip_code: int | None,
        reason: str | None,
        at: float | None = None,
        node: Node | None = None,
    ) -> None:
        if not job.voice:
            self._release_cli(job.pool, job.cli)
        delivered = outcome in DELIVERED_OUTCOMES
        uncertain = outcome in UNCERTAIN_OUTCOMES
        at = at or time.time()
        next_at = _next_step_at(job, outcome, reason, at)
        route = None
        if job.route is not None:
            route = dataclasses.replace(job.route, delivered=route_verdict(outcome, reason))
        changes = await self._store.end_call(
            job.call_id,
            call_status=CallStatus.COMPLETED if delivered or uncertain else CallStatus.FAILED,
            outcome=outcome,
            cause=cause,
            sip_code=sip_code,
            reason=reason,
            at=at,
            fail_verification=not (delivered or uncertain),
            health=health_of(outcome),
            delivered=delivered,
            uncertain=uncertain,
            next_at=next_at,
            route=route,
        )
        if changes and self.on_pool_change is not None:
            self.on_pool_change(changes)
        self._metrics.call_ended(CANCELED if reason == CANCELED else outcome, cause)
        log.info(
            "call %s (verification %s): %s, cause %s, sip %s, node %s",
            job.call_id,
            job.verification_id,
            outcome,
            cause,
            sip_code,
            node.name if node is not None else "none",
            extra=_ids(job),
        )
        if self.on_ended is not None:
            await self.on_ended(job, outcome)

    async def _sweep_loop(self) -> None:
        """End calls whose Hangup never came (events lost with the PBX)."""
        while True:
            await asyncio.sleep(SWEEP_INTERVAL_S)
            now = time.time()
            for call_id, live in list(self._live.items()):
                if now > live.dialed_at + self._span(live.job) + LOST_CALL_GRACE_S:
                    log.warning(
                        "call %s: no hangup from the PBX; closing it as lost",
                        call_id,
                        extra=_ids(live.job),
                    )
                    await self._end(call_id, None, None, "pbx_lost")


def _next_step_at(job: CallJob, outcome: Outcome, reason: str | None, at: float) -> float | None:
    """When the verification's next step starts after `job` ended so; None: not by
    itself. At once when the call did not deliver (an invalid number ends the
    verification: nothing else is tried), `fallback_after` after it delivered."""
    if not job.has_next or reason == CANCELED or outcome is Outcome.INVALID_NUMBER:
        return None
    if outcome in DELIVERED_OUTCOMES:
        return None if job.fallback_after is None else at + job.fallback_after
    return at


def _ended_by_timer(
    live: _LiveCall, cause: int | None, sip_code: int | None, reason: str | None
) -> bool:
    """Whether the gateway's timer ended the call: its hangup landed, and the Hangup the
    PBX reported is that hangup's (normal clearing, no SIP response). A final response of
    the network that crossed the CANCEL is the network's verdict; a call lost with AMI
    (a reason of its own) may have rung meanwhile."""
    return (
        live.timed_out and reason is None and sip_code is None and cause in (NORMAL_CLEARING, None)
    )


def _hung_up_elsewhere(
    live: _LiveCall, cause: int | None, sip_code: int | None, reason: str | None
) -> bool:
    """Whether a Hangup action ended the call, and not this gateway's: normal clearing
    of an unanswered call with no SIP response, that this gateway neither canceled nor
    timed out. A far end that refuses sends a response; one that answers, answered."""
    return (
        not (live.canceled or live.timed_out or live.answered)
        and cause == NORMAL_CLEARING
        and sip_code is None
        and reason is None
    )


def _ids(job: CallJob) -> dict[str, str]:
    return call_ids(job.verification_id, job.call_id)
