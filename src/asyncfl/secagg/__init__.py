"""Secure aggregation, pure and runtime-agnostic: the server only ever sees sums of several updates.

`encoding` (fixed point into Z_(2^b)), `ring`, `prg` (masks from seeds), `shamir`, `crypto`
(X25519, HKDF, AES-GCM), `messages` (what a transport carries), synchronous SecAgg / SecAgg+
(`secagg_client`, `secagg_server`, `secagg_round` for an in-process round) and the asynchronous
trusted secure aggregator (`tsa`, `tsa_store`). The protocols are described in
docs/secure-aggregation.md.
"""

from asyncfl.secagg.encoding import FixedPointCodec, RingOverflowError
from asyncfl.secagg.ring import Ring
from asyncfl.secagg.secagg_client import ProtocolViolation, SecAggAbort, SecAggClient
from asyncfl.secagg.secagg_round import RoundResult, make_params, run_round
from asyncfl.secagg.secagg_server import SecAggResult, SecAggServer
from asyncfl.secagg.tsa import (
    MaskedBuffer,
    TooFewContributions,
    TrustedAggregator,
    UnauthenticatedContribution,
    WeightOutOfRange,
    mask_for_tsa,
)
from asyncfl.secagg.tsa_store import MemoryStore, ReplayedContribution, SqliteStore, TsaRefusal

__all__ = [
    "FixedPointCodec",
    "MaskedBuffer",
    "MemoryStore",
    "ProtocolViolation",
    "ReplayedContribution",
    "Ring",
    "RingOverflowError",
    "RoundResult",
    "SecAggAbort",
    "SecAggClient",
    "SecAggResult",
    "SecAggServer",
    "SqliteStore",
    "TooFewContributions",
    "TrustedAggregator",
    "TsaRefusal",
    "UnauthenticatedContribution",
    "WeightOutOfRange",
    "make_params",
    "mask_for_tsa",
    "run_round",
]
