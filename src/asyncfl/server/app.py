"""HTTP surface of the server (FastAPI). Handlers only translate between HTTP and the roles in
service.py; every error leaves as JSON {"error": code, "detail": message} with a 4xx status.

Endpoints for clients (client token): POST /v1/checkin, GET /v1/task, GET /v1/model/{version},
POST /v1/update (binary frame, see wire.py); with sync secure aggregation /v1/secagg/...
(secagg_http.py). For operators (operator token, as a bearer header
or the cookie POST /v1/session sets for the dashboard): GET /status, GET /metrics (both public
with `server.public_status`), GET /v1/history, GET / (dashboard), GET /docs, /redoc,
/openapi.json. Open: GET /healthz.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from asyncfl import strict_json
from asyncfl.server.auth import OPERATOR_COOKIE, bearer
from asyncfl.server.dashboard import PAGE, SIGN_IN
from asyncfl.server.direct_route import error_response
from asyncfl.server.errors import ApiError
from asyncfl.server.secagg_http import add_secagg_routes
from asyncfl.server.service import HISTORY_LIMIT, HISTORY_MAX_LIMIT, FLServer

log = logging.getLogger("asyncfl.server")
CHECKIN_LIMIT = 16 * 1024
FRAME_TYPE = "application/vnd.asyncfl.frame"


async def read_limited(request: Request, limit: int, timeout: float | None = None) -> bytes:
    """The body, refused with 413 as soon as it is known to exceed `limit` (from
    Content-Length before reading anything, or while streaming a chunked body), and with 408
    (closing the connection) when it has not fully arrived within `timeout` seconds."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not (declared.isascii() and declared.isdigit()):
            raise ApiError(400, "malformed", f"Content-Length {declared[:40]!r} is not a byte count")
        digits = declared.lstrip("0") or "0"  # compared as text first: int() refuses thousands of digits
        if len(digits) > len(str(limit)) or int(digits) > limit:
            raise ApiError(413, "too_large", f"body of {declared[:40]} bytes exceeds the limit of {limit} bytes")

    async def read() -> bytes:
        chunks, total = [], 0
        async for chunk in request.stream():
            total += len(chunk)
            if total > limit:
                raise ApiError(413, "too_large", f"body exceeds the limit of {limit} bytes")
            chunks.append(chunk)
        return b"".join(chunks)

    try:
        async with asyncio.timeout(timeout):  # no task per body, as wait_for would create
            return await read()
    except TimeoutError:
        raise ApiError(
            408, "body_timeout", f"body not received within {timeout:g} s", headers={"Connection": "close"}
        ) from None


def checkin_eligible(raw: bytes) -> bool:
    """A check-in body: empty, or {"eligible": bool}; 400 otherwise."""
    if not raw.strip():
        return True
    try:
        body = strict_json.loads(raw)
    except strict_json.JsonError as err:
        raise ApiError(400, "malformed", f"check-in body is not JSON: {err}") from None
    if not isinstance(body, dict) or not isinstance(body.get("eligible", True), bool):
        raise ApiError(400, "malformed", 'check-in body must be an object like {"eligible": true}')
    return body.get("eligible", True)


