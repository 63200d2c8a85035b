//! The SQLite store: the log and its projection in one file, the default for `palaver serve`.
//!
//! Appends go through a single committer task that batches them into one transaction each
//! ([`commit`]), so the write path is one writer with group commit; reads go straight to the
//! pool, which WAL lets run alongside the writer. The projection tables are written in the same
//! transaction as the event that changes them ([`project`]), so a handler always reads its own
//! writes. The schema is in `migrations/`, applied at [`SqliteStore::open`].

mod batch;
mod commit;
mod error;
mod lock;
mod project;
mod recent;
mod retention;
mod rows;
mod snapshot;
mod write;

pub use error::SqliteError;
pub use lock::{ServingLock, lock_for_serving};

use crate::domain::{Appended, ConnectionId, Event, EventBody, Expect, RoomName, Stream, UserId};
use crate::ports::{
    ConnectionRecord, Directory, EventLog, Listener, LogFeed, MemberRecord, PendingAppend,
    RoomRecord, Store, StoreResult,
};
use async_trait::async_trait;
use recent::Recent;
use rows::{
    ConnectionRow, EventRow, bound, connection, connection_columns, count, event_columns, room,
    time, uint, user,
};
use sqlx::SqlitePool;
use sqlx::migrate::Migrator;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot, watch};

static MIGRATOR: Migrator = sqlx::migrate!();

/// How long a statement waits for another connection's lock (another process writing the same
/// file, or [`Directory::apply`] racing the committer) before failing with SQLITE_BUSY.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// How long `/readyz`'s write probe waits for the write lock: within `/readyz`'s own 2 s, so
/// that a lock held elsewhere is reported as such. The committer waits [`BUSY_TIMEOUT`].
const PROBE_BUSY_TIMEOUT: Duration = Duration::from_secs(1);

/// Pool size: readers run in parallel under WAL; the committer keeps one connection for itself.
const MAX_CONNECTIONS: u32 = 8;

/// Rows a query's worker thread may hand over before the reader takes them: a history page.
const ROW_BUFFER: usize = crate::domain::limits::MAX_HISTORY_LIMIT + 1;

/// Appends queued for the committer before `append` waits for room (backpressure).
const QUEUE: usize = 4 * commit::MAX_BATCH;

/// How a process opens the file: the server creates and migrates it; operator commands read
/// what is there.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Access {
    Serve,
    ReadOnly,
}

/// Whether the file at `path` is a palaver database with every migration this build knows.
async fn up_to_date(pool: &SqlitePool, path: &str) -> Result<(), SqliteError> {
    let applied: Option<i64> =
        sqlx::query_scalar("SELECT MAX(version) FROM _sqlx_migrations WHERE success")
            .fetch_one(pool)
            .await
            .map_err(|_| SqliteError::NotPalaver {
                path: path.to_owned(),
            })?;
    let latest = MIGRATOR.iter().map(|m| m.version).max();
    if applied < latest {
        return Err(SqliteError::Outdated {
            path: path.to_owned(),
        });
    }
    Ok(())
}

/// A SQLite-backed store. Clone the `Arc`; the committer stops when the last one is dropped.
pub struct SqliteStore {
    pool: SqlitePool,
    jobs: mpsc::Sender<commit::Job>,
    /// What this process committed last, for `read_all`.
    recent: Arc<Recent>,
    committed: watch::Sender<u64>,
    /// How `/readyz`'s write probe opens its connection ([`SqliteStore::check_writes`]).
    probe: SqliteConnectOptions,
}

impl SqliteStore {
    /// Opens the database at `path`, creating the file if it is missing, and brings its schema up
    /// to date. Must be called inside a tokio runtime: it starts the committer task.
    pub async fn open(path: &str) -> Result<Arc<SqliteStore>, SqliteError> {
        SqliteStore::open_as(path, Access::Serve).await
    }

    /// Opens an existing database at `path` read-only, for the operator commands: a path with
    /// no palaver database there (a typo, another directory) is an error, not a new empty
    /// file that shows an empty chat. Its schema must be up to date (`palaver serve` brings
    /// it there).
    pub async fn open_existing(path: &str) -> Result<Arc<SqliteStore>, SqliteError> {
        if !std::path::Path::new(path).is_file() {
            return Err(SqliteError::Missing {
                path: path.to_owned(),
            });
        }
        SqliteStore::open_as(path, Access::ReadOnly).await
    }

