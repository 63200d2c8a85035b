//! A connection's end, as the log records it: the one operation both the `$disconnect` route
//! and the fan-out (a post answered 410 Gone) perform, through the ports.
//!
//! A connection's stream has two events: seq 1 `connected`, seq 2 `disconnected`. Appending
//! seq 2 with an expected-seq check means it is closed exactly once, whoever notices first; the
//! second to try changes nothing. Neither caller knows about the other: the route handler does
//! not deliver, and the fan-out does not call a route.

use crate::domain::{ConnectionId, DisconnectReason, EventBody, Expect};
use crate::ports::{ConnectionRecord, Directory, EventLog, Retention, StoreError};
use std::time::Duration;

/// How long after `$connect` a 410 from API Gateway does not mean the connection is gone.
/// `$connect` runs during the WebSocket handshake, and API Gateway answers 410 to posts made
/// before it has finished the upgrade (one of 410's documented causes): a busy room's fan-out
/// finds new connections in that window all the time, and must not close them for it.
pub const HANDSHAKE_GRACE: Duration = Duration::from_secs(10);

/// A post to `connection` was answered 410 Gone. Closes it — unless it opened within `grace`,
/// when the gateway may still be finishing its handshake: then nothing is changed and `false`
/// comes back (the frame is lost to it, as any frame posted in that window is on AWS; the
/// client's `joinRoom{after}` replays it).
pub async fn gone(
    log: &dyn EventLog,
    directory: &dyn Directory,
    connection: &ConnectionId,
    grace: Duration,
) -> Result<bool, StoreError> {
    let Some(record) = directory.connection(connection).await? else {
        return Ok(true);
    };
    let age = crate::domain::event::now() - record.connected_at;
    if record.open && age.to_std().is_ok_and(|age| age < grace) {
        return Ok(false);
    }
    close_record(log, record, DisconnectReason::Gone).await?;
    Ok(true)
}

/// Appends the connection's `disconnected` event unless it is already closed or unknown.
pub async fn close(
    log: &dyn EventLog,
    directory: &dyn Directory,
    connection: &ConnectionId,
    reason: DisconnectReason,
) -> Result<(), StoreError> {
    match directory.connection(connection).await? {
        Some(record) => close_record(log, record, reason).await,
        None => Ok(()),
    }
}

/// Closes every connection the registry holds open — or, with `held_by`, every one that node
/// holds — `reason` given: for a `palaver serve` starting again, whose sockets all went with its
/// previous run. On a store only it writes (SQLite, memory) that is every open connection; on
/// one it shares (DynamoDB, with API Gateway or other nodes) only those recorded as its own.
/// Returns how many were closed. Their users' rooms hear that they went offline, through the
/// fan-out, like any other close.
pub async fn close_all_open(
    log: &dyn EventLog,
    directory: &dyn Directory,
    held_by: Option<&str>,
    reason: DisconnectReason,
) -> Result<usize, StoreError> {
    let open = match held_by {
        Some(node) => directory.open_connections_held_by(node).await?,
        None => directory.open_connections(None).await?,
    };
    close_records(log, open, reason).await
}

/// Closes each of `records` that is open, `reason` given; returns how many there were.
pub async fn close_records(
    log: &dyn EventLog,
    records: Vec<ConnectionRecord>,
    reason: DisconnectReason,
) -> Result<usize, StoreError> {
    use futures_util::StreamExt;
    let count = records.len();
    // Many at once, so that they share group commits.
    let mut closes = futures_util::stream::iter(records)
        .map(|record| close_record(log, record, reason))
        .buffer_unordered(256);
    while let Some(closed) = closes.next().await {
        closed?;
    }
    Ok(count)
}

async fn close_record(
    log: &dyn EventLog,
    record: ConnectionRecord,
    reason: DisconnectReason,
) -> Result<(), StoreError> {
    if !record.open {
        return Ok(());
    }
    let connection = &record.id;
    let body = EventBody::Disconnected {
        connection: connection.clone(),
        user: record.user.clone(),
        reason,
    };
    match log.append(body, Expect::Seq(2)).await {
        Ok(_) => {
            tracing::info!(%connection, user = %record.user, ?reason, "disconnected");
            Ok(())
        }
        Err(StoreError::Conflict { .. }) => Ok(()),
        Err(error) => Err(error),
    }
}

/// A connection retention as operators write it: a duration (`1h`, `7d`), or `forever`.
pub fn parse_retention(s: &str) -> Result<Option<Duration>, String> {
    match s.trim() {
        "forever" => Ok(None),
        s => crate::identity::parse_ttl(s).map(Some),
    }
}

/// Connections forgotten per write: small enough that the committer waits a few milliseconds at
/// most for the write lock.
const FORGET_BATCH: usize = 500;

/// Forgets connections closed more than `retention` ago, for ever: every tenth of `retention`
/// (at least every second, at most every ten minutes) it forgets them all, [`FORGET_BATCH`] at a
/// time, pausing between batches so appends take turns with it.
pub async fn forget_closed(store: std::sync::Arc<dyn Retention>, retention: Duration) {
    let every = (retention / 10).clamp(Duration::from_secs(1), Duration::from_secs(600));
    let Ok(retention) = chrono::TimeDelta::from_std(retention) else {
        return; // Longer than chrono can count: nothing will ever be old enough.
    };
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(closed_before) = crate::domain::event::now().checked_sub_signed(retention) else {
            continue;
        };
        let mut forgotten = 0;
        loop {
            match store.forget_connections(closed_before, FORGET_BATCH).await {
                Ok(0) => break,
                Ok(batch) => {
                    forgotten += batch;
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                Err(error) => {
                    tracing::warn!(%error, "could not forget old connections; trying again later");
                    break;
                }
            }
        }
        if forgotten > 0 {
            tracing::info!(forgotten, "forgot connections closed before the retention");
        }
    }
}
