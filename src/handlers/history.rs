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
    if !routes.directory.is_member(&room, &caller.user).await? {
        return Err(RouteError::not_member(&room));
    }
    let stream = Stream::Room(room.clone());
    let events = routes.log.read(&stream, after, limit).await?;
    let head = routes.log.head(&stream).await?;
    Ok(ServerFrame::History {
        room,
        events: ServerFrame::page_of(&events, MAX_PAGE_BYTES),
        head,
    })
}
