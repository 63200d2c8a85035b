//! What clients ask for (CONTRACT §2), parsed and validated before anything touches the log.
//!
//! Route selection happens by `action` before a request gets here (as API Gateway does); this
//! module turns a route's JSON body into a typed request or a [`Rejection`] the client can read.

use super::frames::{ErrorCode, ServerFrame};
use super::limits::{
    DEFAULT_HISTORY_LIMIT, MAX_CLIENT_MSG_ID_LEN, MAX_FRAME_BYTES, MAX_HISTORY_LIMIT,
    MAX_TEXT_BYTES,
};
use super::names::RoomName;
use serde_json::{Map, Value};

/// A client's request on one of the named routes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Request {
    JoinRoom {
        room: RoomName,
        after: Option<u64>,
    },
    LeaveRoom {
        room: RoomName,
    },
    SendMessage {
        room: RoomName,
        text: String,
        client_msg_id: Option<String>,
    },
    GetHistory {
        room: RoomName,
        after: u64,
        limit: usize,
    },
    /// A keepalive: answered `pong`, touches nothing.
    Ping,
}

/// The named routes, as their `action` values.
pub const ROUTES: [&str; 5] = ["joinRoom", "leaveRoom", "sendMessage", "getHistory", "ping"];

/// Why a request was refused: becomes an `error` frame.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rejection {
    pub code: ErrorCode,
    pub message: String,
}

impl Rejection {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Rejection {
            code,
            message: message.into(),
        }
    }

    pub fn frame(&self, action: Option<&str>) -> ServerFrame {
        ServerFrame::error(self.code, self.message.clone(), action)
    }
}

/// The route a frame goes to, the way `$request.body.action` selects it: a JSON object whose
/// `action` names a known route goes there; anything else goes to `$default`.
///
/// The value is the parsed string, escapes and all (`"join\u0052oom"` is `joinRoom`), as the
/// handlers read it; a frame with `action` twice goes to `$default`, which says so.
pub fn select_route(body: &str) -> &'static str {
    #[derive(serde::Deserialize)]
    struct Action<'a> {
        #[serde(borrow)]
        action: Option<std::borrow::Cow<'a, str>>,
    }
    match serde_json::from_str::<Action>(body) {
        Ok(Action {
            action: Some(action),
        }) => ROUTES
            .iter()
            .find(|r| **r == action)
            .copied()
            .unwrap_or("$default"),
        _ => "$default",
    }
}

/// Parses the body of a frame that route selection sent to `route`.
pub fn parse(route: &str, body: &str) -> Result<Request, Rejection> {
    if body.len() > MAX_FRAME_BYTES {
        return Err(Rejection::new(
            ErrorCode::TooLarge,
            format!("frames are limited to {MAX_FRAME_BYTES} bytes"),
        ));
    }
    let fields = object(body)?;
    let room = || room(&fields);
    match route {
        "ping" => Ok(Request::Ping),
        "joinRoom" => Ok(Request::JoinRoom {
            room: room()?,
            after: seq(&fields, "after")?,
        }),
        "leaveRoom" => Ok(Request::LeaveRoom { room: room()? }),
        "sendMessage" => {
            let room = room()?;
            let text = match fields.get("text") {
                Some(Value::String(t)) => t.clone(),
                Some(_) => return Err(bad("text must be a string")),
                None => return Err(bad("text is required")),
            };
            if text.len() > MAX_TEXT_BYTES {
                return Err(Rejection::new(
                    ErrorCode::TooLarge,
                    format!("text is limited to {MAX_TEXT_BYTES} bytes"),
                ));
            }
            if text.trim().is_empty() {
                return Err(bad("text must not be empty"));
            }
            let client_msg_id = match fields.get("clientMsgId") {
                None | Some(Value::Null) => None,
                Some(Value::String(id)) if !id.is_empty() && id.len() <= MAX_CLIENT_MSG_ID_LEN => {
                    Some(id.clone())
                }
                Some(_) => {
                    return Err(bad(format!(
                        "clientMsgId must be a string of 1 to {MAX_CLIENT_MSG_ID_LEN} bytes"
                    )));
                }
            };
            Ok(Request::SendMessage {
                room,
                text,
                client_msg_id,
            })
        }
        "getHistory" => {
            let room = room()?;
            let after = seq(&fields, "after")?.unwrap_or(0);
            let limit = match seq(&fields, "limit")? {
                None => DEFAULT_HISTORY_LIMIT,
                Some(0) => return Err(bad("limit must be at least 1")),
                Some(n) => usize::try_from(n)
                    .unwrap_or(MAX_HISTORY_LIMIT)
                    .min(MAX_HISTORY_LIMIT),
            };
            Ok(Request::GetHistory { room, after, limit })
        }
        other => Err(Rejection::new(
            ErrorCode::UnknownAction,
            format!("unknown action {other:?}"),
        )),
    }
}

