//! Per-connection rate limiting, as API Gateway's route throttling does for the local gateway.
//!
//! A token bucket: a burst of [`BURST`] frames, refilled at [`PER_SECOND`]. A refused frame gets
//! `rate_limited` and the connection stays; a client that keeps going — [`FLOOD_STRIKES`]
//! refusals within [`FLOOD_WINDOW`] — is disconnected.

use std::time::{Duration, Instant};

pub const BURST: f64 = 60.0;
pub const PER_SECOND: f64 = 30.0;
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
    tokens: f64,
    refilled: Instant,
    strikes: u32,
    window: Instant,
}

impl Default for RateLimit {
    fn default() -> Self {
        let now = Instant::now();
        RateLimit {
            tokens: BURST,
            refilled: now,
            strikes: 0,
            window: now,
        }
    }
}

impl RateLimit {
    pub fn admit(&mut self) -> Verdict {
        self.admit_at(Instant::now())
    }

    fn admit_at(&mut self, now: Instant) -> Verdict {
        let elapsed = now.saturating_duration_since(self.refilled).as_secs_f64();
        self.tokens = (self.tokens + elapsed * PER_SECOND).min(BURST);
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
        let mut limit = RateLimit::default();
        let t0 = Instant::now();
        for _ in 0..BURST as usize {
            assert_eq!(limit.admit_at(t0), Verdict::Admit);
        }
        assert_eq!(limit.admit_at(t0), Verdict::Refuse);
        assert_eq!(limit.admit_at(t0 + Duration::from_secs(1)), Verdict::Admit);
    }

    #[test]
    fn a_flood_is_told_apart() {
        let mut limit = RateLimit::default();
        let t0 = Instant::now();
        let verdicts: Vec<Verdict> = (0..BURST as u32 + FLOOD_STRIKES + 1)
            .map(|_| limit.admit_at(t0))
            .collect();
        assert_eq!(verdicts.last(), Some(&Verdict::Flooding));
    }
}
