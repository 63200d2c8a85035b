//! The fan-out: from a log event to frames on every connection that should see it.
//!
//! Driven by the log, never by a handler: locally by [`tail`]; on AWS by the events table's
//! stream (Lambda's event source mapping, or [`change_stream`] in `palaver serve`), through
//! [`stream::StreamFanOut`].
//! Each frame is serialised once and the same bytes are posted to every recipient. A recipient
//! the gateway reports gone (410) is closed in the log ([`connections::close`]) — which in turn
//! tells its rooms, through this same fan-out, that its user went offline if that was their last
//! connection.
//!
//! Who hears an event comes from [`Listeners`]: locally an in-memory [`Roster`] the tail keeps
//! by folding the events it delivers (no store query per event); on AWS the store's projection,
//! read once per room per batch ([`StoreListeners`]).

pub mod change_stream;
mod lanes;
pub mod positions;
pub mod roster;
mod stragglers;
pub mod stream;
pub mod tail;

use lanes::relay_jobs;
pub use lanes::{MAX_RELAY_LANES, MIN_RELAY_LANES, relay_lanes_for};

use crate::connections;
use crate::domain::{ConnectionId, Event, EventBody, RoomName, ServerFrame, UserId};
use crate::ports::{
    ConnectionGateway, DeliveryJob, DeliveryQueue, Directory, EventLog, Listener, PostError, Store,
    StoreError, StoreResult,
};
use async_trait::async_trait;
use bytes::Bytes;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

pub use roster::Roster;
pub use stragglers::{STRAGGLER_GRACE, Stragglers};

/// What delivering one event did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Delivery {
    /// Posts that reached a connection.
    pub delivered: usize,
    /// Connections found gone and closed.
    pub gone: Vec<ConnectionId>,
    /// Posts that failed for another reason (the connection may still be there).
    pub failed: usize,
    /// Of `failed`, those that failed because the management API itself did
    /// ([`PostError::Unavailable`]): a later try of the same posts may succeed.
    pub unavailable: usize,
    /// Recipients handed to delivery workers instead of posted here.
    pub queued: usize,
    /// Posts let go to finish on their own ([`stragglers`]), counted in the metrics when they end.
    pub late: usize,
}

impl Delivery {
    pub fn add(&mut self, other: Delivery) {
        self.delivered += other.delivered;
        self.gone.extend(other.gone);
        self.failed += other.failed;
        self.unavailable += other.unavailable;
        self.queued += other.queued;
        self.late += other.late;
    }
}

/// Who listens: what the fan-out reads to turn an event into recipients.
///
/// [`Listeners::observe`] is called with every event before it is delivered, so that an answer
/// reflects the event itself (a join's `member` frame reaches the new member too).
#[async_trait]
pub trait Listeners: Send {
    /// Takes `event` into account.
    async fn observe(&mut self, event: &Event) -> StoreResult<()>;

    /// Every open connection of every member of `room` — for a room event (`seq` given), only
    /// those that hear it live ([`Directory::live_from`]): a connection that started listening
    /// after it was appended gets it as history, never also live.
    async fn audience(
        &mut self,
        room: &RoomName,
        seq: Option<u64>,
    ) -> StoreResult<Arc<[ConnectionId]>>;

    /// The rooms `user` is a member of.
    async fn rooms_of(&mut self, user: &UserId) -> StoreResult<Vec<RoomName>>;

    /// `user`'s open connections, oldest first.
    async fn connections_of(&mut self, user: &UserId) -> StoreResult<Vec<ConnectionId>>;

    /// The gateway found `connection` gone; its `disconnected` event will follow.
    fn gone(&mut self, connection: &ConnectionId);

    /// Over how many lanes `room`'s frames went to the delivery queue earlier in this run of
    /// events (or under a lease from an earlier run), if they did. Once they have, the run's
    /// later frames of the room follow them there, over the same lanes: posted directly, or
    /// through another lane, a later frame could reach someone before an earlier one still
    /// waiting in the queue.
    fn relay_lanes(&self, _room: &RoomName) -> Option<u32> {
        None
    }

