//! The WebSocket routes: validate the request, append to the log, answer the sender.
//!
//! Handlers never broadcast — the fan-out does that from the log. They take and return exactly
//! what a Lambda function behind an API Gateway WebSocket API takes and returns
//! ([`ApiGatewayWebsocketProxyRequest`] → [`ApiGatewayProxyResponse`]), so the same code runs
//! in `palaver serve`'s local gateway and on AWS. A route's answer is the response body, which
//! API Gateway (and the local gateway) sends back to the caller.

mod callers;
mod connect;
mod disconnect;
mod history;
mod join;
mod leave;
mod send;
mod turn;

pub use turn::Turn;

use crate::domain::requests::{self, Rejection, Request};
use crate::domain::{ConnectionId, ErrorCode, ServerFrame, UserId};
use crate::identity::Identity;
use crate::ports::{ConnectionGateway, Directory, EventLog, PostError, Store, StoreError};
use aws_lambda_events::apigw::{ApiGatewayProxyResponse, ApiGatewayWebsocketProxyRequest};
use aws_lambda_events::encodings::Body;
use std::sync::Arc;

/// Everything the route handlers need, built once per process (or per Lambda container).
#[derive(Clone)]
pub struct Routes {
    log: Arc<dyn EventLog>,
    directory: Arc<dyn Directory>,
    gateway: Arc<dyn ConnectionGateway>,
    identity: Identity,
    /// Set when this process runs every `$connect` and `$disconnect` (the local gateway).
    callers: Option<Arc<callers::KnownCallers>>,
    /// Rooms one user may be a member of at once.
    max_rooms_per_user: usize,
    /// Connections one user may have open at once.
    max_connections_per_user: usize,
    /// The `palaver serve` node these routes run in, recorded with each `$connect`.
    node: Option<String>,
}

/// Who sent a frame: the connection and the user it was opened by.
struct Caller {
    connection: ConnectionId,
    user: UserId,
}

/// Why a route could not do what was asked.
#[derive(Debug, thiserror::Error)]
enum RouteError {
    #[error("{}", .0.message)]
    Rejected(Rejection),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("could not deliver to the caller: {0}")]
    Delivery(#[from] PostError),
    #[error("connection {0} is not open")]
    UnknownConnection(ConnectionId),
}

impl RouteError {
    fn not_member(room: &crate::domain::RoomName) -> RouteError {
        RouteError::Rejected(Rejection::new(
            ErrorCode::NotMember,
            format!("you are not a member of {room}: joinRoom first"),
        ))
    }
}

impl Routes {
    pub fn new(store: &Store, gateway: Arc<dyn ConnectionGateway>, identity: Identity) -> Self {
        Routes {
            log: store.log.clone(),
            directory: store.directory.clone(),
            gateway,
            identity,
            callers: None,
            max_rooms_per_user: crate::domain::limits::DEFAULT_MAX_ROOMS_PER_USER,
            max_connections_per_user: crate::domain::limits::DEFAULT_MAX_CONNECTIONS_PER_USER,
            node: None,
        }
    }

    /// For a `palaver serve` node: each connection it opens is recorded as held by `node`, so
    /// that the node, restarting on a store it shares, closes its own and no one else's.
    pub fn on_node(mut self, node: impl Into<String>) -> Self {
        self.node = Some(node.into());
        self
    }

    /// Caps the connections one user may have open at once (`$connect` past it is a 429).
    pub fn with_max_connections_per_user(mut self, connections: usize) -> Self {
        self.max_connections_per_user = connections;
        self
    }

    /// Caps the rooms one user may be a member of at once (`joinRoom` past it answers `limit`).
    pub fn with_max_rooms_per_user(mut self, rooms: usize) -> Self {
        self.max_rooms_per_user = rooms;
        self
    }

    /// For a gateway that runs every connection's `$connect` and `$disconnect` through these
    /// routes in this process: callers are remembered from `$connect` to `$disconnect` instead
    /// of read from the registry on every frame (see `callers.rs`). Not for Lambda.
    pub fn remembering_callers(mut self) -> Self {
        self.callers = Some(Arc::default());
        self
    }

    /// Handles one API Gateway WebSocket event, whatever its route.
    pub async fn handle(
        &self,
        request: ApiGatewayWebsocketProxyRequest,
    ) -> ApiGatewayProxyResponse {
        self.handle_in_turn(request, Turn::alone()).await
    }

