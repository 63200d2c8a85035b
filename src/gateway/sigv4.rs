//! The management API's authentication: AWS Signature Version 4, as API Gateway checks it.
//!
//! `aws-sdk-apigatewaymanagement` signs every request with SigV4 (as does any AWS SDK or
//! `awscurl`), so the local gateway checks exactly that, against the one key pair the operator
//! sets: `PALAVER_MANAGEMENT_ACCESS_KEY_ID` and `PALAVER_MANAGEMENT_SECRET_ACCESS_KEY`. The
//! signature is not parsed and re-derived by hand: the request's method, path, query, the
//! headers it says it signed and its body go through `aws-sigv4` — the SDK's own signer — with
//! the time, region and service of the request's credential scope, and the result must equal the
//! signature the request carries. A request more than 15 minutes from now is refused, as AWS
//! refuses it, so a captured request cannot be replayed later.

use aws_credential_types::Credentials;
use aws_sigv4::http_request::{SignableBody, SignableRequest, SigningSettings, sign};
use aws_sigv4::sign::v4;
use axum::http::{HeaderMap, Method, Uri};
use std::time::{Duration, SystemTime};

/// How far a request's `X-Amz-Date` may be from now.
const MAX_SKEW: Duration = Duration::from_secs(15 * 60);

/// The service name in a credential scope for API Gateway's APIs, the management API among them.
const SERVICE: &str = "execute-api";

/// The key pair the management API accepts.
#[derive(Clone)]
pub struct ManagementKeys {
    pub access_key_id: String,
    pub secret_access_key: String,
    /// The region a request's credential scope must name (`PALAVER_MANAGEMENT_REGION`); `None`:
    /// any, as a local server has no region of its own.
    pub region: Option<String>,
}

/// Why a request is refused.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("Missing Authentication Token")]
    Missing,
    #[error("Authorization header is not a SigV4 signature: {0}")]
    Malformed(&'static str),
    #[error("The security token included in the request is invalid")]
    UnknownKey,
    #[error("Signature expired: the request's X-Amz-Date is more than 15 minutes from now")]
    Expired,
    #[error("Credential should be scoped to a valid service and region: {0}")]
    WrongScope(String),
    #[error(
        "The request signature we calculated does not match the signature you provided. \
         Check your AWS Secret Access Key and signing method."
    )]
    BadSignature,
}

impl Refusal {
    /// API Gateway's `x-amzn-ErrorType` for it.
    pub fn kind(&self) -> &'static str {
        match self {
            Refusal::Missing => "MissingAuthenticationTokenException",
            Refusal::Malformed(_) => "IncompleteSignatureException",
            Refusal::UnknownKey => "UnrecognizedClientException",
            Refusal::Expired => "InvalidSignatureException",
            Refusal::WrongScope(_) => "InvalidSignatureException",
            Refusal::BadSignature => "InvalidSignatureException",
        }
    }
}

/// The parts of `Authorization: AWS4-HMAC-SHA256 Credential=…, SignedHeaders=…, Signature=…`.
struct Authorization<'a> {
    access_key_id: &'a str,
    region: &'a str,
    service: &'a str,
    signed_headers: Vec<&'a str>,
    signature: &'a str,
}

fn parse(header: &str) -> Result<Authorization<'_>, Refusal> {
    let rest = header
        .strip_prefix("AWS4-HMAC-SHA256 ")
        .ok_or(Refusal::Malformed("not AWS4-HMAC-SHA256"))?;
    let (mut credential, mut signed, mut signature) = (None, None, None);
    for part in rest.split(',') {
        match part.trim().split_once('=') {
            Some(("Credential", v)) => credential = Some(v),
            Some(("SignedHeaders", v)) => signed = Some(v),
            Some(("Signature", v)) => signature = Some(v),
            _ => {}
        }
    }
    let credential = credential.ok_or(Refusal::Malformed("no Credential"))?;
    let mut scope = credential.split('/');
    let (Some(access_key_id), Some(_date), Some(region), Some(service), Some("aws4_request")) = (
        scope.next(),
        scope.next(),
        scope.next(),
        scope.next(),
        scope.next(),
    ) else {
        return Err(Refusal::Malformed(
            "Credential is not KEY/DATE/REGION/SERVICE/aws4_request",
        ));
    };
    Ok(Authorization {
        access_key_id,
        region,
        service,
        signed_headers: signed
            .ok_or(Refusal::Malformed("no SignedHeaders"))?
            .split(';')
            .collect(),
        signature: signature.ok_or(Refusal::Malformed("no Signature"))?,
    })
}

