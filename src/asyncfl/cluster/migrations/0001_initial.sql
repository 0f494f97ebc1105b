-- Shared state of a multi-process deployment. Tensors (model versions, partial sums, aggregator
-- state) are bytea in the database itself: one durable system to back up and replicate, and no
-- shared volume for the roles to mount; each version is read once per selector, not per client.

CREATE TABLE tasks (
    task            text PRIMARY KEY,
    config          jsonb NOT NULL,          -- the experiment config (model_dump), resolved
    run             text NOT NULL,           -- the run of that config this task trains
    fingerprint     text NOT NULL,
    concurrency     integer NOT NULL CHECK (concurrency > 0),
    version         integer NOT NULL DEFAULT 0,   -- newest published model version
    state           text NOT NULL DEFAULT 'running' CHECK (state IN ('running', 'done')),
    owner           text,                    -- the aggregator (members.id) that steps it
    owner_epoch     bigint NOT NULL DEFAULT 0,    -- fencing token: bumped at every (re)assignment
    created_at      timestamptz NOT NULL DEFAULT now()
);

-- live processes of every role; a member whose heartbeat is older than the timeout is dead
CREATE TABLE members (
    id              text PRIMARY KEY,
    role            text NOT NULL CHECK (role IN ('selector', 'aggregator', 'coordinator')),
    address         text,
    started_at      timestamptz NOT NULL DEFAULT now(),
    heartbeat_at    timestamptz NOT NULL DEFAULT now(),
    stats           jsonb NOT NULL DEFAULT '{}'
);

CREATE TABLE tokens (
    hash            text PRIMARY KEY,        -- SHA-256 of the token, as the single process stores it
    client          text NOT NULL,
    task            text NOT NULL,           -- '*' for operator tokens of every task
    role            text NOT NULL DEFAULT 'client',
    created_at      timestamptz NOT NULL DEFAULT now(),
    revoked         boolean NOT NULL DEFAULT false
);

-- exactly `concurrency` rows per task: a lease occupies a slot, so clients in flight never exceed
-- the task's concurrency whatever the selectors do; the coordinator grants free slots to selectors
CREATE TABLE slots (
    task            text NOT NULL REFERENCES tasks ON DELETE CASCADE,
    slot            integer NOT NULL,
    selector        text,                    -- the selector that may fill it (its quota)
    lease_id        text,                    -- NULL: free
    PRIMARY KEY (task, slot)
);
CREATE UNIQUE INDEX slots_lease ON slots (lease_id) WHERE lease_id IS NOT NULL;
CREATE INDEX slots_free ON slots (task, selector) WHERE lease_id IS NULL;

CREATE SEQUENCE lease_changes;
CREATE TABLE leases (
    lease_id        text PRIMARY KEY,
    task            text NOT NULL REFERENCES tasks ON DELETE CASCADE,
    client          text NOT NULL,
    base_version    integer NOT NULL,
    seed            bigint NOT NULL,
    issued_at       timestamptz NOT NULL DEFAULT now(),
    expires_at      timestamptz NOT NULL,
    state           text NOT NULL DEFAULT 'active' CHECK (state IN ('active', 'done', 'expired', 'cancelled')),
    change          bigint NOT NULL DEFAULT nextval('lease_changes')   -- selectors follow changes by it
);
CREATE UNIQUE INDEX leases_one_active ON leases (task, client) WHERE state = 'active';
CREATE INDEX leases_expiry ON leases (expires_at) WHERE state = 'active';
CREATE INDEX leases_change ON leases (change);

-- the partial sums selectors hand to a task's aggregator: updates accepted in one commit
CREATE TABLE partials (
    id              bigserial PRIMARY KEY,
    task            text NOT NULL REFERENCES tasks ON DELETE CASCADE,
    selector        text NOT NULL,
    count           integer NOT NULL CHECK (count > 0),
    weight_sum      double precision NOT NULL,
    body            bytea NOT NULL,          -- the weighted sum (or the single update) and its fields
    created_at      timestamptz NOT NULL DEFAULT now(),
    folded_version  integer                  -- the version whose step folded it; NULL: waiting
);
CREATE INDEX partials_waiting ON partials (task, id) WHERE folded_version IS NULL;

-- every upload's verdict and answer; (task, client, idem_key) makes re-sends return the first answer
CREATE TABLE updates (
    seq             bigserial PRIMARY KEY,
    task            text NOT NULL REFERENCES tasks ON DELETE CASCADE,
    client          text NOT NULL,
    idem_key        text NOT NULL,
    lease_id        text NOT NULL,
    base_version    integer NOT NULL,
    version_at_submit integer NOT NULL,
    staleness       integer NOT NULL,
    n_examples      integer NOT NULL,
    steps           integer NOT NULL,
    loss            double precision,
    norm            double precision NOT NULL,
    verdict         text NOT NULL,
    partial_id      bigint REFERENCES partials,
    selector        text NOT NULL,
    received_at     timestamptz NOT NULL DEFAULT now(),
    status          integer NOT NULL,
    response        jsonb NOT NULL,
    UNIQUE (task, client, idem_key)
);

-- published model versions; an aggregator deletes those no lease needs beyond keep_versions
CREATE TABLE versions (
    task            text NOT NULL REFERENCES tasks ON DELETE CASCADE,
    version         integer NOT NULL,
    created_at      timestamptz NOT NULL DEFAULT now(),
    updates         integer NOT NULL,        -- client updates folded into the step that made it
    weights         bytea NOT NULL,
    PRIMARY KEY (task, version)
);

-- what an aggregator needs besides the newest version to resume a task: the server optimizer's
-- and the aggregator's state, written in the same transaction as the version it belongs to
CREATE TABLE aggregator_state (
    task            text PRIMARY KEY REFERENCES tasks ON DELETE CASCADE,
    version         integer NOT NULL,
    body            bytea NOT NULL
);

CREATE TABLE evals (
    id              bigserial PRIMARY KEY,
    task            text NOT NULL REFERENCES tasks ON DELETE CASCADE,
    version         integer NOT NULL,
    at              timestamptz NOT NULL DEFAULT now(),
    accuracy        double precision NOT NULL,
    loss            double precision NOT NULL
);
