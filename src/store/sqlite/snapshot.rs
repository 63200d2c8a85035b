//! What a batch depends on, read in the statement that opens its transaction.
//!
//! Every statement is a round trip to sqlx's worker thread, and each round trip is two thread
//! switches; with a batch's own work at a millisecond or so, those switches were the largest part
//! of a small batch's cost. So the committer opens its transaction and reads everything
//! [`Plan::decide`](super::batch::Plan::decide) needs in one go: `BEGIN IMMEDIATE` and one
//! `SELECT` sent together, answering one row whose columns are JSON arrays:
//!
//! - the log's last position, and the head of every stream the batch appends to;
//! - which of its `(room, user)` pairs that need membership are active members;
//! - how many rooms each of its capped joiners ([`Expect::Join`]) is in;
//! - the events already logged under its `(stream, user, clientMsgId)` triples.
//!
//! The keys go in as JSON arrays too (`json_each`), so the statement text is the same whatever
//! the batch holds: prepared once per connection and then reused, and never near SQLite's limit on
//! bound variables. Read inside `BEGIN IMMEDIATE`, the snapshot cannot go stale before the
//! batch's writes: nobody else, not even another process on the same file, can write meanwhile.

use super::SqliteError;
use super::rows::{EventRow, uint};
use crate::domain::{EventBody, Expect};
use serde::de::DeserializeOwned;
use sqlx::{Row, SqliteConnection};
use std::collections::{HashMap, HashSet};

/// `(stream key, user, clientMsgId)`: what makes a send idempotent.
pub(super) type MsgKey = (String, String, String);

/// Opens the write transaction and reads the snapshot. `?1`: stream keys; `?2`: `[room, user]`
/// pairs; `?3`: capped joiners; `?4`: `[stream, user, clientMsgId]` triples.
///
/// Per stream, `MAX(seq)` is one seek into the primary key `(stream, seq)`; `MAX(pos)` one into
/// the position index; each pair one seek into `members`' primary key; each joiner a count over
/// `members_rooms_of`; each triple a seek into the partial unique index on `clientMsgId`
/// (`client_msg_id IS NOT NULL` lets the planner use it).
const OPEN: &str = "\
    BEGIN IMMEDIATE;
    SELECT
        (SELECT COALESCE(MAX(pos), 0) FROM events),
        (SELECT json_group_array(json_array(s.value,
                (SELECT COALESCE(MAX(seq), 0) FROM events WHERE stream = s.value)))
            FROM json_each(?1) AS s),
        (SELECT json_group_array(json_array(room, user_id)) FROM members
            WHERE active = 1
              AND (room, user_id) IN (SELECT value ->> 0, value ->> 1 FROM json_each(?2))),
        (SELECT json_group_array(json_array(user_id, rooms)) FROM
            (SELECT user_id, COUNT(*) AS rooms FROM members
                WHERE active = 1 AND user_id IN (SELECT value FROM json_each(?3))
                GROUP BY user_id)),
        (SELECT json_group_array(json_array(user_id, client_msg_id,
                stream, seq, pos, id, at, body)) FROM events
            WHERE client_msg_id IS NOT NULL
              AND (stream, user_id, client_msg_id) IN
                  (SELECT value ->> 0, value ->> 1, value ->> 2 FROM json_each(?4)))";

/// The state a batch is decided against.
pub(super) struct Snapshot {
    /// The log's last position (0 if empty).
    pub last: u64,
    /// The head (last seq, 0 if none) of every stream the batch appends to.
    pub heads: HashMap<String, u64>,
    /// The batch's `(room, user)` pairs that are active members.
    pub active: HashSet<(String, String)>,
    /// How many rooms each capped joiner is a member of (absent: none).
    pub rooms: HashMap<String, usize>,
    /// The events already in the log for the batch's `clientMsgId`s.
    pub logged: HashMap<MsgKey, EventRow>,
}

impl Snapshot {
    /// Begins the batch's transaction on `conn` and reads its snapshot: one round trip.
    /// `streams` are the jobs' stream keys, in job order.
    pub async fn open(
        conn: &mut SqliteConnection,
        requests: &[(EventBody, Expect)],
        streams: &[String],
    ) -> Result<Snapshot, SqliteError> {
        let keys = Keys::of(requests, streams)?;
        let row = sqlx::query(OPEN)
            .bind(keys.streams)
            .bind(keys.pairs)
            .bind(keys.joiners)
            .bind(keys.triples)
            .fetch_one(&mut *conn)
            .await?;
        Snapshot::decode(&row)
    }

    fn decode(row: &sqlx::sqlite::SqliteRow) -> Result<Snapshot, SqliteError> {
        let last = uint(row.try_get(0)?, "position")?;
        let heads: Vec<(String, i64)> = json(row, 1)?;
        let active: Vec<(String, String)> = json(row, 2)?;
        let rooms: Vec<(String, i64)> = json(row, 3)?;
        type Found = (String, String, String, i64, i64, String, i64, String);
        let logged: Vec<Found> = json(row, 4)?;
        Ok(Snapshot {
            last,
            heads: heads
                .into_iter()
                .map(|(stream, head)| Ok((stream, uint(head, "seq")?)))
                .collect::<Result<_, SqliteError>>()?,
            active: active.into_iter().collect(),
            rooms: rooms
                .into_iter()
                .map(|(user, n)| Ok((user, uint(n, "room count")? as usize)))
                .collect::<Result<_, SqliteError>>()?,
            logged: logged
                .into_iter()
                .map(|(user, id, stream, seq, pos, event_id, at, body)| {
                    let key = (stream.clone(), user, id);
                    (key, (stream, seq, pos, event_id, at, body))
                })
                .collect(),
        })
    }
}

/// Column `i` of the snapshot row: a JSON array of `T`.
fn json<T: DeserializeOwned>(row: &sqlx::sqlite::SqliteRow, i: usize) -> Result<T, SqliteError> {
    let text: String = row.try_get(i)?;
    serde_json::from_str(&text)
        .map_err(|e| SqliteError::Corrupt(format!("snapshot column {i}: {e}")))
}

/// The batch's keys, each set as one JSON array.
struct Keys {
    streams: String,
    pairs: String,
    joiners: String,
    triples: String,
}

impl Keys {
    fn of(requests: &[(EventBody, Expect)], streams: &[String]) -> Result<Keys, SqliteError> {
        let unique: HashSet<&str> = streams.iter().map(String::as_str).collect();
        let mut pairs: HashSet<(&str, &str)> = HashSet::new();
        let mut joiners: HashSet<&str> = HashSet::new();
        let mut triples: HashSet<(&str, &str, &str)> = HashSet::new();
        for ((body, expect), stream) in requests.iter().zip(streams) {
            if let Some((room, user, _)) = body.membership_needed()
                && expect.checks_membership()
            {
                pairs.insert((room.as_str(), user.as_str()));
                if expect.max_rooms().is_some() {
                    joiners.insert(user.as_str());
                }
            }
            if let Some(id) = body.client_msg_id() {
                triples.insert((stream.as_str(), body.user().as_str(), id));
            }
        }
        let encode = |value: Result<String, serde_json::Error>| value.map_err(SqliteError::Encode);
        Ok(Keys {
            streams: encode(serde_json::to_string(&unique))?,
            pairs: encode(serde_json::to_string(&pairs))?,
            joiners: encode(serde_json::to_string(&joiners))?,
            triples: encode(serde_json::to_string(&triples))?,
        })
    }
}
