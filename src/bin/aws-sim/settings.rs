//! Every number the simulation models, with AWS's documented default and where it comes from.
//!
//! Sources are rows of `../shared/AWS-LIMITS.md` (quoted as "LIMITS: section, row"), which cites
//! AWS's developer guides; `template.yaml` for what the stack itself sets. A number changes only
//! with a source. [`Account::scaled`] is the scale model: the account's quotas divided by the
//! same factor as the scenario's connections and rates, latencies unchanged.

use std::time::Duration;

/// API Gateway's account throttle, steady rate (requests/s). Every `postToConnection` and every
/// inbound frame draws from it. LIMITS: API Gateway, "account throttle" (Q).
pub const APIGW_ACCOUNT_RATE: f64 = 10_000.0;
/// API Gateway's account throttle, burst (the bucket's size). LIMITS: same row.
pub const APIGW_ACCOUNT_BURST: f64 = 5_000.0;
/// New WebSocket connections per second per account and region; the bucket holds one second's
/// worth (AWS documents no separate burst). LIMITS: API Gateway, "new connections" (Q).
pub const APIGW_CONNECT_RATE: f64 = 500.0;
/// The stage's default route throttle, steady and burst: template.yaml, `Stage`,
/// `DefaultRouteSettings` (ThrottlingRateLimit 1000, ThrottlingBurstLimit 500).
pub const STAGE_ROUTE_RATE: f64 = 1_000.0;
pub const STAGE_ROUTE_BURST: f64 = 500.0;
/// A WebSocket frame is at most 32 KB, a message (and `PostToConnection` data) 128 KB.
/// LIMITS: API Gateway, "frame / message" (H).
pub const APIGW_MAX_FRAME: usize = 32 * 1024;
pub const APIGW_MAX_MESSAGE: usize = 128 * 1024;
/// An idle connection is closed after 10 minutes. LIMITS: API Gateway, "connection lifetime /
/// idle timeout" (H).
pub const APIGW_IDLE_TIMEOUT: Duration = Duration::from_secs(10 * 60);
pub const APIGW_CONNECTION_LIFETIME: Duration = Duration::from_secs(2 * 60 * 60);
/// The route integration's timeout: template.yaml `RouteFunction.Timeout` (29 s), which is also
/// API Gateway's maximum. LIMITS: API Gateway, "integration timeout" (H).
pub const APIGW_INTEGRATION_TIMEOUT: Duration = Duration::from_secs(29);
/// `postToConnection` latency, p50 and p99. No public figure: LIMITS, "What the simulation must
/// model" 7 says to assume p50 10 ms, p99 50 ms unless measured.
pub const POST_LATENCY_P50: Duration = Duration::from_millis(10);
pub const POST_LATENCY_P99: Duration = Duration::from_millis(50);
/// How long the management API holds a post to a connection whose client does not read (the
/// `slowclient` scenario) before answering 504. No AWS figure: it only has to be longer than a
/// post attempt's timeout in the function (5 s, src/aws/management.rs), so that the post times
/// out as the scenario says.
pub const SLOW_CLIENT_POST_HOLD: Duration = Duration::from_secs(10);

/// Lambda concurrency per account and region. LIMITS: Lambda, "account concurrency" (Q).
pub const LAMBDA_ACCOUNT_CONCURRENCY: usize = 1_000;
/// A new account's concurrency (10 and 50 are seen). LIMITS: same row.
pub const LAMBDA_NEW_ACCOUNT_CONCURRENCY: usize = 10;
/// At least this much concurrency must stay unreserved, or a reservation is refused (for an
/// account whose limit is lower, the whole limit). LIMITS: Lambda, "unreserved floor" (H).
pub const LAMBDA_UNRESERVED_FLOOR: usize = 100;
/// New execution environments per function: 1,000 per 10 s. LIMITS: Lambda, "scaling" (H).
pub const LAMBDA_SCALING_BURST: f64 = 1_000.0;
pub const LAMBDA_SCALING_RATE: f64 = 100.0;

/// The init phase of a new environment (the function's `main` up to its first request for an
/// event) may take at most 10 s. Source: AWS Lambda developer guide, "Lambda execution
/// environment lifecycle" (not in AWS-LIMITS.md).
pub const INIT_TIMEOUT: Duration = Duration::from_secs(10);

