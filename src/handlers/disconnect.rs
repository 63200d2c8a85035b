//! `$disconnect`: record that the connection closed. It may also have been found gone by the
//! fan-out first; [`connections::close`] makes whoever comes second change nothing.

use super::{Routes, status};
use crate::connections;
use crate::domain::{ConnectionId, DisconnectReason};
use aws_lambda_events::apigw::ApiGatewayProxyResponse;

pub(super) async fn handle(routes: &Routes, connection: ConnectionId) -> ApiGatewayProxyResponse {
    if let Some(callers) = &routes.callers {
        callers.closed(&connection);
    }
    match connections::close(
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
