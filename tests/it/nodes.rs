//! Several `palaver serve` nodes on one DynamoDB store (moto), as behind a load balancer: each
//! delivers to the connections it holds and leaves the others' alone, and a node that dies for
//! good has its users shown offline once its lease lapses.
//!
//! Needs a moto server: run `scripts/test` (a missing `AWS_ENDPOINT_URL` fails the test).

use crate::common::{self, Client, Server};
use serde_json::{Value, json};
use std::collections::BTreeMap;

/// A node of a shared store, named.
fn node(store: &str, name: &str, env: &[(&str, &str)]) -> Server {
    let mut env = env.to_vec();
    env.push(("PALAVER_NODE_ID", name));
    Server::start_with_env(tempfile::tempdir().expect("temp dir"), store, &env)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_on_one_store_deliver_every_frame_to_every_member_once() {
    let store = common::dynamodb_store();
    let nodes: Vec<Server> = ["n1", "n2", "n3"]
        .iter()
        .map(|name| node(&store, name, &[]))
        .collect();
    // Users spread over the nodes, two of them on n1.
    let placement = [("ana", 0), ("bob", 1), ("cy", 2), ("dee", 0)];
    let mut clients: Vec<Client> = Vec::new();
    for (user, at) in placement {
        let mut client = nodes[at].connect(user).await;
        client.join("r").await;
        clients.push(client);
    }
    // Each says three things.
    let mut said = Vec::new();
    for round in 0..3 {
        for client in &mut clients {
            let text = format!("{} {round}", client.user);
            let sent = client.say("r", &text).await;
            said.push((sent["seq"].as_u64().unwrap(), text));
        }
    }
    // A marker after everything: whatever came before it is all that came.
    let marker = clients[1].say("r", "marker").await["seq"].as_u64().unwrap();
    for client in &mut clients {
        let before = client.pushed_until(|f| f["seq"] == marker).await;
        // Everything said (all joined first), once each, in seq order, on whichever node.
        assert_eq!(
            common::messages(&before),
            said,
            "{}: {before:?}",
            client.user
        );
        // Nobody was taken for gone by another node: no one went offline.
        assert!(
            before
                .iter()
                .all(|f| f["type"] != "presence" || f["online"] == true),
            "{}: {before:?}",
            client.user
        );
    }
    // What an operator sees: all four online, none closed.
    let members = nodes[0].cli(&["members", "r", "--json"]);
    assert!(members.status.success(), "{members:?}");
    let members: Vec<Value> = serde_json::from_slice(&members.stdout).unwrap();
    let online: BTreeMap<String, bool> = members
        .iter()
        .map(|m| {
            (
                m["user"].as_str().unwrap().to_owned(),
                m["online"].as_bool().unwrap(),
            )
        })
        .collect();
    let everyone: BTreeMap<String, bool> = placement
        .iter()
        .map(|(u, _)| (u.to_string(), true))
        .collect();
    assert_eq!(online, everyone);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_killed_for_good_has_its_users_shown_offline_once_its_lease_lapses() {
    let store = common::dynamodb_store();
    let lease = [("PALAVER_NODE_LEASE", "2s")];
    let n1 = node(&store, "n1", &lease);
    let mut n2 = node(&store, "n2", &lease);
    let mut ana = n1.connect("ana").await;
    ana.join("lobby").await;
    let mut bob = n2.connect("bob").await;
    bob.join("lobby").await;
    // Ana hears bob join, from the other node.
    ana.pushed_until(|f| f["type"] == "member" && f["user"] == "bob")
        .await;

    // n2 dies and never comes back: nobody sends bob's $disconnect.
    n2.kill9();
    let started = std::time::Instant::now();
    let offline = ana.pushed_of("presence").await;
    assert_eq!(
        offline,
        json!({"type": "presence", "room": "lobby", "user": "bob", "online": false})
    );
    // Within the lease, a third of it for the sweep, and the stream's lag.
    assert!(
        started.elapsed() < std::time::Duration::from_secs(8),
        "{:?}",
        started.elapsed()
    );
    // And the store agrees: bob has no open connection.
    let connections = n1.cli(&["connections", "--user", "bob", "--json"]);
    let open: Vec<Value> = serde_json::from_slice(&connections.stdout).unwrap();
    assert!(open.is_empty(), "{open:?}");
    // Ana, on the node that lives, goes on as before.
    let seq = ana.say("lobby", "still here").await["seq"]
        .as_u64()
        .unwrap();
    let frame = ana.pushed_of("message").await;
    assert_eq!(frame["seq"], seq);
}
