"""Command line: run, check-config, config-reference, keys, call."""

from __future__ import annotations

import argparse
import asyncio
import csv
import gc
import json
import logging
import os
import signal
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from typing import Any

import uvloop

from gateway import apikeys, config, logs
from gateway.store import StoreUnavailable, open_store
from gateway.store.records import CallStatus
from gateway.times import timestamp

DEFAULT_CONFIG = "config.yaml"
DEFAULT_URL = "http://127.0.0.1:8080"
# `call` polls the gateway this often while a call is live.
CALL_POLL_INTERVAL_S = 0.2
HTTP_TIMEOUT_S = 10.0
EXPORT_PAGE = 1000


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gateway", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    def with_config(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        p.add_argument(
            "--config",
            default=os.environ.get("OTP_GATEWAY_CONFIG", DEFAULT_CONFIG),
            help="YAML config file (env OTP_GATEWAY_CONFIG)",
        )
        return p

    with_config(sub.add_parser("run", help="run the gateway"))
    with_config(sub.add_parser("check-config", help="validate a config file"))
    reference = sub.add_parser(
        "config-reference",
        help="print the configuration reference and config.example.yaml, as gateway/config.py "
        "declares them",
    )
    mode = reference.add_mutually_exclusive_group()
    mode.add_argument(
        "--write",
        action="store_true",
        help="rewrite the reference in docs/operator/configuration.md and config.example.yaml",
    )
    mode.add_argument(
        "--check", action="store_true", help="exit 1 when either differs from the declaration"
    )

    keys = sub.add_parser("keys", help="manage API keys").add_subparsers(dest="keys", required=True)
    create = with_config(keys.add_parser("create", help="create a key; prints it once, last"))
    create.add_argument("name")
    create.add_argument(
        "--allow-network",
        action="append",
        default=[],
        metavar="CIDR",
        help="only accept the key from this network (repeatable)",
    )
    create.add_argument(
        "--scope",
        choices=apikeys.SCOPES,
        default=apikeys.VERIFY,
        help="verify (default): its own verifications and number lookups; admin: also "
        "number health lists and resets, wrong-check resets and stats",
    )
    with_config(keys.add_parser("list", help="list keys (never the keys themselves)"))
    with_config(keys.add_parser("revoke", help="revoke a key by id or name")).add_argument("key")

    numbers = sub.add_parser("numbers", help="number health and offline checks")
    numbers_sub = numbers.add_subparsers(dest="numbers", required=True)
    export = with_config(numbers_sub.add_parser("export", help="numbers by health, as CSV"))
    export.add_argument("--health", required=True, choices=("invalid", "unreachable", "reachable"))
    check = with_config(numbers_sub.add_parser("check", help="validate a CSV of numbers offline"))
    check.add_argument(
        "file", help="CSV file (a 'phone' column, or numbers in the first); - for stdin"
    )
    check.add_argument("--output", help="report CSV (default: stdout)")
    check.add_argument("--region", help="region for national numbers (default: the config's)")

    call = sub.add_parser("call", help="start one verification and follow it live")
    call.add_argument("phone")
    call.add_argument(
        "--url",
        default=os.environ.get("OTP_GATEWAY_URL", DEFAULT_URL),
        help=f"gateway base URL (env OTP_GATEWAY_URL, default {DEFAULT_URL})",
    )
    call.add_argument(
        "--api-key", default=os.environ.get("OTP_API_KEY"), help="API key (env OTP_API_KEY)"
    )
    call.add_argument("--ring-seconds", type=int)

    args = parser.parse_args(argv)
    if args.command == "call":
        return follow_call(args)
    if args.command == "config-reference":
        return config_reference(args.write, args.check)
    if args.command == "numbers" and args.numbers == "check":
        return check_numbers(args)
    try:
        cfg = config.load(args.config)
    except config.ConfigError as exc:
        print(f"{args.config}: invalid configuration:", file=sys.stderr)
        for problem in exc.problems:
            print(f"  {problem}", file=sys.stderr)
        return 1

    if args.command == "check-config":
        print(f"{args.config}: ok")
        for line in config.summary(cfg):
            print(f"  {line}")
        return 0
    try:
        if args.command == "run":
            return run(cfg)
        if args.command == "numbers":
            return asyncio.run(export_numbers(cfg, args.health))
        return asyncio.run(manage_keys(cfg, args))
    except StoreUnavailable as exc:  # the database could not be opened
        print(f"database.url: {exc}", file=sys.stderr)
        return 1


