//! The wire protocol end to end: real WebSocket clients against a real `palaver serve`.

use crate::common;

use common::{Client, Server};
use serde_json::{Value, json};
use std::time::Duration;

fn seqs(frames: &[Value]) -> Vec<u64> {
    frames.iter().map(|f| f["seq"].as_u64().unwrap()).collect()
}

#[tokio::test]
async fn two_users_chat_in_two_rooms_and_rooms_stay_apart() {
    let server = Server::start();
    let mut ana = server.connect("ana").await;
    let mut bo = server.connect("bo").await;

    let joined = ana.join("general").await;
    assert_eq!(joined["head"], 1, "ana's join is the room's first event");
    let member = ana.pushed_of("member").await;
    assert_eq!(
        (member["user"].as_str(), member["change"].as_str()),
        (Some("ana"), Some("joined"))
    );

    bo.join("general").await;
    let bo_joined = ana.pushed_of("member").await;
    assert_eq!(bo_joined["user"], "bo");
    assert_eq!(bo_joined["seq"], 2);
    ana.join("random").await;

    let sent = ana.say("general", "hello bo").await;
    assert_eq!(sent["seq"], 3);
    assert_eq!(sent["room"], "general");
    assert_eq!(sent["id"].as_str().unwrap().len(), 26, "ids are ULIDs");

    // Both members get the message, the sender included.
    for client in [&mut ana, &mut bo] {
        let message = client.pushed_of("message").await;
        assert_eq!(message["room"], "general");
        assert_eq!(message["seq"], 3);
        assert_eq!(message["user"], "ana");
        assert_eq!(message["text"], "hello bo");
        assert_eq!(message["id"], sent["id"]);
        assert!(
            chrono::DateTime::parse_from_rfc3339(message["at"].as_str().unwrap()).is_ok(),
            "at is RFC 3339: {message}"
        );
    }

    // A message in a room bo is not in never reaches bo: the next message he gets is the marker
    // ana sends after it, in a room they share (the fan-out delivers in log order).
    ana.say("random", "only for random").await;
    let ana_sees = ana.pushed_of("message").await;
    assert_eq!(ana_sees["room"], "random");
    ana.say("general", "marker").await;
    let bo_sees = bo.pushed_of("message").await;
    assert_eq!(
        (bo_sees["room"].as_str(), bo_sees["text"].as_str()),
        (Some("general"), Some("marker")),
        "bo got a frame of a room he is not in: {bo_sees}"
    );

    // Nobody reads or writes a room they have not joined.
    let refused = bo
        .request(json!({"action": "sendMessage", "room": "random", "text": "let me in"}))
        .await;
    assert_eq!(refused["code"], "not_member");
    let refused = bo
        .request(json!({"action": "getHistory", "room": "random"}))
        .await;
    assert_eq!(refused["code"], "not_member");
}

#[tokio::test]
async fn presence_follows_first_and_last_connection_and_leaving_stops_messages() {
    let server = Server::start();
    let mut ana = server.connect("ana").await;
    ana.join("team").await;

    let mut bo = server.connect("bo").await;
    bo.join("team").await;
    ana.pushed_of("member").await; // her own join
    ana.pushed_of("member").await; // bo's join

    // bo opens a second connection: not his first, so no presence frame; then both close.
    let bo_phone = server.connect("bo").await;
    bo_phone.close().await;
    // The phone's disconnect is in the log before ana's marker, so anything it caused arrives
    // before the marker does.
    ana.say("team", "marker").await;
    let frames = ana
        .pushed_until(|f| f["type"] == "message" && f["text"] == "marker")
        .await;
    assert!(
        frames
            .iter()
            .all(|f| f["type"] != "presence" || f["online"] == true),
        "closing one of two connections does not make bo offline: {frames:?}"
    );
    bo.close().await;
    let offline = ana.pushed_of("presence").await;
    assert_eq!(
        offline,
        json!({"type": "presence", "room": "team", "user": "bo", "online": false})
    );

    // bo comes back: his first connection makes him online.
    let mut bo = server.connect("bo").await;
    let online = ana.pushed_of("presence").await;
    assert_eq!(
        online,
        json!({"type": "presence", "room": "team", "user": "bo", "online": true})
    );

    // Membership survived the disconnect: bo still gets team's messages without joining again.
    ana.say("team", "welcome back").await;
    assert_eq!(bo.pushed_of("message").await["text"], "welcome back");

    // After leaving, no more messages.
    let left = bo
        .request(json!({"action": "leaveRoom", "room": "team"}))
        .await;
    assert_eq!(left, json!({"type": "left", "room": "team"}));
    let member = ana.pushed_of("member").await;
    assert_eq!(
        (member["user"].as_str(), member["change"].as_str()),
        (Some("bo"), Some("left"))
    );
    ana.say("team", "bo is gone").await;
    // bo's own join of another room comes after that message in the log: the marker.
    bo.join("elsewhere").await;
    let frames = bo
        .pushed_until(|f| f["type"] == "member" && f["room"] == "elsewhere")
        .await;
    assert!(frames.iter().all(|f| f["type"] != "message"), "{frames:?}");
}

