//! The memory store: the whole log and its projection behind one lock.
//!
//! For tests and throwaway local runs (`memory://`). Appends check and write under the same lock,
//! so concurrent appends to a room can never leave a gap or a duplicate seq.

use crate::domain::event::now;
use crate::domain::projection::{Change, changes};
use crate::domain::{
    Appended, ConnectionId, Event, EventBody, Expect, Refusal, RoomName, Stream, UserId,
};
use crate::ports::{
    Checkpoint, Checkpoints, ConnectionRecord, Directory, EventLog, Listener, LogFeed,
    MemberRecord, RelayLease, RoomRecord, Store, StoreError, StoreResult,
};
use async_trait::async_trait;
use chrono::{DateTime, Utc};
use parking_lot::{Mutex, MutexGuard};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use tokio::sync::watch;

/// An in-process store. Nothing survives the process.
pub struct MemoryStore {
    state: Mutex<State>,
    committed: watch::Sender<u64>,
    /// The fan-out's checkpoints, for tests of the stream-driven fan-out.
    delivered: Mutex<HashMap<String, Checkpoint>>,
}

#[derive(Default)]
struct State {
    /// Every event in commit order; the global position is the index + 1.
    all: Vec<Event>,
    /// Per stream key, the global positions of its events (index = seq - 1).
    streams: HashMap<String, Vec<usize>>,
    /// (room stream key, user, clientMsgId) → seq of the first message.
    client_msg_ids: HashMap<(String, UserId, String), u64>,
    members: BTreeMap<(RoomName, UserId), Membership>,
    /// Active members per room, for the audience.
    room_members: HashMap<RoomName, BTreeSet<UserId>>,
    connections: HashMap<ConnectionId, ConnectionRecord>,
    /// Open connections per user.
    user_connections: HashMap<UserId, BTreeSet<ConnectionId>>,
    heads: BTreeMap<RoomName, u64>,
}

struct Membership {
    active: bool,
    joined_at: DateTime<Utc>,
    seq: u64,
}

impl MemoryStore {
    pub fn new() -> Arc<Self> {
        Arc::new(MemoryStore {
            state: Mutex::new(State::default()),
            committed: watch::channel(0).0,
            delivered: Mutex::new(HashMap::new()),
        })
    }

    /// The store behind every port it implements.
    pub fn store() -> Store {
        let store = MemoryStore::new();
        Store {
            log: store.clone(),
            directory: store.clone(),
            feed: Some(store.clone()),
            checkpoints: Some(store),
            retention: None,
            nodes: None,
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // parking_lot's locks do not poison: a panic while holding it cannot leave the state
        // half-written anyway (every mutation is a single insert or remove).
        self.state.lock()
    }
}

impl State {
    /// The rooms `user` is an active member of.
    fn rooms_of<'s>(&'s self, user: &'s UserId) -> impl Iterator<Item = &'s RoomName> + 's {
        self.members
            .iter()
            .filter(move |((_, u), m)| u == user && m.active)
            .map(|((room, _), _)| room)
    }

    /// The active members of `room`.
    fn members_of(&self, room: &RoomName) -> impl Iterator<Item = &UserId> {
        self.room_members.get(room).into_iter().flatten()
    }

    fn is_member(&self, room: &RoomName, user: &UserId) -> bool {
        self.room_members
            .get(room)
            .is_some_and(|members| members.contains(user))
    }

    fn apply(&mut self, event: &Event) {
        for change in changes(event) {
            self.apply_change(change);
        }
    }

