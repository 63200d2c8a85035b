//! Crashes: what was acknowledged survives `kill -9`, and connections the dead process left in
//! the registry are closed — when the server starts again on a store it owns (SQLite), by the
//! first fan-out that posts to them on one it shares (DynamoDB).

mod common;

use common::{Server, TestStore};
use serde_json::{Value, json};
use std::time::Duration;

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
    let stored: Vec<(u64, String)> = events
        .iter()
        .filter(|e| e["type"] == "message")
        .map(|e| {
            (
                e["seq"].as_u64().unwrap(),
                e["text"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
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
    if TestStore::from_env() == TestStore::DynamoDb {
        // A store shared with AWS's functions: the dead process's two connections are still
        // registered as open…
        assert_eq!(open(&server).len(), 2, "{:?}", open(&server));
        let members: Vec<Value> =
            serde_json::from_slice(&server.cli(&["members", "ops", "--json"]).stdout).unwrap();
        assert!(members.iter().all(|m| m["online"] == true), "{members:?}");
        // …until the first fan-out to the room finds them gone.
    } else {
        // A store this server owns: it closes them as it starts.
        let mut closed = false;
        for _ in 0..200 {
            if open(&server).is_empty() {
                closed = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(closed, "closed at start: {:?}", open(&server));
    }
    let mut cy = server.connect("cy").await;
    cy.join("ops").await;
    let mut cleaned = false;
    for _ in 0..100 {
        if users_open(&server) == ["cy"] {
            cleaned = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(cleaned, "stale connections removed: {:?}", open(&server));
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
