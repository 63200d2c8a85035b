//! Who is behind each connection this process opened, so a frame costs no registry read.
//!
//! Behind API Gateway a route learns its caller from the connection registry `$connect` wrote:
//! a Lambda container may see a connection's frames without having seen its `$connect`, and
//! another container may have closed it. The local gateway runs `$connect` and `$disconnect`
//! for every connection in this same process, and a connection it still routes frames for is
//! open by definition (a connection found gone is closed by its session, which runs
//! `$disconnect`). So there, and only there, the handlers remember each caller from `$connect`
//! until `$disconnect` — a store query per frame was a thread hand-off per frame.

use crate::domain::{ConnectionId, UserId};
use parking_lot::RwLock;
use std::collections::HashMap;

#[derive(Default)]
pub(super) struct KnownCallers(RwLock<Known>);

#[derive(Default)]
struct Known {
    users: HashMap<ConnectionId, UserId>,
    /// Open connections per user, for the per-user cap.
    open: HashMap<UserId, usize>,
}

impl KnownCallers {
    pub(super) fn opened(&self, connection: &ConnectionId, user: &UserId) {
        let mut known = self.0.write();
        if known
            .users
            .insert(connection.clone(), user.clone())
            .is_none()
        {
            *known.open.entry(user.clone()).or_default() += 1;
        }
    }

    pub(super) fn closed(&self, connection: &ConnectionId) {
        let mut known = self.0.write();
        if let Some(user) = known.users.remove(connection)
            && let Some(count) = known.open.get_mut(&user)
        {
            *count -= 1;
            if *count == 0 {
                known.open.remove(&user);
            }
        }
    }

    pub(super) fn user(&self, connection: &ConnectionId) -> Option<UserId> {
        self.0.read().users.get(connection).cloned()
    }

    /// How many connections `user` has open through this process.
    pub(super) fn open_of(&self, user: &UserId) -> usize {
        self.0.read().open.get(user).copied().unwrap_or(0)
    }
}
