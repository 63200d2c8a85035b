//! [`EventLog`] on the events table: conditional puts at head + 1, consistent queries.

use super::error::DynamoError;
use super::items::{dedupe_key, event_item, event_of, n, number, s};
use super::listeners::{Cancelled, Plan, Scope};
use super::writes::{put_new, writes};
use super::{CONDITION_FAILED, DynamoStore, TRANSACTION_CONFLICT, condition_failed};
use crate::domain::event::now;
use crate::domain::projection::changes;
use crate::domain::{Appended, Event, EventBody, Expect, Refusal, Stream};
use crate::ports::{Directory, EventLog, StoreError, StoreResult};
use async_trait::async_trait;
use aws_sdk_dynamodb::types::TransactWriteItem;
use backon::BackoffBuilder;
use std::time::Duration;

/// Why one attempt at an append did not land.
enum Missed {
    /// Another writer took this seq.
    SeqTaken,
    /// The user already sent this `clientMsgId` to this room.
    DuplicateMessage,
    /// Another change of the same user (or another transaction on the same items) committed
    /// between the read and the write: read again and retry.
    Raced,
    Failed(DynamoError),
}

impl DynamoStore {
    /// The `seq` of the stream's last event (0 if none), by a consistent read.
    pub(super) async fn read_head(&self, stream: &Stream) -> Result<u64, DynamoError> {
        let out = self
            .client
            .query()
            .table_name(&self.tables.events)
            .key_condition_expression("#s = :s")
            .expression_attribute_names("#s", "stream")
            .expression_attribute_values(":s", s(stream.key()))
            .scan_index_forward(false)
            .limit(1)
            .consistent_read(true)
            .projection_expression("#q")
            .expression_attribute_names("#q", "seq")
            .send()
            .await
            .map_err(DynamoError::sdk)?;
        match out.items().first() {
            Some(item) => number(item, "seq"),
            None => Ok(0),
        }
    }

    async fn read_at(&self, stream: &Stream, seq: u64) -> Result<Event, DynamoError> {
        let out = self
            .client
            .get_item()
            .table_name(&self.tables.events)
            .key("stream", s(stream.key()))
            .key("seq", n(seq))
            .consistent_read(true)
            .send()
            .await
            .map_err(DynamoError::sdk)?;
        let item = out
            .item()
            .ok_or_else(|| DynamoError::Corrupt(format!("{stream}/{seq} is missing")))?;
        event_of(item)
    }

    /// The first message this user sent to this room with this `clientMsgId`, if any.
    async fn sent_before(&self, body: &EventBody) -> Result<Option<Event>, DynamoError> {
        let Some(client_msg_id) = body.client_msg_id() else {
            return Ok(None);
        };
        let stream = body.stream();
        let out = self
            .client
            .get_item()
            .table_name(&self.tables.state)
            .set_key(Some(dedupe_key(&stream, body.user(), client_msg_id)))
            .consistent_read(true)
            .send()
            .await
            .map_err(DynamoError::sdk)?;
        match out.item() {
            Some(item) => Ok(Some(self.read_at(&stream, number(item, "seq")?).await?)),
            None => Ok(None),
        }
    }

