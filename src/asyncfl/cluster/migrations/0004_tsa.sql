-- Secure aggregation with the TSA: the step id of the closed buffer a masked partial went into.
-- Set, with the closed buffer in aggregator_state, in the fenced transaction that closes the
-- buffer (before the TSA hears of it); such partials are no longer waiting, but fold into the
-- version that buffer's step makes (folded_version) like any other.
ALTER TABLE partials ADD COLUMN tsa_step text;
