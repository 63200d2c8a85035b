//! The WebSocket side of the local gateway: the handshake runs `$connect`, each text frame is
//! routed by its `action` exactly like `$request.body.action`, the route's answer goes back to
//! the sender, and the end of the socket runs `$disconnect`.

use super::hub::{CloseReason, Link};
use super::rate::{RateLimit, Verdict};
use super::{GatewayState, page};
use crate::domain::limits::MAX_FRAME_BYTES;
use crate::domain::requests::select_route;
use crate::domain::{ConnectionId, ErrorCode, ServerFrame};
use crate::handlers::Turn;
use aws_lambda_events::apigw::{ApiGatewayProxyResponse, ApiGatewayWebsocketProxyRequest};
use aws_lambda_events::encodings::Body;
use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket, WebSocketUpgrade};
use axum::extract::{ConnectInfo, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use futures_util::future::BoxFuture;
use futures_util::stream::{FuturesOrdered, SplitSink};
use futures_util::{SinkExt, StreamExt};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};

/// Frames larger than this end the connection (1009), as API Gateway's hard limit does; frames
/// between [`MAX_FRAME_BYTES`] and this get a `too_large` error and the connection stays.
const HARD_FRAME_LIMIT: usize = 128 * 1024;

/// `GET /`: a WebSocket handshake, or the chat page for a browser.
pub async fn root(
    State(state): State<Arc<GatewayState>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    Query(params): Query<HashMap<String, String>>,
    upgrade: Result<WebSocketUpgrade, axum::extract::ws::rejection::WebSocketUpgradeRejection>,
) -> Response {
    let Ok(upgrade) = upgrade else {
        return page::index().await.into_response();
    };
    let user_agent = headers
        .get(axum::http::header::USER_AGENT)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let id = ConnectionId::random();
    let (link, inbox) = state.hub.register(id.clone(), peer.ip(), user_agent);

    let mut request = state.request(&link, "$connect", "CONNECT", None);
    request.query_string_parameters = params.into();
    request.headers = headers;
    let response = state.routes.handle(request).await;
    if response.status_code != 200 {
        state.hub.remove(&id);
        let status = u16::try_from(response.status_code)
            .ok()
            .and_then(|s| StatusCode::from_u16(s).ok())
            .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        return (status, body_text(response).unwrap_or_default()).into_response();
    }

    let on_fail = state.clone();
    let failed_link = link.clone();
    upgrade
        .read_buffer_size(READ_BUFFER)
        .write_buffer_size(WRITE_BUFFER)
        .max_message_size(HARD_FRAME_LIMIT)
        .max_frame_size(HARD_FRAME_LIMIT)
        .on_failed_upgrade(move |error| {
            tracing::info!(%error, "WebSocket upgrade failed after $connect");
            tokio::spawn(async move { on_fail.disconnect(&failed_link).await });
        })
        .on_upgrade(move |socket| session(state, link, inbox, socket))
}

/// A connection's read buffer starts this small and grows only for a frame that needs more:
/// tungstenite's default (128 KiB) would make an idle connection cost twenty times what it
/// needs.
const READ_BUFFER: usize = 1024;
/// Frames are written out once this much is buffered, or at the writer's flush, whichever comes
/// first; the buffer grows only as far as a burst of frames needs.
const WRITE_BUFFER: usize = 64 * 1024;

/// How many frames of one connection are handled at once: consecutive `sendMessage`s share
/// group commits, in the order sent.
const IN_FLIGHT: usize = 256;

/// Runs one open connection until either side ends it.
async fn session(
    state: Arc<GatewayState>,
    link: Arc<Link>,
    inbox: mpsc::Receiver<Message>,
    socket: WebSocket,
) {
    let (sink, mut stream) = socket.split();
    let writer = tokio::spawn(write(link.clone(), inbox, sink));

    let mut rate = RateLimit::new(state.rate_limit);
    let mut pipeline = Pipeline::default();
    loop {
        let frame = tokio::select! {
            biased;
            Some(answer) = pipeline.answers.next(), if !pipeline.answers.is_empty() => {
                if let Some(answer) = answer
                    && link.answer(Message::Text(answer.into())).await.is_err()
                {
                    break;
                }
                if pipeline.answers.is_empty() {
                    pipeline.barrier = false;
                    pipeline.after = None;
                    if let Some(text) = pipeline.held.take() {
                        pipeline.start(&state, &link, text);
                    }
                }
                continue;
            }
            frame = stream.next(), if pipeline.accepts() => frame,
            () = link.closed() => break,
        };
        let text = match frame {
            Some(Ok(Message::Text(text))) => text,
            Some(Ok(Message::Binary(_))) => {
                link.touch();
                let error = ServerFrame::error(
                    ErrorCode::BadRequest,
                    "binary frames are not supported: send JSON text frames",
                    None,
                );
                pipeline.ready(error.to_json());
                continue;
            }
            Some(Ok(Message::Close(_))) | None => break,
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
            Some(Err(error)) => {
                tracing::debug!(connection = %link.id, %error, "socket error");
                break;
            }
        };
        link.touch();
        match rate.as_mut().map_or(Verdict::Admit, RateLimit::admit) {
            Verdict::Admit => pipeline.start(&state, &link, text),
            Verdict::Refuse => pipeline.ready(
                ServerFrame::error(ErrorCode::RateLimited, "too many frames: slow down", None)
                    .to_json(),
            ),
            Verdict::Flooding => {
                link.close(CloseReason::Flooding);
                break;
            }
        }
    }

    // Boxed: `$disconnect`'s future is as big as any route's, and a session future sized for it
    // would be paid by every idle connection.
    Box::pin(state.disconnect(&link)).await;
    // Let the writer flush what is queued and the close frame, but not forever.
    link.close(CloseReason::Deleted);
    let _ = tokio::time::timeout(Duration::from_secs(2), writer).await;
}

