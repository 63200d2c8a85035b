//! [`Directory`] and [`Checkpoints`] on the state table.
//!
//! Reads are strongly consistent: a handler must see the join it just made. Who hears a room is
//! one paged Query of its `listener#` rows; the fan-out reads it once per room per batch.

use super::error::DynamoError;
use super::items::{
    Item, OPEN_SHARDS, after, checkpoint_key, connection_key, expired, expires, flag, listener_key,
    member_key, ms, n, number, s, string, time,
};
use super::listeners::Scope;
use super::writes::writes;
use super::{DynamoStore, condition_failed};
use crate::domain::event::now;
use crate::domain::projection::changes;
use crate::domain::{ConnectionId, Event, RoomName, Stream, UserId};
use crate::ports::{
    Checkpoint, Checkpoints, ConnectionRecord, Directory, EventLog, Listener, MemberRecord,
    RelayLease, RoomRecord, StoreResult,
};
use async_trait::async_trait;
use futures_util::{StreamExt, TryStreamExt};

/// How many per-member reads run at once.
const READ_CONCURRENCY: usize = 16;

impl DynamoStore {
    async fn get(&self, key: Item) -> Result<Option<Item>, DynamoError> {
        let out = self
            .client
            .get_item()
            .table_name(&self.tables.state)
            .set_key(Some(key))
            .consistent_read(true)
            .send()
            .await
            .map_err(DynamoError::sdk)?;
        Ok(out.item)
    }

    /// Every item of partition `pk` whose sort key starts with `prefix` (any, if empty), all
    /// pages.
    pub(super) async fn partition(
        &self,
        pk: String,
        prefix: &str,
    ) -> Result<Vec<Item>, DynamoError> {
        let mut query = self
            .client
            .query()
            .table_name(&self.tables.state)
            .expression_attribute_values(":pk", s(&pk));
        query = if prefix.is_empty() {
            query.key_condition_expression("pk = :pk")
        } else {
            query
                .key_condition_expression("pk = :pk AND begins_with(sk, :prefix)")
                .expression_attribute_values(":prefix", s(prefix))
        };
        // Every page: a partition can outgrow one (1 MB).
        query
            .consistent_read(true)
            .into_paginator()
            .items()
            .send()
            .try_collect()
            .await
            .map_err(DynamoError::sdk)
    }

    /// The open connections in the `open#K` index — only `node`'s, when given — each read from
    /// its registry row: one Query per index partition, then a read per connection found.
    async fn open_in_index(
        &self,
        node: Option<&str>,
    ) -> Result<Vec<ConnectionRecord>, DynamoError> {
        let shards = futures_util::stream::iter(0..OPEN_SHARDS)
            .map(|shard| self.partition(format!("open#{shard}"), "conn#"))
            .buffer_unordered(OPEN_SHARDS as usize)
            .try_concat()
            .await?;
        let ids: Vec<ConnectionId> = shards
            .iter()
            .filter(|item| !expired(item))
            .filter(|item| node.is_none_or(|node| string(item, "node").is_ok_and(|n| n == node)))
            .map(|item| after(item, "conn#").map(ConnectionId::new))
            .collect::<Result<_, _>>()?;
        let rows: Vec<Option<Item>> = futures_util::stream::iter(ids)
            .map(|id| self.get(connection_key(&id)))
            .buffer_unordered(READ_CONCURRENCY)
            .try_collect()
            .await?;
        rows.iter()
            .flatten()
            .map(connection_of)
            .filter(|record| !matches!(record, Ok(record) if !record.open))
            .collect()
    }

    async fn open_ids(&self, user: &UserId) -> Result<Vec<ConnectionId>, DynamoError> {
        self.partition(format!("user#{user}"), "conn#")
            .await?
            .iter()
            .filter(|item| !expired(item))
            .map(|item| after(item, "conn#").map(ConnectionId::new))
            .collect()
    }

    /// Active members of `room` with the time they joined, by user id.
    async fn active_members(
        &self,
        room: &RoomName,
    ) -> Result<Vec<(UserId, chrono::DateTime<chrono::Utc>)>, DynamoError> {
        let mut members = Vec::new();
        for item in self.partition(format!("room#{room}"), "member#").await? {
            if !flag(&item, "active") {
                continue;
            }
            let user = UserId::parse(after(&item, "member#")?)
                .map_err(|e| DynamoError::Corrupt(format!("member of {room}: {e}")))?;
            members.push((user, time(&item, "joinedAt")?));
        }
        members.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(members)
    }
}

