//! The store contract: one suite, run through the ports against every store.
//!
//! Each test in [`contract`] takes a fresh [`Store`] and checks behaviour handlers and the fan-out
//! rely on: gap-free seqs under concurrency, optimistic concurrency, idempotent sends, paging, and
//! a projection that re-delivered or reordered events cannot disturb. [`contract_suite!`] turns
//! the list into one `#[tokio::test]` per store, so a new store joins with one line:
//!
//! ```ignore
//! contract_suite!(dynamodb, dynamodb_store());
//! ```
//!
//! Tests of one backend's own promises (SQLite: the file survives reopening, bad rows are errors)
//! follow the suite.

use crate::common;

use palaver::domain::event::now;
use palaver::domain::{
    Appended, ConnectionId, DisconnectReason, Event, EventBody, Expect, Refusal, RoomName, Stream,
    UserId,
};
use palaver::ports::{
    Checkpoint, ConnectionRecord, MemberRecord, RelayLease, RoomRecord, Store, StoreError,
    StoreResult,
};
use palaver::store::dynamodb as dynamo;
use palaver::store::memory::MemoryStore;
use palaver::store::sqlite::SqliteStore;
use std::any::Any;
use std::path::Path;

/// A store under test, and whatever must outlive it (a temporary directory, a table prefix).
struct Fixture {
    store: Store,
    /// The table prefix, for a DynamoDB store.
    prefix: Option<String>,
    _keep: Box<dyn Any + Send>,
}

async fn memory_store() -> Fixture {
    Fixture {
        store: MemoryStore::store(),
        prefix: None,
        _keep: Box::new(()),
    }
}

async fn sqlite_store() -> Fixture {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = open_sqlite(&dir.path().join("palaver.db")).await;
    Fixture {
        store,
        prefix: None,
        _keep: Box::new(dir),
    }
}

/// Fresh tables under a new prefix on the DynamoDB that `AWS_ENDPOINT_URL` points at (the moto
/// server `scripts/test` starts). No endpoint is a failure, never a skip.
async fn dynamodb_store() -> Fixture {
    log_to_test_output();
    assert!(
        std::env::var("AWS_ENDPOINT_URL").is_ok(),
        "the DynamoDB contract suite needs AWS_ENDPOINT_URL pointing at a moto server: run scripts/test"
    );
    let prefix = format!("contract-{}", ulid::Ulid::new().to_string().to_lowercase());
    let client = palaver::store::aws_client().await;
    let tables = dynamo::Tables::new(&prefix);
    dynamo::init(&client, &tables).await.expect("create tables");
    Fixture {
        store: dynamo::DynamoStore::new(client, &prefix).store(),
        prefix: Some(prefix),
        _keep: Box::new(()),
    }
}

async fn open_sqlite(path: &Path) -> Store {
    log_to_test_output();
    SqliteStore::open(path.to_str().expect("utf-8 temp path"))
        .await
        .expect("open SQLite store")
        .store()
}

/// `RUST_LOG=palaver=debug cargo test --test store_contract -- --nocapture` shows the stores'
/// tracing, e.g. the size of every SQLite commit batch.
fn log_to_test_output() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
}

/// `contract_suite!(NAME, MAKE)`: module `NAME` with one test per contract test, each on a fresh
/// store from the future `MAKE` (a `Fixture`).
macro_rules! contract_suite {
    ($name:ident, $make:expr $(; $($extra:ident),* $(,)?)?) => {
        mod $name {
            use super::*;
            $(contract_tests!($make; $($extra),*);)?
            contract_tests!(
                $make;
                concurrent_appends_to_one_room_are_gap_free,
                concurrent_appends_to_many_streams_are_gap_free_per_stream,
                expect_seq_conflicts,
                racing_expect_seq_has_one_winner,
                client_msg_id_makes_sends_idempotent,
                concurrent_resends_append_once,
                concurrent_closes_and_resends_across_streams,
                reads_page_in_order,
                joins_and_leaves_project_membership,
                connections_open_and_close,
                projection_ignores_redelivered_and_reordered_events,
                disconnect_before_connect_leaves_a_closed_tombstone,
                audience_follows_joins_leaves_connects_and_disconnects_in_any_order,
                membership_is_checked_with_the_append,
                racing_joins_log_one_joined,
                joins_past_the_rooms_cap_are_refused,
                connections_hear_a_room_live_from_when_they_started_listening,
                listeners_name_the_node_that_holds_each_connection,
                a_nodes_open_connections_are_the_ones_it_holds,
            );
        }
    };
}

macro_rules! contract_tests {
    ($make:expr; $($test:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn $test() {
                let fixture: Fixture = $make.await;
                contract::$test(&fixture.store).await;
            }
        )*
    };
}

// A local feed is what the local tail follows (memory, SQLite); checkpoints are what the stream
// fan-out keeps (memory, DynamoDB). Each store is held to the ports it has, and the stores that
// check a join's room cap atomically (memory, SQLite) to that.
contract_suite!(memory, memory_store(); feed_wakes_watchers_after_an_append, checkpoints_only_move_forward, racing_joins_take_the_last_place_once);
contract_suite!(sqlite, sqlite_store(); feed_wakes_watchers_after_an_append, racing_joins_take_the_last_place_once, closed_connections_are_forgotten_after_the_retention);
contract_suite!(dynamodb, dynamodb_store(); checkpoints_only_move_forward);

fn room(name: &str) -> RoomName {
    RoomName::parse(name).unwrap()
}

fn user(name: &str) -> UserId {
    UserId::parse(name).unwrap()
}

fn conn(id: &str) -> ConnectionId {
    ConnectionId::new(id)
}

fn say(r: &str, u: &str, text: &str) -> EventBody {
    EventBody::MessagePosted {
        room: room(r),
        user: user(u),
        text: text.to_owned(),
        client_msg_id: None,
        connection: None,
    }
}

fn say_once(r: &str, u: &str, text: &str, client_msg_id: &str) -> EventBody {
    EventBody::MessagePosted {
        room: room(r),
        user: user(u),
        text: text.to_owned(),
        client_msg_id: Some(client_msg_id.to_owned()),
        connection: None,
    }
}

fn say_from(r: &str, u: &str, text: &str, from: &str) -> EventBody {
    EventBody::MessagePosted {
        room: room(r),
        user: user(u),
        text: text.to_owned(),
        client_msg_id: None,
        connection: Some(conn(from)),
    }
}

fn joined(r: &str, u: &str) -> EventBody {
    EventBody::Joined {
        room: room(r),
        user: user(u),
    }
}

fn left(r: &str, u: &str) -> EventBody {
    EventBody::Left {
        room: room(r),
        user: user(u),
    }
}

fn connected(c: &str, u: &str) -> EventBody {
    EventBody::Connected {
        connection: conn(c),
        user: user(u),
        source_ip: Some("192.0.2.7".to_owned()),
        node: None,
    }
}

/// `u`'s connection `c` opened, held by the `palaver serve` node `node` (none: API Gateway).
fn connected_on(c: &str, u: &str, node: Option<&str>) -> EventBody {
    EventBody::Connected {
        connection: conn(c),
        user: user(u),
        source_ip: None,
        node: node.map(str::to_owned),
    }
}

fn disconnected(c: &str, u: &str) -> EventBody {
    EventBody::Disconnected {
        connection: conn(c),
        user: user(u),
        reason: DisconnectReason::Closed,
    }
}

fn text(event: &Event) -> &str {
    match &event.body {
        EventBody::MessagePosted { text, .. } => text,
        other => panic!("not a message: {other:?}"),
    }
}

fn seqs(events: &[Event]) -> Vec<u64> {
    events.iter().map(|e| e.seq).collect()
}

async fn append(store: &Store, body: EventBody) -> Appended {
    store.log.append(body, Expect::Next).await.expect("append")
}

/// Everything the directory answers about these rooms, users and connections: two snapshots are
/// equal exactly when the projection is.
#[derive(Debug, PartialEq)]
struct Snapshot {
    rooms: Vec<RoomRecord>,
    members: Vec<Vec<MemberRecord>>,
    audience: Vec<Vec<ConnectionId>>,
    is_member: Vec<bool>,
    rooms_of: Vec<Vec<RoomName>>,
    open: Vec<ConnectionRecord>,
    open_by_user: Vec<Vec<ConnectionRecord>>,
    connections: Vec<Option<ConnectionRecord>>,
}

async fn snapshot(store: &Store, rooms: &[&str], users: &[&str], conns: &[&str]) -> Snapshot {
    let d = &store.directory;
    let mut s = Snapshot {
        rooms: d.rooms().await.unwrap(),
        members: Vec::new(),
        audience: Vec::new(),
        is_member: Vec::new(),
        rooms_of: Vec::new(),
        open: d.open_connections(None).await.unwrap(),
        open_by_user: Vec::new(),
        connections: Vec::new(),
    };
    for r in rooms {
        s.members.push(d.members(&room(r)).await.unwrap());
        s.audience.push(d.audience(&room(r)).await.unwrap());
        for u in users {
            s.is_member
                .push(d.is_member(&room(r), &user(u)).await.unwrap());
        }
    }
    for u in users {
        s.rooms_of.push(d.rooms_of(&user(u)).await.unwrap());
        s.open_by_user
            .push(d.open_connections(Some(&user(u))).await.unwrap());
    }
    for c in conns {
        s.connections.push(d.connection(&conn(c)).await.unwrap());
    }
    s
}

