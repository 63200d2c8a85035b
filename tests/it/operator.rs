//! What operators see: the CLI commands and the admin endpoints, on a live server's store.

use crate::common;

use common::{ADMIN, Server};
use serde_json::{Value, json};
use std::time::Duration;

#[tokio::test]
async fn operators_see_rooms_members_history_and_connections() {
    let server = Server::start_readable();
    let mut ana = server.connect("ana").await;
    let mut bo = server.connect("bo").await;
    ana.join("general").await;
    bo.join("general").await;
    ana.join("quiet").await;
    ana.say("general", "hi all").await;
    bo.close().await;
    // Wait for bo's $disconnect to land.
    for _ in 0..50 {
        let out = server.cli(&["connections", "--json"]);
        let rows: Vec<Value> = serde_json::from_slice(&out.stdout).unwrap();
        if rows.len() == 1 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }

    let json_of = |args: &[&str]| -> Value {
        let out = server.cli(args);
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    };
    assert_eq!(
        json_of(&["rooms", "--json"]),
        json!([
            {"room": "general", "members": 2, "online": 1, "head": 3},
            {"room": "quiet", "members": 1, "online": 1, "head": 1},
        ])
    );
    let members = json_of(&["members", "general", "--json"]);
    let members = members.as_array().unwrap();
    assert_eq!(members.len(), 2);
    assert_eq!(
        (
            &members[0]["user"],
            &members[0]["online"],
            &members[0]["connections"]
        ),
        (&json!("ana"), &json!(true), &json!(1))
    );
    assert_eq!(
        (
            &members[1]["user"],
            &members[1]["online"],
            &members[1]["connections"]
        ),
        (&json!("bo"), &json!(false), &json!(0))
    );
    assert!(members[0]["joinedAt"].as_str().unwrap().ends_with('Z'));

    let history = json_of(&["history", "general", "--after", "2", "--json"]);
    assert_eq!(history.as_array().unwrap().len(), 1);
    assert_eq!(history[0]["type"], "message");
    assert_eq!(history[0]["text"], "hi all");
    let connections = json_of(&["connections", "--json"]);
    assert_eq!(connections[0]["user"], "ana");
    assert!(connections[0]["connectedAt"].is_string());

    // The tables say the same for people.
    let table = String::from_utf8(server.cli(&["members", "general"]).stdout).unwrap();
    let lines: Vec<&str> = table.lines().collect();
    assert!(lines[0].starts_with("USER"), "{table}");
    assert!(
        lines[1].starts_with("ana") && lines[1].contains("yes"),
        "{table}"
    );
    assert!(
        lines[2].starts_with("bo") && lines[2].contains("no"),
        "{table}"
    );

    // The admin endpoints answer the same JSON, only with the bearer token.
    let http = reqwest::Client::new();
    for (path, cli) in [
        ("/admin/rooms", vec!["rooms", "--json"]),
        (
            "/admin/rooms/general/members",
            vec!["members", "general", "--json"],
        ),
        (
            "/admin/rooms/general/history?after=2&limit=10",
            vec!["history", "general", "--after", "2", "--json"],
        ),
    ] {
        let url = format!("{}{path}", server.url());
        let refused = http.get(&url).send().await.unwrap();
        assert_eq!(refused.status(), 401, "{path} without a token");
        let wrong = http.get(&url).bearer_auth("nope").send().await.unwrap();
        assert_eq!(wrong.status(), 401, "{path} with a wrong token");
        let answer = http.get(&url).bearer_auth(ADMIN).send().await.unwrap();
        assert_eq!(answer.status(), 200, "{path}");
        assert_eq!(
            answer.json::<Value>().await.unwrap(),
            json_of(&cli),
            "{path}"
        );
    }
    let bad = http
        .get(format!("{}/admin/rooms/no%20spaces/members", server.url()))
        .bearer_auth(ADMIN)
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status(), 400);
    assert!(bad.json::<Value>().await.unwrap()["error"].is_string());
    // The scheme is case-insensitive; the token is checked before the path and query are read,
    // and every error is JSON.
    let lower = http
        .get(format!("{}/admin/rooms", server.url()))
        .header("authorization", format!("bearer {ADMIN}"))
        .send()
        .await
        .unwrap();
    assert_eq!(lower.status(), 200);
    let bad_query = format!("{}/admin/rooms/general/history?after=x", server.url());
    let without = http.get(&bad_query).send().await.unwrap();
    assert_eq!(without.status(), 401, "no 400 before the token is checked");
    let with = http
        .get(&bad_query)
        .bearer_auth(ADMIN)
        .send()
        .await
        .unwrap();
    assert_eq!(with.status(), 400);
    assert!(with.json::<Value>().await.unwrap()["error"].is_string());

    // Health and the page.
    let health = http
        .get(format!("{}/healthz", server.url()))
        .send()
        .await
        .unwrap();
    assert_eq!(health.status(), 200);
    let page = http.get(server.url()).send().await.unwrap();
    assert!(
        page.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/html")
    );
    assert!(page.text().await.unwrap().contains("palaver"));
}

