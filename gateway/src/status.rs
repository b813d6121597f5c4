//! Notification status (`GET /v1/notifications/{id}`): what the gateways did with each
//! notification, counted where it happened.
//!
//! The publisher writes a record when it accepts a notification: its kind, its state
//! (`scheduled` or `sent`), when it expires, and — for user notifications — `targeted`, the
//! number of users whose inbox holds it. The gateways count the rest as it happens:
//!
//! - `targeted` (area, place, topic, all): the sessions the target matched on a node;
//! - `delivered`: notifications queued to a session's socket, live or replayed (a device that
//!   reconnects before it acks may be counted again: delivery is at-least-once);
//! - `acked`: `ack` frames naming the notification, once per session.
//!
//! Counting is a map increment on the delivery path; a background task folds the map into
//! the `gp:n:{id}` hashes every flush interval (one `HINCRBY` per field and id), so a
//! broadcast to 50,000 sockets costs one Redis round trip per node, not 50,000. In
//! single-node mode the records and counters live in memory.

use crate::bus::BusError;
use crate::bus::redis::Conn;
use geopush_proto::api::format_rfc3339_ms;
use geopush_proto::bus::Keys;
use serde::Serialize;
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use tracing::warn;
use utoipa::ToSchema;

/// How long a status outlives its notification's expiry (so "expired" can be answered),
/// unless configured (`GEOPUSH_STATUS_RETENTION_SECONDS`).
pub const DEFAULT_STATUS_RETENTION: Duration = Duration::from_secs(24 * 3600);
/// The TTL a counter gets when it arrives after its record expired (so it cannot leak).
const ORPHAN_STATUS_TTL_MS: i64 = 3600 * 1000;
/// Most distinct notifications one node holds uncounted between flushes; past it, counts
/// are dropped (and logged) rather than growing without bound while Redis is away.
pub const MAX_PENDING_STATUS_IDS: usize = 100_000;
/// Concurrent per-notification pipelines of one flush.
const FLUSH_CONCURRENCY: usize = 64;

mod field {
    pub const STATE: &str = "state";
    pub const KIND: &str = "kind";
    pub const TARGETED: &str = "targeted";
    pub const DELIVERED: &str = "delivered";
    pub const ACKED: &str = "acked";
    pub const CREATED: &str = "created_ms";
    pub const SEND_AT: &str = "send_at_ms";
    pub const EXPIRES: &str = "expires_ms";
}

/// Counter increments for one notification.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counts {
    pub targeted: u64,
    pub delivered: u64,
    pub acked: u64,
}

impl From<crate::hub::Reach> for Counts {
    /// A live (area, topic, broadcast) delivery: the matched sessions were targeted.
    fn from(reach: crate::hub::Reach) -> Counts {
        Counts {
            targeted: reach.matched as u64,
            delivered: reach.queued as u64,
            acked: 0,
        }
    }
}

impl Counts {
    fn add(&mut self, other: Counts) {
        self.targeted += other.targeted;
        self.delivered += other.delivered;
        self.acked += other.acked;
    }
    fn is_zero(&self) -> bool {
        *self == Counts::default()
    }
}

/// Where a notification stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum StatusState {
    /// Waiting for its `send_at`.
    Scheduled,
    /// Sent; user notifications are still deliverable from inboxes.
    Sent,
    /// Past its `ttl_s`: no longer delivered.
    Expired,
}

/// What the publisher records when it accepts a notification.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StatusRecord {
    /// `users`, `area`, `place`, `topic` or `all`.
    pub kind: &'static str,
    pub scheduled: bool,
    /// Users whose inbox holds it (user notifications, once sent).
    pub targeted_users: Option<u64>,
    pub created_ms: i64,
    pub send_at_ms: Option<i64>,
    pub expires_ms: i64,
}

/// `GET /v1/notifications/{id}`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, ToSchema)]
pub struct NotificationStatus {
    pub id: String,
    pub state: StatusState,
    /// `users`, `area`, `place`, `topic` or `all`.
    pub kind: String,
    /// Users whose inbox holds it (user notifications), or sessions the target matched.
    pub targeted: u64,
    /// Deliveries queued to sockets (replays after a reconnect count again).
    pub delivered: u64,
    /// Sessions that acked it.
    pub acked: u64,
    /// RFC 3339.
    pub created_at: String,
    /// RFC 3339, when scheduled.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub send_at: Option<String>,
    /// RFC 3339: delivery stops after this.
    pub expires_at: String,
}

fn state_of(scheduled: bool, expires_ms: i64, now_ms: i64) -> StatusState {
    if scheduled {
        StatusState::Scheduled
    } else if now_ms > expires_ms {
        StatusState::Expired
    } else {
        StatusState::Sent
    }
}

