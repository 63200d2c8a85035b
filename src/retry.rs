//! How long palaver waits before trying again what failed for a passing reason: every retry's
//! numbers, side by side, run by [backon].
//!
//! Each policy is one backon [`ExponentialBuilder`]: pauses that double from a first one up to a
//! cap, for a number of tries or for ever. What differs between them is what the failure is and
//! who waits for the retry:
//!
//! | policy | what failed | who waits |
//! | --- | --- | --- |
//! | [`AWS_CALL`] | an AWS call throttled or in server trouble (entries SQS refused) | one batch: a Lambda invocation |
//! | [`THROTTLED_POST`] | a `postToConnection` throttled or in server trouble | one recipient, and the lane behind its job |
//! | [`FOLLOW`] | a read or a delivery of something followed for as long as the process runs (the local log, a change stream shard) | every room: the follower never gives up |
//! | [`CONTENDED_APPEND`] | an append that lost the race for its seq | the sender, whose message is not in yet |
//!
//! Where a single SDK call is retried and nothing needs sorting first, the SDK's own retries do
//! it; these are for what the SDK cannot judge (a bare 410 that means gone, a batch with some
//! entries refused) or for what is not one call.

use backon::{BackoffBuilder, ExponentialBuilder};
use std::time::Duration;

/// An AWS call throttled or in server trouble: 5 tries, pausing 25–50 ms, 50–100 ms,
/// 100–200 ms, then 200–400 ms (a cap of 1–2 s is never reached in 5 tries): at most about
/// 0.75 s of waiting, well inside a Lambda's timeout, and enough for a throttled account's
/// token bucket to refill.
///
/// Each pause is a random point in the upper half of its doubling step, so that recipients
/// throttled together do not all come back at the same instant. (backon's jitter adds up to the
/// pause again, which is why the steps are given here at half: 25 ms is the 50 ms step's lower
/// half.)
pub const AWS_CALL: ExponentialBuilder = ExponentialBuilder::new()
    .with_min_delay(Duration::from_millis(25))
    .with_max_delay(Duration::from_secs(1))
    .with_jitter()
    .with_max_times(4);

/// A `postToConnection` throttled (429: the account's API Gateway bucket is empty) or in server
/// trouble: pausing from 25–50 ms and doubling up to 0.5–1 s, tried until the pauses would pass
/// 8 s in all. Far longer than [`AWS_CALL`] because a fan-out that runs near the bucket's rate (a
/// big room's frames) meets an empty bucket again and again, and its posts take their turn
/// behind everyone else's: a post that gives up is a frame its recipient misses, while the lane
/// behind it only waits. A bound on the time, not on the tries: how long the bucket stays empty
/// is what decides, and a worker must still finish its job inside its timeout (the deliver
/// handler stops starting frames when a post this long would not end in time). Never taken for
/// gone.
pub const THROTTLED_POST: ExponentialBuilder = ExponentialBuilder::new()
    .with_min_delay(Duration::from_millis(25))
    .with_max_delay(Duration::from_millis(500))
    .with_jitter()
    .without_max_times()
    .with_total_delay(Some(THROTTLED_POST_PATIENCE));

/// The longest a throttled post waits in all before it gives up ([`THROTTLED_POST`]).
pub const THROTTLED_POST_PATIENCE: Duration = Duration::from_secs(8);

/// A failed read or delivery of what palaver follows for as long as it runs — the local log,
/// a change stream's shard: from 100 ms, doubling up to 5 s, for ever. A follower that gave up
/// would stop every room's fan-out, while one that retried at once would flood a store that is
/// struggling; 5 s is how late the first delivery after an outage may come at most.
///
/// No jitter: there is one follower per process (per shard), and nobody to spread out from.
pub const FOLLOW: ExponentialBuilder = ExponentialBuilder::new()
    .with_min_delay(Duration::from_millis(100))
    .with_max_delay(Duration::from_secs(5))
    .without_max_times();