#[tokio::test]
async fn a_reconnecting_client_replays_exactly_what_it_missed() {
    let server = Server::start();
    let mut ana = server.connect("ana").await;
    let mut bo = server.connect("bo").await;
    // bo's tablet stays online and sees everything live.
    let mut tablet = server.connect("bo").await;
    ana.join("r").await;
    bo.join("r").await;
    ana.say("r", "one").await;
    let last_seen = bo.pushed_of("message").await["seq"].as_u64().unwrap();
    bo.close().await;

    for text in ["two", "three", "four"] {
        ana.say("r", text).await;
    }
    ana.request(json!({"action": "leaveRoom", "room": "r"}))
        .await;
    // Delivery follows the log and may lag behind it (DynamoDB's stream is polled): wait until
    // the tablet has seen ana leave, so what bo's new connection gets is the replay alone.
    loop {
        let frame = tablet.pushed_of("member").await;
        if frame["user"] == "ana" && frame["change"] == "left" {
            break;
        }
    }

    let mut bo = server.connect("bo").await;
    let (replay, joined) = bo.rejoin_after("r", last_seen).await;
    let texts: Vec<&str> = replay
        .iter()
        .map(|f| f["text"].as_str().unwrap_or("(left)"))
        .collect();
    assert_eq!(texts, ["two", "three", "four", "(left)"]);
    assert_eq!(seqs(&replay), [4, 5, 6, 7]);
    assert_eq!(replay[3]["change"], "left");
    assert_eq!(joined["head"], 7);

    // Replayed frames have exactly the live frames' shape: compare with history.
    let history = bo
        .request(json!({"action": "getHistory", "room": "r", "after": last_seen}))
        .await;
    assert_eq!(history["events"].as_array().unwrap(), &replay);
    assert_eq!(history["head"], 7);
}

/// The fan-out held a second behind the log, as DynamoDB's stream is on AWS: what bo missed
/// comes once, as the replay, and what was said after his new connection opened comes once, live
/// — even though both are still on their way through the fan-out when he asks.
#[tokio::test]
async fn a_replay_and_a_lagging_fan_out_never_deliver_a_seq_twice() {
    let server = Server::start_with(&[("PALAVER_FANOUT_DELAY", "1s")]);
    let mut ana = server.connect("ana").await;
    ana.join("r").await;
    let mut bo = server.connect("bo").await;
    bo.join("r").await;
    let last_seen = ana.say("r", "one").await["seq"].as_u64().unwrap();
    bo.close().await;
    let mut missed = Vec::new();
    for text in ["two", "three", "four"] {
        missed.push(ana.say("r", text).await["seq"].as_u64().unwrap());
    }

    let mut bo = server.connect("bo").await;
    // Said after bo's new connection opened, before he asks for the replay: live, not history.
    let five = ana.say("r", "five").await["seq"].as_u64().unwrap();
    let (replay, joined) = bo.rejoin_after("r", last_seen).await;
    assert_eq!(
        seqs(&replay),
        missed,
        "the replay is what bo missed, in order"
    );
    assert_eq!(joined["head"], five);

    let marker = ana.say("r", "marker").await["seq"].as_u64().unwrap();
    let live: Vec<Value> = bo
        .pushed_until(|f| f["seq"] == marker)
        .await
        .into_iter()
        .filter(|f| f["room"] == "r" && f["seq"].is_u64())
        .collect();
    assert_eq!(
        seqs(&live),
        [five],
        "then live, from where the replay stopped"
    );
    assert_eq!(live[0]["text"], "five");
}

#[tokio::test]
async fn history_pages_through_a_room() {
    let server = Server::start();
    let mut ana = server.connect("ana").await;
    ana.join("log").await;
    for i in 0..30 {
        ana.say("log", &format!("m{i}")).await;
    }
    let page = ana
        .request(json!({"action": "getHistory", "room": "log", "after": 0, "limit": 10}))
        .await;
    assert_eq!(
        seqs(page["events"].as_array().unwrap()),
        (1..=10).collect::<Vec<_>>()
    );
    assert_eq!(page["head"], 31);
    let page = ana
        .request(json!({"action": "getHistory", "room": "log", "after": 25}))
        .await;
    assert_eq!(
        seqs(page["events"].as_array().unwrap()),
        (26..=31).collect::<Vec<_>>()
    );
    let page = ana
        .request(json!({"action": "getHistory", "room": "log", "after": 31}))
        .await;
    assert_eq!(page["events"], json!([]));
}

#[tokio::test]
async fn resending_a_client_msg_id_is_answered_once() {
    let server = Server::start();
    let mut ana = server.connect("ana").await;
    ana.join("r").await;
    let send =
        json!({"action": "sendMessage", "room": "r", "text": "once", "clientMsgId": "abc-1"});
    let first = ana.request(send.clone()).await;
    assert_eq!(first["clientMsgId"], "abc-1");
    // The retry comes from a new connection, as after a reconnect.
    let mut again = server.connect("ana").await;
    let second = again.request(send).await;
    assert_eq!(first, second, "the first sent answer again");
    let history = again
        .request(json!({"action": "getHistory", "room": "r"}))
        .await;
    let messages: Vec<&Value> = history["events"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["type"] == "message")
        .collect();
    assert_eq!(messages.len(), 1, "no second event: {history}");
}

