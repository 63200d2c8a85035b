//! One server per database file.
//!
//! Two `palaver serve` processes on one SQLite file would each take the other's connections for
//! the leftovers of a crash and close them, and deliver only what they themselves committed.
//! A server therefore holds an advisory lock (`flock`) on `PATH.lock` while it runs, with its
//! process id written inside for whoever finds it held. The kernel releases the lock when the
//! holder exits or dies, so a crash never leaves a stale lock behind — only a stale file, which
//! the next server locks and rewrites. Operator commands, which only read, take no lock.

use super::SqliteError;
use std::fs::{File, OpenOptions, TryLockError};
use std::io::{Read, Seek, Write};

/// The lock on a database file; released when dropped (or when the process ends).
#[derive(Debug)]
pub struct ServingLock {
    _file: File,
}

/// Takes the serving lock of the database at `path`, or says which process holds it.
pub fn lock_for_serving(path: &str) -> Result<ServingLock, SqliteError> {
    let lock_path = format!("{path}.lock");
    let failed = |source: std::io::Error| SqliteError::Lock {
        path: lock_path.clone(),
        source,
    };
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&lock_path)
        .map_err(failed)?;
    match file.try_lock() {
        Ok(()) => {
            file.set_len(0).map_err(failed)?;
            file.rewind().map_err(failed)?;
            writeln!(file, "{}", std::process::id()).map_err(failed)?;
            Ok(ServingLock { _file: file })
        }
        Err(TryLockError::WouldBlock) => {
            let mut holder = String::new();
            let _ = file.read_to_string(&mut holder);
            Err(SqliteError::InUse {
                path: path.to_owned(),
                holder: holder.trim().parse().ok(),
            })
        }
        Err(TryLockError::Error(source)) => Err(failed(source)),
    }
}
