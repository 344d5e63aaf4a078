"""The event loop of the gateway's objects, and ending the background tasks it starts."""

from __future__ import annotations

import asyncio
import functools
from typing import Any


def _running_loop(owner: object) -> asyncio.AbstractEventLoop:
    return asyncio.get_running_loop()


# A class attribute (`_loop = event_loop`) of an object that lives on one event loop:
# that loop, asked for once. asyncio.get_running_loop() makes a getpid() system call on
# Python 3.11; a call made about thirty of them before (make bench).
event_loop = functools.cached_property(_running_loop)


async def cancel_and_wait(*tasks: asyncio.Task[Any] | None) -> None:
    """Cancel `tasks` (None ones skipped) and wait until each has ended.

    A task's own CancelledError is its answer to the cancel and is swallowed; the
    caller's, when the caller itself is being cancelled meanwhile, goes on up. Any other
    exception a task ends with is raised."""
    running = [task for task in tasks if task is not None]
    for task in running:
        task.cancel()
    for task in running:
        try:
            await task
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if current is not None and current.cancelling():
                raise
