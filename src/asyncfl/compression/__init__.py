"""Update compression (SPEC §7): codecs to compact self-describing bytes, and error feedback."""

from asyncfl.compression.codecs import (
    HEADER_BYTES,
    Codec,
    Float16,
    Raw,
    StochasticQuantizer,
    TopK,
    decode,
    parse_codec,
)
from asyncfl.compression.error_feedback import ErrorFeedback

__all__ = [
    "HEADER_BYTES",
    "Codec",
    "ErrorFeedback",
    "Float16",
    "Raw",
    "StochasticQuantizer",
    "TopK",
    "decode",
    "parse_codec",
]
