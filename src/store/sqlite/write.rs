//! Writing a decided batch: its events, its projection and the COMMIT, sent as one piece.
//!
//! Each statement sqlx runs is a round trip to its worker thread, and each round trip is two
//! thread switches — for a small batch, more than the writing itself. So the batch goes as one
//! text of several statements, which sqlx's SQLite driver prepares and runs one after another in
//! one call: the four projection statements ([`project`](super::project)), the events as one
//! `INSERT … SELECT FROM json_each`, and `COMMIT`. If one fails, the rest do not run. The text is
//! the same for every batch whatever its size, so it is prepared once per connection and then
//! reused, and the rows never come near SQLite's limit on bound variables.
//!
//! The rows go in as two JSON parameters: `?1`, an object holding each projection statement's
//! rows under its own name, and `?2`, the events — kept apart so that only the statement that
//! needs the events (the bulk of the bytes) parses them. Their order matters: sqlx binds the
//! parameters of a text of several statements by counting, across statements, the slots below
//! each statement's highest parameter number that the statement does not name. The projection
//! statements name only `?1`, so count nothing; the events statement, last, names `?2` and
//! leaves one slot, `?1`, which then takes the first value and is not used.

use super::SqliteError;
use super::batch::NewEvent;
use super::project::{self, Projection};
use super::rows::millis;
use crate::domain::Event;
use sqlx::SqliteConnection;
use std::sync::LazyLock;

/// Appends events: `?2` is an array of `[stream, seq, pos, id, at, kind, user, clientMsgId,
/// body]`, in log order.
const EVENTS: &str = "\
    INSERT INTO events (stream, seq, pos, id, at, kind, user_id, client_msg_id, body)
    SELECT value ->> 0, value ->> 1, value ->> 2, value ->> 3, value ->> 4, value ->> 5,
           value ->> 6, value ->> 7, value ->> 8
    FROM json_each(?2)";

/// The projection, then the events; the transaction stays open.
static WRITE: LazyLock<String> = LazyLock::new(|| {
    project::STATEMENTS
        .into_iter()
        .chain(std::iter::once(EVENTS))
        .map(|statement| format!("{statement};\n"))
        .collect()
});

/// The committer's: [`WRITE`], then COMMIT.
static WRITE_AND_COMMIT: LazyLock<String> = LazyLock::new(|| format!("{}COMMIT;", *WRITE));

/// A row of [`EVENTS`].
type EventRow<'e> = (
    &'e str,
    i64,
    i64,
    String,
    i64,
    &'static str,
    &'e str,
    Option<&'e str>,
    &'e str,
);

/// Writes the batch's `events` and their projection, and commits the transaction that
/// [`Snapshot::open`](super::snapshot::Snapshot::open) began: one round trip. On an error the
/// transaction may still be open, and the caller must roll it back.
pub(super) async fn commit<'e>(
    conn: &mut SqliteConnection,
    events: impl Iterator<Item = &'e NewEvent> + Clone,
) -> Result<(), SqliteError> {
    let rows: Vec<EventRow> = events
        .clone()
        .map(|new| {
            let event = &new.event;
            (
                new.stream.as_str(),
                new.seq,
                new.pos,
                event.id.to_string(),
                millis(&event.at),
                event.body.kind(),
                event.body.user().as_str(),
                event.body.client_msg_id(),
                new.json.as_str(),
            )
        })
        .collect();
    let projection = Projection::of(events.map(|new| &new.event))?;
    run(conn, &WRITE_AND_COMMIT, &projection, &rows).await
}

/// Applies `event`'s changes to the projection on `conn`, inside the caller's transaction.
pub(super) async fn project(conn: &mut SqliteConnection, event: &Event) -> Result<(), SqliteError> {
    let projection = Projection::of(std::iter::once(event))?;
    run(conn, &WRITE, &projection, &[]).await
}

async fn run(
    conn: &mut SqliteConnection,
    statements: &str,
    projection: &Projection<'_>,
    events: &[EventRow<'_>],
) -> Result<(), SqliteError> {
    sqlx::query(statements)
        .bind(serde_json::to_string(projection).map_err(SqliteError::Encode)?)
        .bind(serde_json::to_string(events).map_err(SqliteError::Encode)?)
        .execute(&mut *conn)
        .await?;
    Ok(())
}
