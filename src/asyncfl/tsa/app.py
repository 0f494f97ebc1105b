"""HTTP surface of the TSA (FastAPI). Open: GET /healthz, GET /v1/tsa (public key and limits).
For the FL server only (bearer token): POST /v1/verify, {"update_id", "sealed_seed" (base64)} of
one upload before the server acknowledges it, answered {"ok": true} once its seed is reserved to
it; POST /v1/unmask, a `TsaRequest` as JSON, answered with a `TsaResponse` as JSON
(`asyncfl.secagg.messages.to_json`), or, for `Accept: application/octet-stream` (what the FL
server asks for), the raw mask sum with the step id URL-quoted in `X-Step-Id`: base64 in JSON
costs tens of milliseconds per step for a 1M-coordinate model. Every refusal leaves as JSON
{"error": code, "detail": message}: 401 without the server's token, 400 for a body that is not
a request, 413 above the size limit, 422 for a request the TSA refuses (fewer than K
contributions, a used contribution, seed or step id, a weight out of range, an unauthenticated
seed).
An exact retry of an answered request gets the identical answer."""

from __future__ import annotations

import hmac
import logging
from urllib.parse import quote

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool

from asyncfl import strict_json
from asyncfl.secagg.crypto import from_base64, to_base64
from asyncfl.secagg.messages import TsaRequest, from_json, to_json
from asyncfl.secagg.tsa import TooFewContributions, TrustedAggregator, UnauthenticatedContribution, WeightOutOfRange
from asyncfl.secagg.tsa_store import ReplayedContribution, TsaRefusal

log = logging.getLogger("asyncfl.tsa")
MAX_REQUEST_BYTES = 64 * 1024 * 1024
BINARY = "application/octet-stream"
REFUSALS = {
    TooFewContributions: "too_few_contributions",
    ReplayedContribution: "replayed_contribution",
    WeightOutOfRange: "weight_out_of_range",
    UnauthenticatedContribution: "unauthenticated_contribution",
}


def _error(status: int, code: str, detail: str) -> JSONResponse:
    return JSONResponse({"error": code, "detail": detail}, status_code=status)


def _refused(refusal: TsaRefusal, what: str) -> JSONResponse:
    code = next((c for kind, c in REFUSALS.items() if isinstance(refusal, kind)), "refused")
    log.warning("refused %s: %s: %s", what, code, refusal)
    return _error(422, code, str(refusal))


def create_tsa_app(tsa: TrustedAggregator, token: str) -> FastAPI:
    app = FastAPI(title="asyncfl TSA", version="1", docs_url=None, redoc_url=None, openapi_url=None)
    expected = f"Bearer {token}".encode()

    @app.get("/healthz")
    async def healthz():
        return {"ok": True}

    @app.get("/v1/tsa")
    async def describe():
        return {
            "public_key": to_base64(tsa.public_key),
            "task": tsa.task,
            "length": tsa.length,
            "min_contributions": tsa.min_contributions,
            "max_weight": tsa.max_weight,
            "bits": tsa.ring.bits,
        }

    async def read_body(request: Request) -> bytes | JSONResponse:
        """The server's request body, or the refusal to answer instead (401, 413)."""
        if not hmac.compare_digest(request.headers.get("authorization", "").encode(), expected):
            return _error(401, "unauthorized", "this endpoint needs the FL server's bearer token")
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > MAX_REQUEST_BYTES:
            return _error(413, "too_large", f"request exceeds {MAX_REQUEST_BYTES} bytes")
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > MAX_REQUEST_BYTES:
                return _error(413, "too_large", f"request exceeds {MAX_REQUEST_BYTES} bytes")
        return bytes(body)

    @app.post("/v1/verify")
    async def verify(request: Request):
        body = await read_body(request)
        if isinstance(body, JSONResponse):
            return body
        try:
            fields = strict_json.loads(body)
            update_id, sealed = fields["update_id"], fields["sealed_seed"]
            if not (isinstance(update_id, str) and isinstance(sealed, str)):
                raise ValueError("update_id and sealed_seed must be strings")
            sealed_seed = from_base64(sealed)
        except (strict_json.JsonError, ValueError, KeyError, TypeError) as err:
            return _error(400, "malformed", f"not an upload to verify: {err!r}")
        try:
            await run_in_threadpool(tsa.verify, update_id, sealed_seed)
        except TsaRefusal as refusal:
            return _refused(refusal, f"upload {update_id!r}")
        return {"ok": True}

    @app.post("/v1/unmask")
    async def unmask(request: Request):
        body = await read_body(request)
        if isinstance(body, JSONResponse):
            return body
        try:
            unmask_request = from_json(TsaRequest, strict_json.loads(body))
        except (strict_json.JsonError, ValueError) as err:
            return _error(400, "malformed", f"not a TsaRequest: {err}")
        try:
            response = await run_in_threadpool(tsa.unmask, unmask_request)
        except TsaRefusal as refusal:
            return _refused(refusal, f"step {unmask_request.step_id!r}")
        if request.headers.get("accept") == BINARY:
            return Response(response.mask_sum, media_type=BINARY, headers={"X-Step-Id": quote(response.step_id)})
        return to_json(response)

    return app
