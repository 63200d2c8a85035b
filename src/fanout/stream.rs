//! The fan-out woken by a change stream (DynamoDB Streams, on AWS and in `palaver serve
//! --store dynamodb://…`).
//!
//! A change stream is only a wake-up. Its records arrive at least once, a failed batch comes
//! back whole, and order holds per item only. So the table stays the source of truth: for each
//! log stream a batch mentions, the fan-out reads the log from its checkpoint with a consistent
//! read, delivers every event in seq order — which backfills any gap in what the change stream
//! showed — and moves the checkpoint. A record at or below the checkpoint is a repeat and sends
//! nothing. A record that cannot be read, or a log stream whose delivery fails, is reported back
//! so the caller can return it in `batchItemFailures`; the rest of the batch goes on. An event in
//! the log that cannot be decoded is passed over with an error in the log rather than retried
//! forever: it would otherwise stop its room's fan-out for good.

use super::{Delivery, FanOut, Listeners, Outgoing};
use crate::domain::{ConnectionId, Event, EventBody, Stream};
use crate::ports::{Checkpoints, Directory, EventLog, RelayLease, Store, StoreError};
use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

/// How many events one catch-up read takes.
const PAGE: usize = 500;

/// How long a room's frames keep going to the delivery queue after the last one that did, in
/// any batch, whatever the size of their audience. Frames queued for delivery workers may wait
/// there; one posted directly meanwhile — the room shrank below the threshold, or a presence
/// frame left its subject out — would reach someone before them. So a room goes back to direct
/// posts only once it has sent nothing through the queue for this long, far longer than the
/// queue takes to drain in any state but a failure (which the queue's dead-letter queue shows).
/// The lease is kept on the room's checkpoint, which every batch reads and writes anyway.
pub const RELAY_LEASE: std::time::Duration = std::time::Duration::from_secs(300);

/// One change-stream record, reduced to what the fan-out needs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Wake {
    /// The record's id in its change stream (DynamoDB: its sequence number), reported back when
    /// the record fails.
    pub record: String,
    /// The log stream and seq the record announces, or why the record could not be read.
    pub target: Result<(Stream, u64), String>,
}

/// What handling a batch did.
#[derive(Debug, Default)]
pub struct BatchReport {
    /// Records to report as `batchItemFailures`, in batch order.
    pub failed: Vec<String>,
    /// Events delivered (repeats not counted).
    pub events: usize,
    /// Events in the log that could not be decoded, and were passed over.
    pub skipped: Vec<(Stream, u64)>,
    pub delivery: Delivery,
}

/// Delivers what a batch of change-stream records announces, once.
#[derive(Clone)]
pub struct StreamFanOut {
    fanout: FanOut,
    log: Arc<dyn EventLog>,
    directory: Arc<dyn Directory>,
    checkpoints: Arc<dyn Checkpoints>,
    /// A stream without a checkpoint starts just before its first record in the batch, not
    /// at its beginning (a node's own positions: [`StreamFanOut::following_from_now`]).
    from_first_record: bool,
}

/// A log stream's share of a batch.
struct Mention {
    stream: Stream,
    /// Its first record in the batch: where a retry must start from.
    first_record: String,
    /// The lowest seq its records announce.
    first_seq: u64,
    upto: u64,
}

impl StreamFanOut {
    /// `None` for a store without checkpoints (memory and SQLite are tailed in commit order).
    pub fn new(store: &Store, fanout: FanOut) -> Option<Self> {
        Some(StreamFanOut {
            fanout,
            log: store.log.clone(),
            directory: store.directory.clone(),
            checkpoints: store.checkpoints.clone()?,
            from_first_record: false,
        })
    }

    /// For a `palaver serve` node on a store other nodes share: it follows the stream with
    /// positions of its own, kept in memory for this run ([`RunPositions`]), so that no node
    /// takes events from another; a stream it has not delivered yet starts at the first record
    /// of it this run sees. Combine with a fan-out that delivers to the node's own connections
    /// only ([`FanOut::with_holder`]).
    ///
    /// [`RunPositions`]: super::positions::RunPositions
    pub fn following_from_now(store: &Store, fanout: FanOut) -> Self {
        StreamFanOut {
            fanout,
            log: store.log.clone(),
            directory: store.directory.clone(),
            checkpoints: Arc::new(super::positions::RunPositions::default()),
            from_first_record: true,
        }
    }

    /// Waits until `by` for the posts the batch let go ([`FanOut::settle`]).
    pub async fn settle(&self, by: tokio::time::Instant) -> usize {
        self.fanout.settle(by).await
    }