def run(cfg: config.Config) -> int:
    """Serve until SIGINT or SIGTERM, then drain and exit 0."""
    logs.setup(cfg.logging.format, cfg.logging.level)
    # libuv's event loop: about an eighth less CPU per call than asyncio's (make bench).
    try:
        uvloop.run(serve(cfg))
    except StoreUnavailable as exc:
        logging.error("database.url: %s", exc)
        return 1
    return 0


async def serve(cfg: config.Config) -> None:
    """Run the app; on SIGTERM or SIGINT answer 503 to new work while ringing calls
    finish (bounded by the longest ring), then stop."""
    # Only `run` needs the app.
    from gateway import listener
    from gateway.api.typedefs import DIALER, MEMBERSHIP
    from gateway.app import create_app, create_operator_app, drain_seconds

    http = cfg.http
    listener.ensure_open_files(
        http.max_connections + listener.OPERATOR_MAX_CONNECTIONS + listener.RESERVED_FILES
    )
    app = create_app(cfg)
    api = listener.runner(app, http)
    operator = listener.runner(create_operator_app(app), http)
    await api.setup()  # the app's resources, which the operator routes read too
    await operator.setup()
    # What start-up made lives as long as the process: out of the collector's way.
    gc.collect()
    gc.freeze()
    servers: list[asyncio.Server] = []
    try:
        servers.append(await listener.listen(api, http.host, http.port, http.max_connections))
        logging.info("listening on http://%s:%s", http.host, http.port)
        servers.append(
            await listener.listen(
                operator, http.operator_host, http.operator_port, listener.OPERATOR_MAX_CONNECTIONS
            )
        )
        logging.info(
            "operator routes (/metrics, /dashboard) on http://%s:%s",
            http.operator_host,
            http.operator_port,
        )
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        logging.info("stopping: new requests get 503 while ringing calls finish")
        # Calls not yet dialed go to the other gateways sharing the database at once;
        # the app's cleanup below finds the drain done and stops the rest.
        await app[MEMBERSHIP].drain(drain_seconds(cfg, app[DIALER]))
    finally:
        for server in servers:
            server.close()  # stop accepting; the runners close the connections
        await operator.cleanup()
        await api.cleanup()
        for server in servers:
            await server.wait_closed()


async def manage_keys(cfg: config.Config, args: argparse.Namespace) -> int:
    store = await open_store(config.database_url(cfg.database), cfg.database.pool_size)
    try:
        if args.keys == "create":
            try:
                record, key = await apikeys.create_key(
                    store, args.name, tuple(args.allow_network), args.scope
                )
            except ValueError as exc:
                print(f"--allow-network: {exc}", file=sys.stderr)
                return 2
            print(
                f"created API key {record.id} ({record.name}, scope {record.scope}); "
                "it is shown only now:"
            )
            print(key)
            return 0
        if args.keys == "list":
            for record in await store.api_keys():
                state = "revoked" if record.revoked_at else "active"
                networks = record.allowed_networks or "any address"
                print(
                    f"{record.id}\t{record.name}\t{timestamp(record.created_at)}\t{state}\t"
                    f"{record.scope}\t{networks}"
                )
            return 0
        revoked = await store.revoke_api_key(args.key, time.time())
        if not revoked:
            print(f"no active key with id or name {args.key!r}", file=sys.stderr)
            return 1
        print(f"revoked {revoked} key(s)")
        return 0
    finally:
        await store.close()


def config_reference(write: bool, check: bool) -> int:
    """Print, check or rewrite the files written from the config's declaration."""
    from gateway import configdoc

    try:
        if write:
            for path in configdoc.write():
                print(f"wrote {path.relative_to(configdoc.ROOT)}")
            return 0
        if check:
            stale = configdoc.stale()
            for path in stale:
                print(
                    f"{path.relative_to(configdoc.ROOT)} differs from gateway/config.py: "
                    f"run {configdoc.COMMAND}",
                    file=sys.stderr,
                )
            return 1 if stale else 0
    except (OSError, ValueError) as exc:  # not a checkout, or the markers are gone
        print(f"config-reference: {exc}", file=sys.stderr)
        return 1
    print(f"==> {configdoc.REFERENCE}, between its markers <==")
    print(configdoc.reference_markdown())
    print(f"==> {configdoc.EXAMPLE} <==")
    print(configdoc.example_yaml(), end="")
    return 0


