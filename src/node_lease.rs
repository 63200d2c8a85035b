//! A `palaver serve` node's lease on a store it shares with other nodes (DynamoDB), and the
//! sweep that closes the connections of a node that died.
//!
//! Each node renews its own lease every third of its length and reads everyone's. A lease that
//! lapsed is a node that stopped without closing its connections (killed, its machine gone) and
//! has not come back — one that restarts closes its own at once. Its users would otherwise stay
//! "online", with their connections counting toward their caps, until the rows expire hours
//! later; so the first node to see the lapse closes them and removes the lease. Each close is
//! the append of seq 2 to the connection's stream: whoever comes first closes it, and a second
//! node sweeping at the same moment changes nothing. Only connections opened before the lease
//! ran out are closed: a node that comes back just then keeps the ones it opened since.
//!
//! A node cut off from the store for longer than its lease finds its lease gone when it renews:
//! its connections were closed under it. It closes their sockets — clients reconnect and replay
//! with `joinRoom{after}` — and claims a lease again.

use crate::connections;
use crate::domain::DisconnectReason;
use crate::ports::{NodeLeases, Store};
use std::sync::Arc;
use std::time::Duration;

/// How long a node's lease lasts unless set (`--node-lease`): how long the users of a node that
/// died stay "online" at most, plus a third of it for the next sweep.
pub const DEFAULT_LEASE: Duration = Duration::from_secs(30);

/// The shortest lease: renewals every third of it must not crowd the store.
pub const MIN_LEASE: Duration = Duration::from_secs(1);

/// A node's lease, and what it does to keep it.
pub struct Lease {
    pub store: Store,
    pub leases: Arc<dyn NodeLeases>,
    pub node: String,
    pub length: Duration,
}

impl Lease {
    fn until(&self) -> chrono::DateTime<chrono::Utc> {
        crate::domain::event::now()
            + chrono::TimeDelta::from_std(self.length).unwrap_or(chrono::TimeDelta::MAX)
    }

    /// Takes the node's lease, as it starts.
    pub async fn claim(&self) -> Result<(), crate::ports::StoreError> {
        self.leases.claim(&self.node, self.until()).await
    }

    /// Renews the lease and sweeps the others', every third of its length, for as long as the
    /// process runs. `lost` is called when the lease was found gone (see the module's doc).
    pub async fn keep(self, lost: impl Fn() + Send) {
        let mut tick = tokio::time::interval(self.length / 3);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        loop {
            tick.tick().await;
            match self.leases.renew(&self.node, self.until()).await {
                Ok(true) => {}
                Ok(false) => {
                    tracing::warn!(
                        node = %self.node,
                        "this node's lease lapsed and other nodes closed its connections: \
                         closing their sockets"
                    );
                    lost();
                    if let Err(error) = self.claim().await {
                        tracing::warn!(node = %self.node, %error, "could not claim a lease");
                    }
                }
                Err(error) => {
                    tracing::warn!(node = %self.node, %error, "could not renew this node's lease");
                }
            }
            self.sweep().await;
        }
    }

    /// Closes the connections of every other node whose lease lapsed, and removes its lease.
    async fn sweep(&self) {
        let leases = match self.leases.leases().await {
            Ok(leases) => leases,
            Err(error) => {
                tracing::warn!(%error, "could not read the nodes' leases");
                return;
            }
        };
        let now = crate::domain::event::now();
        let lapsed: Vec<_> = leases
            .into_iter()
            .filter(|(node, until)| *node != self.node && *until <= now)
            .collect();
        for (node, until) in lapsed {
            let held = match self.store.directory.open_connections_held_by(&node).await {
                Ok(open) => open
                    .into_iter()
                    .filter(|c| c.connected_at <= until)
                    .collect(),
                Err(error) => {
                    tracing::warn!(%node, %error, "could not read a lapsed node's connections");
                    continue;
                }
            };
            let log = self.store.log.as_ref();
            match connections::close_records(log, held, DisconnectReason::ServerStopped).await {
                Ok(closed) => {
                    tracing::warn!(
                        %node,
                        closed,
                        "a node's lease lapsed: closed its connections"
                    );
                    if let Err(error) = self.leases.remove(&node, until).await {
                        tracing::warn!(%node, %error, "could not remove a lapsed lease");
                    }
                }
                Err(error) => {
                    tracing::warn!(%node, %error, "could not close a lapsed node's connections");
                }
            }
        }
    }
}
