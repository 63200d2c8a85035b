//! The ports: what handlers and the fan-out need from a store and from the connection gateway.
//!
//! Every store (memory, SQLite, DynamoDB) implements [`EventLog`] and [`Directory`]; stores that
//! can be tailed in commit order (memory, SQLite) also implement [`LogFeed`]; stores whose
//! fan-out is woken by a change stream that may repeat itself (DynamoDB) implement
//! [`Checkpoints`]. The gateway that holds the WebSocket connections — API Gateway's management
//! API on AWS, the local gateway in `palaver serve` — implements [`ConnectionGateway`]; a big
//! room's deliveries can be handed to other workers through a [`DeliveryQueue`] (SQS on AWS).

use crate::domain::{
    Appended, ConnectionId, Event, EventBody, Expect, Refusal, RoomName, Stream, UserId,
};
use async_trait::async_trait;
use bytes::Bytes;
use chrono::{DateTime, Utc};
use std::sync::Arc;
use tokio::sync::watch;

/// Why a store call failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Optimistic concurrency: the stream was not where the append expected it.
    #[error("{stream}: expected to append seq {expected}, but the next seq is {next}")]
    Conflict {
        stream: String,
        expected: u64,
        next: u64,
    },
    /// The event contradicts its user's membership of its room; nothing was appended.
    #[error(transparent)]
    Refused(#[from] Refusal),
    /// The store could not be reached or refused the operation.
    #[error("store failure: {0}")]
    Backend(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// Something read back could not be decoded.
    #[error("stored data is unreadable: {0}")]
    Corrupt(String),
}

impl StoreError {
    pub fn backend(e: impl std::error::Error + Send + Sync + 'static) -> Self {
        StoreError::Backend(Box::new(e))
    }
}

pub type StoreResult<T> = Result<T, StoreError>;

/// An append whose place in the log is fixed, resolving once it is durable.
pub type PendingAppend =
    std::pin::Pin<Box<dyn std::future::Future<Output = StoreResult<Appended>> + Send>>;

/// The append-only log: gap-free per-stream seq, ULID ids.
#[async_trait]
pub trait EventLog: Send + Sync {
    /// Appends `body` to its stream. A message whose `clientMsgId` this user already used in this
    /// room is not appended again: the first event comes back with `duplicate: true`. With
    /// [`Expect::Membership`], a room event that contradicts its user's membership
    /// ([`EventBody::membership_needed`]) is [`StoreError::Refused`].
    ///
    /// Stores that also hold the projection apply the event's [`changes`] in the same atomic
    /// write, so a handler sees its own writes (join, then send at once, is never `not_member`).
    ///
    /// [`changes`]: crate::domain::projection::changes
    async fn append(&self, body: EventBody, expect: Expect) -> StoreResult<Appended>;

    /// Starts an append: returns once its place in the log's order is fixed (relative to every
    /// append submitted after it returns), with what resolves when it is durable. A store that
    /// batches writes fixes the order when it queues the append, so one connection's pipelined
    /// frames can share a commit and still land in the order they were sent. The default
    /// appends and then returns the outcome.
    async fn submit(&self, body: EventBody, expect: Expect) -> PendingAppend {
        let outcome = self.append(body, expect).await;
        Box::pin(std::future::ready(outcome))
    }

    /// Events of `stream` with `seq > after`, in order, at most `limit`.
    async fn read(&self, stream: &Stream, after: u64, limit: usize) -> StoreResult<Vec<Event>>;

    /// The seq of the stream's last event, 0 if it has none.
    async fn head(&self, stream: &Stream) -> StoreResult<u64>;

    /// Whether the log takes writes now, for `/readyz`: a store that answers reads may still
    /// refuse appends (SQLite's disk full, or its write lock held by another process). Stores
    /// whose reads and writes go to one service (memory, DynamoDB) have nothing more to check
    /// than the read `/readyz` already makes.
    async fn check_writes(&self) -> StoreResult<()> {
        Ok(())
    }
}

/// An open or closed connection, as the registry knows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConnectionRecord {
    pub id: ConnectionId,
    pub user: UserId,
    pub connected_at: DateTime<Utc>,
    pub last_active_at: DateTime<Utc>,
    pub source_ip: Option<String>,
    /// The `palaver serve` node holding it, if one does (not on API Gateway).
    pub node: Option<String>,
    pub open: bool,
}

