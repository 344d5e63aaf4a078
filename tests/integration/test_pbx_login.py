"""The login against the real dev Asterisk: its boot signal and its version."""

from __future__ import annotations

import dataclasses
import time

import pytest

from gateway.pbx import AmiPbx, AmiSettings

pytestmark = pytest.mark.integration

# The dev PBX's monitor user: read = call,originate, no system class, no write at all.
MONITOR = {"username": "otp-monitor", "secret": "otp-dev-monitor"}


async def login_seconds(settings: AmiSettings) -> tuple[float, AmiPbx]:
    pbx = AmiPbx(settings)
    started = time.monotonic()
    await pbx.start()
    try:
        await pbx.wait_connected(30)
    except BaseException:
        await pbx.close()
        raise
    return time.monotonic() - started, pbx


async def test_fully_booted_ends_the_wait_at_login(dev_pbx: AmiSettings) -> None:
    """With read=system, a booted Asterisk says so at login: no 20 s guess is waited."""
    took, pbx = await login_seconds(dataclasses.replace(dev_pbx, settle_seconds=20))
    try:
        assert took < 3, f"logged in after {took:.2f}s"
        assert pbx.version is not None and pbx.version.startswith("22.")
    finally:
        await pbx.close()


async def test_without_the_system_class_the_gateway_waits_settle_seconds(
    dev_pbx: AmiSettings,
) -> None:
    """A user without read=system never hears FullyBooted: the old fixed wait applies,
    and without write=reporting the version stays unknown, the login goes on."""
    settings = dataclasses.replace(dev_pbx, settle_seconds=1.5, **MONITOR)
    took, pbx = await login_seconds(settings)
    try:
        assert 1.4 <= took < 4, f"logged in after {took:.2f}s"
        assert pbx.version is None
        assert pbx.connected
    finally:
        await pbx.close()