/// Drains the connection's outbox onto the socket: everything queued goes out with one flush
/// (one `write` for many frames), then the writer waits for more.
async fn write(
    link: Arc<Link>,
    mut inbox: mpsc::Receiver<Message>,
    mut sink: SplitSink<WebSocket, Message>,
) {
    loop {
        tokio::select! {
            biased;
            frame = inbox.recv() => {
                let Some(frame) = frame else { return };
                if sink.feed(frame).await.is_err() {
                    return;
                }
                while let Ok(frame) = inbox.try_recv() {
                    if sink.feed(frame).await.is_err() {
                        return;
                    }
                }
                if sink.flush().await.is_err() {
                    return;
                }
            }
            () = link.closed() => break,
        }
    }
    let (code, reason) = link.close_reason().unwrap_or(CloseReason::Deleted).frame();
    let close = CloseFrame {
        code,
        reason: reason.into(),
    };
    let _ = sink.send(Message::Close(Some(close))).await;
}

/// A connection's frames in flight, answered in the order they came.
///
/// Consecutive `sendMessage` frames run together, each appending in its [`Turn`]; any other
/// route waits until everything before it is answered and runs alone, so that a `joinRoom`,
/// `leaveRoom` or `getHistory` sees every earlier frame's effect, and later frames see its own.
/// Answers that need no handler (rate limited, binary) keep their place in the order too.
#[derive(Default)]
struct Pipeline {
    answers: FuturesOrdered<BoxFuture<'static, Option<String>>>,
    /// A frame running alone is in flight: nothing else starts until it is answered.
    barrier: bool,
    /// A frame waiting for the ones in flight to be answered before it runs alone.
    held: Option<Utf8Bytes>,
    /// What the next `sendMessage` waits on before it appends.
    after: Option<oneshot::Receiver<()>>,
}

impl Pipeline {
    fn accepts(&self) -> bool {
        !self.barrier && self.held.is_none() && self.answers.len() < IN_FLIGHT
    }

    fn ready(&mut self, answer: String) {
        self.answers
            .push_back(Box::pin(std::future::ready(Some(answer))));
    }

    fn start(&mut self, state: &Arc<GatewayState>, link: &Arc<Link>, text: Utf8Bytes) {
        // Route selection reads no more than a frame may hold.
        let route = if text.len() > MAX_FRAME_BYTES {
            "$default"
        } else {
            select_route(text.as_str())
        };
        let turn = if route == "sendMessage" {
            let (turn, next) = Turn::chain(self.after.take());
            self.after = Some(next);
            turn
        } else if route == "$default" {
            Turn::alone()
        } else if self.answers.is_empty() {
            self.barrier = true;
            Turn::alone()
        } else {
            self.held = Some(text);
            return;
        };
        let (state, link) = (state.clone(), link.clone());
        self.answers.push_back(Box::pin(async move {
            state.message(&link, route, text.as_str(), turn).await
        }));
    }
}

impl GatewayState {
    /// A route request in API Gateway's shape for `link`.
    fn request(
        &self,
        link: &Link,
        route: &str,
        event_type: &str,
        body: Option<&str>,
    ) -> ApiGatewayWebsocketProxyRequest {
        let now = chrono::Utc::now();
        let mut request = ApiGatewayWebsocketProxyRequest::default();
        request.body = body.map(str::to_owned);
        let context = &mut request.request_context;
        context.route_key = Some(route.to_owned());
        context.event_type = Some(event_type.to_owned());
        context.connection_id = Some(link.id.to_string());
        context.connected_at = link.connected_at.timestamp_millis();
        context.request_time_epoch = now.timestamp_millis();
        context.request_time = Some(now.format("%d/%b/%Y:%H:%M:%S %z").to_string());
        context.request_id = Some(ulid::Ulid::new().to_string());
        context.message_id = Some(ulid::Ulid::new().to_string());
        context.message_direction = Some("IN".to_owned());
        context.stage = Some(self.stage.clone());
        context.apiid = Some("local".to_owned());
        context.domain_name = Some("localhost".to_owned());
        context.identity.source_ip = Some(link.source_ip.to_string());
        context.identity.user_agent = link.user_agent.clone();
        request
    }

    /// Runs one text frame on the route selected for it and returns the route's answer.
    async fn message(&self, link: &Link, route: &str, text: &str, turn: Turn) -> Option<String> {
        let request = self.request(link, route, "MESSAGE", Some(text));
        body_text(self.routes.handle_in_turn(request, turn).await)
    }

    async fn disconnect(&self, link: &Link) {
        self.hub.remove(&link.id);
        let request = self.request(link, "$disconnect", "DISCONNECT", None);
        let response = self.routes.handle(request).await;
        if response.status_code != 200 {
            tracing::error!(connection = %link.id, "$disconnect failed");
        }
    }
}

fn body_text(response: ApiGatewayProxyResponse) -> Option<String> {
    match response.body? {
        Body::Text(text) => Some(text),
        Body::Binary(bytes) => String::from_utf8(bytes).ok(),
        Body::Empty => None,
        _ => None,
    }
}
