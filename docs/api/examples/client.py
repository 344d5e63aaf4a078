#!/usr/bin/env python3
"""An otp-gateway client: create a verification, read it, check a code, cancel.

It uses only the standard library (urllib). Run it with the phone to verify:

    OTP_API_KEY=otpk_... python3 client.py +6281234567890
    python3 client.py --url http://127.0.0.1:8080 --api-key otpk_... --code 4821 +6281234567890

The base URL is --url, else the environment variable OTP_GATEWAY_URL, else
http://127.0.0.1:8080. The API key is --api-key, else OTP_API_KEY.

1. Create: POST /v1/verifications, with an Idempotency-Key, so that a retry never
   places a second call.
2. Read: GET /v1/verifications/{id} once a second until the call has ended
   (`call.status` `completed` or `failed`), at most --wait seconds.
3. Check: POST /v1/verifications/{id}/check with --code, or else with the code typed on
   stdin (the last digits of the number that called).
4. Cancel: POST /v1/verifications/{id}/cancel. A verification still pending (after a
   wrong code) is canceled. One that is no longer pending (approved, say) answers
   `409 verification_not_pending`, which is reported and accepted.

A 429 or 503 whose Retry-After is at most 10 seconds is retried after that wait; every
other problem is reported by its `code`. Exit status: 0 when the code was right (the
verification is approved), 1 when it was not approved (wrong code, the call did not
reach the phone, or it did not end in time), 2 on a usage error or an error of the API
or the network.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from typing import Any

DESCRIPTION = "Create a verification, read it, check a code, cancel."
DEFAULT_URL = "http://127.0.0.1:8080"
MAX_RETRY_AFTER_S = 10  # retry a 429 or 503 that asks for at most this wait
MAX_TRIES = 5  # ...at most this many times in all
TIMEOUT_S = 10  # per HTTP request


class ApiError(Exception):
    """A problem+json answer: branch on `code`, never on `detail`."""

    def __init__(self, status: int, problem: dict[str, Any], retry_after: int) -> None:
        self.status = status
        self.code = str(problem.get("code", "unknown"))
        self.detail = str(problem.get("detail", ""))
        self.problem = problem
        self.retry_after = retry_after
        super().__init__(f"{status} {self.code}: {self.detail}")


class Client:
    def __init__(self, base_url: str, api_key: str) -> None:
        self.base_url = base_url.rstrip("/")
        self.api_key = api_key

    def request(
        self,
        method: str,
        path: str,
        body: dict[str, Any] | None = None,
        idempotency_key: str | None = None,
    ) -> dict[str, Any]:
        headers = {"Authorization": f"Bearer {self.api_key}", "Accept": "application/json"}
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        if idempotency_key:
            headers["Idempotency-Key"] = idempotency_key
        for attempt in range(1, MAX_TRIES + 1):
            # main() accepts only http and https base URLs.
            url = self.base_url + path
            request = urllib.request.Request(url, data=data, headers=headers, method=method)  # noqa: S310
            try:
                with urllib.request.urlopen(request, timeout=TIMEOUT_S) as response:  # noqa: S310
                    answer: dict[str, Any] = json.load(response)
                    return answer
            except urllib.error.HTTPError as error:
                problem = _problem(error)
                wait = _retry_after(error.headers.get("Retry-After"))
                retry = error.code in (429, 503) and 0 < wait <= MAX_RETRY_AFTER_S
                if retry and attempt < MAX_TRIES:
                    time.sleep(wait)  # a short wait: send the same request again
                    continue
                raise ApiError(error.code, problem, wait) from None
        raise AssertionError("unreachable")

    def create(self, phone: str) -> dict[str, Any]:
        # A new key per verification; retries of this one request reuse it.
        key = str(uuid.uuid4())
        return self.request("POST", "/v1/verifications", {"phone": phone}, key)

    def read(self, verification_id: str) -> dict[str, Any]:
        return self.request("GET", f"/v1/verifications/{_quote(verification_id)}")

    def check(self, verification_id: str, code: str) -> dict[str, Any]:
        path = f"/v1/verifications/{_quote(verification_id)}/check"
        return self.request("POST", path, {"code": code})

    def cancel(self, verification_id: str) -> dict[str, Any]:
        return self.request("POST", f"/v1/verifications/{_quote(verification_id)}/cancel")


def _quote(segment: str) -> str:
    return urllib.parse.quote(segment, safe="")


def _problem(error: urllib.error.HTTPError) -> dict[str, Any]:
    """The problem+json body, or a stand-in when the answer is not one (a proxy's page)."""
    try:
        problem = json.load(error)
    except ValueError:
        problem = None
    if isinstance(problem, dict) and "code" in problem:
        return problem
    return {"code": "http_error", "detail": f"HTTP {error.code} {error.reason}"}


def _retry_after(value: str | None) -> int:
    try:
        return int(value or 0)
    except ValueError:
        return 0


def wait_for_call(client: Client, verification: dict[str, Any], wait_s: float) -> dict[str, Any]:
    """Read the verification until its call has ended, or `wait_s` has passed."""
    deadline = time.monotonic() + wait_s
    while verification["call"]["status"] not in ("completed", "failed"):
        if time.monotonic() >= deadline:
            break
        time.sleep(1)
        verification = client.read(verification["id"])
    return verification


def ask_code(cli: dict[str, Any]) -> str | None:
    """The code the user types; None at the end of stdin."""
    prompt = f"code (the last {cli['length']} digits of the number that called): "
    try:
        return input(prompt).strip()
    except EOFError:
        return None


def cancel(client: Client, verification_id: str) -> int:
    """Cancel, accepting `409 verification_not_pending`: 0, or 2 on any other problem."""
    try:
        canceled = client.cancel(verification_id)
        print(f"cancel {verification_id}: status {canceled['status']}")
    except ApiError as e:
        if e.code != "verification_not_pending":
            print(f"cancel refused: {e}", file=sys.stderr)
            return 2
        status = e.problem.get("verification_status")
        print(f"cancel {verification_id}: not pending ({status})")
    return 0


def run(client: Client, phone: str, code: str | None, wait_s: float) -> int:
    # 1. Create.
    try:
        v = client.create(phone)
    except ApiError as e:
        if e.code == "rate_limited":
            print(f"too many attempts; try again in {e.retry_after} s", file=sys.stderr)
        elif e.status == 422:  # invalid_phone, phone_type_not_allowed, region_not_allowed, ...
            print(f"cannot call this number: {e}", file=sys.stderr)
        else:  # pbx_unavailable, overloaded, unauthorized, ...
            print(f"create refused: {e}", file=sys.stderr)
        return 2
    vid = v["id"]
    print(f"created {vid}: status {v['status']}, caller ID matches {v['cli']['pattern']}")

    # 2. Read, until the call has ended.
    v = wait_for_call(client, v, wait_s)
    call = v["call"]
    print(f"read {vid}: status {v['status']}, call {call['status']}, outcome {call['outcome']}")
    if call["status"] not in ("completed", "failed"):
        print(f"the call did not end within {wait_s:g} s")
        return cancel(client, vid) or 1  # hangs up a call still ringing
    if v["status"] == "failed":  # busy, unreachable, invalid_number, no_alerting, ...
        print(f"the call did not reach the phone ({call['outcome']}): offer another way")
        return 1
    if v["status"] != "pending":  # expired, or canceled by a newer verification
        print(f"verification {v['status']}")
        return 1
    if call["outcome"] == "progress_only":
        print("delivery uncertain (early media only): the code still works")

    # 3. Check a code.
    while True:
        typed = code if code is not None else ask_code(v["cli"])
        if typed is None:
            print("no code given: pass --code or type it on stdin", file=sys.stderr)
            return cancel(client, vid) or 2
        try:
            result = client.check(vid, typed)
            break
        except ApiError as e:
            if e.code == "invalid_request" and code is None:
                print("digits only, please")  # not 1-16 digits: no attempt was spent
                continue
            print(f"check refused: {e}", file=sys.stderr)  # verification_not_pending, ...
            return cancel(client, vid) or 2
    if result["valid"]:
        print(f"check {vid}: valid, status {result['status']}")
    else:
        remaining = result["attempts_remaining"]
        print(f"check {vid}: wrong code, status {result['status']}, {remaining} attempts left")

    # 4. Cancel: a verification still pending is canceled; any other is left as it is.
    return cancel(client, vid) or (0 if result["valid"] else 1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=DESCRIPTION)
    parser.add_argument("phone", help="the phone to verify, E.164 (+6281234567890)")
    parser.add_argument(
        "--url",
        default=os.environ.get("OTP_GATEWAY_URL", DEFAULT_URL),
        help=f"the gateway's base URL (env OTP_GATEWAY_URL, default {DEFAULT_URL})",
    )
    parser.add_argument(
        "--api-key", default=os.environ.get("OTP_API_KEY"), help="API key (env OTP_API_KEY)"
    )
    parser.add_argument("--code", help="the code to check (default: read from stdin)")
    parser.add_argument(
        "--wait",
        type=float,
        default=60.0,
        help="seconds to wait for the call to end (default 60)",
    )
    args = parser.parse_args(argv)
    if not args.api_key:
        parser.error("no API key: pass --api-key or set OTP_API_KEY")
    if urllib.parse.urlsplit(args.url).scheme not in ("http", "https"):
        parser.error(f"--url must be an http or https URL, not {args.url!r}")
    try:
        return run(Client(args.url, args.api_key), args.phone, args.code, args.wait)
    except ApiError as e:
        print(f"gateway error: {e}", file=sys.stderr)
        return 2
    except (urllib.error.URLError, OSError) as e:
        print(f"cannot reach the gateway at {args.url}: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
