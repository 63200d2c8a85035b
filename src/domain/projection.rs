//! The fold from events to the state handlers and the fan-out read: who is a member of which
//! room, which connections are open, how far each room's log goes.
//!
//! Each event maps to at most a few [`Change`]s, and every store applies a change so that
//! applying it twice, or applying an older one after a newer one, changes nothing:
//! membership keeps the seq of the event that last set it and ignores anything not newer; a
//! closed connection stays closed (its row is a tombstone) even if its `connected` event is
//! seen again; a room's head only moves forward.

use super::event::{Event, EventBody};
use super::names::{ConnectionId, RoomName, UserId};
use chrono::{DateTime, Utc};

/// One idempotent change to the projected state.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Change<'a> {
    /// `user` is (or is no longer) a member of `room`, as of the room event `seq`.
    Membership {
        room: &'a RoomName,
        user: &'a UserId,
        active: bool,
        seq: u64,
        at: DateTime<Utc>,
    },
    ConnectionOpened {
        connection: &'a ConnectionId,
        user: &'a UserId,
        source_ip: Option<&'a str>,
        node: Option<&'a str>,
        at: DateTime<Utc>,
    },
    ConnectionClosed {
        connection: &'a ConnectionId,
        user: &'a UserId,
        at: DateTime<Utc>,
    },
    /// The connection did something at `at`.
    Activity {
        connection: &'a ConnectionId,
        at: DateTime<Utc>,
    },
    /// The room's log reaches at least `seq`.
    RoomHead { room: &'a RoomName, seq: u64 },
}

/// The changes an event makes.
pub fn changes(event: &Event) -> Vec<Change<'_>> {
    let at = event.at;
    let seq = event.seq;
    match &event.body {
        EventBody::Connected {
            connection,
            user,
            source_ip,
            node,
        } => vec![Change::ConnectionOpened {
            connection,
            user,
            source_ip: source_ip.as_deref(),
            node: node.as_deref(),
            at,
        }],
        EventBody::Disconnected {
            connection, user, ..
        } => vec![Change::ConnectionClosed {
            connection,
            user,
            at,
        }],
        EventBody::Joined { room, user } => vec![
            Change::RoomHead { room, seq },
            Change::Membership {
                room,
                user,
                active: true,
                seq,
                at,
            },
        ],
        EventBody::Left { room, user } => vec![
            Change::RoomHead { room, seq },
            Change::Membership {
                room,
                user,
                active: false,
                seq,
                at,
            },
        ],
        EventBody::MessagePosted {
            room, connection, ..
        } => {
            let mut changes = vec![Change::RoomHead { room, seq }];
            if let Some(connection) = connection {
                changes.push(Change::Activity { connection, at });
            }
            changes
        }
    }
}
