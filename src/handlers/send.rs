//! `sendMessage`: append the message; answer `sent` once it is durably in the log. The fan-out,
//! not this handler, delivers it — to the sender's other connections too.
//!
//! A connection's messages are appended in the order it sent them, even when several are in
//! flight at once ([`Turn`]).

use super::{Caller, RouteError, Routes, Turn};
use crate::domain::{EventBody, Expect, RoomName, ServerFrame};
use crate::ports::StoreError;

pub(super) async fn handle(
    routes: &Routes,
    caller: &Caller,
    room: RoomName,
    text: String,
    client_msg_id: Option<String>,
    mut turn: Turn,
) -> Result<ServerFrame, RouteError> {
    // Membership is checked by the log, with the append: no read here, and no message can
    // slip in after its sender's `left`.
    let body = EventBody::MessagePosted {
        room: room.clone(),
        user: caller.user.clone(),
        text,
        client_msg_id: client_msg_id.clone(),
        connection: Some(caller.connection.clone()),
    };
    turn.wait().await;
    let pending = routes.log.submit(body, Expect::Membership).await;
    turn.pass();
    let appended = match pending.await {
        Ok(appended) => appended,
        Err(StoreError::Refused(_)) => return Err(RouteError::not_member(&room)),
        Err(error) => return Err(error.into()),
    };
    Ok(ServerFrame::Sent {
        room,
        seq: appended.event.seq,
        id: appended.event.id.to_string(),
        client_msg_id,
    })
}
