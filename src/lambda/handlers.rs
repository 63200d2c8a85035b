//! The fan-out and deliver functions' handlers: thin, over what [`super::Aws`] built. (The route
//! function's handler is [`crate::handlers::Routes::handle`] itself.)
//!
//! They never fail as a whole: what could not be done goes back to Lambda as
//! `batchItemFailures`, so one bad record never makes a whole batch run again (and re-send what
//! was already delivered).

use crate::aws::events::{stream_response, wakes_of};
use crate::aws::queue::{jobs_of, sqs_response};
use crate::fanout::FanOut;
use crate::fanout::stream::StreamFanOut;
use aws_lambda_events::event::dynamodb::Event as StreamEvent;
use aws_lambda_events::event::sqs::{SqsBatchResponse, SqsEvent};
use aws_lambda_events::streams::DynamoDbEventResponse;
use bytes::Bytes;

/// `palaver-fanout`: delivers what a batch of the events table's stream announces, and names
/// the records to hand over again.
pub async fn fan_out(fanout: &StreamFanOut, event: StreamEvent) -> DynamoDbEventResponse {
    let records = event.records.len();
    let report = fanout.handle(wakes_of(event)).await;
    tracing::info!(
        records,
        events = report.events,
        delivered = report.delivery.delivered,
        gone = report.delivery.gone.len(),
        failed_posts = report.delivery.failed,
        queued = report.delivery.queued,
        failed_records = report.failed.len(),
        "stream batch handled"
    );
    stream_response(&report)
}

/// `palaver-deliver`: posts each queued frame to its connections; closes the ones found gone.
///
/// A message is handed back to the queue (a batch item failure) when its body is not a
/// delivery job — it lands in the dead-letter queue after `maxReceiveCount` tries, where an
/// operator can read it — or when no post succeeded **and the management API itself failed**
/// (throttled past the client's retries, in server trouble, unreachable, refusing the
/// caller): nobody got the frame, and a later try can only help. A post that failed on its own
/// (one slow connection's timeout) never hands a job back: its lane would wait out the
/// visibility timeout for one client. When only some posts failed, the message counts as done:
/// handing it back would post the frame again to everyone who already has it, while the few who
/// missed it see the gap in `seq` and catch up with `joinRoom{after}` or `getHistory` — as
/// after any lost frame.
///
/// The queue is FIFO: once a message is handed back, every later message of the batch is handed
/// back too, unposted, so that no connection gets a later frame before an earlier one (this is
/// what Lambda asks of partial batch responses on FIFO queues).
pub async fn deliver(fanout: &FanOut, event: SqsEvent) -> SqsBatchResponse {
    let mut failed = Vec::new();
    for queued in jobs_of(event) {
        if !failed.is_empty() {
            failed.push(queued.message_id);
            continue;
        }
        let job = match queued.job {
            Ok(job) => job,
            Err(why) => {
                tracing::error!(message = %queued.message_id, %why, "undeliverable message");
                failed.push(queued.message_id);
                continue;
            }
        };
        let recipients = job.connections.len();
        let delivery = fanout
            .post_to(&job.connections, Bytes::from(job.frame))
            .await;
        tracing::info!(
            message = %queued.message_id,
            recipients,
            delivered = delivery.delivered,
            gone = delivery.gone.len(),
            failed = delivery.failed,
            "delivery handled"
        );
        if delivery.unavailable > 0 && delivery.delivered == 0 {
            failed.push(queued.message_id);
        }
    }
    sqs_response(failed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::ConnectionId;
    use crate::ports::{ConnectionGateway, DeliveryJob, PostError};
    use async_trait::async_trait;
    use aws_lambda_events::event::sqs::SqsMessage;
    use std::sync::Arc;

    /// A management API whose answer depends on the connection: `slow-…` times out, `ok-…`
    /// takes the post, anything else finds the API refusing the caller. Closes are recorded.
    #[derive(Default)]
    struct Scripted {
        closed: std::sync::Mutex<Vec<String>>,
    }

    #[async_trait]
    impl ConnectionGateway for Scripted {
        async fn post(&self, connection: &ConnectionId, _: Bytes) -> Result<(), PostError> {
            match connection.as_str() {
                c if c.starts_with("slow") => {
                    Err(PostError::TimedOut("no answer within 1000 ms".to_owned()))
                }
                c if c.starts_with("ok") => Ok(()),
                _ => Err(PostError::Unavailable("ForbiddenException".to_owned())),
            }
        }

        async fn close(&self, connection: &ConnectionId) -> Result<(), PostError> {
            self.closed.lock().unwrap().push(connection.to_string());
            Ok(())
        }
    }

    fn message(id: &str, connections: &[&str]) -> SqsMessage {
        let job = DeliveryJob {
            frame: "{}".to_owned(),
            connections: connections.iter().map(|c| ConnectionId::new(*c)).collect(),
            group: "r#0".to_owned(),
            id: id.to_owned(),
        };
        let mut message = SqsMessage::default();
        message.message_id = Some(id.to_owned());
        message.body = Some(serde_json::to_string(&job).unwrap());
        message
    }

    fn failed(response: &SqsBatchResponse) -> Vec<String> {
        response
            .batch_item_failures
            .iter()
            .map(|f| f.item_identifier.clone())
            .collect()
    }

    #[tokio::test]
    async fn a_job_goes_back_only_when_the_management_api_itself_fails() {
        let store = crate::store::memory::MemoryStore::store();
        let api = Arc::new(Scripted::default());
        let fanout = FanOut::new(&store, api.clone());
        let event = |messages: Vec<SqsMessage>| {
            let mut event = SqsEvent::default();
            event.records = messages;
            event
        };
        // One slow client, alone in its job or not: its lane goes on, and it is closed (it
        // reconnects and replays) instead of holding the lane up at every frame.
        let response = deliver(
            &fanout,
            event(vec![
                message("alone", &["slow-1"]),
                message("shared", &["slow-2", "ok-1"]),
            ]),
        )
        .await;
        assert_eq!(failed(&response), Vec::<String>::new());
        assert_eq!(*api.closed.lock().unwrap(), ["slow-1", "slow-2"]);
        // Every post of a job timing out is the API being slow: nobody is closed, and the job
        // goes back to be tried again.
        let response = deliver(
            &fanout,
            event(vec![message("stuck", &["slow-3", "slow-4"])]),
        )
        .await;
        assert_eq!(failed(&response), ["stuck"]);
        assert_eq!(api.closed.lock().unwrap().len(), 2);
        // The API refusing everyone: back to the queue, and what follows it on the FIFO lane.
        let response = deliver(
            &fanout,
            event(vec![
                message("refused", &["x-1", "x-2"]),
                message("next", &["ok-2"]),
            ]),
        )
        .await;
        assert_eq!(failed(&response), ["refused", "next"]);
    }
}
