"""Update compression: codecs to compact self-describing bytes, and error feedback.

One module per codec (`raw`, `fp16`, `quantize`, `topk`), each encoding and decoding its own
payloads; `frame` holds the header they share, `codec` the interface and `decode`, `spec` the
spec strings, `error_feedback` the residual store and the upload step that uses it.
"""

from asyncfl.compression.codec import Codec, decode
from asyncfl.compression.error_feedback import ErrorFeedback, Upload, encode_upload
from asyncfl.compression.fp16 import Float16
from asyncfl.compression.frame import HEADER_BYTES
from asyncfl.compression.quantize import StochasticQuantizer
from asyncfl.compression.raw import Raw
from asyncfl.compression.spec import parse_codec
from asyncfl.compression.topk import TopK

__all__ = [
    "HEADER_BYTES",
    "Codec",
    "ErrorFeedback",
    "Float16",
    "Raw",
    "StochasticQuantizer",
    "TopK",
    "Upload",
    "decode",
    "encode_upload",
    "parse_codec",
]
