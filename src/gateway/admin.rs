//! The admin endpoints: what `palaver rooms|members|history` print, as JSON over HTTP, behind
//! `Authorization: Bearer $PALAVER_ADMIN_TOKEN`.

use super::GatewayState;
use crate::domain::RoomName;
use crate::domain::limits::{DEFAULT_HISTORY_LIMIT, MAX_HISTORY_LIMIT};
use crate::operator;
use axum::Json;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::json;
use std::sync::Arc;

#[derive(Deserialize)]
pub struct HistoryQuery {
    after: Option<u64>,
    limit: Option<usize>,
}

fn authorized(state: &GatewayState, headers: &HeaderMap) -> bool {
    let presented = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
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

fn reply<T: serde::Serialize>(result: Result<T, crate::ports::StoreError>) -> Response {
    match result {
        Ok(body) => Json(body).into_response(),
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

pub async fn rooms(State(state): State<Arc<GatewayState>>, headers: HeaderMap) -> Response {
    if !authorized(&state, &headers) {
        return unauthorized();
    }
    reply(operator::rooms(&state.store).await)
}

pub async fn members(
    State(state): State<Arc<GatewayState>>,
    headers: HeaderMap,
    Path(room): Path<String>,
) -> Response {
    if !authorized(&state, &headers) {
        return unauthorized();
    }
    match RoomName::parse(&room) {
        Ok(room) => reply(operator::members(&state.store, &room).await),
        Err(error) => bad_room(error),
    }
}

pub async fn history(
    State(state): State<Arc<GatewayState>>,
    headers: HeaderMap,
    Path(room): Path<String>,
    Query(query): Query<HistoryQuery>,
) -> Response {
    if !authorized(&state, &headers) {
        return unauthorized();
    }
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
