//! A hostile client with one valid token, against the real server: what it can make the server
//! hold — memory, sockets, file descriptors, CPU — and for how long. Each test is an attack that
//! took the server's resources before the limits that now bound it, and checks, from outside the
//! process (`/proc/PID`), that they fall back within seconds.

use crate::common::{self, Launch, Server, WAIT, eventually};
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

/// A client socket whose receive buffer is `receive_buffer` bytes (the kernel doubles it): a
/// client that reads nothing fills it at once, and the server's writes then back up.
async fn small_window_socket(addr: &str, receive_buffer: u32) -> TcpStream {
    let addr: std::net::SocketAddr = addr.parse().expect("a socket address");
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()
    } else {
        TcpSocket::new_v6()
    }
    .unwrap();
    socket.set_recv_buffer_size(receive_buffer).unwrap();
    socket.connect(addr).await.expect("TCP connect")
}

/// A WebSocket connection of `user` over a socket with a small receive buffer.
async fn never_reading(server: &Server, user: &str) -> WebSocketStream<TcpStream> {
    let stream = small_window_socket(&server.addr, 4096).await;
    let url = format!("ws://{}/?token={}", server.addr, server.token(user));
    let (ws, _) = tokio_tungstenite::client_async(url, stream)
        .await
        .expect("handshake accepted");
    ws
}

/// Reads `ws` until the answer of type `kind` (the only reading such a client does).
async fn read_until(ws: &mut WebSocketStream<TcpStream>, kind: &str) -> Value {
    loop {
        let frame = tokio::time::timeout(WAIT, ws.next())
            .await
            .unwrap_or_else(|_| panic!("no {kind} in time"));
        if let Some(Ok(Message::Text(text))) = frame {
            let frame: Value = serde_json::from_str(text.as_str()).unwrap();
            if frame["type"] == kind {
                return frame;
            }
        } else {
            panic!("expected {kind}, got {frame:?}");
        }
    }
}

/// How many connections of `user` the store has open, read with `palaver connections`.
fn open_connections(server: &Server, user: &str) -> usize {
    let out = server.cli(&["connections", "--user", user, "--json"]);
    assert!(out.status.success(), "{out:?}");
    let rows: Vec<Value> = serde_json::from_slice(&out.stdout).unwrap();
    rows.len()
}

/// Samples the server's resident memory every 50 ms until dropped; the highest seen.
struct PeakMemory {
    peak: std::sync::Arc<std::sync::atomic::AtomicU64>,
    sampler: tokio::task::JoinHandle<()>,
}

