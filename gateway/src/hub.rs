//! The hub: who is connected to this node, and delivery to them.
//!
//! It maps users, topics and (through the [`ClientIndex`]) places on Earth to sessions, and
//! hands a frame serialized once to every matching session's outbound queue. Nothing here
//! waits on a socket: a full queue closes its own session, never blocks the others.

use crate::bus::redis::RedisBus;
use crate::geo::ClientIndex;
use crate::geo::clients::SessionId;
use crate::metrics::{KindLabel, Metrics};
use crate::session::outbound::{Outbound, Outgoing, Pushed};
use bytes::Bytes;
use geopush_proto::bus::{CELL_LEVELS, Cursor, Keys, geohash};
use geopush_proto::frames::ServerFrame;
use geopush_proto::{Area, Fix};
use serde_json::value::RawValue;
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard};
use tokio::time::Instant;

/// Who a delivery is for.
#[derive(Clone, Debug, PartialEq)]
pub enum Target {
    /// Every session of one user.
    User(String),
    /// Every session whose last fix lies in the area.
    Area(Area),
    /// Every session subscribed to the topic.
    Topic(String),
    /// Every session.
    All,
}

impl Target {
    /// The metrics label of this target kind.
    pub fn kind(&self) -> &'static str {
        match self {
            Target::User(_) => "user",
            Target::Area(_) => "area",
            Target::Topic(_) => "topic",
            Target::All => "all",
        }
    }
}

/// A notification as the hub delivers it.
#[derive(Clone, Debug)]
pub struct Notification {
    pub id: String,
    /// Inbox cursor, for user notifications with a durable inbox.
    pub cursor: Option<String>,
    pub title: String,
    pub body: String,
    /// The publisher's JSON, echoed verbatim.
    pub data: Option<Box<RawValue>>,
    /// Unix milliseconds of the publish.
    pub ts: i64,
}

impl Notification {
    /// The `notification` frame, serialized once for every recipient.
    pub fn to_frame(&self) -> Bytes {
        Bytes::from(
            ServerFrame::Notification {
                id: &self.id,
                cursor: self.cursor.as_deref(),
                title: &self.title,
                body: &self.body,
                data: self.data.as_deref(),
                ts: self.ts,
            }
            .to_json(),
        )
    }
}

struct SessionEntry {
    user: Arc<str>,
    device: Arc<str>,
    outbound: Outbound,
    topics: Vec<String>,
}

/// A session as the bus's recovery sees it.
pub struct SessionHandle {
    pub user: Arc<str>,
    pub device: Arc<str>,
    pub outbound: Outbound,
}

#[derive(Default)]
struct Registry {
    sessions: HashMap<SessionId, SessionEntry>,
    by_user: HashMap<Arc<str>, Vec<SessionId>>,
    by_topic: HashMap<String, HashSet<SessionId>>,
}

/// Why a subscription was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SubscribeError {
    TooManyTopics,
    UnknownSession,
}

/// What one delivery reached on this node.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Reach {
    /// Sessions the target matched.
    pub matched: usize,
    /// Sessions it was queued to (the others were closing or full).
    pub queued: usize,
}

/// This node's sessions, by user, topic and position.
pub struct Hub {
    registry: RwLock<Registry>,
    clients: Mutex<ClientIndex>,
    next_session: AtomicU64,
    metrics: Arc<Metrics>,
    /// With the Redis bus: the channels this node's sessions hold.
    channels: Option<(Arc<RedisBus>, Keys)>,
}

impl Hub {
    pub fn new(metrics: Arc<Metrics>, channels: Option<Arc<RedisBus>>) -> Hub {
        Hub {
            registry: RwLock::new(Registry::default()),
            clients: Mutex::new(ClientIndex::new()),
            next_session: AtomicU64::new(1),
            metrics,
            channels: channels.map(|bus| {
                let keys = bus.keys.clone();
                (bus, keys)
            }),
        }
    }

    fn acquire(&self, channel: impl FnOnce(&Keys) -> String) {
        if let Some((bus, keys)) = &self.channels {
            bus.acquire(channel(keys));
        }
    }

