//! [`NodeLeases`] on the state table: one `nodes`/`N` item per `palaver serve` node, holding
//! the time its lease runs until. The partition is small (one item per node), so every node
//! reads all of it with one consistent Query.

use super::error::DynamoError;
use super::items::{Item, ms, s, string, time};
use super::{DynamoStore, condition_failed};
use crate::ports::{NodeLeases, StoreResult};
use async_trait::async_trait;
use aws_sdk_dynamodb::error::{ProvideErrorMetadata, SdkError};
use chrono::{DateTime, Utc};
use std::collections::HashMap;

const PARTITION: &str = "nodes";

/// Whether a conditional write took effect: `false` when its condition failed (the lease moved
/// on, or is gone), an error for anything else.
fn applied<O, E, R>(written: Result<O, SdkError<E, R>>) -> StoreResult<bool>
where
    E: ProvideErrorMetadata,
    aws_sdk_dynamodb::Error: From<SdkError<E, R>>,
{
    match written {
        Ok(_) => Ok(true),
        Err(error) if condition_failed(&error) => Ok(false),
        Err(error) => Err(DynamoError::sdk(error).into()),
    }
}

fn lease_key(node: &str) -> Item {
    HashMap::from([("pk".to_owned(), s(PARTITION)), ("sk".to_owned(), s(node))])
}

#[async_trait]
impl NodeLeases for DynamoStore {
    async fn claim(&self, node: &str, until: DateTime<Utc>) -> StoreResult<()> {
        let mut item = lease_key(node);
        item.insert("until".to_owned(), ms(&until));
        self.client
            .put_item()
            .table_name(&self.tables.state)
            .set_item(Some(item))
            .send()
            .await
            .map_err(DynamoError::sdk)?;
        Ok(())
    }

    async fn renew(&self, node: &str, until: DateTime<Utc>) -> StoreResult<bool> {
        let written = self
            .client
            .update_item()
            .table_name(&self.tables.state)
            .set_key(Some(lease_key(node)))
            .update_expression("SET #until = :until")
            .condition_expression("attribute_exists(#until)")
            .expression_attribute_names("#until", "until")
            .expression_attribute_values(":until", ms(&until))
            .send()
            .await;
        applied(written)
    }

    async fn leases(&self) -> StoreResult<Vec<(String, DateTime<Utc>)>> {
        let items = self.partition(PARTITION.to_owned(), "").await?;
        let leases = items
            .iter()
            .map(|item| Ok((string(item, "sk")?.to_owned(), time(item, "until")?)))
            .collect::<Result<Vec<_>, DynamoError>>()?;
        Ok(leases)
    }

    async fn remove(&self, node: &str, until: DateTime<Utc>) -> StoreResult<bool> {
        let written = self
            .client
            .delete_item()
            .table_name(&self.tables.state)
            .set_key(Some(lease_key(node)))
            .condition_expression("#until = :until")
            .expression_attribute_names("#until", "until")
            .expression_attribute_values(":until", ms(&until))
            .send()
            .await;
        applied(written)
    }
}
