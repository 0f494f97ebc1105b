-- what the aggregator reports of a task as of its newest step (its aggregator's status: the
-- buffer, and with differential privacy the epsilon spent), JSON text written in the step's
-- transaction; selectors serve it on /status and /metrics. Text rather than jsonb: epsilon may
-- be infinite, which jsonb cannot hold.
ALTER TABLE aggregator_state ADD COLUMN report text;