    /// Writes `event`: a single conditional put, or a transaction with its idempotency key or
    /// projection changes. A membership or connection event reads its user's rooms and
    /// connections first, and its transaction carries the user's version guard and the room
    /// listener rows it moves (those that do not fit are written after it: see [`listeners`]).
    ///
    /// [`listeners`]: super::listeners
    async fn write(&self, event: &Event) -> Result<(), Missed> {
        let table = &self.tables.state;
        let item = event_item(event, self.connection_retention).map_err(Missed::Failed)?;
        let mut extra: Vec<TransactWriteItem> = Vec::new();
        if let Some(client_msg_id) = event.body.client_msg_id() {
            let mut key = dedupe_key(&event.stream, event.body.user(), client_msg_id);
            key.insert("seq".to_owned(), n(event.seq));
            extra.push(put_new(table, key, "pk").map_err(Missed::Failed)?);
        }
        let changes = if matches!(event.body, EventBody::MessagePosted { .. }) {
            Vec::new()
        } else {
            changes(event)
        };
        for change in &changes {
            extra.extend(writes(table, change, self.connection_retention).map_err(Missed::Failed)?);
        }
        let mut plan = None;
        if let Some((scope, change)) = changes
            .iter()
            .find_map(|change| Scope::of(change).map(|scope| (scope, change)))
        {
            let state = self.user_state(scope).await.map_err(Missed::Failed)?;
            let core = 1 + extra.len();
            let planned = Plan::new(table, scope, change, state, core).map_err(Missed::Failed)?;
            plan = Some((scope, planned));
        }
        if extra.is_empty() {
            return match self
                .client
                .put_item()
                .table_name(&self.tables.events)
                .set_item(Some(item))
                .condition_expression("attribute_not_exists(#q)")
                .expression_attribute_names("#q", "seq")
                .send()
                .await
            {
                Ok(_) => Ok(()),
                Err(e) if condition_failed(&e) => Err(Missed::SeqTaken),
                Err(e) => Err(Missed::Failed(DynamoError::sdk(e))),
            };
        }
        let mut items = vec![put_new(&self.tables.events, item, "seq").map_err(Missed::Failed)?];
        // The version guard is item 1 (such events have no idempotency key).
        if let Some((_, plan)) = &mut plan {
            items.push(plan.guard.clone());
        }
        items.extend(extra);
        if let Some((_, plan)) = &mut plan {
            items.append(&mut plan.inside);
        }
        let has_dedupe = event.body.client_msg_id().is_some();
        let reasons = match self.transact(items).await.map_err(Missed::Failed)? {
            Ok(()) => {
                if let Some((scope, plan)) = plan
                    && !plan.after.is_empty()
                    && let Err(error) = self
                        .finish_listeners(scope, Some(plan.version), plan.after)
                        .await
                {
                    // The event is in the log: the append succeeded. What is missing is some of
                    // the rows of a user in very many rooms (or with very many connections);
                    // applying the event again writes them.
                    tracing::error!(
                        stream = %event.stream,
                        seq = event.seq,
                        %error,
                        "appended, but not all room listener rows could be written"
                    );
                }
                return Ok(());
            }
            Err(reasons) => reasons,
        };
        let failed = |item: usize| reasons.get(item).is_some_and(|r| r == CONDITION_FAILED);
        if failed(0) {
            Err(Missed::SeqTaken)
        } else if has_dedupe && failed(1) {
            Err(Missed::DuplicateMessage)
        } else if plan.is_some() {
            match Cancelled::of(&reasons, 1) {
                Cancelled::Raced => Err(Missed::Raced),
                Cancelled::Stale | Cancelled::Failed(_) => {
                    Err(Missed::Failed(DynamoError::Cancelled(reasons.join(", "))))
                }
            }
        } else if reasons.iter().any(|r| r == TRANSACTION_CONFLICT) {
            Err(Missed::Raced)
        } else {
            Err(Missed::Failed(DynamoError::Cancelled(reasons.join(", "))))
        }
    }
}

/// How long an append waits after losing its `races`th race: at least the policy's `pause`, and
/// otherwise a random point of a window of `write` — the lost attempt's own round trip —
/// doubled per race up to 8 round trips ("full jitter"). Writers racing for one room (senders on
/// many Lambda environments) then spread over as many round trips as there are of them instead
/// of all trying the next seq together again, which, when the table is slow, makes every
/// round's losers more numerous than the last's.
fn contended_pause(pause: Duration, write: Duration, races: u32) -> Duration {
    let window = write.saturating_mul(1 << races.saturating_sub(1).min(3));
    pause.max(window.mul_f64(rand::random::<f64>()))
}

