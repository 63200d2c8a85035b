//! One connection's queue of frames waiting for its socket.
//!
//! Bounded, and free when empty: most connections are idle most of the time, so an idle one
//! must not keep a preallocated channel block or a grown buffer. The writer takes everything
//! queued at once and hands it to the kernel in one vectored write.

use bytes::Bytes;
use parking_lot::Mutex;
use std::collections::VecDeque;
use tokio::sync::Notify;

/// The outbox is full: the connection's reader is not keeping up.
#[derive(Debug)]
pub struct Full;

#[derive(Default)]
pub struct Outbox {
    frames: Mutex<VecDeque<Bytes>>,
    /// Wakes the writer when frames arrive.
    queued: Notify,
    /// Wakes whoever waits for room when the writer takes frames.
    taken: Notify,
}

impl Outbox {
    /// Queues a frame without waiting.
    pub fn try_push(&self, frame: Bytes, bound: usize) -> Result<(), Full> {
        {
            let mut frames = self.lock();
            if frames.len() >= bound {
                return Err(Full);
            }
            frames.push_back(frame);
        }
        self.queued.notify_one();
        Ok(())
    }

    /// Queues a frame, first waiting for the writer to make room if need be.
    pub async fn push(&self, frame: Bytes, bound: usize) {
        let mut frame = Some(frame);
        loop {
            // Registered before the check, so a `take` between the two is not missed.
            let taken = self.taken.notified();
            {
                let mut frames = self.lock();
                if frames.len() < bound {
                    frames.extend(frame.take());
                }
            }
            if frame.is_none() {
                self.queued.notify_one();
                return;
            }
            taken.await;
        }
    }

    /// Waits for frames and takes all of them, leaving the outbox empty and unallocated.
    pub async fn take(&self) -> VecDeque<Bytes> {
        loop {
            let queued = self.queued.notified();
            let frames = std::mem::take(&mut *self.lock());
            if !frames.is_empty() {
                self.taken.notify_waiters();
                return frames;
            }
            queued.await;
        }
    }

    /// Takes whatever is queued, without waiting.
    pub fn take_now(&self) -> VecDeque<Bytes> {
        std::mem::take(&mut *self.lock())
    }

    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self) -> parking_lot::MutexGuard<'_, VecDeque<Bytes>> {
        self.frames.lock()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[tokio::test]
    async fn frames_come_out_in_the_order_they_went_in() {
        let outbox = Outbox::default();
        for n in 0..3u8 {
            outbox.try_push(Bytes::from(vec![n]), 8).unwrap();
        }
        let frames: Vec<_> = outbox.take().await.into_iter().collect();
        assert_eq!(frames, vec![vec![0u8], vec![1], vec![2]]);
        assert!(outbox.is_empty());
    }

    #[tokio::test]
    async fn a_full_outbox_refuses_and_a_waiting_push_goes_in_after_a_take() {
        let outbox = Arc::new(Outbox::default());
        outbox.try_push(Bytes::from_static(b"a"), 1).unwrap();
        assert!(outbox.try_push(Bytes::from_static(b"b"), 1).is_err());

        let waiting = tokio::spawn({
            let outbox = outbox.clone();
            async move { outbox.push(Bytes::from_static(b"c"), 1).await }
        });
        assert_eq!(outbox.take().await.len(), 1);
        waiting.await.unwrap();
        assert_eq!(outbox.take().await.pop_front().unwrap(), "c");
    }
}