/// A member of a room.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MemberRecord {
    pub user: UserId,
    pub joined_at: DateTime<Utc>,
    /// How many connections this user has open (online when > 0).
    pub connections: usize,
}

/// A room, for operators.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RoomRecord {
    pub room: RoomName,
    pub members: usize,
    /// Members with at least one open connection.
    pub online: usize,
    pub head: u64,
}

/// The projected state: membership, the connection registry, rooms.
#[async_trait]
pub trait Directory: Send + Sync {
    /// Applies an event's changes; applying the same event again changes nothing.
    async fn apply(&self, event: &Event) -> StoreResult<()>;

    /// The connection with this id, open or closed.
    async fn connection(&self, id: &ConnectionId) -> StoreResult<Option<ConnectionRecord>>;

    /// Open connections, oldest first; only `user`'s when given.
    async fn open_connections(&self, user: Option<&UserId>) -> StoreResult<Vec<ConnectionRecord>>;

    /// The open connections the `palaver serve` node `node` holds, oldest first: for the node
    /// starting again, or for another closing them once its lease lapsed. A store shared by
    /// many reads only those (DynamoDB: it never scans the table).
    async fn open_connections_held_by(&self, node: &str) -> StoreResult<Vec<ConnectionRecord>> {
        let mut open = self.open_connections(None).await?;
        open.retain(|record| record.node.as_deref() == Some(node));
        Ok(open)
    }

    async fn is_member(&self, room: &RoomName, user: &UserId) -> StoreResult<bool>;

    /// Current members of `room`, by user id.
    async fn members(&self, room: &RoomName) -> StoreResult<Vec<MemberRecord>>;

    /// Rooms `user` is a member of.
    async fn rooms_of(&self, user: &UserId) -> StoreResult<Vec<RoomName>>;

    /// Every room with at least one event, by name.
    async fn rooms(&self) -> StoreResult<Vec<RoomRecord>>;

    /// Who hears what is said in `room`: every open connection of every member, with the first
    /// seq each one hears live ([`Directory::live_from`]).
    async fn listeners(&self, room: &RoomName) -> StoreResult<Vec<Listener>>;

    /// The first seq of `room` that reaches `connection` live, or `None` while it does not hear
    /// the room (its user is not a member, or it is closed).
    ///
    /// A connection hears a room from the moment it starts listening: for a room its user was a
    /// member of when it opened, the events appended after its `connected` event; for a room
    /// joined while it was open, the events from that `joined` on. Everything before is history,
    /// which the client asks for (`joinRoom{after}`, `getHistory`). The replay of a `joinRoom`
    /// stops before this seq and the fan-out starts at it, so no seq reaches a connection both
    /// ways — however far the fan-out lags behind the log.
    async fn live_from(
        &self,
        connection: &ConnectionId,
        room: &RoomName,
    ) -> StoreResult<Option<u64>>;

    /// Who hears what is said in `room`: [`Directory::listeners`] without their seqs.
    async fn audience(&self, room: &RoomName) -> StoreResult<Vec<ConnectionId>> {
        Ok(self
            .listeners(room)
            .await?
            .into_iter()
            .map(|listener| listener.connection)
            .collect())
    }
}

/// A connection that hears a room, the first seq of the room it hears live, and who holds its
/// socket.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Listener {
    pub connection: ConnectionId,
    pub live_from: u64,
    /// The `palaver serve` node that holds it (`--node-id`); `None` on API Gateway. Where
    /// several share a store, each delivers to its own.
    pub node: Option<String>,
}

/// The log in commit order across all streams, for a tail in the same process.
#[async_trait]
pub trait LogFeed: Send + Sync {
    /// Events committed after global position `after`, with their positions, at most `limit`.
    async fn read_all(&self, after: u64, limit: usize) -> StoreResult<Vec<(u64, Event)>>;

    /// A wake-up: holds the last committed position and changes after every commit. It carries
    /// no events, so a slow reader can never miss one — it re-reads from its checkpoint.
    fn watch(&self) -> watch::Receiver<u64>;
}

