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
    /// Takes one of `user`'s `cap` places for `connection`, or says how many are taken. Counted
    /// and taken under one lock, so that a thousand handshakes of one user at once take exactly
    /// `cap` places; a place taken is given back by [`KnownCallers::closed`] (`$disconnect`, or a
    /// `$connect` that failed after taking it).
    pub(super) fn reserve(
        &self,
        connection: &ConnectionId,
        user: &UserId,
        cap: usize,
    ) -> Result<(), usize> {
        let mut known = self.0.write();
        let open = known.open.get(user).copied().unwrap_or(0);
        if known.users.contains_key(connection) {
            return Ok(());
        }
        if open >= cap {
            return Err(open);
        }
        known.users.insert(connection.clone(), user.clone());
        *known.open.entry(user.clone()).or_default() += 1;
        Ok(())
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
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn places_are_taken_up_to_the_cap_and_given_back_on_close() {
        let callers = KnownCallers::default();
        let ana = UserId::parse("ana").unwrap();
        let c = |n: u32| ConnectionId::new(format!("c{n}"));
        assert_eq!(callers.reserve(&c(1), &ana, 2), Ok(()));
        assert_eq!(callers.reserve(&c(2), &ana, 2), Ok(()));
        assert_eq!(callers.reserve(&c(3), &ana, 2), Err(2));
        // The same connection again takes nothing more.
        assert_eq!(callers.reserve(&c(2), &ana, 2), Ok(()));
        callers.closed(&c(1));
        assert_eq!(callers.reserve(&c(3), &ana, 2), Ok(()));
        assert_eq!(callers.user(&c(3)), Some(ana));
    }
}
