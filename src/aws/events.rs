//! The fan-out function's Lambda event in and answer out: DynamoDB stream records of the events
//! table become [`Wake`]s, and a [`BatchReport`] becomes `batchItemFailures`.
//!
//! Only `INSERT`s announce something: an append is a put of a new item, and nothing ever
//! changes or deletes a log item. Other records are dropped here (moto, for one, emits a
//! `MODIFY` when an identical item is put again; on AWS the event source mapping's filter
//! already keeps only INSERTs).
//!
//! A record is read from its keys alone — `stream` (S) and `seq` (N) — because the table, not
//! the record, is the source of truth: the fan-out reads the log from its checkpoint anyway.
//! Its id is its `SequenceNumber`, which is what Lambda expects back as a failure's
//! `itemIdentifier` (it resumes the shard from the lowest one reported).

use crate::fanout::stream::{BatchReport, Wake};
use aws_lambda_events::event::dynamodb::{Event, EventRecord};
use aws_lambda_events::streams::{DynamoDbBatchItemFailure, DynamoDbEventResponse};
use serde_json::Value;

/// The wakes of a stream event's `INSERT` records, in record order.
pub fn wakes_of(event: Event) -> Vec<Wake> {
    event
        .records
        .into_iter()
        .filter(|record| record.event_name == "INSERT")
        .map(wake_of)
        .collect()
}

fn wake_of(record: EventRecord) -> Wake {
    // Lambda always sends a sequence number; the event id stands in so that a record without
    // one can still be named.
    let id = record
        .change
        .sequence_number
        .clone()
        .unwrap_or_else(|| record.event_id.clone());
    // Read the keys through their JSON form ({"S": "…"}, {"N": "…"}) rather than through
    // serde_dynamo's types, which aws_lambda_events does not re-export.
    let keys = serde_json::to_value(&record.change.keys).unwrap_or(Value::Null);
    Wake::from_keys(
        id,
        keys.pointer("/stream/S").and_then(Value::as_str),
        keys.pointer("/seq/N").and_then(Value::as_str),
    )
}

/// The fan-out's answer: the records Lambda must hand over again.
pub fn stream_response(report: &BatchReport) -> DynamoDbEventResponse {
    let mut response = DynamoDbEventResponse::default();
    response.batch_item_failures = report
        .failed
        .iter()
        .map(|record| {
            let mut failure = DynamoDbBatchItemFailure::default();
            failure.item_identifier = Some(record.clone());
            failure
        })
        .collect();
    response
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{RoomName, Stream};
    use serde_json::json;

    fn record(name: &str, sequence: &str, keys: Value) -> Value {
        json!({
            "eventID": format!("e-{sequence}"),
            "eventName": name,
            "eventVersion": "1.1",
            "eventSource": "aws:dynamodb",
            "awsRegion": "us-east-1",
            "dynamodb": {
                "ApproximateCreationDateTime": 1_700_000_000.0,
                "Keys": keys,
                "SequenceNumber": sequence,
                "SizeBytes": 100,
                "StreamViewType": "NEW_IMAGE"
            },
            "eventSourceARN": "arn:aws:dynamodb:us-east-1:123456789012:table/p-events/stream/2024"
        })
    }

    #[test]
    fn inserts_become_wakes_named_by_their_sequence_number() {
        let event: Event = serde_json::from_value(json!({"Records": [
            record("INSERT", "100", json!({"stream": {"S": "r:general"}, "seq": {"N": "7"}})),
            record("MODIFY", "101", json!({"stream": {"S": "r:general"}, "seq": {"N": "7"}})),
            record("REMOVE", "102", json!({"stream": {"S": "r:general"}, "seq": {"N": "6"}})),
            record("INSERT", "103", json!({"stream": {"S": "nonsense"}, "seq": {"N": "1"}})),
            record("INSERT", "104", json!({"stream": {"S": "r:general"}})),
            record("INSERT", "105", json!({"stream": {"S": "r:general"}, "seq": {"S": "8"}})),
        ]}))
        .unwrap();
        let wakes = wakes_of(event);
        let ids: Vec<&str> = wakes.iter().map(|w| w.record.as_str()).collect();
        assert_eq!(ids, ["100", "103", "104", "105"]);
        assert_eq!(
            wakes[0].target,
            Ok((Stream::Room(RoomName::parse("general").unwrap()), 7))
        );
        assert!(wakes[1..].iter().all(|w| w.target.is_err()), "{wakes:?}");
    }

    #[test]
    fn failures_are_reported_by_item_identifier() {
        let report = BatchReport {
            failed: vec!["103".to_owned(), "104".to_owned()],
            ..BatchReport::default()
        };
        assert_eq!(
            serde_json::to_value(stream_response(&report)).unwrap(),
            json!({"batchItemFailures": [{"itemIdentifier": "103"}, {"itemIdentifier": "104"}]})
        );
        assert_eq!(
            serde_json::to_value(stream_response(&BatchReport::default())).unwrap(),
            json!({"batchItemFailures": []})
        );
    }
}
