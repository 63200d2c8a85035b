//! Who is connecting: HS256 JWTs whose `sub` is the user id (CONTRACT §1).
//!
//! Identity is checked once, on `$connect`; afterwards a connection id stands for its user
//! (the connection registry maps one to the other), exactly as behind API Gateway.

use crate::domain::UserId;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};
use std::time::Duration;

/// How far a token's `exp` and `nbf` may be off, for clocks that disagree a little.
pub const LEEWAY_SECS: u64 = 30;

/// Why a token was refused. Every variant means HTTP 401 on the handshake, saying which.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("no token: connect with ?token=<JWT>")]
    Missing,
    #[error("the token is not a JWT")]
    Malformed,
    #[error("the token is not signed with HS256")]
    WrongAlgorithm,
    #[error("the token's signature does not match")]
    BadSignature,
    #[error("the token has expired")]
    Expired,
    #[error("the token is not valid yet (nbf)")]
    NotYetValid,
    #[error("the token has no {0} claim")]
    MissingClaim(String),
    #[error("the token's sub is not a valid user id")]
    BadSubject,
}

impl From<jsonwebtoken::errors::Error> for AuthError {
    fn from(error: jsonwebtoken::errors::Error) -> Self {
        use jsonwebtoken::errors::ErrorKind;
        match error.into_kind() {
            ErrorKind::InvalidAlgorithm | ErrorKind::InvalidAlgorithmName => {
                AuthError::WrongAlgorithm
            }
            ErrorKind::InvalidSignature => AuthError::BadSignature,
            ErrorKind::ExpiredSignature => AuthError::Expired,
            ErrorKind::ImmatureSignature => AuthError::NotYetValid,
            ErrorKind::MissingRequiredClaim(claim) => AuthError::MissingClaim(claim),
            _ => AuthError::Malformed,
        }
    }
}

/// What palaver reads from a token: `sub` and `exp` are required; `iat` and `nbf` are optional
/// (RFC 7519), and `nbf` is honoured when present.
///
/// Both required claims are optional here so that a token missing one is refused as missing it
/// (by the validation), not as malformed (by deserialising).
#[derive(Debug, Serialize, Deserialize)]
struct Claims {
    #[serde(default)]
    sub: Option<String>,
    #[serde(default)]
    exp: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    iat: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    nbf: Option<u64>,
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
        // Only HS256: a token naming any other algorithm (`none` included) is refused.
        let mut validation = Validation::new(Algorithm::HS256);
        validation.leeway = LEEWAY_SECS;
        validation.validate_exp = true;
        validation.validate_nbf = true;
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
            sub: Some(user.to_string()),
            iat: Some(iat),
            nbf: None,
            exp: Some(iat + ttl.as_secs()),
        };
        jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &self.encoding)
            .expect("HS256 signing with an in-memory key cannot fail")
    }

    /// The user a token names, if it is well-formed, correctly signed and not expired.
    pub fn verify(&self, token: Option<&str>) -> Result<UserId, AuthError> {
        let token = token.filter(|t| !t.is_empty()).ok_or(AuthError::Missing)?;
        let data = jsonwebtoken::decode::<Claims>(token, &self.decoding, &self.validation)?;
        let sub = data
            .claims
            .sub
            .ok_or_else(|| AuthError::MissingClaim("sub".into()))?;
        UserId::parse(&sub).map_err(|_| AuthError::BadSubject)
    }
}

/// A fresh random secret, for a `palaver serve` started without `PALAVER_JWT_SECRET`.
pub fn random_secret() -> String {
    use rand::Rng;
    let bytes: [u8; 32] = rand::rng().random();
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Where a server started without `PALAVER_JWT_SECRET` keeps the secret it made, beside its
/// SQLite database, so that a restart does not sign every open tab out.
pub fn kept_secret_path(database: &str) -> std::path::PathBuf {
    std::path::PathBuf::from(format!("{database}.secret"))
}

/// The secret kept at `path`, made (32 random bytes, hex; the file readable by its owner only)
/// if there is none yet. Returns it and whether it was made now.
pub fn kept_secret(path: &std::path::Path) -> std::io::Result<(String, bool)> {
    use std::io::Write;
    match std::fs::read_to_string(path) {
        Ok(kept) if kept.trim().len() >= 32 => return Ok((kept.trim().to_owned(), false)),
        Ok(_) => {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!(
                    "{} holds no usable secret: delete it to make a new one",
                    path.display()
                ),
            ));
        }
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
        Err(error) => return Err(error),
    }
    let secret = random_secret();
    let mut file = std::fs::OpenOptions::new();
    file.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut file, 0o600);
    let mut file = file.open(path)?;
    writeln!(file, "{secret}")?;
    file.sync_all()?;
    Ok((secret, true))
}

