"""The HTTP API served by the real app factory, with a FakePbx in place of Asterisk."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote

import pytest
from aiohttp import ClientResponse, ClientSession, web
from aiohttp.test_utils import TestServer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway import apikeys
from gateway.api import views
from gateway.api.middlewares import problems_middleware
from gateway.app import create_app
from gateway.config import (
    CallsConfig,
    Config,
)
from gateway.store import open_store
from gateway.verifications import PBX_RETRY_AFTER_S
from tests.conftest import NewDatabase, make_config
from tests.fakes import WAIT_S, FakePbx, fresh_mobile, rings_until_hung_up, until

PROBLEM = "application/problem+json"
JSON = {"Content-Type": "application/json"}
MOBILE = "+6281234567890"
LANDLINE = "+62215551234"  # Jakarta
FOREIGN = "+14155552671"  # a valid US number
# Digits with an optional leading +: all that may reach a Dial.
_DIALABLE = re.compile(r"\+?[0-9]+")


def api_config(database: str) -> Config:
    """The app's config here: short rings, and pacing out of the way."""
    return make_config(
        database, calls=CallsConfig(ring_seconds=1, max_concurrent=50, max_per_second=1000)
    )


@dataclasses.dataclass
class Api:
    """A running gateway app and a client holding a valid API key."""

    url: str
    key: str  # a verify key, as `keys create` makes by default
    other_key: str  # another client's live key
    revoked_key: str
    admin_key: str  # the operator's: number health, its resets, stats
    http: ClientSession
    pbx: FakePbx

    async def request(
        self, method: str, path: str, *, key: str | None = None, **kw: Any
    ) -> ClientResponse:
        headers = {"Authorization": f"Bearer {self.key if key is None else key}"}
        headers.update(kw.pop("headers", {}))
        return await self.http.request(method, self.url + path, headers=headers, **kw)

    async def call(self, method: str, path: str, **kw: Any) -> tuple[int, dict[str, Any]]:
        """Status and JSON body of a request (problem+json included)."""
        async with await self.request(method, path, **kw) as response:
            return response.status, await response.json(content_type=None)

    async def create(self, phone: str | None = None, **fields: Any) -> dict[str, Any]:
        status, body = await self.call(
            "POST", "/v1/verifications", json={"phone": phone or fresh_mobile(), **fields}
        )
        assert status == 201, body
        return body

    async def code_of(self, verification: dict[str, Any]) -> str:
        """The code the user sees: trailing digits of the caller ID the PBX was given."""
        return (await self.caller_id_of(verification))[-4:]

    async def caller_id_of(self, verification: dict[str, Any]) -> str:
        number = verification["phone"].lstrip("+")

        async def placed() -> str | None:
            return next((d.caller_id for d in self.pbx.placed if d.number == number), None)

        caller_id = await until(placed)
        assert caller_id is not None
        return caller_id

    async def until(
        self, verification: dict[str, Any], done: Callable[[dict[str, Any]], bool]
    ) -> dict[str, Any]:
        """Read the verification until `done(body)` holds."""

        async def probe() -> dict[str, Any] | None:
            _, body = await self.call("GET", f"/v1/verifications/{verification['id']}")
            return body if done(body) else None

        body = await until(probe)
        assert body is not None
        return body


ApiFactory = Callable[..., Awaitable[Api]]


@pytest.fixture
async def start_api(new_database: NewDatabase) -> AsyncIterator[ApiFactory]:
    """Start gateways on FakePbxs; each gets a live key and a revoked one."""
    servers: list[TestServer] = []
    sessions: list[ClientSession] = []
    pbxs: list[FakePbx] = []

    async def start(pbx: FakePbx | None = None) -> Api:
        database = new_database()
        store = await open_store(database)
        try:
            _, key = await apikeys.create_key(store, "test")
            _, other_key = await apikeys.create_key(store, "other")
            revoked, revoked_key = await apikeys.create_key(store, "revoked")
            await store.revoke_api_key(revoked.id, time.time())
            _, admin_key = await apikeys.create_key(store, "operator", scope="admin")
        finally:
            await store.close()
        fake = pbx or FakePbx()
        pbxs.append(fake)
        server = TestServer(create_app(api_config(database), pbx=fake), host="127.0.0.1")
        await server.start_server()
        servers.append(server)
        session = ClientSession()
        sessions.append(session)
        url = str(server.make_url("")).rstrip("/")
        return Api(url, key, other_key, revoked_key, admin_key, session, fake)

    yield start
    for session in sessions:
        await session.close()
    for server in servers:
        await server.close()
    for fake in pbxs:
        await fake.close()