/// DynamoDB stream event source: one batch per shard at a time (ParallelizationFactor 1),
/// each shard polled 4 times a second. LIMITS: Lambda, "DynamoDB stream source" (H).
pub const STREAM_POLL_INTERVAL: Duration = Duration::from_millis(250);
/// GetRecords returns at most 1,000 records. LIMITS: DynamoDB, "stream" (H).
pub const STREAM_GET_RECORDS_LIMIT: i32 = 1_000;
/// template.yaml, `FanOutFunction.Events.EventsStream`: BatchSize 100,
/// MaximumBatchingWindowInSeconds 0, BisectBatchOnFunctionError true, MaximumRetryAttempts 5,
/// MaximumRecordAgeInSeconds 3600, ReportBatchItemFailures, filter `eventName: INSERT`.
pub const STREAM_BATCH_SIZE: usize = 100;
pub const STREAM_BISECT: bool = true;
pub const STREAM_MAX_RETRIES: u32 = 5;
pub const STREAM_MAX_RECORD_AGE: Duration = Duration::from_secs(3_600);

/// SQS event source: at most 10 messages per batch. LIMITS: Lambda, "SQS FIFO source" (H);
/// template.yaml `DeliverFunction.Events.DeliveryQueue.BatchSize` is 10.
pub const SQS_BATCH_SIZE: i32 = 10;
/// template.yaml `DeliveryQueue.VisibilityTimeout`.
pub const SQS_VISIBILITY_TIMEOUT: Duration = Duration::from_secs(180);
/// A long poll's longest wait (SQS's WaitTimeSeconds maximum, 20 s): an idle poller asks again
/// at least this often. The simulation ends the wait early when a message is sent (as a long
/// poll would return), so moto never has to hold a request open.
pub const SQS_LONG_POLL: Duration = Duration::from_secs(20);

/// DynamoDB latency of single-item requests (PutItem's measured p50/p99 are used for GetItem,
/// Query, UpdateItem and DeleteItem too: AWS publishes no others). LIMITS: DynamoDB, "latency"
/// (M).
pub const DYNAMODB_ITEM_P50: Duration = Duration::from_micros(7_600);
pub const DYNAMODB_ITEM_P99: Duration = Duration::from_millis(16);
/// TransactWriteItems (5 items). LIMITS: same row.
pub const DYNAMODB_TRANSACT_P50: Duration = Duration::from_millis(25);
pub const DYNAMODB_TRANSACT_P99: Duration = Duration::from_millis(93);

/// The functions as template.yaml deploys them: memory (MB) and timeout.
pub const ROUTE_MEMORY_MB: u32 = 256; // Globals.Function.MemorySize
pub const ROUTE_TIMEOUT: Duration = Duration::from_secs(29);
pub const FANOUT_MEMORY_MB: u32 = 1_024;
pub const FANOUT_TIMEOUT: Duration = Duration::from_secs(60);
pub const DELIVER_MEMORY_MB: u32 = 1_024;
pub const DELIVER_TIMEOUT: Duration = Duration::from_secs(30);
/// template.yaml parameters' defaults: RouteConcurrency 0 (reserved concurrency; 0 leaves the
/// route function unreserved), DeliverMaxConcurrency 20 (the delivery queue trigger's
/// `ScalingConfig.MaximumConcurrency`, 2–1,000: no reservation), FanOutShardThreshold 200,
/// FanOutShardSize 100.
pub const DEFAULT_ROUTE_CONCURRENCY: usize = 0;
pub const DEFAULT_DELIVER_MAX_CONCURRENCY: usize = 20;
pub const DEFAULT_SHARD_THRESHOLD: usize = 200;
pub const DEFAULT_SHARD_SIZE: usize = 100;

/// The account's quotas, after scaling.
#[derive(Clone, Debug)]
pub struct Account {
    pub apigw_rate: f64,
    pub apigw_burst: f64,
    pub connect_rate: f64,
    pub stage_route_rate: f64,
    pub stage_route_burst: f64,
    pub lambda_concurrency: usize,
    pub lambda_unreserved_floor: usize,
    pub lambda_scaling_rate: f64,
    pub lambda_scaling_burst: f64,
}

