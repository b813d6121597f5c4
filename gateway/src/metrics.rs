//! Prometheus metrics of one gateway process. Names are part of the contract (DESIGN §9).

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabel {
    pub kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CodeLabel {
    pub code: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    pub reason: &'static str,
}

/// Every metric the gateway exports.
pub struct Metrics {
    registry: Registry,
    /// The backend API's (served in single-node mode).
    pub api: crate::api::ApiMetrics,
    /// Open WebSocket sessions.
    pub connections: Gauge,
    /// Fixes that passed validation and were indexed.
    pub fixes: Counter,
    /// Fixes dropped because a newer one arrived before the rate allowed processing.
    pub fixes_coalesced: Counter,
    pub frames_in: Counter,
    pub frames_out: Counter,
    /// Frames queued to sessions, by kind (`notification`, `nearby`, …).
    pub deliveries: Family<KindLabel, Counter>,
    /// `deliveries{kind="nearby"}` and `{kind="geofence"}`, held for the per-fix path.
    pub nearby_deliveries: Counter,
    pub geofence_deliveries: Counter,
    /// Delivery call → frame written to the socket.
    pub delivery_seconds: Histogram,
    /// Frames dropped from outbound queues (coalesced `nearby` and queues of closed slow
    /// consumers).
    pub queue_drops: Counter,
    /// Sessions closed, by WebSocket close code.
    pub closes: Family<CodeLabel, Counter>,
    /// Bad client frames answered with an `error` frame, by error code.
    pub bad_frames: Family<CodeLabel, Counter>,
    /// Upgrades refused before a socket task existed, by reason.
    pub upgrades_refused: Family<ReasonLabel, Counter>,
    /// Clients with a position in the node's R-tree.
    pub clients_indexed: Gauge,
    /// 1 when the bus is usable (always 1 with the in-memory bus).
    pub bus_up: Gauge,
    pub bus_reconnects: Counter,
    /// Geofence events that could not be handed to the event stream.
    pub geofence_events_dropped: Counter,
    /// End-to-end pub/sub probes that did not come back in time.
    pub bus_probe_failures: Counter,
    /// Places in the replica.
    pub places: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::default();
        let deliveries = Family::<KindLabel, Counter>::default();
        let nearby_deliveries = deliveries
            .get_or_create(&KindLabel { kind: "nearby" })
            .clone();
        let geofence_deliveries = deliveries
            .get_or_create(&KindLabel { kind: "geofence" })
            .clone();
        let _ = deliveries.get_or_create(&KindLabel {
            kind: "notification",
        });
        let metrics = Metrics {
            nearby_deliveries,
            geofence_deliveries,
            connections: Gauge::default(),
            fixes: Counter::default(),
            fixes_coalesced: Counter::default(),
            frames_in: Counter::default(),
            frames_out: Counter::default(),
            deliveries,
            delivery_seconds: Histogram::new(exponential_buckets(0.000_05, 2.0, 18)),
            queue_drops: Counter::default(),
            closes: Family::default(),
            bad_frames: Family::default(),
            upgrades_refused: Family::default(),
            clients_indexed: Gauge::default(),
            bus_up: Gauge::default(),
            bus_reconnects: Counter::default(),
            bus_probe_failures: Counter::default(),
            geofence_events_dropped: Counter::default(),
            places: Gauge::default(),
            registry: Registry::default(),
            api: crate::api::ApiMetrics::default(),
        };
        metrics.api.register(&mut registry);
        registry.register(
            "geopush_connections",
            "Open WebSocket sessions",
            metrics.connections.clone(),
        );
        registry.register(
            "geopush_fixes",
            "Fixes validated and indexed",
            metrics.fixes.clone(),
        );
        registry.register(
            "geopush_fixes_coalesced",
            "Fixes replaced by a newer fix under the per-connection rate limit",
            metrics.fixes_coalesced.clone(),
        );
        registry.register(
            "geopush_frames_in",
            "WebSocket frames received from clients",
            metrics.frames_in.clone(),
        );
        registry.register(
            "geopush_frames_out",
            "WebSocket frames written to clients",
            metrics.frames_out.clone(),
        );
        registry.register(
            "geopush_deliveries",
            "Frames queued to sessions by kind",
            metrics.deliveries.clone(),
        );
        registry.register(
            "geopush_delivery_seconds",
            "Time from delivery to the socket write",
            metrics.delivery_seconds.clone(),
        );
        registry.register(
            "geopush_queue_drops",
            "Frames dropped from outbound queues",
            metrics.queue_drops.clone(),
        );
        registry.register(
            "geopush_closes",
            "Sessions closed by close code",
            metrics.closes.clone(),
        );
        registry.register(
            "geopush_bad_frames",
            "Client frames answered with an error frame",
            metrics.bad_frames.clone(),
        );
        registry.register(
            "geopush_upgrades_refused",
            "WebSocket upgrades refused before the upgrade, by reason",
            metrics.upgrades_refused.clone(),
        );
        registry.register(
            "geopush_clients_indexed",
            "Clients in the node's R-tree",
            metrics.clients_indexed.clone(),
        );
        registry.register(
            "geopush_bus_up",
            "1 when the bus is connected",
            metrics.bus_up.clone(),
        );
        registry.register(
            "geopush_bus_reconnects",
            "Bus reconnects",
            metrics.bus_reconnects.clone(),
        );
        registry.register(
            "geopush_bus_probe_failures",
            "End-to-end pub/sub probes that did not come back in time",
            metrics.bus_probe_failures.clone(),
        );
        registry.register(
            "geopush_geofence_events_dropped",
            "Geofence events that could not be handed to the event stream",
            metrics.geofence_events_dropped.clone(),
        );
        registry.register(
            "geopush_places",
            "Places in the replica",
            metrics.places.clone(),
        );
        for code in geopush_proto::CloseCode::ALL {
            let _ = metrics.closes.get_or_create(&CodeLabel {
                code: code.as_u16().to_string(),
            });
        }
        Metrics {
            registry,
            ..metrics
        }
    }

    /// The Prometheus text exposition of every metric.
    pub fn encode(&self) -> String {
        let mut text = String::new();
        if prometheus_client::encoding::text::encode(&mut text, &self.registry).is_err() {
            text.clear();
        }
        text
    }

    /// Count a close. Codes geopush does not define (a client's own, echoed) share the
    /// label `other`, so clients cannot grow the label set.
    pub fn count_close(&self, code: u16) {
        let known = geopush_proto::CloseCode::from_u16(code).is_some() || code == 1006;
        let code = if known {
            code.to_string()
        } else {
            "other".to_string()
        };
        self.closes.get_or_create(&CodeLabel { code }).inc();
    }

    pub fn count_bad_frame(&self, code: geopush_proto::ErrorCode) {
        self.bad_frames
            .get_or_create(&CodeLabel {
                code: code.as_str().to_string(),
            })
            .inc();
    }
}
