//! Property tests on everything a client controls: the frames it sends (route selection and
//! request parsing), the names in them, the token it connects with — and those frames through a
//! running server. Inputs are generated both at random and near the valid ones (the right keys
//! with wrong types, names one character off, sizes at the limits), and the invariants are the
//! contract's: never a panic, always an answer with a contract error code, the connection stays
//! open, and nothing is logged for a refused frame.
//!
//! The case counts are fixed (not `PROPTEST_CASES`) so that the test command's run time is too;
//! a failure prints the smallest input proptest shrank it to.

use crate::common;

use common::Server;
use palaver::domain::requests::{ROUTES, default_route_rejection, parse, select_route};
use palaver::domain::{RoomName, UserId};
use palaver::identity::Identity;
use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};
use serde_json::{Map, Value, json};
use std::time::Duration;
use tokio::sync::Mutex;

/// Every code an `error` frame may carry (CONTRACT §4).
const CODES: [&str; 9] = [
    "bad_request",
    "unknown_action",
    "invalid_room",
    "not_member",
    "too_large",
    "rate_limited",
    "internal",
    "gone",
    "limit",
];

/// What a frame may answer (CONTRACT §2).
const ANSWERS: [&str; 6] = ["joined", "left", "sent", "history", "pong", "error"];

/// Any JSON value, nested a little.
fn any_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>().prop_map(|f| json!(f)),
        ".{0,20}".prop_map(Value::String),
    ];
    leaf.prop_recursive(3, 24, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            prop::collection::btree_map(".{0,8}", inner, 0..4)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// A field's value: absent (`None`), or one of `good` values, or something of the wrong kind.
fn field(good: BoxedStrategy<Value>) -> impl Strategy<Value = Option<Value>> {
    prop_oneof![
        2 => Just(None),
        5 => good.prop_map(Some),
        2 => any_json().prop_map(Some),
    ]
}

fn room_value() -> BoxedStrategy<Value> {
    prop_oneof![
        3 => prop::sample::select(vec!["p1", "p2"]).prop_map(Value::from),
        2 => "[A-Za-z0-9_.-]{1,64}".prop_map(Value::from),
        1 => "[A-Za-z0-9_.-]{65,70}".prop_map(Value::from),
        1 => ".{0,20}".prop_map(Value::from),
    ]
    .boxed()
}

fn text_value() -> BoxedStrategy<Value> {
    prop_oneof![
        4 => ".{1,40}".prop_map(Value::from),
        1 => " {0,3}".prop_map(Value::from),
        // At the limit of 16 KiB of text, either side (frames stay under 32 KiB).
        1 => (16_380usize..16_390).prop_map(|n| Value::from("x".repeat(n))),
        // Over the frame limit (32 KiB).
        1 => Just(Value::from("y".repeat(33 * 1024))),
    ]
    .boxed()
}

fn seq_value() -> BoxedStrategy<Value> {
    prop_oneof![
        any::<u64>().prop_map(Value::from),
        (0u64..5).prop_map(Value::from),
        (i64::MIN..0).prop_map(Value::from),
        any::<f64>().prop_map(|f| json!(f)),
        "[0-9]{1,25}".prop_map(Value::from),
        Just(json!(1e30)),
    ]
    .boxed()
}

fn action_value() -> BoxedStrategy<Value> {
    prop_oneof![
        6 => prop::sample::select(ROUTES.to_vec()).prop_map(Value::from),
        1 => prop::sample::select(vec!["JoinRoom", "joinroom", "join", "$default", "$connect", ""])
            .prop_map(Value::from),
        1 => ".{0,12}".prop_map(Value::from),
        1 => any_json(),
    ]
    .boxed()
}

/// A frame near the valid ones: an object with the contract's keys, each present or not, of the
/// right kind or not, plus stray keys; then sometimes cut short or given a second `action`.
fn near_valid_frame() -> impl Strategy<Value = String> {
    let fields = (
        field(action_value()),
        field(room_value()),
        field(text_value()),
        field(seq_value()),
        field(seq_value()),
        field(".{0,140}".prop_map(Value::from).boxed()),
        prop::collection::vec((".{0,6}", any_json()), 0..2),
    );
    let object = fields.prop_map(|(action, room, text, after, limit, id, extra)| {
        let mut frame = Map::new();
        for (key, value) in extra {
            frame.insert(key, value);
        }
        let named = [
            ("action", action),
            ("room", room),
            ("text", text),
            ("after", after),
            ("limit", limit),
            ("clientMsgId", id),
        ];
        for (key, value) in named {
            if let Some(value) = value {
                frame.insert(key.to_owned(), value);
            }
        }
        Value::Object(frame).to_string()
    });
    (
        object,
        0u8..10,
        any::<prop::sample::Index>(),
        action_value(),
    )
        .prop_map(|(text, twist, at, second)| match twist {
            // Cut short somewhere (at a character boundary: frames are text).
            0 => {
                let cuts: Vec<usize> = text.char_indices().map(|(i, _)| i).collect();
                text[..cuts[at.index(cuts.len())]].to_owned()
            }
            // A second `action` ahead of the first.
            1 => format!("{{\"action\":{second},{}", &text[1..]),
            // An escaped route name.
            2 => text.replacen(
                "\"action\":\"joinRoom\"",
                "\"action\":\"join\\u0052oom\"",
                1,
            ),
            _ => text,
        })
}

/// Anything at all, or a near-valid frame.
fn any_frame() -> impl Strategy<Value = String> {
    prop_oneof![
        1 => ".{0,64}",
        1 => any_json().prop_map(|v| v.to_string()),
        4 => near_valid_frame(),
    ]
}

/// What the gateway does with a frame's text, in-process: select its route, then either parse
/// it or say why `$default` got it.
fn outcome(frame: &str) -> Result<(&'static str, Option<String>), TestCaseError> {
    let route = select_route(frame);
    prop_assert!(route == "$default" || ROUTES.contains(&route), "{route}");
    let rejection = if route == "$default" {
        Some(default_route_rejection(frame))
    } else {
        parse(route, frame).err()
    };
    let code = rejection.map(|r| {
        let frame = serde_json::to_value(r.frame(None)).expect("an error frame is JSON");
        frame["code"].as_str().unwrap_or("").to_owned()
    });
    Ok((route, code))
}

proptest! {
    #![proptest_config(Config::with_cases(2_000))]

    /// Any text at all: a route, and if refused, a contract code.
    #[test]
    fn every_frame_gets_a_route_and_a_contract_answer(frame in any_frame()) {
        let (_, code) = outcome(&frame)?;
        if let Some(code) = code {
            prop_assert!(CODES.contains(&code.as_str()), "{code} for {frame}");
        }
    }

    /// The route is the `action` a JSON parser reads, and a frame sent to a route is parsed as
    /// that route: escapes are decoded once, and a second `action` never routes.
    #[test]
    fn routes_follow_the_parsed_action(frame in near_valid_frame()) {
        let route = select_route(&frame);
        if route != "$default" {
            let parsed: Value = serde_json::from_str(&frame).expect("routed frames are JSON");
            prop_assert_eq!(parsed["action"].as_str(), Some(route));
        }
    }

    /// Room names and user ids: taken exactly when they are 1 to 64 of `[A-Za-z0-9_.-]`, and
    /// kept as given.
    #[test]
    fn names_are_taken_exactly_when_valid(name in prop_oneof![".{0,70}", "[A-Za-z0-9_.-]{0,70}"]) {
        let valid = (1..=64).contains(&name.len())
            && name.bytes().all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b));
        match RoomName::parse(&name) {
            Ok(room) => prop_assert!(valid && room.as_str() == name),
            Err(_) => prop_assert!(!valid),
        }
        prop_assert_eq!(UserId::parse(&name).is_ok(), valid);
    }

    /// Tokens: garbage is refused, never a panic; a token this server issued names its user;
    /// one changed character anywhere makes it refused.
    #[test]
    fn tokens_are_verified_exactly(
        garbage in prop_oneof![".{0,200}", "[A-Za-z0-9_-]{1,40}\\.[A-Za-z0-9_-]{1,80}\\.[A-Za-z0-9_-]{0,60}"],
        user in "[A-Za-z0-9_.-]{1,64}",
        at in any::<prop::sample::Index>(),
        with in "[A-Za-z0-9_-]",
    ) {
        let identity = Identity::new(common::SECRET.as_bytes());
        prop_assert!(identity.verify(Some(&garbage)).is_err());
        let token = identity.issue(&UserId::parse(&user).unwrap(), Duration::from_secs(60));
        let verified = identity.verify(Some(&token));
        prop_assert_eq!(verified.map(|u| u.as_str().to_owned()).ok(), Some(user));
        let i = at.index(token.len());
        let mut changed = token.clone();
        changed.replace_range(i..=i, &with);
        if changed != token && token.as_bytes()[i] != b'.' {
            // base64url's last character can carry unused bits: flipping only those leaves the
            // decoded bytes, and so the token, the same.
            let same_bytes = i + 1 == token.len() || token.as_bytes()[i + 1] == b'.';
            if !same_bytes {
                prop_assert!(identity.verify(Some(&changed)).is_err(), "{changed}");
            }
        }
    }
}

