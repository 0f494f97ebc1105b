-- trips issued per task: a selector numbers each lease's training seed by it (as the single
-- process numbers its trips, from 0) and stops issuing leases at the run's stop.max_trips
ALTER TABLE tasks ADD COLUMN issued bigint NOT NULL DEFAULT 0;