mod contract {
    use super::*;
    use std::collections::BTreeSet;
    use std::time::{Duration, Instant};

    pub async fn concurrent_appends_to_one_room_are_gap_free(store: &Store) {
        const TASKS: usize = 50;
        const EACH: usize = 20;
        const N: u64 = (TASKS * EACH) as u64;
        let started = Instant::now();
        let tasks: Vec<_> = (0..TASKS)
            .map(|t| {
                let store = store.clone();
                tokio::spawn(async move {
                    let mut seqs = Vec::with_capacity(EACH);
                    for i in 0..EACH {
                        let appended =
                            append(&store, say("busy", "ana", &format!("{t}/{i}"))).await;
                        assert!(!appended.duplicate);
                        seqs.push(appended.event.seq);
                    }
                    seqs
                })
            })
            .collect();
        let mut all = BTreeSet::new();
        for task in tasks {
            let seqs = task.await.unwrap();
            assert!(
                seqs.windows(2).all(|w| w[0] < w[1]),
                "one task's appends are ordered: {seqs:?}"
            );
            for seq in seqs {
                assert!(all.insert(seq), "seq {seq} handed out twice");
            }
        }
        eprintln!(
            "{N} concurrent appends ({TASKS} tasks x {EACH}) to one room took {:?}",
            started.elapsed()
        );
        assert_eq!(
            all,
            (1..=N).collect::<BTreeSet<_>>(),
            "no gap, no duplicate"
        );

        let stream = Stream::Room(room("busy"));
        assert_eq!(store.log.head(&stream).await.unwrap(), N);
        let events = store.log.read(&stream, 0, 5000).await.unwrap();
        assert_eq!(seqs(&events), (1..=N).collect::<Vec<_>>());
        let texts: BTreeSet<&str> = events.iter().map(text).collect();
        assert_eq!(texts.len(), TASKS * EACH, "every append is there once");

        if let Some(feed) = &store.feed {
            let all = feed.read_all(0, 5000).await.unwrap();
            assert_eq!(all.len(), events.len());
            assert!(
                all.windows(2).all(|w| w[0].0 < w[1].0),
                "positions strictly increase"
            );
            let in_commit_order: Vec<Event> = all.into_iter().map(|(_, e)| e).collect();
            assert_eq!(in_commit_order, events, "commit order is seq order");
        }
    }

    pub async fn concurrent_appends_to_many_streams_are_gap_free_per_stream(store: &Store) {
        let rooms = ["r0", "r1", "r2", "r3", "r4"];
        let tasks: Vec<_> = (0..20)
            .map(|t| {
                let store = store.clone();
                tokio::spawn(async move {
                    for i in 0..10 {
                        let r = rooms[(t + i) % rooms.len()];
                        append(&store, say(r, "bo", &format!("{t}/{i}"))).await;
                        let c = format!("c{t}-{i}");
                        let opened = store
                            .log
                            .append(connected(&c, "bo"), Expect::Seq(1))
                            .await
                            .unwrap();
                        assert_eq!(opened.event.seq, 1);
                    }
                })
            })
            .collect();
        for task in tasks {
            task.await.unwrap();
        }
        for r in rooms {
            let events = store
                .log
                .read(&Stream::Room(room(r)), 0, 500)
                .await
                .unwrap();
            assert_eq!(seqs(&events), (1..=40).collect::<Vec<_>>(), "{r}");
        }
        if let Some(feed) = &store.feed {
            let all = feed.read_all(0, 1000).await.unwrap();
            assert_eq!(all.len(), 400);
            let positions: Vec<u64> = all.iter().map(|(p, _)| *p).collect();
            assert!(positions.windows(2).all(|w| w[0] < w[1]));
        }
    }

    pub async fn expect_seq_conflicts(store: &Store) {
        let stream = Stream::Connection(conn("c1"));
        let first = store
            .log
            .append(connected("c1", "ana"), Expect::Seq(1))
            .await
            .unwrap();
        assert_eq!(first.event.seq, 1);
        assert_eq!(first.event.stream, stream);

        match store
            .log
            .append(connected("c1", "ana"), Expect::Seq(1))
            .await
        {
            Err(StoreError::Conflict {
                stream: s,
                expected: 1,
                next: 2,
            }) => assert_eq!(s, stream.key()),
            other => panic!("second seq 1 must conflict: {other:?}"),
        }
        assert_eq!(
            store.log.head(&stream).await.unwrap(),
            1,
            "nothing appended"
        );

        let closed = store
            .log
            .append(disconnected("c1", "ana"), Expect::Seq(2))
            .await
            .unwrap();
        assert_eq!(closed.event.seq, 2);
        assert!(matches!(
            store
                .log
                .append(disconnected("c1", "ana"), Expect::Seq(2))
                .await,
            Err(StoreError::Conflict { next: 3, .. })
        ));
        assert!(matches!(
            store
                .log
                .append(connected("c2", "ana"), Expect::Seq(5))
                .await,
            Err(StoreError::Conflict {
                expected: 5,
                next: 1,
                ..
            })
        ));
        assert_eq!(
            store
                .log
                .head(&Stream::Connection(conn("c2")))
                .await
                .unwrap(),
            0
        );
        assert_eq!(seqs(&store.log.read(&stream, 0, 10).await.unwrap()), [1, 2]);
    }

    pub async fn racing_expect_seq_has_one_winner(store: &Store) {
        let tasks: Vec<_> = (0..20)
            .map(|_| {
                let store = store.clone();
                tokio::spawn(async move {
                    store
                        .log
                        .append(connected("c1", "ana"), Expect::Seq(1))
                        .await
                })
            })
            .collect();
        let mut won = 0;
        for task in tasks {
            match task.await.unwrap() {
                Ok(appended) => {
                    assert_eq!(appended.event.seq, 1);
                    won += 1;
                }
                Err(StoreError::Conflict { next: 2, .. }) => {}
                Err(e) => panic!("a loser gets a conflict, not {e}"),
            }
        }
        assert_eq!(won, 1);
        assert_eq!(
            store
                .log
                .head(&Stream::Connection(conn("c1")))
                .await
                .unwrap(),
            1
        );
    }

    pub async fn client_msg_id_makes_sends_idempotent(store: &Store) {
        let lobby = Stream::Room(room("lobby"));
        append(store, say("lobby", "ana", "before")).await;
        let first = append(store, say_once("lobby", "ana", "hello", "m1")).await;
        assert!(!first.duplicate);
        assert_eq!(first.event.seq, 2);

        let again = append(store, say_once("lobby", "ana", "hello (resent)", "m1")).await;
        assert!(again.duplicate);
        assert_eq!(again.event, first.event, "the first event comes back");
        assert_eq!(store.log.head(&lobby).await.unwrap(), 2, "head unchanged");

        let other_user = append(store, say_once("lobby", "bo", "hello", "m1")).await;
        assert!(!other_user.duplicate);
        assert_eq!(other_user.event.seq, 3);

        let other_room = append(store, say_once("garden", "ana", "hello", "m1")).await;
        assert!(!other_room.duplicate);
        assert_eq!(other_room.event.seq, 1);

        let other_id = append(store, say_once("lobby", "ana", "hello", "m2")).await;
        assert!(!other_id.duplicate);
        assert_eq!(other_id.event.seq, 4);

        let events = store.log.read(&lobby, 0, 10).await.unwrap();
        assert_eq!(seqs(&events), [1, 2, 3, 4]);
        assert_eq!(events[1], first.event);
        if let Some(feed) = &store.feed {
            assert_eq!(feed.read_all(0, 100).await.unwrap().len(), 5);
        }
    }

    pub async fn concurrent_resends_append_once(store: &Store) {
        let tasks: Vec<_> = (0..20)
            .map(|i| {
                let store = store.clone();
                tokio::spawn(async move {
                    append(&store, say_once("lobby", "ana", &format!("try {i}"), "m1")).await
                })
            })
            .collect();
        let mut answers = Vec::new();
        for task in tasks {
            answers.push(task.await.unwrap());
        }
        assert_eq!(answers.iter().filter(|a| !a.duplicate).count(), 1);
        assert!(answers.iter().all(|a| a.event == answers[0].event));
        assert_eq!(
            store.log.head(&Stream::Room(room("lobby"))).await.unwrap(),
            1
        );
    }

