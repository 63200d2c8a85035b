//! The projection's changes as DynamoDB writes.
//!
//! Every write is idempotent on its own terms — a membership keeps the seq that last set it and
//! ignores anything not newer, a closed connection stays closed, activity only moves forward —
//! so the same writes serve both an append (in the append's transaction, so a handler sees its
//! own join at once) and a re-application by the fan-out.
//!
//! The room listener rows a membership or connection change moves are not here: they depend on
//! the user's other rooms and connections, read before the transaction (see `listeners.rs`),
//! and ride in the same transaction as these writes — so the seq and tombstone conditions here
//! also keep a stale event from writing them.

use super::error::DynamoError;
use super::items::{
    Item, connection_key, expires, kept_until, member_key, ms, n, open_key, room_key, s,
    user_connection_key, user_room_key,
};
use crate::domain::projection::Change;
use aws_sdk_dynamodb::types::{AttributeValue, Delete, Put, TransactWriteItem, Update};
use std::collections::HashMap;
use std::time::Duration;

/// Builds one `Update` with its expression's names and values.
struct UpdateOf {
    table: String,
    key: Item,
    expression: String,
    condition: Option<String>,
    names: HashMap<String, String>,
    values: HashMap<String, AttributeValue>,
}

impl UpdateOf {
    fn new(table: &str, key: Item, expression: &str) -> Self {
        UpdateOf {
            table: table.to_owned(),
            key,
            expression: expression.to_owned(),
            condition: None,
            names: HashMap::new(),
            values: HashMap::new(),
        }
    }

    fn condition(mut self, condition: &str) -> Self {
        self.condition = Some(condition.to_owned());
        self
    }

    /// `#name` stands for attribute `attribute` (attribute names are placeholders throughout,
    /// so no DynamoDB reserved word can bite).
    fn name(mut self, name: &str, attribute: &str) -> Self {
        self.names.insert(format!("#{name}"), attribute.to_owned());
        self
    }

    fn value(mut self, name: &str, value: AttributeValue) -> Self {
        self.values.insert(format!(":{name}"), value);
        self
    }

    fn build(self) -> Result<TransactWriteItem, DynamoError> {
        let update = Update::builder()
            .table_name(self.table)
            .set_key(Some(self.key))
            .update_expression(self.expression)
            .set_condition_expression(self.condition)
            .set_expression_attribute_names((!self.names.is_empty()).then_some(self.names))
            .set_expression_attribute_values((!self.values.is_empty()).then_some(self.values))
            .build()?;
        Ok(TransactWriteItem::builder().update(update).build())
    }
}

/// A put of `item`, only if no item has its key (`key_attribute` is one of the key's names).
pub fn put_new(
    table: &str,
    item: Item,
    key_attribute: &str,
) -> Result<TransactWriteItem, DynamoError> {
    let put = Put::builder()
        .table_name(table)
        .set_item(Some(item))
        .condition_expression("attribute_not_exists(#k)")
        .expression_attribute_names("#k", key_attribute)
        .build()?;
    Ok(TransactWriteItem::builder().put(put).build())
}

fn put(table: &str, item: Item) -> Result<TransactWriteItem, DynamoError> {
    let put = Put::builder()
        .table_name(table)
        .set_item(Some(item))
        .build()?;
    Ok(TransactWriteItem::builder().put(put).build())
}

fn delete(table: &str, key: Item) -> Result<TransactWriteItem, DynamoError> {
    let delete = Delete::builder()
        .table_name(table)
        .set_key(Some(key))
        .build()?;
    Ok(TransactWriteItem::builder().delete(delete).build())
}

