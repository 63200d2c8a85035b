//! The fan-out and deliver functions' handlers: thin, over what [`super::Aws`] built. (The route
//! function's handler is [`crate::handlers::Routes::handle`] itself.)
//!
//! They never fail as a whole: what could not be done goes back to Lambda as
//! `batchItemFailures`, so one bad record never makes a whole batch run again (and re-send what
//! was already delivered).

use crate::aws::events::{stream_response, wakes_of};
use crate::aws::queue::{QueuedJob, jobs_of, sqs_response};
use crate::fanout::stream::StreamFanOut;
use crate::fanout::{Delivery, FanOut};
use crate::ports::in_groups;
use aws_lambda_events::event::dynamodb::Event as StreamEvent;
use aws_lambda_events::event::sqs::{SqsBatchResponse, SqsEvent};
use aws_lambda_events::streams::DynamoDbEventResponse;
use bytes::Bytes;
use std::time::Duration;
use tokio::time::Instant;

/// `palaver-fanout`: delivers what a batch of the events table's stream announces, and names
/// the records to hand over again. Posts it let go (a slow connection's) end before it returns.
pub async fn fan_out(
    fanout: &StreamFanOut,
    deadline: Instant,
    event: StreamEvent,
) -> DynamoDbEventResponse {
    let records = event.records.len();
    let report = fanout.handle(wakes_of(event)).await;
    let aborted = fanout.settle(settle_by(deadline)).await;
    tracing::info!(
        records,
        events = report.events,
        delivered = report.delivery.delivered,
        gone = report.delivery.gone.len(),
        failed_posts = report.delivery.failed,
        queued = report.delivery.queued,
        failed_records = report.failed.len(),
        late_posts = report.delivery.late,
        aborted,
        "stream batch handled"
    );
    stream_response(&report)
}

/// `palaver-deliver`: posts each queued job's frames, in order, to its connections; closes the
/// ones found gone.
///
/// A message is handed back to the queue (a batch item failure) when its body is not a
/// delivery job — it lands in the dead-letter queue after `maxReceiveCount` tries, where an
/// operator can read it — or when no post of its first frame succeeded **and the management
/// API itself failed**
/// (throttled past the client's retries, in server trouble, unreachable, refusing the
/// caller): nobody got the frame, and a later try can only help. A post that failed on its own
/// (one slow connection's timeout) never hands a job back: its lane would wait out the
/// visibility timeout for one client. When only some posts failed, the message counts as done:
/// handing it back would post the frame again to everyone who already has it, while the few who
/// missed it see the gap in `seq` and catch up with `joinRoom{after}` or `getHistory` — as
/// after any lost frame.
///
/// The queue is FIFO: the batch's lanes are posted at once, each in order (see
/// [`deliver_lane`]).
pub async fn deliver(fanout: &FanOut, deadline: Instant, event: SqsEvent) -> SqsBatchResponse {
    // The batch's lanes (message groups), each its messages in order. Lanes are independent —
    // a connection is in one lane of its room — so they are posted at once: a batch of ten jobs
    // takes as long as its longest lane, not as all ten one after another.
    let lanes = in_groups(jobs_of(event), |queued| match &queued.job {
        Ok(job) => &job.group,
        // Not a job: a lane of its own.
        Err(_) => &queued.message_id,
    });
    // A job is started only while it can still be finished before the invocation times out;
    // the ones left go back to the queue, unposted. A frame is started only while its posts
    // can still end in time, however long they wait out throttling: an invocation that timed
    // out would have its whole batch tried again, every frame posted twice.
    // (At most a half and a quarter of the time left: an invocation given little, as emulators
    // do, still starts its first jobs.)
    let left = deadline.saturating_duration_since(Instant::now());
    let start_by = deadline
        .checked_sub(FINISH_MARGIN.min(left / 2))
        .unwrap_or(deadline);
    let frames_by = deadline
        .checked_sub(FRAME_MARGIN.min(left / 4))
        .unwrap_or(deadline);
    let lanes = lanes
        .into_iter()
        .map(|lane| deliver_lane(fanout, lane, start_by, frames_by));
    let failed: Vec<String> = futures_util::future::join_all(lanes)
        .await
        .into_iter()
        .flatten()
        .collect();
    // The posts let go (slow connections') end before the invocation does: Lambda would
    // freeze them.
    fanout.settle(settle_by(deadline)).await;
    sqs_response(failed)
}

/// When an invocation stops waiting for the posts it let go: a second before its deadline (at
/// most an eighth of the time left), to answer in time.
fn settle_by(deadline: Instant) -> Instant {
    let left = deadline.saturating_duration_since(Instant::now());
    deadline
        .checked_sub(Duration::from_secs(1).min(left / 8))
        .unwrap_or(deadline)
}

