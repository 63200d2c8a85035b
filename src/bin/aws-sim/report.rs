//! Waiting for conditions, measuring moto, and the one JSON line a scenario prints: what the
//! clients saw, what AWS was asked, and what that costs.

use crate::clients::Shared;
use crate::lambda::LambdaService;
use crate::metrics::Metrics;
use crate::prices;
use crate::scenario::Scaled;
use crate::settings::Parameters;
use serde_json::{Map, Value, json};
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

type Error = Box<dyn std::error::Error + Send + Sync>;

/// How often a wait looks at its condition.
const LOOK: Duration = Duration::from_millis(100);

/// Waits until `done` holds or `deadline` passes.
pub async fn wait_until(deadline: Instant, mut done: impl FnMut() -> bool) {
    while !done() && Instant::now() < deadline {
        tokio::time::sleep(LOOK).await;
    }
}

/// Waits until the join storm's frames are out: no fan-out or delivery running and API Gateway
/// quiet for 2 s (longer than the stream's poll interval), or `deadline`.
///
/// Whether it settled before the deadline.
pub async fn settle(metrics: &Metrics, lambda: &LambdaService, deadline: Instant) -> bool {
    let moved =
        || metrics.apigw_outbound.get() + metrics.posts_gone.get() + metrics.posts_throttled.get();
    let busy = || {
        lambda
            .stats()
            .iter()
            .any(|(name, _, s)| *name != "palaver-route" && s.running > 0)
    };
    let mut last = (moved(), Instant::now());
    while Instant::now() < deadline {
        tokio::time::sleep(LOOK).await;
        let now = moved();
        if now != last.0 || busy() {
            last = (now, Instant::now());
        } else if last.1.elapsed() >= Duration::from_secs(2) {
            return true;
        }
    }
    false
}

/// Waits until every acknowledged message has reached every connection of its room, until
/// nothing arrived for `idle`, or until `deadline` (a fan-out that cannot keep up makes
/// progress forever).
pub async fn drain(shared: &Shared, scaled: &Scaled, idle: Duration, deadline: Instant) {
    let heard = || shared.latencies_us.lock().len() + shared.filled.load(Relaxed) as usize;
    let mut last = (heard(), Instant::now());
    let mut done_once = false;
    loop {
        // Users who left for good hear nothing after: each room has fewer members then (at
        // least this many, so the drain never ends early).
        let left = shared.left.lock().len() * scaled.shape.rooms_per_member.min(scaled.rooms);
        let members = scaled.members - (left / scaled.rooms.max(1)).min(scaled.members);
        let expected = shared.acked.load(Relaxed) as usize * members;
        let now = heard();
        // Twice in a row: a client may be sending its last frame as sending stops.
        let done = now >= expected && shared.acked.load(Relaxed) >= shared.sent.load(Relaxed);
        if (done && done_once) || Instant::now() > deadline {
            return;
        }
        done_once = done;
        if now != last.0 {
            last = (now, Instant::now());
        } else if last.1.elapsed() >= idle {
            return;
        }
        tokio::time::sleep(LOOK).await;
    }
}

fn http() -> hyper_util::client::legacy::Client<
    hyper_util::client::legacy::connect::HttpConnector,
    http_body_util::Full<axum::body::Bytes>,
> {
    hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new()).build_http()
}

/// Empties moto (`POST /moto-api/reset`), so each scenario starts on a fresh account.
pub async fn reset_moto(moto: &str) -> Result<(), Error> {
    let request = hyper::Request::post(format!("{}/moto-api/reset", moto.trim_end_matches('/')))
        .body(http_body_util::Full::new(axum::body::Bytes::new()))?;
    let answer = http().request(request).await?;
    if !answer.status().is_success() {
        return Err(format!("moto reset: {}", answer.status()).into());
    }
    Ok(())
}

