//! The chat page at `GET /`, driven in a real headless Chromium through WebDriver
//! (chromedriver), talking to a real `palaver serve` next to real WebSocket clients.
//!
//! Needs `/usr/bin/chromium` and `/usr/bin/chromedriver` (Debian: `apt-get install chromium
//! chromium-driver`); `CHROMIUM` / `CHROMEDRIVER` override the paths. Without them the tests
//! fail: they are never skipped.

use crate::common;

use common::{Server, WAIT};
use fantoccini::key::Key;
use fantoccini::{Client as Browser, ClientBuilder, Locator};
use serde_json::{Value, json};
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const POLL: Duration = Duration::from_millis(100);

// ---- chromedriver and the browser ---------------------------------------------------------------

/// A chromedriver process on a free port. On drop it ends the browser session (so Chromium
/// quits) and kills chromedriver.
struct ChromeDriver {
    child: Child,
    port: u16,
    session: Option<String>,
    /// The browser's `--user-data-dir`, removed on drop.
    profile: tempfile::TempDir,
}

impl Drop for ChromeDriver {
    fn drop(&mut self) {
        if let Some(session) = self.session.take() {
            // A blocking `DELETE /session/{id}`: Chromium quits with its session.
            if let Ok(mut stream) = TcpStream::connect(("127.0.0.1", self.port)) {
                let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
                let _ = write!(
                    stream,
                    "DELETE /session/{session} HTTP/1.1\r\nHost: 127.0.0.1:{}\r\n\
                     Content-Length: 0\r\nConnection: close\r\n\r\n",
                    self.port
                );
                let _ = stream.read(&mut [0; 512]);
            }
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn binary(var: &str, default: &str) -> PathBuf {
    let path = PathBuf::from(std::env::var(var).unwrap_or_else(|_| default.to_owned()));
    assert!(
        path.is_file(),
        "{} not found: the browser tests need Chromium and chromedriver \
         (Debian: `apt-get install -y chromium chromium-driver`, or set {var})",
        path.display()
    );
    path
}

/// Starts chromedriver and a fresh headless Chromium.
async fn open_browser() -> (ChromeDriver, Browser) {
    let chromium = binary("CHROMIUM", "/usr/bin/chromium");
    let chromedriver = binary("CHROMEDRIVER", "/usr/bin/chromedriver");
    let port = TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
    let child = Command::new(&chromedriver)
        .arg(format!("--port={port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("could not start {}: {e}", chromedriver.display()));
    let mut driver = ChromeDriver {
        child,
        port,
        session: None,
        profile: tempfile::tempdir().expect("temp dir for the browser profile"),
    };
    let url = driver.url();

    // Bounded wait for chromedriver to answer.
    let http = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(status) = driver.child.try_wait().expect("chromedriver status") {
            panic!("chromedriver exited before it was ready: {status}");
        }
        if let Ok(response) = http.get(format!("{url}/status")).send().await
            && let Ok(body) = response.json::<Value>().await
            && body["value"]["ready"] == true
        {
            break;
        }
        assert!(Instant::now() < deadline, "chromedriver not ready on {url}");
        tokio::time::sleep(POLL).await;
    }

    let capabilities = json!({
        "browserName": "chrome",
        "goog:chromeOptions": {
            "binary": chromium,
            "args": [
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--window-size=1200,760",
                format!("--user-data-dir={}", driver.profile.path().display()),
            ],
        },
    });
    let Value::Object(capabilities) = capabilities else {
        unreachable!("a JSON object")
    };
    let browser = ClientBuilder::rustls()
        .expect("rustls connector")
        .capabilities(capabilities)
        .connect(&url)
        .await
        .unwrap_or_else(|e| {
            panic!(
                "could not start {} through chromedriver: {e}",
                chromium.display()
            )
        });
    driver.session = browser.session_id().await.expect("session id");
    (driver, browser)
}

impl ChromeDriver {
    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Chromium's network emulation: while offline, new connections (the page's reconnect
    /// attempts) fail.
    async fn set_offline(&self, offline: bool) {
        let session = self.session.as_deref().expect("a browser session");
        let response = reqwest::Client::new()
            .post(format!(
                "{}/session/{session}/chromium/network_conditions",
                self.url()
            ))
            .json(&json!({"network_conditions": {
                "offline": offline,
                "latency": 0,
                "download_throughput": -1,
                "upload_throughput": -1,
            }}))
            .send()
            .await
            .expect("chromedriver answers");
        let status = response.status();
        assert!(
            status.is_success(),
            "network_conditions: {status} {}",
            response.text().await.unwrap_or_default()
        );
    }
}

// ---- looking at the page ----------------------------------------------------------------------

/// Runs `script` (a function body; `arguments` as usual) in the page.
async fn js(browser: &Browser, script: &str, args: Vec<Value>) -> Value {
    browser
        .execute(script, args)
        .await
        .unwrap_or_else(|e| panic!("script failed: {e}\n{script}"))
}

/// What the page shows, for failure messages.
async fn describe(browser: &Browser) -> String {
    js(
        browser,
        "const t = id => (document.getElementById(id) || {}).textContent;
         return `status: ${t('status')}\nnotice: ${t('notice')}\nrooms: ${t('rooms')}\n\
presence: ${t('presence')}\nmessages:\n${document.getElementById('messages').innerText}`;",
        vec![],
    )
    .await
    .as_str()
    .unwrap_or_default()
    .to_owned()
}

/// Waits (bounded by WAIT) until `script` returns `true`.
async fn wait_until(browser: &Browser, what: &str, script: &str, args: Vec<Value>) {
    let deadline = Instant::now() + WAIT;
    loop {
        if js(browser, script, args.clone()).await == Value::Bool(true) {
            return;
        }
        if Instant::now() > deadline {
            panic!(
                "waited {WAIT:?} for {what}; the page shows:\n{}",
                describe(browser).await
            );
        }
        tokio::time::sleep(POLL).await;
    }
}

/// Waits for an element matching `css` whose text contains `text`.
async fn wait_for_text(browser: &Browser, css: &str, text: &str) {
    wait_until(
        browser,
        &format!("{css} containing {text:?}"),
        "return Array.from(document.querySelectorAll(arguments[0]))
             .some(e => e.textContent.includes(arguments[1]));",
        vec![json!(css), json!(text)],
    )
    .await;
}

async fn wait_for(browser: &Browser, css: &str) {
    wait_until(
        browser,
        css,
        "return document.querySelector(arguments[0]) !== null;",
        vec![json!(css)],
    )
    .await;
}

async fn wait_gone(browser: &Browser, css: &str) {
    wait_until(
        browser,
        &format!("{css} to disappear"),
        "return document.querySelector(arguments[0]) === null;",
        vec![json!(css)],
    )
    .await;
}

async fn wait_status(browser: &Browser, status: &str) {
    wait_until(
        browser,
        &format!("status {status:?}"),
        "return document.getElementById('status').textContent.trim() === arguments[0];",
        vec![json!(status)],
    )
    .await;
}

/// `(seq, text)` of every `.message` and member line of `room`, in page order.
async fn room_log(browser: &Browser, room: &str) -> Vec<(u64, String)> {
    let rows = js(
        browser,
        "return Array.from(document.querySelectorAll('#messages [data-room][data-seq]'))
             .filter(e => e.dataset.room === arguments[0])
             .map(e => [Number(e.dataset.seq), e.textContent]);",
        vec![json!(room)],
    )
    .await;
    rows.as_array()
        .expect("an array")
        .iter()
        .map(|r| {
            (
                r[0].as_u64().expect("seq"),
                r[1].as_str().unwrap_or("").to_owned(),
            )
        })
        .collect()
}

/// The room's log is in strictly increasing seq order with no duplicates.
async fn assert_in_seq_order(browser: &Browser, room: &str) {
    let log = room_log(browser, room).await;
    assert!(
        log.windows(2).all(|w| w[0].0 < w[1].0),
        "{room} is out of order or has duplicates: {log:?}"
    );
}

async fn count_messages_with(browser: &Browser, room: &str, text: &str) -> usize {
    room_log(browser, room)
        .await
        .iter()
        .filter(|(_, t)| t.contains(text))
        .count()
}

// ---- acting on the page -----------------------------------------------------------------------

async fn join_via_ui(browser: &Browser, room: &str) {
    let input = browser
        .find(Locator::Id("room-input"))
        .await
        .expect("#room-input");
    input.send_keys(room).await.expect("type the room");
    browser
        .find(Locator::Id("join-button"))
        .await
        .expect("#join-button")
        .click()
        .await
        .expect("click Join");
    wait_for(browser, &format!("#rooms [data-room=\"{room}\"]")).await;
}

/// Types `text` and clicks Send.
async fn send_via_button(browser: &Browser, text: &str) {
    let input = browser
        .find(Locator::Id("message-input"))
        .await
        .expect("#message-input");
    input.send_keys(text).await.expect("type the message");
    browser
        .find(Locator::Id("send-button"))
        .await
        .expect("#send-button")
        .click()
        .await
        .expect("click Send");
}

/// Types `text` and presses Enter.
async fn send_via_enter(browser: &Browser, text: &str) {
    let input = browser
        .find(Locator::Id("message-input"))
        .await
        .expect("#message-input");
    input
        .send_keys(&format!("{text}{}", char::from(Key::Enter)))
        .await
        .expect("type the message and Enter");
}

async fn save_screenshot(browser: &Browser, name: &str) -> PathBuf {
    let png = browser.screenshot().await.expect("screenshot");
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("target")
        .join(name);
    std::fs::create_dir_all(path.parent().expect("a parent")).expect("target dir");
    std::fs::write(&path, png).expect("screenshot written");
    path
}

// ---- the server side ------------------------------------------------------------------------

/// Ids of `user`'s open connections, as the operator command lists them.
fn connection_ids(server: &Server, user: &str) -> Vec<String> {
    let out = server.cli(&["connections", "--user", user, "--json"]);
    assert!(
        out.status.success(),
        "palaver connections: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rows: Vec<Value> = serde_json::from_slice(&out.stdout).expect("a JSON array");
    rows.iter()
        .map(|r| r["id"].as_str().expect("an id").to_owned())
        .collect()
}

/// Waits (bounded) until `user` has exactly `n` open connections, and returns their ids.
async fn wait_connections(server: &Server, user: &str, n: usize) -> Vec<String> {
    let deadline = Instant::now() + WAIT;
    loop {
        let ids = connection_ids(server, user);
        if ids.len() == n {
            return ids;
        }
        assert!(
            Instant::now() < deadline,
            "{user} has connections {ids:?}, expected {n}"
        );
        tokio::time::sleep(POLL).await;
    }
}

/// The next `message` frame `client` gets from `user` (skipping its own, which it gets too).
async fn message_from(client: &mut common::Client, user: &str) -> Value {
    loop {
        let frame = client.pushed_of("message").await;
        if frame["user"] == user {
            return frame;
        }
    }
}

fn page_url(server: &Server, user: &str) -> String {
    format!("{}/?token={}", server.url(), common::token(user))
}

/// A fresh browser on the page, signed in as `user` through the link `serve` prints, connected.
async fn page_signed_in(server: &Server, user: &str) -> (ChromeDriver, Browser) {
    let (driver, browser) = open_browser().await;
    browser
        .goto(&page_url(server, user))
        .await
        .expect("open the page");
    wait_status(&browser, "connected").await;
    (driver, browser)
}

// ---- the tests --------------------------------------------------------------------------------

/// Alice uses the page; Bob is a plain WebSocket client. History, both directions of chat,
/// presence, escaping, several rooms.
#[tokio::test]
async fn page_chats_with_a_websocket_client() {
    let server = Server::start_readable();

    // Bob has been in the lobby before and said something.
    let mut bob = server.connect("bob").await;
    bob.join("lobby").await;
    bob.say("lobby", "hi from before").await;
    bob.close().await;

    let (_driver, browser) = open_browser().await;

    // Without a token the page asks for one.
    browser
        .goto(&format!("{}/", server.url()))
        .await
        .expect("open the page");
    wait_for(&browser, "#login:not([hidden]) #token-input").await;
    // A token the server refuses (bad signature) brings the form back.
    let forged = format!("{}x", common::token("alice"));
    browser
        .goto(&format!("{}/?token={forged}", server.url()))
        .await
        .expect("open the page");
    wait_for_text(&browser, "#login-error", "did not accept").await;
    // Pasting a good one connects.
    let input = browser
        .find(Locator::Id("token-input"))
        .await
        .expect("#token-input");
    let good = common::token("alice");
    input.send_keys(&good).await.expect("paste");
    browser
        .find(Locator::Id("token-button"))
        .await
        .expect("#token-button")
        .click()
        .await
        .expect("click Connect");
    wait_status(&browser, "connected").await;
    // The token is kept in the browser's storage, never in the address (nor its history).
    let url = browser.current_url().await.expect("url");
    assert_eq!(url.path(), "/");
    assert_eq!(url.query(), None, "{url}");
    assert_eq!(
        js(
            &browser,
            "return localStorage.getItem('palaver:token');",
            vec![]
        )
        .await,
        json!(good)
    );
    // Opening /?token=... (the link `serve` prints) connects, and cleans the address.
    browser
        .goto(&page_url(&server, "alice"))
        .await
        .expect("open the page");
    wait_status(&browser, "connected").await;
    assert_eq!(browser.title().await.expect("title"), "palaver — alice");
    let url = browser.current_url().await.expect("url");
    assert!(!url.as_str().contains("token"), "{url}");

    // Joining for the first time shows the room's history (joinRoom after 0).
    join_via_ui(&browser, "lobby").await;
    wait_for_text(&browser, ".message[data-room=lobby]", "hi from before").await;
    wait_for_text(&browser, ".member[data-room=lobby]", "alice joined").await;

    // Bob comes online: his presence reaches the page.
    let mut bob = server.connect("bob").await;
    wait_for(&browser, "#presence .online-user[data-user=bob]").await;
    wait_for(&browser, "#presence .online-user[data-user=alice]").await;

    // Alice sends through the UI (button, then Enter); Bob gets both as message frames.
    let hostile = "hello bob <b>not bold</b> <img src=x onerror=alert(1)>";
    send_via_button(&browser, hostile).await;
    send_via_enter(&browser, "second line, sent with Enter").await;
    for expected in [hostile, "second line, sent with Enter"] {
        let frame = message_from(&mut bob, "alice").await;
        assert_eq!(frame["room"], "lobby", "{frame}");
        assert_eq!(frame["user"], "alice", "{frame}");
        assert_eq!(frame["text"], expected, "{frame}");
    }

    // Bob answers; the page shows it.
    bob.say("lobby", "hi alice, bob here").await;
    wait_for_text(&browser, ".message[data-room=lobby]", "hi alice, bob here").await;

    // Alice's own messages show exactly once (pushed frame and `sent` answer deduplicated),
    // as text, not markup.
    wait_gone(&browser, "#messages .outgoing").await;
    assert_eq!(count_messages_with(&browser, "lobby", "hello bob").await, 1);
    assert_eq!(
        count_messages_with(&browser, "lobby", "second line").await,
        1
    );
    let markup = js(
        &browser,
        "return document.querySelectorAll('#messages b, #messages img').length;",
        vec![],
    )
    .await;
    assert_eq!(markup, json!(0), "user text was rendered as HTML");
    wait_for_text(&browser, ".message[data-room=lobby]", "<b>not bold</b>").await;
    assert_in_seq_order(&browser, "lobby").await;

    // A second room: a tab, switching hides the lobby, switching back shows it.
    join_via_ui(&browser, "random").await;
    wait_for_text(&browser, ".member[data-room=random]", "alice joined").await;
    let lobby_line = browser
        .find(Locator::Css(".message[data-room=lobby]"))
        .await
        .expect("a lobby message");
    assert!(!lobby_line.is_displayed().await.expect("displayed?"));
    browser
        .find(Locator::Css("#rooms [data-room=lobby]"))
        .await
        .expect("lobby tab")
        .click()
        .await
        .expect("click the lobby tab");
    assert!(lobby_line.is_displayed().await.expect("displayed?"));
    wait_for_text(&browser, "#room-title", "lobby").await;
    wait_for(&browser, "#presence .online-user[data-user=bob]").await;

    let shot = save_screenshot(&browser, "browser-screenshot.png").await;
    eprintln!("screenshot: {}", shot.display());

    // Bob goes offline: the page drops him from the online list.
    bob.close().await;
    wait_gone(&browser, "#presence .online-user[data-user=bob]").await;

    // Leaving a room removes its tab.
    browser
        .find(Locator::Css("#rooms button.leave[data-room=random]"))
        .await
        .expect("leave button")
        .click()
        .await
        .expect("click leave");
    wait_gone(&browser, "#rooms [data-room=random]").await;
    // ... and tells the server (leaveRoom), which drops the membership.
    let deadline = Instant::now() + WAIT;
    loop {
        let out = server.cli(&["members", "random", "--json"]);
        let members: Vec<Value> = serde_json::from_slice(&out.stdout).expect("a JSON array");
        if members.iter().all(|m| m["user"] != "alice") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "alice is still a member of random: {members:?}"
        );
        tokio::time::sleep(POLL).await;
    }

    browser.close().await.expect("close the browser");
}

/// The page's socket is dropped by the server; while it is away Bob talks; the page
/// reconnects on its own and replays what it missed (joinRoom with `after`). A reload
/// resumes from localStorage.
#[tokio::test]
async fn page_reconnects_and_replays_what_it_missed() {
    let server = Server::start_readable();
    let mut bob = server.connect("bob").await;
    bob.join("lobby").await;

    let (driver, browser) = page_signed_in(&server, "alice").await;
    join_via_ui(&browser, "lobby").await;
    wait_for_text(&browser, ".member[data-room=lobby]", "alice joined").await;
    bob.say("lobby", "before the drop").await;
    wait_for_text(&browser, ".message[data-room=lobby]", "before the drop").await;

    // Drop the page's socket from the server side, with the browser offline so that it
    // cannot come back before Bob has spoken.
    // Record what the page sends from now on.
    js(
        &browser,
        "window.sentFrames = [];
         const send = WebSocket.prototype.send;
         WebSocket.prototype.send = function (data) {
             window.sentFrames.push(JSON.parse(data));
             return send.call(this, data);
         };
         return true;",
        vec![],
    )
    .await;
    let seen = room_log(&browser, "lobby").await.last().expect("events").0;
    let first = wait_connections(&server, "alice", 1).await.remove(0);
    driver.set_offline(true).await;
    let response = reqwest::Client::new()
        .delete(format!("{}/@connections/{first}", server.url()))
        .send()
        .await
        .expect("management API answers");
    assert!(
        response.status().is_success(),
        "DELETE: {}",
        response.status()
    );
    wait_connections(&server, "alice", 0).await;
    wait_until(
        &browser,
        "the page to notice the drop",
        "return document.getElementById('status').textContent.startsWith('reconnecting');",
        vec![],
    )
    .await;

    save_screenshot(&browser, "browser-screenshot-reconnecting.png").await;

    let missed = bob.say("lobby", "while you were away").await;
    bob.say("lobby", "and once more").await;
    assert!(
        connection_ids(&server, "alice").is_empty(),
        "the page came back before Bob spoke"
    );

    // Back online: the page reconnects by itself and replays the missed messages.
    driver.set_offline(false).await;
    wait_for_text(&browser, ".message[data-room=lobby]", "while you were away").await;
    wait_for_text(&browser, ".message[data-room=lobby]", "and once more").await;
    wait_status(&browser, "connected").await;
    let second = wait_connections(&server, "alice", 1).await.remove(0);
    assert_ne!(first, second, "a new connection");
    let sent = js(&browser, "return window.sentFrames;", vec![]).await;
    assert_eq!(
        sent.as_array().and_then(|f| f.first()),
        Some(&json!({"action": "joinRoom", "room": "lobby", "after": seen})),
        "the page rejoins from the last seq it saw: {sent}"
    );
    assert_eq!(
        count_messages_with(&browser, "lobby", "while you were away").await,
        1
    );
    let seq = missed["seq"].as_u64().expect("seq");
    let shown = js(
        &browser,
        "const e = document.querySelector(`.message[data-room=lobby][data-seq=\"${arguments[0]}\"]`);
         return e ? e.textContent : null;",
        vec![json!(seq)],
    )
    .await;
    assert!(
        shown.as_str().unwrap_or("").contains("while you were away"),
        "seq {seq} shows {shown}"
    );
    assert_in_seq_order(&browser, "lobby").await;

    // Live again: a new message arrives normally, and the page can still send.
    bob.say("lobby", "welcome back").await;
    wait_for_text(&browser, ".message[data-room=lobby]", "welcome back").await;
    send_via_enter(&browser, "thanks, I'm back").await;
    let frame = message_from(&mut bob, "alice").await;
    assert_eq!(frame["user"], "alice", "{frame}");
    assert_eq!(frame["text"], "thanks, I'm back", "{frame}");

    // The joined rooms and lastSeq are kept in localStorage; a reload resumes from there:
    // the lobby is rejoined without clicking anything and what was missed shows.
    let head = frame["seq"].as_u64().expect("seq");
    wait_until(
        &browser,
        "lastSeq saved",
        "const s = JSON.parse(localStorage.getItem('palaver:v1:alice') || 'null');
         return !!s && s.rooms.some(r => r.name === 'lobby' && r.lastSeq === arguments[0]);",
        vec![json!(head)],
    )
    .await;
    browser.refresh().await.expect("reload");
    wait_status(&browser, "connected").await;
    wait_for(&browser, "#rooms [data-room=lobby]").await;
    bob.say("lobby", "after your reload").await;
    wait_for_text(&browser, ".message[data-room=lobby]", "after your reload").await;
    // recent history is filled in for display
    wait_for_text(&browser, ".message[data-room=lobby]", "welcome back").await;
    assert_in_seq_order(&browser, "lobby").await;

    browser.close().await.expect("close the browser");
}

/// What a person at the page expects of it: a reload keeps them signed in (the token is in
/// storage, not in the address), "Sign out" forgets it, links in messages can be clicked (and
/// only http(s) links, built without parsing HTML), an error notice goes once the next request
/// succeeds, and a room whose name differs from one in the list only by case is said to be
/// another room.
#[tokio::test]
async fn page_keeps_people_signed_in_signs_them_out_links_and_clears_old_errors() {
    let server = Server::start_readable();
    let mut bob = server.connect("bob").await;
    bob.join("general").await;
    let (_driver, browser) = page_signed_in(&server, "alice").await;
    join_via_ui(&browser, "general").await;

    // Links: clickable, opening apart from the page; the rest stays text.
    let said = "see https://example.com/a?b=c, and javascript:alert(1) <b>x</b>";
    bob.say("general", said).await;
    wait_for_text(&browser, ".message[data-room=general]", "see ").await;
    let links = js(
        &browser,
        "return Array.from(document.querySelectorAll('.message[data-room=general] .text a'))
             .map(a => [a.getAttribute('href'), a.target, a.rel]);",
        vec![],
    )
    .await;
    assert_eq!(
        links,
        json!([[
            "https://example.com/a?b=c",
            "_blank",
            "noopener noreferrer nofollow"
        ]])
    );
    let text = js(
        &browser,
        "return document.querySelector('.message[data-room=general] .text').textContent;",
        vec![],
    )
    .await;
    assert_eq!(text, json!(said), "the text is shown as sent");
    assert_eq!(
        js(
            &browser,
            "return document.querySelectorAll('.message b').length;",
            vec![]
        )
        .await,
        json!(0)
    );

    // An error notice goes once the next request succeeds.
    let too_long = "x".repeat(16 * 1024 + 1);
    js(
        &browser,
        "document.getElementById('message-input').value = arguments[0];
         document.getElementById('send-button').click();",
        vec![json!(too_long)],
    )
    .await;
    wait_until(
        &browser,
        "the notice",
        "return !document.getElementById('notice').hidden;",
        vec![],
    )
    .await;
    // (The refused text stays in the box, to be shortened: it is replaced here.)
    js(
        &browser,
        "document.getElementById('message-input').value = '';",
        vec![],
    )
    .await;
    send_via_button(&browser, "short enough").await;
    wait_for_text(&browser, ".message[data-room=general]", "short enough").await;
    wait_until(
        &browser,
        "the notice to go",
        "return document.getElementById('notice').hidden;",
        vec![],
    )
    .await;

    // "General" is not "general": the page says so.
    join_via_ui(&browser, "General").await;
    wait_for_text(&browser, "#notice", "case-sensitive").await;
    wait_for_text(&browser, "#notice", "#general").await;

    // A reload keeps alice signed in, from storage.
    browser.refresh().await.expect("reload");
    wait_status(&browser, "connected").await;
    assert_eq!(browser.title().await.expect("title"), "palaver — alice");

    // Sign out: the connection closes, the token is forgotten, the login form is back — and
    // stays after a reload.
    browser
        .find(Locator::Id("sign-out"))
        .await
        .expect("#sign-out")
        .click()
        .await
        .expect("click Sign out");
    wait_for(&browser, "#login:not([hidden]) #token-input").await;
    assert_eq!(
        js(
            &browser,
            "return localStorage.getItem('palaver:token');",
            vec![]
        )
        .await,
        Value::Null
    );
    wait_connections(&server, "alice", 0).await;
    browser.refresh().await.expect("reload");
    wait_for(&browser, "#login:not([hidden]) #token-input").await;
}
