//! `leaveRoom`: stop being a member. Leaving a room you are not in answers `left` all the same.

use super::{Caller, RouteError, Routes};
use crate::domain::{EventBody, Expect, RoomName, ServerFrame};
use crate::ports::StoreError;

pub(super) async fn handle(
    routes: &Routes,
    caller: &Caller,
    room: RoomName,
) -> Result<ServerFrame, RouteError> {
    let body = EventBody::Left {
        room: room.clone(),
        user: caller.user.clone(),
    };
    match routes.log.append(body, Expect::Membership).await {
        // Not a member: leaving changes nothing.
        Ok(_) | Err(StoreError::Refused(_)) => Ok(ServerFrame::Left { room }),
        Err(error) => Err(error.into()),
    }
}
