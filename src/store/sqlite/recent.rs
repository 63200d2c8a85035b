//! The last events this process committed, kept in memory for the log's readers.
//!
//! The local tail reads the log right after every commit ([`LogFeed::read_all`]), and through
//! the pool that read is a query on another worker thread plus decoding every row — for events
//! the committer held in memory a moment before. So the committer keeps the last [`KEPT`] of
//! them here, and `read_all` answers from them when it can.
//!
//! An answer from here must be exactly what the table would answer. That holds because what is
//! kept is one unbroken run of positions: the committer adds each batch only if it starts right
//! after the last position kept, and otherwise starts the run afresh (another process wrote to
//! the file in between). Within a run nothing else can have been written, since every batch
//! takes its positions under the write lock. So a read that starts inside the run is answered
//! from it, up to its end; the next read, from the run's end, goes to the table, which also sees
//! what other processes wrote. And when old events are deleted ([`retention`](super::retention)),
//! the run is dropped.
//!
//! [`LogFeed::read_all`]: crate::ports::LogFeed::read_all

use crate::domain::Event;
use parking_lot::Mutex;
use std::collections::VecDeque;

/// How many events are kept: a few of the committer's largest batches.
const KEPT: usize = 1024;

/// The kept run of events, oldest first, each with its position.
#[derive(Default)]
pub(super) struct Recent(Mutex<VecDeque<(u64, Event)>>);

impl Recent {
    /// Adds a committed batch, whose positions run on from each other.
    pub fn committed(&self, batch: impl Iterator<Item = (u64, Event)>) {
        let mut kept = self.0.lock();
        let mut batch = batch.peekable();
        let Some(&(first, _)) = batch.peek() else {
            return;
        };
        if kept.back().is_some_and(|(last, _)| last + 1 != first) {
            kept.clear();
        }
        kept.extend(batch);
        let surplus = kept.len().saturating_sub(KEPT);
        kept.drain(..surplus);
    }

    /// Up to `limit` events after position `after`, if the run holds the next one; `None` if
    /// the table must answer.
    pub fn after(&self, after: u64, limit: usize) -> Option<Vec<(u64, Event)>> {
        let kept = self.0.lock();
        let &(first, _) = kept.front()?;
        let &(last, _) = kept.back()?;
        if after < first.checked_sub(1)? || after >= last {
            return None;
        }
        // The run is unbroken, so position `after + 1` is at this index.
        let start = usize::try_from(after + 1 - first).ok()?;
        Some(kept.range(start..).take(limit).cloned().collect())
    }

    /// Forgets the run: events in it may have been deleted.
    pub fn forget(&self) {
        self.0.lock().clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{EventBody, RoomName, UserId};
    use chrono::Utc;

    fn events(positions: std::ops::RangeInclusive<u64>) -> Vec<(u64, Event)> {
        positions
            .map(|pos| {
                let body = EventBody::Joined {
                    room: RoomName::parse("r").unwrap(),
                    user: UserId::parse(&format!("u{pos}")).unwrap(),
                };
                (pos, Event::record(body, pos, Utc::now()))
            })
            .collect()
    }

    fn positions(answer: Option<Vec<(u64, Event)>>) -> Option<Vec<u64>> {
        answer.map(|events| events.into_iter().map(|(pos, _)| pos).collect())
    }

    #[test]
    fn answers_only_from_inside_the_run() {
        let recent = Recent::default();
        assert_eq!(positions(recent.after(0, 10)), None, "nothing kept yet");
        recent.committed(events(5..=7).into_iter());
        recent.committed(events(8..=9).into_iter());
        assert_eq!(positions(recent.after(4, 10)), Some(vec![5, 6, 7, 8, 9]));
        assert_eq!(positions(recent.after(6, 2)), Some(vec![7, 8]));
        assert_eq!(
            positions(recent.after(3, 10)),
            None,
            "position 4 is not kept"
        );
        assert_eq!(
            positions(recent.after(9, 10)),
            None,
            "past the run: the table knows"
        );
    }

    #[test]
    fn a_gap_starts_the_run_afresh() {
        let recent = Recent::default();
        recent.committed(events(1..=3).into_iter());
        // Another process wrote 4 and 5.
        recent.committed(events(6..=6).into_iter());
        assert_eq!(positions(recent.after(3, 10)), None);
        assert_eq!(positions(recent.after(5, 10)), Some(vec![6]));
    }

    #[test]
    fn keeps_only_the_latest() {
        let recent = Recent::default();
        let total = KEPT as u64 + 100;
        for pos in 1..=total {
            recent.committed(events(pos..=pos).into_iter());
        }
        assert_eq!(positions(recent.after(99, 1)), None);
        assert_eq!(positions(recent.after(100, 1)), Some(vec![101]));
        recent.forget();
        assert_eq!(positions(recent.after(total - 1, 1)), None);
    }
}
