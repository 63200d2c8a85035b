//! Posts that outlast the rest of their frame.
//!
//! On AWS each post is a request to the management API, and a connection that does not take
//! its frames answers none of them until the attempt times out (1 s, twenty times API Gateway's
//! p99). Waited for, it would hold up its job, the delivery lane behind it and everyone in them
//! — and again each time it reconnects and hangs once more. So once every other post of a frame
//! has answered, the fan-out waits [`STRAGGLER_GRACE`] for the last few and then lets them
//! finish on their own ([`Stragglers::post_each`]), and the lane goes on to its next frame.
//!
//! A connection's frames still arrive in order: a later frame to a connection whose post was let
//! go is posted only once that post answered, and not at all if it found the connection slow or
//! gone (it is being closed, and replays with `joinRoom{after}`). Lambda freezes whatever still
//! runs when a handler returns, so the handler waits for what it let go first
//! ([`Stragglers::settle`]), and aborts at its deadline what would outlast it (its recipients
//! see the gap in `seq` and fill it, as after any lost frame).

use crate::domain::ConnectionId;
use crate::ports::{ConnectionGateway, POST_CONCURRENCY, PostError};
use bytes::Bytes;
use futures_util::FutureExt;
use futures_util::future::{BoxFuture, Shared};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{Semaphore, mpsc};
use tokio::task::{AbortHandle, JoinHandle};
use tokio::time::Instant;

/// How long the last few posts of a frame get after the one before them answered, before they
/// are let go: four times API Gateway's p99 for a post (~50 ms, `../shared/AWS-LIMITS.md`),
/// so that only a connection in real trouble — or a post waiting out throttling — is let go.
pub const STRAGGLER_GRACE: Duration = Duration::from_millis(200);

/// At most this share of a frame's posts (and at least one) is let go: when more are still
/// running, the management API itself is slow or throttled for everyone, and the frame waits
/// for them as before.
const MOST_LATE: usize = 20;

/// A post let go: resolves to whether later frames may follow it to its connection.
type Settled = Shared<BoxFuture<'static, bool>>;

/// What became of one post.
pub(super) enum Outcome {
    /// The management API answered (or the attempt timed out).
    Answered(Result<(), PostError>),
    /// Not posted: an earlier frame's post found the connection slow or gone.
    Skipped,
}

/// A frame's posts, as far as they went before the last were let go.
#[derive(Default)]
pub(super) struct Posted {
    /// Posts that failed, by index into the recipients.
    pub failures: Vec<(usize, PostError)>,
    /// Recipients not posted to: their connection is being closed.
    pub skipped: usize,
    /// Posts still running when they were let go, by index into the recipients.
    pub late: Vec<(usize, Late)>,
}

/// A post still running when its frame went on; aborted if dropped before it ends (its
/// invocation's deadline came first).
pub(super) struct Late(JoinHandle<Outcome>);

impl Late {
    pub(super) async fn ended(mut self) -> Outcome {
        outcome_of((&mut self.0).await)
    }
}

impl Drop for Late {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// The posts one fan-out let go, until its invocation settles them.
#[derive(Default)]
pub struct Stragglers {
    /// Each connection's latest post that was let go.
    pending: Mutex<HashMap<ConnectionId, Settled>>,
    /// Every post let go and not yet settled, with what aborts it.
    running: Mutex<Vec<(Settled, AbortHandle)>>,
}

impl Stragglers {
    /// Posts `frame` to every recipient, up to [`POST_CONCURRENCY`] at once, and returns once
    /// all answered — or once at most one in [`MOST_LATE`] is left and none answered for
    /// [`STRAGGLER_GRACE`]: those are returned still running, for [`Stragglers::let_go`].
    pub(super) async fn post_each(
        &self,
        gateway: &Arc<dyn ConnectionGateway>,
        recipients: &[ConnectionId],
        frame: Bytes,
    ) -> Posted {
        let permits = Arc::new(Semaphore::new(POST_CONCURRENCY));
        let (done_tx, mut done) = mpsc::unbounded_channel();
        let mut posts: Vec<Option<JoinHandle<Outcome>>> = {
            let pending = self.pending.lock().expect("not poisoned");
            recipients
                .iter()
                .enumerate()
                .map(|(i, connection)| {
                    let before = pending.get(connection).cloned();
                    let (permits, gateway, done) =
                        (permits.clone(), gateway.clone(), done_tx.clone());
                    let (connection, frame) = (connection.clone(), frame.clone());
                    Some(tokio::spawn(async move {
                        let follows = match before {
                            Some(before) => before.await,
                            None => true,
                        };
                        let outcome = if follows {
                            let _permit = permits.acquire_owned().await.expect("never closed");
                            Outcome::Answered(gateway.post(&connection, frame).await)
                        } else {
                            Outcome::Skipped
                        };
                        let _ = done.send(i);
                        outcome
                    }))
                })
                .collect()
        };
        drop(done_tx);
        let most_late = (recipients.len() / MOST_LATE).max(1);
        let mut running = recipients.len();
        let mut posted = Posted::default();
        while running > 0 {
            let next = if running <= most_late {
                match tokio::time::timeout(STRAGGLER_GRACE, done.recv()).await {
                    Ok(next) => next,
                    Err(_) => break,
                }
            } else {
                done.recv().await
            };
            // Every post sends once it ends; none left to send means one panicked: let go,
            // its handle says so.
            let Some(i) = next else { break };
            running -= 1;
            let post = posts[i].take().expect("each post ends once");
            match outcome_of(post.await) {
                Outcome::Answered(Ok(())) => {}
                Outcome::Answered(Err(error)) => posted.failures.push((i, error)),
                Outcome::Skipped => posted.skipped += 1,
            }
        }
        posted.late = posts
            .into_iter()
            .enumerate()
            .filter_map(|(i, post)| post.map(|post| (i, Late(post))))
            .collect();
        posted
    }

    /// Lets `settle` — what becomes of a post to `connection` that was let go — run on its own:
    /// a later frame to `connection` waits for it, and [`Stragglers::settle`] waits for it.
    pub(super) fn let_go(
        &self,
        connection: ConnectionId,
        settle: impl std::future::Future<Output = bool> + Send + 'static,
    ) {
        let task = tokio::spawn(settle);
        let abort = task.abort_handle();
        let settled: Settled = async move { task.await.unwrap_or(false) }.boxed().shared();
        self.pending
            .lock()
            .expect("not poisoned")
            .insert(connection, settled.clone());
        self.running
            .lock()
            .expect("not poisoned")
            .push((settled, abort));
    }

    /// Waits for every post let go to settle, until `by`; aborts the ones still running then.
    /// Returns how many were aborted.
    pub async fn settle(&self, by: Instant) -> usize {
        let running = std::mem::take(&mut *self.running.lock().expect("not poisoned"));
        let all =
            futures_util::future::join_all(running.iter().map(|(settled, _)| settled.clone()));
        let aborted = if tokio::time::timeout_at(by, all).await.is_err() {
            let aborted = running.iter().filter(|(s, _)| s.peek().is_none()).count();
            for (_, abort) in &running {
                abort.abort();
            }
            tracing::warn!(aborted, "posts still running at the deadline were aborted");
            aborted
        } else {
            0
        };
        self.pending.lock().expect("not poisoned").clear();
        aborted
    }
}

/// A post's outcome; one whose task panicked or was aborted failed.
fn outcome_of(joined: Result<Outcome, tokio::task::JoinError>) -> Outcome {
    joined.unwrap_or_else(|error| Outcome::Answered(Err(PostError::Failed(error.to_string()))))
}
