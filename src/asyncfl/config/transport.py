"""Codecs for a run's transfers."""

from __future__ import annotations

from pydantic import Field, field_validator

from asyncfl.config.base import Strict


class CompressionConfig(Strict):
    """Codecs for a run's transfers (`asyncfl.compression.parse_codec` specs, e.g. ``fp16``,
    ``int8``, ``int4:chunk=256``, ``topk:0.1``, ``topk:0.1+int8``). With this section every
    transfer is charged the exact length of its encoded payload (8-byte header included; ``none``
    is raw float32), and transfer times use those bytes."""

    upload: str = Field(default="none", description="codec for client updates")
    download: str = Field(default="none", description="codec for the model sent to clients (no top-k)")
    error_feedback: bool = Field(
        default=False,
        description="keep what the upload codec dropped per device and add it to the device's next update",
    )

    @field_validator("upload", "download")
    @classmethod
    def _codec(cls, v: str, info):
        from asyncfl.compression import TopK, parse_codec

        codec = parse_codec(v)  # ValueError names the problem in the spec
        if info.field_name == "download" and isinstance(codec, TopK):
            raise ValueError("top-k would zero most of the model; use none, fp16 or intN for downloads")
        return v
