//! The three Lambda functions' wiring and handlers, so that each binary in `src/bin/` is only
//! `main`: read [`LambdaConfig`], build everything once with [`Aws::connect`], hand one of the
//! handlers below to `lambda_runtime`.
//!
//! | binary | event | handler |
//! | --- | --- | --- |
//! | `palaver-route` | API Gateway WebSocket request, every route | [`Routes::handle`] |
//! | `palaver-fanout` | the events table's DynamoDB stream | [`fan_out`] |
//! | `palaver-deliver` | the delivery queue's SQS messages | [`deliver`] |
//!
//! Everything is built once per container, outside the handler — SDK clients, the store, the
//! management API client — because a Lambda container serves many invocations and a cold
//! start is paid once. The handlers themselves never fail as a whole: what could not be done
//! goes back to Lambda as `batchItemFailures`, so one bad record never makes a whole batch run
//! again (and re-send what was already delivered).
//!
//! The tests in `tests/it/aws_path.rs` call these same functions with Lambda's event JSON.

use crate::aws::events::{stream_response, wakes_of};
use crate::aws::queue::{jobs_of, sqs_response};
use crate::aws::{ManagementApi, SqsDeliveryQueue};
use crate::fanout::FanOut;
use crate::fanout::stream::StreamFanOut;
use crate::handlers::Routes;
use crate::identity::Identity;
use crate::ports::Store;
use crate::store::StoreUrl;
use crate::store::dynamodb::DynamoStore;
use aws_lambda_events::event::dynamodb::Event as StreamEvent;
use aws_lambda_events::event::sqs::{SqsBatchResponse, SqsEvent};
use aws_lambda_events::streams::DynamoDbEventResponse;
use bytes::Bytes;
use std::sync::Arc;

/// Rooms with more recipients than this go through the delivery queue, by default.
pub const DEFAULT_QUEUE_THRESHOLD: usize = 200;
/// Recipients per delivery-queue message, by default.
pub const DEFAULT_QUEUE_JOB_SIZE: usize = 100;

/// A setting that is missing or makes no sense. The function fails to start with this message,
/// which Lambda shows as the init error.
#[derive(thiserror::Error)]
#[error("{name}: {problem}")]
pub struct ConfigError {
    pub name: &'static str,
    pub problem: String,
}

/// The message itself: `main` returning the error prints it with `Debug`, and that is what
/// ends up in the function's log.
impl std::fmt::Debug for ConfigError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Display::fmt(self, f)
    }
}

impl ConfigError {
    fn missing(name: &'static str, what: &str) -> ConfigError {
        ConfigError {
            name,
            problem: format!("not set; {what}"),
        }
    }
}

/// What the functions read from their environment (`template.yaml` sets it).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LambdaConfig {
    /// `PALAVER_STORE=dynamodb://PREFIX`: the tables `PREFIX-events` and `PREFIX-state`.
    pub table_prefix: String,
    /// `PALAVER_JWT_SECRET`: the token secret itself (local runs and tests). Needed, or the
    /// next, by the route function only (it checks tokens on `$connect`).
    pub jwt_secret: Option<String>,
    /// `PALAVER_JWT_SECRET_ID`: the name or ARN of the Secrets Manager secret holding the token
    /// secret, read once when the route function starts (with its role, which may read that one
    /// secret only). The secret never sits in the function's configuration.
    pub jwt_secret_id: Option<String>,
    /// `PALAVER_MANAGEMENT_ENDPOINT`: the stage's `@connections` endpoint. Taken from
    /// configuration, never from a request's `domainName`, which is wrong behind a custom
    /// domain.
    pub management_endpoint: String,
    /// `PALAVER_DELIVERY_QUEUE_URL`: where the fan-out sends big rooms' deliveries. Without it,
    /// the fan-out posts to every recipient itself.
    pub delivery_queue_url: Option<String>,
    /// `PALAVER_FANOUT_SHARD_THRESHOLD` (default 200): more recipients than this go through
    /// the queue.
    pub queue_threshold: usize,
    /// `PALAVER_FANOUT_SHARD_SIZE` (default 100): recipients per queued message.
    pub queue_job_size: usize,
    /// `PALAVER_HANDSHAKE_GRACE_SECS` (default 10): a connection younger than this is not
    /// closed when a post to it answers 410 (API Gateway's answer while the handshake that ran
    /// `$connect` is still finishing).
    pub handshake_grace: std::time::Duration,
    /// `PALAVER_CONNECTION_RETENTION` (default 7d; `forever`): how long a closed connection's
    /// events and registry row are kept, as the tables' TTL.
    pub connection_retention: Option<std::time::Duration>,
}

