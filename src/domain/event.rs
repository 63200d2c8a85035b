//! The event log's vocabulary: what happened, in which stream, at which position.
//!
//! Every fact palaver knows is one of these events. Room events (joined, left, message posted)
//! live in the room's stream and carry the room's gap-free `seq`; connection events (connected,
//! disconnected) live in a stream of their own per connection, where `seq` 1 is the connect and
//! `seq` 2 the disconnect — so a connection can be closed only once, however many parties
//! (the client, `$disconnect`, a 410 found by the fan-out) notice it went away.

use super::names::{ConnectionId, RoomName, UserId};
use chrono::{DateTime, SecondsFormat, Utc};
use serde::{Deserialize, Serialize};
use std::fmt;
use ulid::Ulid;

/// Which ordered sequence an event belongs to.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Stream {
    Room(RoomName),
    Connection(ConnectionId),
}

impl Stream {
    /// The stream's storage key: `r:ROOM` or `c:CONNECTION`.
    pub fn key(&self) -> String {
        match self {
            Stream::Room(r) => format!("r:{r}"),
            Stream::Connection(c) => format!("c:{c}"),
        }
    }

    /// Reads a key written by [`Stream::key`].
    pub fn from_key(key: &str) -> Option<Stream> {
        match key.split_once(':')? {
            ("r", room) => RoomName::parse(room).ok().map(Stream::Room),
            ("c", conn) => Some(Stream::Connection(ConnectionId::new(conn))),
            _ => None,
        }
    }

    pub fn room(&self) -> Option<&RoomName> {
        match self {
            Stream::Room(r) => Some(r),
            Stream::Connection(_) => None,
        }
    }
}

impl fmt::Display for Stream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.key())
    }
}

/// Why a connection ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum DisconnectReason {
    /// The client or the gateway closed it (`$disconnect`).
    Closed,
    /// The management API answered 410 Gone while the fan-out posted to it.
    Gone,
    /// The local server that held it stopped (a crash, or a stop whose `$disconnect`s did not
    /// all finish); found open when the server started again.
    ServerStopped,
}

/// What happened. The stream an event belongs to follows from its body.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "camelCase")]
pub enum EventBody {
    #[serde(rename_all = "camelCase")]
    Connected {
        connection: ConnectionId,
        user: UserId,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        source_ip: Option<String>,
        /// The `palaver serve` process that holds the socket (`--node-id`), so that a node
        /// restarting on a shared store closes its own connections and no one else's. None
        /// on API Gateway, which holds every socket itself.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        node: Option<String>,
    },
    #[serde(rename_all = "camelCase")]
    Disconnected {
        connection: ConnectionId,
        user: UserId,
        reason: DisconnectReason,
    },
    Joined {
        room: RoomName,
        user: UserId,
    },
    Left {
        room: RoomName,
        user: UserId,
    },
    #[serde(rename_all = "camelCase")]
    MessagePosted {
        room: RoomName,
        user: UserId,
        text: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        client_msg_id: Option<String>,
        /// The connection it was sent from (keeps the registry's "last active" current).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        connection: Option<ConnectionId>,
    },
}

impl EventBody {
    pub fn stream(&self) -> Stream {
        match self {
            EventBody::Connected { connection, .. }
            | EventBody::Disconnected { connection, .. } => Stream::Connection(connection.clone()),
            EventBody::Joined { room, .. }
            | EventBody::Left { room, .. }
            | EventBody::MessagePosted { room, .. } => Stream::Room(room.clone()),
        }
    }

    pub fn user(&self) -> &UserId {
        match self {
            EventBody::Connected { user, .. }
            | EventBody::Disconnected { user, .. }
            | EventBody::Joined { user, .. }
            | EventBody::Left { user, .. }
            | EventBody::MessagePosted { user, .. } => user,
        }
    }

    /// What the event asks of its user's membership of its room: a message and a leave come from
    /// a member, a join from someone who is not one yet. `None` for connection events.
    pub fn membership_needed(&self) -> Option<(&RoomName, &UserId, bool)> {
        match self {
            EventBody::MessagePosted { room, user, .. } | EventBody::Left { room, user } => {
                Some((room, user, true))
            }
            EventBody::Joined { room, user } => Some((room, user, false)),
            EventBody::Connected { .. } | EventBody::Disconnected { .. } => None,
        }
    }

    /// Whether the log may take this event, given whether its user is a member of its room now:
    /// a [`Refusal`] when that contradicts [`EventBody::membership_needed`].
    pub fn check_membership(&self, member: bool) -> Result<(), Refusal> {
        match self.membership_needed() {
            Some((room, user, needed)) if needed != member => {
                let (room, user) = (room.clone(), user.clone());
                Err(if needed {
                    Refusal::NotMember { room, user }
                } else {
                    Refusal::AlreadyMember { room, user }
                })
            }
            _ => Ok(()),
        }
    }

