//! What the functions read from their environment (`template.yaml` sets it), and what a setting
//! that is missing or makes no sense stops them with.
//!
//! [envy] reads the variables by name into [`Variables`] — what is not set stays out, numbers
//! are parsed, defaults fill in — and [`LambdaConfig::from_vars`] checks what they mean: a
//! Lambda function keeps nothing between invocations, so only a DynamoDB store will do, and the
//! management endpoint must be a URL.

use crate::store::StoreUrl;
use serde::Deserialize;
use std::time::Duration;

/// Rooms with more recipients than this go through the delivery queue, by default.
pub const DEFAULT_QUEUE_THRESHOLD: usize = 200;
/// Recipients per delivery-queue message, by default.
pub const DEFAULT_QUEUE_JOB_SIZE: usize = 100;

/// What every variable's name starts with.
const PREFIX: &str = "PALAVER_";

/// A setting that is missing or makes no sense. The function fails to start with this message,
/// which Lambda shows as the init error.
#[derive(thiserror::Error)]
#[error("{name}: {problem}")]
pub struct ConfigError {
    /// The variable, as `template.yaml` names it.
    pub name: String,
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
    pub(super) fn new(name: &str, problem: impl Into<String>) -> ConfigError {
        ConfigError {
            name: name.to_owned(),
            problem: problem.into(),
        }
    }

    pub(super) fn missing(name: &str, what: &str) -> ConfigError {
        ConfigError::new(name, format!("not set; {what}"))
    }

    /// What envy could not read. Its messages name the variable (`… provided by
    /// FANOUT_SHARD_SIZE`, the prefix taken off); the error takes its full name from there.
    fn unreadable(error: envy::Error) -> ConfigError {
        let problem = error.to_string();
        let name = match problem.rsplit_once("provided by ") {
            Some((_, variable)) => format!("{PREFIX}{variable}"),
            None => format!("{PREFIX}*"),
        };
        ConfigError { name, problem }
    }
}

/// The variables as set, each named `PALAVER_` and the field's name in capitals.
#[derive(Deserialize)]
struct Variables {
    store: Option<String>,
    jwt_secret: Option<String>,
    jwt_secret_id: Option<String>,
    management_endpoint: Option<String>,
    delivery_queue_url: Option<String>,
    #[serde(default = "default_queue_threshold")]
    fanout_shard_threshold: usize,
    #[serde(default = "default_queue_job_size")]
    fanout_shard_size: usize,
    handshake_grace_secs: Option<u64>,
    connection_retention: Option<String>,
}

fn default_queue_threshold() -> usize {
    DEFAULT_QUEUE_THRESHOLD
}

fn default_queue_job_size() -> usize {
    DEFAULT_QUEUE_JOB_SIZE
}

/// What the functions read from their environment.
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
    pub handshake_grace: Duration,
    /// `PALAVER_CONNECTION_RETENTION` (default 7d; `forever`): how long a closed connection's
    /// events and registry row are kept, as the tables' TTL.
    pub connection_retention: Option<Duration>,
}

impl LambdaConfig {
    /// From the process environment (variables whose name or value is not Unicode are none of
    /// palaver's).
    pub fn from_env() -> Result<LambdaConfig, ConfigError> {
        LambdaConfig::from_vars(std::env::vars_os().filter_map(|(name, value)| {
            Some((name.into_string().ok()?, value.into_string().ok()?))
        }))
    }

    /// From `vars`, pairs of a variable's name and its value (an empty value counts as unset).
    pub fn from_vars<K, V>(
        vars: impl IntoIterator<Item = (K, V)>,
    ) -> Result<LambdaConfig, ConfigError>
    where
        K: Into<String>,
        V: Into<String>,
    {
        let vars = vars
            .into_iter()
            .map(|(name, value)| (name.into(), value.into()))
            .filter(|(_, value): &(String, String)| !value.trim().is_empty());
        let set: Variables = envy::prefixed(PREFIX)
            .from_iter(vars)
            .map_err(ConfigError::unreadable)?;
        let store = set.store.ok_or_else(|| {
            ConfigError::missing("PALAVER_STORE", "set it to dynamodb://TABLE_PREFIX")
        })?;
        let table_prefix = match store.parse::<StoreUrl>() {
            Ok(StoreUrl::DynamoDb(prefix)) => prefix,
            Ok(_) => {
                return Err(ConfigError::new(
                    "PALAVER_STORE",
                    format!(
                        "{store:?}: a Lambda function keeps nothing between invocations; \
                         use dynamodb://TABLE_PREFIX"
                    ),
                ));
            }
            Err(error) => return Err(ConfigError::new("PALAVER_STORE", error.to_string())),
        };
        let management_endpoint = set.management_endpoint.ok_or_else(|| {
            ConfigError::missing(
                "PALAVER_MANAGEMENT_ENDPOINT",
                "set it to https://{apiId}.execute-api.{region}.amazonaws.com/{stage} \
                 (or the custom domain's URL)",
            )
        })?;
        if !(management_endpoint.starts_with("https://")
            || management_endpoint.starts_with("http://"))
        {
            return Err(ConfigError::new(
                "PALAVER_MANAGEMENT_ENDPOINT",
                format!("{management_endpoint:?} is not an http(s) URL"),
            ));
        }
        Ok(LambdaConfig {
            table_prefix,
            jwt_secret: set.jwt_secret,
            jwt_secret_id: set.jwt_secret_id,
            management_endpoint,
            delivery_queue_url: set.delivery_queue_url,
            queue_threshold: at_least_one(
                "PALAVER_FANOUT_SHARD_THRESHOLD",
                set.fanout_shard_threshold,
            )?,
            queue_job_size: at_least_one("PALAVER_FANOUT_SHARD_SIZE", set.fanout_shard_size)?,
            handshake_grace: set
                .handshake_grace_secs
                .map_or(crate::connections::HANDSHAKE_GRACE, Duration::from_secs),
            connection_retention: match set.connection_retention {
                None => Some(crate::domain::limits::DEFAULT_CONNECTION_RETENTION),
                Some(kept) => crate::connections::parse_retention(&kept)
                    .map_err(|problem| ConfigError::new("PALAVER_CONNECTION_RETENTION", problem))?,
            },
        })
    }
}

/// A count that must be at least 1 (none per message, or none before the queue, means nothing).
fn at_least_one(name: &str, n: usize) -> Result<usize, ConfigError> {
    if n == 0 {
        return Err(ConfigError::new(
            name,
            "0 is not a whole number of at least 1",
        ));
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(vars: &[(&str, &str)]) -> Result<LambdaConfig, ConfigError> {
        LambdaConfig::from_vars(vars.iter().copied())
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

    #[test]
    fn numbers_that_are_not_are_named_and_empty_values_are_unset() {
        for name in [
            "PALAVER_FANOUT_SHARD_THRESHOLD",
            "PALAVER_FANOUT_SHARD_SIZE",
            "PALAVER_HANDSHAKE_GRACE_SECS",
        ] {
            let mut vars = BASE.to_vec();
            vars.push((name, "ten"));
            let error = config(&vars).unwrap_err();
            assert_eq!(error.name, name, "{error}");
            assert!(error.to_string().contains("'ten'"), "{error}");
        }
        let mut vars = BASE.to_vec();
        vars.extend([
            ("PALAVER_HANDSHAKE_GRACE_SECS", "3"),
            ("PALAVER_JWT_SECRET", " "),
        ]);
        let config = config(&vars).unwrap();
        assert_eq!(config.handshake_grace, Duration::from_secs(3));
        assert_eq!(config.jwt_secret, None);
    }
}
