"""Client tokens of the cluster, and a selector's view of them.

A cluster client token is signed, so a selector verifies it without the database:

    afl_1.<key id>.<issued, microseconds since the epoch>.<client>.<task>.<tag>

client and task are unpadded URL-safe base64 of their UTF-8, the tag is HMAC-SHA256 over
everything before its dot under the signing key `key id` (table `signing_keys`, 32 random
bytes; generated at `db migrate` or the first mint; several may be live, so keys rotate without
refusing tokens already out). Revoking a client refuses its tokens issued until then (table
`revocations`, which every selector follows as it follows leases; the set is small). The token's
hash is stored too, as for every token, so listing and revoking stay the same. Tokens minted
before signing existed (and operator tokens, and any too long to sign) are random and looked up
in PostgreSQL by hash, remembered for a few seconds.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets
import threading
import time

import psycopg

from asyncfl.cluster.pgpool import Pool
from asyncfl.server.auth import CLIENT, TOKEN_PREFIX, new_token
from asyncfl.server.store import hash_token

SIGNED_PREFIX = TOKEN_PREFIX + "1."
MAX_TOKEN_CHARS = 256  # what the authenticator looks at; a longer token is refused unread
TOKEN_TTL_S, UNKNOWN_TOKEN_TTL_S = 5.0, 1.0  # random tokens: how long a lookup is remembered
TOKENS_CACHED = 100_000
KEY_RELOAD_S = 1.0  # an unknown key id reloads the keys at most this often (forged ids cost little)
_NOW_US = "(extract(epoch FROM clock_timestamp()) * 1000000)::bigint"


class NeedsDatabase(Exception):
    """The answer needs a database round trip (a random token not remembered, an unknown key)."""


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def _unb64(text: str) -> str:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)).decode()


def _tag(secret: bytes, body: str) -> str:
    return _b64(hmac.new(secret, body.encode(), hashlib.sha256).digest())


def sign(key_id: int, secret: bytes, client: str, task: str, issued_us: int) -> str | None:
    """The signed token, or None when it would exceed MAX_TOKEN_CHARS (long names)."""
    body = f"{SIGNED_PREFIX}{key_id}.{issued_us}.{_b64(client.encode())}.{_b64(task.encode())}"
    token = f"{body}.{_tag(secret, body)}"
    return token if len(token) <= MAX_TOKEN_CHARS else None


def signed_key_id(token: str) -> int | None:
    """The key id of a token in the signed format (None: a random token)."""
    if not token.startswith(SIGNED_PREFIX):
        return None
    head = token[len(SIGNED_PREFIX) : len(SIGNED_PREFIX) + 12].partition(".")[0]
    return int(head) if head.isascii() and head.isdigit() else -1


def verify(token: str, secret: bytes) -> tuple[str, str, int] | None:
    """(client, task, issued_us) of a signed token whose tag `secret` confirms, else None."""
    body, _, tag = token.rpartition(".")
    if not hmac.compare_digest(tag.encode(), _tag(secret, body).encode()):
        return None
    try:
        _, issued, client, task = body[len(SIGNED_PREFIX) :].split(".")
        return _unb64(client), _unb64(task), int(issued)
    except (ValueError, binascii.Error):  # UnicodeDecodeError is a ValueError
        return None


# ---- the database side (minting, keys, revocation) -------------------------------------------
def signing_key(conn: psycopg.Connection) -> tuple[int, bytes]:
    """The newest live key, generated when there is none."""
    row = conn.execute(
        "SELECT key_id, secret FROM signing_keys WHERE NOT retired ORDER BY key_id DESC LIMIT 1"
    ).fetchone()
    if row is None:
        add_signing_key(conn)
        return signing_key(conn)
    return row[0], bytes(row[1])


def add_signing_key(conn: psycopg.Connection) -> None:
    """A new newest key: tokens minted from now on use it, those out keep working."""
    conn.execute(  # two at once: one waits for the other's id and adds nothing
        "INSERT INTO signing_keys(key_id, secret) SELECT coalesce(max(key_id), 0) + 1, %s FROM signing_keys "
        "ON CONFLICT DO NOTHING",
        (secrets.token_bytes(32),),
    )


def retire_signing_keys(conn: psycopg.Connection) -> int:
    """Retire every key but the newest: the tokens they signed are refused from now on."""
    return conn.execute(
        "UPDATE signing_keys SET retired = true WHERE NOT retired AND key_id < (SELECT max(key_id) FROM signing_keys)"
    ).rowcount


def mint(conn: psycopg.Connection, clients: list[str], task: str) -> list[str]:
    """Signed client tokens (random ones for names too long to sign), issued now by the database's clock."""
    key_id, secret = signing_key(conn)
    issued_us = conn.execute(f"SELECT {_NOW_US}").fetchone()[0]
    return [sign(key_id, secret, client, task, issued_us) or new_token() for client in clients]


