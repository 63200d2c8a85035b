//! The stream-driven fan-out's promises, on the memory store with a recording gateway: what a
//! change stream delivers twice, out of order, with holes or with garbage still reaches every
//! recipient exactly once and in seq order. (The same code against DynamoDB, its real stream and
//! a real gateway is in `tests/aws_path.rs`.)

use async_trait::async_trait;
use bytes::Bytes;
use palaver::domain::{Appended, ConnectionId, Event, EventBody, Expect, RoomName, Stream, UserId};
use palaver::fanout::FanOut;
use palaver::fanout::stream::{StreamFanOut, Wake};
use palaver::ports::{
    ConnectionGateway, DeliveryJob, DeliveryQueue, EventLog, PostError, QueueError, Store,
    StoreError, StoreResult,
};
use palaver::store::memory::MemoryStore;
use serde_json::Value;
use std::collections::HashSet;
use std::sync::{Arc, Mutex};

/// A gateway that records every post, and answers 410 for connections in `gone`.
#[derive(Default)]
struct Recorder {
    posts: Mutex<Vec<(ConnectionId, Value)>>,
    gone: Mutex<HashSet<ConnectionId>>,
}

impl Recorder {
    /// Frames posted to `connection`, in order.
    fn frames(&self, connection: &str) -> Vec<Value> {
        self.posts
            .lock()
            .unwrap()
            .iter()
            .filter(|(c, _)| c.as_str() == connection)
            .map(|(_, f)| f.clone())
            .collect()
    }

    fn total(&self) -> usize {
        self.posts.lock().unwrap().len()
    }
}

#[async_trait]
impl ConnectionGateway for Recorder {
    async fn close(&self, _: &ConnectionId) -> Result<(), PostError> {
        Ok(())
    }

    async fn post(&self, connection: &ConnectionId, frame: Bytes) -> Result<(), PostError> {
        if self.gone.lock().unwrap().contains(connection) {
            return Err(PostError::Gone);
        }
        let frame: Value = serde_json::from_slice(&frame).expect("frames are JSON");
        self.posts.lock().unwrap().push((connection.clone(), frame));
        Ok(())
    }
}

/// A queue that keeps what it was given.
#[derive(Default)]
struct Jobs(Mutex<Vec<DeliveryJob>>);

#[async_trait]
impl DeliveryQueue for Jobs {
    async fn enqueue(&self, jobs: Vec<DeliveryJob>) -> Result<(), QueueError> {
        self.0.lock().unwrap().extend(jobs);
        Ok(())
    }
}

struct World {
    store: Store,
    gateway: Arc<Recorder>,
    fanout: StreamFanOut,
}

fn world() -> World {
    let store = MemoryStore::store();
    let gateway = Arc::new(Recorder::default());
    let fanout = StreamFanOut::new(&store, FanOut::new(&store, gateway.clone()))
        .expect("the memory store keeps checkpoints");
    World {
        store,
        gateway,
        fanout,
    }
}

fn room(name: &str) -> RoomName {
    RoomName::parse(name).unwrap()
}

fn user(name: &str) -> UserId {
    UserId::parse(name).unwrap()
}

async fn connect(store: &Store, id: &str, who: &str) {
    let body = EventBody::Connected {
        connection: ConnectionId::new(id),
        user: user(who),
        source_ip: None,
        node: None,
    };
    store.log.append(body, Expect::Seq(1)).await.unwrap();
}

/// Appends `body` to its stream and returns its seq.
async fn appended(store: &Store, body: EventBody) -> u64 {
    store
        .log
        .append(body, Expect::Next)
        .await
        .unwrap()
        .event
        .seq
}

async fn join(store: &Store, r: &str, who: &str) -> u64 {
    let body = EventBody::Joined {
        room: room(r),
        user: user(who),
    };
    appended(store, body).await
}

async fn say(store: &Store, r: &str, who: &str, text: &str) -> u64 {
    let body = EventBody::MessagePosted {
        room: room(r),
        user: user(who),
        text: text.to_owned(),
        client_msg_id: None,
        connection: None,
    };
    appended(store, body).await
}

/// The change record for `seq` of room `r`, as a stream would announce it.
fn wake(r: &str, seq: u64) -> Wake {
    Wake::from_keys(
        format!("rec-{r}-{seq}"),
        Some(&Stream::Room(room(r)).key()),
        Some(&seq.to_string()),
    )
}