    /// Handles one batch. Never fails as a whole: what could not be done is in
    /// [`BatchReport::failed`].
    ///
    /// Each log stream the batch mentions is read once, from its checkpoint up to its highest
    /// record; then events go out in the batch's record order — what a record announces (and
    /// any gap before it) when that record comes up — so that events of different log streams
    /// keep the order the change stream showed them in: a presence change between two messages
    /// reaches the room between them.
    pub async fn handle(&self, wakes: Vec<Wake>) -> BatchReport {
        let mut report = BatchReport::default();
        let mut mentions: Vec<Mention> = Vec::new();
        // (mention, seq) of each readable record, in batch order.
        let mut order: Vec<(usize, u64)> = Vec::new();
        for wake in wakes {
            match wake.target {
                Err(why) => {
                    tracing::error!(record = %wake.record, %why, "unreadable change record");
                    report.failed.push(wake.record);
                }
                Ok((stream, seq)) => {
                    let index = match mentions.iter().position(|m| m.stream == stream) {
                        Some(index) => {
                            mentions[index].upto = mentions[index].upto.max(seq);
                            mentions[index].first_seq = mentions[index].first_seq.min(seq);
                            index
                        }
                        None => {
                            mentions.push(Mention {
                                stream,
                                first_record: wake.record,
                                first_seq: seq,
                                upto: seq,
                            });
                            mentions.len() - 1
                        }
                    };
                    order.push((index, seq));
                }
            }
        }

        // The streams are read at once (their checkpoints and logs are independent); a batch of
        // a reconnect storm mentions a hundred connection streams.
        use futures_util::StreamExt;
        // (The futures are made first: a closure over borrowed items inside the stream would not
        // be general enough for the spawned tail's future.)
        let reads: Vec<_> = mentions.iter().map(|mention| self.read(mention)).collect();
        let mut pending: Vec<Pending> = futures_util::stream::iter(reads)
            .buffered(STREAMS_AT_ONCE)
            .collect()
            .await;
        for stream in &mut pending {
            report.skipped.append(&mut stream.skipped);
        }

        let mut listeners = self.fanout.listeners();
        // A room whose frames went to the queue in an earlier batch, not long ago: this batch's
        // follow them there.
        for (mention, stream) in mentions.iter().zip(&pending) {
            if let (Some(lanes), Stream::Room(room)) = (stream.relaying, &mention.stream) {
                listeners.relay(room, lanes);
            }
        }
        let mut activity: HashMap<ConnectionId, Event> = HashMap::new();
        // First every event is planned, in the batch's order (reads, cached for the batch);
        // then each room's frames are sent, rooms at once and each room's in order.
        let mut planned: Vec<Planned> = Vec::new();
        // Every record in order, then each stream to its end (events read past its last record).
        let everything = (0..mentions.len()).map(|index| (index, u64::MAX));
        for (index, upto) in order.into_iter().chain(everything) {
            let stream = &mut pending[index];
            if stream.failed.is_some() {
                continue;
            }
            while stream.items.front().is_some_and(|item| item.seq() <= upto) {
                let Some(item) = stream.items.pop_front() else {
                    break;
                };
                let event = match item {
                    Item::Skipped(seq) => {
                        stream.passed.push(seq);
                        continue;
                    }
                    Item::Event(event) => event,
                };
                match self.fanout.plan_in(&event, &mut listeners).await {
                    Ok(outgoing) => {
                        stream.passed.push(event.seq);
                        // A message's sender is in its room's audience: where several
                        // deliverers share the store, only the one holding the sender's
                        // connection hears it there, and only that one records its activity.
                        // (Looked up only then: it is a pass over the room's recipients.)
                        let sender_held = match &event.body {
                            EventBody::MessagePosted {
                                connection: Some(connection),
                                ..
                            } => {
                                self.fanout.holder.is_none()
                                    || outgoing.iter().any(|o| o.recipients.contains(connection))
                            }
                            _ => false,
                        };
                        planned.extend(outgoing.into_iter().map(|outgoing| Planned {
                            mention: index,
                            seq: event.seq,
                            outgoing,
                        }));
                        if let EventBody::MessagePosted {
                            connection: Some(connection),
                            ..
                        } = &event.body
                            && sender_held
                            && activity
                                .get(connection)
                                .is_none_or(|seen| seen.at < event.at)
                        {
                            activity.insert(connection.clone(), event);
                        }
                    }
                    Err(error) => {
                        stream.failed = Some(error);
                        break;
                    }
                }
            }
        }
        for sent in self.send_by_room(planned).await {
            report.delivery.add(sent.delivery);
            for (mention, seq, error) in sent.failed {
                let stream = &mut pending[mention];
                if stream.failed_at.is_none_or(|at| seq < at) {
                    stream.failed_at = Some(seq);
                    stream.failed = Some(error);
                }
            }
        }
        for stream in &mut pending {
            // Delivered up to the event before the first whose frames did not all go out.
            let done: Vec<u64> = stream
                .passed
                .iter()
                .copied()
                .filter(|seq| stream.failed_at.is_none_or(|at| *seq < at))
                .collect();
            report.events += done.len();
            stream.done = done
                .last()
                .copied()
                .unwrap_or(stream.start)
                .max(stream.start);
        }

        // Each stream's checkpoint moves on its own item: written at once.
        let listeners = &listeners;
        let advances: Vec<_> = mentions
            .iter()
            .zip(pending)
            .map(|(mention, stream)| async move {
                let mut failed = stream.failed.or(stream.unavailable);
                let relay = match &mention.stream {
                    Stream::Room(room) => listeners.relay_lanes(room).map(|lanes| RelayLease {
                        until: chrono::Utc::now() + RELAY_LEASE,
                        lanes,
                    }),
                    _ => None,
                };
                if stream.done > stream.start
                    && let Err(error) = self
                        .checkpoints
                        .advance(&mention.stream, stream.done, relay)
                        .await
                {
                    failed.get_or_insert(error);
                }
                failed.map(|error| {
                    tracing::error!(stream = %mention.stream, %error, "fan-out failed; will retry");
                    mention.first_record.clone()
                })
            })
            .collect();
        let failures: Vec<Option<String>> = futures_util::stream::iter(advances)
            .buffered(STREAMS_AT_ONCE)
            .collect()
            .await;
        report.failed.extend(failures.into_iter().flatten());
        // "Last active" is kept per connection, not per message: one write per connection per
        // batch, with its latest message.
        let directory = &self.directory;
        let writes: Vec<_> = activity
            .values()
            .map(|event| async move {
                if let Err(error) = directory.apply(event).await {
                    tracing::warn!(%error, "could not record connection activity");
                }
            })
            .collect();
        futures_util::stream::iter(writes)
            .buffer_unordered(STREAMS_AT_ONCE)
            .collect::<Vec<()>>()
            .await;
        report
    }