/// PutItem requests per second moto answers, 8 at a time, for 2 s, straight (no proxy).
pub async fn measure_moto(moto: &str) -> Result<f64, Error> {
    reset_moto(moto).await?;
    let sdk = aws_config::defaults(aws_config::BehaviorVersion::latest())
        .endpoint_url(moto)
        .region(aws_config::Region::new("us-east-1"))
        .credentials_provider(aws_sdk_dynamodb::config::Credentials::new(
            "test", "test", None, None, "sim",
        ))
        .load()
        .await;
    let client = aws_sdk_dynamodb::Client::new(&sdk);
    use aws_sdk_dynamodb::types::*;
    client
        .create_table()
        .table_name("calibration")
        .attribute_definitions(
            AttributeDefinition::builder()
                .attribute_name("pk")
                .attribute_type(ScalarAttributeType::S)
                .build()?,
        )
        .key_schema(
            KeySchemaElement::builder()
                .attribute_name("pk")
                .key_type(KeyType::Hash)
                .build()?,
        )
        .billing_mode(BillingMode::PayPerRequest)
        .send()
        .await?;
    let until = Instant::now() + Duration::from_secs(2);
    let mut tasks = Vec::new();
    for t in 0..8 {
        let client = client.clone();
        tasks.push(tokio::spawn(async move {
            let mut n = 0u64;
            while Instant::now() < until {
                let put = client
                    .put_item()
                    .table_name("calibration")
                    .item("pk", AttributeValue::S(format!("{t}-{n}")))
                    .item("text", AttributeValue::S("x".repeat(64)))
                    .send()
                    .await;
                if put.is_ok() {
                    n += 1;
                }
            }
            n
        }));
    }
    let started = Instant::now();
    let mut total = 0;
    for task in tasks {
        total += task.await?;
    }
    let rps = total as f64 / started.elapsed().as_secs_f64();
    reset_moto(moto).await?;
    Ok(rps)
}

/// The counters at one moment, to report the measured phase alone.
pub struct Snapshot {
    requests: BTreeMap<String, u64>,
    write_units: f64,
    read_units: f64,
    sqs: u64,
    secrets: u64,
    inbound: u64,
    outbound: u64,
    lags: usize,
    posts_throttled: u64,
    frames_throttled: u64,
    connects_throttled: u64,
    posts_gone: u64,
    stream_retries: u64,
    handed_back: u64,
    dead_letters: u64,
    /// Per function: invocations, billed ms.
    lambda: HashMap<&'static str, (u64, u64)>,
}

impl Snapshot {
    pub fn take(metrics: &Metrics, lambda: &LambdaService) -> Snapshot {
        Snapshot {
            requests: metrics.aws_requests.lock().clone(),
            write_units: *metrics.dynamodb_write_units.lock(),
            read_units: *metrics.dynamodb_read_units.lock(),
            sqs: metrics.sqs_requests.get(),
            secrets: metrics.secrets_calls.get(),
            inbound: metrics.apigw_inbound.get(),
            outbound: metrics.apigw_outbound.get(),
            lags: metrics.stream_lag_ms.lock().len(),
            posts_throttled: metrics.posts_throttled.get(),
            frames_throttled: metrics.frames_throttled.get(),
            connects_throttled: metrics.connects_throttled.get(),
            posts_gone: metrics.posts_gone.get(),
            stream_retries: metrics.stream_retries.get(),
            handed_back: metrics.sqs_handed_back.get(),
            dead_letters: metrics.stream_dead_letters.get(),
            lambda: lambda
                .stats()
                .into_iter()
                .map(|(name, _, s)| (name, (s.invocations, s.billed_ms)))
                .collect(),
        }
    }
}

pub struct Run<'a> {
    pub scaled: &'a Scaled,
    pub connections: usize,
    pub joined: usize,
    pub setup_s: f64,
    pub settled: bool,
    pub sending_s: f64,
    pub elapsed_s: f64,
    /// From the measured phase's start to the last message frame heard.
    pub delivering_s: f64,
    /// How long the clients' catch-up from history took at the end.
    pub catch_up_s: f64,
    pub shared: &'a Shared,
    pub metrics: &'a Metrics,
    pub before: &'a Snapshot,
    pub after: &'a Snapshot,
    pub lambda: &'a LambdaService,
    pub deploy_error: Option<String>,
    pub parameters: &'a Parameters,
    pub moto_rps: f64,
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let at = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[at]
}

fn round(x: f64, places: i32) -> f64 {
    let by = 10f64.powi(places);
    (x * by).round() / by
}

/// The scenario's JSON line.
/// What `--check` asks of a line: the stack deployed, every message sent was acknowledged and
/// reached every member of its room once and in order.
pub fn check(line: &str) -> Result<(), String> {
    let line: Value = serde_json::from_str(line).map_err(|e| format!("not JSON: {e}"))?;
    let n = |key: &str| line[key].as_u64().unwrap_or(u64::MAX);
    let mut wrong = Vec::new();
    if !line["deploy_error"].is_null() {
        wrong.push(format!("deploy failed: {}", line["deploy_error"]));
    }
    if n("sent") == 0 || n("acked") < n("sent") {
        wrong.push(format!("{} of {} sent acknowledged", n("acked"), n("sent")));
    }
    if n("delivered") < n("expected") {
        wrong.push(format!("{} of {} delivered", n("delivered"), n("expected")));
    }
    for key in [
        "lost",
        "duplicates",
        "gaps",
        "out_of_order",
        "presence_stale",
    ] {
        if n(key) != 0 {
            wrong.push(format!("{key}: {}", line[key]));
        }
    }
    if wrong.is_empty() {
        Ok(())
    } else {
        Err(wrong.join("; "))
    }
}

