//! The WebSocket side of the local gateway: the handshake runs `$connect`, each text frame is
//! routed by its `action` exactly like `$request.body.action`, the route's answer goes back to
//! the sender, and the end of the socket runs `$disconnect`.

use super::hub::{CloseReason, Link, frame_of};
use super::rate::RateLimit;
use super::{GatewayState, page};
use crate::domain::limits::MAX_FRAME_BYTES;
use crate::domain::requests::select_route;
use crate::domain::{ConnectionId, ErrorCode, ServerFrame};
use aws_lambda_events::apigw::{ApiGatewayProxyResponse, ApiGatewayWebsocketProxyRequest};
use aws_lambda_events::encodings::Body;
use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade};
use axum::extract::{ConnectInfo, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use futures_util::{SinkExt, StreamExt};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;

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
        .max_message_size(HARD_FRAME_LIMIT)
        .max_frame_size(HARD_FRAME_LIMIT)
        .on_failed_upgrade(move |error| {
            tracing::info!(%error, "WebSocket upgrade failed after $connect");
            tokio::spawn(async move { on_fail.disconnect(&failed_link).await });
        })
        .on_upgrade(move |socket| session(state, link, inbox, socket))
}

/// Runs one open connection until either side ends it.
async fn session(
    state: Arc<GatewayState>,
    link: Arc<Link>,
    mut inbox: mpsc::Receiver<Message>,
    socket: WebSocket,
) {
    let (mut sink, mut stream) = socket.split();

    let writer_link = link.clone();
    let writer = tokio::spawn(async move {
        loop {
            tokio::select! {
                biased;
                frame = inbox.recv() => match frame {
                    Some(frame) => if sink.send(frame).await.is_err() { return },
                    None => return,
                },
                () = writer_link.closed() => break,
            }
        }
        let (code, reason) = writer_link
            .close_reason()
            .unwrap_or(CloseReason::Deleted)
            .frame();
        let close = CloseFrame {
            code,
            reason: reason.into(),
        };
        let _ = sink.send(Message::Close(Some(close))).await;
    });

    let mut rate = RateLimit::default();
    loop {
        let frame = tokio::select! {
            frame = stream.next() => frame,
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
                if link.answer(frame_of(error.to_bytes())).await.is_err() {
                    break;
                }
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
        let answer = match rate.admit() {
            super::rate::Verdict::Admit => state.message(&link, text.as_str()).await,
            super::rate::Verdict::Refuse => Some(
                ServerFrame::error(ErrorCode::RateLimited, "too many frames: slow down", None)
                    .to_json(),
            ),
            super::rate::Verdict::Flooding => {
                link.close(CloseReason::Flooding);
                break;
            }
        };
        if let Some(answer) = answer
            && link.answer(Message::Text(answer.into())).await.is_err()
        {
            break;
        }
    }

    state.disconnect(&link).await;
    // Let the writer flush what is queued and the close frame, but not forever.
    link.close(CloseReason::Deleted);
    let _ = tokio::time::timeout(Duration::from_secs(2), writer).await;
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

    /// Routes one text frame and returns the route's answer.
    async fn message(&self, link: &Link, text: &str) -> Option<String> {
        // Route selection reads no more than a frame may hold.
        let route = if text.len() > MAX_FRAME_BYTES {
            "$default"
        } else {
            select_route(text)
        };
        let request = self.request(link, route, "MESSAGE", Some(text));
        body_text(self.routes.handle(request).await)
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
