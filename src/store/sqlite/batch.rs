//! Deciding a whole batch in memory, from a few reads.
//!
//! Every statement is a round trip to sqlx's worker thread, so asking the database about each
//! append one at a time (was this `clientMsgId` used? where is this stream's head?) costs more
//! than writing the batch. [`Plan::decide`] asks once per batch instead: the heads of every
//! stream the batch touches, which of its `(stream, user, clientMsgId)` triples are in the log
//! already, which of its senders and joiners are members of their rooms, and how many rooms its
//! joiners are in. It then walks the jobs in order and settles each one against that snapshot
//! plus what the earlier jobs of the same batch did: seqs follow on from heads this batch already
//! moved, a `clientMsgId` repeated within the batch answers with the first one's event, and an
//! `Expect::Seq` that an earlier job made stale fails like any other mismatch.
//!
//! The snapshot is only safe because it is read inside the `BEGIN IMMEDIATE` transaction the
//! batch is written in: holding the write lock, nobody else (not even another process on the
//! same file) can move a head or use a `clientMsgId` between the reads and the writes.
//!
//! The two reads pass their keys as one JSON array (`json_each`), so each is one statement text
//! whatever the batch holds: prepared once and cached by sqlx, and never near SQLite's limit on
//! bound variables.

use super::SqliteError;
use super::rows::{self, EventRow, event_columns, int, uint};
use crate::domain::event::now;
use crate::domain::{Appended, Event, EventBody, Expect, Refusal};
use sqlx::SqliteConnection;
use std::collections::{HashMap, HashSet};

/// `(stream key, user, clientMsgId)`: what makes a send idempotent.
type MsgKey = (String, String, String);

/// An event this batch appends, with its columns ready to bind.
pub(super) struct NewEvent {
    pub event: Event,
    /// [`Stream::key`](crate::domain::Stream::key) of the event's stream.
    pub stream: String,
    pub seq: i64,
    pub pos: i64,
    /// The body as stored: serde_json of [`EventBody`].
    pub json: String,
}

/// What one job of the batch comes to, decided before anything is written.
enum Outcome {
    /// Appends this event.
    New(NewEvent),
    /// Repeats a `clientMsgId` already in the log, or appended by an earlier job of this batch:
    /// this is that first event.
    Duplicate(Event),
    /// This job alone fails (conflict, bad data); the rest of the batch goes on.
    Failed(SqliteError),
}

/// A decided batch: every job's outcome, in job order, which is also log order.
pub(super) struct Plan {
    outcomes: Vec<Outcome>,
    /// The last position the batch writes, if it writes anything.
    last: Option<u64>,
}

impl Plan {
    /// Reads what the batch depends on and decides every job, in order. Must run inside the
    /// write transaction. Writes nothing; an `Err` means the transaction cannot be trusted.
    pub async fn decide(
        conn: &mut SqliteConnection,
        requests: Vec<(EventBody, Expect)>,
    ) -> Result<Plan, SqliteError> {
        let streams: Vec<String> = requests
            .iter()
            .map(|(body, _)| body.stream().key())
            .collect();
        let (last, mut heads) = heads(conn, &streams).await?;
        let mut next_pos = last + 1;
        let logged = logged(conn, &requests, &streams).await?;
        let mut members = Members::read(conn, &requests).await?;

        // One clock reading for the batch: its events are one commit, and with equal times the
        // batch's aggregated projection (`project::apply_batch`) is exactly what applying each
        // event in turn would give.
        let at = now();
        let mut outcomes = Vec::with_capacity(requests.len());
        let mut last = None;
        // The clientMsgIds this batch appends, to the index of their job in `outcomes`.
        let mut fresh: HashMap<MsgKey, usize> = HashMap::new();
        for ((body, expect), stream) in requests.into_iter().zip(streams) {
            let msg_key = body.client_msg_id().map(|id| {
                (
                    stream.clone(),
                    body.user().as_str().to_owned(),
                    id.to_owned(),
                )
            });
            if let Some(key) = &msg_key {
                if let Some(row) = logged.get(key) {
                    outcomes.push(match rows::event(row.clone()) {
                        Ok((_, event)) => Outcome::Duplicate(event),
                        Err(e) => Outcome::Failed(e),
                    });
                    continue;
                }
                let first = fresh.get(key).and_then(|&i| match outcomes.get(i) {
                    Some(Outcome::New(first)) => Some(first.event.clone()),
                    _ => None,
                });
                if let Some(first) = first {
                    outcomes.push(Outcome::Duplicate(first));
                    continue;
                }
            }

            // Membership as of this point of the batch: the log takes no message or leave from a
            // non-member and no second join.
            let membership = body
                .membership_needed()
                .map(|(room, user, _)| (room.as_str().to_owned(), user.as_str().to_owned()));
            if expect.checks_membership()
                && let Some(key) = &membership
                && let Err(refusal) = members.check(&body, expect, key)
            {
                outcomes.push(Outcome::Failed(SqliteError::Refused(refusal)));
                continue;
            }

            // The query answers every key it is given, so each stream of the batch is in `heads`.
            let head = heads.get(&stream).copied().unwrap_or(0);
            let next = head + 1;
            if let Expect::Seq(expected) = expect
                && expected != next
            {
                outcomes.push(Outcome::Failed(SqliteError::Conflict {
                    stream,
                    expected,
                    next,
                }));
                continue;
            }
            let event = Event::record(body, next, at);
            let columns = int(next).and_then(|seq| Ok((seq, int(next_pos)?)));
            let json = serde_json::to_string(&event.body).map_err(SqliteError::Encode);
            let ((seq, pos), json) = match (columns, json) {
                (Ok(columns), Ok(json)) => (columns, json),
                (Err(e), _) | (_, Err(e)) => {
                    outcomes.push(Outcome::Failed(e));
                    continue;
                }
            };

            if let Some(key) = membership {
                members.record(&event.body, key);
            }
            heads.insert(stream.clone(), next);
            last = Some(next_pos);
            next_pos += 1;
            if let Some(key) = msg_key {
                fresh.insert(key, outcomes.len());
            }
            outcomes.push(Outcome::New(NewEvent {
                event,
                stream,
                seq,
                pos,
                json,
            }));
        }
        Ok(Plan { outcomes, last })
    }

