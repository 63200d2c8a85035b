//! Store adapters, one module per technology, and the `--store` URL that picks one.

pub mod dynamodb;
pub mod memory;
#[cfg(feature = "local")]
pub mod sqlite;

use crate::ports::Store;

/// What `--store` / `PALAVER_STORE` names.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StoreUrl {
    /// `sqlite://PATH`: the embedded default.
    Sqlite(String),
    /// `memory://`: nothing survives the process.
    Memory,
    /// `dynamodb://TABLE_PREFIX`: tables `PREFIX-events` and `PREFIX-state`, reached through
    /// the standard AWS configuration (`AWS_ENDPOINT_URL` included).
    DynamoDb(String),
}

/// The default store: a SQLite file in the working directory.
pub const DEFAULT_STORE: &str = "sqlite://palaver.db";

/// A `--store` value that names no store palaver has.
#[derive(Debug, thiserror::Error)]
#[error("unknown store {0:?}: use sqlite://PATH, memory:// or dynamodb://TABLE_PREFIX")]
pub struct UnknownStore(pub String);

impl std::str::FromStr for StoreUrl {
    type Err = UnknownStore;

    fn from_str(url: &str) -> Result<Self, UnknownStore> {
        if let Some(path) = url.strip_prefix("sqlite://") {
            if path.is_empty() {
                return Err(UnknownStore(url.to_owned()));
            }
            Ok(StoreUrl::Sqlite(path.to_owned()))
        } else if let Some(prefix) = url.strip_prefix("dynamodb://") {
            let valid = !prefix.is_empty()
                && prefix
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'));
            if !valid {
                return Err(UnknownStore(url.to_owned()));
            }
            Ok(StoreUrl::DynamoDb(prefix.to_owned()))
        } else if url == "memory://" || url == "memory" {
            Ok(StoreUrl::Memory)
        } else {
            Err(UnknownStore(url.to_owned()))
        }
    }
}

/// Opens (and for SQLite, creates and migrates) the store. `connection_retention` is how long
/// DynamoDB's TTL keeps a closed connection (`None`: for ever); the stores that keep everything
/// until told forget on their [`Retention`](crate::ports::Retention) port instead.
pub async fn open(
    url: &StoreUrl,
    connection_retention: Option<std::time::Duration>,
) -> Result<Store, Box<dyn std::error::Error + Send + Sync>> {
    match url {
        StoreUrl::Memory => Ok(memory::MemoryStore::store()),
        #[cfg(feature = "local")]
        StoreUrl::Sqlite(path) => Ok(sqlite::SqliteStore::open(path).await?.store()),
        #[cfg(not(feature = "local"))]
        StoreUrl::Sqlite(_) => {
            Err("this build has no SQLite store: build with the `local` feature".into())
        }
        StoreUrl::DynamoDb(prefix) => Ok(dynamodb::DynamoStore::keeping_connections(
            aws_client().await,
            prefix,
            connection_retention,
        )
        .store()),
    }
}

/// Opens the store for the operator commands, which only read: a SQLite file must be there
/// already ([`sqlite::SqliteStore::open_existing`]), read-only.
pub async fn open_existing(
    url: &StoreUrl,
    connection_retention: Option<std::time::Duration>,
) -> Result<Store, Box<dyn std::error::Error + Send + Sync>> {
    match url {
        #[cfg(feature = "local")]
        StoreUrl::Sqlite(path) => Ok(sqlite::SqliteStore::open_existing(path).await?.store()),
        other => open(other, connection_retention).await,
    }
}

/// A DynamoDB client from the standard AWS configuration (environment, profile, IMDS;
/// `AWS_ENDPOINT_URL` points it at a local emulator).
pub async fn aws_client() -> aws_sdk_dynamodb::Client {
    aws_sdk_dynamodb::Client::new(&aws_sdk_config().await)
}

/// The standard AWS configuration, with timeouts: the SDK sets none on a request by default, so
/// one answer that never comes (a dropped connection) would hold a room's appends, or the
/// fan-out's tail, forever. An attempt that times out is retried like any other failure.
pub async fn aws_sdk_config() -> aws_config::SdkConfig {
    use aws_config::timeout::TimeoutConfig;
    use std::time::Duration;
    aws_config::defaults(aws_config::BehaviorVersion::latest())
        .timeout_config(
            TimeoutConfig::builder()
                .connect_timeout(Duration::from_secs(3))
                .operation_attempt_timeout(Duration::from_secs(10))
                .operation_timeout(Duration::from_secs(30))
                .build(),
        )
        .load()
        .await
}
