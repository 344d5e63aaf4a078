"""Hear what Asterisk says on a voice call: an RTP listener and a prompt recogniser.

The voice far end (tests/sipp/voice.xml) answers with an SDP naming a port where the
test listens; Asterisk's dialplan plays Playback(otp/code-is), SayDigits(code), and
repeats. The test:

    async with RtpListener() as rtp:             # 127.0.0.1, a free port: rtp.port
        ...                                      # far end with rtp_port=rtp.port; place the call
        pcm = samples(rtp.packets)               # PCMU -> 16-bit linear, in sequence order
    names = recognise(pcm, pcm.starts, prompts_for(sounds, "en"))
    assert spoken_codes(names) == ["40", "40"]

Recognition matches the start of each prompt file against the call's audio by normalised
correlation, at the offsets where Asterisk can start a file: the packet starts, and the
packet grid that follows the end of the last prompt heard (see recognise()). It is exact
audio matching, not speech recognition: it needs the PBX's own prompt files.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import errno
import math
import operator
import os
import subprocess
import sys
import time
from array import array
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from types import TracebackType

__all__ = [
    "DIGITS",
    "FRAME_SAMPLES",
    "INTRO",
    "MULAW",
    "PCMU",
    "Pcm",
    "RtpListener",
    "RtpPacket",
    "load_prompt",
    "mulaw_decode",
    "parse_rtp",
    "prompts_for",
    "recognise",
    "resolve_in_root",
    "samples",
    "spoken_codes",
    "unwrap_sequence",
]

PCMU = 0  # RTP payload type of G.711 mu-law, 8 kHz
SAMPLE_RATE = 8000
FRAME_SAMPLES = 160  # 20 ms at 8 kHz: Asterisk's frame, and one RTP packet's PCMU payload
INTRO = "intro"  # the prompt name of otp/code-is
DIGITS = tuple(str(d) for d in range(10))
PROMPT_EXTENSIONS = (".sln", ".gsm")  # in order of preference
SOX_GSM_IN = ("-t", "gsm", "-r", "8000", "-c", "1")
SOX_RAW_OUT = ("-t", "raw", "-e", "signed", "-b", "16", "-")  # in the machine's byte order
# Where the sounds live inside a PBX root: prompts_for() finds the root from this suffix.
SOUNDS_SUFFIX = ("usr", "share", "asterisk", "sounds")
MAX_SYMLINKS = 40  # as Linux's ELOOP limit

# recognise()'s defaults: see its docstring.
WINDOW = 1200  # samples compared (150 ms)
MIN_LEVEL = 1000  # a window with sum(|x|) below this is silence
THRESHOLD = 0.9  # normalised correlation needed for a match
OVERLAP = 3 * FRAME_SAMPLES  # how far the next prompt may start before the last one ends
QUIET_FRAME = FRAME_SAMPLES * 4  # a prompt's leading frames with sum(|x|) below this are cut


def _mulaw_table() -> tuple[int, ...]:
    """The 256 G.711 mu-law code words as 16-bit linear samples (ITU-T G.711)."""
    table = []
    for byte in range(256):
        u = ~byte & 0xFF
        exponent = (u >> 4) & 0x07
        mantissa = u & 0x0F
        magnitude = (((mantissa << 3) + 0x84) << exponent) - 0x84
        table.append(-magnitude if u & 0x80 else magnitude)
    return tuple(table)


MULAW = _mulaw_table()  # MULAW[byte] = linear sample, -32124..32124


def mulaw_decode(payload: bytes) -> list[int]:
    """Decode G.711 mu-law bytes to 16-bit linear samples."""
    return [MULAW[byte] for byte in payload]


# ---- RTP packets -------------------------------------------------------------------------


@dataclass(frozen=True)
class RtpPacket:
    """One received RTP packet (RFC 3550), header fields decoded."""

    arrival: float  # time.time() when it was received
    seq: int  # 16-bit sequence number
    timestamp: int  # 32-bit RTP timestamp (8 kHz units for PCMU)
    ssrc: int
    payload_type: int
    payload: bytes  # without header, CSRCs, extension and padding
    marker: bool = False
    source: tuple[str, int] | None = None  # (address, port) it came from


def parse_rtp(
    data: bytes, arrival: float | None = None, source: tuple[str, int] | None = None
) -> RtpPacket | None:
    """Parse one datagram as an RTP packet; None unless it is well-formed RTP version 2.

    RTCP multiplexed on the same port (payload types 72-76 with the marker bit, RFC 5761)
    is not RTP and gives None too.
    """
    if len(data) < 12 or data[0] >> 6 != 2:
        return None
    if 192 <= data[1] <= 223:  # RTCP SR, RR, SDES, BYE, APP...
        return None
    end = len(data)
    if data[0] & 0x20:  # padding: its length is the last byte
        pad = data[-1]
        if pad == 0 or pad > end - 12:
            return None
        end -= pad
    offset = 12 + 4 * (data[0] & 0x0F)  # CSRC list
    if data[0] & 0x10:  # header extension: 16-bit profile, 16-bit length in words
        if offset + 4 > end:
            return None
        offset += 4 + 4 * int.from_bytes(data[offset + 2 : offset + 4], "big")
    if offset > end:
        return None
    return RtpPacket(
        arrival=time.time() if arrival is None else arrival,
        seq=int.from_bytes(data[2:4], "big"),
        timestamp=int.from_bytes(data[4:8], "big"),
        ssrc=int.from_bytes(data[8:12], "big"),
        payload_type=data[1] & 0x7F,
        payload=bytes(data[offset:end]),
        marker=bool(data[1] & 0x80),
        source=source,
    )


class _Protocol(asyncio.DatagramProtocol):
    """Hands each datagram to its RtpListener."""

    def __init__(self, listener: RtpListener) -> None:
        self.listener = listener

    def datagram_received(self, data: bytes, addr: tuple[str | bytes, int]) -> None:
        self.listener._received(data, (str(addr[0]), int(addr[1])))

    def error_received(self, exc: Exception) -> None:
        self.listener.errors.append(exc)  # e.g. ICMP port unreachable; the socket stays open


class RtpListener:
    """A UDP socket on 127.0.0.1 that keeps every RTP packet it receives, in arrival order.

        rtp = await RtpListener.start()          # or: async with RtpListener() as rtp:
        ...rtp.port...
        await rtp.wait_for(lambda packets: len(packets) >= 50, timeout=10)
        rtp.close()

    Datagrams that are not RTP version 2 are counted in `ignored` and dropped. It sends
    nothing back.
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        """Prepare (not bind) a listener on UDP host:port; port 0 picks a free one."""
        self.host = host
        self._port = port
        self.packets: list[RtpPacket] = []
        self.ignored = 0  # datagrams that were not RTP
        self.errors: list[Exception] = []
        self._transport: asyncio.DatagramTransport | None = None
        self._changed: asyncio.Event | None = None

    @classmethod
    async def start(cls, host: str = "127.0.0.1", port: int = 0) -> RtpListener:
        """Bind a new listener on UDP host:port (0: a free port) and return it."""
        listener = cls(host, port)
        await listener.open()
        return listener

    async def open(self) -> None:
        """Bind the socket (in the running event loop); a no-op if already open."""
        if self._transport is not None:
            return
        loop = asyncio.get_running_loop()
        transport, _ = await loop.create_datagram_endpoint(
            lambda: _Protocol(self), local_addr=(self.host, self._port)
        )
        self._transport = transport
        self._port = int(transport.get_extra_info("sockname")[1])
        self._changed = asyncio.Event()

    @property
    def port(self) -> int:
        """The bound UDP port (the one to put in the far end's SDP)."""
        if self._transport is None:
            raise RuntimeError("RtpListener is not open")
        return self._port

    def close(self) -> None:
        """Close the socket; the packets stay readable. Idempotent."""
        transport, self._transport = self._transport, None
        if transport is not None:
            transport.close()

    async def __aenter__(self) -> RtpListener:
        await self.open()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _received(self, data: bytes, source: tuple[str, int]) -> None:
        packet = parse_rtp(data, time.time(), source)
        if packet is None:
            self.ignored += 1
            return
        self.packets.append(packet)
        if self._changed is not None:
            self._changed.set()

    def clear(self) -> None:
        """Forget the packets received so far."""
        self.packets.clear()

    async def wait_for(
        self, predicate: Callable[[list[RtpPacket]], bool], timeout: float
    ) -> list[RtpPacket]:
        """Wait until predicate(packets) holds; TimeoutError (with a count) otherwise."""
        deadline = time.monotonic() + timeout
        while not predicate(self.packets):
            remaining = deadline - time.monotonic()
            if remaining <= 0 or self._changed is None:
                raise TimeoutError(
                    f"RTP: condition not met within {timeout:.1f} s "
                    f"({len(self.packets)} packet(s), {self.ignored} ignored)"
                )
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), min(remaining, 0.1))
        return self.packets

    async def wait_quiet(self, quiet: float, timeout: float) -> list[RtpPacket]:
        """Wait until no packet has arrived for `quiet` s (the stream ended); TimeoutError after
        `timeout` s. A listener that never received anything is quiet at once."""
        deadline = time.monotonic() + timeout
        while self.packets and time.time() - self.packets[-1].arrival < quiet:
            if time.monotonic() >= deadline:
                raise TimeoutError(f"RTP: still streaming after {timeout:.1f} s")
            await asyncio.sleep(min(quiet / 4, 0.05))
        return self.packets


