//! The fan-out function's event source mapping: the events table's DynamoDB stream, read as
//! Lambda reads it (template.yaml `FanOutFunction.Events.EventsStream`).
//!
//! Per shard, one batch at a time (ParallelizationFactor 1): GetRecords while records are
//! waiting, every 250 ms when none are; records that do not match the filter
//! (`eventName: INSERT`) are dropped unseen; a batch is at most 100 records, sent at once
//! (batching window 0). The function's answer names failed records (`ReportBatchItemFailures`):
//! the batch is tried again from the lowest failed sequence number. A function error bisects the
//! batch (BisectBatchOnFunctionError) and tries each half. After 5 retries, or for records older
//! than an hour, the records go to the OnFailure destination (the stream dead-letter queue) as a
//! `DDBStreamBatchInfo`, and the shard moves on. A throttled invocation is tried again without
//! counting as a retry. Each record's lag — its ApproximateCreationDateTime to its first
//! invocation — is measured.

use crate::lambda::{InvokeError, LambdaService};
use crate::metrics::Metrics;
use crate::settings;
use aws_sdk_dynamodbstreams::types::{AttributeValue, Record, ShardIteratorType};
use axum::body::Bytes;
use serde_json::{Value, json};
use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

const FUNCTION: &str = "palaver-fanout";
/// Pause before a failed batch is invoked again.
/// AWS documents no figure for either.
const RETRY_PAUSE: Duration = Duration::from_millis(500);

pub struct StreamSource {
    pub streams: aws_sdk_dynamodbstreams::Client,
    pub sqs: aws_sdk_sqs::Client,
    pub stream_arn: String,
    pub dead_letter_url: String,
    pub lambda: Arc<LambdaService>,
    pub metrics: Arc<Metrics>,
}

impl StreamSource {
    /// Reads every shard of the stream until the task is aborted.
    pub async fn run(self: Arc<Self>) {
        let described = match self
            .streams
            .describe_stream()
            .stream_arn(&self.stream_arn)
            .send()
            .await
        {
            Ok(described) => described,
            Err(error) => {
                tracing::error!(error = %aws_sdk_dynamodbstreams::error::DisplayErrorContext(error), "DescribeStream");
                return;
            }
        };
        let shards: Vec<String> = described
            .stream_description()
            .map(|d| {
                d.shards()
                    .iter()
                    .filter_map(|s| s.shard_id())
                    .map(str::to_owned)
                    .collect()
            })
            .unwrap_or_default();
        // A JoinSet: when this task is aborted, the shards' tasks are too.
        let mut tasks = tokio::task::JoinSet::new();
        for shard in shards {
            tasks.spawn(self.clone().shard(shard));
        }
        while tasks.join_next().await.is_some() {}
    }