fn seqs_of(frames: &[Value], kind: &str) -> Vec<u64> {
    frames
        .iter()
        .filter(|f| f["type"] == kind)
        .map(|f| f["seq"].as_u64().unwrap())
        .collect()
}

/// Ana and Bo in "lobby", each with one connection; the log holds their joins (seq 1, 2).
async fn lobby(w: &World) {
    connect(&w.store, "a1", "ana").await;
    connect(&w.store, "b1", "bo").await;
    join(&w.store, "lobby", "ana").await;
    join(&w.store, "lobby", "bo").await;
}

#[tokio::test]
async fn a_gap_in_the_stream_is_backfilled_from_the_log_in_order() {
    let w = world();
    lobby(&w).await;
    for i in 3..=6 {
        say(&w.store, "lobby", "ana", &format!("m{i}")).await;
    }
    // The stream showed only seq 6, and then seq 4 late.
    let report = w.fanout.handle(vec![wake("lobby", 6)]).await;
    assert!(report.failed.is_empty());
    assert_eq!(report.events, 6);
    let frames = w.gateway.frames("b1");
    assert_eq!(seqs_of(&frames, "message"), [3, 4, 5, 6]);
    // b1 hears the room from bo's join on; ana's is history to it.
    assert_eq!(seqs_of(&frames, "member"), [2]);

    let late = w.fanout.handle(vec![wake("lobby", 4)]).await;
    assert_eq!((late.events, late.failed.len()), (0, 0));
    assert_eq!(
        w.gateway.frames("b1"),
        frames,
        "a late record sends nothing"
    );
}

#[tokio::test]
async fn a_batch_delivered_twice_sends_nothing_the_second_time() {
    let w = world();
    lobby(&w).await;
    say(&w.store, "lobby", "bo", "hello").await;
    let batch: Vec<Wake> = (1..=3).map(|s| wake("lobby", s)).collect();

    let first = w.fanout.handle(batch.clone()).await;
    let posted = w.gateway.total();
    assert_eq!(first.events, 3);
    assert!(posted > 0);

    let again = w.fanout.handle(batch).await;
    assert_eq!((again.events, again.failed.len()), (0, 0));
    assert_eq!(w.gateway.total(), posted, "nothing posted twice");
    assert_eq!(seqs_of(&w.gateway.frames("a1"), "message"), [3]);
}

#[tokio::test]
async fn a_poisoned_record_is_reported_and_the_rest_is_delivered() {
    let w = world();
    lobby(&w).await;
    say(&w.store, "lobby", "ana", "still here").await;
    let poisoned = Wake::from_keys("rec-poison", Some("x:not-a-stream"), Some("1"));
    let keyless = Wake::from_keys("rec-keyless", None, Some("2"));
    let report = w
        .fanout
        .handle(vec![wake("lobby", 1), poisoned, keyless, wake("lobby", 3)])
        .await;
    assert_eq!(report.failed, ["rec-poison", "rec-keyless"]);
    assert_eq!(seqs_of(&w.gateway.frames("b1"), "message"), [3]);
}

#[tokio::test]
async fn an_announced_event_missing_from_the_log_fails_that_stream_only() {
    let w = world();
    lobby(&w).await;
    join(&w.store, "garden", "bo").await;
    say(&w.store, "garden", "bo", "flowers").await;
    // Lobby's log ends at 2: a record for seq 9 is not (yet) backed by the table.
    let report = w
        .fanout
        .handle(vec![wake("lobby", 9), wake("garden", 2)])
        .await;
    assert_eq!(report.failed, ["rec-lobby-9"]);
    assert_eq!(seqs_of(&w.gateway.frames("b1"), "message"), [2]);
    // What could be delivered of lobby was, and is not sent again on the retry.
    let lobby_frames = seqs_of(&w.gateway.frames("a1"), "member");
    assert_eq!(lobby_frames, [1, 2]);
    let retry = w.fanout.handle(vec![wake("lobby", 9)]).await;
    assert_eq!(retry.failed, ["rec-lobby-9"]);
    assert_eq!(seqs_of(&w.gateway.frames("a1"), "member"), [1, 2]);
}

