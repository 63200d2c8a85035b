//! The per-room projection of open connections: `room#R`/`listener#C` rows, so that who hears a
//! room is one Query of the room's partition instead of one Query per member.
//!
//! A row `(R, C)` must exist exactly while C's user U is a member of R and C is open. Four
//! events change that, and each writes the rows it is about **in its own transaction** — the one
//! that appends the event and updates the membership or connection rows:
//!
//! | event | rows |
//! | --- | --- |
//! | `joined(R, U)` | put `(R, C)` for every open connection C of U |
//! | `left(R, U)` | delete `(R, C)` for every open connection C of U |
//! | `connected(C, U)` | put `(R, C)` for every room R U is a member of |
//! | `disconnected(C, U)` | delete `(R, C)` for every room R U is a member of |
//!
//! Which connections and rooms U has is read (one consistent Query of the `user#U` partition)
//! before the transaction is built. Two such events of the same user racing — a join reading
//! U's connections while a connect reads U's rooms — would each miss the other's change. So the
//! read also takes U's `version` row, and the transaction bumps it on the condition that it is
//! still what was read: of two racing changes one fails that condition and starts again from a
//! fresh read. Every listener write therefore commits while U's memberships and connections are
//! exactly those it was computed from.
//!
//! Re-applying an event changes nothing, and an older event applied after a newer one cannot
//! resurrect a listener: the listener writes share the transaction — and so the fate — of the
//! membership's `seq` guard and the connection's tombstone guard (see `writes.rs`). A stale join
//! or a connect after its disconnect is cancelled whole, listeners included.
//!
//! **More than 100 items.** `TransactWriteItems` takes at most 100 items. The core writes (the
//! event, the user's `version`, the membership or connection rows: 4 or 5 items) always go in
//! the transaction, and as many listener rows as fit with them; a user with more rooms (on
//! connect or disconnect) or more connections (on join or leave) than that gets the rest
//! **after** the transaction, in further transactions of at most 99 listener writes, each with a
//! `ConditionCheck` that U's `version` is still the one the core transaction set. If it is not,
//! another change of U's committed meanwhile (and computed its own rows from a state that already
//! included this one): the remaining rows are computed again from a fresh read, and written
//! under that version. Until these follow-up writes are done the room's audience lacks (or
//! still has) those connections — the window is the few milliseconds the writes take, and only
//! for such users. If the process dies in that window, applying the event again
//! (`Directory::apply`, which rewrites a change's rows from the current state even when the
//! change itself is already applied) writes the rest; rows of connections that were closed
//! expire with the connection (`expires`) or are removed when a post finds the connection gone
//! (410).

use super::error::DynamoError;
use super::items::{
    Item, after, expires, flag, listener_key, n, number, s, string, user_version_key,
};
use super::writes::writes;
use super::{CONDITION_FAILED, DynamoStore, TRANSACTION_CONFLICT};
use crate::domain::projection::Change;
use crate::domain::{ConnectionId, RoomName, Stream, UserId};
use aws_sdk_dynamodb::types::{AttributeValue, ConditionCheck, Delete, TransactWriteItem, Update};
use std::collections::HashMap;

/// DynamoDB's limit on the items of one `TransactWriteItems`.
pub const MAX_TRANSACTION_ITEMS: usize = 100;

/// How many times a change of a user's rooms or connections starts again after racing another.
pub const MAX_RACES: u32 = 32;

/// The listener rows a change is about.
#[derive(Clone, Copy, Debug)]
pub enum Scope<'a> {
    /// `(room, C)` for every open connection C of `user`; `seq` is the membership change's,
    /// from which a joining user's connections hear the room.
    Room {
        room: &'a RoomName,
        user: &'a UserId,
        seq: u64,
    },
    /// `(R, connection)` for every room R of `user`.
    Connection {
        connection: &'a ConnectionId,
        user: &'a UserId,
    },
}

impl<'a> Scope<'a> {
    /// The scope of a change that moves listeners; `None` for the others.
    pub fn of(change: &Change<'a>) -> Option<Scope<'a>> {
        match *change {
            Change::Membership {
                room, user, seq, ..
            } => Some(Scope::Room { room, user, seq }),
            Change::ConnectionOpened {
                connection, user, ..
            }
            | Change::ConnectionClosed {
                connection, user, ..
            } => Some(Scope::Connection { connection, user }),
            Change::Activity { .. } | Change::RoomHead { .. } => None,
        }
    }

    pub fn user(&self) -> &'a UserId {
        match self {
            Scope::Room { user, .. } | Scope::Connection { user, .. } => user,
        }
    }
}