    async fn open_as(path: &str, access: Access) -> Result<Arc<SqliteStore>, SqliteError> {
        let options = SqliteConnectOptions::new()
            .filename(path)
            .create_if_missing(access == Access::Serve)
            .read_only(access == Access::ReadOnly);
        // The journal mode is the file's: set by the server, read as it is here.
        let options = match access {
            Access::Serve => options.journal_mode(SqliteJournalMode::Wal),
            Access::ReadOnly => options,
        };
        let options = options
            // An fsync per commit, so an acknowledged append survives power loss too; group
            // commit shares that fsync among every append of the batch.
            .synchronous(SqliteSynchronous::Full)
            .busy_timeout(BUSY_TIMEOUT)
            // sqlx hands rows from its worker thread to the reading task through a channel of 50
            // by default: a 500-event history page would stop the worker ten times, each a
            // thread switch there and back. A page fits whole.
            .row_buffer_size(ROW_BUFFER)
            .foreign_keys(false);
        let probe = options.clone().busy_timeout(PROBE_BUSY_TIMEOUT);
        let pool = SqlitePoolOptions::new()
            .max_connections(MAX_CONNECTIONS)
            // sqlx pings a pooled connection before handing it out, by default: one more round
            // trip to its worker thread per query, for a file that cannot go away.
            .test_before_acquire(false)
            .connect_with(options)
            .await
            .map_err(|source| SqliteError::Open {
                path: path.to_owned(),
                source,
            })?;
        match access {
            Access::Serve => MIGRATOR
                .run(&pool)
                .await
                .map_err(|source| SqliteError::Migrate {
                    path: path.to_owned(),
                    source,
                })?,
            Access::ReadOnly => up_to_date(&pool, path).await?,
        }
        let last: i64 = sqlx::query_scalar("SELECT COALESCE(MAX(pos), 0) FROM events")
            .fetch_one(&pool)
            .await?;
        let committed = watch::Sender::new(uint(last, "position")?);
        let (jobs, queue) = mpsc::channel(QUEUE);
        let recent = Arc::new(Recent::default());
        crate::dedicated::spawn(
            "palaver-committer",
            commit::committer(pool.clone(), queue, recent.clone(), committed.clone()),
        );
        Ok(Arc::new(SqliteStore {
            pool,
            jobs,
            recent,
            committed,
            probe,
        }))
    }

    /// The store behind every port it implements.
    pub fn store(self: &Arc<Self>) -> Store {
        Store {
            log: self.clone(),
            directory: self.clone(),
            feed: Some(self.clone()),
            checkpoints: None,
            retention: Some(self.clone()),
            nodes: None,
        }
    }

    /// Queues an append for the committer: the queue's order is the log's order. The receiver
    /// answers once the append's batch is committed (or failed).
    async fn queue(
        &self,
        body: EventBody,
        expect: Expect,
    ) -> Result<oneshot::Receiver<Result<Appended, SqliteError>>, SqliteError> {
        let (reply, answer) = oneshot::channel();
        let job = commit::Job {
            body,
            expect,
            reply,
        };
        self.jobs
            .send(job)
            .await
            .map_err(|_| SqliteError::CommitterGone)?;
        Ok(answer)
    }

    async fn append(&self, body: EventBody, expect: Expect) -> Result<Appended, SqliteError> {
        let answer = self.queue(body, expect).await?;
        answer.await.map_err(|_| SqliteError::CommitterGone)?
    }

    async fn read(
        &self,
        stream: &Stream,
        after: u64,
        limit: usize,
    ) -> Result<Vec<Event>, SqliteError> {
        let rows: Vec<EventRow> = sqlx::query_as(concat!(
            "SELECT ",
            event_columns!(),
            " FROM events WHERE stream = ?1 AND seq > ?2 ORDER BY seq LIMIT ?3"
        ))
        .bind(stream.key())
        .bind(bound(after))
        .bind(bound(limit))
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter()
            .map(|row| rows::event(row).map(|(_, event)| event))
            .collect()
    }

