//! Group commit: one task owns every append, and appends that queue up while a transaction is
//! being written share the next one.
//!
//! With `synchronous=FULL` each COMMIT costs an fsync, which bounds a one-append-per-transaction
//! log at the disk's fsync rate. Here [`EventLog::append`] only queues a [`Job`]; the
//! [`committer`] takes the first job, drains whatever else is already waiting (up to
//! [`MAX_BATCH`]), and writes them all in one `BEGIN IMMEDIATE` transaction: one fsync for the
//! whole batch. Under no load a batch is one append, so latency does not suffer.
//!
//! A batch is two round trips to sqlx's worker thread whatever its size, because those round
//! trips (two thread switches each), not the disk, used to bound a batch: one opens the
//! transaction and reads everything the batch depends on ([`snapshot`](super::snapshot)), every
//! job is then decided in memory ([`batch`](super::batch)), and one writes the events and their
//! aggregated projection and commits ([`write`](super::write)).
//!
//! Within the batch every job is still settled on its own — a `clientMsgId` repeat answers with
//! the first event, an `Expect::Seq` mismatch fails that job alone — and the others go on.
//! Nobody is answered before COMMIT succeeds, so an acknowledged append is durable; if the
//! transaction fails, every job of the batch gets the error and none of them is in the log.
//!
//! Taking the write lock up front (IMMEDIATE) means nothing read inside the transaction (heads,
//! the last position, used `clientMsgId`s) can go stale before the writes, even if another
//! process writes the same file; and commit order equals seq order, which is what the feed
//! relies on.
//!
//! [`EventLog::append`]: crate::ports::EventLog::append

use super::batch::Plan;
use super::recent::Recent;
use super::snapshot::Snapshot;
use super::{SqliteError, write};
use crate::domain::{Appended, EventBody, Expect};
use sqlx::pool::PoolConnection;
use sqlx::{Sqlite, SqlitePool};
use std::sync::Arc;
use std::time::{Duration, Instant};
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
///
/// It keeps one pooled connection for as long as that connection is sound, rather than taking
/// one from the pool per batch: that saves the pool's liveness check (a round trip) per batch,
/// and keeps the batch's prepared statements cached on the connection that runs them.
pub(super) async fn committer(
    pool: SqlitePool,
    mut jobs: mpsc::Receiver<Job>,
    recent: Arc<Recent>,
    committed: watch::Sender<u64>,
) {
    let mut conn = None;
    let mut batch = Vec::with_capacity(MAX_BATCH);
    let mut returning = Returning::default();
    while jobs.recv_many(&mut batch, MAX_BATCH).await > 0 {
        returning.gather(&mut jobs, &mut batch);
        let started = Instant::now();
        let answered = batch.len();
        let batch = std::mem::take(&mut batch);
        commit(&pool, &mut conn, batch, &recent, &committed).await;
        returning = Returning {
            appenders: answered,
            patience: (started.elapsed() / 4).min(MAX_PATIENCE),
        };
    }
}

/// The longest the committer waits for answered appenders to come back; a fraction of an fsync.
const MAX_PATIENCE: Duration = Duration::from_millis(1);

/// The appenders the last batch answered, who may be about to append again.
///
/// A busy appender (a pipelining client, a writer in a loop) appends again as soon as its answer
/// wakes it, but waking it takes a few dozen microseconds on another thread, while the committer
/// goes straight back to its queue. Without a short wait the next batch would take only what
/// queued up during the last commit, the returning appenders would queue behind it, and a steady
/// load would split into two halves that take turns — each paying a whole commit per half. So
/// the committer waits, for at most a quarter of the last commit's time, until as many jobs are
/// queued as were there already plus the appenders it just answered (PostgreSQL's `commit_delay`
/// does the same for the same reason). An appender that does not come back costs that wait
/// once; a lone appender costs nothing, since what it waits for is there already.
#[derive(Default)]
struct Returning {
    appenders: usize,
    patience: Duration,
}

impl Returning {
    fn gather(&self, jobs: &mut mpsc::Receiver<Job>, batch: &mut Vec<Job>) {
        let wanted = (batch.len() + self.appenders).min(MAX_BATCH);
        if batch.len() >= wanted || self.patience.is_zero() {
            return;
        }
        let deadline = Instant::now() + self.patience;
        loop {
            while batch.len() < MAX_BATCH
                && let Ok(job) = jobs.try_recv()
            {
                batch.push(job);
            }
            if batch.len() >= wanted || Instant::now() >= deadline {
                return;
            }
            // The committer has this thread to itself: sleeping here delays nobody else, and a
            // short sleep leaves the cores to the appenders it is waiting for.
            std::thread::sleep(Duration::from_micros(20));
        }
    }
}

