"""The TSA's state dir: its X25519 key pair and its store of used contributions.

The private key never leaves this directory (0700, the key file 0600): the FL server is given
the public key only. Key and store live together because an exact retry must get the exact
answer after a restart, which needs both the same private key and the same claims.
"""

from __future__ import annotations

import os
from pathlib import Path

from asyncfl.config import ConfigError
from asyncfl.secagg.crypto import KeyPair, to_base64
from asyncfl.secagg.tsa_store import SqliteStore

KEY_FILE, STORE_FILE = "tsa.key", "used.db"
PRIVATE_FILE, PRIVATE_DIR = 0o600, 0o700


def init_state(state_dir: str | Path) -> str:
    """Create the state dir with a fresh key pair; returns the public key (base64). Refuses to
    overwrite an existing key: a new key would orphan every seed sealed to the old one."""
    directory = Path(state_dir)
    directory.mkdir(mode=PRIVATE_DIR, parents=True, exist_ok=True)
    os.chmod(directory, PRIVATE_DIR)
    path = directory / KEY_FILE
    if path.exists():
        raise ConfigError(f"{path} exists: this state dir already has a key pair (public key {public_key(directory)})")
    key_pair = KeyPair()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, PRIVATE_FILE)
    with open(fd, "wb") as f:
        f.write(key_pair.private_bytes())
        f.flush()
        os.fsync(f.fileno())
    return to_base64(key_pair.public_bytes())


def load_key_pair(state_dir: str | Path) -> KeyPair:
    path = Path(state_dir) / KEY_FILE
    try:
        return KeyPair.from_private_bytes(path.read_bytes())
    except FileNotFoundError:
        raise ConfigError(
            f"{path} not found: create the key pair with `asyncfl tsa init --state {state_dir}`"
        ) from None


def public_key(state_dir: str | Path) -> str:
    return to_base64(load_key_pair(state_dir).public_bytes())


def open_store(state_dir: str | Path) -> SqliteStore:
    path = Path(state_dir) / STORE_FILE
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT, PRIVATE_FILE))
    return SqliteStore(path)