/// A user's memberships and open connections, and the version they are at.
#[derive(Clone, Debug, Default)]
pub struct UserState {
    /// `None` before the user's first membership or connection change.
    pub version: Option<u64>,
    /// Rooms the user is a member of.
    pub rooms: Vec<RoomName>,
    /// Open connections, with their TTL and the node that holds each (`None`: API Gateway).
    pub connections: Vec<(ConnectionId, AttributeValue, Option<String>)>,
    /// The heads of the user's rooms, read for a connection opening: its listener rows hear
    /// each room from the event after that head (`DynamoStore::user_state`).
    pub heads: HashMap<RoomName, u64>,
}

impl UserState {
    /// Reads the items of a `user#U` partition.
    pub fn of(user: &UserId, items: &[Item]) -> Result<UserState, DynamoError> {
        let mut state = UserState::default();
        for item in items {
            let sk = string(item, "sk")?;
            if sk == "version" {
                state.version = Some(number(item, "v")?);
            } else if sk.starts_with("room#") {
                if flag(item, "active") {
                    let room = RoomName::parse(after(item, "room#")?)
                        .map_err(|e| DynamoError::Corrupt(format!("room of {user}: {e}")))?;
                    state.rooms.push(room);
                }
            } else if sk.starts_with("conn#") {
                let id = ConnectionId::new(after(item, "conn#")?);
                let ttl = item.get("expires").cloned().ok_or_else(|| {
                    DynamoError::Corrupt(format!("connection {id} of {user} has no expires"))
                })?;
                let node = string(item, "node").ok().map(str::to_owned);
                state.connections.push((id, ttl, node));
            }
        }
        Ok(state)
    }

    /// The state once `change` (one of this user's) is applied.
    pub fn after(mut self, change: &Change<'_>) -> UserState {
        match *change {
            Change::Membership { room, active, .. } => {
                self.rooms.retain(|r| r != room);
                if active {
                    self.rooms.push(room.clone());
                }
            }
            Change::ConnectionOpened {
                connection,
                at,
                node,
                ..
            } => {
                if !self.connections.iter().any(|(c, _, _)| c == connection) {
                    self.connections.push((
                        connection.clone(),
                        expires(&at),
                        node.map(str::to_owned),
                    ));
                }
            }
            Change::ConnectionClosed { connection, .. } => {
                self.connections.retain(|(c, _, _)| c != connection);
            }
            Change::Activity { .. } | Change::RoomHead { .. } => {}
        }
        self
    }

    /// The writes that make the rows of `scope` what this state says they should be: puts where
    /// the member's room and the connection both hold, deletes where one of them does not.
    pub fn listener_writes(
        &self,
        table: &str,
        scope: Scope<'_>,
    ) -> Result<Vec<TransactWriteItem>, DynamoError> {
        let mut writes = Vec::new();
        match scope {
            Scope::Room { room, user, seq } => {
                let member = self.rooms.contains(room);
                for (connection, ttl, node) in &self.connections {
                    writes.push(if member {
                        put_listener(table, room, connection, user, ttl, node.as_deref(), seq)?
                    } else {
                        delete_listener(table, room, connection)?
                    });
                }
            }
            Scope::Connection { connection, user } => {
                let open = self.connections.iter().find(|(c, _, _)| c == connection);
                for room in &self.rooms {
                    let live_from = self.heads.get(room).map_or(1, |head| head + 1);
                    writes.push(match open {
                        Some((_, ttl, node)) => put_listener(
                            table,
                            room,
                            connection,
                            user,
                            ttl,
                            node.as_deref(),
                            live_from,
                        )?,
                        None => delete_listener(table, room, connection)?,
                    });
                }
            }
        }
        Ok(writes)
    }
}

