//! One connection's queue of frames waiting for its socket.
//!
//! Bounded in frames *and* bytes, and free when empty: most connections are idle most of the
//! time, so an idle one must not keep a preallocated channel block or a grown buffer. A frame
//! count alone is no bound on memory — a `getHistory` answer can be 100 KB where a chat message
//! is 200 bytes — so every bound here is both. The writer takes everything queued at once and
//! hands it to the kernel in vectored writes.

use bytes::Bytes;
use parking_lot::Mutex;
use std::collections::VecDeque;
use tokio::sync::Notify;

/// The outbox is full: the connection's reader is not keeping up.
#[derive(Debug)]
pub struct Full;

/// How much a queue may hold before a push is refused (or waits).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Bound {
    pub frames: usize,
    pub bytes: usize,
}

impl Bound {
    /// Whether `queued` leaves room for one more frame. The bytes are checked before the frame
    /// goes in, so one frame larger than the whole bound still fits into an empty queue: the
    /// bound is on what waits, not on the size of one answer (which the routes bound).
    fn has_room(&self, queued: &Queued) -> bool {
        queued.frames.len() < self.frames && queued.bytes < self.bytes
    }
}

#[derive(Default)]
struct Queued {
    frames: VecDeque<Bytes>,
    bytes: usize,
}

#[derive(Default)]
pub struct Outbox {
    queued: Mutex<Queued>,
    /// Wakes the writer when frames arrive.
    arrived: Notify,
    /// Wakes whoever waits for room when the writer takes frames.
    taken: Notify,
}

impl Outbox {
    /// Queues a frame without waiting.
    pub fn try_push(&self, frame: Bytes, bound: Bound) -> Result<(), Full> {
        let mut slot = Some(frame);
        if self.try_push_from(&mut slot, bound) {
            Ok(())
        } else {
            Err(Full)
        }
    }

    /// Moves the frame in `slot` into the queue once there is room, waiting for the writer to
    /// make some if need be. Cancel-safe: dropped before it resolves, the frame is still in
    /// `slot` — so a caller can wait for room and for other things (a timer, a close) at once.
    pub async fn push_from(&self, slot: &mut Option<Bytes>, bound: Bound) {
        loop {
            // Registered before the check, so a `take` between the two is not missed.
            let taken = self.taken.notified();
            if self.try_push_from(slot, bound) {
                return;
            }
            taken.await;
        }
    }

    /// Moves the frame in `slot` into the queue if there is room, without waiting; whether it
    /// went in (or `slot` was empty).
    pub fn try_push_from(&self, slot: &mut Option<Bytes>, bound: Bound) -> bool {
        {
            let mut queued = self.lock();
            if !bound.has_room(&queued) {
                return slot.is_none();
            }
            let Some(frame) = slot.take() else {
                return true;
            };
            queued.bytes += frame.len();
            queued.frames.push_back(frame);
        }
        self.arrived.notify_one();
        true
    }

    /// Waits for frames and takes all of them, leaving the outbox empty and unallocated.
    pub async fn take(&self) -> VecDeque<Bytes> {
        loop {
            let arrived = self.arrived.notified();
            let frames = self.take_now();
            if !frames.is_empty() {
                return frames;
            }
            arrived.await;
        }
    }

    /// Takes whatever is queued, without waiting.
    pub fn take_now(&self) -> VecDeque<Bytes> {
        let frames = {
            let mut queued = self.lock();
            queued.bytes = 0;
            std::mem::take(&mut queued.frames)
        };
        if !frames.is_empty() {
            self.taken.notify_waiters();
        }
        frames
    }

    pub fn len(&self) -> usize {
        self.lock().frames.len()
    }

    /// The bytes queued.
    pub fn bytes(&self) -> usize {
        self.lock().bytes
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self) -> parking_lot::MutexGuard<'_, Queued> {
        self.queued.lock()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    const EIGHT: Bound = Bound {
        frames: 8,
        bytes: 1024,
    };

    #[tokio::test]
    async fn frames_come_out_in_the_order_they_went_in() {
        let outbox = Outbox::default();
        for n in 0..3u8 {
            outbox.try_push(Bytes::from(vec![n]), EIGHT).unwrap();
        }
        assert_eq!(outbox.bytes(), 3);
        let frames: Vec<_> = outbox.take().await.into_iter().collect();
        assert_eq!(frames, vec![vec![0u8], vec![1], vec![2]]);
        assert!(outbox.is_empty());
        assert_eq!(outbox.bytes(), 0);
    }

    #[tokio::test]
    async fn a_full_outbox_refuses_and_a_waiting_push_goes_in_after_a_take() {
        let one = Bound {
            frames: 1,
            bytes: 1024,
        };
        let outbox = Arc::new(Outbox::default());
        outbox.try_push(Bytes::from_static(b"a"), one).unwrap();
        assert!(outbox.try_push(Bytes::from_static(b"b"), one).is_err());

        let waiting = tokio::spawn({
            let outbox = outbox.clone();
            async move {
                let mut slot = Some(Bytes::from_static(b"c"));
                outbox.push_from(&mut slot, one).await;
                slot
            }
        });
        assert_eq!(outbox.take().await.len(), 1);
        assert_eq!(waiting.await.unwrap(), None);
        assert_eq!(outbox.take().await.pop_front().unwrap(), "c");
    }

    #[test]
    fn bytes_bound_the_queue_as_well_as_frames() {
        let outbox = Outbox::default();
        let big = Bytes::from(vec![0u8; 700]);
        // One frame larger than what is left still goes into a queue under its bound ...
        outbox.try_push(big.clone(), EIGHT).unwrap();
        outbox.try_push(big.clone(), EIGHT).unwrap();
        // ... but none once the bytes queued reach it, however few the frames.
        assert!(outbox.try_push(Bytes::from_static(b"x"), EIGHT).is_err());
        assert_eq!(outbox.len(), 2);
        assert_eq!(outbox.bytes(), 1400);
    }

    #[tokio::test]
    async fn a_push_given_up_keeps_its_frame() {
        let one = Bound {
            frames: 1,
            bytes: 1024,
        };
        let outbox = Outbox::default();
        outbox.try_push(Bytes::from_static(b"a"), one).unwrap();
        let mut slot = Some(Bytes::from_static(b"b"));
        // Polled once (no room: pending) and dropped, as a `select!` drops the arm it did not take.
        assert!(futures_util::FutureExt::now_or_never(outbox.push_from(&mut slot, one)).is_none());
        assert_eq!(slot.as_deref(), Some(&b"b"[..]));
    }
}
