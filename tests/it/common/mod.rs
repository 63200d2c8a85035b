//! Test harness: a real `palaver serve` process and real WebSocket clients.
#![allow(dead_code)]

use futures_util::{SinkExt, StreamExt};
use palaver::domain::UserId;
use palaver::identity::Identity;
use serde_json::{Value, json};
use std::collections::VecDeque;
use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream, connect_async};

pub const SECRET: &str = "test-secret-for-palaver-0123456789abcdef";
pub const ADMIN: &str = "test-admin-token";
/// How long a test waits for a frame it expects.
pub const WAIT: Duration = Duration::from_secs(10);

/// Fresh DynamoDB tables (`palaver init` on a new prefix) on the DynamoDB that the test
/// command's AWS environment names (`AWS_ENDPOINT_URL`, credentials, region); their store URL.
/// No endpoint is a failure, never a skip.
pub fn dynamodb_store() -> String {
    assert!(
        std::env::var("AWS_ENDPOINT_URL").is_ok_and(|url| !url.is_empty()),
        "PALAVER_TEST_STORE=dynamodb needs AWS_ENDPOINT_URL pointing at a DynamoDB (the moto \
             server scripts/test starts): run scripts/test, or start `moto_server` and export \
             AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY and AWS_REGION"
    );
    let prefix = format!("ws-{}", ulid::Ulid::new().to_string().to_lowercase());
    let store = format!("dynamodb://{prefix}");
    let init = cli(&store, &["init"]);
    assert!(
        init.status.success(),
        "palaver init --store {store} failed: {}{}",
        String::from_utf8_lossy(&init.stdout),
        String::from_utf8_lossy(&init.stderr)
    );
    store
}

/// A running `palaver serve`.
pub struct Server {
    child: Child,
    /// `127.0.0.1:PORT`
    pub addr: String,
    pub store: String,
    /// `PALAVER_NODE_ID`: kept by [`Server::restart_after_kill9`], as a node's name is.
    pub node: String,
    pub dir: tempfile::TempDir,
    pub stdout: Arc<Mutex<Vec<String>>>,
    /// What the server logged (`RUST_LOG=palaver=debug`), shown when a test fails.
    pub stderr: Arc<Mutex<Vec<String>>>,
}

/// How to start a server beyond its store and environment.
#[derive(Default)]
pub struct Launch {
    /// `--listen`; 127.0.0.1:0 unless set.
    pub listen: Option<String>,
    /// The most files (sockets included) the process may hold open (`ulimit -n`).
    pub open_files: Option<u64>,
}

/// The stores a suite can run against, picked with `PALAVER_TEST_STORE`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TestStore {
    /// The default: a fresh SQLite file.
    Sqlite,
    /// `memory://`: nothing outside the server process can read it.
    Memory,
    /// Fresh tables under a new prefix on the DynamoDB that `AWS_ENDPOINT_URL` names (the moto
    /// server `scripts/test` starts).
    DynamoDb,
}

impl TestStore {
    /// The store `PALAVER_TEST_STORE` names: `sqlite` (the default), `memory` or `dynamodb`.
    pub fn from_env() -> TestStore {
        match std::env::var("PALAVER_TEST_STORE").as_deref() {
            Ok("sqlite") | Ok("") | Err(_) => TestStore::Sqlite,
            Ok("memory") => TestStore::Memory,
            Ok("dynamodb") => TestStore::DynamoDb,
            Ok(other) => panic!(
                "PALAVER_TEST_STORE={other} is not a store this suite knows (sqlite, memory, dynamodb)"
            ),
        }
    }
}

impl Server {
    /// A server on the store the suite runs against: `PALAVER_TEST_STORE` (`sqlite`, the
    /// default, `memory`, or `dynamodb`).
    pub fn start() -> Server {
        Server::start_with(&[])
    }

