//! `TestGateway`: the gateway library served in-process on `127.0.0.1:0`.
//!
//! It holds the shutdown trigger and the serve task; [`TestGateway::shutdown`] drains and
//! waits for `serve` to return, and dropping it triggers the shutdown without waiting.
//!
//! A node of a Redis-backed fleet starts with [`TestGateway::start_redis`] (it connects to
//! Redis first, as `Gateway::start` does) from a [`redis_config`], and is ready for traffic
//! once [`TestGateway::wait_ready`] saw `/readyz` answer 200.

use crate::prom::Exposition;
use crate::tokens::TEST_SECRET;
use anyhow::{Context, bail};
use geopush_gateway::config::{Config, Secret};
use geopush_gateway::{Gateway, Hub};
use std::net::SocketAddr;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// The configuration tests start from: the defaults, the test HMAC secret, and a short
/// drain so that shutting a test gateway down is quick.
pub fn test_config() -> Config {
    let mut config = Config::defaults();
    config.tokens.jwt_secret = Some(Secret::new(TEST_SECRET));
    config.node_id = Some("test-node".into());
    config.drain_seconds = 0.2;
    config.shutdown_grace_seconds = 1.0;
    config
}

/// [`test_config`] for a node of a fleet sharing `redis_url` (one URL, or a cluster's seeds
/// separated by commas): its own `node_id` (probe channels are per node), a short
/// subscription linger so that tests see channels released, and a quick bus probe so that
/// outages are noticed within about a second.
pub fn redis_config(redis_url: &str, cluster: bool, node_id: &str) -> Config {
    let mut config = test_config();
    config.redis_url = Some(redis_url.into());
    config.redis_cluster = cluster;
    config.node_id = Some(node_id.to_owned());
    config.subscription_linger_seconds = 0.3;
    config.bus_probe_seconds = 0.5;
    config.bus_probe_timeout_seconds = 1.0;
    config
}

/// A gateway serving on a loopback port chosen by the kernel.
pub struct TestGateway {
    gateway: Gateway,
    addr: SocketAddr,
    shutdown: Option<oneshot::Sender<()>>,
    serve: Option<JoinHandle<()>>,
}

impl TestGateway {
    /// Validate `config`, bind `127.0.0.1:0` and serve (its `listen` field is ignored).
    pub async fn start(config: Config) -> anyhow::Result<TestGateway> {
        let gateway = Gateway::new(config).context("gateway configuration")?;
        TestGateway::serve(gateway).await
    }

    /// Like [`TestGateway::start`] for a `config` that may name a Redis URL: connects to
    /// Redis first (`Gateway::start`). The node is not ready before its bus is subscribed:
    /// see [`TestGateway::wait_ready`].
    pub async fn start_redis(config: Config) -> anyhow::Result<TestGateway> {
        let gateway = Gateway::start(config)
            .await
            .context("starting a gateway with Redis")?;
        TestGateway::serve(gateway).await
    }

    async fn serve(gateway: Gateway) -> anyhow::Result<TestGateway> {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .context("binding 127.0.0.1:0")?;
        let addr = listener.local_addr().context("local addr")?;
        let (trigger, triggered) = oneshot::channel::<()>();
        let serving = gateway.clone();
        let serve = tokio::spawn(async move {
            serving
                .serve(listener, async move {
                    // A dropped trigger also means "stop".
                    let _ = triggered.await;
                })
                .await;
        });
        Ok(TestGateway {
            gateway,
            addr,
            shutdown: Some(trigger),
            serve: Some(serve),
        })
    }

    /// Start with [`test_config`] changed by `adjust`.
    pub async fn start_with(adjust: impl FnOnce(&mut Config)) -> anyhow::Result<TestGateway> {
        let mut config = test_config();
        adjust(&mut config);
        TestGateway::start(config).await
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The status of `GET /readyz` over HTTP.
    pub async fn readyz(&self) -> anyhow::Result<u16> {
        Ok(crate::http::get(self.addr, "/readyz").await?.status)
    }

    /// Wait until `GET /readyz` answers 200 (with Redis: the bus subscribed its probe
    /// channel and the probe came back).
    pub async fn wait_ready(&self) -> anyhow::Result<()> {
        let addr = self.addr;
        crate::wait::eventually_async(
            &format!("{addr} /readyz to answer 200"),
            crate::WAIT_TIMEOUT,
            || async move {
                matches!(crate::http::get(addr, "/readyz").await, Ok(r) if r.status == 200)
            },
        )
        .await
    }

    pub fn gateway(&self) -> &Gateway {
        &self.gateway
    }

    pub fn hub(&self) -> &Hub {
        self.gateway.hub()
    }

    /// The node's metrics, parsed and validated (from the library, not over HTTP).
    pub fn metrics(&self) -> anyhow::Result<Exposition> {
        Exposition::parse(&self.gateway.metrics_text())
    }

    /// Parsed metrics, panicking with the parse error: for polling closures in tests.
    pub fn metric(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        match self.metrics() {
            Ok(m) => m.value(name, labels),
            Err(e) => panic!("metrics do not parse: {e:#}"),
        }
    }

    /// Trigger the shutdown (drain) and wait for `serve` to return.
    pub async fn shutdown(mut self) -> anyhow::Result<()> {
        if let Some(trigger) = self.shutdown.take() {
            let _ = trigger.send(());
        }
        let Some(serve) = self.serve.take() else {
            return Ok(());
        };
        // Drain window + grace for the sessions + grace for the tasks, and some margin.
        let bound = Duration::from_secs(10);
        match tokio::time::timeout(bound, serve).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => bail!("serve task failed: {e}"),
            Err(_) => bail!("serve did not return within {bound:?} of the shutdown"),
        }
    }
}

impl Drop for TestGateway {
    fn drop(&mut self) {
        if let Some(trigger) = self.shutdown.take() {
            let _ = trigger.send(());
        }
        // The runtime of the test ends with it; nothing waits for the drain here.
        if let Some(serve) = self.serve.take() {
            serve.abort();
        }
    }
}
