-- A selector's claims for one task in one statement: asyncfl_claim for each client in turn, in
-- one transaction. Every claim locks the task's row (it counts the trip), so claims sent on
-- separate connections queued on that lock, each holding it through its own commit; a batch
-- takes it once and commits once for all the claims that arrived while the previous batch was
-- in flight. claim_index: the client's position in p_clients (from 1). Two selectors leasing
-- to one client: the second's batch fails on leases_one_active, and the caller sends it again
-- (the first's lease is committed by then, and the claim finds it).
CREATE FUNCTION asyncfl_claim_many(p_task text, p_clients text[], p_selector text, p_max_trips bigint,
                                   p_lease_s double precision, p_nonces text[])
RETURNS TABLE (claim_index integer, outcome text, lease_id text, base_version integer, trip bigint,
               expires_s double precision, free_now bigint)
LANGUAGE plpgsql AS $$
BEGIN
    FOR n IN 1 .. coalesce(cardinality(p_clients), 0) LOOP
        RETURN QUERY SELECT n, c.* FROM asyncfl_claim(p_task, p_clients[n], p_selector, p_max_trips, p_lease_s,
                                                      p_nonces[n]) c;
    END LOOP;
END
$$;