/// Writes a listener row, hearing the room from `live_from` on, held by `node` (`None`: API
/// Gateway). A row written again (a change applied again, rows rewritten after a race) keeps
/// the `from` it was first given: moving it on would silence events that neither the replay nor
/// the fan-out then delivers.
fn put_listener(
    table: &str,
    room: &RoomName,
    connection: &ConnectionId,
    user: &UserId,
    ttl: &AttributeValue,
    node: Option<&str>,
    live_from: u64,
) -> Result<TransactWriteItem, DynamoError> {
    let mut expression = "SET #u = :u, #e = :e, #f = if_not_exists(#f, :f)".to_owned();
    let mut update = Update::builder()
        .table_name(table)
        .set_key(Some(listener_key(room, connection)))
        .expression_attribute_names("#u", "user")
        .expression_attribute_names("#e", "expires")
        .expression_attribute_names("#f", "from")
        .expression_attribute_values(":u", s(user.as_str()))
        .expression_attribute_values(":e", ttl.clone())
        .expression_attribute_values(":f", n(live_from));
    if let Some(node) = node {
        expression.push_str(", #n = :n");
        update = update
            .expression_attribute_names("#n", "node")
            .expression_attribute_values(":n", s(node));
    }
    let update = update.update_expression(expression).build()?;
    Ok(TransactWriteItem::builder().update(update).build())
}

fn delete_listener(
    table: &str,
    room: &RoomName,
    connection: &ConnectionId,
) -> Result<TransactWriteItem, DynamoError> {
    let delete = Delete::builder()
        .table_name(table)
        .set_key(Some(listener_key(room, connection)))
        .build()?;
    Ok(TransactWriteItem::builder().delete(delete).build())
}

/// Moves `user`'s version from `read` to the next one, on the condition that it is still `read`.
pub fn bump_version(
    table: &str,
    user: &UserId,
    read: Option<u64>,
) -> Result<TransactWriteItem, DynamoError> {
    let update = Update::builder()
        .table_name(table)
        .set_key(Some(user_version_key(user)))
        .update_expression("SET #v = :next")
        .condition_expression(match read {
            Some(_) => "#v = :read",
            None => "attribute_not_exists(#v)",
        })
        .expression_attribute_names("#v", "v")
        .expression_attribute_values(":next", n(read.unwrap_or(0) + 1));
    let update = match read {
        Some(read) => update.expression_attribute_values(":read", n(read)),
        None => update,
    };
    Ok(TransactWriteItem::builder().update(update.build()?).build())
}

/// A check that `user`'s version is still `version`.
fn version_is(
    table: &str,
    user: &UserId,
    version: Option<u64>,
) -> Result<TransactWriteItem, DynamoError> {
    let check = ConditionCheck::builder()
        .table_name(table)
        .set_key(Some(user_version_key(user)))
        .condition_expression(match version {
            Some(_) => "#v = :v",
            None => "attribute_not_exists(#v)",
        })
        .expression_attribute_names("#v", "v");
    let check = match version {
        Some(version) => check.expression_attribute_values(":v", n(version)),
        None => check,
    };
    Ok(TransactWriteItem::builder()
        .condition_check(check.build()?)
        .build())
}

/// A change's listener writes, split into what goes in its own transaction and what follows it.
pub struct Plan {
    /// The version bump: right after the event's put in an append, first in a re-application
    /// (where [`Cancelled::of`] looks for its reason code).
    pub guard: TransactWriteItem,
    /// Listener writes that fit in the transaction.
    pub inside: Vec<TransactWriteItem>,
    /// Listener writes that do not: written after it by [`DynamoStore::finish_listeners`].
    pub after: Vec<TransactWriteItem>,
    /// The user's version once the transaction commits.
    pub version: u64,
}

impl Plan {
    /// Plans `change` on `state` (read before the transaction), for a transaction that already
    /// holds `core` other items.
    pub fn new(
        table: &str,
        scope: Scope<'_>,
        change: &Change<'_>,
        state: UserState,
        core: usize,
    ) -> Result<Plan, DynamoError> {
        let guard = bump_version(table, scope.user(), state.version)?;
        let version = state.version.unwrap_or(0) + 1;
        let mut inside = state.after(change).listener_writes(table, scope)?;
        let room = MAX_TRANSACTION_ITEMS.saturating_sub(core + 1);
        let after = if inside.len() > room {
            inside.split_off(room)
        } else {
            Vec::new()
        };
        Ok(Plan {
            guard,
            inside,
            after,
            version,
        })
    }
}

/// What a cancelled transaction's reasons say about a change guarded by a user's version.
pub enum Cancelled {
    /// The version moved, or another transaction was on the same items: read again and retry.
    Raced,
    /// Only conditions on the change itself failed: the state already holds it or something
    /// newer (a repeat, or an older event).
    Stale,
    /// Anything else.
    Failed(String),
}