    /// [`Server::start`] with more environment for `palaver serve` (settings).
    pub fn start_with(env: &[(&str, &str)]) -> Server {
        let dir = tempfile::tempdir().expect("temp dir");
        match TestStore::from_env() {
            TestStore::Sqlite => {
                let store = format!("sqlite://{}", dir.path().join("palaver.db").display());
                Server::start_with_env(dir, &store, env)
            }
            TestStore::Memory => Server::start_with_env(dir, "memory://", env),
            TestStore::DynamoDb => {
                let store = dynamodb_store();
                Server::start_with_env(dir, &store, env)
            }
        }
    }

    /// A server on the suite's store if another process can read that store (SQLite,
    /// DynamoDB), for tests that check it with the operator commands; on SQLite otherwise.
    pub fn start_readable() -> Server {
        Server::start_readable_with(&[])
    }

    /// [`Server::start_readable`] with more environment for `palaver serve`.
    pub fn start_readable_with(env: &[(&str, &str)]) -> Server {
        match TestStore::from_env() {
            TestStore::Memory => {
                let dir = tempfile::tempdir().expect("temp dir");
                let store = format!("sqlite://{}", dir.path().join("palaver.db").display());
                Server::start_with_env(dir, &store, env)
            }
            _ => Server::start_with(env),
        }
    }

    /// A server on a fresh SQLite file (for tests that reach into the file).
    pub fn start_sqlite() -> Server {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = format!("sqlite://{}", dir.path().join("palaver.db").display());
        Server::start_on(dir, &store)
    }

    /// A server on fresh DynamoDB tables: `palaver init`, then `palaver serve`, on a new
    /// prefix, reached through the AWS environment of the test command (`AWS_ENDPOINT_URL`,
    /// credentials, region). No endpoint is a failure, never a skip.
    pub fn start_dynamodb() -> Server {
        let store = dynamodb_store();
        Server::start_on(tempfile::tempdir().expect("temp dir"), &store)
    }

    /// A server on `store`, keeping `dir` alive as long as the server.
    pub fn start_on(dir: tempfile::TempDir, store: &str) -> Server {
        Server::start_with_env(dir, store, &[])
    }

    pub fn start_with_env(dir: tempfile::TempDir, store: &str, env: &[(&str, &str)]) -> Server {
        Server::start_as(dir, store, &Launch::default(), env)
    }

    /// A server on a fresh SQLite file started as `launch` says (another address to listen on,
    /// fewer file descriptors), with more environment.
    pub fn start_launched(launch: &Launch, env: &[(&str, &str)]) -> Server {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = format!("sqlite://{}", dir.path().join("palaver.db").display());
        Server::start_as(dir, &store, launch, env)
    }