#[async_trait]
impl EventLog for DynamoStore {
    async fn append(&self, body: EventBody, expect: Expect) -> StoreResult<Appended> {
        let stream = body.stream();
        let key = stream.key();
        let lock = self.stream_lock(&key);
        let mut known_head = lock.lock().await;
        if let Some(first) = self.sent_before(&body).await? {
            return Ok(Appended {
                event: first,
                duplicate: true,
            });
        }
        // Membership is read (consistently) before the write rather than checked inside it: a
        // condition on the member row would turn every message's single PutItem into a
        // transaction, doubling its cost. The window it leaves is a leave (or join) by another
        // connection of the same user landing between this read and the write.
        if expect.checks_membership()
            && let Some((room, user, _)) = body.membership_needed()
        {
            body.check_membership(Directory::is_member(self, room, user).await?)?;
            // Approximate in the same way: two joins at once may both take the last place.
            if let Some(max_rooms) = expect.max_rooms() {
                let rooms = Directory::rooms_of(self, user).await?.len();
                if rooms >= max_rooms {
                    let user = user.clone();
                    return Err(Refusal::TooManyRooms { user, rooms }.into());
                }
            }
        }
        // How long to wait after losing a race, and when to stop trying.
        let mut pauses = crate::retry::CONTENDED_APPEND.build();
        // Whether `known_head` was learnt in this append (read, or a seq just found taken)
        // rather than remembered from an earlier one, which another process may have passed
        // long since.
        let mut fresh = false;
        let mut races = 0u32;
        loop {
            let head = match *known_head {
                Some(head) => head,
                None => {
                    fresh = true;
                    self.read_head(&stream).await?
                }
            };
            if let Expect::Seq(expected) = expect
                && expected != head + 1
            {
                if known_head.is_some() {
                    // The remembered head may be stale: ask the table before refusing.
                    *known_head = None;
                    continue;
                }
                return Err(StoreError::Conflict {
                    stream: key,
                    expected,
                    next: head + 1,
                });
            }
            let event = Event::record(body.clone(), head + 1, now());
            let writing = std::time::Instant::now();
            match self.write(&event).await {
                Ok(()) => {
                    *known_head = Some(event.seq);
                    metrics::counter!(crate::metrics::APPENDS).increment(1);
                    return Ok(Appended {
                        event,
                        duplicate: false,
                    });
                }
                Err(Missed::SeqTaken) => {
                    metrics::counter!(crate::metrics::APPEND_RACES).increment(1);
                    races += 1;
                    if races == 1 && fresh {
                        // Lost a race at a head read just now: the winner holds this seq, and
                        // the next is most likely free. Trying it at once costs one write where
                        // reading the head again costs a read and a write.
                        *known_head = Some(event.seq);
                        continue;
                    }
                    // Lost again, or at a remembered head that may be far behind: after the
                    // pause the room has moved on, so read where it is rather than step
                    // after it one seq per round trip.
                    *known_head = None;
                    let Some(pause) = pauses.next() else { break };
                    tokio::time::sleep(contended_pause(pause, writing.elapsed(), races)).await;
                }
                Err(Missed::Raced) => {
                    metrics::counter!(crate::metrics::APPEND_RACES).increment(1);
                    let Some(pause) = pauses.next() else { break };
                    races += 1;
                    tokio::time::sleep(contended_pause(pause, writing.elapsed(), races)).await;
                }
                Err(Missed::DuplicateMessage) => {
                    let first = self.sent_before(&body).await?.ok_or_else(|| {
                        DynamoError::Corrupt(format!("{key}: idempotency key without its message"))
                    })?;
                    return Ok(Appended {
                        event: first,
                        duplicate: true,
                    });
                }
                Err(Missed::Failed(error)) => {
                    *known_head = None;
                    return Err(error.into());
                }
            }
        }
        Err(DynamoError::Contended(key).into())
    }

    async fn read(&self, stream: &Stream, after: u64, limit: usize) -> StoreResult<Vec<Event>> {
        let mut events = Vec::new();
        let page = i32::try_from(limit).unwrap_or(i32::MAX);
        // A page ends at 1 MB or at `limit`: the paginator follows the key, or events would be
        // dropped; it asks for no page past the `limit`th event.
        let mut items = self
            .client
            .query()
            .table_name(&self.tables.events)
            .key_condition_expression("#s = :s AND #q > :after")
            .expression_attribute_names("#s", "stream")
            .expression_attribute_names("#q", "seq")
            .expression_attribute_values(":s", s(stream.key()))
            .expression_attribute_values(":after", n(after))
            .consistent_read(true)
            .limit(page)
            .into_paginator()
            .items()
            .send();
        while events.len() < limit {
            match items.try_next().await.map_err(DynamoError::sdk)? {
                Some(item) => events.push(event_of(&item)?),
                None => break,
            }
        }
        events.truncate(limit);
        Ok(events)
    }

    async fn head(&self, stream: &Stream) -> StoreResult<u64> {
        Ok(self.read_head(stream).await?)
    }
}

#[cfg(test)]
mod tests {
    use super::contended_pause;
    use std::time::Duration;

    #[test]
    fn losers_of_a_race_spread_over_more_round_trips_the_more_they_lose() {
        let (pause, write) = (Duration::from_millis(1), Duration::from_millis(25));
        for races in 1..=6u32 {
            let window = write * (1 << (races - 1).min(3));
            let pauses: Vec<Duration> = (0..200)
                .map(|_| contended_pause(pause, write, races))
                .collect();
            assert!(
                pauses.iter().all(|p| *p >= pause && *p <= window),
                "{races}"
            );
            let mean = pauses.iter().sum::<Duration>() / 200;
            assert!(
                mean > window / 4 && mean < window * 3 / 4,
                "{races}: {mean:?}"
            );
        }
        // A fast table: the policy's own pause is the floor.
        assert!(contended_pause(pause, Duration::ZERO, 1) == pause);
    }
}
