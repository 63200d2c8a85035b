//! The projection in SQL: each kind of [`Change`] as one idempotent, set-based statement.
//!
//! Written once and run from both places that project: the committer, in the same statements
//! that append the batch and commit it ([`write`](super::write)), and
//! [`Directory::apply`](crate::ports::Directory::apply). The guards in the
//! statements carry the rules of [`projection`](crate::domain::projection), exactly as the memory
//! store applies them:
//!
//! - membership: an upsert that only takes effect for a newer room seq; re-joining while still a
//!   member keeps the first `joined_at`;
//! - connections: `connected` inserts or does nothing, so it cannot reopen a tombstone;
//!   `disconnected` closes the row, creating a closed tombstone if the connect was never seen;
//! - activity and room heads only move forward.
//!
//! A whole batch is aggregated into one [`Projection`] — each kind of change one JSON array — so a
//! batch of 200 connects costs the statements a batch of one does. The statements are run
//! together as one text ([`write`](super::write)) and share its one parameter `?1`: a JSON object
//! whose members are the arrays (`json_each(?1, '$.heads')`).

use super::SqliteError;
use super::rows::{int, millis};
use crate::domain::projection::{Change, changes};
use crate::domain::{ConnectionId, Event, RoomName};
use chrono::{DateTime, Utc};
use serde::Serialize;
use std::collections::HashMap;

/// Room heads, only ever moved forward: `$.heads` is an array of `[room, head]` pairs, one per room.
/// (`WHERE true` tells SQLite's parser that `ON CONFLICT` belongs to the upsert, not the join.)
const ROOM_HEADS: &str = "\
    INSERT INTO rooms (room, head)
    SELECT value ->> 0, value ->> 1 FROM json_each(?1, '$.heads') WHERE true
    ON CONFLICT (room) DO UPDATE SET head = excluded.head WHERE excluded.head > rooms.head";

/// Membership changes: `$.memberships` is an array of `[room, user, active, joined_at, seq]`, in log
/// order. An upsert that only takes effect for a newer room seq; re-joining while still a member
/// keeps the first `joined_at`. SQLite upserts the rows of one statement one after another, so a later
/// change of the same member sees what an earlier one did, exactly as separate statements would.
const MEMBERSHIPS: &str = "\
    INSERT INTO members (room, user_id, active, joined_at, seq)
    SELECT value ->> 0, value ->> 1, value ->> 2, value ->> 3, value ->> 4
    FROM json_each(?1, '$.memberships') WHERE true
    ON CONFLICT (room, user_id) DO UPDATE SET
        joined_at = CASE WHEN members.active = 1 AND excluded.active = 1
                         THEN members.joined_at ELSE excluded.joined_at END,
        active = excluded.active,
        seq = excluded.seq
    WHERE excluded.seq > members.seq";

/// Connection openings and closings, in log order: `$.connections` is an array of `[connection, user, at, source_ip, closed_at]`, where an opening has no `closed_at`
/// and a closing no `source_ip`. An opening of a known connection does nothing (it cannot reopen
/// a tombstone); a closing closes an open row or leaves a closed tombstone.
const CONNECTION_CHANGES: &str = "\
    INSERT INTO connections (id, user_id, connected_at, last_active_at, source_ip, closed_at, node)
    SELECT value ->> 0, value ->> 1, value ->> 2, value ->> 2, value ->> 3, value ->> 4, value ->> 5
    FROM json_each(?1, '$.connections') WHERE true
    ON CONFLICT (id) DO UPDATE SET closed_at = excluded.closed_at
    WHERE connections.closed_at IS NULL AND excluded.closed_at IS NOT NULL";

/// Last-active times, only ever moved forward: `$.activity` is an array of `[connection, millis]`
/// pairs, one per connection.
const ACTIVITIES: &str = "\
    UPDATE connections SET last_active_at = a.value ->> 1
    FROM json_each(?1, '$.activity') AS a
    WHERE connections.id = a.value ->> 0 AND connections.last_active_at < a.value ->> 1";

