"""This gateway among the gateways sharing one database: its lease, and the calls it
adopts, its own previous process's at start and a dead gateway's while it runs.

Every call has an owner, the gateway that places and follows it. Each gateway renews a
lease in the database; when one stops renewing (killed, or cut off from the database),
its lease lapses and the first of the others to look adopts its live calls: a queued
one is placed with a fresh code (nobody saw the old one), a dialing or ringing one is
followed on the PBX to its end, or closed as lost if the PBX no longer has it. A queued
call is dialed only by the owner that claims it (Store.claim_call), so nothing is
dialed twice, even when a gateway that was cut off comes back.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import Callable

from gateway.dialer import Dialer
from gateway.logs import call_ids
from gateway.pbx import CallEventKind
from gateway.store import CallRecord, CallStatus, Store, VerificationRecord
from gateway.tasks import cancel_and_wait
from gateway.verifications import Verifications

log = logging.getLogger(__name__)

# Renewals per lease: two may fail (a slow or failing-over database) before it lapses.
RENEWALS_PER_LEASE = 3
# How often a gateway looks for calls whose owner's lease has lapsed: a dead gateway's
# calls are adopted within lease_seconds and this.
ADOPT_INTERVAL_S = 1.0
# How often a gateway looks for live calls of its own that it no longer has in hand (an
# end it could not write while the database was away), and how old such a call must
# be: younger ones may still be on their way from a create to the dialer.
STRAY_CHECK_S = 30.0
STRAY_AFTER_S = 30.0


class Membership:
    """Holds `name`'s lease while the gateway runs, and adopts orphaned calls."""

    def __init__(
        self,
        store: Store,
        dialer: Dialer,
        verifications: Verifications,
        name: str,
        lease_seconds: float,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.name = name
        self.incarnation = secrets.token_hex(8)  # this process, among those named `name`
        self._store = store
        self._dialer = dialer
        self._verifications = verifications
        self._lease = lease_seconds
        self._clock = clock
        self._task: asyncio.Task[None] | None = None
        self._adopting = True  # until shutdown begins: then it only gives calls away
        self._draining: asyncio.Future[None] | None = None

    async def join(self) -> None:
        """Take the name's lease, adopt what its previous process and dead gateways
        left, and keep the lease from then on."""
        now = self._clock()
        previous = await self._store.register_instance(
            self.name, self.incarnation, now, now + self._lease
        )
        if previous is not None and previous.stopped_at is None and previous.lease_until > now:
            log.warning(
                "instance %s: the previous process of this name did not stop cleanly (or "
                "another runs with the same instance.name); taking over its calls",
                self.name,
            )
        await self._adopt(await self._store.adopt_calls(self.name, now, own=True))
        self._task = asyncio.create_task(self._keep(), name="instance-lease")

    async def drain(self, timeout: float) -> None:
        """Shutdown's first half, run once however often asked: the calls not yet
        dialed go to the other gateways now (this one adopts nothing more: they would
        come back), and the calls ringing are let end, within `timeout`."""
        if self._draining is None:
            self._draining = asyncio.ensure_future(self._drain(timeout))
        await asyncio.shield(self._draining)

    async def _drain(self, timeout: float) -> None:
        self._adopting = False
        released = await self._store.release_queued(self.name)
        if released:
            log.info("instance %s: handed %d queued calls over", self.name, released)
        await self._dialer.drain(timeout)

    async def close(self, timeout: float) -> None:
        """Shutdown: drain (if not done yet), stop the verifications and the dialer,
        then end the lease: what this gateway still owns is anyone's."""
        await self.drain(timeout)
        await self._verifications.stop()
        await self._dialer.stop()
        await cancel_and_wait(self._task)
        self._task = None
        await self._store.end_lease(self.name, self.incarnation, self._clock())

    async def _keep(self) -> None:
        renew_at = self._clock() + self._lease / RENEWALS_PER_LEASE
        strays_at = self._clock() + STRAY_CHECK_S
        while True:
            await asyncio.sleep(ADOPT_INTERVAL_S)
            now = self._clock()
            try:
                if now >= renew_at:
                    renew_at = now + self._lease / RENEWALS_PER_LEASE
                    if not await self._store.renew_lease(
                        self.name, self.incarnation, now + self._lease
                    ):
                        log.error(
                            "instance %s: another process took this instance.name; give "
                            "each gateway a name of its own",
                            self.name,
                        )
                if not self._adopting:
                    continue
                await self._adopt(await self._store.adopt_calls(self.name, now))
                if now >= strays_at:
                    strays_at = now + STRAY_CHECK_S
                    await self._adopt(await self._strays(now))
            except Exception:
                log.exception("instance %s: lease or adoption failed; trying again", self.name)

    async def _strays(self, now: float) -> list[CallRecord]:
        """Live calls of this gateway that its dialer no longer has in hand."""
        strays = [
            call
            for call in await self._store.live_calls(self.name)
            if call.queued_at < now - STRAY_AFTER_S and not self._dialer.follows(call.id)
        ]
        for call in strays:
            log.warning(
                "call %s is %s in the database but no longer followed; taking it up again",
                call.id,
                call.status,
                extra=call_ids(call.verification_id, call.id),
            )
        return strays

    async def _adopt(self, calls: list[CallRecord]) -> None:
        """Follow or place `calls`, now this gateway's; none is dialed a second time."""
        for call in calls:
            found = await self._store.verification(call.verification_id)
            assert found is not None, "a call always has its verification"
            verification = found[0]
            ids = call_ids(verification.id, call.id)
            if call.status is not CallStatus.QUEUED:
                log.warning("call %s was %s; following it", call.id, call.status, extra=ids)
                await self._follow(call, verification)
            elif await self._verifications.resume(verification, call):
                log.info("call %s resumed with a fresh code", call.id, extra=ids)
            else:
                await self._store.end_call(
                    call.id,
                    call_status=CallStatus.FAILED,
                    outcome="error",
                    cause=None,
                    sip_code=None,
                    reason="gateway_restart",
                    at=self._clock(),
                    fail_verification=True,
                )

    async def _follow(self, call: CallRecord, verification: VerificationRecord) -> None:
        """Follow a call another process placed, to its end on the PBX."""
        job = self._verifications.job_for(verification, call)
        events = await self._store.call_events(call.id)
        # A 183 sets ringing_at too: only a "ringing" event on its timeline was a 180.
        rang = any(e.kind == CallEventKind.RINGING for e in events)
        answered_at = next((e.at for e in events if e.kind == CallEventKind.ANSWERED), None)
        await self._dialer.adopt(
            job,
            call.dialed_at or call.queued_at,
            call.ringing_at,
            rang,
            call.node,
            answered_at=answered_at,
            spoken=any(e.kind == CallEventKind.SPOKEN for e in events),
        )