#[tokio::test]
async fn a_gone_connection_is_closed_and_its_user_shown_offline() {
    let w = world();
    lobby(&w).await;
    w.fanout
        .handle((1..=2).map(|s| wake("lobby", s)).collect())
        .await;
    w.gateway
        .gone
        .lock()
        .unwrap()
        .insert(ConnectionId::new("b1"));
    say(&w.store, "lobby", "ana", "bo?").await;
    let report = w.fanout.handle(vec![wake("lobby", 3)]).await;
    assert_eq!(report.delivery.gone, [ConnectionId::new("b1")]);
    let record = w
        .store
        .directory
        .connection(&ConnectionId::new("b1"))
        .await
        .unwrap()
        .unwrap();
    assert!(!record.open, "the gone connection is closed in the log");

    // The close is itself a log event; its record tells the room bo went offline.
    let closed = Wake::from_keys("rec-close", Some("c:b1"), Some("2"));
    w.fanout.handle(vec![closed]).await;
    let presence: Vec<Value> = w
        .gateway
        .frames("a1")
        .into_iter()
        .filter(|f| f["type"] == "presence")
        .collect();
    assert_eq!(presence.len(), 1);
    assert_eq!(
        (&presence[0]["user"], &presence[0]["online"]),
        (&Value::from("bo"), &Value::from(false))
    );
}

/// Room `hall` with `members` users `u0`… on connections `c0`…, over the queue's threshold (3,
/// jobs of 2), its joins delivered and their jobs cleared, so only what follows is queued.
struct Hall {
    store: Store,
    gateway: Arc<Recorder>,
    queue: Arc<Jobs>,
    fanout: StreamFanOut,
}

async fn hall(members: u64) -> Hall {
    let store = MemoryStore::store();
    let gateway = Arc::new(Recorder::default());
    let queue = Arc::new(Jobs::default());
    let fanout = FanOut::new(&store, gateway.clone()).with_relay(queue.clone(), 3, 2);
    let fanout = StreamFanOut::new(&store, fanout).unwrap();
    for i in 0..members {
        connect(&store, &format!("c{i}"), &format!("u{i}")).await;
        join(&store, "hall", &format!("u{i}")).await;
    }
    fanout.handle(vec![wake("hall", members)]).await;
    queue.0.lock().unwrap().clear();
    Hall {
        store,
        gateway,
        queue,
        fanout,
    }
}

#[tokio::test]
async fn a_big_room_is_handed_to_delivery_workers_in_shards() {
    let Hall {
        store,
        gateway,
        queue,
        fanout,
    } = hall(5).await;
    let seq = say(&store, "hall", "u0", "to everyone").await;
    let before = gateway.total();

    let report = fanout.handle(vec![wake("hall", seq)]).await;
    assert_eq!(report.delivery.queued, 5);
    assert_eq!(gateway.total(), before, "the fan-out posted nothing itself");
    let jobs = queue.0.lock().unwrap().clone();
    assert!(jobs.iter().all(|j| j.connections.len() <= 2), "{jobs:?}");
    let mut recipients: Vec<&str> = jobs
        .iter()
        .flat_map(|j| j.connections.iter().map(ConnectionId::as_str))
        .collect();
    recipients.sort();
    assert_eq!(recipients, ["c0", "c1", "c2", "c3", "c4"], "everyone, once");
    assert!(
        jobs.iter().all(|j| j.frames.len() == 1),
        "one event, one frame"
    );
    let frame: Value = serde_json::from_str(&jobs[0].frames[0]).unwrap();
    assert_eq!(
        (&frame["type"], &frame["seq"]),
        (&Value::from("message"), &Value::from(seq))
    );
    assert!(
        jobs.iter().all(|j| j.frames == jobs[0].frames),
        "one frame, serialised once"
    );
    let ids: HashSet<&str> = jobs.iter().map(|j| j.id.as_str()).collect();
    assert_eq!(
        ids.len(),
        jobs.len(),
        "every job has its own deduplication id"
    );

    // The next message: each connection lands in the same ordered group as before, and a
    // retried fan-out would queue jobs with the same ids (so a FIFO queue drops the repeats).
    let group_of = |jobs: &[DeliveryJob], c: &str| -> String {
        jobs.iter()
            .find(|j| j.connections.iter().any(|x| x.as_str() == c))
            .map(|j| j.group.clone())
            .unwrap()
    };
    let next = say(&store, "hall", "u1", "again").await;
    fanout.handle(vec![wake("hall", next)]).await;
    let later: Vec<DeliveryJob> = queue.0.lock().unwrap()[jobs.len()..].to_vec();
    for i in 0..5 {
        let c = format!("c{i}");
        assert_eq!(group_of(&jobs, &c), group_of(&later, &c));
        assert!(group_of(&jobs, &c).starts_with("hall#"));
    }
    assert!(
        later
            .iter()
            .all(|j| j.id.starts_with(&format!("r:hall:{next}#")))
    );

    // A worker posting a job reaches every connection in it.
    let worker = FanOut::new(&store, gateway.clone());
    for job in jobs {
        let d = worker
            .post_to(&job.connections, Bytes::from(job.frames[0].clone()))
            .await;
        assert_eq!(d.failed, 0);
    }
    for i in 0..5 {
        assert_eq!(seqs_of(&gateway.frames(&format!("c{i}")), "message"), [seq]);
    }
}

