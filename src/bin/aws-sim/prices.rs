//! AWS list prices (us-east-1, on-demand, no free tier), each with the page it comes from, and
//! what a run's counted requests cost at them.
//!
//! Prices as published on the pages below when this was written; change one only with its page.

/// API Gateway WebSocket: $1.00 per million messages (the first billion a month; messages are
/// metered in 32 KB units), $0.25 per million connection minutes.
/// <https://aws.amazon.com/api-gateway/pricing/> ("WebSocket APIs").
pub const APIGW_PER_MESSAGE: f64 = 1.00 / 1e6;
pub const APIGW_PER_CONNECTION_MINUTE: f64 = 0.25 / 1e6;

/// Lambda on arm64 (template.yaml `Architectures: [arm64]`): $0.20 per million requests,
/// $0.0000133334 per GB-second. <https://aws.amazon.com/lambda/pricing/>.
pub const LAMBDA_PER_REQUEST: f64 = 0.20 / 1e6;
pub const LAMBDA_PER_GB_SECOND: f64 = 0.000_013_333_4;

/// DynamoDB on-demand: $0.625 per million write request units, $0.125 per million read request
/// units; stream reads by a Lambda trigger are free.
/// <https://aws.amazon.com/dynamodb/pricing/on-demand/>.
pub const DYNAMODB_PER_WRITE_UNIT: f64 = 0.625 / 1e6;
pub const DYNAMODB_PER_READ_UNIT: f64 = 0.125 / 1e6;

/// SQS FIFO: $0.50 per million requests (each 64 KB of a request's payload is one request).
/// <https://aws.amazon.com/sqs/pricing/>.
pub const SQS_FIFO_PER_REQUEST: f64 = 0.50 / 1e6;

/// Secrets Manager: $0.05 per 10,000 API calls. <https://aws.amazon.com/secrets-manager/pricing/>.
pub const SECRETS_PER_CALL: f64 = 0.05 / 10_000.0;
