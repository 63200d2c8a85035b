-- Closed connections, oldest first: what the retention prune (Retention::forget_connections)
-- walks, a small batch at a time, without scanning the registry.
CREATE INDEX connections_closed ON connections (closed_at) WHERE closed_at IS NOT NULL;