    fn start_as(
        dir: tempfile::TempDir,
        store: &str,
        launch: &Launch,
        env: &[(&str, &str)],
    ) -> Server {
        let mut command = Command::new(env!("CARGO_BIN_EXE_palaver"));
        if let Some(limit) = launch.open_files {
            use std::os::unix::process::CommandExt;
            // SAFETY: setrlimit is async-signal-safe, and nothing else runs between fork and exec.
            unsafe {
                command.pre_exec(move || {
                    let limit = libc::rlimit {
                        rlim_cur: limit,
                        rlim_max: limit,
                    };
                    if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) == 0 {
                        Ok(())
                    } else {
                        Err(std::io::Error::last_os_error())
                    }
                });
            }
        }
        let listen = launch.listen.as_deref().unwrap_or("127.0.0.1:0");
        command
            .args(["serve", "--listen", listen, "--store", store])
            .env("PALAVER_JWT_SECRET", SECRET)
            .env("PALAVER_ADMIN_TOKEN", ADMIN)
            .env("RUST_LOG", "palaver=debug")
            .env("NO_COLOR", "1")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let node = env
            .iter()
            .find(|(k, _)| *k == "PALAVER_NODE_ID")
            .map_or_else(
                || format!("node-{}", ulid::Ulid::new()),
                |(_, v)| v.to_string(),
            );
        command.env("PALAVER_NODE_ID", &node);
        for (k, v) in env {
            command.env(k, v);
        }
        let mut child = command.spawn().expect("palaver serve starts");
        let stderr = collect(child.stderr.take().expect("piped stderr"), |_| {});
        let (tx, rx) = std::sync::mpsc::channel();
        let stdout = collect(child.stdout.take().expect("piped stdout"), move |line| {
            if let Some(rest) = line.strip_prefix("palaver is listening on http://") {
                let _ = tx.send(rest.split_whitespace().next().unwrap_or("").to_owned());
            }
        });
        let addr = match rx.recv_timeout(Duration::from_secs(30)) {
            Ok(addr) => addr,
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "palaver serve --store {store} did not print its address:\n{}",
                    last_lines(&stderr, 40)
                );
            }
        };
        Server {
            child,
            addr,
            store: store.to_owned(),
            node,
            dir,
            stdout,
            stderr,
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The port the server listens on.
    pub fn port(&self) -> u16 {
        self.addr
            .rsplit(':')
            .next()
            .and_then(|port| port.parse().ok())
            .expect("the address ends in a port")
    }

    /// The server's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The sockets the server process holds open (its listener among them), from /proc.
    pub fn open_sockets(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.pid()))
            .expect("the server's /proc/PID/fd")
            .filter_map(|entry| std::fs::read_link(entry.ok()?.path()).ok())
            .filter(|target| target.to_string_lossy().starts_with("socket:"))
            .count()
    }

    /// The server process's resident memory in KiB, from /proc.
    pub fn rss_kib(&self) -> u64 {
        rss_kib(self.pid()).expect("VmRSS in the server's /proc/PID/status")
    }

    pub fn token(&self, user: &str) -> String {
        token(user)
    }

    /// Connects as `user` with a valid token.
    pub async fn connect(&self, user: &str) -> Client {
        Client::connect(&format!("ws://{}/?token={}", self.addr, token(user)), user)
            .await
            .expect("handshake accepted")
    }

    /// Kills the process without warning (SIGKILL).
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Sends `signal` (SIGTERM, SIGINT) and waits for the process to exit: its exit status.
    pub fn stop_with(&mut self, signal: i32) -> std::process::ExitStatus {
        // SAFETY: kill(2) on our own child's pid.
        let sent = unsafe { libc::kill(self.child.id() as i32, signal) };
        assert_eq!(sent, 0, "kill({signal})");
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self.child.try_wait().expect("waitpid") {
                return status;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the server did not exit within 30 s of signal {signal}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Kills the process with SIGKILL and starts a new one on the same store.
    pub fn restart_after_kill9(mut self) -> Server {
        self.kill9();
        let dir = std::mem::replace(&mut self.dir, tempfile::tempdir().expect("temp dir"));
        Server::start_with_env(dir, &self.store.clone(), &[("PALAVER_NODE_ID", &self.node)])
    }

    /// Runs a `palaver` operator command against this server's store.
    pub fn cli(&self, args: &[&str]) -> Output {
        cli(&self.store, args)
    }

    pub fn db_path(&self) -> PathBuf {
        self.dir.path().join("palaver.db")
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!(
                "--- palaver serve --store {} logged, last lines:\n{}",
                self.store,
                last_lines(&self.stderr, 60)
            );
        }
    }
}

/// Process `pid`'s resident memory in KiB (`VmRSS` in /proc/PID/status), while it runs.
pub fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|value| value.trim().trim_end_matches("kB").trim().parse().ok())
}

/// Reads `pipe` line by line on a thread of its own, into the returned list, calling `each`
/// with every line.
fn collect(
    pipe: impl std::io::Read + Send + 'static,
    each: impl Fn(&str) + Send + 'static,
) -> Arc<Mutex<Vec<String>>> {
    let lines = Arc::new(Mutex::new(Vec::new()));
    let seen = lines.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(pipe).lines().map_while(Result::ok) {
            each(&line);
            seen.lock().unwrap_or_else(|p| p.into_inner()).push(line);
        }
    });
    lines
}

fn last_lines(lines: &Mutex<Vec<String>>, n: usize) -> String {
    let lines = lines.lock().unwrap_or_else(|p| p.into_inner());
    lines[lines.len().saturating_sub(n)..].join("\n")
}

