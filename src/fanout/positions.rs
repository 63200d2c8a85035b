//! How far a `palaver serve` node on a shared store (DynamoDB) has delivered each log stream:
//! its own positions, in its memory.
//!
//! Each node delivers to the connections it holds, so each follows the change stream on its
//! own: a shared checkpoint would let whichever node delivered a room's event first take it
//! away from the others. And none of it needs to outlive the process: a node's connections go
//! with it, and when it starts again every connection it holds is new. A log stream it has not
//! delivered in this run starts just before the first record of it the node sees (see
//! [`super::stream::StreamFanOut::following_from_now`]): nothing earlier was appended after its
//! tail started, so nothing earlier is for connections it holds.

use crate::domain::Stream;
use crate::ports::{Checkpoint, Checkpoints, RelayLease, StoreResult};
use async_trait::async_trait;
use parking_lot::Mutex;
use std::collections::HashMap;

/// Positions kept before the connections' ones are let go: a connection's stream is written
/// twice in its life (connected, disconnected), so forgetting where it was costs nothing that
/// the first-record rule does not make up for.
const REMEMBERED: usize = 100_000;

/// [`Checkpoints`] in memory, for one run of one node.
#[derive(Debug, Default)]
pub struct RunPositions {
    delivered: Mutex<HashMap<Stream, u64>>,
}

#[async_trait]
impl Checkpoints for RunPositions {
    async fn checkpoint(&self, stream: &Stream) -> StoreResult<Checkpoint> {
        Ok(Checkpoint {
            seq: self.delivered.lock().get(stream).copied().unwrap_or(0),
            relay: None,
        })
    }

    async fn advance(
        &self,
        stream: &Stream,
        seq: u64,
        _relay: Option<RelayLease>,
    ) -> StoreResult<()> {
        let mut delivered = self.delivered.lock();
        if delivered.len() >= REMEMBERED {
            delivered.retain(|stream, _| !matches!(stream, Stream::Connection(_)));
        }
        let at = delivered.entry(stream.clone()).or_default();
        *at = (*at).max(seq);
        Ok(())
    }
}
