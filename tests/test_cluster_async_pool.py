"""The selector's event-loop connections: a claim waits for a free one at most `wait_s`, then
gets 503 with Retry-After; the connection comes back for the next claim."""

import asyncio

import pytest

from asyncfl.cluster.async_pool import AsyncPool
from asyncfl.server.errors import ApiError


def test_every_connection_busy_is_a_503_and_the_connection_serves_again(pg_url):
    async def scenario():
        pool = AsyncPool(pg_url, size=1, wait_s=0.2)
        try:
            async with pool.connection() as held:
                with pytest.raises(ApiError) as refused:
                    async with pool.connection():
                        pass
                assert refused.value.status == 503 and "Retry-After" in refused.value.headers
                assert "all connections busy" in refused.value.detail
                assert (await (await held.execute("SELECT 1")).fetchone()) == (1,)
            async with pool.connection() as again:  # the same connection, handed back
                assert again is held
        finally:
            await pool.close()

    asyncio.run(scenario())