    /// Notes that `room`'s frames went to the delivery queue over `lanes` lanes.
    fn relay(&mut self, _room: &RoomName, _lanes: u32) {}
}

/// The store's projection as the listeners, with each room's audience read once per run of
/// events and kept up to date through the run: a connection that opens is added to the rooms
/// it listens to, one that closes or is found gone is taken out — no audience is read again for
/// them. (A reconnect storm is a run of `connected` events: re-reading every room's audience for
/// each would be a Query per room per event.) A join or a leave drops its room's audience, to be
/// read again when next needed.
pub struct StoreListeners {
    directory: Arc<dyn Directory>,
    rooms: HashMap<RoomName, Audience>,
    /// Users' rooms, as read in this run (a connect's presence and its listening need them).
    user_rooms: HashMap<UserId, Vec<RoomName>>,
    /// Rooms whose frames went to the delivery queue in this run, and over how many lanes.
    relayed: HashMap<RoomName, u32>,
    /// Only this holder's connections are in the audiences; `None`: everyone's.
    holder: Option<Holder>,
}

/// A room's listeners as read from the store.
struct Audience {
    /// Every listener, shared, so a run of events in a big room reuses one list instead of
    /// copying it.
    everyone: Arc<[ConnectionId]>,
    /// Each listener's first live seq, in the order of `everyone`.
    live_from: Vec<u64>,
    /// The latest of them: every event from this seq on goes to `everyone`.
    settled_from: u64,
}

impl Audience {
    /// Adds `connection`, hearing the room from `live_from` on, unless it is there already
    /// (the audience was read after its connect was applied).
    fn add(&mut self, connection: &ConnectionId, live_from: u64) {
        if self.everyone.contains(connection) {
            return;
        }
        let mut everyone = self.everyone.to_vec();
        everyone.push(connection.clone());
        self.everyone = everyone.into();
        self.live_from.push(live_from);
        self.settled_from = self.settled_from.max(live_from);
    }

    /// Takes `connection` out, if it is there.
    fn remove(&mut self, connection: &ConnectionId) {
        let Some(at) = self.everyone.iter().position(|c| c == connection) else {
            return;
        };
        let mut everyone = self.everyone.to_vec();
        everyone.remove(at);
        self.everyone = everyone.into();
        self.live_from.remove(at);
    }

    fn of(listeners: Vec<Listener>) -> Audience {
        let settled_from = listeners.iter().map(|l| l.live_from).max().unwrap_or(0);
        let (everyone, live_from): (Vec<ConnectionId>, Vec<u64>) = listeners
            .into_iter()
            .map(|l| (l.connection, l.live_from))
            .unzip();
        Audience {
            everyone: everyone.into(),
            live_from,
            settled_from,
        }
    }

    /// Who hears the room's event `seq` live (`None`: not a room event, everyone).
    fn hearing(&self, seq: Option<u64>) -> Arc<[ConnectionId]> {
        match seq {
            Some(seq) if seq < self.settled_from => self
                .everyone
                .iter()
                .zip(&self.live_from)
                .filter(|(_, from)| **from <= seq)
                .map(|(connection, _)| connection.clone())
                .collect(),
            _ => self.everyone.clone(),
        }
    }
}

impl StoreListeners {
    /// Takes a closed connection out of every audience read so far.
    fn forget(&mut self, connection: &ConnectionId) {
        for audience in self.rooms.values_mut() {
            audience.remove(connection);
        }
    }

    /// Listeners read from `directory`; audiences of `holder`'s connections only (`None`:
    /// everyone's).
    pub fn new(directory: Arc<dyn Directory>, holder: Option<Holder>) -> Self {
        StoreListeners {
            directory,
            rooms: HashMap::new(),
            user_rooms: HashMap::new(),
            relayed: HashMap::new(),
            holder,
        }
    }

