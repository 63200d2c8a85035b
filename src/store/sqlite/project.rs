//! The projection in SQL: each [`Change`] as one idempotent statement.
//!
//! Written once and run from both places that project: the committer, inside the transaction that
//! appends the event, and [`Directory::apply`](crate::ports::Directory::apply). The guards in the
//! statements carry the rules of [`projection`](crate::domain::projection), exactly as the memory
//! store applies them:
//!
//! - membership: an upsert that only takes effect for a newer room seq; re-joining while still a
//!   member keeps the first `joined_at`;
//! - connections: `connected` inserts or does nothing, so it cannot reopen a tombstone;
//!   `disconnected` closes the row, creating a closed tombstone if the connect was never seen;
//! - activity and room heads only move forward.

use super::SqliteError;
use super::rows::{int, millis};
use crate::domain::Event;
use crate::domain::projection::{Change, changes};
use sqlx::SqliteConnection;

const MEMBERSHIP: &str = "\
    INSERT INTO members (room, user_id, active, joined_at, seq) VALUES (?1, ?2, ?3, ?4, ?5)
    ON CONFLICT (room, user_id) DO UPDATE SET
        joined_at = CASE WHEN members.active = 1 AND excluded.active = 1
                         THEN members.joined_at ELSE excluded.joined_at END,
        active = excluded.active,
        seq = excluded.seq
    WHERE excluded.seq > members.seq";

const CONNECTION_OPENED: &str = "\
    INSERT INTO connections (id, user_id, connected_at, last_active_at, source_ip, closed_at)
    VALUES (?1, ?2, ?3, ?3, ?4, NULL)
    ON CONFLICT (id) DO NOTHING";

const CONNECTION_CLOSED: &str = "\
    INSERT INTO connections (id, user_id, connected_at, last_active_at, source_ip, closed_at)
    VALUES (?1, ?2, ?3, ?3, NULL, ?3)
    ON CONFLICT (id) DO UPDATE SET closed_at = excluded.closed_at
    WHERE connections.closed_at IS NULL";

const ACTIVITY: &str = "\
    UPDATE connections SET last_active_at = ?2 WHERE id = ?1 AND last_active_at < ?2";

const ROOM_HEAD: &str = "\
    INSERT INTO rooms (room, head) VALUES (?1, ?2)
    ON CONFLICT (room) DO UPDATE SET head = excluded.head WHERE excluded.head > rooms.head";

/// Applies every change of `event` on `conn`. The caller owns the transaction, so an event's
/// changes land together (and, in the committer, together with the event).
pub(super) async fn apply(conn: &mut SqliteConnection, event: &Event) -> Result<(), SqliteError> {
    for change in changes(event) {
        apply_change(conn, change).await?;
    }
    Ok(())
}

async fn apply_change(conn: &mut SqliteConnection, change: Change<'_>) -> Result<(), SqliteError> {
    let statement = match change {
        Change::Membership {
            room,
            user,
            active,
            seq,
            at,
        } => sqlx::query(MEMBERSHIP)
            .bind(room.as_str())
            .bind(user.as_str())
            .bind(active)
            .bind(millis(&at))
            .bind(int(seq)?),
        Change::ConnectionOpened {
            connection,
            user,
            source_ip,
            at,
        } => sqlx::query(CONNECTION_OPENED)
            .bind(connection.as_str())
            .bind(user.as_str())
            .bind(millis(&at))
            .bind(source_ip),
        Change::ConnectionClosed {
            connection,
            user,
            at,
        } => sqlx::query(CONNECTION_CLOSED)
            .bind(connection.as_str())
            .bind(user.as_str())
            .bind(millis(&at)),
        Change::Activity { connection, at } => sqlx::query(ACTIVITY)
            .bind(connection.as_str())
            .bind(millis(&at)),
        Change::RoomHead { room, seq } => {
            sqlx::query(ROOM_HEAD).bind(room.as_str()).bind(int(seq)?)
        }
    };
    statement.execute(conn).await?;
    Ok(())
}