    /// Many streams at once, as a busy server sees them (and as SQLite's committer batches
    /// them): each connection is closed twice concurrently with `Expect::Seq(2)`, each room gets
    /// the same `clientMsgId` several times concurrently, between plain messages. One close and
    /// one send per key win; every room stays gap-free.
    pub async fn concurrent_closes_and_resends_across_streams(store: &Store) {
        const CONNS: usize = 12;
        const ROOMS: usize = 6;
        for c in 0..CONNS {
            append(store, connected(&format!("c{c}"), "ana")).await;
        }
        let closes = (0..2 * CONNS).map(|i| {
            let store = store.clone();
            tokio::spawn(async move {
                let c = format!("c{}", i % CONNS);
                let closed = store
                    .log
                    .append(disconnected(&c, "ana"), Expect::Seq(2))
                    .await;
                (c, closed.map(|a| a.event.seq))
            })
        });
        let sends = (0..4 * ROOMS).map(|i| {
            let store = store.clone();
            tokio::spawn(async move {
                let r = format!("r{}", i % ROOMS);
                append(&store, say(&r, "bo", &format!("plain {i}"))).await;
                let once = append(&store, say_once(&r, "bo", &format!("try {i}"), "m1")).await;
                (r, once)
            })
        });
        let closes: Vec<_> = closes.collect();
        let sends: Vec<_> = sends.collect();

        let mut closed = BTreeSet::new();
        for task in closes {
            match task.await.unwrap() {
                (c, Ok(2)) => assert!(closed.insert(c.clone()), "{c} closed twice"),
                (_, Err(StoreError::Conflict { next: 3, .. })) => {}
                (c, other) => panic!("{c}: a close wins at seq 2 or conflicts: {other:?}"),
            }
        }
        assert_eq!(closed.len(), CONNS, "every connection closed once");
        let mut answers = Vec::new();
        for task in sends {
            answers.push(task.await.unwrap());
        }
        let mut firsts = std::collections::BTreeMap::new();
        for (r, once) in answers.iter().filter(|(_, once)| !once.duplicate) {
            assert!(
                firsts.insert(r.clone(), once.event.clone()).is_none(),
                "{r}: m1 appended twice"
            );
        }
        assert_eq!(firsts.len(), ROOMS, "m1 appended once per room");
        for (r, once) in &answers {
            assert_eq!(
                once.event, firsts[r],
                "{r}: every try answers with the first"
            );
        }
        for (r, first) in &firsts {
            let events = store
                .log
                .read(&Stream::Room(room(r)), 0, 100)
                .await
                .unwrap();
            assert_eq!(seqs(&events), (1..=5).collect::<Vec<_>>(), "{r}");
            assert_eq!(events.iter().filter(|e| e == &first).count(), 1, "{r}");
        }
        for c in 0..CONNS {
            let record = store
                .directory
                .connection(&conn(&format!("c{c}")))
                .await
                .unwrap();
            assert!(!record.expect("registered").open);
        }
    }

    pub async fn reads_page_in_order(store: &Store) {
        let stream = Stream::Room(room("long"));
        let mut appended = Vec::new();
        for i in 0..250 {
            appended.push(
                append(store, say("long", "ana", &format!("m{i}")))
                    .await
                    .event,
            );
        }
        assert_eq!(store.log.head(&stream).await.unwrap(), 250);

        let mut paged = Vec::new();
        let mut after = 0;
        loop {
            let page = store.log.read(&stream, after, 100).await.unwrap();
            if page.is_empty() {
                break;
            }
            assert!(page.len() <= 100);
            after = page.last().unwrap().seq;
            paged.extend(page);
        }
        assert_eq!(
            paged, appended,
            "pages give every event, in order, as appended"
        );
        assert_eq!(
            seqs(&store.log.read(&stream, 200, 100).await.unwrap()),
            (201..=250).collect::<Vec<_>>()
        );
        assert!(store.log.read(&stream, 250, 100).await.unwrap().is_empty());
        assert!(
            store
                .log
                .read(&stream, u64::MAX, 100)
                .await
                .unwrap()
                .is_empty()
        );
        assert!(store.log.read(&stream, 0, 0).await.unwrap().is_empty());

        let unknown = Stream::Room(room("nowhere"));
        assert!(store.log.read(&unknown, 0, 100).await.unwrap().is_empty());
        assert_eq!(store.log.head(&unknown).await.unwrap(), 0);

        if let Some(feed) = &store.feed {
            let first = feed.read_all(0, 100).await.unwrap();
            let rest = feed.read_all(first.last().unwrap().0, 1000).await.unwrap();
            assert_eq!((first.len(), rest.len()), (100, 150));
            let all: Vec<Event> = first.into_iter().chain(rest).map(|(_, e)| e).collect();
            assert_eq!(all, appended);
            assert!(feed.read_all(u64::MAX, 10).await.unwrap().is_empty());
        }
    }

    /// The stream fan-out's checkpoints: 0 before anything, per log stream, and never backwards
    /// (a retried batch that advances to an older seq must not make records count twice).
    pub async fn checkpoints_only_move_forward(store: &Store) {
        let checkpoints = store
            .checkpoints
            .as_ref()
            .expect("this store keeps checkpoints");
        let lobby = Stream::Room(room("lobby"));
        let other = Stream::Room(room("other"));
        assert_eq!(checkpoints.delivered(&lobby).await.unwrap(), 0);
        checkpoints.advance(&lobby, 5, None).await.unwrap();
        assert_eq!(checkpoints.delivered(&lobby).await.unwrap(), 5);
        assert_eq!(
            checkpoints.delivered(&other).await.unwrap(),
            0,
            "per stream"
        );
        checkpoints.advance(&lobby, 3, None).await.unwrap();
        assert_eq!(
            checkpoints.delivered(&lobby).await.unwrap(),
            5,
            "never backwards"
        );
        // Racing advances leave the highest.
        let racers = (1..=8u64).map(|seq| checkpoints.advance(&other, seq * 10, None));
        for result in futures_util::future::join_all(racers).await {
            result.unwrap();
        }
        assert_eq!(checkpoints.delivered(&other).await.unwrap(), 80);

        // The delivery-queue lease is kept with a checkpoint that moves, and only then.
        let until = chrono::DateTime::from_timestamp_millis(1_900_000_000_123).unwrap();
        let lease = RelayLease { until, lanes: 12 };
        checkpoints.advance(&lobby, 6, Some(lease)).await.unwrap();
        let later = RelayLease {
            until: until + chrono::Duration::minutes(5),
            lanes: 40,
        };
        checkpoints.advance(&lobby, 6, Some(later)).await.unwrap();
        checkpoints.advance(&lobby, 7, None).await.unwrap();
        assert_eq!(
            checkpoints.checkpoint(&lobby).await.unwrap(),
            Checkpoint {
                seq: 7,
                relay: Some(lease)
            }
        );
        assert_eq!(checkpoints.checkpoint(&other).await.unwrap().relay, None);
    }

    /// With `Expect::Membership` the log takes no message or leave from a non-member and no
    /// second join, and says why.
    pub async fn membership_is_checked_with_the_append(store: &Store) {
        let log = &store.log;
        let refused = |result: StoreResult<Appended>| match result {
            Err(StoreError::Refused(refusal)) => refusal,
            other => panic!("expected a refusal, got {other:?}"),
        };
        let not_member = Refusal::NotMember {
            room: room("club"),
            user: user("ana"),
        };
        assert_eq!(
            refused(
                log.append(say("club", "ana", "hi"), Expect::Membership)
                    .await
            ),
            not_member
        );
        assert_eq!(
            refused(log.append(left("club", "ana"), Expect::Membership).await),
            not_member
        );
        assert_eq!(log.head(&Stream::Room(room("club"))).await.unwrap(), 0);

        let join = log.append(joined("club", "ana"), Expect::Membership).await;
        assert_eq!(join.expect("first join").event.seq, 1);
        assert_eq!(
            refused(log.append(joined("club", "ana"), Expect::Membership).await),
            Refusal::AlreadyMember {
                room: room("club"),
                user: user("ana"),
            }
        );
        let sent = log
            .append(say("club", "ana", "hi"), Expect::Membership)
            .await;
        assert_eq!(sent.expect("a member's message").event.seq, 2);
        let left_at = log.append(left("club", "ana"), Expect::Membership).await;
        assert_eq!(left_at.expect("a member leaves").event.seq, 3);
        assert_eq!(
            refused(
                log.append(say("club", "ana", "late"), Expect::Membership)
                    .await
            ),
            not_member
        );
        assert_eq!(log.head(&Stream::Room(room("club"))).await.unwrap(), 3);
    }

    /// A capped join (`Expect::Join`) is refused once its user is in `max_rooms` rooms; a join
    /// of a room the user is in already is still just `AlreadyMember`; a leave makes a place.
    pub async fn joins_past_the_rooms_cap_are_refused(store: &Store) {
        let log = &store.log;
        let cap = Expect::Join { max_rooms: 2 };
        for name in ["one", "two"] {
            log.append(joined(name, "ana"), cap)
                .await
                .expect("a join under the cap");
        }
        match log.append(joined("three", "ana"), cap).await {
            Err(StoreError::Refused(Refusal::TooManyRooms { user: who, rooms })) => {
                assert_eq!((who, rooms), (user("ana"), 2));
            }
            other => panic!("expected TooManyRooms, got {other:?}"),
        }
        assert_eq!(log.head(&Stream::Room(room("three"))).await.unwrap(), 0);
        match log.append(joined("two", "ana"), cap).await {
            Err(StoreError::Refused(Refusal::AlreadyMember { .. })) => {}
            other => panic!("expected AlreadyMember, got {other:?}"),
        }
        // Another user is not counted against ana's cap.
        log.append(joined("three", "ben"), cap)
            .await
            .expect("ben's first room");
        log.append(left("one", "ana"), Expect::Membership)
            .await
            .expect("leave");
        let third = log.append(joined("three", "ana"), cap).await;
        assert_eq!(third.expect("a place was made").event.seq, 2);
        assert_eq!(
            store.directory.rooms_of(&user("ana")).await.unwrap(),
            [room("three"), room("two")]
        );
    }

