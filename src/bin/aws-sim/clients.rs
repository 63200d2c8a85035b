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
/// Messages sent and not yet acknowledged, by `clientMsgId`: the frame, when it may go again,
/// and how long to wait after that.
type Unacked = HashMap<String, (String, tokio::time::Instant, Duration)>;
/// How long a client waits for a message's `sent` before it sends it again, with the same
/// `clientMsgId` (API Gateway may have throttled the frame: it answers with an error frame that
/// names no request); doubled, with jitter, at each resend up to [`RESEND_MAX`], so that clients
/// of a throttled account do not keep its bucket empty with their own resends.
const RESEND_AFTER: Duration = Duration::from_secs(3);
const RESEND_MAX: Duration = Duration::from_secs(30);
/// Messages a client has out awaiting their `sent` at once; the ones typed meanwhile wait in
/// its outbox, in order. A chat client keeps such a window so that, when the account throttles
/// it, its backlog does not go out all at once — and again at every resend — multiplying the
/// load that throttled it. Their latency counts from when they were typed.
const IN_FLIGHT: usize = 4;
/// How often a client catching up asks again for a room whose `getHistory` went unanswered.
const RESYNC: Duration = Duration::from_secs(2);
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
    /// Message entries a client did not hear live and took from `getHistory` instead, having
    /// seen the gap in `seq` (or, at the end, up to the room's head).
    pub filled: AtomicU64,
    /// Clients done with their catch-up at the end of the run.
    pub caught_up: AtomicU64,
    /// When (µs since the run's start) the last message frame was heard.
    pub last_heard_us: AtomicU64,
    /// Acknowledged messages: (room, seq).
    pub acked_seqs: Mutex<Vec<(String, u64)>>,
    /// Each (client, room)'s view, collected when the client ends.
    pub views: Mutex<Vec<RoomView>>,
    /// Set once the fan-out has drained: each client fetches what it is still missing of each
    /// room up to its head, as a client does when it comes back to a room, then counts itself
    /// in `caught_up`.
    pub catch_up: AtomicBool,
    /// Set to end the run: clients stop sending and, once it is set, close.
    pub stop: AtomicBool,
    pub sending: AtomicBool,
    /// Set while a storm is on: the clients that take part drop their connections and
    /// reconnect once it is cleared.
    pub storm: AtomicBool,
    /// The users who dropped in the storm and never came back, with their rooms.
    pub left: Mutex<Vec<(String, Vec<String>)>>,
    /// Told whenever `stop`, `sending`, `storm` or `catch_up` changes.
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
            filled: AtomicU64::new(0),
            caught_up: AtomicU64::new(0),
            last_heard_us: AtomicU64::new(0),
            acked_seqs: Mutex::default(),
            views: Mutex::default(),
            catch_up: AtomicBool::new(false),
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
    /// Every seq it heard live (messages and membership events).
    pub seqs: BTreeSet<u64>,
    /// Seqs of `message` frames heard live.
    pub messages: BTreeSet<u64>,
    /// Seqs it missed live and took from `getHistory` (messages and membership events).
    pub filled: BTreeSet<u64>,
    /// Seqs heard live twice: a fault (a frame it had filled from history and then heard live,
    /// late, is not one — a client drops those by seq).
    pub duplicates: u64,
    pub out_of_order: u64,
    /// The last `presence` it heard of each user in the room (`true`: online).
    pub presence: HashMap<String, bool>,
    last: u64,
    /// After a rejoin with `after`, replayed and live frames may interleave (the contract lets
    /// them): order is not checked then.
    replaying: bool,
    /// A `getHistory` of this room is unanswered.
    fetching: bool,
    /// The head a rejoin's `joined` named: replayed frames come up to it.
    replay_head: u64,
    /// The highest head a `history` answer named.
    known_head: u64,
}

impl RoomView {
    /// Whether it has `seq`, live or from history.
    pub fn has(&self, seq: u64) -> bool {
        self.seqs.contains(&seq) || self.filled.contains(&seq)
    }

    /// The seq up to which it has every one.
    fn contiguous(&self) -> u64 {
        let mut upto = self.joined_head;
        while self.has(upto + 1) {
            upto += 1;
        }
        upto
    }

    /// The `getHistory` that fills what it misses below `seq` (the room's head or a seq it just
    /// heard), if it misses any and is not fetching already.
    fn fetch_below(&mut self, seq: u64) -> Option<Value> {
        let from = self.contiguous();
        if self.fetching || from + 1 >= seq {
            return None;
        }
        self.fetching = true;
        Some(json!({
            "action": "getHistory",
            "room": self.room,
            "after": from,
            "limit": (seq - from - 1).min(HISTORY_PAGE),
        }))
    }
}

