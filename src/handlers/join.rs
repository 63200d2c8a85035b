//! `joinRoom`: become a member (once — joining again is a no-op, so reconnecting clients can
//! always send it), replay what the caller missed after `after`, then answer `joined`.
//!
//! A replay is one page: at most [`MAX_HISTORY_LIMIT`] events and [`MAX_PAGE_BYTES`] of them. A
//! client whose last seq is then below `head` pages the rest with `getHistory` — so a client
//! that was away for long cannot drown its own connection (or, on AWS, outlast the route's
//! 29 s) on reconnecting.

use super::{Caller, RouteError, Routes};
use crate::domain::limits::{MAX_HISTORY_LIMIT, MAX_PAGE_BYTES};
use crate::domain::requests::Rejection;
use crate::domain::{ErrorCode, EventBody, Expect, Refusal, RoomName, ServerFrame, Stream};
use crate::ports::StoreError;

pub(super) async fn handle(
    routes: &Routes,
    caller: &Caller,
    room: RoomName,
    after: Option<u64>,
) -> Result<ServerFrame, RouteError> {
    let body = EventBody::Joined {
        room: room.clone(),
        user: caller.user.clone(),
    };
    let stream = Stream::Room(room.clone());
    let expect = Expect::Join {
        max_rooms: routes.max_rooms_per_user,
    };
    let mut head = match routes.log.append(body, expect).await {
        Ok(appended) => appended.event.seq,
        Err(StoreError::Refused(Refusal::TooManyRooms { rooms, .. })) => {
            return Err(RouteError::Rejected(Rejection::new(
                ErrorCode::Limit,
                format!("you are in {rooms} rooms, the most one user may be in: leave one first"),
            )));
        }
        // A member already: joining again changes nothing.
        Err(StoreError::Refused(_)) => routes.log.head(&stream).await?,
        Err(error) => return Err(error.into()),
    };
    if let Some(after) = after {
        // The join (if any) is in the log already, so a failed replay must not answer
        // `internal` ("nothing was changed"): the answer is `joined`, and a client whose last
        // seq is below its `head` pages the rest with `getHistory`, as after any short replay.
        if let Err(error) = replay(routes, caller, &room, after, &mut head).await {
            tracing::warn!(connection = %caller.connection, %room, %error, "replay cut short");
        }
    }
    Ok(ServerFrame::Joined { room, head })
}

/// Posts the events after `after`, one page of them, straight to the caller's connection — up
/// to where the connection hears the room live ([`Directory::live_from`]): the fan-out delivers
/// the rest, however far behind the log it is, so no seq arrives twice.
///
/// [`Directory::live_from`]: crate::ports::Directory::live_from
async fn replay(
    routes: &Routes,
    caller: &Caller,
    room: &RoomName,
    after: u64,
    head: &mut u64,
) -> Result<(), RouteError> {
    let stream = Stream::Room(room.clone());
    let live_from = routes
        .directory
        .live_from(&caller.connection, room)
        .await?
        .unwrap_or(u64::MAX);
    let mut page = routes.log.read(&stream, after, MAX_HISTORY_LIMIT).await?;
    page.retain(|event| event.seq < live_from);
    metrics::counter!(crate::metrics::REPLAYED).increment(page.len() as u64);
    for frame in ServerFrame::page_of(&page, MAX_PAGE_BYTES) {
        // Appended since the head was read: the answer must not say less than was sent.
        *head = (*head).max(frame.seq().unwrap_or(0));
        routes
            .gateway
            .post(&caller.connection, frame.to_bytes())
            .await?;
    }
    Ok(())
}
