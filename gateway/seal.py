"""A verification's code, sealed for the database: only its voice call may read it back.

The store keeps an HMAC of the code, which checks a code but cannot say it. A voice
step must say it, maybe long after the flash call whose caller ID carried it ended,
and maybe on another gateway: the code is kept sealed (Fernet: AES-128-CBC and
HMAC-SHA256, from the `cryptography` package) under a key derived from
security.code_secret. A copy of the database alone cannot read it; a changed
code_secret cannot either (the later step then cannot start: its verification fails).
"""

from __future__ import annotations

import base64
import hashlib
import hmac

from cryptography.fernet import Fernet, InvalidToken

# The key is derived, not the secret itself: the code hashes use the secret directly.
_KEY_INFO = b"otp-gateway code seal v1"


class Unreadable(Exception):
    """Sealed under another secret, or damaged."""


class Sealer:
    """Seals and opens codes under one code_secret."""

    def __init__(self, secret: bytes) -> None:
        key = hmac.new(secret, _KEY_INFO, hashlib.sha256).digest()
        self._fernet = Fernet(base64.urlsafe_b64encode(key))

    def seal(self, code: str) -> str:
        return self._fernet.encrypt(code.encode()).decode()

    def open(self, sealed: str) -> str:
        try:
            return self._fernet.decrypt(sealed.encode()).decode()
        except (InvalidToken, ValueError):
            raise Unreadable("the sealed code cannot be read with this code_secret") from None