    async fn shard(self: Arc<Self>, shard: String) {
        let mut iterator = loop {
            match self
                .streams
                .get_shard_iterator()
                .stream_arn(&self.stream_arn)
                .shard_id(&shard)
                .shard_iterator_type(ShardIteratorType::TrimHorizon)
                .send()
                .await
            {
                Ok(out) => break out.shard_iterator().map(str::to_owned),
                Err(error) => {
                    tracing::warn!(error = %aws_sdk_dynamodbstreams::error::DisplayErrorContext(error), "GetShardIterator");
                    tokio::time::sleep(settings::STREAM_POLL_INTERVAL).await;
                }
            }
        };
        let mut waiting: VecDeque<Value> = VecDeque::new();
        let mut poll = tokio::time::interval(settings::STREAM_POLL_INTERVAL);
        poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            if waiting.len() < settings::STREAM_BATCH_SIZE
                && let Some(current) = iterator.clone()
            {
                match self
                    .streams
                    .get_records()
                    .shard_iterator(current)
                    .limit(settings::STREAM_GET_RECORDS_LIMIT)
                    .send()
                    .await
                {
                    Ok(out) => {
                        iterator = out.next_shard_iterator().map(str::to_owned);
                        waiting.extend(
                            out.records()
                                .iter()
                                // template.yaml FilterCriteria: `{"eventName": ["INSERT"]}`.
                                .filter(|r| r.event_name().map(|n| n.as_str()) == Some("INSERT"))
                                .map(|r| lambda_record(r, &self.stream_arn)),
                        );
                    }
                    Err(error) => {
                        tracing::warn!(error = %aws_sdk_dynamodbstreams::error::DisplayErrorContext(error), "GetRecords");
                    }
                }
            }
            if waiting.is_empty() {
                poll.tick().await;
                continue;
            }
            let size = waiting.len().min(settings::STREAM_BATCH_SIZE);
            let batch: Vec<Value> = waiting.drain(..size).collect();
            self.deliver(&shard, batch).await;
        }
    }

    /// Invokes the function with `batch` until every record is done or dead-lettered.
    async fn deliver(&self, shard: &str, batch: Vec<Value>) {
        let mut lagged = false;
        let mut work: VecDeque<(Vec<Value>, u32)> = VecDeque::from([(batch, 0)]);
        while let Some((records, retries)) = work.pop_front() {
            let now = chrono::Utc::now().timestamp_millis() as f64 / 1000.0;
            let (records, expired): (Vec<Value>, Vec<Value>) = records
                .into_iter()
                .partition(|r| now - created(r) <= settings::STREAM_MAX_RECORD_AGE.as_secs_f64());
            if !expired.is_empty() {
                self.dead_letter(shard, &expired, "MaximumRecordAgeExceeded")
                    .await;
            }
            if records.is_empty() {
                continue;
            }
            let slot = self.lambda.acquire(FUNCTION, &self.metrics).await;
            if !lagged {
                lagged = true;
                let now = chrono::Utc::now().timestamp_millis() as f64 / 1000.0;
                let mut lags = self.metrics.stream_lag_ms.lock();
                lags.extend(records.iter().map(|r| (now - created(r)) * 1000.0));
            }
            let event = Bytes::from(json!({ "Records": records }).to_string());
            let outcome = self.lambda.invoke(&slot, event).await;
            drop(slot);
            let again = |rest: Vec<Value>| (rest, retries + 1);
            match outcome {
                Ok(answer) => {
                    let answer: Value = serde_json::from_slice(&answer).unwrap_or(Value::Null);
                    let failed: Vec<&str> = answer["batchItemFailures"]
                        .as_array()
                        .map(|f| {
                            f.iter()
                                .filter_map(|f| f["itemIdentifier"].as_str())
                                .collect()
                        })
                        .unwrap_or_default();
                    let Some(from) = records.iter().position(|r| {
                        failed.contains(&r["dynamodb"]["SequenceNumber"].as_str().unwrap_or(""))
                    }) else {
                        continue;
                    };
                    let rest = records[from..].to_vec();
                    if retries >= settings::STREAM_MAX_RETRIES {
                        self.dead_letter(shard, &rest, "RetryAttemptsExhausted")
                            .await;
                    } else {
                        self.metrics.stream_retries.add(1);
                        tokio::time::sleep(RETRY_PAUSE).await;
                        work.push_front(again(rest));
                    }
                }
                Err(InvokeError::Throttled) => {
                    self.metrics.esm_throttled.add(1);
                    tokio::time::sleep(crate::lambda::THROTTLE_PAUSE).await;
                    work.push_front((records, retries));
                }
                Err(error) => {
                    tracing::warn!(%error, records = records.len(), "fan-out invocation failed");
                    if retries >= settings::STREAM_MAX_RETRIES {
                        self.dead_letter(shard, &records, "RetryAttemptsExhausted")
                            .await;
                        continue;
                    }
                    self.metrics.stream_retries.add(1);
                    tokio::time::sleep(RETRY_PAUSE).await;
                    if settings::STREAM_BISECT && records.len() > 1 {
                        let mut first = records;
                        let second = first.split_off(first.len() / 2);
                        work.push_front(again(second));
                        work.push_front(again(first));
                    } else {
                        work.push_front(again(records));
                    }
                }
            }
        }
    }

    /// The OnFailure destination: a `DDBStreamBatchInfo` record in the stream dead-letter queue.
    async fn dead_letter(&self, shard: &str, records: &[Value], condition: &str) {
        self.metrics.stream_dead_letters.add(records.len() as u64);
        let seq = |r: &Value| {
            r["dynamodb"]["SequenceNumber"]
                .as_str()
                .unwrap_or("")
                .to_owned()
        };
        let info = json!({
            "requestContext": {
                "condition": condition,
                "functionArn": format!("arn:aws:lambda:us-east-1:123456789012:function:{FUNCTION}"),
                "approximateInvokeCount": settings::STREAM_MAX_RETRIES + 1,
            },
            "DDBStreamBatchInfo": {
                "shardId": shard,
                "startSequenceNumber": records.first().map(seq),
                "endSequenceNumber": records.last().map(seq),
                "batchSize": records.len(),
                "streamArn": self.stream_arn,
            }
        });
        if let Err(error) = self
            .sqs
            .send_message()
            .queue_url(&self.dead_letter_url)
            .message_body(info.to_string())
            .send()
            .await
        {
            tracing::error!(error = %aws_sdk_sqs::error::DisplayErrorContext(error), "dead letter");
        }
    }
}

