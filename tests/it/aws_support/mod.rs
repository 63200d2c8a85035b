//! Harness for the AWS data path: a moto server for DynamoDB, its stream and SQS; a real
//! `palaver serve` playing API Gateway (its WebSocket clients, its `@connections` API); and the
//! three Lambda functions, called with exactly the JSON Lambda would send them.
#![allow(dead_code)]

pub mod runtime;

use crate::common::{SECRET, Server, token};
use futures_util::StreamExt;
use palaver::domain::ConnectionId;
use palaver::lambda::{self, Aws, LambdaConfig};
use palaver::ports::Store;
use palaver::store::dynamodb::{DynamoStore, Tables, init};
use serde_json::{Value, json};
use std::collections::HashMap;
use std::time::{Duration, Instant};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream, connect_async};

/// How long anything the test waits for may take.
pub const WAIT: Duration = Duration::from_secs(15);

/// The standard AWS configuration, pointed at the moto server `scripts/test` starts. Without
/// `AWS_ENDPOINT_URL` this would talk to real AWS: refuse, loudly — this suite must never pass
/// by skipping.
pub async fn moto() -> aws_config::SdkConfig {
    let endpoint = std::env::var("AWS_ENDPOINT_URL").unwrap_or_default();
    assert!(
        !endpoint.is_empty(),
        "AWS_ENDPOINT_URL is not set: these tests need a moto server. Run them with scripts/test, \
         which starts one (or start `moto_server -p PORT` yourself and export \
         AWS_ENDPOINT_URL=http://127.0.0.1:PORT AWS_ACCESS_KEY_ID=test \
         AWS_SECRET_ACCESS_KEY=test AWS_REGION=us-east-1)"
    );
    aws_config::load_defaults(aws_config::BehaviorVersion::latest()).await
}

/// A fresh table prefix, so that tests never see each other's data.
pub fn fresh_prefix(test: &str) -> String {
    format!(
        "awspath-{test}-{}",
        ulid::Ulid::new().to_string().to_lowercase()
    )
}

// ---------------------------------------------------------------------------------------------
// The local gateway: `palaver serve` on SQLite, standing in for API Gateway.
// ---------------------------------------------------------------------------------------------

/// A running `palaver serve` (the suites' own [`Server`], on SQLite). Its own store only knows
/// which sockets it holds; the chat's state lives in DynamoDB, written by the Lambda handlers
/// under test.
pub struct Gateway {
    server: Server,
}

impl Gateway {
    pub fn start() -> Gateway {
        Gateway {
            server: Server::start_sqlite(),
        }
    }

    /// The management endpoint, with a stage as on AWS (`https://…/{stage}`).
    pub fn management_endpoint(&self) -> String {
        format!("http://{}/prod", self.server.addr)
    }

    /// Opens a WebSocket as `user`, and learns the connection id the gateway gave it (which is
    /// what API Gateway would put in every Lambda event for this connection).
    pub async fn open(&self, user: &str) -> Socket {
        let url = format!("ws://{}/?token={}", self.server.addr, token(user));
        let (ws, _) = connect_async(url).await.expect("handshake accepted");
        let output = self.server.cli(&["connections", "--user", user, "--json"]);
        assert!(output.status.success(), "{output:?}");
        let rows: Vec<Value> = serde_json::from_slice(&output.stdout).expect("JSON rows");
        assert_eq!(
            rows.len(),
            1,
            "one socket per user in these tests: {rows:?}"
        );
        let id = rows[0]["id"].as_str().expect("an id").to_owned();
        Socket {
            user: user.to_owned(),
            id: ConnectionId::new(id),
            ws,
        }
    }

    /// Waits until the gateway's `@connections` API says `id` is gone (410).
    pub async fn wait_gone(&self, id: &ConnectionId) {
        let url = format!("{}/@connections/{id}", self.management_endpoint());
        let http = reqwest::Client::new();
        poll("the gateway to forget the closed socket", || async {
            let response = http.get(&url).send().await.expect("GET @connections");
            response.status() == 410
        })
        .await;
    }
}

/// Polls `check` until it holds, failing the test after [`WAIT`].
pub async fn poll<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + WAIT;
    while !check().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A real WebSocket client of the local gateway.
pub struct Socket {
    pub user: String,
    pub id: ConnectionId,
    ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
}

