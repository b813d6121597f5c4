//! geopush worker: the control plane process.
//!
//! It serves the backend HTTP API (the routes live in [`geopush_gateway::api`], which the
//! single-node gateway serves too) with a Redis publisher and the Redis places store, keeps
//! a places replica for nearby queries, publishes scheduled notifications as they come due,
//! and delivers geofence events to webhooks ([`webhooks`]). Any number of workers can run:
//! they share nothing but Redis.
//!
//! [`Worker::start`] connects; [`Worker::serve`] runs on a bound listener until a shutdown
//! future resolves, then stops accepting, lets requests in flight finish and stops its
//! tasks within the grace period.

pub mod config;
pub mod webhooks;

pub use config::WorkerConfig;

use bytes::Bytes;
use geopush_gateway::api::keys::ApiAuth;
use geopush_gateway::api::{Api, ApiError, ApiMetrics};
use geopush_gateway::auth::TokenVerifier;
use geopush_gateway::bus::BusError;
use geopush_gateway::bus::places_sync::{PlacesFollower, PlacesStore, run_places_sync};
use geopush_gateway::bus::redis::{Conn, RedisTarget, connect};
use geopush_gateway::geo::PlacesReplica;
use geopush_gateway::publish::Publisher;
use geopush_gateway::schedule::run_scheduler;
use geopush_proto::bus::Keys;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use thiserror::Error;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

/// How often the worker checks that Redis answers (readiness), seconds.
const REDIS_CHECK_INTERVAL: Duration = Duration::from_secs(1);

