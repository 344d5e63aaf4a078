"""Route handlers: parse the request, call the domain, render the result."""

from __future__ import annotations

import json
import time
from datetime import datetime
from importlib.util import find_spec
from pathlib import Path

import msgspec
from aiohttp import web

from gateway import apikeys
from gateway.alerts import MAX_LISTED
from gateway.api import openapi, shapes, views
from gateway.api.bodies import check_callback_url, read_body
from gateway.api.typedefs import (
    ALERTS,
    CONFIG,
    DIALER,
    METRICS,
    NODES,
    NUMBERS,
    STORE,
    VERIFICATIONS,
    api_key,
)
from gateway.errors import InsufficientScope, InvalidRequest, NotFound
from gateway.numbers import DEFAULT_PAGE
from gateway.store import CallRecord, Replayed, VerificationRecord
from gateway.times import timestamp
from gateway.verifications import (
    NewVerification,
)

routes = web.RouteTableDef()

DOCS_DIR = Path(__file__).resolve().parent.parent / "static" / "docs"
# swagger-ui-py's copy of Swagger UI; found without importing it (it pulls in jinja2).
_swagger_ui = find_spec("swagger_ui")
assert _swagger_ui is not None and _swagger_ui.submodule_search_locations
SWAGGER_UI_DIR = Path(_swagger_ui.submodule_search_locations[0]) / "static"

MAX_IDEMPOTENCY_KEY = 255


def require_admin(request: web.Request) -> None:
    """Refuse (403) a verify key: the route concerns every key's calls."""
    if api_key(request).scope != apikeys.ADMIN:
        raise InsufficientScope(
            "this route needs an API key of scope admin", required_scope=apikeys.ADMIN
        )


@routes.post("/v1/verifications")
async def create_verification(request: web.Request) -> web.Response:
    body = await read_body(request, shapes.VerificationCreate)
    created = await request.app[VERIFICATIONS].create(
        NewVerification(
            api_key_id=api_key(request).id,
            phone=body.phone,
            region=body.region,
            reference=body.reference,
            callback_url=check_callback_url(body.callback_url),
            ring_seconds=body.ring_seconds,
            channels=tuple(body.channels) if body.channels is not None else None,
            locale=body.locale,
            fallback_after_seconds=(
                None
                if isinstance(body.fallback_after_seconds, msgspec.UnsetType)
                else body.fallback_after_seconds
            ),
            fallback_after_given=not isinstance(body.fallback_after_seconds, msgspec.UnsetType),
        ),
        idempotency_key=_idempotency_key(request),
    )
    if isinstance(created, Replayed):  # a retry: the first answer again, and no new call
        if created.created is not None:
            then = created.created
            body_id = then.verification.id
            replayed = _json(views.verification(then.verification, then.call), status=201)
        else:  # stored by a gateway older than schema 11: the body as it was sent
            assert created.response is not None, "a replay holds one or the other"
            body_id = json.loads(created.response)["id"]
            replayed = web.Response(
                text=created.response, status=201, content_type="application/json"
            )
        replayed.headers["Location"] = f"/v1/verifications/{body_id}"
        replayed.headers["Idempotent-Replayed"] = "true"
        return replayed
    verification, call = created
    if verification.sandbox:
        request.app[METRICS].sandbox.inc()
    response = _json(views.verification(verification, call), status=201)
    response.headers["Location"] = f"/v1/verifications/{verification.id}"
    return response


def _json(body: shapes.Response, status: int = 200) -> web.Response:
    """A response body (gateway.api.shapes) as JSON."""
    return web.Response(body=views.encode(body), status=status, content_type="application/json")


def _idempotency_key(request: web.Request) -> str | None:
    key = request.headers.get("Idempotency-Key")
    if key is None:
        return None
    if not 1 <= len(key) <= MAX_IDEMPOTENCY_KEY or not key.isascii() or not key.isprintable():
        raise InvalidRequest(
            f"Idempotency-Key must be 1-{MAX_IDEMPOTENCY_KEY} printable ASCII characters"
        )
    return key


@routes.get("/v1/verifications/{id}")
async def read_verification(request: web.Request) -> web.Response:
    found = await request.app[VERIFICATIONS].get(api_key(request).id, request.match_info["id"])
    return await _verification_response(request, *found)