impl PeakMemory {
    fn watch(server: &Server) -> PeakMemory {
        let pid = server.pid();
        let peak = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let seen = peak.clone();
        let sampler = tokio::spawn(async move {
            loop {
                if let Some(rss) = common::rss_kib(pid) {
                    seen.fetch_max(rss, std::sync::atomic::Ordering::Relaxed);
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        });
        PeakMemory { peak, sampler }
    }

    fn kib(&self) -> u64 {
        self.peak.load(std::sync::atomic::Ordering::Relaxed)
    }
}

impl Drop for PeakMemory {
    fn drop(&mut self) {
        self.sampler.abort();
    }
}

/// ana, a member of room `big`, whose history is long enough that every `getHistory` page
/// is as large as a page gets (~96 KB): 12 messages of 15 KiB.
async fn long_history(server: &Server) -> common::Client {
    let mut ana = server.connect("ana").await;
    ana.join("big").await;
    let text = "h".repeat(15 * 1024);
    for i in 0..12 {
        ana.say("big", &format!("{i} {text}")).await;
    }
    ana
}

/// 100 connections of one user that never read ask for 60 pages of history each (~96 KB a
/// page), then one of them breaks the protocol: what the server holds for them stays bounded
/// (answers wait for room, and the server stops reading a client it cannot answer), and once
/// they are closed — by the write deadline, since none reads — their sockets are gone from the
/// server within seconds and the store has none of them open.
#[tokio::test]
async fn clients_that_never_read_hold_bounded_memory_and_no_socket_once_closed() {
    let server = Server::start_launched(
        &Launch::default(),
        &[
            ("PALAVER_RATE_LIMIT", "0"),
            ("PALAVER_MAX_CONNECTIONS_PER_USER", "200"),
            ("PALAVER_WRITE_TIMEOUT", "2s"),
        ],
    );
    let mut ana = long_history(&server).await;
    let sockets_before = server.open_sockets();
    let rss_before = server.rss_kib();
    let peak = PeakMemory::watch(&server);

    let history = json!({"action": "getHistory", "room": "big", "after": 0, "limit": 500});
    let mut attackers = Vec::new();
    for _ in 0..100 {
        let mut ws = never_reading(&server, "mallory").await;
        ws.send(Message::text(
            json!({"action": "joinRoom", "room": "big"}).to_string(),
        ))
        .await
        .unwrap();
        read_until(&mut ws, "joined").await;
        for _ in 0..60 {
            ws.feed(Message::text(history.to_string())).await.unwrap();
        }
        ws.flush().await.unwrap();
        // Then it breaks the protocol (a frame with the reserved opcode 3), and reads nothing.
        let _ = ws.get_mut().write_all(&[0x83, 0x80, 0, 0, 0, 0]).await;
        attackers.push(ws);
    }
    eventually(
        "the store to have none of mallory's connections open",
        || {
            let open = open_connections(&server, "mallory");
            async move { (open == 0).then_some(()) }
        },
    )
    .await;
    eventually("the server to hold no socket of mallory's", || {
        let open = server.open_sockets();
        async move { (open <= sockets_before).then_some(()) }
    })
    .await;
    let grew_mib = peak.kib().saturating_sub(rss_before) / 1024;
    eprintln!("100 clients that never read: the server grew by {grew_mib} MiB at most");
    // 6,000 answers of ~96 KB were asked for: 560 MB if each were queued. What may wait for one
    // connection is bounded (a few answers), so 100 of them hold tens of MB at most.
    assert!(
        grew_mib < 100,
        "the server grew by {grew_mib} MiB for 100 clients that never read"
    );
    // The server is fine: ana still chats.
    ana.say("big", "still here").await;
    drop(attackers);
}

/// A member that stops reading while its room is busy is closed as too slow (1008), and its
/// socket goes with it within seconds — it is not kept until the client reads or leaves.
#[tokio::test]
async fn a_member_closed_as_too_slow_leaves_no_socket_behind() {
    let server = Server::start_launched(&Launch::default(), &[("PALAVER_RATE_LIMIT", "0")]);
    let mut ana = server.connect("ana").await;
    ana.join("r").await;
    let sockets_with_ana = server.open_sockets();
    let mut zed = never_reading(&server, "zed").await;
    zed.send(Message::text(
        json!({"action": "joinRoom", "room": "r"}).to_string(),
    ))
    .await
    .unwrap();
    read_until(&mut zed, "joined").await;

    // Messages of 8 KiB until zed is offline; ana reads everything.
    let text = "z".repeat(8 * 1024);
    let mut i = 0;
    'flood: loop {
        ana.send(json!({"action": "sendMessage", "room": "r", "text": format!("{i} {text}")}))
            .await;
        i += 1;
        loop {
            let frame = ana.recv().await;
            if frame["type"] == "presence" && frame["user"] == "zed" && frame["online"] == false {
                break 'flood;
            }
            if frame["type"] == "sent" {
                break;
            }
        }
        assert!(i < 5000, "zed was never closed as too slow");
    }
    eventually("zed's socket to be gone from the server", || {
        let open = server.open_sockets();
        async move { (open <= sockets_with_ana).then_some(()) }
    })
    .await;
    assert_eq!(open_connections(&server, "zed"), 0);
    drop(zed);
}

/// With a 3 s idle timeout and a 6 s maximum age, a client that never reads and floods pings
/// (unthrottled here: the rate limit is off) and one that floods `getHistory` are both closed
/// on time: the timers run while their answers wait for room. The write deadline is an hour, so
/// nothing else could close them.
#[tokio::test]
async fn idle_and_age_limits_hold_while_a_client_floods_and_never_reads() {
    let server = Server::start_launched(
        &Launch::default(),
        &[
            ("PALAVER_RATE_LIMIT", "0"),
            ("PALAVER_IDLE_TIMEOUT", "3s"),
            ("PALAVER_MAX_CONNECTION_AGE", "6s"),
            ("PALAVER_WRITE_TIMEOUT", "1h"),
        ],
    );
    let ana = long_history(&server).await;
    drop(ana);
    eventually("ana's connection to close", || {
        let open = open_connections(&server, "ana");
        async move { (open == 0).then_some(()) }
    })
    .await;
    let sockets_before = server.open_sockets();
    let peak = PeakMemory::watch(&server);
    let rss_before = server.rss_kib();

    let pinger = never_reading(&server, "pinger").await;
    let mut asker = never_reading(&server, "asker").await;
    asker
        .send(Message::text(
            json!({"action": "joinRoom", "room": "big"}).to_string(),
        ))
        .await
        .unwrap();
    read_until(&mut asker, "joined").await;
    let flood = |mut ws: WebSocketStream<TcpStream>, frame: Message| {
        tokio::spawn(async move {
            let mut sent = 0u64;
            // Until the server ends the connection (a send fails) or for a minute at most.
            let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
            while tokio::time::Instant::now() < deadline {
                let send = tokio::time::timeout(Duration::from_secs(1), ws.send(frame.clone()));
                match send.await {
                    Ok(Ok(())) => sent += 1,
                    Ok(Err(_)) => return sent,
                    // The server stopped reading this client: keep trying.
                    Err(_) => {}
                }
            }
            panic!("the server never ended the connection ({sent} frames sent)");
        })
    };
    let pings = flood(pinger, Message::Ping(b"p".to_vec().into()));
    let history = json!({"action": "getHistory", "room": "big", "after": 0, "limit": 500});
    let asks = flood(asker, Message::text(history.to_string()));
    for user in ["pinger", "asker"] {
        eventually(&format!("{user}'s connection to close"), || {
            let open = open_connections(&server, user);
            async move { (open == 0).then_some(()) }
        })
        .await;
    }
    eventually("the server to hold no socket of theirs", || {
        let open = server.open_sockets();
        async move { (open <= sockets_before).then_some(()) }
    })
    .await;
    let pings = pings.await.unwrap();
    let asks = asks.await.unwrap();
    assert!(pings > 0 && asks > 0);
    let grew_mib = peak.kib().saturating_sub(rss_before) / 1024;
    assert!(
        grew_mib < 50,
        "the server grew by {grew_mib} MiB for two clients"
    );
}

/// Sends a request head announcing a body of `length` bytes, and no body.
async fn slow_body(addr: &str, length: usize) -> TcpStream {
    let mut stream = TcpStream::connect(addr).await.expect("TCP connect");
    let head = format!(
        "POST /@connections/abc HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\n\
         Content-Length: {length}\r\n\r\n"
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    stream
}

/// What the server answers on `stream` until it closes it: the status line, or `None` if it
/// closed without answering.
async fn status_line(mut stream: TcpStream, within: Duration) -> Option<String> {
    let mut answer = Vec::new();
    let read = tokio::time::timeout(within, stream.read_to_end(&mut answer)).await;
    assert!(
        read.is_ok(),
        "the server kept the connection past {within:?}"
    );
    let answer = String::from_utf8_lossy(&answer);
    answer.lines().next().map(str::to_owned)
}

/// 300 requests to the management API that announce a body and never send it, against a server
/// that may hold 128 files: the server runs out of descriptors, then answers each 408 once the
/// body deadline passes and closes it — and serves everyone again. With a key pair set, the
/// same unsigned requests are answered 403 at once, without their bodies being waited for; one
/// that announces more than 128 KB is answered 413 at once.
#[tokio::test]
async fn request_bodies_that_never_arrive_hold_a_socket_no_longer_than_the_deadline() {
    let server = Server::start_launched(
        &Launch {
            open_files: Some(128),
            ..Launch::default()
        },
        &[("PALAVER_HEADER_TIMEOUT", "2s")],
    );
    let mut slow = Vec::new();
    for _ in 0..300 {
        slow.push(slow_body(&server.addr, 100_000).await);
    }
    let answers = futures_util::future::join_all(
        slow.into_iter()
            .map(|stream| status_line(stream, Duration::from_secs(60))),
    )
    .await;
    for status in answers.iter().flatten() {
        assert!(status.starts_with("HTTP/1.1 408"), "{status}");
    }
    assert!(
        answers.iter().flatten().count() >= 100,
        "most slow requests are answered 408: {answers:?}"
    );
    let health = reqwest::get(format!("{}/healthz", server.url())).await;
    assert_eq!(health.expect("/healthz answers").status(), 200);
    let mut ana = server.connect("ana").await;
    assert!(ana.is_open().await);

    // With keys set, an unsigned request never gets to wait for its body: the head decides.
    let keyed = Server::start_launched(
        &Launch::default(),
        &[
            ("PALAVER_HEADER_TIMEOUT", "1h"),
            ("PALAVER_MANAGEMENT_ACCESS_KEY_ID", "AKIDPALAVERLOCAL"),
            (
                "PALAVER_MANAGEMENT_SECRET_ACCESS_KEY",
                "management-secret-0123456789abcdef",
            ),
        ],
    );
    let unsigned = slow_body(&keyed.addr, 100_000).await;
    let status = status_line(unsigned, WAIT).await.expect("an answer");
    assert!(status.starts_with("HTTP/1.1 403"), "{status}");
    // Nor does one from this machine without keys, if it announces more than API Gateway takes.
    let too_big = slow_body(&server.addr, 200_000).await;
    let status = status_line(too_big, WAIT).await.expect("an answer");
    assert!(status.starts_with("HTTP/1.1 413"), "{status}");
}

/// 1,000 handshakes of one user at once, on each local store: exactly the cap (20) are
/// accepted, the rest answered 429 — not 144 or 197 of them.
#[tokio::test]
async fn the_per_user_cap_holds_under_a_thousand_handshakes_at_once() {
    for store in ["sqlite", "memory"] {
        let dir = tempfile::tempdir().unwrap();
        let url = match store {
            "sqlite" => format!("sqlite://{}", dir.path().join("palaver.db").display()),
            _ => "memory://".to_owned(),
        };
        let server =
            Server::start_with_env(dir, &url, &[("PALAVER_MAX_CONNECTIONS_PER_USER", "20")]);
        let ws_url = format!("ws://{}/?token={}", server.addr, server.token("ana"));
        let attempts = (0..1000).map(|_| {
            let url = ws_url.clone();
            tokio::spawn(async move { tokio_tungstenite::connect_async(url).await })
        });
        let results = futures_util::future::join_all(attempts).await;
        let mut open = Vec::new();
        let mut refused = 0;
        for result in results {
            match result.unwrap() {
                Ok((ws, _)) => open.push(ws),
                Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
                    assert_eq!(response.status(), 429, "{store}");
                    refused += 1;
                }
                Err(error) => panic!("{store}: {error}"),
            }
        }
        assert_eq!((open.len(), refused), (20, 980), "{store}");
        // One closed: one place again.
        let mut first = open.pop().unwrap();
        first.close(None).await.unwrap();
        while let Some(Ok(_)) = first.next().await {}
        let again = eventually("a place to free up", || {
            let url = ws_url.clone();
            async move { tokio_tungstenite::connect_async(url).await.ok() }
        })
        .await;
        drop(again);
    }
}

/// A flood of empty binary frames and one of pings is throttled like one of text frames, then
/// closed as flooding (1008): not 2,000 answers, and not a core kept busy answering them.
#[tokio::test]
async fn binary_and_ping_floods_are_rate_limited_and_closed() {
    let server = Server::start_launched(&Launch::default(), &[]);
    let url = format!("ws://{}/?token={}", server.addr, server.token("ana"));
    for flood in [
        Message::Binary(Vec::new().into()),
        Message::Ping(Vec::new().into()),
    ] {
        let (ws, _) = tokio_tungstenite::connect_async(&url).await.unwrap();
        let (mut to_server, mut from_server) = ws.split();
        let frame = flood.clone();
        let sender = tokio::spawn(async move {
            for _ in 0..2000 {
                if to_server.feed(frame.clone()).await.is_err() {
                    return;
                }
            }
            let _ = to_server.flush().await;
        });
        let (mut answered, mut rate_limited) = (0, 0);
        let close = loop {
            match tokio::time::timeout(WAIT, from_server.next()).await {
                Ok(Some(Ok(Message::Close(close)))) => break close.expect("a close code"),
                Ok(Some(Ok(Message::Pong(_)))) => answered += 1,
                Ok(Some(Ok(Message::Text(text)))) => {
                    let frame: Value = serde_json::from_str(text.as_str()).unwrap();
                    match frame["code"].as_str() {
                        Some("bad_request") => answered += 1,
                        Some("rate_limited") => rate_limited += 1,
                        other => panic!("unexpected answer {other:?}"),
                    }
                }
                other => panic!("{flood:?}: expected frames then a close, got {other:?}"),
            }
        };
        let _ = sender.await;
        assert_eq!(close.code, CloseCode::Policy, "{flood:?}: {close:?}");
        assert!(close.reason.contains("flooding"), "{close:?}");
        // The burst (60), and what refilled meanwhile, was answered; the rest was not.
        assert!(
            answered < 200,
            "{flood:?}: {answered} answered, {rate_limited} rate limited"
        );
    }
    let mut bo = server.connect("bo").await;
    assert!(bo.is_open().await);
}

/// A route that makes every address of `prefix` (a /48 of the documentation range) this
/// machine's, removed when dropped.
struct LocalRoute(String);

impl LocalRoute {
    fn add(prefix: &str) -> LocalRoute {
        let route = |verb: &str| {
            std::process::Command::new("ip")
                .args(["-6", "route", verb, "local", prefix, "dev", "lo"])
                .output()
        };
        let _ = route("del");
        let added = route("add").expect(
            "`ip` (iproute2) runs: the IPv6 test adds a local route on lo, which needs root",
        );
        assert!(
            added.status.success(),
            "ip -6 route add local {prefix} dev lo (needs root): {}",
            String::from_utf8_lossy(&added.stderr)
        );
        LocalRoute(prefix.to_owned())
    }
}

impl Drop for LocalRoute {
    fn drop(&mut self) {
        let _ = std::process::Command::new("ip")
            .args(["-6", "route", "del", "local", &self.0, "dev", "lo"])
            .output();
    }
}

/// A handshake from `source` (an address of a local route: bound with IP_FREEBIND) to the
/// server's port on `destination`; the HTTP status it was answered with.
async fn handshake_from(source: &str, destination: &str, port: u16, token: &str) -> u16 {
    use std::os::fd::AsRawFd;
    let socket = TcpSocket::new_v6().unwrap();
    let on: libc::c_int = 1;
    // SAFETY: a plain setsockopt on a socket this function owns.
    let set = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_IP,
            libc::IP_FREEBIND,
            (&on as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    assert_eq!(set, 0, "IP_FREEBIND: {}", std::io::Error::last_os_error());
    socket
        .bind(format!("[{source}]:0").parse().unwrap())
        .unwrap();
    let stream = socket
        .connect(format!("[{destination}]:{port}").parse().unwrap())
        .await
        .expect("TCP connect over the local route");
    let url = format!("ws://[{destination}]:{port}/?token={token}");
    match tokio_tungstenite::client_async(url, stream).await {
        Ok((ws, response)) => {
            drop(ws);
            response.status().as_u16()
        }
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => response.status().as_u16(),
        Err(error) => panic!("handshake from {source}: {error}"),
    }
}

/// The connect rate is per IPv6 /64: 60 handshakes from 60 addresses of one /64 are one source
/// (a burst of 2 at `--connect-rate 1`), while another /64 is still served.
#[tokio::test]
async fn the_connect_rate_counts_an_ipv6_64_as_one_source() {
    let _route = LocalRoute::add("2001:db8:7a::/48");
    let server = Server::start_launched(
        &Launch {
            listen: Some("[::]:0".to_owned()),
            ..Launch::default()
        },
        &[
            ("PALAVER_CONNECT_RATE", "1"),
            ("PALAVER_MAX_CONNECTIONS_PER_USER", "100"),
        ],
    );
    let (port, token) = (server.port(), server.token("ana"));
    let mut statuses = Vec::new();
    for n in 1..=60 {
        let source = format!("2001:db8:7a:1::{n:x}");
        statuses.push(handshake_from(&source, "2001:db8:7a::1", port, &token).await);
    }
    let accepted = statuses.iter().filter(|s| **s == 101).count();
    let refused = statuses.iter().filter(|s| **s == 429).count();
    assert_eq!(accepted + refused, 60, "{statuses:?}");
    // The burst of two, and at most a few refilled at one a second while this ran.
    assert!(
        accepted <= 10,
        "{accepted} of 60 accepted from one /64: {statuses:?}"
    );
    assert_eq!(
        handshake_from("2001:db8:7a:2::1", "2001:db8:7a::1", port, &token).await,
        101,
        "another /64 is another source"
    );
    common::eventually("the server to still answer", || async {
        reqwest::get(format!("http://127.0.0.1:{port}/healthz"))
            .await
            .ok()
            .filter(|r| r.status() == 200)
    })
    .await;
}
