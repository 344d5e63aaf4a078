"""tests/rtp.py on synthetic calls: G.711, RTP parsing and ordering, prompt recognition."""

from __future__ import annotations

import math
import os
import random
import socket
import subprocess
import sys
import time
from array import array
from collections.abc import Sequence
from pathlib import Path

import pytest

from tests.rtp import (
    FRAME_SAMPLES,
    INTRO,
    MULAW,
    PCMU,
    RtpListener,
    RtpPacket,
    load_prompt,
    parse_rtp,
    prompts_for,
    recognise,
    resolve_in_root,
    samples,
    spoken_codes,
    unwrap_sequence,
)

# ---- a G.711 mu-law encoder (ITU-T G.711, as in the reference linear2ulaw) ----------------

BIAS = 0x84
CLIP = 32635


def mulaw_encode(sample: int) -> int:
    """One 16-bit linear sample as a mu-law byte."""
    sign = 0x80 if sample < 0 else 0
    magnitude = min(abs(sample), CLIP) + BIAS
    exponent = max(0, magnitude.bit_length() - 8)  # segment: position of the leading 1
    mantissa = (magnitude >> (exponent + 3)) & 0x0F
    return ~(sign | exponent << 4 | mantissa) & 0xFF


def encode(values: Sequence[int]) -> bytes:
    return bytes(mulaw_encode(v) for v in values)


def test_mulaw_table_is_g711() -> None:
    assert len(MULAW) == 256
    # Reference points: full scale, zero (both signs), the segment ends.
    assert (MULAW[0x00], MULAW[0x80]) == (-32124, 32124)
    assert MULAW[0xFF] == 0 and MULAW[0x7F] == 0
    assert (MULAW[0xFE], MULAW[0x7E]) == (8, -8)
    assert (MULAW[0xEF], MULAW[0xF0]) == (132, 120)
    assert MULAW[0x8F] == 16764 and MULAW[0x0F] == -16764
    assert len(set(MULAW)) == 255  # only zero has two codes
    for byte in range(256):  # the encoder is the table's inverse (except -0)
        assert MULAW[mulaw_encode(MULAW[byte])] == MULAW[byte]
    for value in range(-32768, 32768, 7):  # quantisation error: at most half a step
        clipped = max(-CLIP, min(CLIP, value))
        assert abs(MULAW[mulaw_encode(value)] - clipped) <= (abs(clipped) + BIAS) / 32


# ---- synthetic prompts and calls --------------------------------------------------------


