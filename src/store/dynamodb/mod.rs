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
//! Who hears a room is kept as `room#R`/`listener#C` rows, written by the membership and
//! connection events' own transactions: the fan-out reads a room's audience with one Query (see
//! [`listeners`]).
//!
//! See [`items`] for the tables' item shapes.

mod directory;
mod error;
mod items;
mod listeners;
mod log;
mod nodes;
mod tables;
mod writes;

pub use error::DynamoError;
pub use items::CONNECTION_TTL_SECS;
pub use tables::{Tables, init};

use crate::ports::Store;
use aws_sdk_dynamodb::Client;
use aws_sdk_dynamodb::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_dynamodb::operation::transact_write_items::TransactWriteItemsError;
use aws_sdk_dynamodb::types::TransactWriteItem;
use parking_lot::Mutex;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

/// How many rooms' append locks (and remembered heads) one process keeps.
pub const ROOM_LOCKS: usize = 4096;

/// Both tables, through one SDK client.
pub struct DynamoStore {
    client: Client,
    tables: Tables,
    /// Per log stream: appends from this process take turns, and the last head seen.
    streams: Mutex<HashMap<String, Arc<tokio::sync::Mutex<Option<u64>>>>>,
    /// How long a closed connection's events and registry row are kept (their TTL); `None`: for
    /// ever.
    connection_retention: Option<Duration>,
}

impl DynamoStore {
    /// The store on tables `PREFIX-events` and `PREFIX-state`, keeping closed connections for
    /// [`DEFAULT_CONNECTION_RETENTION`].
    ///
    /// [`DEFAULT_CONNECTION_RETENTION`]: crate::domain::limits::DEFAULT_CONNECTION_RETENTION
    pub fn new(client: Client, prefix: &str) -> Arc<Self> {
        Self::keeping_connections(
            client,
            prefix,
            Some(crate::domain::limits::DEFAULT_CONNECTION_RETENTION),
        )
    }

    /// The same, keeping closed connections for `retention` (`None`: for ever).
    pub fn keeping_connections(
        client: Client,
        prefix: &str,
        retention: Option<Duration>,
    ) -> Arc<Self> {
        Arc::new(DynamoStore {
            client,
            tables: Tables::new(prefix),
            streams: Mutex::new(HashMap::new()),
            connection_retention: retention,
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
            retention: None,
            nodes: Some(self.clone()),
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
    ///
    /// Any user can create rooms, so the rooms remembered are bounded: past [`ROOM_LOCKS`], the
    /// ones no append is using are forgotten. Forgetting costs nothing but one head read at the
    /// room's next append (the remembered head is only a shortcut; the write's condition is the
    /// truth).
    fn stream_lock(&self, key: &str) -> Arc<tokio::sync::Mutex<Option<u64>>> {
        if !key.starts_with("r:") {
            return Arc::default();
        }
        let mut streams = self.streams.lock();
        if streams.len() >= ROOM_LOCKS && !streams.contains_key(key) {
            streams.retain(|_, lock| Arc::strong_count(lock) > 1);
        }
        streams.entry(key.to_owned()).or_default().clone()
    }

    /// How many rooms' locks are remembered now.
    #[cfg(test)]
    fn remembered_rooms(&self) -> usize {
        self.streams.lock().len()
    }

    /// Runs writes that belong together: a lone update as itself, anything else as a
    /// transaction. A failed condition means the state already holds this change or a newer
    /// one: not an error.
    async fn apply_writes(&self, mut writes: Vec<TransactWriteItem>) -> Result<(), DynamoError> {
        if writes.is_empty() {
            return Ok(());
        }
        if writes.len() == 1
            && let Some(update) = writes[0].update.take()
        {
            return match self
                .client
                .update_item()
                .table_name(update.table_name)
                .set_key(Some(update.key))
                .update_expression(update.update_expression)
                .set_condition_expression(update.condition_expression)
                .set_expression_attribute_names(update.expression_attribute_names)
                .set_expression_attribute_values(update.expression_attribute_values)
                .send()
                .await
            {
                Ok(_) => Ok(()),
                Err(e) if condition_failed(&e) => Ok(()),
                Err(e) => Err(DynamoError::sdk(e)),
            };
        }
        match self.transact(writes).await? {
            Ok(()) => Ok(()),
            Err(reasons) if reasons.iter().all(|r| r == CONDITION_FAILED || r == "None") => Ok(()),
            Err(reasons) => Err(DynamoError::Cancelled(reasons.join(", "))),
        }
    }

    /// Runs a transaction. A cancelled one answers `Ok(Err(reasons))`: the reason code of each
    /// item, in item order (`"None"` for an item that was not at fault).
    async fn transact(
        &self,
        items: Vec<TransactWriteItem>,
    ) -> Result<Result<(), Vec<String>>, DynamoError> {
        match self
            .client
            .transact_write_items()
            .set_transact_items(Some(items))
            .send()
            .await
        {
            Ok(_) => Ok(Ok(())),
            Err(error) => match error.as_service_error() {
                Some(TransactWriteItemsError::TransactionCanceledException(cancelled)) => {
                    Ok(Err(cancelled
                        .cancellation_reasons()
                        .iter()
                        .map(|r| r.code().unwrap_or("None").to_owned())
                        .collect()))
                }
                _ => Err(DynamoError::sdk(error)),
            },
        }
    }
}

/// A transaction item's reason code when its condition failed.
const CONDITION_FAILED: &str = "ConditionalCheckFailed";
/// A transaction item's reason code when another transaction was writing the same item.
const TRANSACTION_CONFLICT: &str = "TransactionConflict";

/// Whether a single-item write failed only because its condition did not hold.
fn condition_failed<E: ProvideErrorMetadata, R>(error: &SdkError<E, R>) -> bool {
    error
        .as_service_error()
        .is_some_and(|e| e.code() == Some("ConditionalCheckFailedException"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn rooms_remembered_for_appends_are_bounded_and_a_room_in_use_is_kept() {
        let config = aws_sdk_dynamodb::Config::builder()
            .behavior_version(aws_sdk_dynamodb::config::BehaviorVersion::latest())
            .build();
        let store = DynamoStore::new(Client::from_conf(config), "bounded");
        let busy = store.stream_lock("r:busy");
        let held = busy.lock().await;
        for n in 0..3 * ROOM_LOCKS {
            drop(store.stream_lock(&format!("r:room{n}")));
        }
        assert!(
            store.remembered_rooms() <= ROOM_LOCKS,
            "{}",
            store.remembered_rooms()
        );
        // The room whose append is under way kept its lock: a second append waits for it.
        let again = store.stream_lock("r:busy");
        assert!(
            again.try_lock().is_err(),
            "the lock in use was not replaced"
        );
        drop(held);
    }
}
