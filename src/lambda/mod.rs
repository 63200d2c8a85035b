//! The three Lambda functions' configuration, wiring and handlers, so that each binary in
//! `src/bin/` is only `main`: read [`LambdaConfig`], build everything once with
//! [`Aws::connect`], hand one of the handlers to `lambda_runtime`, counting each invocation with
//! [`counted`].
//!
//! | binary | event | handler |
//! | --- | --- | --- |
//! | `palaver-route` | API Gateway WebSocket request, every route | [`crate::handlers::Routes::handle`] |
//! | `palaver-fanout` | the events table's DynamoDB stream | [`fan_out`] |
//! | `palaver-deliver` | the delivery queue's SQS messages | [`deliver`] |
//!
//! - [`config`] — what the functions read from their environment;
//! - [`wiring`] — what is built once per container: SDK clients, the store, the management API;
//! - [`handlers`] — the fan-out and deliver handlers, answering with `batchItemFailures`;
//! - [`invocation`] — what an invocation counts, as CloudWatch EMF lines in the log, and its
//!   deadline.
//!
//! The tests in `tests/it/aws_path.rs` call these same functions with Lambda's event JSON.

mod config;
mod handlers;
mod invocation;
mod wiring;

pub use config::{ConfigError, DEFAULT_QUEUE_JOB_SIZE, DEFAULT_QUEUE_THRESHOLD, LambdaConfig};
pub use handlers::{deliver, fan_out};
pub use invocation::{counted, deadline_of, embedded_metrics};
pub use wiring::Aws;