impl Account {
    /// An account with AWS's default quotas and `lambda_concurrency`.
    pub fn with_concurrency(lambda_concurrency: usize) -> Account {
        Account {
            apigw_rate: APIGW_ACCOUNT_RATE,
            apigw_burst: APIGW_ACCOUNT_BURST,
            connect_rate: APIGW_CONNECT_RATE,
            stage_route_rate: STAGE_ROUTE_RATE,
            stage_route_burst: STAGE_ROUTE_BURST,
            lambda_concurrency,
            lambda_unreserved_floor: LAMBDA_UNRESERVED_FLOOR.min(lambda_concurrency),
            lambda_scaling_rate: LAMBDA_SCALING_RATE,
            lambda_scaling_burst: LAMBDA_SCALING_BURST,
        }
    }

    /// The scale model: API Gateway's quotas — what bounds posts, frames and connects, which
    /// all grow with the number of connections — multiplied by `scale` (never below one).
    /// Lambda's are not: with the big-room threshold and the job size scaled as room sizes are
    /// ([`Parameters::scaled`]), a scaled room makes as many invocations, jobs and queue
    /// messages per event as its full size would, and needs as many environments to carry them
    /// (scaling Lambda too would cut the deliver function's capacity by `scale` twice over).
    /// Latencies are not scaled.
    pub fn scaled(&self, scale: f64) -> Account {
        let by = |x: f64| (x * scale).max(1.0);
        Account {
            apigw_rate: by(self.apigw_rate),
            apigw_burst: by(self.apigw_burst),
            connect_rate: by(self.connect_rate),
            stage_route_rate: by(self.stage_route_rate),
            stage_route_burst: by(self.stage_route_burst),
            ..self.clone()
        }
    }
}

/// What the stack's parameters are set to (template.yaml `Parameters`).
#[derive(Clone, Debug)]
pub struct Parameters {
    pub route_concurrency: usize,
    /// The delivery queue trigger's `ScalingConfig.MaximumConcurrency`.
    pub deliver_max_concurrency: usize,
    pub shard_threshold: usize,
    pub shard_size: usize,
}

impl Default for Parameters {
    fn default() -> Parameters {
        Parameters {
            route_concurrency: DEFAULT_ROUTE_CONCURRENCY,
            deliver_max_concurrency: DEFAULT_DELIVER_MAX_CONCURRENCY,
            shard_threshold: DEFAULT_SHARD_THRESHOLD,
            shard_size: DEFAULT_SHARD_SIZE,
        }
    }
}

impl Parameters {
    /// The big-room threshold and the job size scaled as room sizes are, so that a scaled room
    /// takes the path (direct posts or the delivery queue) and makes the number of jobs its full
    /// size would; concurrency settings kept, as [`Account::scaled`] keeps Lambda's.
    pub fn scaled(&self, scale: f64) -> Parameters {
        let by = |n: usize| ((n as f64 * scale).round() as usize).max(1);
        Parameters {
            shard_threshold: by(self.shard_threshold),
            shard_size: by(self.shard_size),
            ..self.clone()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A parameter's `Default:` in template.yaml.
    fn template_default(name: &str) -> usize {
        let template = include_str!("../../../template.yaml");
        let mut lines = template
            .lines()
            .skip_while(|line| line.trim_end() != format!("  {name}:"));
        assert!(lines.next().is_some(), "{name} is not a template parameter");
        lines
            .take_while(|line| line.starts_with("    "))
            .find_map(|line| line.trim().strip_prefix("Default:"))
            .and_then(|value| value.trim().parse().ok())
            .unwrap_or_else(|| panic!("{name} has no numeric Default"))
    }

    /// What the simulation deploys is what template.yaml deploys: its defaults, read from it.
    #[test]
    fn the_defaults_are_the_templates() {
        let defaults = Parameters::default();
        assert_eq!(
            defaults.route_concurrency,
            template_default("RouteConcurrency")
        );
        assert_eq!(
            defaults.deliver_max_concurrency,
            template_default("DeliverMaxConcurrency")
        );
        assert_eq!(
            defaults.shard_threshold,
            template_default("FanOutShardThreshold")
        );
        assert_eq!(defaults.shard_size, template_default("FanOutShardSize"));
    }
}
