//! The order in which one connection's frames reach the log.
//!
//! A client may send many `sendMessage` frames without waiting for each `sent`. The local
//! gateway handles them concurrently, so that they share group commits instead of paying an
//! fsync each — but they must be appended in the order they were sent, and answered in that
//! order. Each frame's handler gets a [`Turn`]: it waits for the frame before it to have taken
//! its place in the log, takes its own ([`EventLog::submit`]), and passes the turn on; it then
//! waits for its commit while the next frame already queues behind it.
//!
//! A turn is passed when it is dropped, too, so a frame refused before it appends (not a member,
//! bad input) never holds up the frames behind it.
//!
//! [`EventLog::submit`]: crate::ports::EventLog::submit

use tokio::sync::oneshot;

/// One frame's place in its connection's order of appends.
#[derive(Debug, Default)]
pub struct Turn {
    /// Resolves when the frame before has taken its place (or gave it up).
    before: Option<oneshot::Receiver<()>>,
    /// Dropped once this frame has taken its place.
    done: Option<oneshot::Sender<()>>,
}

impl Turn {
    /// A frame with nothing to wait for and nobody waiting for it: Lambda, or one frame at a
    /// time.
    pub fn alone() -> Turn {
        Turn::default()
    }

    /// A frame's turn after `before` (what the frame before it passes; `None` for the first):
    /// returns the turn and what the frame after it waits on.
    pub fn chain(before: Option<oneshot::Receiver<()>>) -> (Turn, oneshot::Receiver<()>) {
        let (done, next) = oneshot::channel();
        (
            Turn {
                before,
                done: Some(done),
            },
            next,
        )
    }

    /// Waits until every frame before this one has taken its place in the log.
    pub async fn wait(&mut self) {
        if let Some(before) = self.before.take() {
            // An error means the frame before gave up its turn: that is a pass too.
            let _ = before.await;
        }
    }

    /// This frame has taken its place: the next may go.
    pub fn pass(&mut self) {
        self.done.take();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn a_turn_waits_for_the_one_before_to_pass_or_drop() {
        let (mut first, next) = Turn::chain(None);
        let (mut second, next) = Turn::chain(Some(next));
        let (mut third, _) = Turn::chain(Some(next));
        first.wait().await;
        let waiting = tokio::spawn(async move {
            second.wait().await;
            second
        });
        // The second cannot go before the first passes: a marker that passes first shows it.
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished());
        first.pass();
        let second = tokio::time::timeout(Duration::from_secs(5), waiting)
            .await
            .expect("second turn")
            .unwrap();
        drop(second);
        tokio::time::timeout(Duration::from_secs(5), third.wait())
            .await
            .expect("a dropped turn passes");
    }
}
