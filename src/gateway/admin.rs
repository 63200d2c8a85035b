//! The admin endpoints: what `palaver rooms|members|history` print, as JSON over HTTP, behind
//! `Authorization: Bearer $PALAVER_ADMIN_TOKEN`.

use super::GatewayState;
use crate::domain::RoomName;
use crate::domain::limits::{DEFAULT_HISTORY_LIMIT, MAX_HISTORY_LIMIT};
use crate::operator;
use axum::Json;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::json;
use std::sync::Arc;

#[derive(Deserialize)]
pub struct HistoryQuery {
    after: Option<u64>,
    limit: Option<usize>,
}

/// Lets a request through only with the admin token, before anything of it is read: a caller
/// without the token learns nothing, not even whether its path or query would have been valid.
pub async fn guard(
    State(state): State<Arc<GatewayState>>,
    headers: HeaderMap,
    request: Request,
    next: Next,
) -> Response {
    if state.admin_token.is_none() {
        return switched_off();
    }
    if authorized(&state, &headers) {
        next.run(request).await
    } else {
        unauthorized()
    }
}

/// The same guard for what is open without a token (`/metrics`): checked only when
/// `PALAVER_ADMIN_TOKEN` is set.
pub async fn guard_if_set(
    state: State<Arc<GatewayState>>,
    headers: HeaderMap,
    request: Request,
    next: Next,
) -> Response {
    if state.admin_token.is_none() {
        return next.run(request).await;
    }
    guard(state, headers, request, next).await
}

fn authorized(state: &GatewayState, headers: &HeaderMap) -> bool {
    // The scheme is case-insensitive (RFC 7235 §2.1): `bearer` is `Bearer`.
    let presented = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("Bearer"))
        .map(|(_, token)| token.trim_start());
    match (presented, state.admin_token.as_deref()) {
        // Compare in constant time: the token is a password.
        (Some(p), Some(t)) => {
            p.len() == t.len()
                && p.bytes()
                    .zip(t.bytes())
                    .fold(0, |acc, (a, b)| acc | (a ^ b))
                    == 0
        }
        _ => false,
    }
}

/// No token would do: the server was started without one. Said plainly, so that whoever sent
/// the right header looks at the server's settings, not at their request.
fn switched_off() -> Response {
    (
        StatusCode::FORBIDDEN,
        Json(json!({
            "error": "the admin endpoints are off: PALAVER_ADMIN_TOKEN is not set on the server"
        })),
    )
        .into_response()
}

fn unauthorized() -> Response {
    (
        StatusCode::UNAUTHORIZED,
        [(header::WWW_AUTHENTICATE, "Bearer")],
        Json(json!({ "error": "send Authorization: Bearer $PALAVER_ADMIN_TOKEN" })),
    )
        .into_response()
}

fn bad_room(error: crate::domain::InvalidName) -> Response {
    (
        StatusCode::BAD_REQUEST,
        Json(json!({ "error": error.to_string() })),
    )
        .into_response()
}

fn reply<T: serde::Serialize>(result: Result<T, impl Into<operator::OperatorError>>) -> Response {
    match result.map_err(Into::into) {
        Ok(body) => Json(body).into_response(),
        Err(error @ operator::OperatorError::NoSuchRoom(_)) => (
            StatusCode::NOT_FOUND,
            Json(json!({ "error": error.to_string() })),
        )
            .into_response(),
        Err(error) => {
            tracing::error!(%error, "admin query failed");
            (
                StatusCode::INTERNAL_SERVER_ERROR,
                Json(json!({ "error": "the store failed; see the server log" })),
            )
                .into_response()
        }
    }
}

pub async fn rooms(State(state): State<Arc<GatewayState>>) -> Response {
    reply(operator::rooms(&state.store).await)
}

pub async fn members(State(state): State<Arc<GatewayState>>, Path(room): Path<String>) -> Response {
    match RoomName::parse(&room) {
        Ok(room) => reply(operator::members(&state.store, &room).await),
        Err(error) => bad_room(error),
    }
}

pub async fn history(
    State(state): State<Arc<GatewayState>>,
    Path(room): Path<String>,
    query: Result<Query<HistoryQuery>, QueryRejection>,
) -> Response {
    let Query(query) = match query {
        Ok(query) => query,
        Err(rejection) => {
            return (
                StatusCode::BAD_REQUEST,
                Json(json!({ "error": rejection.body_text() })),
            )
                .into_response();
        }
    };
    let limit = query
        .limit
        .unwrap_or(DEFAULT_HISTORY_LIMIT)
        .clamp(1, MAX_HISTORY_LIMIT);
    match RoomName::parse(&room) {
        Ok(room) => {
            reply(operator::history(&state.store, &room, query.after.unwrap_or(0), limit).await)
        }
        Err(error) => bad_room(error),
    }
}