impl LambdaConfig {
    /// From the process environment.
    pub fn from_env() -> Result<LambdaConfig, ConfigError> {
        LambdaConfig::from_vars(|name| std::env::var(name).ok())
    }

    /// From `var`, which looks a variable up by name (empty counts as unset).
    pub fn from_vars(var: impl Fn(&str) -> Option<String>) -> Result<LambdaConfig, ConfigError> {
        let var = |name: &str| var(name).filter(|v| !v.trim().is_empty());
        let store = var("PALAVER_STORE").ok_or_else(|| {
            ConfigError::missing("PALAVER_STORE", "set it to dynamodb://TABLE_PREFIX")
        })?;
        let table_prefix = match store.parse::<StoreUrl>() {
            Ok(StoreUrl::DynamoDb(prefix)) => prefix,
            Ok(_) => {
                return Err(ConfigError {
                    name: "PALAVER_STORE",
                    problem: format!(
                        "{store:?}: a Lambda function keeps nothing between invocations; \
                         use dynamodb://TABLE_PREFIX"
                    ),
                });
            }
            Err(error) => {
                return Err(ConfigError {
                    name: "PALAVER_STORE",
                    problem: error.to_string(),
                });
            }
        };
        let management_endpoint = var("PALAVER_MANAGEMENT_ENDPOINT").ok_or_else(|| {
            ConfigError::missing(
                "PALAVER_MANAGEMENT_ENDPOINT",
                "set it to https://{apiId}.execute-api.{region}.amazonaws.com/{stage} \
                 (or the custom domain's URL)",
            )
        })?;
        if !(management_endpoint.starts_with("https://")
            || management_endpoint.starts_with("http://"))
        {
            return Err(ConfigError {
                name: "PALAVER_MANAGEMENT_ENDPOINT",
                problem: format!("{management_endpoint:?} is not an http(s) URL"),
            });
        }
        Ok(LambdaConfig {
            table_prefix,
            jwt_secret: var("PALAVER_JWT_SECRET"),
            jwt_secret_id: var("PALAVER_JWT_SECRET_ID"),
            management_endpoint,
            delivery_queue_url: var("PALAVER_DELIVERY_QUEUE_URL"),
            queue_threshold: count(
                "PALAVER_FANOUT_SHARD_THRESHOLD",
                var("PALAVER_FANOUT_SHARD_THRESHOLD"),
                DEFAULT_QUEUE_THRESHOLD,
            )?,
            queue_job_size: count(
                "PALAVER_FANOUT_SHARD_SIZE",
                var("PALAVER_FANOUT_SHARD_SIZE"),
                DEFAULT_QUEUE_JOB_SIZE,
            )?,
            handshake_grace: match var("PALAVER_HANDSHAKE_GRACE_SECS") {
                None => crate::connections::HANDSHAKE_GRACE,
                Some(secs) => {
                    std::time::Duration::from_secs(secs.trim().parse().map_err(|_| {
                        ConfigError {
                            name: "PALAVER_HANDSHAKE_GRACE_SECS",
                            problem: format!("{secs:?} is not a whole number of seconds"),
                        }
                    })?)
                }
            },
            connection_retention: match var("PALAVER_CONNECTION_RETENTION") {
                None => Some(crate::domain::limits::DEFAULT_CONNECTION_RETENTION),
                Some(kept) => {
                    crate::connections::parse_retention(&kept).map_err(|problem| ConfigError {
                        name: "PALAVER_CONNECTION_RETENTION",
                        problem,
                    })?
                }
            },
        })
    }
}

