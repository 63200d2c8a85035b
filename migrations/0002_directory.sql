-- The projection of the log (src/domain/projection.rs): membership, the connection registry and
-- room heads. Every row is written idempotently, so re-applying any event changes nothing.

-- Membership belongs to the user and survives disconnects. A row stays after a leave (active = 0)
-- so that `seq` can keep ignoring older, re-delivered joins.
CREATE TABLE members (
    room      TEXT    NOT NULL,
    user_id   TEXT    NOT NULL,
    active    INTEGER NOT NULL CHECK (active IN (0, 1)),
    -- Unix milliseconds of the join (of the leave, while inactive).
    joined_at INTEGER NOT NULL,
    -- Seq of the room event that last set this row; older or equal events are ignored.
    seq       INTEGER NOT NULL,
    PRIMARY KEY (room, user_id)
) STRICT, WITHOUT ROWID;

-- Directory::rooms_of.
CREATE INDEX members_rooms_of ON members (user_id, room) WHERE active = 1;

-- One row per connection ever seen. A closed connection keeps its row (closed_at set) as a
-- tombstone, so a re-delivered `connected` cannot reopen it.
CREATE TABLE connections (
    id             TEXT    NOT NULL PRIMARY KEY,
    user_id        TEXT    NOT NULL,
    connected_at   INTEGER NOT NULL,
    last_active_at INTEGER NOT NULL,
    source_ip      TEXT,
    closed_at      INTEGER
) STRICT, WITHOUT ROWID;

-- Directory::audience (members joined to their open connections) and per-user lookups.
CREATE INDEX connections_open_by_user ON connections (user_id, id) WHERE closed_at IS NULL;
-- Directory::open_connections(None), oldest first.
CREATE INDEX connections_open_by_age ON connections (connected_at, id) WHERE closed_at IS NULL;

-- Every room with at least one event, and how far its log goes.
CREATE TABLE rooms (
    room TEXT    NOT NULL PRIMARY KEY,
    head INTEGER NOT NULL
) STRICT, WITHOUT ROWID;
