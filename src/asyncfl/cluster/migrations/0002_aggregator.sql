-- What the aggregator records besides the schema's first version: how many of a partial's
-- updates it discarded (too stale when folded, or a refused step), so that the update log's
-- accepted updates always equal the folded updates plus the discarded ones; and the indexes its
-- version pruning and the coordinator's slot grants read.

ALTER TABLE partials ADD COLUMN discarded integer NOT NULL DEFAULT 0;
CREATE INDEX updates_partial ON updates (partial_id);
CREATE INDEX leases_active_base ON leases (task, base_version) WHERE state = 'active';