/// A positive whole number setting, or its default when unset.
fn count(name: &'static str, value: Option<String>, default: usize) -> Result<usize, ConfigError> {
    match value {
        None => Ok(default),
        Some(value) => match value.trim().parse::<usize>() {
            Ok(n) if n >= 1 => Ok(n),
            _ => Err(ConfigError {
                name,
                problem: format!("{value:?} is not a whole number of at least 1"),
            }),
        },
    }
}

/// What every function shares: the AWS configuration, the store, the management API.
#[derive(Clone)]
pub struct Aws {
    pub sdk: aws_config::SdkConfig,
    pub store: Store,
    pub gateway: Arc<ManagementApi>,
    config: LambdaConfig,
}

impl Aws {
    /// Loads the standard AWS configuration (the function's role; `AWS_ENDPOINT_URL` for a
    /// local emulator) once, with request timeouts, and builds the store and the management API
    /// client on it.
    pub async fn connect(config: &LambdaConfig) -> Aws {
        let sdk = crate::store::aws_sdk_config().await;
        Aws::with_sdk(config, sdk)
    }

    /// The same, on an AWS configuration already loaded.
    pub fn with_sdk(config: &LambdaConfig, sdk: aws_config::SdkConfig) -> Aws {
        let dynamodb = aws_sdk_dynamodb::Client::new(&sdk);
        let store = DynamoStore::keeping_connections(
            dynamodb,
            &config.table_prefix,
            config.connection_retention,
        )
        .store();
        let gateway = Arc::new(ManagementApi::new(&sdk, &config.management_endpoint));
        Aws {
            sdk,
            store,
            gateway,
            config: config.clone(),
        }
    }

    /// The route handlers (`palaver-route`). They post to the caller only to replay a room on
    /// `joinRoom{after}`; everyone else hears from the fan-out.
    ///
    /// The token secret is `PALAVER_JWT_SECRET` when set, else the Secrets Manager secret
    /// `PALAVER_JWT_SECRET_ID`, read here once and kept for the container's life.
    pub async fn routes(&self) -> Result<Routes, ConfigError> {
        let secret = match (&self.config.jwt_secret, &self.config.jwt_secret_id) {
            (Some(secret), _) => secret.clone(),
            (None, Some(id)) => self.read_secret(id).await?,
            (None, None) => {
                return Err(ConfigError::missing(
                    "PALAVER_JWT_SECRET_ID",
                    "the route function checks client tokens with the secret it names",
                ));
            }
        };
        Ok(Routes::new(
            &self.store,
            self.gateway.clone(),
            Identity::new(secret.as_bytes()),
        ))
    }

    async fn read_secret(&self, id: &str) -> Result<String, ConfigError> {
        let problem = |problem: String| ConfigError {
            name: "PALAVER_JWT_SECRET_ID",
            problem,
        };
        let answer = aws_sdk_secretsmanager::Client::new(&self.sdk)
            .get_secret_value()
            .secret_id(id)
            .send()
            .await
            .map_err(|error| {
                problem(format!(
                    "cannot read secret {id:?}: {}",
                    aws_sdk_secretsmanager::error::DisplayErrorContext(error)
                ))
            })?;
        answer
            .secret_string
            .filter(|secret| !secret.is_empty())
            .ok_or_else(|| problem(format!("secret {id:?} has no SecretString")))
    }

    /// The fan-out over the management API, without the delivery queue (`palaver-deliver`
    /// posts what it is given and must never queue it again).
    pub fn fanout(&self) -> FanOut {
        FanOut::new(&self.store, self.gateway.clone())
            .with_handshake_grace(self.config.handshake_grace)
    }

