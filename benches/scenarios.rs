//! Load scenarios against a real `palaver serve`: `cargo bench --bench scenarios [-- NAME …]`
//! (or `scripts/bench [NAME …]`, which raises the open-file limit first). No names: every one.
//!
//! Each scenario starts the release `palaver serve` on a fresh SQLite file in a temp dir, on a
//! free loopback port, with `PALAVER_RATE_LIMIT=0` (the senders here are machines), drives it
//! through real WebSocket clients, stops it and prints one JSON line on stdout. Progress goes to
//! stderr. The first four have the shapes, and print the fields, of `../shared/bench/run.sh`
//! (the side-by-side comparison against the reference servers), measured the way its load
//! generator measures them:
//!
//! - `bigroom-sat`   1 room × 500 members, 16 senders × 250 msg/s for 5 s: peak fan-out.
//! - `bigroom-10k/s` 1 × 500, 1 sender × 20/s for 5 s: latency at a moderate load.
//! - `manyrooms`     100 × 20, 2 senders per room × 50/s for 5 s: per-event overhead.
//! - `idle-10k`      100 × 100, nobody sends: connects per second, resident memory per connection.
//!
//! Two more are palaver's own:
//!
//! - `pipeline-1`    one connection pipelines 20,000 `sendMessage` frames without waiting:
//!   appends per second through one connection, and whether the `sent` answers keep their order.
//! - `catchup-100k`  a room of 100,000 events, read from seq 0 by one client: `joinRoom{after:0}`
//!   (the replay), then `getHistory` pages up to `head`; checks every seq arrives once, in order.
//!
//! Connections are opened 64 at a time, each joins its room and waits for `joined`. Latency is
//! send → receive of each `message` frame (the send time travels in the text). Every wait has a
//! deadline: a server that falls behind ends the scenario at its deadline, which prints what it
//! got (`delivered < expected`). All traffic stays on 127.0.0.1.

use futures_util::{SinkExt, StreamExt};
use hdrhistogram::Histogram;
use palaver::domain::{EventBody, Expect, RoomName, UserId};
use palaver::identity::Identity;
use palaver::store::sqlite::SqliteStore;
use serde_json::Value;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::net::TcpStream;
use tokio::time::timeout_at;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

const SECRET: &str = "bench-secret-0123456789abcdef0123456789";
/// Handshakes (and joins) in flight at once, as the reference load generator does.
const CONNECT_CONCURRENCY: usize = 64;
/// Bytes of filler after the timestamp in each message's text, as the reference sends.
const FILLER: usize = 32;
const PIPELINE_FRAMES: usize = 20_000;
const CATCHUP_EVENTS: u64 = 100_000;
const PAGE: usize = 500;

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;
type Fields = Vec<(&'static str, String)>;

#[derive(Clone, Copy)]
enum Scenario {
    /// ROOMS × MEMBERS connections; SENDERS members per room send RATE msgs/s for SECS.
    Messages {
        rooms: u64,
        members: u64,
        senders: u64,
        rate: u64,
        secs: u64,
    },
    /// ROOMS × MEMBERS connections, nobody sends.
    Idle {
        rooms: u64,
        members: u64,
    },
    Pipeline,
    Catchup,
}

const SCENARIOS: [(&str, Scenario); 6] = [
    (
        "bigroom-sat",
        Scenario::Messages {
            rooms: 1,
            members: 500,
            senders: 16,
            rate: 250,
            secs: 5,
        },
    ),
    (
        "bigroom-10k/s",
        Scenario::Messages {
            rooms: 1,
            members: 500,
            senders: 1,
            rate: 20,
            secs: 5,
        },
    ),
    (
        "manyrooms",
        Scenario::Messages {
            rooms: 100,
            members: 20,
            senders: 2,
            rate: 50,
            secs: 5,
        },
    ),
    (
        "idle-10k",
        Scenario::Idle {
            rooms: 100,
            members: 100,
        },
    ),
    ("pipeline-1", Scenario::Pipeline),
    ("catchup-100k", Scenario::Catchup),
];

fn main() {
    // `cargo bench` adds `--bench` (and may pass other flags): names are the bare arguments.
    let names: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    let unknown: Vec<&String> = names
        .iter()
        .filter(|n| !SCENARIOS.iter().any(|(name, _)| name == n))
        .collect();
    if !unknown.is_empty() {
        let known: Vec<&str> = SCENARIOS.iter().map(|(name, _)| *name).collect();
        eprintln!("unknown scenario {unknown:?}; known: {}", known.join(" "));
        std::process::exit(2);
    }
    let fd_limit = raise_fd_limit();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime");
    for (name, scenario) in SCENARIOS {
        if !names.is_empty() && !names.iter().any(|n| n == name) {
            continue;
        }
        if let Scenario::Idle { rooms, members } = scenario {
            // Both ends of every connection live on this machine: the bench holds one fd each.
            if fd_limit < rooms * members + 1024 {
                eprintln!(
                    "scenarios: {name}: the open-file limit is {fd_limit}, too low for {} \
                     connections; run scripts/bench (ulimit -n 65536)",
                    rooms * members
                );
            }
        }
        eprintln!("scenarios: {name} ...");
        let fields = runtime.block_on(run(name, scenario));
        println!("{}", json_line(name, fields));
    }
}

/// Raises this process's soft open-file limit to its hard limit (the server inherits it) and
/// returns the limit now in force.
fn raise_fd_limit() -> libc::rlim_t {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit only read and write the struct we pass.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
            return 1024;
        }
        if limit.rlim_cur < limit.rlim_max {
            let raised = libc::rlimit {
                rlim_cur: limit.rlim_max,
                rlim_max: limit.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                limit = raised;
            }
        }
    }
    limit.rlim_cur
}

