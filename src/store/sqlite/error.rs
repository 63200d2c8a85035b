//! The SQLite backend's one error type, and how it maps onto the ports' [`StoreError`].

use crate::ports::StoreError;
use std::sync::Arc;

/// Why a SQLite store call failed.
#[derive(Debug, thiserror::Error)]
pub enum SqliteError {
    #[error("cannot open SQLite database {path}: {source}")]
    Open {
        path: String,
        #[source]
        source: sqlx::Error,
    },
    #[error("cannot migrate SQLite database {path}: {source}")]
    Migrate {
        path: String,
        #[source]
        source: sqlx::migrate::MigrateError,
    },
    #[error("no palaver database at {path} (start `palaver serve` there, or pass --store)")]
    Missing { path: String },
    #[error("{path} is not a palaver database (pass --store sqlite://PATH of the server's file)")]
    NotPalaver { path: String },
    #[error(
        "the palaver database at {path} is from an older palaver: run `palaver serve` on it once \
         to bring it up to date"
    )]
    Outdated { path: String },
    /// Another `palaver serve` holds the file's serving lock.
    #[error(
        "{path} is in use by another palaver serve{}: stop it first, or give this one another \
         --store",
        holder.map(|pid| format!(" (process {pid})")).unwrap_or_default()
    )]
    InUse { path: String, holder: Option<u32> },
    #[error("cannot lock {path}: {source}")]
    Lock {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("SQLite: {0}")]
    Sql(#[source] sqlx::Error),
    /// The group-commit transaction this append was part of was rolled back. Every append of the
    /// batch gets the same cause; none of them is in the log.
    #[error("write batch rolled back: {0}")]
    BatchFailed(#[source] Arc<SqliteError>),
    /// Optimistic concurrency (`Expect::Seq`) failed.
    #[error("{stream}: expected to append seq {expected}, but the next seq is {next}")]
    Conflict {
        stream: String,
        expected: u64,
        next: u64,
    },
    #[error("cannot encode event: {0}")]
    Encode(#[source] serde_json::Error),
    /// A number does not fit SQLite's signed 64-bit integers.
    #[error("{0} does not fit a SQLite integer")]
    OutOfRange(u64),
    /// Something read back could not be decoded.
    #[error("{0}")]
    Corrupt(String),
    /// The event contradicts its user's membership of its room.
    #[error(transparent)]
    Refused(#[from] crate::domain::Refusal),
    /// The committer task is gone (the runtime is shutting down), so nothing can be appended.
    #[error("the SQLite committer has stopped")]
    CommitterGone,
}

impl From<sqlx::Error> for SqliteError {
    /// A value sqlx cannot decode is bad data, not a failing database.
    fn from(e: sqlx::Error) -> Self {
        match e {
            sqlx::Error::ColumnDecode { .. } | sqlx::Error::Decode(_) => {
                SqliteError::Corrupt(e.to_string())
            }
            e => SqliteError::Sql(e),
        }
    }
}

impl From<SqliteError> for StoreError {
    fn from(e: SqliteError) -> Self {
        match e {
            SqliteError::Conflict {
                stream,
                expected,
                next,
            } => StoreError::Conflict {
                stream,
                expected,
                next,
            },
            SqliteError::Corrupt(what) => StoreError::Corrupt(what),
            SqliteError::Refused(refusal) => StoreError::Refused(refusal),
            e => StoreError::backend(e),
        }
    }
}
