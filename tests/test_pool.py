"""Caller-ID pools: drawing a code and its caller ID, avoiding ringing ones, reading codes back."""

from __future__ import annotations

import re
from collections import Counter

import pytest

from gateway.config import PoolConfig
from gateway.pool import Cli, CliShape, Pool, choose, pools_for

PREFIX = "+6221500"
LISTED = ("+622150001234", "+622150005678", "+622150009012")


def prefix_pool(code_length: int = 4, regions: tuple[str, ...] = ()) -> Pool:
    return Pool(PoolConfig(name="p", prefix=PREFIX, code_length=code_length, regions=regions))


def numbers_pool(numbers: tuple[str, ...] = LISTED, code_length: int = 4) -> Pool:
    return Pool(
        PoolConfig(name="n", numbers=numbers, code_length=code_length, allow_low_entropy=True)
    )


# -- prefix pools ------------------------------------------------------------


@pytest.mark.parametrize("code_length", [4, 6, 8])
def test_prefix_pool_shape(code_length: int) -> None:
    pool = prefix_pool(code_length)
    assert pool.shape == CliShape(
        prefix=PREFIX, length=code_length, pattern=rf"^\+6221500[0-9]{{{code_length}}}$"
    )


@pytest.mark.parametrize("code_length", [4, 6, 8])
def test_prefix_pool_draws_code_length_digits_matching_the_shape(code_length: int) -> None:
    pool = prefix_pool(code_length)
    for _ in range(50):
        cli = pool.draw()
        assert re.fullmatch(rf"[0-9]{{{code_length}}}", cli.code)
        assert cli.e164 == PREFIX + cli.code
        assert re.fullmatch(pool.shape.pattern, cli.e164)


def test_the_shape_pattern_matches_no_caller_id_outside_the_pool() -> None:
    pattern = prefix_pool().shape.pattern
    assert re.fullmatch(pattern, "+62215001234")
    for other in ("+62215011234", "+6221500123", "+622150012345", "62215001234", "+6221500abcd"):
        assert not re.fullmatch(pattern, other), other


def test_draws_are_spread_over_the_codes() -> None:
    pool = prefix_pool()
    codes = set()
    for _ in range(200):
        cli = pool.draw()
        codes.add(cli.code)
        pool.release(cli.e164)
    # 200 draws from 10,000 codes repeat a handful at most; a fixed or narrow draw fails.
    assert len(codes) > 180
    assert len({code[0] for code in codes}) > 5


def test_concurrent_draws_never_share_a_caller_id() -> None:
    pool = prefix_pool()
    drawn = [pool.draw() for _ in range(200)]
    assert len({cli.e164 for cli in drawn}) == 200


def test_concurrent_draws_of_half_the_pool_stay_distinct() -> None:
    pool = prefix_pool()
    drawn = [pool.draw().e164 for _ in range(5000)]
    assert len(set(drawn)) == len(drawn)


# -- in use, release, hold ---------------------------------------------------


def test_draw_avoids_the_caller_id_in_use_and_release_frees_it() -> None:
    a, b = "+622150001234", "+622150005678"
    pool = numbers_pool((a, b))
    first = pool.draw()
    second = pool.draw()
    assert {first.e164, second.e164} == {a, b}
    pool.release(first.e164)
    for _ in range(20):
        again = pool.draw()
        assert again == first
        pool.release(again.e164)


def test_hold_marks_a_restored_call_in_use() -> None:
    a, b = "+622150001234", "+622150005678"
    pool = numbers_pool((a, b))
    pool.hold(a)
    for _ in range(20):
        cli = pool.draw()
        assert cli.e164 == b
        pool.release(cli.e164)


def test_releasing_a_caller_id_not_in_use_is_harmless() -> None:
    a, b = "+622150001234", "+622150005678"
    pool = numbers_pool((a, b))
    pool.hold(a)
    pool.release("+622150009999")
    pool.release(b)
    for _ in range(20):
        assert pool.draw().e164 == b
        pool.release(b)


def test_draw_finds_the_last_free_caller_id() -> None:
    numbers = tuple(f"+62215{n:06d}" for n in range(1000))
    for free in (numbers[0], numbers[500], numbers[-1]):
        pool = numbers_pool(numbers)
        for number in numbers:
            if number != free:
                pool.hold(number)
        assert pool.draw().e164 == free


def test_exhausted_pool_still_draws_one_of_its_caller_ids() -> None:
    pool = numbers_pool()
    drawn = [pool.draw() for _ in range(len(LISTED) + 2)]
    assert {cli.e164 for cli in drawn} == set(LISTED)


