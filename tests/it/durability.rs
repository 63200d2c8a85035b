//! Crashes: what was acknowledged survives `kill -9`, and connections the dead process left in
//! the registry are closed when it starts again — all of them on a store it owns (SQLite), its
//! own on one it shares with other nodes (DynamoDB).

use crate::common;

use common::Server;
use serde_json::{Value, json};

#[tokio::test]
async fn kill_9_loses_no_acknowledged_message_and_stale_connections_are_cleaned_up() {
    let server = Server::start_readable();
    let mut ana = server.connect("ana").await;
    let mut bo = server.connect("bo").await;
    ana.join("ops").await;
    bo.join("ops").await;

    let mut acknowledged = Vec::new();
    for i in 0..50 {
        let sent = ana.say("ops", &format!("message {i}")).await;
        acknowledged.push((sent["seq"].as_u64().unwrap(), format!("message {i}")));
    }
    // The last answer arrived: SIGKILL now, with both sockets open.
    let server = server.restart_after_kill9();
    drop((ana, bo));

    let out = server.cli(&["history", "ops", "--limit", "500", "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let events: Vec<Value> = serde_json::from_slice(&out.stdout).unwrap();
    let stored = common::messages(&events);
    assert_eq!(
        stored, acknowledged,
        "every acknowledged message survived, in order"
    );

    let open = |server: &Server| -> Vec<Value> {
        serde_json::from_slice(&server.cli(&["connections", "--json"]).stdout).unwrap()
    };
    let users_open = |server: &Server| -> Vec<String> {
        open(server)
            .iter()
            .map(|c| c["user"].as_str().unwrap().to_owned())
            .collect()
    };
    // The restarted node closes the connections it held as it starts — every open one on a
    // store it owns, those recorded as its own on DynamoDB (see the next test).
    common::eventually("the dead run's connections to be closed", || async {
        open(&server).is_empty().then_some(())
    })
    .await;
    let mut cy = server.connect("cy").await;
    cy.join("ops").await;
    common::eventually("only cy to be connected", || async {
        (users_open(&server) == ["cy"]).then_some(())
    })
    .await;
    let members: Vec<Value> =
        serde_json::from_slice(&server.cli(&["members", "ops", "--json"]).stdout).unwrap();
    let online: Vec<(&str, bool)> = members
        .iter()
        .map(|m| (m["user"].as_str().unwrap(), m["online"].as_bool().unwrap()))
        .collect();
    assert_eq!(online, [("ana", false), ("bo", false), ("cy", true)]);

    // The log went on from where it was: the next seq follows the last acknowledged one.
    let sent = cy
        .request(json!({"action": "sendMessage", "room": "ops", "text": "after the crash"}))
        .await;
    assert_eq!(
        sent["seq"].as_u64().unwrap(),
        acknowledged.last().unwrap().0 + 2
    );
}

/// Two nodes on one DynamoDB store: one is killed and started again under its name. It closes
/// the connection it held at once (its user shows offline) and leaves the other node's alone.
#[tokio::test]
async fn a_restarted_node_closes_its_own_connections_and_no_one_elses() {
    let first = Server::start_dynamodb();
    let second = Server::start_with_env(
        tempfile::tempdir().expect("temp dir"),
        &first.store,
        &[("PALAVER_NODE_ID", "the-other-node")],
    );
    let mut ana = first.connect("ana").await;
    let mut bo = second.connect("bo").await;
    ana.join("ops").await;
    bo.join("ops").await;
    let first = first.restart_after_kill9();
    drop(ana);

    let online = |server: &Server| -> Vec<(String, bool)> {
        let out = server.cli(&["members", "ops", "--json"]);
        let members: Vec<Value> = serde_json::from_slice(&out.stdout).unwrap();
        members
            .iter()
            .map(|m| (m["user"].as_str().unwrap().to_owned(), m["online"] == true))
            .collect()
    };
    let expected = vec![("ana".to_owned(), false), ("bo".to_owned(), true)];
    common::eventually("ana offline and bo online", || async {
        (online(&first) == expected).then_some(())
    })
    .await;
    // bo's connection was never touched: it still talks.
    let sent = bo
        .request(json!({"action": "sendMessage", "room": "ops", "text": "still here"}))
        .await;
    assert_eq!(sent["type"], "sent", "{sent}");
}

/// A second `palaver serve` on a file another one serves — started in the same directory on
/// another port, say — refuses to start, naming the file and the process that holds it; the
/// first server's users notice nothing. Once the first dies (even by `kill -9`), the file is
/// free again: the kernel let go of the lock.
#[tokio::test]
async fn a_second_server_on_the_same_sqlite_file_refuses_to_start() {
    let first = Server::start_sqlite();
    let mut ana = first.connect("ana").await;
    let mut bob = first.connect("bob").await;
    ana.join("r").await;
    bob.join("r").await;

    let store = format!("sqlite://{}", first.db_path().display());
    let second = std::process::Command::new(env!("CARGO_BIN_EXE_palaver"))
        .args(["serve", "--listen", "127.0.0.1:0", "--store", &store])
        .env("PALAVER_JWT_SECRET", common::SECRET)
        .output()
        .expect("palaver serve runs");
    assert!(!second.status.success(), "the second server started");
    let said = String::from_utf8_lossy(&second.stderr);
    assert!(
        said.contains(&format!(
            "{} is in use by another palaver serve (process {})",
            first.db_path().display(),
            first.pid()
        )),
        "{said}"
    );
    // The first server's users are still connected, and still hear each other.
    let seq = ana.say("r", "still here").await["seq"].as_u64().unwrap();
    bob.pushed_until(|f| f["seq"] == seq).await;

    // Killed, it leaves the file free for the next server.
    let restarted = first.restart_after_kill9();
    let mut ana = restarted.connect("ana").await;
    ana.join("r").await;
}

/// Started without `PALAVER_JWT_SECRET`, a server makes a secret and keeps it beside its
/// database, readable by its owner only; the next start uses it again, so the chat link it
/// printed — and every open tab's token — still works after a restart.
#[tokio::test]
async fn a_secret_made_up_by_the_server_survives_its_restart() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("palaver.db");
    let store = format!("sqlite://{}", db.display());
    let no_secret = [("PALAVER_JWT_SECRET", "")];
    let printed_token = |server: &Server| -> String {
        let lines = server.stdout.lock().unwrap();
        let line = lines
            .iter()
            .find(|l| l.contains("?token="))
            .unwrap_or_else(|| panic!("no chat link in {lines:?}"));
        line.split("?token=").nth(1).unwrap().trim().to_owned()
    };
    let mut first = Server::start_with_env(tempfile::tempdir().unwrap(), &store, &no_secret);
    common::eventually("the chat link", || async {
        first
            .stdout
            .lock()
            .unwrap()
            .iter()
            .any(|l| l.contains("?token="))
            .then_some(())
    })
    .await;
    let token = printed_token(&first);
    let kept = dir.path().join("palaver.db.secret");
    let mode = std::fs::metadata(&kept).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "the secret is readable by its owner only");
    let url = |server: &Server| format!("ws://{}/?token={token}", server.addr);
    let mut tab = common::Client::connect(&url(&first), "me").await.unwrap();
    tab.join("r").await;
    assert_eq!(first.stop_with(libc::SIGTERM).code(), Some(0));

    let second = Server::start_with_env(tempfile::tempdir().unwrap(), &store, &no_secret);
    let mut tab = common::Client::connect(&url(&second), "me")
        .await
        .expect("the token from before the restart is accepted");
    tab.join("r").await;
}