def noise(seed: str, length: int, amplitude: int = 8000) -> list[int]:
    """Deterministic band-limited noise (a moving average of white noise), speech-like."""
    rng = random.Random(seed)
    white = [rng.randint(-amplitude, amplitude) for _ in range(length + 3)]
    return [(white[i] + 2 * white[i + 1] + white[i + 2]) // 2 for i in range(length)]


def synthetic_prompts() -> dict[str, list[int]]:
    """Eleven different prompts; their lengths are not whole packets, some start quietly."""
    prompts: dict[str, list[int]] = {}
    for digit in range(10):
        length = 2400 + 173 * digit + 37  # 2437 ... 3994 samples
        lead = [0] * (FRAME_SAMPLES * (digit % 3))  # 0, 1 or 2 silent frames first
        prompts[str(digit)] = lead + noise(f"digit-{digit}", length)
    prompts[INTRO] = noise("intro", 5291)
    return prompts


PROMPTS = synthetic_prompts()


def say(names: Sequence[str], prompts: dict[str, list[int]] = PROMPTS) -> list[int]:
    """The audio of `names` back to back, as Asterisk's smoother packs it: no padding."""
    audio: list[int] = []
    for name in names:
        audio += prompts[name]
    return audio


def silence(frames: int) -> list[int]:
    return [0] * (FRAME_SAMPLES * frames)


def code_call(code: str, times: int = 2, gap_frames: int = 25) -> list[int]:
    """What the dialplan says: intro, the digits; silence; again."""
    audio = silence(3)
    for _ in range(times):
        audio += say([INTRO, *code]) + silence(gap_frames)
    return audio


def packetise(
    audio: Sequence[int], seq: int = 0, timestamp: int = 0, ssrc: int = 0x1234ABCD
) -> list[RtpPacket]:
    """`audio` as PCMU RTP packets of 160 samples, 20 ms apart (the tail is dropped)."""
    payload = encode(audio)
    return [
        RtpPacket(
            arrival=1000.0 + 0.02 * i,
            seq=(seq + i) % 65536,
            timestamp=(timestamp + FRAME_SAMPLES * i) % 2**32,
            ssrc=ssrc,
            payload_type=PCMU,
            payload=payload[i * FRAME_SAMPLES : (i + 1) * FRAME_SAMPLES],
        )
        for i in range(len(audio) // FRAME_SAMPLES)
    ]


def hear(packets: Sequence[RtpPacket], prompts: dict[str, list[int]] = PROMPTS) -> list[str]:
    pcm = samples(packets)
    return recognise(pcm, pcm.starts, prompts)


def correlation(a: Sequence[int], b: Sequence[int]) -> float:
    return sum(x * y for x, y in zip(a, b, strict=True)) / math.sqrt(
        sum(x * x for x in a) * sum(y * y for y in b)
    )


def test_synthetic_prompts_do_not_resemble_each_other() -> None:
    heads = {name: p[:1200] for name, p in PROMPTS.items()}
    worst = max(abs(correlation(heads[a], heads[b])) for a in heads for b in heads if a < b)
    assert worst < 0.2


@pytest.mark.parametrize("code", ["40", "4075", "918273", "0000", "1100223"])
def test_recognises_the_code_said(code: str) -> None:
    # Sequence numbers wrap in the middle of the call.
    packets = packetise(code_call(code, times=3), seq=65_500, timestamp=2**32 - 8000)
    assert any(p.seq == 0 for p in packets) and packets[0].seq == 65_500
    names = hear(packets)
    assert names == [INTRO, *code] * 3
    assert spoken_codes(names) == [code] * 3


@pytest.mark.parametrize(("expected", "said"), [("40", "41"), ("123456", "123457"), ("7", "1")])
def test_a_wrong_digit_is_heard_as_that_digit(expected: str, said: str) -> None:
    codes = spoken_codes(hear(packetise(code_call(said))))
    assert codes == [said, said]
    assert codes != [expected, expected]


def test_whole_packet_prompts_and_silence_between_every_prompt() -> None:
    # Each prompt padded to whole packets and followed by silence: the packet grid only.
    audio: list[int] = []
    for name in [INTRO, "5", "5", "3"]:
        audio += PROMPTS[name] + [0] * (-len(PROMPTS[name]) % FRAME_SAMPLES) + silence(4)
    assert hear(packetise(audio)) == [INTRO, "5", "5", "3"]


def test_packet_order_is_by_sequence_number_not_arrival() -> None:
    packets = packetise(code_call("2468"), seq=65_530)
    shuffled = list(packets)
    rng = random.Random(7)
    for i in range(0, len(shuffled) - 3, 3):  # local reordering, as a network might
        window = shuffled[i : i + 3]
        rng.shuffle(window)
        shuffled[i : i + 3] = window
    shuffled.insert(40, packets[39])  # a duplicate
    assert samples(shuffled) == samples(packets)
    assert spoken_codes(hear(shuffled)) == ["2468", "2468"]


def test_silence_and_unknown_audio_are_not_prompts() -> None:
    # Whole packets: unknown audio of another length would move the packet grid (see
    # recognise()), and only the end of a prompt heard tells where it moved to.
    stranger = noise("not-a-prompt", 6080)
    audio = silence(10) + stranger + silence(10) + [3, -3] * 4000 + say([INTRO, "8"])
    assert hear(packetise(audio)) == [INTRO, "8"]
    assert hear(packetise(silence(200))) == []
    assert hear([]) == []


def test_a_prompt_is_matched_at_its_start_not_some_pitch_periods_early() -> None:
    # A "voiced" prompt: its first 1240 samples repeat a 40-sample period, so it also
    # matches two periods early, and where it is placed decides where the next prompt is
    # looked for. The intro ends loud, then quiet, 80 samples into a packet.
    period = noise("pitch", 40)
    voiced = [period[i % 40] for i in range(1240)] + noise("vowel-tail", 2000)
    intro = noise("intro", 5040) + noise("loud", 80, 16000) + noise("quiet", 80, 1000)
    prompts = dict(PROMPTS, **{"9": voiced, INTRO: intro})
    audio = say([INTRO, "9", "3", "9", "9", "0"], prompts) + silence(10)
    start = len(intro)
    assert start % FRAME_SAMPLES == 80

    def score(offset: int) -> float:
        window = [MULAW[b] for b in encode(audio[offset : offset + 1200])]
        return correlation(window, voiced[:1200])

    # The trap is set: the first offset examined that matches is the packet start 80
    # samples before the true start (the shifted grid's offset before it does not match).
    assert score(start - 160) < 0.9 < score(start - 80)
    assert hear(packetise(audio), prompts) == [INTRO, "9", "3", "9", "9", "0"]


def test_a_prompt_whose_start_recurs_inside_it_counts_once() -> None:
    # "six-six": the prompt's first 1600 samples come again later in it (whole packets).
    half = noise("six", 1600)
    prompts = dict(PROMPTS, **{"6": half + silence(2) + half + noise("x", 320)})
    audio = say([INTRO, "6", "1", "6", "6"], prompts) + silence(5)
    assert spoken_codes(hear(packetise(audio), prompts)) == ["6166"]


def test_recognise_is_fast_enough_for_a_long_call() -> None:
    # 20 s of loud audio that matches nothing: every packet start is examined.
    stranger = noise("twenty-seconds", 20 * 8000)
    packets = packetise(stranger + code_call("31415926", times=2))
    began = time.monotonic()
    names = hear(packets)
    assert time.monotonic() - began < 3.0
    assert spoken_codes(names) == ["31415926"] * 2


def test_samples_decodes_one_stream_and_only_pcmu() -> None:
    ours = packetise([1000, -1000] * 400, seq=65_534, ssrc=1)  # 5 packets, seq wraps
    other = packetise([5000] * 800, seq=10, ssrc=2)
    event = RtpPacket(0.0, 65_535, 0, 1, 101, b"\x01\x0a\x00\xa0")  # telephone-event
    mixed = [ours[1], other[0], ours[0], event, ours[3], ours[2], other[1], ours[4]]
    pcm = samples(mixed, ssrc=1)
    assert pcm == [MULAW[mulaw_encode(1000)], MULAW[mulaw_encode(-1000)]] * 400
    assert pcm.starts == [0, 160, 320, 480, 640]
    # Without an ssrc: the stream of the first packet.
    assert samples(mixed) == pcm
    assert samples([other[0], *ours]) == [MULAW[mulaw_encode(5000)]] * 160
    assert samples(mixed, ssrc=3) == [] and samples([]) == []


def test_unwrap_sequence() -> None:
    assert unwrap_sequence([65_534, 65_535, 0, 1]) == [65_534, 65_535, 65_536, 65_537]
    assert unwrap_sequence([1, 0, 65_535, 2]) == [1, 0, -1, 2]
    assert unwrap_sequence([65_535, 1, 0, 2]) == [65_535, 65_537, 65_536, 65_538]


def test_spoken_codes() -> None:
    assert spoken_codes([INTRO, "4", "0", INTRO, "4", "0"]) == ["40", "40"]
    assert spoken_codes(["7", INTRO, "1", INTRO]) == ["1", ""]
    assert spoken_codes([]) == []


# ---- RTP parsing and the listener ----------------------------------------------------------


def rtp_bytes(
    seq: int,
    timestamp: int,
    ssrc: int,
    payload: bytes,
    payload_type: int = PCMU,
    *,
    marker: bool = False,
    csrcs: Sequence[int] = (),
    extension: bytes | None = None,
    padding: int = 0,
    version: int = 2,
) -> bytes:
    first = version << 6 | (0x20 if padding else 0) | (0x10 if extension is not None else 0)
    header = bytes([first | len(csrcs), (0x80 if marker else 0) | payload_type])
    header += seq.to_bytes(2, "big") + timestamp.to_bytes(4, "big") + ssrc.to_bytes(4, "big")
    header += b"".join(c.to_bytes(4, "big") for c in csrcs)
    if extension is not None:
        header += b"\xbe\xde" + (len(extension) // 4).to_bytes(2, "big") + extension
    tail = bytes(padding - 1) + bytes([padding]) if padding else b""
    return header + payload + tail


def test_parse_rtp() -> None:
    payload = encode([100, -100] * 80)
    plain = parse_rtp(rtp_bytes(7, 160, 0xCAFE, payload, marker=True), 5.0, ("127.0.0.1", 9))
    assert plain == RtpPacket(5.0, 7, 160, 0xCAFE, PCMU, payload, True, ("127.0.0.1", 9))
    full = parse_rtp(
        rtp_bytes(65_535, 2**32 - 1, 1, payload, 8, csrcs=[5, 6], extension=b"abcdefgh", padding=3)
    )
    assert full is not None
    assert (full.seq, full.timestamp, full.payload_type, full.payload) == (
        65_535,
        2**32 - 1,
        8,
        payload,
    )
    assert not full.marker and full.arrival == pytest.approx(time.time(), abs=5)
    assert parse_rtp(rtp_bytes(1, 1, 1, payload, version=1)) is None
    assert parse_rtp(b"\x80\x00\x00") is None
    rtcp_receiver_report = b"\x81\xc9\x00\x07" + bytes(28)
    assert parse_rtp(rtcp_receiver_report) is None
    assert parse_rtp(rtp_bytes(1, 1, 1, b"", padding=0)[:12] + b"") is not None
    bad_padding = bytearray(rtp_bytes(1, 1, 1, b"xy", padding=1))
    bad_padding[-1] = 40
    assert parse_rtp(bytes(bad_padding)) is None


async def test_listener_collects_rtp_sent_to_its_port() -> None:
    frames = [encode(noise(f"frame-{i}", FRAME_SAMPLES)) for i in range(5)]
    async with RtpListener() as rtp:
        assert rtp.port > 0 and rtp.host == "127.0.0.1"
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sender:
            sender.bind(("127.0.0.1", 0))
            sent_from = sender.getsockname()
            before = time.time()
            for i in (0, 1, 3, 2, 4):  # out of order
                sender.sendto(
                    rtp_bytes(9000 + i, 320 * i, 0xBEEF, frames[i]), ("127.0.0.1", rtp.port)
                )
            sender.sendto(b"not rtp at all", ("127.0.0.1", rtp.port))
            sender.sendto(rtp_bytes(1, 1, 1, b"", version=1), ("127.0.0.1", rtp.port))
            await rtp.wait_for(lambda packets: len(packets) >= 5, timeout=5)
            await rtp.wait_quiet(0.1, timeout=5)
        assert [p.seq for p in rtp.packets] == [9000, 9001, 9003, 9002, 9004]
        assert all(p.ssrc == 0xBEEF and p.payload_type == PCMU for p in rtp.packets)
        assert all(p.source == sent_from for p in rtp.packets)
        assert all(before <= p.arrival <= time.time() for p in rtp.packets)
        assert rtp.ignored == 2
        pcm = samples(rtp.packets)
        assert pcm == [MULAW[b] for frame in frames for b in frame]
        assert pcm.starts == [0, 160, 320, 480, 640]
        with pytest.raises(TimeoutError, match="5 packet"):
            await rtp.wait_for(lambda packets: len(packets) > 5, timeout=0.2)
    with pytest.raises(RuntimeError, match="not open"):
        _ = rtp.port
    assert len(rtp.packets) == 5  # still readable after close
    rtp.close()  # idempotent


async def test_listener_start_on_a_given_port() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    rtp = await RtpListener.start(port=port)
    try:
        assert rtp.port == port
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sender:
            sender.sendto(rtp_bytes(1, 0, 2, b"\xff" * 160), ("127.0.0.1", port))
        [packet] = await rtp.wait_for(lambda packets: len(packets) == 1, timeout=5)
        assert packet.payload == b"\xff" * 160
        rtp.clear()
        assert rtp.packets == []
    finally:
        rtp.close()


# ---- prompt files and the PBX root ---------------------------------------------------------


def test_resolve_in_root_follows_links_inside_the_root(tmp_path: Path) -> None:
    root = tmp_path / "root"
    sounds = root / "usr/share/asterisk/sounds"
    allison = sounds / "en_US_f_Allison"
    (allison / "digits").mkdir(parents=True)
    (root / "etc/alternatives").mkdir(parents=True)
    (root / "usr/local/share/asterisk/sounds").mkdir(parents=True)
    # As Debian installs them: absolute links, valid only inside the chroot.
    os.symlink("/etc/alternatives/asterisk-prompt-en", sounds / "en")
    os.symlink(
        "/usr/share/asterisk/sounds/en_US_f_Allison", root / "etc/alternatives/asterisk-prompt-en"
    )
    os.symlink("../../../local/share/asterisk/sounds", sounds / "custom")
    os.symlink("/../../../../usr/share/asterisk/sounds/en", root / "escape")
    os.symlink("loop-b", root / "loop-a")
    os.symlink("/loop-a", root / "loop-b")

    assert resolve_in_root(root, sounds / "en") == allison
    assert resolve_in_root(root, sounds / "en" / "digits" / "1.gsm") == allison / "digits/1.gsm"
    # A path inside the chroot, and a relative link with "..".
    assert resolve_in_root(root, "/usr/share/asterisk/sounds/en/digits") == allison / "digits"
    assert resolve_in_root(root, sounds / "custom") == root / "usr/local/share/asterisk/sounds"
    # ".." stops at the root, as in a chroot.
    assert resolve_in_root(root, root / "escape") == allison
    assert resolve_in_root(str(root), "/../../etc/alternatives/asterisk-prompt-en") == allison
    # Outside the root the link is dangling: that is the point.
    assert not (sounds / "en").resolve().is_relative_to(root) or not (sounds / "en").exists()
    with pytest.raises(OSError, match="symbolic links"):
        resolve_in_root(root, root / "loop-a")


def write_sln(path: Path, values: Sequence[int]) -> None:
    data = array("h", values)
    if data.itemsize != 2:
        raise AssertionError("array('h') is not 16-bit here")
    if sys.byteorder != "little":
        data.byteswap()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data.tobytes())


def write_gsm(path: Path, values: Sequence[int]) -> None:
    """Encode `values` as a GSM 06.10 file with sox, as Asterisk's prompts are."""
    raw = path.with_suffix(".sln")
    write_sln(raw, values)
    raw_in = ("-t", "raw", "-r", "8000", "-e", "signed", "-b", "16", "-c", "1")
    subprocess.run(
        ["sox", *raw_in, str(raw), "-t", "gsm", str(path)],
        check=True,
        capture_output=True,
        timeout=30,
    )
    raw.unlink()


def tone(frequency: float, length: int, amplitude: int = 8000) -> list[int]:
    return [round(amplitude * math.sin(2 * math.pi * frequency * i / 8000)) for i in range(length)]


def test_load_prompt_formats(tmp_path: Path) -> None:
    values = [*noise("sln", 1000), 32767, -32768, 0, 1, -1]
    write_sln(tmp_path / "a.sln", values)
    assert load_prompt(tmp_path / "a.sln") == values
    (tmp_path / "a.ulaw").write_bytes(encode(values))
    assert load_prompt(tmp_path / "a.ulaw") == [MULAW[mulaw_encode(v)] for v in values]
    sung = tone(440, 3200) + tone(700, 3200)
    write_gsm(tmp_path / "b.gsm", sung)
    decoded = load_prompt(tmp_path / "b.gsm")
    assert len(decoded) == 6400  # GSM frames are 160 samples
    assert correlation(decoded[160:6240], sung[160:6240]) > 0.9  # lossy, but the same sound
    with pytest.raises(ValueError, match="unsupported"):
        load_prompt(tmp_path / "c.mp3")


def test_prompts_for_a_pbx_root_and_recognition_through_gsm(tmp_path: Path) -> None:
    root = tmp_path / "asterisk-root"
    sounds = root / "usr/share/asterisk/sounds"
    allison = sounds / "en_US_f_Allison"
    (root / "etc/alternatives").mkdir(parents=True)
    allison.mkdir(parents=True)
    os.symlink("/etc/alternatives/asterisk-prompt-en", sounds / "en")
    os.symlink(
        "/usr/share/asterisk/sounds/en_US_f_Allison", root / "etc/alternatives/asterisk-prompt-en"
    )
    # Digits as GSM files whose lengths are whole GSM frames, like Asterisk's; "3" also
    # has a .sln, which wins; the intro is a .sln.
    spoken = {d: noise(f"gsm-{d}", 160 * (20 + int(d))) for d in "0123456789"}
    for digit, values in spoken.items():
        write_gsm(allison / "digits" / f"{digit}.gsm", values)
    write_sln(allison / "digits" / "3.sln", PROMPTS["3"])
    write_sln(allison / "otp" / "code-is.sln", PROMPTS[INTRO])
    write_sln(sounds / "id" / "otp" / "code-is.sln", PROMPTS[INTRO])

    prompts = prompts_for(sounds, "en")
    assert set(prompts) == {*"0123456789", INTRO}
    assert prompts["3"] == PROMPTS["3"] and prompts[INTRO] == PROMPTS[INTRO]
    assert len(prompts["7"]) == 160 * 27
    assert prompts_for(str(sounds), "en", root=root) == prompts
    with pytest.raises(FileNotFoundError, match=r"0\.sln, 0\.gsm"):
        prompts_for(sounds, "id")

    # What Asterisk would play: the GSM-decoded digits, the intro, through mu-law.
    played = {name: values for name, values in prompts.items()}
    audio = silence(5) + say([INTRO, *"3907"], played) + silence(30) + say([INTRO, *"3907"], played)
    assert spoken_codes(hear(packetise(audio), prompts)) == ["3907", "3907"]