/// A log that cannot decode one event of one room, as if its stored row were damaged.
struct Damaged {
    inner: Arc<dyn EventLog>,
    room: Stream,
    seq: u64,
}

#[async_trait]
impl EventLog for Damaged {
    async fn append(&self, body: EventBody, expect: Expect) -> StoreResult<Appended> {
        self.inner.append(body, expect).await
    }

    async fn read(&self, stream: &Stream, after: u64, limit: usize) -> StoreResult<Vec<Event>> {
        let events = self.inner.read(stream, after, limit).await?;
        if *stream == self.room && events.iter().any(|e| e.seq == self.seq) {
            return Err(StoreError::Corrupt(format!(
                "{stream}/{}: bad body",
                self.seq
            )));
        }
        Ok(events)
    }

    async fn head(&self, stream: &Stream) -> StoreResult<u64> {
        self.inner.head(stream).await
    }
}

/// A busy big room's batch holds several messages: each lane gets one job with all of them, in
/// seq order, instead of one job per lane per message — and a worker posting it gives every
/// connection every message once, in order.
#[tokio::test]
async fn a_batch_of_messages_in_a_big_room_is_one_job_per_lane() {
    let Hall {
        store,
        gateway,
        queue,
        fanout,
    } = hall(6).await;
    let mut seqs = Vec::new();
    for n in 0..3 {
        seqs.push(say(&store, "hall", "u0", &format!("message {n}")).await);
    }
    let wakes = seqs.iter().map(|seq| wake("hall", *seq)).collect();
    let report = fanout.handle(wakes).await;
    assert_eq!(report.delivery.queued, 18, "six listeners, three messages");
    let jobs = queue.0.lock().unwrap().clone();
    let one_message = jobs.len();
    assert!(
        jobs.iter()
            .all(|j| j.frames.len() == 3 && j.connections.len() <= 2),
        "{jobs:?}"
    );
    let lanes: HashSet<&str> = jobs.iter().map(|j| j.group.as_str()).collect();
    assert!(one_message <= 6 && lanes.len() <= one_message, "{jobs:?}");

    let worker = FanOut::new(&store, gateway.clone());
    for job in jobs {
        for frame in job.frames {
            let d = worker.post_to(&job.connections, Bytes::from(frame)).await;
            assert_eq!(d.failed, 0);
        }
    }
    for i in 0..6 {
        assert_eq!(seqs_of(&gateway.frames(&format!("c{i}")), "message"), seqs);
    }
}

#[tokio::test]
async fn an_unreadable_event_is_passed_over_and_the_room_goes_on() {
    let mut store = MemoryStore::store();
    store.log = Arc::new(Damaged {
        inner: store.log.clone(),
        room: Stream::Room(room("lobby")),
        seq: 4,
    });
    let gateway = Arc::new(Recorder::default());
    let fanout = StreamFanOut::new(&store, FanOut::new(&store, gateway.clone())).unwrap();
    connect(&store, "a1", "ana").await;
    join(&store, "lobby", "ana").await;
    for text in ["two", "three", "four", "five"] {
        say(&store, "lobby", "ana", text).await;
    }

    let report = fanout.handle(vec![wake("lobby", 5)]).await;
    assert!(report.failed.is_empty(), "{:?}", report.failed);
    assert_eq!(report.skipped, [(Stream::Room(room("lobby")), 4)]);
    assert_eq!(seqs_of(&gateway.frames("a1"), "message"), [2, 3, 5]);

    // Later messages flow as usual.
    say(&store, "lobby", "ana", "six").await;
    fanout.handle(vec![wake("lobby", 6)]).await;
    assert_eq!(seqs_of(&gateway.frames("a1"), "message"), [2, 3, 5, 6]);
}

/// The change record for `seq` of connection `id`'s log stream.
fn wake_connection(id: &str, seq: u64) -> Wake {
    Wake::from_keys(
        format!("rec-{id}-{seq}"),
        Some(&Stream::Connection(ConnectionId::new(id)).key()),
        Some(&seq.to_string()),
    )
}

