//! Table names, and creating the tables (`palaver init`) where no template does it: local
//! emulators and tests. On AWS, `template.yaml` creates them.

use super::error::DynamoError;
use aws_sdk_dynamodb::Client;
use aws_sdk_dynamodb::types::{
    AttributeDefinition, BillingMode, KeySchemaElement, KeyType, ScalarAttributeType,
    StreamSpecification, StreamViewType, TableStatus, TimeToLiveSpecification, TimeToLiveStatus,
};
use std::time::Duration;

/// The two tables of a prefix.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Tables {
    /// `PREFIX-events`: the log.
    pub events: String,
    /// `PREFIX-state`: the projection, checkpoints and idempotency keys.
    pub state: String,
}

impl Tables {
    pub fn new(prefix: &str) -> Tables {
        Tables {
            events: format!("{prefix}-events"),
            state: format!("{prefix}-state"),
        }
    }
}

/// Creates both tables unless they exist, and waits until they are active. Returns the names
/// of the tables it created.
pub async fn init(client: &Client, tables: &Tables) -> Result<Vec<String>, DynamoError> {
    let mut created = Vec::new();
    let events = client
        .create_table()
        .table_name(&tables.events)
        .attribute_definitions(attribute("stream", ScalarAttributeType::S)?)
        .attribute_definitions(attribute("seq", ScalarAttributeType::N)?)
        .key_schema(key("stream", KeyType::Hash)?)
        .key_schema(key("seq", KeyType::Range)?)
        .billing_mode(BillingMode::PayPerRequest)
        .stream_specification(
            StreamSpecification::builder()
                .stream_enabled(true)
                .stream_view_type(StreamViewType::NewImage)
                .build()?,
        );
    if create(events.send().await)? {
        created.push(tables.events.clone());
    }
    let state = client
        .create_table()
        .table_name(&tables.state)
        .attribute_definitions(attribute("pk", ScalarAttributeType::S)?)
        .attribute_definitions(attribute("sk", ScalarAttributeType::S)?)
        .key_schema(key("pk", KeyType::Hash)?)
        .key_schema(key("sk", KeyType::Range)?)
        .billing_mode(BillingMode::PayPerRequest);
    if create(state.send().await)? {
        created.push(tables.state.clone());
    }
    for table in [&tables.events, &tables.state] {
        wait_active(client, table).await?;
    }
    // Both tables expire items by `expires`: the state table its connection rows, the events
    // table its connection streams. Checked on every init, so tables made before the events
    // table had a TTL get one too.
    for table in [&tables.events, &tables.state] {
        expire_by_ttl(client, table).await?;
    }
    Ok(created)
}

/// Turns on the table's TTL on `expires`, unless it is on already.
async fn expire_by_ttl(client: &Client, table: &str) -> Result<(), DynamoError> {
    let described = client
        .describe_time_to_live()
        .table_name(table)
        .send()
        .await
        .map_err(DynamoError::sdk)?;
    let status = described
        .time_to_live_description()
        .and_then(|ttl| ttl.time_to_live_status());
    if matches!(
        status,
        Some(TimeToLiveStatus::Enabled | TimeToLiveStatus::Enabling)
    ) {
        return Ok(());
    }
    client
        .update_time_to_live()
        .table_name(table)
        .time_to_live_specification(
            TimeToLiveSpecification::builder()
                .enabled(true)
                .attribute_name("expires")
                .build()?,
        )
        .send()
        .await
        .map_err(DynamoError::sdk)?;
    Ok(())
}

/// `true` if created, `false` if it was already there.
fn create<O, R>(
    result: Result<
        O,
        aws_sdk_dynamodb::error::SdkError<
            aws_sdk_dynamodb::operation::create_table::CreateTableError,
            R,
        >,
    >,
) -> Result<bool, DynamoError>
where
    aws_sdk_dynamodb::Error: From<
        aws_sdk_dynamodb::error::SdkError<
            aws_sdk_dynamodb::operation::create_table::CreateTableError,
            R,
        >,
    >,
{
    match result {
        Ok(_) => Ok(true),
        Err(e)
            if e.as_service_error()
                .is_some_and(|e| e.is_resource_in_use_exception()) =>
        {
            Ok(false)
        }
        Err(e) => Err(DynamoError::sdk(e)),
    }
}

async fn wait_active(client: &Client, table: &str) -> Result<(), DynamoError> {
    for _ in 0..120 {
        let described = client
            .describe_table()
            .table_name(table)
            .send()
            .await
            .map_err(DynamoError::sdk)?;
        if described.table().and_then(|t| t.table_status()) == Some(&TableStatus::Active) {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    Err(DynamoError::Corrupt(format!(
        "table {table} did not become active"
    )))
}

fn attribute(name: &str, kind: ScalarAttributeType) -> Result<AttributeDefinition, DynamoError> {
    Ok(AttributeDefinition::builder()
        .attribute_name(name)
        .attribute_type(kind)
        .build()?)
}

fn key(name: &str, kind: KeyType) -> Result<KeySchemaElement, DynamoError> {
    Ok(KeySchemaElement::builder()
        .attribute_name(name)
        .key_type(kind)
        .build()?)
}