/// Why a post to a connection failed.
#[derive(Debug, thiserror::Error)]
pub enum PostError {
    /// The connection is closed or unknown (HTTP 410): remove it — unless it may still be
    /// opening (see `connections::gone`).
    #[error("connection is gone")]
    Gone,
    /// The gateway knows the connection is still being opened (its upgrade has not completed):
    /// the frame is refused, and the connection is not gone. API Gateway cannot tell this apart
    /// from gone; the local gateway can.
    #[error("connection is still opening")]
    Opening,
    /// The management API itself failed — throttled past every retry, in server trouble,
    /// unreachable, or refusing the caller — so no post can succeed now, whoever it is for: a
    /// later try may. The connection may well be there.
    #[error("the management API failed: {0}")]
    Unavailable(String),
    /// The post got no answer in time. When others to the same frame were answered, the
    /// connection is the slow one: it is not taking its frames.
    #[error("post timed out: {0}")]
    TimedOut(String),
    /// This post failed otherwise (payload too large): the connection may still be there.
    #[error("post failed: {0}")]
    Failed(String),
}

/// How many posts [`ConnectionGateway::post_each`]'s default keeps in flight at once.
pub const POST_CONCURRENCY: usize = 64;

/// Delivers frames to connections: `postToConnection`.
#[async_trait]
pub trait ConnectionGateway: Send + Sync {
    async fn post(&self, connection: &ConnectionId, frame: Bytes) -> Result<(), PostError>;

    /// Closes a connection (`DeleteConnection`), after the frames already posted to it. One
    /// that is already gone counts as closed.
    async fn close(&self, connection: &ConnectionId) -> Result<(), PostError>;

    /// Posts the same frame to every recipient and returns the failures, by index into
    /// `recipients`. The default makes one [`post`](ConnectionGateway::post) each, up to
    /// [`POST_CONCURRENCY`] at once (one HTTP request each on AWS); a gateway that holds its
    /// connections in memory overrides it to queue the shared bytes to all of them in one pass.
    async fn post_each(
        &self,
        recipients: &[ConnectionId],
        frame: Bytes,
    ) -> Vec<(usize, PostError)> {
        use futures_util::StreamExt;
        // By index, not by item: a closure whose future borrows the item it is given defeats
        // the compiler's lifetime inference once the fan-out runs in a spawned task.
        futures_util::stream::iter(0..recipients.len())
            .map(|i| {
                let frame = frame.clone();
                async move { (i, self.post(&recipients[i], frame).await) }
            })
            .buffer_unordered(POST_CONCURRENCY)
            .filter_map(|(i, result)| async move { result.err().map(|e| (i, e)) })
            .collect()
            .await
    }
}

/// How far the fan-out has delivered each stream.
///
/// A change stream (DynamoDB Streams) delivers every record at least once and a failed batch is
/// retried whole, so the fan-out keeps, per log stream, the seq it has delivered up to: a record
/// at or below it is a repeat and sends nothing.
#[async_trait]
pub trait Checkpoints: Send + Sync {
    /// Where the fan-out is with `stream`.
    async fn checkpoint(&self, stream: &Stream) -> StoreResult<Checkpoint>;

    /// Records delivery up to `seq`; never moves a checkpoint backwards. `relay`, when given,
    /// is stored with it (a checkpoint that does not move keeps its old one).
    async fn advance(
        &self,
        stream: &Stream,
        seq: u64,
        relay: Option<RelayLease>,
    ) -> StoreResult<()>;

    /// The seq delivered up to (0 when nothing was).
    async fn delivered(&self, stream: &Stream) -> StoreResult<u64> {
        Ok(self.checkpoint(stream).await?.seq)
    }
}

/// How far the fan-out has delivered a stream.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Checkpoint {
    /// The seq delivered up to (0 when nothing was).
    pub seq: u64,
    /// The room's frames go through the delivery queue, whatever the size of their audience,
    /// while this lease lasts: frames of it may still wait there, and one posted directly would
    /// overtake them.
    pub relay: Option<RelayLease>,
}

/// A room's frames going through the delivery queue: until when, and over how many lanes (FIFO
/// message groups). A connection's lane is fixed by its id and the number of lanes, so the
/// number is kept for as long as the room relays: changed while frames wait in the queue, it
/// would move connections to lanes where a later frame could overtake an earlier one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RelayLease {
    pub until: DateTime<Utc>,
    pub lanes: u32,
}

/// Frames for a set of connections, handed to a delivery worker.
///
/// Jobs of one `group` must be delivered in the order they were queued (an SQS FIFO message
/// group): a connection always falls in the same group of its room, so it sees the room's frames
/// in seq order however many workers run. `id` is unique per job and the same when a retried
/// fan-out queues the job again, so the queue can drop the repeat (FIFO deduplication).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DeliveryJob {
    /// The frames exactly as they go on the wire (each serialised once by the fan-out), in the
    /// order every connection of the job must get them: one, or a run of the room's frames
    /// whose lane held the same connections.
    pub frames: Vec<String>,
    pub connections: Vec<ConnectionId>,
    #[serde(default)]
    pub group: String,
    #[serde(default)]
    pub id: String,
}