@routes.post("/v1/verifications/check")
async def check_by_phone(request: web.Request) -> web.Response:
    body = await read_body(request, shapes.CheckByPhone)
    result = await request.app[VERIFICATIONS].check_by_phone(
        api_key(request).id, body.phone, body.region, body.code, body.cli, body.source
    )
    return _json(views.check_result(result.verification, result.valid))


@routes.post("/v1/verifications/{id}/check")
async def check_verification(request: web.Request) -> web.Response:
    body = await read_body(request, shapes.Check)
    result = await request.app[VERIFICATIONS].check(
        api_key(request).id, request.match_info["id"], body.code, body.cli, body.source
    )
    return _json(views.check_result(result.verification, result.valid))


@routes.post("/v1/verifications/{id}/next")
async def next_channel(request: web.Request) -> web.Response:
    """Start the verification's next channel now: the user tapped "call me instead"."""
    found = await request.app[VERIFICATIONS].next_step(
        api_key(request).id, request.match_info["id"]
    )
    return await _verification_response(request, *found)


@routes.post("/v1/verifications/{id}/cancel")
async def cancel_verification(request: web.Request) -> web.Response:
    found = await request.app[VERIFICATIONS].cancel(api_key(request).id, request.match_info["id"])
    return await _verification_response(request, *found)


async def _verification_response(
    request: web.Request, verification: VerificationRecord, call: CallRecord
) -> web.Response:
    """The verification with its calls' timelines and its webhooks' delivery state."""
    store = request.app[STORE]
    events, hooks = await store.call_events(call.id), await store.webhooks_of(verification.id)
    steps = await store.calls_of(verification.id) if verification.step else None
    earlier = {s.id: await store.call_events(s.id) for s in steps or () if s.id != call.id}
    return _json(views.verification(verification, call, events, hooks, steps, earlier))


@routes.get("/v1/numbers")
async def list_numbers(request: web.Request) -> web.Response:
    """Numbers by health, for cleaning a customer database; paged with a cursor."""
    require_admin(request)
    health = request.query.get("health")
    if health is None:
        raise InvalidRequest("health is required: invalid, unreachable or reachable")
    limit = _int_query(request, "limit", DEFAULT_PAGE)
    records, cursor = await request.app[NUMBERS].by_health(
        health, request.query.get("cursor"), limit
    )
    return _json(
        shapes.NumberPage(numbers=[views.listed_number(r) for r in records], next_cursor=cursor)
    )


@routes.post("/v1/numbers/lookup")
async def lookup_numbers(request: web.Request) -> web.Response:
    body = await read_body(request, shapes.Lookup)
    described = await request.app[NUMBERS].lookup(body.phones, _region(request, body.region))
    return _json(shapes.LookupResults(results=[views.number(*d) for d in described]))


@routes.get("/v1/numbers/{phone}")
async def read_number(request: web.Request) -> web.Response:
    described = await request.app[NUMBERS].describe(
        request.match_info["phone"], _region(request, request.query.get("region"))
    )
    return _json(views.number(*described))


@routes.delete("/v1/numbers/{phone}/health")
async def reset_number_health(request: web.Request) -> web.Response:
    """Forget what calls taught about a number (it was reassigned)."""
    require_admin(request)
    await request.app[NUMBERS].reset(request.match_info["phone"])
    return web.Response(status=204)


@routes.delete("/v1/numbers/{phone}/failed-checks")
async def reset_failed_checks(request: web.Request) -> web.Response:
    """Forget the wrong codes tried against a number, every key's: its checks resume."""
    require_admin(request)
    await request.app[NUMBERS].reset_failed_checks(
        request.match_info["phone"], by_key=api_key(request).id
    )
    return web.Response(status=204)


@routes.get("/v1/stats")
async def stats(request: web.Request) -> web.Response:
    """Delivery statistics over a window: overall, by carrier and by outcome."""
    require_admin(request)
    since, until = _window(request)
    figures = await request.app[NUMBERS].stats(since, until)
    body = {"since": timestamp(since), "until": timestamp(until), **figures}
    return _json(msgspec.convert(body, shapes.Stats))


@routes.get("/v1/pools")
async def list_pools(request: web.Request) -> web.Response:
    """Each pool and, for each carrier its calls reached, what they taught (caller_health)."""
    require_admin(request)
    config = request.app[CONFIG]
    rows = await request.app[STORE].pool_health()
    return _json(shapes.Pools(pools=views.pools(config.pools, config.asterisk.channel, rows)))