/// A row of [`MEMBERSHIPS`]: room, user, active, joined_at, seq.
type MembershipRow<'e> = (&'e str, &'e str, bool, i64, i64);

/// A row of [`CONNECTION_CHANGES`]: connection, user, at, source_ip, closed_at.
type ConnectionRow<'e> = (
    &'e str,
    &'e str,
    i64,
    Option<&'e str>,
    Option<i64>,
    Option<&'e str>,
);

/// The four statements, in the order they must run (see [`Projection::of`]).
pub(super) const STATEMENTS: [&str; 4] = [MEMBERSHIPS, CONNECTION_CHANGES, ROOM_HEADS, ACTIVITIES];

/// A batch's changes, aggregated: serialised, the members of the statements' parameter.
#[derive(Serialize)]
pub(super) struct Projection<'e> {
    /// The rows of [`MEMBERSHIPS`].
    memberships: Vec<MembershipRow<'e>>,
    /// The rows of [`CONNECTION_CHANGES`].
    connections: Vec<ConnectionRow<'e>>,
    /// The rows of [`ROOM_HEADS`].
    heads: Vec<(&'e str, i64)>,
    /// The rows of [`ACTIVITIES`].
    activity: Vec<(&'e str, i64)>,
}

impl<'e> Projection<'e> {
    /// The changes of `events`, given in log order, aggregated so that running the four
    /// statements once has the same result as applying each event in turn.
    ///
    /// Room heads and activity only move forward, so each room's highest seq and each
    /// connection's latest time are all that count. Membership and connection changes depend on
    /// their order, so each kind is one statement whose rows SQLite applies in log order; the two
    /// kinds touch different tables, so they do not depend on each other. They run first:
    /// activity only touches a connection row that exists, and must see the rows this batch
    /// creates. Moving activity after them gives the in-turn result as long as event times do not
    /// go backwards within the batch (the committer stamps a batch with one time): a connection
    /// that is opened or tombstoned in the batch starts at a time no earlier than the activity
    /// before it.
    pub fn of(events: impl Iterator<Item = &'e Event>) -> Result<Projection<'e>, SqliteError> {
        let mut heads: HashMap<&RoomName, u64> = HashMap::new();
        let mut activity: HashMap<&ConnectionId, DateTime<Utc>> = HashMap::new();
        let mut memberships: Vec<MembershipRow> = Vec::new();
        let mut connections: Vec<ConnectionRow> = Vec::new();
        for event in events {
            for change in changes(event) {
                match change {
                    Change::RoomHead { room, seq } => {
                        let head = heads.entry(room).or_insert(seq);
                        *head = (*head).max(seq);
                    }
                    Change::Activity { connection, at } => {
                        let latest = activity.entry(connection).or_insert(at);
                        *latest = (*latest).max(at);
                    }
                    Change::Membership {
                        room,
                        user,
                        active,
                        seq,
                        at,
                    } => memberships.push((
                        room.as_str(),
                        user.as_str(),
                        active,
                        millis(&at),
                        int(seq)?,
                    )),
                    Change::ConnectionOpened {
                        connection,
                        user,
                        source_ip,
                        node,
                        at,
                    } => connections.push((
                        connection.as_str(),
                        user.as_str(),
                        millis(&at),
                        source_ip,
                        None,
                        node,
                    )),
                    Change::ConnectionClosed {
                        connection,
                        user,
                        at,
                    } => connections.push((
                        connection.as_str(),
                        user.as_str(),
                        millis(&at),
                        None,
                        Some(millis(&at)),
                        None,
                    )),
                }
            }
        }
        let heads = heads
            .into_iter()
            .map(|(room, seq)| Ok((room.as_str(), int(seq)?)))
            .collect::<Result<Vec<_>, SqliteError>>()?;
        let activity: Vec<(&str, i64)> = activity
            .into_iter()
            .map(|(connection, at)| (connection.as_str(), millis(&at)))
            .collect();
        Ok(Projection {
            memberships,
            connections,
            heads,
            activity,
        })
    }
}