# ---- audio ---------------------------------------------------------------------------------


class Pcm(list[int]):
    """16-bit linear samples of one RTP stream, plus where each packet starts in them."""

    def __init__(self, values: Iterable[int] = (), starts: Iterable[int] = ()) -> None:
        super().__init__(values)
        self.starts: list[int] = list(starts)  # sample offset of each packet, ascending


def unwrap_sequence(seqs: Iterable[int]) -> list[int]:
    """Extend 16-bit sequence numbers (in arrival order) across wraps: 65535, 0 -> 65535, 65536.

    Each number is taken as the one nearest to the previous packet's, so reordering by less
    than half the range is fine.
    """
    extended: list[int] = []
    for seq in seqs:
        if not extended:
            extended.append(seq)
            continue
        delta = (seq - extended[-1]) % 65536
        extended.append(extended[-1] + (delta - 65536 if delta >= 32768 else delta))
    return extended


def samples(packets: Sequence[RtpPacket], ssrc: int | None = None) -> Pcm:
    """Decode one stream's PCMU payloads to linear samples, in RTP sequence order.

    The stream is `ssrc`, or that of the first packet. Packets of other payload types
    (telephone-event, comfort noise) are skipped, as are duplicates of a sequence number.
    Packets are concatenated: a lost packet shortens the audio, it is not filled in.
    The result's `.starts` is the sample offset at which each decoded packet starts.
    """
    if ssrc is None:
        ssrc = next((p.ssrc for p in packets), None)
    stream = [p for p in packets if p.ssrc == ssrc]
    extended = unwrap_sequence(p.seq for p in stream)
    by_seq: dict[int, RtpPacket] = {}
    for seq, packet in zip(extended, stream, strict=True):
        by_seq.setdefault(seq, packet)
    pcm = Pcm()
    for seq in sorted(by_seq):
        packet = by_seq[seq]
        if packet.payload_type != PCMU or not packet.payload:
            continue
        pcm.starts.append(len(pcm))
        pcm.extend(MULAW[byte] for byte in packet.payload)
    return pcm


