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
    // Where this process runs every `$connect` and `$disconnect` (the local gateway) a place is
    // taken from its own count, under one lock: exact, however many handshakes of one user come
    // at once. Elsewhere (Lambda) the registry is read: a handshake racing another of the same
    // user between that read and its append may pass with one place left.
    let open = match &routes.callers {
        Some(callers) => callers
            .reserve(&connection, &user, routes.max_connections_per_user)
            .err(),
        None => match routes.directory.open_connections(Some(&user)).await {
            Ok(open) => (open.len() >= routes.max_connections_per_user).then_some(open.len()),
            Err(error) => {
                tracing::error!(%connection, %error, "could not count the user's connections");
                return status(500, "Internal Server Error");
            }
        },
    };
    if let Some(open) = open {
        tracing::info!(%connection, %user, open, "connection refused: too many for this user");
        return status(
            429,
            &format!("Too Many Requests: {user} has {open} connections open, the most allowed"),
        );
    }
    let body = EventBody::Connected {
        connection: connection.clone(),
        user: user.clone(),
        source_ip: request.request_context.identity.source_ip.clone(),
        node: routes.node.clone(),
    };
    match routes.log.append(body, Expect::Seq(1)).await {
        Ok(_) => {
            tracing::info!(%connection, %user, "connected");
            status(200, "Connected")
        }
        Err(error) => {
            if let Some(callers) = &routes.callers {
                callers.closed(&connection);
            }
            tracing::error!(%connection, %error, "could not record the connection");
            status(500, "Internal Server Error")
        }
    }
}