/// How long before its deadline an invocation stops starting jobs (at most half the time it
/// was given): two frames' worth of [`FRAME_MARGIN`], so that a job started just before it
/// usually posts every frame even when the account's bucket is empty.
pub const FINISH_MARGIN: Duration = Duration::from_secs(20);

/// How long before its deadline an invocation stops starting frames (at most a quarter of the
/// time it was given): the longest a frame's posts take — an attempt of up to 1 s, then
/// `retry::THROTTLED_POST`'s 8 s of pauses — and a second to spare. A job's frames left then
/// are missed by its recipients, who see the gap in `seq` and catch up, as after any lost
/// frame; handing the job back would post its first frames twice.
pub const FRAME_MARGIN: Duration = Duration::from_secs(10);

/// One lane's messages, in order; returns the ones to hand back. Once one goes back, every
/// later one of the lane goes back too, unposted, so that no connection gets a later frame
/// before an earlier one (what Lambda asks of partial batch responses on FIFO queues).
async fn deliver_lane(
    fanout: &FanOut,
    lane: Vec<QueuedJob>,
    start_by: Instant,
    frames_by: Instant,
) -> Vec<String> {
    let mut failed = Vec::new();
    for queued in lane {
        if !failed.is_empty() || Instant::now() >= start_by {
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
        let frames = job.frames.len();
        let mut connections = job.connections;
        let mut delivery = Delivery::default();
        for (i, frame) in job.frames.into_iter().enumerate() {
            if i > 0 && Instant::now() >= frames_by {
                tracing::warn!(
                    message = %queued.message_id,
                    unposted = frames - i,
                    "out of time: the job's last frames are left to catch up from history"
                );
                delivery.failed += connections.len() * (frames - i);
                break;
            }
            let posted = fanout.post_to(&connections, Bytes::from(frame)).await;
            if i == 0 && posted.unavailable > 0 && posted.delivered == 0 {
                // Nobody has anything of this job yet: it can go back whole.
                failed.push(queued.message_id.clone());
                delivery.add(posted);
                break;
            }
            // A later frame that the API refused goes the way of any frame some recipients
            // missed: sending the job again would repeat the frames before it to everyone.
            connections.retain(|c| !posted.gone.contains(c));
            delivery.add(posted);
        }
        tracing::info!(
            message = %queued.message_id,
            recipients,
            frames,
            delivered = delivery.delivered,
            gone = delivery.gone.len(),
            failed = delivery.failed,
            late = delivery.late,
            "delivery handled"
        );
    }
    failed
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::ConnectionId;
    use crate::ports::{ConnectionGateway, DeliveryJob, PostError};
    use async_trait::async_trait;
    use aws_lambda_events::event::sqs::SqsMessage;
    use std::sync::Arc;

    /// A management API whose answer depends on the connection: `slow-…` times out at once,
    /// `hangs-…` after the attempt timeout (1 s), `ok-…` takes the post, `lags-…` takes it
    /// after 900 ms, `waits-…` after 5 s (throttled for a while), anything else finds the API
    /// refusing the caller. Posts taken and closes are recorded.
    #[derive(Default)]
    struct Scripted {
        closed: std::sync::Mutex<Vec<String>>,
        /// (connection, frame) of every post taken.
        taken: std::sync::Mutex<Vec<(String, String)>>,
        /// Posts taken ("connection frame") and closes ("closed connection"), in order.
        happened: std::sync::Mutex<Vec<String>>,
    }

    #[async_trait]
    impl ConnectionGateway for Scripted {
        async fn post(&self, connection: &ConnectionId, frame: Bytes) -> Result<(), PostError> {
            let takes_after = |c: &str| match c {
                c if c.starts_with("ok") => Some(Duration::ZERO),
                c if c.starts_with("lags") => Some(Duration::from_millis(900)),
                c if c.starts_with("waits") => Some(Duration::from_secs(5)),
                _ => None,
            };
            match connection.as_str() {
                c if c.starts_with("slow") => {
                    Err(PostError::TimedOut("no answer within 1000 ms".to_owned()))
                }
                c if c.starts_with("hangs") => {
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    Err(PostError::TimedOut("no answer within 1000 ms".to_owned()))
                }
                c => match takes_after(c) {
                    Some(after) => {
                        tokio::time::sleep(after).await;
                        let frame = String::from_utf8_lossy(&frame).into_owned();
                        self.happened.lock().unwrap().push(format!("{c} {frame}"));
                        self.taken.lock().unwrap().push((c.to_owned(), frame));
                        Ok(())
                    }
                    None => Err(PostError::Unavailable("ForbiddenException".to_owned())),
                },
            }
        }

        async fn close(&self, connection: &ConnectionId) -> Result<(), PostError> {
            self.happened
                .lock()
                .unwrap()
                .push(format!("closed {connection}"));
            self.closed.lock().unwrap().push(connection.to_string());
            Ok(())
        }
    }

    fn message(id: &str, connections: &[&str]) -> SqsMessage {
        message_of(id, connections, &["{}"])
    }

    fn message_of(id: &str, connections: &[&str], frames: &[&str]) -> SqsMessage {
        message_in("r#0", id, connections, frames)
    }

    fn message_in(group: &str, id: &str, connections: &[&str], frames: &[&str]) -> SqsMessage {
        let job = DeliveryJob {
            frames: frames.iter().map(|f| f.to_string()).collect(),
            connections: connections.iter().map(|c| ConnectionId::new(*c)).collect(),
            group: group.to_owned(),
            id: id.to_owned(),
        };
        let mut message = SqsMessage::default();
        message.message_id = Some(id.to_owned());
        message.body = Some(serde_json::to_string(&job).unwrap());
        message
    }

    /// A fan-out posting through a [`Scripted`] management API, as the Lambda functions'.
    fn scripted() -> (Arc<Scripted>, FanOut) {
        let store = crate::store::memory::MemoryStore::store();
        let api = Arc::new(Scripted::default());
        let fanout = FanOut::new(&store, api.clone()).letting_stragglers_go();
        (api, fanout)
    }

    /// A deadline as far off as the deliver function's timeout.
    fn soon() -> Instant {
        Instant::now() + Duration::from_secs(30)
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
        let (api, fanout) = scripted();
        let event = |messages: Vec<SqsMessage>| {
            let mut event = SqsEvent::default();
            event.records = messages;
            event
        };
        // One slow client, alone in its job or not: its lane goes on, and it is closed (it
        // reconnects and replays) instead of holding the lane up at every frame.
        let response = deliver(
            &fanout,
            soon(),
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
            soon(),
            event(vec![message("stuck", &["slow-3", "slow-4"])]),
        )
        .await;
        assert_eq!(failed(&response), ["stuck"]);
        assert_eq!(api.closed.lock().unwrap().len(), 2);
        // The API refusing everyone: back to the queue, and what follows it on the FIFO lane.
        let response = deliver(
            &fanout,
            soon(),
            event(vec![
                message("refused", &["x-1", "x-2"]),
                message("next", &["ok-2"]),
            ]),
        )
        .await;
        assert_eq!(failed(&response), ["refused", "next"]);
    }

    #[tokio::test]
    async fn a_job_of_several_frames_posts_them_in_order_to_each_connection() {
        let (api, fanout) = scripted();
        let mut event = SqsEvent::default();
        event.records = vec![
            message_of("run", &["ok-1", "ok-2"], &["m1", "m2", "m3"]),
            // Refused from its first frame: nobody has any of it, so it goes back whole.
            message_of("refused", &["x-1"], &["m4", "m5"]),
        ];
        let response = deliver(&fanout, soon(), event).await;
        assert_eq!(failed(&response), ["refused"]);
        let taken = api.taken.lock().unwrap().clone();
        for c in ["ok-1", "ok-2"] {
            let frames: Vec<&str> = taken
                .iter()
                .filter(|(to, _)| to == c)
                .map(|(_, f)| f.as_str())
                .collect();
            assert_eq!(frames, ["m1", "m2", "m3"], "{c}");
        }
    }

    #[tokio::test]
    async fn a_refused_lane_goes_back_and_the_other_lanes_of_the_batch_are_posted() {
        let (api, fanout) = scripted();
        let mut event = SqsEvent::default();
        event.records = vec![
            message_in("r#0", "refused", &["x-1"], &["m1"]),
            message_in("r#1", "other lane", &["ok-1"], &["m1"]),
            message_in("r#0", "after the refused", &["ok-2"], &["m2"]),
        ];
        let response = deliver(&fanout, soon(), event).await;
        assert_eq!(failed(&response), ["refused", "after the refused"]);
        let taken = api.taken.lock().unwrap().clone();
        assert_eq!(taken, [("ok-1".to_owned(), "m1".to_owned())]);
    }

    #[tokio::test]
    async fn jobs_that_could_not_finish_before_the_timeout_go_back_unposted() {
        let (api, fanout) = scripted();
        let mut event = SqsEvent::default();
        event.records = vec![
            message_in("r#0", "first", &["ok-1"], &["m1"]),
            message_in("r#1", "second", &["ok-2"], &["m1"]),
        ];
        // No time left: nothing can be finished.
        let almost_out = Instant::now();
        let response = deliver(&fanout, almost_out, event).await;
        assert_eq!(failed(&response), ["first", "second"]);
        assert!(api.taken.lock().unwrap().is_empty(), "nothing was posted");
    }

    #[tokio::test(start_paused = true)]
    async fn a_job_stops_starting_frames_when_their_posts_could_outlast_the_invocation() {
        let (api, fanout) = scripted();
        let mut event = SqsEvent::default();
        let frames = ["m1", "m2", "m3", "m4", "m5", "m6", "m7"];
        // Every post waits: the API is throttled for everyone, and each frame waits for all.
        event.records = vec![message_of("run", &["waits-1", "waits-2"], &frames)];
        // 40 s left: each frame's posts wait 5 s for the bucket, so the seventh would start
        // with 10 s left — when a throttled post could still be trying at the deadline.
        let deadline = Instant::now() + Duration::from_secs(40);
        let response = deliver(&fanout, deadline, event).await;
        // Not handed back: its recipients have the first frames, and catch up on the last.
        assert_eq!(failed(&response), Vec::<String>::new());
        let taken = api.taken.lock().unwrap().clone();
        for c in ["waits-1", "waits-2"] {
            let posted: Vec<&str> = taken
                .iter()
                .filter(|(to, _)| to == c)
                .map(|(_, f)| f.as_str())
                .collect();
            assert_eq!(posted, frames[..6], "{c}");
        }
        assert!(Instant::now() < deadline, "done before the deadline");
    }

    /// The frames a connection took, in the order it took them.
    fn taken_by(api: &Scripted, connection: &str) -> Vec<String> {
        let taken = api.taken.lock().unwrap();
        taken
            .iter()
            .filter(|(to, _)| to == connection)
            .map(|(_, frame)| frame.clone())
            .collect()
    }

    /// Where `what` happened among the posts taken and the closes.
    fn when(api: &Scripted, what: &str) -> usize {
        let happened = api.happened.lock().unwrap();
        happened
            .iter()
            .position(|h| h == what)
            .unwrap_or_else(|| panic!("{what} never happened: {happened:?}"))
    }

    #[tokio::test(start_paused = true)]
    async fn a_slow_connection_holds_up_neither_its_job_nor_its_lane_and_gets_its_frames_in_order()
    {
        let (api, fanout) = scripted();
        let mut event = SqsEvent::default();
        event.records = vec![
            message_of("run", &["lags-1", "ok-1"], &["m1", "m2", "m3"]),
            message_of("next", &["ok-2"], &["m4"]),
        ];
        let response = deliver(&fanout, soon(), event).await;
        assert_eq!(failed(&response), Vec::<String>::new());
        // Everyone else had every frame — the lane's next job too — before the slow connection
        // took its first: nobody waited for it.
        assert!(when(&api, "ok-2 m4") < when(&api, "lags-1 m1"));
        assert_eq!(taken_by(&api, "ok-1"), ["m1", "m2", "m3"]);
        // It took every frame, in order, before the invocation returned.
        assert_eq!(taken_by(&api, "lags-1"), ["m1", "m2", "m3"]);
        assert!(api.closed.lock().unwrap().is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn a_connection_that_hangs_is_closed_and_sent_nothing_more_while_its_job_goes_on() {
        let (api, fanout) = scripted();
        let mut event = SqsEvent::default();
        event.records = vec![message_of("run", &["hangs-1", "ok-1"], &["m1", "m2", "m3"])];
        let response = deliver(&fanout, soon(), event).await;
        // Not handed back: ok-1 has every frame, taken before the hanging post timed out.
        assert_eq!(failed(&response), Vec::<String>::new());
        assert_eq!(taken_by(&api, "ok-1"), ["m1", "m2", "m3"]);
        assert!(when(&api, "ok-1 m3") < when(&api, "closed hangs-1"));
        // Closed once, when its first post timed out; its later frames were not posted (it
        // replays them with joinRoom{after} when it reconnects).
        assert_eq!(*api.closed.lock().unwrap(), ["hangs-1"]);
    }

    #[tokio::test(start_paused = true)]
    async fn posts_let_go_that_would_outlast_the_invocation_are_aborted_before_it_ends() {
        let (api, fanout) = scripted();
        let mut event = SqsEvent::default();
        // waits-1 is let go at every frame; its posts, 5 s each, queue up behind each other.
        let frames = ["m1", "m2", "m3", "m4", "m5"];
        event.records = vec![message_of("run", &["waits-1", "ok-1"], &frames)];
        let deadline = Instant::now() + Duration::from_secs(12);
        let response = deliver(&fanout, deadline, event).await;
        assert_eq!(failed(&response), Vec::<String>::new());
        assert_eq!(taken_by(&api, "ok-1"), frames);
        // Two of its five posts end by the deadline; the third is aborted before it does.
        assert_eq!(taken_by(&api, "waits-1"), frames[..2]);
        assert!(Instant::now() < deadline, "done before the deadline");
    }
}
