"""An AMI session that records every event it is sent: the test's view of the PBX."""

from __future__ import annotations

import asyncio
from types import TracebackType

from panoramisk import Manager
from panoramisk.message import Message

MONITOR_USER = "otp-monitor"  # dev PBX only: read = call,originate, no event filter
MONITOR_SECRET = "otp-dev-monitor"  # noqa: S105 - the dev PBX's fixed loopback secret


class AmiWatch:
    """Logs in as `username` and keeps every event, for `async with`."""

    def __init__(self, host: str, port: int, username: str, secret: str) -> None:
        self.events: list[Message] = []
        self._manager = Manager(
            host=host,
            port=port,
            username=username,
            secret=secret,
            ping_delay=3600,
            reconnect_timeout=3600,
        )
        self._manager.register_event("*", lambda _, event: self.events.append(event))

    async def __aenter__(self) -> AmiWatch:
        self._manager.loop = asyncio.get_running_loop()
        await self._manager.connect()
        async with asyncio.timeout(5):
            while not self._manager.authenticated:
                await asyncio.sleep(0.02)
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._manager.close()

    def of_calls(self, channel_ids: set[str]) -> list[Message]:
        """The events about the given calls (by Uniqueid, DestUniqueid or Linkedid)."""
        return [
            e
            for e in self.events
            if {e.get("Uniqueid"), e.get("DestUniqueid"), e.get("Linkedid")} & channel_ids
        ]
