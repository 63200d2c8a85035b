//! [`ConnectionGateway`] on API Gateway's management API (`postToConnection`), through
//! aws-sdk-apigatewaymanagement.
//!
//! The endpoint comes from configuration (`PALAVER_MANAGEMENT_ENDPOINT`:
//! `https://{apiId}.execute-api.{region}.amazonaws.com/{stage}`, or a custom domain's mapping),
//! never from the request's `domainName`: behind a custom domain that name is the domain's, and
//! posting there fails.
//!
//! What an answer means:
//!
//! - **gone**: `GoneException`, *or* a bare HTTP 410. The SDK picks the error kind from the
//!   `x-amzn-ErrorType` header alone, so a 410 without it (a proxy, an emulator) would otherwise
//!   look like an unknown error and the connection would never be cleaned up.
//! - **throttled** (`LimitExceededException`, HTTP 429 — the account's rate, or the client's
//!   buffer being full): retried here under [`retry::THROTTLED_POST`] (exponential backoff with
//!   jitter). The fan-out posts to many recipients at once, so one throttled recipient waits
//!   alone and holds up nobody else.
//! - **server trouble** (HTTP 5xx, a connection that failed or timed out): retried the same way.
//!   The SDK's own retries are switched off for this client so that this policy is the only one
//!   — otherwise the two multiply (3 × 5 attempts) and the SDK's shared retry quota would let one
//!   hot room starve every other recipient's retries. (The SDK's retries cannot simply replace
//!   it: they would not take a bare 410 for gone.)
//! - anything else (forbidden, payload too large): [`PostError::Failed`], at once.

use crate::domain::ConnectionId;
use crate::ports::{ConnectionGateway, PostError};
use crate::retry;
use async_trait::async_trait;
use aws_sdk_apigatewaymanagement::Client;
use aws_sdk_apigatewaymanagement::config::http::HttpResponse;
use aws_sdk_apigatewaymanagement::config::retry::RetryConfig;
use aws_sdk_apigatewaymanagement::config::timeout::TimeoutConfig;
use aws_sdk_apigatewaymanagement::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use aws_sdk_apigatewaymanagement::operation::post_to_connection::PostToConnectionError;
use aws_sdk_apigatewaymanagement::primitives::Blob;
use backon::{ExponentialBuilder, Retryable};
use bytes::Bytes;
use std::time::Duration;

/// What one failed post attempt means: gone, worth another try, or failed for good — this post
/// alone, or the API for everyone.
#[derive(Debug, PartialEq, Eq)]
enum Attempt {
    Gone,
    /// Worth another try after a pause (throttled, server trouble, unreachable); past the last
    /// try the API counts as unavailable.
    Retry(String),
    /// The API refuses every post (a missing permission): no retry helps now.
    Unavailable(String),
    /// No answer in time: not retried (see the fan-out's `post_to`).
    TimedOut(String),
    Failed(String),
}

/// `postToConnection` on one API's stage.
#[derive(Clone, Debug)]
pub struct ManagementApi {
    client: Client,
    endpoint: String,
    /// How often, and how patiently, a throttled post is tried.
    retry: ExponentialBuilder,
}

/// One attempt should answer within this; a stuck request must not hold its recipient — nor the
/// job or the stream batch it is part of, and the lane behind it — for long. API Gateway answers
/// a post in ~10 ms (p50) to ~50 ms (p99): twenty times that is a connection not taking frames.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(1);

impl ManagementApi {
    /// A client for the management API at `endpoint` (the stage URL, with or without a trailing
    /// slash), with credentials and region from `config`.
    pub fn new(config: &aws_config::SdkConfig, endpoint: &str) -> ManagementApi {
        let endpoint = endpoint.trim_end_matches('/').to_owned();
        let service = aws_sdk_apigatewaymanagement::config::Builder::from(config)
            .endpoint_url(&endpoint)
            .retry_config(RetryConfig::disabled())
            .timeout_config(
                TimeoutConfig::builder()
                    .operation_attempt_timeout(ATTEMPT_TIMEOUT)
                    .build(),
            )
            .build();
        ManagementApi {
            client: Client::from_conf(service),
            endpoint,
            retry: retry::THROTTLED_POST,
        }
    }

