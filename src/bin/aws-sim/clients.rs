//! The scenarios' WebSocket clients: real tokio-tungstenite connections to the simulated API
//! Gateway, speaking the contract's wire protocol. Each joins its rooms, may send messages
//! (the send time travels in the text), and checks what it hears: every seq of its rooms after
//! the head it joined at, once, in order.

use futures_util::{SinkExt, StreamExt};
use parking_lot::Mutex;
use serde_json::{Value, json};
use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{Message, http::HeaderValue};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// How long a client waits for any one answer.
const ANSWER_WAIT: Duration = Duration::from_secs(60);
/// Bytes of filler after the timestamp in each message's text.
const FILLER: usize = 32;

/// What every client of a run adds to.
pub struct Shared {
    pub epoch: Instant,
    pub secret: String,
    pub url: String,
    pub sent: AtomicU64,
    pub acked: AtomicU64,
    pub connect_refusals: AtomicU64,
    pub error_frames: AtomicU64,
    /// Frames heard, by type; `error:CODE` for palaver's error frames, `apigw:MESSAGE` for API
    /// Gateway's own (`message`/`sent`/`member` frames counted where they are checked).
    pub frames: Mutex<std::collections::BTreeMap<String, u64>>,
    /// Send → receive of each `message` frame, microseconds.
    pub latencies_us: Mutex<Vec<u64>>,
    /// When (µs since the run's start) the last message frame was heard.
    pub last_heard_us: AtomicU64,
    /// Acknowledged messages: (room, seq).
    pub acked_seqs: Mutex<Vec<(String, u64)>>,
    /// Each (client, room)'s view, collected when the client ends.
    pub views: Mutex<Vec<RoomView>>,
    /// Set to end the run: clients stop sending and, once it is set, close.
    pub stop: AtomicBool,
    pub sending: AtomicBool,
    /// Set while a storm is on: the clients that take part drop their connections and
    /// reconnect once it is cleared.
    pub storm: AtomicBool,
    /// The users who dropped in the storm and never came back, with their rooms.
    pub left: Mutex<Vec<(String, Vec<String>)>>,
    /// Told whenever `stop`, `sending` or `storm` changes.
    pub changed: tokio::sync::watch::Sender<u64>,
}

impl Shared {
    pub fn new(url: String, secret: String) -> Arc<Shared> {
        Arc::new(Shared {
            epoch: Instant::now(),
            secret,
            url,
            sent: AtomicU64::new(0),
            acked: AtomicU64::new(0),
            connect_refusals: AtomicU64::new(0),
            error_frames: AtomicU64::new(0),
            frames: Mutex::default(),
            latencies_us: Mutex::default(),
            last_heard_us: AtomicU64::new(0),
            acked_seqs: Mutex::default(),
            views: Mutex::default(),
            stop: AtomicBool::new(false),
            sending: AtomicBool::new(false),
            storm: AtomicBool::new(false),
            left: Mutex::default(),
            changed: tokio::sync::watch::Sender::new(0),
        })
    }

    /// Sets one of the flags and tells every client.
    pub fn set(&self, flag: &AtomicBool, on: bool) {
        flag.store(on, Relaxed);
        self.changed.send_modify(|n| *n += 1);
    }

    pub fn now_us(&self) -> u64 {
        self.epoch.elapsed().as_micros() as u64
    }

    pub fn token(&self, user: &str) -> String {
        let claims = json!({
            "sub": user,
            "exp": chrono::Utc::now().timestamp() + 4 * 3600,
        });
        jsonwebtoken::encode(
            &jsonwebtoken::Header::default(),
            &claims,
            &jsonwebtoken::EncodingKey::from_secret(self.secret.as_bytes()),
        )
        .expect("a token")
    }
}

/// What one client heard in one room.
#[derive(Clone, Debug, Default)]
pub struct RoomView {
    pub room: String,
    /// The head its first `joined` named: it must hear every seq after it.
    pub joined_head: u64,
    /// Every seq it heard (messages and membership events).
    pub seqs: BTreeSet<u64>,
    /// Seqs of `message` frames heard.
    pub messages: BTreeSet<u64>,
    pub duplicates: u64,
    pub out_of_order: u64,
    /// The last `presence` it heard of each user in the room (`true`: online).
    pub presence: HashMap<String, bool>,
    last: u64,
    /// After a rejoin with `after`, replayed and live frames may interleave (the contract lets
    /// them): order is not checked then.
    replaying: bool,
}