impl Socket {
    /// The next frame pushed to this socket.
    pub async fn next(&mut self) -> Value {
        loop {
            match tokio::time::timeout(WAIT, self.ws.next()).await {
                Err(_) => panic!("{}: no frame within {WAIT:?}", self.user),
                Ok(None) => panic!("{}: connection closed", self.user),
                Ok(Some(Err(e))) => panic!("{}: socket error {e}", self.user),
                Ok(Some(Ok(Message::Text(text)))) => {
                    return serde_json::from_str(text.as_str()).expect("frames are JSON");
                }
                Ok(Some(Ok(Message::Close(frame)))) => panic!("{}: closed {frame:?}", self.user),
                Ok(Some(Ok(_))) => continue,
            }
        }
    }

    /// Every frame up to and including the first that `last` accepts.
    pub async fn until(&mut self, last: impl Fn(&Value) -> bool) -> Vec<Value> {
        let mut frames = Vec::new();
        loop {
            let frame = self.next().await;
            let done = last(&frame);
            frames.push(frame);
            if done {
                return frames;
            }
        }
    }

    /// The socket itself, for reading what `next` would reject (a close frame).
    pub fn raw(&mut self) -> &mut WebSocketStream<MaybeTlsStream<TcpStream>> {
        &mut self.ws
    }

    /// Reads and drops every frame until the socket closes, as a client that only listens.
    pub fn listen(self) -> tokio::task::JoinHandle<()> {
        let mut ws = self.ws;
        tokio::spawn(async move { while let Some(Ok(_)) = ws.next().await {} })
    }

    /// Frames up to and including the `message` with `seq`.
    pub async fn until_message(&mut self, seq: u64) -> Vec<Value> {
        self.until(|f| f["type"] == "message" && f["seq"] == seq)
            .await
    }

    /// Closes the socket at the gateway, without telling the chat: the DynamoDB store still
    /// thinks it is open, as after a lost `$disconnect`.
    pub async fn close(mut self) {
        let _ = self.ws.close(None).await;
        let _ = tokio::time::timeout(Duration::from_secs(2), async {
            while let Some(Ok(_)) = self.ws.next().await {}
        })
        .await;
    }
}