    /// The idempotency key of a message, if its sender gave one.
    pub fn client_msg_id(&self) -> Option<&str> {
        match self {
            EventBody::MessagePosted { client_msg_id, .. } => client_msg_id.as_deref(),
            _ => None,
        }
    }

    /// A short name for logs and storage columns.
    pub fn kind(&self) -> &'static str {
        match self {
            EventBody::Connected { .. } => "connected",
            EventBody::Disconnected { .. } => "disconnected",
            EventBody::Joined { .. } => "joined",
            EventBody::Left { .. } => "left",
            EventBody::MessagePosted { .. } => "messagePosted",
        }
    }
}

/// An event as recorded in the log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Event {
    pub stream: Stream,
    /// Position in its stream: 1, 2, 3, … without gaps.
    pub seq: u64,
    pub id: Ulid,
    pub at: DateTime<Utc>,
    pub body: EventBody,
}

impl Event {
    /// Stamps a new event: the store calls this once it knows the seq.
    pub fn record(body: EventBody, seq: u64, at: DateTime<Utc>) -> Event {
        Event {
            stream: body.stream(),
            seq,
            id: Ulid::from_datetime(at.into()),
            at,
            body,
        }
    }

    pub fn room(&self) -> Option<&RoomName> {
        self.stream.room()
    }
}

/// What an append expects the stream to look like (optimistic concurrency, as in event stores).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Expect {
    /// Append at whatever the next seq is.
    Next,
    /// Append only if this event would get exactly this seq.
    Seq(u64),
    /// Append at the next seq only if the user's membership of the room is what the event needs
    /// ([`EventBody::membership_needed`]): what the route handlers ask, so that two racing joins
    /// log one `joined` and no message follows its sender's `left`. Otherwise
    /// [`Refusal`](crate::domain::Refusal).
    Membership,
    /// What a `joinRoom` asks: [`Expect::Membership`], and the join leaves its user a member of
    /// at most `max_rooms` rooms; otherwise [`Refusal::TooManyRooms`]. Checked with the append,
    /// like membership, so two joins at once cannot both take the last place.
    Join { max_rooms: usize },
}

impl Expect {
    /// Whether the append is refused when it contradicts its user's membership.
    pub fn checks_membership(self) -> bool {
        matches!(self, Expect::Membership | Expect::Join { .. })
    }

    /// The most rooms the event's user may be a member of once it is appended, if capped.
    pub fn max_rooms(self) -> Option<usize> {
        match self {
            Expect::Join { max_rooms } => Some(max_rooms),
            _ => None,
        }
    }
}

/// An event the log does not take, because it would contradict membership: a message or a leave
/// from someone who is not a member, or a join from someone who already is. Stores check it in
/// the same atomic step as the append where they can (memory, SQLite), so two racing joins log
/// one `joined`, and no message follows its sender's `left`.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("{user} is not a member of {room}")]
    NotMember { room: RoomName, user: UserId },
    #[error("{user} is a member of {room} already")]
    AlreadyMember { room: RoomName, user: UserId },
    #[error("{user} is a member of {rooms} rooms, the most one user may be in")]
    TooManyRooms { user: UserId, rooms: usize },
}

/// The outcome of an append.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Appended {
    pub event: Event,
    /// The append repeated an earlier `clientMsgId`: `event` is the first one, nothing was added.
    pub duplicate: bool,
}

/// RFC 3339 UTC with milliseconds, the one timestamp format on the wire.
pub fn rfc3339(at: &DateTime<Utc>) -> String {
    at.to_rfc3339_opts(SecondsFormat::Millis, true)
}

/// Now, truncated to the millisecond so that what is stored equals what is read back.
pub fn now() -> DateTime<Utc> {
    let now = Utc::now();
    DateTime::from_timestamp_millis(now.timestamp_millis()).unwrap_or(now)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stream_keys_round_trip() {
        let room = Stream::Room(RoomName::parse("general").unwrap());
        let conn = Stream::Connection(ConnectionId::new("abc:def="));
        assert_eq!(Stream::from_key(&room.key()), Some(room));
        assert_eq!(Stream::from_key(&conn.key()), Some(conn));
        assert_eq!(Stream::from_key("x:y"), None);
    }

    #[test]
    fn bodies_round_trip_through_json() {
        let body = EventBody::MessagePosted {
            room: RoomName::parse("r").unwrap(),
            user: UserId::parse("u").unwrap(),
            text: "hi".into(),
            client_msg_id: Some("m1".into()),
            connection: None,
        };
        let json = serde_json::to_string(&body).unwrap();
        assert!(json.contains(r#""kind":"messagePosted""#), "{json}");
        assert_eq!(serde_json::from_str::<EventBody>(&json).unwrap(), body);
    }
}
