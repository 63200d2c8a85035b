//! The local gateway's open connections, and its side of `postToConnection`.
//!
//! Each connection has a bounded outbox drained by its socket writer. A post never waits: if a
//! connection's outbox is full its reader cannot keep up, so it is closed — one slow client must
//! not hold up a room. It recovers by reconnecting with `joinRoom{after}`, which replays from
//! the log what it missed.

use super::outbox::{Bound, Outbox};
use super::wire;
use crate::domain::ConnectionId;
use crate::ports::{ConnectionGateway, PostError};
use async_trait::async_trait;
use bytes::Bytes;
use chrono::{DateTime, Utc};
use parking_lot::RwLock;
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use tokio::sync::Notify;

/// What may wait for one connection before it counts as too slow, when its socket is not taking
/// more (the client is not reading).
pub const OUTBOX: Bound = Bound {
    frames: 1024,
    bytes: 1024 * 1024,
};
/// What may wait for one connection before it is closed in any case. Between the two bounds the
/// socket is still taking what it is given: the server's writers are behind, not the client, and
/// a healthy client must not be cut off because the server is busy.
pub const OUTBOX_HARD: Bound = Bound {
    frames: 4 * OUTBOX.frames,
    bytes: 4 * OUTBOX.bytes,
};
/// An answer to the connection's own request (or a pong) waits while this much is queued: a
/// client that asks faster than it reads is slowed down — the session stops reading its frames
/// until the answer goes in — rather than queued for without end. One answer is at most a page
/// (`MAX_PAGE_BYTES`), so what waits for a connection stays under [`OUTBOX_HARD`] whatever it
/// asks for; one that reads nothing at all is closed by the writer's deadline.
pub const ANSWERS: Bound = Bound {
    frames: OUTBOX.frames,
    bytes: 256 * 1024,
};

/// Why the server closed a connection: becomes the WebSocket close frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CloseReason {
    /// Its outbox overflowed.
    TooSlow,
    /// It kept sending after being rate limited.
    Flooding,
    /// `DELETE @connections/{id}`.
    Deleted,
    /// The server is stopping.
    ShuttingDown,
    /// Its socket failed: nothing more can be written to it.
    Lost,
    /// It sent a frame over the hard limit.
    TooBig,
    /// It broke the WebSocket protocol (bad framing, a bad opcode, a masking error).
    ProtocolError,
    /// It sent a text frame that is not UTF-8.
    BadData,
    /// Nothing came from the client for the idle timeout.
    Idle,
    /// It reached the maximum connection age.
    TooOld,
    /// The store no longer knows it (a request answered `gone`).
    Forgotten,
}

impl CloseReason {
    /// The WebSocket close code and reason text.
    pub fn frame(self) -> (u16, &'static str) {
        match self {
            CloseReason::TooSlow => (1008, "too slow: reconnect and rejoin with after"),
            CloseReason::Flooding => (1008, "flooding"),
            CloseReason::Deleted => (1000, "closed by the server"),
            CloseReason::ShuttingDown => (1001, "server shutting down"),
            CloseReason::Lost => (1001, "connection lost"),
            CloseReason::TooBig => (1009, "frame too big"),
            CloseReason::ProtocolError => (1002, "protocol error"),
            CloseReason::BadData => (1007, "text frame is not UTF-8"),
            CloseReason::Idle => (1001, "idle timeout: reconnect"),
            CloseReason::TooOld => (1001, "maximum connection age reached: reconnect"),
            CloseReason::Forgotten => (1001, "connection gone: reconnect"),
        }
    }
}

/// One open connection.
pub struct Link {
    pub id: ConnectionId,
    pub connected_at: DateTime<Utc>,
    pub source_ip: IpAddr,
    pub user_agent: Option<String>,
    last_active_ms: AtomicI64,
    /// Wire frames waiting for the socket writer.
    pub outbox: Outbox,
    /// The writer's last write found the socket full: the client is not reading.
    socket_full: AtomicBool,
    /// The WebSocket upgrade has completed. Until then posts answer 410, as on API Gateway.
    open: AtomicBool,
    closing: AtomicBool,
    close_reason: RwLock<Option<CloseReason>>,
    closed: Notify,
}