/// One client's part in a scenario.
#[derive(Clone, Debug)]
pub struct Plan {
    pub user: String,
    pub rooms: Vec<String>,
    /// Messages per second this client sends to `rooms[0]` while `Shared::sending` is set.
    pub rate: f64,
    pub slow: bool,
    /// Drops its connection when `Shared::storm` is set, then reconnects and rejoins with
    /// `after` once it is cleared.
    pub storm: bool,
    /// Drops in the storm and never comes back (its `$disconnect` may be lost: the `stale`
    /// scenario's users who closed their laptop).
    pub leaves: bool,
}

/// A client's connection, opened (retrying while the handshake is refused: 429 or 500).
async fn open(shared: &Shared, plan: &Plan) -> Option<Ws> {
    let url = format!("{}?token={}", shared.url, shared.token(&plan.user));
    let config = WebSocketConfig::default()
        .read_buffer_size(4 * 1024)
        .write_buffer_size(0);
    let mut pause = Duration::from_millis(100);
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let mut request = url.as_str().into_client_request().ok()?;
        if plan.slow {
            request.headers_mut().insert(
                crate::gateway::SLOW_CLIENT_HEADER,
                HeaderValue::from_static("1"),
            );
        }
        match tokio_tungstenite::connect_async_with_config(request, Some(config), true).await {
            Ok((ws, _)) => return Some(ws),
            Err(error) => {
                shared.connect_refusals.fetch_add(1, Relaxed);
                if Instant::now() > deadline || shared.stop.load(Relaxed) {
                    tracing::warn!(user = plan.user, %error, "gave up connecting");
                    return None;
                }
                // Backoff with jitter, as a client should after a refused handshake.
                let jitter = rand::random_range(0.5..1.5);
                tokio::time::sleep(pause.mul_f64(jitter)).await;
                pause = (pause * 2).min(Duration::from_secs(5));
            }
        }
    }
}

/// Runs one client until `shared.stop`. `ready` is called once: with `true` when it has joined
/// every room, with `false` if it gave up before.
pub async fn run(shared: Arc<Shared>, plan: Plan, ready: impl FnOnce(bool)) {
    let mut views: HashMap<String, RoomView> = HashMap::new();
    let mut ready = Some(ready);
    let mut counter = 0u64;
    'connection: loop {
        let Some(ws) = open(&shared, &plan).await else {
            break;
        };
        let (mut sink, mut stream) = ws.split();
        // Join every room, in turn; with `after` when rejoining.
        for room in &plan.rooms {
            let after = views
                .get(room)
                .map(|v| v.seqs.last().copied().unwrap_or(v.joined_head));
            let mut frame = json!({"action": "joinRoom", "room": room});
            if let Some(after) = after {
                frame["after"] = json!(after);
                if let Some(view) = views.get_mut(room) {
                    view.replaying = true;
                }
            }
            if sink
                .send(Message::Text(frame.to_string().into()))
                .await
                .is_err()
            {
                continue 'connection;
            }
            let deadline = tokio::time::Instant::now() + ANSWER_WAIT;
            loop {
                let Ok(Some(Ok(message))) = tokio::time::timeout_at(deadline, stream.next()).await
                else {
                    tracing::warn!(user = plan.user, room, "no `joined`");
                    continue 'connection;
                };
                let Message::Text(text) = message else {
                    continue;
                };
                let Ok(frame) = serde_json::from_str::<Value>(&text) else {
                    continue;
                };
                if frame["type"] == "joined" && frame["room"] == room.as_str() {
                    let head = frame["head"].as_u64().unwrap_or(0);
                    views.entry(room.clone()).or_insert_with(|| RoomView {
                        room: room.clone(),
                        joined_head: head,
                        last: head,
                        ..RoomView::default()
                    });
                    break;
                }
                if frame.get("message").is_some() && frame.get("type").is_none() {
                    // API Gateway's own error frame (throttled, integration failed): try again
                    // after a pause, with jitter, as a client should.
                    shared.error_frames.fetch_add(1, Relaxed);
                    let message = frame["message"].as_str().unwrap_or("?");
                    *shared
                        .frames
                        .lock()
                        .entry(format!("apigw:{message}"))
                        .or_default() += 1;
                    let pause = Duration::from_millis(500).mul_f64(rand::random_range(0.5..1.5));
                    tokio::time::sleep(pause).await;
                    if sink
                        .send(Message::Text(
                            json!({"action": "joinRoom", "room": room})
                                .to_string()
                                .into(),
                        ))
                        .await
                        .is_err()
                    {
                        continue 'connection;
                    }
                    continue;
                }
                heard(&shared, &mut views, &frame);
            }
        }
        if let Some(ready) = ready.take() {
            ready(true);
        }
        let mut changed = shared.changed.subscribe();
        let period = Duration::from_secs_f64(1.0 / plan.rate.max(1e-3));
        let mut ticker = tokio::time::interval(period);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            if shared.stop.load(Relaxed) {
                let _ = sink.send(Message::Close(None)).await;
                break 'connection;
            }
            if plan.storm && shared.storm.load(Relaxed) {
                // Dropped: the connection ends without a goodbye; it reconnects once the storm
                // is called off, unless it leaves for good.
                drop(sink);
                drop(stream);
                if plan.leaves {
                    shared
                        .left
                        .lock()
                        .push((plan.user.clone(), plan.rooms.clone()));
                    // What it heard is not held against the fan-out: it left.
                    return;
                }
                while shared.storm.load(Relaxed) && !shared.stop.load(Relaxed) {
                    if changed.changed().await.is_err() {
                        break;
                    }
                }
                continue 'connection;
            }
            let sending = plan.rate > 0.0 && shared.sending.load(Relaxed);
            tokio::select! {
                message = stream.next() => {
                    match message {
                        Some(Ok(Message::Text(text))) => {
                            if let Ok(frame) = serde_json::from_str::<Value>(&text) {
                                heard(&shared, &mut views, &frame);
                            }
                        }
                        Some(Ok(_)) => {}
                        _ => continue 'connection,
                    }
                }
                _ = changed.changed() => {}
                _ = ticker.tick(), if sending => {
                    counter += 1;
                    let stamp = shared.now_us();
                    let text = format!("{stamp} {}", "x".repeat(FILLER));
                    let frame = json!({
                        "action": "sendMessage",
                        "room": plan.rooms[0],
                        "text": text,
                        "clientMsgId": format!("{}-{counter}", plan.user),
                    });
                    shared.sent.fetch_add(1, Relaxed);
                    if sink.send(Message::Text(frame.to_string().into())).await.is_err() {
                        continue 'connection;
                    }
                }
            }
        }
    }
    if let Some(ready) = ready.take() {
        ready(false);
    }
    shared.views.lock().extend(views.into_values());
}

