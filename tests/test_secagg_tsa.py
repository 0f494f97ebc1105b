"""The trusted secure aggregator: right mask sums, and every refusal it promises."""

import dataclasses

import numpy as np
import pytest

from asyncfl.secagg import (
    FixedPointCodec,
    MaskedBuffer,
    MemoryStore,
    ReplayedContribution,
    RingOverflowError,
    SqliteStore,
    TooFewContributions,
    TrustedAggregator,
    TsaRefusal,
    UnauthenticatedContribution,
    WeightOutOfRange,
    mask_for_tsa,
)
from asyncfl.secagg.crypto import KeyPair
from asyncfl.secagg.messages import TsaRequest
from asyncfl.secagg.tsa import seal_seed

LENGTH = 500
TASK = "digits-fedbuff"
CODEC = FixedPointCodec(clip_range=1.0, max_total_weight=40)


def _tsa(store=None, key_pair=None, noise_std=0.0):
    return TrustedAggregator(
        key_pair or KeyPair(),
        store or MemoryStore(),
        TASK,
        LENGTH,
        min_contributions=3,
        max_weight=8,
        noise_std=noise_std,
    )


def _buffer(tsa, count, seed=0, first_id=0):
    rng = np.random.default_rng(seed)
    buffer = MaskedBuffer(CODEC, LENGTH)
    plaintext = np.zeros(LENGTH)
    for i in range(count):
        update, weight = rng.normal(0, 0.5, LENGTH), 1 + i % 4
        buffer.fold(
            mask_for_tsa(CODEC.encode(update, rng), CODEC.ring, tsa.public_key, TASK, f"u{first_id + i}"), weight
        )
        plaintext += weight * np.clip(update, -1.0, 1.0)
    return buffer, plaintext


def test_the_returned_mask_sum_unmasks_the_weighted_sum():
    tsa = _tsa()
    buffer, plaintext = _buffer(tsa, 5)
    request = buffer.request("step-1")
    masked_only = CODEC.decode(buffer.total, buffer.total_weight)
    assert np.abs(masked_only - plaintext).max() > 1.0  # the buffer alone is noise
    response = tsa.unmask(request)
    decoded = buffer.unmask(response)
    assert np.abs(decoded - plaintext).max() <= CODEC.error_bound(buffer.total_weight)
    with pytest.raises(ValueError, match="requested"):
        buffer.unmask(dataclasses.replace(response, step_id="step-0"))


def test_fewer_than_k_contributions_are_refused():
    tsa = _tsa()
    buffer, _ = _buffer(tsa, 2)
    with pytest.raises(TooFewContributions, match="2 distinct contributions, at least 3"):
        tsa.unmask(buffer.request("step-1"))
    duplicated = TsaRequest("step-2", LENGTH, buffer.contributions + buffer.contributions[:1])
    with pytest.raises(ReplayedContribution, match="twice"):
        tsa.unmask(duplicated)


def test_a_used_id_or_seed_is_refused_and_an_exact_retry_gets_the_same_answer():
    tsa = _tsa()
    buffer, _ = _buffer(tsa, 4)
    request = buffer.request("step-1")
    first = tsa.unmask(request)
    assert tsa.unmask(request) == first  # a retry after a lost reply reveals nothing new
    with pytest.raises(ReplayedContribution, match="used before"):
        tsa.unmask(TsaRequest("step-2", LENGTH, request.contributions[:3]))
    with pytest.raises(ReplayedContribution, match="different request"):
        tsa.unmask(TsaRequest("step-1", LENGTH, request.contributions[:3]))
    other, _ = _buffer(tsa, 3, seed=1, first_id=10)
    reused_seed = bytes(range(32))
    forged_reuse = [
        dataclasses.replace(c, sealed_seed=seal_seed(reused_seed, tsa.public_key, TASK, c.update_id))
        for c in other.contributions
    ]
    with pytest.raises(ReplayedContribution, match="seed twice"):
        tsa.unmask(TsaRequest("step-3", LENGTH, tuple(forged_reuse)))


