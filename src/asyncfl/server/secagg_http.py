"""The HTTP endpoints of synchronous secure aggregation (a run with `secure_aggregation.protocol`
secagg_plus or secagg; the rounds themselves are `secure_rounds.SecureSyncPolicy`).

A client with a lease of a secure round:
  GET  /v1/secagg/round?lease_id=L[&after=PHASE&wait=S]  joins the round (its client id, the
       round's parameters and encoding) and, with `after`, long-polls up to S seconds until the
       round has moved past PHASE; the answer then carries what the closed phase sent this
       client (`directory`, `incoming`, `unmask_request`) or, at the end, its `outcome`.
  POST /v1/secagg/{round}/advertise  {lease_id, cipher_key, mask_key}
  POST /v1/secagg/{round}/shares     {lease_id, ciphertexts: {peer: sealed}}
  POST /v1/secagg/{round}/masked     {lease_id, weight, masked}
  POST /v1/secagg/{round}/unmask     {lease_id, self_mask_shares: {peer: share}, key_shares: {peer: share}}
Bytes travel as base64. Every endpoint takes the client token, counts against its rate limit and
reads bounded JSON; malformed input is answered 400 (not JSON, a field missing or of the wrong
type) or 422 (a value that cannot be right: key or share sizes, peers, weight), a message out of
turn 409, each naming the problem, and none of them changes the round. A re-send of a message
already recorded is answered as the first time. A message is kept in memory only (a restart
aborts the round anyway); a message that closes a phase is answered once that is durable.
"""

from __future__ import annotations

import asyncio

from fastapi import FastAPI, Query, Request
from starlette.concurrency import run_in_threadpool

from asyncfl import strict_json
from asyncfl.secagg.messages import from_json
from asyncfl.server.errors import ApiError
from asyncfl.server.secagg_messages import MESSAGES, PHASES

ENDPOINTS = {"advertise": "advertise", "shares": "share_keys", "masked": "masked_input", "unmask": "unmask"}
MAX_WAIT = 20.0  # seconds a poll may hold its request open
POLL_PERIOD = 0.01  # how often a held poll looks whether a phase closed
BASE_LIMIT = 4096  # a phase body's JSON around its bytes fields


def phase_body_limit(server, phase: str) -> int:
    """The largest body a phase message can be: its bytes fields as base64 plus JSON around them."""
    policy = server.secure_rounds
    if phase == "masked_input":
        return BASE_LIMIT + 4 * (-(-policy.length * policy.codec.ring.element_bytes // 3))
    return BASE_LIMIT + 512 * policy.selected  # one sealed share pair or share per peer, with its id


def add_secagg_routes(app: FastAPI, server, client_of, read_limited) -> None:
    policy = server.secure_rounds

    def rejected(err: ApiError) -> ApiError:
        server.reject(err)
        return err

    def seen(client: str, lease_id: str) -> dict:
        with server.lock:
            ended = policy.outcome(lease_id, client)
            if ended is not None:
                return ended
            lease = server.coordinator.active_lease(lease_id, client, server.store)
            return policy.view(server.coordinator, lease)

    @app.get("/v1/secagg/round")
    async def round_view(
        request: Request,
        lease_id: str = Query(max_length=64),
        after: str | None = Query(None),
        wait: float = Query(0.0, ge=0, le=MAX_WAIT),
    ):
        client = client_of(request)
        if after is not None and after not in PHASES:
            raise rejected(ApiError(400, "malformed", f"after must be one of {', '.join(PHASES)}"))
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait
        while True:
            mark = policy.progress
            try:
                view = await run_in_threadpool(seen, client, lease_id)  # the lock may be held by a phase closing
            except ApiError as err:
                raise rejected(err) from None
            moved = after is None or view["phase"] == "done" or PHASES.index(view["phase"]) > PHASES.index(after)
            if moved or "outcome" in view or loop.time() >= deadline:
                return view
            while policy.progress == mark and loop.time() < deadline:  # read without the lock: an int
                await asyncio.sleep(POLL_PERIOD)

    @app.post("/v1/secagg/{number}/{endpoint}")
    async def phase_message(number: int, endpoint: str, request: Request):
        client = client_of(request)
        phase = ENDPOINTS.get(endpoint)
        if phase is None:
            raise rejected(ApiError(404, "not_found", f"no secure aggregation endpoint {endpoint[:40]!r}"))
        try:
            raw = await read_limited(request, phase_body_limit(server, phase), server.settings.body_timeout)
            lease_id, message = parse(raw, phase)
        except ApiError as err:
            raise rejected(err) from None
        return await run_in_threadpool(deliver, client, lease_id, number, phase, message)

    def deliver(client: str, lease_id: str, number: int, phase: str, message) -> dict:
        try:
            with server.lock:
                lease = server.coordinator.active_lease(lease_id, client, server.store)
                progress = policy.progress
                replayed = policy.receive(server.coordinator, lease, number, phase, message)
                epoch = server.commit.epoch if policy.progress != progress else None
            if epoch is not None:  # it closed a phase (leases, perhaps a step): durable before the answer
                server.commit.sync(epoch)
        except ApiError as err:
            raise rejected(err) from None
        return {"accepted": True, "round": number, "phase": phase, "replayed": replayed}


def parse(raw: bytes, phase: str):
    """(lease id, message) from a phase body; 400 naming what is malformed."""
    try:
        body = strict_json.loads(raw)
    except strict_json.JsonError as err:
        raise ApiError(400, "malformed", f"{phase} body is not JSON: {err}") from None
    if not isinstance(body, dict) or not isinstance(body.get("lease_id"), str):
        raise ApiError(400, "malformed", f'{phase} body must be an object with a string "lease_id"')
    try:
        message = from_json(MESSAGES[phase], body | {"client": 0})  # the server knows who sent it
    except ValueError as err:  # base64 errors included
        raise ApiError(400, "malformed", f"{phase} message: {err}") from None
    return body["lease_id"], message