    /// The events to append, in log (and position) order.
    pub fn events(&self) -> impl Iterator<Item = &NewEvent> {
        self.outcomes.iter().filter_map(|outcome| match outcome {
            Outcome::New(new) => Some(new),
            _ => None,
        })
    }

    /// The last position the batch writes, if it writes anything.
    pub fn last(&self) -> Option<u64> {
        self.last
    }

    /// The answers, in job order, once the batch is committed.
    pub fn answers(self) -> Vec<Result<Appended, SqliteError>> {
        self.outcomes
            .into_iter()
            .map(|outcome| match outcome {
                Outcome::New(new) => Ok(Appended {
                    event: new.event,
                    duplicate: false,
                }),
                Outcome::Duplicate(event) => Ok(Appended {
                    event,
                    duplicate: true,
                }),
                Outcome::Failed(e) => Err(e),
            })
            .collect()
    }
}

/// The log's last position (0 if empty), and the head (last seq, 0 if none) of each of
/// `streams`: one statement, so one round trip to the worker thread.
async fn heads(
    conn: &mut SqliteConnection,
    streams: &[String],
) -> Result<(u64, HashMap<String, u64>), SqliteError> {
    let unique: HashSet<&str> = streams.iter().map(String::as_str).collect();
    let keys = serde_json::to_string(&unique).map_err(SqliteError::Encode)?;
    // Per stream, MAX(seq) is one seek into the primary key (stream, seq); MAX(pos) one into
    // the position index. The row without a stream carries the position.
    let rows: Vec<(Option<String>, i64)> = sqlx::query_as(
        "SELECT s.value, (SELECT COALESCE(MAX(seq), 0) FROM events WHERE stream = s.value) \
         FROM json_each(?1) AS s \
         UNION ALL SELECT NULL, COALESCE(MAX(pos), 0) FROM events",
    )
    .bind(keys)
    .fetch_all(&mut *conn)
    .await?;
    let mut last = 0;
    let mut heads = HashMap::with_capacity(rows.len());
    for (stream, value) in rows {
        match stream {
            Some(stream) => {
                heads.insert(stream, uint(value, "seq")?);
            }
            None => last = uint(value, "position")?,
        }
    }
    Ok((last, heads))
}

/// Membership as the batch goes: which of its `(room, user)` pairs are active members, and how
/// many rooms each of its capped joiners ([`Expect::Join`]) is a member of.
struct Members {
    active: HashSet<(String, String)>,
    rooms: HashMap<String, usize>,
}