fn connection_of(item: &Item) -> Result<ConnectionRecord, DynamoError> {
    let id = string(item, "pk")?
        .strip_prefix("conn#")
        .ok_or_else(|| DynamoError::Corrupt("connection row without conn# key".to_owned()))?;
    Ok(ConnectionRecord {
        id: ConnectionId::new(id),
        user: UserId::parse(string(item, "user")?)
            .map_err(|e| DynamoError::Corrupt(format!("connection {id}: {e}")))?,
        connected_at: time(item, "connectedAt")?,
        last_active_at: time(item, "lastActiveAt")?,
        source_ip: string(item, "sourceIp").ok().map(str::to_owned),
        node: string(item, "node").ok().map(str::to_owned),
        // Open until closed — or until its TTL passed: then API Gateway closed it long ago,
        // whether or not its `$disconnect` came.
        open: !item.contains_key("closedAt") && !expired(item),
    })
}

fn oldest_first(records: &mut [ConnectionRecord]) {
    records.sort_by(|a, b| (a.connected_at, &a.id).cmp(&(b.connected_at, &b.id)));
}

#[async_trait]
impl Directory for DynamoStore {
    async fn apply(&self, event: &Event) -> StoreResult<()> {
        for change in changes(event) {
            match Scope::of(&change) {
                Some(scope) => self.apply_with_listeners(scope, &change).await?,
                None => {
                    self.apply_writes(writes(
                        &self.tables.state,
                        &change,
                        self.connection_retention,
                    )?)
                    .await?
                }
            }
        }
        Ok(())
    }

    async fn connection(&self, id: &ConnectionId) -> StoreResult<Option<ConnectionRecord>> {
        match self.get(connection_key(id)).await? {
            Some(item) => Ok(Some(connection_of(&item)?)),
            None => Ok(None),
        }
    }

    async fn open_connections(&self, user: Option<&UserId>) -> StoreResult<Vec<ConnectionRecord>> {
        let mut records = match user {
            Some(user) => {
                let mut records = Vec::new();
                for id in self.open_ids(user).await? {
                    if let Some(record) = self.connection(&id).await?
                        && record.open
                    {
                        records.push(record);
                    }
                }
                records
            }
            None => self.open_in_index(None).await?,
        };
        oldest_first(&mut records);
        Ok(records)
    }

    async fn open_connections_held_by(&self, node: &str) -> StoreResult<Vec<ConnectionRecord>> {
        let mut records = self.open_in_index(Some(node)).await?;
        oldest_first(&mut records);
        Ok(records)
    }

    async fn is_member(&self, room: &RoomName, user: &UserId) -> StoreResult<bool> {
        Ok(self
            .get(member_key(room, user))
            .await?
            .is_some_and(|item| flag(&item, "active")))
    }

    async fn members(&self, room: &RoomName) -> StoreResult<Vec<MemberRecord>> {
        let members = self.active_members(room).await?;
        let records = futures_util::stream::iter(members)
            .map(|(user, joined_at)| async move {
                let connections = self.open_ids(&user).await?.len();
                Ok::<_, DynamoError>(MemberRecord {
                    user,
                    joined_at,
                    connections,
                })
            })
            .buffered(READ_CONCURRENCY)
            .try_collect()
            .await?;
        Ok(records)
    }

    async fn rooms_of(&self, user: &UserId) -> StoreResult<Vec<RoomName>> {
        let mut rooms = Vec::new();
        for item in self.partition(format!("user#{user}"), "room#").await? {
            if flag(&item, "active") {
                let room = RoomName::parse(after(&item, "room#")?)
                    .map_err(|e| DynamoError::Corrupt(format!("room of {user}: {e}")))?;
                rooms.push(room);
            }
        }
        rooms.sort();
        Ok(rooms)
    }

