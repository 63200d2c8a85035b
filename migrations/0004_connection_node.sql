-- The `palaver serve` node holding each connection (Connected's `node`; NULL on API Gateway):
-- a node restarting on a shared store closes the connections it held and no one else's.
ALTER TABLE connections ADD COLUMN node TEXT;