def check_numbers(args: argparse.Namespace) -> int:
    """Validate a CSV of numbers offline; needs no database, PBX or secrets."""
    from gateway import numbercheck  # loads tqdm and the worker pool only for this command

    region = args.region
    if region is None:
        try:
            region = config.load(args.config).numbers.default_region
        except config.ConfigError:
            print("numbers check: give --region (e.g. ID) or a valid --config", file=sys.stderr)
            return 2
    return numbercheck.main(args.file, args.output, region)


async def export_numbers(cfg: config.Config, health: str) -> int:
    """Every number with `health`, as CSV on stdout, for cleaning a customer database."""
    store = await open_store(config.database_url(cfg.database), cfg.database.pool_size)
    writer = csv.writer(sys.stdout, lineterminator="\n")
    writer.writerow(
        [
            "phone",
            "status",
            "last_outcome",
            "last_cause",
            "last_sip_code",
            "last_call_at",
            "last_delivered_at",
            "calls",
            "delivered",
        ]
    )
    try:
        after = ""
        while page := await store.numbers_by_health(health, after, EXPORT_PAGE):
            for r in page:
                writer.writerow(
                    [
                        r.phone,
                        r.status,
                        r.last_outcome,
                        r.last_cause,
                        r.last_sip_code,
                        timestamp(r.last_call_at) or "",
                        timestamp(r.last_delivered_at) or "",
                        r.calls,
                        r.delivered,
                    ]
                )
            after = page[-1].phone
    finally:
        await store.close()
    return 0


def follow_call(args: argparse.Namespace) -> int:
    """POST a verification, then print each change of its call until it ends."""
    if not args.api_key:
        print("an API key is needed: --api-key or OTP_API_KEY", file=sys.stderr)
        return 2
    base = args.url.rstrip("/")
    body: dict[str, Any] = {"phone": args.phone}
    if args.ring_seconds:
        body["ring_seconds"] = args.ring_seconds
    try:
        status, created = _http(base, "POST", "/v1/verifications", args.api_key, body)
        if status != 201:
            print(f"refused ({status}): {created.get('code')}: {created.get('detail')}")
            return 1
        print(
            f"verification {created['id']} for {created['phone']}, caller ID "
            f"{created['cli']['prefix']} + {created['cli']['length']} digits"
        )
        shown = None
        started = time.monotonic()
        while True:
            _, current = _http(base, "GET", f"/v1/verifications/{created['id']}", args.api_key)
            call = current["call"]
            state = (call["status"], call["outcome"])
            if state != shown:
                shown = state
                detail = ""
                if call["outcome"]:
                    facts = [f"cause {call['hangup_cause']}"]
                    if call["sip_code"] is not None:
                        facts.append(f"SIP {call['sip_code']}")
                    if call["reason"]:
                        facts.append(call["reason"])
                    detail = f": {call['outcome']} ({', '.join(facts)})"
                print(f"{time.monotonic() - started:6.2f}s  {call['status']}{detail}")
            if call["status"] in (CallStatus.COMPLETED, CallStatus.FAILED):
                print(f"verification is {current['status']}")
                return 0 if call["status"] == CallStatus.COMPLETED else 1
            time.sleep(CALL_POLL_INTERVAL_S)
    except (urllib.error.URLError, OSError) as exc:
        print(f"cannot reach the gateway at {base}: {exc}", file=sys.stderr)
        return 1


def _http(
    base: str, method: str, path: str, key: str, body: dict[str, Any] | None = None
) -> tuple[int, dict[str, Any]]:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(  # noqa: S310 - the operator's own gateway URL
        base + path,
        data=data,
        method=method,
        headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=HTTP_TIMEOUT_S) as response:  # noqa: S310
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


if __name__ == "__main__":
    sys.exit(main())