    /// Commits one row on a connection of its own, waiting [`PROBE_BUSY_TIMEOUT`] at most for
    /// the write lock: the append path's two ways to fail (the lock held elsewhere, no space
    /// for the write-ahead log to grow) fail it too, while reads still answer.
    async fn check_writes(&self) -> Result<(), SqliteError> {
        use sqlx::Connection;
        let mut probe = sqlx::SqliteConnection::connect_with(&self.probe).await?;
        let written = sqlx::query(
            "INSERT INTO write_probe (id, written_at) VALUES (1, ?1) \
             ON CONFLICT (id) DO UPDATE SET written_at = excluded.written_at",
        )
        .bind(chrono::Utc::now().timestamp_millis())
        .execute(&mut probe)
        .await;
        // Closing also rolls back whatever the failed write left open.
        let _ = probe.close().await;
        written?;
        Ok(())
    }

    async fn head(&self, stream: &Stream) -> Result<u64, SqliteError> {
        let head: i64 =
            sqlx::query_scalar("SELECT COALESCE(MAX(seq), 0) FROM events WHERE stream = ?1")
                .bind(stream.key())
                .fetch_one(&self.pool)
                .await?;
        uint(head, "seq")
    }

    async fn read_all(&self, after: u64, limit: usize) -> Result<Vec<(u64, Event)>, SqliteError> {
        if let Some(events) = self.recent.after(after, limit) {
            return Ok(events);
        }
        let rows: Vec<EventRow> = sqlx::query_as(concat!(
            "SELECT ",
            event_columns!(),
            " FROM events WHERE pos > ?1 ORDER BY pos LIMIT ?2"
        ))
        .bind(bound(after))
        .bind(bound(limit))
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter().map(rows::event).collect()
    }

    /// Applies one event's changes in a transaction of its own. This bypasses the committer:
    /// `BEGIN IMMEDIATE` waits (up to [`BUSY_TIMEOUT`]) for a batch in progress to finish.
    async fn apply(&self, event: &Event) -> Result<(), SqliteError> {
        let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await?;
        write::project(&mut tx, event).await?;
        tx.commit().await?;
        Ok(())
    }

    async fn connections(
        &self,
        user_id: Option<&UserId>,
    ) -> Result<Vec<ConnectionRecord>, SqliteError> {
        let rows: Vec<ConnectionRow> = match user_id {
            Some(user_id) => {
                sqlx::query_as(concat!(
                    "SELECT ",
                    connection_columns!(),
                    " FROM connections WHERE user_id = ?1 AND closed_at IS NULL \
                     ORDER BY connected_at, id"
                ))
                .bind(user_id.as_str())
                .fetch_all(&self.pool)
                .await?
            }
            None => {
                sqlx::query_as(concat!(
                    "SELECT ",
                    connection_columns!(),
                    " FROM connections WHERE closed_at IS NULL ORDER BY connected_at, id"
                ))
                .fetch_all(&self.pool)
                .await?
            }
        };
        rows.into_iter().map(connection).collect()
    }

    async fn connection(&self, id: &ConnectionId) -> Result<Option<ConnectionRecord>, SqliteError> {
        let row: Option<ConnectionRow> = sqlx::query_as(concat!(
            "SELECT ",
            connection_columns!(),
            " FROM connections WHERE id = ?1"
        ))
        .bind(id.as_str())
        .fetch_optional(&self.pool)
        .await?;
        row.map(connection).transpose()
    }

