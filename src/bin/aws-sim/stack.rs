//! The stack as CloudFormation would create it from template.yaml, in moto: the two tables
//! (the events table with its NEW_IMAGE stream), the delivery queue (FIFO) with its dead-letter
//! queue, the stream's dead-letter queue, and the token secret the route function reads.

use aws_sdk_dynamodb::types::{
    AttributeDefinition, BillingMode, KeySchemaElement, KeyType, ScalarAttributeType,
    StreamSpecification, StreamViewType, TimeToLiveSpecification,
};
use aws_sdk_sqs::types::QueueAttributeName;

/// What the functions and the event source mappings are wired to.
pub struct Stack {
    pub table_prefix: String,
    pub stream_arn: String,
    pub delivery_queue_url: String,
    pub delivery_queue_arn: String,
    pub stream_dead_letter_url: String,
    pub secret_id: String,
}

type Error = Box<dyn std::error::Error + Send + Sync>;

fn named(what: &str) -> impl Fn(Box<dyn std::error::Error + Send + Sync>) -> Error + '_ {
    move |error| format!("{what}: {error}").into()
}

pub async fn create(
    sdk: &aws_config::SdkConfig,
    stack_name: &str,
    jwt_secret: &str,
) -> Result<Stack, Error> {
    let dynamodb = aws_sdk_dynamodb::Client::new(sdk);
    let table_prefix = stack_name.to_owned();
    let key = |name: &str, kind: KeyType| {
        KeySchemaElement::builder()
            .attribute_name(name)
            .key_type(kind)
            .build()
    };
    let attribute = |name: &str, kind: ScalarAttributeType| {
        AttributeDefinition::builder()
            .attribute_name(name)
            .attribute_type(kind)
            .build()
    };
    // template.yaml `EventsTable`.
    let events = dynamodb
        .create_table()
        .table_name(format!("{table_prefix}-events"))
        .attribute_definitions(attribute("stream", ScalarAttributeType::S)?)
        .attribute_definitions(attribute("seq", ScalarAttributeType::N)?)
        .key_schema(key("stream", KeyType::Hash)?)
        .key_schema(key("seq", KeyType::Range)?)
        .billing_mode(BillingMode::PayPerRequest)
        .stream_specification(
            StreamSpecification::builder()
                .stream_enabled(true)
                .stream_view_type(StreamViewType::NewImage)
                .build()?,
        )
        .send()
        .await
        .map_err(|e| named("CreateTable events")(Box::new(e)))?;
    let stream_arn = events
        .table_description()
        .and_then(|t| t.latest_stream_arn())
        .ok_or("the events table has no stream")?
        .to_owned();
    // template.yaml `StateTable`.
    dynamodb
        .create_table()
        .table_name(format!("{table_prefix}-state"))
        .attribute_definitions(attribute("pk", ScalarAttributeType::S)?)
        .attribute_definitions(attribute("sk", ScalarAttributeType::S)?)
        .key_schema(key("pk", KeyType::Hash)?)
        .key_schema(key("sk", KeyType::Range)?)
        .billing_mode(BillingMode::PayPerRequest)
        .send()
        .await
        .map_err(|e| named("CreateTable state")(Box::new(e)))?;
    for table in ["events", "state"] {
        dynamodb
            .update_time_to_live()
            .table_name(format!("{table_prefix}-{table}"))
            .time_to_live_specification(
                TimeToLiveSpecification::builder()
                    .attribute_name("expires")
                    .enabled(true)
                    .build()?,
            )
            .send()
            .await
            .map_err(|e| named("UpdateTimeToLive")(Box::new(e)))?;
    }

    let sqs = aws_sdk_sqs::Client::new(sdk);
    let arn_of = async |url: &str| -> Result<String, Error> {
        let attributes = sqs
            .get_queue_attributes()
            .queue_url(url)
            .attribute_names(QueueAttributeName::QueueArn)
            .send()
            .await
            .map_err(|e| named("GetQueueAttributes")(Box::new(e)))?;
        Ok(attributes
            .attributes()
            .and_then(|a| a.get(&QueueAttributeName::QueueArn))
            .ok_or("no queue ARN")?
            .clone())
    };
    // template.yaml `StreamDeadLetterQueue`, `DeliveryDeadLetterQueue`, `DeliveryQueue`.
    let stream_dead_letter_url = sqs
        .create_queue()
        .queue_name(format!("{stack_name}-stream-dlq"))
        .attributes(QueueAttributeName::MessageRetentionPeriod, "1209600")
        .send()
        .await
        .map_err(|e| named("CreateQueue stream-dlq")(Box::new(e)))?
        .queue_url
        .ok_or("no queue URL")?;
    let delivery_dlq_url = sqs
        .create_queue()
        .queue_name(format!("{stack_name}-delivery-dlq.fifo"))
        .attributes(QueueAttributeName::FifoQueue, "true")
        .attributes(QueueAttributeName::MessageRetentionPeriod, "1209600")
        .send()
        .await
        .map_err(|e| named("CreateQueue delivery-dlq")(Box::new(e)))?
        .queue_url
        .ok_or("no queue URL")?;
    let delivery_dlq_arn = arn_of(&delivery_dlq_url).await?;
    let delivery_queue_url = sqs
        .create_queue()
        .queue_name(format!("{stack_name}-delivery.fifo"))
        .attributes(QueueAttributeName::FifoQueue, "true")
        .attributes(QueueAttributeName::DeduplicationScope, "messageGroup")
        .attributes(QueueAttributeName::FifoThroughputLimit, "perMessageGroupId")
        .attributes(
            QueueAttributeName::VisibilityTimeout,
            crate::settings::SQS_VISIBILITY_TIMEOUT
                .as_secs()
                .to_string(),
        )
        .attributes(QueueAttributeName::MessageRetentionPeriod, "7200")
        .attributes(
            QueueAttributeName::RedrivePolicy,
            serde_json::json!({"deadLetterTargetArn": delivery_dlq_arn, "maxReceiveCount": 5})
                .to_string(),
        )
        .send()
        .await
        .map_err(|e| named("CreateQueue delivery")(Box::new(e)))?
        .queue_url
        .ok_or("no queue URL")?;
    let delivery_queue_arn = arn_of(&delivery_queue_url).await?;

    // template.yaml `JwtSecretId` (default palaver/jwt): created before deploying, per
    // docs/deploy.md.
    let secret_id = format!("{stack_name}/jwt");
    aws_sdk_secretsmanager::Client::new(sdk)
        .create_secret()
        .name(&secret_id)
        .secret_string(jwt_secret)
        .send()
        .await
        .map_err(|e| named("CreateSecret")(Box::new(e)))?;
    Ok(Stack {
        table_prefix,
        stream_arn,
        delivery_queue_url,
        delivery_queue_arn,
        stream_dead_letter_url,
        secret_id,
    })
}
