//! API Gateway: the WebSocket API's stage (`ws://…/prod`) and its `@connections` management API
//! (`http://…/prod/@connections/{id}`), as template.yaml configures them.
//!
//! - **`$connect`**: a handshake first draws from the account's new-connection bucket (500/s)
//!   and its request bucket; the connection is PENDING while the route function runs `$connect`
//!   (posts to it answer 410, as on AWS), and opens only when the function answers 200. Any
//!   other status refuses the handshake with that status.
//! - **Frames**: each one is a metered message and draws a token from the account's bucket and
//!   from its route's stage throttle; it is routed by its `action`
//!   (`RouteSelectionExpression: $request.body.action`) to `joinRoom`, `leaveRoom`,
//!   `sendMessage`, `getHistory` or `$default` — the route function, whose answer body goes back
//!   to the client — or to `ping`, a MOCK integration that answers `{"type":"pong"}` without a
//!   function. Frames of one connection are handled concurrently, as API Gateway invokes each
//!   integration on its own.
//! - **`$disconnect`**: when a connection closes, a settable share of `$disconnect`s never
//!   arrives (API Gateway's is best effort).
//! - **`@connections`**: POST delivers the body as one text frame, after a latency drawn from
//!   the `postToConnection` distribution; GET describes; DELETE closes. Each call draws from
//!   the account's bucket: empty answers 429 `LimitExceededException`; an unknown, pending or
//!   closed connection 410 `GoneException`, with the error type in `x-amzn-ErrorType` as AWS
//!   sends it.
//! - Idle connections close after 10 minutes, every connection after 2 hours.

use crate::bucket::Bucket;
use crate::lambda::{InvokeError, LambdaService};
use crate::latency::Latency;
use crate::metrics::Metrics;
use crate::settings::{self, Account};
use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, Query, Request, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get};
use chrono::{DateTime, Utc};
use futures_util::{SinkExt, StreamExt};
use parking_lot::Mutex;
use serde_json::{Value, json};
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, Role, WebSocketConfig};

type WebSocket = WebSocketStream<hyper_util::rt::TokioIo<hyper::upgrade::Upgraded>>;

/// A header the simulation's own clients set to play a client that never reads: posts to its
/// connection hang (the `slowclient` scenario). No part of API Gateway.
pub const SLOW_CLIENT_HEADER: &str = "x-sim-slow-client";
const STAGE: &str = "prod";
const API_ID: &str = "simapi0001";
/// The two-way routes template.yaml defines, besides `$default` and `ping`.
const ROUTES: [&str; 4] = ["joinRoom", "leaveRoom", "sendMessage", "getHistory"];
/// The route function's name in the Lambda service.
const ROUTE_FUNCTION: &str = "palaver-route";

#[derive(Clone, Copy, PartialEq, Eq)]
enum Phase {
    Pending,
    Open,
    Closed,
}

enum Out {
    Text(String),
    Close,
}

struct Connection {
    id: String,
    phase: Mutex<Phase>,
    out: mpsc::UnboundedSender<Out>,
    connected_at: DateTime<Utc>,
    opened: Instant,
    last_active: Mutex<DateTime<Utc>>,
    source_ip: String,
    user_agent: String,
    slow: bool,
}

pub struct Gateway {
    pub ws_url: String,
    connections: Mutex<HashMap<String, Arc<Connection>>>,
    account: Bucket,
    connects: Bucket,
    route_throttles: HashMap<&'static str, Bucket>,
    lambda: Arc<LambdaService>,
    metrics: Arc<Metrics>,
    post_latency: Latency,
    /// The share of `$disconnect`s never delivered (0 to 1).
    disconnect_loss: f64,
    next_request: AtomicU64,
}

impl Gateway {
    /// Serves the stage on `listener`.
    pub fn start(
        listener: TcpListener,
        account: &Account,
        lambda: Arc<LambdaService>,
        metrics: Arc<Metrics>,
        disconnect_loss: f64,
    ) -> std::io::Result<Arc<Gateway>> {
        let addr = listener.local_addr()?;
        let route_throttles = ROUTES
            .iter()
            .chain(&["$default", "ping", "$connect", "$disconnect"])
            .map(|route| {
                (
                    *route,
                    Bucket::new(account.stage_route_rate, account.stage_route_burst),
                )
            })
            .collect();
        let gateway = Arc::new(Gateway {
            ws_url: format!("ws://{addr}/{STAGE}"),
            connections: Mutex::default(),
            account: Bucket::new(account.apigw_rate, account.apigw_burst),
            connects: Bucket::new(account.connect_rate, account.connect_rate),
            route_throttles,
            lambda,
            metrics,
            post_latency: Latency::new(settings::POST_LATENCY_P50, settings::POST_LATENCY_P99),
            disconnect_loss,
            next_request: AtomicU64::new(1),
        });
        let app = Router::new()
            .route("/{stage}", get(handshake))
            .route("/{stage}/@connections/{id}", any(management))
            .with_state(gateway.clone());
        tokio::spawn(async move { axum::serve(listener, app).await });
        Ok(gateway)
    }

