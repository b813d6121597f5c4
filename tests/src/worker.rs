//! `TestWorker`: the worker library served in-process on `127.0.0.1:0` against a test's
//! Redis, and [`ApiClient`]: JSON calls to the backend API of a worker or of a single-node
//! gateway (the same routes), with a bearer key.
//!
//! A worker connects to Redis in [`TestWorker::start`] and is ready for traffic once
//! [`TestWorker::wait_ready`] saw `/readyz` answer 200 (Redis answers and the places
//! snapshot is loaded). [`TestWorker::stop`] resolves the shutdown future and waits for
//! `serve` to return, so a test can stop a worker and start another on the same Redis.
//! Dropping one triggers the same shutdown without waiting for it: its scheduler and places
//! follower stop on their own instead of outliving the test's intent.

use crate::http::{HttpResponse, request_with_body};
use crate::{READ_TIMEOUT, WAIT_TIMEOUT};
use anyhow::{Context, bail, ensure};
use geopush_gateway::api::keys::hash_key;
use geopush_gateway::config::Secret;
use geopush_worker::config::{LogFormat, WebhookSettings};
use geopush_worker::{Worker, WorkerConfig};
use serde_json::Value;
use std::net::SocketAddr;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// A key with the `admin` scope (everything); what [`TestWorker::api`] sends.
pub const ADMIN_KEY: &str = "test-admin-key-0123456789";
/// A key with only the `publish` scope.
pub const PUBLISH_KEY: &str = "test-publish-key-0123456789";
/// A key with only the `places` scope.
pub const PLACES_KEY: &str = "test-places-key-0123456789";

/// The `api_keys` entries of [`ADMIN_KEY`], [`PUBLISH_KEY`] and [`PLACES_KEY`], as an
/// operator writes them: names, SHA-256 hashes, scopes.
pub fn test_api_keys() -> String {
    format!(
        "admin:{}:admin,publisher:{}:publish,places:{}:places",
        hash_key(ADMIN_KEY),
        hash_key(PUBLISH_KEY),
        hash_key(PLACES_KEY)
    )
}

/// The configuration tests start a worker from: the gateway's token and API groups with
/// their defaults (the same clap attributes, through [`crate::test_config`], so the test
/// token secret verifies service tokens), the test API keys, no webhooks, a short shutdown
/// grace, and the worker's own documented defaults for the rest. (Built field by field
/// because clap is not a dependency of this crate.)
pub fn worker_config(redis_url: &str) -> WorkerConfig {
    let gateway = crate::test_config();
    let mut api = gateway.api;
    api.api_keys = Some(Secret::new(test_api_keys()));
    WorkerConfig {
        listen: SocketAddr::from(([127, 0, 0, 1], 0)),
        redis_url: Some(redis_url.into()),
        redis_cluster: false,
        redis_prefix: crate::fleet::PREFIX.to_owned(),
        inbox_len: gateway.inbox_len,
        worker_id: None,
        tokens: gateway.tokens,
        api,
        webhooks: WebhookSettings {
            webhook_urls: Vec::new(),
            webhook_secret: None,
            webhook_max_attempts: 8,
            webhook_backoff_base_ms: 500,
            webhook_backoff_max_ms: 60_000,
            webhook_timeout_seconds: 10.0,
            webhook_batch: 64,
            webhook_concurrency: 16,
            webhook_claim_idle_seconds: 60.0,
        },
        handshake_timeout_seconds: 10.0,
        shutdown_grace_seconds: 1.0,
        log_format: LogFormat::Auto,
    }
}

/// A worker serving on a loopback port chosen by the kernel.
pub struct TestWorker {
    worker: Worker,
    addr: SocketAddr,
    shutdown: Option<oneshot::Sender<()>>,
    serve: Option<JoinHandle<()>>,
}

impl TestWorker {
    /// [`worker_config`] for `redis_url`, connected and serving.
    pub async fn start(redis_url: &str) -> anyhow::Result<TestWorker> {
        TestWorker::start_with(redis_url, |_| {}).await
    }

    /// Like [`TestWorker::start`], with the configuration changed by `adjust`.
    pub async fn start_with(
        redis_url: &str,
        adjust: impl FnOnce(&mut WorkerConfig),
    ) -> anyhow::Result<TestWorker> {
        let mut config = worker_config(redis_url);
        adjust(&mut config);
        TestWorker::start_config(config).await
    }

