//! The local change-stream tail of `palaver serve --store dynamodb://…`, against the DynamoDB and
//! DynamoDB Streams of the moto server `scripts/test` starts (no endpoint is a failure, never a
//! skip): it wakes the fan-out for what is appended after it starts, reads a batch whose
//! delivery failed again and delivers it once, and a record it cannot read does not stop it.

use async_trait::async_trait;
use bytes::Bytes;
use palaver::domain::{ConnectionId, EventBody, Expect, RoomName, Stream, UserId};
use palaver::fanout::FanOut;
use palaver::fanout::change_stream::ChangeSource;
use palaver::fanout::stream::StreamFanOut;
use palaver::ports::{
    Checkpoint, Checkpoints, ConnectionGateway, PostError, RelayLease, Store, StoreError,
    StoreResult,
};
use palaver::store::dynamodb::{self as dynamo, DynamoStore, Tables};
use serde_json::Value;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// A gateway that keeps every post.
#[derive(Default)]
struct Recorder {
    posts: Mutex<Vec<(ConnectionId, Value)>>,
}

#[async_trait]
impl ConnectionGateway for Recorder {
    async fn close(&self, _: &ConnectionId) -> Result<(), PostError> {
        Ok(())
    }

    async fn post(&self, connection: &ConnectionId, frame: Bytes) -> Result<(), PostError> {
        let frame = serde_json::from_slice(&frame).expect("frames are JSON");
        self.posts.lock().unwrap().push((connection.clone(), frame));
        Ok(())
    }
}

impl Recorder {
    /// `(room, seq)` of every message frame posted so far.
    fn messages(&self) -> Vec<(String, u64)> {
        self.posts
            .lock()
            .unwrap()
            .iter()
            .filter(|(_, f)| f["type"] == "message")
            .map(|(_, f)| {
                (
                    f["room"].as_str().unwrap().to_owned(),
                    f["seq"].as_u64().unwrap(),
                )
            })
            .collect()
    }