/// Bo's last connection closes between two messages: ana sees the first message, bo going
/// offline, then the second — the order of the log and of the batch — not both messages first.
#[tokio::test]
async fn presence_keeps_its_place_between_room_events_of_one_batch() {
    let w = world();
    lobby(&w).await;
    let before = vec![
        wake_connection("a1", 1),
        wake_connection("b1", 1),
        wake("lobby", 2),
    ];
    assert!(w.fanout.handle(before).await.failed.is_empty());

    let first = say(&w.store, "lobby", "ana", "before bo leaves").await;
    let body = EventBody::Disconnected {
        connection: ConnectionId::new("b1"),
        user: user("bo"),
        reason: palaver::domain::DisconnectReason::Closed,
    };
    w.store.log.append(body, Expect::Seq(2)).await.unwrap();
    let second = say(&w.store, "lobby", "ana", "after bo left").await;
    let posted_before = w.gateway.frames("a1").len();

    let batch = vec![
        wake("lobby", first),
        wake_connection("b1", 2),
        wake("lobby", second),
    ];
    let report = w.fanout.handle(batch).await;
    assert!(report.failed.is_empty(), "{:?}", report.failed);
    let seen: Vec<(String, Value)> = w.gateway.frames("a1")[posted_before..]
        .iter()
        .map(|f| (f["type"].as_str().unwrap().to_owned(), f["seq"].clone()))
        .collect();
    assert_eq!(
        seen,
        [
            ("message".to_owned(), Value::from(first)),
            ("presence".to_owned(), Value::Null),
            ("message".to_owned(), Value::from(second)),
        ]
    );
}

/// A room whose audience crosses the relay threshold within a batch: once one of its frames is
/// queued for delivery workers, the batch's later frames of the room are queued behind it, even
/// one with a smaller audience (a presence frame leaves out the connection it is about) —
/// posted directly, it would overtake the queued one.
#[tokio::test]
async fn a_room_that_crosses_the_threshold_mid_batch_stays_on_the_queue() {
    let store = MemoryStore::store();
    let gateway = Arc::new(Recorder::default());
    let queue = Arc::new(Jobs::default());
    let fanout = FanOut::new(&store, gateway.clone()).with_relay(queue.clone(), 3, 10);
    let fanout = StreamFanOut::new(&store, fanout).unwrap();
    for (id, who) in [("a1", "ana"), ("b1", "bo"), ("c1", "cy")] {
        connect(&store, id, who).await;
    }
    for who in ["ana", "bo", "cy", "dee"] {
        join(&store, "lobby", who).await;
    }
    let warmup = vec![
        wake_connection("a1", 1),
        wake_connection("b1", 1),
        wake_connection("c1", 1),
        wake("lobby", 4),
    ];
    assert!(fanout.handle(warmup).await.failed.is_empty());
    queue.0.lock().unwrap().clear();
    let posted_before = gateway.frames("a1").len();

    // Dee's connection opens, then a message (to four connections, dee's new one included:
    // queued). The stream has them the other way round (records of different keys come in no
    // set order): the message, then dee's connection opening (presence to the three others).
    connect(&store, "d1", "dee").await;
    let message = say(&store, "lobby", "ana", "hello all").await;
    let batch = vec![wake("lobby", message), wake_connection("d1", 1)];
    let report = fanout.handle(batch).await;
    assert!(report.failed.is_empty());

    let direct = &gateway.frames("a1")[posted_before..];
    assert!(
        direct.is_empty(),
        "nothing posted directly once the room went to the queue: {direct:?}"
    );
    let queued: Vec<Value> = queue
        .0
        .lock()
        .unwrap()
        .iter()
        .filter(|job| job.connections.iter().any(|c| c.as_str() == "a1"))
        .flat_map(|job| job.frames.iter())
        .map(|frame| serde_json::from_str::<Value>(frame).unwrap())
        .collect();
    let kinds: Vec<&str> = queued.iter().map(|f| f["type"].as_str().unwrap()).collect();
    assert_eq!(kinds, ["message", "presence"], "{queued:?}");
}

