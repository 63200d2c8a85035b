//! [`DeliveryQueue`] on SQS, and reading its messages back out of the deliver function's
//! Lambda event.
//!
//! A message's body is one [`DeliveryJob`] as JSON: the frame exactly as the fan-out serialised
//! it, and the connections to post it to. Jobs go out with `SendMessageBatch`, at most 10 entries
//! and 256 KiB per call (a frame is up to 32 KiB, so ten big jobs would not fit in one call).
//!
//! The queue is FIFO (its URL ends in `.fifo`): each job goes out with its group as the message
//! group — one worker at a time per group, in order, so every connection sees a room's frames in
//! seq order — and its id as the deduplication id, so a job queued again by a retried stream
//! batch within five minutes is dropped by SQS instead of posted twice. A standard queue works
//! too, without those two promises.

use crate::ports::{DeliveryJob, DeliveryQueue, QueueError, in_groups};
use crate::retry;
use async_trait::async_trait;
use aws_lambda_events::event::sqs::{SqsBatchResponse, SqsEvent};
use aws_sdk_sqs::Client;
use aws_sdk_sqs::error::DisplayErrorContext;
use aws_sdk_sqs::types::{BatchResultErrorEntry, SendMessageBatchRequestEntry};
use backon::RetryableWithContext;

/// Entries per `SendMessageBatch`: SQS's limit.
const BATCH_ENTRIES: usize = 10;
/// Bytes of message bodies per `SendMessageBatch`: SQS's limit for a batch's total payload.
const BATCH_BYTES: usize = 256 * 1024;
/// `SendMessageBatch` calls of one round in flight at once: a frame of a room of 10,000 is 100
/// jobs, 10 calls; sent one after another at ~10 ms each they would cap the room at a few
/// frames a second.
const BATCHES_AT_ONCE: usize = 16;

/// The delivery queue: `PALAVER_DELIVERY_QUEUE_URL`.
#[derive(Clone, Debug)]
pub struct SqsDeliveryQueue {
    client: Client,
    queue_url: String,
}

impl SqsDeliveryQueue {
    pub fn new(client: Client, queue_url: impl Into<String>) -> SqsDeliveryQueue {
        SqsDeliveryQueue {
            client,
            queue_url: queue_url.into(),
        }
    }

    pub fn queue_url(&self) -> &str {
        &self.queue_url
    }

    /// Sends one batch, sending what SQS failed on its side (throttling, an internal error)
    /// again under [`retry::AWS_CALL`]. The error names every entry that still failed, and why.
    async fn send_batch(&self, entries: Vec<(String, Entry)>) -> Result<(), QueueError> {
        let (_, sent) = (|mut entries: Vec<(String, Entry)>| async move {
            let sent = self.send_once(&entries).await;
            if let Err(Unsent::Busy { ids, .. }) = &sent {
                entries.retain(|(id, _)| ids.contains(id));
            }
            (entries, sent)
        })
        .retry(retry::AWS_CALL)
        .context(entries)
        .when(|unsent| matches!(unsent, Unsent::Busy { .. }))
        .notify(|unsent, pause| {
            if let Unsent::Busy { ids, .. } = unsent {
                tracing::warn!(
                    entries = ids.len(),
                    ?pause,
                    "SQS refused some entries; sending them again"
                );
            }
        })
        .await;
        sent.map_err(|unsent| match unsent {
            Unsent::Failed(error) => error,
            Unsent::Busy { why, .. } => QueueError(why),
        })
    }