    /// Waits until at least `n` message frames were posted.
    async fn wait_for_messages(&self, n: usize) -> Vec<(String, u64)> {
        for _ in 0..200 {
            let messages = self.messages();
            if messages.len() >= n {
                return messages;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!(
            "expected {n} message frames, got {:?}",
            self.posts.lock().unwrap()
        );
    }
}

/// Checkpoints whose first `failures` reads fail, as a throttled or unreachable table would.
struct Flaky {
    inner: Arc<dyn Checkpoints>,
    failures: AtomicU32,
}

#[async_trait]
impl Checkpoints for Flaky {
    async fn checkpoint(&self, stream: &Stream) -> StoreResult<Checkpoint> {
        let fail = self
            .failures
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok();
        if fail {
            return Err(StoreError::Corrupt("injected failure".to_owned()));
        }
        self.inner.checkpoint(stream).await
    }

    async fn advance(
        &self,
        stream: &Stream,
        seq: u64,
        relay: Option<RelayLease>,
    ) -> StoreResult<()> {
        self.inner.advance(stream, seq, relay).await
    }
}

struct Fixture {
    store: Store,
    client: aws_sdk_dynamodb::Client,
    tables: Tables,
    source: ChangeSource,
}

/// Fresh tables under a new prefix. `RUST_LOG=palaver=debug` shows the tail's logs.
async fn fixture() -> Fixture {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    assert!(
        std::env::var("AWS_ENDPOINT_URL").is_ok(),
        "the change stream tests need AWS_ENDPOINT_URL pointing at a moto server: run scripts/test"
    );
    let prefix = format!("tail-{}", ulid::Ulid::new().to_string().to_lowercase());
    let config = aws_config::load_defaults(aws_config::BehaviorVersion::latest()).await;
    let client = aws_sdk_dynamodb::Client::new(&config);
    let tables = Tables::new(&prefix);
    dynamo::init(&client, &tables).await.expect("create tables");
    Fixture {
        store: DynamoStore::new(client.clone(), &prefix).store(),
        source: ChangeSource::new(
            client.clone(),
            aws_sdk_dynamodbstreams::Client::new(&config),
            tables.events.clone(),
        ),
        client,
        tables,
    }
}

async fn append(store: &Store, body: EventBody) {
    store.log.append(body, Expect::Next).await.expect("append");
}

fn say(room: &str, text: &str) -> EventBody {
    EventBody::MessagePosted {
        room: RoomName::parse(room).unwrap(),
        user: UserId::parse("ana").unwrap(),
        text: text.to_owned(),
        client_msg_id: None,
        connection: None,
    }
}

fn joined(room: &str) -> EventBody {
    EventBody::Joined {
        room: RoomName::parse(room).unwrap(),
        user: UserId::parse("ana").unwrap(),
    }
}

/// ana, online on connection c1.
async fn ana_online(store: &Store) {
    append(
        store,
        EventBody::Connected {
            connection: ConnectionId::new("c1"),
            user: UserId::parse("ana").unwrap(),
            source_ip: None,
            node: None,
        },
    )
    .await;
}

#[tokio::test]
async fn what_is_appended_after_the_start_is_delivered_once_even_after_failures() {
    let fixture = fixture().await;
    let store = fixture.store.clone();
    ana_online(&store).await;
    append(&store, joined("r")).await;
    append(&store, joined("old")).await;
    append(&store, say("old", "before the tail started")).await;

    // The first two attempts at delivering fail: the batch is read again from its first record.
    let flaky = Store {
        checkpoints: Some(Arc::new(Flaky {
            inner: store.checkpoints.clone().unwrap(),
            failures: AtomicU32::new(2),
        })),
        ..store.clone()
    };
    let recorder = Arc::new(Recorder::default());
    let fanout = StreamFanOut::new(&flaky, FanOut::new(&flaky, recorder.clone())).unwrap();
    let tail = fixture.source.clone().start().await.expect("tail starts");
    let running = tokio::spawn(tail.run(fanout));

    append(&store, say("r", "hello")).await;
    append(&store, say("r", "again")).await;
    recorder.wait_for_messages(2).await;
    // A marker after them: a repeat of the retried batch would be delivered before it.
    append(&store, say("r", "marker")).await;
    let messages = recorder.wait_for_messages(3).await;
    assert_eq!(
        recorder.messages(),
        [
            ("r".to_owned(), 2),
            ("r".to_owned(), 3),
            ("r".to_owned(), 4)
        ],
        "each message once, in order, and nothing of what came before the start: {messages:?}"
    );
    assert!(
        recorder
            .posts
            .lock()
            .unwrap()
            .iter()
            .all(|(c, f)| c.as_str() == "c1" && f["room"] != "old"),
        "{:?}",
        recorder.posts.lock().unwrap()
    );
    assert!(!running.is_finished(), "the tail keeps running");
    running.abort();
}

#[tokio::test]
async fn a_record_that_cannot_be_read_does_not_stop_the_tail() {
    let fixture = fixture().await;
    let store = fixture.store.clone();
    ana_online(&store).await;
    append(&store, joined("r")).await;

    let recorder = Arc::new(Recorder::default());
    let fanout = StreamFanOut::new(&store, FanOut::new(&store, recorder.clone())).unwrap();
    let tail = fixture.source.clone().start().await.expect("tail starts");
    let running = tokio::spawn(tail.run(fanout));

    // An item that is no log event: its record is reported and skipped, never retried.
    fixture
        .client
        .put_item()
        .table_name(&fixture.tables.events)
        .item(
            "stream",
            aws_sdk_dynamodb::types::AttributeValue::S("junk".into()),
        )
        .item(
            "seq",
            aws_sdk_dynamodb::types::AttributeValue::N("1".into()),
        )
        .send()
        .await
        .expect("put a stray item");
    append(&store, say("r", "still delivered")).await;
    assert_eq!(recorder.wait_for_messages(1).await, [("r".to_owned(), 2)]);
    assert!(!running.is_finished(), "the tail keeps running");
    running.abort();
}