    async fn rooms(&self) -> StoreResult<Vec<RoomRecord>> {
        let mut rooms = Vec::new();
        for item in self.partition("rooms".to_owned(), "").await? {
            let room = RoomName::parse(string(&item, "sk")?)
                .map_err(|e| DynamoError::Corrupt(format!("room registry: {e}")))?;
            let members = self.members(&room).await?;
            let head = self.head(&Stream::Room(room.clone())).await?;
            rooms.push(RoomRecord {
                members: members.len(),
                online: members.iter().filter(|m| m.connections > 0).count(),
                head,
                room,
            });
        }
        rooms.sort_by(|a, b| a.room.cmp(&b.room));
        Ok(rooms)
    }

    /// One consistent Query of the room's listener rows, all pages: the membership and
    /// connection events keep them (see [`super::listeners`]).
    async fn listeners(&self, room: &RoomName) -> StoreResult<Vec<Listener>> {
        let mut listeners: Vec<Listener> = self
            .partition(format!("room#{room}"), "listener#")
            .await?
            .iter()
            .filter(|item| !expired(item))
            .map(listener_of)
            .collect::<Result<_, _>>()?;
        listeners.sort_by(|a, b| a.connection.cmp(&b.connection));
        Ok(listeners)
    }

    /// The connection's listener row for the room: one consistent GetItem.
    async fn live_from(
        &self,
        connection: &ConnectionId,
        room: &RoomName,
    ) -> StoreResult<Option<u64>> {
        match self.get(listener_key(room, connection)).await? {
            Some(item) if !expired(&item) => Ok(Some(listener_of(&item)?.live_from)),
            Some(_) => Ok(None),
            None => Ok(None),
        }
    }
}

/// A `room#R`/`listener#C` row. Rows written before listeners had a `from` hear everything.
fn listener_of(item: &Item) -> Result<Listener, DynamoError> {
    Ok(Listener {
        connection: ConnectionId::new(after(item, "listener#")?),
        live_from: match item.get("from") {
            Some(_) => number(item, "from")?,
            None => 1,
        },
        node: string(item, "node").ok().map(str::to_owned),
    })
}

#[async_trait]
impl Checkpoints for DynamoStore {
    async fn checkpoint(&self, stream: &Stream) -> StoreResult<Checkpoint> {
        match self.get(checkpoint_key(stream)).await? {
            Some(item) => Ok(Checkpoint {
                seq: number(&item, "seq")?,
                relay: match item.get("relayed_until") {
                    Some(_) => Some(RelayLease {
                        until: time(&item, "relayed_until")?,
                        // A lease written before lanes were kept used 256 of them.
                        lanes: match item.get("relay_lanes") {
                            Some(_) => {
                                u32::try_from(number(&item, "relay_lanes")?).unwrap_or(u32::MAX)
                            }
                            None => 256,
                        },
                    }),
                    None => None,
                },
            }),
            None => Ok(Checkpoint::default()),
        }
    }

    async fn advance(
        &self,
        stream: &Stream,
        seq: u64,
        relay: Option<RelayLease>,
    ) -> StoreResult<()> {
        let mut set = vec!["#seq = :seq"];
        let mut update = self
            .client
            .update_item()
            .table_name(&self.tables.state)
            .set_key(Some(checkpoint_key(stream)))
            .condition_expression("attribute_not_exists(#seq) OR #seq < :seq")
            .expression_attribute_names("#seq", "seq")
            .expression_attribute_values(":seq", n(seq));
        if matches!(stream, Stream::Connection(_)) {
            // A connection's checkpoint is useless once the connection is long gone.
            set.push("#expires = :expires");
            update = update
                .expression_attribute_names("#expires", "expires")
                .expression_attribute_values(":expires", expires(&now()));
        }
        if let Some(relay) = relay {
            set.push("#relayed = :relayed");
            set.push("#lanes = :lanes");
            update = update
                .expression_attribute_names("#relayed", "relayed_until")
                .expression_attribute_values(":relayed", ms(&relay.until))
                .expression_attribute_names("#lanes", "relay_lanes")
                .expression_attribute_values(":lanes", n(u64::from(relay.lanes)));
        }
        match update
            .update_expression(format!("SET {}", set.join(", ")))
            .send()
            .await
        {
            Ok(_) => Ok(()),
            Err(e) if condition_failed(&e) => Ok(()),
            Err(e) => Err(DynamoError::sdk(e).into()),
        }
    }
}