impl Members {
    /// Reads both in one statement: one seek into the primary key `(room, user_id)` per pair,
    /// one count over `members_rooms_of` per capped joiner.
    async fn read(
        conn: &mut SqliteConnection,
        requests: &[(EventBody, Expect)],
    ) -> Result<Members, SqliteError> {
        let mut pairs: HashSet<(&str, &str)> = HashSet::new();
        let mut joiners: HashSet<&str> = HashSet::new();
        for (body, expect) in requests {
            if let Some((room, user, _)) = body.membership_needed()
                && expect.checks_membership()
            {
                pairs.insert((room.as_str(), user.as_str()));
                if expect.max_rooms().is_some() {
                    joiners.insert(user.as_str());
                }
            }
        }
        let mut members = Members {
            active: HashSet::new(),
            rooms: HashMap::new(),
        };
        if pairs.is_empty() {
            return Ok(members);
        }
        let pairs = serde_json::to_string(&pairs).map_err(SqliteError::Encode)?;
        let joiners = serde_json::to_string(&joiners).map_err(SqliteError::Encode)?;
        let found: Vec<(Option<String>, String, i64)> = sqlx::query_as(
            "SELECT room, user_id, 1 FROM members WHERE active = 1 \
               AND (room, user_id) IN (SELECT value ->> 0, value ->> 1 FROM json_each(?1)) \
             UNION ALL \
             SELECT NULL, user_id, COUNT(*) FROM members WHERE active = 1 \
               AND user_id IN (SELECT value FROM json_each(?2)) GROUP BY user_id",
        )
        .bind(pairs)
        .bind(joiners)
        .fetch_all(&mut *conn)
        .await?;
        for (room, user, count) in found {
            match room {
                Some(room) => {
                    members.active.insert((room, user));
                }
                None => {
                    members
                        .rooms
                        .insert(user, uint(count, "room count")? as usize);
                }
            }
        }
        Ok(members)
    }

    /// Whether the log may take `body` (whose `(room, user)` is `key`) as things stand.
    fn check(
        &self,
        body: &EventBody,
        expect: Expect,
        key: &(String, String),
    ) -> Result<(), Refusal> {
        body.check_membership(self.active.contains(key))?;
        if let (Some(max_rooms), EventBody::Joined { user, .. }) = (expect.max_rooms(), body) {
            let rooms = self.rooms.get(&key.1).copied().unwrap_or(0);
            if rooms >= max_rooms {
                return Err(Refusal::TooManyRooms {
                    user: user.clone(),
                    rooms,
                });
            }
        }
        Ok(())
    }

    /// Follows an event this batch appends.
    fn record(&mut self, body: &EventBody, key: (String, String)) {
        match body {
            EventBody::Joined { .. } => {
                *self.rooms.entry(key.1.clone()).or_default() += 1;
                self.active.insert(key);
            }
            EventBody::Left { .. } => {
                if self.active.remove(&key)
                    && let Some(rooms) = self.rooms.get_mut(&key.1)
                {
                    *rooms = rooms.saturating_sub(1);
                }
            }
            _ => {}
        }
    }
}

/// The events already in the log for the batch's `clientMsgId`s, by [`MsgKey`]; one statement,
/// none at all when no job carries a `clientMsgId`.
async fn logged(
    conn: &mut SqliteConnection,
    requests: &[(EventBody, Expect)],
    streams: &[String],
) -> Result<HashMap<MsgKey, EventRow>, SqliteError> {
    let wanted: HashSet<(&str, &str, &str)> = requests
        .iter()
        .zip(streams)
        .filter_map(|((body, _), stream)| {
            let id = body.client_msg_id()?;
            Some((stream.as_str(), body.user().as_str(), id))
        })
        .collect();
    if wanted.is_empty() {
        return Ok(HashMap::new());
    }
    let keys = serde_json::to_string(&wanted).map_err(SqliteError::Encode)?;
    // `client_msg_id IS NOT NULL` lets the planner use the partial unique index.
    /// A user, a clientMsgId, then the event's row.
    type Found = (String, String, String, i64, i64, String, i64, String);
    let found: Vec<Found> = sqlx::query_as(concat!(
        "SELECT user_id, client_msg_id, ",
        event_columns!(),
        " FROM events WHERE client_msg_id IS NOT NULL \
               AND (stream, user_id, client_msg_id) IN \
                   (SELECT value ->> 0, value ->> 1, value ->> 2 FROM json_each(?1))"
    ))
    .bind(keys)
    .fetch_all(&mut *conn)
    .await?;
    Ok(found
        .into_iter()
        .map(|(user, id, stream, seq, pos, event_id, at, body)| {
            let key = (stream.clone(), user, id);
            (key, (stream, seq, pos, event_id, at, body))
        })
        .collect())
}