def resolve_in_root(root: str | os.PathLike[str], path: str | os.PathLike[str]) -> Path:
    """Resolve `path` as the PBX chrooted in `root` would: symlinks are followed inside it.

    `path` is a path on this machine under `root`, or else an absolute path inside the
    chroot (`/usr/share/asterisk/sounds/en`). An absolute link target (such as
    `/etc/alternatives/asterisk-prompt-en`) is re-rooted under `root`, repeatedly, and
    `..` never leaves it. The result is a path under `root`; it need not exist.
    """
    base = Path(os.path.abspath(root))
    full = Path(os.path.abspath(path))
    inside = full.relative_to(base) if full.is_relative_to(base) else full.relative_to("/")
    pending = list(inside.parts)
    resolved = base
    links = 0
    while pending:
        part = pending.pop(0)
        if part in ("", "."):
            continue
        if part == "..":
            if resolved != base:
                resolved = resolved.parent
            continue
        candidate = resolved / part
        if not candidate.is_symlink():
            resolved = candidate
            continue
        links += 1
        if links > MAX_SYMLINKS:
            raise OSError(errno.ELOOP, "too many levels of symbolic links", str(path))
        target = PurePosixPath(os.readlink(candidate))
        if target.is_absolute():
            resolved = base
            pending[:0] = target.parts[1:]
        else:
            pending[:0] = target.parts
    return resolved


