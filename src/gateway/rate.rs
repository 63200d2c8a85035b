//! Per-connection rate limiting, as API Gateway's route throttling does for the local gateway.
//!
//! A token bucket: a burst of twice the rate, refilled at the rate (`--rate-limit`, frames per
//! second per connection, [`DEFAULT_PER_SECOND`] unless set; 0 turns it off). A refused frame
//! gets `rate_limited` and the connection stays; a client that keeps going — [`FLOOD_STRIKES`]
//! refusals within [`FLOOD_WINDOW`] — is disconnected.

use std::time::{Duration, Instant};

/// A person types far slower than this; a script that sends faster is throttled.
pub const DEFAULT_PER_SECOND: u32 = 30;
pub const FLOOD_STRIKES: u32 = 300;
pub const FLOOD_WINDOW: Duration = Duration::from_secs(10);

/// What to do with one incoming frame.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    Admit,
    Refuse,
    Flooding,
}

pub struct RateLimit {
    per_second: f64,
    burst: f64,
    tokens: f64,
    refilled: Instant,
    strikes: u32,
    window: Instant,
}

impl RateLimit {
    /// A limit of `per_second` frames per second with a burst of twice that; `None` for 0 (off).
    pub fn new(per_second: u32) -> Option<RateLimit> {
        if per_second == 0 {
            return None;
        }
        let now = Instant::now();
        let per_second = f64::from(per_second);
        Some(RateLimit {
            per_second,
            burst: 2.0 * per_second,
            tokens: 2.0 * per_second,
            refilled: now,
            strikes: 0,
            window: now,
        })
    }

    pub fn admit(&mut self) -> Verdict {
        self.admit_at(Instant::now())
    }

    fn admit_at(&mut self, now: Instant) -> Verdict {
        let elapsed = now.saturating_duration_since(self.refilled).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.per_second).min(self.burst);
        self.refilled = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            return Verdict::Admit;
        }
        if now.saturating_duration_since(self.window) > FLOOD_WINDOW {
            self.window = now;
            self.strikes = 0;
        }
        self.strikes += 1;
        if self.strikes > FLOOD_STRIKES {
            Verdict::Flooding
        } else {
            Verdict::Refuse
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_passes_then_frames_are_refused_then_refilled() {
        let mut limit = RateLimit::new(DEFAULT_PER_SECOND).unwrap();
        let t0 = Instant::now();
        for _ in 0..2 * DEFAULT_PER_SECOND {
            assert_eq!(limit.admit_at(t0), Verdict::Admit);
        }
        assert_eq!(limit.admit_at(t0), Verdict::Refuse);
        assert_eq!(limit.admit_at(t0 + Duration::from_secs(1)), Verdict::Admit);
    }

    #[test]
    fn a_flood_is_told_apart() {
        let mut limit = RateLimit::new(DEFAULT_PER_SECOND).unwrap();
        let t0 = Instant::now();
        let verdicts: Vec<Verdict> = (0..2 * DEFAULT_PER_SECOND + FLOOD_STRIKES + 1)
            .map(|_| limit.admit_at(t0))
            .collect();
        assert_eq!(verdicts.last(), Some(&Verdict::Flooding));
    }

    #[test]
    fn the_rate_is_a_setting_and_zero_turns_it_off() {
        assert!(RateLimit::new(0).is_none());
        let mut limit = RateLimit::new(1000).unwrap();
        let t0 = Instant::now();
        for _ in 0..2000 {
            assert_eq!(limit.admit_at(t0), Verdict::Admit);
        }
        assert_eq!(limit.admit_at(t0), Verdict::Refuse);
    }
}
