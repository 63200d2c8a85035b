//! Validated names: user ids, room names and connection ids.
//!
//! User ids and room names share one rule (CONTRACT §1): `^[A-Za-z0-9_.-]{1,64}$`. Parsing at
//! the edge means every other module can take a `UserId` or `RoomName` without re-checking.

use serde::{Deserialize, Serialize};
use std::fmt;

/// The longest user id or room name, in bytes (all allowed characters are ASCII).
pub const MAX_NAME_LEN: usize = 64;

/// A name failed the `^[A-Za-z0-9_.-]{1,64}$` rule.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not a valid name: use 1 to 64 of A-Z a-z 0-9 _ . -")]
pub struct InvalidName(pub String);

fn is_valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= MAX_NAME_LEN
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
}

macro_rules! name_type {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        #[serde(try_from = "String", into = "String")]
        pub struct $name(String);

        impl $name {
            /// Checks `s` against the name rule.
            pub fn parse(s: &str) -> Result<Self, InvalidName> {
                if is_valid_name(s) {
                    Ok(Self(s.to_owned()))
                } else {
                    Err(InvalidName(s.to_owned()))
                }
            }

            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl TryFrom<String> for $name {
            type Error = InvalidName;
            fn try_from(s: String) -> Result<Self, InvalidName> {
                if is_valid_name(&s) { Ok(Self(s)) } else { Err(InvalidName(s)) }
            }
        }

        impl From<$name> for String {
            fn from(n: $name) -> String {
                n.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
    };
}

name_type!(
    /// Who a person is: the `sub` of their token.
    UserId
);
name_type!(
    /// A chat room. Rooms exist from their first event on; nobody creates them explicitly.
    RoomName
);

/// One WebSocket connection, as API Gateway names it (`requestContext.connectionId`).
///
/// Opaque: API Gateway's ids look like `L0SM9cOFvHcCIhw=`; the local gateway makes ids of the
/// same length and alphabet (without `/`, so they sit in a URL path unescaped).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct ConnectionId(String);

impl ConnectionId {
    pub fn new(id: impl Into<String>) -> Self {
        Self(id.into())
    }

    /// A fresh random id in API Gateway's shape: 15 characters and `=`.
    pub fn random() -> Self {
        use rand::Rng;
        const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
        let mut rng = rand::rng();
        let mut id: String = (0..15)
            .map(|_| ALPHABET[rng.random_range(0..ALPHABET.len())] as char)
            .collect();
        id.push('=');
        Self(id)
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for ConnectionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_the_contract_rule() {
        assert!(RoomName::parse("general").is_ok());
        assert!(RoomName::parse("a.b-c_D9").is_ok());
        assert!(RoomName::parse(&"x".repeat(64)).is_ok());
        assert!(RoomName::parse(&"x".repeat(65)).is_err());
        assert!(RoomName::parse("").is_err());
        assert!(RoomName::parse("has space").is_err());
        assert!(UserId::parse("élodie").is_err());
        assert!(UserId::parse("a/b").is_err());
    }

    #[test]
    fn random_connection_ids_are_url_safe_and_distinct() {
        let a = ConnectionId::random();
        let b = ConnectionId::random();
        assert_ne!(a, b);
        assert_eq!(a.as_str().len(), 16);
        assert!(!a.as_str().contains('/') && !a.as_str().contains('+'));
    }
}
