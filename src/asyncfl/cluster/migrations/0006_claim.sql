-- A check-in claims a slot in one statement (one round trip from the selector, however many
-- rows it touches), so a claiming check-in costs little more than one answered from memory.
-- A lease keeps its trip number rather than its seed: the selector derives the seed from it.
ALTER TABLE leases ADD COLUMN trip bigint;
UPDATE leases SET trip = CASE WHEN lease_id ~ '^L[0-9]+-' THEN split_part(substr(lease_id, 2), '-', 1)::bigint
                              ELSE 0 END;
ALTER TABLE leases ALTER COLUMN trip SET NOT NULL;
ALTER TABLE leases DROP COLUMN seed;

-- outcome: 'held' (the client's active lease, issued by any selector), 'leased' (a new lease on
-- one of p_selector's free slots), 'expiring' (held but past its deadline: the coordinator frees
-- it within a tick), 'stop' (done, or stop.max_trips reached) or 'full' (none of p_selector's
-- slots free now; free_now says how many are, locked ones included). Locks are taken in one
-- order, the task's row then a slot, so two selectors leasing to one client cannot deadlock:
-- the second waits, then its insert fails on leases_one_active and the caller asks again.
CREATE FUNCTION asyncfl_claim(p_task text, p_client text, p_selector text, p_max_trips bigint,
                              p_lease_s double precision, p_nonce text)
RETURNS TABLE (outcome text, lease_id text, base_version integer, trip bigint,
               expires_s double precision, free_now bigint)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    held record;
    v_trip bigint;
    v_version integer;
    v_slot integer;
    v_lease text;
BEGIN
    SELECT l.lease_id, l.base_version, l.trip, extract(epoch FROM l.expires_at - now())::float8 AS left_s
      INTO held FROM leases l WHERE l.task = p_task AND l.client = p_client AND l.state = 'active';
    IF FOUND THEN
        IF held.left_s <= 0 THEN
            RETURN QUERY SELECT 'expiring', NULL::text, NULL::integer, NULL::bigint, NULL::float8, NULL::bigint;
        ELSE
            RETURN QUERY SELECT 'held', held.lease_id, held.base_version, held.trip, held.left_s, NULL::bigint;
        END IF;
        RETURN;
    END IF;
    SELECT t.issued + 1, t.version INTO v_trip, v_version FROM tasks t
     WHERE t.task = p_task AND t.state = 'running' AND (p_max_trips IS NULL OR t.issued < p_max_trips)
       FOR UPDATE;
    IF NOT FOUND THEN
        RETURN QUERY SELECT 'stop', NULL::text, NULL::integer, NULL::bigint, NULL::float8, NULL::bigint;
        RETURN;
    END IF;
    SELECT s.slot INTO v_slot FROM slots s
     WHERE s.task = p_task AND s.selector = p_selector AND s.lease_id IS NULL LIMIT 1 FOR UPDATE SKIP LOCKED;
    IF NOT FOUND THEN
        RETURN QUERY SELECT 'full', NULL::text, NULL::integer, NULL::bigint, NULL::float8,
            (SELECT count(*) FROM slots s WHERE s.task = p_task AND s.selector = p_selector AND s.lease_id IS NULL);
        RETURN;
    END IF;
    v_lease := 'L' || v_trip || '-' || p_nonce;
    UPDATE tasks SET issued = v_trip WHERE task = p_task;
    UPDATE slots SET lease_id = v_lease WHERE task = p_task AND slot = v_slot;
    INSERT INTO leases (lease_id, task, client, base_version, trip, expires_at)
    VALUES (v_lease, p_task, p_client, v_version, v_trip, now() + make_interval(secs => p_lease_s));
    RETURN QUERY SELECT 'leased', v_lease, v_version, v_trip, p_lease_s, NULL::bigint;
END
$$;