def load_prompt(path: str | os.PathLike[str]) -> list[int]:
    """Read a prompt file as 8 kHz signed 16-bit samples.

    `.sln` is raw signed 16-bit little-endian 8 kHz mono; `.gsm` is decoded by sox;
    `.ulaw`/`.pcm` is raw G.711 mu-law.
    """
    file = Path(path)
    suffix = file.suffix.lower()
    if suffix in (".sln", ".raw"):
        return _s16le(file.read_bytes())
    if suffix in (".ulaw", ".pcm"):
        return mulaw_decode(file.read_bytes())
    if suffix == ".gsm":
        result = subprocess.run(
            ["sox", *SOX_GSM_IN, str(file), *SOX_RAW_OUT],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=30,
            check=False,
        )
        if result.returncode != 0:
            raise RuntimeError(f"sox could not decode {file}: {result.stderr.decode()!r}")
        # sox writes raw samples in the machine's byte order.
        return _s16(result.stdout, sys.byteorder)
    raise ValueError(f"unsupported prompt format: {file}")


def _s16le(data: bytes) -> list[int]:
    """Signed 16-bit little-endian samples."""
    return _s16(data, "little")


def _s16(data: bytes, byteorder: str) -> list[int]:
    """Signed 16-bit samples in `byteorder` (a trailing odd byte is dropped)."""
    values = array("h")
    values.frombytes(data[: len(data) - len(data) % 2])
    if byteorder != sys.byteorder:
        values.byteswap()
    return values.tolist()


def _prompt_file(directory: Path, name: str) -> Path:
    """`directory/name` with the first existing extension of PROMPT_EXTENSIONS."""
    for ext in PROMPT_EXTENSIONS:
        candidate = directory / f"{name}{ext}"
        if candidate.is_file():
            return candidate
    tried = ", ".join(f"{name}{ext}" for ext in PROMPT_EXTENSIONS)
    raise FileNotFoundError(f"no prompt {tried} in {directory}")


def _pbx_root(sounds_dir: Path) -> Path:
    """The chroot of a `<root>/usr/share/asterisk/sounds` directory, else /."""
    if sounds_dir.parts[-len(SOUNDS_SUFFIX) :] == SOUNDS_SUFFIX:
        return sounds_dir.parents[len(SOUNDS_SUFFIX) - 1]
    return Path("/")


def prompts_for(
    sounds_dir: str | os.PathLike[str],
    locale: str,
    root: str | os.PathLike[str] | None = None,
) -> dict[str, list[int]]:
    """The prompts a code call may say, as samples: digits "0".."9" and "intro".

    Digits are `<sounds_dir>/<locale>/digits/N.sln` (or `.gsm`), the intro is
    `<sounds_dir>/<locale>/otp/code-is.sln` (or `.gsm`). Symlinks are followed inside
    the PBX root `root`; by default that is the directory holding `usr/share/asterisk/
    sounds` when `sounds_dir` ends so (the dev PBX's `.cache/asterisk-root`), else /.
    """
    sounds = Path(os.path.abspath(sounds_dir))
    chroot = Path(os.path.abspath(root)) if root is not None else _pbx_root(sounds)
    directory = resolve_in_root(chroot, sounds / locale)
    prompts = {digit: load_prompt(_prompt_file(directory / "digits", digit)) for digit in DIGITS}
    prompts[INTRO] = load_prompt(_prompt_file(directory / "otp", "code-is"))
    return prompts


# ---- recognition -------------------------------------------------------------------------


def _dot(a: Sequence[int], b: Sequence[int]) -> int:
    return sum(map(operator.mul, a, b))


def _prefix(values: Iterable[int]) -> list[int]:
    """Running sums, with a leading 0."""
    total = [0]
    for value in values:
        total.append(total[-1] + value)
    return total


@dataclass(frozen=True)
class _Template:
    name: str
    head: list[int]  # the first `window` samples after leading quiet frames
    energy: float  # sqrt(sum(head**2))
    skip: int  # leading quiet samples cut (whole frames)
    length: int  # samples from `skip` to the end of the prompt


