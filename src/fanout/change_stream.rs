//! The events table's change stream, read with aws-sdk-dynamodbstreams: what wakes the fan-out
//! in `palaver serve --store dynamodb://…` (on AWS, Lambda's event source mapping does this).
//!
//! The stream is only a wake-up. Each `INSERT` record names a log stream and a seq; the
//! [`StreamFanOut`] — the same code the Lambda fan-out runs — reads the table from its
//! checkpoint and delivers every event up to that seq, so repeats send nothing and a record the
//! tail never saw is made up for by the next one of the same log stream.
//!
//! How the tail follows the stream, and why:
//!
//! - **Start at the current end.** Shards open when `serve` starts are read from `LATEST`, as the
//!   SQLite tail starts at the position committed at start: connections of an earlier run are
//!   gone, and a client that reconnects replays with `joinRoom{after}`. The iterators are taken
//!   before the gateway accepts a connection, so nothing appended through it can be missed.
//!   The checkpoints live in the table, though: if an earlier run stopped before delivering a log
//!   stream's last events, the first record of that stream in this run delivers them too, to the
//!   connections open now (clients drop the seqs they already have).
//! - **Shards that appear later** (DynamoDB closes a shard every few hours and opens children)
//!   are read from `TRIM_HORIZON`, after their parent is read to its end: everything in them is
//!   new. moto has one shard forever, so there this never happens.
//! - **Poll** with `GetRecords`; when nothing came back, wait [`POLL`]. DynamoDB throttles
//!   readers that poll a shard too often: a `LimitExceededException` pauses that shard for a
//!   second.
//! - **A failed batch** (the fan-out reports the records it could not deliver) is read again
//!   from its first failed record (`AT_SEQUENCE_NUMBER`) after a backoff; what succeeded comes
//!   back too and is dropped by the checkpoints. After [`MAX_RETRIES`] the tail moves on, as the
//!   Lambda mapping does after `MaximumRetryAttempts`: nothing is lost from the log, because the
//!   log stream's checkpoint stayed behind and its next record delivers everything from there.
//!   A record whose keys cannot be read is never retried — reading it again cannot help.
//! - **An expired or trimmed iterator** is taken again after the last record handled
//!   (`AFTER_SEQUENCE_NUMBER`), or from where the shard started if none was (for `LATEST`, a
//!   record written meanwhile only wakes the fan-out late: with the next one of its log stream).
//!   A failed `GetRecords` keeps its iterator for a few tries, then takes a new one.
//! - **A closed shard** answers without a next iterator: the tail drops it and looks for its
//!   children.
//!
//! Errors are logged and retried after a pause of [`retry::FOLLOW`]'s, which the tail schedules
//! per shard rather than sleeps, so that one failing shard holds up no other; the tail itself
//! never stops and never panics.

use super::stream::{StreamFanOut, Wake};
use crate::retry;
use crate::store::dynamodb::Tables;
use aws_sdk_dynamodbstreams::config::http::HttpResponse;
use aws_sdk_dynamodbstreams::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_dynamodbstreams::operation::get_records::GetRecordsError;
use aws_sdk_dynamodbstreams::operation::get_shard_iterator::GetShardIteratorError;
use aws_sdk_dynamodbstreams::types::{OperationType, Record, ShardIteratorType};
use std::cmp::Ordering;
use std::collections::HashSet;
use std::error::Error;
use std::time::Duration;
use tokio::time::Instant;

/// How long the tail waits when no shard had anything new.
pub const POLL: Duration = Duration::from_millis(100);
/// How many times a failed batch is read again before the tail moves past it.
pub const MAX_RETRIES: u32 = 8;
/// How long to wait after DynamoDB says the tail reads too often.
const THROTTLED: Duration = Duration::from_secs(1);
/// After this many failed `GetRecords` in a row, the shard iterator is taken anew.
const KEEP_ITERATOR_FAILURES: u32 = 3;
/// How often the tail looks for new shards while every shard it knows is open.
const DISCOVER_EVERY: Duration = Duration::from_secs(15);
/// Records per `GetRecords` (the API's maximum).
const BATCH: i32 = 1000;

