//! Serial stages on threads of their own.
//!
//! The SQLite committer and the local log tail are each one task that everything queues behind:
//! every append waits for a commit, every delivery for the tail. Each of their steps is a round
//! trip to a SQLite worker thread, and on the shared runtime every wake-up of theirs would queue
//! behind thousands of connection tasks (a busy room's socket writers), so a batch of a
//! millisecond's work took tens of milliseconds and the whole server fell behind. On a thread of
//! their own, with a single-threaded runtime, the operating system schedules them as soon as
//! their answer arrives. They talk to the rest only through channels and wakers, which work
//! across runtimes.

use std::future::Future;

/// Runs `stage` to completion on a new thread named `name`, with its own single-threaded runtime.
///
/// The runtime has timers but no I/O driver: a stage waits only on channels and timers, and a
/// runtime that has no sockets to poll parks its thread on a futex rather than in `epoll_wait`.
/// Being woken — by every answer of sqlx's worker thread — is then one futex call, not a write to
/// an eventfd plus an epoll wake-up (8% of the committer's CPU before).
pub fn spawn(name: &str, stage: impl Future<Output = ()> + Send + 'static) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .expect("a single-threaded runtime starts");
    std::thread::Builder::new()
        .name(name.to_owned())
        .spawn(move || runtime.block_on(stage))
        .expect("the operating system starts a thread");
}
