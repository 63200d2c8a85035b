//! `palaver-fanout`: the events table's DynamoDB stream → frames to every connection that
//! should see them (big rooms through the delivery queue), answering with
//! `batchItemFailures`. See `palaver::lambda::fan_out`.

use aws_lambda_events::event::dynamodb::Event;
use lambda_runtime::{Error, LambdaEvent, run, service_fn};
use palaver::lambda::{self, Aws, LambdaConfig};

#[tokio::main]
async fn main() -> Result<(), Error> {
    lambda_runtime::tracing::init_default_subscriber();
    // Built once per container, not per batch.
    let config = LambdaConfig::from_env()?;
    let fanout = Aws::connect(&config).await.stream_fanout();
    let fanout = &fanout;
    let metrics = lambda::embedded_metrics("palaver-fanout")?;
    run(service_fn(move |event: LambdaEvent<Event>| async move {
        let deadline = lambda::deadline_of(&event.context);
        let handled = lambda::fan_out(fanout, deadline, event.payload);
        Ok::<_, Error>(lambda::counted(metrics, handled).await)
    }))
    .await
}
