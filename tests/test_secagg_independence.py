"""What the server holds for one update is statistically independent of that update.

Two very different updates (every coordinate at -r versus +r) are masked many times; a
two-sample Kolmogorov-Smirnov test cannot tell the masked uploads apart, while the same test
separates the unmasked encodings at once. Under independence the p-value is uniform, so the
threshold 1e-4 makes a false failure a 1-in-10,000 event.
"""

import numpy as np
from scipy import stats

from asyncfl.secagg import FixedPointCodec, SecAggClient, SecAggServer
from asyncfl.secagg.crypto import KeyPair
from asyncfl.secagg.secagg_round import make_params
from asyncfl.secagg.tsa import mask_for_tsa

CODEC = FixedPointCodec(clip_range=1.0, max_total_weight=100)
LENGTH, TRIALS = 64, 150


def _distinguishable(samples_a, samples_b) -> bool:
    return stats.ks_2samp(np.concatenate(samples_a), np.concatenate(samples_b)).pvalue < 1e-4


def _tsa_upload(update, rng, tsa_key):
    upload = mask_for_tsa(CODEC.encode(update, rng), CODEC.ring, tsa_key, "task", "u")
    return CODEC.ring.from_bytes(upload.masked).astype(np.float64)


def _secagg_masked_input(update, rng):
    params = make_params(3, 2, None, LENGTH)
    server = SecAggServer(params)
    clients = [SecAggClient(params, c) for c in range(3)]
    directories = server.collect_keys(c.advertise() for c in clients)
    incoming = server.route_shares(c.share_keys(directories[c.client]) for c in clients)
    masked = clients[0].masked_input(incoming[0], CODEC.encode(update, rng), 3)
    return CODEC.ring.from_bytes(masked.masked).astype(np.float64)


def test_masked_uploads_do_not_depend_on_the_update():
    rng = np.random.default_rng(0)
    low, high = np.full(LENGTH, -1.0), np.full(LENGTH, 1.0)
    tsa_key = KeyPair().public_bytes()
    for mask in (lambda u: _tsa_upload(u, rng, tsa_key), lambda u: _secagg_masked_input(u, rng)):
        masked_low = [mask(low) for _ in range(TRIALS)]
        masked_high = [mask(high) for _ in range(TRIALS)]
        assert not _distinguishable(masked_low, masked_high)
        assert abs(np.mean(masked_low) / 2**32 - 0.5) < 0.02  # uniform over the ring (7 standard errors)
    plain_low = [CODEC.encode(low, rng).astype(np.float64) for _ in range(TRIALS)]
    plain_high = [CODEC.encode(high, rng).astype(np.float64) for _ in range(TRIALS)]
    assert _distinguishable(plain_low, plain_high)
