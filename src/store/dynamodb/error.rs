//! The DynamoDB backend's one error type, and how it maps onto the ports' [`StoreError`].

use crate::ports::StoreError;

/// Why a DynamoDB store call failed.
#[derive(Debug, thiserror::Error)]
pub enum DynamoError {
    /// The service refused the call or could not be reached.
    #[error("DynamoDB: {0}")]
    Api(#[from] Box<aws_sdk_dynamodb::Error>),
    /// A request could not be built (a missing required field: a bug).
    #[error("DynamoDB request: {0}")]
    Build(#[from] aws_sdk_dynamodb::error::BuildError),
    #[error("cannot encode event: {0}")]
    Encode(#[source] serde_json::Error),
    /// An item read back could not be decoded.
    #[error("{0}")]
    Corrupt(String),
    /// Too many writers raced for the same stream position.
    #[error("{0}: gave up after too many concurrent appends")]
    Contended(String),
    /// A transaction was cancelled for a reason other than the ones an append expects.
    #[error("transaction cancelled: {0}")]
    Cancelled(String),
}

impl DynamoError {
    /// Any SDK error, through the crate's unified error type.
    pub fn sdk<E>(error: E) -> DynamoError
    where
        aws_sdk_dynamodb::Error: From<E>,
    {
        DynamoError::Api(Box::new(aws_sdk_dynamodb::Error::from(error)))
    }
}

impl From<DynamoError> for StoreError {
    fn from(error: DynamoError) -> StoreError {
        match error {
            DynamoError::Corrupt(why) => StoreError::Corrupt(why),
            other => StoreError::backend(other),
        }
    }
}