/// A record's ApproximateCreationDateTime, epoch seconds.
fn created(record: &Value) -> f64 {
    record["dynamodb"]["ApproximateCreationDateTime"]
        .as_f64()
        .unwrap_or_default()
}

/// One stream record in the shape Lambda delivers it.
fn lambda_record(record: &Record, arn: &str) -> Value {
    let Some(change) = record.dynamodb() else {
        return Value::Null;
    };
    let image = |item: Option<&HashMap<String, AttributeValue>>| {
        item.map(attributes).unwrap_or_else(|| json!({}))
    };
    let mut dynamodb = json!({
        "ApproximateCreationDateTime": change
            .approximate_creation_date_time()
            .map(|t| t.as_secs_f64())
            .unwrap_or_default(),
        "Keys": image(change.keys()),
        "SequenceNumber": change.sequence_number().unwrap_or_default(),
        "SizeBytes": change.size_bytes().unwrap_or(1),
        "StreamViewType": change.stream_view_type().map(|v| v.as_str()).unwrap_or("NEW_IMAGE"),
    });
    if change.new_image().is_some() {
        dynamodb["NewImage"] = image(change.new_image());
    }
    json!({
        "eventID": record.event_id().unwrap_or_default(),
        "eventName": record.event_name().map(|n| n.as_str()).unwrap_or_default(),
        "eventVersion": record.event_version().unwrap_or("1.1"),
        "eventSource": record.event_source().unwrap_or("aws:dynamodb"),
        "awsRegion": record.aws_region().unwrap_or("us-east-1"),
        "dynamodb": dynamodb,
        "eventSourceARN": arn,
    })
}

fn attributes(item: &HashMap<String, AttributeValue>) -> Value {
    Value::Object(
        item.iter()
            .map(|(k, v)| (k.clone(), attribute(v)))
            .collect(),
    )
}

/// An attribute value in DynamoDB's JSON (`{"S": "…"}`), as a stream event carries it.
fn attribute(value: &AttributeValue) -> Value {
    match value {
        AttributeValue::S(s) => json!({ "S": s }),
        AttributeValue::N(n) => json!({ "N": n }),
        AttributeValue::Bool(b) => json!({ "BOOL": b }),
        AttributeValue::Null(_) => json!({ "NULL": true }),
        AttributeValue::Ss(v) => json!({ "SS": v }),
        AttributeValue::Ns(v) => json!({ "NS": v }),
        AttributeValue::B(b) => json!({ "B": aws_smithy_base64(b.as_ref()) }),
        AttributeValue::L(v) => json!({ "L": v.iter().map(attribute).collect::<Vec<_>>() }),
        AttributeValue::M(m) => json!({ "M": attributes(m) }),
        _ => Value::Null,
    }
}

/// Standard base64, for binary attributes (the events table holds none today).
fn aws_smithy_base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}