impl Link {
    pub fn last_active_at(&self) -> DateTime<Utc> {
        DateTime::from_timestamp_millis(self.last_active_ms.load(Ordering::Relaxed))
            .unwrap_or(self.connected_at)
    }

    /// The client sent something.
    pub fn touch(&self) {
        self.last_active_ms
            .store(Utc::now().timestamp_millis(), Ordering::Relaxed);
    }

    /// Asks the connection's tasks to close it; the first reason given wins.
    pub fn close(&self, reason: CloseReason) {
        if !self.closing.swap(true, Ordering::AcqRel) {
            *self.close_reason.write() = Some(reason);
        }
        self.closed.notify_waiters();
        self.closed.notify_one();
    }

    pub fn is_closing(&self) -> bool {
        self.closing.load(Ordering::Acquire)
    }

    pub fn close_reason(&self) -> Option<CloseReason> {
        *self.close_reason.read()
    }

    /// Resolves once [`Link::close`] was called.
    pub async fn closed(&self) {
        loop {
            let notified = self.closed.notified();
            if self.is_closing() {
                return;
            }
            notified.await;
        }
    }

    /// Records whether the writer found the socket full.
    pub fn socket_full(&self, full: bool) {
        self.socket_full.store(full, Ordering::Relaxed);
    }

    /// The handshake is answered (101): frames may be posted to it from now on.
    pub fn opened(&self) {
        self.open.store(true, Ordering::Release);
    }

    /// Queues a wire frame without waiting; a full outbox closes the connection. Before its
    /// handshake is answered, and once closing, the connection is gone to posters.
    pub fn push(&self, frame: Bytes) -> Result<(), PostError> {
        if self.is_closing() {
            return Err(PostError::Gone);
        }
        if !self.open.load(Ordering::Acquire) {
            return Err(PostError::Opening);
        }
        let bound = if self.socket_full.load(Ordering::Relaxed) {
            OUTBOX
        } else {
            OUTBOX_HARD
        };
        if self.outbox.try_push(frame, bound).is_err() {
            tracing::warn!(connection = %self.id, "outbox full: closing a slow connection");
            self.close(CloseReason::TooSlow);
            return Err(PostError::Gone);
        }
        Ok(())
    }

    /// Moves the answer in `slot` (to the connection's own request) into the outbox once there
    /// is room under [`ANSWERS`]. Cancel-safe: the session waits for this, its timers and its
    /// close at once, and an answer not yet queued stays in `slot`.
    pub async fn answer_from(&self, slot: &mut Option<Bytes>) {
        self.outbox.push_from(slot, ANSWERS).await
    }

    /// [`Link::answer_from`] without waiting: the answer goes in now if there is room, and
    /// stays in `slot` otherwise.
    pub fn answer_now(&self, slot: &mut Option<Bytes>) {
        self.outbox.try_push_from(slot, ANSWERS);
    }
}

/// Every open connection of this gateway.
pub struct Hub {
    links: RwLock<HashMap<ConnectionId, Arc<Link>>>,
    /// Connections registered whose session has not ended — its socket closed and its
    /// `$disconnect` logged — for a shutdown to wait on ([`Hub::all_ended`]).
    sessions: tokio::sync::watch::Sender<usize>,
}

impl Default for Hub {
    fn default() -> Self {
        Hub {
            links: RwLock::default(),
            sessions: tokio::sync::watch::Sender::new(0),
        }
    }
}

impl Hub {
    pub fn new() -> Arc<Hub> {
        Arc::new(Hub::default())
    }

    /// A registered connection's session ended: its socket is closed, and its `$disconnect`
    /// logged (or its `$connect` refused).
    pub fn ended(&self) {
        self.sessions.send_modify(|n| *n = n.saturating_sub(1));
    }

    /// Resolves once every registered connection's session has ended.
    pub async fn all_ended(&self) {
        let mut sessions = self.sessions.subscribe();
        let _ = sessions.wait_for(|n| *n == 0).await;
    }