    fn holds(&self, node: Option<&str>) -> bool {
        self.holder.as_ref().is_none_or(|h| h.holds(node))
    }
}

#[async_trait]
impl Listeners for StoreListeners {
    /// Brings the audiences read so far up to `event` (which the store applied already): a
    /// join or leave drops its room's; a connection that opened joins the audiences of its
    /// user's rooms (its listener rows give the seq it hears each from: a read per room of the
    /// user's that is cached, never a room's whole audience); one that closed leaves them all.
    async fn observe(&mut self, event: &Event) -> StoreResult<()> {
        match &event.body {
            EventBody::Joined { room, user } | EventBody::Left { room, user } => {
                self.rooms.remove(room);
                self.user_rooms.remove(user);
            }
            EventBody::Connected {
                connection,
                user,
                node,
                ..
            } => {
                if self.rooms.is_empty() || !self.holds(node.as_deref()) {
                    return Ok(());
                }
                for room in self.rooms_of(user).await? {
                    if !self.rooms.contains_key(&room) {
                        continue;
                    }
                    let live_from = self.directory.live_from(connection, &room).await?;
                    if let (Some(live_from), Some(audience)) =
                        (live_from, self.rooms.get_mut(&room))
                    {
                        audience.add(connection, live_from);
                    }
                }
            }
            EventBody::Disconnected { connection, .. } => self.forget(connection),
            EventBody::MessagePosted { .. } => {}
        }
        Ok(())
    }

    async fn audience(
        &mut self,
        room: &RoomName,
        seq: Option<u64>,
    ) -> StoreResult<Arc<[ConnectionId]>> {
        if let Some(audience) = self.rooms.get(room) {
            return Ok(audience.hearing(seq));
        }
        let mut listeners = self.directory.listeners(room).await?;
        listeners.retain(|l| self.holds(l.node.as_deref()));
        let audience = Audience::of(listeners);
        let hearing = audience.hearing(seq);
        self.rooms.insert(room.clone(), audience);
        Ok(hearing)
    }

    async fn rooms_of(&mut self, user: &UserId) -> StoreResult<Vec<RoomName>> {
        if let Some(rooms) = self.user_rooms.get(user) {
            return Ok(rooms.clone());
        }
        let rooms = self.directory.rooms_of(user).await?;
        self.user_rooms.insert(user.clone(), rooms.clone());
        Ok(rooms)
    }

    async fn connections_of(&mut self, user: &UserId) -> StoreResult<Vec<ConnectionId>> {
        Ok(self
            .directory
            .open_connections(Some(user))
            .await?
            .into_iter()
            .map(|c| c.id)
            .collect())
    }

    fn gone(&mut self, connection: &ConnectionId) {
        // Its close is in the store already; the audiences read before it still have it.
        self.forget(connection);
    }

    fn relay_lanes(&self, room: &RoomName) -> Option<u32> {
        self.relayed.get(room).copied()
    }

    fn relay(&mut self, room: &RoomName, lanes: u32) {
        self.relayed.insert(room.clone(), lanes);
    }
}

/// One frame for one room's recipients, planned by [`FanOut::plan_in`] and sent by
/// [`FanOut::send`].
#[derive(Clone, Debug)]
pub struct Outgoing {
    pub room: RoomName,
    frame: Bytes,
    recipients: Arc<[ConnectionId]>,
    key: String,
    /// Through the delivery queue, over this many lanes; posted here when `None`.
    lanes: Option<u32>,
}

impl Outgoing {
    /// Whether it goes to delivery workers through the queue rather than posted by the
    /// fan-out.
    pub fn relayed(&self) -> bool {
        self.lanes.is_some()
    }
}

/// Big rooms: above `threshold` recipients, the fan-out hands the recipients, `job_size` at a time,
/// to delivery workers instead of posting itself.
#[derive(Clone)]
struct Relay {
    queue: Arc<dyn DeliveryQueue>,
    threshold: usize,
    job_size: usize,
}

