//! What the stream fan-out costs in DynamoDB requests, counted on the wire.
//!
//! The DynamoDB store runs on a real `aws_sdk_dynamodb::Client` (against moto) with an SDK
//! interceptor that records every request it transmits — operation (from `x-amz-target`), table
//! and partition key (from the body) — so what is asserted is what DynamoDB would bill. The
//! fan-out is `StreamFanOut`, as the Lambda function runs it, with a recording gateway.
//!
//! Needs a moto server: run `scripts/test` (a missing `AWS_ENDPOINT_URL` fails the test).

use async_trait::async_trait;
use aws_sdk_dynamodb::config::interceptors::BeforeTransmitInterceptorContextRef;
use aws_sdk_dynamodb::config::{ConfigBag, Intercept, RuntimeComponents};
use bytes::Bytes;
use palaver::domain::{ConnectionId, EventBody, Expect, RoomName, Stream, UserId};
use palaver::fanout::FanOut;
use palaver::fanout::stream::{StreamFanOut, Wake};
use palaver::ports::{ConnectionGateway, PostError, Store};
use palaver::store::dynamodb as dynamo;
use serde_json::Value;
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

/// One request as sent: its operation, and what it is for.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Request {
    operation: String,
    /// What the request touches, named by table and key shape (see [`purpose`]).
    purpose: String,
}

/// Records every DynamoDB request the client transmits (each attempt, retries included).
#[derive(Debug, Default)]
struct Recorder(Mutex<Vec<Request>>);

impl Recorder {
    fn take(&self) -> Vec<Request> {
        std::mem::take(&mut *self.0.lock().unwrap())
    }
}

#[derive(Debug)]
struct Counting(Arc<Recorder>);

impl Intercept for Counting {
    fn name(&self) -> &'static str {
        "Counting"
    }

    fn read_before_transmit(
        &self,
        context: &BeforeTransmitInterceptorContextRef<'_>,
        _runtime_components: &RuntimeComponents,
        _cfg: &mut ConfigBag,
    ) -> Result<(), aws_sdk_dynamodb::error::BoxError> {
        let request = context.request();
        let operation = request
            .headers()
            .get("x-amz-target")
            .and_then(|target| target.rsplit('.').next())
            .unwrap_or("?")
            .to_owned();
        let body: Value = request
            .body()
            .bytes()
            .and_then(|bytes| serde_json::from_slice(bytes).ok())
            .unwrap_or(Value::Null);
        self.0.0.lock().unwrap().push(Request {
            purpose: purpose(&operation, &body),
            operation,
        });
        Ok(())
    }
}

/// What a request is for, from its table and the shape of the partition key it names.
fn purpose(operation: &str, body: &Value) -> String {
    let table = body["TableName"].as_str().unwrap_or("");
    if table.ends_with("-events") {
        return "log".to_owned();
    }
    let pk = body["Key"]["pk"]["S"]
        .as_str()
        .or_else(|| body["ExpressionAttributeValues"][":pk"]["S"].as_str());
    match pk {
        Some(pk) if pk.starts_with("delivered#") => "checkpoint",
        Some(pk) if pk.starts_with("room#") && operation == "GetItem" => "membership",
        Some(pk) if pk.starts_with("room#") => "audience",
        Some(pk) if pk.starts_with("conn#") && operation == "GetItem" => "connection",
        Some(pk) if pk.starts_with("conn#") => "connection activity",
        Some(pk) if pk.starts_with("msg#") => "clientMsgId",
        Some(pk) if pk.starts_with("user#") => "user",
        _ if operation == "TransactWriteItems" || operation == "BatchWriteItem" => "several items",
        _ => "other",
    }
    .to_owned()
}

fn is_read(operation: &str) -> bool {
    matches!(
        operation,
        "GetItem" | "Query" | "Scan" | "BatchGetItem" | "TransactGetItems"
    )
}

/// A gateway that records the seqs posted to each connection.
#[derive(Default)]
struct Gateway(Mutex<HashMap<ConnectionId, Vec<u64>>>);

#[async_trait]
impl ConnectionGateway for Gateway {
    async fn close(&self, _: &ConnectionId) -> Result<(), PostError> {
        Ok(())
    }

    async fn post(&self, connection: &ConnectionId, frame: Bytes) -> Result<(), PostError> {
        let frame: Value = serde_json::from_slice(&frame).expect("frames are JSON");
        let seq = frame["seq"]
            .as_u64()
            .expect("a room event's frame has a seq");
        self.0
            .lock()
            .unwrap()
            .entry(connection.clone())
            .or_default()
            .push(seq);
        Ok(())
    }
}

