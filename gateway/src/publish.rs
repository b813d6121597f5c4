//! The publisher: turns a notification request into inbox entries and deliveries.
//!
//! User notifications are appended to each user's inbox *before* they are delivered, so a
//! client that misses the live delivery gets it on replay. Area, place, topic and broadcast
//! notifications reach the sessions connected at send time (DESIGN §7).
//!
//! In single-node mode the publisher delivers straight into its node's hub. With Redis it
//! publishes envelopes: on the user's channel, the topic's, the broadcast channel, or — for
//! areas — once per geohash cell of the covering at the finest level with few cells, so only
//! nodes with clients in those cells hear of it.

use crate::bus::redis::{self as redis_bus, Conn, RedisTarget};
use crate::bus::{Bus, StoredNotification};
use crate::hub::{Notification, Target};
use crate::node::Node;
use crate::schedule::Scheduler;
use crate::status::{StatusBook, StatusRecord};
use geopush_proto::api::{NotificationRequest, PublishTarget, RequestError};
use geopush_proto::bus::{
    CELL_LEVELS, Cursor, EnvelopeHeader, Keys, MAX_CELLS_PER_PUBLISH, encode_envelope, geohash,
    notification_id,
};
use geopush_proto::frames::ServerFrame;
use geopush_proto::place::{Place, PlaceFence};
use geopush_proto::{Area, Circle, EARTH_RADIUS_M};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};
use thiserror::Error;

/// Why a publish failed.
#[derive(Debug, Error)]
pub enum PublishError {
    #[error(transparent)]
    Invalid(#[from] RequestError),
    #[error("unknown place {0:?}")]
    UnknownPlace(String),
    #[error("place {0:?} has no fence")]
    PlaceWithoutFence(String),
    #[error("stored scheduled request does not parse: {0}")]
    StoredRequest(String),
    #[error(transparent)]
    Bus(#[from] crate::bus::BusError),
}

/// What a publish did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Published {
    pub id: String,
    /// Single-node mode: sessions the notification was queued to. With Redis: messages
    /// published (one per user, cell, topic or broadcast). 0 when scheduled or a repeat.
    pub queued: usize,
    /// When it will be sent (Unix ms), if it was scheduled.
    pub scheduled_ms: Option<i64>,
}

/// The kind a target is counted under in status and metrics.
pub fn target_kind(target: &PublishTarget) -> &'static str {
    match target {
        PublishTarget::Users(_) => "users",
        PublishTarget::Area(_) => "area",
        PublishTarget::Place(_) => "place",
        PublishTarget::Topic(_) => "topic",
        PublishTarget::All(_) => "all",
    }
}

pub(crate) fn unix_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// How long an idempotency key is remembered (DESIGN §5: a repeat within 24 h).
pub const IDEMPOTENCY_TTL_S: u64 = 24 * 3600;

/// What claiming an idempotency key decided.
enum Claim {
    /// Publish under this id (new, or a retry of an unfinished publish).
    Publish(String),
    /// Already published under this id: send nothing.
    Done(String),
}

enum Route {
    /// Straight into this node's hub and in-memory inboxes.
    Local(Arc<Node>),
    /// Through Redis; `node` (when the publisher lives in a gateway) resolves places locally.
    Redis {
        conn: Conn,
        keys: Keys,
        inbox_len: usize,
        node: Option<Arc<Node>>,
    },
}

/// Publishes notifications. Cheap to clone.
#[derive(Clone)]
pub struct Publisher {
    route: Arc<Route>,
    status: Arc<StatusBook>,
    scheduler: Scheduler,
}

/// The area a place's fence covers.
fn fence_area(place: &Place) -> Option<Area> {
    match place.fence.as_ref()? {
        PlaceFence::Circle { radius_m } => Some(Area::Circle(Circle {
            lat: place.lat,
            lon: place.lon,
            radius_m: *radius_m,
        })),
        PlaceFence::Polygon(polygon) => Some(Area::Polygon(polygon.clone())),
    }
}

