//! The fan-out: from a log event to frames on every connection that should see it.
//!
//! Driven by the log, never by a handler: locally by [`tail`], on AWS by the table's stream.
//! Each frame is serialised once and the same bytes are posted to every recipient. A recipient
//! the gateway reports gone (410) is closed in the log — which in turn tells its rooms, through
//! this same fan-out, that its user went offline if that was their last connection.

pub mod tail;

use crate::domain::{ConnectionId, DisconnectReason, Event, EventBody, ServerFrame, UserId};
use crate::handlers::close_connection;
use crate::ports::{ConnectionGateway, Directory, EventLog, PostError, Store, StoreResult};
use bytes::Bytes;
use futures_util::StreamExt;
use std::sync::Arc;

/// How many posts are in flight at once for one event.
const POST_CONCURRENCY: usize = 64;

/// What delivering one event did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Delivery {
    /// Posts that reached a connection.
    pub delivered: usize,
    /// Connections found gone and closed.
    pub gone: Vec<ConnectionId>,
    /// Posts that failed for another reason (the connection may still be there).
    pub failed: usize,
}

/// Computes recipients and posts frames.
#[derive(Clone)]
pub struct FanOut {
    log: Arc<dyn EventLog>,
    directory: Arc<dyn Directory>,
    gateway: Arc<dyn ConnectionGateway>,
}

impl FanOut {
    pub fn new(store: &Store, gateway: Arc<dyn ConnectionGateway>) -> Self {
        FanOut {
            log: store.log.clone(),
            directory: store.directory.clone(),
            gateway,
        }
    }

    /// Delivers one event. Room events go to the room's audience; a user's first connection
    /// opening or last one closing becomes a `presence` frame in each of their rooms.
    pub async fn deliver(&self, event: &Event) -> StoreResult<Delivery> {
        match &event.body {
            EventBody::Joined { room, .. }
            | EventBody::Left { room, .. }
            | EventBody::MessagePosted { room, .. } => {
                let Some(frame) = ServerFrame::of_event(event) else {
                    return Ok(Delivery::default());
                };
                let audience = self.directory.audience(room).await?;
                Ok(self.post_all(audience, frame.to_bytes()).await)
            }
            EventBody::Connected {
                connection, user, ..
            } => {
                // "First connection": this is the user's oldest open one. Judged on the current
                // registry, so a burst of connects and disconnects can at worst repeat a
                // presence frame, never leave a room believing the wrong final state.
                let open = self.directory.open_connections(Some(user)).await?;
                if open.first().map(|c| &c.id) != Some(connection) {
                    return Ok(Delivery::default());
                }
                self.presence(user, true, Some(connection)).await
            }
            EventBody::Disconnected { user, .. } => {
                if !self
                    .directory
                    .open_connections(Some(user))
                    .await?
                    .is_empty()
                {
                    return Ok(Delivery::default());
                }
                self.presence(user, false, None).await
            }
        }
    }

    async fn presence(
        &self,
        user: &UserId,
        online: bool,
        except: Option<&ConnectionId>,
    ) -> StoreResult<Delivery> {
        let mut total = Delivery::default();
        for room in self.directory.rooms_of(user).await? {
            let frame = ServerFrame::Presence {
                room: room.clone(),
                user: user.clone(),
                online,
            };
            let audience: Vec<ConnectionId> = self
                .directory
                .audience(&room)
                .await?
                .into_iter()
                // The new connection knows it is online; and on AWS it may not be open yet.
                .filter(|c| Some(c) != except)
                .collect();
            let d = self.post_all(audience, frame.to_bytes()).await;
            total.delivered += d.delivered;
            total.failed += d.failed;
            total.gone.extend(d.gone);
        }
        Ok(total)
    }

    /// Posts the same bytes to every recipient; closes the ones found gone.
    async fn post_all(&self, recipients: Vec<ConnectionId>, frame: Bytes) -> Delivery {
        let results: Vec<(ConnectionId, Result<(), PostError>)> =
            futures_util::stream::iter(recipients)
                .map(|connection| {
                    let frame = frame.clone();
                    async move {
                        let result = self.gateway.post(&connection, frame).await;
                        (connection, result)
                    }
                })
                .buffer_unordered(POST_CONCURRENCY)
                .collect()
                .await;
        let mut delivery = Delivery::default();
        for (connection, result) in results {
            match result {
                Ok(()) => delivery.delivered += 1,
                Err(PostError::Gone) => {
                    if let Err(error) = close_connection(
                        self.log.as_ref(),
                        self.directory.as_ref(),
                        &connection,
                        DisconnectReason::Gone,
                    )
                    .await
                    {
                        tracing::warn!(%connection, %error, "could not close a gone connection");
                    }
                    delivery.gone.push(connection);
                }
                Err(error) => {
                    tracing::warn!(%connection, %error, "post failed");
                    delivery.failed += 1;
                }
            }
        }
        delivery
    }
}