/// Why the tail could not start.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ChangeError(String);

/// Where the changes come from: the events table of a prefix, and the clients to read it.
#[derive(Clone, Debug)]
pub struct ChangeSource {
    dynamodb: aws_sdk_dynamodb::Client,
    streams: aws_sdk_dynamodbstreams::Client,
    table: String,
}

impl ChangeSource {
    pub fn new(
        dynamodb: aws_sdk_dynamodb::Client,
        streams: aws_sdk_dynamodbstreams::Client,
        table: impl Into<String>,
    ) -> ChangeSource {
        ChangeSource {
            dynamodb,
            streams,
            table: table.into(),
        }
    }

    /// The events table of `prefix`, through clients built from the standard AWS configuration
    /// (as [`crate::store::aws_client`] builds the store's; `AWS_ENDPOINT_URL` applies to both).
    pub async fn from_env(prefix: &str) -> ChangeSource {
        let config = crate::store::aws_sdk_config().await;
        ChangeSource::new(
            aws_sdk_dynamodb::Client::new(&config),
            aws_sdk_dynamodbstreams::Client::new(&config),
            Tables::new(prefix).events,
        )
    }

    pub fn table(&self) -> &str {
        &self.table
    }

    /// Finds the table's stream and takes a `LATEST` iterator on every open shard: the tail
    /// follows what is appended from now on. Fails if the table or its stream is missing.
    pub async fn start(self) -> Result<ChangeTail, ChangeError> {
        let table = self.table.clone();
        let arn = stream_arn(&self.dynamodb, &table).await.map_err(|why| {
            ChangeError(format!("cannot follow the change stream of {table}: {why}"))
        })?;
        let mut tail = ChangeTail {
            source: self,
            arn,
            shards: Vec::new(),
            known: HashSet::new(),
            next_discovery: Instant::now() + DISCOVER_EVERY,
        };
        let shards = tail
            .describe()
            .await
            .map_err(|why| ChangeError(format!("cannot describe the stream of {table}: {why}")))?;
        for found in shards {
            tail.known.insert(found.id.clone());
            if found.closed {
                // Read to its end before this run: its records belong to the past.
                continue;
            }
            let mut shard = Shard::new(found.id, found.parent, Position::Latest);
            let iterator = tail
                .iterator(&shard.id, &shard.position)
                .await
                .map_err(|why| ChangeError(format!("cannot read the stream of {table}: {why}")))?;
            shard.iterator = iterator;
            tail.shards.push(shard);
        }
        tracing::info!(%table, shards = tail.shards.len(), "following the table's change stream");
        Ok(tail)
    }
}

/// The table's stream, positioned; [`ChangeTail::run`] follows it.
pub struct ChangeTail {
    source: ChangeSource,
    arn: String,
    /// The shards being read (open, or closed but not yet read to their end).
    shards: Vec<Shard>,
    /// Every shard id seen, read or not: a shard is only ever picked up once.
    known: HashSet<String>,
    next_discovery: Instant,
}

/// Where to (re)take a shard's iterator.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Position {
    Latest,
    TrimHorizon,
    At(String),
    After(String),
}

struct Shard {
    id: String,
    parent: Option<String>,
    /// Where its iterator is taken again if it expires or a batch must be re-read.
    position: Position,
    /// `None`: take one at `position` before the next read.
    iterator: Option<String>,
    /// Failed calls (GetShardIterator, GetRecords) in a row: how long to back off.
    failed_calls: u32,
    /// Times the current batch was read again because the fan-out failed part of it.
    retries: u32,
    /// Not read before this (backoff).
    resume_at: Instant,
}

