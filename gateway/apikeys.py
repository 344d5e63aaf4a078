"""API keys: random, shown once, stored only as a hash."""

from __future__ import annotations

import hashlib
import ipaddress
import secrets
import time

from gateway.store import ApiKeyRecord, Store

KEY_PREFIX = "otpk_"
# 32 random bytes: far beyond guessing, so a fast hash (SHA-256) is enough to store it.
KEY_BYTES = 32

# What a key may do. verify: create, read, check and cancel its own verifications, and
# look numbers up. admin: that, and what concerns every key's calls (number health
# lists and resets, wrong-check resets, stats). Keys made before scopes are admin.
VERIFY = "verify"
ADMIN = "admin"
SCOPES = (VERIFY, ADMIN)


def hash_key(key: str) -> str:
    """The stored form of an API key."""
    return hashlib.sha256(key.encode()).hexdigest()


async def create_key(
    store: Store, name: str, networks: tuple[str, ...] = (), scope: str = VERIFY
) -> tuple[ApiKeyRecord, str]:
    """Make and store a key; return its record and the key itself (shown once).

    `networks` (CIDRs) limits where the key may be used from; empty: anywhere.
    """
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {', '.join(SCOPES)}")
    parsed = [str(ipaddress.ip_network(n, strict=False)) for n in networks]
    key = KEY_PREFIX + secrets.token_urlsafe(KEY_BYTES)
    record = ApiKeyRecord(
        id="key_" + secrets.token_hex(6),
        name=name,
        key_hash=hash_key(key),
        created_at=time.time(),
        revoked_at=None,
        allowed_networks=",".join(parsed) or None,
        scope=scope,
    )
    await store.add_api_key(record)
    return record, key


async def authenticate(store: Store, key: str) -> ApiKeyRecord | None:
    """The live key record for `key`, or None."""
    if not key.startswith(KEY_PREFIX) or len(key) > 200 or not key.isascii():
        return None
    record = await store.api_key_by_hash(hash_key(key))
    if record is None or record.revoked_at is not None:
        return None
    return record


def allowed_from(record: ApiKeyRecord, remote: str | None) -> bool:
    """True when `record` may be used from the address `remote`."""
    if not record.allowed_networks:
        return True
    try:
        address = ipaddress.ip_address(remote or "")
    except ValueError:
        return False
    return any(address in ipaddress.ip_network(n) for n in record.allowed_networks.split(","))
