//! A chaos run's client: a real WebSocket connection, behaving as the protocol's client guide
//! asks of a client that must not lose anything. It connects to any node, joins its rooms (with
//! `after` once it has seen some), pages with `getHistory` whenever it sees a gap or `joined`
//! names a head it has not reached, and resends every unacknowledged message with the same
//! `clientMsgId` after a reconnect or when no answer came. It records what it heard, what was
//! acknowledged, and any seq heard twice on one connection.

use futures_util::{SinkExt, StreamExt};
use palaver::domain::UserId;
use palaver::identity::Identity;
use parking_lot::Mutex;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{Value, json};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::time::Duration;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;

/// An unanswered `sendMessage` goes again after this on the same connection, then after twice
/// as long each time (with jitter) up to [`RESEND_MAX`]. A live connection answers every frame
/// (`sent`, or an `error` that names no message), so this only covers an answer that is very
/// late; a slow store must not be buried under its clients' resends. After a reconnect
/// everything unanswered goes again at once: a lost connection loses its answers.
const RESEND_AFTER: Duration = Duration::from_secs(10);
const RESEND_MAX: Duration = Duration::from_secs(60);
/// Messages a client has out awaiting their `sent` at once; the ones typed meanwhile wait in its
/// outbox, in order. Without the window a client whose messages go unanswered for a while (a
/// node killed, a slow store) sends its whole backlog again on every reconnect and resend,
/// and a run's clients bury the store they are waiting for.
const IN_FLIGHT: usize = 8;
/// The most events asked of one `getHistory` (the protocol's maximum).
const PAGE: u64 = 500;

/// What every client of a run shares.
pub struct Shared {
    pub urls: Vec<String>,
    pub identity: Identity,
    /// Cleared to stop sending new messages.
    pub sending: AtomicBool,
    /// Set once the chaos is over: each client gets every message acknowledged, then counts
    /// itself in `drained`.
    pub finish: AtomicBool,
    pub drained: AtomicU64,
    /// Set once every client has drained (no room's head moves any more): each completes its
    /// view of each room up to the head, and closes.
    pub complete: AtomicBool,
    pub acked: AtomicU64,
    pub sent: AtomicU64,
    pub resent: AtomicU64,
    pub reconnects: AtomicU64,
    pub errors: Mutex<BTreeMap<String, u64>>,
    pub results: Mutex<Vec<Outcome>>,
}

impl Shared {
    pub fn new(urls: Vec<String>, identity: Identity) -> Arc<Shared> {
        Arc::new(Shared {
            urls,
            identity,
            sending: AtomicBool::new(true),
            finish: AtomicBool::new(false),
            drained: AtomicU64::new(0),
            complete: AtomicBool::new(false),
            acked: AtomicU64::new(0),
            sent: AtomicU64::new(0),
            resent: AtomicU64::new(0),
            reconnects: AtomicU64::new(0),
            errors: Mutex::default(),
            results: Mutex::default(),
        })
    }

    fn error(&self, what: String) {
        *self.errors.lock().entry(what).or_default() += 1;
    }
}

/// One client's part.
pub struct Plan {
    pub user: String,
    pub rooms: Vec<String>,
    /// Messages per second.
    pub rate: f64,
    pub seed: u64,
}

/// A message the server acknowledged.
#[derive(Clone, Debug)]
pub struct Acked {
    pub user: String,
    pub room: String,
    pub seq: u64,
    pub id: String,
    pub client_msg_id: String,
}

/// What a client ended with in one room: every event from just after the head its first
/// `joined` named, by seq, with its id.
#[derive(Clone, Debug, Default)]
pub struct View {
    pub start: Option<u64>,
    pub events: BTreeMap<u64, String>,
    /// Where [`View::contiguous`] got to last (events are only ever added).
    upto: u64,
}

impl View {
    /// The seq up to which it has every event.
    fn contiguous(&mut self) -> u64 {
        let Some(start) = self.start else {
            return 0;
        };
        self.upto = self.upto.max(start);
        while self.events.contains_key(&(self.upto + 1)) {
            self.upto += 1;
        }
        self.upto
    }
}

/// A client's record of the run.
#[derive(Debug, Default)]
pub struct Outcome {
    pub user: String,
    pub acked: Vec<Acked>,
    pub views: HashMap<String, View>,
    /// (room, seq, connection number) heard twice on one connection.
    pub duplicates: Vec<(String, u64, u64)>,
    /// It could not finish (its messages acknowledged, its views complete) in time.
    pub unfinished: bool,
}

struct Unacked {
    room: String,
    frame: String,
    /// When it goes again, unless answered.
    due: Instant,
    /// The wait before the next resend after that.
    wait: Duration,
}