/// The same frames through a running server, one connection for every case: each frame gets
/// exactly one answer (an `error` with a contract code when refused), the connection answers a
/// `ping` right after (it is still open), and a refused frame changes no room's log.
#[test]
fn frames_through_a_running_server_keep_the_contract() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let server = Server::start_with(&[("PALAVER_RATE_LIMIT", "0")]);
    let (client, watcher) = runtime.block_on(async {
        let mut client = server.connect("fuzz").await;
        client.join("p1").await;
        let mut watcher = server.connect("watcher").await;
        watcher.join("p1").await;
        watcher.join("p2").await;
        (client, watcher)
    });
    let (client, watcher) = (Mutex::new(client), Mutex::new(watcher));
    let mut runner = TestRunner::new(Config::with_cases(48));
    let result = runner.run(&any_frame(), |frame| {
        runtime.block_on(async {
            let (mut client, mut watcher) = (client.lock().await, watcher.lock().await);
            let heads = heads(&mut watcher).await;
            client.send_text(&frame).await;
            let answer = reply(&mut client).await;
            let kind = answer["type"].as_str().unwrap_or("");
            prop_assert!(ANSWERS.contains(&kind), "{answer} for {frame}");
            client.send(json!({"action": "ping"})).await;
            prop_assert_eq!(&reply(&mut client).await["type"], "pong", "after {}", frame);
            if kind == "error" {
                let code = answer["code"].as_str().unwrap_or("");
                prop_assert!(CODES.contains(&code), "{answer} for {frame}");
                prop_assert_eq!(heads, self::heads(&mut watcher).await, "{} logged", frame);
            }
            Ok(())
        })
    });
    if let Err(failure) = result {
        panic!("{failure}");
    }
}

