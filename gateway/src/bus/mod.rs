//! The bus: what connects a node to publishers and to the other nodes.
//!
//! Two implementations behind one type: [`memory::MemoryBus`] for single-node mode (the
//! publisher delivers straight into this node's hub) and the Redis bus for a cluster of
//! stateless nodes. Both keep every user's durable inbox and each device's acked cursor.

pub mod dispatch;
pub mod events;
pub mod memory;
pub mod places_sync;
pub mod redis;

use bytes::Bytes;
use geopush_proto::bus::Cursor;
use geopush_proto::frames::ServerFrame;
use serde_json::value::RawValue;
use thiserror::Error;

/// A bus operation failed (Redis unreachable, or a reply that makes no sense).
#[derive(Debug, Error)]
pub enum BusError {
    #[error("bus unavailable: {0}")]
    Unavailable(String),
    #[error("unexpected reply from the bus: {0}")]
    Protocol(String),
}

/// A user notification as it sits in an inbox.
#[derive(Clone, Debug)]
pub struct StoredNotification {
    pub cursor: Cursor,
    pub id: String,
    pub title: String,
    pub body: String,
    pub data: Option<Box<RawValue>>,
    /// Unix ms of the publish.
    pub ts: i64,
    /// Unix ms after which it must not be delivered.
    pub expires_ms: i64,
}

impl StoredNotification {
    /// The `notification` frame, with its cursor.
    pub fn frame(&self) -> Bytes {
        let cursor = self.cursor.to_string();
        Bytes::from(
            ServerFrame::Notification {
                id: &self.id,
                cursor: Some(&cursor),
                title: &self.title,
                body: &self.body,
                data: self.data.as_deref(),
                ts: self.ts,
            }
            .to_json(),
        )
    }
}

/// Most inbox entries read per replay page.
pub const REPLAY_PAGE: usize = 100;

/// The bus of a node.
pub enum Bus {
    Memory(memory::MemoryBus),
    Redis(std::sync::Arc<redis::RedisBus>),
}

impl Bus {
    /// Inbox entries after `after` (all when `None`), oldest first, at most `count`, expired
    /// ones skipped.
    pub async fn inbox_after(
        &self,
        user: &str,
        after: Option<Cursor>,
        count: usize,
        now_ms: i64,
    ) -> Result<Vec<StoredNotification>, BusError> {
        match self {
            Bus::Memory(bus) => Ok(bus.inbox_after(user, after, count, now_ms)),
            Bus::Redis(bus) => bus.inbox_after(user, after, count, now_ms).await,
        }
    }

    /// The acked cursor of a user's device.
    pub async fn load_ack(&self, user: &str, device: &str) -> Result<Option<Cursor>, BusError> {
        match self {
            Bus::Memory(bus) => Ok(bus.load_ack(user, device)),
            Bus::Redis(bus) => bus.load_ack(user, device).await,
        }
    }

    /// Store an acked cursor without making the caller wait (a session's reader is not
    /// async); failures are logged, and the client's next ack stores a later cursor.
    pub fn store_ack_in_background(
        &self,
        node: &std::sync::Arc<crate::node::Node>,
        user: &str,
        device: &str,
        cursor: Cursor,
    ) {
        match self {
            Bus::Memory(bus) => bus.store_ack(user, device, cursor),
            Bus::Redis(bus) => {
                let (bus, user, device) = (bus.clone(), user.to_owned(), device.to_owned());
                node.tasks.spawn(async move {
                    if let Err(e) = bus.store_ack(&user, &device, cursor).await {
                        tracing::warn!(user, device, error = %e, "storing an ack cursor failed");
                    }
                });
            }
        }
    }

    /// Wait (bounded) until this node's subscription of a user's channel is confirmed, so
    /// that whatever is published from now on arrives live and everything before is in the
    /// inbox. Immediate with the memory bus.
    pub async fn user_channel_ready(&self, user: &str, within: std::time::Duration) -> bool {
        let Bus::Redis(bus) = self else {
            return true;
        };
        let channel = bus.keys.user_channel(user);
        let deadline = tokio::time::Instant::now() + within;
        while !bus.is_subscribed(&channel) {
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        true
    }

    /// The Redis bus, when this node has one.
    pub fn redis(&self) -> Option<&std::sync::Arc<redis::RedisBus>> {
        match self {
            Bus::Redis(bus) => Some(bus),
            Bus::Memory(_) => None,
        }
    }

    /// Ready to deliver: always with the memory bus; with Redis, when subscribed.
    pub fn is_up(&self) -> bool {
        match self {
            Bus::Memory(_) => true,
            Bus::Redis(bus) => bus.is_up(),
        }
    }

    /// Store the acked cursor of a user's device (never moving it backwards).
    pub async fn store_ack(
        &self,
        user: &str,
        device: &str,
        cursor: Cursor,
    ) -> Result<(), BusError> {
        match self {
            Bus::Memory(bus) => {
                bus.store_ack(user, device, cursor);
                Ok(())
            }
            Bus::Redis(bus) => bus.store_ack(user, device, cursor).await,
        }
    }
}
