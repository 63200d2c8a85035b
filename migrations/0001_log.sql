-- The event log: the source of truth. Every other table in this file is projected from it and
-- written in the same transaction as the event that changed it.
CREATE TABLE events (
    -- Stream::key(): 'r:ROOM' or 'c:CONNECTION'.
    stream        TEXT    NOT NULL,
    -- Position in the stream: 1, 2, 3, ... The primary key turns a lost race between two
    -- writers into a constraint error (extended code 1555), never into a gap or a duplicate.
    seq           INTEGER NOT NULL CHECK (seq >= 1),
    -- Global commit position, read by LogFeed::read_all. Assigned as MAX(pos) + 1 inside the
    -- write transaction; a column of its own rather than the implicit rowid, which VACUUM may
    -- renumber.
    pos           INTEGER NOT NULL UNIQUE CHECK (pos >= 1),
    -- ULID, 26 characters of Crockford base 32.
    id            TEXT    NOT NULL,
    -- Unix milliseconds: event timestamps are truncated to the millisecond, so this round-trips.
    at            INTEGER NOT NULL,
    -- EventBody::kind(), for people reading the table with the sqlite3 shell.
    kind          TEXT    NOT NULL,
    user_id       TEXT    NOT NULL,
    client_msg_id TEXT,
    -- serde_json of EventBody: the event itself. The columns above are copies for indexing.
    body          TEXT    NOT NULL,
    PRIMARY KEY (stream, seq)
) STRICT;

-- Idempotent sends: one event per (room, user, clientMsgId).
CREATE UNIQUE INDEX events_client_msg_id
    ON events (stream, user_id, client_msg_id)
    WHERE client_msg_id IS NOT NULL;
