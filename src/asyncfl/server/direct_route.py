"""One hot endpoint answered beneath the framework's routing.

A selector answers thousands of check-ins a second, almost all "come back later" from memory.
Measured with py-spy at 2,000 check-ins/s, FastAPI's exception middleware, exit stack, router,
route matching and dependency solving took about a quarter of the selector's event loop; the
check-in itself needs none of them. Installed as the app's own middleware, the route still sits
behind the server-error handler (an unexpected exception is a logged 500, as anywhere else),
and answers an `ApiError` exactly as the app's handler does (`error_response`).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from asyncfl.server.errors import ApiError


def error_response(err: ApiError) -> JSONResponse:
    """Every refusal leaves as JSON {"error": code, "detail": message} with its headers."""
    return JSONResponse(err.body(), status_code=err.status, headers=err.headers)


class DirectRoute:
    """ASGI middleware: `method` `path` is answered by `endpoint(request)`; any other method on
    the path gets 405 with Allow, as a routed endpoint's would; everything else goes on."""

    def __init__(self, app, method: str, path: str, endpoint: Callable[[Request], Awaitable[Response]]):
        self.app, self.method, self.path, self.endpoint = app, method, path, endpoint

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] != self.path:
            await self.app(scope, receive, send)
            return
        if scope["method"] != self.method:
            err = ApiError(405, "method_not_allowed", "Method Not Allowed", {"Allow": self.method})
            await error_response(err)(scope, receive, send)
            return
        try:
            response = await self.endpoint(Request(scope, receive))
        except ApiError as err:
            response = error_response(err)
        await response(scope, receive, send)