    /// The stream-driven fan-out (`palaver-fanout`): big rooms go through the delivery queue
    /// when one is configured.
    pub fn stream_fanout(&self) -> StreamFanOut {
        let mut fanout = self.fanout();
        if let Some(url) = &self.config.delivery_queue_url {
            let queue = SqsDeliveryQueue::new(aws_sdk_sqs::Client::new(&self.sdk), url);
            fanout = fanout.with_relay(
                Arc::new(queue),
                self.config.queue_threshold,
                self.config.queue_job_size,
            );
        }
        StreamFanOut::new(&self.store, fanout)
            .expect("the DynamoDB store keeps the fan-out's checkpoints")
    }
}

/// `palaver-fanout`: delivers what a batch of the events table's stream announces, and names
/// the records to hand over again.
/// Installs the recorder that turns what an invocation counts ([`crate::metrics`], the names
/// `palaver serve`'s `/metrics` shows) into CloudWatch Embedded Metric Format: a JSON line in
/// the function's log that CloudWatch makes metrics of, with no agent and no API call.
/// Namespace `palaver`, dimension `function`.
pub fn embedded_metrics(
    function: &'static str,
) -> Result<&'static metrics_cloudwatch_embedded::Collector, lambda_runtime::Error> {
    let collector = metrics_cloudwatch_embedded::Builder::new()
        .cloudwatch_namespace("palaver")
        .with_dimension("function", function)
        .init()?;
    crate::metrics::describe();
    Ok(collector)
}

/// Runs one invocation's `work`, then writes what it counted as one EMF line to stdout, the
/// function's log.
pub async fn counted<T>(
    collector: &metrics_cloudwatch_embedded::Collector,
    work: impl std::future::Future<Output = T>,
) -> T {
    let answer = work.await;
    if let Err(error) = collector.flush(std::io::stdout().lock()) {
        tracing::warn!(%error, "could not write the invocation's metrics");
    }
    answer
}

pub async fn fan_out(fanout: &StreamFanOut, event: StreamEvent) -> DynamoDbEventResponse {
    let records = event.records.len();
    let report = fanout.handle(wakes_of(event)).await;
    tracing::info!(
        records,
        events = report.events,
        delivered = report.delivery.delivered,
        gone = report.delivery.gone.len(),
        failed_posts = report.delivery.failed,
        queued = report.delivery.queued,
        failed_records = report.failed.len(),
        "stream batch handled"
    );
    stream_response(&report)
}

