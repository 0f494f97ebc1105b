"""Pseudorandom ring vectors from a 32-byte seed: the masks of both protocols.

A mask must be reproducible by whoever holds the seed (the server after reconstruction, the TSA
after decryption) and indistinguishable from uniform without it. The keystream of AES-256 in CTR
mode under the seed (fixed zero nonce: each seed keys exactly one stream) is cut into 4-byte
(b <= 32) or 8-byte words, reduced modulo 2^b; 2^b divides the word range, so every element is
uniform on the ring. The same stream also yields Gaussian noise for the TSA, so that noise comes
from a cryptographic generator rather than a statistical one.
"""

from __future__ import annotations

import math

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from asyncfl.secagg.ring import Ring

SEED_BYTES = 32
_ZERO_NONCE = bytes(16)


def keystream(seed: bytes, nbytes: int) -> bytes:
    """`nbytes` of AES-256-CTR keystream under `seed`."""
    if len(seed) != SEED_BYTES:
        raise ValueError(f"a PRG seed is {SEED_BYTES} bytes, got {len(seed)}")
    encryptor = Cipher(algorithms.AES(seed), modes.CTR(_ZERO_NONCE)).encryptor()
    return encryptor.update(bytes(nbytes)) + encryptor.finalize()


def mask(seed: bytes, length: int, ring: Ring) -> np.ndarray:
    """`length` uniform elements of `ring` expanded from `seed`."""
    word = np.dtype("<u4") if ring.bits <= 32 else np.dtype("<u8")
    words = np.frombuffer(keystream(seed, length * word.itemsize), dtype=word)
    return ring.reduce(words)


def gaussian(seed: bytes, length: int, std: float) -> np.ndarray:
    """`length` samples of N(0, std^2) (Box-Muller over 53-bit uniforms from the keystream)."""
    if not (math.isfinite(std) and std >= 0):
        raise ValueError(f"noise std must be a finite number >= 0, got {std}")
    words = np.frombuffer(keystream(seed, 16 * length), dtype="<u8").reshape(2, length) >> np.uint64(11)
    radius_uniform = (words[0].astype(np.float64) + 1.0) * 2.0**-53  # in (0, 1]: log is finite
    angle_uniform = words[1].astype(np.float64) * 2.0**-53
    return std * np.sqrt(-2.0 * np.log(radius_uniform)) * np.cos(2.0 * np.pi * angle_uniform)
