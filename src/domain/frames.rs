//! What the server sends to clients (CONTRACT §2), and the error codes of §4.
//!
//! A frame is serialised once into [`bytes::Bytes`] and the same bytes go to every recipient.

use super::event::{Event, EventBody, rfc3339};
use super::names::{RoomName, UserId};
use bytes::Bytes;
use serde::Serialize;

/// An error code a client can act on (CONTRACT §4).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    BadRequest,
    UnknownAction,
    InvalidRoom,
    NotMember,
    TooLarge,
    RateLimited,
    Internal,
    /// The server no longer knows the connection: the client reconnects.
    Gone,
    /// A cap on what one user may hold was reached (rooms per user): nothing was changed.
    Limit,
}

/// Whether a `member` frame says someone joined or left.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum MemberChange {
    Joined,
    Left,
}

/// A frame from server to client.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(tag = "type", rename_all = "camelCase")]
pub enum ServerFrame {
    Message {
        room: RoomName,
        seq: u64,
        id: String,
        user: UserId,
        text: String,
        at: String,
    },
    Member {
        room: RoomName,
        seq: u64,
        id: String,
        user: UserId,
        change: MemberChange,
        at: String,
    },
    Presence {
        room: RoomName,
        user: UserId,
        online: bool,
    },
    Joined {
        room: RoomName,
        head: u64,
    },
    Left {
        room: RoomName,
    },
    /// The answer to `ping`.
    Pong,
    Sent {
        room: RoomName,
        seq: u64,
        id: String,
        #[serde(rename = "clientMsgId", skip_serializing_if = "Option::is_none")]
        client_msg_id: Option<String>,
    },
    History {
        room: RoomName,
        events: Vec<ServerFrame>,
        head: u64,
    },
    Error {
        code: ErrorCode,
        message: String,
        #[serde(skip_serializing_if = "Option::is_none")]
        action: Option<String>,
    },
}

impl ServerFrame {
    /// The live frame of a room event; `None` for connection events, which are not shown.
    pub fn of_event(event: &Event) -> Option<ServerFrame> {
        let room = event.room()?.clone();
        let id = event.id.to_string();
        let at = rfc3339(&event.at);
        let seq = event.seq;
        Some(match &event.body {
            EventBody::MessagePosted { user, text, .. } => ServerFrame::Message {
                room,
                seq,
                id,
                user: user.clone(),
                text: text.clone(),
                at,
            },
            EventBody::Joined { user, .. } => ServerFrame::Member {
                room,
                seq,
                id,
                user: user.clone(),
                change: MemberChange::Joined,
                at,
            },
            EventBody::Left { user, .. } => ServerFrame::Member {
                room,
                seq,
                id,
                user: user.clone(),
                change: MemberChange::Left,
                at,
            },
            EventBody::Connected { .. } | EventBody::Disconnected { .. } => return None,
        })
    }

    /// The live frames of `events`, in order, as many as fit in `max_bytes` of JSON: a page of
    /// history or of a replay. Always at least one when there is one, so a client paging on from
    /// the last seq it got always moves forward.
    pub fn page_of(events: &[Event], max_bytes: usize) -> Vec<ServerFrame> {
        let mut frames = Vec::new();
        let mut bytes = 0;
        for frame in events.iter().filter_map(ServerFrame::of_event) {
            // Each frame, plus the comma between frames in a `history` answer.
            let size = frame.json_len() + 1;
            if !frames.is_empty() && bytes + size > max_bytes {
                break;
            }
            bytes += size;
            frames.push(frame);
        }
        frames
    }

    /// The seq of a room event's frame.
    pub fn seq(&self) -> Option<u64> {
        match self {
            ServerFrame::Message { seq, .. } | ServerFrame::Member { seq, .. } => Some(*seq),
            _ => None,
        }
    }

    pub fn error(code: ErrorCode, message: impl Into<String>, action: Option<&str>) -> ServerFrame {
        ServerFrame::Error {
            code,
            message: message.into(),
            action: action.map(str::to_owned),
        }
    }

    pub fn to_json(&self) -> String {
        // Serialising these types cannot fail: no maps with non-string keys, no foreign types.
        serde_json::to_string(self).expect("server frames always serialise")
    }

    /// How long [`ServerFrame::to_json`] would be, without building the string.
    pub fn json_len(&self) -> usize {
        struct Count(usize);
        impl std::io::Write for Count {
            fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
                self.0 += bytes.len();
                Ok(bytes.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let mut count = Count(0);
        serde_json::to_writer(&mut count, self).expect("server frames always serialise");
        count.0
    }

    /// The frame's bytes, made once and shared by every recipient.
    pub fn to_bytes(&self) -> Bytes {
        Bytes::from(self.to_json())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::event::Event;

    #[test]
    fn message_frames_have_the_contract_shape() {
        let at = chrono::DateTime::from_timestamp_millis(1_700_000_000_123).unwrap();
        let event = Event::record(
            EventBody::MessagePosted {
                room: RoomName::parse("general").unwrap(),
                user: UserId::parse("ana").unwrap(),
                text: "hello".into(),
                client_msg_id: Some("c1".into()),
                connection: None,
            },
            7,
            at,
        );
        let json: serde_json::Value =
            serde_json::from_str(&ServerFrame::of_event(&event).unwrap().to_json()).unwrap();
        assert_eq!(json["type"], "message");
        assert_eq!(json["room"], "general");
        assert_eq!(json["seq"], 7);
        assert_eq!(json["user"], "ana");
        assert_eq!(json["text"], "hello");
        assert_eq!(json["at"], "2023-11-14T22:13:20.123Z");
        assert_eq!(json["id"].as_str().unwrap().len(), 26);
        let frame = ServerFrame::of_event(&event).unwrap();
        assert_eq!(frame.json_len(), frame.to_json().len());
    }

    #[test]
    fn a_page_stops_before_its_byte_limit_but_never_empty() {
        let at = chrono::DateTime::from_timestamp_millis(1_700_000_000_123).unwrap();
        let events: Vec<Event> = (1..=10)
            .map(|seq| {
                Event::record(
                    EventBody::MessagePosted {
                        room: RoomName::parse("general").unwrap(),
                        user: UserId::parse("ana").unwrap(),
                        text: "x".repeat(1000),
                        client_msg_id: None,
                        connection: None,
                    },
                    seq,
                    at,
                )
            })
            .collect();
        let one = ServerFrame::of_event(&events[0]).unwrap().to_json().len() + 1;
        let page = ServerFrame::page_of(&events, 3 * one + one / 2);
        assert_eq!(
            page.iter().filter_map(ServerFrame::seq).collect::<Vec<_>>(),
            [1, 2, 3]
        );
        assert_eq!(ServerFrame::page_of(&events, 10).len(), 1);
        assert_eq!(ServerFrame::page_of(&events, usize::MAX).len(), 10);
    }

    #[test]
    fn error_frames_use_snake_case_codes() {
        let json =
            ServerFrame::error(ErrorCode::NotMember, "join first", Some("sendMessage")).to_json();
        assert_eq!(
            json,
            r#"{"type":"error","code":"not_member","message":"join first","action":"sendMessage"}"#
        );
    }
}
