//! The local gateway: what API Gateway does for a WebSocket API, in one axum server.
//!
//! - `/` — WebSocket connections (routes selected by `action`), or the chat page for a browser;
//! - `/@connections/{id}` and `/{stage}/@connections/{id}` — the management API;
//! - `/admin/...` — operator queries behind a bearer token;
//! - `/metrics` (behind the same token when one is set), `/healthz`, `/readyz`.

mod admin;
pub mod admission;
pub mod http;
pub mod hub;
pub mod lifetime;
mod management;
mod ops;
mod outbox;
mod page;
pub mod rate;
pub mod sigv4;
mod websocket;
mod wire;

use crate::handlers::Routes;
use crate::ports::Store;
use axum::Router;
use axum::routing::get;
use hub::Hub;
use std::sync::Arc;

/// What every request of the local gateway shares.
pub struct GatewayState {
    pub routes: Routes,
    pub hub: Arc<Hub>,
    pub store: Store,
    /// `None` turns the admin endpoints off (every call answers 401).
    pub admin_token: Option<String>,
    /// The stage name put in route requests (`requestContext.stage`).
    pub stage: String,
    /// Frames per second each connection may send (burst twice that); 0 = no limit.
    pub rate_limit: u32,
    /// When connections are closed for idleness or age.
    pub lifetime: lifetime::Lifetime,
    /// The key pair management requests must be signed with (SigV4); `None`: only requests
    /// from this machine are served.
    pub management_keys: Option<sigv4::ManagementKeys>,
    /// Caps on open connections and on how fast one address opens them.
    pub admission: admission::Admission,
    /// Renders `/metrics`; `None` when no recorder was installed.
    pub metrics: Option<metrics_exporter_prometheus::PrometheusHandle>,
    /// How far the local tail has delivered; `None` where none runs (DynamoDB).
    pub fanout: Option<Arc<crate::fanout::tail::Progress>>,
    /// `/readyz` answers 503 while the fan-out is further behind the log than this.
    pub ready_max_lag: std::time::Duration,
}

/// The gateway's routes.
pub fn router(state: Arc<GatewayState>) -> Router {
    let connections = get(management::get)
        .post(management::post)
        .delete(management::delete);
    let management = Router::new()
        .route("/@connections/{id}", connections.clone())
        .route("/{stage}/@connections/{id}", connections)
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            management::guard,
        ));
    let admin = Router::new()
        .route("/admin/rooms", get(admin::rooms))
        .route("/admin/rooms/{room}/members", get(admin::members))
        .route("/admin/rooms/{room}/history", get(admin::history))
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            admin::guard,
        ));
    let metrics = Router::new()
        .route("/metrics", get(ops::metrics))
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            admin::guard_if_set,
        ));
    Router::new()
        .route("/", get(websocket::root))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(ops::readyz))
        .merge(metrics)
        .merge(management)
        .merge(admin)
        .with_state(state)
}
