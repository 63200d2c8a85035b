//! What a run counts, shared by every part of the simulation and read once at the end.

use parking_lot::Mutex;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

/// A counter.
#[derive(Default)]
pub struct Count(AtomicU64);

impl Count {
    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, Relaxed);
    }

    pub fn get(&self) -> u64 {
        self.0.load(Relaxed)
    }
}

#[derive(Default)]
pub struct Metrics {
    /// AWS requests through the counting proxy, by "caller service.Action" (the caller is the
    /// function whose environment made it, or `esm` for the event source mappings).
    pub aws_requests: Mutex<BTreeMap<String, u64>>,
    /// How long moto itself took, by "service.Action": requests, total and longest seconds.
    /// Beside the modelled latency it shows when moto, not the model, sets the pace.
    pub moto_time: Mutex<BTreeMap<String, (u64, f64, f64)>>,
    /// DynamoDB request units, estimated from the requests' and answers' sizes (see proxy.rs).
    pub dynamodb_write_units: Mutex<f64>,
    pub dynamodb_read_units: Mutex<f64>,
    /// SQS requests as billed (empty receives of idle long polls included).
    pub sqs_requests: Count,
    pub secrets_calls: Count,

    /// API Gateway: frames from clients (each a metered message), messages sent to clients
    /// (posts and route answers), connection milliseconds of closed connections.
    pub apigw_inbound: Count,
    pub apigw_outbound: Count,
    pub apigw_connection_minutes: Count,
    /// `@connections` requests: answered 200, 410, 429; inbound frames refused with 429; handshakes refused by
    /// the connect rate.
    pub posts_ok: Count,
    pub posts_gone: Count,
    pub posts_throttled: Count,
    pub frames_throttled: Count,
    pub connects_throttled: Count,
    pub disconnects_lost: Count,
    /// Route invocations Lambda refused (throttle) or that failed.
    pub route_failures: Count,

    /// Stream event source: per record, ApproximateCreationDateTime → first invocation (ms).
    pub stream_lag_ms: Mutex<Vec<f64>>,
    /// Stream batches invoked again (partial failure, function error, bisect), and records sent
    /// to the OnFailure destination.
    pub stream_retries: Count,
    pub stream_dead_letters: Count,
    /// SQS messages handed back (batch item failures or function errors) and so redelivered
    /// after the visibility timeout.
    pub sqs_handed_back: Count,
    /// Invocations an event source mapping could not make because Lambda throttled.
    pub esm_throttled: Count,
}

impl Metrics {
    pub fn count_request(&self, key: String) {
        *self.aws_requests.lock().entry(key).or_default() += 1;
    }
}