/// The next answer to a frame (`pong` included), past what the rooms push meanwhile.
async fn reply(client: &mut common::Client) -> Value {
    loop {
        let frame = client.recv().await;
        if ANSWERS.contains(&frame["type"].as_str().unwrap_or("")) {
            return frame;
        }
    }
}

/// The heads of the rooms the generated frames mostly aim at, as a member reads them.
async fn heads(watcher: &mut common::Client) -> [u64; 2] {
    let mut heads = [0; 2];
    for (head, room) in heads.iter_mut().zip(["p1", "p2"]) {
        let answer = watcher
            .request(
                json!({"action": "getHistory", "room": room, "after": u64::MAX >> 12, "limit": 1}),
            )
            .await;
        *head = answer["head"].as_u64().expect("history has a head");
    }
    heads
}

/// One frame of a flood: any kind a client can send.
#[derive(Clone, Debug)]
enum Flood {
    /// A text frame: a valid `ping` action, or text that is not a request.
    Text(String),
    Binary(Vec<u8>),
    Ping(Vec<u8>),
    Pong(Vec<u8>),
}

fn flood_frame() -> impl Strategy<Value = Flood> {
    prop_oneof![
        Just(Flood::Text(json!({"action": "ping"}).to_string())),
        ".{0,40}".prop_map(Flood::Text),
        prop::collection::vec(any::<u8>(), 0..64).prop_map(Flood::Binary),
        prop::collection::vec(any::<u8>(), 0..64).prop_map(Flood::Ping),
        prop::collection::vec(any::<u8>(), 0..64).prop_map(Flood::Pong),
    ]
}

