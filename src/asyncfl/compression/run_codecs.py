"""A run's transfer encodings, as its `compression:` section names them."""

from __future__ import annotations

from dataclasses import dataclass

from asyncfl.compression.codec import Codec

DENSE_BYTES_PER_FLOAT = 4  # float32 on the wire


@dataclass(frozen=True)
class RunCodecs:
    """Upload and download codecs (None: dense float32) and whether uploads use error feedback."""

    upload: Codec | None = None
    download: Codec | None = None
    error_feedback: bool = False

    def payload_bytes(self, numel: int) -> tuple[int, int]:
        """(download, upload) bytes of one model and one update of `numel` floats: exact and
        data independent, so a trip can be timed before anything is encoded."""
        dense = DENSE_BYTES_PER_FLOAT * numel
        return (
            self.download.bytes_for(numel) if self.download else dense,
            self.upload.bytes_for(numel) if self.upload else dense,
        )
