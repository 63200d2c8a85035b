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
/// operator can read it — or when **every** post failed for a reason other than gone: then the
/// management API itself is in trouble (an outage, a missing permission), nobody got the
/// frame, and a later try can only help. When only some posts failed (after the management
/// client's own retries), the message counts as done: handing it back would post the frame
/// again to everyone who already has it, while the few who missed it see the gap in `seq` and
/// catch up with `joinRoom{after}` or `getHistory` — as after any lost frame.
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
        if delivery.failed > 0 && delivery.delivered == 0 {
            failed.push(queued.message_id);
        }
    }
    sqs_response(failed)
}