fn json_line(name: &str, fields: Fields) -> String {
    let mut line = format!("{{\"scenario\":{}", Value::from(name));
    for (key, value) in fields {
        line.push_str(&format!(",\"{key}\":{value}"));
    }
    line.push('}');
    line
}

async fn run(name: &str, scenario: Scenario) -> Fields {
    let dir = tempfile::tempdir().expect("a temp dir");
    let db = dir.path().join("bench.db");
    let mut fill = Vec::new();
    if let Scenario::Catchup = scenario {
        match fill_room(&db).await {
            Ok(secs) => fill.push(("fill_s", format!("{secs:.2}"))),
            Err(e) => return failure(format!("filling the room: {e}")),
        }
    }
    let mut server = match Server::start(dir.path(), &db) {
        Ok(server) => server,
        Err(e) => return failure(e),
    };
    let result = match scenario {
        Scenario::Messages {
            rooms,
            members,
            senders,
            rate,
            secs,
        } => messages(&server, rooms, members, senders, rate, secs).await,
        Scenario::Idle { rooms, members } => idle(&server, rooms, members).await,
        Scenario::Pipeline => pipeline(&server).await,
        Scenario::Catchup => catchup(&server).await.map(|mut f| {
            f.extend(fill);
            f
        }),
    };
    server.stop();
    match result {
        Ok(fields) => fields,
        Err(e) => {
            eprintln!(
                "scenarios: {name} failed: {e}\n--- palaver serve logged, last lines:\n{}",
                server.log_tail(20)
            );
            failure(e)
        }
    }
}

fn failure(e: String) -> Fields {
    vec![("error", Value::from(e).to_string())]
}

/// A `palaver serve` child process on a SQLite file.
struct Server {
    child: Child,
    pid: u32,
    /// `127.0.0.1:PORT`
    addr: String,
    log: std::path::PathBuf,
}

