//! Group commit: one task owns every append, and appends that queue up while a transaction is
//! being written share the next one.
//!
//! With `synchronous=FULL` each COMMIT costs an fsync, which bounds a one-append-per-transaction
//! log at the disk's fsync rate. Here [`EventLog::append`] only queues a [`Job`]; the
//! [`committer`] takes the first job, drains whatever else is already waiting (up to
//! [`MAX_BATCH`]), and writes them all in one `BEGIN IMMEDIATE` transaction: one fsync for the
//! whole batch. Under no load a batch is one append, so latency does not suffer.
//!
//! Within the batch every job is checked on its own — a `clientMsgId` repeat answers with the
//! first event, an `Expect::Seq` mismatch fails that job alone — and the others go on. Nobody is
//! answered before COMMIT succeeds, so an acknowledged append is durable; if the transaction
//! fails, every job of the batch gets the error and none of them is in the log.
//!
//! Taking the write lock up front (IMMEDIATE) means nothing read inside the transaction (heads,
//! the last position) can go stale before the writes, even if another process writes the same
//! file; and commit order equals seq order, which is what the feed relies on.
//!
//! [`EventLog::append`]: crate::ports::EventLog::append

use super::SqliteError;
use super::project;
use super::rows::{self, EventRow, event_columns, int, millis};
use crate::domain::event::now;
use crate::domain::{Appended, Event, EventBody, Expect};
use sqlx::{Connection, SqliteConnection, SqlitePool};
use std::collections::HashMap;
use std::sync::Arc;
use tokio::sync::{mpsc, oneshot, watch};

/// The most appends one transaction takes; more wait for the next.
pub(super) const MAX_BATCH: usize = 256;

/// One append waiting for the committer.
pub(super) struct Job {
    pub body: EventBody,
    pub expect: Expect,
    pub reply: oneshot::Sender<Result<Appended, SqliteError>>,
}

/// The committer task: runs until every sender is dropped (the store is gone).
pub(super) async fn committer(
    pool: SqlitePool,
    mut jobs: mpsc::Receiver<Job>,
    committed: watch::Sender<u64>,
) {
    let mut batch = Vec::with_capacity(MAX_BATCH);
    while jobs.recv_many(&mut batch, MAX_BATCH).await > 0 {
        commit(&pool, std::mem::take(&mut batch), &committed).await;
    }
}

/// Writes one batch and answers every job in it.
async fn commit(pool: &SqlitePool, jobs: Vec<Job>, committed: &watch::Sender<u64>) {
    let size = jobs.len();
    let (requests, replies): (Vec<_>, Vec<_>) = jobs
        .into_iter()
        .map(|job| ((job.body, job.expect), job.reply))
        .unzip();
    match write(pool, requests).await {
        Ok((answers, last)) => {
            tracing::debug!(batch = size, position = last, "committed");
            // Wake the tails before answering, so that whoever sees the answer also finds the
            // feed already moved.
            if let Some(last) = last {
                committed.send_replace(last);
            }
            for (reply, answer) in replies.into_iter().zip(answers) {
                // The appender may have given up waiting; the event is in the log regardless.
                let _ = reply.send(answer);
            }
        }
        Err(e) => {
            tracing::warn!(batch = size, error = %e, "write batch rolled back");
            let e = Arc::new(e);
            for reply in replies {
                let _ = reply.send(Err(SqliteError::BatchFailed(e.clone())));
            }
        }
    }
}

/// One transaction for the whole batch. The outer error rolls the batch back; the inner results
/// are the answers of the single jobs, in order. Also returns the last position written.
async fn write(
    pool: &SqlitePool,
    requests: Vec<(EventBody, Expect)>,
) -> Result<(Vec<Result<Appended, SqliteError>>, Option<u64>), SqliteError> {
    let mut conn = pool.acquire().await?;
    let mut tx = conn.begin_with("BEGIN IMMEDIATE").await?;
    let result = async {
        let mut batch = Batch::start(&mut tx).await?;
        let mut answers = Vec::with_capacity(requests.len());
        for (body, expect) in requests {
            answers.push(batch.append(&mut tx, body, expect).await?);
        }
        Ok::<_, SqliteError>((answers, batch.last))
    }
    .await;
    match result {
        Ok(done) => match tx.commit().await {
            Ok(()) => Ok(done),
            Err(e) => {
                // Nothing of the batch is committed. SQLite may have rolled back on its own, and
                // sqlx would then still count the connection as inside a transaction: do not
                // hand it back to the pool.
                conn.close_on_drop();
                Err(e.into())
            }
        },
        Err(e) => {
            if let Err(rollback) = tx.rollback().await {
                // Same here: the connection may still hold the transaction and the write lock.
                tracing::warn!(error = %rollback, "rollback failed; discarding the connection");
                conn.close_on_drop();
            }
            Err(e)
        }
    }
}