def revoke_client(conn: psycopg.Connection, client: str) -> int:
    """Refuse every token of `client` issued until now; the number of its stored tokens revoked."""
    with conn.transaction():
        conn.execute(
            f"INSERT INTO revocations(client, revoked_us) VALUES (%s, {_NOW_US}) ON CONFLICT (client) DO UPDATE "
            "SET revoked_us = EXCLUDED.revoked_us, change = nextval('revocation_changes')",
            (client,),
        )
        return conn.execute("UPDATE tokens SET revoked = true WHERE client = %s AND NOT revoked", (client,)).rowcount


class InMemory:
    """A TokenCache as a store that never queries: NeedsDatabase instead."""

    def __init__(self, cache: TokenCache):
        self.lookup_token = cache.in_memory


# ---- a selector's view -------------------------------------------------------------------------
class TokenCache:
    """Store's `lookup_token` for a selector: signed tokens checked in memory against the keys
    and revocations (loaded at start, followed by `follow`), random ones looked up in PostgreSQL
    and remembered for a few seconds (a revocation of those holds within TOKEN_TTL_S)."""

    def __init__(self, pool: Pool):
        self.pool = pool
        self.keys: dict[int, bytes] = {}
        self.revoked: dict[str, int] = {}  # client -> revoked_us
        self._entries: dict[tuple[str, str], tuple[tuple[str, str] | None, float]] = {}
        self._lock = threading.Lock()
        self._cursor, self._keys_loaded = 0, -KEY_RELOAD_S

    def in_memory(self, token: str, role: str = CLIENT) -> tuple[str, str] | None:
        """`lookup_token` from memory alone; NeedsDatabase when that is not enough."""
        key_id = signed_key_id(token)
        if key_id is not None:
            if key_id < 0:  # malformed: no key can verify it
                return None
            secret = self.keys.get(key_id)
            if secret is None:
                raise NeedsDatabase
            return self._judge(token, secret, role)
        hit = self._entries.get((hash_token(token), role))
        if hit is None or hit[1] <= time.monotonic():
            raise NeedsDatabase
        return hit[0]

    def lookup_token(self, token: str, role: str = CLIENT) -> tuple[str, str] | None:
        try:
            return self.in_memory(token, role)
        except NeedsDatabase:
            pass
        key_id = signed_key_id(token)
        if key_id is not None:
            self._reload_keys()
            secret = self.keys.get(key_id)
            return None if secret is None else self._judge(token, secret, role)
        key, now = (hash_token(token), role), time.monotonic()
        with self.pool.connection() as conn:
            row = conn.execute(
                "SELECT client, task FROM tokens WHERE hash=%s AND role=%s AND NOT revoked", key
            ).fetchone()
        found = None if row is None else (row[0], row[1])
        with self._lock:
            if len(self._entries) >= TOKENS_CACHED:
                self._entries.clear()
            self._entries[key] = (found, now + (TOKEN_TTL_S if found else UNKNOWN_TOKEN_TTL_S))
        return found

    def _judge(self, token: str, secret: bytes, role: str) -> tuple[str, str] | None:
        claims = verify(token, secret)
        if claims is None or role != CLIENT:  # signed tokens are client tokens
            return None
        client, task, issued_us = claims
        if issued_us <= self.revoked.get(client, -1):
            return None
        return client, task

    def _reload_keys(self) -> None:
        with self._lock:
            if time.monotonic() - self._keys_loaded < KEY_RELOAD_S:
                return
            self._keys_loaded = time.monotonic()
        with self.pool.connection() as conn:
            self._load_keys(conn)

    def _load_keys(self, conn: psycopg.Connection) -> None:
        rows = conn.execute("SELECT key_id, secret FROM signing_keys WHERE NOT retired").fetchall()
        self.keys = {key_id: bytes(secret) for key_id, secret in rows}

    def follow(self, conn: psycopg.Connection, resync: bool) -> None:
        """Revocations since the last call (all of them, and the keys, when `resync`: sequence
        numbers may commit out of order)."""
        if resync:
            self._load_keys(conn)
        rows = conn.execute(
            "SELECT client, revoked_us, change FROM revocations WHERE change > %s ORDER BY change",
            (0 if resync else self._cursor,),
        ).fetchall()
        if not rows and not resync:
            return
        revoked = {} if resync else dict(self.revoked)  # replaced whole: readers never lock
        for client, revoked_us, change in rows:
            revoked[client] = revoked_us
            self._cursor = max(self._cursor, change)
        self.revoked = revoked
