//! Deciding a whole batch in memory, against one [`Snapshot`].
//!
//! Asking the database about each append one at a time (was this `clientMsgId` used? where is
//! this stream's head?) would cost a round trip to sqlx's worker thread per question.
//! [`Plan::decide`] instead walks the jobs in order against the snapshot the transaction opened
//! with (the heads of every stream the batch touches, which of its `clientMsgId`s are logged,
//! which of its senders and joiners are members, how many rooms its joiners are in) plus what
//! the earlier jobs of the same batch did: seqs follow on from heads this batch already moved, a
//! `clientMsgId` repeated within the batch answers with the first one's event, and an
//! `Expect::Seq` that an earlier job made stale fails like any other mismatch. It reads and
//! writes nothing itself.

use super::SqliteError;
use super::rows::{self, int};
use super::snapshot::{MsgKey, Snapshot};
use crate::domain::event::now;
use crate::domain::{Appended, Event, EventBody, Expect, Refusal};
use std::collections::{HashMap, HashSet};

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

impl NewEvent {
    /// The event's global position (`pos`, which was made from this `u64`).
    pub fn position(&self) -> u64 {
        self.pos.unsigned_abs()
    }
}

impl Plan {
    /// Decides every job, in order, against `snapshot`. `streams` are the jobs' stream keys.
    pub fn decide(
        snapshot: Snapshot,
        requests: Vec<(EventBody, Expect)>,
        streams: Vec<String>,
    ) -> Plan {
        let Snapshot {
            last,
            mut heads,
            active,
            rooms,
            logged,
        } = snapshot;
        let mut next_pos = last + 1;
        let mut members = Members { active, rooms };

        // One clock reading for the batch: its events are one commit, and with equal times the
        // batch's aggregated projection (`project::Projection::of`) is exactly what applying each
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
        Plan { outcomes, last }
    }

    /// The events to append, in log (and position) order.
    pub fn events(&self) -> impl Iterator<Item = &NewEvent> + Clone {
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

/// Membership as the batch goes: which of its `(room, user)` pairs are active members, and how
/// many rooms each of its capped joiners ([`Expect::Join`]) is a member of.
struct Members {
    active: HashSet<(String, String)>,
    rooms: HashMap<String, usize>,
}

impl Members {
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