/// A room's frames queued for delivery workers in one batch may still wait in the queue when the
/// next batch comes: that batch's frames of the room follow them there, even once the room has
/// shrunk below the threshold — posted directly, they would overtake the queued ones.
#[tokio::test]
async fn a_room_stays_on_the_queue_in_the_batches_after_it_went_there() {
    let store = MemoryStore::store();
    let gateway = Arc::new(Recorder::default());
    let queue = Arc::new(Jobs::default());
    let fanout = FanOut::new(&store, gateway.clone()).with_relay(queue.clone(), 3, 10);
    let fanout = StreamFanOut::new(&store, fanout).unwrap();
    for (id, who) in [("a1", "ana"), ("b1", "bo"), ("c1", "cy"), ("d1", "dee")] {
        connect(&store, id, who).await;
        join(&store, "lobby", who).await;
    }
    // Four listeners: over the threshold, the message goes to the queue.
    let first = say(&store, "lobby", "ana", "to four").await;
    let handled = |batch| async { fanout.handle(batch).await.failed.is_empty() };
    assert!(handled(vec![wake("lobby", first)]).await);
    let queued = |text: &str| {
        queue
            .0
            .lock()
            .unwrap()
            .iter()
            .filter(|job| job.frames.iter().any(|f| f.contains(text)))
            .count()
    };
    assert!(queued("to four") > 0);
    let posted_before = gateway.frames("a1").len();

    // Dee leaves: three listeners, under the threshold. The next batch still queues.
    let body = EventBody::Left {
        room: room("lobby"),
        user: user("dee"),
    };
    let left = appended(&store, body).await;
    let second = say(&store, "lobby", "ana", "to three").await;
    assert!(handled(vec![wake("lobby", left), wake("lobby", second)]).await);
    assert!(queued("to three") > 0, "queued behind the earlier frames");
    let direct = &gateway.frames("a1")[posted_before..];
    assert!(direct.is_empty(), "nothing posted directly: {direct:?}");

    // A room that never went to the queue is posted to directly, as ever.
    for (id, who) in [("e1", "eve"), ("f1", "fay")] {
        connect(&store, id, who).await;
        join(&store, "small", who).await;
    }
    let hello = say(&store, "small", "eve", "hello, small room").await;
    assert!(handled(vec![wake("small", hello)]).await);
    assert_eq!(queued("hello, small room"), 0);
    let frames = gateway.frames("f1");
    assert!(
        frames.iter().any(|f| f["text"] == "hello, small room"),
        "{frames:?}"
    );
}

/// The memory store's projection, counting how often each room's audience is read.
struct CountingDirectory {
    inner: Arc<MemoryStore>,
    audience_reads: Mutex<std::collections::HashMap<String, usize>>,
}

#[async_trait]
impl palaver::ports::Directory for CountingDirectory {
    async fn apply(&self, event: &Event) -> StoreResult<()> {
        self.inner.apply(event).await
    }
    async fn connection(
        &self,
        id: &ConnectionId,
    ) -> StoreResult<Option<palaver::ports::ConnectionRecord>> {
        self.inner.connection(id).await
    }
    async fn open_connections(
        &self,
        user: Option<&UserId>,
    ) -> StoreResult<Vec<palaver::ports::ConnectionRecord>> {
        self.inner.open_connections(user).await
    }
    async fn is_member(&self, room: &RoomName, user: &UserId) -> StoreResult<bool> {
        self.inner.is_member(room, user).await
    }
    async fn members(&self, room: &RoomName) -> StoreResult<Vec<palaver::ports::MemberRecord>> {
        self.inner.members(room).await
    }
    async fn rooms_of(&self, user: &UserId) -> StoreResult<Vec<RoomName>> {
        self.inner.rooms_of(user).await
    }
    async fn rooms(&self) -> StoreResult<Vec<palaver::ports::RoomRecord>> {
        self.inner.rooms().await
    }
    async fn listeners(&self, room: &RoomName) -> StoreResult<Vec<palaver::ports::Listener>> {
        *self
            .audience_reads
            .lock()
            .unwrap()
            .entry(room.to_string())
            .or_default() += 1;
        self.inner.listeners(room).await
    }
    async fn live_from(
        &self,
        connection: &ConnectionId,
        room: &RoomName,
    ) -> StoreResult<Option<u64>> {
        self.inner.live_from(connection, room).await
    }
}