enum Store {
    /// Single-node mode: records with their counters.
    Memory(Mutex<HashMap<String, (StatusRecord, Counts)>>),
    Redis {
        conn: Conn,
        keys: Keys,
    },
}

/// The status of every notification this process publishes or delivers.
pub struct StatusBook {
    store: Store,
    /// How long a record outlives its notification's expiry, ms.
    retention_ms: i64,
    /// Counts not yet folded into Redis (Redis mode only).
    pending: Mutex<HashMap<Box<str>, Counts>>,
}

fn unavailable(e: impl std::fmt::Display) -> BusError {
    BusError::Unavailable(e.to_string())
}

impl StatusBook {
    pub fn memory() -> StatusBook {
        StatusBook {
            store: Store::Memory(Mutex::default()),
            retention_ms: DEFAULT_STATUS_RETENTION.as_millis() as i64,
            pending: Mutex::default(),
        }
    }

    pub fn redis(conn: Conn, keys: Keys) -> StatusBook {
        StatusBook {
            store: Store::Redis { conn, keys },
            retention_ms: DEFAULT_STATUS_RETENTION.as_millis() as i64,
            pending: Mutex::default(),
        }
    }

    /// Keep records this long after their notification expires.
    pub fn with_retention(mut self, retention: Duration) -> StatusBook {
        self.retention_ms = i64::try_from(retention.as_millis()).unwrap_or(i64::MAX / 4);
        self
    }

    /// Count what happened to a notification. Never waits on I/O.
    pub fn count(&self, id: &str, counts: Counts) {
        if counts.is_zero() {
            return;
        }
        match &self.store {
            Store::Memory(records) => {
                // Counts of notifications nobody recorded (or long gone) are not kept.
                if let Some((_, total)) = records
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .get_mut(id)
                {
                    total.add(counts);
                }
            }
            Store::Redis { .. } => {
                let mut pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
                if let Some(total) = pending.get_mut(id) {
                    total.add(counts);
                } else if pending.len() < MAX_PENDING_STATUS_IDS {
                    pending.insert(id.into(), counts);
                } else {
                    warn!(
                        id,
                        "status counts dropped: too many notifications pending a flush"
                    );
                }
            }
        }
    }

    /// Record a notification the publisher accepted (or whose scheduled time came).
    pub async fn record(
        &self,
        id: &str,
        record: &StatusRecord,
        now_ms: i64,
    ) -> Result<(), BusError> {
        match &self.store {
            Store::Memory(records) => {
                let mut records = records.lock().unwrap_or_else(|p| p.into_inner());
                if records.len() % 1024 == 1023 {
                    let retention_ms = self.retention_ms;
                    records.retain(|_, (r, _)| r.expires_ms.saturating_add(retention_ms) > now_ms);
                }
                let entry = records
                    .entry(id.to_owned())
                    .or_insert_with(|| (record.clone(), Counts::default()));
                entry.0 = record.clone();
                if let Some(users) = record.targeted_users {
                    entry.1.targeted = users;
                }
                Ok(())
            }
            Store::Redis { conn, keys } => {
                let key = keys.status(id);
                let mut pipe = redis::pipe();
                pipe.cmd("HSET")
                    .arg(&key)
                    .arg(field::STATE)
                    .arg(if record.scheduled {
                        "scheduled"
                    } else {
                        "sent"
                    })
                    .arg(field::KIND)
                    .arg(record.kind)
                    .arg(field::CREATED)
                    .arg(record.created_ms)
                    .arg(field::EXPIRES)
                    .arg(record.expires_ms);
                if let Some(at) = record.send_at_ms {
                    pipe.arg(field::SEND_AT).arg(at);
                }
                if let Some(users) = record.targeted_users {
                    pipe.arg(field::TARGETED).arg(users);
                }
                pipe.ignore();
                let keep_ms =
                    (record.expires_ms.saturating_add(self.retention_ms) - now_ms).max(1000);
                pipe.cmd("PEXPIRE").arg(&key).arg(keep_ms).ignore();
                pipe.query_async::<()>(&mut conn.clone())
                    .await
                    .map_err(unavailable)
            }
        }
    }