/// The lat/lon box of an area: (lat_min, lat_max, lon_min, lon_max), `lon_min > lon_max`
/// when it crosses the antimeridian.
fn area_box(area: &Area) -> (f64, f64, f64, f64) {
    match area {
        Area::Circle(c) => {
            let dlat = (c.radius_m / EARTH_RADIUS_M).to_degrees();
            let (lat_min, lat_max) = (c.lat - dlat, c.lat + dlat);
            if lat_min <= -90.0 || lat_max >= 90.0 {
                return (lat_min.max(-90.0), lat_max.min(90.0), -180.0, 180.0);
            }
            let dlon = dlat / c.lat.to_radians().cos().max(1e-9);
            if dlon >= 180.0 {
                return (lat_min, lat_max, -180.0, 180.0);
            }
            let wrap = |lon: f64| {
                if lon > 180.0 {
                    lon - 360.0
                } else if lon < -180.0 {
                    lon + 360.0
                } else {
                    lon
                }
            };
            (lat_min, lat_max, wrap(c.lon - dlon), wrap(c.lon + dlon))
        }
        Area::Polygon(p) => {
            let (mut a, mut b, mut c, mut d) = (90.0f64, -90.0f64, 180.0f64, -180.0f64);
            for [lon, lat] in p.rings.first().into_iter().flatten().copied() {
                a = a.min(lat);
                b = b.max(lat);
                c = c.min(lon);
                d = d.max(lon);
            }
            (a, b, c, d)
        }
    }
}

/// The message of a user notification with [`redis_bus::CURSOR_PLACEHOLDER`] where the
/// inbox cursor goes: in the header and in the frame, ahead of any publisher text (the
/// script replaces only the first two occurrences).
fn user_template(header: &EnvelopeHeader, stored: &StoredNotification) -> Vec<u8> {
    let placeholder = redis_bus::CURSOR_PLACEHOLDER;
    let frame = ServerFrame::Notification {
        id: &stored.id,
        cursor: Some(placeholder),
        title: &stored.title,
        body: &stored.body,
        data: stored.data.as_deref(),
        ts: stored.ts,
    }
    .to_json();
    let header = EnvelopeHeader {
        cursor: Some(placeholder.to_owned()),
        ..header.clone()
    };
    encode_envelope(&header, &frame)
}

/// The cells to publish an area on: the finest level whose covering is small, or `None`
/// (broadcast it; every node filters).
pub fn cells_for_area(area: &Area) -> Option<Vec<String>> {
    let (lat_min, lat_max, lon_min, lon_max) = area_box(area);
    CELL_LEVELS.iter().rev().find_map(|&level| {
        geohash::cover(
            lat_min,
            lat_max,
            lon_min,
            lon_max,
            level,
            MAX_CELLS_PER_PUBLISH,
        )
    })
}

impl Publisher {
    /// The publisher of a gateway node: local in single-node mode, through Redis otherwise.
    pub(crate) fn for_node(node: Arc<Node>, scheduler: Scheduler) -> Publisher {
        let status = node.status.clone();
        let route = match &node.bus {
            Bus::Memory(_) => Route::Local(node),
            Bus::Redis(bus) => Route::Redis {
                conn: bus.commands(),
                keys: bus.keys.clone(),
                inbox_len: node.config.inbox_len,
                node: Some(node.clone()),
            },
        };
        Publisher {
            route: Arc::new(route),
            status,
            scheduler,
        }
    }

    /// What notifications' status is read from.
    pub fn status(&self) -> &Arc<StatusBook> {
        &self.status
    }

    /// Where scheduled notifications wait.
    pub fn scheduler(&self) -> &Scheduler {
        &self.scheduler
    }

    /// A standalone publisher through Redis (tests, tools), keeping statuses for the
    /// default retention.
    pub async fn connect(
        target: &RedisTarget,
        prefix: &str,
        inbox_len: usize,
    ) -> Result<Publisher, PublishError> {
        Publisher::connect_with_status_retention(
            target,
            prefix,
            inbox_len,
            crate::status::DEFAULT_STATUS_RETENTION,
        )
        .await
    }

    /// [`Publisher::connect`] keeping each status `status_retention` past its
    /// notification's expiry (the worker: `GEOPUSH_STATUS_RETENTION_SECONDS`).
    pub async fn connect_with_status_retention(
        target: &RedisTarget,
        prefix: &str,
        inbox_len: usize,
        status_retention: std::time::Duration,
    ) -> Result<Publisher, PublishError> {
        let conn = redis_bus::connect(target, None).await?;
        let keys = Keys::new(prefix);
        Ok(Publisher {
            status: Arc::new(
                StatusBook::redis(conn.clone(), keys.clone()).with_retention(status_retention),
            ),
            scheduler: Scheduler::redis(conn.clone(), keys.clone()),
            route: Arc::new(Route::Redis {
                conn,
                keys,
                inbox_len,
                node: None,
            }),
        })
    }