    fn connection(&self, id: &str) -> Option<Arc<Connection>> {
        self.connections.lock().get(id).cloned()
    }

    /// Connections open now.
    pub fn open_connections(&self) -> usize {
        self.connections
            .lock()
            .values()
            .filter(|c| *c.phase.lock() == Phase::Open)
            .count()
    }

    /// Ends the run: closes every connection (counting its minutes, with no `$disconnect`).
    pub fn close_all(&self) {
        for connection in self.connections.lock().drain().map(|(_, c)| c) {
            self.metrics
                .apigw_connection_minutes
                .add(minutes(connection.opened.elapsed()));
            let _ = connection.out.send(Out::Close);
        }
    }

    fn request_id(&self) -> String {
        format!("sim-req-{}", self.next_request.fetch_add(1, Relaxed))
    }

    /// API Gateway's event for a WebSocket route, as the route function receives it.
    fn event(
        &self,
        connection: &Connection,
        route: &str,
        event_type: &str,
        body: Option<&str>,
        query: Option<&HashMap<String, String>>,
    ) -> Value {
        let now = Utc::now();
        let request_id = self.request_id();
        let mut event = json!({
            "requestContext": {
                "routeKey": route,
                "eventType": event_type,
                "extendedRequestId": request_id,
                "requestTime": now.format("%d/%b/%Y:%H:%M:%S %z").to_string(),
                "messageDirection": "IN",
                "stage": STAGE,
                "connectedAt": connection.connected_at.timestamp_millis(),
                "requestTimeEpoch": now.timestamp_millis(),
                "identity": {"sourceIp": connection.source_ip, "userAgent": connection.user_agent},
                "requestId": request_id,
                "domainName": format!("{API_ID}.execute-api.us-east-1.amazonaws.com"),
                "connectionId": connection.id,
                "apiId": API_ID
            },
            "isBase64Encoded": false
        });
        if event_type == "MESSAGE" {
            event["requestContext"]["messageId"] = json!(format!("msg-{request_id}"));
        }
        if let Some(body) = body {
            event["body"] = json!(body);
        }
        if let Some(query) = query {
            event["queryStringParameters"] = json!(query);
            let multi: HashMap<&String, [&String; 1]> =
                query.iter().map(|(k, v)| (k, [v])).collect();
            event["multiValueQueryStringParameters"] = json!(multi);
        }
        event
    }

    /// Invokes the route function; its response as JSON. API Gateway stops waiting after the
    /// integration timeout; the function runs on (holding its concurrency) until it ends.
    async fn invoke_route(&self, event: &Value) -> Result<Value, InvokeError> {
        let Some(slot) = self.lambda.try_acquire(ROUTE_FUNCTION) else {
            return Err(InvokeError::Throttled);
        };
        let payload = Bytes::from(event.to_string());
        let lambda = self.lambda.clone();
        let invocation = tokio::spawn(async move { lambda.invoke(&slot, payload).await });
        let answer =
            match tokio::time::timeout(settings::APIGW_INTEGRATION_TIMEOUT, invocation).await {
                Ok(Ok(answer)) => answer?,
                Ok(Err(_)) | Err(_) => return Err(InvokeError::Timeout),
            };
        serde_json::from_slice(&answer).map_err(|e| InvokeError::Function(e.to_string()))
    }

    /// A connection closed: its minutes are counted, and `$disconnect` runs unless it is one
    /// of the lost ones.
    fn closed(self: &Arc<Self>, connection: &Arc<Connection>) {
        *connection.phase.lock() = Phase::Closed;
        if self.connections.lock().remove(&connection.id).is_none() {
            return; // already counted (close_all)
        }
        self.metrics
            .apigw_connection_minutes
            .add(minutes(connection.opened.elapsed()));
        if rand::random::<f64>() < self.disconnect_loss {
            self.metrics.disconnects_lost.add(1);
            return;
        }
        let gateway = self.clone();
        let connection = connection.clone();
        tokio::spawn(async move {
            let event = gateway.event(&connection, "$disconnect", "DISCONNECT", None, None);
            if gateway.invoke_route(&event).await.is_err() {
                gateway.metrics.route_failures.add(1);
            }
        });
    }

    /// The error frame API Gateway sends a client whose frame it could not hand on.
    fn error_frame(&self, connection: &Connection, message: &str) -> String {
        json!({"message": message, "connectionId": connection.id, "requestId": self.request_id()})
            .to_string()
    }