    /// Where the cap is checked in the same atomic step as the append (memory, SQLite), eight
    /// joins at once for the last place log exactly one `joined`.
    pub async fn racing_joins_take_the_last_place_once(store: &Store) {
        let cap = Expect::Join { max_rooms: 2 };
        store
            .log
            .append(joined("home", "ana"), cap)
            .await
            .expect("first room");
        let tasks: Vec<_> = (0..8)
            .map(|i| {
                let log = store.log.clone();
                tokio::spawn(
                    async move { log.append(joined(&format!("room{i}"), "ana"), cap).await },
                )
            })
            .collect();
        let mut appended = 0;
        for task in tasks {
            match task.await.unwrap() {
                Ok(_) => appended += 1,
                Err(StoreError::Refused(Refusal::TooManyRooms { rooms: 2, .. })) => {}
                Err(other) => panic!("unexpected {other}"),
            }
        }
        assert_eq!(appended, 1, "exactly one join takes the last place");
        assert_eq!(
            store.directory.rooms_of(&user("ana")).await.unwrap().len(),
            2
        );
    }

    /// Retention (SQLite): closed connections past the cut-off are forgotten, oldest first and
    /// at most a batch at a time — their events and registry rows — while open connections,
    /// recent closes, room streams and the log's last event stay, and the log's positions go on
    /// from where they were.
    pub async fn closed_connections_are_forgotten_after_the_retention(store: &Store) {
        let retention = store.retention.as_ref().expect("this store forgets");
        let feed = store.feed.as_ref().expect("this store has a feed");
        for (c, u) in [("old1", "ana"), ("old2", "bo"), ("old3", "cy")] {
            append(store, connected(c, u)).await;
            append(store, disconnected(c, u)).await;
        }
        append(store, connected("open", "ana")).await;
        append(store, joined("hall", "ana")).await;
        append(store, say("hall", "ana", "kept")).await;
        // The cut-off falls between the closes above and the one below (kept): wait for the
        // clock (in milliseconds, as the store keeps it) to pass it.
        let cut_off = now() + chrono::TimeDelta::milliseconds(2);
        while now() <= cut_off {
            tokio::time::sleep(std::time::Duration::from_millis(1)).await;
        }
        append(store, connected("recent", "bo")).await;
        append(store, disconnected("recent", "bo")).await;
        append(store, say("hall", "ana", "last")).await;
        let last = feed.read_all(0, 1000).await.unwrap().last().unwrap().0;

        assert_eq!(retention.forget_connections(cut_off, 2).await.unwrap(), 2);
        assert_eq!(retention.forget_connections(cut_off, 2).await.unwrap(), 1);
        assert_eq!(retention.forget_connections(cut_off, 2).await.unwrap(), 0);
        for c in ["old1", "old2", "old3"] {
            let stream = Stream::Connection(conn(c));
            assert!(
                store.log.read(&stream, 0, 10).await.unwrap().is_empty(),
                "{c}"
            );
            assert_eq!(
                store.directory.connection(&conn(c)).await.unwrap(),
                None,
                "{c}"
            );
        }
        for c in ["open", "recent"] {
            assert!(
                store
                    .directory
                    .connection(&conn(c))
                    .await
                    .unwrap()
                    .is_some(),
                "{c}"
            );
        }
        let hall = store
            .log
            .read(&Stream::Room(room("hall")), 0, 10)
            .await
            .unwrap();
        assert_eq!(seqs(&hall), [1, 2, 3]);

        // The log's last event is never forgotten, even a forgotten connection's: the next
        // position follows on from it.
        append(store, disconnected("open", "ana")).await;
        let closed = now() + chrono::TimeDelta::seconds(1);
        assert_eq!(
            retention.forget_connections(closed, 10).await.unwrap(),
            1,
            "recent, not open"
        );
        let stream = Stream::Connection(conn("open"));
        assert_eq!(store.log.read(&stream, 0, 10).await.unwrap().len(), 2);
        let next = append(store, say("hall", "ana", "after")).await;
        let after = feed.read_all(last, 10).await.unwrap();
        let positions: Vec<u64> = after.iter().map(|(pos, _)| *pos).collect();
        assert_eq!(positions, [last + 1, last + 2], "positions go on");
        assert_eq!(after[1].1, next.event);
    }

    /// Two connections of one user join at once, twice over: one `joined` each time.
    pub async fn racing_joins_log_one_joined(store: &Store) {
        for round in 0..2 {
            let tasks: Vec<_> = (0..8)
                .map(|_| {
                    let log = store.log.clone();
                    tokio::spawn(async move {
                        log.append(joined("race", "ana"), Expect::Membership).await
                    })
                })
                .collect();
            let mut appended = 0;
            for task in tasks {
                match task.await.unwrap() {
                    Ok(_) => appended += 1,
                    Err(StoreError::Refused(Refusal::AlreadyMember { .. })) => {}
                    Err(other) => panic!("unexpected {other}"),
                }
            }
            assert_eq!(appended, 1, "round {round}: exactly one joined");
            if round == 0 {
                store
                    .log
                    .append(left("race", "ana"), Expect::Membership)
                    .await
                    .expect("leave");
            }
        }
        let events = store
            .log
            .read(&Stream::Room(room("race")), 0, 100)
            .await
            .unwrap();
        assert_eq!(seqs(&events), [1, 2, 3]);
    }

    /// `live_from`: what a connection hears live, as against what it must ask for as history.
    /// Where several nodes (and API Gateway) share a store, each delivers to the connections it
    /// holds: a room's listeners say who holds each, however the listener came to be (the
    /// user joined with the connection open, or the connection opened after the join).
    pub async fn listeners_name_the_node_that_holds_each_connection(store: &Store) {
        append(store, connected_on("a1", "ana", Some("n1"))).await;
        append(store, joined("hall", "ana")).await;
        append(store, joined("hall", "bo")).await;
        append(store, connected_on("b1", "bo", Some("n2"))).await;
        append(store, connected_on("c1", "cy", None)).await;
        append(store, joined("hall", "cy")).await;
        let mut listeners = store.directory.listeners(&room("hall")).await.unwrap();
        listeners.sort_by(|a, b| a.connection.cmp(&b.connection));
        let held: Vec<(&str, Option<&str>)> = listeners
            .iter()
            .map(|l| (l.connection.as_str(), l.node.as_deref()))
            .collect();
        assert_eq!(held, [("a1", Some("n1")), ("b1", Some("n2")), ("c1", None)]);
    }

