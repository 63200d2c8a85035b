//! Between Rust values and SQLite columns: integers, timestamps, event and connection rows.
//!
//! SQLite integers are signed 64-bit, timestamps are stored as unix milliseconds (event times are
//! truncated to the millisecond by [`now`](crate::domain::event::now), so they read back equal),
//! and nothing read from disk is trusted: a value that does not decode is [`SqliteError::Corrupt`].

use super::SqliteError;
use crate::domain::{ConnectionId, Event, EventBody, RoomName, UserId};
use crate::ports::ConnectionRecord;
use chrono::{DateTime, Utc};
use ulid::Ulid;

/// The columns of `events` that [`event`] decodes, in its order. A macro so that queries can
/// `concat!` it into a constant string.
macro_rules! event_columns {
    () => {
        "stream, seq, pos, id, at, body"
    };
}
pub(super) use event_columns;

/// One `events` row as selected with [`event_columns!`].
pub(super) type EventRow = (String, i64, i64, String, i64, String);

/// A seq or position for binding.
pub(super) fn int(n: u64) -> Result<i64, SqliteError> {
    i64::try_from(n).map_err(|_| SqliteError::OutOfRange(n))
}

/// A caller's bound (`after`, `limit`) for binding: anything past SQLite's range means "all".
pub(super) fn bound(n: impl TryInto<i64>) -> i64 {
    n.try_into().unwrap_or(i64::MAX)
}

/// A seq, position or count read back.
pub(super) fn uint(n: i64, what: &str) -> Result<u64, SqliteError> {
    u64::try_from(n).map_err(|_| SqliteError::Corrupt(format!("negative {what}: {n}")))
}

pub(super) fn millis(at: &DateTime<Utc>) -> i64 {
    at.timestamp_millis()
}

pub(super) fn time(ms: i64, what: &str) -> Result<DateTime<Utc>, SqliteError> {
    DateTime::from_timestamp_millis(ms)
        .ok_or_else(|| SqliteError::Corrupt(format!("{what} out of range: {ms} ms")))
}

pub(super) fn user(id: &str) -> Result<UserId, SqliteError> {
    UserId::parse(id).map_err(|e| SqliteError::Corrupt(e.to_string()))
}

/// Decodes an event row into its global position and the event.
///
/// The body is the event; the stream column is only a copy for indexing, so the two must agree.
pub(super) fn event(row: EventRow) -> Result<(u64, Event), SqliteError> {
    let (stream, seq, pos, id, at, body) = row;
    let corrupt = |what: String| SqliteError::Corrupt(format!("event {stream}/{seq}: {what}"));
    let body: EventBody = serde_json::from_str(&body).map_err(|e| corrupt(e.to_string()))?;
    if body.stream().key() != stream {
        return Err(corrupt(format!("body belongs to {}", body.stream())));
    }
    let id = Ulid::from_string(&id).map_err(|e| corrupt(format!("id {id:?}: {e}")))?;
    let event = Event {
        stream: body.stream(),
        seq: uint(seq, "seq")?,
        id,
        at: time(at, "event time")?,
        body,
    };
    Ok((uint(pos, "position")?, event))
}

/// The columns of `connections` that [`connection`] decodes, in its order.
macro_rules! connection_columns {
    () => {
        "id, user_id, connected_at, last_active_at, source_ip, node, closed_at IS NULL"
    };
}
pub(super) use connection_columns;

/// One `connections` row as selected with [`connection_columns!`].
pub(super) type ConnectionRow = (
    String,
    String,
    i64,
    i64,
    Option<String>,
    Option<String>,
    bool,
);

pub(super) fn connection(row: ConnectionRow) -> Result<ConnectionRecord, SqliteError> {
    let (id, user_id, connected_at, last_active_at, source_ip, node, open) = row;
    Ok(ConnectionRecord {
        id: ConnectionId::new(id),
        user: user(&user_id)?,
        connected_at: time(connected_at, "connected_at")?,
        last_active_at: time(last_active_at, "last_active_at")?,
        source_ip,
        node,
        open,
    })
}

pub(super) fn room(name: &str) -> Result<RoomName, SqliteError> {
    RoomName::parse(name).map_err(|e| SqliteError::Corrupt(e.to_string()))
}

pub(super) fn count(n: i64) -> Result<usize, SqliteError> {
    usize::try_from(n).map_err(|_| SqliteError::Corrupt(format!("bad count: {n}")))
}
