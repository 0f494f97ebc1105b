"""The phase messages of a synchronous secure-aggregation round as the server receives them:
which message each phase takes, what each closed phase sends its participants, and the checks
a well-formed message must pass before it may enter the round (422 naming the problem)."""

from __future__ import annotations

from asyncfl.secagg import shamir
from asyncfl.secagg.crypto import KEY_BYTES, seal
from asyncfl.secagg.messages import AdvertiseKeys, KeyDirectory, MaskedInput, ShareKeys, UnmaskRequest, UnmaskResponse
from asyncfl.server.errors import ApiError

PHASES = ("advertise", "share_keys", "masked_input", "unmask")
MESSAGES = {"advertise": AdvertiseKeys, "share_keys": ShareKeys, "masked_input": MaskedInput, "unmask": UnmaskResponse}
# what a participant receives once a phase closed, by the phase it opens
REPLIES = ("directory", "incoming", "unmask_request")
SHARE_BYTES = len(shamir.split(bytes(KEY_BYTES), 1, [1])[1].to_bytes())
# a sealed pair of shares: sender and recipient ids, a share of the self-mask seed and one of the key
SHARE_CIPHERTEXT_BYTES = len(seal(bytes(KEY_BYTES), bytes(8 + 2 * SHARE_BYTES), b""))


def check(message, received: KeyDirectory | UnmaskRequest | None, max_weight: int, vector_bytes: int) -> None:
    """422 for a message that is well-formed JSON but cannot be right; `received` is what the
    sender got when the previous phase closed (its key directory, its unmask request)."""
    if isinstance(message, AdvertiseKeys):
        if len(message.cipher_key) != KEY_BYTES or len(message.mask_key) != KEY_BYTES:
            raise ApiError(422, "bad_key", f"public keys are {KEY_BYTES} bytes each")
    elif isinstance(message, ShareKeys):
        extra = sorted(set(message.ciphertexts) - set(received.cipher_keys))
        if extra:
            raise ApiError(422, "bad_recipient", f"shares for {extra}, who are not in this client's key directory")
        if any(len(c) != SHARE_CIPHERTEXT_BYTES for c in message.ciphertexts.values()):
            raise ApiError(422, "bad_ciphertext", f"each sealed share pair is {SHARE_CIPHERTEXT_BYTES} bytes")
    elif isinstance(message, MaskedInput):
        if not 1 <= message.weight <= max_weight:
            raise ApiError(
                422, "weight_out_of_range", f"weight {message.weight} outside 1..{max_weight} (max_examples)"
            )
        if len(message.masked) != vector_bytes:
            raise ApiError(422, "bad_length", f"masked input of {len(message.masked)} bytes; expected {vector_bytes}")
    else:
        if set(message.self_mask_shares) != set(received.survivors) or set(message.key_shares) != set(received.dropped):
            raise ApiError(
                422,
                "bad_shares",
                f"expected self-mask shares of {list(received.survivors)} and key shares of {list(received.dropped)}",
            )
        try:
            for share in [*message.self_mask_shares.values(), *message.key_shares.values()]:
                shamir.Share.from_bytes(share)
        except ValueError as err:
            raise ApiError(422, "bad_shares", f"unreadable share: {err}") from None