/// The most events a client asks `getHistory` for at once (the contract's maximum).
const HISTORY_PAGE: u64 = 500;

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
    // Once the run's catch-up is on: the rooms not caught up yet, and those answered since.
    let mut catching: Option<std::collections::HashSet<String>> = None;
    let mut answered: std::collections::HashSet<String> = Default::default();
    let mut unacked = Unacked::new();
    let mut outbox: std::collections::VecDeque<(String, String)> = Default::default();
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
                    let view = views.entry(room.clone()).or_insert_with(|| RoomView {
                        room: room.clone(),
                        joined_head: head,
                        last: head,
                        ..RoomView::default()
                    });
                    view.replay_head = head;
                    view.fetching = false;
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
                // (A gap seen while joining is filled by the replay or the end's catch-up.)
                let _ = heard(&shared, &mut views, &mut unacked, &frame);
            }
        }
        if let Some(ready) = ready.take() {
            ready(true);
        }
        let mut changed = shared.changed.subscribe();
        let period = Duration::from_secs_f64(1.0 / plan.rate.max(1e-3));
        let mut ticker = tokio::time::interval(period);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // Asks again what went unanswered (API Gateway may throttle a `getHistory`).
        let mut resync = tokio::time::interval(RESYNC);
        resync.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            if shared.stop.load(Relaxed) {
                let _ = sink.send(Message::Close(None)).await;
                break 'connection;
            }
            if shared.catch_up.load(Relaxed) && catching.is_none() {
                catching = Some(plan.rooms.iter().cloned().collect());
                answered.clear();
                for view in views.values_mut() {
                    view.fetching = false;
                }
            }
            if let Some(pending) = &mut catching
                && !pending.is_empty()
            {
                pending.retain(|room| {
                    views.get(room).is_none_or(|v| {
                        !(answered.contains(room) && !v.fetching && v.contiguous() >= v.known_head)
                    })
                });
                if pending.is_empty() {
                    shared.caught_up.fetch_add(1, Relaxed);
                }
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
            // The outbox's next messages, while the window has room.
            while unacked.len() < IN_FLIGHT
                && let Some((id, frame)) = outbox.pop_front()
            {
                let due = tokio::time::Instant::now() + RESEND_AFTER;
                unacked.insert(id, (frame.clone(), due, RESEND_AFTER));
                if sink.send(Message::Text(frame.into())).await.is_err() {
                    continue 'connection;
                }
            }
            let sending = plan.rate > 0.0 && shared.sending.load(Relaxed);
            tokio::select! {
                message = stream.next() => {
                    match message {
                        Some(Ok(Message::Text(text))) => {
                            if let Ok(frame) = serde_json::from_str::<Value>(&text) {
                                if catching.is_some()
                                    && frame["type"] == "history"
                                    && let Some(room) = frame["room"].as_str()
                                {
                                    answered.insert(room.to_owned());
                                }
                                if let Some(fetch) = heard(&shared, &mut views, &mut unacked, &frame)
                                    && sink.send(Message::Text(fetch.to_string().into())).await.is_err()
                                {
                                    continue 'connection;
                                }
                            }
                        }
                        Some(Ok(_)) => {}
                        _ => continue 'connection,
                    }
                }
                _ = changed.changed() => {}
                _ = resync.tick(), if !unacked.is_empty()
                    || catching.as_ref().is_some_and(|p| !p.is_empty()) =>
                {
                    // Messages unacknowledged for a while go again, with their `clientMsgId`.
                    let now = tokio::time::Instant::now();
                    for (frame, due, wait) in unacked.values_mut() {
                        if now < *due {
                            continue;
                        }
                        *wait = (*wait * 2).min(RESEND_MAX);
                        *due = now + wait.mul_f64(rand::random_range(0.5..1.0));
                        *shared.frames.lock().entry("resent".to_owned()).or_default() += 1;
                        if sink.send(Message::Text(frame.clone().into())).await.is_err() {
                            continue 'connection;
                        }
                    }
                    // Each room still to catch up and not being fetched: from what it has.
                    let pending: Vec<String> = catching.iter().flatten().cloned().collect();
                    for room in pending {
                        let Some(view) = views.get_mut(&room) else {
                            continue;
                        };
                        if view.fetching {
                            continue;
                        }
                        view.fetching = true;
                        let fetch = json!({
                            "action": "getHistory",
                            "room": view.room,
                            "after": view.contiguous(),
                            "limit": HISTORY_PAGE,
                        });
                        if sink.send(Message::Text(fetch.to_string().into())).await.is_err() {
                            continue 'connection;
                        }
                    }
                }
                _ = ticker.tick(), if sending => {
                    counter += 1;
                    let stamp = shared.now_us();
                    let text = format!("{stamp} {}", "x".repeat(FILLER));
                    let id = format!("{}-{counter}", plan.user);
                    let frame = json!({
                        "action": "sendMessage",
                        "room": plan.rooms[0],
                        "text": text,
                        "clientMsgId": id,
                    })
                    .to_string();
                    shared.sent.fetch_add(1, Relaxed);
                    // Sent at the top of the loop, when the window has room.
                    outbox.push_back((id, frame));
                }
            }
        }
    }
    if let Some(ready) = ready.take() {
        ready(false);
    }
    shared.views.lock().extend(views.into_values());
}