impl Shard {
    fn new(id: String, parent: Option<String>, position: Position) -> Shard {
        Shard {
            id,
            parent,
            position,
            iterator: None,
            failed_calls: 0,
            retries: 0,
            resume_at: Instant::now(),
        }
    }

    /// After a failed call: waits before the next, doubling with each failure in a row.
    fn call_failed(&mut self) {
        self.failed_calls += 1;
        self.back_off(self.failed_calls);
    }

    /// Waits [`retry::FOLLOW`]'s pause after `failures` failures in a row before the next read.
    fn back_off(&mut self, failures: u32) {
        let pause = retry::pause_after(retry::FOLLOW, failures).expect("FOLLOW never gives up");
        self.resume_at = Instant::now() + pause;
    }
}

/// A shard as DescribeStream lists it.
struct Found {
    id: String,
    parent: Option<String>,
    closed: bool,
}

/// What one read of a shard did.
enum Read {
    /// Records came back (handled or to be retried): read again at once.
    Records,
    /// Nothing new, or the shard is waiting.
    Idle,
    /// The shard is closed and read to its end.
    Finished,
}

impl ChangeTail {
    /// Follows the stream for as long as the process runs, handing each batch to `fanout`.
    pub async fn run(mut self, fanout: StreamFanOut) {
        loop {
            if Instant::now() >= self.next_discovery {
                self.discover().await;
            }
            let mut busy = false;
            let mut finished = false;
            let shards = std::mem::take(&mut self.shards);
            let reading: HashSet<String> = shards.iter().map(|s| s.id.clone()).collect();
            let mut kept = Vec::with_capacity(shards.len());
            for mut shard in shards {
                // A child shard is read after its parent, so each item's records stay in order.
                if shard.parent.as_ref().is_some_and(|p| reading.contains(p)) {
                    kept.push(shard);
                    continue;
                }
                match self.read(&mut shard, &fanout).await {
                    Read::Records => {
                        busy = true;
                        kept.push(shard);
                    }
                    Read::Idle => kept.push(shard),
                    Read::Finished => {
                        tracing::info!(shard = %shard.id, "shard closed and read to its end");
                        finished = true;
                    }
                }
            }
            self.shards = kept;
            if finished {
                // Its children are open by now.
                self.discover().await;
            }
            if !busy {
                tokio::time::sleep(POLL).await;
            }
        }
    }