@pytest.fixture
async def api(start_api: ApiFactory) -> Api:
    return await start_api()


def assert_problem(response: ClientResponse, body: dict[str, Any], status: int, code: str) -> None:
    assert response.status == status, body
    assert response.content_type == PROBLEM
    assert body["code"] == code
    assert isinstance(body["detail"], str) and isinstance(body["title"], str)


async def expect_problem(
    api: Api, method: str, path: str, status: int, code: str, **kw: Any
) -> dict[str, Any]:
    async with await api.request(method, path, **kw) as response:
        body: dict[str, Any] = await response.json(content_type=None)
        assert_problem(response, body, status, code)
        return body


# -- verifications: happy paths ------------------------------------------------


async def test_create_returns_the_verification(api: Api) -> None:
    async with await api.request(
        "POST",
        "/v1/verifications",
        json={"phone": "0812-3456-7890", "reference": "order-123", "ring_seconds": 2},
    ) as response:
        text = await response.text()
        body = json.loads(text)
        assert response.status == 201
        assert response.content_type == "application/json"
        assert response.headers["Location"] == f"/v1/verifications/{body['id']}"

    assert re.fullmatch(r"vrf_[0-9a-f]{32}", body["id"])
    assert body["status"] == "pending"
    assert body["phone"] == MOBILE
    assert body["reference"] == "order-123"
    assert body["cli"] == {
        "prefix": "+6221500",
        "length": 4,
        "pattern": r"^\+6221500[0-9]{4}$",
        # Watch the call log through the post-dial delay (15 s) and the ring time (2 s).
        "interception_timeout_seconds": 17,
    }
    assert body["call"]["status"] in ("queued", "dialing", "ringing")
    assert body["call"]["ring_seconds"] == 2
    assert body["attempts_remaining"] == 5
    assert body["created_at"] and body["expires_at"]
    # Never the full caller ID (nor a member named for the code).
    caller_id = await api.caller_id_of(body)
    assert caller_id not in text and caller_id[-7:] not in text
    assert '"code"' not in text


async def test_read_follows_the_call_to_its_end(api: Api) -> None:
    created = await api.create(fresh_mobile("0"))

    body = await api.until(created, lambda b: b["call"]["ended_at"] is not None)

    assert body["id"] == created["id"] and body["status"] == "pending"
    call = body["call"]
    assert (call["status"], call["outcome"], call["hangup_cause"]) == ("completed", "delivered", 19)
    assert call["dialed_at"] and call["ringing_at"]
    assert call["dialed_at"] <= call["ringing_at"] <= call["ended_at"]


async def test_a_busy_number_fails_the_verification(api: Api) -> None:
    created = await api.create(fresh_mobile("3"))

    body = await api.until(created, lambda b: b["call"]["ended_at"] is not None)

    assert body["status"] == "failed"
    assert (body["call"]["outcome"], body["call"]["sip_code"]) == ("busy", 486)


async def test_check_a_right_code(api: Api) -> None:
    created = await api.create()
    code = await api.code_of(created)

    status, body = await api.call(
        "POST", f"/v1/verifications/{created['id']}/check", json={"code": code}
    )

    assert status == 200
    assert body == {"id": created["id"], "status": "approved", "valid": True,
                    "attempts_remaining": 5}  # fmt: skip