    /// What a node starting again closes, or another node once its lease lapsed: its own open
    /// connections, none of another node's or API Gateway's, none closed already.
    pub async fn a_nodes_open_connections_are_the_ones_it_holds(store: &Store) {
        append(store, connected_on("a1", "ana", Some("n1"))).await;
        append(store, connected_on("a2", "ana", Some("n1"))).await;
        append(store, connected_on("b1", "bo", Some("n1"))).await;
        append(store, connected_on("b2", "bo", Some("n2"))).await;
        append(store, connected_on("c1", "cy", None)).await;
        append(store, disconnected("a2", "ana")).await;
        let held = |node: &'static str| async move {
            let open = store
                .directory
                .open_connections_held_by(node)
                .await
                .unwrap();
            let mut ids: Vec<String> = open.iter().map(|c| c.id.to_string()).collect();
            ids.sort();
            assert!(
                open.iter()
                    .all(|c| c.open && c.node.as_deref() == Some(node))
            );
            ids
        };
        assert_eq!(held("n1").await, ["a1", "b1"]);
        assert_eq!(held("n2").await, ["b2"]);
        assert!(held("n3").await.is_empty());
        // Every open connection, whoever holds it.
        let all = store.directory.open_connections(None).await.unwrap();
        let mut all: Vec<String> = all.iter().map(|c| c.id.to_string()).collect();
        all.sort();
        assert_eq!(all, ["a1", "b1", "b2", "c1"]);
    }

    pub async fn connections_hear_a_room_live_from_when_they_started_listening(store: &Store) {
        let d = &store.directory;
        let hall = room("hall");
        let live_from = |c: &'static str| {
            let hall = hall.clone();
            async move { d.live_from(&conn(c), &hall).await.unwrap() }
        };
        append(store, connected("a1", "ana")).await;
        let ana_joined = append(store, joined("hall", "ana")).await.event.seq;
        assert_eq!(ana_joined, 1);
        assert_eq!(
            live_from("a1").await,
            Some(1),
            "a connection open at its user's join hears the join itself"
        );
        append(store, say("hall", "ana", "before bo")).await;
        append(store, say("hall", "ana", "still before bo")).await;
        assert_eq!(live_from("b1").await, None, "unknown connection");

        // bo joins from b1: b1 hears from bo's join (seq 4) on.
        append(store, connected("b1", "bo")).await;
        assert_eq!(live_from("b1").await, None, "not a member yet");
        let bo_joined = append(store, joined("hall", "bo")).await.event.seq;
        assert_eq!(bo_joined, 4);
        assert_eq!(live_from("b1").await, Some(4));

        // ana's second connection opens after seq 5: it hears from 6, whatever comes later.
        append(store, say("hall", "bo", "five")).await;
        append(store, connected("a2", "ana")).await;
        append(store, say("hall", "bo", "six")).await;
        assert_eq!(live_from("a2").await, Some(6));
        assert_eq!(live_from("a1").await, Some(1), "a1 is as it was");

        let mut listeners = d.listeners(&hall).await.unwrap();
        listeners.sort_by(|a, b| a.connection.cmp(&b.connection));
        let listeners: Vec<(&str, u64)> = listeners
            .iter()
            .map(|l| (l.connection.as_str(), l.live_from))
            .collect();
        assert_eq!(listeners, [("a1", 1), ("a2", 6), ("b1", 4)]);

        // Closed, or no longer a member: not listening.
        append(store, disconnected("a2", "ana")).await;
        assert_eq!(live_from("a2").await, None);
        append(store, left("hall", "bo")).await;
        assert_eq!(live_from("b1").await, None);
        // Back again: from the new join.
        let again = append(store, joined("hall", "bo")).await.event.seq;
        assert_eq!(live_from("b1").await, Some(again));
    }

    pub async fn joins_and_leaves_project_membership(store: &Store) {
        let d = &store.directory;
        let (lobby, garden) = (room("lobby"), room("garden"));
        let (ana, bo, cy) = (user("ana"), user("bo"), user("cy"));
        append(store, connected("a1", "ana")).await;
        append(store, connected("b1", "bo")).await;
        assert!(
            d.rooms().await.unwrap().is_empty(),
            "connections make no room"
        );

        let ana_joined = append(store, joined("lobby", "ana")).await.event;
        assert!(d.is_member(&lobby, &ana).await.unwrap());
        assert!(!d.is_member(&lobby, &bo).await.unwrap());
        assert_eq!(
            d.members(&lobby).await.unwrap(),
            [MemberRecord {
                user: ana.clone(),
                joined_at: ana_joined.at,
                connections: 1,
            }]
        );
        assert_eq!(d.rooms_of(&ana).await.unwrap(), [room("lobby")]);
        assert_eq!(d.audience(&lobby).await.unwrap(), [conn("a1")]);

        append(store, joined("lobby", "bo")).await;
        append(store, joined("garden", "ana")).await;
        append(store, connected("a2", "ana")).await;
        append(store, joined("lobby", "cy")).await; // cy has no connection: member, not audience
        assert_eq!(
            d.rooms_of(&ana).await.unwrap(),
            [garden.clone(), lobby.clone()]
        );
        assert_eq!(
            d.audience(&lobby).await.unwrap(),
            [conn("a1"), conn("a2"), conn("b1")]
        );
        assert_eq!(d.audience(&garden).await.unwrap(), [conn("a1"), conn("a2")]);

        append(store, disconnected("b1", "bo")).await;
        assert_eq!(d.audience(&lobby).await.unwrap(), [conn("a1"), conn("a2")]);
        let members = d.members(&lobby).await.unwrap();
        let summary: Vec<(&str, usize)> = members
            .iter()
            .map(|m| (m.user.as_str(), m.connections))
            .collect();
        assert_eq!(summary, [("ana", 2), ("bo", 0), ("cy", 0)]);

        // Joining again while a member keeps the first join time.
        append(store, joined("lobby", "ana")).await;
        assert_eq!(d.members(&lobby).await.unwrap()[0].joined_at, ana_joined.at);

        let said = append(store, say("lobby", "bo", "hi")).await.event;
        assert_eq!(said.seq, 5);
        append(store, left("lobby", "ana")).await;
        assert!(!d.is_member(&lobby, &ana).await.unwrap());
        assert_eq!(d.rooms_of(&ana).await.unwrap(), [room("garden")]);
        assert!(d.audience(&lobby).await.unwrap().is_empty());
        let names: Vec<UserId> = d
            .members(&lobby)
            .await
            .unwrap()
            .into_iter()
            .map(|m| m.user)
            .collect();
        assert_eq!(names, [bo.clone(), cy.clone()]);
        assert_eq!(d.rooms_of(&cy).await.unwrap(), [room("lobby")]);

        assert_eq!(
            d.rooms().await.unwrap(),
            [
                RoomRecord {
                    room: garden.clone(),
                    members: 1,
                    online: 1,
                    head: 1,
                },
                RoomRecord {
                    room: lobby.clone(),
                    members: 2,
                    online: 0,
                    head: 6,
                },
            ]
        );

        // Leaving and joining again starts a new membership.
        let rejoined = append(store, joined("lobby", "ana")).await.event;
        assert_eq!(d.members(&lobby).await.unwrap()[0].joined_at, rejoined.at);
        assert_eq!(d.rooms().await.unwrap()[1].online, 1);
    }

    pub async fn connections_open_and_close(store: &Store) {
        let d = &store.directory;
        assert_eq!(d.connection(&conn("nope")).await.unwrap(), None);

        // Opened in this order, with ids sorting the other way: oldest first means by time.
        let z = append(
            store,
            EventBody::Connected {
                connection: conn("z-old"),
                user: user("ana"),
                source_ip: Some("192.0.2.7".to_owned()),
                node: Some("gateway-1".to_owned()),
            },
        )
        .await
        .event;
        tokio::time::sleep(Duration::from_millis(3)).await;
        append(store, connected("b-mid", "bo")).await;
        tokio::time::sleep(Duration::from_millis(3)).await;
        append(
            store,
            EventBody::Connected {
                connection: conn("a-new"),
                user: user("ana"),
                source_ip: None,
                node: None,
            },
        )
        .await;

        let record = d.connection(&conn("z-old")).await.unwrap().unwrap();
        assert_eq!(
            record,
            ConnectionRecord {
                id: conn("z-old"),
                user: user("ana"),
                connected_at: z.at,
                last_active_at: z.at,
                source_ip: Some("192.0.2.7".to_owned()),
                node: Some("gateway-1".to_owned()),
                open: true,
            }
        );
        assert_eq!(
            d.connection(&conn("a-new"))
                .await
                .unwrap()
                .unwrap()
                .source_ip,
            None
        );
        let ids = |records: Vec<ConnectionRecord>| -> Vec<ConnectionId> {
            records.into_iter().map(|r| r.id).collect()
        };
        assert_eq!(
            ids(d.open_connections(Some(&user("ana"))).await.unwrap()),
            [conn("z-old"), conn("a-new")]
        );
        assert_eq!(
            ids(d.open_connections(None).await.unwrap()),
            [conn("z-old"), conn("b-mid"), conn("a-new")]
        );
        assert!(
            d.open_connections(Some(&user("cy")))
                .await
                .unwrap()
                .is_empty()
        );

        // A message sent from a connection makes it active; activity never moves backwards.
        // Stores may record activity with the append (memory, SQLite) or leave it to the fan-out,
        // which applies each batch's latest message per connection (DynamoDB: no second write on
        // a message's path): applying the event here, as the fan-out would, covers both.
        tokio::time::sleep(Duration::from_millis(3)).await;
        append(store, joined("lobby", "ana")).await;
        let said = append(store, say_from("lobby", "ana", "hi", "z-old"))
            .await
            .event;
        d.apply(&said).await.unwrap();
        let record = d.connection(&conn("z-old")).await.unwrap().unwrap();
        assert_eq!(
            (record.connected_at, record.last_active_at),
            (z.at, said.at)
        );
        assert!(said.at > z.at);
        d.apply(&Event::record(
            say_from("lobby", "ana", "late", "z-old"),
            1,
            z.at,
        ))
        .await
        .unwrap();
        assert_eq!(
            d.connection(&conn("z-old"))
                .await
                .unwrap()
                .unwrap()
                .last_active_at,
            said.at
        );

        let closed = append(store, disconnected("z-old", "ana")).await.event;
        assert_eq!(closed.seq, 2);
        let record = d.connection(&conn("z-old")).await.unwrap().unwrap();
        assert!(!record.open);
        assert_eq!((record.connected_at, record.user), (z.at, user("ana")));
        assert_eq!(
            ids(d.open_connections(Some(&user("ana"))).await.unwrap()),
            [conn("a-new")]
        );
        assert_eq!(
            ids(d.open_connections(None).await.unwrap()),
            [conn("b-mid"), conn("a-new")]
        );
        assert_eq!(d.audience(&room("lobby")).await.unwrap(), [conn("a-new")]);
    }

    /// A scenario that exercises every kind of change, including a leave and a re-join and a
    /// closed connection. Returns its events in log order.
    async fn scenario(store: &Store) -> Vec<Event> {
        let mut events = Vec::new();
        for body in [
            connected("a1", "ana"),
            connected("b1", "bo"),
            joined("lobby", "ana"),
            joined("lobby", "bo"),
            say_from("lobby", "ana", "hi", "a1"),
            joined("garden", "bo"),
            left("lobby", "ana"),
            disconnected("b1", "bo"),
            connected("b2", "bo"),
            joined("lobby", "cy"),
            left("lobby", "cy"),
            joined("lobby", "cy"),
            say_from("garden", "bo", "anyone?", "b2"),
            connected("c1", "cy"),
        ] {
            events.push(append(store, body).await.event);
        }
        events
    }

    const ROOMS: [&str; 3] = ["lobby", "garden", "nowhere"];
    const USERS: [&str; 4] = ["ana", "bo", "cy", "dee"];
    const CONNS: [&str; 5] = ["a1", "b1", "b2", "c1", "zz"];

    pub async fn projection_ignores_redelivered_and_reordered_events(store: &Store) {
        let events = scenario(store).await;
        let d = &store.directory;
        // Once through the fan-out's hands (which records activity where the append did not),
        // then again and again: nothing may change after the first time.
        for event in &events {
            d.apply(event).await.unwrap();
        }
        let expected = snapshot(store, &ROOMS, &USERS, &CONNS).await;

        for event in &events {
            d.apply(event).await.unwrap();
        }
        assert_eq!(
            snapshot(store, &ROOMS, &USERS, &CONNS).await,
            expected,
            "again"
        );

        for event in events.iter().rev() {
            d.apply(event).await.unwrap();
        }
        assert_eq!(
            snapshot(store, &ROOMS, &USERS, &CONNS).await,
            expected,
            "reversed"
        );

        // The cases by name: an older join after the leave, a connect after its disconnect.
        let ana_joined = &events[2];
        let b1_connected = &events[1];
        d.apply(ana_joined).await.unwrap();
        d.apply(b1_connected).await.unwrap();
        assert!(!d.is_member(&room("lobby"), &user("ana")).await.unwrap());
        assert!(!d.connection(&conn("b1")).await.unwrap().unwrap().open);
        assert_eq!(
            snapshot(store, &ROOMS, &USERS, &CONNS).await,
            expected,
            "stale"
        );

        // The log itself did not grow.
        assert_eq!(
            store.log.head(&Stream::Room(room("lobby"))).await.unwrap(),
            7
        );
        if let Some(feed) = &store.feed {
            assert_eq!(feed.read_all(0, 100).await.unwrap().len(), events.len());
        }
    }

    pub async fn disconnect_before_connect_leaves_a_closed_tombstone(store: &Store) {
        let d = &store.directory;
        let connect_at = now();
        let disconnect_at = connect_at + chrono::Duration::milliseconds(5);
        let connect = Event::record(connected("x1", "dee"), 1, connect_at);
        let disconnect = Event::record(disconnected("x1", "dee"), 2, disconnect_at);

        d.apply(&disconnect).await.unwrap();
        let tombstone = ConnectionRecord {
            id: conn("x1"),
            user: user("dee"),
            connected_at: disconnect_at,
            last_active_at: disconnect_at,
            source_ip: None,
            node: None,
            open: false,
        };
        assert_eq!(
            d.connection(&conn("x1")).await.unwrap(),
            Some(tombstone.clone())
        );

        d.apply(&connect).await.unwrap();
        d.apply(&disconnect).await.unwrap();
        assert_eq!(d.connection(&conn("x1")).await.unwrap(), Some(tombstone));
        assert!(
            d.open_connections(Some(&user("dee")))
                .await
                .unwrap()
                .is_empty()
        );
        assert!(d.open_connections(None).await.unwrap().is_empty());
    }

    /// Every order of one user's join, leave, connect and disconnect (each event applied twice
    /// in a row, then the whole order again forwards and backwards), with a second connection
    /// of the user open throughout: after each step the room's audience is exactly the user's
    /// open connections while the user is a member — a repeated or older event never brings a
    /// listener back.
    pub async fn audience_follows_joins_leaves_connects_and_disconnects_in_any_order(
        store: &Store,
    ) {
        let d = &store.directory;
        let t0 = now();
        let ms = chrono::Duration::milliseconds;
        let mut orders = Vec::new();
        for a in 0..4 {
            for b in 0..4 {
                for c in 0..4 {
                    for e in 0..4 {
                        let order = [a, b, c, e];
                        if BTreeSet::from(order).len() == 4 {
                            orders.push(order);
                        }
                    }
                }
            }
        }
        assert_eq!(orders.len(), 24);
        for (i, order) in orders.iter().enumerate() {
            let (r, u) = (format!("p{i}"), format!("u{i}"));
            let (steady, moving) = (format!("c{i}-0"), format!("c{i}-1"));
            d.apply(&Event::record(connected(&steady, &u), 1, t0))
                .await
                .unwrap();
            let events = [
                Event::record(joined(&r, &u), 1, t0 + ms(1)),
                Event::record(left(&r, &u), 2, t0 + ms(2)),
                Event::record(connected(&moving, &u), 1, t0 + ms(1)),
                Event::record(disconnected(&moving, &u), 2, t0 + ms(2)),
            ];
            let names = ["joined", "left", "connected", "disconnected"];
            let mut applied = [false; 4];
            let expected = |applied: &[bool; 4]| {
                let member = applied[0] && !applied[1];
                let open = applied[2] && !applied[3];
                match (member, open) {
                    (false, _) => vec![],
                    (true, false) => vec![conn(&steady)],
                    (true, true) => vec![conn(&steady), conn(&moving)],
                }
            };
            let mut steps = Vec::new();
            for &k in order {
                steps.push(names[k]);
                for time in ["", " (again)"] {
                    d.apply(&events[k]).await.unwrap();
                    applied[k] = true;
                    assert_eq!(
                        d.audience(&room(&r)).await.unwrap(),
                        expected(&applied),
                        "after {}{time}",
                        steps.join(", ")
                    );
                }
            }
            for &k in order.iter().chain(order.iter().rev()) {
                d.apply(&events[k]).await.unwrap();
            }
            assert_eq!(
                d.audience(&room(&r)).await.unwrap(),
                Vec::<ConnectionId>::new(),
                "{}, then everything again",
                steps.join(", ")
            );
            assert_eq!(
                ids_of(d.open_connections(Some(&user(&u))).await.unwrap()),
                [conn(&steady)]
            );
            assert!(!d.is_member(&room(&r), &user(&u)).await.unwrap());
        }
    }

    fn ids_of(records: Vec<ConnectionRecord>) -> Vec<ConnectionId> {
        records.into_iter().map(|r| r.id).collect()
    }

    pub async fn feed_wakes_watchers_after_an_append(store: &Store) {
        let feed = store.feed.as_ref().expect("this store has a local feed");
        let mut watch = feed.watch();
        assert_eq!(*watch.borrow_and_update(), 0);
        let appended = append(store, say("lobby", "ana", "wake up")).await;
        assert!(watch.has_changed().unwrap(), "the append woke the watcher");
        let position = *watch.borrow_and_update();
        assert_eq!(position, 1);
        assert_eq!(feed.read_all(0, 10).await.unwrap(), [(1, appended.event)]);

        // A rejected append and a duplicate commit nothing new.
        let _ = store
            .log
            .append(joined("lobby", "ana"), Expect::Seq(7))
            .await;
        append(store, say_once("lobby", "ana", "once", "m1")).await;
        append(store, say_once("lobby", "ana", "once", "m1")).await;
        let woke = tokio::time::timeout(Duration::from_secs(1), watch.changed()).await;
        assert!(woke.is_ok());
        assert_eq!(*watch.borrow_and_update(), 2);
        assert_eq!(feed.read_all(0, 10).await.unwrap().len(), 2);
    }
}

