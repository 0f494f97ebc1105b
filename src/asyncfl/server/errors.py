"""The one error type every role raises: an HTTP status, a stable code and a message."""

from __future__ import annotations


class ApiError(Exception):
    def __init__(
        self, status: int, code: str, detail: str, headers: dict[str, str] | None = None, extra: dict | None = None
    ):
        super().__init__(detail)
        self.status, self.code, self.detail = status, code, detail
        self.headers = headers or {}
        self.extra = extra or {}

    def body(self) -> dict:
        return {"error": self.code, "detail": self.detail, **self.extra}
