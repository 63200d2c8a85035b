//! Who may open a connection: caps on open connections in total and on how fast one source
//! address opens new ones, as API Gateway caps connections per account and throttles
//! `$connect`. A refused handshake is answered 429 with `Retry-After` — never dropped silently —
//! before any work is done for it (no token check, no `$connect`).

use super::rate::{RateLimit, Verdict};
use parking_lot::Mutex;
use std::collections::HashMap;
use std::net::IpAddr;

/// Open connections the server takes at most, unless set (`--max-connections`).
pub const DEFAULT_MAX_CONNECTIONS: usize = 50_000;
/// New connections per second per source address, bursts of twice that (`--connect-rate`).
pub const DEFAULT_CONNECT_RATE: u32 = 10;
/// Addresses remembered at most; past that the memory starts over (a bound, not a policy).
const MAX_ADDRESSES: usize = 65_536;

/// Why a handshake is refused.
#[derive(Debug, PartialEq, Eq)]
pub enum Refused {
    /// The server holds its maximum of open connections.
    Full,
    /// This address opened connections faster than the rate.
    TooFast,
}

impl Refused {
    /// What the 429's body tells the client.
    pub fn explanation(&self) -> &'static str {
        match self {
            Refused::Full => "the server holds as many connections as it takes; try again later\n",
            Refused::TooFast => "too many new connections from this address; slow down\n",
        }
    }

    /// Its name among the refused handshakes that `/metrics` counts.
    pub fn reason(&self) -> &'static str {
        match self {
            Refused::Full => "full",
            Refused::TooFast => "too_fast",
        }
    }
}

pub struct Admission {
    max_connections: usize,
    per_address: u32,
    addresses: Mutex<HashMap<IpAddr, RateLimit>>,
}

impl Admission {
    /// `per_address` 0 turns the rate off.
    pub fn new(max_connections: usize, per_address: u32) -> Admission {
        Admission {
            max_connections,
            per_address,
            addresses: Mutex::new(HashMap::new()),
        }
    }

    /// Whether a handshake from `peer` may go on while `open` connections are open. Loopback
    /// peers are not rate-limited (they are this machine: a proxy in front, or its operator).
    pub fn admit(&self, peer: IpAddr, open: usize) -> Result<(), Refused> {
        if open >= self.max_connections {
            return Err(Refused::Full);
        }
        let peer = peer.to_canonical();
        if self.per_address == 0 || peer.is_loopback() {
            return Ok(());
        }
        let mut addresses = self.addresses.lock();
        if addresses.len() >= MAX_ADDRESSES && !addresses.contains_key(&peer) {
            addresses.clear();
        }
        let limit = addresses.entry(peer).or_insert_with(|| {
            RateLimit::new(self.per_address).expect("a rate above 0 is a limit")
        });
        match limit.admit() {
            Verdict::Admit => Ok(()),
            Verdict::Refuse | Verdict::Flooding => Err(Refused::TooFast),
        }
    }
}

impl Default for Admission {
    fn default() -> Self {
        Admission::new(DEFAULT_MAX_CONNECTIONS, DEFAULT_CONNECT_RATE)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_server_refuses_everyone() {
        let admission = Admission::new(2, 0);
        let local: IpAddr = "127.0.0.1".parse().unwrap();
        assert_eq!(admission.admit(local, 1), Ok(()));
        assert_eq!(admission.admit(local, 2), Err(Refused::Full));
    }

    #[test]
    fn one_address_is_held_to_the_rate_others_are_not() {
        let admission = Admission::new(100, 5);
        let busy: IpAddr = "192.0.2.7".parse().unwrap();
        let other: IpAddr = "2001:db8::1".parse().unwrap();
        // A burst of twice the rate, then refused.
        for _ in 0..10 {
            assert_eq!(admission.admit(busy, 0), Ok(()));
        }
        assert_eq!(admission.admit(busy, 0), Err(Refused::TooFast));
        assert_eq!(admission.admit(other, 0), Ok(()));
        // This machine is never rate-limited.
        for _ in 0..100 {
            assert_eq!(admission.admit("::1".parse().unwrap(), 0), Ok(()));
        }
    }
}
