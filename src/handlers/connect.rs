//! `$connect`: check the token, then record the connection. A refused token is an HTTP 401 on
//! the handshake and leaves no trace in the log.

use super::{Routes, status};
use crate::domain::{ConnectionId, EventBody, Expect};
use aws_lambda_events::apigw::{ApiGatewayProxyResponse, ApiGatewayWebsocketProxyRequest};

pub(super) async fn handle(
    routes: &Routes,
    connection: ConnectionId,
    request: &ApiGatewayWebsocketProxyRequest,
) -> ApiGatewayProxyResponse {
    let token = request.query_string_parameters.first("token");
    let user = match routes.identity.verify(token) {
        Ok(user) => user,
        Err(error) => {
            tracing::info!(%connection, %error, "connection refused");
            return status(401, &format!("Unauthorized: {error}"));
        }
    };
    // Counted from this process's own connections where it runs every `$connect` (no read),
    // from the registry otherwise. Approximate under a burst of one user's handshakes at once.
    let open = match &routes.callers {
        Some(callers) => Ok(callers.open_of(&user)),
        None => routes
            .directory
            .open_connections(Some(&user))
            .await
            .map(|open| open.len()),
    };
    match open {
        Ok(open) if open >= routes.max_connections_per_user => {
            tracing::info!(%connection, %user, open, "connection refused: too many for this user");
            return status(
                429,
                &format!("Too Many Requests: {user} has {open} connections open, the most allowed"),
            );
        }
        Ok(_) => {}
        Err(error) => {
            tracing::error!(%connection, %error, "could not count the user's connections");
            return status(500, "Internal Server Error");
        }
    }
    let body = EventBody::Connected {
        connection: connection.clone(),
        user: user.clone(),
        source_ip: request.request_context.identity.source_ip.clone(),
        node: routes.node.clone(),
    };
    match routes.log.append(body, Expect::Seq(1)).await {
        Ok(_) => {
            if let Some(callers) = &routes.callers {
                callers.opened(&connection, &user);
            }
            tracing::info!(%connection, %user, "connected");
            status(200, "Connected")
        }
        Err(error) => {
            tracing::error!(%connection, %error, "could not record the connection");
            status(500, "Internal Server Error")
        }
    }
}