/// Computes recipients and posts frames.
#[derive(Clone)]
pub struct FanOut {
    log: Arc<dyn EventLog>,
    directory: Arc<dyn Directory>,
    gateway: Arc<dyn ConnectionGateway>,
    relay: Option<Relay>,
    /// How long after `$connect` a 410 is taken for a handshake still finishing rather than
    /// for gone (`connections::gone`). Zero where the gateway tells the two apart.
    handshake_grace: Duration,
    /// How long after its append an event is delivered, at the earliest (`with_delay`).
    delay: Duration,
    /// Whose connections it delivers to, where several share the store; `None`: all of them.
    holder: Option<Holder>,
    /// The posts it let go, where it lets the last few of a frame go (`letting_stragglers_go`).
    stragglers: Option<Arc<Stragglers>>,
}

/// Who holds a connection's socket, where several deliverers share a store (DynamoDB): each
/// delivers to its own and leaves the others' alone. To another's connection, a post would
/// find nobody and take it for gone.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Holder {
    /// API Gateway: the connections no `palaver serve` node holds (the Lambda fan-out's).
    ApiGateway,
    /// One `palaver serve` node (`--node-id`).
    Node(String),
}

impl Holder {
    /// Whether a connection held by `node` (`None`: API Gateway) is this holder's.
    pub fn holds(&self, node: Option<&str>) -> bool {
        match self {
            Holder::ApiGateway => node.is_none(),
            Holder::Node(name) => node == Some(name.as_str()),
        }
    }
}

impl FanOut {
    pub fn new(store: &Store, gateway: Arc<dyn ConnectionGateway>) -> Self {
        FanOut {
            log: store.log.clone(),
            directory: store.directory.clone(),
            gateway,
            relay: None,
            handshake_grace: Duration::ZERO,
            delay: Duration::ZERO,
            holder: None,
            stragglers: None,
        }
    }

    /// Lets the last few posts of a frame finish on their own once the others answered
    /// ([`stragglers`]): for a gateway whose posts are requests that one slow connection can
    /// hold (API Gateway's management API). Whoever calls [`FanOut::post_to`] then waits for
    /// them with [`FanOut::settle`] before its invocation ends.
    pub fn letting_stragglers_go(mut self) -> Self {
        self.stragglers = Some(Arc::default());
        self
    }

    /// Waits until `by` for the posts let go to end, and aborts the ones still running then.
    /// Returns how many were aborted.
    pub async fn settle(&self, by: tokio::time::Instant) -> usize {
        match &self.stragglers {
            Some(stragglers) => stragglers.settle(by).await,
            None => 0,
        }
    }

    /// Delivers only to the connections `holder` holds: one of several deliverers sharing the
    /// store.
    pub fn with_holder(mut self, holder: Holder) -> Self {
        self.holder = Some(holder);
        self
    }

    /// Fresh listeners for a run of events, as this fan-out reads them.
    pub fn listeners(&self) -> StoreListeners {
        StoreListeners::new(self.directory.clone(), self.holder.clone())
    }

    /// Delivers each event no sooner than `delay` after it was appended: the lag of AWS's
    /// stream, on a local server, to try a client against (`serve --fanout-delay`).
    pub fn with_delay(mut self, delay: Duration) -> Self {
        self.delay = delay;
        self
    }

    /// Behind API Gateway, which answers 410 both for a gone connection and for one whose
    /// handshake is still finishing: spare connections younger than `grace`.
    pub fn with_handshake_grace(mut self, grace: Duration) -> Self {
        self.handshake_grace = grace;
        self
    }

    /// Hands audiences larger than `threshold` to `queue`, in jobs of at most `job_size` recipients.
    pub fn with_relay(
        mut self,
        queue: Arc<dyn DeliveryQueue>,
        threshold: usize,
        job_size: usize,
    ) -> Self {
        self.relay = Some(Relay {
            queue,
            threshold,
            job_size: job_size.max(1),
        });
        self
    }