    /// The status of a notification, if it is known.
    pub async fn get(&self, id: &str, now_ms: i64) -> Result<Option<NotificationStatus>, BusError> {
        match &self.store {
            Store::Memory(records) => {
                let records = records.lock().unwrap_or_else(|p| p.into_inner());
                Ok(records.get(id).map(|(record, counts)| NotificationStatus {
                    id: id.to_owned(),
                    state: state_of(record.scheduled, record.expires_ms, now_ms),
                    kind: record.kind.to_owned(),
                    targeted: counts.targeted,
                    delivered: counts.delivered,
                    acked: counts.acked,
                    created_at: format_rfc3339_ms(record.created_ms),
                    send_at: record.send_at_ms.map(format_rfc3339_ms),
                    expires_at: format_rfc3339_ms(record.expires_ms),
                }))
            }
            Store::Redis { conn, keys } => {
                let fields: HashMap<String, String> = redis::cmd("HGETALL")
                    .arg(keys.status(id))
                    .query_async(&mut conn.clone())
                    .await
                    .map_err(unavailable)?;
                // A hash without a state holds only counters that outlived their record.
                let Some(state) = fields.get(field::STATE) else {
                    return Ok(None);
                };
                let number = |name: &str| fields.get(name).and_then(|v| v.parse::<i64>().ok());
                let count = |name: &str| number(name).unwrap_or(0).max(0) as u64;
                let expires_ms = number(field::EXPIRES).unwrap_or(0);
                Ok(Some(NotificationStatus {
                    id: id.to_owned(),
                    state: state_of(state == "scheduled", expires_ms, now_ms),
                    kind: fields.get(field::KIND).cloned().unwrap_or_default(),
                    targeted: count(field::TARGETED),
                    delivered: count(field::DELIVERED),
                    acked: count(field::ACKED),
                    created_at: format_rfc3339_ms(number(field::CREATED).unwrap_or(0)),
                    send_at: number(field::SEND_AT).map(format_rfc3339_ms),
                    expires_at: format_rfc3339_ms(expires_ms),
                }))
            }
        }
    }

    /// Fold the pending counts into Redis. Counts a failed write held are kept for the next
    /// flush.
    pub async fn flush(&self) -> Result<(), BusError> {
        let Store::Redis { conn, keys } = &self.store else {
            return Ok(());
        };
        let pending = std::mem::take(&mut *self.pending.lock().unwrap_or_else(|p| p.into_inner()));
        if pending.is_empty() {
            return Ok(());
        }
        let entries: Vec<(Box<str>, Counts)> = pending.into_iter().collect();
        let mut first_error = None;
        for chunk in entries.chunks(FLUSH_CONCURRENCY) {
            let writes = chunk.iter().map(|(id, counts)| {
                let key = keys.status(id);
                let mut pipe = redis::pipe();
                for (name, value) in [
                    (field::TARGETED, counts.targeted),
                    (field::DELIVERED, counts.delivered),
                    (field::ACKED, counts.acked),
                ] {
                    if value > 0 {
                        pipe.cmd("HINCRBY").arg(&key).arg(name).arg(value).ignore();
                    }
                }
                // A record that expired meanwhile must not come back forever.
                pipe.cmd("PEXPIRE")
                    .arg(&key)
                    .arg(ORPHAN_STATUS_TTL_MS)
                    .arg("NX")
                    .ignore();
                let mut conn = conn.clone();
                async move { pipe.query_async::<()>(&mut conn).await }
            });
            let results = futures_util::future::join_all(writes).await;
            for ((id, counts), result) in chunk.iter().zip(results) {
                if let Err(e) = result {
                    first_error.get_or_insert(e);
                    self.count(id, *counts);
                }
            }
        }
        match first_error {
            Some(e) => Err(unavailable(e)),
            None => Ok(()),
        }
    }

    /// Flush every `interval` until `stop`, then once more.
    pub async fn run_flusher(&self, interval: Duration, stop: CancellationToken) {
        let mut failing = false;
        loop {
            let stopped = tokio::select! {
                () = tokio::time::sleep(interval) => false,
                () = stop.cancelled() => true,
            };
            match self.flush().await {
                Ok(()) => failing = false,
                Err(e) if !failing => {
                    failing = true;
                    warn!(error = %e, "status counts not flushed; keeping them for the next try");
                }
                Err(_) => {}
            }
            if stopped {
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn memory_counts_only_recorded_notifications() {
        let book = StatusBook::memory();
        let now = 1_000_000;
        let record = StatusRecord {
            kind: "users",
            scheduled: false,
            targeted_users: Some(2),
            created_ms: now,
            send_at_ms: None,
            expires_ms: now + 60_000,
        };
        book.record("n1", &record, now).await.expect("recorded");
        book.count(
            "n1",
            Counts {
                delivered: 3,
                ..Counts::default()
            },
        );
        book.count(
            "n1",
            Counts {
                acked: 1,
                ..Counts::default()
            },
        );
        book.count(
            "unknown",
            Counts {
                delivered: 1,
                ..Counts::default()
            },
        );
        let status = book.get("n1", now).await.expect("read").expect("known");
        assert_eq!(
            (
                status.state,
                status.targeted,
                status.delivered,
                status.acked
            ),
            (StatusState::Sent, 2, 3, 1)
        );
        assert_eq!(book.get("unknown", now).await.expect("read"), None);
        let later = book
            .get("n1", now + 61_000)
            .await
            .expect("read")
            .expect("known");
        assert_eq!(later.state, StatusState::Expired);
    }
}