    /// Validate, then publish now or schedule for `send_at`; returns the notification id.
    pub async fn publish(&self, request: &NotificationRequest) -> Result<Published, PublishError> {
        request.validate()?;
        let now_ms = unix_ms();
        let send_at = request.send_at_ms(now_ms)?;
        // An unknown place is refused before an idempotency key is taken or anything is
        // scheduled; a place resolved here is not looked up again to send now.
        let place_area = match &request.target {
            PublishTarget::Place(place) => Some(self.place_area(place).await?),
            _ => None,
        };
        let id = match &request.idempotency_key {
            None => notification_id(now_ms as u64, rand::random()),
            Some(key) => match self.claim_idempotency_key(key, now_ms).await? {
                Claim::Done(id) => {
                    return Ok(Published {
                        id,
                        queued: 0,
                        scheduled_ms: None,
                    });
                }
                Claim::Publish(id) => id,
            },
        };
        let published = match send_at {
            Some(at_ms) => {
                let json = serde_json::to_string(request)
                    .map_err(|e| PublishError::StoredRequest(e.to_string()))?;
                let record = StatusRecord {
                    kind: target_kind(&request.target),
                    scheduled: true,
                    targeted_users: None,
                    created_ms: now_ms,
                    send_at_ms: Some(at_ms),
                    expires_ms: at_ms.saturating_add((request.ttl_s as i64).saturating_mul(1000)),
                };
                self.status.record(&id, &record, now_ms).await?;
                self.scheduler.enqueue(&id, at_ms, &json).await?;
                Published {
                    id: id.clone(),
                    queued: 0,
                    scheduled_ms: Some(at_ms),
                }
            }
            None => {
                self.publish_now(id.clone(), request, place_area, now_ms, None)
                    .await?
            }
        };
        if let Some(key) = &request.idempotency_key {
            self.finish_idempotency_key(key, &id).await?;
        }
        Ok(published)
    }

    /// Publish a scheduled notification whose time came (its stored request JSON).
    pub async fn publish_scheduled(
        &self,
        id: &str,
        request: &str,
    ) -> Result<Published, PublishError> {
        let request: NotificationRequest = serde_json::from_str(request)
            .map_err(|e| PublishError::StoredRequest(e.to_string()))?;
        let now_ms = unix_ms();
        let send_at = request
            .send_at
            .as_deref()
            .and_then(geopush_proto::api::parse_rfc3339_ms);
        // The place is looked up now: its fence may have changed since it was scheduled.
        self.publish_now(id.to_owned(), &request, None, now_ms, send_at)
            .await
    }