    /// Reads one batch of `shard` and hands its `INSERT`s to the fan-out.
    async fn read(&self, shard: &mut Shard, fanout: &StreamFanOut) -> Read {
        if Instant::now() < shard.resume_at {
            return Read::Idle;
        }
        let iterator = match shard.iterator.take() {
            Some(iterator) => iterator,
            None => match self.iterator(&shard.id, &shard.position).await {
                Ok(Some(iterator)) => iterator,
                Ok(None) => return Read::Finished,
                Err(IteratorFailure::Trimmed(why)) => {
                    // The records at that position are gone (older than 24 h): start from the
                    // oldest there is. Checkpoints drop whatever was delivered already.
                    tracing::warn!(shard = %shard.id, %why, "position trimmed; reading from the oldest record");
                    shard.position = Position::TrimHorizon;
                    shard.call_failed();
                    return Read::Idle;
                }
                Err(IteratorFailure::Other(why)) => {
                    tracing::error!(shard = %shard.id, %why, "cannot take a shard iterator; retrying");
                    shard.call_failed();
                    return Read::Idle;
                }
            },
        };
        let out = match self
            .source
            .streams
            .get_records()
            .shard_iterator(&iterator)
            .limit(BATCH)
            .send()
            .await
        {
            Ok(out) => out,
            Err(error) => {
                self.read_failed(shard, error, iterator);
                return Read::Idle;
            }
        };
        shard.failed_calls = 0;
        let records = out.records();
        let next = out.next_shard_iterator().map(str::to_owned);
        let Some(last) = records.iter().rev().find_map(sequence_number) else {
            return match next {
                Some(next) => {
                    shard.iterator = Some(next);
                    Read::Idle
                }
                None => Read::Finished,
            };
        };
        let last = last.to_owned();

        let wakes: Vec<Wake> = records.iter().filter_map(wake_of).collect();
        // Unreadable records are reported too, but reading them again cannot help.
        let unreadable: HashSet<String> = wakes
            .iter()
            .filter(|w| w.target.is_err())
            .map(|w| w.record.clone())
            .collect();
        let report = if wakes.is_empty() {
            Default::default()
        } else {
            fanout.handle(wakes).await
        };
        tracing::debug!(
            shard = %shard.id,
            records = records.len(),
            events = report.events,
            delivered = report.delivery.delivered,
            "change batch"
        );
        let first_failed = report
            .failed
            .iter()
            .filter(|record| !unreadable.contains(*record))
            .min_by(|a, b| compare_sequence_numbers(a, b));
        match first_failed {
            Some(first) if shard.retries < MAX_RETRIES => {
                shard.retries += 1;
                tracing::warn!(
                    shard = %shard.id,
                    record = %first,
                    retry = shard.retries,
                    "fan-out failed for part of a batch; reading it again from the first failure"
                );
                shard.position = Position::At(first.clone());
                shard.iterator = None;
                shard.back_off(shard.retries);
            }
            failed => {
                if let Some(first) = failed {
                    tracing::error!(
                        shard = %shard.id,
                        record = %first,
                        "fan-out kept failing; moving on (the log stream's next record delivers \
                         what was missed)"
                    );
                }
                shard.retries = 0;
                shard.position = Position::After(last);
                match next {
                    Some(next) => shard.iterator = Some(next),
                    None => return Read::Finished,
                }
            }
        }
        Read::Records
    }

    /// Decides what a failed `GetRecords` means for the shard, and whether its iterator is kept.
    fn read_failed(
        &self,
        shard: &mut Shard,
        error: SdkError<GetRecordsError, HttpResponse>,
        iterator: String,
    ) {
        let service = error.as_service_error();
        if service.is_some_and(|e| e.is_expired_iterator_exception()) {
            // Iterators live 15 minutes; take a new one where this one was.
            tracing::debug!(shard = %shard.id, "shard iterator expired; taking a new one");
            return;
        }
        if service.is_some_and(|e| e.is_trimmed_data_access_exception()) {
            tracing::warn!(shard = %shard.id, "records trimmed before they were read; reading from the oldest record");
            shard.position = Position::TrimHorizon;
            return;
        }
        if service.is_some_and(|e| e.is_limit_exceeded_exception()) {
            tracing::warn!(shard = %shard.id, "reading the stream too often; slowing down");
            shard.resume_at = Instant::now() + THROTTLED;
            shard.iterator = Some(iterator);
            return;
        }
        tracing::error!(
            shard = %shard.id,
            error = %why(&error),
            "cannot read the change stream; retrying"
        );
        shard.call_failed();
        // The iterator is most likely still good (a network error, a busy service); after a few
        // failures in a row it is taken again, in case it is the iterator that is refused.
        if shard.failed_calls < KEEP_ITERATOR_FAILURES {
            shard.iterator = Some(iterator);
        }
    }

    /// A shard iterator at `position`; `None` for a shard that is closed and has nothing there.
    async fn iterator(
        &self,
        shard: &str,
        position: &Position,
    ) -> Result<Option<String>, IteratorFailure> {
        let (kind, sequence_number) = match position {
            Position::Latest => (ShardIteratorType::Latest, None),
            Position::TrimHorizon => (ShardIteratorType::TrimHorizon, None),
            Position::At(n) => (ShardIteratorType::AtSequenceNumber, Some(n.clone())),
            Position::After(n) => (ShardIteratorType::AfterSequenceNumber, Some(n.clone())),
        };
        let result = self
            .source
            .streams
            .get_shard_iterator()
            .stream_arn(&self.arn)
            .shard_id(shard)
            .shard_iterator_type(kind)
            .set_sequence_number(sequence_number)
            .send()
            .await;
        match result {
            Ok(out) => Ok(out.shard_iterator),
            Err(error) => Err(IteratorFailure::of(error)),
        }
    }

