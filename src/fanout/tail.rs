//! The local log tail: follows the log in commit order and hands every event to the fan-out.
//!
//! Catch-up without gaps: subscribe to the wake-up first, then read from the checkpoint, and
//! only then wait. The wake-up carries no events — only "something was committed" — so a tail
//! that falls behind re-reads from its checkpoint instead of silently skipping. The one thing it
//! does pass over is an event the store cannot decode (a damaged row): that is logged as an
//! error, because waiting for it would stop every room. Any other failure, to read or to
//! deliver, is tried again under [`retry::FOLLOW`], for as long as it takes.
//!
//! Who hears each event comes from the tail's own [`Roster`], folded from the same events in the
//! same order, so delivering costs no store query.

use super::{FanOut, Roster};
use crate::domain::Event;
use crate::ports::{LogFeed, StoreError};
use crate::retry;
use backon::Retryable;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tokio::sync::mpsc;

/// How many events one read takes.
const PAGE: usize = 256;
/// Re-read at least this often even without a wake-up (another process may write the file).
const POLL: Duration = Duration::from_secs(1);

/// How many read pages may wait for the fan-out.
const PAGES_AHEAD: usize = 4;

/// Starts the tail after `checkpoint`, with `roster` as the projection stood there, and runs
/// it until the feed's store is dropped.
///
/// It is two parts. The reader runs on a thread of its own ([`crate::dedicated`]): its reads
/// are round trips to a SQLite worker thread, and on the shared runtime each would wait behind
/// every busy socket writer. The delivery runs as a task on the shared runtime, a page at a time
/// without waiting on anything: the writers it wakes are then queued on its own worker, which
/// is far cheaper than waking them from another thread.
///
/// Returns how far it has delivered, for the lag that `/metrics` and `/readyz` report.
pub fn start(
    feed: Arc<dyn LogFeed>,
    fanout: FanOut,
    mut roster: Roster,
    checkpoint: u64,
) -> Arc<Progress> {
    let progress = Arc::new(Progress(AtomicU64::new(checkpoint)));
    let (pages, mut read) = mpsc::channel::<Vec<(u64, Event)>>(PAGES_AHEAD);
    crate::dedicated::spawn("palaver-tail", follow(feed, pages, checkpoint));
    let delivered = progress.clone();
    tokio::spawn(async move {
        while let Some(page) = read.recv().await {
            for (position, event) in &page {
                // A store error here (not a failed post) would skip recipients: retry it. A
                // plain loop, not a backon retry: this runs for every event, and the roster
                // stays borrowed rather than moved in and out of a retried closure.
                let mut failures = 0;
                while let Err(error) = fanout.deliver_in(event, &mut roster).await {
                    failures += 1;
                    tracing::error!(%error, position, "fan-out failed; retrying");
                    if let Some(pause) = retry::pause_after(retry::FOLLOW, failures) {
                        tokio::time::sleep(pause).await;
                    }
                }
                delivered.0.store(*position, Ordering::Release);
            }
        }
    });
    progress
}

/// The log position of the last event the tail has delivered.
pub struct Progress(AtomicU64);

impl Progress {
    pub fn delivered(&self) -> u64 {
        self.0.load(Ordering::Acquire)
    }
}

/// Reads the log in commit order from `checkpoint` on and hands it over a page at a time.
async fn follow(
    feed: Arc<dyn LogFeed>,
    pages: mpsc::Sender<Vec<(u64, Event)>>,
    mut checkpoint: u64,
) {
    let mut wake = feed.watch();
    loop {
        wake.borrow_and_update();
        loop {
            let page = match read_all(&*feed, checkpoint, PAGE).await {
                Ok(page) => page,
                // An unreadable event somewhere in the page: go one event at a time up to it.
                Err(_) => match read_all(&*feed, checkpoint, 1).await {
                    Ok(one) => one,
                    Err(why) => {
                        // The unreadable event is the first after the checkpoint: step past
                        // it one position at a time (positions have gaps where connections were
                        // forgotten). No retry can decode it; waiting for it would stop every
                        // room's fan-out.
                        tracing::error!(
                            position = checkpoint + 1,
                            %why,
                            "skipping an unreadable event: it is not delivered"
                        );
                        checkpoint += 1;
                        continue;
                    }
                },
            };
            let Some(&(last, _)) = page.last() else { break };
            if pages.send(page).await.is_err() {
                return;
            }
            checkpoint = last;
            // Caught up with every commit this process has announced: another read would only
            // find nothing. (Other processes' events are found by the next poll.)
            if checkpoint >= *wake.borrow() {
                break;
            }
        }
        tokio::select! {
            changed = wake.changed() => if changed.is_err() { return },
            _ = tokio::time::sleep(POLL) => {}
        }
    }
}

/// Up to `limit` events after `checkpoint`, read again under [`retry::FOLLOW`] until the read
/// succeeds or finds an event the store cannot decode ([`StoreError::Corrupt`], its only error),
/// which no retry can help.
async fn read_all(
    feed: &dyn LogFeed,
    checkpoint: u64,
    limit: usize,
) -> Result<Vec<(u64, Event)>, StoreError> {
    (|| feed.read_all(checkpoint, limit))
        .retry(retry::FOLLOW)
        .when(|error| !matches!(error, StoreError::Corrupt(_)))
        .notify(|error, _| tracing::error!(%error, checkpoint, "log tail could not read; retrying"))
        .await
}

/// Where a tail started now should begin: after everything already committed.
pub async fn current_position(feed: &dyn LogFeed) -> u64 {
    *feed.watch().borrow()
}