    /// Delivers one event, reading its listeners from the store.
    pub async fn deliver(&self, event: &Event) -> StoreResult<Delivery> {
        let mut listeners = self.listeners();
        self.deliver_in(event, &mut listeners).await
    }

    /// Delivers one event to what `listeners` say. Room events go to the room's audience; a
    /// user's first connection opening or last one closing becomes a `presence` frame in each of
    /// their rooms.
    pub async fn deliver_in(
        &self,
        event: &Event,
        listeners: &mut dyn Listeners,
    ) -> StoreResult<Delivery> {
        let mut delivery = Delivery::default();
        for outgoing in self.plan_in(event, listeners).await? {
            delivery.add(self.send(outgoing).await?);
        }
        for connection in &delivery.gone {
            listeners.gone(connection);
        }
        Ok(delivery)
    }

    /// What delivering one event sends, without sending it: the frames and their recipients,
    /// room by room, in the order they must go out. [`FanOut::send`] sends each. Split so that
    /// a stream batch can plan its events in order and then send to its rooms at once, each
    /// room's frames in order.
    pub async fn plan_in(
        &self,
        event: &Event,
        listeners: &mut dyn Listeners,
    ) -> StoreResult<Vec<Outgoing>> {
        if !self.delay.is_zero() {
            let due = event.at + self.delay;
            if let Ok(wait) = (due - chrono::Utc::now()).to_std() {
                tokio::time::sleep(wait).await;
            }
        }
        listeners.observe(event).await?;
        match &event.body {
            EventBody::Joined { room, .. }
            | EventBody::Left { room, .. }
            | EventBody::MessagePosted { room, .. } => {
                let Some(frame) = ServerFrame::of_event(event) else {
                    return Ok(Vec::new());
                };
                let audience = listeners.audience(room, Some(event.seq)).await?;
                let key = format!("{}:{}", event.stream, event.seq);
                Ok(vec![self.outgoing(
                    audience,
                    frame.to_bytes(),
                    room,
                    key,
                    listeners,
                )])
            }
            EventBody::Connected {
                connection, user, ..
            } => {
                // "First connection": this is the user's oldest open one. A burst of connects
                // and disconnects can at worst repeat a presence frame, never leave a room
                // believing the wrong final state.
                let open = listeners.connections_of(user).await?;
                if open.first() != Some(connection) {
                    return Ok(Vec::new());
                }
                self.presence(event, user, true, Some(connection), listeners)
                    .await
            }
            EventBody::Disconnected { user, .. } => {
                if !listeners.connections_of(user).await?.is_empty() {
                    return Ok(Vec::new());
                }
                self.presence(event, user, false, None, listeners).await
            }
        }
    }

    async fn presence(
        &self,
        event: &Event,
        user: &UserId,
        online: bool,
        except: Option<&ConnectionId>,
        listeners: &mut dyn Listeners,
    ) -> StoreResult<Vec<Outgoing>> {
        let mut outgoing = Vec::new();
        for room in listeners.rooms_of(user).await? {
            let frame = ServerFrame::Presence {
                room: room.clone(),
                user: user.clone(),
                online,
            };
            let audience: Arc<[ConnectionId]> = listeners
                .audience(&room, None)
                .await?
                .iter()
                // The new connection knows it is online; and on AWS it may not be open yet.
                .filter(|c| Some(*c) != except)
                .cloned()
                .collect();
            let key = format!("{}:{}:{room}", event.stream, event.seq);
            outgoing.push(self.outgoing(audience, frame.to_bytes(), &room, key, listeners));
        }
        Ok(outgoing)
    }

