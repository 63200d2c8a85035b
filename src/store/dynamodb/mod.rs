//! The DynamoDB store (`dynamodb://TABLE_PREFIX`): the log in `PREFIX-events`, whose stream
//! wakes the fan-out, and the projection, checkpoints and idempotency keys in `PREFIX-state`.
//!
//! An append is one conditional `PutItem` of `(stream, seq = head + 1)` with
//! `attribute_not_exists(seq)`: a lost race is a failed condition, retried at the next seq, and
//! never a gap (nothing is reserved before it is written). A message with a `clientMsgId`, and
//! the rare membership and connection events, are a `TransactWriteItems` instead, so their
//! idempotency key or projection is written with them. Within one process, appends to a stream
//! take turns behind a lock and remember the stream's head, so the common case costs one write
//! and no read.
//!
//! See [`items`] for the tables' item shapes.

pub mod changes;
mod directory;
mod error;
mod items;
mod log;
mod tables;
mod writes;

pub use error::DynamoError;
pub use tables::{Tables, init};

use crate::ports::Store;
use aws_sdk_dynamodb::Client;
use aws_sdk_dynamodb::error::SdkError;
use aws_sdk_dynamodb::operation::transact_write_items::TransactWriteItemsError;
use aws_sdk_dynamodb::types::TransactWriteItem;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// Both tables, through one SDK client.
pub struct DynamoStore {
    client: Client,
    tables: Tables,
    /// Per log stream: appends from this process take turns, and the last head seen.
    streams: Mutex<HashMap<String, Arc<tokio::sync::Mutex<Option<u64>>>>>,
}

impl DynamoStore {
    pub fn new(client: Client, prefix: &str) -> Arc<Self> {
        Arc::new(DynamoStore {
            client,
            tables: Tables::new(prefix),
            streams: Mutex::new(HashMap::new()),
        })
    }

    /// The store behind every port it implements. There is no local feed: the table's stream
    /// drives the fan-out.
    pub fn store(self: &Arc<Self>) -> Store {
        Store {
            log: self.clone(),
            directory: self.clone(),
            feed: None,
            checkpoints: Some(self.clone()),
        }
    }

    pub fn tables(&self) -> &Tables {
        &self.tables
    }

    pub fn client(&self) -> &Client {
        &self.client
    }

    /// The turn-taking lock and remembered head of a room's stream. A connection's stream is
    /// written at most twice, so it gets a lock of its own that is not kept.
    fn stream_lock(&self, key: &str) -> Arc<tokio::sync::Mutex<Option<u64>>> {
        if !key.starts_with("r:") {
            return Arc::default();
        }
        let mut streams = self.streams.lock().unwrap_or_else(|p| p.into_inner());
        streams.entry(key.to_owned()).or_default().clone()
    }

    /// Runs writes that belong together: one alone as itself, several as a transaction. A
    /// failed condition means the state already holds this change or a newer one: not an error.
    async fn apply_writes(&self, writes: Vec<TransactWriteItem>) -> Result<(), DynamoError> {
        match writes.len() {
            0 => Ok(()),
            1 => {
                let write = writes.into_iter().next().expect("one write");
                self.write_one(write).await
            }
            _ => match self
                .client
                .transact_write_items()
                .set_transact_items(Some(writes))
                .send()
                .await
            {
                Ok(_) => Ok(()),
                Err(error) => match cancellation(&error) {
                    Some(reasons)
                        if reasons
                            .iter()
                            .all(|r| r == "ConditionalCheckFailed" || r == "None") =>
                    {
                        Ok(())
                    }
                    _ => Err(DynamoError::sdk(error)),
                },
            },
        }
    }

    async fn write_one(&self, write: TransactWriteItem) -> Result<(), DynamoError> {
        let result = if let Some(u) = write.update {
            self.client
                .update_item()
                .table_name(u.table_name)
                .set_key(Some(u.key))
                .update_expression(u.update_expression)
                .set_condition_expression(u.condition_expression)
                .set_expression_attribute_names(u.expression_attribute_names)
                .set_expression_attribute_values(u.expression_attribute_values)
                .send()
                .await
                .map(drop)
                .map_err(|e| {
                    let failed = e
                        .as_service_error()
                        .is_some_and(|e| e.is_conditional_check_failed_exception());
                    (failed, DynamoError::sdk(e))
                })
        } else if let Some(p) = write.put {
            self.client
                .put_item()
                .table_name(p.table_name)
                .set_item(Some(p.item))
                .set_condition_expression(p.condition_expression)
                .set_expression_attribute_names(p.expression_attribute_names)
                .set_expression_attribute_values(p.expression_attribute_values)
                .send()
                .await
                .map(drop)
                .map_err(|e| {
                    let failed = e
                        .as_service_error()
                        .is_some_and(|e| e.is_conditional_check_failed_exception());
                    (failed, DynamoError::sdk(e))
                })
        } else if let Some(d) = write.delete {
            self.client
                .delete_item()
                .table_name(d.table_name)
                .set_key(Some(d.key))
                .send()
                .await
                .map(drop)
                .map_err(|e| (false, DynamoError::sdk(e)))
        } else {
            Ok(())
        };
        match result {
            Ok(()) | Err((true, _)) => Ok(()),
            Err((false, error)) => Err(error),
        }
    }
}

/// The cancellation reason codes of a cancelled transaction, one per item, in item order.
fn cancellation<R>(error: &SdkError<TransactWriteItemsError, R>) -> Option<Vec<String>> {
    match error.as_service_error()? {
        TransactWriteItemsError::TransactionCanceledException(cancelled) => Some(
            cancelled
                .cancellation_reasons()
                .iter()
                .map(|r| r.code().unwrap_or("None").to_owned())
                .collect(),
        ),
        _ => None,
    }
}
