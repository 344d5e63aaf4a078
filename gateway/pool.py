"""Caller-ID pools: draw a code and the caller ID that carries it, and read a code back."""

from __future__ import annotations

import os
import re
import secrets
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

from gateway.config import PoolConfig, pools_for

__all__ = ["Cli", "CliShape", "Pool", "choose", "pools_for"]

# Random draws from a prefix pool before accepting a caller ID another ringing call
# shows: with max_concurrent far below the pool's size, a free one comes at once.
_FREE_DRAW_TRIES = 32


@dataclass(frozen=True, slots=True)
class CliShape:
    """What a client may know of the caller ID in advance: never the code itself."""

    prefix: str  # every caller ID of the pool starts with this
    length: int  # the code is the caller ID's last `length` digits
    pattern: str  # a regular expression matching every caller ID of the pool


@dataclass(frozen=True, slots=True)
class Cli:
    """A drawn caller ID (E.164) and the code it carries (its trailing digits)."""

    e164: str
    code: str


class Pool:
    """One configured block of caller IDs."""

    def __init__(self, config: PoolConfig) -> None:
        self.name = config.name
        self.regions = frozenset(config.regions)
        self.code_length = config.code_length
        self.cli_format = config.cli_format
        self.weight = config.weight
        self.channel = config.channel  # its Originate channel; None: the node's
        self._prefix = config.prefix
        self._numbers = config.numbers
        # Caller IDs on calls still ringing: a second concurrent call avoids them, so
        # every ringing phone sees its own number.
        # A count, not a set: after a restart two restored calls may show one number.
        self._in_use: Counter[str] = Counter()
        if config.prefix is not None:
            prefix = config.prefix
            self.shape = CliShape(
                prefix, self.code_length, rf"^{re.escape(prefix)}[0-9]{{{self.code_length}}}$"
            )
        else:
            common = os.path.commonprefix(list(config.numbers))  # noqa: RUF071 - digits, not paths
            alternatives = "|".join(re.escape(n) for n in config.numbers)
            self.shape = CliShape(common, self.code_length, rf"^(?:{alternatives})$")

    def serves(self, region: str) -> bool:
        """True when this pool may call a destination in `region`."""
        return not self.regions or region in self.regions

    def draw(self) -> Cli:
        """A random caller ID, preferring one that no ringing call shows; marks it in use."""
        if self._prefix is None:
            free = [n for n in self._numbers if not self._in_use[n]]
            number = secrets.choice(free or list(self._numbers))
            cli = Cli(number, number[-self.code_length :])
        else:
            for _ in range(_FREE_DRAW_TRIES):
                cli = self._random_code()
                if not self._in_use[cli.e164]:
                    break
        self._in_use[cli.e164] += 1
        return cli

    def release(self, e164: str) -> None:
        """A call showing `e164` has ended."""
        self._in_use[e164] -= 1
        if self._in_use[e164] <= 0:
            del self._in_use[e164]

    def hold(self, e164: str) -> None:
        """Mark `e164` in use (a call restored after a restart)."""
        self._in_use[e164] += 1

    def cli_for(self, code: str) -> Cli | None:
        """The caller ID of this pool that carries `code` (a later flash call of a
        verification shows its code again), or None when none does."""
        if self._prefix is not None:
            if len(code) != self.code_length or not code.isdigit():
                return None
            return Cli(self._prefix + code, code)
        number = next((n for n in self._numbers if n[-self.code_length :] == code), None)
        return Cli(number, code) if number is not None else None

    def code_of(self, cli: str) -> str | None:
        """The code carried by a full caller ID of this pool, else None."""
        if not re.fullmatch(self.shape.pattern, cli):
            return None
        return cli[-self.code_length :]

    def _random_code(self) -> Cli:
        assert self._prefix is not None
        code = f"{secrets.randbelow(10**self.code_length):0{self.code_length}d}"
        return Cli(self._prefix + code, code)


def choose(pools: Sequence[Pool]) -> Pool:
    """One of `pools` (not empty) at random, in proportion to their weights."""
    if len(pools) == 1:
        return pools[0]
    return secrets.SystemRandom().choices(pools, weights=[p.weight for p in pools])[0]
