//! Forgetting closed connections: the SQLite side of [`Retention`].
//!
//! A connection leaves two events (`connected`, `disconnected`) and a registry row that nobody
//! reads once it has been closed for a while. Each call forgets one small batch in one short
//! `BEGIN IMMEDIATE` transaction — a few hundred rows by index, a few milliseconds — so the
//! committer waits at most that long for the write lock, and a prune of millions of rows is a
//! long series of short writes between group commits rather than one long one.
//!
//! The log's last event is never deleted, even when it is a forgotten connection's: the next
//! global position is `MAX(pos) + 1`, and a position handed out twice would be skipped by the
//! tail, whose checkpoint is already past it. Deleting other events leaves holes in `pos`,
//! which readers of the whole log (`read_all`) step over.

use super::rows::{bound, millis};
use super::{SqliteError, SqliteStore};
use crate::ports::{Retention, StoreResult};
use async_trait::async_trait;
use chrono::{DateTime, Utc};

#[async_trait]
impl Retention for SqliteStore {
    async fn forget_connections(
        &self,
        closed_before: DateTime<Utc>,
        at_most: usize,
    ) -> StoreResult<usize> {
        Ok(forget(self, closed_before, at_most).await?)
    }
}

async fn forget(
    store: &SqliteStore,
    closed_before: DateTime<Utc>,
    at_most: usize,
) -> Result<usize, SqliteError> {
    let mut tx = store.pool.begin_with("BEGIN IMMEDIATE").await?;
    // Oldest first, through `connections_closed`; never the stream of the log's last event.
    let doomed: Vec<String> = sqlx::query_scalar(
        "SELECT id FROM connections \
         WHERE closed_at IS NOT NULL AND closed_at < ?1 \
           AND 'c:' || id IS NOT (SELECT stream FROM events ORDER BY pos DESC LIMIT 1) \
         ORDER BY closed_at LIMIT ?2",
    )
    .bind(millis(&closed_before))
    .bind(bound(at_most))
    .fetch_all(&mut *tx)
    .await?;
    if doomed.is_empty() {
        return Ok(0);
    }
    let ids = serde_json::to_string(&doomed).map_err(SqliteError::Encode)?;
    // By the primary key (stream, seq): each stream's two events.
    sqlx::query("DELETE FROM events WHERE stream IN (SELECT 'c:' || value FROM json_each(?1))")
        .bind(&ids)
        .execute(&mut *tx)
        .await?;
    sqlx::query("DELETE FROM connections WHERE id IN (SELECT value FROM json_each(?1))")
        .bind(&ids)
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    // Some of the deleted events may be among those kept for `read_all`.
    store.recent.forget();
    Ok(doomed.len())
}