/// An operator command pointed at no database — run in the wrong directory, or with a typo
/// in `--store` — says so and fails, and leaves no empty database behind that would show an
/// empty chat the next time.
#[test]
fn operator_commands_where_there_is_no_database_say_so_and_create_nothing() {
    let dir = tempfile::tempdir().unwrap();
    for path in [dir.path().join("palaver.db"), dir.path().join("palaver.bd")] {
        let store = format!("sqlite://{}", path.display());
        for args in [
            vec!["rooms"],
            vec!["members", "general"],
            vec!["history", "general"],
            vec!["connections"],
        ] {
            let out = common::cli(&store, &args);
            assert!(!out.status.success(), "{args:?} succeeded");
            let said = String::from_utf8_lossy(&out.stderr);
            assert!(
                said.contains(&format!("no palaver database at {}", path.display()))
                    && said.contains("palaver serve"),
                "{args:?}: {said}"
            );
        }
    }
    let left: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
    assert!(left.is_empty(), "created {left:?}");
}

/// `members` and `history` of a room nobody joined say there is no such room (names are
/// case-sensitive: `General` is not `general`) and fail; the admin endpoints answer 404.
#[tokio::test]
async fn an_unknown_room_is_named_as_unknown_not_shown_empty() {
    let server = Server::start_readable();
    let mut ana = server.connect("ana").await;
    ana.join("general").await;
    for args in [["members", "General"], ["history", "General"]] {
        let out = server.cli(&args);
        assert!(!out.status.success(), "{args:?} succeeded");
        let said = String::from_utf8_lossy(&out.stderr);
        assert!(said.contains("no room \"General\""), "{args:?}: {said}");
        assert!(said.contains("palaver rooms"), "{said}");
    }
    assert!(server.cli(&["members", "general"]).status.success());
    let http = reqwest::Client::new();
    for path in ["members", "history"] {
        let answer = http
            .get(format!("{}/admin/rooms/General/{path}", server.url()))
            .bearer_auth(ADMIN)
            .send()
            .await
            .unwrap();
        assert_eq!(answer.status(), 404, "{path}");
        let error = answer.json::<Value>().await.unwrap()["error"].clone();
        assert!(error.as_str().unwrap().contains("no room"), "{error}");
    }
}