/// `items` sorted into their groups (delivery lanes): each group's items in the order given,
/// the groups in the order they first appear. What keeps a lane's order wherever jobs are
/// handled a lane at a time (sending them, posting them).
pub fn in_groups<T>(items: impl IntoIterator<Item = T>, group: impl Fn(&T) -> &str) -> Vec<Vec<T>> {
    let mut groups: Vec<Vec<T>> = Vec::new();
    let mut index: std::collections::HashMap<String, usize> = Default::default();
    for item in items {
        let at = match index.get(group(&item)) {
            Some(&at) => at,
            None => {
                index.insert(group(&item).to_owned(), groups.len());
                groups.push(Vec::new());
                groups.len() - 1
            }
        };
        groups[at].push(item);
    }
    groups
}

/// Why a job could not be queued.
#[derive(Debug, thiserror::Error)]
#[error("could not queue a delivery: {0}")]
pub struct QueueError(pub String);

/// Where a big room's deliveries go to be posted by other workers (SQS → the deliver function).
#[async_trait]
pub trait DeliveryQueue: Send + Sync {
    /// Queues `jobs`: those of one group in the order given (the others in any order).
    async fn enqueue(&self, jobs: Vec<DeliveryJob>) -> Result<(), QueueError>;
}

/// Forgetting what nobody reads back: the streams and registry rows of connections closed long
/// ago, for stores that keep everything unless told (SQLite). DynamoDB forgets them by itself,
/// through the tables' TTL attribute; the memory store forgets everything at exit.
#[async_trait]
pub trait Retention: Send + Sync {
    /// Deletes the events and registry rows of at most `at_most` connections closed before
    /// `closed_before`, oldest first, in one short write; returns how many it forgot. Room
    /// streams, open connections, and the log's last event (which fixes the next position) are
    /// kept.
    async fn forget_connections(
        &self,
        closed_before: DateTime<Utc>,
        at_most: usize,
    ) -> StoreResult<usize>;
}

/// A store: its log, its projection, and its feed, checkpoints and retention where it has them.
#[derive(Clone)]
pub struct Store {
    pub log: Arc<dyn EventLog>,
    pub directory: Arc<dyn Directory>,
    pub feed: Option<Arc<dyn LogFeed>>,
    pub checkpoints: Option<Arc<dyn Checkpoints>>,
    pub retention: Option<Arc<dyn Retention>>,
    /// Leases of the `palaver serve` nodes sharing the store (DynamoDB).
    pub nodes: Option<Arc<dyn NodeLeases>>,
}

impl Store {
    /// Whether the store answers: one small read (the head of a stream nobody writes), for
    /// `/readyz` and for `serve` before it says it listens.
    pub async fn answers(&self) -> StoreResult<()> {
        let probe = RoomName::parse("readyz").expect("a valid room name");
        self.log.head(&Stream::Room(probe)).await.map(drop)
    }
}

/// The leases of the `palaver serve` nodes that share a store: each node renews its own while
/// it runs; one whose lease lapsed died without closing its connections, and another node
/// closes them for it (its users would otherwise stay "online", and count toward their caps,
/// until the rows expire hours later).
#[async_trait]
pub trait NodeLeases: Send + Sync {
    /// Takes `node`'s lease until `until`, whatever state it was in: a node starting.
    async fn claim(&self, node: &str, until: DateTime<Utc>) -> StoreResult<()>;

    /// Moves `node`'s lease on to `until`. `false` when it is not there: another node found it
    /// lapsed and closed the node's connections (the node was cut off from the store for longer
    /// than its lease).
    async fn renew(&self, node: &str, until: DateTime<Utc>) -> StoreResult<bool>;

    /// Every lease, with the time it runs until.
    async fn leases(&self) -> StoreResult<Vec<(String, DateTime<Utc>)>>;

    /// Removes `node`'s lease if it still runs until `until` (as read); `false` if it moved
    /// on meanwhile (the node renewed it) or is gone (another node removed it first).
    async fn remove(&self, node: &str, until: DateTime<Utc>) -> StoreResult<bool>;
}
