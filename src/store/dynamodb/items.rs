//! The two tables' items: keys, and encoding events and records to and from attribute maps.
//!
//! Events table (`PREFIX-events`): `stream` (S, partition) + `seq` (N, sort), then `id`, `at`
//! (Unix ms), `kind`, `user` and `body` (the event as JSON), and on a connection's events
//! `expires`, the table's TTL attribute (see [`event_item`]). Its stream feeds the fan-out.
//!
//! State table (`PREFIX-state`), `pk` + `sk`, both S, one kind of item per key shape:
//!
//! | pk | sk | what |
//! | --- | --- | --- |
//! | `room#R` | `member#U` | U's membership of R: `active`, `seq`, `joinedAt` (while active) |
//! | `room#R` | `listener#C` | C, a connection of member U, hears R: `user` (U), `from` (its first live seq), `node` (the `palaver serve` that holds C; none on API Gateway), `expires` (C's) |
//! | `user#U` | `room#R` | the same membership seen from the user: `active`, `seq` |
//! | `user#U` | `conn#C` | C is one of U's open connections: `connectedAt`, `node`, `expires` |
//! | `user#U` | `version` | `v`, bumped by every change to U's memberships or connections |
//! | `open#K` | `conn#C` | C is open (K = [`open_shard`] of C, 0–15): `user`, `node`, `connectedAt`, `expires` — every open connection, or one node's, is read with 16 Queries, never a Scan of the table |
//! | `conn#C` | `conn` | the connection registry: `user`, `connectedAt`, `lastActiveAt`, `sourceIp`, `node` (a `palaver serve`'s), `closedAt`, `expires` (once closed: the connection retention after `closedAt`) |
//! | `rooms` | `R` | R has a log |
//! | `msg#R` | `U#M` | U's message with clientMsgId M in R is `seq` |
//! | `delivered#S` | `-` | the fan-out delivered log stream S up to `seq` |
//! | `nodes` | `N` | `palaver serve` node N's lease: `until` (Unix ms) |
//!
//! `expires` is the table's TTL attribute: rows of connections whose `$disconnect` never came
//! disappear after [`CONNECTION_TTL_SECS`] even if no 410 finds them first. A listener row
//! carries its connection's `expires`, so it goes with the connection's other rows.
//!
//! `room#R`/`listener#C` is the room's audience, kept so the fan-out reads who hears a room with
//! one Query (`begins_with(sk, "listener#")`); a row exists exactly while U is a member of R and
//! C is open. How the rows are kept right — in the membership or connection event's own
//! transaction, under the user's `version` guard, and what happens past DynamoDB's 100 items per
//! transaction — is in [`super::listeners`].

use super::error::DynamoError;
use crate::domain::{ConnectionId, Event, EventBody, RoomName, Stream, UserId};
use aws_sdk_dynamodb::types::AttributeValue;
use chrono::{DateTime, Utc};
use std::collections::HashMap;
use std::time::Duration;
use ulid::Ulid;

pub type Item = HashMap<String, AttributeValue>;

/// API Gateway closes every connection after 2 hours (and `palaver serve` too, by default):
/// an hour more covers clock skew and TTL deletion's own lag, and a connection whose
/// `$disconnect` never came stops counting as online an hour after it could have been open.
pub const CONNECTION_TTL_SECS: i64 = 3 * 60 * 60;

pub fn s(value: impl Into<String>) -> AttributeValue {
    AttributeValue::S(value.into())
}

pub fn n(value: impl ToString) -> AttributeValue {
    AttributeValue::N(value.to_string())
}

pub fn ms(at: &DateTime<Utc>) -> AttributeValue {
    n(at.timestamp_millis())
}

/// The TTL (Unix seconds) of a connection seen at `at`.
pub fn expires(at: &DateTime<Utc>) -> AttributeValue {
    n(at.timestamp() + CONNECTION_TTL_SECS)
}

/// Whether `item`'s TTL (`expires`, Unix seconds) has passed. DynamoDB deletes expired items
/// only eventually — up to days later — so every read of what a TTL bounds (an open
/// connection's rows, its listener rows) must skip such items itself: a connection whose
/// `$disconnect` never came (API Gateway's is best effort) would otherwise stay online, count
/// toward its user's cap and be posted to long after API Gateway closed it (2 h at most).
pub fn expired(item: &Item) -> bool {
    item.get("expires")
        .and_then(|v| v.as_n().ok())
        .and_then(|v| v.parse::<i64>().ok())
        .is_some_and(|expires| expires <= Utc::now().timestamp())
}

/// The TTL (Unix seconds) of what a connection leaves once closed at `closed` (its registry row,
/// its `disconnected` event): `retention` later; `None` keeps it.
pub fn kept_until(closed: &DateTime<Utc>, retention: Option<Duration>) -> Option<AttributeValue> {
    let retention = i64::try_from(retention?.as_secs()).ok()?;
    Some(n(closed.timestamp().checked_add(retention)?))
}

pub fn member_key(room: &RoomName, user: &UserId) -> Item {
    key(format!("room#{room}"), format!("member#{user}"))
}

pub fn user_room_key(user: &UserId, room: &RoomName) -> Item {
    key(format!("user#{user}"), format!("room#{room}"))
}

pub fn user_connection_key(user: &UserId, connection: &ConnectionId) -> Item {
    key(format!("user#{user}"), format!("conn#{connection}"))
}

pub fn listener_key(room: &RoomName, connection: &ConnectionId) -> Item {
    key(format!("room#{room}"), format!("listener#{connection}"))
}

pub fn user_version_key(user: &UserId) -> Item {
    key(format!("user#{user}"), "version".to_owned())
}

