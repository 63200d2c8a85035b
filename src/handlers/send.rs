//! `sendMessage`: append the message; answer `sent` once it is durably in the log. The fan-out,
//! not this handler, delivers it — to the sender's other connections too.
//!
//! A connection's messages are appended in the order it sent them, even when several are in
//! flight at once ([`Turn`]).

use super::{Caller, RouteError, Routes, Turn};
use crate::domain::{EventBody, Expect, RoomName, ServerFrame};

pub(super) async fn handle(
    routes: &Routes,
    caller: &Caller,
    room: RoomName,
    text: String,
    client_msg_id: Option<String>,
    mut turn: Turn,
) -> Result<ServerFrame, RouteError> {
    if !routes.directory.is_member(&room, &caller.user).await? {
        return Err(RouteError::not_member(&room));
    }
    let body = EventBody::MessagePosted {
        room: room.clone(),
        user: caller.user.clone(),
        text,
        client_msg_id: client_msg_id.clone(),
        connection: Some(caller.connection.clone()),
    };
    turn.wait().await;
    let pending = routes.log.submit(body, Expect::Next).await;
    turn.pass();
    let appended = pending.await?;
    Ok(ServerFrame::Sent {
        room,
        seq: appended.event.seq,
        id: appended.event.id.to_string(),
        client_msg_id,
    })
}