/// An append that lost the race for its seq to another writer of the same room (or raced
/// another change of the same user): 64 tries, pausing 1–2 ms at first and doubling up to
/// 32–64 ms. The winner's write is already done, so the race clears in a round trip; the short
/// pauses keep a busy room's messages in and the jitter keeps the losers from meeting again.
/// 64 tries ride out a room with dozens of writers at once before the append fails as contended.
/// On DynamoDB each pause is at least this and otherwise spread over the lost write's own round
/// trips (`store::dynamodb::log`'s `contended_pause`): racers on many Lambda environments spread
/// out instead of all trying the next seq together.
pub const CONTENDED_APPEND: ExponentialBuilder = ExponentialBuilder::new()
    .with_min_delay(Duration::from_millis(1))
    .with_max_delay(Duration::from_millis(32))
    .with_jitter()
    .with_max_times(63);

/// The pause before the next try after `failures` failures in a row (1 for the first), or
/// `None` when `policy` has given up: for loops that schedule their next try rather than wait
/// for it (the change stream tail reads every shard in one task).
pub fn pause_after(policy: ExponentialBuilder, failures: u32) -> Option<Duration> {
    // Past 64 doublings every policy here is at its cap; this keeps a long outage's count from
    // making each look-up longer.
    let step = failures.clamp(1, 64) - 1;
    policy.build().nth(step as usize)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_throttled_post_keeps_trying_for_eight_seconds_and_no_longer() {
        for _ in 0..100 {
            let pauses: Vec<Duration> = THROTTLED_POST.build().collect();
            let total: Duration = pauses.iter().sum();
            // It stops only when the next pause (at most 1 s) would pass the 8 s.
            assert!(
                total <= THROTTLED_POST_PATIENCE
                    && total + Duration::from_secs(1) > THROTTLED_POST_PATIENCE,
                "{total:?}"
            );
            // Tries keep coming at least once a second once the pauses have grown.
            assert!(pauses.len() >= 12, "{} tries", pauses.len() + 1);
            assert!(
                pauses.iter().all(|p| *p <= Duration::from_secs(1)),
                "{pauses:?}"
            );
            assert!(pauses[0] <= Duration::from_millis(50), "{pauses:?}");
        }
    }

    #[test]
    fn aws_call_pauses_grow_within_the_upper_half_of_each_step_and_run_out() {
        let (first, max) = (Duration::from_millis(50), Duration::from_secs(2));
        for _ in 0..100 {
            let pauses: Vec<Duration> = AWS_CALL.build().collect();
            assert_eq!(pauses.len(), 4, "5 tries: 4 pauses");
            for (attempt, pause) in pauses.into_iter().enumerate() {
                let base = (first * 2u32.pow(attempt as u32)).min(max);
                assert!(
                    pause >= base / 2 && pause <= base,
                    "{attempt}: {pause:?} of {base:?}"
                );
            }
        }
    }

    #[test]
    fn follow_doubles_up_to_a_cap_and_never_gives_up() {
        let waits: Vec<u128> = (1..=10)
            .map(|failures| pause_after(FOLLOW, failures).unwrap().as_millis() / 100)
            .collect();
        assert_eq!(waits[..4], [1, 2, 4, 8]);
        assert_eq!(*waits.last().unwrap(), 50);
        assert_eq!(pause_after(FOLLOW, u32::MAX), Some(Duration::from_secs(5)));
    }

    #[test]
    fn contended_appends_pause_briefly_and_give_up_after_64_tries() {
        let pauses: Vec<Duration> = CONTENDED_APPEND.build().collect();
        assert_eq!(pauses.len(), 63);
        assert!(pauses.iter().all(|p| *p < Duration::from_millis(64)));
        assert!(pauses.iter().sum::<Duration>() < Duration::from_secs(4));
        assert_eq!(pause_after(CONTENDED_APPEND, 64), None);
    }
}