mod dynamodb_only {
    use super::*;
    use std::collections::BTreeSet;

    /// Lambda containers do not share the in-process turn-taking a store does per room: two
    /// store instances on the same tables race for every seq through DynamoDB's conditional
    /// put alone. The losers retry at the next seq; nothing is lost, doubled or skipped.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn writers_in_different_processes_race_without_gaps() {
        let fixture = dynamodb_store().await;
        let prefix = fixture
            .prefix
            .clone()
            .expect("a DynamoDB fixture has a prefix");
        let other = dynamo::DynamoStore::new(palaver::store::aws_client().await, &prefix).store();
        let writers: Vec<_> = [fixture.store.clone(), other]
            .into_iter()
            .enumerate()
            .flat_map(|(w, store)| {
                (0..4).map(move |t| {
                    let store = store.clone();
                    tokio::spawn(async move {
                        let mut seqs = Vec::new();
                        for i in 0..15 {
                            let text = format!("{w}/{t}/{i}");
                            seqs.push(append(&store, say("race", "ana", &text)).await.event.seq);
                        }
                        seqs
                    })
                })
            })
            .collect();
        let mut all = BTreeSet::new();
        for writer in writers {
            for seq in writer.await.unwrap() {
                assert!(all.insert(seq), "seq {seq} handed out twice");
            }
        }
        assert_eq!(all, (1..=120).collect::<BTreeSet<u64>>());
        let events = fixture
            .store
            .log
            .read(&Stream::Room(room("race")), 0, 500)
            .await
            .unwrap();
        assert_eq!(seqs(&events), (1..=120).collect::<Vec<u64>>());
        let texts: BTreeSet<&str> = events.iter().map(text).collect();
        assert_eq!(texts.len(), 120, "every message is in the log once");
    }

    /// More listener rows than one transaction holds. A user in 120 rooms connects while
    /// leaving one room and joining another: the connection ends up in the audience of exactly
    /// the rooms the user is then a member of (what did not fit in the connect's transaction is
    /// written after it, under the user's version), and disconnecting takes it out of all of
    /// them. Then a user with 105 connections joins and leaves a room.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn listeners_past_a_transactions_hundred_items() {
        let fixture = dynamodb_store().await;
        let store = &fixture.store;
        let d = &store.directory;
        let rooms: Vec<String> = (0..120).map(|i| format!("r{i:03}")).collect();
        for r in &rooms {
            append(store, joined(r, "ana")).await;
        }
        let (connect, leave, join) = tokio::join!(
            store.log.append(connected("a1", "ana"), Expect::Seq(1)),
            store.log.append(left("r000", "ana"), Expect::Next),
            store.log.append(joined("extra", "ana"), Expect::Next),
        );
        connect.unwrap();
        leave.unwrap();
        join.unwrap();
        let mut rooms_now: Vec<String> = rooms[1..].to_vec();
        rooms_now.push("extra".to_owned());
        for r in &rooms_now {
            assert_eq!(d.audience(&room(r)).await.unwrap(), [conn("a1")], "{r}");
        }
        assert!(d.audience(&room("r000")).await.unwrap().is_empty());

        append(store, disconnected("a1", "ana")).await;
        for r in rooms.iter().chain(&rooms_now) {
            assert!(d.audience(&room(r)).await.unwrap().is_empty(), "{r}");
        }

        let conns: Vec<String> = (0..105).map(|i| format!("b{i:03}")).collect();
        for c in &conns {
            store
                .log
                .append(connected(c, "bo"), Expect::Seq(1))
                .await
                .unwrap();
        }
        append(store, joined("hall", "bo")).await;
        let everyone: Vec<ConnectionId> = conns.iter().map(|c| conn(c)).collect();
        assert_eq!(d.audience(&room("hall")).await.unwrap(), everyone);
        append(store, left("hall", "bo")).await;
        assert!(d.audience(&room("hall")).await.unwrap().is_empty());
    }
}

