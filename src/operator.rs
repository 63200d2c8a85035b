//! What operators ask: which rooms exist, who is in one, what was said, who is connected.
//!
//! The CLI commands and the admin endpoints answer from these same functions, so the JSON
//! of `palaver rooms --json` and of `GET /admin/rooms` is the same.

use crate::domain::event::rfc3339;
use crate::domain::{RoomName, ServerFrame, Stream, UserId};
use crate::ports::{Store, StoreError, StoreResult};
use serde::Serialize;

/// Why an operator's question has no answer.
#[derive(Debug, thiserror::Error)]
pub enum OperatorError {
    /// Nobody ever joined the room: it has no log (a typo, most likely — names are
    /// case-sensitive).
    #[error("no room \"{0}\": nobody has joined it (`palaver rooms` lists the rooms there are)")]
    NoSuchRoom(RoomName),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// A room's log, or [`OperatorError::NoSuchRoom`]: every room's log starts with its first
/// member's `joined`, so a room without one does not exist.
async fn existing(store: &Store, room: &RoomName) -> Result<Stream, OperatorError> {
    let stream = Stream::Room(room.clone());
    if store.log.head(&stream).await? == 0 {
        return Err(OperatorError::NoSuchRoom(room.clone()));
    }
    Ok(stream)
}

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

pub async fn members(store: &Store, room: &RoomName) -> Result<Vec<MemberRow>, OperatorError> {
    existing(store, room).await?;
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
) -> Result<Vec<ServerFrame>, OperatorError> {
    let stream = existing(store, room).await?;
    let events = store.log.read(&stream, after, limit).await?;
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

/// Rows as aligned columns under a header line, for people at a terminal: no borders, two
/// spaces between columns and nothing after the last, so that a row still starts with its first
/// value and `grep`, `cut` and `awk` read it as well as a person does. (`--json` is for
/// programs.)
///
/// Every cell is shown through [`printable`]: what users wrote is text on the operator's
/// terminal, never a command to it.
pub fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut table = comfy_table::Table::new();
    table
        .load_style(comfy_table::presets::NOTHING)
        .set_header(header.to_vec())
        .add_rows(
            rows.iter()
                .map(|row| row.iter().map(|cell| printable(cell)).collect::<Vec<_>>()),
        );
    for column in table.column_iter_mut() {
        column.set_padding((0, 2));
    }
    table.trim_fmt() + "\n"
}

/// `text` with every character that a terminal would act on instead of showing written as an
/// escape, as JSON writes it (`\u001b`, `\r`, `\n`, `\t`), and `\` as `\\` so an escape that
/// was typed reads differently from one that was made here. That covers the C0 and C1 controls
/// and DEL — ESC starts the sequences that move the cursor, recolour or retitle the window; CR
/// and BS overwrite what a row showed; NUL and BEL — and the bidirectional overrides and
/// isolates, which make a row read in another order than it is written.
pub fn printable(text: &str) -> std::borrow::Cow<'_, str> {
    fn escaped(c: char) -> bool {
        c == '\\'
            || c.is_control()
            || matches!(c, '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
    }
    if !text.chars().any(escaped) {
        return text.into();
    }
    let mut out = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if escaped(c) => out.push_str(&format!("\\u{:04x}", u32::from(c))),
            c => out.push(c),
        }
    }
    out.into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_align_columns_under_their_header() {
        let rows = vec![
            vec!["ana".to_owned(), "yes".to_owned(), "2".to_owned()],
            vec!["bartholomew".to_owned(), "no".to_owned(), "0".to_owned()],
        ];
        assert_eq!(
            table(&["USER", "ONLINE", "CONNECTIONS"], &rows),
            "USER         ONLINE  CONNECTIONS\n\
             ana          yes     2\n\
             bartholomew  no      0\n"
        );
        assert_eq!(table(&["ROOM", "HEAD"], &[]), "ROOM  HEAD\n");
    }

    #[test]
    fn what_users_wrote_reaches_the_terminal_as_text() {
        let rows = vec![vec![
            "\r10   2026-12-07T00:00:00Z  admin  maintenance".to_owned(),
            "\u{1b}]0;owned\u{7}\u{1b}[2J\0 \u{9b}31m \u{202e}txt.exe c:\\x".to_owned(),
        ]];
        let shown = table(&["TEXT", "MORE"], &rows);
        assert_eq!(
            shown.lines().nth(1).unwrap(),
            "\\r10   2026-12-07T00:00:00Z  admin  maintenance  \
             \\u001b]0;owned\\u0007\\u001b[2J\\u0000 \\u009b31m \\u202etxt.exe c:\\\\x"
        );
        assert!(
            !shown.chars().any(|c| c.is_control() && c != '\n'),
            "{shown:?}"
        );
        assert_eq!(printable("plain text, é and 🙂"), "plain text, é and 🙂");
    }
}
