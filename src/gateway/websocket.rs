//! The WebSocket side of the local gateway: the handshake runs `$connect`, each text frame is
//! routed by its `action` exactly like `$request.body.action`, the route's answer goes back to
//! the sender, and the end of the socket runs `$disconnect`.

use super::admission::Refused;
use super::hub::{CloseReason, Link};
use super::lifetime::CLOSE_LINGER;
use super::rate::{RateLimit, Verdict};
use super::{GatewayState, page, wire};
use crate::domain::limits::MAX_FRAME_BYTES;
use crate::domain::requests::select_route;
use crate::domain::{ConnectionId, ErrorCode, ServerFrame};
use crate::handlers::Turn;
use aws_lambda_events::apigw::{ApiGatewayProxyResponse, ApiGatewayWebsocketProxyRequest};
use aws_lambda_events::encodings::Body;
use axum::extract::{ConnectInfo, Query, Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::{Buf, Bytes};
use futures_util::StreamExt;
use futures_util::future::BoxFuture;
use futures_util::stream::FuturesOrdered;
use hyper_util::rt::TokioIo;
use std::collections::{HashMap, VecDeque};
use std::io::IoSlice;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::oneshot;
use tokio::time::Instant;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};
use tokio_tungstenite::tungstenite::{Message, Utf8Bytes};

/// Frames larger than this end the connection (1009), as API Gateway's hard limit does; frames
/// between [`MAX_FRAME_BYTES`] and this get a `too_large` error and the connection stays.
const HARD_FRAME_LIMIT: usize = 128 * 1024;

/// `GET /`: a WebSocket handshake, or the chat page for a browser.
pub async fn root(
    State(state): State<Arc<GatewayState>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    Query(params): Query<HashMap<String, String>>,
    mut request: Request,
) -> Response {
    let accept = match accept_key(request.method(), &headers) {
        Handshake::Page => return page::index().await.into_response(),
        Handshake::Refused(why) => {
            refused_handshake("bad_request");
            return (StatusCode::BAD_REQUEST, why).into_response();
        }
        Handshake::Accept(accept) => accept,
    };
    let too_many = |refused: Refused| {
        tracing::info!(%peer, ?refused, "handshake refused");
        refused_handshake(refused.reason());
        (
            StatusCode::TOO_MANY_REQUESTS,
            [(header::RETRY_AFTER, "1")],
            refused.explanation(),
        )
            .into_response()
    };
    if let Err(refused) = state.admission.admit(peer.ip(), state.hub.len()) {
        return too_many(refused);
    }
    let user_agent = headers
        .get(header::USER_AGENT)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let id = ConnectionId::random();
    let max = state.admission.max_connections();
    let Some(link) = state.hub.register(id.clone(), peer.ip(), user_agent, max) else {
        return too_many(Refused::Full);
    };
    let upgrade = hyper::upgrade::on(&mut request);

    let answered = link.clone();
    let mut connect = state.request(&link, "$connect", "CONNECT", None);
    connect.query_string_parameters = params.into();
    connect.headers = headers;
    // `$connect` and what follows it run in a task of their own. This request's future is
    // dropped if the client hangs up, and dropped halfway through `$connect` it would leave a
    // connection logged as open that no `$disconnect` ever closes. The task always finishes:
    // once `$connect` succeeded, the upgrade either opens the session or fails — the client
    // is gone — and then `$disconnect` runs.
    let connecting = tokio::spawn(async move {
        let response = state.routes.handle(connect).await;
        if response.status_code != 200 {
            state.hub.remove(&link.id);
            state.hub.ended();
            return Err(response);
        }
        tokio::spawn(async move {
            match upgrade
                .await
                .map(|upgraded| upgraded.downcast::<TokioIo<TcpStream>>())
            {
                Ok(Ok(parts)) => {
                    // What the client sent behind its request head, copied: the `Bytes` share
                    // hyper's whole read buffer, which an idle connection must not keep.
                    let hyper::upgrade::Parts { io, read_buf, .. } = parts;
                    let read_ahead = read_buf.to_vec();
                    drop(read_buf);
                    session(state, link, io.into_inner(), read_ahead).await
                }
                Ok(Err(_)) => {
                    // `gateway::http` serves TCP streams only; this cannot happen.
                    tracing::error!(connection = %link.id, "the upgraded connection is not TCP");
                    Box::pin(state.disconnect(&link)).await;
                }
                Err(error) => {
                    // `$connect` succeeded, so `$disconnect` must run: it never opened.
                    tracing::info!(%error, "WebSocket upgrade failed after $connect");
                    // Boxed for the same reason as in `session`.
                    Box::pin(state.disconnect(&link)).await;
                }
            }
        });
        Ok(())
    });
    match connecting.await {
        // From the moment the 101 goes out the client may act on its connection (a message
        // to its room may be fanned out to it), so frames for it are queued from now on rather
        // than refused as "still opening"; the session's writer sends them once it runs.
        Ok(Ok(())) => answered.opened(),
        Ok(Err(response)) => {
            let status = u16::try_from(response.status_code)
                .ok()
                .and_then(|s| StatusCode::from_u16(s).ok())
                .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            refused_handshake(match status {
                StatusCode::UNAUTHORIZED => "unauthorized",
                StatusCode::TOO_MANY_REQUESTS => "too_many_for_user",
                _ => "failed",
            });
            return (status, body_text(response).unwrap_or_default()).into_response();
        }
        Err(error) => {
            tracing::error!(connection = %id, %error, "$connect failed");
            refused_handshake("failed");
            return StatusCode::INTERNAL_SERVER_ERROR.into_response();
        }
    }
    let mut switching = StatusCode::SWITCHING_PROTOCOLS.into_response();
    let answer = switching.headers_mut();
    answer.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    answer.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    answer.insert(header::SEC_WEBSOCKET_ACCEPT, accept);
    switching
}