async def test_a_checks_source_is_validated_kept_and_counted(api: Api) -> None:
    created = await api.create()
    code = await api.code_of(created)
    check = f"/v1/verifications/{created['id']}/check"
    for source in ("copied", "", 1, "Intercepted"):
        status, problem = await api.call("POST", check, json={"code": code, "source": source})
        assert (status, problem["code"]) == (400, "invalid_request"), source
    status, problem = await api.call(
        "POST",
        "/v1/verifications/check",
        json={"phone": created["phone"], "code": code, "source": "copied"},
    )
    assert (status, problem["code"]) == (400, "invalid_request")

    status, body = await api.call("POST", check, json={"code": code, "source": "intercepted"})
    assert (status, body["status"]) == (200, "approved")

    await api.until(created, lambda body: body["call"]["ended_at"] is not None)
    status, stats = await api.call("GET", "/v1/stats", key=api.admin_key)
    assert status == 200, stats
    said = {"intercepted": 1, "manual": 0, "unspecified": 0, "intercepted_share": 1.0}
    assert stats["approved_by_source"] == said
    [carrier] = stats["by_carrier"]
    assert carrier["approved_by_source"] == said


async def test_check_a_right_cli(api: Api) -> None:
    created = await api.create()
    cli = "+" + await api.caller_id_of(created)

    status, body = await api.call(
        "POST", f"/v1/verifications/{created['id']}/check", json={"cli": cli}
    )

    assert (status, body["valid"], body["status"]) == (200, True, "approved")


async def test_check_a_wrong_code(api: Api) -> None:
    created = await api.create()
    code = await api.code_of(created)
    wrong = f"{(int(code) + 1) % 10_000:04d}"

    status, body = await api.call(
        "POST", f"/v1/verifications/{created['id']}/check", json={"code": wrong}
    )

    assert status == 200
    assert (body["valid"], body["status"], body["attempts_remaining"]) == (False, "pending", 4)


async def test_check_by_phone(api: Api) -> None:
    phone = fresh_mobile()
    created = await api.create(phone)
    code = await api.code_of(created)

    status, body = await api.call(
        "POST", "/v1/verifications/check", json={"phone": phone, "code": code}
    )

    assert status == 200
    assert (body["id"], body["valid"], body["status"]) == (created["id"], True, "approved")


async def test_cancel_hangs_up_and_then_refuses_checks(start_api: ApiFactory) -> None:
    api = await start_api(FakePbx(rings_until_hung_up))
    created = await api.create()
    await api.until(created, lambda b: b["call"]["status"] == "ringing")

    status, body = await api.call("POST", f"/v1/verifications/{created['id']}/cancel")
    assert (status, body["status"]) == (200, "canceled")
    assert len(api.pbx.hangups) == 1

    problem = await expect_problem(
        api, "POST", f"/v1/verifications/{created['id']}/check", 409,
        "verification_not_pending", json={"code": "1234"},
    )  # fmt: skip
    assert problem["verification_status"] == "canceled"
    await expect_problem(
        api, "POST", f"/v1/verifications/{created['id']}/cancel", 409, "verification_not_pending"
    )


async def test_a_second_create_cancels_the_first(start_api: ApiFactory) -> None:
    api = await start_api(FakePbx(rings_until_hung_up))
    phone = fresh_mobile()
    first = await api.create(phone)
    await api.until(first, lambda b: b["call"]["status"] == "ringing")

    await api.create(phone)

    body = await api.until(first, lambda b: b["call"]["ended_at"] is not None)
    assert body["status"] == "canceled"
    assert len(api.pbx.hangups) == 1


async def test_max_attempts_then_409(api: Api) -> None:
    created = await api.create()
    code = await api.code_of(created)
    wrong = f"{(int(code) + 1) % 10_000:04d}"
    path = f"/v1/verifications/{created['id']}/check"
    for _ in range(5):
        status, body = await api.call("POST", path, json={"code": wrong})
        assert status == 200
    assert (body["status"], body["attempts_remaining"]) == ("max_attempts_reached", 0)

    problem = await expect_problem(
        api, "POST", path, 409, "verification_not_pending", json={"code": code}
    )
    assert problem["verification_status"] == "max_attempts_reached"


