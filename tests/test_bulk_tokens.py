"""Tokens for a whole fleet minted at once (the scale benchmark's 10^5 devices): each one
authenticates its own client, in SQLite and in PostgreSQL."""

from cluster_helpers import FEDBUFF, experiment

from asyncfl.cluster.members import session
from asyncfl.cluster.pgpool import Pool
from asyncfl.cluster.selector import TokenCache
from asyncfl.cluster.tasks import add_task, create_tokens
from asyncfl.server.store import Store
from asyncfl.server.testing import mint_tokens


def test_sqlite_fleet_tokens_each_name_their_client(tmp_path):
    clients = [f"d{i}" for i in range(2000)]
    tokens = mint_tokens(tmp_path, "task1", clients)
    assert len(set(tokens)) == len(clients)
    store = Store(tmp_path)
    try:
        assert [store.lookup_token(tokens[i]) for i in (0, 1234, 1999)] == [
            ("d0", "task1"),
            ("d1234", "task1"),
            ("d1999", "task1"),
        ]
        assert store.lookup_token(tokens[5], "operator") is None
        assert len(store.list_tokens()) == len(clients)
    finally:
        store.close()


def test_postgres_fleet_tokens_each_name_their_client(pg_url):
    clients = [f"d{i}" for i in range(2000)]
    with session(pg_url) as conn:
        add_task(conn, experiment(FEDBUFF))
        tokens = create_tokens(conn, clients, "fedbuff")
        (count,) = conn.execute("SELECT count(*) FROM tokens WHERE role = 'client'").fetchone()
    assert count == len(clients) == len(set(tokens))
    pool = Pool(pg_url, 1)
    try:
        cache = TokenCache(pool)
        assert [cache.lookup_token(tokens[i]) for i in (0, 1999)] == [("d0", "fedbuff"), ("d1999", "fedbuff")]
        assert cache.lookup_token("afl_not-a-token") is None
    finally:
        pool.close()
