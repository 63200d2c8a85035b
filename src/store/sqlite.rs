//! PLACEHOLDER — being replaced by the SQLite adapter.
use crate::ports::Store;
use std::sync::Arc;

#[derive(Debug, thiserror::Error)]
pub enum SqliteError {
    #[error("not built yet")]
    NotBuilt,
}

pub struct SqliteStore;

impl SqliteStore {
    pub async fn open(_path: &str) -> Result<Arc<SqliteStore>, SqliteError> {
        Err(SqliteError::NotBuilt)
    }
    pub fn store(self: &Arc<Self>) -> Store {
        crate::store::memory::MemoryStore::store()
    }
}
