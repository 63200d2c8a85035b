//! `palaver serve`: the store, the route handlers, the log tail driving the fan-out, and the
//! local gateway, wired together in one process.
//!
//! What drives the fan-out depends on the store: memory and SQLite are tailed in commit order
//! ([`tail`]); DynamoDB's events table is followed through its change stream
//! ([`crate::fanout::change_stream`]), which hands each batch to the same [`StreamFanOut`] the
//! Lambda fan-out runs, posting to the local gateway instead of API Gateway.

use crate::fanout::change_stream::ChangeSource;
use crate::fanout::stream::StreamFanOut;
use crate::fanout::{FanOut, Holder, Roster, tail};
use crate::gateway::hub::{CloseReason, Hub};
use crate::gateway::{GatewayState, router};
use crate::handlers::Routes;
use crate::identity::Identity;
use crate::node_lease::Lease;
use crate::ports::Store;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;

/// How `serve` was asked to run: what `main` wires up, and the operator's settings.
pub struct ServeConfig {
    pub listener: TcpListener,
    pub store: Store,
    pub identity: Identity,
    pub admin_token: Option<String>,
    /// The change stream that wakes the fan-out, for a store without a local feed (DynamoDB).
    pub changes: Option<ChangeSource>,
    /// The key pair management requests must be signed with; `None`: this machine only.
    pub management_keys: Option<crate::gateway::sigv4::ManagementKeys>,
    /// This node's name, recorded with every connection it opens (`--node-id`).
    pub node: String,
    /// Renders `/metrics` (the recorder `main` installed); `None`: off.
    pub metrics: Option<metrics_exporter_prometheus::PrometheusHandle>,
    pub settings: ServeSettings,
}

/// What an operator sets for `serve`, with flags or the environment (README, "Configuration").
pub struct ServeSettings {
    /// Frames per second each connection may send (burst twice that); 0 = no limit.
    pub rate_limit: u32,
    /// Header timeout, idle timeout and maximum age of a connection.
    pub lifetime: crate::gateway::lifetime::Lifetime,
    /// How long after its append each event is delivered, at the earliest: zero, or a lag
    /// like the AWS stream's to try clients against.
    pub fanout_delay: Duration,
    /// Caps on open connections and on new ones per source address.
    pub admission: crate::gateway::admission::Admission,
    /// Rooms one user may be a member of at once.
    pub max_rooms_per_user: usize,
    /// Connections one user may have open at once.
    pub max_connections_per_user: usize,
    /// How long a closed connection's events and registry row are kept; `None`: for ever.
    pub connection_retention: Option<Duration>,
    /// `/readyz` answers 503 while the fan-out is further behind the log than this.
    pub ready_max_lag: Duration,
    /// How long this node's lease on a store it shares with other nodes lasts: how soon,
    /// after it dies, another node closes its connections (`--node-lease`).
    pub node_lease: Duration,
}

/// The defaults `palaver serve` documents.
impl Default for ServeSettings {
    fn default() -> Self {
        use crate::domain::limits;
        ServeSettings {
            rate_limit: crate::gateway::rate::DEFAULT_PER_SECOND,
            lifetime: Default::default(),
            fanout_delay: Duration::ZERO,
            admission: Default::default(),
            max_rooms_per_user: limits::DEFAULT_MAX_ROOMS_PER_USER,
            max_connections_per_user: limits::DEFAULT_MAX_CONNECTIONS_PER_USER,
            connection_retention: Some(limits::DEFAULT_CONNECTION_RETENTION),
            ready_max_lag: DEFAULT_READY_MAX_LAG,
            node_lease: crate::node_lease::DEFAULT_LEASE,
        }
    }
}

/// `/readyz` answers 503 past this lag, unless set (`--ready-max-lag`).
pub const DEFAULT_READY_MAX_LAG: Duration = Duration::from_secs(30);

