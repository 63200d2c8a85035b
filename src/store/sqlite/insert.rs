//! Writing a batch's events with a few multi-row `INSERT`s instead of one statement each.
//!
//! Each statement is a round trip to sqlx's worker thread, and sqlx prepares and caches a
//! statement per SQL text. A batch of `n` events is therefore split into chunks whose sizes are
//! powers of two (`n = 200` is 128 + 64 + 8): at most [`SIZES`] distinct texts, each prepared once
//! per connection and then reused, and at most `log2(MAX_ROWS) + 1` statements for a batch up to
//! [`MAX_ROWS`], one more per further `MAX_ROWS`. Exact-size statements would instead prepare
//! (and evict from sqlx's cache) a new text for nearly every batch.

use super::SqliteError;
use super::batch::NewEvent;
use super::rows::millis;
use sqlx::SqliteConnection;
use std::sync::LazyLock;

/// The columns bound per row, in the order of [`INSERTS`]' placeholders.
const COLUMNS: usize = 9;

/// Chunk sizes are `1, 2, 4, ..., MAX_ROWS`.
const SIZES: usize = 9;
const MAX_ROWS: usize = 1 << (SIZES - 1);

// SQLite refuses statements with more bound variables than SQLITE_MAX_VARIABLE_NUMBER: 32766 by
// default since 3.32 (the bundled SQLite is newer), 999 before. Stay under the modern limit.
const _: () = assert!(MAX_ROWS * COLUMNS <= 32766);

/// `INSERTS[k]` inserts `2^k` rows.
static INSERTS: LazyLock<[String; SIZES]> = LazyLock::new(|| {
    std::array::from_fn(|k| {
        let row = format!("({})", ["?"; COLUMNS].join(", "));
        format!(
            "INSERT INTO events (stream, seq, pos, id, at, kind, user_id, client_msg_id, body) \
             VALUES {}",
            vec![row; 1 << k].join(", ")
        )
    })
});

/// Inserts `events` (all of them or, on error, none that the caller may keep: the caller rolls
/// the transaction back).
pub(super) async fn events<'e>(
    conn: &mut SqliteConnection,
    events: impl Iterator<Item = &'e NewEvent>,
) -> Result<(), SqliteError> {
    let events: Vec<&NewEvent> = events.collect();
    let mut rest = events.as_slice();
    while !rest.is_empty() {
        // The largest chunk size that fits what is left.
        let k = (rest.len().ilog2() as usize).min(SIZES - 1);
        let (chunk, after) = rest.split_at(1 << k);
        let mut insert = sqlx::query(INSERTS[k].as_str());
        for new in chunk {
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
        insert.execute(&mut *conn).await?;
        rest = after;
    }
    Ok(())
}
