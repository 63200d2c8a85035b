//! The counting proxy in front of moto: every AWS request of the functions and of the event
//! source mappings goes through it (their `AWS_ENDPOINT_URL`). It counts requests by caller,
//! service and action, estimates DynamoDB request units for the bill, and gives each DynamoDB
//! request the latency AWS measured (moto answers in well under a millisecond when idle, and
//! much later when loaded: the answer goes back at the drawn latency or when moto has answered,
//! whichever is later, so an overloaded moto shows instead of hiding).
//!
//! One listener per caller, so each request is known by who made it without looking inside.

use crate::latency::Latency;
use crate::metrics::Metrics;
use crate::settings;
use axum::body::{Body, Bytes, to_bytes};
use axum::extract::{Request, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use http_body_util::Full;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde_json::Value;
use std::sync::Arc;
use tokio::net::TcpListener;
use tokio::sync::Notify;

/// Where everything goes on.
#[derive(Clone)]
pub struct Upstream {
    pub moto: String,
    client: Client<HttpConnector, Full<Bytes>>,
    pub metrics: Arc<Metrics>,
    /// Woken when a message is sent to SQS: the SQS event source's long polls return then.
    pub sqs_sent: Arc<Notify>,
    item_latency: Latency,
    transact_latency: Latency,
}

#[derive(Clone)]
struct Caller {
    upstream: Upstream,
    name: &'static str,
}

impl Upstream {
    pub fn new(moto: &str, metrics: Arc<Metrics>) -> Upstream {
        Upstream {
            moto: moto.trim_end_matches('/').to_owned(),
            client: Client::builder(TokioExecutor::new()).build_http(),
            metrics,
            sqs_sent: Arc::new(Notify::new()),
            item_latency: Latency::new(settings::DYNAMODB_ITEM_P50, settings::DYNAMODB_ITEM_P99),
            transact_latency: Latency::new(
                settings::DYNAMODB_TRANSACT_P50,
                settings::DYNAMODB_TRANSACT_P99,
            ),
        }
    }

    /// Starts a listener for `caller`; returns its URL (for `AWS_ENDPOINT_URL`).
    pub async fn listen(&self, caller: &'static str) -> std::io::Result<String> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let url = format!("http://{}", listener.local_addr()?);
        let app = axum::Router::new().fallback(forward).with_state(Caller {
            upstream: self.clone(),
            name: caller,
        });
        tokio::spawn(async move { axum::serve(listener, app).await });
        Ok(url)
    }
}

/// The service and action of a request: the JSON protocols name them in `X-Amz-Target`
/// (`DynamoDB_20120810.PutItem`, `AmazonSQS.SendMessageBatch`), the query protocol in `Action=`.
fn operation(headers: &HeaderMap, body: &[u8]) -> (&'static str, String) {
    if let Some(target) = headers.get("x-amz-target").and_then(|t| t.to_str().ok()) {
        let (prefix, action) = target.split_once('.').unwrap_or((target, ""));
        let service = match prefix {
            "DynamoDB_20120810" => "dynamodb",
            "DynamoDBStreams_20120810" => "dynamodbstreams",
            "AmazonSQS" => "sqs",
            "secretsmanager" => "secretsmanager",
            _ => "other",
        };
        return (service, action.to_owned());
    }
    let form = String::from_utf8_lossy(body);
    let action = form
        .split('&')
        .find_map(|pair| pair.strip_prefix("Action="))
        .unwrap_or("unknown")
        .to_owned();
    ("sqs", action)
}

async fn forward(State(caller): State<Caller>, request: Request) -> Response {
    let started = tokio::time::Instant::now();
    let (parts, body) = request.into_parts();
    let Ok(body) = to_bytes(body, 64 * 1024 * 1024).await else {
        return StatusCode::BAD_REQUEST.into_response();
    };
    let (service, action) = operation(&parts.headers, &body);
    let upstream = &caller.upstream;
    upstream
        .metrics
        .count_request(format!("{} {service}.{action}", caller.name));
    let latency = match (service, action.as_str()) {
        ("dynamodb", "TransactWriteItems" | "TransactGetItems") => {
            Some(upstream.transact_latency.sample())
        }
        ("dynamodb", _) => Some(upstream.item_latency.sample()),
        _ => None,
    };
    let path = parts
        .uri
        .path_and_query()
        .map_or("/", |pq| pq.as_str())
        .to_owned();
    let mut outgoing = hyper::Request::builder()
        .method(parts.method.clone())
        .uri(format!("{}{path}", upstream.moto));
    for (name, value) in &parts.headers {
        if name != "host" {
            outgoing = outgoing.header(name, value);
        }
    }
    let Ok(outgoing) = outgoing.body(Full::new(body.clone())) else {
        return StatusCode::BAD_REQUEST.into_response();
    };
    let answer = match upstream.client.request(outgoing).await {
        Ok(answer) => answer,
        Err(error) => {
            tracing::warn!(%error, "moto did not answer");
            return StatusCode::BAD_GATEWAY.into_response();
        }
    };
    let (answer_parts, answer_body) = answer.into_parts();
    let Ok(answer_body) = to_bytes(Body::new(answer_body), 256 * 1024 * 1024).await else {
        return StatusCode::BAD_GATEWAY.into_response();
    };
    let took = started.elapsed().as_secs_f64();
    {
        let mut times = upstream.metrics.moto_time.lock();
        let entry = times.entry(format!("{service}.{action}")).or_default();
        entry.0 += 1;
        entry.1 += took;
        entry.2 = entry.2.max(took);
    }
    account(
        upstream,
        service,
        &action,
        &body,
        &answer_body,
        answer_parts.status,
    );
    if let Some(latency) = latency {
        tokio::time::sleep_until(started + latency).await;
    }
    Response::from_parts(answer_parts, Body::from(answer_body))
}

/// What a request costs: DynamoDB request units (estimated), SQS and Secrets Manager requests;
/// wakes the SQS event source on a send.
///
/// Request units are estimated from sizes, as DynamoDB bills them: a write unit per KB written
/// (the request's JSON stands for the item), two per item of a transaction; a read unit per
/// 4 KB read (the answer's JSON stands for the items), half of one when eventually consistent.
fn account(
    upstream: &Upstream,
    service: &str,
    action: &str,
    body: &[u8],
    answer: &[u8],
    status: StatusCode,
) {
    let metrics = &upstream.metrics;
    let kb = |bytes: usize| (bytes as f64 / 1024.0).ceil().max(1.0);
    let read = |bytes: usize, consistent: bool| {
        (bytes as f64 / 4096.0).ceil().max(1.0) * if consistent { 1.0 } else { 0.5 }
    };
    match service {
        "dynamodb" => {
            let request: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
            let consistent = request["ConsistentRead"].as_bool().unwrap_or(false);
            match action {
                "PutItem" | "UpdateItem" | "DeleteItem" => {
                    *metrics.dynamodb_write_units.lock() += kb(body.len());
                }
                "TransactWriteItems" => {
                    let items = request["TransactItems"].as_array().map_or(1, Vec::len);
                    let per_item = kb(body.len() / items.max(1));
                    *metrics.dynamodb_write_units.lock() += 2.0 * per_item * items as f64;
                }
                "BatchWriteItem" => {
                    *metrics.dynamodb_write_units.lock() += kb(body.len());
                }
                "GetItem" | "Query" | "Scan" | "BatchGetItem" => {
                    *metrics.dynamodb_read_units.lock() += read(answer.len(), consistent);
                }
                "TransactGetItems" => {
                    *metrics.dynamodb_read_units.lock() += 2.0 * read(answer.len(), true);
                }
                _ => {}
            }
        }
        "sqs" => {
            metrics.sqs_requests.add(1);
            if status.is_success() && matches!(action, "SendMessage" | "SendMessageBatch") {
                // A waiting long poll returns with what arrived, up to 10 messages (a FIFO
                // receive takes a group's together, then the next group's): wake one poller per
                // 10 messages sent. SQS's waiting polls cost nothing until something arrives;
                // here each wake is a receive, and one per message or per group made most of
                // them empty and slowed moto — so DynamoDB — for everyone.
                let request: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
                let messages = request["Entries"].as_array().map_or(1, Vec::len);
                for _ in 0..messages.div_ceil(settings::SQS_BATCH_SIZE as usize) {
                    upstream.sqs_sent.notify_one();
                }
            }
        }
        "secretsmanager" => metrics.secrets_calls.add(1),
        _ => {}
    }
}