    /// Every shard of the stream, all pages.
    async fn describe(&self) -> Result<Vec<Found>, String> {
        let mut found = Vec::new();
        let mut start: Option<String> = None;
        loop {
            let out = self
                .source
                .streams
                .describe_stream()
                .stream_arn(&self.arn)
                .set_exclusive_start_shard_id(start)
                .send()
                .await
                .map_err(|e| why(&e))?;
            let Some(description) = out.stream_description else {
                return Ok(found);
            };
            for shard in description.shards() {
                let Some(id) = shard.shard_id() else { continue };
                found.push(Found {
                    id: id.to_owned(),
                    parent: shard.parent_shard_id().map(str::to_owned),
                    closed: shard
                        .sequence_number_range()
                        .and_then(|r| r.ending_sequence_number())
                        .is_some(),
                });
            }
            match description.last_evaluated_shard_id() {
                Some(last) => start = Some(last.to_owned()),
                None => return Ok(found),
            }
        }
    }

    /// Picks up shards that appeared since the last look, from their first record.
    async fn discover(&mut self) {
        self.next_discovery = Instant::now() + DISCOVER_EVERY;
        match self.describe().await {
            Ok(shards) => {
                for found in shards {
                    if self.known.insert(found.id.clone()) {
                        tracing::info!(shard = %found.id, parent = ?found.parent, "new shard");
                        self.shards
                            .push(Shard::new(found.id, found.parent, Position::TrimHorizon));
                    }
                }
            }
            Err(why) => {
                tracing::error!(%why, "cannot describe the change stream; will look again");
                // The stream may have been replaced (disabled and enabled again): find it anew.
                match stream_arn(&self.source.dynamodb, &self.source.table).await {
                    Ok(arn) if arn != self.arn => {
                        tracing::warn!(%arn, "the table has a new stream; following it");
                        self.arn = arn;
                        self.shards.clear();
                        self.next_discovery = Instant::now();
                    }
                    Ok(_) => {}
                    Err(why) => tracing::error!(%why, "cannot describe the events table"),
                }
            }
        }
    }
}

/// Why an iterator could not be taken.
enum IteratorFailure {
    /// The position is older than the stream's retention.
    Trimmed(String),
    Other(String),
}

impl std::fmt::Display for IteratorFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            IteratorFailure::Trimmed(why) | IteratorFailure::Other(why) => f.write_str(why),
        }
    }
}

impl IteratorFailure {
    fn of(error: SdkError<GetShardIteratorError, HttpResponse>) -> IteratorFailure {
        let why = why(&error);
        if error
            .as_service_error()
            .is_some_and(|e| e.is_trimmed_data_access_exception())
        {
            IteratorFailure::Trimmed(why)
        } else {
            IteratorFailure::Other(why)
        }
    }
}

/// The `LatestStreamArn` of `table`.
async fn stream_arn(client: &aws_sdk_dynamodb::Client, table: &str) -> Result<String, String> {
    let out = match client.describe_table().table_name(table).send().await {
        Ok(out) => out,
        Err(error)
            if error
                .as_service_error()
                .is_some_and(|e| e.is_resource_not_found_exception()) =>
        {
            return Err(format!(
                "table {table} does not exist (`palaver init` creates the tables)"
            ));
        }
        Err(error) => return Err(why(&error)),
    };
    out.table()
        .and_then(|t| t.latest_stream_arn())
        .map(str::to_owned)
        .ok_or_else(|| {
            format!(
                "table {table} has no stream (`palaver init` and template.yaml create it with one)"
            )
        })
}

