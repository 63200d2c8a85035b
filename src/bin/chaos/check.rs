//! The promises a chaos run checks, against the log itself (read through the store, as the
//! operator commands read it) and what the clients recorded.

use crate::client::Outcome;
use palaver::domain::{EventBody, RoomName, Stream};
use palaver::ports::Store;
use std::collections::{BTreeMap, BTreeSet, HashMap};

/// Each broken promise, with how often and a few examples.
#[derive(Debug, Default)]
pub struct Violations {
    pub found: BTreeMap<&'static str, (u64, Vec<String>)>,
}

/// Examples kept per promise.
const EXAMPLES: usize = 5;

impl Violations {
    pub fn add(&mut self, promise: &'static str, example: String) {
        let (count, examples) = self.found.entry(promise).or_default();
        *count += 1;
        if examples.len() < EXAMPLES {
            examples.push(example);
        }
    }

    pub fn is_empty(&self) -> bool {
        self.found.is_empty()
    }
}

/// A room's log: each event's seq, id, and for messages (user, clientMsgId); and the seqs of
/// each (user, clientMsgId).
struct Log {
    ids: BTreeMap<u64, String>,
    messages: BTreeMap<u64, (String, Option<String>)>,
    sent_as: HashMap<(String, String), Vec<u64>>,
}

async fn read_log(store: &Store, room: &RoomName) -> Result<Log, String> {
    let stream = Stream::Room(room.clone());
    let mut log = Log {
        ids: BTreeMap::new(),
        messages: BTreeMap::new(),
        sent_as: HashMap::new(),
    };
    let mut after = 0;
    loop {
        let page = store
            .log
            .read(&stream, after, 1000)
            .await
            .map_err(|e| format!("reading {room}: {e}"))?;
        let Some(last) = page.last() else {
            return Ok(log);
        };
        after = last.seq;
        for event in page {
            log.ids.insert(event.seq, event.id.to_string());
            if let EventBody::MessagePosted {
                user,
                client_msg_id,
                ..
            } = event.body
            {
                if let Some(cmid) = &client_msg_id {
                    log.sent_as
                        .entry((user.to_string(), cmid.clone()))
                        .or_default()
                        .push(event.seq);
                }
                log.messages
                    .insert(event.seq, (user.to_string(), client_msg_id));
            }
        }
    }
}

/// Checks the run. `rooms` are every room the clients used.
pub async fn check(
    store: &Store,
    rooms: &BTreeSet<String>,
    outcomes: &[Outcome],
) -> Result<Violations, String> {
    let mut violations = Violations::default();
    let mut logs: HashMap<String, Log> = HashMap::new();
    for name in rooms {
        let room = RoomName::parse(name).map_err(|e| e.to_string())?;
        let log = read_log(store, &room).await?;
        // Gap-free: 1, 2, 3, …
        for (expected, seq) in (1u64..).zip(log.ids.keys()) {
            if *seq != expected {
                violations.add(
                    "a room's log has a gap",
                    format!("{name}: seq {expected} missing"),
                );
                break;
            }
        }
        // No clientMsgId twice.
        for ((user, cmid), seqs) in &log.sent_as {
            if seqs.len() > 1 {
                violations.add(
                    "a clientMsgId in the log twice",
                    format!("{name}: {user}'s {cmid} at seqs {seqs:?}"),
                );
            }
        }
        logs.insert(name.clone(), log);
    }
    for outcome in outcomes {
        if outcome.unfinished {
            violations.add(
                "a client could not finish (messages acknowledged, rooms read to their head)",
                outcome.user.clone(),
            );
        }
        // Every acknowledged message in the log, once, at its acknowledged seq.
        for acked in &outcome.acked {
            let log = &logs[&acked.room];
            let at_seq = log.messages.get(&acked.seq);
            let right = at_seq.is_some_and(|(user, cmid)| {
                *user == acked.user && cmid.as_deref() == Some(acked.client_msg_id.as_str())
            }) && log.ids.get(&acked.seq) == Some(&acked.id);
            let times = log
                .sent_as
                .get(&(acked.user.clone(), acked.client_msg_id.clone()))
                .map_or(0, Vec::len);
            if !right || times != 1 {
                violations.add(
                    "an acknowledged message is not in the log once at its seq",
                    format!(
                        "{}: {}'s {} acknowledged at seq {} (id {}); the log has it {times} times, and at that seq {at_seq:?}",
                        acked.room, acked.user, acked.client_msg_id, acked.seq, acked.id
                    ),
                );
            }
        }
        for (room, seq, connection) in &outcome.duplicates {
            violations.add(
                "a seq delivered twice on one connection",
                format!(
                    "{room}: seq {seq} to {} on its connection #{connection}",
                    outcome.user
                ),
            );
        }
        // Each room's final view: the log, from just after the client's first `joined`.
        for (room, view) in &outcome.views {
            let Some(start) = view.start else {
                violations.add(
                    "a client never joined a room",
                    format!("{} in {room}", outcome.user),
                );
                continue;
            };
            let log = &logs[room];
            if !view.events.iter().eq(log.ids.range(start + 1..)) {
                let expected: BTreeMap<u64, String> = log
                    .ids
                    .range(start + 1..)
                    .map(|(seq, id)| (*seq, id.clone()))
                    .collect();
                let missing: Vec<u64> = expected
                    .keys()
                    .filter(|s| !view.events.contains_key(s))
                    .copied()
                    .take(5)
                    .collect();
                let wrong: Vec<u64> = view
                    .events
                    .iter()
                    .filter(|(s, id)| expected.get(s) != Some(id))
                    .map(|(s, _)| *s)
                    .take(5)
                    .collect();
                violations.add(
                    "a client's final view of a room differs from the log",
                    format!(
                        "{} in {room} (from seq {}): missing {missing:?}, not as logged {wrong:?}",
                        outcome.user,
                        start + 1
                    ),
                );
            }
        }
    }
    Ok(violations)
}

/// Once everyone has left: nobody online, no connection open.
pub async fn quiet(store: &Store) -> Result<Vec<String>, String> {
    let mut still = Vec::new();
    for connection in store
        .directory
        .open_connections(None)
        .await
        .map_err(|e| e.to_string())?
    {
        still.push(format!(
            "connection {} of {} open (node {:?})",
            connection.id, connection.user, connection.node
        ));
    }
    for room in store.directory.rooms().await.map_err(|e| e.to_string())? {
        if room.online > 0 {
            still.push(format!("{}: {} online", room.room, room.online));
        }
    }
    Ok(still)
}