    async fn is_member(&self, room: &RoomName, user_id: &UserId) -> Result<bool, SqliteError> {
        Ok(sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM members WHERE room = ?1 AND user_id = ?2 AND active = 1)",
        )
        .bind(room.as_str())
        .bind(user_id.as_str())
        .fetch_one(&self.pool)
        .await?)
    }

    async fn members(&self, room: &RoomName) -> Result<Vec<MemberRecord>, SqliteError> {
        let rows: Vec<(String, i64, i64)> = sqlx::query_as(
            "SELECT m.user_id, m.joined_at, \
                    (SELECT COUNT(*) FROM connections c \
                     WHERE c.user_id = m.user_id AND c.closed_at IS NULL) \
             FROM members m WHERE m.room = ?1 AND m.active = 1 ORDER BY m.user_id",
        )
        .bind(room.as_str())
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter()
            .map(|(user_id, joined_at, connections)| {
                Ok(MemberRecord {
                    user: user(&user_id)?,
                    joined_at: time(joined_at, "joined_at")?,
                    connections: count(connections)?,
                })
            })
            .collect()
    }

    async fn rooms_of(&self, user_id: &UserId) -> Result<Vec<RoomName>, SqliteError> {
        let rooms: Vec<String> = sqlx::query_scalar(
            "SELECT room FROM members WHERE user_id = ?1 AND active = 1 ORDER BY room",
        )
        .bind(user_id.as_str())
        .fetch_all(&self.pool)
        .await?;
        rooms.iter().map(|r| room(r)).collect()
    }

    async fn rooms(&self) -> Result<Vec<RoomRecord>, SqliteError> {
        // Per room, two index-range counts over its members; operators call this, not the
        // per-message path.
        let rows: Vec<(String, i64, i64, i64)> = sqlx::query_as(
            "SELECT r.room, r.head, \
                    (SELECT COUNT(*) FROM members m WHERE m.room = r.room AND m.active = 1), \
                    (SELECT COUNT(*) FROM members m WHERE m.room = r.room AND m.active = 1 \
                       AND EXISTS (SELECT 1 FROM connections c \
                                   WHERE c.user_id = m.user_id AND c.closed_at IS NULL)) \
             FROM rooms r ORDER BY r.room",
        )
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter()
            .map(|(name, head, members, online)| {
                Ok(RoomRecord {
                    room: room(&name)?,
                    members: count(members)?,
                    online: count(online)?,
                    head: uint(head, "head")?,
                })
            })
            .collect()
    }

    async fn audience(&self, room: &RoomName) -> Result<Vec<ConnectionId>, SqliteError> {
        // Runs for every message: the room's active members by primary key, each joined to
        // their open connections through `connections_open_by_user`. No scan of either table.
        let ids: Vec<String> = sqlx::query_scalar(
            "SELECT c.id FROM members m \
             JOIN connections c ON c.user_id = m.user_id AND c.closed_at IS NULL \
             WHERE m.room = ?1 AND m.active = 1 \
             ORDER BY m.user_id, c.id",
        )
        .bind(room.as_str())
        .fetch_all(&self.pool)
        .await?;
        Ok(ids.into_iter().map(ConnectionId::new).collect())
    }
}

/// [`Directory::live_from`] in SQL, for connection `c.id` and the membership row `m` of room
/// stream `?2`: one past the room's last seq before the position where the connection started
/// listening — just after its `connected`, or at its user's `joined`, whichever is later. Each
/// lookup is a seek into the primary key `(stream, seq)`; the last step walks the room's events
/// backwards from the newest and stops at the first one before that position.
macro_rules! live_from_sql {
    () => {
        "1 + COALESCE((SELECT e.seq FROM events e WHERE e.stream = ?2 AND e.pos < MAX( \
             COALESCE((SELECT o.pos FROM events o WHERE o.stream = 'c:' || c.id AND o.seq = 1) \
                      + 1, 0), \
             COALESCE((SELECT j.pos FROM events j WHERE j.stream = ?2 AND j.seq = m.seq), 0)) \
           ORDER BY e.seq DESC LIMIT 1), 0)"
    };
}

impl SqliteStore {
    async fn listeners(&self, room: &RoomName) -> Result<Vec<Listener>, SqliteError> {
        let rows: Vec<(String, i64, Option<String>)> = sqlx::query_as(concat!(
            "SELECT c.id, ",
            live_from_sql!(),
            ", c.node",
            " FROM members m \
             JOIN connections c ON c.user_id = m.user_id AND c.closed_at IS NULL \
             WHERE m.room = ?1 AND m.active = 1 \
             ORDER BY m.user_id, c.id"
        ))
        .bind(room.as_str())
        .bind(Stream::Room(room.clone()).key())
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter()
            .map(|(id, live_from, node)| {
                Ok(Listener {
                    connection: ConnectionId::new(id),
                    live_from: uint(live_from, "seq")?,
                    node,
                })
            })
            .collect()
    }

