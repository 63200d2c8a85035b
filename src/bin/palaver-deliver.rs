//! `palaver-deliver`: the delivery queue's SQS messages (a run of frames, up to
//! `PALAVER_FANOUT_SHARD_SIZE` connections each) → posts, answering with `batchItemFailures`.
//! See `palaver::lambda::deliver`.

use aws_lambda_events::event::sqs::SqsEvent;
use lambda_runtime::{Error, LambdaEvent, run, service_fn};
use palaver::lambda::{self, Aws, LambdaConfig};

#[tokio::main]
async fn main() -> Result<(), Error> {
    lambda_runtime::tracing::init_default_subscriber();
    // Built once per container, not per batch.
    let config = LambdaConfig::from_env()?;
    let fanout = Aws::connect(&config).await.fanout();
    let fanout = &fanout;
    let metrics = lambda::embedded_metrics("palaver-deliver")?;
    run(service_fn(move |event: LambdaEvent<SqsEvent>| async move {
        let deadline = lambda::deadline_of(&event.context);
        let delivered = lambda::deliver(fanout, deadline, event.payload);
        Ok::<_, Error>(lambda::counted(metrics, delivered).await)
    }))
    .await
}
