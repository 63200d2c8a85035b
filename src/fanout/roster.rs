//! Who listens to what, from the local tail's point of view: rooms → members → open
//! connections, kept in memory by folding every event the tail delivers.
//!
//! The local tail sees every event exactly once, in commit order, so it can keep its own copy of
//! the projection instead of asking the store for a room's audience per event — a query per
//! event costs two thread hand-offs through sqlx's SQLite worker, and under load that, not
//! SQLite, was the fan-out's ceiling. The roster is loaded from the store's projection once when
//! the tail starts and then kept by the same fold the stores use
//! ([`projection::changes`](crate::domain::projection::changes)); the store's projection stays
//! the source for operators and for the handlers.
//!
//! A room's audience is built once and shared (`Arc<[ConnectionId]>`) until a join, a leave, or
//! one of its members' connections opening or closing changes it.

use super::Listeners;
use crate::domain::projection::{Change, changes};
use crate::domain::{ConnectionId, Event, RoomName, UserId};
use crate::ports::{Directory, StoreResult};
use async_trait::async_trait;
use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

#[derive(Default)]
struct Room {
    members: BTreeSet<UserId>,
    /// Every open connection of every member, built when first asked for.
    audience: Option<Arc<[ConnectionId]>>,
}

#[derive(Default)]
struct User {
    rooms: BTreeSet<RoomName>,
    /// Open connections, oldest first.
    connections: Vec<ConnectionId>,
}

impl User {
    fn is_empty(&self) -> bool {
        self.rooms.is_empty() && self.connections.is_empty()
    }
}

/// The in-memory read model of the local fan-out.
#[derive(Default)]
pub struct Roster {
    rooms: HashMap<RoomName, Room>,
    users: HashMap<UserId, User>,
    /// Whose each open connection is.
    owners: HashMap<ConnectionId, UserId>,
}

impl Roster {
    /// The store's projection as it is now: every room's members and every open connection.
    ///
    /// A room whose members cannot be read (a damaged row) is left out and logged, as an
    /// unreadable event is: it gets no live frames until one of its members joins again, and
    /// every other room goes on. Only a store that cannot list its rooms at all fails the start.
    pub async fn load(directory: &dyn Directory) -> StoreResult<Roster> {
        let mut roster = Roster::default();
        for room in directory.rooms().await? {
            match directory.members(&room.room).await {
                Ok(members) => {
                    for member in members {
                        roster.join(&room.room, &member.user);
                    }
                }
                Err(error) => {
                    tracing::error!(room = %room.room, %error, "members unreadable: room left out");
                }
            }
        }
        match directory.open_connections(None).await {
            Ok(open) => {
                for connection in open {
                    roster.open(&connection.user, &connection.id);
                }
            }
            // Connections open at start belong to an earlier run: none of them is on this
            // process's gateway, so leaving them out loses no delivery.
            Err(error) => tracing::error!(%error, "open connections unreadable: left out"),
        }
        Ok(roster)
    }

    /// Folds one event in.
    pub fn apply(&mut self, event: &Event) {
        for change in changes(event) {
            match change {
                Change::Membership {
                    room, user, active, ..
                } => {
                    if active {
                        self.join(room, user);
                    } else {
                        self.leave(room, user);
                    }
                }
                Change::ConnectionOpened {
                    connection, user, ..
                } => self.open(user, connection),
                Change::ConnectionClosed {
                    connection, user, ..
                } => self.close(user, connection),
                Change::Activity { .. } | Change::RoomHead { .. } => {}
            }
        }
    }

    /// Forgets a connection the gateway found gone, ahead of its `disconnected` event, so that
    /// the events in between are not posted to it again.
    pub fn forget(&mut self, connection: &ConnectionId) {
        if let Some(user) = self.owners.get(connection).cloned() {
            self.close(&user, connection);
        }
    }

    /// Every open connection of every member of `room`.
    pub fn audience(&mut self, room: &RoomName) -> Arc<[ConnectionId]> {
        let Some(state) = self.rooms.get_mut(room) else {
            return Arc::from(Vec::new());
        };
        if let Some(audience) = &state.audience {
            return audience.clone();
        }
        let audience: Arc<[ConnectionId]> = state
            .members
            .iter()
            .filter_map(|user| self.users.get(user))
            .flat_map(|user| user.connections.iter().cloned())
            .collect();
        state.audience = Some(audience.clone());
        audience
    }

    /// The rooms `user` is a member of, by name.
    pub fn rooms_of(&self, user: &UserId) -> Vec<RoomName> {
        self.users
            .get(user)
            .map(|u| u.rooms.iter().cloned().collect())
            .unwrap_or_default()
    }

    /// `user`'s open connections, oldest first.
    pub fn connections_of(&self, user: &UserId) -> Vec<ConnectionId> {
        self.users
            .get(user)
            .map(|u| u.connections.clone())
            .unwrap_or_default()
    }

    fn join(&mut self, room: &RoomName, user: &UserId) {
        let state = self.rooms.entry(room.clone()).or_default();
        if state.members.insert(user.clone()) {
            state.audience = None;
        }
        self.users
            .entry(user.clone())
            .or_default()
            .rooms
            .insert(room.clone());
    }

