//! How long a connection may live, as API Gateway has it: closed after 10 minutes without a
//! frame from the client, and after 2 hours whatever it does (close code 1001 both times).
//!
//! The same limits locally mean a client written against `palaver serve` behaves on AWS: it
//! keeps a quiet connection alive with `ping` and reconnects (with `joinRoom{after}`) when a
//! connection ends. They also bound what a forgotten or half-dead client can hold.

use super::hub::CloseReason;
use std::time::Duration;
use tokio::time::Instant;

/// API Gateway's idle timeout.
pub const DEFAULT_IDLE: Duration = Duration::from_secs(10 * 60);
/// API Gateway's maximum connection duration.
pub const DEFAULT_MAX_AGE: Duration = Duration::from_secs(2 * 60 * 60);
/// How long a client has to send its whole request head (the handshake's HTTP request), and
/// then its whole body.
pub const DEFAULT_HEADER_READ: Duration = Duration::from_secs(10);
/// How long one write to a connection's socket may wait for the client to take it.
pub const DEFAULT_WRITE: Duration = Duration::from_secs(30);
/// How long a closing connection has to take what is still queued for it and the close frame;
/// after that its socket is reset, and whatever the kernel still held for it is freed.
pub const CLOSE_LINGER: Duration = Duration::from_secs(2);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Lifetime {
    /// Closed after this long without a frame from the client.
    pub idle: Duration,
    /// Closed after this long, however busy.
    pub max_age: Duration,
    /// A TCP connection whose request head has not fully arrived after this long is dropped:
    /// a client that opens a socket and sends nothing, or sends a byte at a time, holds it no
    /// longer (`gateway::http`).
    pub header_read: Duration,
    /// A socket that takes nothing of a write for this long is closed as too slow (1008), its
    /// queue freed: a client that stops reading holds nothing for longer than this.
    pub write: Duration,
}

impl Default for Lifetime {
    fn default() -> Self {
        Lifetime {
            idle: DEFAULT_IDLE,
            max_age: DEFAULT_MAX_AGE,
            header_read: DEFAULT_HEADER_READ,
            write: DEFAULT_WRITE,
        }
    }
}

impl Lifetime {
    /// When a connection opened at `opened`, last heard from at `heard`, is next due a check.
    pub fn deadline(&self, opened: Instant, heard: Instant) -> Instant {
        (heard + self.idle).min(opened + self.max_age)
    }

    /// Why the connection must close at `now`, if it must.
    pub fn expired(&self, opened: Instant, heard: Instant, now: Instant) -> Option<CloseReason> {
        if now >= opened + self.max_age {
            Some(CloseReason::TooOld)
        } else if now >= heard + self.idle {
            Some(CloseReason::Idle)
        } else {
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn idle_then_age_close_a_connection() {
        let life = Lifetime {
            idle: Duration::from_secs(10),
            max_age: Duration::from_secs(60),
            ..Lifetime::default()
        };
        let t0 = Instant::now();
        let s = Duration::from_secs;
        assert_eq!(life.expired(t0, t0, t0 + s(9)), None);
        assert_eq!(life.expired(t0, t0, t0 + s(10)), Some(CloseReason::Idle));
        // Heard from recently: not idle, until the maximum age.
        assert_eq!(life.expired(t0, t0 + s(55), t0 + s(59)), None);
        assert_eq!(
            life.expired(t0, t0 + s(55), t0 + s(60)),
            Some(CloseReason::TooOld)
        );
        assert_eq!(life.deadline(t0, t0 + s(55)), t0 + s(60));
        assert_eq!(life.deadline(t0, t0 + s(5)), t0 + s(15));
    }
}