    /// Sends the planned frames: rooms at once (at most [`ROOMS_AT_ONCE`]), each room's in the
    /// order planned. A room whose send fails stops there; what it had not sent is reported
    /// with the first event it belongs to, so that event's stream is not checkpointed past it.
    async fn send_by_room(&self, planned: Vec<Planned>) -> Vec<Sent> {
        use futures_util::StreamExt;
        let mut rooms: Vec<Vec<Planned>> = Vec::new();
        let mut index: HashMap<crate::domain::RoomName, usize> = HashMap::new();
        for plan in planned {
            let at = *index.entry(plan.outgoing.room.clone()).or_insert_with(|| {
                rooms.push(Vec::new());
                rooms.len() - 1
            });
            rooms[at].push(plan);
        }
        futures_util::stream::iter(rooms)
            .map(|plans| async move {
                let mut sent = Sent::default();
                let mut plans = plans.into_iter().peekable();
                while let Some(first) = plans.next() {
                    // A run of relayed frames goes out together: merged per lane.
                    let mut run = vec![first];
                    if run[0].outgoing.relayed() {
                        while let Some(next) = plans.next_if(|p| p.outgoing.relayed()) {
                            run.push(next);
                        }
                    }
                    let sources: Vec<(usize, u64)> =
                        run.iter().map(|p| (p.mention, p.seq)).collect();
                    let outgoing: Vec<Outgoing> = run.into_iter().map(|p| p.outgoing).collect();
                    let room = outgoing[0].room.clone();
                    let result = self.fanout.send_run(outgoing).await;
                    match result {
                        Ok(delivery) => sent.delivery.add(delivery),
                        Err(error) => {
                            let why = error.to_string();
                            let (mention, seq) = sources[0];
                            sent.failed.push((mention, seq, error));
                            // What the room had still to send stays unsent: each stream it
                            // came from must not be checkpointed past it either.
                            let rest = sources[1..]
                                .iter()
                                .copied()
                                .chain(plans.map(|p| (p.mention, p.seq)));
                            for (mention, seq) in rest {
                                if sent.failed.iter().all(|(m, _, _)| *m != mention) {
                                    let error =
                                        StoreError::backend(std::io::Error::other(format!(
                                            "not sent: an earlier frame of {room} failed ({why})"
                                        )));
                                    sent.failed.push((mention, seq, error));
                                }
                            }
                            break;
                        }
                    }
                }
                sent
            })
            .buffer_unordered(ROOMS_AT_ONCE)
            .collect()
            .await
    }