/// A reconnect storm in one batch: every member of two rooms drops and comes back with a new
/// connection, between messages. Each room's audience is read once for the whole batch — the
/// connects and disconnects update it rather than clear it — and still no message reaches a
/// connection it should not: the new ones hear from their open on, the old ones nothing after
/// their close.
#[tokio::test]
async fn a_reconnect_storm_reads_each_rooms_audience_once_per_batch() {
    use palaver::domain::DisconnectReason;
    let memory = MemoryStore::new();
    let directory = Arc::new(CountingDirectory {
        inner: memory.clone(),
        audience_reads: Mutex::default(),
    });
    let store = Store {
        log: memory.clone(),
        directory: directory.clone(),
        feed: Some(memory.clone()),
        checkpoints: Some(memory.clone()),
        retention: None,
        nodes: None,
    };
    let gateway = Arc::new(Recorder::default());
    let fanout = StreamFanOut::new(&store, FanOut::new(&store, gateway.clone())).unwrap();
    let users = ["ana", "bo", "cy", "di"];
    let mut wakes = Vec::new();
    for who in users {
        connect(&store, &format!("{who}-old"), who).await;
        wakes.push(wake_connection(&format!("{who}-old"), 1));
        for r in ["east", "west"] {
            let seq = join(&store, r, who).await;
            wakes.push(wake(r, seq));
        }
    }
    assert!(fanout.handle(wakes).await.failed.is_empty());
    directory.audience_reads.lock().unwrap().clear();

    // The storm: a message in each room, then each user drops and reconnects, then another.
    let mut batch = Vec::new();
    let mut said_before = Vec::new();
    for r in ["east", "west"] {
        let seq = say(&store, r, "ana", &format!("{r} before")).await;
        said_before.push(seq);
        batch.push(wake(r, seq));
    }
    for who in users {
        let old = format!("{who}-old");
        let body = EventBody::Disconnected {
            connection: ConnectionId::new(&old),
            user: user(who),
            reason: DisconnectReason::Closed,
        };
        store.log.append(body, Expect::Seq(2)).await.unwrap();
        batch.push(wake_connection(&old, 2));
        let new = format!("{who}-new");
        connect(&store, &new, who).await;
        batch.push(wake_connection(&new, 1));
    }
    let mut said_after = Vec::new();
    for r in ["east", "west"] {
        let seq = say(&store, r, "bo", &format!("{r} after")).await;
        said_after.push(seq);
        batch.push(wake(r, seq));
    }
    let report = fanout.handle(batch).await;
    assert!(report.failed.is_empty(), "{:?}", report.failed);

    let reads = directory.audience_reads.lock().unwrap().clone();
    assert!(
        reads.values().all(|n| *n == 1) && reads.len() == 2,
        "each room's audience read once: {reads:?}"
    );
    for who in users {
        let old = seqs_of(&gateway.frames(&format!("{who}-old")), "message");
        let new = seqs_of(&gateway.frames(&format!("{who}-new")), "message");
        // The store is ahead of the fan-out: the old connections were closed before this
        // batch read the rooms, so they get nothing of it — least of all what came after their
        // close (they replay with `joinRoom{after}` on reconnecting).
        assert!(
            said_after.iter().all(|s| !old.contains(s)),
            "{who}'s old connection: {old:?}"
        );
        assert!(said_before.iter().all(|s| !new.contains(s)));
        assert_eq!(new, said_after, "{who}'s new connection");
    }
}

/// A queue that refuses the jobs of one room until told otherwise, and keeps the rest.
#[derive(Default)]
struct Refusing {
    jobs: Mutex<Vec<DeliveryJob>>,
    refused_room: Mutex<Option<String>>,
}

#[async_trait]
impl DeliveryQueue for Refusing {
    async fn enqueue(&self, jobs: Vec<DeliveryJob>) -> Result<(), QueueError> {
        if let Some(room) = self.refused_room.lock().unwrap().as_deref()
            && jobs
                .iter()
                .any(|j| j.group.starts_with(&format!("{room}#")))
        {
            return Err(QueueError(format!("{room}: refused")));
        }
        self.jobs.lock().unwrap().extend(jobs);
        Ok(())
    }
}

