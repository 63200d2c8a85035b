//! API Gateway's management API (`@connections`), so `aws-sdk-apigatewaymanagement` pointed at
//! the local server works as it does against AWS: POST delivers, GET describes, DELETE closes,
//! and an unknown or closed connection answers 410 with `x-amzn-ErrorType: GoneException`
//! (the SDK reads the error kind from that header).
//!
//! Served at `/@connections/{id}` and `/{stage}/@connections/{id}`. Like everything the local
//! server offers it is unauthenticated: bind it to loopback (the default).

use super::GatewayState;
use super::hub::CloseReason;
use super::wire;
use crate::domain::ConnectionId;
use crate::domain::event::rfc3339;
use crate::domain::limits::MAX_POST_BYTES;
use axum::Json;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderName, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::json;
use std::collections::HashMap;
use std::sync::Arc;

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

/// `postToConnection`.
pub async fn post(
    State(state): State<Arc<GatewayState>>,
    Path(params): Params,
    body: Bytes,
) -> Response {
    let id = connection(&params);
    if body.len() > MAX_POST_BYTES {
        return aws_error(
            StatusCode::PAYLOAD_TOO_LARGE,
            "PayloadTooLargeException",
            format!("payloads are limited to {MAX_POST_BYTES} bytes"),
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