/// Runs one client until it has finished (see [`Shared::finish`]) or `deadline`.
pub async fn run(shared: Arc<Shared>, plan: Plan, deadline: Instant) {
    let mut rng = StdRng::seed_from_u64(plan.seed);
    let user = UserId::parse(&plan.user).expect("a valid user name");
    let mut outcome = Outcome {
        user: plan.user.clone(),
        ..Outcome::default()
    };
    let mut unacked: BTreeMap<String, Unacked> = BTreeMap::new();
    // Typed and not sent yet: (clientMsgId, room, frame).
    let mut outbox: std::collections::VecDeque<(String, String, String)> = Default::default();
    let mut counter = 0u64;
    let mut connection = 0u64;
    let mut pause = Duration::from_millis(50);
    let period = Duration::from_secs_f64(1.0 / plan.rate.max(1e-3));
    let mut finished = false;
    let mut drained = false;
    while !finished && Instant::now() < deadline {
        let url = &shared.urls[rng.random_range(0..shared.urls.len())];
        let token = shared.identity.issue(&user, Duration::from_secs(24 * 3600));
        let ws = match tokio_tungstenite::connect_async(format!("{url}?token={token}")).await {
            Ok((ws, _)) => ws,
            Err(_) => {
                // Down, or refusing: back off with jitter and try any node.
                tokio::time::sleep(pause.mul_f64(rng.random_range(0.5..1.5))).await;
                pause = (pause * 2).min(Duration::from_secs(2));
                continue;
            }
        };
        pause = Duration::from_millis(50);
        connection += 1;
        if connection > 1 {
            shared.reconnects.fetch_add(1, Relaxed);
        }
        let (mut sink, mut stream) = ws.split();
        let mut seen: HashSet<(String, u64)> = HashSet::new();
        let mut fetching: HashSet<String> = HashSet::new();
        let mut joined: HashSet<String> = HashSet::new();
        // Rooms still to complete once finishing, and those answered since.
        let mut finishing: Option<HashSet<String>> = None;
        let mut out: Vec<String> = Vec::new();
        for room in &plan.rooms {
            out.push(join(room, outcome.views.entry(room.clone()).or_default()));
        }
        let mut ticker = tokio::time::interval(period);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut resync = tokio::time::interval(Duration::from_millis(500));
        'connection: loop {
            // The outbox's next messages, while the window has room.
            while unacked.len() < IN_FLIGHT
                && let Some((cmid, room, frame)) = outbox.pop_front()
            {
                out.push(frame.clone());
                let (due, wait) = (Instant::now() + RESEND_AFTER, RESEND_AFTER);
                unacked.insert(
                    cmid,
                    Unacked {
                        room,
                        frame,
                        due,
                        wait,
                    },
                );
            }
            for frame in out.drain(..) {
                if sink.send(Message::Text(frame.into())).await.is_err() {
                    break 'connection;
                }
            }
            if finishing.as_ref().is_some_and(HashSet::is_empty) {
                let _ = sink.send(Message::Close(None)).await;
                finished = true;
                break;
            }
            if Instant::now() >= deadline {
                break;
            }
            let all_joined = joined.len() == plan.rooms.len();
            let sending = all_joined && shared.sending.load(Relaxed);
            tokio::select! {
                message = stream.next() => {
                    let text = match message {
                        Some(Ok(Message::Text(text))) => text,
                        Some(Ok(Message::Close(_))) | None | Some(Err(_)) => break 'connection,
                        Some(Ok(_)) => continue,
                    };
                    let Ok(frame) = serde_json::from_str::<Value>(&text) else {
                        shared.error("not JSON".to_owned());
                        continue;
                    };
                    let room = frame["room"].as_str().unwrap_or("").to_owned();
                    match frame["type"].as_str() {
                        Some("joined") => {
                            let head = frame["head"].as_u64().unwrap_or(0);
                            let view = outcome.views.entry(room.clone()).or_default();
                            if view.start.is_none() {
                                view.start = Some(head);
                                // Live frames that came before `joined` and are not after it.
                                view.events.retain(|seq, _| *seq > head);
                            }
                            joined.insert(room.clone());
                            if view.contiguous() < head && fetching.insert(room.clone()) {
                                out.push(history(&room, view.contiguous()));
                            }
                        }
                        Some(kind @ ("message" | "member")) => {
                            let (Some(seq), Some(id)) = (frame["seq"].as_u64(), frame["id"].as_str()) else {
                                shared.error(format!("{kind} without seq or id"));
                                continue;
                            };
                            if !seen.insert((room.clone(), seq)) {
                                outcome.duplicates.push((room.clone(), seq, connection));
                            }
                            let view = outcome.views.entry(room.clone()).or_default();
                            if view.start.is_none_or(|start| seq > start) {
                                view.events.insert(seq, id.to_owned());
                            }
                            if view.start.is_some()
                                && view.contiguous() + 1 < seq
                                && fetching.insert(room.clone())
                            {
                                out.push(history(&room, view.contiguous()));
                            }
                        }
                        Some("history") => {
                            let view = outcome.views.entry(room.clone()).or_default();
                            let start = view.start.unwrap_or(0);
                            for event in frame["events"].as_array().into_iter().flatten() {
                                if let (Some(seq), Some(id)) = (event["seq"].as_u64(), event["id"].as_str())
                                    && seq > start
                                {
                                    view.events.insert(seq, id.to_owned());
                                }
                            }
                            fetching.remove(&room);
                            let head = frame["head"].as_u64().unwrap_or(0);
                            if view.contiguous() < head {
                                fetching.insert(room.clone());
                                out.push(history(&room, view.contiguous()));
                            } else if let Some(pending) = &mut finishing {
                                pending.remove(&room);
                            }
                        }
                        Some("sent") => {
                            let cmid = frame["clientMsgId"].as_str().unwrap_or("");
                            if let Some(sent) = unacked.remove(cmid) {
                                shared.acked.fetch_add(1, Relaxed);
                                outcome.acked.push(Acked {
                                    user: plan.user.clone(),
                                    room: sent.room,
                                    seq: frame["seq"].as_u64().unwrap_or(0),
                                    id: frame["id"].as_str().unwrap_or("").to_owned(),
                                    client_msg_id: cmid.to_owned(),
                                });
                            }
                        }
                        Some("error") => {
                            shared.error(format!(
                                "error {} on {}",
                                frame["code"].as_str().unwrap_or("?"),
                                frame["action"].as_str().unwrap_or("?")
                            ));
                            // A refused getHistory is asked again at the next resync; a refused
                            // join (a node starting, the store slow) is sent again.
                            if frame["action"] == "getHistory" {
                                fetching.clear();
                            }
                            if frame["action"] == "joinRoom" {
                                for room in plan.rooms.iter().filter(|r| !joined.contains(*r)) {
                                    out.push(join(room, outcome.views.entry(room.clone()).or_default()));
                                }
                            }
                        }
                        _ => {}
                    }
                }
                _ = ticker.tick(), if sending => {
                    counter += 1;
                    let room = plan.rooms[rng.random_range(0..plan.rooms.len())].clone();
                    let cmid = format!("{}-{counter}", plan.user);
                    let frame = json!({
                        "action": "sendMessage",
                        "room": room,
                        "text": format!("{} says {counter}", plan.user),
                        "clientMsgId": cmid,
                    })
                    .to_string();
                    shared.sent.fetch_add(1, Relaxed);
                    // Sent at the top of the loop, when the window has room.
                    outbox.push_back((cmid, room, frame));
                }
                _ = resync.tick() => {
                    let now = Instant::now();
                    // Unanswered messages go again, with their ids, whenever an answer is
                    // overdue (at once on a new connection).
                    for sent in unacked.values_mut() {
                        if now >= sent.due {
                            sent.wait = (sent.wait * 2).min(RESEND_MAX);
                            sent.due = now + sent.wait.mul_f64(rng.random_range(0.5..1.0));
                            shared.resent.fetch_add(1, Relaxed);
                            out.push(sent.frame.clone());
                        }
                    }
                    if shared.finish.load(Relaxed)
                        && unacked.is_empty()
                        && outbox.is_empty()
                        && !drained
                    {
                        drained = true;
                        shared.drained.fetch_add(1, Relaxed);
                    }
                    if shared.complete.load(Relaxed) && all_joined {
                        let pending = finishing.get_or_insert_with(|| plan.rooms.iter().cloned().collect());
                        for room in pending.iter() {
                            if fetching.insert(room.clone()) {
                                let after = outcome.views.get_mut(room).map_or(0, View::contiguous);
                                out.push(history(room, after));
                            }
                        }
                    }
                }
            }
        }
        // Whatever was sent on this connection and not answered goes again on the next, at
        // once: a lost connection loses its answers.
        for sent in unacked.values_mut() {
            sent.due = Instant::now();
            sent.wait = RESEND_AFTER;
        }
    }
    outcome.unfinished = !finished;
    shared.results.lock().push(outcome);
}

/// `joinRoom` for `room`: with `after` once the client has seen the room, so that what it missed
/// is replayed.
fn join(room: &str, view: &mut View) -> String {
    let mut frame = json!({"action": "joinRoom", "room": room});
    if view.start.is_some() {
        frame["after"] = json!(view.contiguous());
    }
    frame.to_string()
}

fn history(room: &str, after: u64) -> String {
    json!({"action": "getHistory", "room": room, "after": after, "limit": PAGE}).to_string()
}
