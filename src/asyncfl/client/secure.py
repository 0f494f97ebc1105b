"""A client's part in a synchronous SecAgg / SecAgg+ round over HTTP (the server side is
asyncfl.server.secure_rounds, the endpoints asyncfl.server.secagg_http).

After training on its lease, the client joins the lease's round (its id and the round's
parameters), then for each phase sends its message and long-polls until the phase has closed
and brought what the next one needs: advertise keys -> key directory -> sealed shares ->
incoming shares -> masked input -> unmask request -> its shares -> the round's outcome. The
update is clipped to the round's coordinate range and encoded into the ring with stochastic
rounding seeded from the lease (as the simulator does); its integer weight is the example
count. FedNova's clients send their delta normalized by their local work, and that work. The round's secrets (key pairs, self-mask seed, the shares it holds) exist only in this
object's memory and go with it.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from asyncfl.algorithms.fednova import local_work
from asyncfl.client.http import ServerApi
from asyncfl.secagg import FixedPointCodec, ProtocolViolation, Ring, SecAggAbort, SecAggClient
from asyncfl.secagg.messages import IncomingShares, KeyDirectory, RoundParams, UnmaskRequest, from_json, to_json

POLL_WAIT = 10.0  # seconds the server may hold one poll
ROUNDING_STREAM = 0x5EC  # the encoding's rounding generator: (lease seed, this), as in the simulator


class SecureRound:
    def __init__(self, api: ServerApi, log: Callable[[str], None] = lambda s: None):
        self.api, self.log = api, log

    def contribute(self, lease: dict, values, n_examples: int, steps: int, extras: dict | None = None) -> dict:
        """Take part in the round of `lease` (a check-in answer) with the update `values`
        (floats) from `steps` local steps, and the algorithm's upload fields `extras`; returns
        the round's outcome as the server reports it, or the server's answer (with "http") to a
        request it refused."""
        lease_id = lease["lease_id"]
        view = self._poll(lease_id, None)
        if "outcome" in view or "http" in view:
            return view
        params = from_json(RoundParams, view["params"])
        number, enc = view["round"], view["encoding"]
        try:
            me = SecAggClient(params, view["client"])
            keys = me.advertise()
            sent = self._send(number, "advertise", lease_id, {"cipher_key": keys.cipher_key, "mask_key": keys.mask_key})
            view = sent or self._poll(lease_id, "advertise")
            if "directory" not in view:
                return view
            shares = me.share_keys(from_json(KeyDirectory, view["directory"]))
            sent = self._send(number, "shares", lease_id, {"ciphertexts": shares.ciphertexts})
            view = sent or self._poll(lease_id, "share_keys")
            if "incoming" not in view:
                return view
            codec = FixedPointCodec(enc["clip_range"], enc["max_total_weight"], Ring(params.bits))
            vector = secure_values(np.asarray(values, dtype=np.float64), steps, enc, extras)
            encoded = codec.encode(vector, np.random.default_rng((lease["seed"], ROUNDING_STREAM)))
            weight = 1 if enc["unit_weight"] else n_examples
            masked = me.masked_input(from_json(IncomingShares, view["incoming"]), encoded, weight)
            sent = self._send(number, "masked", lease_id, {"weight": masked.weight, "masked": masked.masked})
            view = sent or self._poll(lease_id, "masked_input")
            if "unmask_request" not in view:
                return view
            reply = me.unmask(from_json(UnmaskRequest, view["unmask_request"]))
            body = {"self_mask_shares": reply.self_mask_shares, "key_shares": reply.key_shares}
            return self._send(number, "unmask", lease_id, body) or self._poll(lease_id, "unmask", until_done=True)
        except (SecAggAbort, ProtocolViolation) as err:  # too few peers, or a request to reveal too much
            self.log(f"left secure round {number}: {err}")
            return {"outcome": {"status": "left", "detail": str(err)}}

    def _send(self, number: int, endpoint: str, lease_id: str, fields: dict) -> dict | None:
        """None once the server recorded the message, else its answer (with "http")."""
        body = {"lease_id": lease_id} | {k: to_json(v) for k, v in fields.items()}
        resp = self.api.request("POST", f"/v1/secagg/{number}/{endpoint}", json=body)
        if resp.status_code == 200:
            return None
        return _answer(resp)

    def _poll(self, lease_id: str, after: str | None, until_done: bool = False) -> dict:
        """The round as this lease sees it once it has moved past phase `after` (at once
        without); with `until_done`, once the round has ended."""
        while True:
            query = {"lease_id": lease_id, "wait": POLL_WAIT} | ({"after": after} if after else {})
            resp = self.api.request("GET", "/v1/secagg/round", params=query)
            if resp.status_code != 200:
                return _answer(resp)
            view = resp.json()
            if "outcome" in view or after is None:
                return view
            if view["phase"] != after and not until_done:
                return view


def secure_values(delta: np.ndarray, steps: int, encoding: dict, extras: dict | None = None) -> np.ndarray:
    """The vector a client encodes: its delta, followed by the algorithm's upload fields
    (SCAFFOLD's control delta); or for FedNova (`encoding["local_work"]`) its delta over its
    local work a, followed by a scaled into the clip range, so that the round's sum carries both
    sum_i n_i d_i / a_i and sum_i n_i a_i."""
    work = encoding.get("local_work")
    if work is None:
        fields = [np.asarray(extras[name], dtype=np.float64) for name in encoding["upload_fields"]]
        return np.concatenate([delta, *fields])
    counted = steps if work["max_steps"] is None else min(steps, work["max_steps"])
    a = local_work(max(1, counted), work["lr"], work["mu"])
    return np.append(delta / a, a * encoding["clip_range"] / work["scale"])


def _answer(resp) -> dict:
    try:
        body = resp.json()
    except ValueError:
        body = {"error": "http", "detail": resp.text[:200]}
    return body | {"http": resp.status_code}
