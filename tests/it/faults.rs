//! Faults below the server: a DynamoDB that throttles, fails and drops out for a while, played
//! by a proxy in front of moto that the node's AWS SDK talks to (its stream reads included); a
//! SQLite file whose disk fills up, or whose write lock another process holds.
//! Whatever the store does, a message acknowledged is in the log once, the connection stays
//! up, `/readyz` says not-ready while the node cannot serve, and the node serves again when the
//! store comes back.
//!
//! Needs a moto server and root (to mount the small disk): run `scripts/test` (a missing
//! `AWS_ENDPOINT_URL`, or a mount refused, fails the test).

use crate::common::{self, Client, Server};
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering::Relaxed};
use std::time::Duration;

/// What the store does to each request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
enum Fault {
    /// Passes it to moto.
    None = 0,
    /// `ThrottlingException` (HTTP 400), as DynamoDB answers past its limits.
    Throttle = 1,
    /// `InternalServerError` (HTTP 500).
    Fail = 2,
    /// No answer while it lasts (the network to the store is gone); then 503.
    Gone = 3,
}

struct Proxy {
    upstream: String,
    fault: AtomicU8,
    /// Requests refused or held since the start.
    refused: AtomicU64,
    http: reqwest::Client,
}

impl Proxy {
    fn fault(&self) -> Fault {
        match self.fault.load(Relaxed) {
            1 => Fault::Throttle,
            2 => Fault::Fail,
            3 => Fault::Gone,
            _ => Fault::None,
        }
    }
}

/// A DynamoDB endpoint in front of moto that fails on command.
struct FaultyStore {
    url: String,
    proxy: Arc<Proxy>,
}

