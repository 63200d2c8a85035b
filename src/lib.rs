//! palaver: event-sourced WebSocket chat for API Gateway WebSocket APIs, and the same thing as
//! one local binary.
//!
//! - [`domain`] — events, frames, requests, the projection fold. No I/O.
//! - [`ports`] — what handlers and the fan-out need from a store and a connection gateway.
//! - [`store`] — the memory, SQLite and DynamoDB adapters.
//! - [`dedicated`] — the committer and the tail on threads of their own.
//! - [`connections`] — a connection's close, shared by `$disconnect` and the fan-out.
//! - [`handlers`] — the WebSocket routes, taking and answering API Gateway's Lambda event shapes.
//! - [`fanout`] — turns log events into frames for every connection that should see it, driven
//!   by the local tail or by the DynamoDB table's change stream.
//! - [`gateway`] — the local API-Gateway-compatible WebSocket gateway and management API.
//! - [`aws`] — the management API client, SQS delivery queue and Lambda event shapes.
//! - [`identity`] — JWTs.
//! - [`lambda`] — the Lambda functions' configuration, wiring and handlers.
//! - [`metrics`] — the names of everything palaver counts (`/metrics`, EMF).
//! - [`operator`] — what operators see: rooms, members, history, connections.
//! - [`server`] — `palaver serve`'s wiring.

pub mod aws;
pub mod connections;
pub mod dedicated;
pub mod domain;
pub mod fanout;
pub mod gateway;
pub mod handlers;
pub mod identity;
pub mod lambda;
pub mod metrics;
pub mod operator;
pub mod ports;
pub mod retry;
pub mod server;
pub mod store;
