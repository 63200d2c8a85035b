//! Sizes and counts the contract fixes (CONTRACT §4) or that keep one client from hurting others.

/// A client frame larger than this gets `too_large` (API Gateway's frame limit is 32 KB).
pub const MAX_FRAME_BYTES: usize = 32 * 1024;
/// A message `text` larger than this (UTF-8 bytes) gets `too_large`.
pub const MAX_TEXT_BYTES: usize = 16 * 1024;
/// `getHistory` answers this many events when no `limit` is given.
pub const DEFAULT_HISTORY_LIMIT: usize = 100;
/// `getHistory` never answers more than this many events at once, and `joinRoom{after}` never
/// replays more (CONTRACT §2): the client pages on with `getHistory`.
pub const MAX_HISTORY_LIMIT: usize = 500;
/// Nor more than this many bytes of events: a route's answer is one API Gateway message, at most
/// 128 KB, and a replay of more would outlast a route's 29 s on AWS.
pub const MAX_PAGE_BYTES: usize = 96 * 1024;
/// A `clientMsgId` is an idempotency key, not a payload.
pub const MAX_CLIENT_MSG_ID_LEN: usize = 128;
/// `postToConnection` accepts at most this much (API Gateway's message limit, 128 KB).
pub const MAX_POST_BYTES: usize = 128 * 1024;

/// Rooms one user may be a member of at once, unless set (`--max-rooms-per-user`): every room a
/// user is in costs a listener row per open connection and a presence frame per connect.
pub const DEFAULT_MAX_ROOMS_PER_USER: usize = 100;

/// Connections one user may have open at once, unless set (`--max-connections-per-user`): tabs
/// and devices, with room to spare; a script opening sockets in a loop is stopped.
pub const DEFAULT_MAX_CONNECTIONS_PER_USER: usize = 20;

/// How long a closed connection's stream (its `connected` and `disconnected` events) and its
/// registry row are kept, unless set (`--connection-retention`): nobody reads them back once the
/// connection is gone, and a busy server would otherwise keep two events per connection forever.
/// Room streams are kept.
pub const DEFAULT_CONNECTION_RETENTION: std::time::Duration =
    std::time::Duration::from_secs(7 * 24 * 60 * 60);
