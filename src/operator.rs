//! What operators ask: which rooms exist, who is in one, what was said, who is connected.
//!
//! The CLI commands and the admin endpoints answer from these same functions, so the JSON
//! of `palaver rooms --json` and of `GET /admin/rooms` is the same.

use crate::domain::event::rfc3339;
use crate::domain::{RoomName, ServerFrame, Stream, UserId};
use crate::ports::{Store, StoreResult};
use serde::Serialize;

#[derive(Debug, Serialize)]
pub struct RoomRow {
    pub room: String,
    pub members: usize,
    pub online: usize,
    pub head: u64,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct MemberRow {
    pub user: String,
    pub joined_at: String,
    pub online: bool,
    pub connections: usize,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ConnectionRow {
    pub id: String,
    pub user: String,
    pub connected_at: String,
}

pub async fn rooms(store: &Store) -> StoreResult<Vec<RoomRow>> {
    Ok(store
        .directory
        .rooms()
        .await?
        .into_iter()
        .map(|r| RoomRow {
            room: r.room.to_string(),
            members: r.members,
            online: r.online,
            head: r.head,
        })
        .collect())
}

pub async fn members(store: &Store, room: &RoomName) -> StoreResult<Vec<MemberRow>> {
    Ok(store
        .directory
        .members(room)
        .await?
        .into_iter()
        .map(|m| MemberRow {
            user: m.user.to_string(),
            joined_at: rfc3339(&m.joined_at),
            online: m.connections > 0,
            connections: m.connections,
        })
        .collect())
}

/// The room's events after `after`, as `history` frames carry them.
pub async fn history(
    store: &Store,
    room: &RoomName,
    after: u64,
    limit: usize,
) -> StoreResult<Vec<ServerFrame>> {
    let events = store
        .log
        .read(&Stream::Room(room.clone()), after, limit)
        .await?;
    Ok(events.iter().filter_map(ServerFrame::of_event).collect())
}

pub async fn connections(store: &Store, user: Option<&UserId>) -> StoreResult<Vec<ConnectionRow>> {
    Ok(store
        .directory
        .open_connections(user)
        .await?
        .into_iter()
        .map(|c| ConnectionRow {
            id: c.id.to_string(),
            user: c.user.to_string(),
            connected_at: rfc3339(&c.connected_at),
        })
        .collect())
}

/// Rows as an aligned text table with a header line.
pub fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<&str>| -> String {
        let mut out = String::new();
        for (i, (cell, w)) in cells.iter().zip(&widths).enumerate() {
            if i + 1 == cells.len() {
                out.push_str(cell);
            } else {
                out.push_str(&format!("{cell:<w$}  "));
            }
        }
        out.trim_end().to_owned() + "\n"
    };
    let mut out = line(header.to_vec());
    for row in rows {
        out.push_str(&line(row.iter().map(String::as_str).collect()));
    }
    out
}