    fn apply_change(&mut self, change: Change<'_>) {
        match change {
            Change::Membership {
                room,
                user,
                active,
                seq,
                at,
            } => {
                let key = (room.clone(), user.clone());
                if let Some(m) = self.members.get(&key)
                    && m.seq >= seq
                {
                    return;
                }
                let joined_at = match self.members.get(&key) {
                    Some(m) if m.active && active => m.joined_at,
                    _ => at,
                };
                self.members.insert(
                    key,
                    Membership {
                        active,
                        joined_at,
                        seq,
                    },
                );
                let set = self.room_members.entry(room.clone()).or_default();
                if active {
                    set.insert(user.clone());
                } else {
                    set.remove(user);
                }
            }
            Change::ConnectionOpened {
                connection,
                user,
                source_ip,
                node,
                at,
            } => {
                if self.connections.contains_key(connection) {
                    return;
                }
                self.connections.insert(
                    connection.clone(),
                    ConnectionRecord {
                        id: connection.clone(),
                        user: user.clone(),
                        connected_at: at,
                        last_active_at: at,
                        source_ip: source_ip.map(str::to_owned),
                        node: node.map(str::to_owned),
                        open: true,
                    },
                );
                self.user_connections
                    .entry(user.clone())
                    .or_default()
                    .insert(connection.clone());
            }
            Change::ConnectionClosed {
                connection,
                user,
                at,
            } => {
                let record = self
                    .connections
                    .entry(connection.clone())
                    .or_insert_with(|| ConnectionRecord {
                        id: connection.clone(),
                        user: user.clone(),
                        connected_at: at,
                        last_active_at: at,
                        source_ip: None,
                        node: None,
                        open: false,
                    });
                record.open = false;
                if let Some(set) = self.user_connections.get_mut(user) {
                    set.remove(connection);
                }
            }
            Change::Activity { connection, at } => {
                if let Some(record) = self.connections.get_mut(connection)
                    && record.last_active_at < at
                {
                    record.last_active_at = at;
                }
            }
            Change::RoomHead { room, seq } => {
                let head = self.heads.entry(room.clone()).or_insert(0);
                *head = (*head).max(seq);
            }
        }
    }

    fn stream_head(&self, key: &str) -> u64 {
        self.streams.get(key).map_or(0, |s| s.len() as u64)
    }

    /// See [`Directory::live_from`]: the room's events at or after the position where the
    /// connection started listening — just after its `connected`, or at its user's `joined`,
    /// whichever is later — are heard live. (Events only applied, never appended, have no
    /// position: they count as the log's start.)
    fn live_from(&self, connection: &ConnectionId, room: &RoomName) -> Option<u64> {
        let record = self.connections.get(connection).filter(|c| c.open)?;
        let member = self
            .members
            .get(&(room.clone(), record.user.clone()))
            .filter(|m| m.active)?;
        let positions = self.streams.get(&Stream::Room(room.clone()).key());
        let opened = self
            .streams
            .get(&Stream::Connection(connection.clone()).key())
            .and_then(|p| p.first())
            .map_or(0, |index| index + 1);
        let joined = positions
            .and_then(|p| p.get(usize::try_from(member.seq).ok()?.checked_sub(1)?))
            .copied()
            .unwrap_or(0);
        let start = opened.max(joined);
        let before = positions.map_or(0, |p| p.partition_point(|&index| index < start));
        Some(before as u64 + 1)
    }

    fn open_count(&self, user: &UserId) -> usize {
        self.user_connections.get(user).map_or(0, BTreeSet::len)
    }
}

#[async_trait]
impl EventLog for MemoryStore {
    async fn append(&self, body: EventBody, expect: Expect) -> StoreResult<Appended> {
        let mut state = self.lock();
        let key = body.stream().key();
        if let Some(id) = body.client_msg_id() {
            let dedupe = (key.clone(), body.user().clone(), id.to_owned());
            if let Some(seq) = state.client_msg_ids.get(&dedupe) {
                let pos = state.streams[&key][*seq as usize - 1];
                return Ok(Appended {
                    event: state.all[pos].clone(),
                    duplicate: true,
                });
            }
        }
        if expect.checks_membership()
            && let Some((room, user, _)) = body.membership_needed()
        {
            let member = state.is_member(room, user);
            body.check_membership(member)?;
            if let Some(max_rooms) = expect.max_rooms() {
                let rooms = state.rooms_of(user).count();
                if rooms >= max_rooms {
                    return Err(Refusal::TooManyRooms {
                        user: user.clone(),
                        rooms,
                    }
                    .into());
                }
            }
        }
        let next = state.stream_head(&key) + 1;
        if let Expect::Seq(expected) = expect
            && expected != next
        {
            return Err(StoreError::Conflict {
                stream: key,
                expected,
                next,
            });
        }
        let event = Event::record(body, next, now());
        if let Some(id) = event.body.client_msg_id() {
            let dedupe = (key.clone(), event.body.user().clone(), id.to_owned());
            state.client_msg_ids.insert(dedupe, next);
        }
        state.apply(&event);
        let position = state.all.len();
        state.all.push(event.clone());
        state.streams.entry(key).or_default().push(position);
        drop(state);
        self.committed.send_replace(position as u64 + 1);
        metrics::counter!(crate::metrics::APPENDS).increment(1);
        Ok(Appended {
            event,
            duplicate: false,
        })
    }