/// Rooms of one batch are sent to at once, and independently: one whose frames cannot be
/// queued fails its own records — its checkpoint stays, so the retry sends them, once — while
/// the other room's frames all go out, in order.
#[tokio::test]
async fn one_rooms_failure_holds_back_that_room_only() {
    let store = MemoryStore::store();
    let gateway = Arc::new(Recorder::default());
    let queue = Arc::new(Refusing::default());
    let fanout = FanOut::new(&store, gateway.clone()).with_relay(queue.clone(), 2, 10);
    let fanout = StreamFanOut::new(&store, fanout).unwrap();
    for (i, r) in ["big", "big", "big", "small"].iter().enumerate() {
        connect(&store, &format!("c{i}"), &format!("u{i}")).await;
        join(&store, r, &format!("u{i}")).await;
    }
    join(&store, "small", "u0").await;
    let mut batch = Vec::new();
    for n in 0..3 {
        batch.push(wake(
            "big",
            say(&store, "big", "u0", &format!("big {n}")).await,
        ));
        batch.push(wake(
            "small",
            say(&store, "small", "u3", &format!("small {n}")).await,
        ));
    }
    *queue.refused_room.lock().unwrap() = Some("big".to_owned());
    let report = fanout.handle(batch.clone()).await;
    assert_eq!(report.failed, ["rec-big-4"], "only big's first record");
    let small: Vec<u64> = seqs_of(&gateway.frames("c3"), "message");
    assert_eq!(small, [3, 4, 5], "small's messages went out, in order");
    assert!(queue.jobs.lock().unwrap().is_empty());

    *queue.refused_room.lock().unwrap() = None;
    let retry = fanout.handle(batch).await;
    assert!(retry.failed.is_empty(), "{:?}", retry.failed);
    let queued: Vec<u64> = queue
        .jobs
        .lock()
        .unwrap()
        .iter()
        .flat_map(|job| job.frames.iter())
        .filter_map(|frame| {
            let frame: Value = serde_json::from_str(frame).unwrap();
            (frame["type"] == "message").then(|| frame["seq"].as_u64().unwrap())
        })
        .collect::<std::collections::BTreeSet<u64>>()
        .into_iter()
        .collect();
    assert_eq!(queued, [4, 5, 6], "big's messages, once each, on the retry");
    assert_eq!(
        seqs_of(&gateway.frames("c3"), "message"),
        [3, 4, 5],
        "small not again"
    );
}

/// A store shared by API Gateway's functions and two `palaver serve` nodes: each deliverer
/// posts a room's frames to the connections it holds, and none takes another's connections for
/// gone (to it they are unknown, as to API Gateway a node's socket is, or to a node another's).
#[tokio::test]
async fn each_deliverer_posts_to_its_own_connections_and_takes_no_other_for_gone() {
    use palaver::fanout::Holder;
    let store = MemoryStore::store();
    let held = [
        ("a1", "ana", Some("n1")),
        ("b1", "bo", Some("n2")),
        ("g1", "gil", None),
    ];
    for (id, who, node) in held {
        let body = EventBody::Connected {
            connection: ConnectionId::new(id),
            user: user(who),
            source_ip: None,
            node: node.map(str::to_owned),
        };
        store.log.append(body, Expect::Seq(1)).await.unwrap();
        join(&store, "hall", who).await;
    }
    let seq = say(&store, "hall", "gil", "to everyone, from API Gateway").await;
    // Each deliverer's gateway knows its own connections only: the others answer 410.
    let deliverer = |holder: Holder, own: &str| {
        let gateway = Arc::new(Recorder::default());
        for (id, _, _) in held.iter().filter(|(id, _, _)| *id != own) {
            gateway.gone.lock().unwrap().insert(ConnectionId::new(*id));
        }
        let fanout = FanOut::new(&store, gateway.clone()).with_holder(holder.clone());
        let stream = match holder {
            // The Lambda fan-out keeps the store's checkpoints; a node, positions of its own.
            Holder::ApiGateway => StreamFanOut::new(&store, fanout).unwrap(),
            Holder::Node(_) => StreamFanOut::following_from_now(&store, fanout),
        };
        (gateway, stream)
    };
    for (holder, own) in [
        (Holder::ApiGateway, "g1"),
        (Holder::Node("n1".to_owned()), "a1"),
        (Holder::Node("n2".to_owned()), "b1"),
    ] {
        let (gateway, stream) = deliverer(holder.clone(), own);
        let report = stream.handle(vec![wake("hall", seq)]).await;
        assert!(report.failed.is_empty(), "{holder:?}: {report:?}");
        assert!(report.delivery.gone.is_empty(), "{holder:?}: {report:?}");
        let posted: HashSet<String> = gateway
            .posts
            .lock()
            .unwrap()
            .iter()
            .map(|(c, _)| c.to_string())
            .collect();
        assert_eq!(posted, HashSet::from([own.to_owned()]), "{holder:?}");
        assert_eq!(
            seqs_of(&gateway.frames(own), "message"),
            [seq],
            "{holder:?}"
        );
    }
    // Nobody was closed for it.
    for (id, _, _) in held {
        let record = store
            .directory
            .connection(&ConnectionId::new(id))
            .await
            .unwrap();
        assert!(record.is_some_and(|r| r.open), "{id}");
    }
}
