//! The scenarios of issue #20 (section 2) and a `smoke` run, their shapes at full size, and how
//! one is scaled down.
//!
//! The scale model (`scale` < 1): connections (room sizes) and the account's quotas (API
//! Gateway's buckets, Lambda's concurrency and reservations) are multiplied by `scale`; every
//! sender keeps its rate. A room's deliveries per second then scale with its size, exactly as
//! the bucket they draw from does, so how close the fan-out gets to the bucket is the same as
//! at full size. Latencies are never scaled. `storm` scales its number of rooms and their size
//! by √scale each, so that connections and deliveries still scale by `scale`.

use crate::settings::{self, Account, Parameters};

#[derive(Clone, Debug)]
pub struct Shape {
    pub name: &'static str,
    /// Rooms, and connections per room (senders included), at full size.
    pub rooms: usize,
    pub members: usize,
    /// Rooms each listening user is in (its rooms are spread so every room gets `members`).
    pub rooms_per_member: usize,
    /// Messages per second into each room, by one sender per room.
    pub rate_per_room: f64,
    pub secs: f64,
    /// All listening connections drop at once a third of the way in, and reconnect.
    pub storm: bool,
    /// The share of `$disconnect`s that never arrive.
    pub disconnect_loss: f64,
    /// The share of listening users who drop in the storm and never come back.
    pub leave_share: f64,
    /// One listening connection's posts time out.
    pub slow_client: bool,
    pub account_concurrency: usize,
    pub parameters: Parameters,
    /// The scale it runs at unless told otherwise: what this machine carries (README of
    /// scripts/aws-sim; measured with moto's throughput printed in each line).
    pub default_scale: f64,
}

pub fn all() -> Vec<Shape> {
    let base = Shape {
        name: "",
        rooms: 1,
        members: 1_000,
        rooms_per_member: 1,
        rate_per_room: 9.0,
        secs: 60.0,
        storm: false,
        disconnect_loss: 0.0,
        leave_share: 0.0,
        slow_client: false,
        account_concurrency: settings::LAMBDA_ACCOUNT_CONCURRENCY,
        parameters: Parameters::default(),
        default_scale: 1.0,
    };
    let storm = Shape {
        name: "storm",
        rooms: 50,
        members: 500,
        rooms_per_member: 5,
        rate_per_room: 2.0,
        secs: 60.0,
        storm: true,
        default_scale: 0.01,
        ..base.clone()
    };
    vec![
        Shape {
            name: "smoke",
            members: 6,
            rate_per_room: 2.0,
            secs: 3.0,
            // Small rooms go through the delivery queue too, so the smoke run covers it.
            parameters: Parameters {
                shard_threshold: 2,
                shard_size: 2,
                ..Parameters::default()
            },
            ..base.clone()
        },
        Shape {
            name: "bigroom-1k-fast",
            default_scale: 0.2,
            ..base.clone()
        },
        Shape {
            name: "bigroom-10k",
            members: 10_000,
            rate_per_room: 0.9,
            default_scale: 0.02,
            ..base.clone()
        },
        storm.clone(),
        Shape {
            name: "newaccount",
            // `storm` at a tenth of its size: 500 listening connections.
            members: 50,
            account_concurrency: settings::LAMBDA_NEW_ACCOUNT_CONCURRENCY,
            default_scale: 0.1,
            ..storm.clone()
        },
        Shape {
            name: "slowclient",
            slow_client: true,
            rate_per_room: 2.0,
            default_scale: 0.2,
            ..base.clone()
        },
        // The same run without its slow client: what `slowclient`'s latencies are held to.
        Shape {
            name: "slowclient-baseline",
            rate_per_room: 2.0,
            default_scale: 0.2,
            ..base.clone()
        },
        Shape {
            name: "stale",
            disconnect_loss: 0.1,
            // Some users do not come back: with their `$disconnect` lost, only the fan-out's
            // 410s show them offline.
            leave_share: 0.1,
            ..storm
        },
    ]
}

/// A scenario as it runs: its shape at a scale.
#[derive(Clone, Debug)]
pub struct Scaled {
    pub shape: Shape,
    pub scale: f64,
    pub rooms: usize,
    pub members: usize,
    pub account: Account,
    pub parameters: Parameters,
}

impl Shape {
    pub fn at(&self, scale: f64) -> Scaled {
        let (rooms, members) = if self.rooms > 1 {
            let each = scale.sqrt();
            let rooms = ((self.rooms as f64 * each).round() as usize).max(self.rooms_per_member);
            let members = (self.rooms * self.members) as f64 * scale / rooms as f64;
            (rooms, (members.round() as usize).max(2))
        } else {
            (1, ((self.members as f64 * scale).round() as usize).max(2))
        };
        let mut account = Account::with_concurrency(self.account_concurrency).scaled(scale);
        let mut parameters = self.parameters.scaled(scale);
        if self.account_concurrency < settings::LAMBDA_ACCOUNT_CONCURRENCY {
            // A new account's concurrency is what the scenario is about: kept as it is.
            let new = Account::with_concurrency(self.account_concurrency);
            account.lambda_concurrency = new.lambda_concurrency;
            account.lambda_unreserved_floor = new.lambda_unreserved_floor;
            parameters = self.parameters.clone();
        }
        Scaled {
            shape: self.clone(),
            scale,
            rooms,
            members,
            account,
            parameters,
        }
    }
}

/// One client's part: its user, rooms, rate, and whether it is slow or storms.
pub fn plans(scaled: &Scaled) -> Vec<crate::clients::Plan> {
    let shape = &scaled.shape;
    let room = |r: usize| format!("room-{r}");
    let mut plans = Vec::new();
    // One sender per room, in that room only; it stays through storms.
    for r in 0..scaled.rooms {
        plans.push(crate::clients::Plan {
            user: format!("sender-{r}"),
            rooms: vec![room(r)],
            rate: shape.rate_per_room,
            slow: false,
            storm: false,
            leaves: false,
        });
    }
    // Listeners: each in `rooms_per_member` rooms, spread so every room gets the same number.
    let per_member = shape.rooms_per_member.min(scaled.rooms).max(1);
    let groups = (scaled.rooms / per_member).max(1);
    let listeners = (scaled.rooms * (scaled.members - 1)) / per_member;
    for i in 0..listeners {
        let g = i % groups;
        plans.push(crate::clients::Plan {
            user: format!("user-{i}"),
            rooms: (0..per_member).map(|k| room(g + groups * k)).collect(),
            rate: 0.0,
            slow: shape.slow_client && i == 0,
            storm: shape.storm,
            // Every n-th listener (never the first, which may be the slow one).
            leaves: shape.leave_share > 0.0
                && i % (1.0 / shape.leave_share).round().max(1.0) as usize == 1,
        });
    }
    plans
}
