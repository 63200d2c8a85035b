//! `leaveRoom`: stop being a member. Leaving a room you are not in answers `left` all the same.

use super::{Caller, RouteError, Routes};
use crate::domain::{EventBody, Expect, RoomName, ServerFrame};

pub(super) async fn handle(
    routes: &Routes,
    caller: &Caller,
    room: RoomName,
) -> Result<ServerFrame, RouteError> {
    if routes.directory.is_member(&room, &caller.user).await? {
        let body = EventBody::Left {
            room: room.clone(),
            user: caller.user.clone(),
        };
        routes.log.append(body, Expect::Next).await?;
    }
    Ok(ServerFrame::Left { room })
}
