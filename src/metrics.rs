//! What palaver counts, by name: every metric in one place, so that `GET /metrics` (Prometheus),
//! the Lambda functions' CloudWatch EMF lines and `docs/operating.md` agree.
//!
//! Code counts through the `metrics` facade, as it logs through `tracing`: it knows no exporter.
//! `palaver serve` installs a Prometheus recorder and renders it at `GET /metrics`; the Lambda
//! functions install one that writes Embedded Metric Format lines to their logs. Without a
//! recorder (tests, operator commands) counting costs next to nothing.

/// Gauge: WebSocket connections open on this gateway.
pub const CONNECTIONS_OPEN: &str = "palaver_connections_open";
/// Counter, by `route`: frames clients sent, by the route they were selected for.
pub const FRAMES_IN: &str = "palaver_frames_in_total";
/// Counter: frames written to clients' sockets (answers, room events, replays).
pub const FRAMES_OUT: &str = "palaver_frames_out_total";
/// Counter: events appended to the log.
pub const APPENDS: &str = "palaver_appends_total";
/// Counter: append attempts that lost the race for their seq to another writer of the same
/// room (DynamoDB): how contended rooms' logs are.
pub const APPEND_RACES: &str = "palaver_append_races_total";
/// Histogram: appends per SQLite commit (group commit's batch size).
pub const COMMIT_BATCH: &str = "palaver_commit_batch_size";
/// Gauge: events committed to the log that the fan-out has not delivered yet.
pub const FANOUT_LAG_EVENTS: &str = "palaver_fanout_lag_events";
/// Gauge: age in seconds of the oldest event the fan-out has not delivered yet (0: caught up).
pub const FANOUT_LAG_SECONDS: &str = "palaver_fanout_lag_seconds";
/// Counter: frames the fan-out posted that reached their connection.
pub const DELIVERIES: &str = "palaver_deliveries_total";
/// Counter: connections a post found gone (410), closed in the log.
pub const GONE: &str = "palaver_gone_connections_total";
/// Counter: posts that failed otherwise (the connection may still be there).
pub const FAILED_POSTS: &str = "palaver_failed_posts_total";
/// Counter, by `reason`: frames refused before any route ran (`rate_limited`, `flooding`,
/// `too_big`, `bad_data`, `protocol_error`, `binary`).
pub const FRAMES_REFUSED: &str = "palaver_frames_refused_total";
/// Counter, by `reason`: handshakes refused (`full`, `too_fast`, `bad_request`,
/// `unauthorized`, `too_many_for_user`, `failed`).
pub const HANDSHAKES_REFUSED: &str = "palaver_handshakes_refused_total";
/// Counter: events replayed to clients by `joinRoom{after}`.
pub const REPLAYED: &str = "palaver_replayed_events_total";
/// Counter: connections closed because posts to them timed out while others were answered.
pub const SLOW_CLOSED: &str = "palaver_slow_connections_closed_total";
/// Counter: `postToConnection` attempts answered 429 (the account's API Gateway throttle).
pub const POSTS_THROTTLED: &str = "palaver_posts_throttled_total";

/// Every metric with its help text, for [`describe`] and the docs.
pub const ALL: [(&str, &str); 16] = [
    (
        CONNECTIONS_OPEN,
        "WebSocket connections open on this gateway",
    ),
    (FRAMES_IN, "Frames clients sent, by selected route"),
    (FRAMES_OUT, "Frames written to clients' sockets"),
    (APPENDS, "Events appended to the log"),
    (
        APPEND_RACES,
        "Append attempts that lost their seq to another writer of the room",
    ),
    (COMMIT_BATCH, "Appends per SQLite commit"),
    (
        FANOUT_LAG_EVENTS,
        "Committed events the fan-out has not delivered yet",
    ),
    (
        FANOUT_LAG_SECONDS,
        "Age of the oldest undelivered event, in seconds",
    ),
    (
        DELIVERIES,
        "Frames the fan-out posted that reached their connection",
    ),
    (
        GONE,
        "Connections a post found gone (410), closed in the log",
    ),
    (FAILED_POSTS, "Posts that failed otherwise"),
    (
        FRAMES_REFUSED,
        "Frames refused before any route ran, by reason",
    ),
    (HANDSHAKES_REFUSED, "Handshakes refused, by reason"),
    (REPLAYED, "Events replayed by joinRoom{after}"),
    (
        POSTS_THROTTLED,
        "postToConnection attempts API Gateway answered 429 (throttled), each retried",
    ),
    (
        SLOW_CLOSED,
        "Connections closed because posts to them timed out while others were answered",
    ),
];

/// Gives every metric its help text in the installed recorder.
pub fn describe() {
    for (name, help) in ALL {
        match name {
            CONNECTIONS_OPEN | FANOUT_LAG_EVENTS | FANOUT_LAG_SECONDS => {
                metrics::describe_gauge!(name, help)
            }
            COMMIT_BATCH => metrics::describe_histogram!(name, help),
            _ => metrics::describe_counter!(name, help),
        }
    }
}