impl Cancelled {
    /// `guard_at` is the index of the version bump or check in the transaction.
    pub fn of(reasons: &[String], guard_at: usize) -> Cancelled {
        let raced = reasons.iter().any(|r| r == TRANSACTION_CONFLICT)
            || reasons.get(guard_at).is_some_and(|r| r == CONDITION_FAILED);
        if raced {
            Cancelled::Raced
        } else if reasons.iter().all(|r| r == CONDITION_FAILED || r == "None") {
            Cancelled::Stale
        } else {
            Cancelled::Failed(reasons.join(", "))
        }
    }
}

impl DynamoStore {
    /// Applies a change that moves listeners (`Directory::apply`): its writes, the version bump
    /// and the listener rows in one transaction, read and retried as an append's. A change the
    /// state already holds (a repeat, or an older event) changes nothing — but the rows of its
    /// scope are written once more from the current state, under its version, so applying an
    /// event again also finishes what a process that died after its transaction left undone.
    pub(super) async fn apply_with_listeners(
        &self,
        scope: Scope<'_>,
        change: &Change<'_>,
    ) -> Result<(), DynamoError> {
        let table = &self.tables.state;
        for _ in 0..MAX_RACES {
            let state = self.user_state(scope).await?;
            let core = writes(table, change, self.connection_retention)?;
            let mut plan = Plan::new(table, scope, change, state.clone(), core.len())?;
            let mut items = vec![plan.guard.clone()];
            items.extend(core);
            items.append(&mut plan.inside);
            match self.transact(items).await? {
                Ok(()) => {
                    return if plan.after.is_empty() {
                        Ok(())
                    } else {
                        self.finish_listeners(scope, Some(plan.version), plan.after)
                            .await
                    };
                }
                Err(reasons) => match Cancelled::of(&reasons, 0) {
                    Cancelled::Raced => continue,
                    Cancelled::Stale => {
                        let rows = state.listener_writes(table, scope)?;
                        return self.finish_listeners(scope, state.version, rows).await;
                    }
                    Cancelled::Failed(why) => return Err(DynamoError::Cancelled(why)),
                },
            }
        }
        Err(DynamoError::Contended(format!(
            "listeners of user {}",
            scope.user()
        )))
    }

    /// The state a change of `scope` is planned on: the user's memberships, open connections and
    /// version (one consistent Query of its partition) — and, for a connection, the head of each
    /// of the user's rooms (one Query each, at once), from which the connection hears them.
    ///
    /// A head read here may be passed by an append before the listener row exists; the fan-out
    /// may then find no row for that event, and the client learns of it from `joined`'s
    /// `head` and pages it with `getHistory` (`docs/protocol.md`). Nothing is delivered twice.
    pub(super) async fn user_state(&self, scope: Scope<'_>) -> Result<UserState, DynamoError> {
        let user = scope.user();
        let items = self.partition(format!("user#{user}"), "").await?;
        let mut state = UserState::of(user, &items)?;
        if let Scope::Connection { .. } = scope {
            let heads = futures_util::future::try_join_all(
                state
                    .rooms
                    .iter()
                    .map(|room| async move { self.read_head(&Stream::Room(room.clone())).await }),
            )
            .await?;
            state.heads = state.rooms.iter().cloned().zip(heads).collect();
        }
        Ok(state)
    }

    /// Writes the listener rows of `scope` that did not fit in the change's transaction, under
    /// the version that transaction set; if another change of the user committed meanwhile,
    /// computes them again from a fresh read (see the module's doc).
    pub(super) async fn finish_listeners(
        &self,
        scope: Scope<'_>,
        mut version: Option<u64>,
        mut pending: Vec<TransactWriteItem>,
    ) -> Result<(), DynamoError> {
        let table = &self.tables.state;
        for _ in 0..MAX_RACES {
            let mut raced = false;
            for chunk in pending.chunks(MAX_TRANSACTION_ITEMS - 1) {
                let mut items = vec![version_is(table, scope.user(), version)?];
                items.extend_from_slice(chunk);
                if let Err(reasons) = self.transact(items).await? {
                    match Cancelled::of(&reasons, 0) {
                        Cancelled::Raced => {
                            raced = true;
                            break;
                        }
                        Cancelled::Stale | Cancelled::Failed(_) => {
                            return Err(DynamoError::Cancelled(reasons.join(", ")));
                        }
                    }
                }
            }
            if !raced {
                return Ok(());
            }
            let state = self.user_state(scope).await?;
            version = state.version;
            pending = state.listener_writes(table, scope)?;
        }
        Err(DynamoError::Contended(format!(
            "listeners of user {}",
            scope.user()
        )))
    }
}
