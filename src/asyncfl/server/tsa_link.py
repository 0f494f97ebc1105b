"""The server's side of the TSA conversation: an HTTP client, the check of each upload's sealed
seed before it is acknowledged (`TsaLink.vet`), and the background thread that unmasks closed
buffers in order and steps the model with them.

Vetting: the server folds only uploads whose sealed seed the TSA verified (it opens under its
lease id, and its seed, reserved to that id from then on, was never used or reserved by
another). A bad one is refused with 422 and the TSA's reason, costs only itself, and never
reaches a buffer, so it cannot make a step's request unanswerable. While the TSA is unreachable
uploads are answered 503 (Retry-After) and the clients re-send.

Crash-safety rule: a buffer's request is sent only once the buffer is closed in durable state
(else a crash could lose the upload that closed it, and the TSA would hold its step id and
contributions for a request the restarted server can no longer repeat),
and the step it yields is committed like any other (group commit). Whatever fails in between (the
TSA unreachable, a lost reply, either process killed) leaves the buffer closed and unstepped,
and the identical request goes again; the TSA answers an exact retry with its first answer. A
refusal of a step (fewer than K, a bad weight: a server or TSA misconfiguration, since every
folded upload was vetted) is shown in /status and retried after `REFUSED_WAIT`; the buffer
waits, nothing in it is dropped.
"""

from __future__ import annotations

import logging
import threading
from urllib.parse import unquote

import httpx

from asyncfl.secagg.crypto import to_base64
from asyncfl.secagg.messages import MaskedUpload, TsaRequest, TsaResponse, to_json
from asyncfl.server.durability import GroupCommit
from asyncfl.server.errors import ApiError
from asyncfl.server.shared import Shared
from asyncfl.server.tsa_buffer import MaskedFedBuff
from asyncfl.tsa.app import BINARY

log = logging.getLogger("asyncfl.server")
POLL, FIRST_RETRY, LONGEST_RETRY, REFUSED_WAIT = 0.02, 0.2, 5.0, 5.0


class TsaUnavailable(RuntimeError):
    """No usable answer (network error, 5xx, a malformed reply): retry the identical request."""


class TsaRefused(RuntimeError):
    """The TSA declined the request (4xx): `code` says why."""

    def __init__(self, status: int, code: str, detail: str):
        super().__init__(f"{status} {code}: {detail}")
        self.status, self.code, self.detail = status, code, detail


class TsaLink:
    def __init__(self, url: str, token: str, timeout: float = 60.0):
        self.http = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=timeout)

    def _post(self, path: str, body: dict, **kw) -> httpx.Response:
        """The TSA's 200 answer; raises TsaRefused (4xx) or TsaUnavailable."""
        try:
            resp = self.http.post(path, json=body, **kw)
        except httpx.HTTPError as err:
            raise TsaUnavailable(f"TSA unreachable: {err!r}") from None
        if 400 <= resp.status_code < 500:
            try:
                body = resp.json()
            except ValueError:
                body = {}
            raise TsaRefused(resp.status_code, str(body.get("error", "http")), str(body.get("detail", resp.text[:200])))
        if resp.status_code != 200:
            raise TsaUnavailable(f"TSA answered {resp.status_code}")
        return resp

    def vet(self, upload: MaskedUpload) -> ApiError | None:
        """Before the server folds `upload`: None once the TSA verified its sealed seed, else the
        422 refusal to answer with (the caller ends the lease and logs it); raises a 503 ApiError
        while the TSA cannot be asked (or refuses the server itself, a misconfiguration)."""
        try:
            self._post("/v1/verify", {"update_id": upload.update_id, "sealed_seed": to_base64(upload.sealed_seed)})
            return None
        except TsaRefused as refused:
            if refused.status == 422:
                return ApiError(422, refused.code, f"the TSA refused this upload's sealed seed: {refused.detail}")
            problem = str(refused)
        except TsaUnavailable as err:
            problem = str(err)
        log.warning("cannot verify an upload: %s", problem)
        raise ApiError(503, "tsa_unavailable", "the TSA cannot verify uploads now", {"Retry-After": "1"})

    def unmask(self, request: TsaRequest) -> TsaResponse:
        """The TSA's answer, as raw bytes (its length is checked against the buffer's when unmasking)."""
        resp = self._post("/v1/unmask", to_json(request), headers={"Accept": BINARY})
        if resp.headers.get("content-type") != BINARY:
            raise TsaUnavailable(f"TSA answered {resp.headers.get('content-type')!r}, not {BINARY}")
        response = TsaResponse(unquote(resp.headers.get("x-step-id", "")), resp.content)
        if response.step_id != request.step_id:
            raise TsaUnavailable(f"TSA answered step {response.step_id!r} for {request.step_id!r}")
        return response

    def close(self) -> None:
        self.http.close()


class Unmasker:
    """Takes the oldest closed buffer's request, asks the TSA, steps, commits; repeats."""

    def __init__(self, shared: Shared, commit: GroupCommit, link: TsaLink):
        self.shared, self.commit, self.link = shared, commit, link
        self.aggregator: MaskedFedBuff = shared.aggregation.aggregator
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def step_once(self) -> bool:
        """One attempt at the oldest closed buffer; True when it stepped (raises TsaUnavailable,
        TsaRefused, or ApiError when the commit failed)."""
        sh = self.shared
        with sh.lock:
            request = self.aggregator.pending_request()
            epoch = self.commit.epoch
        if request is None:
            return False
        self.commit.sync(epoch)  # the closed buffer is durable before the TSA hears of it
        try:
            response = self.link.unmask(request)
        except TsaRefused as refused:
            with sh.lock:
                self.aggregator.refusal = str(refused)
            raise
        with sh.lock:
            if self.aggregator.pending_request() != request:  # a rollback or restore replaced it meanwhile
                return False
            try:
                self.aggregator.accept(response)
            except ValueError as err:
                raise TsaUnavailable(f"TSA answer does not fit the buffer: {err}") from None
            self.aggregator.refusal = None
            stepped = sh.aggregation.flush()
            epoch = self.commit.epoch
        self.commit.sync(epoch)
        return stepped

    def run(self) -> None:
        wait = FIRST_RETRY
        while not self._stop.is_set():
            try:
                if self.step_once():
                    wait = FIRST_RETRY
                    continue
                self._stop.wait(POLL)
            except TsaUnavailable as err:
                log.warning("%s; retrying in %.1f s", err, wait)
                self._stop.wait(wait)
                wait = min(LONGEST_RETRY, 2 * wait)
            except TsaRefused as err:
                log.error("the TSA refused to unmask the oldest buffer: %s; it waits", err)
                self._stop.wait(REFUSED_WAIT)
            except ApiError as err:  # the commit failed and rolled back: the buffer is closed again
                log.warning("commit after unmasking failed (%s); retrying", err.detail)
                self._stop.wait(wait)
            except Exception:  # keep unmasking; the failure is logged
                log.exception("unmasking failed")
                self._stop.wait(LONGEST_RETRY)

    def start(self) -> None:
        self._thread = threading.Thread(target=self.run, name="asyncfl-unmasker", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        self.link.close()
