//! API Gateway's management API (`@connections`), so `aws-sdk-apigatewaymanagement` pointed at
//! the local server works as it does against AWS: POST delivers, GET describes, DELETE closes,
//! and an unknown or closed connection answers 410 with `x-amzn-ErrorType: GoneException`
//! (the SDK reads the error kind from that header).
//!
//! Served at `/@connections/{id}` and `/{stage}/@connections/{id}`, behind [`guard`]: requests
//! signed (SigV4) with the operator's key pair when one is set, as API Gateway requires IAM
//! signatures; without one, requests from this machine only.

use super::hub::CloseReason;
use super::wire;
use super::{GatewayState, sigv4};
use crate::domain::ConnectionId;
use crate::domain::event::rfc3339;
use crate::domain::limits::MAX_POST_BYTES;
use axum::Json;
use axum::body::{Body, Bytes};
use axum::extract::{ConnectInfo, Path, Request, State};
use axum::http::{HeaderName, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use serde_json::json;
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::SystemTime;

type Params = Path<HashMap<String, String>>;

fn connection(params: &HashMap<String, String>) -> ConnectionId {
    ConnectionId::new(params.get("id").cloned().unwrap_or_default())
}

/// An error in API Gateway's shape: the kind in `x-amzn-ErrorType`, a JSON message.
fn aws_error(status: StatusCode, kind: &'static str, message: String) -> Response {
    (
        status,
        [
            (HeaderName::from_static("x-amzn-errortype"), kind),
            (header::CONTENT_TYPE, "application/json"),
        ],
        Json(json!({ "message": message })),
    )
        .into_response()
}

fn gone(id: &ConnectionId) -> Response {
    aws_error(
        StatusCode::GONE,
        "GoneException",
        format!("connection {id} is gone"),
    )
}

/// Lets a management request through if it is signed with the operator's keys
/// (`PALAVER_MANAGEMENT_ACCESS_KEY_ID` / `PALAVER_MANAGEMENT_SECRET_ACCESS_KEY`) — or, when none
/// are set, if it comes from this machine. Anything else is 403 in API Gateway's shape.
///
/// Who may ask is settled from the request head first, so a request that may not is answered at
/// once, without its body being waited for. The body then has to arrive whole within the header
/// timeout and API Gateway's 128 KB: a client that announces a body and never sends it holds a
/// socket no longer than a slow request head does.
pub async fn guard(
    State(state): State<Arc<GatewayState>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    request: Request,
    next: Next,
) -> Response {
    let (parts, body) = request.into_parts();
    let refused = |refusal: sigv4::Refusal| {
        tracing::warn!(%peer, %refusal, "management request refused");
        aws_error(StatusCode::FORBIDDEN, refusal.kind(), refusal.to_string())
    };
    match &state.management_keys {
        None if !from_this_machine(peer.ip()) => {
            return aws_error(
                StatusCode::FORBIDDEN,
                "MissingAuthenticationTokenException",
                "the management API is served to this machine only: set \
                 PALAVER_MANAGEMENT_ACCESS_KEY_ID and PALAVER_MANAGEMENT_SECRET_ACCESS_KEY to \
                 sign requests from elsewhere"
                    .to_owned(),
            );
        }
        None => {}
        Some(keys) => {
            if let Err(refusal) = keys.check_head(&parts.headers, SystemTime::now()) {
                return refused(refusal);
            }
        }
    }
    let announced = parts
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if announced.is_some_and(|length| length > MAX_POST_BYTES as u64) {
        return too_large();
    }
    let deadline = state.lifetime.header_read;
    let body = match tokio::time::timeout(deadline, axum::body::to_bytes(body, MAX_POST_BYTES + 1))
        .await
    {
        Ok(Ok(body)) => body,
        Ok(Err(error)) if is_too_large(&error) => return too_large(),
        Ok(Err(error)) => {
            tracing::debug!(%peer, %error, "management request body unreadable");
            return aws_error(
                StatusCode::BAD_REQUEST,
                "BadRequestException",
                "the request body could not be read".to_owned(),
            );
        }
        Err(_) => {
            tracing::info!(%peer, "management request body did not arrive in time");
            return aws_error(
                StatusCode::REQUEST_TIMEOUT,
                "RequestTimeoutException",
                format!("the request body did not arrive within {deadline:?}"),
            );
        }
    };
    if let Some(keys) = &state.management_keys
        && let Err(refusal) = keys.verify(
            &parts.method,
            &parts.uri,
            &parts.headers,
            &body,
            SystemTime::now(),
        )
    {
        return refused(refusal);
    }
    next.run(Request::from_parts(parts, Body::from(body))).await
}

/// Whether reading a body failed on its size limit.
fn is_too_large(error: &axum::Error) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(error) = source {
        if error.is::<http_body_util::LengthLimitError>() {
            return true;
        }
        source = error.source();
    }
    false
}

/// A loopback peer, IPv4 or IPv6 (an IPv4-mapped one included).
pub fn from_this_machine(peer: IpAddr) -> bool {
    peer.to_canonical().is_loopback()
}

fn too_large() -> Response {
    aws_error(
        StatusCode::PAYLOAD_TOO_LARGE,
        "PayloadTooLargeException",
        format!("payloads are limited to {MAX_POST_BYTES} bytes"),
    )
}

/// `postToConnection`.
pub async fn post(
    State(state): State<Arc<GatewayState>>,
    Path(params): Params,
    body: Bytes,
) -> Response {
    let id = connection(&params);
    if body.len() > MAX_POST_BYTES {
        return too_large();
    }
    if body.is_empty() {
        // API Gateway refuses an empty `Data`; a client would get an empty frame otherwise.
        return aws_error(
            StatusCode::BAD_REQUEST,
            "BadRequestException",
            "Invalid request: the data to post is empty".to_owned(),
        );
    }
    let Some(link) = state.hub.get(&id) else {
        return gone(&id);
    };
    match link.push(wire::posted(body)) {
        Ok(()) => StatusCode::OK.into_response(),
        Err(_) => gone(&id),
    }
}

/// `getConnection`.
pub async fn get(State(state): State<Arc<GatewayState>>, Path(params): Params) -> Response {
    let id = connection(&params);
    match state.hub.get(&id).filter(|l| !l.is_closing()) {
        None => gone(&id),
        Some(link) => Json(json!({
            "connectedAt": rfc3339(&link.connected_at),
            "lastActiveAt": rfc3339(&link.last_active_at()),
            "identity": {
                "sourceIp": link.source_ip.to_string(),
                "userAgent": link.user_agent,
            },
        }))
        .into_response(),
    }
}

/// `deleteConnection`: closes the socket; `$disconnect` runs as for any close.
pub async fn delete(State(state): State<Arc<GatewayState>>, Path(params): Params) -> Response {
    let id = connection(&params);
    match state.hub.get(&id).filter(|l| !l.is_closing()) {
        None => gone(&id),
        Some(link) => {
            link.close(CloseReason::Deleted);
            StatusCode::NO_CONTENT.into_response()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_loopback_peers_are_this_machine() {
        for local in ["127.0.0.1", "127.0.0.2", "::1", "::ffff:127.0.0.1"] {
            assert!(from_this_machine(local.parse().unwrap()), "{local}");
        }
        for remote in [
            "192.0.2.7",
            "10.0.0.1",
            "2001:db8::1",
            "::ffff:192.0.2.7",
            "0.0.0.0",
        ] {
            assert!(!from_this_machine(remote.parse().unwrap()), "{remote}");
        }
    }
}
