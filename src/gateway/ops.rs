//! What operators' tools ask the gateway: `GET /metrics` (Prometheus text) and `GET /readyz`.
//! `/healthz` only says the process answers; `/readyz` says whether it can do its job: the store
//! answers, and the fan-out is not further behind the log than `--ready-max-lag`.

use super::GatewayState;
use crate::ports::{StoreError, StoreResult};
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use std::sync::Arc;
use std::time::Duration;

/// How far the fan-out is behind the log.
struct Lag {
    /// Log positions committed but not delivered.
    events: u64,
    /// Age of the oldest of them (zero when caught up).
    behind: Duration,
}

/// `GET /metrics`: every counter of [`crate::metrics`], with the gauges read now.
pub async fn metrics(State(state): State<Arc<GatewayState>>) -> Response {
    let Some(handle) = &state.metrics else {
        return (StatusCode::NOT_FOUND, "metrics are off\n").into_response();
    };
    metrics::gauge!(crate::metrics::CONNECTIONS_OPEN).set(state.hub.len() as f64);
    if let Ok(Some(lag)) = lag(&state).await {
        metrics::gauge!(crate::metrics::FANOUT_LAG_EVENTS).set(lag.events as f64);
        metrics::gauge!(crate::metrics::FANOUT_LAG_SECONDS).set(lag.behind.as_secs_f64());
    }
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        handle.render(),
    )
        .into_response()
}

/// How long `/readyz` waits for the store: one that does not answer by then (its network gone,
/// the SDK still retrying) cannot serve, and a load balancer's health check must hear so before
/// its own timeout.
const READY_PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// `GET /readyz`: 200 when the store answers, takes writes, and the fan-out keeps up; 503
/// saying why not.
pub async fn readyz(State(state): State<Arc<GatewayState>>) -> (StatusCode, String) {
    let probes = async {
        let lag = lag(&state).await?;
        if let Err(error) = state.store.log.check_writes().await {
            return Ok(Err(error));
        }
        Ok::<_, StoreError>(Ok(lag))
    };
    let Ok(lag) = tokio::time::timeout(READY_PROBE_TIMEOUT, probes).await else {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "the store does not answer within {} s\n",
                READY_PROBE_TIMEOUT.as_secs()
            ),
        );
    };
    match lag {
        Err(error) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("the store does not answer: {error}\n"),
        ),
        Ok(Err(error)) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("the store does not take writes: {error}\n"),
        ),
        Ok(Ok(Some(lag))) if lag.behind > state.ready_max_lag => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "the fan-out is {:.1} s ({} events) behind the log; ready at {} s\n",
                lag.behind.as_secs_f64(),
                lag.events,
                state.ready_max_lag.as_secs()
            ),
        ),
        Ok(Ok(_)) => (StatusCode::OK, "ready\n".to_owned()),
    }
}

/// Asks the store how far the local tail is behind: the first undelivered event is read, which
/// also shows the store answers. `None` where no local tail runs (DynamoDB: its stream's
/// iterator age is the lag, in CloudWatch); the store is still asked something.
async fn lag(state: &GatewayState) -> StoreResult<Option<Lag>> {
    let (Some(feed), Some(progress)) = (&state.store.feed, &state.fanout) else {
        state.store.answers().await?;
        return Ok(None);
    };
    let delivered = progress.delivered();
    let committed = *feed.watch().borrow();
    let oldest = feed.read_all(delivered, 1).await?;
    let behind = oldest
        .first()
        .filter(|_| committed > delivered)
        .and_then(|(_, event)| (crate::domain::event::now() - event.at).to_std().ok())
        .unwrap_or_default();
    Ok(Some(Lag {
        events: committed.saturating_sub(delivered),
        behind,
    }))
}
