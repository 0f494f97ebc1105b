"""HTTP surface of a cluster selector (FastAPI): the single process's client endpoints with its
limits and error bodies (server/app.py), for every task in the database: a client's token
names its task. POST /v1/checkin, GET /v1/task, GET /v1/model/{version}, POST /v1/update; for
operators (operator token; open with `server.public_status`) GET /status and GET /metrics,
restricted to the token's task unless it is bound to every task; open: GET /healthz.
"""

from __future__ import annotations

from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from starlette.concurrency import run_in_threadpool

from asyncfl.cluster.pgpool import unavailable
from asyncfl.cluster.selector import Selector
from asyncfl.cluster.selector_status import metrics_of, status_of
from asyncfl.cluster.tokens import NeedsDatabase
from asyncfl.server.admission import CHECKIN_PATH
from asyncfl.server.app import CHECKIN_LIMIT, FRAME_TYPE, add_error_handlers, checkin_eligible, read_limited
from asyncfl.server.auth import ANY_TASK, OPERATOR, admit, bearer
from asyncfl.server.direct_route import DirectRoute
from asyncfl.server.errors import ApiError


def create_selector_app(selector: Selector, background: bool = True) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if background:
            await run_in_threadpool(selector.start)
        yield
        await selector.claims.close()
        if background:
            await run_in_threadpool(selector.close)

    app = FastAPI(
        title="asyncfl selector", version="1", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None
    )
    app.state.selector = selector
    settings = selector.settings
    add_error_handlers(app, lambda err: selector.reject("", err))

    def address(request: Request) -> str:
        return request.client.host if request.client else "unknown"

    async def client_of(request: Request) -> tuple[str, str]:
        """(client, task): on the event loop when memory knows the token (a signed one, or one
        remembered), else off it, since the lookup needs the database."""
        authorization, where = request.headers.get("authorization"), address(request)
        try:
            return selector.authenticate(authorization, where, in_memory=True)
        except NeedsDatabase:
            return await run_in_threadpool(selector.authenticate, authorization, where)

    async def operator_tasks(request: Request) -> set[str] | None:
        """The tasks an operator may read (None: all)."""
        if settings.public_status:
            return None

        def identify():
            lookup = selector.auth.lookup
            return admit(
                lambda: lookup(bearer(request.headers.get("authorization")), OPERATOR),
                address(request),
                selector.anonymous,
            )

        try:
            _, task = await run_in_threadpool(identify)
        except ApiError as err:
            selector.reject("", err)
            raise
        return None if task == ANY_TASK else {task}

    async def checkin(request: Request) -> JSONResponse:
        client, task = await client_of(request)
        raw = await read_limited(request, CHECKIN_LIMIT, settings.body_timeout)
        try:
            eligible = checkin_eligible(raw)
        except ApiError as err:
            selector.reject(task, err)
            raise
        answer, reserved = selector.checkin_from_memory(client, task, eligible)  # "retry"/"stop": no database
        if answer is None and reserved is None:  # a task memory does not know yet
            await run_in_threadpool(selector.know, task)
            answer, reserved = selector.checkin_from_memory(client, task, eligible)
            if answer is None and reserved is None:
                raise unavailable("the task's state changed meanwhile")
        if answer is None:
            answer = await selector.checkin(client, task, eligible, reserved)
        return JSONResponse(answer)  # the answer is plain JSON already

    app.add_middleware(DirectRoute, method="POST", path=CHECKIN_PATH, endpoint=checkin)  # the hot path

    @app.get("/v1/task")
    async def task_info(request: Request):
        _, task = await client_of(request)
        return await run_in_threadpool(selector.task_info, task)

    @app.get("/v1/model/{version}")
    async def model(version: int, request: Request):
        _, task = await client_of(request)  # memory first, as for tokens: a thread hop costs the loop
        frame = selector.frame_from_memory(task, version) or await run_in_threadpool(
            selector.model_frame, task, version
        )
        return Response(frame, media_type=FRAME_TYPE)

    @app.post("/v1/update")
    async def update(request: Request):
        client, task = await client_of(request)
        served = selector.served_from_memory(task) or await run_in_threadpool(selector.served, task)
        try:
            body = await read_limited(request, served.max_body_bytes, settings.body_timeout)
        except ApiError as err:
            selector.reject(task, err)
            raise
        status, answer = await run_in_threadpool(selector.upload, client, task, body)
        return JSONResponse(answer, status_code=status)

    @app.get("/status")
    async def status(request: Request):
        return status_of(selector, await operator_tasks(request))

    @app.get("/metrics")
    async def metrics(request: Request):
        text = metrics_of(selector, await operator_tasks(request))
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4")

    @app.get("/healthz")
    async def healthz():
        return {"ok": True, "selector": selector.id}

    return app