async def test_problem_members_keep_their_rfc_9457_meaning(api: Api) -> None:
    created = await api.create()
    code = await api.code_of(created)
    path = f"/v1/verifications/{created['id']}/check"
    await api.call("POST", path, json={"code": code})

    not_pending = await expect_problem(
        api, "POST", path, 409, "verification_not_pending", json={"code": code}
    )
    landline = await expect_problem(
        api, "POST", "/v1/verifications", 422, "phone_type_not_allowed", json={"phone": LANDLINE}
    )

    assert (not_pending["status"], not_pending["verification_status"]) == (409, "approved")
    assert (landline["status"], landline["phone_type"]) == (422, "fixed_line")
    assert landline["type"].endswith("/phone_type_not_allowed")


# -- numbers -------------------------------------------------------------------


async def test_number_valid_mobile(api: Api) -> None:
    status, body = await api.call("GET", f"/v1/numbers/{MOBILE}")

    assert status == 200
    assert body["valid"] is True and body["e164"] == MOBILE
    assert (body["type"], body["region"]) == ("mobile", "ID")
    assert body["callable"] is True and body["refused_by"] is None


async def test_number_national_with_region(api: Api) -> None:
    status, body = await api.call("GET", "/v1/numbers/081234567890?region=id")

    assert (status, body["e164"], body["callable"]) == (200, MOBILE, True)


async def test_number_invalid_says_why(api: Api) -> None:
    status, body = await api.call("GET", "/v1/numbers/12345")

    assert status == 200
    assert body["valid"] is False and body["callable"] is False
    assert isinstance(body["reason"], str) and body["reason"]
    assert body["refused_by"] == "invalid_phone"


async def test_number_landline_is_not_callable(api: Api) -> None:
    status, body = await api.call("GET", f"/v1/numbers/{LANDLINE}")

    assert status == 200
    assert (body["valid"], body["type"], body["callable"]) == (True, "fixed_line", False)
    assert body["refused_by"] == "phone_type_not_allowed"


async def test_number_foreign_is_not_callable(api: Api) -> None:
    status, body = await api.call("GET", f"/v1/numbers/{FOREIGN}")

    assert (status, body["valid"], body["region"]) == (200, True, "US")
    assert (body["callable"], body["refused_by"]) == (False, "region_not_allowed")


async def test_number_with_a_bad_region_is_400(api: Api) -> None:
    await expect_problem(api, "GET", "/v1/numbers/0812345678?region=IDN", 400, "invalid_request")


# -- operations ----------------------------------------------------------------


async def test_healthz(api: Api) -> None:
    async with api.http.get(api.url + "/healthz") as response:
        assert response.status == 200


async def test_readyz_follows_the_pbx(api: Api) -> None:
    api.pbx.connected = False
    async with api.http.get(api.url + "/readyz") as response:
        assert response.status == 503
        assert (await response.json())["checks"]["pbx"] is False

    api.pbx.connected = True
    async with api.http.get(api.url + "/readyz") as response:
        assert response.status == 200


async def test_create_while_the_pbx_is_long_gone_is_503_with_retry_after(api: Api) -> None:
    api.pbx.lost_ami(seconds_ago=60)
    async with await api.request(
        "POST", "/v1/verifications", json={"phone": fresh_mobile()}
    ) as response:
        body = await response.json(content_type=None)
        assert_problem(response, body, 503, "pbx_unavailable")
        assert response.headers["Retry-After"] == str(PBX_RETRY_AFTER_S)
    assert api.pbx.originated == []
    api.pbx.connected = True
    await api.create()


# -- keys and scopes, guessing -------------------------------------------------

ADMIN_ROUTES = [
    ("GET", "/v1/numbers?health=reachable"),
    ("GET", "/v1/numbers"),  # refused before its query is read
    ("DELETE", f"/v1/numbers/{MOBILE}/health"),
    ("DELETE", f"/v1/numbers/{MOBILE}/failed-checks"),
    ("GET", "/v1/stats?window=1h"),
]


@pytest.mark.parametrize(("method", "path"), ADMIN_ROUTES)
async def test_a_verify_key_gets_403_on_admin_routes(api: Api, method: str, path: str) -> None:
    problem = await expect_problem(api, method, path, 403, "insufficient_scope")

    assert problem["required_scope"] == "admin"
    async with await api.request(method, path, key=api.admin_key) as response:
        assert response.status in (200, 204, 400), await response.text()