    /// One `SendMessageBatch` of `entries`.
    async fn send_once(&self, entries: &[(String, Entry)]) -> Result<(), Unsent> {
        let fifo = self.queue_url.ends_with(".fifo");
        let batch = entries
            .iter()
            .map(|(id, entry)| {
                let mut builder = SendMessageBatchRequestEntry::builder()
                    .id(id)
                    .message_body(&entry.body);
                if fifo {
                    builder = builder
                        .message_group_id(&entry.group)
                        .message_deduplication_id(&entry.dedupe);
                }
                builder
                    .build()
                    .map_err(|e| Unsent::Failed(QueueError(format!("entry {id}: {e}"))))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let out = self
            .client
            .send_message_batch()
            .queue_url(&self.queue_url)
            .set_entries(Some(batch))
            .send()
            .await
            .map_err(|e| {
                Unsent::Failed(QueueError(format!(
                    "SendMessageBatch to {}: {}",
                    self.queue_url,
                    DisplayErrorContext(&e)
                )))
            })?;
        let failed = out.failed();
        if failed.is_empty() {
            return Ok(());
        }
        let describe = |failed: &mut dyn Iterator<Item = &BatchResultErrorEntry>| {
            let entries: Vec<String> = failed
                .map(|f| {
                    format!(
                        "entry {} failed: {} {}",
                        f.id(),
                        f.code(),
                        f.message().unwrap_or("")
                    )
                })
                .collect();
            format!("{}: {}", self.queue_url, entries.join("; "))
        };
        if failed.iter().any(|f| f.sender_fault()) {
            let why = describe(&mut failed.iter().filter(|f| f.sender_fault()));
            return Err(Unsent::Failed(QueueError(why)));
        }
        Err(Unsent::Busy {
            ids: failed.iter().map(|f| f.id().to_owned()).collect(),
            why: describe(&mut failed.iter()),
        })
    }
}

/// Why a batch was not sent whole.
#[derive(Debug)]
enum Unsent {
    /// SQS failed these entries on its side (throttling, an internal error): worth sending
    /// them again. `why` names each, for when the tries run out.
    Busy { ids: Vec<String>, why: String },
    /// The call failed (after the SDK's own retries), or entries failed on the sender's side:
    /// sending them again cannot help.
    Failed(QueueError),
}

#[async_trait]
impl DeliveryQueue for SqsDeliveryQueue {
    /// Sends the jobs in rounds: in each, every lane (group) sends its next chunk — as many of its
    /// jobs, in order, as one `SendMessageBatch` takes — with lanes' chunks packed together into
    /// calls that go out at once ([`BATCHES_AT_ONCE`]). A lane's jobs are in order within a call
    /// (SQS keeps a batch's entries in order) and across calls (the next round starts when this
    /// one is sent), so every lane keeps the order given; a room's run of frames to 16 lanes is
    /// one or two calls, not one per frame.
    async fn enqueue(&self, jobs: Vec<DeliveryJob>) -> Result<(), QueueError> {
        let entries = jobs
            .iter()
            .map(|job| {
                Ok(Entry {
                    body: serde_json::to_string(job)?,
                    group: job.group.clone(),
                    dedupe: job.id.clone(),
                })
            })
            .collect::<Result<Vec<_>, serde_json::Error>>()
            .map_err(|e| QueueError(format!("cannot encode a delivery job: {e}")))?;
        use futures_util::StreamExt;
        for round in rounds(entries) {
            let mut sent = futures_util::stream::iter(round)
                .map(|batch| self.send_batch(batch))
                .buffer_unordered(BATCHES_AT_ONCE);
            let mut failure = None;
            while let Some(result) = sent.next().await {
                if let Err(error) = result {
                    failure.get_or_insert(error);
                }
            }
            if let Some(error) = failure {
                return Err(error);
            }
        }
        Ok(())
    }
}

/// One message to send: the job's JSON, its FIFO group and deduplication id.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Entry {
    body: String,
    group: String,
    dedupe: String,
}

/// The calls to make, round by round: each lane's entries cut into chunks that one call takes
/// ([`BATCH_ENTRIES`], [`BATCH_BYTES`]), round `r` holding every lane's `r`th chunk, packed
/// together into calls (a chunk is never split). Entry ids are the job's index in `entries`, so a
/// failure names the job.
fn rounds(entries: Vec<Entry>) -> Vec<Vec<Vec<(String, Entry)>>> {
    let named = entries
        .into_iter()
        .enumerate()
        .map(|(index, entry)| (format!("job-{index}"), entry));
    let lanes = in_groups(named, |(_, entry)| &entry.group);
    let chunked: Vec<Vec<Vec<(String, Entry)>>> = lanes.into_iter().map(chunks).collect();
    let depth = chunked.iter().map(Vec::len).max().unwrap_or(0);
    let mut lanes: Vec<std::vec::IntoIter<Vec<(String, Entry)>>> =
        chunked.into_iter().map(Vec::into_iter).collect();
    let mut rounds = Vec::with_capacity(depth);
    for _ in 0..depth {
        let mut calls: Vec<Vec<(String, Entry)>> = Vec::new();
        let mut size = 0;
        for chunk in lanes.iter_mut().filter_map(Iterator::next) {
            let bytes: usize = chunk.iter().map(|(_, e)| e.body.len()).sum();
            let fits = calls.last().is_some_and(|call| {
                call.len() + chunk.len() <= BATCH_ENTRIES && size + bytes <= BATCH_BYTES
            });
            if !fits {
                calls.push(Vec::new());
                size = 0;
            }
            size += bytes;
            calls
                .last_mut()
                .expect("a call was just made")
                .extend(chunk);
        }
        rounds.push(calls);
    }
    rounds
}

/// One lane's entries cut, in order, into chunks of at most [`BATCH_ENTRIES`] entries and
/// [`BATCH_BYTES`].
fn chunks(entries: Vec<(String, Entry)>) -> Vec<Vec<(String, Entry)>> {
    let mut chunks: Vec<Vec<(String, Entry)>> = Vec::new();
    let mut size = 0;
    for (id, entry) in entries {
        let fits = chunks
            .last()
            .is_some_and(|c| c.len() < BATCH_ENTRIES && size + entry.body.len() <= BATCH_BYTES);
        if !fits {
            chunks.push(Vec::new());
            size = 0;
        }
        size += entry.body.len();
        chunks
            .last_mut()
            .expect("a chunk was just made")
            .push((id, entry));
    }
    chunks
}

/// One record of the deliver function's SQS event: its message id (what a batch failure names)
/// and its job, or why its body is not one.
#[derive(Debug, PartialEq, Eq)]
pub struct QueuedJob {
    pub message_id: String,
    pub job: Result<DeliveryJob, String>,
}

/// The jobs of an SQS event, in record order.
pub fn jobs_of(event: SqsEvent) -> Vec<QueuedJob> {
    event
        .records
        .into_iter()
        .map(|record| {
            let message_id = record.message_id.unwrap_or_default();
            let job = match record.body.as_deref() {
                None => Err("the message has no body".to_owned()),
                Some(body) => serde_json::from_str::<DeliveryJob>(body)
                    .map_err(|e| format!("the body is not a delivery job: {e}")),
            };
            QueuedJob { message_id, job }
        })
        .collect()
}

/// The deliver function's answer: the messages to be received again.
pub fn sqs_response(failed: impl IntoIterator<Item = String>) -> SqsBatchResponse {
    let mut response = SqsBatchResponse::default();
    for message_id in failed {
        response.add_failure(message_id);
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::ConnectionId;

    fn entry(group: &str, body: String) -> Entry {
        Entry {
            body,
            group: group.to_owned(),
            dedupe: "d".to_owned(),
        }
    }

    /// Each call's entries as "group:body", round by round.
    fn plan(entries: Vec<Entry>) -> Vec<Vec<Vec<String>>> {
        rounds(entries)
            .into_iter()
            .map(|calls| {
                calls
                    .into_iter()
                    .map(|call| {
                        call.into_iter()
                            .map(|(_, e)| format!("{}:{}", e.group, e.body))
                            .collect()
                    })
                    .collect()
            })
            .collect()
    }

    /// How many entries each call holds, round by round.
    fn sizes(entries: Vec<Entry>) -> Vec<Vec<usize>> {
        rounds(entries)
            .iter()
            .map(|calls| calls.iter().map(Vec::len).collect())
            .collect()
    }

    #[test]
    fn calls_keep_to_ten_entries_and_256_kib() {
        let one_lane: Vec<Entry> = (0..23).map(|i| entry("g", format!("{i}"))).collect();
        assert_eq!(
            sizes(one_lane),
            [[10], [10], [3]],
            "one lane: a call per round, in order"
        );

        let big = entry("g", "x".repeat(100 * 1024));
        assert_eq!(
            sizes(vec![big.clone(); 5]),
            [[2], [2], [1]],
            "three 100 KiB bodies do not fit in 256 KiB"
        );

        let ids: Vec<String> = rounds(vec![big; 3])
            .into_iter()
            .flatten()
            .flatten()
            .map(|(id, _)| id)
            .collect();
        assert_eq!(ids, ["job-0", "job-1", "job-2"]);
    }

    #[test]
    fn lanes_share_calls_and_each_keeps_its_order_across_rounds() {
        // Three lanes: a with 12 jobs, b with 3, c with 1, interleaved as a room's run is.
        let mut entries = Vec::new();
        for i in 0..12 {
            entries.push(entry("a", format!("{i}")));
            if i < 3 {
                entries.push(entry("b", format!("{i}")));
            }
            if i < 1 {
                entries.push(entry("c", format!("{i}")));
            }
        }
        let plan = plan(entries);
        // Round 1: a's first ten in a call of their own (b's and c's do not fit with them), b's
        // three and c's one together; round 2: a's last two.
        let a: Vec<String> = (0..10).map(|i| format!("a:{i}")).collect();
        assert_eq!(
            plan[0],
            [
                a,
                vec!["b:0".into(), "b:1".into(), "b:2".into(), "c:0".into()]
            ]
        );
        assert_eq!(plan[1], [vec!["a:10".to_owned(), "a:11".to_owned()]]);
        assert_eq!(plan.len(), 2);
    }

    #[test]
    fn records_decode_into_jobs_or_say_why_not() {
        let job = DeliveryJob {
            frames: vec![r#"{"type":"message"}"#.to_owned()],
            connections: vec![ConnectionId::new("a="), ConnectionId::new("b=")],
            group: "lobby#3".to_owned(),
            id: "r:lobby:7#3#0".to_owned(),
        };
        let event: SqsEvent = serde_json::from_value(serde_json::json!({
            "Records": [
                {"messageId": "m1", "body": serde_json::to_string(&job).unwrap()},
                {"messageId": "m2", "body": "not json"},
                {"messageId": "m3"},
            ]
        }))
        .unwrap();
        let jobs = jobs_of(event);
        assert_eq!(jobs[0].job.as_ref(), Ok(&job));
        assert!(
            jobs[1]
                .job
                .as_ref()
                .unwrap_err()
                .contains("not a delivery job")
        );
        assert!(jobs[2].job.as_ref().unwrap_err().contains("no body"));
        let response = sqs_response(["m2".to_owned()]);
        assert_eq!(
            serde_json::to_value(&response).unwrap(),
            serde_json::json!({"batchItemFailures": [{"itemIdentifier": "m2"}]})
        );
    }
}
