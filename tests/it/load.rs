//! Many clients at once: every member gets every message of its room exactly once, in order.

use crate::common;

use common::Server;
use std::collections::BTreeSet;
use std::time::Instant;

const ROOMS: usize = 4;
const CLIENTS: usize = 40;
const MESSAGES: usize = 10;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forty_clients_in_four_rooms_each_get_their_rooms_messages_once_in_order() {
    let server = Server::start();
    let mut clients = Vec::new();
    for i in 0..CLIENTS {
        let mut client = server.connect(&format!("user{i}")).await;
        client.join(&format!("room{}", i % ROOMS)).await;
        clients.push(client);
    }
    let per_room = (CLIENTS / ROOMS) * MESSAGES;

    let started = Instant::now();
    let tasks: Vec<_> = clients
        .into_iter()
        .enumerate()
        .map(|(i, mut client)| {
            tokio::spawn(async move {
                let room = format!("room{}", i % ROOMS);
                let mut mine = BTreeSet::new();
                for m in 0..MESSAGES {
                    let sent = client.say(&room, &format!("{i}:{m}")).await;
                    mine.insert(sent["seq"].as_u64().unwrap());
                }
                let mut received = Vec::new();
                while received.len() < per_room {
                    let frame = client.pushed_of("message").await;
                    assert_eq!(frame["room"], room.as_str(), "only its own room's messages");
                    received.push(frame["seq"].as_u64().unwrap());
                }
                (room, mine, received)
            })
        })
        .collect();
    let mut by_room: std::collections::HashMap<String, BTreeSet<u64>> = Default::default();
    let mut deliveries = 0;
    let mut receipts = Vec::new();
    for task in tasks {
        let (room, mine, received) = task.await.unwrap();
        assert!(
            received.windows(2).all(|w| w[0] < w[1]),
            "strictly increasing seq, so no duplicate and no reordering: {received:?}"
        );
        assert!(
            mine.iter().all(|s| received.contains(s)),
            "the sender gets its own messages"
        );
        deliveries += received.len();
        let all = by_room.entry(room.clone()).or_default();
        all.extend(mine);
        receipts.push((room, received));
    }
    for (room, seqs) in &by_room {
        assert_eq!(
            seqs.len(),
            per_room,
            "{room}: every message acknowledged once"
        );
    }
    for (room, received) in receipts {
        let received: BTreeSet<u64> = received.into_iter().collect();
        assert_eq!(
            &received, &by_room[&room],
            "{room}: a member got exactly the room's messages"
        );
    }
    let elapsed = started.elapsed();
    println!(
        "{} messages sent, {deliveries} delivered in {elapsed:.2?}: {:.0} deliveries/s",
        CLIENTS * MESSAGES,
        deliveries as f64 / elapsed.as_secs_f64()
    );
}