/// `X-Amz-Date` (`20261127T071500Z`) as a time.
fn amz_date(headers: &HeaderMap) -> Result<SystemTime, Refusal> {
    let value = headers
        .get("x-amz-date")
        .and_then(|v| v.to_str().ok())
        .ok_or(Refusal::Malformed("no X-Amz-Date"))?;
    let at = chrono::NaiveDateTime::parse_from_str(value, "%Y%m%dT%H%M%SZ")
        .map_err(|_| Refusal::Malformed("X-Amz-Date is not YYYYMMDDTHHMMSSZ"))?
        .and_utc();
    Ok(SystemTime::from(at))
}

impl ManagementKeys {
    /// Checks what can be checked before the body is read: a SigV4 `Authorization` with this
    /// key, scoped to `execute-api` (and the region, if one is set), dated within 15 minutes of
    /// `now`. A request that fails this is refused without its body being waited for.
    pub fn check_head(&self, headers: &HeaderMap, now: SystemTime) -> Result<(), Refusal> {
        let header = headers
            .get(axum::http::header::AUTHORIZATION)
            .ok_or(Refusal::Missing)?
            .to_str()
            .map_err(|_| Refusal::Malformed("not text"))?;
        self.head(header, headers, now).map(|_| ())
    }

    fn head<'a>(
        &self,
        header: &'a str,
        headers: &HeaderMap,
        now: SystemTime,
    ) -> Result<(Authorization<'a>, SystemTime), Refusal> {
        let auth = parse(header)?;
        if auth.access_key_id != self.access_key_id {
            return Err(Refusal::UnknownKey);
        }
        if auth.service != SERVICE {
            return Err(Refusal::WrongScope(format!(
                "the service is '{}', expecting '{SERVICE}'",
                auth.service
            )));
        }
        if let Some(region) = &self.region
            && auth.region != region
        {
            return Err(Refusal::WrongScope(format!(
                "the region is '{}', expecting '{region}'",
                auth.region
            )));
        }
        let at = amz_date(headers)?;
        let skew = now
            .duration_since(at)
            .or_else(|e| Ok::<_, ()>(e.duration()))
            .unwrap_or(Duration::MAX);
        if skew > MAX_SKEW {
            return Err(Refusal::Expired);
        }
        Ok((auth, at))
    }

    /// Checks the request's signature; `now` is the server's clock.
    pub fn verify(
        &self,
        method: &Method,
        uri: &Uri,
        headers: &HeaderMap,
        body: &[u8],
        now: SystemTime,
    ) -> Result<(), Refusal> {
        let header = headers
            .get(axum::http::header::AUTHORIZATION)
            .ok_or(Refusal::Missing)?
            .to_str()
            .map_err(|_| Refusal::Malformed("not text"))?;
        let (auth, at) = self.head(header, headers, now)?;
        // The headers the client signed, as it sent them (the signer lowercases the names).
        let mut signed: Vec<(&str, &str)> = Vec::with_capacity(auth.signed_headers.len());
        for name in &auth.signed_headers {
            let value = headers
                .get(*name)
                .and_then(|v| v.to_str().ok())
                .ok_or(Refusal::Malformed("a signed header is missing"))?;
            signed.push((name, value));
        }
        let host = headers
            .get(axum::http::header::HOST)
            .and_then(|v| v.to_str().ok())
            .ok_or(Refusal::Malformed("no Host"))?;
        let path_and_query = uri.path_and_query().map_or("/", |p| p.as_str());
        let url = format!("http://{host}{path_and_query}");
        let request = SignableRequest::new(
            method.as_str(),
            url,
            signed.into_iter(),
            SignableBody::Bytes(body),
        )
        .map_err(|_| Refusal::Malformed("the request cannot be signed"))?;
        let identity = Credentials::new(
            &self.access_key_id,
            &self.secret_access_key,
            None,
            None,
            "palaver-management",
        )
        .into();
        let params = v4::SigningParams::builder()
            .identity(&identity)
            .region(auth.region)
            .name(auth.service)
            .time(at)
            .settings(SigningSettings::default())
            .build()
            .map_err(|_| Refusal::Malformed("bad credential scope"))?
            .into();
        let expected = sign(request, &params).map_err(|_| Refusal::BadSignature)?;
        if equal(expected.signature().as_bytes(), auth.signature.as_bytes()) {
            Ok(())
        } else {
            Err(Refusal::BadSignature)
        }
    }
}

