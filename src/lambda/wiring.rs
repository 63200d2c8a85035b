//! What every function builds once per container, outside its handler: the AWS configuration,
//! the SDK clients, the store and the management API client. A Lambda container serves many
//! invocations and a cold start is paid once; building any of these per invocation would pay
//! for it every time.

use super::config::{ConfigError, LambdaConfig};
use crate::aws::{ManagementApi, SqsDeliveryQueue};
use crate::fanout::stream::StreamFanOut;
use crate::fanout::{FanOut, Holder};
use crate::handlers::Routes;
use crate::identity::Identity;
use crate::ports::Store;
use crate::store::dynamodb::DynamoStore;
use std::sync::Arc;

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
        let problem = |problem: String| ConfigError::new("PALAVER_JWT_SECRET_ID", problem);
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
        // API Gateway's connections only: where `palaver serve` nodes share the store, theirs
        // are not API Gateway's to post to (it would answer 410, and they would be closed).
        FanOut::new(&self.store, self.gateway.clone())
            .with_handshake_grace(self.config.handshake_grace)
            .with_holder(Holder::ApiGateway)
            // A post is a request one slow connection can hold: the frame goes on without it.
            .letting_stragglers_go()
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
