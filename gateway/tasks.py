"""Ending the background tasks the gateway starts."""

from __future__ import annotations

import asyncio
from typing import Any


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