    /// One frame from a client.
    async fn frame(self: Arc<Self>, connection: Arc<Connection>, text: String) {
        let route = serde_json::from_str::<Value>(&text)
            .ok()
            .and_then(|frame| frame["action"].as_str().map(str::to_owned))
            .and_then(|action| {
                ROUTES
                    .iter()
                    .chain(&["ping"])
                    .find(|route| **route == action)
                    .copied()
            })
            .unwrap_or("$default");
        if !self.account.try_take() || !self.route_throttles[route].try_take() {
            // Assumed shape: API Gateway's error frames carry `message`, `connectionId` and
            // `requestId`; the throttle's message is "Too Many Requests".
            self.metrics.frames_throttled.add(1);
            let _ = connection.out.send(Out::Text(
                self.error_frame(&connection, "Too Many Requests"),
            ));
            return;
        }
        let answer = if route == "ping" {
            // template.yaml `PingIntegration`: MOCK, `{"type":"pong"}`.
            Some(r#"{"type":"pong"}"#.to_owned())
        } else {
            let event = self.event(&connection, route, "MESSAGE", Some(&text), None);
            match self.invoke_route(&event).await {
                Ok(response) => response["body"].as_str().map(str::to_owned),
                Err(error) => {
                    tracing::debug!(%error, "route invocation failed");
                    self.metrics.route_failures.add(1);
                    Some(self.error_frame(&connection, "Internal server error"))
                }
            }
        };
        if let Some(answer) = answer.filter(|a| !a.is_empty()) {
            self.metrics.apigw_outbound.add(1);
            let _ = connection.out.send(Out::Text(answer));
        }
    }
}

/// Connection minutes as billed: each connection rounded up to a whole minute.
fn minutes(lived: Duration) -> u64 {
    lived.as_secs().div_ceil(60).max(1)
}

fn connection_id() -> String {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
    let mut id: String = (0..15)
        .map(|_| ALPHABET[rand::random_range(0..ALPHABET.len())] as char)
        .collect();
    id.push('=');
    id
}

async fn handshake(
    State(gateway): State<Arc<Gateway>>,
    Path(_stage): Path<String>,
    Query(query): Query<HashMap<String, String>>,
    headers: HeaderMap,
    mut request: Request,
) -> Response {
    let Some(key) = headers.get("sec-websocket-key").cloned() else {
        return (StatusCode::UPGRADE_REQUIRED, "a WebSocket API").into_response();
    };
    if !gateway.connects.try_take() || !gateway.account.try_take() {
        gateway.metrics.connects_throttled.add(1);
        return (StatusCode::TOO_MANY_REQUESTS, "Too Many Requests").into_response();
    }
    let (out, outbox) = mpsc::unbounded_channel();
    let now = Utc::now();
    let connection = Arc::new(Connection {
        id: connection_id(),
        phase: Mutex::new(Phase::Pending),
        out,
        connected_at: now,
        opened: Instant::now(),
        last_active: Mutex::new(now),
        source_ip: "127.0.0.1".to_owned(),
        user_agent: headers
            .get("user-agent")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_owned(),
        slow: headers.contains_key(SLOW_CLIENT_HEADER),
    });
    gateway
        .connections
        .lock()
        .insert(connection.id.clone(), connection.clone());
    let event = gateway.event(&connection, "$connect", "CONNECT", None, Some(&query));
    let status = match gateway.invoke_route(&event).await {
        Ok(response) => response["statusCode"].as_u64().unwrap_or(500) as u16,
        Err(error) => {
            tracing::debug!(%error, "$connect invocation failed");
            gateway.metrics.route_failures.add(1);
            500
        }
    };
    if status != 200 {
        gateway.connections.lock().remove(&connection.id);
        let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        return status.into_response();
    }
    let upgrade = hyper::upgrade::on(&mut request);
    tokio::spawn(async move {
        let Ok(upgraded) = upgrade.await else {
            gateway.closed(&connection);
            return;
        };
        let config = WebSocketConfig::default()
            .read_buffer_size(4 * 1024)
            .max_frame_size(Some(settings::APIGW_MAX_FRAME))
            .max_message_size(Some(settings::APIGW_MAX_MESSAGE));
        let socket = WebSocketStream::from_raw_socket(
            hyper_util::rt::TokioIo::new(upgraded),
            Role::Server,
            Some(config),
        )
        .await;
        session(gateway, connection, socket, outbox).await;
    });
    (
        StatusCode::SWITCHING_PROTOCOLS,
        [
            ("upgrade", "websocket".to_owned()),
            ("connection", "Upgrade".to_owned()),
            ("sec-websocket-accept", derive_accept_key(key.as_bytes())),
        ],
    )
        .into_response()
}

/// An open connection: frames in, frames out, until either side closes or a deadline passes.
async fn session(
    gateway: Arc<Gateway>,
    connection: Arc<Connection>,
    socket: WebSocket,
    mut outbox: mpsc::UnboundedReceiver<Out>,
) {
    {
        let mut phase = connection.phase.lock();
        if *phase == Phase::Pending {
            *phase = Phase::Open;
        }
    }
    let (mut sink, mut stream) = socket.split();
    let writer = tokio::spawn(async move {
        while let Some(out) = outbox.recv().await {
            let mut close = false;
            let mut next = Some(out);
            while let Some(out) = next {
                match out {
                    Out::Text(text) => {
                        if sink.feed(Message::Text(text.into())).await.is_err() {
                            return;
                        }
                    }
                    Out::Close => close = true,
                }
                next = if close { None } else { outbox.try_recv().ok() };
            }
            if sink.flush().await.is_err() {
                return;
            }
            if close {
                let frame = CloseFrame {
                    code: CloseCode::Normal,
                    reason: "".into(),
                };
                let _ = sink.send(Message::Close(Some(frame))).await;
                return;
            }
        }
    });
    let lifetime = tokio::time::sleep(settings::APIGW_CONNECTION_LIFETIME);
    tokio::pin!(lifetime);
    loop {
        let next = tokio::select! {
            next = tokio::time::timeout(settings::APIGW_IDLE_TIMEOUT, stream.next()) => next,
            () = &mut lifetime => break,
        };
        let message = match next {
            Ok(Some(Ok(message))) => message,
            _ => break,
        };
        *connection.last_active.lock() = Utc::now();
        match message {
            Message::Text(text) => {
                gateway.metrics.apigw_inbound.add(1);
                tokio::spawn(
                    gateway
                        .clone()
                        .frame(connection.clone(), text.as_str().to_owned()),
                );
            }
            Message::Binary(_) => {
                gateway.metrics.apigw_inbound.add(1);
                let frame = gateway.error_frame(&connection, "Binary frames are not routed");
                let _ = connection.out.send(Out::Text(frame));
            }
            Message::Close(_) => break,
            Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => {}
        }
    }
    let _ = connection.out.send(Out::Close);
    gateway.closed(&connection);
    let _ = tokio::time::timeout(Duration::from_secs(5), writer).await;
}

/// An error answer of the management API, as AWS sends it.
fn aws_error(status: StatusCode, kind: &str, message: &str) -> Response {
    (
        status,
        [
            ("x-amzn-ErrorType", kind),
            ("content-type", "application/json"),
        ],
        json!({ "message": message }).to_string(),
    )
        .into_response()
}

/// `POST|GET|DELETE /{stage}/@connections/{id}`.
async fn management(
    State(gateway): State<Arc<Gateway>>,
    Path((_stage, id)): Path<(String, String)>,
    method: axum::http::Method,
    body: Bytes,
) -> Response {
    if !gateway.account.try_take() {
        gateway.metrics.posts_throttled.add(1);
        return aws_error(
            StatusCode::TOO_MANY_REQUESTS,
            "LimitExceededException",
            "Too Many Requests",
        );
    }
    tokio::time::sleep(gateway.post_latency.sample()).await;
    let gone = || {
        gateway.metrics.posts_gone.add(1);
        aws_error(StatusCode::GONE, "GoneException", "")
    };
    let Some(connection) = gateway
        .connection(&id)
        .filter(|c| *c.phase.lock() == Phase::Open)
    else {
        return gone();
    };
    match method.as_str() {
        "POST" => {
            if body.len() > settings::APIGW_MAX_MESSAGE {
                return aws_error(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "PayloadTooLargeException",
                    "Message too long",
                );
            }
            if connection.slow {
                tokio::time::sleep(settings::SLOW_CLIENT_POST_HOLD).await;
                return aws_error(
                    StatusCode::GATEWAY_TIMEOUT,
                    "InternalServerErrorException",
                    "timed out",
                );
            }
            let text = String::from_utf8_lossy(&body).into_owned();
            if connection.out.send(Out::Text(text)).is_err() {
                return gone();
            }
            gateway.metrics.apigw_outbound.add(1);
            gateway.metrics.posts_ok.add(1);
            StatusCode::OK.into_response()
        }
        "GET" => {
            let at = |t: DateTime<Utc>| t.format("%Y-%m-%dT%H:%M:%S%.3fZ").to_string();
            let last_active = *connection.last_active.lock();
            (
                [("content-type", "application/json")],
                json!({
                    "connectedAt": at(connection.connected_at),
                    "lastActiveAt": at(last_active),
                    "identity": {"sourceIp": connection.source_ip, "userAgent": connection.user_agent},
                })
                .to_string(),
            )
                .into_response()
        }
        "DELETE" => {
            *connection.phase.lock() = Phase::Closed;
            let _ = connection.out.send(Out::Close);
            StatusCode::NO_CONTENT.into_response()
        }
        _ => StatusCode::METHOD_NOT_ALLOWED.into_response(),
    }
}
