//! `joinRoom`: become a member (once — joining again is a no-op, so reconnecting clients can
//! always send it), replay what the caller missed after `after`, then answer `joined`.

use super::{Caller, RouteError, Routes};
use crate::domain::limits::MAX_HISTORY_LIMIT;
use crate::domain::{EventBody, Expect, RoomName, ServerFrame, Stream};

pub(super) async fn handle(
    routes: &Routes,
    caller: &Caller,
    room: RoomName,
    after: Option<u64>,
) -> Result<ServerFrame, RouteError> {
    if !routes.directory.is_member(&room, &caller.user).await? {
        let body = EventBody::Joined {
            room: room.clone(),
            user: caller.user.clone(),
        };
        routes.log.append(body, Expect::Next).await?;
    }
    let stream = Stream::Room(room.clone());
    let mut head = routes.log.head(&stream).await?;
    if let Some(mut cursor) = after {
        // Replay page by page, straight to the caller's connection, before the answer.
        loop {
            let page = routes.log.read(&stream, cursor, MAX_HISTORY_LIMIT).await?;
            let Some(last) = page.last() else { break };
            cursor = last.seq;
            for frame in page.iter().filter_map(ServerFrame::of_event) {
                routes
                    .gateway
                    .post(&caller.connection, frame.to_bytes())
                    .await?;
            }
            head = head.max(cursor);
        }
    }
    Ok(ServerFrame::Joined { room, head })
}