    /// Connect with `config` (its `listen` is ignored), bind `127.0.0.1:0` and serve.
    pub async fn start_config(config: WorkerConfig) -> anyhow::Result<TestWorker> {
        let worker = Worker::start(config)
            .await
            .context("starting a worker with Redis")?;
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .context("binding 127.0.0.1:0")?;
        let addr = listener.local_addr().context("local addr")?;
        let (trigger, triggered) = oneshot::channel::<()>();
        let serving = worker.clone();
        let serve = tokio::spawn(async move {
            serving
                .serve(listener, async move {
                    // A dropped trigger also means "stop".
                    let _ = triggered.await;
                })
                .await;
        });
        Ok(TestWorker {
            worker,
            addr,
            shutdown: Some(trigger),
            serve: Some(serve),
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn worker(&self) -> &Worker {
        &self.worker
    }

    /// The API of this worker with [`ADMIN_KEY`].
    pub fn api(&self) -> ApiClient {
        ApiClient::new(self.addr, Some(ADMIN_KEY))
    }

    /// The API of this worker with another credential (`None`: no `Authorization`).
    pub fn api_as(&self, bearer: Option<&str>) -> ApiClient {
        ApiClient::new(self.addr, bearer)
    }

    /// Wait until `GET /readyz` answers 200.
    pub async fn wait_ready(&self) -> anyhow::Result<()> {
        let addr = self.addr;
        crate::wait::eventually_async(
            &format!("worker {addr} /readyz to answer 200"),
            WAIT_TIMEOUT,
            || async move {
                matches!(crate::http::get(addr, "/readyz").await, Ok(r) if r.status == 200)
            },
        )
        .await
    }

    /// The worker's metrics over HTTP, parsed and validated.
    pub async fn metrics(&self) -> anyhow::Result<crate::prom::Exposition> {
        let response = crate::http::get(self.addr, "/metrics").await?;
        ensure!(
            response.status == 200,
            "/metrics answered {}",
            response.status
        );
        crate::prom::Exposition::parse(&response.text())
    }

    /// Trigger the shutdown and wait for `serve` to return (its scheduler, places follower
    /// and connections are stopped by then).
    pub async fn stop(mut self) -> anyhow::Result<()> {
        if let Some(trigger) = self.shutdown.take() {
            let _ = trigger.send(());
        }
        let Some(serve) = self.serve.take() else {
            return Ok(());
        };
        // Grace for the connections + grace for the tasks, and some margin.
        let bound = Duration::from_secs(10);
        match tokio::time::timeout(bound, serve).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => bail!("worker serve task failed: {e}"),
            Err(_) => bail!("worker serve did not return within {bound:?} of the shutdown"),
        }
    }
}

impl Drop for TestWorker {
    fn drop(&mut self) {
        // `serve` stops its tasks and returns by itself; aborting it instead would leave
        // them (the scheduler among them) running until the runtime ends.
        if let Some(trigger) = self.shutdown.take() {
            let _ = trigger.send(());
        }
    }
}

/// JSON calls to the backend API at `addr` with a bearer credential (an API key or a
/// service token). Every call has a new connection.
#[derive(Clone, Debug)]
pub struct ApiClient {
    addr: SocketAddr,
    bearer: Option<String>,
}

/// How long an API answer may take to begin: generous for a loaded 2-core machine.
const ANSWER_WITHIN: Duration = READ_TIMEOUT;

impl ApiClient {
    pub fn new(addr: SocketAddr, bearer: Option<&str>) -> ApiClient {
        ApiClient {
            addr,
            bearer: bearer.map(str::to_owned),
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Any request: `body` with its content type, answered within `within`.
    pub async fn call(
        &self,
        method: &str,
        path: &str,
        body: Option<(&str, &[u8])>,
        within: Duration,
    ) -> anyhow::Result<HttpResponse> {
        let authorization = self.bearer.as_ref().map(|b| format!("Bearer {b}"));
        let mut headers = Vec::new();
        if let Some(value) = &authorization {
            headers.push(("Authorization", value.as_str()));
        }
        let bytes = match body {
            Some((content_type, bytes)) => {
                headers.push(("Content-Type", content_type));
                bytes
            }
            None => &[],
        };
        request_with_body(self.addr, method, path, &headers, bytes, within)
            .await
            .with_context(|| format!("{method} {path}"))
    }

    /// `POST` a JSON body.
    pub async fn post(&self, path: &str, body: &Value) -> anyhow::Result<HttpResponse> {
        self.post_text(path, &body.to_string()).await
    }

    /// `POST` text as JSON (for bodies that are not valid JSON on purpose).
    pub async fn post_text(&self, path: &str, body: &str) -> anyhow::Result<HttpResponse> {
        self.call(
            "POST",
            path,
            Some(("application/json", body.as_bytes())),
            ANSWER_WITHIN,
        )
        .await
    }

    pub async fn get(&self, path: &str) -> anyhow::Result<HttpResponse> {
        self.call("GET", path, None, ANSWER_WITHIN).await
    }

    pub async fn put(&self, path: &str, body: &Value) -> anyhow::Result<HttpResponse> {
        self.call(
            "PUT",
            path,
            Some(("application/json", body.to_string().as_bytes())),
            ANSWER_WITHIN,
        )
        .await
    }

    pub async fn delete(&self, path: &str) -> anyhow::Result<HttpResponse> {
        self.call("DELETE", path, None, ANSWER_WITHIN).await
    }

    /// `POST /v1/places:import` with `content_type`, answered within `within`.
    pub async fn import(
        &self,
        content_type: &str,
        body: &[u8],
        within: Duration,
    ) -> anyhow::Result<HttpResponse> {
        self.call(
            "POST",
            "/v1/places:import",
            Some((content_type, body)),
            within,
        )
        .await
    }

    /// `POST /v1/notifications`, which must answer 202; the accepted body (`id`, and
    /// `send_at` when scheduled).
    pub async fn publish(&self, request: &Value) -> anyhow::Result<Value> {
        let response = self.post("/v1/notifications", request).await?;
        ensure!(
            response.status == 202,
            "publishing {request} answered {}: {}",
            response.status,
            response.text()
        );
        let accepted = response.json()?;
        ensure!(
            accepted["id"].as_str().is_some_and(|id| !id.is_empty()),
            "202 without an id: {accepted}"
        );
        Ok(accepted)
    }

    /// [`ApiClient::publish`], returning the id.
    pub async fn publish_id(&self, request: &Value) -> anyhow::Result<String> {
        let accepted = self.publish(request).await?;
        Ok(accepted["id"].as_str().unwrap_or_default().to_owned())
    }

    /// `GET /v1/notifications/{id}`, which must answer 200.
    pub async fn status(&self, id: &str) -> anyhow::Result<Value> {
        let response = self.get(&format!("/v1/notifications/{id}")).await?;
        ensure!(
            response.status == 200,
            "status of {id} answered {}: {}",
            response.status,
            response.text()
        );
        response.json()
    }

    /// Poll the status of `id` until `check` holds; the error shows the last status seen.
    pub async fn wait_status(
        &self,
        id: &str,
        what: &str,
        check: impl Fn(&Value) -> bool,
    ) -> anyhow::Result<Value> {
        let deadline = tokio::time::Instant::now() + WAIT_TIMEOUT;
        loop {
            let status = self.status(id).await?;
            if check(&status) {
                return Ok(status);
            }
            if tokio::time::Instant::now() >= deadline {
                bail!("after {WAIT_TIMEOUT:?}, the status of {id} is not {what}: {status}");
            }
            tokio::time::sleep(crate::wait::POLL_INTERVAL).await;
        }
    }
}

/// The `error.code` of an API error answer (empty when the body is not one).
pub fn error_code(response: &HttpResponse) -> String {
    response
        .json()
        .ok()
        .and_then(|v| v["error"]["code"].as_str().map(str::to_owned))
        .unwrap_or_default()
}

/// Whether a status body shows these `targeted`, `delivered` and `acked` counts.
pub fn counts_are(status: &Value, targeted: u64, delivered: u64, acked: u64) -> bool {
    status["targeted"] == targeted && status["delivered"] == delivered && status["acked"] == acked
}