/// Runs until ctrl-c or SIGTERM.
pub async fn serve(config: ServeConfig) -> std::io::Result<()> {
    let ServeConfig {
        listener,
        store,
        identity,
        admin_token,
        changes,
        management_keys,
        node,
        metrics,
        settings,
    } = config;
    let ServeSettings {
        rate_limit,
        lifetime,
        fanout_delay,
        admission,
        max_rooms_per_user,
        max_connections_per_user,
        connection_retention,
        ready_max_lag,
        node_lease,
    } = settings;
    let hub = Hub::new();
    let routes = Routes::new(&store, hub.clone(), identity)
        .on_node(node.clone())
        .remembering_callers()
        .with_max_rooms_per_user(max_rooms_per_user)
        .with_max_connections_per_user(max_connections_per_user);

    // The connections an earlier run of this node held went with it. On a store only this
    // process writes (memory, SQLite) that is every connection recorded as open; on one it
    // shares (DynamoDB) those recorded as this node's. Closed before anything is delivered, so
    // that presence is right at once.
    let held_by = store.feed.is_none().then_some(node.as_str());
    match crate::connections::close_all_open(
        store.log.as_ref(),
        store.directory.as_ref(),
        held_by,
        crate::domain::DisconnectReason::ServerStopped,
    )
    .await
    {
        Ok(0) => {}
        Ok(closed) => tracing::info!(closed, %node, "closed the connections of the previous run"),
        Err(error) => tracing::error!(%error, "could not close the previous run's connections"),
    }

    let progress = if let Some(feed) = store.feed.clone() {
        let fanout = FanOut::new(&store, hub.clone()).with_delay(fanout_delay);
        // Connections of an earlier run are gone with it; new ones replay with joinRoom{after}.
        let start = tail::current_position(feed.as_ref()).await;
        let roster = Roster::load(store.directory.as_ref())
            .await
            .map_err(std::io::Error::other)?;
        Some(tail::start(feed, fanout, roster, start))
    } else if let Some(source) = changes {
        // Other nodes (and API Gateway) may share the store: this node delivers to the
        // connections it holds, following the stream with positions of its own.
        let fanout = FanOut::new(&store, hub.clone())
            .with_delay(fanout_delay)
            .with_holder(Holder::Node(node.clone()));
        let stream_fanout = StreamFanOut::following_from_now(&store, fanout);
        // Positioned before the gateway accepts anyone, so no append through it is missed.
        let tail = source.start().await.map_err(std::io::Error::other)?;
        tokio::spawn(tail.run(stream_fanout));
        if let Some(leases) = store.nodes.clone() {
            let lease = Lease {
                store: store.clone(),
                leases,
                node: node.clone(),
                length: node_lease,
            };
            lease.claim().await.map_err(std::io::Error::other)?;
            let hub = hub.clone();
            tokio::spawn(lease.keep(move || hub.close_all(CloseReason::Forgotten)));
        }
        None
    } else {
        tracing::warn!("this store has no local feed: nothing will be broadcast");
        None
    };

    if let (Some(retention), Some(store)) = (connection_retention, store.retention.clone()) {
        tokio::spawn(crate::connections::forget_closed(store, retention));
    }

    let state = Arc::new(GatewayState {
        routes,
        hub: hub.clone(),
        store,
        admin_token,
        stage: "local".to_owned(),
        rate_limit,
        lifetime,
        management_keys,
        admission,
        metrics,
        fanout: progress,
        ready_max_lag,
    });
    let header_timeout = state.lifetime.header_read;
    let closing = hub.clone();
    crate::gateway::http::serve(listener, router(state), header_timeout, async move {
        shutdown().await;
        closing.close_all(CloseReason::ShuttingDown);
    })
    .await?;
    // Every socket gets its close frame and every `$disconnect` is logged before the process
    // exits: returning now would drop the sessions' tasks halfway.
    if tokio::time::timeout(SHUTDOWN_GRACE, hub.all_ended())
        .await
        .is_err()
    {
        tracing::warn!(
            left = hub.sessions(),
            "connections still closing at the shutdown deadline"
        );
    }
    Ok(())
}

/// How long a stopping server waits for its connections to close: a closing connection has
/// [`crate::gateway::lifetime::CLOSE_LINGER`] (2 s) to take what is left and answer the close,
/// then its `$disconnect` is logged.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

async fn shutdown() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! { () = ctrl_c => {}, () = term => {} }
    tracing::info!("shutting down");
}