impl FaultyStore {
    async fn start() -> FaultyStore {
        let upstream = std::env::var("AWS_ENDPOINT_URL").expect(
            "AWS_ENDPOINT_URL: these tests need a moto server (run them with scripts/test)",
        );
        let proxy = Arc::new(Proxy {
            upstream: upstream.trim_end_matches('/').to_owned(),
            fault: AtomicU8::new(Fault::None as u8),
            refused: AtomicU64::new(0),
            http: reqwest::Client::new(),
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let app = axum::Router::new()
            .fallback(forward)
            .with_state(proxy.clone());
        tokio::spawn(async move { axum::serve(listener, app).await });
        FaultyStore { url, proxy }
    }

    fn set(&self, fault: Fault) {
        self.proxy.fault.store(fault as u8, Relaxed);
    }

    /// Waits until the store has refused (or held) `more` requests beyond `since`.
    async fn refuses(&self, since: u64, more: u64) {
        common::eventually("the store to refuse requests", || async {
            (self.proxy.refused.load(Relaxed) >= since + more).then_some(())
        })
        .await;
    }
}

async fn forward(
    State(proxy): State<Arc<Proxy>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let error = |status: StatusCode, kind: &str| {
        (
            status,
            [("content-type", "application/x-amz-json-1.0")],
            json!({"__type": kind, "message": "injected by the test"}).to_string(),
        )
            .into_response()
    };
    let fault = proxy.fault();
    if fault != Fault::None {
        proxy.refused.fetch_add(1, Relaxed);
    }
    match fault {
        Fault::None => {}
        Fault::Throttle => {
            return error(
                StatusCode::BAD_REQUEST,
                "com.amazonaws.dynamodb.v20120810#ThrottlingException",
            );
        }
        Fault::Fail => {
            return error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "com.amazonaws.dynamodb.v20120810#InternalServerError",
            );
        }
        Fault::Gone => {
            while proxy.fault() == Fault::Gone {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            return error(StatusCode::SERVICE_UNAVAILABLE, "ServiceUnavailable");
        }
    }
    let path = uri.path_and_query().map_or("/", |p| p.as_str());
    let mut request = proxy
        .http
        .request(method, format!("{}{path}", proxy.upstream))
        .body(body);
    for (name, value) in &headers {
        if name != "host" && name != "content-length" {
            request = request.header(name, value);
        }
    }
    match request.send().await {
        Ok(answer) => {
            let status = answer.status();
            let headers = answer.headers().clone();
            let body = answer.bytes().await.unwrap_or_default();
            let mut response = (status, body).into_response();
            for (name, value) in &headers {
                if name != "content-length" && name != "transfer-encoding" {
                    response.headers_mut().insert(name, value.clone());
                }
            }
            response
        }
        Err(_) => error(StatusCode::BAD_GATEWAY, "ServiceUnavailable"),
    }
}

/// Sends `text` with `id` until it is acknowledged: on an error answer, sent again with the same
/// id, as a client does. Returns the `sent` answer.
async fn send_until_acknowledged(client: &mut Client, room: &str, text: &str, id: &str) -> Value {
    let frame = json!({"action": "sendMessage", "room": room, "text": text, "clientMsgId": id});
    for _ in 0..100 {
        let answer = client.request(frame.clone()).await;
        if answer["type"] == "sent" {
            return answer;
        }
        assert_eq!(answer["type"], "error", "{answer}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("{id} was never acknowledged");
}

/// The seqs of the `message` frames `client` was pushed, up to the last of `seqs` (included).
async fn messages_heard_up_to(client: &mut Client, seqs: &[u64]) -> Vec<u64> {
    let last = *seqs.last().expect("a seq");
    let heard = client.pushed_until(|f| f["seq"] == last).await;
    let mut heard: Vec<u64> = heard
        .iter()
        .filter(|f| f["type"] == "message")
        .map(|f| f["seq"].as_u64().unwrap())
        .collect();
    heard.push(last);
    heard
}

async fn readyz(server: &Server) -> (u16, String) {
    let answer = reqwest::Client::new()
        .get(format!("{}/readyz", server.url()))
        .timeout(Duration::from_secs(30))
        .send()
        .await
        .expect("/readyz answers");
    (
        answer.status().as_u16(),
        answer.text().await.unwrap_or_default(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_that_throttles_fails_and_drops_out_for_a_while_loses_nothing() {
    let store = common::dynamodb_store();
    let faulty = FaultyStore::start().await;
    let node = Server::start_with_env(
        tempfile::tempdir().unwrap(),
        &store,
        &[
            ("AWS_ENDPOINT_URL", faulty.url.as_str()),
            ("PALAVER_NODE_ID", "n1"),
        ],
    );
    let mut ana = node.connect("ana").await;
    let mut bob = node.connect("bob").await;
    ana.join("r").await;
    bob.join("r").await;
    assert_eq!(readyz(&node).await.0, 200);

    let mut acknowledged = Vec::new();
    for (n, fault) in [Fault::Throttle, Fault::Fail, Fault::Gone]
        .into_iter()
        .enumerate()
    {
        // While the store misbehaves, what ana sends is refused or waits; the node says it is
        // not ready.
        let since = faulty.proxy.refused.load(Relaxed);
        faulty.set(fault);
        let id = format!("m{n}");
        let frame = json!({"action": "sendMessage", "room": "r", "text": format!("during {fault:?}"), "clientMsgId": id});
        ana.send(frame).await;
        {
            let (status, why) = readyz(&node).await;
            assert_eq!(status, 503, "{fault:?}: {why}");
            assert!(why.contains("store"), "{why}");
        }
        // Long enough for the node's requests (appends, stream reads, lease renewals) to meet it.
        faulty.refuses(since, 5).await;
        // The store comes back: ana's message goes in (sent again if it was refused), once.
        faulty.set(Fault::None);
        let answer = ana.answer().await;
        let sent = if answer["type"] == "sent" {
            answer
        } else {
            send_until_acknowledged(&mut ana, "r", &format!("during {fault:?}"), &id).await
        };
        assert_eq!(sent["clientMsgId"], id);
        acknowledged.push(sent["seq"].as_u64().unwrap());
        assert_eq!(readyz(&node).await.0, 200);
    }
    // Every acknowledged message is in the log once, at its seq, and bob heard each once in order.
    let history = node.cli(&["history", "r", "--json"]);
    assert!(history.status.success(), "{history:?}");
    let events: Vec<Value> = serde_json::from_slice(&history.stdout).unwrap();
    let messages = common::messages(&events);
    let expected: Vec<(u64, String)> = acknowledged
        .iter()
        .zip(["during Throttle", "during Fail", "during Gone"])
        .map(|(seq, text)| (*seq, text.to_owned()))
        .collect();
    assert_eq!(messages, expected);
    assert_eq!(
        messages_heard_up_to(&mut bob, &acknowledged).await,
        acknowledged
    );
    // Both connections stayed up throughout.
    assert!(ana.is_open().await && bob.is_open().await);
}

/// A node cut off from the store for longer than its lease is taken for dead: another node
/// closes its connections (its users show offline). When the store comes back, the node finds
/// its lease gone and closes those sockets — its clients reconnect, to any node — instead of
/// serving connections the store says are closed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_cut_off_for_longer_than_its_lease_closes_its_sockets_when_it_is_back() {
    let store = common::dynamodb_store();
    let faulty = FaultyStore::start().await;
    let lease = ("PALAVER_NODE_LEASE", "2s");
    let cut_off = Server::start_with_env(
        tempfile::tempdir().unwrap(),
        &store,
        &[
            ("AWS_ENDPOINT_URL", faulty.url.as_str()),
            ("PALAVER_NODE_ID", "n1"),
            lease,
        ],
    );
    let other = Server::start_with_env(
        tempfile::tempdir().unwrap(),
        &store,
        &[("PALAVER_NODE_ID", "n2"), lease],
    );
    let mut ana = cut_off.connect("ana").await;
    ana.join("r").await;
    let mut bob = other.connect("bob").await;
    bob.join("r").await;

    faulty.set(Fault::Gone);
    // n2 sees n1's lease lapse and closes ana's connection: bob sees her go offline.
    bob.pushed_until(|f| f["type"] == "presence" && f["user"] == "ana" && f["online"] == false)
        .await;
    faulty.set(Fault::None);
    // Back on the store, n1 closes ana's socket; she comes back through the other node.
    let closed = tokio::time::timeout(Duration::from_secs(20), ana.closed())
        .await
        .expect("n1 closes the socket of a connection the store closed");
    // 1001, "going away": reconnect.
    assert_eq!(closed, Some(1001));
    let mut ana = other.connect("ana").await;
    ana.join("r").await;
    bob.pushed_until(|f| f["type"] == "presence" && f["user"] == "ana" && f["online"] == true)
        .await;
    let seq = ana.say("r", "back").await["seq"].as_u64().unwrap();
    bob.pushed_until(|f| f["seq"] == seq).await;
}

/// Another process holds the SQLite file's write lock for longer than the server waits for it
/// (5 s): a send meanwhile is answered with an error, the connection stays up, `/readyz` says
/// the node does not take writes, and once the lock is released the same message sent again
/// goes in once; what was acknowledged before is there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_process_holding_the_sqlite_write_lock_loses_nothing() {
    use sqlx::Connection;
    let server = Server::start_sqlite();
    let mut ana = server.connect("ana").await;
    let mut bob = server.connect("bob").await;
    ana.join("r").await;
    bob.join("r").await;
    let before = send_until_acknowledged(&mut ana, "r", "before", "m0").await;

    let url = format!("sqlite://{}", server.db_path().display());
    let mut outside = sqlx::SqliteConnection::connect(&url).await.unwrap();
    sqlx::query("BEGIN EXCLUSIVE")
        .execute(&mut outside)
        .await
        .unwrap();
    let frame =
        json!({"action": "sendMessage", "room": "r", "text": "during", "clientMsgId": "m1"});
    let answer = ana.request(frame).await;
    assert_eq!(answer["type"], "error", "{answer}");
    assert!(ana.is_open().await);
    // Reads still answer, but the node cannot take writes: not ready.
    let (status, why) = readyz(&server).await;
    assert_eq!(status, 503, "{why}");
    assert!(why.contains("does not take writes"), "{why}");
    sqlx::query("COMMIT").execute(&mut outside).await.unwrap();
    outside.close().await.unwrap();
    assert_eq!(readyz(&server).await.0, 200);

    let during = send_until_acknowledged(&mut ana, "r", "during", "m1").await;
    let seqs = [
        before["seq"].as_u64().unwrap(),
        during["seq"].as_u64().unwrap(),
    ];
    assert_eq!(
        seqs[1],
        seqs[0] + 1,
        "nothing between them: the refused send left no trace"
    );
    let heard = bob.pushed_until(|f| f["seq"] == seqs[1]).await;
    let messages: Vec<u64> = heard
        .iter()
        .filter(|f| f["type"] == "message")
        .map(|f| f["seq"].as_u64().unwrap())
        .collect();
    assert_eq!(messages, [seqs[0]]);
}

/// A small filesystem of its own (tmpfs) for a SQLite file, which a test fills to the last byte
/// and frees again. Mounting needs root, as `scripts/test` runs; without it the test fails.
struct SmallDisk {
    path: std::path::PathBuf,
    /// Where it is mounted; removed once unmounted.
    _mount_point: tempfile::TempDir,
}

impl SmallDisk {
    const FILLER: &'static str = "filler";

    fn mount(size: &str) -> SmallDisk {
        let mount_point = tempfile::tempdir().unwrap();
        let path = mount_point.path().to_owned();
        let mounted = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(&path)
            .status()
            .expect("mount runs");
        assert!(mounted.success(), "mounting a tmpfs needs root: {mounted}");
        SmallDisk {
            path,
            _mount_point: mount_point,
        }
    }

    /// Writes a file until the filesystem has no byte left.
    fn fill(&self) {
        use std::io::Write;
        let mut filler = std::fs::File::create(self.path.join(Self::FILLER)).unwrap();
        for chunk in [64 * 1024, 4096, 1] {
            let bytes = vec![0u8; chunk];
            while filler.write_all(&bytes).is_ok() {}
        }
        let _ = filler.sync_all();
    }

    fn free(&self) {
        std::fs::remove_file(self.path.join(Self::FILLER)).unwrap();
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        // Lazily: the server may still hold its files open while it is killed.
        let _ = std::process::Command::new("umount")
            .arg("--lazy")
            .arg(&self.path)
            .status();
    }
}

/// The disk under the SQLite file fills up: sends are answered with an error (the connection
/// stays up), `/readyz` says the node cannot take writes, and when space returns the node is
/// ready again, the refused message sent again goes in once, and the log holds every
/// acknowledged message once, gap-free.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_under_sqlite_refuses_sends_and_loses_nothing() {
    let disk = SmallDisk::mount("16m");
    let store = format!("sqlite://{}", disk.path.join("palaver.db").display());
    let server = Server::start_on(tempfile::tempdir().unwrap(), &store);
    let mut ana = server.connect("ana").await;
    let mut bob = server.connect("bob").await;
    ana.join("r").await;
    bob.join("r").await;
    let mut acknowledged = vec![send_until_acknowledged(&mut ana, "r", "before", "m0").await];
    assert_eq!(readyz(&server).await.0, 200);

    disk.fill();
    // The log's write-ahead file may have room left for a few more; then a send is refused.
    let text = "x".repeat(8 * 1024);
    let mut refused = None;
    for n in 1..=500 {
        let id = format!("m{n}");
        let frame = json!({"action": "sendMessage", "room": "r", "text": text, "clientMsgId": id});
        let answer = ana.request(frame).await;
        if answer["type"] == "sent" {
            acknowledged.push(answer);
            continue;
        }
        assert_eq!(answer["type"], "error", "{answer}");
        refused = Some(id);
        break;
    }
    let refused = refused.expect("a send is refused once the disk is full");
    assert!(ana.is_open().await);
    let (status, why) = readyz(&server).await;
    assert_eq!(status, 503, "{why}");
    assert!(why.contains("does not take writes"), "{why}");

    disk.free();
    common::eventually("the node is ready once space returns", || async {
        (readyz(&server).await.0 == 200).then_some(())
    })
    .await;
    acknowledged.push(send_until_acknowledged(&mut ana, "r", &text, &refused).await);

    let seqs: Vec<u64> = acknowledged
        .iter()
        .map(|sent| sent["seq"].as_u64().unwrap())
        .collect();
    let history = server.cli(&["history", "r", "--json", "--limit", "500"]);
    assert!(history.status.success(), "{history:?}");
    let events: Vec<Value> = serde_json::from_slice(&history.stdout).unwrap();
    let logged: Vec<u64> = common::messages(&events).iter().map(|m| m.0).collect();
    assert_eq!(
        logged, seqs,
        "every acknowledged message once, nothing else"
    );
    assert!(
        seqs.windows(2).all(|w| w[1] == w[0] + 1),
        "gap-free: the refused sends left no trace: {seqs:?}"
    );
    assert_eq!(messages_heard_up_to(&mut bob, &seqs).await, seqs);
}
