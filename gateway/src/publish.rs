//! The publisher: turns a notification request into inbox entries and deliveries.
//!
//! User notifications are appended to each user's inbox *before* they are delivered, so a
//! client that misses the live delivery gets it on replay. Area, place, topic and broadcast
//! notifications reach the sessions connected at send time.

use crate::bus::{Bus, StoredNotification};
use crate::hub::{Notification, Target};
use crate::node::Node;
use geopush_proto::api::{NotificationRequest, PublishTarget, RequestError};
use geopush_proto::bus::{Cursor, notification_id};
use geopush_proto::place::PlaceFence;
use geopush_proto::{Area, Circle};
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
    #[error(transparent)]
    Bus(#[from] crate::bus::BusError),
}

/// What a publish did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Published {
    pub id: String,
    /// Sessions the notification was queued to on this node (single-node mode), or the
    /// inbox entries written (users).
    pub queued: usize,
}

fn unix_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Publishes into this node (single-node mode, in-memory bus).
#[derive(Clone)]
pub struct Publisher {
    node: Arc<Node>,
}

impl Publisher {
    pub(crate) fn local(node: Arc<Node>) -> Publisher {
        Publisher { node }
    }

    /// Validate and publish; returns the notification id.
    pub async fn publish(&self, request: &NotificationRequest) -> Result<Published, PublishError> {
        request.validate()?;
        let now_ms = unix_ms();
        let id = notification_id(now_ms as u64, rand::random());
        let notification = Notification {
            id: id.clone(),
            cursor: None,
            title: request.title.clone(),
            body: request.body.clone(),
            data: request.data.clone(),
            ts: now_ms,
        };
        let hub = &self.node.hub;
        let queued = match &request.target {
            PublishTarget::Users(users) => {
                let mut queued = 0;
                for user in users {
                    let stored = StoredNotification {
                        cursor: Cursor { ms: 0, seq: 0 },
                        id: id.clone(),
                        title: notification.title.clone(),
                        body: notification.body.clone(),
                        data: notification.data.clone(),
                        ts: now_ms,
                        expires_ms: now_ms
                            .saturating_add((request.ttl_s as i64).saturating_mul(1000)),
                    };
                    let Bus::Memory(bus) = &self.node.bus;
                    let cursor = bus.append(user, stored.clone(), now_ms);
                    let stored = StoredNotification { cursor, ..stored };
                    queued += hub.deliver_user(user, cursor, &id, stored.frame());
                }
                queued
            }
            PublishTarget::Place(place) => {
                let places = self.node.places.snapshot();
                let (_, entry) = places
                    .get(place)
                    .ok_or_else(|| PublishError::UnknownPlace(place.clone()))?;
                let area = match &entry.place.fence {
                    Some(PlaceFence::Circle { radius_m }) => Area::Circle(Circle {
                        lat: entry.place.lat,
                        lon: entry.place.lon,
                        radius_m: *radius_m,
                    }),
                    Some(PlaceFence::Polygon(polygon)) => Area::Polygon(polygon.clone()),
                    None => return Err(PublishError::PlaceWithoutFence(place.clone())),
                };
                hub.publish(&Target::Area(area), &notification)
            }
            PublishTarget::Area(area) => hub.publish(&Target::Area(area.clone()), &notification),
            PublishTarget::Topic(topic) => {
                hub.publish(&Target::Topic(topic.clone()), &notification)
            }
            PublishTarget::All(_) => hub.publish(&Target::All, &notification),
        };
        Ok(Published { id, queued })
    }
}