pub fn token(user: &str) -> String {
    Identity::new(SECRET.as_bytes()).issue(
        &UserId::parse(user).expect("valid test user"),
        Duration::from_secs(3600),
    )
}

/// Runs `palaver ARGS --store STORE` and returns its output.
pub fn cli(store: &str, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_palaver"))
        .args(args)
        .args(["--store", store])
        .env("PALAVER_JWT_SECRET", SECRET)
        .output()
        .expect("palaver runs")
}

/// A WebSocket client that keeps pushed frames (message, member, presence) apart from answers.
pub struct Client {
    pub user: String,
    ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
    pushed: VecDeque<Value>,
}

const ANSWERS: [&str; 5] = ["joined", "left", "sent", "history", "error"];

impl Client {
    pub async fn connect(
        url: &str,
        user: &str,
    ) -> Result<Client, tokio_tungstenite::tungstenite::Error> {
        let (ws, _) = connect_async(url).await?;
        Ok(Client {
            user: user.to_owned(),
            ws,
            pushed: VecDeque::new(),
        })
    }

    pub async fn send(&mut self, frame: Value) {
        self.send_text(&frame.to_string()).await;
    }

    pub async fn send_binary(&mut self, bytes: Vec<u8>) {
        self.ws
            .send(Message::Binary(bytes.into()))
            .await
            .expect("frame sent");
    }

    pub async fn send_text(&mut self, text: &str) {
        self.ws.send(Message::text(text)).await.expect("frame sent");
    }

    /// The next frame of any kind, in arrival order.
    pub async fn recv(&mut self) -> Value {
        if let Some(frame) = self.pushed.pop_front() {
            return frame;
        }
        self.read().await.expect("a frame arrives in time")
    }

    /// Reads one frame off the socket; `None` after WAIT.
    async fn read(&mut self) -> Option<Value> {
        self.read_within(WAIT).await
    }

    async fn read_within(&mut self, wait: Duration) -> Option<Value> {
        loop {
            match tokio::time::timeout(wait, self.ws.next()).await {
                Err(_) => return None,
                Ok(None) => panic!("{}: connection closed", self.user),
                Ok(Some(Err(e))) => panic!("{}: socket error {e}", self.user),
                Ok(Some(Ok(Message::Text(t)))) => {
                    return Some(serde_json::from_str(t.as_str()).expect("frames are JSON"));
                }
                Ok(Some(Ok(Message::Close(frame)))) => panic!("{}: closed {frame:?}", self.user),
                Ok(Some(Ok(_))) => continue,
            }
        }
    }

    /// Sends `frame` and returns its answer (joined, left, sent, history or error), keeping
    /// pushed frames that arrive meanwhile for [`Client::pushed`].
    pub async fn request(&mut self, frame: Value) -> Value {
        self.send(frame).await;
        self.answer().await
    }

    pub async fn answer(&mut self) -> Value {
        loop {
            let frame = self.read().await.expect("an answer arrives in time");
            if ANSWERS.contains(&frame["type"].as_str().unwrap_or("")) {
                return frame;
            }
            self.pushed.push_back(frame);
        }
    }

    /// The next pushed frame.
    pub async fn pushed(&mut self) -> Value {
        let frame = self.recv().await;
        assert!(
            !ANSWERS.contains(&frame["type"].as_str().unwrap_or("")),
            "{}: expected a pushed frame, got answer {frame}",
            self.user
        );
        frame
    }

    /// Every pushed frame before the first that `marker` accepts (which is consumed): what came
    /// ahead of a marker sent after an action, to show that the action sent nothing wrong.
    pub async fn pushed_until(&mut self, marker: impl Fn(&Value) -> bool) -> Vec<Value> {
        let mut before = Vec::new();
        loop {
            let frame = self.pushed().await;
            if marker(&frame) {
                return before;
            }
            before.push(frame);
        }
    }

    /// The next pushed frame of `kind`, skipping others (presence, say).
    pub async fn pushed_of(&mut self, kind: &str) -> Value {
        loop {
            let frame = self.pushed().await;
            if frame["type"] == kind {
                return frame;
            }
        }
    }