/// Writes one batch and answers every job in it.
async fn commit(
    pool: &SqlitePool,
    conn: &mut Option<PoolConnection<Sqlite>>,
    jobs: Vec<Job>,
    recent: &Recent,
    committed: &watch::Sender<u64>,
) {
    let size = jobs.len();
    let (requests, replies): (Vec<_>, Vec<_>) = jobs
        .into_iter()
        .map(|job| ((job.body, job.expect), job.reply))
        .unzip();
    match write(pool, conn, requests).await {
        Ok(plan) => {
            let last = plan.last();
            tracing::debug!(batch = size, position = last, "committed");
            metrics::counter!(crate::metrics::APPENDS).increment(plan.events().count() as u64);
            metrics::histogram!(crate::metrics::COMMIT_BATCH).record(size as f64);
            // Keep the events for the tails, and wake them before answering, so that whoever
            // sees the answer also finds the feed already moved.
            recent.committed(plan.events().map(|new| (new.position(), new.event.clone())));
            if let Some(last) = last {
                committed.send_replace(last);
            }
            for (reply, answer) in replies.into_iter().zip(plan.answers()) {
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

/// One transaction for the whole batch; returns the committed plan, which holds the answers.
/// An error rolls the whole batch back.
async fn write(
    pool: &SqlitePool,
    held: &mut Option<PoolConnection<Sqlite>>,
    requests: Vec<(EventBody, Expect)>,
) -> Result<Plan, SqliteError> {
    let conn = match held {
        Some(conn) => conn,
        None => held.insert(pool.acquire().await?),
    };
    let streams: Vec<String> = requests
        .iter()
        .map(|(body, _)| body.stream().key())
        .collect();
    let error = match Snapshot::open(conn, &requests, &streams).await {
        Ok(snapshot) => {
            let plan = Plan::decide(snapshot, requests, streams);
            match write::commit(conn, plan.events()).await {
                Ok(()) => return Ok(plan),
                Err(error) => error,
            }
        }
        Err(error) => error,
    };
    // The transaction may be open (or was never begun, or SQLite rolled it back on its own). The
    // BEGIN, the writes and the COMMIT are plain statements, so sqlx does not track the
    // transaction: end it here. If that fails, the connection's state is not known (it may still
    // hold the write lock): it is not used again, nor handed back to the pool, and the next
    // batch takes a fresh one.
    if let Err(rollback) = sqlx::query("ROLLBACK").execute(&mut **conn).await {
        tracing::debug!(error = %rollback, "rollback failed; discarding the connection");
        if let Some(mut conn) = held.take() {
            conn.close_on_drop();
        }
    }
    Err(error)
}

#[cfg(test)]
mod tests {
    //! Batches built by hand and written with [`write`], so that what shares a transaction is
    //! certain rather than up to the scheduler.

    use super::*;
    use crate::domain::{ConnectionId, DisconnectReason, Event, RoomName, Stream, UserId};
    use crate::store::sqlite::SqliteStore;

    async fn open() -> (Arc<SqliteStore>, tempfile::TempDir) {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("palaver.db");
        let store = SqliteStore::open(path.to_str().expect("utf-8 path"))
            .await
            .expect("open");
        (store, dir)
    }

    /// Writes `requests` as one batch and returns the answers.
    async fn batch(
        store: &SqliteStore,
        requests: Vec<(EventBody, Expect)>,
    ) -> Vec<Result<Appended, SqliteError>> {
        write(&store.pool, &mut None, requests)
            .await
            .expect("batch commits")
            .answers()
    }

    fn say(room: &str, user: &str, text: &str, id: Option<&str>, from: Option<&str>) -> EventBody {
        EventBody::MessagePosted {
            room: RoomName::parse(room).unwrap(),
            user: UserId::parse(user).unwrap(),
            text: text.into(),
            client_msg_id: id.map(Into::into),
            connection: from.map(ConnectionId::new),
        }
    }

    fn connected(c: &str, user: &str) -> EventBody {
        EventBody::Connected {
            connection: ConnectionId::new(c),
            user: UserId::parse(user).unwrap(),
            source_ip: Some("192.0.2.1".into()),
            node: None,
        }
    }

    fn disconnected(c: &str, user: &str) -> EventBody {
        EventBody::Disconnected {
            connection: ConnectionId::new(c),
            user: UserId::parse(user).unwrap(),
            reason: DisconnectReason::Closed,
        }
    }

    fn joined(room: &str, user: &str) -> EventBody {
        EventBody::Joined {
            room: RoomName::parse(room).unwrap(),
            user: UserId::parse(user).unwrap(),
        }
    }

    fn left(room: &str, user: &str) -> EventBody {
        EventBody::Left {
            room: RoomName::parse(room).unwrap(),
            user: UserId::parse(user).unwrap(),
        }
    }

    fn ok(answer: &Result<Appended, SqliteError>) -> &Appended {
        answer.as_ref().expect("append succeeds")
    }

    #[tokio::test]
    async fn a_client_msg_id_repeated_within_a_batch_answers_with_the_first() {
        let (store, _dir) = open().await;
        let before = batch(
            &store,
            vec![(say("r", "ana", "old", Some("m0"), None), Expect::Next)],
        )
        .await;
        let answers = batch(
            &store,
            vec![
                (say("r", "ana", "first", Some("m1"), None), Expect::Next),
                (say("r", "ana", "again", Some("m1"), None), Expect::Next),
                (say("r", "bo", "other user", Some("m1"), None), Expect::Next),
                (say("r", "ana", "old again", Some("m0"), None), Expect::Next),
                (
                    say("r", "ana", "third time", Some("m1"), None),
                    Expect::Seq(9),
                ),
                (say("r", "ana", "plain", None, None), Expect::Next),
            ],
        )
        .await;
        let first = ok(&answers[0]);
        assert!(!first.duplicate);
        assert_eq!(first.event.seq, 2);
        for repeat in [&answers[1], &answers[4]] {
            let repeat = ok(repeat);
            assert!(repeat.duplicate);
            assert_eq!(repeat.event, first.event, "the first event comes back");
        }
        assert_eq!(
            (ok(&answers[2]).duplicate, ok(&answers[2]).event.seq),
            (false, 3)
        );
        let old = ok(&answers[3]);
        assert!(old.duplicate);
        assert_eq!(old.event, ok(&before[0]).event);
        assert_eq!(
            (ok(&answers[5]).duplicate, ok(&answers[5]).event.seq),
            (false, 4)
        );

        let room = Stream::Room(RoomName::parse("r").unwrap());
        let log = store.read(&room, 0, 10).await.unwrap();
        let expected: Vec<Event> = [&before[0], &answers[0], &answers[2], &answers[5]]
            .into_iter()
            .map(|a| ok(a).event.clone())
            .collect();
        assert_eq!(log, expected, "each clientMsgId is in the log once");
    }

    #[tokio::test]
    async fn an_earlier_job_of_the_batch_can_make_an_expected_seq_stale() {
        let (store, _dir) = open().await;
        let answers = batch(
            &store,
            vec![
                (connected("c1", "ana"), Expect::Seq(1)),
                (connected("c1", "ana"), Expect::Seq(1)),
                (disconnected("c1", "ana"), Expect::Seq(2)),
                (disconnected("c1", "ana"), Expect::Seq(2)),
                (connected("c2", "bo"), Expect::Seq(1)),
            ],
        )
        .await;
        assert_eq!(ok(&answers[0]).event.seq, 1);
        assert!(matches!(
            answers[1],
            Err(SqliteError::Conflict {
                expected: 1,
                next: 2,
                ..
            })
        ));
        assert_eq!(ok(&answers[2]).event.seq, 2);
        assert!(matches!(
            answers[3],
            Err(SqliteError::Conflict {
                expected: 2,
                next: 3,
                ..
            })
        ));
        assert_eq!(ok(&answers[4]).event.seq, 1, "other streams go on");

        // And across batches: the next one reads the head this one left.
        let answers = batch(
            &store,
            vec![
                (disconnected("c1", "ana"), Expect::Seq(2)),
                (disconnected("c2", "bo"), Expect::Seq(2)),
                (disconnected("c2", "bo"), Expect::Seq(2)),
            ],
        )
        .await;
        assert!(matches!(
            answers[0],
            Err(SqliteError::Conflict {
                expected: 2,
                next: 3,
                ..
            })
        ));
        assert_eq!(ok(&answers[1]).event.seq, 2);
        assert!(answers[2].is_err());
        let c1 = Stream::Connection(ConnectionId::new("c1"));
        assert_eq!(store.head(&c1).await.unwrap(), 2);
        let closed = store.connection(&ConnectionId::new("c1")).await.unwrap();
        assert!(!closed.expect("c1 is registered").open);
    }

    /// More events than the largest multi-row INSERT, over many streams: every stream's seqs are
    /// gap-free, positions run on across chunks, and the log holds exactly what was answered.
    #[tokio::test]
    async fn a_big_batch_over_many_streams_stays_gap_free() {
        let (store, _dir) = open().await;
        let first = batch(
            &store,
            vec![(say("r3", "ana", "seed", None, None), Expect::Next)],
        )
        .await;
        assert_eq!(ok(&first[0]).event.seq, 1);
        let requests: Vec<_> = (0..601)
            .map(|i| match i % 4 {
                3 => (connected(&format!("c{i}"), "bo"), Expect::Seq(1)),
                _ => (
                    say(&format!("r{}", i % 7), "ana", &format!("{i}"), None, None),
                    Expect::Next,
                ),
            })
            .collect();
        let answers = batch(&store, requests).await;
        let events: Vec<Event> = answers.iter().map(|a| ok(a).event.clone()).collect();
        for r in 0..7 {
            let room = Stream::Room(RoomName::parse(&format!("r{r}")).unwrap());
            let seqs: Vec<u64> = events
                .iter()
                .filter(|e| e.stream == room)
                .map(|e| e.seq)
                .collect();
            let from = if r == 3 { 2 } else { 1 };
            assert_eq!(
                seqs,
                (from..from + seqs.len() as u64).collect::<Vec<_>>(),
                "{room}"
            );
            let log = store.read(&room, from - 1, 1000).await.unwrap();
            let answered: Vec<Event> = events
                .iter()
                .filter(|e| e.stream == room)
                .cloned()
                .collect();
            assert_eq!(log, answered, "{room}");
        }
        let all = store.read_all(1, 1000).await.unwrap();
        assert_eq!(all.len(), 601);
        let positions: Vec<u64> = all.iter().map(|(pos, _)| *pos).collect();
        assert_eq!(positions, (2..=602).collect::<Vec<_>>());
        let in_log: Vec<Event> = all.into_iter().map(|(_, e)| e).collect();
        assert_eq!(in_log, events, "log order is job order");
        let rooms = store.rooms().await.unwrap();
        assert_eq!(rooms.len(), 7);
        for room in rooms {
            let head = store.head(&Stream::Room(room.room.clone())).await.unwrap();
            assert_eq!(room.head, head, "{}", room.room);
        }
    }

    /// The projection tables, for comparing two stores.
    async fn projection(store: &SqliteStore) -> String {
        let members: Vec<(String, String, i64, i64, i64)> =
            sqlx::query_as("SELECT * FROM members ORDER BY room, user_id")
                .fetch_all(&store.pool)
                .await
                .unwrap();
        type ConnectionRow = (String, String, i64, i64, Option<String>, Option<i64>);
        let connections: Vec<ConnectionRow> =
            sqlx::query_as("SELECT * FROM connections ORDER BY id")
                .fetch_all(&store.pool)
                .await
                .unwrap();
        let rooms: Vec<(String, i64)> = sqlx::query_as("SELECT * FROM rooms ORDER BY room")
            .fetch_all(&store.pool)
            .await
            .unwrap();
        format!("{members:?}\n{connections:?}\n{rooms:?}")
    }

    /// A batch's aggregated projection equals applying every event on its own, in order.
    #[tokio::test]
    async fn a_batch_projects_like_its_events_one_by_one() {
        let (batched, _a) = open().await;
        let (one_by_one, _b) = open().await;
        let earlier = batch(
            &batched,
            vec![
                (connected("c1", "ana"), Expect::Seq(1)),
                (connected("c3", "cy"), Expect::Seq(1)),
                (joined("r", "cy"), Expect::Next),
            ],
        )
        .await;
        let answers = batch(
            &batched,
            vec![
                (joined("r", "ana"), Expect::Next),
                (say("r", "ana", "hi", None, Some("c1")), Expect::Next),
                (connected("c2", "bo"), Expect::Seq(1)),
                (say("r", "bo", "early", None, Some("c2")), Expect::Next),
                (joined("r", "bo"), Expect::Next),
                (left("r", "ana"), Expect::Next),
                (joined("r", "ana"), Expect::Next),
                (say("s", "bo", "elsewhere", None, Some("c2")), Expect::Next),
                (disconnected("c4", "dee"), Expect::Next),
                (say("r", "dee", "ghost", None, Some("c4")), Expect::Next),
                (connected("c4", "dee"), Expect::Next),
                (disconnected("c3", "cy"), Expect::Seq(2)),
                (say("r", "cy", "late", None, Some("c3")), Expect::Next),
                (left("r", "cy"), Expect::Next),
                (say("r", "ana", "bye", None, Some("c1")), Expect::Next),
            ],
        )
        .await;
        for answer in earlier.iter().chain(&answers) {
            one_by_one.apply(&ok(answer).event).await.unwrap();
        }
        assert_eq!(projection(&batched).await, projection(&one_by_one).await);
        assert_eq!(
            batched.rooms().await.unwrap(),
            one_by_one.rooms().await.unwrap()
        );
    }
}