impl Server {
    fn start(dir: &Path, db: &Path) -> Result<Server, String> {
        let log = dir.join("serve.log");
        let stderr = std::fs::File::create(&log).map_err(|e| format!("{}: {e}", log.display()))?;
        let mut child = Command::new(env!("CARGO_BIN_EXE_palaver"))
            .args(["serve", "--listen", "127.0.0.1:0", "--store"])
            .arg(format!("sqlite://{}", db.display()))
            .env("PALAVER_JWT_SECRET", SECRET)
            .env("PALAVER_RATE_LIMIT", "0")
            .env("RUST_LOG", "warn")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .map_err(|e| format!("palaver serve did not start: {e}"))?;
        let pid = child.id();
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        // Reads stdout to its end, so the server never blocks on a full pipe.
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some(rest) = line.strip_prefix("palaver is listening on http://") {
                    let _ = tx.send(rest.split_whitespace().next().unwrap_or("").to_owned());
                }
            }
        });
        let mut server = Server {
            child,
            pid,
            addr: String::new(),
            log,
        };
        match rx.recv_timeout(Duration::from_secs(30)) {
            Ok(addr) => {
                server.addr = addr;
                Ok(server)
            }
            Err(_) => {
                server.stop();
                Err(format!(
                    "palaver serve did not start listening within 30 s:\n{}",
                    server.log_tail(20)
                ))
            }
        }
    }

    fn url(&self, user: &str) -> String {
        let token = Identity::new(SECRET.as_bytes()).issue(
            &UserId::parse(user).expect("a valid user id"),
            Duration::from_secs(3600),
        );
        format!("ws://{}/?token={token}", self.addr)
    }

    /// Resident memory in bytes (VmRSS in /proc/PID/status).
    fn rss_bytes(&self) -> Option<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid)).ok()?;
        let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
        let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
        Some(kb * 1024)
    }

    /// SIGTERM, then SIGKILL if it has not exited within 5 s.
    fn stop(&mut self) {
        if let Ok(Some(_)) = self.child.try_wait() {
            return;
        }
        // SAFETY: signals our own child, whose pid we have not reaped yet.
        unsafe {
            libc::kill(self.pid as libc::pid_t, libc::SIGTERM);
        }
        let until = Instant::now() + Duration::from_secs(5);
        while Instant::now() < until {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    fn log_tail(&self, n: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Opens a connection as `user`, joins `room` (with `after`, if given) and waits for `joined`.
/// Returns the socket and what arrived before `joined` (replayed and pushed frames).
async fn connect_and_join(
    server: &Server,
    user: &str,
    room: &str,
    after: Option<u64>,
    deadline: tokio::time::Instant,
) -> Result<(Ws, Vec<String>, Value), String> {
    let url = server.url(user);
    let (mut ws, _) = timeout_at(deadline, tokio_tungstenite::connect_async(&url))
        .await
        .map_err(|_| format!("{user}: handshake timed out"))?
        .map_err(|e| format!("{user}: handshake failed: {e}"))?;
    let join = match after {
        Some(after) => format!(r#"{{"action":"joinRoom","room":"{room}","after":{after}}}"#),
        None => format!(r#"{{"action":"joinRoom","room":"{room}"}}"#),
    };
    timeout_at(deadline, ws.send(Message::text(join)))
        .await
        .map_err(|_| format!("{user}: joinRoom timed out"))?
        .map_err(|e| format!("{user}: joinRoom failed: {e}"))?;
    let mut before = Vec::new();
    loop {
        match timeout_at(deadline, ws.next()).await {
            Err(_) => {
                return Err(format!(
                    "{user}: no `joined` answer in time ({} frames before it)",
                    before.len()
                ));
            }
            Ok(Some(Ok(Message::Text(t)))) => {
                if t.contains(r#""type":"joined""#) {
                    let joined = serde_json::from_str(t.as_str()).map_err(|e| e.to_string())?;
                    return Ok((ws, before, joined));
                }
                if t.contains(r#""type":"error""#) {
                    return Err(format!("{user}: joinRoom answered {t}"));
                }
                before.push(t.as_str().to_owned());
            }
            Ok(Some(Ok(_))) => continue,
            Ok(other) => return Err(format!("{user}: closed while joining: {other:?}")),
        }
    }
}

/// ROOMS × MEMBERS connections, [`CONNECT_CONCURRENCY`] at a time, each joined to its room
/// (`room{r}`, users `u{r}x{m}`). Returns them with their room and member index, and the seconds
/// it took.
async fn connect_all(
    server: &Server,
    rooms: u64,
    members: u64,
) -> Result<(Vec<(String, u64, Ws)>, f64), String> {
    let n = rooms * members;
    let deadline =
        tokio::time::Instant::now() + Duration::from_secs(60) + Duration::from_millis(10 * n);
    let started = Instant::now();
    let plan: Vec<(u64, u64)> = (0..rooms)
        .flat_map(|r| (0..members).map(move |m| (r, m)))
        .collect();
    let results: Vec<Result<(String, u64, Ws), String>> = futures_util::stream::iter(plan)
        .map(|(r, m)| async move {
            let room = format!("room{r}");
            let (ws, _, _) =
                connect_and_join(server, &format!("u{r}x{m}"), &room, None, deadline).await?;
            Ok((room, m, ws))
        })
        .buffer_unordered(CONNECT_CONCURRENCY)
        .collect()
        .await;
    let connect_s = started.elapsed().as_secs_f64();
    let mut conns = Vec::with_capacity(results.len());
    let mut failed = Vec::new();
    for r in results {
        match r {
            Ok(c) => conns.push(c),
            Err(e) => failed.push(e),
        }
    }
    if !failed.is_empty() {
        return Err(format!(
            "{} of {n} connections did not join within the deadline ({connect_s:.1} s); first: {}",
            failed.len(),
            failed[0]
        ));
    }
    Ok((conns, connect_s))
}

#[derive(Default)]
struct Stats {
    sent: AtomicU64,
    acked: AtomicU64,
    delivered: AtomicU64,
    errors: AtomicU64,
    last_delivery_us: AtomicU64,
}

/// The reference load generator's run: see the module docs.
async fn messages(
    server: &Server,
    rooms: u64,
    members: u64,
    senders: u64,
    rate: u64,
    secs: u64,
) -> Result<Fields, String> {
    let base = Instant::now();
    let (conns, connect_s) = connect_all(server, rooms, members).await?;
    tokio::time::sleep(Duration::from_millis(500)).await;

    let stats = Arc::new(Stats::default());
    let hist = Arc::new(Mutex::new(
        Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("histogram bounds"),
    ));
    let filler = "x".repeat(FILLER);
    let t0 = Instant::now();
    let send_end = tokio::time::Instant::now() + Duration::from_secs(secs);
    let mut tasks = Vec::new();
    for (room, m, ws) in conns {
        let (mut tx, mut rx) = ws.split();
        let (stats2, hist2) = (stats.clone(), hist.clone());
        tasks.push(tokio::spawn(async move {
            while let Some(Ok(msg)) = rx.next().await {
                let Message::Text(t) = msg else { continue };
                // Scanning instead of parsing, so the client costs as little as it can.
                if t.contains(r#""type":"message""#) {
                    let now = base.elapsed().as_micros() as u64;
                    if let Some(i) = t.find(r#""text":""#) {
                        let digits: String = t[i + 8..]
                            .chars()
                            .take_while(|c| c.is_ascii_digit())
                            .collect();
                        if let Ok(ts) = digits.parse::<u64>() {
                            hist2
                                .lock()
                                .unwrap()
                                .saturating_record(now.saturating_sub(ts).max(1));
                        }
                    }
                    stats2.delivered.fetch_add(1, Relaxed);
                    stats2.last_delivery_us.fetch_max(now, Relaxed);
                } else if t.contains(r#""type":"sent""#) {
                    stats2.acked.fetch_add(1, Relaxed);
                } else if t.contains(r#""type":"error""#) {
                    stats2.errors.fetch_add(1, Relaxed);
                }
            }
        }));
        if m < senders {
            let (stats3, filler) = (stats.clone(), filler.clone());
            tasks.push(tokio::spawn(async move {
                let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / rate as f64));
                while tokio::time::Instant::now() < send_end {
                    tick.tick().await;
                    let ts = base.elapsed().as_micros() as u64;
                    let frame = format!(
                        r#"{{"action":"sendMessage","room":"{room}","text":"{ts}:{filler}"}}"#
                    );
                    match timeout_at(send_end, tx.send(Message::text(frame))).await {
                        Ok(Ok(())) => stats3.sent.fetch_add(1, Relaxed),
                        _ => break,
                    };
                }
                // Keeps the write half (and so the connection) until the run is over.
                std::future::pending::<()>().await;
            }));
        }
    }
    let expected_of = |sent: u64| sent * members;
    let deadline = Instant::now() + Duration::from_secs(secs + 20);
    loop {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let done = t0.elapsed() >= Duration::from_secs(secs)
            && stats.delivered.load(Relaxed) >= expected_of(stats.sent.load(Relaxed));
        if done || Instant::now() > deadline {
            break;
        }
    }
    for task in &tasks {
        task.abort();
    }
    let sent = stats.sent.load(Relaxed);
    let delivered = stats.delivered.load(Relaxed);
    let span =
        stats.last_delivery_us.load(Relaxed) as f64 / 1e6 - t0.duration_since(base).as_secs_f64();
    let h = hist.lock().unwrap();
    Ok(vec![
        ("connections", (rooms * members).to_string()),
        ("connect_s", format!("{connect_s:.2}")),
        ("sent", sent.to_string()),
        ("acked", stats.acked.load(Relaxed).to_string()),
        ("delivered", delivered.to_string()),
        ("expected", expected_of(sent).to_string()),
        (
            "deliveries_per_s",
            format!("{:.0}", delivered as f64 / span.max(1e-9)),
        ),
        ("p50_us", h.value_at_quantile(0.5).to_string()),
        ("p99_us", h.value_at_quantile(0.99).to_string()),
        ("max_us", h.max().to_string()),
        ("errors", stats.errors.load(Relaxed).to_string()),
    ])
}

/// Connects ROOMS × MEMBERS, everyone joined and reading, nobody sending; resident memory of the
/// server before and after, as `run.sh` measures it (2 s after the last connection is open).
async fn idle(server: &Server, rooms: u64, members: u64) -> Result<Fields, String> {
    let n = rooms * members;
    let before = server.rss_bytes().ok_or("cannot read the server's VmRSS")?;
    let (conns, connect_s) = connect_all(server, rooms, members).await?;
    // Read (and drop) whatever is pushed, as the load generator's readers do.
    let readers: Vec<_> = conns
        .into_iter()
        .map(|(_, _, mut ws)| {
            tokio::spawn(async move { while let Some(Ok(_)) = ws.next().await {} })
        })
        .collect();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after = server.rss_bytes().ok_or("cannot read the server's VmRSS")?;
    for r in &readers {
        r.abort();
    }
    Ok(vec![
        ("connections", n.to_string()),
        ("connect_s", format!("{connect_s:.2}")),
        (
            "connects_per_s",
            format!("{:.0}", n as f64 / (connect_s + 1e-9)),
        ),
        (
            "rss_per_connection_bytes",
            (after.saturating_sub(before) / n).to_string(),
        ),
    ])
}

/// One connection writes [`PIPELINE_FRAMES`] `sendMessage` frames without waiting and counts the
/// `sent` answers: appends per second through one connection, and whether the answers come back
/// in the order the frames went out (seq and clientMsgId both increasing).
async fn pipeline(server: &Server) -> Result<Fields, String> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(90);
    let (ws, _, _) = connect_and_join(server, "piper", "pipe", None, deadline).await?;
    let (mut tx, mut rx) = ws.split();
    let started = Instant::now();
    let writer = tokio::spawn(async move {
        let mut written = 0u64;
        for i in 0..PIPELINE_FRAMES {
            let frame = format!(
                r#"{{"action":"sendMessage","room":"pipe","text":"pipelined {i}","clientMsgId":"c{i}"}}"#
            );
            match timeout_at(deadline, tx.feed(Message::text(frame))).await {
                Ok(Ok(())) => written += 1,
                _ => break,
            }
            if i % 64 == 63 && !matches!(timeout_at(deadline, tx.flush()).await, Ok(Ok(()))) {
                break;
            }
        }
        let _ = timeout_at(deadline, tx.flush()).await;
        (written, tx)
    });
    let (mut acked, mut errors, mut in_order) = (0u64, 0u64, true);
    let (mut last_seq, mut last_index) = (0u64, -1i64);
    let mut last_ack = started;
    let mut first_error = None;
    let mut ended = "complete".to_owned();
    while acked + errors < PIPELINE_FRAMES as u64 {
        let t = match timeout_at(deadline, rx.next()).await {
            Ok(Some(Ok(Message::Text(t)))) => t,
            Ok(Some(Ok(Message::Close(frame)))) => {
                ended = format!("closed by the server: {frame:?}");
                break;
            }
            Ok(Some(Ok(_))) => continue,
            Ok(other) => {
                ended = format!("connection ended: {other:?}");
                break;
            }
            Err(_) => {
                ended = "deadline".to_owned();
                break;
            }
        };
        if t.contains(r#""type":"sent""#) {
            let v: Value = serde_json::from_str(t.as_str()).map_err(|e| e.to_string())?;
            let seq = v["seq"].as_u64().unwrap_or(0);
            let index = v["clientMsgId"]
                .as_str()
                .and_then(|c| c.strip_prefix('c'))
                .and_then(|i| i.parse::<i64>().ok())
                .unwrap_or(-1);
            in_order &= seq > last_seq && index > last_index;
            (last_seq, last_index) = (seq, index);
            acked += 1;
            last_ack = Instant::now();
        } else if t.contains(r#""type":"error""#) {
            errors += 1;
            first_error.get_or_insert_with(|| t.as_str().to_owned());
        }
    }
    let secs = last_ack.duration_since(started).as_secs_f64();
    let written = match timeout_at(deadline, writer).await {
        Ok(Ok((written, _tx))) => written,
        _ => 0,
    };
    if let Some(e) = first_error {
        eprintln!("scenarios: pipeline-1: {errors} error answers, the first: {e}");
    }
    if ended != "complete" {
        eprintln!(
            "scenarios: pipeline-1 stopped after {acked} answers: {ended}\n--- palaver serve logged, last lines:\n{}",
            server.log_tail(5)
        );
    }
    Ok(vec![
        ("frames", PIPELINE_FRAMES.to_string()),
        ("sent", written.to_string()),
        ("acked", acked.to_string()),
        ("errors", errors.to_string()),
        ("secs", format!("{secs:.2}")),
        (
            "appends_per_s",
            format!("{:.0}", acked as f64 / secs.max(1e-9)),
        ),
        ("in_order", in_order.to_string()),
        ("complete", (ended == "complete").to_string()),
    ])
}

/// Fills room `big` with [`CATCHUP_EVENTS`] events straight through the store, before the server
/// starts: seq 1 is `reader` joining (so the client's own join appends nothing), the rest are
/// messages appended from many tasks at once (group commit). Returns the seconds it took.
async fn fill_room(db: &Path) -> Result<f64, String> {
    let started = Instant::now();
    let sqlite = SqliteStore::open(db.to_str().ok_or("a non-UTF-8 temp path")?)
        .await
        .map_err(|e| e.to_string())?;
    let store = sqlite.store();
    let room = RoomName::parse("big").expect("a valid room");
    let reader = UserId::parse("reader").expect("a valid user");
    store
        .log
        .append(
            EventBody::Joined {
                room: room.clone(),
                user: reader,
            },
            Expect::Next,
        )
        .await
        .map_err(|e| e.to_string())?;
    let next = Arc::new(AtomicUsize::new(1));
    let writers: Vec<_> = (0..256)
        .map(|w| {
            let (log, room, next) = (store.log.clone(), room.clone(), next.clone());
            tokio::spawn(async move {
                let user = UserId::parse(&format!("w{w}")).expect("a valid user");
                loop {
                    let i = next.fetch_add(1, Relaxed);
                    if i as u64 >= CATCHUP_EVENTS {
                        return Ok::<(), String>(());
                    }
                    let body = EventBody::MessagePosted {
                        room: room.clone(),
                        user: user.clone(),
                        text: format!("message {i} from writer {w}, about sixty bytes long"),
                        client_msg_id: None,
                        connection: None,
                    };
                    log.append(body, Expect::Next)
                        .await
                        .map_err(|e| e.to_string())?;
                }
            })
        })
        .collect();
    let limit = tokio::time::Instant::now() + Duration::from_secs(300);
    for w in writers {
        timeout_at(limit, w)
            .await
            .map_err(|_| "the fill took over 300 s".to_owned())?
            .map_err(|e| e.to_string())??;
    }
    drop(store);
    drop(sqlite);
    // Lets the pool and the committer close the file before the server opens it.
    tokio::time::sleep(Duration::from_millis(200)).await;
    Ok(started.elapsed().as_secs_f64())
}

/// Checks each event of a replay or history page: seqs must run 1, 2, 3, … with none missing
/// or repeated.
struct Catchup {
    last: u64,
    received: u64,
    in_order: bool,
}

impl Catchup {
    fn event(&mut self, frame: &Value) {
        if let Some(seq) = frame["seq"].as_u64() {
            self.in_order &= seq == self.last + 1;
            self.last = self.last.max(seq);
            self.received += 1;
        }
    }
}

/// One client reads room `big` from the start: `joinRoom{after:0}`, whose replay may hold every
/// event or only the first page, then `getHistory` pages from the last seq seen up to `head`.
async fn catchup(server: &Server) -> Result<Fields, String> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(180);
    let started = Instant::now();
    let mut seen = Catchup {
        last: 0,
        received: 0,
        in_order: true,
    };
    let mut stalled = None;
    let (mut ws, _) = timeout_at(
        deadline,
        tokio_tungstenite::connect_async(server.url("reader")),
    )
    .await
    .map_err(|_| "reader: handshake timed out".to_owned())?
    .map_err(|e| format!("reader: handshake failed: {e}"))?;
    let join = r#"{"action":"joinRoom","room":"big","after":0}"#;
    timeout_at(deadline, ws.send(Message::text(join)))
        .await
        .map_err(|_| "reader: joinRoom timed out".to_owned())?
        .map_err(|e| format!("reader: joinRoom failed: {e}"))?;
    // The replay (every event, or the first page of them), then `joined`.
    let mut head = None;
    while head.is_none() {
        match timeout_at(deadline, ws.next()).await {
            Ok(Some(Ok(Message::Text(t)))) => {
                let frame: Value = serde_json::from_str(t.as_str()).map_err(|e| e.to_string())?;
                match frame["type"].as_str() {
                    Some("joined") => head = frame["head"].as_u64(),
                    Some("error") => {
                        stalled = Some(format!("joinRoom answered {t}"));
                        break;
                    }
                    _ => seen.event(&frame),
                }
            }
            Ok(Some(Ok(_))) => continue,
            Ok(other) => {
                stalled = Some(format!("connection ended during the replay: {other:?}"));
                break;
            }
            Err(_) => {
                stalled = Some("no `joined` answer in time".to_owned());
                break;
            }
        }
    }
    let replayed = seen.received;
    let mut pages = 0u64;
    while stalled.is_none() && seen.last < head.unwrap_or(0) {
        let ask = format!(
            r#"{{"action":"getHistory","room":"big","after":{},"limit":{PAGE}}}"#,
            seen.last
        );
        if !matches!(
            timeout_at(deadline, ws.send(Message::text(ask))).await,
            Ok(Ok(()))
        ) {
            stalled = Some("getHistory could not be sent in time".to_owned());
            break;
        }
        let page = loop {
            match timeout_at(deadline, ws.next()).await {
                Ok(Some(Ok(Message::Text(t)))) if t.contains(r#""type":"history""#) => {
                    break Some(
                        serde_json::from_str::<Value>(t.as_str()).map_err(|e| e.to_string())?,
                    );
                }
                Ok(Some(Ok(Message::Text(t)))) if t.contains(r#""type":"error""#) => {
                    stalled = Some(format!("getHistory answered {t}"));
                    break None;
                }
                Ok(Some(Ok(_))) => continue,
                _ => break None,
            }
        };
        let Some(page) = page else {
            stalled.get_or_insert_with(|| "no history answer in time".to_owned());
            break;
        };
        pages += 1;
        let events = page["events"].as_array().map(Vec::as_slice).unwrap_or(&[]);
        if events.is_empty() {
            stalled = Some("an empty history page below head".to_owned());
            break;
        }
        for e in events {
            seen.event(e);
        }
    }
    let secs = started.elapsed().as_secs_f64();
    if let Some(why) = &stalled {
        eprintln!(
            "scenarios: catchup-100k stopped at seq {}: {why}\n--- palaver serve logged, last lines:\n{}",
            seen.last,
            server.log_tail(5)
        );
    }
    let complete = seen.in_order && seen.received == CATCHUP_EVENTS && seen.last == CATCHUP_EVENTS;
    Ok(vec![
        ("events", CATCHUP_EVENTS.to_string()),
        ("head", head.map_or("null".to_owned(), |h| h.to_string())),
        ("received", seen.received.to_string()),
        ("replayed", replayed.to_string()),
        ("pages", pages.to_string()),
        ("secs", format!("{secs:.2}")),
        (
            "events_per_s",
            format!("{:.0}", seen.received as f64 / secs.max(1e-9)),
        ),
        ("in_order", complete.to_string()),
        ("complete", stalled.is_none().to_string()),
    ])
}