pub fn line(run: Run<'_>) -> String {
    let Run {
        scaled,
        before,
        after,
        shared,
        metrics,
        ..
    } = run;
    // What the clients heard.
    let views = shared.views.lock().clone();
    let acked = shared.acked_seqs.lock().clone();
    let mut by_room: HashMap<&str, Vec<&crate::clients::RoomView>> = HashMap::new();
    for view in &views {
        by_room.entry(view.room.as_str()).or_default().push(view);
    }
    let (mut expected, mut delivered, mut lost) = (0u64, 0u64, 0u64);
    for (room, seq) in &acked {
        let members = by_room.get(room.as_str()).map_or(&[][..], Vec::as_slice);
        let mut missed = false;
        for view in members.iter().filter(|v| v.joined_head < *seq) {
            expected += 1;
            if view.messages.contains(seq) {
                delivered += 1;
            } else if !view.filled.contains(seq) {
                missed = true;
            }
        }
        lost += u64::from(missed);
    }
    let mut gaps = 0u64;
    for members in by_room.values() {
        let head = members
            .iter()
            .filter_map(|v| v.seqs.last().max(v.filled.last()).copied())
            .max()
            .unwrap_or(0);
        for view in members {
            gaps += (view.joined_head + 1..=head)
                .filter(|s| !view.has(*s))
                .count() as u64;
        }
    }
    // Presence: every member still there must have heard each user who left for good go
    // offline (its `$disconnect`, or the fan-out's first 410 when that was lost).
    let left = shared.left.lock().clone();
    let mut presence_stale = 0u64;
    for (user, rooms) in &left {
        for room in rooms {
            let members = by_room.get(room.as_str()).map_or(&[][..], Vec::as_slice);
            presence_stale += members
                .iter()
                .filter(|v| v.presence.get(user) != Some(&false))
                .count() as u64;
        }
    }
    let duplicates: u64 = views.iter().map(|v| v.duplicates).sum();
    let out_of_order: u64 = views.iter().map(|v| v.out_of_order).sum();
    let mut latencies: Vec<f64> = shared
        .latencies_us
        .lock()
        .iter()
        .map(|&us| us as f64)
        .collect();
    latencies.sort_by(f64::total_cmp);
    let mut lags: Vec<f64> = metrics.stream_lag_ms.lock()[before.lags..].to_vec();
    lags.sort_by(f64::total_cmp);

    // What AWS was asked, by caller, during the measured phase.
    let mut requests: BTreeMap<String, Map<String, Value>> = BTreeMap::new();
    for (key, n) in &after.requests {
        let n = n - before.requests.get(key).copied().unwrap_or(0);
        if n == 0 {
            continue;
        }
        let (caller, operation) = key.split_once(' ').unwrap_or(("?", key));
        requests
            .entry(caller.to_owned())
            .or_default()
            .insert(operation.to_owned(), json!(n));
    }

    // Cost, at list prices, of the measured phase.
    let messages = (after.inbound - before.inbound) + (after.outbound - before.outbound);
    let connection_minutes = run.connections as f64 * run.elapsed_s / 60.0;
    let apigw = messages as f64 * prices::APIGW_PER_MESSAGE
        + connection_minutes * prices::APIGW_PER_CONNECTION_MINUTE;
    let mut lambda_usd = 0.0;
    // The deliver function's share: it grows with posts (connections), not with messages.
    let mut deliver_usd = 0.0;
    let mut functions = Map::new();
    for (name, spec, stats) in run.lambda.stats() {
        let (invocations0, billed0) = before.lambda.get(name).copied().unwrap_or_default();
        let invocations = stats.invocations - invocations0;
        let billed_ms = stats.billed_ms - billed0;
        let usd = invocations as f64 * prices::LAMBDA_PER_REQUEST
            + billed_ms as f64 / 1000.0
                * (f64::from(spec.memory_mb) / 1024.0)
                * prices::LAMBDA_PER_GB_SECOND;
        lambda_usd += usd;
        if name == "palaver-deliver" {
            deliver_usd = usd;
        }
        let mut colds: Vec<f64> = stats
            .cold_starts
            .iter()
            .map(|d| d.as_secs_f64() * 1000.0)
            .collect();
        colds.sort_by(f64::total_cmp);
        functions.insert(
            name.to_owned(),
            json!({
                "peak_concurrency": stats.peak_concurrency,
                "reserved": spec.reserved,
                "invocations": invocations,
                "billed_ms": billed_ms,
                "errors": stats.errors,
                "timeouts": stats.timeouts,
                "throttles": stats.throttles,
                "environments": stats.environments,
                "cold_start_p50_ms": round(percentile(&colds, 0.5), 1),
                "cold_start_max_ms": round(colds.last().copied().unwrap_or(0.0), 1),
            }),
        );
    }
    let dynamodb_usd = (after.write_units - before.write_units) * prices::DYNAMODB_PER_WRITE_UNIT
        + (after.read_units - before.read_units) * prices::DYNAMODB_PER_READ_UNIT;
    let sqs_usd = (after.sqs - before.sqs) as f64 * prices::SQS_FIFO_PER_REQUEST;
    let secrets_usd = (after.secrets - before.secrets) as f64 * prices::SECRETS_PER_CALL;
    let total = apigw + lambda_usd + dynamodb_usd + sqs_usd + secrets_usd;
    // What the same messages would cost at full size, per API Gateway message: a scale model
    // keeps the messages and divides the connections, so what grows with connections (API
    // Gateway's posts, the deliver function posting them) is as it would be per message, while
    // what is paid per message or per job — appends, audience reads, the route and fan-out
    // functions, queue messages (a room has as many lanes at full size, each job 1 / scale times
    // the connections) — is spread over 1 / scale times the posts at full size.
    let full_size = apigw
        + deliver_usd
        + (lambda_usd - deliver_usd + dynamodb_usd + sqs_usd + secrets_usd) * scaled.scale;
    let per_million = |usd: f64| {
        if messages == 0 {
            0.0
        } else {
            round(usd / messages as f64 * 1e6, 4)
        }
    };

    let mut line = json!({
        "scenario": scaled.shape.name,
        "scale": scaled.scale,
        "rooms": scaled.rooms,
        "room_size": scaled.members,
        "connections": run.connections,
        "joined": run.joined,
        "setup_s": round(run.setup_s, 1),
        "settled": run.settled,
        "sending_s": round(run.sending_s, 1),
        "elapsed_s": round(run.elapsed_s, 1),
        "sent": shared.sent.load(Relaxed),
        "acked": shared.acked.load(Relaxed),
        "delivered": delivered,
        "expected": expected,
        "deliveries_per_s": round(delivered as f64 / run.delivering_s.max(run.sending_s).max(1e-9), 1),
        "p50_us": percentile(&latencies, 0.5) as u64,
        "p99_us": percentile(&latencies, 0.99) as u64,
        "max_us": latencies.last().copied().unwrap_or(0.0) as u64,
        "stream_lag_p50_ms": round(percentile(&lags, 0.5), 1),
        "stream_lag_p99_ms": round(percentile(&lags, 0.99), 1),
        "throttled": after.posts_throttled - before.posts_throttled,
        "frames_throttled": after.frames_throttled - before.frames_throttled,
        "connects_throttled": after.connects_throttled - before.connects_throttled,
        "posts_gone": after.posts_gone - before.posts_gone,
        "retried": (after.stream_retries - before.stream_retries) + (after.handed_back - before.handed_back),
        "stream_batches_retried": after.stream_retries - before.stream_retries,
        "queue_messages_handed_back": after.handed_back - before.handed_back,
        "stream_dead_lettered": after.dead_letters - before.dead_letters,
        "esm_throttled": metrics.esm_throttled.get(),
        "lost": lost,
        "gap_filled": shared.filled.load(Relaxed),
        "catch_up_s": round(run.catch_up_s, 1),
        "gaps": gaps,
        "duplicates": duplicates,
        "out_of_order": out_of_order,
        "error_frames": shared.error_frames.load(Relaxed),
        "frames_heard": shared.frames.lock().clone(),
        "connect_refusals": shared.connect_refusals.load(Relaxed),
        "disconnects_lost": metrics.disconnects_lost.get(),
        "left_for_good": left.len(),
        "presence_stale": presence_stale,
        "functions": functions,
        "aws_requests": requests,
        "moto_ms": metrics
            .moto_time
            .lock()
            .iter()
            .map(|(k, (n, total, max))| {
                let mean = total / (*n).max(1) as f64 * 1000.0;
                (k.clone(), json!({"mean": round(mean, 1), "max": round(max * 1000.0, 1)}))
            })
            .collect::<Map<String, Value>>(),
        "apigw_messages": messages,
        "usd": {
            "apigw": round(apigw, 6),
            "lambda": round(lambda_usd, 6),
            "dynamodb": round(dynamodb_usd, 6),
            "sqs": round(sqs_usd, 6),
            "secretsmanager": round(secrets_usd, 6),
        },
        "usd_per_million_messages": per_million(total),
        "apigw_usd_per_million_messages": per_million(apigw),
        "cost_over_apigw": if apigw > 0.0 { round(total / apigw, 3) } else { 0.0 },
        "cost_over_apigw_at_full_size": if apigw > 0.0 { round(full_size / apigw, 3) } else { 0.0 },
        "account": {
            "apigw_rate": scaled.account.apigw_rate,
            "apigw_burst": scaled.account.apigw_burst,
            "connect_rate": scaled.account.connect_rate,
            "lambda_concurrency": scaled.account.lambda_concurrency,
        },
        "parameters": {
            "RouteConcurrency": run.parameters.route_concurrency,
            "DeliverMaxConcurrency": run.parameters.deliver_max_concurrency,
            "FanOutShardThreshold": run.parameters.shard_threshold,
            "FanOutShardSize": run.parameters.shard_size,
        },
        "deploy_error": run.deploy_error,
        "moto_putitem_per_s": round(run.moto_rps, 0),
    });
    line["targets"] = targets(&line, scaled);
    line.to_string()
}