    /// The same client with another retry policy than [`retry::THROTTLED_POST`].
    pub fn with_retry(mut self, retry: ExponentialBuilder) -> ManagementApi {
        self.retry = retry;
        self
    }

    /// Where posts go.
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    async fn post_once(&self, connection: &ConnectionId, frame: &Bytes) -> Result<(), Attempt> {
        self.client
            .post_to_connection()
            .connection_id(connection.as_str())
            .data(Blob::new(frame.to_vec()))
            .send()
            .await
            .map(drop)
            .map_err(|error| attempt_of(&error))
    }
}

#[async_trait]
impl ConnectionGateway for ManagementApi {
    async fn post(&self, connection: &ConnectionId, frame: Bytes) -> Result<(), PostError> {
        let mut tries = 0;
        let outcome = (|| {
            tries += 1;
            self.post_once(connection, &frame)
        })
        .retry(self.retry)
        .when(|attempt| matches!(attempt, Attempt::Retry(_)))
        .notify(|attempt, pause| {
            tracing::debug!(%connection, ?attempt, ?pause, "post will be retried");
        })
        .await;
        match outcome {
            Ok(()) => Ok(()),
            Err(Attempt::Gone) => Err(PostError::Gone),
            Err(Attempt::Failed(why)) => Err(PostError::Failed(why)),
            Err(Attempt::Unavailable(why)) => Err(PostError::Unavailable(why)),
            Err(Attempt::TimedOut(why)) => Err(PostError::TimedOut(why)),
            Err(Attempt::Retry(why)) => Err(PostError::Unavailable(format!(
                "{why} (gave up after {tries} tries)"
            ))),
        }
    }

    async fn close(&self, connection: &ConnectionId) -> Result<(), PostError> {
        match self
            .client
            .delete_connection()
            .connection_id(connection.as_str())
            .send()
            .await
        {
            Ok(_) => Ok(()),
            Err(error) if error.raw_response().map(|r| r.status().as_u16()) == Some(410) => Ok(()),
            Err(error) => Err(PostError::Failed(
                aws_sdk_apigatewaymanagement::error::DisplayErrorContext(error).to_string(),
            )),
        }
    }
}

/// Sorts a failed `postToConnection` into gone, retry, or failed.
fn attempt_of(error: &SdkError<PostToConnectionError, HttpResponse>) -> Attempt {
    let status = error.raw_response().map(|r| r.status().as_u16());
    if let Some(service) = error.as_service_error() {
        let code = service.code().unwrap_or("an unknown error");
        let message = service.message().unwrap_or("no message");
        let described = match status {
            Some(status) => format!("{code} (HTTP {status}): {message}"),
            None => format!("{code}: {message}"),
        };
        return if service.is_gone_exception() || status == Some(410) {
            Attempt::Gone
        } else if service.is_limit_exceeded_exception() || status == Some(429) {
            metrics::counter!(crate::metrics::POSTS_THROTTLED).increment(1);
            Attempt::Retry(format!("throttled: {described}"))
        } else if status.is_some_and(|s| matches!(s, 500 | 502 | 503 | 504)) {
            Attempt::Retry(format!("server error: {described}"))
        } else if status.is_some_and(|s| matches!(s, 401 | 403)) {
            // A missing permission or a bad key: the same for every post.
            Attempt::Unavailable(described)
        } else {
            Attempt::Failed(described)
        };
    }
    match error {
        // A response arrived but could not be parsed: its status still says what happened.
        SdkError::ResponseError(_) if status == Some(410) => Attempt::Gone,
        SdkError::ResponseError(_) if status == Some(429) => {
            metrics::counter!(crate::metrics::POSTS_THROTTLED).increment(1);
            Attempt::Retry("throttled (HTTP 429)".to_owned())
        }
        SdkError::DispatchFailure(failure) if failure.is_io() || failure.is_timeout() => {
            Attempt::Retry(format!(
                "could not reach the management API: {}",
                describe(error)
            ))
        }
        // Not retried: one connection's post that hangs would otherwise hold its whole job (and
        // its delivery lane) for every try; the others' posts go on meanwhile.
        SdkError::TimeoutError(_) => Attempt::TimedOut(format!(
            "no answer within {} ms",
            ATTEMPT_TIMEOUT.as_millis()
        )),
        _ => Attempt::Failed(describe(error)),
    }
}

