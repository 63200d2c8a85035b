//! The chat domain: names, events, frames, requests and the projection fold.
//!
//! Pure: no I/O, no AWS or SQL types. Everything here is the same on Lambda and in `palaver serve`.

pub mod event;
pub mod frames;
pub mod limits;
pub mod names;
pub mod projection;
pub mod requests;

pub use event::{Appended, DisconnectReason, Event, EventBody, Expect, Refusal, Stream};
pub use frames::{ErrorCode, MemberChange, ServerFrame};
pub use names::{ConnectionId, InvalidName, RoomName, UserId};
