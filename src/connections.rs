//! A connection's end, as the log records it: the one operation both the `$disconnect` route
//! and the fan-out (a post answered 410 Gone) perform, through the ports.
//!
//! A connection's stream has two events: seq 1 `connected`, seq 2 `disconnected`. Appending
//! seq 2 with an expected-seq check means it is closed exactly once, whoever notices first; the
//! second to try changes nothing. Neither caller knows about the other: the route handler does
//! not deliver, and the fan-out does not call a route.

use crate::domain::{ConnectionId, DisconnectReason, EventBody, Expect};
use crate::ports::{Directory, EventLog, StoreError};

/// Appends the connection's `disconnected` event unless it is already closed or unknown.
pub async fn close(
    log: &dyn EventLog,
    directory: &dyn Directory,
    connection: &ConnectionId,
    reason: DisconnectReason,
) -> Result<(), StoreError> {
    let Some(record) = directory.connection(connection).await? else {
        return Ok(());
    };
    if !record.open {
        return Ok(());
    }
    let body = EventBody::Disconnected {
        connection: connection.clone(),
        user: record.user.clone(),
        reason,
    };
    match log.append(body, Expect::Seq(2)).await {
        Ok(_) => {
            tracing::info!(%connection, user = %record.user, ?reason, "disconnected");
            Ok(())
        }
        Err(StoreError::Conflict { .. }) => Ok(()),
        Err(error) => Err(error),
    }
}