mod dynamodb_stale {
    use super::*;
    use aws_sdk_dynamodb::types::AttributeValue;

    /// API Gateway's `$disconnect` is best effort: a connection whose close never came keeps
    /// its rows until the table's TTL deletes them — which DynamoDB does only eventually, up to
    /// days late. Once its `expires` has passed (3 h after it opened: API Gateway closed it at
    /// 2 h) every read treats it as closed: not open, not counted toward its user's cap, not in
    /// any audience — while the rows are still in the table.
    #[tokio::test]
    async fn a_connection_past_its_ttl_is_closed_to_every_read() {
        let fixture = dynamodb_store().await;
        let store = &fixture.store;
        let d = &store.directory;
        append(store, joined("lobby", "ana")).await;
        for c in ["a1", "a2"] {
            store
                .log
                .append(connected(c, "ana"), Expect::Seq(1))
                .await
                .unwrap();
        }
        assert_eq!(
            d.open_connections(Some(&user("ana"))).await.unwrap().len(),
            2
        );

        // a1's $disconnect never came, and its TTL passed an hour ago; DynamoDB has not
        // deleted its rows yet.
        let client = palaver::store::aws_client().await;
        let tables = dynamo::Tables::new(fixture.prefix.as_deref().unwrap());
        let past = (chrono::Utc::now() - chrono::Duration::hours(1)).timestamp();
        let mut stale = 0;
        let mut rows = client
            .scan()
            .table_name(&tables.state)
            .into_paginator()
            .items()
            .send();
        let mut keys = Vec::new();
        while let Some(item) = rows.try_next().await.unwrap() {
            let key = |name: &str| item.get(name).and_then(|v| v.as_s().ok()).cloned();
            let (Some(pk), Some(sk)) = (key("pk"), key("sk")) else {
                continue;
            };
            if item.contains_key("expires") && (pk.contains("a1") || sk.contains("a1")) {
                keys.push((pk, sk));
            }
        }
        for (pk, sk) in keys {
            client
                .update_item()
                .table_name(&tables.state)
                .key("pk", AttributeValue::S(pk))
                .key("sk", AttributeValue::S(sk))
                .update_expression("SET expires = :past")
                .expression_attribute_values(":past", AttributeValue::N(past.to_string()))
                .send()
                .await
                .unwrap();
            stale += 1;
        }
        assert!(stale >= 3, "a1's registry, user and listener rows: {stale}");

        let open = d.open_connections(Some(&user("ana"))).await.unwrap();
        assert_eq!(
            open.iter().map(|c| c.id.as_str()).collect::<Vec<_>>(),
            ["a2"]
        );
        assert!(!d.connection(&conn("a1")).await.unwrap().unwrap().open);
        assert_eq!(d.audience(&room("lobby")).await.unwrap(), [conn("a2")]);
        assert_eq!(
            d.live_from(&conn("a1"), &room("lobby")).await.unwrap(),
            None
        );
        let everyone = d.open_connections(None).await.unwrap();
        assert!(everyone.iter().all(|c| c.id.as_str() != "a1"));
    }
}

mod dynamodb_retention {
    use super::*;
    use aws_sdk_dynamodb::types::{AttributeValue, TimeToLiveStatus};
    use std::time::Duration;

    /// The item at `(key name = key value, sort name = sort value)` of `table`.
    async fn item(
        client: &aws_sdk_dynamodb::Client,
        table: &str,
        key: [(&str, AttributeValue); 2],
    ) -> std::collections::HashMap<String, AttributeValue> {
        client
            .get_item()
            .table_name(table)
            .set_key(Some(
                key.into_iter().map(|(k, v)| (k.to_owned(), v)).collect(),
            ))
            .consistent_read(true)
            .send()
            .await
            .expect("get_item")
            .item
            .expect("the item exists")
    }

    fn expires(item: &std::collections::HashMap<String, AttributeValue>) -> Option<i64> {
        item.get("expires")
            .map(|v| v.as_n().expect("a number").parse().expect("an integer"))
    }

    fn s(v: &str) -> AttributeValue {
        AttributeValue::S(v.to_owned())
    }

    fn n(v: u64) -> AttributeValue {
        AttributeValue::N(v.to_string())
    }

    /// On DynamoDB the tables' TTL forgets closed connections: both tables expire by `expires`;
    /// a connection's events and its closed registry row carry the retention after the close
    /// (`connected`, written before anyone knows when that is, from the latest it can be), and
    /// room events carry none. With `forever`, nothing of a connection expires once closed.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn closed_connections_expire_by_ttl() {
        let fixture = dynamodb_store().await;
        let prefix = fixture.prefix.clone().expect("a prefix");
        let tables = dynamo::Tables::new(&prefix);
        let client = palaver::store::aws_client().await;
        for table in [&tables.events, &tables.state] {
            let ttl = client
                .describe_time_to_live()
                .table_name(table)
                .send()
                .await
                .unwrap();
            let ttl = ttl.time_to_live_description().expect("a TTL description");
            assert_eq!(ttl.attribute_name(), Some("expires"), "{table}");
            assert_eq!(
                ttl.time_to_live_status(),
                Some(&TimeToLiveStatus::Enabled),
                "{table}"
            );
        }

        let day = Duration::from_secs(86_400);
        for (retention, c) in [(Some(day), "kept-a-day"), (None, "kept-forever")] {
            let store =
                dynamo::DynamoStore::keeping_connections(client.clone(), &prefix, retention)
                    .store();
            let opened = append(&store, connected(c, "ana")).await.event;
            append(&store, joined("hall", "ana")).await;
            let closed = append(&store, disconnected(c, "ana")).await.event;
            let stream = s(&format!("c:{c}"));
            let connected_item = item(
                &client,
                &tables.events,
                [("stream", stream.clone()), ("seq", n(1))],
            )
            .await;
            let disconnected_item =
                item(&client, &tables.events, [("stream", stream), ("seq", n(2))]).await;
            let row = item(
                &client,
                &tables.state,
                [("pk", s(&format!("conn#{c}"))), ("sk", s("conn"))],
            )
            .await;
            match retention {
                Some(kept) => {
                    let kept = kept.as_secs() as i64;
                    let latest_close = opened.at.timestamp() + dynamo::CONNECTION_TTL_SECS;
                    assert_eq!(expires(&connected_item), Some(latest_close + kept));
                    assert_eq!(
                        expires(&disconnected_item),
                        Some(closed.at.timestamp() + kept)
                    );
                    assert_eq!(expires(&row), Some(closed.at.timestamp() + kept));
                }
                None => {
                    assert_eq!(expires(&connected_item), None);
                    assert_eq!(expires(&disconnected_item), None);
                    assert_eq!(expires(&row), None);
                }
            }
        }
        let room_event = item(
            &client,
            &tables.events,
            [("stream", s("r:hall")), ("seq", n(1))],
        )
        .await;
        assert_eq!(expires(&room_event), None, "room streams are kept");
    }
}