/// The logged room frames (`member`, `message`) among `frames`, as `(seq, type)`.
pub fn room_frames(frames: &[Value]) -> Vec<(u64, String)> {
    frames
        .iter()
        .filter(|f| f["seq"].is_u64())
        .map(|f| {
            (
                f["seq"].as_u64().unwrap(),
                f["type"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// The AWS side: tables in moto, the three functions, the stream, the queue.
// ---------------------------------------------------------------------------------------------

/// One test's world: fresh tables, a gateway, and the functions wired as the binaries wire
/// them (each from its own [`Aws`], as separate Lambda containers would be).
pub struct World {
    pub sdk: aws_config::SdkConfig,
    pub tables: Tables,
    pub gateway: Gateway,
    /// The store as an operator would read it.
    pub store: Store,
    pub routes: palaver::handlers::Routes,
    pub stream_fanout: palaver::fanout::stream::StreamFanOut,
    pub deliverer: palaver::fanout::FanOut,
    pub stream: StreamReader,
    pub queue: Option<Queue>,
    /// The functions' environment, as `template.yaml` sets it.
    env: HashMap<&'static str, String>,
    request_ids: std::sync::atomic::AtomicU64,
    /// cargo-lambda's Lambda emulator, started for the first function binary.
    emulator: tokio::sync::OnceCell<std::sync::Arc<runtime::Emulator>>,
}

/// Optional wiring of a world.
#[derive(Default)]
pub struct Options {
    /// Send rooms with more recipients than this through an SQS queue, this many a message.
    pub relay: Option<(usize, usize)>,
    /// `PALAVER_HANDSHAKE_GRACE_SECS`; 0 unless set, so that a 410 means gone at once (the
    /// tests' connections are all young).
    pub handshake_grace_secs: Option<u64>,
}

impl World {
    pub async fn new(test: &str, options: Options) -> World {
        let sdk = moto().await;
        let prefix = fresh_prefix(test);
        let tables = Tables::new(&prefix);
        let dynamodb = aws_sdk_dynamodb::Client::new(&sdk);
        init(&dynamodb, &tables)
            .await
            .expect("tables created in moto");
        let gateway = Gateway::start();

        let queue = match options.relay {
            Some(_) => Some(Queue::create(&sdk, &prefix).await),
            None => None,
        };
        let mut vars: HashMap<&'static str, String> = HashMap::from([
            ("PALAVER_STORE", format!("dynamodb://{prefix}")),
            ("PALAVER_JWT_SECRET", SECRET.to_owned()),
            ("PALAVER_MANAGEMENT_ENDPOINT", gateway.management_endpoint()),
            (
                "PALAVER_HANDSHAKE_GRACE_SECS",
                options.handshake_grace_secs.unwrap_or(0).to_string(),
            ),
        ]);
        if let (Some((threshold, size)), Some(queue)) = (options.relay, &queue) {
            vars.insert("PALAVER_DELIVERY_QUEUE_URL", queue.url.clone());
            vars.insert("PALAVER_FANOUT_SHARD_THRESHOLD", threshold.to_string());
            vars.insert("PALAVER_FANOUT_SHARD_SIZE", size.to_string());
        }
        let config = LambdaConfig::from_vars(vars.clone()).expect("a complete configuration");
        let stream = StreamReader::open(&sdk, &tables.events).await;
        World {
            routes: Aws::with_sdk(&config, sdk.clone())
                .routes()
                .await
                .expect("the route function's wiring"),
            stream_fanout: Aws::with_sdk(&config, sdk.clone()).stream_fanout(),
            deliverer: Aws::with_sdk(&config, sdk.clone()).fanout(),
            store: DynamoStore::new(dynamodb, &prefix).store(),
            sdk,
            tables,
            gateway,
            stream,
            queue,
            env: vars,
            request_ids: Default::default(),
            emulator: Default::default(),
        }
    }

    /// The function binary `binary` (its path), running under cargo-lambda's emulator (one per
    /// world) with this world's configuration.
    pub async fn function(&self, name: &str, binary: &str) -> runtime::Function {
        self.function_with(name, binary, &[]).await
    }

    /// [`World::function`], with `extra` variables on top of the world's.
    pub async fn function_with(
        &self,
        name: &str,
        binary: &str,
        extra: &[(&'static str, String)],
    ) -> runtime::Function {
        let emulator = self.emulator().await;
        let mut env: Vec<(&str, String)> = self.env.iter().map(|(k, v)| (*k, v.clone())).collect();
        env.extend(extra.iter().cloned());
        runtime::Function::start(emulator, name, binary, &env).await
    }

    /// This world's Runtime API emulator, started on first use (the cold-start bench starts it
    /// before timing a function).
    pub async fn emulator(&self) -> std::sync::Arc<runtime::Emulator> {
        self.emulator
            .get_or_init(|| async { std::sync::Arc::new(runtime::Emulator::start().await) })
            .await
            .clone()
    }

    /// API Gateway's `$disconnect` event for `socket`, after its client closed it.
    pub fn disconnect_event(&self, socket: &Socket) -> Value {
        let mut event = self.ws_event(&socket.id, "$disconnect", "DISCONNECT", None, Value::Null);
        event["requestContext"]["disconnectStatusCode"] = json!(1000);
        event["requestContext"]["disconnectReason"] = json!("Client-side close frame status code");
        event
    }

    /// A user's socket at the gateway, connected through the route function's `$connect`
    /// (as API Gateway would call it during the handshake).
    pub async fn connect(&self, user: &str) -> Socket {
        let socket = self.gateway.open(user).await;
        let response = self.route(self.connect_event(&socket)).await;
        assert_eq!(
            response["statusCode"], 200,
            "$connect of {user}: {response}"
        );
        socket
    }

    /// API Gateway's `$connect` event for `socket`, its token in the query string.
    pub fn connect_event(&self, socket: &Socket) -> Value {
        self.ws_event(
            &socket.id,
            "$connect",
            "CONNECT",
            None,
            json!({ "token": token(&socket.user) }),
        )
    }

    /// API Gateway's MESSAGE event for `frame` sent by `socket`, routed by its `action` as
    /// `RouteSelectionExpression: $request.body.action` routes it.
    pub fn message_event(&self, socket: &Socket, frame: &Value) -> Value {
        let action = frame["action"].as_str().unwrap_or_default();
        let route = match action {
            "joinRoom" | "leaveRoom" | "sendMessage" | "getHistory" | "ping" => action,
            _ => "$default",
        };
        self.ws_event(
            &socket.id,
            route,
            "MESSAGE",
            Some(frame.to_string()),
            Value::Null,
        )
    }

    /// Sends `frame` as `socket`'s client would: the route function gets API Gateway's MESSAGE
    /// event, its answer is what the client would get back.
    pub async fn send(&self, socket: &Socket, frame: Value) -> Value {
        let response = self.route(self.message_event(socket, &frame)).await;
        answer_of(&response)
    }

    pub async fn join(&self, socket: &Socket, room: &str) -> Value {
        let answer = self
            .send(socket, json!({"action": "joinRoom", "room": room}))
            .await;
        assert_eq!(answer["type"], "joined", "{answer}");
        answer
    }

    /// Says `text` in `room`; returns the message's seq.
    pub async fn say(&self, socket: &Socket, room: &str, text: &str) -> u64 {
        let answer = self
            .send(
                socket,
                json!({"action": "sendMessage", "room": room, "text": text}),
            )
            .await;
        assert_eq!(answer["type"], "sent", "{answer}");
        answer["seq"].as_u64().expect("a seq")
    }

    /// API Gateway's event for a WebSocket route, as the JSON Lambda hands the function.
    fn ws_event(
        &self,
        connection: &ConnectionId,
        route: &str,
        event_type: &str,
        body: Option<String>,
        query: Value,
    ) -> Value {
        let n = self
            .request_ids
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let now = chrono::Utc::now();
        let mut event = json!({
            "requestContext": {
                "routeKey": route,
                "eventType": event_type,
                "extendedRequestId": format!("ext-{n}"),
                "requestTime": now.format("%d/%b/%Y:%H:%M:%S %z").to_string(),
                "messageDirection": "IN",
                "stage": "prod",
                "connectedAt": now.timestamp_millis() - 1000,
                "requestTimeEpoch": now.timestamp_millis(),
                "identity": {"sourceIp": "127.0.0.1", "userAgent": "aws-path-test"},
                "requestId": format!("req-{n}"),
                "domainName": "abc123.execute-api.us-east-1.amazonaws.com",
                "connectionId": connection.as_str(),
                "apiId": "abc123"
            },
            "isBase64Encoded": false
        });
        if event_type == "MESSAGE" {
            event["requestContext"]["messageId"] = json!(format!("msg-{n}"));
        }
        if let Some(body) = body {
            event["body"] = json!(body);
        }
        if let Value::Object(params) = &query {
            event["queryStringParameters"] = query.clone();
            let multi: serde_json::Map<String, Value> = params
                .iter()
                .map(|(k, v)| (k.clone(), json!([v])))
                .collect();
            event["multiValueQueryStringParameters"] = Value::Object(multi);
        }
        event
    }

    /// The route function, given API Gateway's event JSON; returns its response's JSON.
    pub async fn route(&self, event: Value) -> Value {
        let request = serde_json::from_value(event).expect("a WebSocket proxy request");
        serde_json::to_value(self.routes.handle(request).await).expect("a response")
    }

    /// The fan-out function, given the stream event's JSON; returns its answer's JSON.
    pub async fn fan_out(&self, event: &Value) -> Value {
        let event = serde_json::from_value(event.clone()).expect("a DynamoDB stream event");
        // The fan-out function's timeout (template.yaml: 60 s) from now.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        serde_json::to_value(lambda::fan_out(&self.stream_fanout, deadline, event).await)
            .expect("a batch response")
    }

    /// The deliver function, given the SQS event's JSON; returns its answer's JSON.
    pub async fn deliver(&self, event: &Value) -> Value {
        let event = serde_json::from_value(event.clone()).expect("an SQS event");
        // The deliver function's timeout (template.yaml: 30 s) from now.
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(30);
        serde_json::to_value(lambda::deliver(&self.deliverer, deadline, event).await)
            .expect("a batch response")
    }
}

/// The frame a route's response carries back to the caller (a 200 with a JSON text body).
pub fn answer_of(response: &Value) -> Value {
    assert_eq!(response["statusCode"], 200, "{response}");
    serde_json::from_str(response["body"].as_str().expect("a text body")).expect("a JSON frame")
}

/// The item identifiers of a batch response's `batchItemFailures`.
pub fn failures(response: &Value) -> Vec<String> {
    response["batchItemFailures"]
        .as_array()
        .expect("batchItemFailures is always there")
        .iter()
        .map(|f| f["itemIdentifier"].as_str().expect("an item id").to_owned())
        .collect()
}

/// Reads the events table's stream as Lambda's event source mapping does, and hands out its
/// records as the Lambda event JSON.
pub struct StreamReader {
    client: aws_sdk_dynamodbstreams::Client,
    arn: String,
    /// Per shard, where the next read starts.
    iterators: Vec<String>,
}

impl StreamReader {
    pub async fn open(sdk: &aws_config::SdkConfig, table: &str) -> StreamReader {
        let described = aws_sdk_dynamodb::Client::new(sdk)
            .describe_table()
            .table_name(table)
            .send()
            .await
            .expect("DescribeTable");
        let arn = described
            .table()
            .and_then(|t| t.latest_stream_arn())
            .expect("the events table has a stream")
            .to_owned();
        let client = aws_sdk_dynamodbstreams::Client::new(sdk);
        let stream = client
            .describe_stream()
            .stream_arn(&arn)
            .send()
            .await
            .expect("DescribeStream");
        let shards = stream
            .stream_description()
            .expect("a stream description")
            .shards()
            .to_vec();
        let mut iterators = Vec::new();
        for shard in shards {
            let iterator = client
                .get_shard_iterator()
                .stream_arn(&arn)
                .shard_id(shard.shard_id().expect("a shard id"))
                .shard_iterator_type(aws_sdk_dynamodbstreams::types::ShardIteratorType::TrimHorizon)
                .send()
                .await
                .expect("GetShardIterator");
            iterators.push(iterator.shard_iterator().expect("an iterator").to_owned());
        }
        StreamReader {
            client,
            arn,
            iterators,
        }
    }

    /// The Lambda event of the records written since the last call: at least `at_least` of
    /// them (polled for, as a stream shows records after a short delay on AWS).
    pub async fn next_event(&mut self, at_least: usize) -> Value {
        let deadline = Instant::now() + WAIT;
        let mut records = Vec::new();
        loop {
            for iterator in &mut self.iterators {
                loop {
                    let out = self
                        .client
                        .get_records()
                        .shard_iterator(iterator.as_str())
                        .send()
                        .await
                        .expect("GetRecords");
                    let page = out.records();
                    records.extend(page.iter().map(|r| lambda_record(r, &self.arn)));
                    if let Some(next) = out.next_shard_iterator() {
                        *iterator = next.to_owned();
                    }
                    if page.is_empty() {
                        break;
                    }
                }
            }
            if records.len() >= at_least {
                return json!({ "Records": records });
            }
            assert!(
                Instant::now() < deadline,
                "expected {at_least} stream records, got {}: {records:?}",
                records.len()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// One stream record in the shape Lambda delivers it.
fn lambda_record(record: &aws_sdk_dynamodbstreams::types::Record, arn: &str) -> Value {
    let change = record.dynamodb().expect("a stream record");
    let image = |item: Option<&HashMap<String, aws_sdk_dynamodbstreams::types::AttributeValue>>| {
        item.map(attributes).unwrap_or_else(|| json!({}))
    };
    let mut dynamodb = json!({
        "ApproximateCreationDateTime": change
            .approximate_creation_date_time()
            .map(|t| t.as_secs_f64())
            .unwrap_or_default(),
        "Keys": image(change.keys()),
        "SequenceNumber": change.sequence_number().expect("a sequence number"),
        "SizeBytes": change.size_bytes().unwrap_or(1),
        "StreamViewType": change.stream_view_type().map(|v| v.as_str()).unwrap_or("NEW_IMAGE"),
    });
    if change.new_image().is_some() {
        dynamodb["NewImage"] = image(change.new_image());
    }
    json!({
        "eventID": record.event_id().expect("an event id"),
        "eventName": record.event_name().expect("an event name").as_str(),
        "eventVersion": record.event_version().unwrap_or("1.1"),
        "eventSource": record.event_source().unwrap_or("aws:dynamodb"),
        "awsRegion": record.aws_region().unwrap_or("us-east-1"),
        "dynamodb": dynamodb,
        "eventSourceARN": arn,
    })
}

fn attributes(item: &HashMap<String, aws_sdk_dynamodbstreams::types::AttributeValue>) -> Value {
    Value::Object(
        item.iter()
            .map(|(k, v)| (k.clone(), attribute(v)))
            .collect(),
    )
}

/// An attribute value in DynamoDB's JSON (`{"S": "…"}`), as a stream event carries it.
fn attribute(value: &aws_sdk_dynamodbstreams::types::AttributeValue) -> Value {
    use aws_sdk_dynamodbstreams::types::AttributeValue as A;
    match value {
        A::S(s) => json!({ "S": s }),
        A::N(n) => json!({ "N": n }),
        A::Bool(b) => json!({ "BOOL": b }),
        A::Null(_) => json!({ "NULL": true }),
        A::Ss(v) => json!({ "SS": v }),
        A::Ns(v) => json!({ "NS": v }),
        A::L(v) => json!({ "L": v.iter().map(attribute).collect::<Vec<_>>() }),
        A::M(m) => json!({ "M": attributes(m) }),
        other => panic!("the events table holds no such attribute: {other:?}"),
    }
}

/// An SQS queue in moto, read as Lambda's SQS event source mapping reads it.
pub struct Queue {
    client: aws_sdk_sqs::Client,
    pub url: String,
    pub arn: String,
}

impl Queue {
    pub async fn create(sdk: &aws_config::SdkConfig, name: &str) -> Queue {
        let client = aws_sdk_sqs::Client::new(sdk);
        // FIFO, as template.yaml's delivery queue: ordered per message group, deduplicated.
        let url = client
            .create_queue()
            .queue_name(format!("{name}.fifo"))
            .attributes(aws_sdk_sqs::types::QueueAttributeName::FifoQueue, "true")
            .send()
            .await
            .expect("CreateQueue")
            .queue_url()
            .expect("a queue URL")
            .to_owned();
        let attributes = client
            .get_queue_attributes()
            .queue_url(&url)
            .attribute_names(aws_sdk_sqs::types::QueueAttributeName::QueueArn)
            .send()
            .await
            .expect("GetQueueAttributes");
        let arn = attributes
            .attributes()
            .and_then(|a| a.get(&aws_sdk_sqs::types::QueueAttributeName::QueueArn))
            .expect("a queue ARN")
            .clone();
        Queue { client, url, arn }
    }

    /// Every message waiting in the queue, as the records of Lambda's SQS event.
    pub async fn receive_all(&self) -> Vec<Value> {
        let mut records = Vec::new();
        loop {
            let out = self
                .client
                .receive_message()
                .queue_url(&self.url)
                .max_number_of_messages(10)
                .wait_time_seconds(1)
                .message_system_attribute_names(aws_sdk_sqs::types::MessageSystemAttributeName::All)
                .send()
                .await
                .expect("ReceiveMessage");
            let messages = out.messages();
            if messages.is_empty() {
                return records;
            }
            for message in messages {
                // Lambda deletes what its handler answered for; the tests hand every record to
                // the deliver handler. A FIFO queue holds back a group's later messages until
                // the earlier ones are deleted.
                self.client
                    .delete_message()
                    .queue_url(&self.url)
                    .receipt_handle(message.receipt_handle().expect("a receipt handle"))
                    .send()
                    .await
                    .expect("DeleteMessage");
                let attributes: serde_json::Map<String, Value> = message
                    .attributes()
                    .map(|a| {
                        a.iter()
                            .map(|(k, v)| (k.as_str().to_owned(), json!(v)))
                            .collect()
                    })
                    .unwrap_or_default();
                records.push(json!({
                    "messageId": message.message_id().expect("a message id"),
                    "receiptHandle": message.receipt_handle().expect("a receipt handle"),
                    "body": message.body().expect("a body"),
                    "attributes": attributes,
                    "messageAttributes": {},
                    "md5OfBody": message.md5_of_body().unwrap_or_default(),
                    "eventSource": "aws:sqs",
                    "eventSourceARN": self.arn,
                    "awsRegion": "us-east-1",
                }));
            }
        }
    }
}