/// How many partitions the open-connection index (`open#K`) is spread over: each partition takes
/// 1,000 writes a second, and an open and a close write one each — 16 carry 8,000 connections
/// opening and closing a second, far above API Gateway's 500 new connections a second.
pub const OPEN_SHARDS: u32 = 16;

/// Which of the [`OPEN_SHARDS`] partitions holds `connection`'s index item: FNV-1a of its id,
/// fixed for good (a connection's item must be found again by whoever closes it).
pub fn open_shard(connection: &ConnectionId) -> u32 {
    let hash = connection
        .as_str()
        .bytes()
        .fold(0x811c_9dc5_u32, |hash, byte| {
            (hash ^ u32::from(byte)).wrapping_mul(0x0100_0193)
        });
    hash % OPEN_SHARDS
}

pub fn open_key(connection: &ConnectionId) -> Item {
    key(
        format!("open#{}", open_shard(connection)),
        format!("conn#{connection}"),
    )
}

pub fn connection_key(connection: &ConnectionId) -> Item {
    key(format!("conn#{connection}"), "conn".to_owned())
}

pub fn room_key(room: &RoomName) -> Item {
    key("rooms".to_owned(), room.to_string())
}

pub fn dedupe_key(stream: &Stream, user: &UserId, client_msg_id: &str) -> Item {
    key(format!("msg#{stream}"), format!("{user}#{client_msg_id}"))
}

pub fn checkpoint_key(stream: &Stream) -> Item {
    key(format!("delivered#{stream}"), "-".to_owned())
}

fn key(pk: String, sk: String) -> Item {
    HashMap::from([("pk".to_owned(), s(pk)), ("sk".to_owned(), s(sk))])
}

/// The events-table item of `event`.
///
/// A connection's events carry the table's TTL attribute `expires`, so that they go
/// `retention` after the connection closed: `disconnected` from its own time, `connected` from
/// the latest its connection can close (it is written before anyone knows when that will be, and
/// no connection outlives [`CONNECTION_TTL_SECS`]). Room events are kept.
pub fn event_item(event: &Event, retention: Option<Duration>) -> Result<Item, DynamoError> {
    let body = serde_json::to_string(&event.body).map_err(DynamoError::Encode)?;
    let mut item = HashMap::from([
        ("stream".to_owned(), s(event.stream.key())),
        ("seq".to_owned(), n(event.seq)),
        ("id".to_owned(), s(event.id.to_string())),
        ("at".to_owned(), ms(&event.at)),
        ("kind".to_owned(), s(event.body.kind())),
        ("user".to_owned(), s(event.body.user().as_str())),
        ("body".to_owned(), s(body)),
    ]);
    let closes_by = match event.body {
        EventBody::Connected { .. } => event
            .at
            .checked_add_signed(chrono::TimeDelta::seconds(CONNECTION_TTL_SECS)),
        EventBody::Disconnected { .. } => Some(event.at),
        _ => None,
    };
    if let Some(expires) = closes_by.and_then(|at| kept_until(&at, retention)) {
        item.insert("expires".to_owned(), expires);
    }
    Ok(item)
}

/// Reads an events-table item back.
pub fn event_of(item: &Item) -> Result<Event, DynamoError> {
    let stream_key = string(item, "stream")?;
    let stream = Stream::from_key(stream_key)
        .ok_or_else(|| DynamoError::Corrupt(format!("bad stream key {stream_key:?}")))?;
    let seq = number(item, "seq")?;
    let id: Ulid = string(item, "id")?
        .parse()
        .map_err(|e| DynamoError::Corrupt(format!("{stream}/{seq}: bad id: {e}")))?;
    let at = time(item, "at")?;
    let body: EventBody = serde_json::from_str(string(item, "body")?)
        .map_err(|e| DynamoError::Corrupt(format!("{stream}/{seq}: bad body: {e}")))?;
    if body.stream() != stream {
        return Err(DynamoError::Corrupt(format!(
            "{stream}/{seq}: body belongs to {}",
            body.stream()
        )));
    }
    Ok(Event {
        stream,
        seq,
        id,
        at,
        body,
    })
}

pub fn string<'a>(item: &'a Item, name: &str) -> Result<&'a str, DynamoError> {
    match item.get(name) {
        Some(AttributeValue::S(value)) => Ok(value),
        other => Err(DynamoError::Corrupt(format!(
            "attribute {name}: expected a string, found {other:?}"
        ))),
    }
}

pub fn number(item: &Item, name: &str) -> Result<u64, DynamoError> {
    match item.get(name) {
        Some(AttributeValue::N(value)) => value
            .parse()
            .map_err(|_| DynamoError::Corrupt(format!("attribute {name}: bad number {value}"))),
        other => Err(DynamoError::Corrupt(format!(
            "attribute {name}: expected a number, found {other:?}"
        ))),
    }
}

pub fn time(item: &Item, name: &str) -> Result<DateTime<Utc>, DynamoError> {
    let millis = number(item, name)?;
    i64::try_from(millis)
        .ok()
        .and_then(DateTime::from_timestamp_millis)
        .ok_or_else(|| DynamoError::Corrupt(format!("attribute {name}: bad time {millis}")))
}

pub fn flag(item: &Item, name: &str) -> bool {
    matches!(item.get(name), Some(AttributeValue::Bool(true)))
}

/// The part of a sort key after `prefix`.
pub fn after<'a>(item: &'a Item, prefix: &str) -> Result<&'a str, DynamoError> {
    let sk = string(item, "sk")?;
    sk.strip_prefix(prefix)
        .ok_or_else(|| DynamoError::Corrupt(format!("sort key {sk:?} lacks {prefix:?}")))
}