    /// Send a validated notification under `id` now (`place_area`: the place target's
    /// fence, if already resolved).
    async fn publish_now(
        &self,
        id: String,
        request: &NotificationRequest,
        place_area: Option<Area>,
        now_ms: i64,
        send_at_ms: Option<i64>,
    ) -> Result<Published, PublishError> {
        let stored = StoredNotification {
            cursor: Cursor { ms: 0, seq: 0 },
            id: id.clone(),
            title: request.title.clone(),
            body: request.body.clone(),
            data: request.data.clone(),
            ts: now_ms,
            expires_ms: now_ms.saturating_add((request.ttl_s as i64).saturating_mul(1000)),
        };
        let target = match &request.target {
            PublishTarget::Place(place) => Target::Area(match place_area {
                Some(area) => area,
                None => self.place_area(place).await?,
            }),
            PublishTarget::Area(area) => Target::Area(area.clone()),
            PublishTarget::Topic(topic) => Target::Topic(topic.clone()),
            PublishTarget::All(_) => Target::All,
            PublishTarget::Users(_) => Target::User(String::new()),
        };
        // The frame of everything but user notifications (those carry their cursor).
        let live_frame = Notification {
            id: id.clone(),
            cursor: None,
            title: stored.title.clone(),
            body: stored.body.clone(),
            data: stored.data.clone(),
            ts: now_ms,
        }
        .to_frame();
        let users: &[String] = match &request.target {
            PublishTarget::Users(users) => users,
            _ => &[],
        };
        let record = StatusRecord {
            kind: target_kind(&request.target),
            scheduled: false,
            targeted_users: (!users.is_empty()).then_some(users.len() as u64),
            created_ms: now_ms,
            send_at_ms,
            expires_ms: stored.expires_ms,
        };
        let send = async {
            Ok::<usize, PublishError>(match &*self.route {
                Route::Local(node) => {
                    if users.is_empty() {
                        let reach = node.hub.deliver_reach(&target, live_frame, "notification");
                        self.status.count(&id, reach.into());
                        reach.queued
                    } else {
                        let Bus::Memory(bus) = &node.bus else {
                            return Err(crate::bus::BusError::Unavailable(
                                "local publisher without a memory bus".into(),
                            )
                            .into());
                        };
                        let mut queued = 0;
                        for user in users {
                            let cursor = bus.append(user, stored.clone(), now_ms);
                            let entry = StoredNotification {
                                cursor,
                                ..stored.clone()
                            };
                            queued += node.hub.deliver_user(user, cursor, &id, entry.frame());
                        }
                        self.status.count(
                            &id,
                            crate::status::Counts {
                                delivered: queued as u64,
                                ..Default::default()
                            },
                        );
                        queued
                    }
                }
                Route::Redis {
                    conn,
                    keys,
                    inbox_len,
                    ..
                } => {
                    let mut conn = conn.clone();
                    let header = |cursor: Option<Cursor>, area: Option<Area>| EnvelopeHeader {
                        id: id.clone(),
                        cursor: cursor.map(|c| c.to_string()),
                        published_ms: now_ms,
                        area,
                    };
                    let ttl_ms = (request.ttl_s as i64).saturating_mul(1000);
                    let mut published = 0;
                    if !users.is_empty() {
                        // One template for every user: the script puts each inbox cursor in.
                        let template = user_template(&header(None, None), &stored);
                        for user in users {
                            redis_bus::append_and_publish(
                                &mut conn, keys, user, &stored, ttl_ms, *inbox_len, &template,
                            )
                            .await?;
                            published += 1;
                        }
                    }
                    if users.is_empty() {
                        let frame = live_frame;
                        let messages: Vec<(String, Vec<u8>)> = match &target {
                            Target::Topic(topic) => vec![(
                                keys.topic_channel(topic),
                                encode_envelope(&header(None, None), &frame),
                            )],
                            Target::Area(area) => match cells_for_area(area) {
                                Some(cells) => {
                                    let message =
                                        encode_envelope(&header(None, Some(area.clone())), &frame);
                                    cells
                                        .iter()
                                        .map(|cell| (keys.cell_channel(cell), message.clone()))
                                        .collect()
                                }
                                None => vec![(
                                    keys.all_channel(),
                                    encode_envelope(&header(None, Some(area.clone())), &frame),
                                )],
                            },
                            _ => vec![(
                                keys.all_channel(),
                                encode_envelope(&header(None, None), &frame),
                            )],
                        };
                        for (channel, message) in &messages {
                            redis_bus::publish(&mut conn, channel, message).await?;
                        }
                        published += messages.len();
                    }
                    published
                }
            })
        };
        // In memory, counts of an unrecorded notification are dropped: record first. With
        // Redis the record and the counters meet in one hash whatever the order, so the
        // record travels beside the first send rather than costing a round trip before it.
        let queued = match &*self.route {
            Route::Local(_) => {
                self.status.record(&id, &record, now_ms).await?;
                send.await?
            }
            Route::Redis { .. } => {
                let (recorded, sent) = tokio::join!(self.status.record(&id, &record, now_ms), send);
                recorded?;
                sent?
            }
        };
        Ok(Published {
            id,
            queued,
            scheduled_ms: None,
        })
    }

    /// Claim an idempotency key: a new key gets a new id to publish; a key whose publish
    /// finished returns its id (publish nothing); a key whose publish did not finish (it
    /// failed midway, or is in flight) returns its id to publish again, so a retry repeats
    /// the same notification under the same id and clients dedupe it.
    async fn claim_idempotency_key(&self, key: &str, now_ms: i64) -> Result<Claim, PublishError> {
        let fresh = notification_id(now_ms as u64, rand::random());
        match &*self.route {
            Route::Local(node) => {
                let mut keys = node.idempotency.lock().unwrap_or_else(|p| p.into_inner());
                keys.retain(|_, (_, _, expires_ms)| *expires_ms > now_ms);
                let expires_ms = now_ms + IDEMPOTENCY_TTL_S as i64 * 1000;
                let (id, done, _) = keys
                    .entry(key.to_owned())
                    .or_insert((fresh, false, expires_ms));
                Ok(if *done {
                    Claim::Done(id.clone())
                } else {
                    Claim::Publish(id.clone())
                })
            }
            Route::Redis { conn, keys, .. } => {
                let mut conn = conn.clone();
                let name = keys.idempotency(key);
                let pending = format!("pending:{fresh}");
                let set: Option<String> = redis::cmd("SET")
                    .arg(&name)
                    .arg(&pending)
                    .arg("NX")
                    .arg("GET")
                    .arg("EX")
                    .arg(IDEMPOTENCY_TTL_S)
                    .query_async(&mut conn)
                    .await
                    .map_err(|e| crate::bus::BusError::Unavailable(e.to_string()))?;
                Ok(match set.as_deref().map(|v| v.split_once(':')) {
                    None => Claim::Publish(fresh),
                    Some(Some(("done", id))) => Claim::Done(id.to_owned()),
                    Some(Some((_, id))) => Claim::Publish(id.to_owned()),
                    Some(None) => Claim::Publish(fresh),
                })
            }
        }
    }

