"""Route handlers: parse the request, call the domain, render the result."""

from __future__ import annotations

from aiohttp import web
from aiohttp.typedefs import Handler

from gateway import apikeys, phones
from gateway.api import views
from gateway.api.bodies import Field, check_callback_url, read_object
from gateway.api.problems import problem
from gateway.api.typedefs import API_KEY, CONFIG, PBX, STORE, VERIFICATIONS, api_key
from gateway.errors import Unauthorized
from gateway.verifications import MAX_CALLBACK_URL_LENGTH, MAX_REFERENCE_LENGTH, NewVerification

routes = web.RouteTableDef()

_PHONE = Field(str, required=True, max_length=64)
_REGION = Field(str, max_length=2)
_CODE = Field(str, max_length=16)
_CLI = Field(str, max_length=64)

CREATE = {
    "phone": _PHONE,
    "region": _REGION,
    "reference": Field(str, max_length=MAX_REFERENCE_LENGTH),
    "callback_url": Field(str, max_length=MAX_CALLBACK_URL_LENGTH),
    "ring_seconds": Field(int, minimum=1, maximum=120),
}
CHECK = {"code": _CODE, "cli": _CLI}
CHECK_BY_PHONE = {"phone": _PHONE, "region": _REGION, "code": _CODE, "cli": _CLI}


@web.middleware
async def auth_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every /v1 route needs `Authorization: Bearer <api key>`."""
    if request.path.startswith("/v1/"):
        scheme, _, key = request.headers.get("Authorization", "").partition(" ")
        record = None
        if scheme.lower() == "bearer" and key:
            record = await apikeys.authenticate(request.app[STORE], key.strip())
        if record is None:
            raise Unauthorized("a valid API key is needed: Authorization: Bearer <key>")
        request[API_KEY] = record
    return await handler(request)


@routes.post("/v1/verifications")
async def create_verification(request: web.Request) -> web.Response:
    body = await read_object(request, CREATE)
    verification, call = await request.app[VERIFICATIONS].create(
        NewVerification(
            api_key_id=api_key(request).id,
            phone=body["phone"],
            region=body["region"],
            reference=body["reference"],
            callback_url=check_callback_url(body["callback_url"]),
            ring_seconds=body["ring_seconds"],
        )
    )
    return web.json_response(
        views.verification(verification, call),
        status=201,
        headers={"Location": f"/v1/verifications/{verification.id}"},
    )


@routes.get("/v1/verifications/{id}")
async def read_verification(request: web.Request) -> web.Response:
    verification, call = await request.app[VERIFICATIONS].get(
        api_key(request).id, request.match_info["id"]
    )
    events = await request.app[STORE].call_events(call.id)
    return web.json_response(views.verification(verification, call, events))


@routes.post("/v1/verifications/check")
async def check_by_phone(request: web.Request) -> web.Response:
    body = await read_object(request, CHECK_BY_PHONE)
    result = await request.app[VERIFICATIONS].check_by_phone(
        api_key(request).id, body["phone"], body["region"], body["code"], body["cli"]
    )
    return web.json_response(views.check_result(result.verification, result.valid))


@routes.post("/v1/verifications/{id}/check")
async def check_verification(request: web.Request) -> web.Response:
    body = await read_object(request, CHECK)
    result = await request.app[VERIFICATIONS].check(
        api_key(request).id, request.match_info["id"], body["code"], body["cli"]
    )
    return web.json_response(views.check_result(result.verification, result.valid))


@routes.post("/v1/verifications/{id}/cancel")
async def cancel_verification(request: web.Request) -> web.Response:
    verification, call = await request.app[VERIFICATIONS].cancel(
        api_key(request).id, request.match_info["id"]
    )
    events = await request.app[STORE].call_events(call.id)
    return web.json_response(views.verification(verification, call, events))


@routes.get("/v1/numbers/{phone}")
async def read_number(request: web.Request) -> web.Response:
    config = request.app[CONFIG]
    region = request.query.get("region") or config.numbers.default_region
    if len(region) != 2 or not region.isalpha():
        return problem(400, "invalid_request", "region must be an ISO 3166 alpha-2 code")
    return web.json_response(
        phones.describe(request.match_info["phone"], region.upper(), config.numbers)
    )


@routes.get("/healthz")
async def healthz(request: web.Request) -> web.Response:
    """The process is alive."""
    return web.json_response({"status": "ok"})


@routes.get("/readyz")
async def readyz(request: web.Request) -> web.Response:
    """The database answers and AMI is logged in."""
    checks = {"database": True, "pbx": request.app[PBX].connected}
    try:
        await request.app[STORE].ping()
    except Exception:
        checks["database"] = False
    ready = all(checks.values())
    return web.json_response(
        {"status": "ready" if ready else "not_ready", "checks": checks},
        status=200 if ready else 503,
    )