    /// `frame` for `recipients`, to be posted here or handed to delivery workers: through them
    /// when there are more recipients than the relay's threshold — or when the room's frames
    /// already went to them (in this run of events, or under a lease), over the same lanes.
    /// `room` and `key` (what the frame is of: the event's stream and seq) name the jobs.
    fn outgoing(
        &self,
        recipients: Arc<[ConnectionId]>,
        frame: Bytes,
        room: &RoomName,
        key: String,
        listeners: &mut dyn Listeners,
    ) -> Outgoing {
        let lanes = listeners.relay_lanes(room);
        let lanes = match &self.relay {
            Some(relay) if recipients.len() > relay.threshold || lanes.is_some() => {
                let lanes =
                    lanes.unwrap_or_else(|| relay_lanes_for(recipients.len(), relay.job_size));
                listeners.relay(room, lanes);
                Some(lanes)
            }
            _ => None,
        };
        Outgoing {
            room: room.clone(),
            frame,
            recipients,
            key,
            lanes,
        }
    }

    /// Sends what [`FanOut::plan_in`] planned: posts it, or queues it for delivery workers.
    pub async fn send(&self, outgoing: Outgoing) -> StoreResult<Delivery> {
        self.send_run(vec![outgoing]).await
    }

    /// Sends a run of one room's planned frames, in order. The relayed ones are merged into one
    /// job per lane where the lane's connections stayed the same ([`lanes::merged`]) and queued
    /// together, each lane's jobs in order; one that is posted directly goes out in its place,
    /// after what was queued before it.
    pub async fn send_run(&self, run: Vec<Outgoing>) -> StoreResult<Delivery> {
        let mut delivery = Delivery::default();
        let mut per_frame = Vec::new();
        for outgoing in run {
            match (outgoing.lanes, &self.relay) {
                (Some(lanes), Some(relay)) => {
                    per_frame.push(relay_jobs(
                        &outgoing.recipients,
                        &String::from_utf8_lossy(&outgoing.frame),
                        &outgoing.room,
                        &outgoing.key,
                        relay.job_size,
                        lanes,
                    ));
                    delivery.queued += outgoing.recipients.len();
                }
                _ => {
                    self.queue(std::mem::take(&mut per_frame)).await?;
                    delivery.add(self.post_to(&outgoing.recipients, outgoing.frame).await);
                }
            }
        }
        self.queue(per_frame).await?;
        Ok(delivery)
    }

    /// Queues the jobs of a run of relayed frames (nothing if there are none).
    async fn queue(&self, per_frame: Vec<Vec<DeliveryJob>>) -> StoreResult<()> {
        let jobs: Vec<DeliveryJob> = lanes::merged(per_frame).into_iter().flatten().collect();
        match &self.relay {
            Some(relay) if !jobs.is_empty() => {
                relay.queue.enqueue(jobs).await.map_err(StoreError::backend)
            }
            _ => Ok(()),
        }
    }

    /// Posts the same bytes to every recipient; closes the ones found gone. Delivery workers
    /// call this with the jobs the fan-out queued.
    ///
    /// A post that times out while others of the same frame were answered is a connection that
    /// does not take its frames: it is closed (`deleteConnection`), as the local gateway closes
    /// a client too slow to read, so that it holds up its room (its job, its lane) once and not
    /// at every frame; it reconnects and replays with `joinRoom{after}`. When every post of
    /// several timed out, the management API itself is slow: nobody is closed, and the failures
    /// count as the API's.
    pub async fn post_to(&self, recipients: &[ConnectionId], frame: Bytes) -> Delivery {
        let posted = match &self.stragglers {
            Some(stragglers) => stragglers.post_each(&self.gateway, recipients, frame).await,
            None => stragglers::Posted {
                failures: self.gateway.post_each(recipients, frame).await,
                ..stragglers::Posted::default()
            },
        };
        let mut delivery = Delivery {
            delivered: recipients.len()
                - posted.failures.len()
                - posted.skipped
                - posted.late.len(),
            failed: posted.skipped,
            late: posted.late.len(),
            ..Delivery::default()
        };
        // One recipient alone tells nothing either way: taken for a slow client, so that a
        // job of one never goes back to its lane for the visibility timeout.
        let answered = delivery.delivered > 0
            || recipients.len() == 1
            || posted
                .failures
                .iter()
                .any(|(_, e)| !matches!(e, PostError::TimedOut(_)));
        for (i, error) in posted.failures {
            self.post_failed(&recipients[i], error, answered, &mut delivery)
                .await;
        }
        if let Some(stragglers) = &self.stragglers {
            for (i, post) in posted.late {
                let connection = recipients[i].clone();
                let settled = self
                    .clone()
                    .late_post_ended(connection.clone(), post, answered);
                stragglers.let_go(connection, settled);
            }
        }
        count(&delivery);
        delivery
    }

