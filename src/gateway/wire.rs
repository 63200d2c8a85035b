//! WebSocket frames as they go on the wire, encoded once.
//!
//! Server frames are never masked, so a room event's frame — header and payload — is the same
//! bytes for every recipient: it is encoded here once and each connection's outbox holds a
//! reference to it (`Bytes`), which the writer hands to the kernel as it is.

use bytes::Bytes;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::Frame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::{Data, OpCode};

/// A text frame carrying `text`.
pub fn text(text: impl Into<Bytes>) -> Bytes {
    encode(Frame::message(text, OpCode::Data(Data::Text), true))
}

/// The frame for bytes posted to a connection: text when they are UTF-8, binary otherwise, as
/// API Gateway does.
pub fn posted(payload: Bytes) -> Bytes {
    let opcode = if std::str::from_utf8(&payload).is_ok() {
        Data::Text
    } else {
        Data::Binary
    };
    encode(Frame::message(payload, OpCode::Data(opcode), true))
}

/// The answer to a client's ping.
pub fn pong(payload: Bytes) -> Bytes {
    encode(Frame::pong(payload))
}

/// A close frame with its code and reason.
pub fn close(code: u16, reason: &str) -> Bytes {
    encode(Frame::close(Some(CloseFrame {
        code: code.into(),
        reason: reason.into(),
    })))
}

fn encode(frame: Frame) -> Bytes {
    let mut out = Vec::with_capacity(frame.len());
    // Writing into a `Vec` cannot fail.
    let _ = frame.format(&mut out);
    out.into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_short_text_frame_is_a_two_byte_header_and_the_payload() {
        assert_eq!(&text("hi")[..], b"\x81\x02hi");
    }

    #[test]
    fn a_longer_frame_carries_its_length_in_sixteen_bits() {
        let frame = text(vec![b'a'; 300]);
        assert_eq!(&frame[..4], &[0x81, 126, 1, 44]);
        assert_eq!(frame.len(), 304);
    }

    #[test]
    fn posted_bytes_that_are_not_utf8_go_out_binary() {
        assert_eq!(posted(Bytes::from_static(b"\xff"))[0], 0x82);
        assert_eq!(posted(Bytes::from_static(b"ok"))[0], 0x81);
    }

    #[test]
    fn a_close_frame_carries_code_then_reason() {
        assert_eq!(&close(1000, "bye")[..], b"\x88\x05\x03\xe8bye");
    }
}