/// Issue #20's targets for the scenario, each met or not, from its line. (`slowclient`'s
/// latency against `slowclient-baseline` is across two lines: compared by whoever reads both.)
fn targets(line: &Value, scaled: &Scaled) -> Value {
    let n = |key: &str| line[key].as_f64().unwrap_or(f64::NAN);
    let shape = &scaled.shape;
    let mut met = Map::new();
    met.insert("deploys".into(), json!(line["deploy_error"].is_null()));
    met.insert(
        "every_message_acked".into(),
        json!(n("sent") > 0.0 && n("acked") >= n("sent")),
    );
    // Once and in order, live or (after a gap) from history: what a client ends with.
    met.insert(
        "every_seq_once_in_order".into(),
        json!(
            n("lost") == 0.0
                && n("gaps") == 0.0
                && n("duplicates") == 0.0
                && n("out_of_order") == 0.0
        ),
    );
    if shape.storm {
        met.insert(
            "stream_lag_p99_le_2s".into(),
            json!(n("stream_lag_p99_ms") <= 2_000.0),
        );
    } else {
        met.insert(
            "every_delivery_live".into(),
            json!(n("delivered") >= n("expected")),
        );
        met.insert("p99_le_2s".into(), json!(n("p99_us") <= 2_000_000.0));
        // What the senders offer a second, delivered a second (the bigroom shapes offer 0.9 of
        // the bucket).
        let offered = n("expected") / n("sending_s").max(1e-9);
        met.insert(
            "keeps_pace".into(),
            json!(n("deliveries_per_s") >= 0.95 * offered.min(scaled.account.apigw_rate)),
        );
    }
    if shape.leave_share > 0.0 {
        met.insert(
            "presence_converges".into(),
            json!(n("presence_stale") == 0.0),
        );
    }
    if scaled.members >= 10 {
        met.insert(
            "cost_le_1_3x_apigw".into(),
            json!(n("cost_over_apigw_at_full_size") <= 1.3),
        );
    }
    Value::Object(met)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn check_passes_a_clean_run_and_names_what_went_wrong() {
        let clean = json!({"deploy_error": null, "sent": 7, "acked": 7, "delivered": 42,
            "expected": 42, "lost": 0, "duplicates": 0, "gaps": 0, "out_of_order": 0,
            "presence_stale": 0});
        assert_eq!(check(&clean.to_string()), Ok(()));
        let mut lossy = clean.clone();
        lossy["delivered"] = json!(41);
        lossy["lost"] = json!(1);
        let why = check(&lossy.to_string()).unwrap_err();
        assert!(
            why.contains("41 of 42 delivered") && why.contains("lost: 1"),
            "{why}"
        );
        let mut silent = clean;
        silent["sent"] = json!(0);
        assert!(
            check(&silent.to_string()).is_err(),
            "a run that sent nothing proves nothing"
        );
    }
}