    /// What becomes of a post let go once it ends, counted into the metrics; returns whether
    /// later frames may follow it to `connection` ([`Stragglers::let_go`]).
    async fn late_post_ended(
        self,
        connection: ConnectionId,
        post: stragglers::Late,
        answered: bool,
    ) -> bool {
        let mut delivery = Delivery::default();
        let follow = match post.ended().await {
            stragglers::Outcome::Answered(Ok(())) => {
                delivery.delivered += 1;
                true
            }
            stragglers::Outcome::Answered(Err(error)) => {
                self.post_failed(&connection, error, answered, &mut delivery)
                    .await
            }
            stragglers::Outcome::Skipped => {
                delivery.failed += 1;
                false
            }
        };
        count(&delivery);
        follow
    }

    /// What a failed post means for its connection, counted into `delivery`; `answered`: other
    /// posts of the frame were answered. Returns whether later frames may still be posted to
    /// the connection (it is not gone, nor closed for being slow).
    async fn post_failed(
        &self,
        connection: &ConnectionId,
        error: PostError,
        answered: bool,
        delivery: &mut Delivery,
    ) -> bool {
        match error {
            PostError::Gone => {
                match connections::gone(
                    self.log.as_ref(),
                    self.directory.as_ref(),
                    connection,
                    self.handshake_grace,
                )
                .await
                {
                    Ok(true) => {
                        delivery.gone.push(connection.clone());
                        false
                    }
                    Ok(false) => {
                        tracing::debug!(%connection, "410 during the handshake: not gone");
                        delivery.failed += 1;
                        true
                    }
                    Err(error) => {
                        tracing::warn!(%connection, %error, "could not close a gone connection");
                        delivery.gone.push(connection.clone());
                        false
                    }
                }
            }
            PostError::Opening => {
                tracing::debug!(%connection, "still opening: frame not delivered");
                delivery.failed += 1;
                true
            }
            PostError::Unavailable(why) => {
                tracing::warn!(%connection, %why, "post failed: the management API did");
                delivery.failed += 1;
                delivery.unavailable += 1;
                true
            }
            PostError::TimedOut(why) if answered => {
                tracing::warn!(%connection, %why, "closing a connection too slow to post to");
                if let Err(error) = self.gateway.close(connection).await {
                    tracing::warn!(%connection, %error, "could not close a slow connection");
                }
                metrics::counter!(crate::metrics::SLOW_CLOSED).increment(1);
                delivery.failed += 1;
                false
            }
            PostError::TimedOut(why) => {
                tracing::warn!(%connection, %why, "post timed out, as every other");
                delivery.failed += 1;
                delivery.unavailable += 1;
                true
            }
            error => {
                tracing::warn!(%connection, %error, "post failed");
                delivery.failed += 1;
                true
            }
        }
    }
}

/// Counts what posts did into the metrics.
fn count(delivery: &Delivery) {
    metrics::counter!(crate::metrics::DELIVERIES).increment(delivery.delivered as u64);
    metrics::counter!(crate::metrics::GONE).increment(delivery.gone.len() as u64);
    metrics::counter!(crate::metrics::FAILED_POSTS).increment(delivery.failed as u64);
}