const MEMBERS: usize = 50;
const MESSAGES: u64 = 100;
/// Members who speak (each from one connection: one activity write each per batch).
const SPEAKERS: usize = 5;

fn hall() -> RoomName {
    RoomName::parse("hall").unwrap()
}

fn user(i: usize) -> UserId {
    UserId::parse(&format!("u{i:02}")).unwrap()
}

fn connection(i: usize) -> ConnectionId {
    ConnectionId::new(format!("c{i:02}"))
}

/// Fresh tables in moto behind a DynamoDB client whose requests `recorder` counts, holding
/// "hall" with [`MEMBERS`] members, each online with one connection, their joins delivered
/// (the fan-out's checkpoint is past them). Returns the client and the tables' prefix.
async fn hall_of_members(recorder: Arc<Recorder>) -> (aws_sdk_dynamodb::Client, String) {
    assert!(
        std::env::var("AWS_ENDPOINT_URL").is_ok(),
        "needs AWS_ENDPOINT_URL pointing at a moto server: run scripts/test"
    );
    let sdk = aws_config::load_defaults(aws_config::BehaviorVersion::latest()).await;
    let config = aws_sdk_dynamodb::config::Builder::from(&sdk)
        .interceptor(Counting(recorder))
        .build();
    let client = aws_sdk_dynamodb::Client::from_conf(config);
    let prefix = format!("requests-{}", ulid::Ulid::new().to_string().to_lowercase());
    dynamo::init(&client, &dynamo::Tables::new(&prefix))
        .await
        .expect("create tables");
    let store: Store = dynamo::DynamoStore::new(client.clone(), &prefix).store();
    for i in 0..MEMBERS {
        let connected = EventBody::Connected {
            connection: connection(i),
            user: user(i),
            source_ip: None,
            node: None,
        };
        store.log.append(connected, Expect::Seq(1)).await.unwrap();
        let joined = EventBody::Joined {
            room: hall(),
            user: user(i),
        };
        store.log.append(joined, Expect::Next).await.unwrap();
    }
    let checkpoints = store
        .checkpoints
        .clone()
        .expect("DynamoDB keeps checkpoints");
    checkpoints
        .advance(&Stream::Room(hall()), MEMBERS as u64, None)
        .await
        .unwrap();
    (client, prefix)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_reads_a_rooms_audience_with_one_query() {
    let recorder = Arc::new(Recorder::default());
    let (client, prefix) = hall_of_members(recorder.clone()).await;
    let store: Store = dynamo::DynamoStore::new(client, &prefix).store();
    let stream = Stream::Room(hall());

    // 100 messages, then one batch of their 100 stream records.
    let mut wakes = Vec::new();
    for m in 0..MESSAGES {
        let speaker = m as usize % SPEAKERS;
        let said = EventBody::MessagePosted {
            room: hall(),
            user: user(speaker),
            text: format!("message {m}"),
            client_msg_id: None,
            connection: Some(connection(speaker)),
        };
        let seq = store
            .log
            .append(said, Expect::Next)
            .await
            .unwrap()
            .event
            .seq;
        wakes.push(Wake::from_keys(
            format!("record-{seq}"),
            Some(&stream.key()),
            Some(&seq.to_string()),
        ));
    }
    let gateway = Arc::new(Gateway::default());
    let fanout = StreamFanOut::new(&store, FanOut::new(&store, gateway.clone())).unwrap();

    recorder.take();
    let report = fanout.handle(wakes).await;
    let requests = recorder.take();

    assert!(report.failed.is_empty(), "{:?}", report.failed);
    assert_eq!(report.events, MESSAGES as usize);
    assert_eq!(report.delivery.delivered, MEMBERS * MESSAGES as usize);
    let first = MEMBERS as u64 + 1;
    let posted = gateway.0.lock().unwrap().clone();
    assert_eq!(posted.len(), MEMBERS);
    for i in 0..MEMBERS {
        assert_eq!(
            posted[&connection(i)],
            (first..first + MESSAGES).collect::<Vec<u64>>(),
            "{}: every message once, in order",
            connection(i)
        );
    }

    let mut breakdown: BTreeMap<(String, String), usize> = BTreeMap::new();
    for request in &requests {
        *breakdown
            .entry((request.purpose.clone(), request.operation.clone()))
            .or_default() += 1;
    }
    eprintln!(
        "DynamoDB requests for one batch of {MESSAGES} messages to a room of {MEMBERS} online \
         members ({} posts): {} in all",
        report.delivery.delivered,
        requests.len()
    );
    for ((purpose, operation), count) in &breakdown {
        eprintln!("  {purpose:<20} {operation:<14} {count}");
    }

    let audience: Vec<&Request> = requests
        .iter()
        .filter(|r| r.purpose == "audience")
        .collect();
    let audience_reads = audience.iter().filter(|r| is_read(&r.operation)).count();
    assert!(
        (1..=2).contains(&audience_reads),
        "the audience is one paged Query: {audience:?}"
    );
    assert_eq!(
        audience.len(),
        audience_reads,
        "reading the audience writes nothing: {audience:?}"
    );
    // Nothing else is read per member: everything is accounted for.
    let expected: BTreeMap<(String, String), usize> = [
        (("audience", "Query"), 1),
        (("checkpoint", "GetItem"), 1),
        (("checkpoint", "UpdateItem"), 1),
        (("connection activity", "UpdateItem"), SPEAKERS),
        (("log", "Query"), 1),
    ]
    .into_iter()
    .map(|((p, o), n)| ((p.to_owned(), o.to_owned()), n))
    .collect();
    assert_eq!(breakdown, expected, "{requests:#?}");
}

/// What one `sendMessage` (with a `clientMsgId`) to a quiet room of 50 online members costs in
/// DynamoDB requests, end to end: the route function's, then the fan-out's batch of one record.
/// `docs/deploy.md`'s cost table is built from this count.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_message_to_a_quiet_room_costs_these_requests() {
    use aws_lambda_events::apigw::ApiGatewayWebsocketProxyRequest;
    use palaver::handlers::Routes;
    use palaver::identity::Identity;

    let recorder = Arc::new(Recorder::default());
    let (client, prefix) = hall_of_members(recorder.clone()).await;
    let stream = Stream::Room(hall());

    // A fresh store, as a new route function container has: nothing remembered.
    let store: Store = dynamo::DynamoStore::new(client, &prefix).store();
    let gateway = Arc::new(Gateway::default());
    let routes = Routes::new(&store, gateway.clone(), Identity::new(b"unused"));
    let mut request = ApiGatewayWebsocketProxyRequest::default();
    request.request_context.route_key = Some("sendMessage".to_owned());
    request.request_context.connection_id = Some(connection(0).to_string());
    request.body = Some(
        r#"{"action":"sendMessage","room":"hall","text":"hello","clientMsgId":"m1"}"#.to_owned(),
    );
    recorder.take();
    let response = routes.handle(request).await;
    assert_eq!(response.status_code, 200);
    let route = recorder.take();

    let fanout = StreamFanOut::new(&store, FanOut::new(&store, gateway.clone())).unwrap();
    let seq = MEMBERS as u64 + 1;
    let wake = Wake::from_keys("record-1", Some(&stream.key()), Some(&seq.to_string()));
    let report = fanout.handle(vec![wake]).await;
    assert!(report.failed.is_empty());
    assert_eq!(report.delivery.delivered, MEMBERS);
    let fan_out = recorder.take();

    let count = |requests: &[Request]| -> BTreeMap<(String, String), usize> {
        let mut counts = BTreeMap::new();
        for request in requests {
            *counts
                .entry((request.purpose.clone(), request.operation.clone()))
                .or_default() += 1;
        }
        counts
    };
    let expect = |pairs: &[((&str, &str), usize)]| -> BTreeMap<(String, String), usize> {
        pairs
            .iter()
            .map(|((p, o), n)| ((p.to_string(), o.to_string()), *n))
            .collect()
    };
    eprintln!("route: {:?}", count(&route));
    eprintln!("fan-out: {:?}", count(&fan_out));
    // The caller's connection row, the clientMsgId key (not used before), the member row, the
    // room's head; then the event and its clientMsgId key in one transaction.
    let route_expected = expect(&[
        (("connection", "GetItem"), 1),
        (("clientMsgId", "GetItem"), 1),
        (("membership", "GetItem"), 1),
        (("log", "Query"), 1),
        (("several items", "TransactWriteItems"), 1),
    ]);
    assert_eq!(
        count(&route),
        route_expected,
        "the route function's requests"
    );
    // The checkpoint, the log from it, the audience; the checkpoint moved, the sender's
    // last-active time.
    let fan_out_expected = expect(&[
        (("checkpoint", "GetItem"), 1),
        (("log", "Query"), 1),
        (("audience", "Query"), 1),
        (("checkpoint", "UpdateItem"), 1),
        (("connection activity", "UpdateItem"), 1),
    ]);
    assert_eq!(count(&fan_out), fan_out_expected, "the fan-out's requests");
}
