//! palaver: event-sourced WebSocket chat for API Gateway WebSocket APIs, and the same thing as
//! one local binary.
//!
//! - [`domain`] — events, frames, requests, the projection fold. No I/O.
//! - [`ports`] — what handlers and the fan-out need from a store and a connection gateway.
//! - [`store`] — the memory and SQLite adapters.
//! - [`handlers`] — the WebSocket routes, taking and answering API Gateway's Lambda event shapes.
//! - [`fanout`] — turns log events into frames for every connection that should see them.
//! - [`gateway`] — the local API-Gateway-compatible WebSocket gateway and management API.
//! - [`identity`] — JWTs.
//! - [`lambda`] — the Lambda functions' configuration, wiring and handlers.
//! - [`operator`] — what operators see: rooms, members, history, connections.

pub mod aws;
pub mod domain;
pub mod fanout;
pub mod gateway;
pub mod handlers;
pub mod identity;
pub mod lambda;
pub mod operator;
pub mod ports;
pub mod server;
pub mod store;