mod sqlite_only {
    use super::*;

    /// Everything `read_all` returns from `after` on, page by page, as the tail reads it.
    async fn read_on(store: &Store, mut after: u64) -> Vec<(u64, Event)> {
        let feed = store.feed.as_ref().unwrap();
        let mut all = Vec::new();
        loop {
            let page = feed.read_all(after, 100).await.unwrap();
            let Some(&(last, _)) = page.last() else {
                return all;
            };
            after = last;
            all.extend(page);
        }
    }

    /// Each process keeps the events it committed in memory for its readers; what another
    /// process writes to the same file between them must still be read, in position order.
    #[tokio::test]
    async fn a_feed_reads_what_another_process_appended_to_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("palaver.db");
        let here = open_sqlite(&path).await;
        let there = open_sqlite(&path).await;
        append(&here, connected("a1", "ana")).await;
        append(&here, joined("lobby", "ana")).await;
        append(&there, say("lobby", "ana", "from there")).await;
        append(&here, say("lobby", "ana", "from here")).await;
        append(&there, say("lobby", "ana", "there again")).await;

        let texts = |events: &[(u64, Event)]| -> Vec<(u64, String)> {
            events
                .iter()
                .map(|(pos, event)| {
                    let text = match &event.body {
                        EventBody::MessagePosted { text, .. } => text.clone(),
                        other => other.kind().to_owned(),
                    };
                    (*pos, text)
                })
                .collect()
        };
        let expected: Vec<(u64, String)> = [
            "connected",
            "joined",
            "from there",
            "from here",
            "there again",
        ]
        .iter()
        .enumerate()
        .map(|(i, text)| (i as u64 + 1, (*text).to_owned()))
        .collect();
        for store in [&here, &there] {
            assert_eq!(texts(&read_on(store, 0).await), expected);
            assert_eq!(texts(&read_on(store, 3).await), expected[3..]);
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn data_survives_reopening_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("palaver.db");
        let store = open_sqlite(&path).await;
        append(&store, connected("a1", "ana")).await;
        append(&store, joined("lobby", "ana")).await;
        for i in 0..5 {
            append(
                &store,
                say_once("lobby", "ana", &format!("m{i}"), &format!("id{i}")),
            )
            .await;
        }
        let lobby = Stream::Room(room("lobby"));
        let events = store.log.read(&lobby, 0, 100).await.unwrap();
        let all = store.feed.as_ref().unwrap().read_all(0, 100).await.unwrap();
        let before = snapshot(&store, &["lobby"], &["ana"], &["a1"]).await;
        drop(store);

        let store = open_sqlite(&path).await;
        assert_eq!(store.log.read(&lobby, 0, 100).await.unwrap(), events);
        assert_eq!(store.log.head(&lobby).await.unwrap(), 6);
        let feed = store.feed.clone().unwrap();
        assert_eq!(feed.read_all(0, 100).await.unwrap(), all);
        assert_eq!(
            snapshot(&store, &["lobby"], &["ana"], &["a1"]).await,
            before
        );
        assert_eq!(
            *feed.watch().borrow(),
            7,
            "the watch starts at the last position"
        );

        // The log goes on where it was: next seq, next position, old clientMsgIds remembered.
        let resent = append(&store, say_once("lobby", "ana", "m0", "id0")).await;
        assert!(resent.duplicate);
        assert_eq!(resent.event, events[1]);
        let next = append(&store, say("lobby", "ana", "after reopening"))
            .await
            .event;
        assert_eq!(next.seq, 7);
        assert_eq!(feed.read_all(7, 10).await.unwrap(), [(8, next)]);
    }

    /// A batch that fails rolls back whole: every append in it gets an error, none of them is in
    /// the log or the projection, and the batches around it are unaffected and gap-free. One
    /// append fails as its event is inserted, another after that, while projecting it — which
    /// must not leave its event behind.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn a_failed_batch_answers_everyone_and_leaves_no_gap() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("palaver.db");
        let store = open_sqlite(&path).await;
        append(&store, connected("a1", "ana")).await;
        append(&store, joined("r", "ana")).await;
        common::sql_outside(
            &path,
            "CREATE TRIGGER refuse_event BEFORE INSERT ON events \
             WHEN NEW.body LIKE '%poison%' BEGIN SELECT RAISE(ABORT, 'injected'); END",
        )
        .await;
        common::sql_outside(
            &path,
            "CREATE TRIGGER refuse_activity BEFORE UPDATE OF last_active_at ON connections \
             BEGIN SELECT RAISE(ABORT, 'injected'); END",
        )
        .await;

        let tasks: Vec<_> = (0..40)
            .map(|t| {
                let store = store.clone();
                tokio::spawn(async move {
                    let mut results = Vec::new();
                    for i in 0..5 {
                        let text = format!("{t}/{i}");
                        let body = match (t, i) {
                            (17, 2) => say("r", "ana", "poison"),
                            (29, 3) => say_from("r", "ana", &text, "a1"),
                            _ => say("r", "ana", &text),
                        };
                        let text = match &body {
                            EventBody::MessagePosted { text, .. } => text.clone(),
                            _ => unreachable!(),
                        };
                        results.push((text, store.log.append(body, Expect::Next).await));
                    }
                    results
                })
            })
            .collect();
        let mut ok = Vec::new();
        let mut failed = Vec::new();
        for task in tasks {
            for (text, result) in task.await.unwrap() {
                match result {
                    Ok(appended) => ok.push((appended.event.seq, text)),
                    Err(StoreError::Backend(e)) => failed.push((text, e.to_string())),
                    Err(e) => panic!("unexpected {e}"),
                }
            }
        }
        let failed_texts: Vec<&str> = failed.iter().map(|(t, _)| t.as_str()).collect();
        assert!(failed_texts.contains(&"poison"), "{failed:?}");
        assert!(failed_texts.contains(&"29/3"), "{failed:?}");
        assert!(
            failed.iter().all(|(_, e)| e.contains("injected")),
            "{failed:?}"
        );
        eprintln!(
            "{} appends failed with the two poisoned batches",
            failed.len()
        );
        ok.sort();
        let n = ok.len() as u64;
        assert_eq!(n as usize + failed.len(), 200);
        assert_eq!(
            ok.iter().map(|(seq, _)| *seq).collect::<Vec<_>>(),
            (2..=n + 1).collect::<Vec<_>>(),
            "acknowledged seqs are gap-free"
        );
        let r = Stream::Room(room("r"));
        let log: Vec<(u64, String)> = store
            .log
            .read(&r, 1, 1000)
            .await
            .unwrap()
            .iter()
            .map(|e| (e.seq, text(e).to_owned()))
            .collect();
        assert_eq!(log, ok, "exactly the acknowledged appends are in the log");
        assert_eq!(store.directory.rooms().await.unwrap()[0].head, n + 1);
        let a1 = store
            .directory
            .connection(&conn("a1"))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(a1.last_active_at, a1.connected_at, "no activity projected");
        let next = append(&store, say("r", "ana", "after")).await.event;
        assert_eq!(next.seq, n + 2);
    }

    #[tokio::test]
    async fn unreadable_rows_are_corrupt_not_panics() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("palaver.db");
        let store = open_sqlite(&path).await;
        append(&store, connected("a1", "ana")).await;
        append(&store, say("lobby", "ana", "fine")).await;
        append(&store, say("lobby", "ana", "broken")).await;
        common::sql_outside(
            &path,
            "UPDATE events SET body = '{\"kind\":' WHERE body LIKE '%broken%'",
        )
        .await;
        common::sql_outside(&path, "UPDATE connections SET user_id = 'not a name!'").await;
        // Found by the next run: this one still holds the events it committed in memory, and
        // hands those out, as they were written, to whoever follows the log.
        drop(store);
        let store = open_sqlite(&path).await;

        let lobby = Stream::Room(room("lobby"));
        assert!(matches!(
            store.log.read(&lobby, 0, 10).await,
            Err(StoreError::Corrupt(_))
        ));
        assert_eq!(store.log.read(&lobby, 0, 1).await.unwrap().len(), 1);
        assert!(matches!(
            store.feed.as_ref().unwrap().read_all(0, 10).await,
            Err(StoreError::Corrupt(_))
        ));
        assert!(matches!(
            store.directory.connection(&conn("a1")).await,
            Err(StoreError::Corrupt(_))
        ));
        // The log still takes appends.
        assert_eq!(
            append(&store, say("lobby", "ana", "next")).await.event.seq,
            3
        );
    }
}
