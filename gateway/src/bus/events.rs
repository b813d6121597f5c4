//! Geofence events into the capped `gp:events` stream, for backend consumers (consumer
//! groups) and the webhook dispatcher.
//!
//! Sessions never wait on Redis: events go into a bounded buffer that one task drains in
//! pipelined batches. A full buffer drops the event and counts it.

use super::redis::Conn;
use crate::geo::fences::{GeofenceRecord, GeofenceSink};
use crate::metrics::Metrics;
use geopush_proto::bus::Keys;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::warn;

/// Entries `gp:events` keeps (approximately).
pub const EVENTS_STREAM_LEN: usize = 100_000;
/// Events buffered between sessions and the writer.
pub const EVENTS_BUFFER: usize = 10_000;
/// Most events in one pipeline.
const EVENTS_BATCH: usize = 500;

/// The sessions' side: a bounded buffer.
pub struct RedisEventSink {
    tx: mpsc::Sender<GeofenceRecord>,
    metrics: Arc<Metrics>,
}

impl RedisEventSink {
    pub fn new(metrics: Arc<Metrics>) -> (RedisEventSink, mpsc::Receiver<GeofenceRecord>) {
        let (tx, rx) = mpsc::channel(EVENTS_BUFFER);
        (RedisEventSink { tx, metrics }, rx)
    }
}

impl GeofenceSink for RedisEventSink {
    fn publish(&self, record: GeofenceRecord) {
        if self.tx.try_send(record).is_err() {
            self.metrics.geofence_events_dropped.inc();
        }
    }
}

/// Drain the buffer into the stream until `stop` (then flush what is left, once).
pub async fn run_event_writer(
    mut conn: Conn,
    keys: Keys,
    mut rx: mpsc::Receiver<GeofenceRecord>,
    metrics: Arc<Metrics>,
    stop: CancellationToken,
) {
    let mut batch = Vec::with_capacity(EVENTS_BATCH);
    loop {
        let received = tokio::select! {
            n = rx.recv_many(&mut batch, EVENTS_BATCH) => n,
            () = stop.cancelled() => {
                rx.close();
                rx.recv_many(&mut batch, EVENTS_BUFFER).await
            }
        };
        if received == 0 {
            return;
        }
        let mut pipe = redis::pipe();
        for event in &batch {
            let kind = match event.event {
                geopush_proto::frames::GeofenceEvent::Enter => "enter",
                geopush_proto::frames::GeofenceEvent::Exit => "exit",
                geopush_proto::frames::GeofenceEvent::Dwell => "dwell",
            };
            pipe.cmd("XADD")
                .arg(keys.events())
                .arg("MAXLEN")
                .arg("~")
                .arg(EVENTS_STREAM_LEN)
                .arg("*")
                .arg("user")
                .arg(&event.user)
                .arg("device")
                .arg(&event.device)
                .arg("place")
                .arg(&event.place)
                .arg("event")
                .arg(kind)
                .arg("ts")
                .arg(event.ts)
                .arg("lat")
                .arg(event.lat)
                .arg("lon")
                .arg(event.lon)
                .ignore();
        }
        // One retry after a pause rides out a reconnect; then the batch is counted as lost.
        let mut sent = pipe.query_async::<()>(&mut conn).await;
        if sent.is_err() {
            tokio::time::sleep(Duration::from_millis(500)).await;
            sent = pipe.query_async::<()>(&mut conn).await;
        }
        if let Err(e) = sent {
            warn!(error = %e, events = batch.len(), "geofence events not written");
            metrics.geofence_events_dropped.inc_by(batch.len() as u64);
        }
        batch.clear();
        if stop.is_cancelled() && rx.is_closed() && rx.is_empty() {
            return;
        }
    }
}
