"""Shamir sharing, the key agreement and AEAD wrappers, and the JSON form of the messages."""

import itertools
import json
import os

import pytest

from asyncfl.secagg import crypto, shamir
from asyncfl.secagg.messages import (
    KeyDirectory,
    MaskedInput,
    TsaContribution,
    TsaRequest,
    UnmaskRequest,
    UnmaskResponse,
    from_json,
    to_json,
    wire_bytes,
)


@pytest.mark.parametrize("trial", range(5))
def test_any_t_of_n_shares_rebuild_a_random_secret_and_t_minus_1_do_not(trial):
    secret = os.urandom(32)
    points = [3, 4, 7, 9, 12, 20]
    shares = shamir.split(secret, 4, points)
    for subset in itertools.combinations(points, 4):
        assert shamir.combine([shares[x] for x in subset], 4) == secret
    assert shamir.combine(shares.values(), 4) == secret
    for subset in itertools.combinations(points, 3):
        with pytest.raises(shamir.NotEnoughShares):
            shamir.combine([shares[x] for x in subset], 4)


def test_secrets_keep_leading_zero_bytes_and_shares_are_fresh():
    secret = bytes(5) + b"\x01" + bytes(26)
    first, second = shamir.split(secret, 2, [1, 2, 3]), shamir.split(secret, 2, [1, 2, 3])
    assert first[1].y != second[1].y  # fresh random coefficients each time
    assert shamir.combine([first[1], first[3]], 2) == secret


def test_threshold_minus_one_shares_are_consistent_with_every_secret():
    """With t - 1 = 1 share, each candidate secret has its own polynomial through it: nothing leaks."""
    share = shamir.split(b"\x2a" * 32, 2, [1, 2])[1]
    for candidate in (b"\x00" * 32, b"\xff" * 32):
        fake_other = shamir.Share(2, (2 * share.y - int.from_bytes(candidate, "big")) % shamir.PRIME, 32)
        assert shamir.combine([share, fake_other], 2) == candidate


def test_inconsistent_or_malformed_shares_are_refused():
    shares = shamir.split(os.urandom(32), 3, [1, 2, 3, 4])
    corrupted = shamir.Share(4, (shares[4].y + 1) % shamir.PRIME, 32)
    with pytest.raises(shamir.InconsistentShares):
        shamir.combine([shares[1], shares[2], shares[3], corrupted], 3)
    with pytest.raises(shamir.InconsistentShares):
        shamir.combine([shares[1], shares[1], shares[2]], 3)
    assert shamir.Share.from_bytes(shares[2].to_bytes()) == shares[2]
    with pytest.raises(shamir.InconsistentShares):
        shamir.Share.from_bytes(shares[2].to_bytes()[:-1])
    with pytest.raises(ValueError):
        shamir.split(b"x" * 65, 2, [1, 2])
    with pytest.raises(ValueError):
        shamir.split(b"x", 3, [1, 2])


def test_key_agreement_is_symmetric_and_purpose_bound():
    alice, bob = crypto.KeyPair(), crypto.KeyPair()
    assert alice.derive(bob.public_bytes(), b"a") == bob.derive(alice.public_bytes(), b"a")
    assert alice.derive(bob.public_bytes(), b"a") != alice.derive(bob.public_bytes(), b"b")
    restored = crypto.KeyPair.from_private_bytes(alice.private_bytes())
    assert restored.public_bytes() == alice.public_bytes()


def test_aead_refuses_tampering_and_other_associated_data():
    key = os.urandom(32)
    sealed = crypto.seal(key, b"seed", b"round 1")
    assert crypto.unseal(key, sealed, b"round 1") == b"seed"
    with pytest.raises(crypto.AuthenticationError):
        crypto.unseal(key, sealed, b"round 2")
    with pytest.raises(crypto.AuthenticationError):
        crypto.unseal(key, sealed[:-1] + bytes([sealed[-1] ^ 1]), b"round 1")
    recipient = crypto.KeyPair()
    to_recipient = crypto.seal_to(recipient.public_bytes(), b"seed", b"lease 7", b"info")
    assert crypto.unseal_by(recipient, to_recipient, b"lease 7", b"info") == b"seed"
    with pytest.raises(crypto.AuthenticationError):
        crypto.unseal_by(crypto.KeyPair(), to_recipient, b"lease 7", b"info")
    with pytest.raises(crypto.AuthenticationError):
        crypto.unseal_by(recipient, to_recipient, b"lease 8", b"info")
    assert crypto.from_base64(crypto.to_base64(to_recipient)) == to_recipient


def test_messages_round_trip_through_json():
    messages = [
        (KeyDirectory, KeyDirectory({1: b"a" * 32, 5: b"b" * 32}, {1: b"c" * 32, 5: b"d" * 32})),
        (MaskedInput, MaskedInput(3, 7, os.urandom(40))),
        (UnmaskRequest, UnmaskRequest((1, 2), (4,))),
        (UnmaskResponse, UnmaskResponse(2, {1: b"x"}, {4: b"y"})),
        (TsaRequest, TsaRequest("step-1", 10, (TsaContribution("u1", 2, b"s1"), TsaContribution("u2", 1, b"s2")))),
    ]
    for cls, message in messages:
        assert from_json(cls, json.loads(json.dumps(to_json(message)))) == message
    assert wire_bytes(MaskedInput(3, 7, bytes(40))) == 48
    with pytest.raises(ValueError, match="malformed"):
        from_json(MaskedInput, {"client": 3, "weight": 7})
    with pytest.raises(ValueError):
        from_json(MaskedInput, {"client": "3", "weight": 7, "masked": ""})