/// What one transaction knows beyond the database: positions and heads it already assigned.
struct Batch {
    /// The next global position.
    next_pos: u64,
    /// The last position written, if any.
    last: Option<u64>,
    /// Per stream key, the seq of its last event, including this batch's own. The transaction
    /// sees its own inserts, so `MAX(seq)` would be right too; this saves the query for the
    /// second and later appends to a busy room.
    heads: HashMap<String, u64>,
}

impl Batch {
    async fn start(conn: &mut SqliteConnection) -> Result<Batch, SqliteError> {
        let last: i64 = sqlx::query_scalar("SELECT COALESCE(MAX(pos), 0) FROM events")
            .fetch_one(&mut *conn)
            .await?;
        Ok(Batch {
            next_pos: rows::uint(last, "position")? + 1,
            last: None,
            heads: HashMap::new(),
        })
    }

    /// Appends one event. `Ok(Err(..))` is this job's own failure (conflict, bad data) and leaves
    /// the transaction untouched; `Err(..)` means the transaction can no longer be trusted.
    async fn append(
        &mut self,
        conn: &mut SqliteConnection,
        body: EventBody,
        expect: Expect,
    ) -> Result<Result<Appended, SqliteError>, SqliteError> {
        let key = body.stream().key();
        if let Some(client_msg_id) = body.client_msg_id() {
            let first: Option<EventRow> = sqlx::query_as(concat!(
                "SELECT ",
                event_columns!(),
                " FROM events WHERE stream = ?1 AND user_id = ?2 AND client_msg_id = ?3"
            ))
            .bind(&key)
            .bind(body.user().as_str())
            .bind(client_msg_id)
            .fetch_optional(&mut *conn)
            .await?;
            if let Some(row) = first {
                return Ok(rows::event(row).map(|(_, event)| Appended {
                    event,
                    duplicate: true,
                }));
            }
        }

        let head = match self.heads.get(&key) {
            Some(head) => *head,
            None => {
                let head: i64 = sqlx::query_scalar(
                    "SELECT COALESCE(MAX(seq), 0) FROM events WHERE stream = ?1",
                )
                .bind(&key)
                .fetch_one(&mut *conn)
                .await?;
                rows::uint(head, "seq")?
            }
        };
        let next = head + 1;
        if let Expect::Seq(expected) = expect
            && expected != next
        {
            return Ok(Err(SqliteError::Conflict {
                stream: key,
                expected,
                next,
            }));
        }

        let event = Event::record(body, next, now());
        let (seq, pos) = match (int(next), int(self.next_pos)) {
            (Ok(seq), Ok(pos)) => (seq, pos),
            (Err(e), _) | (_, Err(e)) => return Ok(Err(e)),
        };
        let json = match serde_json::to_string(&event.body) {
            Ok(json) => json,
            Err(e) => return Ok(Err(SqliteError::Encode(e))),
        };
        sqlx::query(
            "INSERT INTO events (stream, seq, pos, id, at, kind, user_id, client_msg_id, body) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
        )
        .bind(&key)
        .bind(seq)
        .bind(pos)
        .bind(event.id.to_string())
        .bind(millis(&event.at))
        .bind(event.body.kind())
        .bind(event.body.user().as_str())
        .bind(event.body.client_msg_id())
        .bind(json)
        .execute(&mut *conn)
        .await?;
        project::apply(conn, &event).await?;

        self.heads.insert(key, next);
        self.last = Some(self.next_pos);
        self.next_pos += 1;
        Ok(Ok(Appended {
            event,
            duplicate: false,
        }))
    }
}
