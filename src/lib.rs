//! palaver: event-sourced WebSocket chat for API Gateway WebSocket APIs, and the same thing as
//! one local binary.
//!
//! - [`domain`] — names, events, frames, requests and the projection fold. No I/O.
//! - [`ports`] — what handlers and the fan-out need from a store, a connection gateway and a
//!   delivery queue.
//! - [`store`] — the memory, SQLite and DynamoDB adapters, and the `--store` URL that picks one.
//! - [`dedicated`] — serial stages (the SQLite committer, the local log tail) on threads of
//!   their own.
//! - [`connections`] — a connection's end, shared by `$disconnect` and the fan-out, and how long
//!   a closed connection is kept.
//! - [`handlers`] — the WebSocket routes, taking and answering API Gateway's Lambda event shapes.
//! - [`fanout`] — turns log events into frames for every connection that should see them,
//!   driven by the local tail or by the DynamoDB table's change stream.
//! - [`gateway`] — the local API-Gateway-compatible WebSocket gateway, management API and admin
//!   endpoints.
//! - [`aws`] — the management API client, the SQS delivery queue and the Lambda event shapes.
//! - [`identity`] — who is connecting: JWTs, and the durations settings are written in.
//! - [`lambda`] — the Lambda functions' configuration, wiring and handlers.
//! - [`metrics`] — the names of everything palaver counts (`/metrics`, EMF).
//! - [`operator`] — what operators see: rooms, members, history, connections.
//! - [`retry`] — how long to wait before trying again, for every retry in one place.
//! - [`server`] — `palaver serve`'s wiring.
//!
//! [`gateway`], [`operator`], [`server`] and the SQLite store are built with the `local` feature,
//! [`lambda`] with the `lambda` feature; both are on by default (see Cargo.toml).

pub mod aws;
pub mod connections;
pub mod dedicated;
pub mod domain;
pub mod fanout;
#[cfg(feature = "local")]
pub mod gateway;
pub mod handlers;
pub mod identity;
#[cfg(feature = "lambda")]
pub mod lambda;
pub mod metrics;
#[cfg(feature = "local")]
pub mod node_lease;
#[cfg(feature = "local")]
pub mod operator;
pub mod ports;
pub mod retry;
#[cfg(feature = "local")]
pub mod server;
pub mod store;