    fn leave(&mut self, room: &RoomName, user: &UserId) {
        if let Some(state) = self.rooms.get_mut(room)
            && state.members.remove(user)
        {
            state.audience = None;
            if state.members.is_empty() {
                self.rooms.remove(room);
            }
        }
        if let Some(u) = self.users.get_mut(user) {
            u.rooms.remove(room);
            if u.is_empty() {
                self.users.remove(user);
            }
        }
    }

    fn open(&mut self, user: &UserId, connection: &ConnectionId) {
        let u = self.users.entry(user.clone()).or_default();
        if u.connections.contains(connection) {
            return;
        }
        u.connections.push(connection.clone());
        self.owners.insert(connection.clone(), user.clone());
        self.invalidate_rooms_of(user);
    }

    fn close(&mut self, user: &UserId, connection: &ConnectionId) {
        let Some(u) = self.users.get_mut(user) else {
            return;
        };
        let before = u.connections.len();
        u.connections.retain(|c| c != connection);
        if u.connections.len() == before {
            return;
        }
        self.owners.remove(connection);
        if u.is_empty() {
            self.users.remove(user);
        } else {
            self.invalidate_rooms_of(user);
        }
    }

    fn invalidate_rooms_of(&mut self, user: &UserId) {
        if let Some(u) = self.users.get(user) {
            for room in &u.rooms {
                if let Some(state) = self.rooms.get_mut(room) {
                    state.audience = None;
                }
            }
        }
    }
}

#[async_trait]
impl Listeners for Roster {
    async fn observe(&mut self, event: &Event) -> StoreResult<()> {
        self.apply(event);
        Ok(())
    }

    /// The roster is folded in log order, so a connection is in a room's audience exactly from
    /// the first event after it started listening: `seq` needs no check here.
    async fn audience(
        &mut self,
        room: &RoomName,
        _seq: Option<u64>,
    ) -> StoreResult<Arc<[ConnectionId]>> {
        Ok(Roster::audience(self, room))
    }

    async fn rooms_of(&mut self, user: &UserId) -> StoreResult<Vec<RoomName>> {
        Ok(Roster::rooms_of(self, user))
    }

    async fn connections_of(&mut self, user: &UserId) -> StoreResult<Vec<ConnectionId>> {
        Ok(Roster::connections_of(self, user))
    }

    fn gone(&mut self, connection: &ConnectionId) {
        self.forget(connection);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{DisconnectReason, EventBody};

    fn room(name: &str) -> RoomName {
        RoomName::parse(name).unwrap()
    }
    fn user(name: &str) -> UserId {
        UserId::parse(name).unwrap()
    }
    fn event(body: EventBody) -> Event {
        Event::record(body, 1, crate::domain::event::now())
    }
    fn connected(c: &str, u: &str) -> Event {
        event(EventBody::Connected {
            connection: ConnectionId::new(c),
            user: user(u),
            source_ip: None,
            node: None,
        })
    }
    fn disconnected(c: &str, u: &str) -> Event {
        event(EventBody::Disconnected {
            connection: ConnectionId::new(c),
            user: user(u),
            reason: DisconnectReason::Closed,
        })
    }
    fn joined(r: &str, u: &str) -> Event {
        event(EventBody::Joined {
            room: room(r),
            user: user(u),
        })
    }
    fn left(r: &str, u: &str) -> Event {
        event(EventBody::Left {
            room: room(r),
            user: user(u),
        })
    }
    fn ids(audience: &[ConnectionId]) -> Vec<&str> {
        let mut ids: Vec<&str> = audience.iter().map(ConnectionId::as_str).collect();
        ids.sort_unstable();
        ids
    }

    #[test]
    fn the_audience_follows_joins_leaves_and_connections() {
        let mut roster = Roster::default();
        for e in [
            connected("a1", "ana"),
            joined("general", "ana"),
            connected("a2", "ana"),
            connected("b1", "ben"),
        ] {
            roster.apply(&e);
        }
        assert_eq!(ids(&roster.audience(&room("general"))), ["a1", "a2"]);
        roster.apply(&joined("general", "ben"));
        assert_eq!(ids(&roster.audience(&room("general"))), ["a1", "a2", "b1"]);
        roster.apply(&disconnected("a1", "ana"));
        assert_eq!(ids(&roster.audience(&room("general"))), ["a2", "b1"]);
        roster.apply(&left("general", "ben"));
        assert_eq!(ids(&roster.audience(&room("general"))), ["a2"]);
        assert_eq!(roster.rooms_of(&user("ana")), [room("general")]);
        assert!(roster.rooms_of(&user("ben")).is_empty());
        assert_eq!(
            roster.connections_of(&user("ben")),
            [ConnectionId::new("b1")]
        );
    }

    #[test]
    fn a_connection_found_gone_leaves_the_audience_at_once() {
        let mut roster = Roster::default();
        roster.apply(&connected("a1", "ana"));
        roster.apply(&joined("general", "ana"));
        assert_eq!(ids(&roster.audience(&room("general"))), ["a1"]);
        roster.forget(&ConnectionId::new("a1"));
        assert!(roster.audience(&room("general")).is_empty());
        // Its disconnected event, when the tail reaches it, changes nothing more.
        roster.apply(&disconnected("a1", "ana"));
        assert!(roster.connections_of(&user("ana")).is_empty());
        assert_eq!(roster.rooms_of(&user("ana")), [room("general")]);
    }
}