async def test_a_verify_key_looks_numbers_up(api: Api) -> None:
    status, _ = await api.call("GET", f"/v1/numbers/{MOBILE}")
    assert status == 200
    status, _ = await api.call("POST", "/v1/numbers/lookup", json={"phones": [MOBILE]})
    assert status == 200


async def latest_code(api: Api, phone: str, dials: int) -> str:
    """The code of the `dials`-th call placed to `phone`."""
    number = phone.lstrip("+")

    async def placed() -> list[str]:
        found = [d.caller_id for d in api.pbx.placed if d.number == number]
        return found if len(found) >= dials else []

    return (await until(placed))[dials - 1][-4:]


@pytest.mark.parametrize(
    "body", [{"code": "12a4"}, {"cli": "private number"}, {}, {"code": "1234", "cli": "1234"}]
)
async def test_check_by_phone_validates_the_body_first(api: Api, body: dict[str, Any]) -> None:
    phone = fresh_mobile()
    path, body = "/v1/verifications/check", {"phone": phone, **body}
    # Nothing pending: the answer does not tell that apart from a bad body.
    await expect_problem(api, "POST", path, 400, "invalid_request", json=body)
    created = await api.create(phone)
    await expect_problem(api, "POST", path, 400, "invalid_request", json=body)
    _, current = await api.call("GET", f"/v1/verifications/{created['id']}")
    assert current["attempts_remaining"] == 5


async def test_an_admin_resets_a_phones_wrong_checks(api: Api) -> None:
    phone = fresh_mobile()
    for n in (1, 2):  # ten wrong codes: the day's limit for this key and phone
        created = await api.create(phone)
        wrong = f"{(int(await latest_code(api, phone, n)) + 1) % 10_000:04d}"
        for _ in range(5):
            status, _ = await api.call(
                "POST", f"/v1/verifications/{created['id']}/check", json={"code": wrong}
            )
            assert status == 200
    created = await api.create(phone)
    code = await latest_code(api, phone, 3)
    check = f"/v1/verifications/{created['id']}/check"
    await expect_problem(api, "POST", check, 429, "rate_limited", json={"code": code})

    async with await api.request(
        "DELETE", f"/v1/numbers/{phone}/failed-checks", key=api.admin_key
    ) as response:
        assert response.status == 204

    status, body = await api.call("POST", check, json={"code": code})
    assert (status, body["status"], body["valid"]) == (200, "approved", True)


# -- errors --------------------------------------------------------------------


@pytest.mark.parametrize(
    "authorization",
    [None, "", "Bearer", "Bearer otpk_wrong", "Basic dXNlcjpwYXNz", "otpk_no_scheme"],
)
async def test_401_without_a_valid_key(api: Api, authorization: str | None) -> None:
    headers = {} if authorization is None else {"Authorization": authorization}
    async with api.http.get(api.url + "/v1/verifications/vrf_x", headers=headers) as response:
        assert_problem(response, await response.json(content_type=None), 401, "unauthorized")


async def raw_request(api: Api, head: bytes) -> tuple[int, str, dict[str, Any]]:
    """Send request bytes no client library would (a header that is not UTF-8)."""
    host, _, port = api.url.removeprefix("http://").partition(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(head + b"Host: gateway\r\nConnection: close\r\n\r\n")
        await writer.drain()
        async with asyncio.timeout(WAIT_S):
            raw = await reader.read()
    finally:
        writer.close()
        await writer.wait_closed()
    header, _, body = raw.partition(b"\r\n\r\n")
    lines = header.decode("latin-1").split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:])
    return int(lines[0].split()[1]), headers["Content-Type"], json.loads(body)