    async fn read(&self, stream: &Stream, after: u64, limit: usize) -> StoreResult<Vec<Event>> {
        let state = self.lock();
        let Some(positions) = state.streams.get(&stream.key()) else {
            return Ok(Vec::new());
        };
        let start = usize::try_from(after)
            .unwrap_or(usize::MAX)
            .min(positions.len());
        Ok(positions[start..]
            .iter()
            .take(limit)
            .map(|p| state.all[*p].clone())
            .collect())
    }

    async fn head(&self, stream: &Stream) -> StoreResult<u64> {
        Ok(self.lock().stream_head(&stream.key()))
    }
}

#[async_trait]
impl Directory for MemoryStore {
    async fn apply(&self, event: &Event) -> StoreResult<()> {
        self.lock().apply(event);
        Ok(())
    }

    async fn connection(&self, id: &ConnectionId) -> StoreResult<Option<ConnectionRecord>> {
        Ok(self.lock().connections.get(id).cloned())
    }

    async fn open_connections(&self, user: Option<&UserId>) -> StoreResult<Vec<ConnectionRecord>> {
        let state = self.lock();
        let mut open: Vec<ConnectionRecord> = match user {
            Some(user) => state
                .user_connections
                .get(user)
                .into_iter()
                .flatten()
                .filter_map(|id| state.connections.get(id).cloned())
                .collect(),
            None => state
                .connections
                .values()
                .filter(|c| c.open)
                .cloned()
                .collect(),
        };
        open.sort_by(|a, b| (a.connected_at, &a.id).cmp(&(b.connected_at, &b.id)));
        Ok(open)
    }

    async fn is_member(&self, room: &RoomName, user: &UserId) -> StoreResult<bool> {
        Ok(self.lock().is_member(room, user))
    }

    async fn members(&self, room: &RoomName) -> StoreResult<Vec<MemberRecord>> {
        let state = self.lock();
        Ok(state
            .members_of(room)
            .map(|user| MemberRecord {
                user: user.clone(),
                joined_at: state.members[&(room.clone(), user.clone())].joined_at,
                connections: state.open_count(user),
            })
            .collect())
    }

    async fn rooms_of(&self, user: &UserId) -> StoreResult<Vec<RoomName>> {
        Ok(self.lock().rooms_of(user).cloned().collect())
    }

    async fn rooms(&self) -> StoreResult<Vec<RoomRecord>> {
        let state = self.lock();
        Ok(state
            .heads
            .iter()
            .map(|(room, head)| {
                let members = state.room_members.get(room);
                RoomRecord {
                    room: room.clone(),
                    members: members.map_or(0, BTreeSet::len),
                    online: members
                        .into_iter()
                        .flatten()
                        .filter(|u| state.open_count(u) > 0)
                        .count(),
                    head: *head,
                }
            })
            .collect())
    }

    async fn listeners(&self, room: &RoomName) -> StoreResult<Vec<Listener>> {
        let state = self.lock();
        Ok(state
            .members_of(room)
            .filter_map(|user| state.user_connections.get(user))
            .flatten()
            .filter_map(|connection| {
                Some(Listener {
                    connection: connection.clone(),
                    live_from: state.live_from(connection, room)?,
                    node: state.connections.get(connection)?.node.clone(),
                })
            })
            .collect())
    }

    async fn live_from(
        &self,
        connection: &ConnectionId,
        room: &RoomName,
    ) -> StoreResult<Option<u64>> {
        Ok(self.lock().live_from(connection, room))
    }
}

#[async_trait]
impl LogFeed for MemoryStore {
    async fn read_all(&self, after: u64, limit: usize) -> StoreResult<Vec<(u64, Event)>> {
        let state = self.lock();
        let start = usize::try_from(after)
            .unwrap_or(usize::MAX)
            .min(state.all.len());
        Ok(state.all[start..]
            .iter()
            .take(limit)
            .enumerate()
            .map(|(i, e)| ((start + i + 1) as u64, e.clone()))
            .collect())
    }

    fn watch(&self) -> watch::Receiver<u64> {
        self.committed.subscribe()
    }
}

#[async_trait]
impl Checkpoints for MemoryStore {
    async fn checkpoint(&self, stream: &Stream) -> StoreResult<Checkpoint> {
        let delivered = self.delivered.lock();
        Ok(delivered.get(&stream.key()).cloned().unwrap_or_default())
    }

    async fn advance(
        &self,
        stream: &Stream,
        seq: u64,
        relay: Option<RelayLease>,
    ) -> StoreResult<()> {
        let mut delivered = self.delivered.lock();
        let at = delivered.entry(stream.key()).or_default();
        if seq > at.seq {
            at.seq = seq;
            if relay.is_some() {
                at.relay = relay;
            }
        }
        Ok(())
    }
}