def test_a_caller_id_shown_by_two_calls_stays_in_use_until_both_end() -> None:
    a, b = "+622150001234", "+622150005678"
    for _ in range(20):
        pool = numbers_pool((a, b))
        pool.hold(a)
        pool.hold(a)  # two restored calls show a (the pool was exhausted when they started)
        pool.release(a)  # one of them ends; the other still rings with a
        assert pool.draw().e164 == b


# -- numbers-list pools ------------------------------------------------------


def test_numbers_pool_code_is_the_trailing_code_length_digits() -> None:
    pool = numbers_pool()
    seen = set()
    for _ in range(100):
        cli = pool.draw()
        assert cli.e164 in LISTED
        assert cli.code == cli.e164[-4:]
        assert re.fullmatch(pool.shape.pattern, cli.e164)
        seen.add(cli.e164)
        pool.release(cli.e164)
    assert seen == set(LISTED)


def test_numbers_pool_with_a_longer_code() -> None:
    pool = numbers_pool(code_length=6)
    cli = pool.draw()
    assert cli.code == cli.e164[-6:]
    assert pool.code_of("+622150005678") == "005678"


def test_numbers_pool_shape_matches_exactly_its_numbers() -> None:
    pool = numbers_pool()
    assert pool.shape.prefix == "+62215000"
    assert pool.shape.length == 4
    for number in LISTED:
        assert re.fullmatch(pool.shape.pattern, number)
    for other in ("+622150001235", "+62215000123", "+6221500012345", "+622150001234|"):
        assert not re.fullmatch(pool.shape.pattern, other), other


# -- code_of -----------------------------------------------------------------


@pytest.mark.parametrize("code_length", [4, 6, 8])
def test_code_of_round_trips_every_drawn_caller_id(code_length: int) -> None:
    pool = prefix_pool(code_length)
    for _ in range(50):
        cli = pool.draw()
        assert pool.code_of(cli.e164) == cli.code


def test_code_of_round_trips_a_numbers_pool() -> None:
    pool = numbers_pool()
    for number in LISTED:
        assert pool.code_of(number) == number[-4:]


@pytest.mark.parametrize(
    "cli",
    [
        "+62215011234",  # another prefix
        "+6221500123",  # too short
        "+622150012345",  # too long
        "62215001234",  # no +
        "+62215001234\n",
        " +62215001234",
        "+6221500123a",
        "+6221500\uff11234",  # a full-width digit
        "",
    ],
)
def test_code_of_a_caller_id_outside_a_prefix_pool_is_none(cli: str) -> None:
    assert prefix_pool().code_of(cli) is None


@pytest.mark.parametrize("cli", ["+622150001235", "+62215000123", "+622150001234\n", "1234"])
def test_code_of_a_caller_id_outside_a_numbers_pool_is_none(cli: str) -> None:
    assert numbers_pool().code_of(cli) is None


# -- regions -----------------------------------------------------------------


def test_pool_without_regions_serves_every_region() -> None:
    pool = prefix_pool()
    assert pool.serves("ID")
    assert pool.serves("MY")


def test_pool_with_regions_serves_only_those() -> None:
    pool = prefix_pool(regions=("ID", "SG"))
    assert pool.serves("ID")
    assert pool.serves("SG")
    assert not pool.serves("MY")


def test_pools_for_prefers_the_pools_naming_the_region() -> None:
    indonesia = Pool(PoolConfig(name="id", prefix="+6221500", regions=("ID",)))
    indonesia_b = Pool(PoolConfig(name="id-b", prefix="+6221700", regions=("ID", "MY")))
    malaysia = Pool(PoolConfig(name="my", prefix="+6031200", regions=("MY",)))
    fallback = Pool(PoolConfig(name="any", prefix="+6221600"))
    pools = [fallback, indonesia, malaysia, indonesia_b]
    assert pools_for(pools, "ID") == [indonesia, indonesia_b]
    assert pools_for(pools, "MY") == [malaysia, indonesia_b]
    assert pools_for(pools, "SG") == [fallback]  # none names it: the catch-all


def test_pools_for_is_empty_when_no_pool_serves_the_region() -> None:
    pools = [Pool(PoolConfig(name="id", prefix="+6221500", regions=("ID",)))]
    assert pools_for(pools, "MY") == []
    assert pools_for([], "ID") == []


def test_choose_spreads_by_weight() -> None:
    light = Pool(PoolConfig(name="a", prefix="+6221500", weight=1))
    heavy = Pool(PoolConfig(name="b", prefix="+6221600", weight=3))
    chosen = Counter(choose([light, heavy]).name for _ in range(4000))
    # 1:3 expected (1000:3000); 5 standard deviations (about 27) either way.
    assert 860 < chosen["a"] < 1140, chosen
    assert choose([light]) is light


def test_cli_is_a_value() -> None:
    assert Cli("+62215001234", "1234") == Cli("+62215001234", "1234")