@pytest.mark.parametrize("key", [b"otpk_\xff\xfe", b"otpk_\x80"])
async def test_401_for_a_key_that_is_not_utf8(api: Api, key: bytes) -> None:
    status, content_type, body = await raw_request(
        api, b"GET /v1/verifications/vrf_x HTTP/1.1\r\nAuthorization: Bearer " + key + b"\r\n"
    )

    assert (status, body["code"]) == (401, "unauthorized")
    assert content_type.startswith(PROBLEM)


async def test_401_with_a_revoked_key(api: Api) -> None:
    await expect_problem(
        api, "POST", "/v1/verifications", 401, "unauthorized",
        key=api.revoked_key, json={"phone": MOBILE},
    )  # fmt: skip
    assert api.pbx.dials == []


async def test_404_unknown_verification(api: Api) -> None:
    await expect_problem(api, "GET", "/v1/verifications/vrf_" + "0" * 32, 404, "not_found")
    await expect_problem(
        api, "POST", "/v1/verifications/vrf_nope/check", 404, "not_found", json={"code": "1234"}
    )
    await expect_problem(api, "POST", "/v1/verifications/vrf_nope/cancel", 404, "not_found")


async def test_404_another_keys_verification(api: Api) -> None:
    phone = fresh_mobile()
    created = await api.create(phone)
    path = f"/v1/verifications/{created['id']}"
    other = api.other_key

    await expect_problem(api, "GET", path, 404, "not_found", key=other)
    await expect_problem(
        api, "POST", path + "/check", 404, "not_found", key=other, json={"code": "1234"}
    )
    await expect_problem(api, "POST", path + "/cancel", 404, "not_found", key=other)
    await expect_problem(
        api, "POST", "/v1/verifications/check", 404, "not_found",
        key=other, json={"phone": phone, "code": "1234"},
    )  # fmt: skip
    _, mine = await api.call("GET", path)
    assert (mine["status"], mine["attempts_remaining"]) == ("pending", 5)


@pytest.mark.parametrize("path", ["/nope", "/v1/nope", "/v2/verifications"])
async def test_404_unknown_route(api: Api, path: str) -> None:
    await expect_problem(api, "GET", path, 404, "not_found")


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/v1/verifications"),
        ("DELETE", "/v1/verifications/vrf_x"),
        ("GET", "/v1/verifications/vrf_x/cancel"),
        ("POST", "/healthz"),
    ],
)
async def test_405_wrong_method(api: Api, method: str, path: str) -> None:
    async with await api.request(method, path) as response:
        assert_problem(response, await response.json(content_type=None), 405,
                       "method_not_allowed")  # fmt: skip
        assert response.headers.get("Allow")


@pytest.mark.parametrize(
    "body",
    [
        b"{",
        b"",
        b"\xff\xfe",
        b"[1, 2]",
        b'"+6281234567890"',
        b"null",
        b"[" * 100_00,
        # Malformed after an unknown member: the decoder stops at the member first.
        b'{"pin": 1, "phone": ',
        b'{"pin": 1, "x": ' + b"[" * 10_000,
    ],
)
async def test_400_malformed_json(api: Api, body: bytes) -> None:
    await expect_problem(
        api, "POST", "/v1/verifications", 400, "invalid_request",
        data=body, headers=JSON,
    )  # fmt: skip


@pytest.mark.parametrize(
    "body",
    [
        {},
        {"phone": None},
        {"phone": MOBILE, "extra": 1},
        {"phone": 6281234567890},
        {"phone": [MOBILE]},
        {"phone": MOBILE, "ring_seconds": "8"},
        {"phone": MOBILE, "ring_seconds": 8.0},
        {"phone": MOBILE, "ring_seconds": True},
        {"phone": MOBILE, "ring_seconds": 0},
        {"phone": MOBILE, "ring_seconds": 60},  # over calls.max_ring_seconds
        {"phone": MOBILE, "ring_seconds": 61},  # over what any config allows
        {"phone": MOBILE, "reference": ["a"]},
        {"phone": MOBILE, "reference": "x" * 129},
        {"phone": MOBILE, "reference": "line\nbreak"},
        {"phone": MOBILE, "region": "IDN"},
        {"phone": MOBILE, "callback_url": "ftp://example.test/hook"},
        {"phone": MOBILE, "callback_url": "/relative"},
    ],
)
async def test_400_invalid_create(api: Api, body: dict[str, Any]) -> None:
    await expect_problem(api, "POST", "/v1/verifications", 400, "invalid_request", json=body)
    assert api.pbx.dials == []


