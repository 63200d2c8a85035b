//! `palaver-route`: every route of the WebSocket API (`$connect`, `$disconnect`, `$default`,
//! `joinRoom`, `leaveRoom`, `sendMessage`, `getHistory`) behind API Gateway. The handlers are
//! the same ones `palaver serve` runs; see `palaver::lambda`.

use aws_lambda_events::apigw::ApiGatewayWebsocketProxyRequest;
use lambda_runtime::{Error, LambdaEvent, run, service_fn};
use palaver::lambda::{self, Aws, LambdaConfig};

#[tokio::main]
async fn main() -> Result<(), Error> {
    lambda_runtime::tracing::init_default_subscriber();
    // Built once per container, not per request.
    let config = LambdaConfig::from_env()?;
    let routes = Aws::connect(&config).await.routes().await?;
    let routes = &routes;
    let metrics = lambda::embedded_metrics("palaver-route")?;
    run(service_fn(
        move |event: LambdaEvent<ApiGatewayWebsocketProxyRequest>| async move {
            Ok::<_, Error>(lambda::counted(metrics, routes.handle(event.payload)).await)
        },
    ))
    .await
}