    async fn live_from(
        &self,
        connection: &ConnectionId,
        room: &RoomName,
    ) -> Result<Option<u64>, SqliteError> {
        let live_from: Option<i64> = sqlx::query_scalar(concat!(
            "SELECT ",
            live_from_sql!(),
            " FROM connections c \
             JOIN members m ON m.user_id = c.user_id AND m.room = ?1 AND m.active = 1 \
             WHERE c.id = ?3 AND c.closed_at IS NULL"
        ))
        .bind(room.as_str())
        .bind(Stream::Room(room.clone()).key())
        .bind(connection.as_str())
        .fetch_optional(&self.pool)
        .await?;
        live_from.map(|seq| uint(seq, "seq")).transpose()
    }
}

// The ports delegate to the inherent methods above, which speak `SqliteError`; the `?` at this
// boundary is where it becomes a `StoreError`.

#[async_trait]
impl EventLog for SqliteStore {
    async fn append(&self, body: EventBody, expect: Expect) -> StoreResult<Appended> {
        Ok(SqliteStore::append(self, body, expect).await?)
    }

    async fn submit(&self, body: EventBody, expect: Expect) -> PendingAppend {
        match self.queue(body, expect).await {
            Ok(answer) => {
                Box::pin(async move { Ok(answer.await.map_err(|_| SqliteError::CommitterGone)??) })
            }
            Err(error) => Box::pin(std::future::ready(Err(error.into()))),
        }
    }

    async fn read(&self, stream: &Stream, after: u64, limit: usize) -> StoreResult<Vec<Event>> {
        Ok(SqliteStore::read(self, stream, after, limit).await?)
    }

    async fn head(&self, stream: &Stream) -> StoreResult<u64> {
        Ok(SqliteStore::head(self, stream).await?)
    }

    async fn check_writes(&self) -> StoreResult<()> {
        Ok(SqliteStore::check_writes(self).await?)
    }
}

#[async_trait]
impl Directory for SqliteStore {
    async fn apply(&self, event: &Event) -> StoreResult<()> {
        Ok(SqliteStore::apply(self, event).await?)
    }

    async fn connection(&self, id: &ConnectionId) -> StoreResult<Option<ConnectionRecord>> {
        Ok(SqliteStore::connection(self, id).await?)
    }

    async fn open_connections(&self, user: Option<&UserId>) -> StoreResult<Vec<ConnectionRecord>> {
        Ok(self.connections(user).await?)
    }

    async fn is_member(&self, room: &RoomName, user: &UserId) -> StoreResult<bool> {
        Ok(SqliteStore::is_member(self, room, user).await?)
    }

    async fn members(&self, room: &RoomName) -> StoreResult<Vec<MemberRecord>> {
        Ok(SqliteStore::members(self, room).await?)
    }

    async fn rooms_of(&self, user: &UserId) -> StoreResult<Vec<RoomName>> {
        Ok(SqliteStore::rooms_of(self, user).await?)
    }

    async fn rooms(&self) -> StoreResult<Vec<RoomRecord>> {
        Ok(SqliteStore::rooms(self).await?)
    }

    async fn listeners(&self, room: &RoomName) -> StoreResult<Vec<Listener>> {
        Ok(SqliteStore::listeners(self, room).await?)
    }

    async fn live_from(
        &self,
        connection: &ConnectionId,
        room: &RoomName,
    ) -> StoreResult<Option<u64>> {
        Ok(SqliteStore::live_from(self, connection, room).await?)
    }

    /// Without the seqs, a room's audience is a cheaper query.
    async fn audience(&self, room: &RoomName) -> StoreResult<Vec<ConnectionId>> {
        Ok(SqliteStore::audience(self, room).await?)
    }
}

#[async_trait]
impl LogFeed for SqliteStore {
    async fn read_all(&self, after: u64, limit: usize) -> StoreResult<Vec<(u64, Event)>> {
        Ok(SqliteStore::read_all(self, after, limit).await?)
    }

    fn watch(&self) -> watch::Receiver<u64> {
        self.committed.subscribe()
    }
}