    /// Sessions not ended yet.
    pub fn sessions(&self) -> usize {
        *self.sessions.borrow()
    }

    /// Registers a connection before `$connect` runs. Until its upgrade completes a post to it
    /// is refused, as API Gateway refuses it in that window (with 410, which the management API
    /// here answers too); the fan-out is told it is still opening, not gone.
    ///
    /// `None` if `max` connections are registered already: counted and registered under one lock,
    /// so that handshakes at once cannot take more places than there are. A connection stays
    /// registered, and counted, until its socket is gone (closing ones too).
    pub fn register(
        &self,
        id: ConnectionId,
        source_ip: IpAddr,
        user_agent: Option<String>,
        max: usize,
    ) -> Option<Arc<Link>> {
        let connected_at = crate::domain::event::now();
        let link = Arc::new(Link {
            id: id.clone(),
            connected_at,
            source_ip,
            user_agent,
            last_active_ms: AtomicI64::new(connected_at.timestamp_millis()),
            outbox: Outbox::default(),
            socket_full: AtomicBool::new(false),
            open: AtomicBool::new(false),
            closing: AtomicBool::new(false),
            close_reason: RwLock::new(None),
            closed: Notify::new(),
        });
        let mut links = self.write();
        if links.len() >= max {
            return None;
        }
        links.insert(id, link.clone());
        self.sessions.send_modify(|n| *n += 1);
        Some(link)
    }

    pub fn remove(&self, id: &ConnectionId) {
        self.write().remove(id);
    }

    pub fn get(&self, id: &ConnectionId) -> Option<Arc<Link>> {
        self.links.read().get(id).cloned()
    }

    /// Closes every connection (on shutdown: open sockets would keep the server waiting).
    pub fn close_all(&self, reason: CloseReason) {
        let links: Vec<Arc<Link>> = self.links.read().values().cloned().collect();
        for link in links {
            link.close(reason);
        }
    }

    pub fn len(&self) -> usize {
        self.links.read().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn write(&self) -> parking_lot::RwLockWriteGuard<'_, HashMap<ConnectionId, Arc<Link>>> {
        self.links.write()
    }
}

#[async_trait]
impl ConnectionGateway for Hub {
    async fn post(&self, connection: &ConnectionId, frame: Bytes) -> Result<(), PostError> {
        let link = self.get(connection).ok_or(PostError::Gone)?;
        link.push(wire::posted(frame))
    }

    async fn close(&self, connection: &ConnectionId) -> Result<(), PostError> {
        if let Some(link) = self.get(connection) {
            link.close(CloseReason::Forgotten);
        }
        Ok(())
    }

    /// One pass under one read lock: the frame is encoded once, and every outbox gets the same
    /// shared bytes (a reference count, not a copy). Nothing here waits.
    async fn post_each(
        &self,
        recipients: &[ConnectionId],
        frame: Bytes,
    ) -> Vec<(usize, PostError)> {
        let message = wire::posted(frame);
        let links = self.links.read();
        let mut failures = Vec::new();
        for (i, connection) in recipients.iter().enumerate() {
            let posted = match links.get(connection) {
                Some(link) => link.push(message.clone()),
                None => Err(PostError::Gone),
            };
            if let Err(error) = posted {
                failures.push((i, error));
            }
        }
        failures
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_connection_is_still_opening_until_its_upgrade_completes() {
        let hub = Hub::new();
        let id = ConnectionId::new("c1");
        let link = hub
            .register(id.clone(), IpAddr::from([127, 0, 0, 1]), None, 1)
            .unwrap();
        assert!(
            hub.register(
                ConnectionId::new("c2"),
                IpAddr::from([127, 0, 0, 1]),
                None,
                1
            )
            .is_none(),
            "one place, taken"
        );
        let frame = Bytes::from_static(b"{}");
        assert!(matches!(
            hub.post(&id, frame.clone()).await,
            Err(PostError::Opening)
        ));
        link.opened();
        assert!(hub.post(&id, frame.clone()).await.is_ok());
        link.close(CloseReason::Deleted);
        assert!(matches!(hub.post(&id, frame).await, Err(PostError::Gone)));
    }
}