fn describe(error: &SdkError<PostToConnectionError, HttpResponse>) -> String {
    DisplayErrorContext(error).to_string()
}

#[cfg(test)]
mod tests {
    //! What each answer means, against a real HTTP server that answers like API Gateway does — and like
    //! things in front of it sometimes do (a 410 with no error header).

    use super::*;
    use aws_sdk_apigatewaymanagement::config::{Credentials, Region, SharedCredentialsProvider};
    use axum::Router;
    use axum::extract::{Path, State};
    use axum::http::StatusCode;
    use axum::response::{IntoResponse, Response};
    use axum::routing::post;
    use std::collections::HashMap;
    use std::sync::{Arc, Mutex};

    /// How many posts each connection id received.
    type Calls = Arc<Mutex<HashMap<String, u32>>>;

    /// Each connection id names its behaviour.
    async fn answer(
        State(calls): State<Calls>,
        Path((_stage, id)): Path<(String, String)>,
    ) -> Response {
        let call = {
            let mut calls = calls.lock().unwrap();
            let n = calls.entry(id.clone()).or_default();
            *n += 1;
            *n
        };
        let error = |status: StatusCode, kind: &'static str| {
            (
                status,
                [
                    ("x-amzn-ErrorType", kind),
                    ("content-type", "application/json"),
                ],
                r#"{"message":"scripted"}"#,
            )
                .into_response()
        };
        match id.as_str() {
            "ok" => StatusCode::OK.into_response(),
            "gone" => error(StatusCode::GONE, "GoneException"),
            "gone-bare" => (StatusCode::GONE, "").into_response(),
            "throttled-twice" if call <= 2 => {
                error(StatusCode::TOO_MANY_REQUESTS, "LimitExceededException")
            }
            "throttled-twice" => StatusCode::OK.into_response(),
            "throttled" => error(StatusCode::TOO_MANY_REQUESTS, "LimitExceededException"),
            "throttled-bare" => (StatusCode::TOO_MANY_REQUESTS, "").into_response(),
            "unavailable-once" if call == 1 => {
                (StatusCode::SERVICE_UNAVAILABLE, "").into_response()
            }
            "unavailable-once" => StatusCode::OK.into_response(),
            "forbidden" => error(StatusCode::FORBIDDEN, "ForbiddenException"),
            "hangs" => {
                // Far past the attempt timeout: the client gives up first.
                tokio::time::sleep(ATTEMPT_TIMEOUT * 10).await;
                StatusCode::OK.into_response()
            }
            _ => error(StatusCode::PAYLOAD_TOO_LARGE, "PayloadTooLargeException"),
        }
    }

    /// Static test credentials: the fake API does not check signatures.
    fn test_config() -> aws_config::SdkConfig {
        aws_config::SdkConfig::builder()
            .region(Region::new("us-east-1"))
            .credentials_provider(SharedCredentialsProvider::new(Credentials::new(
                "test", "test", None, None, "test",
            )))
            .behavior_version(aws_config::BehaviorVersion::latest())
            .build()
    }

    /// `tries` in all, with millisecond pauses: the tests count tries, not wait for them.
    fn quick(tries: usize) -> ExponentialBuilder {
        ExponentialBuilder::new()
            .with_min_delay(Duration::from_millis(1))
            .with_max_delay(Duration::from_millis(5))
            .with_max_times(tries - 1)
    }

    async fn fake_api() -> (ManagementApi, Calls) {
        let calls = Calls::default();
        let app = Router::new()
            .route("/{stage}/@connections/{id}", post(answer))
            .with_state(calls.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await });
        let config = test_config();
        let api = ManagementApi::new(&config, &format!("http://{addr}/prod/")).with_retry(quick(4));
        (api, calls)
    }

    async fn post_to(api: &ManagementApi, id: &str) -> Result<(), PostError> {
        api.post(&ConnectionId::new(id), Bytes::from_static(b"{}"))
            .await
    }

    fn calls_of(calls: &Calls, id: &str) -> u32 {
        calls.lock().unwrap().get(id).copied().unwrap_or(0)
    }

    #[tokio::test]
    async fn gone_is_the_exception_or_a_bare_410() {
        let (api, calls) = fake_api().await;
        assert!(post_to(&api, "ok").await.is_ok());
        assert!(matches!(post_to(&api, "gone").await, Err(PostError::Gone)));
        assert!(matches!(
            post_to(&api, "gone-bare").await,
            Err(PostError::Gone)
        ));
        assert_eq!(calls_of(&calls, "gone"), 1, "gone is never retried");
        assert_eq!(calls_of(&calls, "gone-bare"), 1);
    }

    #[tokio::test]
    async fn throttling_is_retried_until_it_passes_or_the_tries_run_out() {
        let (api, calls) = fake_api().await;
        assert!(post_to(&api, "throttled-twice").await.is_ok());
        assert_eq!(calls_of(&calls, "throttled-twice"), 3);

        let Err(PostError::Unavailable(why)) = post_to(&api, "throttled").await else {
            panic!("a recipient that stays throttled fails");
        };
        assert!(
            why.contains("LimitExceededException") && why.contains("4 tries"),
            "{why}"
        );
        assert_eq!(calls_of(&calls, "throttled"), 4);

        assert!(matches!(
            post_to(&api, "throttled-bare").await,
            Err(PostError::Unavailable(_))
        ));
        assert_eq!(
            calls_of(&calls, "throttled-bare"),
            4,
            "a bare 429 is throttling too"
        );

        assert!(post_to(&api, "unavailable-once").await.is_ok());
        assert_eq!(calls_of(&calls, "unavailable-once"), 2);
    }

    #[tokio::test]
    async fn other_errors_fail_at_once_and_say_why() {
        let (api, calls) = fake_api().await;
        let Err(PostError::Unavailable(why)) = post_to(&api, "forbidden").await else {
            panic!("forbidden is the API refusing the caller");
        };
        assert!(
            why.contains("ForbiddenException") && why.contains("403"),
            "{why}"
        );
        assert_eq!(calls_of(&calls, "forbidden"), 1);
        let Err(PostError::Failed(why)) = post_to(&api, "too-large").await else {
            panic!("too large is a failure");
        };
        assert!(why.contains("PayloadTooLargeException"), "{why}");
    }

    #[tokio::test]
    async fn a_post_without_an_answer_in_time_times_out_once_and_is_not_retried() {
        let (api, calls) = fake_api().await;
        let Err(PostError::TimedOut(why)) = post_to(&api, "hangs").await else {
            panic!("a post that hangs times out");
        };
        assert!(why.contains("1000 ms"), "{why}");
        assert_eq!(calls_of(&calls, "hangs"), 1, "a timeout is not retried");
    }

    #[tokio::test]
    async fn an_unreachable_endpoint_is_a_failure_not_a_gone_connection() {
        // Bind and drop a listener: nothing listens on that port any more.
        let port = {
            let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            listener.local_addr().unwrap().port()
        };
        let config = test_config();
        let api = ManagementApi::new(&config, &format!("http://127.0.0.1:{port}/prod"))
            .with_retry(quick(2));
        let Err(PostError::Unavailable(why)) = post_to(&api, "anyone").await else {
            panic!("an unreachable endpoint is the API unavailable");
        };
        assert!(why.contains("could not reach"), "{why}");
    }
}