/// The writes of one change to the state table `table`. They belong together: applied alone,
/// they go in one transaction.
///
/// `retention` is how long a closed connection's registry row is kept.
pub fn writes(
    table: &str,
    change: &Change<'_>,
    retention: Option<Duration>,
) -> Result<Vec<TransactWriteItem>, DynamoError> {
    const NEWER: &str = "attribute_not_exists(#seq) OR #seq < :seq";
    match *change {
        Change::Membership {
            room,
            user,
            active,
            seq,
            at,
        } => {
            let member = if active {
                "SET #active = :active, #seq = :seq, #joined = if_not_exists(#joined, :at)"
            } else {
                "SET #active = :active, #seq = :seq REMOVE #joined"
            };
            let mut member = UpdateOf::new(table, member_key(room, user), member)
                .condition(NEWER)
                .name("active", "active")
                .name("seq", "seq")
                .name("joined", "joinedAt")
                .value("active", AttributeValue::Bool(active))
                .value("seq", n(seq));
            if active {
                member = member.value("at", ms(&at));
            }
            let mirror = UpdateOf::new(
                table,
                user_room_key(user, room),
                "SET #active = :active, #seq = :seq",
            )
            .condition(NEWER)
            .name("active", "active")
            .name("seq", "seq")
            .value("active", AttributeValue::Bool(active))
            .value("seq", n(seq));
            Ok(vec![
                member.build()?,
                mirror.build()?,
                put(table, room_key(room))?,
            ])
        }
        Change::ConnectionOpened {
            connection,
            user,
            source_ip,
            node,
            at,
        } => {
            let mut expression = "SET #user = if_not_exists(#user, :user), \
                 #connected = if_not_exists(#connected, :at), \
                 #active = if_not_exists(#active, :at), \
                 #expires = if_not_exists(#expires, :expires)"
                .to_owned();
            if source_ip.is_some() {
                expression.push_str(", #ip = if_not_exists(#ip, :ip)");
            }
            if node.is_some() {
                expression.push_str(", #node = if_not_exists(#node, :node)");
            }
            // A tombstone (a closed connection) is never reopened.
            let mut row = UpdateOf::new(table, connection_key(connection), &expression)
                .condition("attribute_not_exists(#closed)")
                .name("user", "user")
                .name("connected", "connectedAt")
                .name("active", "lastActiveAt")
                .name("expires", "expires")
                .name("closed", "closedAt")
                .value("user", s(user.as_str()))
                .value("at", ms(&at))
                .value("expires", expires(&at));
            if let Some(ip) = source_ip {
                row = row.name("ip", "sourceIp").value("ip", s(ip));
            }
            if let Some(node) = node {
                row = row.name("node", "node").value("node", s(node));
            }
            let mut open = user_connection_key(user, connection);
            open.insert("connectedAt".to_owned(), ms(&at));
            open.insert("expires".to_owned(), expires(&at));
            if let Some(node) = node {
                // Copied to the connection's listener rows: who delivers to it.
                open.insert("node".to_owned(), s(node));
            }
            let mut index = open_key(connection);
            index.insert("user".to_owned(), s(user.as_str()));
            for copied in ["connectedAt", "expires", "node"] {
                if let Some(value) = open.get(copied) {
                    index.insert(copied.to_owned(), value.clone());
                }
            }
            Ok(vec![row.build()?, put(table, open)?, put(table, index)?])
        }
        Change::ConnectionClosed {
            connection,
            user,
            at,
        } => {
            // A closed connection's row is kept for the retention after it closed (not the
            // TTL it had while open, a safety net for a `$disconnect` that never came), or for
            // ever. Re-applied, the close writes the same.
            let kept = kept_until(&at, retention);
            let expression = format!(
                "SET #closed = if_not_exists(#closed, :at), \
                 #user = if_not_exists(#user, :user), \
                 #connected = if_not_exists(#connected, :at), \
                 #active = if_not_exists(#active, :at){}",
                if kept.is_some() {
                    ", #expires = :expires"
                } else {
                    " REMOVE #expires"
                }
            );
            let mut row = UpdateOf::new(table, connection_key(connection), &expression)
                .name("closed", "closedAt")
                .name("user", "user")
                .name("connected", "connectedAt")
                .name("active", "lastActiveAt")
                .name("expires", "expires")
                .value("user", s(user.as_str()))
                .value("at", ms(&at));
            if let Some(kept) = kept {
                row = row.value("expires", kept);
            }
            Ok(vec![
                row.build()?,
                delete(table, user_connection_key(user, connection))?,
                delete(table, open_key(connection))?,
            ])
        }
        Change::Activity { connection, at } => {
            let row = UpdateOf::new(table, connection_key(connection), "SET #active = :at")
                .condition("attribute_exists(#connected) AND #active < :at")
                .name("active", "lastActiveAt")
                .name("connected", "connectedAt")
                .value("at", ms(&at));
            Ok(vec![row.build()?])
        }
        // Heads are read from the log itself (one Query), and a room is registered by its
        // first membership change — no write per message.
        Change::RoomHead { .. } => Ok(Vec::new()),
    }
}