/// A frame a client heard; returns the `getHistory` to send when it shows a gap.
fn heard(
    shared: &Shared,
    views: &mut HashMap<String, RoomView>,
    unacked: &mut Unacked,
    frame: &Value,
) -> Option<Value> {
    match frame["type"].as_str() {
        Some("sent") => {
            *shared.frames.lock().entry("sent".to_owned()).or_default() += 1;
            // Once per message, however often it was sent (the server dedupes a resend by its
            // `clientMsgId` and answers it again).
            let first = frame["clientMsgId"]
                .as_str()
                .is_some_and(|id| unacked.remove(id).is_some());
            if first {
                shared.acked.fetch_add(1, Relaxed);
                if let (Some(room), Some(seq)) = (frame["room"].as_str(), frame["seq"].as_u64()) {
                    shared.acked_seqs.lock().push((room.to_owned(), seq));
                }
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
                return None;
            };
            if let Some(view) = views.get_mut(room) {
                view.presence.insert(user.to_owned(), online);
            }
        }
        Some(kind @ ("message" | "member")) => {
            let (Some(room), Some(seq)) = (frame["room"].as_str(), frame["seq"].as_u64()) else {
                return None;
            };
            *shared.frames.lock().entry(kind.to_owned()).or_default() += 1;
            let view = views.get_mut(room)?;
            if seq <= view.joined_head {
                return None;
            }
            if view.filled.contains(&seq) {
                // Filled from history already, and heard live late: dropped by seq.
                *shared.frames.lock().entry("late".to_owned()).or_default() += 1;
                return None;
            }
            if !view.seqs.insert(seq) {
                view.duplicates += 1;
                return None;
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
            if view.replaying {
                // A rejoin's replay and live frames interleave until it has caught up.
                view.replaying = view.contiguous() < view.replay_head;
                return None;
            }
            // A gap below a frame heard live: what a client fills from history.
            return view.fetch_below(seq);
        }
        Some("history") => {
            *shared
                .frames
                .lock()
                .entry("history".to_owned())
                .or_default() += 1;
            let view = views.get_mut(frame["room"].as_str()?)?;
            view.fetching = false;
            for event in frame["events"].as_array().into_iter().flatten() {
                let Some(seq) = event["seq"].as_u64() else {
                    continue;
                };
                if seq <= view.joined_head || view.has(seq) {
                    continue;
                }
                view.filled.insert(seq);
                if event["type"] == "message" {
                    shared.filled.fetch_add(1, Relaxed);
                }
            }
            let head = frame["head"].as_u64().unwrap_or(0);
            view.known_head = view.known_head.max(head);
            if view.replaying {
                view.replaying = view.contiguous() < view.replay_head;
            }
            return view.fetch_below(head + 1);
        }
        Some("error") => {
            shared.error_frames.fetch_add(1, Relaxed);
            let code = frame["code"].as_str().unwrap_or("?");
            *shared
                .frames
                .lock()
                .entry(format!("error:{code}"))
                .or_default() += 1;
            // Whatever it answered, a history fetch may have been the one refused.
            views.values_mut().for_each(|v| v.fetching = false);
        }
        None if frame.get("message").is_some() => {
            shared.error_frames.fetch_add(1, Relaxed);
            let message = frame["message"].as_str().unwrap_or("?");
            *shared
                .frames
                .lock()
                .entry(format!("apigw:{message}"))
                .or_default() += 1;
            views.values_mut().for_each(|v| v.fetching = false);
        }
        Some(other) => {
            *shared.frames.lock().entry(other.to_owned()).or_default() += 1;
        }
        None => {}
    }
    None
}