/// What users write reaches the operator's terminal as text: a message that would retitle the
/// window, clear the screen and overwrite its own row with a forged one ("admin" saying
/// "maintenance") is shown escaped in `palaver history`, and `--json` keeps it exactly.
#[tokio::test]
async fn history_shows_control_characters_escaped_never_raw() {
    let server = Server::start_readable();
    let mut mallory = server.connect("mallory").await;
    mallory.join("general").await;
    let text =
        "\u{1b}]0;pwned\u{7}\u{1b}[2J\r10   2026-12-07T00:00:00.000Z  admin   maintenance\u{0}";
    mallory.say("general", text).await;

    let out = server.cli(&["history", "general"]);
    assert!(out.status.success(), "{out:?}");
    let shown = String::from_utf8(out.stdout).unwrap();
    assert!(
        !shown.chars().any(|c| c.is_control() && c != '\n'),
        "raw control characters on the terminal: {shown:?}"
    );
    assert!(
        shown.contains(
            "\\u001b]0;pwned\\u0007\\u001b[2J\\r10   2026-12-07T00:00:00.000Z  admin   maintenance\\u0000"
        ),
        "{shown}"
    );
    // Every row still starts with its own seq and user: no forged row.
    assert_eq!(shown.lines().filter(|l| l.contains("admin")).count(), 1);
    let out = server.cli(&["history", "general", "--json"]);
    let events: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(
        events
            .as_array()
            .unwrap()
            .iter()
            .any(|event| event["text"] == text),
        "{events}"
    );
}

#[tokio::test]
async fn token_prints_a_token_the_server_accepts() {
    let server = Server::start();
    let out = server.cli(&["token", "dee", "--ttl", "5m"]);
    assert!(out.status.success());
    let token = String::from_utf8(out.stdout).unwrap().trim().to_owned();
    let mut dee = common::Client::connect(&format!("ws://{}/?token={token}", server.addr), "dee")
        .await
        .expect("accepted");
    dee.join("r").await;
    let invalid = server.cli(&["token", "not valid"]);
    assert!(!invalid.status.success());
    assert!(String::from_utf8_lossy(&invalid.stderr).contains("not a valid name"));
}

