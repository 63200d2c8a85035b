//! The DynamoDB backend's one error type, and how it maps onto the ports' [`StoreError`].

use crate::ports::StoreError;

/// Why a DynamoDB store call failed.
#[derive(Debug, thiserror::Error)]
pub enum DynamoError {
    /// The service refused the call or could not be reached.
    #[error("DynamoDB: {}", explain(.0))]
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

/// What went wrong, with its causes (the SDK's own message is often only "unhandled error" or
/// "dispatch failure"), and what to do where that is clear.
fn explain(error: &aws_sdk_dynamodb::Error) -> String {
    // Each cause's own words, outermost first.
    let mut said = error.to_string();
    let mut cause = std::error::Error::source(error);
    while let Some(inner) = cause {
        let text = inner.to_string();
        if !said.contains(&text) {
            said.push_str(": ");
            said.push_str(&text);
        }
        cause = inner.source();
    }
    if matches!(error, aws_sdk_dynamodb::Error::ResourceNotFoundException(_)) {
        return format!(
            "a table is missing — run `palaver init` with the same --store to create them ({said})"
        );
    }
    if said.contains("no providers in chain provided credentials") {
        return format!(
            "no AWS credentials — set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or a profile \
             ({said})"
        );
    }
    if said.contains("dispatch failure") {
        return format!("cannot reach DynamoDB — is the endpoint up? ({said})");
    }
    said
}

impl From<DynamoError> for StoreError {
    fn from(error: DynamoError) -> StoreError {
        match error {
            DynamoError::Corrupt(why) => StoreError::Corrupt(why),
            other => StoreError::backend(other),
        }
    }
}
