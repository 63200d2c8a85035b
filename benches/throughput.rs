//! Throughput figures: `cargo bench --bench throughput`.
//!
//! 1. Appends per second to the SQLite log (synchronous=FULL) with 1, 16 and 128 concurrent
//!    writers — group commit should make many writers far faster than one.
//! 2. What a connection costs the log: 10,000 `connected` + `joined` pairs appended 20 at a
//!    time while a reader follows the feed, as `$connect`, `joinRoom` and the local tail do — the
//!    process's CPU time per pair (the median of five runs), which is what limits how many
//!    clients per second can connect.
//! 3. End to end: messages per second through a real `palaver serve` stack (WebSocket in,
//!    log, fan-out, WebSocket out) with 10 members in one room, and deliveries per second.

use futures_util::{SinkExt, StreamExt};
use palaver::domain::{ConnectionId, EventBody, Expect, RoomName, UserId};
use palaver::identity::Identity;
use palaver::ports::Store;
use palaver::server::{ServeConfig, ServeSettings, serve};
use palaver::store::sqlite::SqliteStore;
use std::time::{Duration, Instant};
use tokio_tungstenite::tungstenite::Message;

const APPENDS: usize = 4000;

async fn appends(store: &Store, writers: usize) -> f64 {
    let room = RoomName::parse(&format!("bench{writers}")).unwrap();
    let started = Instant::now();
    let tasks: Vec<_> = (0..writers)
        .map(|w| {
            let log = store.log.clone();
            let room = room.clone();
            tokio::spawn(async move {
                let user = UserId::parse(&format!("w{w}")).unwrap();
                for i in 0..APPENDS / writers {
                    let body = EventBody::MessagePosted {
                        room: room.clone(),
                        user: user.clone(),
                        text: format!("message {i} from writer {w}, about sixty bytes long"),
                        client_msg_id: None,
                        connection: None,
                    };
                    log.append(body, Expect::Next).await.expect("append");
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    APPENDS as f64 / started.elapsed().as_secs_f64()
}

/// A SQLite store on a new file, which lives as long as the returned directory.
async fn fresh_sqlite() -> (Store, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bench.db");
    let store = SqliteStore::open(path.to_str().unwrap())
        .await
        .unwrap()
        .store();
    (store, dir)
}

/// Connections logged per run of [`connects`].
const PAIRS: usize = 10_000;

/// The process's CPU time so far (user + system), from `/proc/self/stat`.
fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").expect("/proc/self/stat");
    // The fields after the command name, which is in parentheses and may hold spaces.
    let fields: Vec<&str> = stat
        .rsplit(')')
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .collect();
    let ticks = |i: usize| fields[i].parse::<f64>().expect("clock ticks");
    (ticks(11) + ticks(12)) / 100.0
}

/// Appends [`PAIRS`] `connected` + `joined` pairs, `at_once` connections at a time, 100 per
/// room, while a reader follows the feed to the end; returns CPU microseconds per pair.
async fn connects(at_once: usize) -> f64 {
    let (store, _dir) = fresh_sqlite().await;
    let feed = store.feed.clone().unwrap();
    let reader = tokio::spawn(async move {
        let mut wake = feed.watch();
        let (mut at, mut seen) = (0, 0);
        while seen < 2 * PAIRS {
            wake.borrow_and_update();
            loop {
                let page = feed.read_all(at, 256).await.unwrap();
                let Some(&(last, _)) = page.last() else { break };
                seen += page.len();
                at = last;
            }
            if seen < 2 * PAIRS {
                wake.changed().await.unwrap();
            }
        }
    });
    let next = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let before = cpu_seconds();
    let clients: Vec<_> = (0..at_once)
        .map(|_| {
            let (log, next) = (store.log.clone(), next.clone());
            tokio::spawn(async move {
                loop {
                    let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    if i >= PAIRS {
                        return;
                    }
                    let user = UserId::parse(&format!("u{i}")).unwrap();
                    let connected = EventBody::Connected {
                        connection: ConnectionId::random(),
                        user: user.clone(),
                        source_ip: Some("192.0.2.1".into()),
                        node: Some("bench".into()),
                    };
                    log.append(connected, Expect::Seq(1)).await.unwrap();
                    let room = RoomName::parse(&format!("room{}", i / 100)).unwrap();
                    let joined = EventBody::Joined { room, user };
                    log.append(joined, Expect::Join { max_rooms: 100 })
                        .await
                        .unwrap();
                }
            })
        })
        .collect();
    for client in clients {
        client.await.unwrap();
    }
    reader.await.unwrap();
    (cpu_seconds() - before) * 1e6 / PAIRS as f64
}

async fn end_to_end(members: usize, messages_each: usize) -> (f64, f64) {
    let (store, _dir) = fresh_sqlite().await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let identity = Identity::new(b"bench");
    tokio::spawn(serve(ServeConfig {
        listener,
        store,
        identity: identity.clone(),
        admin_token: None,
        changes: None,
        management_keys: None,
        node: "bench".to_owned(),
        metrics: None,
        settings: ServeSettings {
            rate_limit: 0,
            connection_retention: None,
            ..ServeSettings::default()
        },
    }));

    let mut clients = Vec::new();
    for m in 0..members {
        let token = identity.issue(
            &UserId::parse(&format!("m{m}")).unwrap(),
            Duration::from_secs(600),
        );
        let (mut ws, _) = tokio_tungstenite::connect_async(format!("ws://{addr}/?token={token}"))
            .await
            .unwrap();
        ws.send(Message::text(r#"{"action":"joinRoom","room":"bench"}"#))
            .await
            .unwrap();
        loop {
            let frame = ws.next().await.unwrap().unwrap();
            if frame.to_text().unwrap().contains(r#""type":"joined""#) {
                break;
            }
        }
        clients.push(ws);
    }
    // Let the join frames settle before timing.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let total = members * messages_each;
    let started = Instant::now();
    let tasks: Vec<_> = clients
        .into_iter()
        .map(|mut ws| {
            tokio::spawn(async move {
                let mut received = 0;
                let mut sent = 0;
                let mut acked = 0;
                // Keep a few sends in flight, as a busy client would (under the rate limit).
                while received < total || acked < messages_each {
                    while sent < messages_each && sent - acked < 4 {
                        let frame = format!(
                            r#"{{"action":"sendMessage","room":"bench","text":"hello {sent}"}}"#
                        );
                        ws.send(Message::text(frame)).await.unwrap();
                        sent += 1;
                    }
                    let frame = ws.next().await.unwrap().unwrap();
                    let text = frame.to_text().unwrap();
                    if text.contains(r#""type":"message""#) {
                        received += 1;
                    } else if text.contains(r#""type":"sent""#) {
                        acked += 1;
                    }
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    let secs = started.elapsed().as_secs_f64();
    (total as f64 / secs, (total * members) as f64 / secs)
}

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let (sqlite, _dir) = fresh_sqlite().await;
        let memory = palaver::store::memory::MemoryStore::store();
        println!("appends of {APPENDS} ~100-byte messages to one room:");
        for writers in [1, 16, 128] {
            let m = appends(&memory, writers).await;
            let s = appends(&sqlite, writers).await;
            println!("  {writers:>3} writers: sqlite {s:>9.0}/s   memory {m:>9.0}/s");
        }
        let mut per_pair = Vec::new();
        for _ in 0..5 {
            per_pair.push(connects(20).await);
        }
        per_pair.sort_by(f64::total_cmp);
        println!(
            "connections logged ({PAIRS} connected + joined pairs, 20 at a time, a reader \
             following): {:.0} us of CPU per pair (median of five; {:.0}-{:.0})",
            per_pair[2], per_pair[0], per_pair[4]
        );
        for (members, each) in [(10, 50), (50, 10)] {
            let (messages, deliveries) = end_to_end(members, each).await;
            println!(
                "end to end, {members} members in one room, {each} messages each: \
                 {messages:.0} messages/s in, {deliveries:.0} deliveries/s out"
            );
        }
    });
}