/// `serve --listen 0.0.0.0:PORT` names the address it really listens on, and says loudly what is
/// exposed to other machines.
#[test]
fn listening_beyond_loopback_names_the_address_and_warns() {
    use std::io::{BufRead, BufReader};
    use std::process::{Command, Stdio};
    let dir = tempfile::tempdir().unwrap();
    let store = format!("sqlite://{}", dir.path().join("p.db").display());
    let mut child = Command::new(env!("CARGO_BIN_EXE_palaver"))
        .args(["serve", "--listen", "0.0.0.0:0", "--store", &store])
        .env(
            "PALAVER_JWT_SECRET",
            "a-secret-for-this-test-only-0123456789",
        )
        .env_remove("PALAVER_ADMIN_TOKEN")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    // Everything up to the warning, which ends the banner; a banner without one fails in time.
    let mut banner = Vec::new();
    while let Ok(line) = rx.recv_timeout(std::time::Duration::from_secs(30)) {
        let done = line.starts_with("WARNING");
        banner.push(line);
        if done {
            break;
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    assert!(
        banner.last().is_some_and(|l| l.starts_with("WARNING")),
        "no warning: {banner:?}"
    );
    let text = banner.join("\n");
    assert!(
        banner[0].starts_with("palaver is listening on http://0.0.0.0:"),
        "{text}"
    );
    assert!(text.contains("/@connections"), "{text}");
}

/// A token secret shorter than HS256's 32 bytes is refused by `serve` and `token`, with the
/// reason; an empty one too for `token` (`serve` makes one up).
#[test]
fn short_token_secrets_are_refused() {
    use std::process::Command;
    let dir = tempfile::tempdir().unwrap();
    let store = format!("sqlite://{}", dir.path().join("p.db").display());
    for secret in ["", "change-me", "0123456789abcdef0123456789abcde"] {
        let out = Command::new(env!("CARGO_BIN_EXE_palaver"))
            .args(["token", "ana"])
            .env("PALAVER_JWT_SECRET", secret)
            .output()
            .unwrap();
        assert!(!out.status.success(), "token with {secret:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("at least 32"), "{secret:?}: {err}");
    }
    let out = Command::new(env!("CARGO_BIN_EXE_palaver"))
        .args(["serve", "--listen", "127.0.0.1:0", "--store", &store])
        .env("PALAVER_JWT_SECRET", "change-me")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("at least 32"));
    let ok = Command::new(env!("CARGO_BIN_EXE_palaver"))
        .args(["token", "ana"])
        .env("PALAVER_JWT_SECRET", "0123456789abcdef0123456789abcdef")
        .output()
        .unwrap();
    assert!(ok.status.success(), "32 bytes are enough");
}

/// Logs written to a file or a pipe are plain text: no terminal colour codes.
#[test]
fn logs_to_a_pipe_carry_no_colour_codes() {
    use std::io::{BufRead, BufReader};
    use std::process::{Command, Stdio};
    let dir = tempfile::tempdir().unwrap();
    let store = format!("sqlite://{}", dir.path().join("p.db").display());
    let mut child = Command::new(env!("CARGO_BIN_EXE_palaver"))
        .args(["serve", "--listen", "127.0.0.1:0", "--store", &store])
        .env(
            "PALAVER_JWT_SECRET",
            "a-secret-for-this-test-only-0123456789",
        )
        .env("RUST_LOG", "palaver=debug")
        .env_remove("NO_COLOR")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let line = rx
        .recv_timeout(std::time::Duration::from_secs(30))
        .expect("serve logs a line as it starts");
    let _ = child.kill();
    let _ = child.wait();
    assert!(!line.contains('\u{1b}'), "colour codes in {line:?}");
    assert!(line.contains("INFO") || line.contains("DEBUG"), "{line:?}");
}

/// A closed connection's events and registry row go once it has been closed longer than
/// `--connection-retention` (here 1 s), by the server's own periodic prune; the messages its user
/// sent stay in the room's history, and open connections stay.
#[tokio::test]
async fn closed_connections_are_forgotten_after_the_retention() {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = format!("sqlite://{}", dir.path().join("palaver.db").display());
    let server = Server::start_with_env(dir, &store, &[("PALAVER_CONNECTION_RETENTION", "1s")]);
    let mut ana = server.connect("ana").await;
    ana.join("hall").await;
    ana.say("hall", "still here after she left").await;
    ana.close().await;
    let mut bo = server.connect("bo").await;
    bo.join("hall").await;
    bo.say("hall", "the last word").await;

    let db = server.db_path();
    let anas = "SELECT (SELECT COUNT(*) FROM events WHERE stream LIKE 'c:%' AND user_id = 'ana') \
                     + (SELECT COUNT(*) FROM connections WHERE user_id = 'ana')";
    common::eventually("ana's connection to be forgotten", || async {
        (common::count_outside(&db, anas).await == 0).then_some(())
    })
    .await;
    let bos = "SELECT COUNT(*) FROM events WHERE stream LIKE 'c:%' AND user_id = 'bo'";
    assert_eq!(
        common::count_outside(&db, bos).await,
        1,
        "bo's open connection is kept"
    );
    let history = bo
        .request(json!({"action": "getHistory", "room": "hall", "after": 0}))
        .await;
    let texts: Vec<&str> = history["events"]
        .as_array()
        .expect("events")
        .iter()
        .filter_map(|e| e["text"].as_str())
        .collect();
    assert_eq!(texts, ["still here after she left", "the last word"]);
}

/// A value from Prometheus text: the sample whose name and labels are exactly `series`
/// (`name` or `name{label="value"}`); 0 when absent (a counter not yet moved).
fn sample(text: &str, series: &str) -> f64 {
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .find_map(|line| {
            let (name, value) = line.rsplit_once(' ')?;
            (name == series).then(|| value.parse().expect("a number"))
        })
        .unwrap_or(0.0)
}

async fn scrape(server: &Server) -> String {
    let answer = reqwest::Client::new()
        .get(format!("{}/metrics", server.url()))
        .bearer_auth(ADMIN)
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), 200);
    answer.text().await.unwrap()
}