    fn release(&self, channel: impl FnOnce(&Keys) -> String) {
        if let Some((bus, keys)) = &self.channels {
            bus.release(&channel(keys));
        }
    }

    /// Hold the cell channels of `new` that `old` did not have, release the others.
    fn move_cells(&self, old: Option<u64>, new: Option<u64>) {
        if self.channels.is_none() {
            return;
        }
        for level in CELL_LEVELS {
            if let (Some(a), Some(b)) = (old, new)
                && geohash::same_cell(a, b, level)
            {
                continue;
            }
            if let Some(old) = old {
                self.release(|k| k.cell_channel(&geohash::from_bits(old, level)));
            }
            if let Some(new) = new {
                self.acquire(|k| k.cell_channel(&geohash::from_bits(new, level)));
            }
        }
    }

    // Every critical section below leaves the maps consistent, so a lock poisoned by a
    // panic elsewhere is still safe to use.
    fn read(&self) -> RwLockReadGuard<'_, Registry> {
        self.registry.read().unwrap_or_else(|p| p.into_inner())
    }
    fn write(&self) -> RwLockWriteGuard<'_, Registry> {
        self.registry.write().unwrap_or_else(|p| p.into_inner())
    }
    fn clients(&self) -> MutexGuard<'_, ClientIndex> {
        self.clients.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Add a session; returns its id.
    pub fn register(&self, user: Arc<str>, device: Arc<str>, outbound: Outbound) -> SessionId {
        self.acquire(|k| k.user_channel(&user));
        let id = self.next_session.fetch_add(1, Ordering::Relaxed);
        let mut registry = self.write();
        registry.by_user.entry(user.clone()).or_default().push(id);
        registry.sessions.insert(
            id,
            SessionEntry {
                user,
                device,
                outbound,
                topics: Vec::new(),
            },
        );
        id
    }

    /// Remove a session from every map and from the client index.
    pub fn unregister(&self, id: SessionId) {
        {
            let mut registry = self.write();
            if let Some(entry) = registry.sessions.remove(&id) {
                self.release(|k| k.user_channel(&entry.user));
                for topic in &entry.topics {
                    self.release(|k| k.topic_channel(topic));
                }
                if let Some(ids) = registry.by_user.get_mut(&entry.user) {
                    ids.retain(|s| *s != id);
                    if ids.is_empty() {
                        registry.by_user.remove(&entry.user);
                    }
                }
                for topic in entry.topics {
                    if let Some(set) = registry.by_topic.get_mut(&topic) {
                        set.remove(&id);
                        if set.is_empty() {
                            registry.by_topic.remove(&topic);
                        }
                    }
                }
            }
        }
        let mut clients = self.clients();
        let cell = clients.remove(id);
        self.metrics.clients_indexed.set(clients.len() as i64);
        drop(clients);
        self.move_cells(cell, None);
    }

    /// Record a session's validated fix in the client index.
    pub fn update_position(&self, id: SessionId, fix: &Fix) {
        let mut clients = self.clients();
        let (old, new) = clients.update(id, fix.lat, fix.lon);
        self.metrics.clients_indexed.set(clients.len() as i64);
        drop(clients);
        if old.is_none_or(|old| !geohash::same_cell(old, new, CELL_LEVELS[CELL_LEVELS.len() - 1])) {
            self.move_cells(old, Some(new));
        }
    }

    pub fn subscribe(
        &self,
        id: SessionId,
        topic: &str,
        max_topics: usize,
    ) -> Result<(), SubscribeError> {
        let mut registry = self.write();
        let entry = registry
            .sessions
            .get_mut(&id)
            .ok_or(SubscribeError::UnknownSession)?;
        if entry.topics.iter().any(|t| t == topic) {
            return Ok(());
        }
        if entry.topics.len() >= max_topics {
            return Err(SubscribeError::TooManyTopics);
        }
        entry.topics.push(topic.to_owned());
        registry
            .by_topic
            .entry(topic.to_owned())
            .or_default()
            .insert(id);
        self.acquire(|k| k.topic_channel(topic));
        Ok(())
    }

    pub fn unsubscribe(&self, id: SessionId, topic: &str) {
        let mut registry = self.write();
        let Some(entry) = registry.sessions.get_mut(&id) else {
            return;
        };
        let before = entry.topics.len();
        entry.topics.retain(|t| t != topic);
        if entry.topics.len() < before {
            self.release(|k| k.topic_channel(topic));
        }
        if let Some(set) = registry.by_topic.get_mut(topic) {
            set.remove(&id);
            if set.is_empty() {
                registry.by_topic.remove(topic);
            }
        }
    }

    /// Number of sessions on this node.
    pub fn session_count(&self) -> usize {
        self.read().sessions.len()
    }

    /// Number of sessions with a position in the client index.
    pub fn located_count(&self) -> usize {
        self.clients().len()
    }

    /// Every session, with its user and device (for replays after a bus outage).
    pub fn sessions(&self) -> Vec<SessionHandle> {
        self.read()
            .sessions
            .values()
            .map(|e| SessionHandle {
                user: e.user.clone(),
                device: e.device.clone(),
                outbound: e.outbound.clone(),
            })
            .collect()
    }

    /// Deliver a geo envelope that arrived on a cell channel: to the sessions in the area
    /// whose cell at that level is the channel's, so a node subscribed to several cells of
    /// one publish delivers once.
    pub fn deliver_in_cell(&self, area: &Area, cell: &str, json: Bytes) -> Reach {
        let level = cell.len();
        let recipients: Vec<SessionId> = {
            let clients = self.clients();
            let inside = match area {
                Area::Circle(circle) => clients.sessions_in_circle(circle),
                Area::Polygon(polygon) => clients.sessions_in_polygon(polygon),
            };
            inside
                .into_iter()
                .filter(|s| {
                    clients
                        .cell_of(*s)
                        .is_some_and(|bits| geohash::from_bits(bits, level) == cell)
                })
                .collect()
        };
        self.deliver_to(&recipients, json, "notification")
    }

    /// Every session's outbound handle (for the drain).
    pub fn outbounds(&self) -> Vec<Outbound> {
        self.read()
            .sessions
            .values()
            .map(|e| e.outbound.clone())
            .collect()
    }

    /// The sessions a target reaches right now.
    pub fn recipients(&self, target: &Target) -> Vec<SessionId> {
        match target {
            Target::Area(Area::Circle(circle)) => self.clients().sessions_in_circle(circle),
            Target::Area(Area::Polygon(polygon)) => self.clients().sessions_in_polygon(polygon),
            Target::User(user) => self
                .read()
                .by_user
                .get(user.as_str())
                .cloned()
                .unwrap_or_default(),
            Target::Topic(topic) => self
                .read()
                .by_topic
                .get(topic)
                .map(|s| s.iter().copied().collect())
                .unwrap_or_default(),
            Target::All => self.read().sessions.keys().copied().collect(),
        }
    }

    /// Queue one serialized frame to every session the target reaches; returns how many
    /// sessions got it queued. `kind` labels the deliveries metric.
    pub fn deliver(&self, target: &Target, json: Bytes, kind: &'static str) -> usize {
        self.deliver_reach(target, json, kind).queued
    }

    /// [`Hub::deliver`], saying how many sessions matched besides how many got it queued.
    pub fn deliver_reach(&self, target: &Target, json: Bytes, kind: &'static str) -> Reach {
        let recipients = self.recipients(target);
        self.deliver_to(&recipients, json, kind)
    }

    fn deliver_to(&self, recipients: &[SessionId], json: Bytes, kind: &'static str) -> Reach {
        let since = Some(Instant::now());
        let registry = self.read();
        let mut queued = 0;
        for id in recipients {
            if let Some(entry) = registry.sessions.get(id) {
                let frame = Outgoing::Text {
                    json: json.clone(),
                    since,
                };
                if entry.outbound.push(frame, &self.metrics) == Pushed::Queued {
                    queued += 1;
                }
            }
        }
        drop(registry);
        self.metrics
            .deliveries
            .get_or_create(&KindLabel { kind })
            .inc_by(queued as u64);
        Reach {
            matched: recipients.len(),
            queued,
        }
    }

    /// Deliver a user notification with its inbox cursor to every session of the user;
    /// sessions that already have the cursor skip it, sessions replaying hold it. Returns
    /// the sessions it was queued to now.
    pub fn deliver_user(&self, user: &str, cursor: Cursor, id: &str, json: Bytes) -> usize {
        let since = Some(Instant::now());
        let registry = self.read();
        let mut queued = 0;
        for session in registry.by_user.get(user).into_iter().flatten() {
            if let Some(entry) = registry.sessions.get(session) {
                let pushed =
                    entry
                        .outbound
                        .offer_user(cursor, id, json.clone(), since, &self.metrics);
                // A held one is counted when the replay's end queues it (unless the replay
                // delivered it already).
                if pushed == Pushed::Queued {
                    queued += 1;
                }
            }
        }
        drop(registry);
        self.metrics
            .deliveries
            .get_or_create(&KindLabel {
                kind: "notification",
            })
            .inc_by(queued as u64);
        queued
    }

    /// Deliver a notification to a target; returns how many sessions got it queued.
    pub fn publish(&self, target: &Target, notification: &Notification) -> usize {
        self.deliver(target, notification.to_frame(), "notification")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use geopush_proto::Circle;

    #[test]
    fn targets_reach_exactly_their_sessions() {
        let metrics = Arc::new(Metrics::new());
        let hub = Hub::new(metrics.clone(), None);
        let alice_phone = Outbound::new(8);
        let alice_tablet = Outbound::new(8);
        let bob = Outbound::new(8);
        let a1 = hub.register("alice".into(), "phone".into(), alice_phone.clone());
        let a2 = hub.register("alice".into(), "tablet".into(), alice_tablet.clone());
        let b = hub.register("bob".into(), "phone".into(), bob.clone());
        hub.subscribe(b, "traffic", 4).expect("subscribe");
        let fix = |lat, lon| Fix {
            lat,
            lon,
            accuracy_m: 5.0,
            ts_ms: 0,
            speed_mps: None,
            heading_deg: None,
            radius_m: None,
            limit: None,
        };
        hub.update_position(a1, &fix(52.52, 13.405));
        hub.update_position(b, &fix(48.85, 2.35));

        let frame = Bytes::from_static(b"{}");
        assert_eq!(
            hub.deliver(&Target::User("alice".into()), frame.clone(), "test"),
            2
        );
        assert_eq!(
            hub.deliver(&Target::Topic("traffic".into()), frame.clone(), "test"),
            1
        );
        let berlin = Target::Area(Area::Circle(Circle {
            lat: 52.52,
            lon: 13.405,
            radius_m: 1_000.0,
        }));
        assert_eq!(hub.recipients(&berlin), vec![a1]);
        assert_eq!(hub.deliver(&Target::All, frame, "test"), 3);
        assert_eq!(
            (alice_phone.len(), alice_tablet.len(), bob.len()),
            (2, 2, 2)
        );

        hub.unregister(a1);
        hub.unregister(b);
        assert!(hub.recipients(&berlin).is_empty());
        assert!(hub.recipients(&Target::Topic("traffic".into())).is_empty());
        assert_eq!(hub.recipients(&Target::User("alice".into())), vec![a2]);
        assert_eq!(hub.session_count(), 1);
    }

    #[test]
    fn topic_limit_is_enforced() {
        let hub = Hub::new(Arc::new(Metrics::new()), None);
        let id = hub.register("u".into(), "d".into(), Outbound::new(1));
        hub.subscribe(id, "a", 1).expect("first");
        hub.subscribe(id, "a", 1).expect("same topic again is fine");
        assert_eq!(
            hub.subscribe(id, "b", 1),
            Err(SubscribeError::TooManyTopics)
        );
    }
}
