"""HTTP surface of the TSA (FastAPI). Open: GET /healthz, GET /v1/tsa (public key and limits).
For the FL server only (bearer token): POST /v1/unmask, a `TsaRequest` as JSON, answered with a
`TsaResponse` as JSON (`asyncfl.secagg.messages.to_json`). Every refusal leaves as JSON
{"error": code, "detail": message}: 401 without the server's token, 400 for a body that is not
a request, 413 above the size limit, 422 for a request the TSA refuses (fewer than K
contributions, a used contribution or step id, a weight out of range, an unauthenticated seed).
An exact retry of an answered request gets the identical answer."""

from __future__ import annotations

import hmac
import logging

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from asyncfl import strict_json
from asyncfl.secagg.crypto import to_base64
from asyncfl.secagg.messages import TsaRequest, from_json, to_json
from asyncfl.secagg.tsa import TooFewContributions, TrustedAggregator, UnauthenticatedContribution, WeightOutOfRange
from asyncfl.secagg.tsa_store import ReplayedContribution, TsaRefusal

log = logging.getLogger("asyncfl.tsa")
MAX_REQUEST_BYTES = 64 * 1024 * 1024
REFUSALS = {
    TooFewContributions: "too_few_contributions",
    ReplayedContribution: "replayed_contribution",
    WeightOutOfRange: "weight_out_of_range",
    UnauthenticatedContribution: "unauthenticated_contribution",
}


def _error(status: int, code: str, detail: str) -> JSONResponse:
    return JSONResponse({"error": code, "detail": detail}, status_code=status)


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

    @app.post("/v1/unmask")
    async def unmask(request: Request):
        if not hmac.compare_digest(request.headers.get("authorization", "").encode(), expected):
            return _error(401, "unauthorized", "the unmask endpoint needs the FL server's bearer token")
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > MAX_REQUEST_BYTES:
            return _error(413, "too_large", f"request exceeds {MAX_REQUEST_BYTES} bytes")
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > MAX_REQUEST_BYTES:
                return _error(413, "too_large", f"request exceeds {MAX_REQUEST_BYTES} bytes")
        try:
            unmask_request = from_json(TsaRequest, strict_json.loads(bytes(body)))
        except (strict_json.JsonError, ValueError) as err:
            return _error(400, "malformed", f"not a TsaRequest: {err}")
        try:
            response = await run_in_threadpool(tsa.unmask, unmask_request)
        except TsaRefusal as refusal:
            code = next((c for kind, c in REFUSALS.items() if isinstance(refusal, kind)), "refused")
            log.warning("refused step %r: %s: %s", unmask_request.step_id, code, refusal)
            return _error(422, code, str(refusal))
        return to_json(response)

    return app
