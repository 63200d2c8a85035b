//! Store adapters, one module per technology, and the `--store` URL that picks one.

pub mod memory;
pub mod sqlite;

use crate::ports::Store;

/// What `--store` / `PALAVER_STORE` names.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StoreUrl {
    /// `sqlite://PATH`: the embedded default.
    Sqlite(String),
    /// `memory://`: nothing survives the process.
    Memory,
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
        } else if url == "memory://" || url == "memory" {
            Ok(StoreUrl::Memory)
        } else {
            Err(UnknownStore(url.to_owned()))
        }
    }
}

/// Opens (and for SQLite, creates and migrates) the store.
pub async fn open(url: &StoreUrl) -> Result<Store, Box<dyn std::error::Error + Send + Sync>> {
    match url {
        StoreUrl::Memory => Ok(memory::MemoryStore::store()),
        StoreUrl::Sqlite(path) => Ok(sqlite::SqliteStore::open(path).await?.store()),
    }
}
