//! Who is connecting: HS256 JWTs whose `sub` is the user id (CONTRACT §1).
//!
//! Identity is checked once, on `$connect`; afterwards a connection id stands for its user
//! (the connection registry maps one to the other), exactly as behind API Gateway.

use crate::domain::UserId;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};
use std::time::Duration;

/// Why a token was refused. Every variant means HTTP 401 on the handshake.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("no token: connect with ?token=<JWT>")]
    Missing,
    #[error("invalid token: {0}")]
    Invalid(#[from] jsonwebtoken::errors::Error),
    #[error("the token's sub is not a valid user id")]
    BadSubject,
}

#[derive(Debug, Serialize, Deserialize)]
struct Claims {
    sub: String,
    exp: u64,
    iat: u64,
}

/// Signs and checks tokens with one shared secret (`PALAVER_JWT_SECRET`).
#[derive(Clone)]
pub struct Identity {
    encoding: EncodingKey,
    decoding: DecodingKey,
    validation: Validation,
}

impl Identity {
    pub fn new(secret: &[u8]) -> Self {
        let mut validation = Validation::new(Algorithm::HS256);
        validation.leeway = 5;
        validation.set_required_spec_claims(&["exp", "sub"]);
        Identity {
            encoding: EncodingKey::from_secret(secret),
            decoding: DecodingKey::from_secret(secret),
            validation,
        }
    }

    /// A token for `user`, valid for `ttl`.
    pub fn issue(&self, user: &UserId, ttl: Duration) -> String {
        let iat = chrono::Utc::now().timestamp().max(0) as u64;
        let claims = Claims {
            sub: user.to_string(),
            iat,
            exp: iat + ttl.as_secs(),
        };
        jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &self.encoding)
            .expect("HS256 signing with an in-memory key cannot fail")
    }

    /// The user a token names, if it is well-formed, correctly signed and not expired.
    pub fn verify(&self, token: Option<&str>) -> Result<UserId, AuthError> {
        let token = token.filter(|t| !t.is_empty()).ok_or(AuthError::Missing)?;
        let data = jsonwebtoken::decode::<Claims>(token, &self.decoding, &self.validation)?;
        UserId::parse(&data.claims.sub).map_err(|_| AuthError::BadSubject)
    }
}

/// A fresh random secret, for a `palaver serve` started without `PALAVER_JWT_SECRET`.
pub fn random_secret() -> String {
    use rand::Rng;
    let bytes: [u8; 32] = rand::rng().random();
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Parses a duration like `90s`, `15m`, `1h`, `7d` (a bare number is seconds).
pub fn parse_ttl(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (digits, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("{s:?} is not a duration like 30m, 1h or 7d"))?;
    let secs = match unit {
        "" | "s" => n,
        "m" => n * 60,
        "h" => n * 3600,
        "d" => n * 86_400,
        _ => return Err(format!("{s:?} is not a duration like 30m, 1h or 7d")),
    };
    Ok(Duration::from_secs(secs))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn issued_tokens_verify_and_others_do_not() {
        let id = Identity::new(b"secret");
        let ana = UserId::parse("ana").unwrap();
        let token = id.issue(&ana, Duration::from_secs(60));
        assert_eq!(id.verify(Some(&token)).unwrap(), ana);
        assert!(matches!(id.verify(None), Err(AuthError::Missing)));
        assert!(Identity::new(b"other").verify(Some(&token)).is_err());
        assert!(id.verify(Some("not.a.jwt")).is_err());
    }

    #[test]
    fn ttls_parse() {
        assert_eq!(parse_ttl("1h").unwrap(), Duration::from_secs(3600));
        assert_eq!(parse_ttl("30m").unwrap(), Duration::from_secs(1800));
        assert_eq!(parse_ttl("45").unwrap(), Duration::from_secs(45));
        assert!(parse_ttl("1y").is_err());
    }
}
