//! Who may open a connection: caps on open connections in total and on how fast one source
//! address opens new ones, as API Gateway caps connections per account and throttles
//! `$connect`. A refused handshake is answered 429 with `Retry-After` — never dropped silently —
//! before any work is done for it (no token check, no `$connect`).
//!
//! The rate is kept per IPv4 address and per IPv6 /64: one subscriber, one host or one cloud
//! instance is given a whole /64 (RFC 6177, RFC 7934 §6), so a client that picks a new source
//! address from its own /64 for every handshake is still one source.

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
        let peer = source(peer);
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

impl Admission {
    /// Open connections the server takes at most.
    pub fn max_connections(&self) -> usize {
        self.max_connections
    }
}

/// The source a connection is counted against: an IPv4 address, or an IPv6 address's /64.
pub fn source(peer: IpAddr) -> IpAddr {
    match peer.to_canonical() {
        IpAddr::V6(v6) => {
            let prefix = u128::from(v6) & !((1u128 << 64) - 1);
            IpAddr::V6(prefix.into())
        }
        v4 => v4,
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
    fn ipv6_sources_are_counted_per_64_and_ipv4_per_address() {
        let admission = Admission::new(1000, 5);
        // Sixty addresses of one /64, as a client picking a new one per handshake would use.
        let verdicts: Vec<_> = (1..=60u16)
            .map(|n| admission.admit(format!("2001:db8:1:2::{n:x}").parse().unwrap(), 0))
            .collect();
        assert_eq!(verdicts.iter().filter(|v| v.is_ok()).count(), 10);
        assert_eq!(verdicts.last(), Some(&Err(Refused::TooFast)));
        assert_eq!(
            source("2001:db8:1:2:aaaa:bbbb:cccc:dddd".parse().unwrap()),
            "2001:db8:1:2::".parse::<IpAddr>().unwrap()
        );
        // IPv4 (mapped or not) stays one address each.
        assert_eq!(
            source("::ffff:192.0.2.7".parse().unwrap()),
            "192.0.2.7".parse::<IpAddr>().unwrap()
        );
        assert_eq!(admission.admit("192.0.2.8".parse().unwrap(), 0), Ok(()));
    }

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
        // Nor is another address of another /64.
        assert_eq!(
            admission.admit("2001:db8:0:1::1".parse().unwrap(), 0),
            Ok(())
        );
        // This machine is never rate-limited.
        for _ in 0..100 {
            assert_eq!(admission.admit("::1".parse().unwrap(), 0), Ok(()));
        }
    }
}
