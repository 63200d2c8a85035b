//! The deliver function's event source mapping: the delivery queue (SQS FIFO), read as Lambda
//! reads it (template.yaml `DeliverFunction.Events.DeliveryQueue`).
//!
//! Pollers receive up to 10 messages at a time and invoke the function with them; each poller
//! holds a concurrency slot of the function while it works, so concurrency is at most the
//! function's (its reservation, or the account's unreserved pool, or `MaximumConcurrency` when
//! set) and, since moto's FIFO queue hands out no message of a group that has one in flight,
//! at most the number of active message groups. What the function answers as failed
//! (`ReportBatchItemFailures`) — everything, if it fails as a whole — is left in the queue: it
//! comes back after the visibility timeout (180 s), and meanwhile its message group is blocked.
//! The rest is deleted (DeleteMessageBatch), as Lambda does.
//!
//! An idle poller waits as a long poll does: until a message is sent (the counting proxy wakes
//! one poller per 10 messages sent), until a batch's message groups are set free (its messages
//! deleted: one poller), until messages handed back become visible again, or 20 s.

use crate::lambda::{InvokeError, LambdaService};
use crate::metrics::Metrics;
use crate::settings;
use aws_sdk_sqs::types::{DeleteMessageBatchRequestEntry, MessageSystemAttributeName};
use axum::body::Bytes;
use serde_json::{Value, json};
use std::sync::Arc;
use tokio::sync::Notify;

const FUNCTION: &str = "palaver-deliver";

pub struct QueueSource {
    pub sqs: aws_sdk_sqs::Client,
    pub queue_url: String,
    pub queue_arn: String,
    pub lambda: Arc<LambdaService>,
    pub metrics: Arc<Metrics>,
    /// Woken once per 10 messages sent (the counting proxy sees every send), and once per batch
    /// deleted.
    pub sent: Arc<Notify>,
    /// Pollers: `ScalingConfig.MaximumConcurrency` when set, else the function's concurrency.
    pub pollers: usize,
}

impl QueueSource {
    pub async fn run(self: Arc<Self>) {
        // A JoinSet: when this task is aborted, the pollers are too.
        let mut tasks = tokio::task::JoinSet::new();
        for _ in 0..self.pollers.max(1) {
            tasks.spawn(self.clone().poll());
        }
        while tasks.join_next().await.is_some() {}
    }

    async fn poll(self: Arc<Self>) {
        loop {
            let slot = self.lambda.acquire(FUNCTION, &self.metrics).await;
            let received = self
                .sqs
                .receive_message()
                .queue_url(&self.queue_url)
                .max_number_of_messages(settings::SQS_BATCH_SIZE)
                .message_system_attribute_names(MessageSystemAttributeName::All)
                .send()
                .await;
            let messages = match received {
                Ok(out) => out.messages.unwrap_or_default(),
                Err(error) => {
                    tracing::warn!(error = %aws_sdk_sqs::error::DisplayErrorContext(error), "ReceiveMessage");
                    Vec::new()
                }
            };
            if messages.is_empty() {
                drop(slot);
                let _ = tokio::time::timeout(settings::SQS_LONG_POLL, self.sent.notified()).await;
                continue;
            }
            let records: Vec<Value> = messages.iter().map(|m| self.record(m)).collect();
            let event = Bytes::from(json!({ "Records": records }).to_string());
            let failed: Vec<String> = match self.lambda.invoke(&slot, event).await {
                Ok(answer) => {
                    let answer: Value = serde_json::from_slice(&answer).unwrap_or(Value::Null);
                    answer["batchItemFailures"]
                        .as_array()
                        .map(|f| {
                            f.iter()
                                .filter_map(|f| f["itemIdentifier"].as_str().map(str::to_owned))
                                .collect()
                        })
                        .unwrap_or_default()
                }
                Err(error) => {
                    if matches!(error, InvokeError::Throttled) {
                        self.metrics.esm_throttled.add(1);
                    }
                    tracing::warn!(%error, "deliver invocation failed");
                    messages
                        .iter()
                        .filter_map(|m| m.message_id().map(str::to_owned))
                        .collect()
                }
            };
            drop(slot);
            let done: Vec<DeleteMessageBatchRequestEntry> = messages
                .iter()
                .enumerate()
                .filter(|(_, m)| !failed.iter().any(|f| Some(f.as_str()) == m.message_id()))
                .filter_map(|(i, m)| {
                    DeleteMessageBatchRequestEntry::builder()
                        .id(i.to_string())
                        .set_receipt_handle(m.receipt_handle().map(str::to_owned))
                        .build()
                        .ok()
                })
                .collect();
            // Deleting a batch lets its groups' next messages out: a long poll waiting on the
            // queue would return then.
            if !done.is_empty()
                && let Err(error) = self
                    .sqs
                    .delete_message_batch()
                    .queue_url(&self.queue_url)
                    .set_entries(Some(done))
                    .send()
                    .await
            {
                tracing::warn!(error = %aws_sdk_sqs::error::DisplayErrorContext(error), "DeleteMessageBatch");
            }
            self.sent.notify_one();
            if !failed.is_empty() {
                self.metrics.sqs_handed_back.add(failed.len() as u64);
                // They become visible again after the visibility timeout: a long poll would
                // return them then.
                let sent = self.sent.clone();
                tokio::spawn(async move {
                    tokio::time::sleep(settings::SQS_VISIBILITY_TIMEOUT).await;
                    sent.notify_one();
                });
            }
        }
    }

    /// One message in the shape of Lambda's SQS event record.
    fn record(&self, message: &aws_sdk_sqs::types::Message) -> Value {
        let attributes: serde_json::Map<String, Value> = message
            .attributes()
            .map(|a| {
                a.iter()
                    .map(|(k, v)| (k.as_str().to_owned(), json!(v)))
                    .collect()
            })
            .unwrap_or_default();
        json!({
            "messageId": message.message_id().unwrap_or_default(),
            "receiptHandle": message.receipt_handle().unwrap_or_default(),
            "body": message.body().unwrap_or_default(),
            "attributes": attributes,
            "messageAttributes": {},
            "md5OfBody": message.md5_of_body().unwrap_or_default(),
            "eventSource": "aws:sqs",
            "eventSourceARN": self.queue_arn,
            "awsRegion": "us-east-1",
        })
    }
}
