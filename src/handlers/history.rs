//! `getHistory`: a page of the room's events, in the live frames' shapes: at most `limit` events
//! and at most [`MAX_PAGE_BYTES`] of them, so possibly fewer than asked; the client pages on
//! from the last seq until `head`.

use super::{Caller, RouteError, Routes};
use crate::domain::limits::MAX_PAGE_BYTES;
use crate::domain::{RoomName, ServerFrame, Stream};

pub(super) async fn handle(
    routes: &Routes,
    caller: &Caller,
    room: RoomName,
    after: u64,
    limit: usize,
) -> Result<ServerFrame, RouteError> {
    let stream = Stream::Room(room.clone());
    // Three independent reads, at once: a client paging through a long history waits for the
    // slowest of them, not their sum. What a non-member's read found is never shown.
    let (member, events, head) = tokio::try_join!(
        routes.directory.is_member(&room, &caller.user),
        routes.log.read(&stream, after, limit),
        routes.log.head(&stream),
    )?;
    if !member {
        return Err(RouteError::not_member(&room));
    }
    Ok(ServerFrame::History {
        room,
        events: ServerFrame::page_of(&events, MAX_PAGE_BYTES),
        head,
    })
}