    /// Reads `mention.stream` from its checkpoint up to at least `mention.upto`.
    async fn read(&self, mention: &Mention) -> Pending {
        let stream = &mention.stream;
        let mut pending = Pending::default();
        let start = match self.checkpoints.checkpoint(stream).await {
            Ok(checkpoint) => {
                pending.relaying = checkpoint
                    .relay
                    .filter(|lease| lease.until > chrono::Utc::now())
                    .map(|lease| lease.lanes);
                if checkpoint.seq == 0 && self.from_first_record {
                    mention.first_seq - 1
                } else {
                    checkpoint.seq
                }
            }
            Err(error) => {
                pending.failed = Some(error);
                return pending;
            }
        };
        (pending.start, pending.done) = (start, start);
        let mut read = start;
        while read < mention.upto {
            let page = match self.log.read(stream, read, PAGE).await {
                Ok(page) => page,
                Err(StoreError::Corrupt(_)) => match self.log.read(stream, read, 1).await {
                    // Somewhere in the page: go one event at a time up to it.
                    Ok(one) => one,
                    Err(StoreError::Corrupt(why)) => {
                        // The next event cannot be decoded, now or on any retry. Holding the
                        // room's fan-out back for it would stop the room for good, and no
                        // client could render it anyway: skip it, loudly.
                        tracing::error!(
                            %stream,
                            seq = read + 1,
                            %why,
                            "skipping an unreadable event: it is not delivered"
                        );
                        pending.skipped.push((stream.clone(), read + 1));
                        read += 1;
                        pending.items.push_back(Item::Skipped(read));
                        continue;
                    }
                    Err(error) => {
                        pending.failed = Some(error);
                        return pending;
                    }
                },
                Err(error) => {
                    pending.failed = Some(error);
                    return pending;
                }
            };
            let Some(last) = page.last() else {
                // Announced but not in the table: deliver what there is, then try again later.
                pending.unavailable = Some(StoreError::Corrupt(format!(
                    "{stream}: seq {} was announced but the log ends at {read}",
                    mention.upto
                )));
                break;
            };
            read = last.seq;
            pending.items.extend(page.into_iter().map(Item::Event));
        }
        pending
    }
}

/// How many rooms of one batch are sent to at once. Each room's frames still go out in order;
/// rooms have nothing to wait for from each other, and a batch of a busy shard mentions many.
const ROOMS_AT_ONCE: usize = 16;

/// Log streams read, or checkpointed, at once in a batch: each is a request or two on its own
/// items, and a reconnect storm's batch mentions a hundred connection streams — one after
/// another at DynamoDB's ~10 ms they alone would take seconds.
const STREAMS_AT_ONCE: usize = 16;

/// A frame planned for one event of a mentioned log stream.
struct Planned {
    mention: usize,
    seq: u64,
    outgoing: Outgoing,
}

/// What sending one room's planned frames did, and where it stopped if it failed.
#[derive(Default)]
struct Sent {
    delivery: Delivery,
    /// For each log stream whose frames the room could not all send: its first such event,
    /// and why.
    failed: Vec<(usize, u64, StoreError)>,
}

/// What one log stream of a batch has to deliver.
#[derive(Default)]
struct Pending {
    /// Its checkpoint when the batch started.
    start: u64,
    /// Its room's frames still had to go through the delivery queue when the batch started,
    /// over this many lanes.
    relaying: Option<u32>,
    /// Delivered (or passed over) up to here.
    done: u64,
    /// The seqs planned (or passed over), in order.
    passed: Vec<u64>,
    /// The first seq whose frames could not all be sent.
    failed_at: Option<u64>,
    items: VecDeque<Item>,
    /// Why the rest of it cannot be delivered in this batch.
    failed: Option<StoreError>,
    /// An announced event is not in the log yet: what is before it goes out, and the stream is
    /// reported failed so that the batch comes back.
    unavailable: Option<StoreError>,
    /// Events that cannot be decoded, passed over (for the batch's report).
    skipped: Vec<(Stream, u64)>,
}

enum Item {
    Event(Event),
    /// An event that cannot be decoded, passed over.
    Skipped(u64),
}

impl Item {
    fn seq(&self) -> u64 {
        match self {
            Item::Event(event) => event.seq,
            Item::Skipped(seq) => *seq,
        }
    }
}

impl Wake {
    /// A wake from a change record's keys as text: the log stream key (`r:ROOM`, `c:ID`) and
    /// the seq. Missing or malformed keys make a record the fan-out reports as failed.
    pub fn from_keys(record: impl Into<String>, stream: Option<&str>, seq: Option<&str>) -> Wake {
        let target = match (stream, seq) {
            (Some(key), Some(seq)) => match (Stream::from_key(key), seq.parse::<u64>()) {
                (Some(stream), Ok(seq)) if seq >= 1 => Ok((stream, seq)),
                _ => Err(format!("not a log key: stream {key:?}, seq {seq:?}")),
            },
            _ => Err("record has no stream/seq keys".to_owned()),
        };
        Wake {
            record: record.into(),
            target,
        }
    }
}