/// An SDK error in one line: the service's own code and message, or what kept the request from
/// being answered (connection refused, timeout, a response that is not the API's) with its causes.
fn why<E>(error: &SdkError<E, HttpResponse>) -> String
where
    E: Error + ProvideErrorMetadata + 'static,
{
    if let Some(service) = error.as_service_error()
        && service.code().is_some()
    {
        return service.to_string();
    }
    let mut why = match error.raw_response() {
        Some(response) => format!("{error} (HTTP {})", response.status().as_u16()),
        None => error.to_string(),
    };
    let mut cause = error.source();
    while let Some(error) = cause {
        why = format!("{why}: {error}");
        cause = error.source();
    }
    why
}

fn sequence_number(record: &Record) -> Option<&str> {
    record.dynamodb()?.sequence_number()
}

/// The wake an `INSERT` record is; `None` for others. (moto reports a put of an identical item
/// as a `MODIFY`; the log only ever inserts.)
fn wake_of(record: &Record) -> Option<Wake> {
    if record.event_name() != Some(&OperationType::Insert) {
        return None;
    }
    let data = record.dynamodb()?;
    let id = data.sequence_number()?;
    let key = |name: &str, number: bool| {
        let value = data.keys()?.get(name)?;
        if number { value.as_n() } else { value.as_s() }
            .ok()
            .map(String::as_str)
    };
    Some(Wake::from_keys(id, key("stream", false), key("seq", true)))
}

/// Sequence numbers are decimal strings of varying length: compare them as numbers.
fn compare_sequence_numbers(a: &str, b: &str) -> Ordering {
    let (a, b) = (a.trim_start_matches('0'), b.trim_start_matches('0'));
    a.len().cmp(&b.len()).then_with(|| a.cmp(b))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::Stream;
    use aws_sdk_dynamodbstreams::types::{AttributeValue, StreamRecord};

    fn record(name: OperationType, seqno: &str, stream: &str, seq: &str) -> Record {
        Record::builder()
            .event_name(name)
            .dynamodb(
                StreamRecord::builder()
                    .sequence_number(seqno)
                    .keys("stream", AttributeValue::S(stream.to_owned()))
                    .keys("seq", AttributeValue::N(seq.to_owned()))
                    .build(),
            )
            .build()
    }

    #[test]
    fn inserts_wake_the_fan_out_and_other_records_do_not() {
        let wake = wake_of(&record(OperationType::Insert, "100", "r:general", "3")).unwrap();
        assert_eq!(wake.record, "100");
        assert_eq!(wake.target, Ok((Stream::from_key("r:general").unwrap(), 3)));
        assert!(wake_of(&record(OperationType::Modify, "101", "r:general", "3")).is_none());
        assert!(wake_of(&record(OperationType::Remove, "102", "r:general", "3")).is_none());
        let bad = wake_of(&record(OperationType::Insert, "103", "nonsense", "x")).unwrap();
        assert!(bad.target.is_err());
    }

    #[test]
    fn sequence_numbers_compare_as_numbers() {
        assert_eq!(compare_sequence_numbers("99", "100"), Ordering::Less);
        assert_eq!(compare_sequence_numbers("100", "0100"), Ordering::Equal);
        assert_eq!(
            compare_sequence_numbers("1100000000017454423010", "1100000000017454423009"),
            Ordering::Greater
        );
    }

    #[test]
    fn backoff_doubles_up_to_a_cap() {
        let mut shard = Shard::new("s".into(), None, Position::Latest);
        let mut waits = Vec::new();
        for _ in 0..10 {
            let before = Instant::now();
            shard.call_failed();
            waits.push((shard.resume_at - before).as_millis() / 100);
        }
        assert_eq!(waits[..4], [1, 2, 4, 8]);
        assert_eq!(*waits.last().unwrap(), 50);
    }
}