/// Parses a duration like `90s`, `15m`, `1h 30m` or `7d`: humantime's syntax, with palaver's
/// own rules on top, which settings written for earlier versions rely on.
///
/// - A bare number is seconds (`PALAVER_HANDSHAKE…=45`); humantime asks for a unit.
/// - No months or years: humantime counts them as 30.44 and 365.25 days, which is not what
///   someone writing `1M` or `1y` for a token's lifetime or a retention expects. Such spans are
///   written in days, where nobody has to guess.
/// - At most a hundred years: a token's `exp` is seconds since 1970 in an i64, and a TTL that
///   overflowed it would wrap into the past and issue tokens that are expired at once.
pub fn parse_ttl(s: &str) -> Result<Duration, String> {
    const MAX: Duration = Duration::from_secs(100 * 365 * 86_400);
    /// humantime's names of its calendar units.
    const CALENDAR_UNITS: [&str; 8] = ["y", "yr", "yrs", "year", "years", "M", "month", "months"];
    let s = s.trim();
    let not_a_duration = || format!("{s:?} is not a duration like 30m, 1h or 7d");
    let too_long = || format!("{s:?} is too long: at most 100 years");
    let duration = if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) {
        Duration::from_secs(s.parse().map_err(|_| too_long())?)
    } else if s
        .split(|c: char| !c.is_alphabetic())
        .any(|unit| CALENDAR_UNITS.contains(&unit))
    {
        return Err(format!("{}: say it in days", not_a_duration()));
    } else {
        match humantime::parse_duration(s) {
            Ok(duration) => duration,
            Err(humantime::DurationError::NumberOverflow) => return Err(too_long()),
            Err(error) => return Err(format!("{}: {error}", not_a_duration())),
        }
    };
    if duration > MAX {
        return Err(too_long());
    }
    Ok(duration)
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

    fn sign(header: Header, claims: serde_json::Value, secret: &[u8]) -> String {
        jsonwebtoken::encode(&header, &claims, &EncodingKey::from_secret(secret)).unwrap()
    }

    fn now() -> i64 {
        chrono::Utc::now().timestamp()
    }

    #[test]
    fn a_token_with_only_sub_and_exp_is_accepted() {
        let id = Identity::new(b"secret");
        let hs256 = Header::new(Algorithm::HS256);
        let token = sign(
            hs256,
            serde_json::json!({"sub": "ana", "exp": now() + 60}),
            b"secret",
        );
        assert_eq!(id.verify(Some(&token)).unwrap().as_str(), "ana");
    }

    #[test]
    fn each_refusal_names_its_own_reason() {
        let id = Identity::new(b"secret");
        let hs = || Header::new(Algorithm::HS256);
        let t = now();
        let leeway = LEEWAY_SECS as i64;
        let cases = [
            (
                sign(
                    hs(),
                    serde_json::json!({"sub": "ana", "exp": t + 60}),
                    b"other",
                ),
                AuthError::BadSignature,
            ),
            (
                sign(
                    hs(),
                    serde_json::json!({"sub": "ana", "exp": t - leeway - 60}),
                    b"secret",
                ),
                AuthError::Expired,
            ),
            (
                sign(
                    hs(),
                    serde_json::json!({"sub": "ana", "exp": t + 600, "nbf": t + leeway + 60}),
                    b"secret",
                ),
                AuthError::NotYetValid,
            ),
            (
                sign(hs(), serde_json::json!({"sub": "ana"}), b"secret"),
                AuthError::MissingClaim("exp".into()),
            ),
            (
                sign(hs(), serde_json::json!({"exp": t + 60}), b"secret"),
                AuthError::MissingClaim("sub".into()),
            ),
            (
                sign(
                    hs(),
                    serde_json::json!({"sub": "a b", "exp": t + 60}),
                    b"secret",
                ),
                AuthError::BadSubject,
            ),
            (
                sign(
                    Header::new(Algorithm::HS512),
                    serde_json::json!({"sub": "ana", "exp": t + 60}),
                    b"secret",
                ),
                AuthError::WrongAlgorithm,
            ),
            ("not.a.jwt".to_owned(), AuthError::Malformed),
        ];
        for (token, reason) in cases {
            assert_eq!(id.verify(Some(&token)), Err(reason));
        }
        assert_eq!(id.verify(Some("")), Err(AuthError::Missing));
    }

    #[test]
    fn alg_none_is_refused() {
        // {"alg":"none","typ":"JWT"} . {"sub":"ana","exp":4102444800} . (no signature)
        let token = "eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0.eyJzdWIiOiJhbmEiLCJleHAiOjQxMDI0NDQ4MDB9.";
        let refused = Identity::new(b"secret").verify(Some(token));
        assert!(
            matches!(
                refused,
                Err(AuthError::WrongAlgorithm | AuthError::Malformed)
            ),
            "{refused:?}"
        );
    }

    #[test]
    fn exp_and_nbf_allow_a_little_clock_skew() {
        let id = Identity::new(b"secret");
        let hs = Header::new(Algorithm::HS256);
        let t = now();
        let token = sign(
            hs,
            serde_json::json!({"sub": "ana", "exp": t - 5, "nbf": t + 5}),
            b"secret",
        );
        assert!(id.verify(Some(&token)).is_ok());
    }

    #[test]
    fn ttls_parse() {
        assert_eq!(parse_ttl("1h").unwrap(), Duration::from_secs(3600));
        assert_eq!(parse_ttl("30m").unwrap(), Duration::from_secs(1800));
        assert_eq!(parse_ttl("45").unwrap(), Duration::from_secs(45));
        assert!(parse_ttl("1y").is_err());
        assert!(parse_ttl("6 months").is_err());
        assert_eq!(parse_ttl("1h 30m").unwrap(), Duration::from_secs(5400));
    }

    #[test]
    fn ttls_that_would_overflow_into_expired_tokens_are_refused() {
        assert!(parse_ttl("36500d").is_ok());
        for huge in [
            "36501d",
            "213503982334601d",
            "18446744073709551615s",
            "99999999999999999999",
        ] {
            assert!(parse_ttl(huge).is_err(), "{huge}");
        }
    }
}
