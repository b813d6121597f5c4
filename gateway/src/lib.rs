//! geopush gateway: the data plane.
//!
//! A gateway node accepts authenticated WebSocket sessions ([`http`], [`auth`],
//! [`session`]), indexes where its clients are ([`geo`]), and delivers frames to users,
//! topics, areas or everyone through its [`hub`]. [`Gateway::serve`] runs it on a bound
//! listener until a shutdown future resolves, then drains ([`drain`]).

pub mod api;
pub mod auth;
pub mod bus;
pub mod config;
mod drain;
pub mod geo;
mod http;
pub mod hub;
pub mod metrics;
mod node;
pub mod process;
pub mod publish;
pub mod schedule;
pub mod session;
pub mod status;

pub use config::Config;
pub use hub::{Hub, Notification, Target};

use auth::{KeyError, TokenVerifier};
use bus::dispatch::{BusSignals, run_dispatcher, run_health};
use bus::events::{RedisEventSink, run_event_writer};
use bus::places_sync::run_places_sync;
use bus::redis::{Conn, RedisBus, RedisTarget};
use config::ConfigError;
use node::Node;
use std::future::Future;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::Ordering;
use thiserror::Error;
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// Why a gateway could not start.
#[derive(Debug, Error)]
pub enum GatewayError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Keys(#[from] KeyError),
    #[error(transparent)]
    Bus(#[from] bus::BusError),
    #[error("with a Redis URL, use Gateway::start (it connects first)")]
    NeedsStart,
    #[error("cannot read places file {path}: {source}")]
    PlacesFile {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

/// Most rejected place rows logged one by one at start; the rest are counted.
const MAX_REJECTED_ROWS_LOGGED: usize = 100;

/// What a Redis-backed node starts its bus tasks with.
struct RedisParts {
    bus: Arc<RedisBus>,
    pushes: mpsc::Receiver<redis::PushInfo>,
    places_conn: Conn,
    events: Option<mpsc::Receiver<geo::fences::GeofenceRecord>>,
}

/// A gateway node. Cheap to clone; every clone is the same node.
#[derive(Clone)]
pub struct Gateway {
    node: Arc<Node>,
    /// The backend API, served beside `/v1/ws` in single-node mode.
    api: Option<Arc<api::Api>>,
    /// Where this node's publisher keeps scheduled notifications.
    scheduler: schedule::Scheduler,
    /// The Redis parts `serve` starts tasks on.
    redis: Arc<Mutex<Option<RedisParts>>>,
}

impl Gateway {
    /// Validate the configuration and load the token keys.
    pub fn new(config: Config) -> Result<Gateway, GatewayError> {
        if config.redis_url.is_some() {
            return Err(GatewayError::NeedsStart);
        }
        Gateway::build(config, None)
    }

    /// Like [`Gateway::new`], and with `redis_url` set, connect to Redis first.
    pub async fn start(config: Config) -> Result<Gateway, GatewayError> {
        let Some(urls) = config.redis_url.clone() else {
            return Gateway::build(config, None);
        };
        config.validate()?;
        let target = RedisTarget::parse(urls.as_str(), config.redis_cluster);
        let keys = geopush_proto::bus::Keys::new(config.redis_prefix.clone());
        let (bus, pushes) = RedisBus::connect(
            &target,
            keys,
            config.subscription_linger(),
            config.inbox_len,
        )
        .await?;
        // Following the places log blocks its connection: it gets one of its own.
        let places_conn = bus::redis::connect(&target, None).await?;
        let parts = RedisParts {
            bus: Arc::new(bus),
            pushes,
            places_conn,
            events: None,
        };
        Gateway::build(config, Some(parts))
    }

    fn build(config: Config, redis: Option<RedisParts>) -> Result<Gateway, GatewayError> {
        config.validate()?;
        let verifier = TokenVerifier::from_config(&config.tokens)?;
        let node_id = config
            .node_id
            .clone()
            .unwrap_or_else(|| format!("gw-{:08x}", rand::random::<u32>()));
        if redis.is_some() && config.places_file.is_some() {
            return Err(GatewayError::Config(ConfigError {
                field: "places_file",
                reason:
                    "with Redis, places come from the Redis store (import them with the places API)"
                        .into(),
            }));
        }
        let mut redis = redis;
        let bus = redis.as_ref().map(|r| r.bus.clone());
        let metrics = Arc::new(metrics::Metrics::new());
        let event_sink = redis.as_mut().map(|parts| {
            let (sink, events) = RedisEventSink::new(metrics.clone());
            parts.events = Some(events);
            Arc::new(sink) as Arc<dyn geo::fences::GeofenceSink>
        });
        let node = Node::new(config, verifier, node_id, metrics, bus, event_sink);
        if let Some(path) = &node.config.places_file {
            let text =
                std::fs::read_to_string(path).map_err(|source| GatewayError::PlacesFile {
                    path: path.display().to_string(),
                    source,
                })?;
            let report = node.places.load_text(&text);
            for row in report.rejected.iter().take(MAX_REJECTED_ROWS_LOGGED) {
                warn!(file = %path.display(), unit = row.unit, position = row.position, reason = %row.reason, "place rejected");
            }
            info!(file = %path.display(), loaded = report.loaded, rejected = report.rejected.len(), "places loaded");
        }
        node.metrics.places.set(node.places.snapshot().len() as i64);
        let scheduler = match node.bus.redis() {
            Some(bus) => schedule::Scheduler::redis(bus.commands(), bus.keys.clone()),
            None => schedule::Scheduler::memory(),
        };
        let node = Arc::new(node);
        let api = match node.bus.redis() {
            Some(_) => None,
            None => {
                let auth = api::keys::ApiAuth::new(
                    node.config.api.api_keys.as_ref().map(|k| k.expose()),
                    TokenVerifier::from_config(&node.config.tokens)?,
                )?;
                Some(Arc::new(api::Api::new(
                    publish::Publisher::for_node(node.clone(), scheduler.clone()),
                    node.clone(),
                    None,
                    auth,
                    node.config.api.clone(),
                    node.metrics.api.clone(),
                )))
            }
        };
        Ok(Gateway {
            api,
            scheduler,
            node,
            redis: Arc::new(Mutex::new(redis)),
        })
    }

    /// The Redis places store of this node's bus (`None` in single-node mode).
    pub fn places_store(&self) -> Option<bus::places_sync::PlacesStore> {
        let bus = self.node.bus.redis()?;
        Some(bus::places_sync::PlacesStore::new(
            bus.commands(),
            bus.keys.clone(),
        ))
    }

    /// Whether the node is ready for traffic (what `/readyz` answers).
    pub fn is_ready(&self) -> bool {
        self.node.is_ready()
    }

    /// Every place this node knows.
    pub fn places(&self) -> &geo::PlacesReplica {
        &self.node.places
    }

    /// Replace every place (single-node mode; the bus keeps replicas in sync later).
    pub fn replace_places(&self, places: Vec<geopush_proto::Place>) {
        self.node.places.replace(places);
        self.node
            .metrics
            .places
            .set(self.node.places.snapshot().len() as i64);
    }

    /// Geofence events kept by the in-memory sink, oldest first (single-node mode).
    pub fn geofence_events(&self) -> Vec<geo::fences::GeofenceRecord> {
        self.node
            .memory_sink
            .as_ref()
            .map(|s| s.recent())
            .unwrap_or_default()
    }

    /// A publisher into this node (single-node mode).
    pub fn publisher(&self) -> publish::Publisher {
        publish::Publisher::for_node(self.node.clone(), self.scheduler.clone())
    }

    /// Deliver to this node's sessions.
    pub fn hub(&self) -> &Hub {
        &self.node.hub
    }

    /// The Prometheus text of this node's metrics.
    pub fn metrics_text(&self) -> String {
        self.node.metrics.encode()
    }

    pub fn node_id(&self) -> &str {
        &self.node.node_id
    }

    /// Open sessions.
    pub fn connection_count(&self) -> usize {
        self.node.connection_count()
    }

    /// Serve on `listener` until `shutdown` resolves, then drain: readiness fails, new
    /// upgrades get 503, every session gets `reconnect` and close 1001 spread over the drain
    /// window; tasks still running a grace period later are stopped.
    pub async fn serve(&self, listener: TcpListener, shutdown: impl Future<Output = ()>) {
        let node = &self.node;
        if node.config.uses_dev_secret() {
            warn!(
                "INSECURE: no token key configured; using the built-in development secret. \
                 Anyone can mint tokens for this gateway. Set GEOPUSH_JWT_SECRET, \
                 GEOPUSH_JWT_PUBLIC_KEY or GEOPUSH_JWKS_FILE in production."
            );
        }
        let addr = listener
            .local_addr()
            .map(|a| a.to_string())
            .unwrap_or_default();
        info!(addr = %addr, node = %node.node_id, "listening");
        let redis = self.redis.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(RedisParts {
            bus,
            pushes,
            places_conn,
            events,
        }) = redis
        {
            let signals = Arc::new(BusSignals::default());
            let stop = node.hard_stop.clone();
            node.tasks.spawn(run_dispatcher(
                node.clone(),
                pushes,
                signals.clone(),
                stop.clone(),
            ));
            node.tasks
                .spawn(run_health(node.clone(), bus.clone(), signals, stop.clone()));
            node.tasks.spawn(run_places_sync(
                node.clone(),
                places_conn,
                bus.keys.clone(),
                stop.clone(),
            ));
            if let Some(events) = events {
                let writer = run_event_writer(
                    bus.commands(),
                    bus.keys.clone(),
                    events,
                    node.metrics.clone(),
                    stop.clone(),
                );
                node.tasks.spawn(writer);
            }
            let status = node.status.clone();
            let interval = node.config.status_flush_interval();
            let flush_stop = stop.clone();
            node.tasks
                .spawn(async move { status.run_flusher(interval, flush_stop).await });
            node.tasks
                .spawn(async move { bus.run_subscriber(stop).await });
        }
        if node.bus.redis().is_none() {
            // Single-node mode: scheduled sends wait in this process.
            node.tasks.spawn(schedule::run_scheduler(
                self.publisher(),
                node.config.api.schedule_poll(),
                node.config.api.schedule_lease(),
                node.hard_stop.clone(),
            ));
        }
        let stop_accepting = CancellationToken::new();
        let accept = node.tasks.spawn(http::accept_loop(
            node.clone(),
            self.api.clone(),
            listener,
            stop_accepting.clone(),
        ));

        shutdown.await;
        info!("shutdown requested: draining");
        node.draining.store(true, Ordering::Release);
        // Keep answering HTTP (readiness says 503, upgrades are refused) while draining.
        drain::drain_sessions(node).await;
        stop_accepting.cancel();
        let _ = accept.await;
        node.tasks.close();
        let grace = node.config.shutdown_grace();
        if tokio::time::timeout(grace, wait_for_sessions(node))
            .await
            .is_err()
        {
            warn!(
                left = node.connection_count(),
                "grace period over; stopping the rest"
            );
        }
        node.hard_stop.cancel();
        if tokio::time::timeout(grace, node.tasks.wait())
            .await
            .is_err()
        {
            warn!("tasks still running after the hard stop");
        }
        info!("drained");
    }
}

async fn wait_for_sessions(node: &Node) {
    while node.connection_count() > 0 {
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

/// Run a gateway with `config` on `listener` until `shutdown` resolves.
pub async fn run(
    listener: TcpListener,
    config: Config,
    shutdown: impl Future<Output = ()>,
) -> Result<(), GatewayError> {
    Gateway::new(config)?.serve(listener, shutdown).await;
    Ok(())
}