@routes.get("/v1/alerts")
async def list_alerts(request: web.Request) -> web.Response:
    """The conversion watch's alerts, newest first: open ones, or with state=all every one."""
    require_admin(request)
    state = request.query.get("state", "open")
    if state not in ("open", "all"):
        raise InvalidRequest("state must be open or all", field="state")
    limit = _int_query(request, "limit", DEFAULT_PAGE)
    if not 1 <= limit <= MAX_LISTED:
        raise InvalidRequest(f"limit must be 1-{MAX_LISTED}", field="limit")
    records = await request.app[STORE].alerts(state == "open", limit)
    return _json(shapes.AlertList(alerts=[views.alert(r) for r in records]))


@routes.delete("/v1/alerts/{alert_id}")
async def lift_alert(request: web.Request) -> web.Response:
    """Lift an open alert: its target takes verifications again, its counts start afresh."""
    require_admin(request)
    if await request.app[ALERTS].lift(request.match_info["alert_id"]) is None:
        raise NotFound("no open alert with this id")
    return web.Response(status=204)


def _region(request: web.Request, region: str | None) -> str:
    region = region or request.app[CONFIG].numbers.default_region
    if len(region) != 2 or not region.isascii() or not region.isalpha():
        raise InvalidRequest("region must be an ISO 3166 alpha-2 code", field="region")
    return region.upper()


def _int_query(request: web.Request, name: str, default: int) -> int:
    raw = request.query.get(name)
    if raw is None:
        return default
    if not raw.isascii() or not raw.isdigit() or len(raw) > 9:
        raise InvalidRequest(f"{name} must be a positive integer", field=name)
    return int(raw)


_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def _window(request: web.Request) -> tuple[float, float]:
    """[since, until) from `since`/`until` (RFC 3339) or `window` (15m, 24h, 7d; default 24h)."""
    now = time.time()
    until = _instant(request.query.get("until"), "until") or now
    since = _instant(request.query.get("since"), "since")
    if since is None:
        window = request.query.get("window", "24h")
        amount, unit = window[:-1], window[-1:]
        if unit not in _UNITS or not amount.isascii() or not amount.isdigit() or len(amount) > 6:
            raise InvalidRequest("window must be a number and a unit: 90s, 15m, 24h, 7d")
        since = until - int(amount) * _UNITS[unit]
    if since >= until:
        raise InvalidRequest("since must be before until")
    return since, until


def _instant(raw: str | None, name: str) -> float | None:
    if raw is None:
        return None
    try:
        parsed = datetime.fromisoformat(raw.replace("Z", "+00:00"))
    except ValueError:
        raise InvalidRequest(f"{name} must be an RFC 3339 time", field=name) from None
    if parsed.tzinfo is None:
        raise InvalidRequest(f"{name} must carry a time zone (Z or +hh:mm)", field=name)
    return parsed.timestamp()


@routes.get("/openapi.json")
async def openapi_document(request: web.Request) -> web.Response:
    return web.json_response(openapi.document())


@routes.get("/docs")
async def docs(request: web.Request) -> web.FileResponse:
    """The API reference: Swagger UI rendering /openapi.json, from assets shipped here."""
    return web.FileResponse(DOCS_DIR / "index.html")


@routes.get(r"/docs/assets/{name:swagger-ui\.css|swagger-ui-bundle\.js}")
async def docs_asset(request: web.Request) -> web.FileResponse:
    """The two files of Swagger UI the page uses: not its whole directory (source maps,
    other builds: about 25 MB)."""
    return web.FileResponse(SWAGGER_UI_DIR / request.match_info["name"])


@routes.get("/healthz")
async def healthz(request: web.Request) -> web.Response:
    """The process is alive."""
    return _json(shapes.Liveness(status="ok"))


@routes.get("/readyz")
async def readyz(request: web.Request) -> web.Response:
    """The database answers and AMI to at least one node is logged in; each node listed."""
    dialer = request.app[DIALER]
    pbx_nodes = request.app[NODES]
    try:
        await request.app[STORE].ping()
        database = True
    except Exception:
        database = False
    checks = shapes.ReadinessChecks(
        database=database, pbx=pbx_nodes.connected, accepting=not dialer.draining
    )
    ready = checks.database and checks.pbx and checks.accepting
    readiness = shapes.Readiness(
        status="ready" if ready else "not_ready",
        checks=checks,
        nodes=[views.node(node, *dialer.on_node(node)) for node in pbx_nodes.all],
    )
    return _json(readiness, status=200 if ready else 503)
