//! Writing a decided batch: its events, then its projection and the COMMIT.
//!
//! Each statement sqlx runs is a round trip to its worker thread, and each round trip is two
//! thread switches — for a small batch, more than the writing itself. So a batch is written in
//! two: one `INSERT` of every event, then the four projection statements
//! ([`project`](super::project)) and `COMMIT` as one text of several statements, which sqlx's
//! SQLite driver prepares and runs one after another in one call (if one fails, the rest do not
//! run).
//!
//! The events are bound as plain values, nine per event, into as many rows as the smallest of
//! [`ROWS`] that holds the batch; the rows left over are all NULL and skipped. So there are
//! three texts, each prepared once per connection and then reused. (Unpacking the events from
//! JSON inside SQLite cost more than the round trip saved: 128 writers appended 70k/s instead of
//! 100k/s. And the parameters are `?`, not `?NNN`: SQLite looks a numbered parameter's name up by
//! walking a list, which made binding a 256-row batch quadratic.) The projection's rows are one
//! JSON parameter, `?1`, an object holding each statement's rows under its own name, which every
//! statement of that text names — the only way a text of several statements binds simply in
//! sqlx, which counts unnamed parameter slots across statements.

use super::SqliteError;
use super::batch::NewEvent;
use super::commit::MAX_BATCH;
use super::project::{self, Projection};
use super::rows::millis;
use crate::domain::Event;
use sqlx::SqliteConnection;
use std::sync::LazyLock;

/// The row counts of the events `INSERT`: a batch takes the smallest that holds it.
const ROWS: [usize; 3] = [16, 64, 256];
const _: () = assert!(MAX_BATCH <= ROWS[ROWS.len() - 1]);

/// The columns bound per event, in the `INSERT`'s order.
const COLUMNS: usize = 9;
// SQLite refuses more bound variables than SQLITE_MAX_VARIABLE_NUMBER (32766 since 3.32).
const _: () = assert!(ROWS[ROWS.len() - 1] * COLUMNS <= 32766);

/// For each of [`ROWS`], the events `INSERT`.
static EVENTS: LazyLock<[String; 3]> = LazyLock::new(|| {
    let row = format!("({})", ["?"; COLUMNS].join(", "));
    ROWS.map(|rows| {
        format!(
            "INSERT INTO events (stream, seq, pos, id, at, kind, user_id, client_msg_id, body) \
             SELECT * FROM (VALUES {}) WHERE column1 IS NOT NULL",
            vec![row.as_str(); rows].join(", ")
        )
    })
});

/// The projection statements, each ended; the transaction stays open.
static PROJECT: LazyLock<String> = LazyLock::new(|| {
    project::STATEMENTS
        .iter()
        .map(|statement| format!("{statement};\n"))
        .collect()
});

/// The committer's: the projection, then COMMIT.
static PROJECT_AND_COMMIT: LazyLock<String> = LazyLock::new(|| format!("{}COMMIT;", *PROJECT));

/// Writes the batch's `events` and their projection, and commits the transaction that
/// [`Snapshot::open`](super::snapshot::Snapshot::open) began: two round trips. On an error the
/// transaction may still be open, and the caller must roll it back.
pub(super) async fn commit<'e>(
    conn: &mut SqliteConnection,
    events: impl Iterator<Item = &'e NewEvent> + Clone,
) -> Result<(), SqliteError> {
    let all: Vec<&NewEvent> = events.clone().collect();
    // One INSERT for a batch of the committer's; a bigger one (only tests write those) in parts.
    for part in all.chunks(ROWS[ROWS.len() - 1]) {
        let size = ROWS.partition_point(|&rows| rows < part.len());
        let mut insert = sqlx::query(EVENTS[size].as_str());
        for new in part {
            let event = &new.event;
            insert = insert
                .bind(new.stream.as_str())
                .bind(new.seq)
                .bind(new.pos)
                .bind(event.id.to_string())
                .bind(millis(&event.at))
                .bind(event.body.kind())
                .bind(event.body.user().as_str())
                .bind(event.body.client_msg_id())
                .bind(new.json.as_str());
        }
        for _ in part.len() * COLUMNS..ROWS[size] * COLUMNS {
            insert = insert.bind(None::<&str>);
        }
        insert.execute(&mut *conn).await?;
    }
    run_projection(conn, &PROJECT_AND_COMMIT, events.map(|new| &new.event)).await
}

/// Applies `event`'s changes to the projection on `conn`, inside the caller's transaction.
pub(super) async fn project(conn: &mut SqliteConnection, event: &Event) -> Result<(), SqliteError> {
    run_projection(conn, &PROJECT, std::iter::once(event)).await
}

/// Runs `statements` (the projection statements, then maybe COMMIT) with the projection of
/// `events` as their one parameter.
async fn run_projection<'e>(
    conn: &mut SqliteConnection,
    statements: &str,
    events: impl Iterator<Item = &'e Event>,
) -> Result<(), SqliteError> {
    let projection = Projection::of(events)?;
    let projection = serde_json::to_string(&projection).map_err(SqliteError::Encode)?;
    sqlx::query(statements)
        .bind(projection)
        .execute(&mut *conn)
        .await?;
    Ok(())
}