    /// Whatever arrives within `wait` (none expected in most uses).
    pub async fn drain(&mut self, wait: Duration) -> Vec<Value> {
        let mut frames: Vec<Value> = self.pushed.drain(..).collect();
        while let Some(frame) = self.read_within(wait).await {
            frames.push(frame);
        }
        frames
    }

    pub async fn join(&mut self, room: &str) -> Value {
        let answer = self
            .request(json!({"action": "joinRoom", "room": room}))
            .await;
        assert_eq!(answer["type"], "joined", "{answer}");
        answer
    }

    /// Joins `room` asking for what came after `after`: the room frames replayed before the
    /// `joined` answer, and the answer.
    pub async fn rejoin_after(&mut self, room: &str, after: u64) -> (Vec<Value>, Value) {
        self.send(json!({"action": "joinRoom", "room": room, "after": after}))
            .await;
        let mut replay = Vec::new();
        loop {
            let frame = self.recv().await;
            match frame["type"].as_str() {
                Some("joined") => return (replay, frame),
                Some("message" | "member") => replay.push(frame),
                _ => {}
            }
        }
    }

    pub async fn say(&mut self, room: &str, text: &str) -> Value {
        let answer = self
            .request(json!({"action": "sendMessage", "room": room, "text": text}))
            .await;
        assert_eq!(answer["type"], "sent", "{answer}");
        answer
    }

    pub async fn close(mut self) {
        let _ = self.ws.close(None).await;
        // Read until the server's close frame so the close is complete.
        let _ = tokio::time::timeout(Duration::from_secs(2), async {
            while let Some(Ok(_)) = self.ws.next().await {}
        })
        .await;
    }

    /// Waits for the server to close the socket, dropping the frames before: the close code it
    /// sent, or `None` if the connection ended without a close frame.
    pub async fn closed(&mut self) -> Option<u16> {
        loop {
            match self.ws.next().await {
                Some(Ok(Message::Close(frame))) => return frame.map(|f| u16::from(f.code)),
                Some(Ok(_)) => continue,
                Some(Err(_)) | None => return None,
            }
        }
    }

    /// Whether the socket is still open: a getHistory round trip answers.
    pub async fn is_open(&mut self) -> bool {
        self.send(json!({"action": "nothing"})).await;
        matches!(self.answer().await["code"].as_str(), Some("unknown_action"))
    }
}

/// The `message` frames (or history events) among `frames`, as (seq, text).
pub fn messages(frames: &[Value]) -> Vec<(u64, String)> {
    frames
        .iter()
        .filter(|f| f["type"] == "message")
        .map(|f| {
            (
                f["seq"].as_u64().expect("a message has a seq"),
                f["text"].as_str().expect("a message has a text").to_owned(),
            )
        })
        .collect()
}

/// Waits until `check` finds what it looks for, asking again every 50 ms for up to 30 s: how a
/// test waits for a condition rather than for a fixed time. Fails saying what never came.
pub async fn eventually<T, Check, Found>(what: &str, mut check: Check) -> T
where
    Check: FnMut() -> Found,
    Found: std::future::Future<Output = Option<T>>,
{
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(found) = check().await {
            return found;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "waited 30 s for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The number `sql` counts in a SQLite database file, read from a connection of its own.
pub async fn count_outside(path: &std::path::Path, sql: &str) -> i64 {
    use sqlx::Connection;
    let url = format!("sqlite://{}", path.display());
    let mut conn = sqlx::SqliteConnection::connect(&url).await.unwrap();
    let count = sqlx::query_scalar(sql).fetch_one(&mut conn).await.unwrap();
    conn.close().await.unwrap();
    count
}

/// Runs `sql` on a SQLite database file from a connection of its own, as another process (an
/// operator's shell, a broken disk) would: how tests inject failures and damage.
pub async fn sql_outside(path: &std::path::Path, sql: &str) {
    use sqlx::Connection;
    let url = format!("sqlite://{}", path.display());
    let mut conn = sqlx::SqliteConnection::connect(&url).await.unwrap();
    sqlx::query(sql).execute(&mut conn).await.unwrap();
    conn.close().await.unwrap();
}