/// Counts a handshake answered with anything but 101.
fn refused_handshake(reason: &'static str) {
    metrics::counter!(crate::metrics::HANDSHAKES_REFUSED, "reason" => reason).increment(1);
}

/// Counts a frame refused before any route ran.
fn refused_frame(reason: &'static str) {
    metrics::counter!(crate::metrics::FRAMES_REFUSED, "reason" => reason).increment(1);
}

enum Handshake {
    /// Not a WebSocket request: a browser asking for the page.
    Page,
    /// A WebSocket request that cannot be accepted, and why.
    Refused(&'static str),
    /// The `Sec-WebSocket-Accept` value to answer with.
    Accept(HeaderValue),
}

/// Checks an upgrade request as RFC 6455 §4.2.1 asks.
fn accept_key(method: &Method, headers: &HeaderMap) -> Handshake {
    let has_token = |name: header::HeaderName, token: &str| {
        headers.get_all(name).iter().any(|value| {
            value.to_str().is_ok_and(|v| {
                v.split(',')
                    .any(|part| part.trim().eq_ignore_ascii_case(token))
            })
        })
    };
    if !has_token(header::UPGRADE, "websocket") {
        return Handshake::Page;
    }
    if method != Method::GET {
        return Handshake::Refused("a WebSocket handshake is a GET request\n");
    }
    if !has_token(header::CONNECTION, "upgrade") {
        return Handshake::Refused("`Connection` must include `upgrade`\n");
    }
    if headers
        .get(header::SEC_WEBSOCKET_VERSION)
        .map(HeaderValue::as_bytes)
        != Some(b"13")
    {
        return Handshake::Refused("`Sec-WebSocket-Version` must be 13\n");
    }
    let Some(key) = headers.get(header::SEC_WEBSOCKET_KEY) else {
        return Handshake::Refused("`Sec-WebSocket-Key` is missing\n");
    };
    let accept = tokio_tungstenite::tungstenite::handshake::derive_accept_key(key.as_bytes());
    match HeaderValue::from_str(&accept) {
        Ok(accept) => Handshake::Accept(accept),
        Err(_) => Handshake::Refused("`Sec-WebSocket-Key` is not valid\n"),
    }
}

/// A connection's read buffer starts this small and grows only for a frame that needs more:
/// tungstenite's default (128 KiB) would make an idle connection cost twenty times what it
/// needs.
const READ_BUFFER: usize = 1024;

/// How many frames of one connection are handled at once: consecutive `sendMessage`s share
/// group commits, in the order sent.
const IN_FLIGHT: usize = 256;

/// The most frames handed to the kernel in one vectored write.
const FRAMES_PER_WRITE: usize = 64;

/// Runs one open connection until either side ends it.
///
/// The socket is split: tungstenite parses what the client sends, and the writer puts
/// pre-encoded frames from the connection's outbox straight onto the socket. That way a frame
/// is encoded once for a whole room, and a connection keeps no write buffer of its own.
///
/// Whatever the client does, the connection holds bounded memory and ends on time: the session
/// waits for room for its answers (and stops reading the client meanwhile) without ever blocking
/// its close or its idle and age timers; the writer gives up on a socket that takes nothing for
/// the write timeout; and a closing connection's socket is reset if it has not taken its close
/// frame within [`CLOSE_LINGER`]. `$disconnect` runs once the socket is gone, so the caps on
/// connections count a closing one until then.
///
/// The link was marked open when the 101 was answered (in [`root`]), before this runs.
async fn session(
    state: Arc<GatewayState>,
    link: Arc<Link>,
    socket: TcpStream,
    read_ahead: Vec<u8>,
) {
    let (reading, writing) = socket.into_split();
    let mut writer = tokio::spawn(write(link.clone(), writing, state.lifetime.write));
    let config = WebSocketConfig::default()
        .read_buffer_size(READ_BUFFER)
        .max_message_size(Some(HARD_FRAME_LIMIT))
        .max_frame_size(Some(HARD_FRAME_LIMIT));
    // What the client sent right behind its handshake was read with the request head.
    let mut stream = WebSocketStream::from_partially_read(
        ReadOnly(reading),
        read_ahead,
        Role::Server,
        Some(config),
    )
    .await;

    let mut rate = RateLimit::new(state.rate_limit);
    let mut pipeline = Pipeline::default();
    let mut refused_a_frame = false;
    // An answer (or pong) waiting for room in the outbox: until it is in, no other answer is
    // taken and nothing more is read from the client.
    let mut answer: Option<Bytes> = None;
    // One timer per connection, re-armed only when it fires: a frame just notes the time.
    let (opened, mut heard) = (Instant::now(), Instant::now());
    let expiry = tokio::time::sleep_until(state.lifetime.deadline(opened, heard));
    tokio::pin!(expiry);
    loop {
        let frame = tokio::select! {
            biased;
            () = link.closed() => break,
            () = &mut expiry => {
                if let Some(reason) = state.lifetime.expired(opened, heard, Instant::now()) {
                    link.close(reason);
                    break;
                }
                expiry.as_mut().reset(state.lifetime.deadline(opened, heard));
                continue;
            }
            () = link.answer_from(&mut answer), if answer.is_some() => continue,
            Some(done) = pipeline.answers.next(),
                if answer.is_none() && !pipeline.answers.is_empty() =>
            {
                answer = done.map(wire::text);
                // Most of the time there is room: no turn of the loop just to queue it.
                link.answer_now(&mut answer);
                if pipeline.answers.is_empty() {
                    pipeline.barrier = false;
                    pipeline.after = None;
                    if let Some(text) = pipeline.held.take() {
                        pipeline.start(&state, &link, text);
                    }
                }
                continue;
            }
            frame = stream.next(), if answer.is_none() && pipeline.accepts() => frame,
        };
        let frame = match frame {
            Some(Ok(Message::Close(_))) | None => break,
            Some(Ok(frame)) => frame,
            Some(Err(error)) => {
                tracing::debug!(connection = %link.id, %error, "socket error");
                if let Some((code, reason)) = refusal(&error) {
                    link.close(code);
                    refused_frame(reason);
                    refused_a_frame = true;
                }
                break;
            }
        };
        heard = Instant::now();
        if matches!(frame, Message::Text(_) | Message::Binary(_)) {
            link.touch();
        }
        // Every frame counts against the rate, control frames too: a flood of pings or of
        // empty binary frames costs the server as much as one of text.
        match (
            rate.as_mut().map_or(Verdict::Admit, RateLimit::admit),
            frame,
        ) {
            (Verdict::Flooding, _) => {
                refused_frame("flooding");
                link.close(CloseReason::Flooding);
                break;
            }
            // A throttled ping gets no pong; nothing answers a pong.
            (Verdict::Refuse, Message::Ping(_) | Message::Pong(_)) => refused_frame("rate_limited"),
            (Verdict::Refuse, _) => {
                refused_frame("rate_limited");
                pipeline.ready(
                    ServerFrame::error(ErrorCode::RateLimited, "too many frames: slow down", None)
                        .to_json(),
                );
            }
            (Verdict::Admit, Message::Text(text)) => pipeline.start(&state, &link, text),
            (Verdict::Admit, Message::Binary(_)) => {
                refused_frame("binary");
                let error = ServerFrame::error(
                    ErrorCode::BadRequest,
                    "binary frames are not supported: send JSON text frames",
                    None,
                );
                pipeline.ready(error.to_json());
            }
            (Verdict::Admit, Message::Ping(payload)) => {
                answer = Some(wire::pong(payload));
                link.answer_now(&mut answer);
            }
            (Verdict::Admit, _) => {}
        }
    }

    // Nothing more is posted to the connection from here; the writer sends what is queued (not
    // to a client closed as too slow) and the close frame, for at most CLOSE_LINGER.
    link.close(CloseReason::Deleted);
    let closed_cleanly = match tokio::time::timeout(CLOSE_LINGER, &mut writer).await {
        Ok(sent) => sent.unwrap_or(false),
        Err(_) => {
            writer.abort();
            let _ = (&mut writer).await;
            false
        }
    };
    let reading = stream.get_mut();
    if !closed_cleanly {
        // The client is not taking what it is sent: reset the socket, so that the kernel frees
        // what it still holds for it now rather than retrying it for minutes.
        if let Err(error) = reading.0.as_ref().set_zero_linger() {
            tracing::debug!(connection = %link.id, %error, "could not reset the socket");
        }
    } else if refused_a_frame {
        // Boxed: a session future sized for it would be paid by every idle connection.
        Box::pin(linger(reading)).await;
    }
    drop(stream);
    // Boxed for the same reason: `$disconnect`'s future is as big as any route's.
    Box::pin(state.disconnect(&link)).await;
}

/// How long the server keeps reading, and discarding, what a client is still sending after one
/// of its frames was refused.
const LINGER: Duration = Duration::from_secs(2);

/// Reads and discards the rest of what the client sends, until it closes its side or for
/// [`LINGER`]. A socket closed with unread data answers the client with a reset, and a client
/// still writing (the rest of a 20 MB frame refused at its header) then fails with a broken
/// pipe, and may never read the close frame saying why. RFC 6455 §7.1.1 has the server close the
/// TCP connection only once the close handshake is done, as an HTTP server lingers on close.
async fn linger(reading: &mut (impl AsyncRead + Unpin)) {
    use tokio::io::AsyncReadExt;
    let mut discard = vec![0; 64 * 1024];
    let _ = tokio::time::timeout(LINGER, async {
        while let Ok(1..) = reading.read(&mut discard).await {}
    })
    .await;
}

/// The close a protocol error earns, when the client should hear why, and its name in
/// [`crate::metrics::FRAMES_REFUSED`].
fn refusal(error: &tokio_tungstenite::tungstenite::Error) -> Option<(CloseReason, &'static str)> {
    use tokio_tungstenite::tungstenite::error::{CapacityError, Error};
    match error {
        Error::Capacity(CapacityError::MessageTooLong { .. }) => {
            Some((CloseReason::TooBig, "too_big"))
        }
        Error::Utf8(_) => Some((CloseReason::BadData, "bad_data")),
        Error::Protocol(_) => Some((CloseReason::ProtocolError, "protocol_error")),
        _ => None,
    }
}

/// Puts the connection's outbox onto the socket: everything queued goes to the kernel in
/// vectored writes, then the writer waits for more. Ends with the close frame, and says whether
/// it went out; a socket that takes nothing for `deadline` ends it without one (the connection
/// is closed as too slow, and the session resets the socket).
async fn write(link: Arc<Link>, mut socket: OwnedWriteHalf, deadline: Duration) -> bool {
    loop {
        let mut frames = tokio::select! {
            biased;
            frames = link.outbox.take() => frames,
            () = link.closed() => break,
        };
        match tokio::time::timeout(deadline, write_all(&mut socket, &mut frames, &link)).await {
            Ok(Ok(())) => {}
            Ok(Err(_)) => {
                link.close(CloseReason::Lost);
                return false;
            }
            Err(_) => {
                tracing::info!(connection = %link.id, "the client takes nothing: closing it as too slow");
                link.close(CloseReason::TooSlow);
                return false;
            }
        }
    }
    // What was queued before the close still goes out, then the close frame — but not to a
    // client closed for not reading: it would not read that either.
    let reason = link.close_reason().unwrap_or(CloseReason::Deleted);
    let mut frames = link.outbox.take_now();
    if reason == CloseReason::TooSlow {
        frames.clear();
    }
    let (code, text) = reason.frame();
    frames.push_back(wire::close(code, text));
    write_all(&mut socket, &mut frames, &link).await.is_ok() && socket.shutdown().await.is_ok()
}

/// Writes every frame, many per system call, noting on `link` whether the socket is full. What
/// is left in `frames` when it fails (or is given up) was not written.
async fn write_all(
    socket: &mut (impl AsyncWrite + Unpin),
    frames: &mut VecDeque<Bytes>,
    link: &Link,
) -> std::io::Result<()> {
    let mut sent = 0;
    while !frames.is_empty() {
        let slices: Vec<IoSlice<'_>> = frames
            .iter()
            .take(FRAMES_PER_WRITE)
            .map(|frame| IoSlice::new(frame))
            .collect();
        let mut written = std::future::poll_fn(|cx| {
            let poll = Pin::new(&mut *socket).poll_write_vectored(cx, &slices);
            link.socket_full(poll.is_pending());
            poll
        })
        .await?;
        drop(slices);
        if written == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        while written > 0 {
            let Some(front) = frames.front_mut() else {
                break;
            };
            if written < front.len() {
                front.advance(written);
                break;
            }
            written -= front.len();
            frames.pop_front();
            sent += 1;
        }
    }
    // Once per call, not per frame: a room event is a frame for every member.
    metrics::counter!(crate::metrics::FRAMES_OUT).increment(sent);
    Ok(())
}

/// The socket's reading half, as tungstenite wants a whole socket: what tungstenite would
/// write (its automatic pong and close replies) is dropped here, because the writer owns the
/// socket's writing half and sends those replies itself.
struct ReadOnly(OwnedReadHalf);

impl AsyncRead for ReadOnly {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl AsyncWrite for ReadOnly {
    fn poll_write(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
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
        metrics::counter!(crate::metrics::FRAMES_IN, "route" => route).increment(1);
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
        self.hub.ended();
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