@pytest.mark.parametrize("url", ["http://[::1/hook", "https://[oops]/hook"])
async def test_400_callback_url_that_does_not_parse(api: Api, url: str) -> None:
    await expect_problem(
        api, "POST", "/v1/verifications", 400, "invalid_request",
        json={"phone": MOBILE, "callback_url": url},
    )  # fmt: skip


@pytest.mark.parametrize(
    "body",
    [
        {},
        {"code": 1234},
        {"code": True},
        {"code": "12a4"},
        {"code": "1234", "cli": "+622150001234"},
        {"code": "1234", "phone": MOBILE},
    ],
)
async def test_400_invalid_check(api: Api, body: dict[str, Any]) -> None:
    created = await api.create()

    await expect_problem(
        api, "POST", f"/v1/verifications/{created['id']}/check", 400, "invalid_request", json=body
    )
    _, current = await api.call("GET", f"/v1/verifications/{created['id']}")
    assert current["attempts_remaining"] == 5


async def test_413_over_16_kib(api: Api) -> None:
    body = json.dumps({"phone": MOBILE, "reference": "x" * (16 * 1024)}).encode()

    await expect_problem(
        api, "POST", "/v1/verifications", 413, "payload_too_large",
        data=body, headers=JSON,
    )  # fmt: skip
    assert api.pbx.dials == []


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded", None])
async def test_415_not_json(api: Api, content_type: str | None) -> None:
    headers = {} if content_type is None else {"Content-Type": content_type}
    await expect_problem(
        api, "POST", "/v1/verifications", 415, "unsupported_media_type",
        data=json.dumps({"phone": MOBILE}).encode(), headers=headers,
    )  # fmt: skip
    assert api.pbx.dials == []


@pytest.mark.parametrize(
    ("phone", "code"),
    [
        ("12345", "invalid_phone"),
        ("+62 812", "invalid_phone"),
        ("phone", "invalid_phone"),
        (LANDLINE, "phone_type_not_allowed"),
        (FOREIGN, "region_not_allowed"),
    ],
)
async def test_422_refused_numbers(api: Api, phone: str, code: str) -> None:
    body = await expect_problem(api, "POST", "/v1/verifications", 422, code, json={"phone": phone})

    if code == "invalid_phone":
        assert body["reason"]
    assert api.pbx.dials == []


# -- hardening -----------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=12,
)
phone_like = st.one_of(
    st.text(max_size=50),
    st.from_regex(r"\A\+?[0-9 ().\-/]{0,20}\Z"),
    st.sampled_from(["+6281234567890", "081234567890", LANDLINE, FOREIGN, "+62812\r\n3456"]),
    st.text(alphabet="0123456789+٠١٢٣٤٥٦٧٨٩０１２３\n\r\t ", max_size=20),
    st.from_regex(r"\A\+62812[0-9]{6,7}\Z"),  # mostly valid mobiles: these get dialled
)
create_bodies = st.one_of(
    json_values,
    st.fixed_dictionaries({"phone": json_values | phone_like}),
    st.fixed_dictionaries(
        {"phone": phone_like},
        optional={
            "region": json_values | st.sampled_from(["ID", "id", "US", "ZZ", "", "I\n"]),
            "reference": json_values,
            "ring_seconds": json_values | st.integers(-5, 200),
            "callback_url": json_values
            | st.from_regex(r"\A(https?|ftp)://[\[\]a-z0-9:.@%]{0,16}(/.{0,8})?\Z"),
        },
    ),
)


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(body=create_bodies)
async def test_create_never_fails_on_any_body(api: Api, body: Any) -> None:
    async with await api.request(
        "POST", "/v1/verifications", data=json.dumps(body), headers=JSON
    ) as response:
        answer = await response.json(content_type=None)
        assert response.status < 500, answer
        if response.status != 201:
            assert response.content_type == PROBLEM
            assert isinstance(answer["code"], str)
    for dial in api.pbx.dials:
        assert _DIALABLE.fullmatch(dial.number), dial
        assert _DIALABLE.fullmatch(dial.caller_id), dial