    /// [`Routes::handle`] for one of several frames of a connection handled at once: an append
    /// waits for `turn` (see [`Turn`]).
    pub async fn handle_in_turn(
        &self,
        request: ApiGatewayWebsocketProxyRequest,
        turn: Turn,
    ) -> ApiGatewayProxyResponse {
        let context = &request.request_context;
        let route = context.route_key.as_deref().unwrap_or("$default");
        let connection = ConnectionId::new(context.connection_id.clone().unwrap_or_default());
        match route {
            "$connect" => connect::handle(self, connection, &request).await,
            "$disconnect" => disconnect::handle(self, connection).await,
            route => {
                let body = if request.is_base64_encoded {
                    Err(Rejection::new(
                        ErrorCode::BadRequest,
                        "binary frames are not supported: send JSON text frames",
                    ))
                } else {
                    Ok(request.body.as_deref().unwrap_or(""))
                };
                let frame = match body {
                    Err(rejection) => rejection.frame(None),
                    Ok(body) if route == "$default" => {
                        requests::default_route_rejection(body).frame(None)
                    }
                    Ok(body) => match self.route(route, connection.clone(), body, turn).await {
                        Ok(frame) => frame,
                        Err(gone) => return self.forget(&connection, &gone).await,
                    },
                };
                answer(&frame)
            }
        }
    }

    /// The route's answer; `Err` with the `gone` frame for a connection the store has closed.
    async fn route(
        &self,
        route: &str,
        connection: ConnectionId,
        body: &str,
        turn: Turn,
    ) -> Result<ServerFrame, ServerFrame> {
        let outcome = match requests::parse(route, body) {
            Err(rejection) => Err(RouteError::Rejected(rejection)),
            Ok(request) => self.dispatch(connection, request, turn).await,
        };
        match outcome {
            Ok(frame) => Ok(frame),
            Err(RouteError::Rejected(rejection)) => Ok(rejection.frame(Some(route))),
            Err(RouteError::UnknownConnection(connection)) => {
                tracing::info!(%connection, route, "request on a closed connection");
                Err(ServerFrame::error(
                    ErrorCode::Gone,
                    "this connection is closed on the server: reconnect",
                    Some(route),
                ))
            }
            Err(other) => {
                tracing::error!(route, error = %other, "route failed");
                Ok(ServerFrame::error(
                    ErrorCode::Internal,
                    "something went wrong on our side; nothing was changed, try again",
                    Some(route),
                ))
            }
        }
    }

    /// A request came on a connection the store has closed (after a 410 the fan-out saw, or a
    /// lost `$connect`): tell the client, then close the socket so that it reconnects. The
    /// frame is posted rather than answered so that it goes out before the close.
    async fn forget(
        &self,
        connection: &ConnectionId,
        gone: &ServerFrame,
    ) -> ApiGatewayProxyResponse {
        if let Err(error) = self.gateway.post(connection, gone.to_bytes()).await {
            tracing::debug!(%connection, %error, "could not tell a closed connection");
        }
        if let Err(error) = self.gateway.close(connection).await {
            tracing::warn!(%connection, %error, "could not close a connection the store forgot");
        }
        let mut response = ApiGatewayProxyResponse::default();
        response.status_code = 200;
        response
    }

    async fn dispatch(
        &self,
        connection: ConnectionId,
        request: Request,
        turn: Turn,
    ) -> Result<ServerFrame, RouteError> {
        if request == Request::Ping {
            // A keepalive costs nothing: no caller lookup, no store (on AWS a route response
            // can answer it without a function).
            return Ok(ServerFrame::Pong);
        }
        let caller = self.caller(connection).await?;
        match request {
            Request::Ping => Ok(ServerFrame::Pong),
            Request::JoinRoom { room, after } => join::handle(self, &caller, room, after).await,
            Request::LeaveRoom { room } => leave::handle(self, &caller, room).await,
            Request::SendMessage {
                room,
                text,
                client_msg_id,
            } => send::handle(self, &caller, room, text, client_msg_id, turn).await,
            Request::GetHistory { room, after, limit } => {
                history::handle(self, &caller, room, after, limit).await
            }
        }
    }

    /// The user behind a connection, from the registry `$connect` wrote.
    async fn caller(&self, connection: ConnectionId) -> Result<Caller, RouteError> {
        if let Some(user) = self.callers.as_ref().and_then(|c| c.user(&connection)) {
            return Ok(Caller { connection, user });
        }
        match self.directory.connection(&connection).await? {
            Some(record) if record.open => Ok(Caller {
                connection,
                user: record.user,
            }),
            _ => Err(RouteError::UnknownConnection(connection)),
        }
    }
}

/// A 200 whose body the gateway sends back to the caller.
fn answer(frame: &ServerFrame) -> ApiGatewayProxyResponse {
    let mut response = ApiGatewayProxyResponse::default();
    response.status_code = 200;
    response.body = Some(Body::Text(frame.to_json()));
    response
}

/// A bare status, for `$connect` and `$disconnect`, whose bodies no client sees.
fn status(code: i64, message: &str) -> ApiGatewayProxyResponse {
    let mut response = ApiGatewayProxyResponse::default();
    response.status_code = code;
    response.body = Some(Body::Text(message.to_owned()));
    response
}
