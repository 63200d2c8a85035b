//! Adapters for the AWS services around the store: API Gateway's management API, SQS, and the
//! Lambda event shapes.
//!
//! - [`management`] — posting to connections (`@connections`), with 410 and throttling handled.
//! - [`queue`] — big rooms' deliveries through SQS, and the deliver function's event.
//! - [`events`] — the fan-out function's DynamoDB stream event and its partial-batch answer.

pub mod events;
pub mod management;
pub mod queue;

pub use management::ManagementApi;
pub use queue::SqsDeliveryQueue;
