//! `Node`: the state one gateway process shares between its HTTP layer and its sessions.

use crate::auth::TokenVerifier;
use crate::bus::Bus;
use crate::bus::memory::MemoryBus;
use crate::config::Config;
use crate::geo::PlacesReplica;
use crate::geo::fences::{FenceRules, GeofenceSink, MemorySink};
use crate::geo::nearby::NearbyRules;
use crate::hub::Hub;
use crate::metrics::Metrics;
use crate::status::StatusBook;
use geopush_proto::FixPolicy;
use geopush_proto::frames::SessionLimits;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Everything a session or a request handler needs from its node.
pub struct Node {
    pub config: Config,
    /// This node's name in `welcome` frames and logs.
    pub node_id: String,
    pub metrics: Arc<Metrics>,
    pub hub: Hub,
    /// Inboxes, acks, and (with Redis) the other nodes.
    pub bus: Bus,
    pub verifier: TokenVerifier,
    /// Announced to every client in `welcome`.
    pub limits: SessionLimits,
    pub fix_policy: FixPolicy,
    /// Every place, for `nearby` and geofences.
    pub places: PlacesReplica,
    pub fence_rules: FenceRules,
    pub nearby_rules: NearbyRules,
    /// Where geofence events go besides the client.
    pub geofence_sink: Arc<dyn GeofenceSink>,
    /// The in-memory sink, when that is the sink (single-node mode).
    pub memory_sink: Option<Arc<MemorySink>>,
    /// True once shutdown began: readiness fails, upgrades are refused.
    pub draining: AtomicBool,
    /// True once the first places snapshot is in (at once without Redis).
    pub places_loaded: AtomicBool,
    /// Sessions holding a slot (upgrades accepted and not yet ended).
    connections: AtomicUsize,
    /// Cancelled when the grace period is over: every task stops at once.
    pub hard_stop: CancellationToken,
    /// Every task this node spawned (connections, sessions, writers).
    pub tasks: TaskTracker,
    /// What happened to each notification (counted here, read by the API).
    pub status: Arc<StatusBook>,
    /// Idempotency keys of single-node publishes: key → (id, finished, expires Unix ms).
    pub idempotency: std::sync::Mutex<std::collections::HashMap<String, (String, bool, i64)>>,
}

impl Node {
    pub fn new(
        config: Config,
        verifier: TokenVerifier,
        node_id: String,
        metrics: Arc<Metrics>,
        bus: Option<Arc<crate::bus::redis::RedisBus>>,
        event_sink: Option<Arc<dyn GeofenceSink>>,
    ) -> Node {
        let redis_mode = bus.is_some();
        metrics.bus_up.set(i64::from(bus.is_none()));
        let limits = SessionLimits {
            max_frame_bytes: config.max_frame_bytes,
            max_fixes_per_s: config.max_fixes_per_second,
            max_topics: config.max_topics,
        };
        let fix_policy = FixPolicy {
            max_future_ms: (config.fix_max_future_seconds as i64).saturating_mul(1000),
            ..FixPolicy::default()
        };
        let fence_rules = FenceRules {
            max_accuracy_m: config.fence_max_accuracy_m,
            exit_margin_floor_m: config.fence_exit_margin_m,
        };
        let nearby_rules = NearbyRules {
            default_radius_m: config.nearby_radius_m.min(config.nearby_max_radius_m),
            max_radius_m: config.nearby_max_radius_m,
            default_limit: config.nearby_limit.min(config.nearby_max_limit),
            max_limit: config.nearby_max_limit,
            min_move_m: config.nearby_min_move_m,
        };
        let memory_sink = match &bus {
            None => Some(Arc::new(MemorySink::new(config.geofence_event_buffer))),
            Some(_) => None,
        };
        let geofence_sink: Arc<dyn GeofenceSink> = match (&memory_sink, event_sink) {
            (Some(memory), _) => memory.clone(),
            (None, Some(redis)) => redis,
            (None, None) => Arc::new(MemorySink::new(config.geofence_event_buffer)),
        };
        let status = Arc::new(
            match &bus {
                Some(bus) => StatusBook::redis(bus.commands(), bus.keys.clone()),
                None => StatusBook::memory(),
            }
            .with_retention(config.api.status_retention()),
        );
        Node {
            status,
            places: PlacesReplica::new(),
            fence_rules,
            nearby_rules,
            geofence_sink,
            memory_sink,
            hub: Hub::new(metrics.clone(), bus.clone()),
            bus: match bus {
                Some(bus) => Bus::Redis(bus),
                None => Bus::Memory(MemoryBus::new(config.inbox_len)),
            },
            metrics,
            verifier,
            limits,
            fix_policy,
            node_id,
            config,
            draining: AtomicBool::new(false),
            places_loaded: AtomicBool::new(!redis_mode),
            connections: AtomicUsize::new(0),
            hard_stop: CancellationToken::new(),
            tasks: TaskTracker::new(),
            idempotency: Default::default(),
        }
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Acquire)
    }

    /// Ready for traffic: not draining, the bus is subscribed, the places are loaded.
    pub fn is_ready(&self) -> bool {
        !self.is_draining() && self.bus.is_up() && self.places_loaded.load(Ordering::Acquire)
    }

    /// Take a connection slot, or `None` when the node is full.
    pub fn try_acquire_slot(self: &Arc<Self>) -> Option<ConnectionSlot> {
        let max = self.config.max_connections;
        self.connections
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            })
            .ok()?;
        self.metrics.connections.inc();
        Some(ConnectionSlot { node: self.clone() })
    }

    pub fn connection_count(&self) -> usize {
        self.connections.load(Ordering::Acquire)
    }
}

/// A held connection slot; released on drop, whatever ends the session.
pub struct ConnectionSlot {
    node: Arc<Node>,
}

impl ConnectionSlot {
    pub fn node(&self) -> &Arc<Node> {
        &self.node
    }
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        self.node.connections.fetch_sub(1, Ordering::AcqRel);
        self.node.metrics.connections.dec();
    }
}