/// Any mix of frames sent at once, at the default rate limit (30 a second, bursts of 60), on a
/// fresh connection: every text or binary frame gets exactly one answer, in order; a ping gets
/// a pong or nothing; and no more frames are answered than the bucket held — whatever their
/// kind, pings and binary frames included. The connection stays open (fewer than the 300
/// refusals that close a flooder).
#[test]
fn every_kind_of_frame_counts_against_the_rate_limit() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let server = Server::start();
    let url = format!("ws://{}/?token={}", server.addr, server.token("flood"));
    let mut runner = TestRunner::new(Config::with_cases(12));
    let frames = prop::collection::vec(flood_frame(), 1..150);
    let result = runner.run(&frames, |mut frames| {
        use futures_util::{SinkExt, StreamExt};
        use tokio_tungstenite::tungstenite::Message;
        // The last is a request, so that every pong is in before its answer.
        frames.push(Flood::Text(json!({"action": "ping"}).to_string()));
        runtime.block_on(async {
            let (mut ws, _) = tokio_tungstenite::connect_async(&url).await.unwrap();
            let (mut asked, mut pinged) = (0, 0);
            let started = std::time::Instant::now();
            for frame in &frames {
                let message = match frame.clone() {
                    Flood::Text(text) => {
                        asked += 1;
                        Message::text(text)
                    }
                    Flood::Binary(bytes) => {
                        asked += 1;
                        Message::Binary(bytes.into())
                    }
                    Flood::Ping(bytes) => {
                        pinged += 1;
                        Message::Ping(bytes.into())
                    }
                    Flood::Pong(bytes) => Message::Pong(bytes.into()),
                };
                ws.feed(message).await.unwrap();
            }
            ws.flush().await.unwrap();
            let (mut answers, mut served, mut pongs) = (0, 0, 0);
            while answers < asked {
                match tokio::time::timeout(common::WAIT, ws.next()).await {
                    Ok(Some(Ok(Message::Text(text)))) => {
                        answers += 1;
                        let answer: Value = serde_json::from_str(text.as_str()).unwrap();
                        if answer["code"] != "rate_limited" {
                            served += 1;
                        }
                    }
                    Ok(Some(Ok(Message::Pong(_)))) => pongs += 1,
                    other => prop_assert!(false, "{answers} of {asked} answered, then {other:?}"),
                }
            }
            let refilled = (30.0 * started.elapsed().as_secs_f64()).ceil() as usize;
            prop_assert!(pongs <= pinged);
            prop_assert!(
                served + pongs <= 60 + refilled,
                "{served} answered and {pongs} pongs for {} frames in {:?}",
                frames.len(),
                started.elapsed()
            );
            let _ = ws.close(None).await;
            Ok(())
        })
    });
    if let Err(failure) = result {
        panic!("{failure}");
    }
}