# JSON cut anywhere (after an unknown member too), and bytes that are no JSON at all.
cut_bodies = st.one_of(
    st.binary(max_size=120),
    st.tuples(
        st.fixed_dictionaries(
            {"pin": json_values, "phone": phone_like}, optional={"code": json_values}
        ),
        st.integers(min_value=0, max_value=120),
    ).map(lambda cut: json.dumps(cut[0]).encode()[: cut[1]]),
)


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(body=cut_bodies)
async def test_every_body_route_answers_any_bytes_with_a_problem(api: Api, body: bytes) -> None:
    for path in (
        "/v1/verifications",
        "/v1/verifications/check",
        f"/v1/verifications/vrf_{'0' * 32}/check",
        "/v1/numbers/lookup",
    ):
        async with await api.request("POST", path, data=body, headers=JSON) as response:
            answer = await response.json(content_type=None)
            assert response.status < 500, (path, body, answer)
            if response.status >= 400:
                assert response.content_type == PROBLEM and isinstance(answer["code"], str)
    assert api.pbx.dials == []  # nothing here is a whole, valid create


@settings(
    max_examples=100,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(phone=json_values | phone_like, code=json_values)
async def test_check_by_phone_never_fails(api: Api, phone: Any, code: Any) -> None:
    async with await api.request(
        "POST", "/v1/verifications/check",
        data=json.dumps({"phone": phone, "code": code}), headers=JSON,
    ) as response:  # fmt: skip
        answer = await response.json(content_type=None)
        assert response.status < 500, answer
        if response.status != 200:
            assert response.content_type == PROBLEM
            assert isinstance(answer["code"], str)


@settings(
    max_examples=100,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(phone=st.text(min_size=1, max_size=60))
async def test_number_lookup_never_fails(api: Api, phone: str) -> None:
    async with await api.request("GET", "/v1/numbers/" + _quote(phone)) as response:
        answer = await response.json(content_type=None)
        assert response.status < 500, answer
        if response.status != 200:
            assert response.content_type == PROBLEM


def _quote(text: str) -> str:
    return quote(text, safe="")


async def test_docs_page_uses_only_assets_the_gateway_serves(api: Api) -> None:
    async with await api.request("GET", "/docs") as response:
        assert response.status == 200
        assert response.content_type == "text/html"
        page = await response.text()
    assert "http:" not in page and "https:" not in page  # no CDN
    assert '"/openapi.json"' in page
    assets = re.findall(r'(?:src|href)="([^"]+)"', page)
    assert {"/docs/assets/swagger-ui.css", "/docs/assets/swagger-ui-bundle.js"} == set(assets)
    for asset in assets:
        async with await api.request("GET", asset) as served:
            assert served.status == 200, asset
            assert len(await served.read()) > 100_000, asset


@given(at=st.floats(min_value=0, max_value=4_102_444_800, allow_nan=False))
def test_timestamps_read_as_datetime_would_write_them(at: float) -> None:
    expected = datetime.fromtimestamp(at, UTC).isoformat(timespec="milliseconds")
    assert views.timestamp(at) == expected.replace("+00:00", "Z")


async def test_an_unhandled_error_is_a_500_problem_logged_by_route_not_path(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def broken(request: web.Request) -> web.Response:
        raise RuntimeError("a bug")

    app = web.Application(middlewares=[problems_middleware])
    app.router.add_get("/v1/numbers/{phone}", broken)
    async with (
        TestServer(app, host="127.0.0.1") as server,
        ClientSession() as http,
        http.get(server.make_url(f"/v1/numbers/{MOBILE}")) as response,
    ):
        body = await response.json(content_type=None)
        assert_problem(response, body, 500, "internal_error")
    logged = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert [r.getMessage() for r in logged] == ["unhandled error on GET /v1/numbers/{phone}"]
    assert logged[0].exc_info is not None  # with its traceback
