-- Audit rows written at most once. The gateway queues audit events and writes them in
-- batches; when the database connection drops while a batch commits (a failover), the writer
-- cannot tell whether the commit landed and writes the batch again. Each event carries an id
-- made when it was recorded, and a batch written twice adds nothing the second time.
-- Nullable, no default: adding it rewrites nothing, and rows from before stay as they are.
ALTER TABLE audit_events ADD COLUMN event_id uuid;
CREATE UNIQUE INDEX audit_events_event_id ON audit_events (event_id) WHERE event_id IS NOT NULL;