/// What `$default` answers: why the frame matched no route.
pub fn default_route_rejection(body: &str) -> Rejection {
    if body.len() > MAX_FRAME_BYTES {
        return Rejection::new(
            ErrorCode::TooLarge,
            format!("frames are limited to {MAX_FRAME_BYTES} bytes"),
        );
    }
    match object(body) {
        Err(rejection) => rejection,
        Ok(fields) => match fields.get("action") {
            None => Rejection::new(
                ErrorCode::UnknownAction,
                "a frame needs an \"action\": one of joinRoom, leaveRoom, sendMessage, getHistory, ping",
            ),
            // A known name that route selection did not take: it was there more than once.
            Some(Value::String(action)) if ROUTES.contains(&action.as_str()) => Rejection::new(
                ErrorCode::BadRequest,
                "\"action\" appears more than once in this frame",
            ),
            Some(action) => Rejection::new(
                ErrorCode::UnknownAction,
                format!(
                    "unknown action {action}: use one of joinRoom, leaveRoom, sendMessage, getHistory, ping"
                ),
            ),
        },
    }
}

fn bad(message: impl Into<String>) -> Rejection {
    Rejection::new(ErrorCode::BadRequest, message)
}

fn object(body: &str) -> Result<Map<String, Value>, Rejection> {
    match serde_json::from_str::<Value>(body) {
        Ok(Value::Object(fields)) => Ok(fields),
        Ok(_) => Err(bad("a frame must be a JSON object")),
        Err(e) => Err(bad(format!("a frame must be a JSON object: {e}"))),
    }
}

fn room(fields: &Map<String, Value>) -> Result<RoomName, Rejection> {
    match fields.get("room") {
        Some(Value::String(name)) => {
            RoomName::parse(name).map_err(|e| Rejection::new(ErrorCode::InvalidRoom, e.to_string()))
        }
        Some(_) => Err(Rejection::new(
            ErrorCode::InvalidRoom,
            "room must be a string",
        )),
        None => Err(bad("room is required")),
    }
}

fn seq(fields: &Map<String, Value>, name: &str) -> Result<Option<u64>, Rejection> {
    match fields.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v
            .as_u64()
            .map(Some)
            .ok_or_else(|| bad(format!("{name} must be a whole number, 0 or more"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ping_is_a_route_of_its_own() {
        let body = r#"{"action":"ping"}"#;
        assert_eq!(select_route(body), "ping");
        assert_eq!(parse("ping", body), Ok(Request::Ping));
    }

    #[test]
    fn route_selection_follows_the_action_field() {
        assert_eq!(
            select_route(r#"{"action":"sendMessage","room":"a"}"#),
            "sendMessage"
        );
        assert_eq!(select_route(r#"{"action":"dance"}"#), "$default");
        assert_eq!(select_route(r#"{"action":"join\u0052oom"}"#), "joinRoom");
        let twice = r#"{"action":"leaveRoom","action":"joinRoom","room":"r"}"#;
        assert_eq!(select_route(twice), "$default");
        assert_eq!(default_route_rejection(twice).code, ErrorCode::BadRequest);
        assert_eq!(select_route(r#"{"room":"a"}"#), "$default");
        assert_eq!(select_route("not json"), "$default");
        assert_eq!(select_route(r#"[1,2]"#), "$default");
    }

    #[test]
    fn requests_are_validated() {
        assert_eq!(
            parse("sendMessage", r#"{"room":"a b","text":"x"}"#)
                .unwrap_err()
                .code,
            ErrorCode::InvalidRoom
        );
        assert_eq!(
            parse("sendMessage", r#"{"room":"a"}"#).unwrap_err().code,
            ErrorCode::BadRequest
        );
        let big = "x".repeat(MAX_TEXT_BYTES + 1);
        assert_eq!(
            parse("sendMessage", &format!(r#"{{"room":"a","text":"{big}"}}"#))
                .unwrap_err()
                .code,
            ErrorCode::TooLarge
        );
        assert_eq!(
            parse("getHistory", r#"{"room":"a","limit":9000}"#).unwrap(),
            Request::GetHistory {
                room: RoomName::parse("a").unwrap(),
                after: 0,
                limit: MAX_HISTORY_LIMIT
            }
        );
        assert_eq!(
            parse("joinRoom", r#"{"room":"a","after":-1}"#)
                .unwrap_err()
                .code,
            ErrorCode::BadRequest
        );
    }

    #[test]
    fn default_route_explains_itself() {
        assert_eq!(default_route_rejection("[]").code, ErrorCode::BadRequest);
        assert_eq!(default_route_rejection("{}").code, ErrorCode::UnknownAction);
        assert_eq!(
            default_route_rejection(r#"{"action":"x"}"#).code,
            ErrorCode::UnknownAction
        );
    }
}