def add_error_handlers(app: FastAPI, reject: Callable[[ApiError], None]) -> None:
    """Every error leaves as JSON {"error": code, "detail": message}; `reject` counts the
    requests FastAPI itself refuses as malformed."""

    @app.exception_handler(ApiError)
    async def api_error(request: Request, err: ApiError):
        return error_response(err)

    @app.exception_handler(RequestValidationError)
    async def bad_request(request: Request, err: RequestValidationError):
        e = err.errors()[0] if err.errors() else {"loc": (), "msg": "invalid request"}
        loc = ".".join(str(p) for p in e.get("loc", ()))
        reject(ApiError(400, "malformed", ""))
        return JSONResponse({"error": "malformed", "detail": f"{loc}: {e.get('msg')}"}, status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, err: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(err.status_code, "http_error")
        return JSONResponse(
            {"error": code, "detail": str(err.detail)},
            status_code=err.status_code,
            headers=getattr(err, "headers", None),
        )


def create_app(server: FLServer, background: bool = True) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if background:
            server.start_background()
        yield
        server.close()

    app = FastAPI(
        title="asyncfl server", version="1", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None
    )
    app.state.server = server

    def address(request: Request) -> str:
        return request.client.host if request.client else "unknown"

    def client_of(request: Request) -> str:
        return server.authenticate(request.headers.get("authorization"), address(request))

    def operator(request: Request) -> str:
        return server.authorize_operator(
            request.headers.get("authorization"), request.cookies.get(OPERATOR_COOKIE), address(request)
        )

    add_error_handlers(app, server.reject)

    @app.post("/v1/checkin")
    async def checkin(request: Request):
        client = client_of(request)
        raw = await read_limited(request, CHECKIN_LIMIT, server.settings.body_timeout)
        try:
            eligible = checkin_eligible(raw)
        except ApiError as err:
            server.reject(err)
            raise
        return await run_in_threadpool(server.checkin, client, eligible)

    @app.get("/v1/task")
    async def task(request: Request):
        client_of(request)
        return server.task_info()

    @app.get("/v1/model/{version}")
    async def model(version: int, request: Request):
        client_of(request)
        frame = await run_in_threadpool(server.model_frame, version)
        return Response(frame, media_type=FRAME_TYPE)

    @app.post("/v1/update")
    async def update(request: Request):
        client = client_of(request)
        try:
            body = await read_limited(request, server.max_body_bytes, server.settings.body_timeout)
        except ApiError as err:
            server.reject(err)
            raise
        status, answer = await run_in_threadpool(server.upload, client, body)
        return JSONResponse(answer, status_code=status)

    if server.secure_rounds is not None:  # sync SecAgg rounds: /v1/secagg/...
        add_secagg_routes(app, server, client_of, read_limited)

    @app.get("/status")
    async def status(request: Request):
        if not server.settings.public_status:
            operator(request)
        return server.status()

    @app.get("/metrics")
    async def metrics(request: Request):
        if not server.settings.public_status:
            operator(request)
        return PlainTextResponse(server.metrics_text(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/history")
    async def history(request: Request, since: int = 0, limit: int = Query(HISTORY_LIMIT, ge=1, le=HISTORY_MAX_LIMIT)):
        operator(request)
        return server.history(since, limit)

    @app.post("/v1/session", status_code=204)
    async def session(request: Request):
        """Trades an operator bearer token for the dashboard's cookie: HttpOnly (page scripts
        cannot read it), SameSite=Strict (other sites' pages cannot send it)."""
        authorization = request.headers.get("authorization")
        server.authorize_operator(authorization, None, address(request))  # a bearer token, not the cookie
        answer = Response(status_code=204)
        answer.set_cookie(
            OPERATOR_COOKIE,
            bearer(authorization),
            httponly=True,
            samesite="strict",
            secure=request.url.scheme == "https",
        )
        return answer

    @app.get("/healthz")
    async def healthz():
        return {"ok": True}

    @app.get("/", response_class=HTMLResponse)
    async def dashboard(request: Request):
        """The page for an operator; the sign-in page, with the refusal's status, for a browser
        without one (it asks for text/html); any other client gets the JSON refusal, as from
        every other endpoint."""
        try:
            operator(request)
        except ApiError as err:
            if err.status == 429 or "text/html" not in request.headers.get("accept", ""):
                raise
            return HTMLResponse(SIGN_IN, status_code=err.status)
        return HTMLResponse(PAGE)

    @app.get("/openapi.json", include_in_schema=False)
    async def openapi(request: Request):
        operator(request)
        return app.openapi()

    @app.get("/docs", include_in_schema=False)
    async def docs(request: Request):
        operator(request)
        return get_swagger_ui_html(openapi_url="/openapi.json", title=app.title)

    @app.get("/redoc", include_in_schema=False)
    async def redoc(request: Request):
        operator(request)
        return get_redoc_html(openapi_url="/openapi.json", title=app.title)

    return app