def test_replays_are_refused_after_a_restart_with_the_durable_store(tmp_path):
    key_pair = KeyPair()
    store = SqliteStore(tmp_path / "tsa.sqlite")
    tsa = _tsa(store, key_pair, noise_std=50.0)
    buffer, _ = _buffer(tsa, 3)
    request = buffer.request("step-1")
    answer = tsa.unmask(request)
    store.close()
    restarted = _tsa(SqliteStore(tmp_path / "tsa.sqlite"), key_pair, noise_std=50.0)
    with pytest.raises(ReplayedContribution):
        restarted.unmask(TsaRequest("step-2", LENGTH, request.contributions))
    assert restarted.unmask(request) == answer  # same noise too: no second draw to average out


def test_a_forged_id_or_tampered_ciphertext_is_refused_and_claims_nothing():
    tsa = _tsa()
    buffer, _ = _buffer(tsa, 3)
    honest = buffer.contributions
    forged = dataclasses.replace(honest[0], update_id="someone-else")
    with pytest.raises(UnauthenticatedContribution, match="someone-else"):
        tsa.unmask(TsaRequest("step-1", LENGTH, (forged, *honest[1:])))
    sealed = bytearray(honest[1].sealed_seed)
    sealed[40] ^= 1
    tampered = dataclasses.replace(honest[1], sealed_seed=bytes(sealed))
    with pytest.raises(UnauthenticatedContribution, match="u1"):
        tsa.unmask(TsaRequest("step-2", LENGTH, (honest[0], tampered, honest[2])))
    other_tsa = _tsa()
    with pytest.raises(UnauthenticatedContribution):
        other_tsa.unmask(buffer.request("step-3"))  # sealed to another TSA's key
    tsa.unmask(buffer.request("step-4"))  # refused requests claimed nothing


@pytest.mark.parametrize("weight", [0, 9, -1, True, 2.0])
def test_a_weight_out_of_range_is_refused(weight):
    tsa = _tsa()
    buffer, _ = _buffer(tsa, 3)
    contributions = (dataclasses.replace(buffer.contributions[0], weight=weight), *buffer.contributions[1:])
    with pytest.raises(WeightOutOfRange, match="allowed 1..8"):
        tsa.unmask(TsaRequest("step-1", LENGTH, contributions))
    assert issubclass(WeightOutOfRange, TsaRefusal)


def test_a_request_for_another_length_is_refused():
    tsa = _tsa()
    buffer, _ = _buffer(tsa, 3)
    with pytest.raises(TsaRefusal, match="coordinates"):
        tsa.unmask(TsaRequest("step-1", LENGTH - 1, buffer.contributions))


def test_dp_noise_reaches_the_unmasked_sum_with_the_right_spread():
    noise_std = 0.05  # in units of the decoded weighted sum
    tsa = _tsa(noise_std=CODEC.noise_std_in_ring(noise_std))
    buffer, plaintext = _buffer(tsa, 4)
    request = buffer.request("step-1")
    noisy = buffer.unmask(tsa.unmask(request))
    noise = noisy - plaintext
    assert abs(noise.mean()) < 4 * noise_std / np.sqrt(LENGTH)
    assert noise.std() == pytest.approx(noise_std, rel=0.15)


def test_the_buffer_refuses_a_fold_that_could_wrap():
    tsa = _tsa()
    buffer, _ = _buffer(tsa, 3)  # weights 1, 2, 3
    upload = mask_for_tsa(CODEC.ring.zeros(LENGTH), CODEC.ring, tsa.public_key, TASK, "big")
    with pytest.raises(RingOverflowError):
        buffer.fold(upload, 35)
    buffer.fold(upload, 34)
    assert buffer.total_weight == 40
    with pytest.raises(ValueError, match="already"):
        buffer.fold(upload, 1)