/// Compares in time that does not depend on where the two differ.
fn equal(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |diff, (x, y)| diff | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    const KEY: &str = "AKIDPALAVERLOCAL";
    const SECRET: &str = "management-secret-0123456789abcdef";

    fn keys(region: Option<&str>) -> ManagementKeys {
        ManagementKeys {
            access_key_id: KEY.to_owned(),
            secret_access_key: SECRET.to_owned(),
            region: region.map(str::to_owned),
        }
    }

    /// The headers of a `POST /@connections/abc` signed by the SDK's signer for `service` in
    /// `region`, at `at`.
    fn signed(service: &str, region: &str, at: SystemTime, body: &[u8]) -> HeaderMap {
        let host = "127.0.0.1:8080";
        let amz_date = chrono::DateTime::<chrono::Utc>::from(at)
            .format("%Y%m%dT%H%M%SZ")
            .to_string();
        let request = SignableRequest::new(
            "POST",
            format!("http://{host}/@connections/abc"),
            [("host", host), ("x-amz-date", amz_date.as_str())].into_iter(),
            SignableBody::Bytes(body),
        )
        .unwrap();
        let identity = Credentials::new(KEY, SECRET, None, None, "test").into();
        let params = v4::SigningParams::builder()
            .identity(&identity)
            .region(region)
            .name(service)
            .time(at)
            .settings(SigningSettings::default())
            .build()
            .unwrap()
            .into();
        let (instructions, _) = sign(request, &params).unwrap().into_parts();
        let mut headers = HeaderMap::new();
        headers.insert("host", HeaderValue::from_static(host));
        for (name, value) in instructions.headers() {
            headers.insert(
                axum::http::HeaderName::from_bytes(name.as_bytes()).unwrap(),
                HeaderValue::from_str(value).unwrap(),
            );
        }
        headers
    }

    fn check(keys: &ManagementKeys, headers: &HeaderMap, now: SystemTime) -> Result<(), Refusal> {
        let uri: Uri = "/@connections/abc".parse().unwrap();
        keys.check_head(headers, now)?;
        keys.verify(&Method::POST, &uri, headers, b"hi", now)
    }

    #[test]
    fn a_signature_scoped_to_another_service_or_region_is_refused() {
        let now = SystemTime::now();
        let api = signed("execute-api", "eu-west-1", now, b"hi");
        assert_eq!(check(&keys(None), &api, now), Ok(()));
        assert_eq!(check(&keys(Some("eu-west-1")), &api, now), Ok(()));
        // A valid signature, made for S3: API Gateway refuses it, and so does palaver.
        let s3 = signed("s3", "eu-west-1", now, b"hi");
        assert!(matches!(
            check(&keys(None), &s3, now),
            Err(Refusal::WrongScope(_))
        ));
        // Signed for another region than the one set.
        assert!(matches!(
            check(&keys(Some("us-east-1")), &api, now),
            Err(Refusal::WrongScope(_))
        ));
        // The body is part of what is signed.
        let uri: Uri = "/@connections/abc".parse().unwrap();
        assert_eq!(
            keys(None).verify(&Method::POST, &uri, &api, b"changed", now),
            Err(Refusal::BadSignature)
        );
        // Too old, judged before any body.
        let later = now + Duration::from_secs(16 * 60);
        assert_eq!(keys(None).check_head(&api, later), Err(Refusal::Expired));
    }
}