/// Why a worker could not start.
#[derive(Debug, Error)]
pub enum WorkerError {
    #[error(transparent)]
    Config(#[from] geopush_gateway::config::ConfigError),
    #[error(transparent)]
    Keys(#[from] geopush_gateway::auth::KeyError),
    #[error(transparent)]
    Bus(#[from] BusError),
    #[error(transparent)]
    Publish(#[from] geopush_gateway::publish::PublishError),
    #[error(transparent)]
    Webhooks(#[from] webhooks::WebhookError),
}

/// The worker's places replica, kept in sync with the store for nearby queries.
struct WorkerPlaces {
    replica: PlacesReplica,
    loaded: AtomicBool,
    count: Gauge,
}

impl PlacesFollower for WorkerPlaces {
    fn replica(&self) -> &PlacesReplica {
        &self.replica
    }
    fn changed(&self) {
        self.count.set(self.replica.snapshot().len() as i64);
        self.loaded.store(true, Ordering::Release);
    }
}

/// A running worker's shared state.
struct State {
    config: WorkerConfig,
    api: Api,
    places: Arc<WorkerPlaces>,
    registry: Registry,
    /// Redis answered the last check.
    redis_up: AtomicBool,
    redis_gauge: Gauge,
    webhook_metrics: webhooks::WebhookMetrics,
}

/// A connected worker. Cheap to clone.
#[derive(Clone)]
pub struct Worker {
    state: Arc<State>,
    target: RedisTarget,
    keys: Keys,
    /// For the places follower (it blocks its connection) and health checks.
    places_conn: Conn,
    check_conn: Conn,
    /// The webhook dispatcher's settings, when URLs are configured (validated at start).
    webhooks: Option<webhooks::WebhookConfig>,
}

/// The dispatcher's settings from the worker's, checked.
fn webhook_config(config: &WorkerConfig) -> Result<Option<webhooks::WebhookConfig>, WorkerError> {
    let hooks = &config.webhooks;
    if hooks.webhook_urls.is_empty() {
        return Ok(None);
    }
    let consumer = config
        .worker_id
        .clone()
        .unwrap_or_else(|| format!("worker-{:08x}", rand::random::<u32>()));
    if config.worker_id.is_none() {
        warn!(
            consumer,
            "no GEOPUSH_WORKER_ID: webhook consumer has a random name; give each replica a stable one (e.g. the pod name)"
        );
    }
    let mut webhook_config = webhooks::WebhookConfig::new(
        hooks.webhook_urls.clone(),
        hooks
            .webhook_secret
            .as_ref()
            .map(|s| s.expose().as_bytes().to_vec())
            .unwrap_or_default(),
        consumer,
    );
    webhook_config.max_attempts = hooks.webhook_max_attempts;
    webhook_config.backoff_base = Duration::from_millis(hooks.webhook_backoff_base_ms);
    webhook_config.backoff_max = Duration::from_millis(hooks.webhook_backoff_max_ms);
    webhook_config.request_timeout = Duration::from_secs_f64(hooks.webhook_timeout_seconds);
    webhook_config.batch = hooks.webhook_batch;
    webhook_config.concurrency = hooks.webhook_concurrency;
    webhook_config.claim_idle = Duration::from_secs_f64(hooks.webhook_claim_idle_seconds);
    webhook_config.validate()?;
    Ok(Some(webhook_config))
}

impl Worker {
    /// Validate the configuration and connect to Redis.
    pub async fn start(config: WorkerConfig) -> Result<Worker, WorkerError> {
        config.validate()?;
        let webhooks = webhook_config(&config)?;
        let target = RedisTarget::parse(config.redis()?, config.redis_cluster);
        let keys = Keys::new(config.redis_prefix.clone());
        let publisher = Publisher::connect_with_status_retention(
            &target,
            &config.redis_prefix,
            config.inbox_len,
            config.api.status_retention(),
        )
        .await?;
        let store = PlacesStore::connect(&target, &config.redis_prefix).await?;
        let places_conn = connect(&target, None).await?;
        let check_conn = connect(&target, None).await?;
        let auth = ApiAuth::new(
            config.api.api_keys.as_ref().map(|k| k.expose()),
            TokenVerifier::from_config(&config.tokens)?,
        )?;
        let mut registry = Registry::default();
        let api_metrics = ApiMetrics::default();
        api_metrics.register(&mut registry);
        let webhook_metrics = webhooks::WebhookMetrics::default();
        webhook_metrics.register(&mut registry);
        let places = Arc::new(WorkerPlaces {
            replica: PlacesReplica::new(),
            loaded: AtomicBool::new(false),
            count: Gauge::default(),
        });
        registry.register(
            "geopush_places",
            "Places in this worker's replica",
            places.count.clone(),
        );
        let redis_gauge = Gauge::default();
        registry.register(
            "geopush_bus_up",
            "1 when Redis answers",
            redis_gauge.clone(),
        );
        let api = Api::new(
            publisher,
            places.clone(),
            Some(store),
            auth,
            config.api.clone(),
            api_metrics,
        );
        Ok(Worker {
            state: Arc::new(State {
                config,
                api,
                places,
                registry,
                redis_up: AtomicBool::new(true),
                redis_gauge,
                webhook_metrics,
            }),
            target,
            keys,
            places_conn,
            check_conn,
            webhooks,
        })
    }

    /// The publisher this worker sends with.
    pub fn publisher(&self) -> &Publisher {
        self.state.api.publisher()
    }

    /// Ready: Redis answers and the places snapshot is loaded.
    pub fn is_ready(&self) -> bool {
        self.state.redis_up.load(Ordering::Acquire)
            && self.state.places.loaded.load(Ordering::Acquire)
    }

    /// Serve on `listener` until `shutdown` resolves.
    pub async fn serve(&self, listener: TcpListener, shutdown: impl Future<Output = ()>) {
        let state = &self.state;
        let tasks = TaskTracker::new();
        let stop = CancellationToken::new();
        let addr = listener
            .local_addr()
            .map(|a| a.to_string())
            .unwrap_or_default();
        info!(addr = %addr, "worker listening");
        tasks.spawn(run_places_sync(
            state.places.clone(),
            self.places_conn.clone(),
            self.keys.clone(),
            stop.clone(),
        ));
        tasks.spawn(run_scheduler(
            self.publisher().clone(),
            state.config.api.schedule_poll(),
            state.config.api.schedule_lease(),
            stop.clone(),
        ));
        tasks.spawn(check_redis(
            state.clone(),
            self.check_conn.clone(),
            stop.clone(),
        ));
        if let Some(webhook_config) = self.webhooks.clone() {
            let run = webhooks::run_webhooks(
                self.target.clone(),
                self.keys.clone(),
                webhook_config,
                state.webhook_metrics.clone(),
                stop.clone(),
            );
            tasks.spawn(async move {
                if let Err(e) = run.await {
                    warn!(error = %e, "webhook dispatcher stopped");
                }
            });
        }
        let stop_accepting = CancellationToken::new();
        let connections = TaskTracker::new();
        let accept = tasks.spawn(accept_loop(
            state.clone(),
            listener,
            connections.clone(),
            stop_accepting.clone(),
            stop.clone(),
        ));
        shutdown.await;
        info!("shutdown requested");
        stop_accepting.cancel();
        let _ = accept.await;
        connections.close();
        // Connections finish the request they are in (graceful), within the grace period.
        stop.cancel();
        let grace = state.config.shutdown_grace();
        if tokio::time::timeout(grace, connections.wait())
            .await
            .is_err()
        {
            warn!("requests still running after the grace period; abandoning them");
        }
        tasks.close();
        if tokio::time::timeout(grace, tasks.wait()).await.is_err() {
            warn!("tasks still running after the grace period");
        }
        info!("worker stopped");
    }
}

/// Keep `redis_up` current for readiness and the metric.
async fn check_redis(state: Arc<State>, mut conn: Conn, stop: CancellationToken) {
    loop {
        let command = redis::cmd("PING");
        let ping = command.query_async::<String>(&mut conn);
        let up = tokio::select! {
            result = tokio::time::timeout(REDIS_CHECK_INTERVAL, ping) => matches!(result, Ok(Ok(_))),
            () = stop.cancelled() => return,
        };
        if up != state.redis_up.swap(up, Ordering::AcqRel) {
            if up {
                info!("Redis answers again");
            } else {
                warn!("Redis does not answer; not ready");
            }
        }
        state.redis_gauge.set(i64::from(up));
        tokio::select! {
            () = tokio::time::sleep(REDIS_CHECK_INTERVAL) => {}
            () = stop.cancelled() => return,
        }
    }
}

type Body = Full<Bytes>;

fn plain(status: StatusCode, content_type: &'static str, body: String) -> Response<Body> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    if let Ok(value) = http::HeaderValue::from_str(content_type) {
        response.headers_mut().insert(header::CONTENT_TYPE, value);
    }
    response
}

async fn route(state: Arc<State>, request: Request<Incoming>) -> Response<Body> {
    match (request.method(), request.uri().path()) {
        (&Method::GET, "/healthz") => plain(StatusCode::OK, "text/plain", "ok\n".into()),
        (&Method::GET, "/readyz") => {
            let ready = state.redis_up.load(Ordering::Acquire)
                && state.places.loaded.load(Ordering::Acquire);
            if ready {
                plain(StatusCode::OK, "text/plain", "ready\n".into())
            } else {
                plain(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "text/plain",
                    "not ready: waiting for Redis or the places\n".into(),
                )
            }
        }
        (&Method::GET, "/metrics") => {
            let mut text = String::new();
            if let Err(e) = prometheus_client::encoding::text::encode(&mut text, &state.registry) {
                return ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string())
                    .into_response();
            }
            plain(
                StatusCode::OK,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
                text,
            )
        }
        (_, "/healthz" | "/readyz" | "/metrics") => ApiError::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            "use GET",
        )
        .into_response(),
        _ => state.api.handle(request).await,
    }
}

async fn serve_connection(state: Arc<State>, stream: TcpStream, stop: CancellationToken) {
    let service = service_fn({
        let state = state.clone();
        move |request| {
            let state = state.clone();
            async move { Ok::<_, std::convert::Infallible>(route(state, request).await) }
        }
    });
    let connection = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(state.config.handshake_timeout())
        .serve_connection(TokioIo::new(stream), service);
    tokio::pin!(connection);
    tokio::select! {
        result = connection.as_mut() => {
            if let Err(e) = result {
                debug!(error = %e, "http connection ended with an error");
            }
        }
        () = stop.cancelled() => {
            connection.as_mut().graceful_shutdown();
            let _ = tokio::time::timeout(state.config.shutdown_grace(), connection).await;
        }
    }
}

async fn accept_loop(
    state: Arc<State>,
    listener: TcpListener,
    connections: TaskTracker,
    stop_accepting: CancellationToken,
    stop: CancellationToken,
) {
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = stop_accepting.cancelled() => return,
        };
        match accepted {
            Ok((stream, _)) => {
                let _ = stream.set_nodelay(true);
                connections.spawn(serve_connection(state.clone(), stream, stop.clone()));
            }
            Err(e) => {
                warn!(error = %e, "accept failed");
                tokio::select! {
                    () = tokio::time::sleep(Duration::from_millis(50)) => {}
                    () = stop_accepting.cancelled() => return,
                }
            }
        }
    }
}