def _template(name: str, prompt: Sequence[int], window: int) -> _Template | None:
    skip = 0
    while (
        skip + FRAME_SAMPLES <= len(prompt)
        and sum(map(abs, prompt[skip : skip + FRAME_SAMPLES])) < QUIET_FRAME
    ):
        skip += FRAME_SAMPLES
    head = list(prompt[skip : skip + window])
    energy = math.sqrt(_dot(head, head))
    if not head or energy == 0:
        return None
    return _Template(name, head, energy, skip, len(prompt) - skip)


def recognise(
    samples: Sequence[int],
    packet_starts: Iterable[int],
    prompts: Mapping[str, Sequence[int]],
    *,
    window: int = WINDOW,
    threshold: float = THRESHOLD,
    min_level: int = MIN_LEVEL,
    overlap: int = OVERLAP,
) -> list[str]:
    """The names of the prompts heard in `samples`, in order, each spoken prompt once.

    At each packet start (a sample offset) whose next `window` samples are not silence
    (sum of |x| >= `min_level`), the normalised correlation sum(a*b)/sqrt(sum(a*a)*sum(b*b))
    of those samples with the first `window` samples of each prompt is computed; the best
    prompt above `threshold` is heard there. Starts inside a prompt already heard (before
    its start + its length - `overlap`) are not examined, so a prompt counts once while
    the same prompt said again right after it counts again. Leading silent frames of a
    prompt file are ignored (they are silence in the call too).

    Asterisk packs the audio into 160-sample packets through a smoother: after a file
    whose length is not a multiple of 160, the next file starts that remainder into a
    packet. So once a prompt is heard, the offsets one packet grid on from its end
    (its end, +160, +320...) are examined too, besides the packet starts. Voiced speech is
    periodic, so a prompt may also pass the threshold a few pitch periods early (by up to
    about (1 - threshold**2) * window samples): a match is taken at the best-scoring
    offset of those examined up to window/4 samples after the first one.
    """
    templates = [t for name, p in prompts.items() if (t := _template(name, p, window))]
    level = _prefix(map(abs, samples))
    power = _prefix(x * x for x in samples)
    total = len(samples)
    starts = sorted(set(packet_starts))
    refine = max(FRAME_SAMPLES, window // 4)

    def best_at(offset: int) -> tuple[float, _Template] | None:
        """The best prompt above the threshold starting at `offset`, with its score."""
        if offset >= total or level[min(offset + window, total)] - level[offset] < min_level:
            return None
        best: tuple[float, _Template] | None = None
        for template in templates:
            n = len(template.head)
            if offset + n > total:
                continue
            energy = math.sqrt(power[offset + n] - power[offset])
            if energy == 0:
                continue
            score = _dot(samples[offset : offset + n], template.head) / (energy * template.energy)
            if score > threshold and (best is None or score > best[0]):
                best = (score, template)
        return best

    heard: list[str] = []
    busy_until = -1  # no prompt may start before this offset
    shift = 0  # the grid of the last prompt's end, relative to the packet starts

    def offsets(index: int) -> tuple[int, ...]:
        start = starts[index]
        return (start,) if shift == 0 else (start, start + shift)

    index = 0
    while index < len(starts):
        first = next(
            ((o, m) for o in offsets(index) if o >= busy_until and (m := best_at(o))), None
        )
        if first is None:
            index += 1
            continue
        offset, (score, template) = first
        # The best of the candidates shortly after the first match.
        first_offset, later = offset, index
        while later < len(starts) and starts[later] <= first_offset + refine:
            for candidate in offsets(later):
                if first_offset < candidate <= first_offset + refine:
                    match = best_at(candidate)
                    if match is not None and match[0] > score:
                        offset, (score, template) = candidate, match
            later += 1
        heard.append(template.name)
        end = offset + template.length
        busy_until = end - overlap
        # The grid of the end: relative to the last packet start at or before it.
        floor = bisect.bisect_right(starts, end) - 1
        shift = end - starts[floor] if floor >= 0 else 0
        index = max(index + 1, bisect.bisect_left(starts, busy_until - FRAME_SAMPLES))
    return heard


def spoken_codes(names: Iterable[str]) -> list[str]:
    """Split recognised prompt names at each "intro" into the codes said.

    ["intro", "4", "0", "intro", "4", "0"] -> ["40", "40"]. Digits before the first intro
    belong to no code and are dropped; an intro followed by no digit gives "".
    """
    codes: list[str] = []
    for name in names:
        if name == INTRO:
            codes.append("")
        elif codes and name in DIGITS:
            codes[-1] += name
    return codes