#[tokio::test]
async fn every_error_code_answers_and_the_connection_stays_open() {
    let server = Server::start();
    let mut ana = server.connect("ana").await;
    ana.join("r").await;

    let cases: Vec<(String, &str)> = vec![
        ("not json".into(), "bad_request"),
        ("[1,2,3]".into(), "bad_request"),
        (r#"{"room":"r"}"#.into(), "unknown_action"),
        (r#"{"action":"dance"}"#.into(), "unknown_action"),
        (r#"{"action":"leaveRoom","action":"joinRoom","room":"r"}"#.into(), "bad_request"),
        (r#"{"action":"joinRoom","room":"no spaces"}"#.into(), "invalid_room"),
        (r#"{"action":"joinRoom","room":""}"#.into(), "invalid_room"),
        (r#"{"action":"sendMessage","room":"r"}"#.into(), "bad_request"),
        (r#"{"action":"sendMessage","room":"r","text":42}"#.into(), "bad_request"),
        (r#"{"action":"getHistory","room":"r","after":"x"}"#.into(), "bad_request"),
        (r#"{"action":"sendMessage","room":"elsewhere","text":"hi"}"#.into(), "not_member"),
        (r#"{"action":"getHistory","room":"elsewhere"}"#.into(), "not_member"),
        (
            json!({"action": "sendMessage", "room": "r", "text": "x".repeat(16 * 1024 + 1)}).to_string(),
            "too_large",
        ),
        (
            json!({"action": "sendMessage", "room": "r", "text": "y", "pad": "p".repeat(33 * 1024)}).to_string(),
            "too_large",
        ),
    ];
    for (frame, code) in &cases {
        ana.send_text(frame).await;
        let answer = ana.answer().await;
        assert_eq!(answer["type"], "error", "{frame:.60} → {answer}");
        assert_eq!(answer["code"], *code, "{frame:.60} → {answer}");
        assert!(!answer["message"].as_str().unwrap().is_empty());
    }
    // Named routes say which action failed.
    ana.send_text(r#"{"action":"sendMessage","room":"r"}"#)
        .await;
    assert_eq!(ana.answer().await["action"], "sendMessage");
    // An action is read as JSON reads it, escapes and all: this is a joinRoom.
    ana.send_text(r#"{"action":"joinRoom","room":"r"}"#).await;
    assert_eq!(ana.answer().await["type"], "joined");

    // Nothing of the refused frames reached the log.
    let history = ana
        .request(json!({"action": "getHistory", "room": "r"}))
        .await;
    assert_eq!(history["head"], 1, "only ana's join: {history}");

    // The connection is still up and works.
    assert_eq!(ana.say("r", "still here").await["seq"], 2);
}

#[tokio::test]
async fn flooding_is_rate_limited_without_closing_the_connection() {
    let server = Server::start();
    let mut ana = server.connect("ana").await;
    ana.join("r").await;
    // The limiter admits or refuses a frame before it is routed. The flood is of frames that
    // cost the store nothing, so it outpaces the limit whatever the store: the gateway takes the
    // next frame off the socket only once the previous one is answered, so a flood of store
    // reads on a remote store (DynamoDB) is paced by the store instead.
    let frame = json!({"action": "nothing"});
    for _ in 0..120 {
        ana.send(frame.clone()).await;
    }
    let mut codes = Vec::new();
    for _ in 0..120 {
        let answer = ana.answer().await;
        codes.push(answer["code"].as_str().unwrap_or("ok").to_owned());
    }
    let limited = codes.iter().filter(|c| *c == "rate_limited").count();
    assert!(limited > 0, "a burst of 120 frames is throttled: {codes:?}");
    assert!(
        codes
            .iter()
            .all(|c| c == "unknown_action" || c == "rate_limited"),
        "{codes:?}"
    );
    assert!(
        codes.iter().take(50).all(|c| c == "unknown_action"),
        "a burst (60 frames, one of them the join) is admitted: {codes:?}"
    );
    // Once the bucket refills, the same connection works again.
    loop {
        let answer = ana
            .request(json!({"action": "sendMessage", "room": "r", "text": "calm again", "clientMsgId": "calm"}))
            .await;
        match answer["type"].as_str() {
            Some("sent") => break,
            _ => assert_eq!(answer["code"], "rate_limited", "{answer}"),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn a_store_failure_is_an_internal_error_and_nothing_is_lost() {
    // SQLite on every run: the failure is injected with a trigger in the file.
    let server = Server::start_sqlite();
    let mut ana = server.connect("ana").await;
    ana.join("r").await;
    ana.say("r", "before").await;

    // Make the store refuse one kind of write, from outside the server, as a full disk or a
    // broken file would.
    common::sql_outside(
        &server.db_path(),
        "CREATE TRIGGER refuse BEFORE INSERT ON events WHEN NEW.body LIKE '%boom%' \
         BEGIN SELECT RAISE(ABORT, 'injected'); END",
    )
    .await;

    let answer = ana
        .request(json!({"action": "sendMessage", "room": "r", "text": "boom"}))
        .await;
    assert_eq!(answer["type"], "error");
    assert_eq!(answer["code"], "internal", "{answer}");
    // The connection stays, the log is consistent, the next message takes the next seq.
    let sent = ana.say("r", "after").await;
    assert_eq!(sent["seq"], 3);
    let history = ana
        .request(json!({"action": "getHistory", "room": "r"}))
        .await;
    assert_eq!(seqs(history["events"].as_array().unwrap()), [1, 2, 3]);
}

#[tokio::test]
async fn a_damaged_event_is_skipped_and_the_room_goes_on() {
    // SQLite on every run: the damage is done with a trigger in the file.
    let server = Server::start_sqlite();
    let mut ana = server.connect("ana").await;
    let mut bo = server.connect("bo").await;
    ana.join("r").await;
    bo.join("r").await;

    // A damaged event on disk: written into the file by another process, since what this
    // server committed itself it also keeps in memory, and hands out as it was written.
    common::sql_outside(
        &server.db_path(),
        "INSERT INTO events (stream, seq, pos, id, at, kind, user_id, body) \
         SELECT 'r:r', (SELECT MAX(seq) FROM events WHERE stream = 'r:r') + 1, \
                (SELECT MAX(pos) FROM events) + 1, '01JDAMAGED0000000000000000', 0, \
                'messagePosted', 'ana', '{\"kind\":'",
    )
    .await;

    let after = ana.say("r", "after").await;
    // The fan-out cannot decode the damaged event; it logs it and goes on, instead of stopping
    // every room to wait for it.
    let message = bo.pushed_of("message").await;
    assert_eq!(
        (&message["seq"], &message["text"]),
        (&after["seq"], &json!("after"))
    );
    assert_eq!(
        after["seq"], 4,
        "joins took seqs 1 and 2, the damaged event 3"
    );

    // A newcomer whose replay runs into the damaged event still joins: the answer is `joined`
    // (never `internal`, which would say nothing changed), its head says how far to page, and
    // the join took effect.
    let mut cy = server.connect("cy").await;
    let joined = cy
        .request(json!({"action": "joinRoom", "room": "r", "after": 0}))
        .await;
    assert_eq!(joined["type"], "joined", "{joined}");
    assert!(joined["head"].as_u64().unwrap() > after["seq"].as_u64().unwrap());
    assert_eq!(cy.say("r", "made it in").await["type"], "sent");
}

#[tokio::test]
async fn a_damaged_membership_row_costs_its_room_not_the_server() {
    // SQLite on every run: the damage is done to the file between two runs.
    let server = Server::start_sqlite();
    let mut ana = server.connect("ana").await;
    let mut cy = server.connect("cy").await;
    ana.join("r").await;
    cy.join("broken").await;
    drop((ana, cy));
    let db = server.db_path();
    let mut server = server;
    server.kill9();
    common::sql_outside(
        &db,
        "UPDATE members SET user_id = 'not a user name!' WHERE room = 'broken'",
    )
    .await;

    // The server starts on the damaged file, and every other room goes on.
    let server = server.restart_after_kill9();
    let mut ana = server.connect("ana").await;
    let mut bo = server.connect("bo").await;
    ana.join("r").await;
    bo.join("r").await;
    let sent = ana.say("r", "still here").await;
    let message = bo.pushed_of("message").await;
    assert_eq!(
        (&message["seq"], &message["text"]),
        (&sent["seq"], &json!("still here"))
    );
}

/// A client that opens a socket and sends nothing, or sends its request a byte at a time, is
/// dropped once the header timeout passes; a connection that completed its handshake is not.
#[tokio::test]
async fn slow_or_silent_handshakes_are_dropped_at_the_header_timeout() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let server = Server::start_with(&[("PALAVER_HEADER_TIMEOUT", "1s")]);
    let mut ana = server.connect("ana").await;
    ana.join("r").await;

    let addr = server.url().trim_start_matches("http://").to_owned();
    let mut silent = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let mut trickle = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let request = format!(
        "GET /?token={} HTTP/1.1\r\nHost: {addr}\r\n",
        server.token("bo")
    );
    let trickling = async {
        for byte in request.bytes().cycle() {
            if trickle.write_all(&[byte]).await.is_err() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    // Each is closed by the server: a read ends (EOF or reset) well before this deadline.
    let closed = async {
        let mut buf = [0u8; 64];
        while matches!(silent.read(&mut buf).await, Ok(n) if n > 0) {}
    };
    tokio::time::timeout(Duration::from_secs(15), trickling)
        .await
        .expect("the trickling request is cut off");
    tokio::time::timeout(Duration::from_secs(15), closed)
        .await
        .expect("the silent socket is closed");

    // Ana's connection, older than the header timeout by now, is as it was.
    assert_eq!(ana.say("r", "still here").await["type"], "sent");
}

/// Clients that send a valid, authenticated upgrade request and hang up at once — before or
/// after `$connect` ran — leave no connection behind: every `$connect` that succeeded is
/// followed by its `$disconnect`, and nobody stays online.
#[tokio::test]
async fn handshakes_abandoned_midway_leave_no_connection_open() {
    use tokio::io::AsyncWriteExt;
    let server = Server::start_readable();
    let addr = server.url().trim_start_matches("http://").to_owned();
    let attempts: Vec<_> = (0..200)
        .map(|i| {
            let request = format!(
                "GET /?token={} HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\n\
                 Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\n\
                 Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
                server.token(&format!("ghost{i}"))
            );
            let addr = addr.clone();
            tokio::spawn(async move {
                let mut socket = tokio::net::TcpStream::connect(&addr).await.unwrap();
                socket.write_all(request.as_bytes()).await.unwrap();
                // Gone a moment later: before, during or after the server's `$connect`.
                tokio::time::sleep(Duration::from_micros(100 * (i % 50))).await;
                let _ = socket.set_zero_linger();
                drop(socket);
            })
        })
        .collect();
    for attempt in attempts {
        attempt.await.unwrap();
    }
    // Whatever each `$connect` got to do, its `$disconnect` follows: wait for none to be open.
    common::eventually("no abandoned handshake to be open", || async {
        let out = server.cli(&["connections", "--json"]);
        let open: Vec<Value> = serde_json::from_slice(&out.stdout).expect("JSON rows");
        open.is_empty().then_some(())
    })
    .await;
}

/// After `kill -9`, the connections the old process held are closed as soon as the server is
/// back: nobody stays online in a room because the process that held them died.
#[tokio::test]
async fn a_restart_closes_the_connections_of_the_run_before() {
    // SQLite on every run: the store must outlive the process.
    let server = Server::start_sqlite();
    let mut ana = server.connect("ana").await;
    let mut bo = server.connect("bo").await;
    ana.join("quiet").await;
    bo.join("quiet").await;
    let open = |server: &Server| -> Vec<Value> {
        let out = server.cli(&["connections", "--json"]);
        serde_json::from_slice(&out.stdout).expect("JSON rows")
    };
    assert_eq!(open(&server).len(), 2);

    // Killed while both are connected: no `$disconnect` runs.
    let server = server.restart_after_kill9();
    drop((ana, bo));
    common::eventually("the dead run's connections to be closed", || async {
        open(&server).is_empty().then_some(())
    })
    .await;
    let out = server.cli(&["members", "quiet", "--json"]);
    let members: Vec<Value> = serde_json::from_slice(&out.stdout).expect("JSON rows");
    assert_eq!(members.len(), 2, "still members: {members:?}");
    assert!(
        members.iter().all(|m| m["online"] == false),
        "nobody online: {members:?}"
    );
    // And the room goes on with whoever comes back.
    let mut ana = server.connect("ana").await;
    ana.join("quiet").await;
    assert_eq!(ana.say("quiet", "back").await["type"], "sent");
}

/// Connects to `url` as soon as the server stops answering 429 (a deadline, not a fixed wait).
async fn connect_once_there_is_room(url: &str, user: &str) -> common::Client {
    use tokio_tungstenite::tungstenite::Error;
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    loop {
        match common::Client::connect(url, user).await {
            Ok(client) => return client,
            Err(Error::Http(response)) if response.status() == 429 => {
                assert!(std::time::Instant::now() < deadline, "no room for {user}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(other) => panic!("{user}: {other}"),
        }
    }
}

/// Past `--max-connections`, a handshake is answered 429 with `Retry-After` — a clear refusal,
/// before any token check or `$connect` — and once a connection closes there is room again.
#[tokio::test]
async fn a_full_server_refuses_handshakes_with_429_until_there_is_room() {
    use tokio_tungstenite::tungstenite::Error;
    let server = Server::start_with(&[("PALAVER_MAX_CONNECTIONS", "2")]);
    let mut ana = server.connect("ana").await;
    let bo = server.connect("bo").await;
    let url = format!("ws://{}/?token={}", server.addr, server.token("cy"));
    match common::Client::connect(&url, "cy").await {
        Err(Error::Http(response)) => {
            assert_eq!(response.status(), 429);
            assert_eq!(response.headers()["retry-after"], "1");
        }
        Err(other) => panic!("refused otherwise: {other}"),
        Ok(_) => panic!("a third connection was accepted"),
    }
    bo.close().await;
    let mut cy = connect_once_there_is_room(&url, "cy").await;
    cy.join("r").await;
    ana.join("r").await;
    assert_eq!(cy.say("r", "made it").await["type"], "sent");
}

/// A user in as many rooms as `--max-rooms-per-user` allows gets `limit` for one more — the
/// connection stays, nothing is logged — and can join again after leaving one.
#[tokio::test]
async fn joining_past_the_rooms_per_user_cap_answers_limit() {
    let server = Server::start_with(&[("PALAVER_MAX_ROOMS_PER_USER", "2")]);
    let mut ana = server.connect("ana").await;
    ana.join("one").await;
    ana.join("two").await;
    let refused = ana
        .request(json!({"action": "joinRoom", "room": "three"}))
        .await;
    assert_eq!(
        (refused["type"].as_str(), refused["code"].as_str()),
        (Some("error"), Some("limit"))
    );
    assert_eq!(refused["action"], "joinRoom");
    // Joining a room already joined is still the harmless no-op it always was.
    ana.join("two").await;
    let history = ana
        .request(json!({"action": "getHistory", "room": "three"}))
        .await;
    assert_eq!(
        history["code"], "not_member",
        "nothing was joined: {history}"
    );
    ana.request(json!({"action": "leaveRoom", "room": "one"}))
        .await;
    ana.join("three").await;
    assert_eq!(ana.say("three", "made it").await["type"], "sent");
}

/// A user with as many connections open as `--max-connections-per-user` allows gets 429 for
/// one more, other users do not, and closing one makes room.
#[tokio::test]
async fn a_user_past_the_connections_cap_is_refused_with_429() {
    use tokio_tungstenite::tungstenite::Error;
    let server = Server::start_with(&[("PALAVER_MAX_CONNECTIONS_PER_USER", "2")]);
    let first = server.connect("ana").await;
    let _second = server.connect("ana").await;
    let url = format!("ws://{}/?token={}", server.addr, server.token("ana"));
    match common::Client::connect(&url, "ana").await {
        Err(Error::Http(response)) => assert_eq!(response.status(), 429),
        Err(other) => panic!("refused otherwise: {other}"),
        Ok(_) => panic!("a third connection of ana was accepted"),
    }
    let mut bo = server.connect("bo").await;
    bo.join("r").await;
    first.close().await;
    let mut ana = connect_once_there_is_room(&url, "ana").await;
    ana.join("r").await;
    assert_eq!(ana.say("r", "back").await["type"], "sent");
}

#[tokio::test]
async fn bad_tokens_fail_the_handshake_with_401_and_store_nothing() {
    use jsonwebtoken::{EncodingKey, Header, encode};
    // The CLI reads the registry from the server's store: not the memory store.
    let server = Server::start_readable();
    let now = chrono::Utc::now().timestamp();
    let sign = |secret: &str, claims: Value| {
        encode(
            &Header::default(),
            &claims,
            &EncodingKey::from_secret(secret.as_bytes()),
        )
        .unwrap()
    };
    // Each refused for its own reason, which the 401's body names.
    let bad = [
        ("no token", String::new()),
        ("not a JWT", "not-a-jwt".to_owned()),
        (
            "signature does not match",
            sign("other", json!({"sub": "ana", "exp": now + 600})),
        ),
        (
            "expired",
            sign(common::SECRET, json!({"sub": "ana", "exp": now - 600})),
        ),
        (
            "not valid yet",
            sign(
                common::SECRET,
                json!({"sub": "ana", "exp": now + 600, "nbf": now + 300}),
            ),
        ),
        (
            "sub is not a valid user id",
            sign(common::SECRET, json!({"sub": "a b", "exp": now + 600})),
        ),
        ("no exp claim", sign(common::SECRET, json!({"sub": "ana"}))),
    ];
    for (why, token) in bad {
        let url = format!("ws://{}/?token={token}", server.addr);
        match Client::connect(&url, "ana").await {
            Ok(_) => panic!("a token with {why} was accepted"),
            Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
                assert_eq!(response.status(), 401, "{why}");
                let body =
                    String::from_utf8_lossy(response.body().as_deref().unwrap_or(&[])).into_owned();
                assert!(body.contains(why), "{why}: the 401 says {body:?}");
            }
            Err(other) => panic!("{why}: unexpected error {other}"),
        }
    }
    let connections = server.cli(&["connections", "--json"]);
    assert_eq!(String::from_utf8_lossy(&connections.stdout).trim(), "[]");

    // A good token works, with only the two claims the contract asks for (no `iat`), as JWT
    // libraries make them.
    let plain = sign(common::SECRET, json!({"sub": "ana", "exp": now + 600}));
    let mut ana = Client::connect(&format!("ws://{}/?token={plain}", server.addr), "ana")
        .await
        .expect("a token without iat is accepted");
    ana.join("r").await;
    let connections = server.cli(&["connections", "--json"]);
    let rows: Vec<Value> = serde_json::from_slice(&connections.stdout).unwrap();
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0]["user"], "ana");
}

#[tokio::test]
async fn pipelined_messages_are_appended_and_answered_in_the_order_sent() {
    let server = Server::start_with(&[("PALAVER_RATE_LIMIT", "0")]);
    let mut ana = server.connect("ana").await;
    ana.join("r").await;
    // 300 frames without waiting for any answer: more than fit in one flight (256), with a
    // getHistory in the middle that must see every message sent before it.
    for i in 0..150 {
        ana.send(json!({"action": "sendMessage", "room": "r", "text": format!("m{i}"), "clientMsgId": format!("c{i}")}))
            .await;
    }
    ana.send(json!({"action": "getHistory", "room": "r", "after": 1, "limit": 500}))
        .await;
    for i in 150..300 {
        ana.send(json!({"action": "sendMessage", "room": "r", "text": format!("m{i}"), "clientMsgId": format!("c{i}")}))
            .await;
    }
    let mut sent = Vec::new();
    let mut history = None;
    while sent.len() < 300 || history.is_none() {
        let answer = ana.answer().await;
        match answer["type"].as_str() {
            Some("sent") => {
                assert_eq!(
                    history.is_some(),
                    sent.len() >= 150,
                    "answers in order: {answer}"
                );
                sent.push(answer);
            }
            Some("history") => {
                assert_eq!(sent.len(), 150, "history answered in its place");
                history = Some(answer);
            }
            _ => panic!("unexpected answer {answer}"),
        }
    }
    // Answered in the order sent, and appended in that order: seq follows clientMsgId.
    for (i, answer) in sent.iter().enumerate() {
        assert_eq!(answer["clientMsgId"], format!("c{i}"), "{answer}");
        assert_eq!(answer["seq"], 2 + i as u64, "{answer}");
    }
    let events = history.unwrap()["events"].as_array().unwrap().clone();
    let texts: Vec<&str> = events.iter().map(|e| e["text"].as_str().unwrap()).collect();
    let expected: Vec<String> = (0..150).map(|i| format!("m{i}")).collect();
    assert_eq!(texts, expected);
}

#[tokio::test]
async fn a_replay_is_one_page_and_history_pages_the_rest() {
    let server = Server::start_with(&[("PALAVER_RATE_LIMIT", "0")]);
    let mut ana = server.connect("ana").await;
    ana.join("big").await;
    let mut bo = server.connect("bo").await;
    bo.join("big").await;
    bo.close().await;
    // 400 messages of about 450 bytes: more than one replay holds by bytes (96 KiB), and more
    // than one getHistory page holds too.
    let text = "x".repeat(300);
    for i in 0..400 {
        ana.send(json!({"action": "sendMessage", "room": "big", "text": format!("{i} {text}")}))
            .await;
    }
    for _ in 0..400 {
        assert_eq!(ana.answer().await["type"], "sent");
    }
    // However far behind the fan-out is, what bo's new connection gets is the replay alone:
    // everything here was logged before it opened.
    let mut bo = server.connect("bo").await;
    let (mut got, joined) = bo.rejoin_after("big", 0).await;
    let replayed = got.len();
    let bytes: usize = got.iter().map(|f| f.to_string().len() + 1).sum();
    assert!(
        replayed > 0 && replayed < 500,
        "one page, cut by bytes: {replayed} events"
    );
    assert!(bytes <= 96 * 1024, "{bytes} bytes replayed");
    let head = joined["head"].as_u64().unwrap();
    assert_eq!(head, 402, "two joins and 400 messages");
    // Page on with getHistory until head.
    while got.last().unwrap()["seq"].as_u64().unwrap() < head {
        let after = got.last().unwrap()["seq"].as_u64().unwrap();
        let page = bo
            .request(json!({"action": "getHistory", "room": "big", "after": after, "limit": 500}))
            .await;
        let events = page["events"].as_array().unwrap();
        assert!(!events.is_empty(), "a page moves forward");
        assert!(
            page.to_string().len() <= 128 * 1024,
            "fits an API Gateway message"
        );
        got.extend(events.iter().cloned());
    }
    assert_eq!(seqs(&got), (1..=head).collect::<Vec<_>>());
}

#[tokio::test]
async fn the_rate_limit_is_a_setting() {
    let server = Server::start_with(&[("PALAVER_RATE_LIMIT", "5")]);
    let mut ana = server.connect("ana").await;
    for _ in 0..30 {
        ana.send(json!({"action": "nothing"})).await;
    }
    let mut codes = Vec::new();
    for _ in 0..30 {
        codes.push(ana.answer().await["code"].as_str().unwrap_or("").to_owned());
    }
    // A burst of twice the rate passes, then frames are refused.
    assert!(
        codes[..10].iter().all(|c| c == "unknown_action"),
        "{codes:?}"
    );
    assert!(codes[10..].iter().any(|c| c == "rate_limited"), "{codes:?}");
}

/// The protocol's own edges: a client's ping gets its pong, a handshake the server cannot accept
/// is refused with 400 saying why, and a frame over the hard limit closes the connection with
/// 1009 (message too big) — the close code tells the client not to resend it.
#[tokio::test]
async fn pings_bad_handshakes_and_oversized_frames_get_protocol_answers() {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

    let server = Server::start();
    let url = format!(
        "{}/?token={}",
        server.url().replace("http", "ws"),
        server.token("ana")
    );
    let (mut ws, _) = tokio_tungstenite::connect_async(&url).await.unwrap();
    ws.send(Message::Ping(b"are you there".to_vec().into()))
        .await
        .unwrap();
    let pong = loop {
        match ws.next().await.expect("a frame").expect("no error") {
            Message::Pong(payload) => break payload,
            _ => continue,
        }
    };
    assert_eq!(&pong[..], b"are you there");

    let refused = reqwest::Client::new()
        .get(format!("{}/?token={}", server.url(), server.token("ana")))
        .header("connection", "Upgrade")
        .header("upgrade", "websocket")
        .header("sec-websocket-version", "8")
        .header("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ==")
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 400);
    assert!(refused.text().await.unwrap().contains("Version"));

    ws.send(Message::text("x".repeat(200 * 1024)))
        .await
        .unwrap();
    let close = close_frame(&mut ws).await;
    assert_eq!(close.code, CloseCode::Size, "{close:?}");

    // So does a 20 MB frame, which the server refuses at its header: the client's send still
    // completes (no broken pipe, no reset), then it hears 1009.
    let (mut ws, _) = tokio_tungstenite::connect_async(&url).await.unwrap();
    let sent = ws.send(Message::text("x".repeat(20 * 1024 * 1024))).await;
    assert!(sent.is_ok(), "the send of 20 MB failed: {sent:?}");
    let close = close_frame(&mut ws).await;
    assert_eq!(close.code, CloseCode::Size, "{close:?}");

    // A text frame that is not UTF-8 closes with 1007 (invalid frame payload data).
    use tokio_tungstenite::tungstenite::protocol::frame::Frame;
    use tokio_tungstenite::tungstenite::protocol::frame::coding::{Data, OpCode};
    let (mut ws, _) = tokio_tungstenite::connect_async(&url).await.unwrap();
    let not_utf8 = Frame::message(vec![0xff, 0xfe, 0x41], OpCode::Data(Data::Text), true);
    ws.send(Message::Frame(not_utf8)).await.unwrap();
    let close = close_frame(&mut ws).await;
    assert_eq!(close.code, CloseCode::Invalid, "{close:?}");
}

/// The close frame the server ends `ws` with, past any frames before it.
async fn close_frame(
    ws: &mut tokio_tungstenite::WebSocketStream<
        tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>,
    >,
) -> tokio_tungstenite::tungstenite::protocol::CloseFrame {
    use futures_util::StreamExt;
    use tokio_tungstenite::tungstenite::Message;
    loop {
        match ws.next().await {
            Some(Ok(Message::Close(frame))) => return frame.expect("a close code"),
            Some(Ok(_)) => continue,
            other => panic!("expected a close frame, got {other:?}"),
        }
    }
}

/// As on API Gateway: a connection that sends nothing for the idle timeout is closed (1001), a
/// client keeps a quiet connection open with `ping` (answered `pong`), and every connection ends
/// at the maximum age (1001), however busy. Here the server is started with 1 s and 3 s.
#[tokio::test]
async fn quiet_connections_close_pings_keep_them_and_every_connection_ends_at_its_maximum_age() {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

    let server = Server::start_with(&[
        ("PALAVER_IDLE_TIMEOUT", "1s"),
        ("PALAVER_MAX_CONNECTION_AGE", "3s"),
    ]);
    let url = |user: &str| {
        format!(
            "{}/?token={}",
            server.url().replace("http", "ws"),
            server.token(user)
        )
    };
    let closed = |frame: Option<Result<Message, _>>| match frame {
        Some(Ok(Message::Close(Some(close)))) => Some(close),
        Some(Ok(_)) => None,
        other => panic!("expected a close frame, got {other:?}"),
    };

    // Quiet: closed for idleness.
    let (mut quiet, _) = tokio_tungstenite::connect_async(url("ana")).await.unwrap();
    let close = loop {
        if let Some(close) = closed(quiet.next().await) {
            break close;
        }
    };
    assert_eq!(close.code, CloseCode::Away, "{close:?}");
    assert!(close.reason.contains("idle"), "{close:?}");

    // Pinging every 300 ms: answered each time, open well past the idle timeout, then closed at
    // the maximum age.
    let (mut busy, _) = tokio_tungstenite::connect_async(url("bo")).await.unwrap();
    let mut pongs = 0;
    let close = loop {
        // The server may have closed it meanwhile: the close frame is read below either way.
        let _ = busy.send(Message::text(r#"{"action":"ping"}"#)).await;
        let frame = busy.next().await;
        if let Some(Ok(Message::Text(text))) = &frame {
            assert_eq!(text.as_str(), r#"{"type":"pong"}"#);
            pongs += 1;
            tokio::time::sleep(Duration::from_millis(300)).await;
            continue;
        }
        if let Some(close) = closed(frame) {
            break close;
        }
    };
    assert!(
        pongs >= 5,
        "pings kept it open past the idle timeout: {pongs} pongs"
    );
    assert_eq!(close.code, CloseCode::Away, "{close:?}");
    assert!(close.reason.contains("maximum"), "{close:?}");
}

/// A client that stops reading is closed as too slow once its socket is full and 1 MiB (or 1,024
/// frames) waits behind it — and it goes offline for the room — while the clients that read keep
/// going.
#[tokio::test]
async fn a_client_that_stops_reading_is_closed_and_the_room_goes_on() {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;

    let server = Server::start_with(&[("PALAVER_RATE_LIMIT", "0")]);
    let url = |user: &str| {
        format!(
            "{}/?token={}",
            server.url().replace("http", "ws"),
            server.token(user)
        )
    };
    // zed joins, then never reads again.
    let (mut zed, _) = tokio_tungstenite::connect_async(url("zed")).await.unwrap();
    zed.send(Message::text(r#"{"action":"joinRoom","room":"r"}"#))
        .await
        .unwrap();
    let joined = loop {
        if let Some(Ok(Message::Text(text))) = zed.next().await
            && text.contains(r#""type":"joined""#)
        {
            break text;
        }
    };
    assert!(joined.contains(r#""room":"r""#));

    // ana reads everything, on a task of its own, until zed goes offline.
    let (ana, _) = tokio_tungstenite::connect_async(url("ana")).await.unwrap();
    let (mut to_server, mut from_server) = ana.split();
    to_server
        .send(Message::text(r#"{"action":"joinRoom","room":"r"}"#))
        .await
        .unwrap();
    let received = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counted = received.clone();
    let reader = tokio::spawn(async move {
        let mut messages = 0;
        while let Some(Ok(frame)) = from_server.next().await {
            let Message::Text(text) = frame else { continue };
            let frame: Value = serde_json::from_str(text.as_str()).unwrap();
            match frame["type"].as_str() {
                Some("message") => {
                    messages += 1;
                    counted.store(messages, std::sync::atomic::Ordering::Relaxed);
                }
                Some("presence") if frame["user"] == "zed" && frame["online"] == false => {
                    return messages;
                }
                _ => {}
            }
        }
        panic!("ana's connection ended before zed went offline");
    });

    // 2,500 messages of 8 KiB: far more than zed's socket buffers and outbox hold. ana sends
    // them no further ahead of what she has read than a reading client would be (200), so that
    // only the client that stopped reading falls behind, however busy this machine is.
    let text = "z".repeat(8 * 1024);
    for i in 0..2500 {
        if reader.is_finished() {
            // zed is offline already: what was to be shown is shown.
            break;
        }
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        while i >= received.load(std::sync::atomic::Ordering::Relaxed) + 200
            && !reader.is_finished()
        {
            assert!(
                std::time::Instant::now() < deadline,
                "ana stopped receiving at {i}"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let frame = json!({"action": "sendMessage", "room": "r", "text": format!("{i} {text}")});
        to_server
            .send(Message::text(frame.to_string()))
            .await
            .unwrap();
    }
    let messages = tokio::time::timeout(Duration::from_secs(60), reader)
        .await
        .expect("zed is closed as too slow within a minute")
        .unwrap();
    // 1 MiB is 128 of these messages: ana got far more than zed's outbox could hold.
    assert!(messages > 256, "ana kept receiving: {messages} messages");
    drop(zed);
}