/// `/metrics` during a real exchange: the counters move by what happened — frames in by route,
/// appends, deliveries, refused frames, open connections — and it is behind the admin token.
/// On SQLite, where the commit batches and the local tail's lag are measured too.
#[tokio::test]
async fn metrics_count_a_real_exchange() {
    let server = Server::start_sqlite();
    let unauthenticated = reqwest::get(format!("{}/metrics", server.url()))
        .await
        .unwrap();
    assert_eq!(unauthenticated.status(), 401);

    let before = scrape(&server).await;
    let mut ana = server.connect("ana").await;
    let mut bo = server.connect("bo").await;
    ana.join("metered").await;
    bo.join("metered").await;
    for text in ["one", "two", "three", "marker"] {
        ana.say("metered", text).await;
    }
    let is_marker = |f: &Value| f["type"] == "message" && f["text"] == "marker";
    let pushed =
        ana.pushed_until(is_marker).await.len() + bo.pushed_until(is_marker).await.len() + 2;
    ana.send_binary(vec![1, 2, 3]).await;
    assert_eq!(ana.answer().await["code"], "bad_request");

    let moved = |after: &str, series: &str| sample(after, series) - sample(&before, series);
    // Deliveries are counted once the posts return, a moment after the frames are queued.
    let after = common::eventually("the deliveries to be counted", || async {
        let after = scrape(&server).await;
        (moved(&after, "palaver_deliveries_total") >= pushed as f64).then_some(after)
    })
    .await;
    assert_eq!(moved(&after, "palaver_deliveries_total"), pushed as f64);
    assert_eq!(
        moved(&after, r#"palaver_frames_in_total{route="joinRoom"}"#),
        2.0
    );
    assert_eq!(
        moved(&after, r#"palaver_frames_in_total{route="sendMessage"}"#),
        4.0
    );
    // Two connects, two joins, four messages.
    assert_eq!(moved(&after, "palaver_appends_total"), 8.0);
    assert_eq!(
        moved(&after, r#"palaver_frames_refused_total{reason="binary"}"#),
        1.0
    );
    assert_eq!(sample(&after, "palaver_connections_open"), 2.0);
    assert_eq!(sample(&after, "palaver_fanout_lag_events"), 0.0);
    assert!(
        after.contains("# TYPE palaver_commit_batch_size summary"),
        "{after}"
    );
}

/// `/readyz` answers 503 while the fan-out is further behind the log than `--ready-max-lag`
/// (here every event is held back 3 s and the limit is 1 s), and 200 again once it caught up.
/// On SQLite: on DynamoDB the lag is the stream's, measured by CloudWatch.
#[tokio::test]
async fn readyz_says_when_the_fanout_falls_behind() {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = format!("sqlite://{}", dir.path().join("palaver.db").display());
    let server = Server::start_with_env(
        dir,
        &store,
        &[
            ("PALAVER_FANOUT_DELAY", "3s"),
            ("PALAVER_READY_MAX_LAG", "1s"),
        ],
    );
    let ready = || async {
        let answer = reqwest::get(format!("{}/readyz", server.url()))
            .await
            .unwrap();
        (answer.status().as_u16(), answer.text().await.unwrap())
    };
    assert_eq!(ready().await, (200, "ready\n".to_owned()));
    let mut ana = server.connect("ana").await;
    ana.join("slow").await;
    let mut states = Vec::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    // Behind, then caught up: the join is delivered 3 s after it was logged.
    while std::time::Instant::now() < deadline {
        let (status, body) = ready().await;
        if states.last() != Some(&status) {
            states.push(status);
        }
        if status == 503 {
            assert!(body.contains("behind the log"), "{body}");
        }
        if states == [200, 503, 200] || states == [503, 200] {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(states.last(), Some(&200), "{states:?}");
    assert!(states.contains(&503), "{states:?}");
}

/// `--log-format json`: every log line is one JSON object a log shipper can read, with the
/// event's fields (here the `connected` line of a handshake).
#[tokio::test]
async fn json_logs_are_one_object_per_line() {
    let server = Server::start_with(&[("PALAVER_LOG_FORMAT", "json")]);
    let _ana = server.connect("ana").await;
    let connected = common::eventually("the `connected` line", || async {
        let lines = server.stderr.lock().unwrap().clone();
        let objects: Vec<Value> = lines
            .iter()
            .map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}")))
            .collect();
        objects
            .into_iter()
            .find(|o| o["fields"]["message"] == "connected")
    })
    .await;
    assert_eq!(connected["fields"]["user"], "ana", "{connected}");
    assert_eq!(connected["level"], "INFO");
}

/// Runs `palaver ARGS` with `env` on top of the test's own; returns (success, stdout, stderr).
fn palaver(args: &[&str], env: &[(&str, &str)]) -> (bool, String, String) {
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_palaver"));
    command.args(args).env("PALAVER_JWT_SECRET", common::SECRET);
    for (k, v) in env {
        command.env(k, v);
    }
    let out = command.output().expect("palaver runs");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The everyday slips each get a message that says what to do, and a failing exit.
#[tokio::test]
async fn mistakes_are_answered_with_what_to_do() {
    let dir = tempfile::tempdir().unwrap();
    let sqlite = format!("sqlite://{}", dir.path().join("palaver.db").display());

    // A port alone for --listen.
    let (ok, _, said) = palaver(&["serve", "--listen", "8081", "--store", &sqlite], &[]);
    assert!(!ok);
    assert!(
        said.contains("--listen takes HOST:PORT") && said.contains("127.0.0.1:8081"),
        "{said}"
    );

    // A port another process listens on.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let address = taken.local_addr().unwrap().to_string();
    let (ok, _, said) = palaver(&["serve", "--listen", &address, "--store", &sqlite], &[]);
    assert!(!ok);
    assert!(
        said.contains("another process already listens there") && said.contains("--listen"),
        "{said}"
    );

    // A token that would be born expired.
    let (ok, out, said) = palaver(&["token", "ana", "--ttl", "0s"], &[]);
    assert!(!ok && out.is_empty(), "printed {out:?}");
    assert!(said.contains("has expired already"), "{said}");

    // A DynamoDB that nothing answers: the cause and the endpoint, for the operator commands
    // and for serve — which says so before it says it listens.
    let nobody = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        format!("http://{}", listener.local_addr().unwrap())
    };
    let unreachable = [("AWS_ENDPOINT_URL", nobody.as_str())];
    for args in [
        vec!["rooms", "--store", "dynamodb://chat"],
        vec![
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--store",
            "dynamodb://chat",
        ],
    ] {
        let (ok, out, said) = palaver(&args, &unreachable);
        assert!(!ok, "{args:?}");
        assert!(
            !out.contains("listening"),
            "{args:?} said it listens: {out}"
        );
        assert!(
            said.contains("cannot reach DynamoDB") && said.contains(&nobody),
            "{args:?}: {said}"
        );
    }
    // Tables never created: run `palaver init`.
    let (ok, _, said) = palaver(&["rooms", "--store", "dynamodb://never-initialised"], &[]);
    assert!(!ok);
    assert!(said.contains("run `palaver init`"), "{said}");

    // The admin endpoints asked with a token when the server has none set.
    let server = Server::start_with(&[("PALAVER_ADMIN_TOKEN", "")]);
    let answer = reqwest::Client::new()
        .get(format!("{}/admin/rooms", server.url()))
        .bearer_auth(ADMIN)
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), 403);
    let error = answer.json::<Value>().await.unwrap()["error"].clone();
    assert!(
        error
            .as_str()
            .unwrap()
            .contains("PALAVER_ADMIN_TOKEN is not set on the server"),
        "{error}"
    );
}
