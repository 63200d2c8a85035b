//! `$disconnect`: record that the connection closed. It may also have been found gone by the
//! fan-out first; the connection stream's seq 2 can be written only once, so whoever comes
//! second changes nothing.

use super::{Routes, status};
use crate::domain::{ConnectionId, DisconnectReason, EventBody, Expect};
use crate::ports::{Directory, EventLog, StoreError};
use aws_lambda_events::apigw::ApiGatewayProxyResponse;

pub(super) async fn handle(routes: &Routes, connection: ConnectionId) -> ApiGatewayProxyResponse {
    match close(
        routes.log.as_ref(),
        routes.directory.as_ref(),
        &connection,
        DisconnectReason::Closed,
    )
    .await
    {
        Ok(()) => status(200, "Disconnected"),
        Err(error) => {
            tracing::error!(%connection, %error, "could not record the disconnect");
            status(500, "Internal Server Error")
        }
    }
}

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