/// `palaver-deliver`: posts each queued frame to its connections; closes the ones found gone.
///
/// A message is handed back to the queue (a batch item failure) when its body is not a
/// delivery job — it lands in the dead-letter queue after `maxReceiveCount` tries, where an
/// operator can read it — or when **every** post failed for a reason other than gone: then the
/// management API itself is in trouble (an outage, a missing permission), nobody got the
/// frame, and a later try can only help. When only some posts failed (after the management
/// client's own retries), the message counts as done: handing it back would post the frame
/// again to everyone who already has it, while the few who missed it see the gap in `seq` and
/// catch up with `joinRoom{after}` or `getHistory` — as after any lost frame.
///
/// The queue is FIFO: once a message is handed back, every later message of the batch is handed
/// back too, unposted, so that no connection gets a later frame before an earlier one (this is
/// what Lambda asks of partial batch responses on FIFO queues).
pub async fn deliver(fanout: &FanOut, event: SqsEvent) -> SqsBatchResponse {
    let mut failed = Vec::new();
    for queued in jobs_of(event) {
        if !failed.is_empty() {
            failed.push(queued.message_id);
            continue;
        }
        let job = match queued.job {
            Ok(job) => job,
            Err(why) => {
                tracing::error!(message = %queued.message_id, %why, "undeliverable message");
                failed.push(queued.message_id);
                continue;
            }
        };
        let recipients = job.connections.len();
        let delivery = fanout
            .post_to(&job.connections, Bytes::from(job.frame))
            .await;
        tracing::info!(
            message = %queued.message_id,
            recipients,
            delivered = delivery.delivered,
            gone = delivery.gone.len(),
            failed = delivery.failed,
            "delivery handled"
        );
        if delivery.failed > 0 && delivery.delivered == 0 {
            failed.push(queued.message_id);
        }
    }
    sqs_response(failed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn config(vars: &[(&str, &str)]) -> Result<LambdaConfig, ConfigError> {
        let vars: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        LambdaConfig::from_vars(|name| vars.get(name).cloned())
    }

    const BASE: [(&str, &str); 2] = [
        ("PALAVER_STORE", "dynamodb://chat"),
        (
            "PALAVER_MANAGEMENT_ENDPOINT",
            "https://abc.execute-api.eu-west-1.amazonaws.com/prod",
        ),
    ];

    #[test]
    fn defaults_apply_to_what_is_not_set() {
        let config = config(&BASE).unwrap();
        assert_eq!(config.table_prefix, "chat");
        assert_eq!(config.jwt_secret, None);
        assert_eq!(config.delivery_queue_url, None);
        assert_eq!(config.queue_threshold, DEFAULT_QUEUE_THRESHOLD);
        assert_eq!(config.queue_job_size, DEFAULT_QUEUE_JOB_SIZE);
        assert_eq!(
            config.connection_retention,
            Some(crate::domain::limits::DEFAULT_CONNECTION_RETENTION)
        );
    }

    #[test]
    fn everything_set_is_read() {
        let mut vars = BASE.to_vec();
        vars.extend([
            ("PALAVER_JWT_SECRET", "s3cret"),
            ("PALAVER_DELIVERY_QUEUE_URL", "https://sqs/q"),
            ("PALAVER_FANOUT_SHARD_THRESHOLD", "10"),
            ("PALAVER_FANOUT_SHARD_SIZE", "5"),
            ("PALAVER_CONNECTION_RETENTION", "2d"),
        ]);
        let config = config(&vars).unwrap();
        assert_eq!(
            config.connection_retention,
            Some(std::time::Duration::from_secs(2 * 86_400))
        );
        assert_eq!(config.jwt_secret.as_deref(), Some("s3cret"));
        assert_eq!(config.delivery_queue_url.as_deref(), Some("https://sqs/q"));
        assert_eq!((config.queue_threshold, config.queue_job_size), (10, 5));
    }

    #[test]
    fn bad_settings_are_named() {
        let error = config(&BASE[1..]).unwrap_err();
        assert_eq!(error.name, "PALAVER_STORE");
        let error = config(&[BASE[0]]).unwrap_err();
        assert_eq!(error.name, "PALAVER_MANAGEMENT_ENDPOINT");
        let error = config(&[("PALAVER_STORE", "sqlite://x.db"), BASE[1]]).unwrap_err();
        assert!(error.to_string().contains("dynamodb://"), "{error}");
        let mut vars = BASE.to_vec();
        vars.push(("PALAVER_FANOUT_SHARD_SIZE", "0"));
        assert_eq!(config(&vars).unwrap_err().name, "PALAVER_FANOUT_SHARD_SIZE");
        let mut vars = BASE.to_vec();
        vars.push(("PALAVER_CONNECTION_RETENTION", "a week"));
        assert_eq!(
            config(&vars).unwrap_err().name,
            "PALAVER_CONNECTION_RETENTION"
        );
        vars.pop();
        vars.push(("PALAVER_CONNECTION_RETENTION", "forever"));
        assert_eq!(config(&vars).unwrap().connection_retention, None);
        let mut vars = BASE.to_vec();
        vars[1].1 = "abc.execute-api.eu-west-1.amazonaws.com/prod";
        assert_eq!(
            config(&vars).unwrap_err().name,
            "PALAVER_MANAGEMENT_ENDPOINT"
        );
    }
}
