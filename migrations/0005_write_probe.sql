-- One row that `/readyz` rewrites to show the file takes writes: a full disk or a write lock
-- held by another process refuses appends while reads still answer.
CREATE TABLE write_probe (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    -- Unix milliseconds, as every time in this file.
    written_at INTEGER NOT NULL
);