    /// Record that the publish of an idempotency key finished.
    async fn finish_idempotency_key(&self, key: &str, id: &str) -> Result<(), PublishError> {
        match &*self.route {
            Route::Local(node) => {
                if let Some(entry) = node
                    .idempotency
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .get_mut(key)
                {
                    entry.1 = true;
                }
                Ok(())
            }
            Route::Redis { conn, keys, .. } => {
                let mut conn = conn.clone();
                redis::cmd("SET")
                    .arg(keys.idempotency(key))
                    .arg(format!("done:{id}"))
                    .arg("XX")
                    .arg("KEEPTTL")
                    .query_async::<Option<String>>(&mut conn)
                    .await
                    .map(|_| ())
                    .map_err(|e| crate::bus::BusError::Unavailable(e.to_string()).into())
            }
        }
    }

    /// The area of a place's fence, from the local replica or the Redis places hash.
    async fn place_area(&self, id: &str) -> Result<Area, PublishError> {
        let node = match &*self.route {
            Route::Local(node) => Some(node),
            Route::Redis { node, .. } => node.as_ref(),
        };
        let place = match node {
            Some(node) => node.places.snapshot().get(id).map(|(_, e)| e.place.clone()),
            None => match &*self.route {
                Route::Redis { conn, keys, .. } => {
                    let mut conn = conn.clone();
                    let feature: Option<String> = redis::cmd("HGET")
                        .arg(keys.places())
                        .arg(id)
                        .query_async(&mut conn)
                        .await
                        .map_err(|e| crate::bus::BusError::Unavailable(e.to_string()))?;
                    feature.and_then(|f| Place::from_feature_json(&f).ok())
                }
                Route::Local(_) => None,
            },
        };
        let place = place.ok_or_else(|| PublishError::UnknownPlace(id.to_owned()))?;
        fence_area(&place).ok_or_else(|| PublishError::PlaceWithoutFence(id.to_owned()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cursor_placeholders_come_before_publisher_text() {
        let placeholder = redis_bus::CURSOR_PLACEHOLDER;
        let stored = StoredNotification {
            cursor: Cursor { ms: 0, seq: 0 },
            id: notification_id(1, 2),
            title: format!("tricky {placeholder}"),
            body: placeholder.to_owned(),
            data: None,
            ts: 5,
            expires_ms: 10,
        };
        let header = EnvelopeHeader {
            id: stored.id.clone(),
            cursor: None,
            published_ms: 5,
            area: None,
        };
        // What the script does: replace the first two occurrences.
        let message = String::from_utf8(user_template(&header, &stored))
            .expect("utf-8")
            .replacen(placeholder, "7-1", 2);
        let (header, frame) =
            geopush_proto::bus::decode_envelope(message.as_bytes()).expect("envelope");
        assert_eq!(header.cursor.as_deref(), Some("7-1"));
        let frame: serde_json::Value = serde_json::from_slice(frame).expect("frame");
        assert_eq!(frame["cursor"], "7-1");
        assert_eq!(frame["title"], format!("tricky {placeholder}"));
        assert_eq!(frame["body"], placeholder);
    }

    #[test]
    fn small_areas_use_fine_cells_and_huge_ones_broadcast() {
        let small = Area::Circle(Circle {
            lat: 52.52,
            lon: 13.405,
            radius_m: 300.0,
        });
        let cells = cells_for_area(&small).expect("cells");
        assert_eq!(cells[0].len(), 6, "{cells:?}");
        assert!(cells.contains(&geohash::encode(52.52, 13.405, 6)));
        let city = Area::Circle(Circle {
            lat: 52.52,
            lon: 13.405,
            radius_m: 20_000.0,
        });
        assert!(cells_for_area(&city).expect("cells")[0].len() < 6);
        let continent = Area::Circle(Circle {
            lat: 50.0,
            lon: 10.0,
            radius_m: 1_000_000.0,
        });
        assert_eq!(cells_for_area(&continent), None);
        let fiji = Area::Circle(Circle {
            lat: -17.8,
            lon: 179.99,
            radius_m: 2_000.0,
        });
        let cells = cells_for_area(&fiji).expect("cells");
        assert!(cells.contains(&geohash::encode(-17.8, -179.99, cells[0].len())));
    }
}
