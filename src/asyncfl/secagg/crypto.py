"""X25519 key agreement, HKDF and AES-256-GCM from pyca/cryptography, in the shapes both protocols use.

Nothing here is a primitive of our own: keys are X25519, shared secrets go through HKDF-SHA256
with an `info` string naming their purpose (so a mask seed and an encryption key derived from
one exchange are independent), and encryption is AES-256-GCM with associated data that binds a
ciphertext to its round, sender and recipient (or lease and task): a ciphertext replayed under
another id fails authentication instead of being accepted. `seal_to` / `unseal_by` encrypt to
a public key alone (an ephemeral X25519 key per message), which is how a client sends its seed
to the TSA.
"""

from __future__ import annotations

import base64
import os

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

KEY_BYTES = 32
NONCE_BYTES = 12
_RAW = {"encoding": serialization.Encoding.Raw, "format": serialization.PublicFormat.Raw}


class AuthenticationError(ValueError):
    """A ciphertext failed authentication: tampered, truncated, or bound to other associated data."""


class KeyPair:
    """An X25519 key pair; `private_bytes` exists because SecAgg secret-shares the masking key."""

    def __init__(self, private_key: X25519PrivateKey | None = None) -> None:
        self._private = private_key or X25519PrivateKey.generate()

    @classmethod
    def from_private_bytes(cls, data: bytes) -> KeyPair:
        if len(data) != KEY_BYTES:
            raise ValueError(f"an X25519 private key is {KEY_BYTES} bytes, got {len(data)}")
        return cls(X25519PrivateKey.from_private_bytes(data))

    def private_bytes(self) -> bytes:
        return self._private.private_bytes(
            serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
        )

    def public_bytes(self) -> bytes:
        return self._private.public_key().public_bytes(**_RAW)

    def derive(self, peer_public: bytes, info: bytes) -> bytes:
        """A 32-byte key for `info` from X25519 with the peer's public key, through HKDF-SHA256."""
        return hkdf(self._private.exchange(_public_key(peer_public)), info)


def hkdf(secret: bytes, info: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=None, info=info).derive(secret)


def seal(key: bytes, plaintext: bytes, associated_data: bytes) -> bytes:
    """AES-256-GCM under a fresh random nonce; returns nonce || ciphertext || tag."""
    nonce = os.urandom(NONCE_BYTES)
    return nonce + AESGCM(key).encrypt(nonce, plaintext, associated_data)


def unseal(key: bytes, sealed: bytes, associated_data: bytes) -> bytes:
    """Inverse of `seal`; raises `AuthenticationError` on any mismatch."""
    try:
        return AESGCM(key).decrypt(sealed[:NONCE_BYTES], sealed[NONCE_BYTES:], associated_data)
    except (InvalidTag, ValueError) as error:
        raise AuthenticationError("ciphertext failed authentication") from error


def seal_to(recipient_public: bytes, plaintext: bytes, associated_data: bytes, info: bytes) -> bytes:
    """Encrypt to a public key: ephemeral public key (32 bytes) || `seal` under the derived key."""
    ephemeral = KeyPair()
    key = ephemeral.derive(recipient_public, info + ephemeral.public_bytes() + recipient_public)
    return ephemeral.public_bytes() + seal(key, plaintext, associated_data)


def unseal_by(recipient: KeyPair, sealed: bytes, associated_data: bytes, info: bytes) -> bytes:
    """Inverse of `seal_to` with the recipient's key pair; raises `AuthenticationError`."""
    if len(sealed) < KEY_BYTES + NONCE_BYTES:
        raise AuthenticationError("ciphertext too short")
    ephemeral_public = sealed[:KEY_BYTES]
    try:
        key = recipient.derive(ephemeral_public, info + ephemeral_public + recipient.public_bytes())
    except ValueError as error:  # a low-order point gives an all-zero secret, which X25519 rejects
        raise AuthenticationError("invalid ephemeral key") from error
    return unseal(key, sealed[KEY_BYTES:], associated_data)


def to_base64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def from_base64(text: str) -> bytes:
    return base64.b64decode(text.encode("ascii"), validate=True)


def _public_key(data: bytes) -> X25519PublicKey:
    if len(data) != KEY_BYTES:
        raise ValueError(f"an X25519 public key is {KEY_BYTES} bytes, got {len(data)}")
    return X25519PublicKey.from_public_bytes(data)