/// A frame a client heard.
fn heard(shared: &Shared, views: &mut HashMap<String, RoomView>, frame: &Value) {
    match frame["type"].as_str() {
        Some("sent") => {
            *shared.frames.lock().entry("sent".to_owned()).or_default() += 1;
            shared.acked.fetch_add(1, Relaxed);
            if let (Some(room), Some(seq)) = (frame["room"].as_str(), frame["seq"].as_u64()) {
                shared.acked_seqs.lock().push((room.to_owned(), seq));
            }
        }
        Some("presence") => {
            *shared
                .frames
                .lock()
                .entry("presence".to_owned())
                .or_default() += 1;
            let (Some(room), Some(user), Some(online)) = (
                frame["room"].as_str(),
                frame["user"].as_str(),
                frame["online"].as_bool(),
            ) else {
                return;
            };
            if let Some(view) = views.get_mut(room) {
                view.presence.insert(user.to_owned(), online);
            }
        }
        Some(kind @ ("message" | "member")) => {
            let (Some(room), Some(seq)) = (frame["room"].as_str(), frame["seq"].as_u64()) else {
                return;
            };
            *shared.frames.lock().entry(kind.to_owned()).or_default() += 1;
            let Some(view) = views.get_mut(room) else {
                return;
            };
            if seq <= view.joined_head {
                return;
            }
            if !view.seqs.insert(seq) {
                view.duplicates += 1;
                return;
            }
            if seq < view.last && !view.replaying {
                view.out_of_order += 1;
                tracing::debug!(room, seq, last = view.last, kind, "heard out of order");
            }
            view.last = view.last.max(seq);
            if kind == "message" {
                view.messages.insert(seq);
                let sent_us = frame["text"]
                    .as_str()
                    .and_then(|t| t.split(' ').next())
                    .and_then(|t| t.parse::<u64>().ok());
                let now_us = shared.now_us();
                shared.last_heard_us.fetch_max(now_us, Relaxed);
                if let Some(sent_us) = sent_us {
                    shared
                        .latencies_us
                        .lock()
                        .push(now_us.saturating_sub(sent_us));
                }
            }
        }
        Some("error") => {
            shared.error_frames.fetch_add(1, Relaxed);
            let code = frame["code"].as_str().unwrap_or("?");
            *shared
                .frames
                .lock()
                .entry(format!("error:{code}"))
                .or_default() += 1;
        }
        None if frame.get("message").is_some() => {
            shared.error_frames.fetch_add(1, Relaxed);
            let message = frame["message"].as_str().unwrap_or("?");
            *shared
                .frames
                .lock()
                .entry(format!("apigw:{message}"))
                .or_default() += 1;
        }
        Some(other) => {
            *shared.frames.lock().entry(other.to_owned()).or_default() += 1;
        }
        None => {}
    }
}
