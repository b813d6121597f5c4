//! The `notify` scenario: end-to-end delivery of user notifications through Redis.
//!
//! N clients (one user each) connect to one or more gateways that share a Redis; a
//! publisher in this process ([`Publisher::connect`], the same code the worker uses)
//! publishes user notifications at a fixed rate to random users, each carrying its send time
//! in `data` (`{"sent_us": <unix µs>}`). Every client acks what it receives and records
//! publish → socket latency in one HDR histogram (same machine, same clock). The report
//! gives the latency percentiles, delivered vs expected with loss and duplicates apart
//! (deduplicated by notification id), the CPU and RSS of every gateway and of Redis (from
//! `/proc`), the client's own CPU with the publisher's thread apart, and the Redis work per
//! delivered notification (`INFO commandstats` and `INFO stats` before and after).
//!
//! A separate `churn` phase first connects and disconnects K other clients and reads the
//! `SUBSCRIBE`/`UNSUBSCRIBE` calls that cost, waiting past the gateways' subscription linger.
//!
//! The publisher runs on a runtime of its own in its own thread, so its CPU is read apart
//! from the clients' (`/proc/self/task/TID/stat`).

use crate::net::{self, Target, Ws};
use crate::procfs::{self, CpuTime, Memory};
use crate::report::Latency;
use crate::sender::{PublishVia, Sender};
use anyhow::{Context, bail};
use futures_util::{SinkExt, StreamExt};
use geopush_proto::api::{NotificationRequest, PublishTarget};
use hdrhistogram::Histogram;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::sync::Semaphore;
use tokio::time::{Instant, MissedTickBehavior, sleep, sleep_until, timeout};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Bound on one client's TCP connect + upgrade + `welcome`.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Bound on closing the clients at the end.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(3);
/// Bound on one Redis `INFO`.
const INFO_TIMEOUT: Duration = Duration::from_secs(5);
/// Most handshakes in flight at once.
const HANDSHAKE_CONCURRENCY: usize = 200;
/// Largest latency the histogram holds (larger values are clamped to it), µs.
const MAX_LATENCY_US: u64 = 60_000_000;
/// Inbox TTL of the published notifications: long enough for the run, short enough that
/// Redis does not keep them.
const NOTIFICATION_TTL_S: u64 = 120;

/// `geopush-loadtest notify` flags.
#[derive(Clone, Debug, clap::Args)]
pub struct NotifyArgs {
    /// Gateway WebSocket URLs, comma-separated; clients are spread over them in turn.
    #[arg(
        long,
        env = "GEOPUSH_LOADTEST_URL",
        value_delimiter = ',',
        default_value = "ws://127.0.0.1:8080/v1/ws"
    )]
    pub url: Vec<String>,
    /// The gateways' HS256 secret (their --jwt-secret).
    #[arg(long, env = "GEOPUSH_JWT_SECRET")]
    pub secret: String,
    /// The Redis the gateways use (one server; the publisher and the stats read it).
    #[arg(long, env = "GEOPUSH_REDIS_URL")]
    pub redis_url: String,
    /// The gateways' --redis-prefix.
    #[arg(long, env = "GEOPUSH_REDIS_PREFIX", default_value = "gp:")]
    pub redis_prefix: String,
    /// Connected clients, each a distinct user.
    #[arg(long, default_value_t = 100)]
    pub users: usize,
    /// User notifications published per second.
    #[arg(long, default_value_t = 1_000.0)]
    pub rate: f64,
    /// Seconds of publishing.
    #[arg(long, default_value_t = 10.0)]
    pub seconds: f64,
    /// Most publishes in flight at once (they share one multiplexed Redis connection, or
    /// with --worker-url a pool of HTTP connections).
    #[arg(long, default_value_t = 64)]
    pub publishers: usize,
    /// Publish through a worker's `POST /v1/notifications` at this base URL (e.g.
    /// `http://127.0.0.1:8081`) instead of the publisher library in this process: the
    /// latency then includes the worker.
    #[arg(long)]
    pub worker_url: Option<String>,
    /// The API key sent to the worker.
    #[arg(long, env = "GEOPUSH_API_KEY", default_value = geopush_gateway::config::DEV_API_KEY)]
    pub api_key: String,
    /// New client connections per second.
    #[arg(long, default_value_t = 2_000.0)]
    pub connect_rate: f64,
    /// Seconds between the last `welcome` and the first publish (subscriptions settle).
    #[arg(long, default_value_t = 1.0)]
    pub settle_seconds: f64,
    /// Longest wait for outstanding deliveries after the last publish, seconds.
    #[arg(long, default_value_t = 3.0)]
    pub drain_seconds: f64,
    /// Clients to connect and disconnect first, counting SUBSCRIBE/UNSUBSCRIBE (0: skip).
    #[arg(long, default_value_t = 0)]
    pub churn: usize,
    /// The gateways' --subscription-linger-seconds; the churn phase waits past it.
    #[arg(long, default_value_t = 2.0)]
    pub linger_seconds: f64,
    /// Gateway process ids (comma-separated, in --url order) for CPU and RSS.
    #[arg(long, value_delimiter = ',')]
    pub gateway_pid: Vec<u32>,
    /// Users are `{prefix}-{i}` (distinct prefixes for runs against the same Redis).
    #[arg(long, default_value = "notify")]
    pub sub_prefix: String,
    /// Spread clients over this many loopback source addresses (127.0.0.1, .2, …).
    #[arg(long, default_value_t = 1)]
    pub source_ips: u8,
    /// Worker threads of the clients' runtime (1 = single-threaded); the publisher has a
    /// thread of its own besides.
    #[arg(long, default_value_t = 1)]
    pub threads: usize,
    /// Seed of the publisher's choice of users.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Write the report as JSON to this file.
    #[arg(long)]
    pub json_report: Option<PathBuf>,
    /// No progress lines.
    #[arg(long, short = 'q')]
    pub quiet: bool,
}

impl NotifyArgs {
    /// Defaults for everything but the targets and the secret (tests, tools).
    pub fn new(urls: Vec<String>, secret: &str, redis_url: &str) -> NotifyArgs {
        NotifyArgs {
            url: urls,
            secret: secret.into(),
            redis_url: redis_url.into(),
            redis_prefix: "gp:".into(),
            users: 100,
            rate: 1_000.0,
            seconds: 10.0,
            publishers: 64,
            worker_url: None,
            api_key: geopush_gateway::config::DEV_API_KEY.into(),
            connect_rate: 2_000.0,
            settle_seconds: 1.0,
            drain_seconds: 3.0,
            churn: 0,
            linger_seconds: 2.0,
            gateway_pid: Vec::new(),
            sub_prefix: "notify".into(),
            source_ips: 1,
            threads: 1,
            seed: 1,
            json_report: None,
            quiet: true,
        }
    }

    /// Check every value; a run refuses to start on an error.
    pub fn validate(&self) -> anyhow::Result<()> {
        if self.url.is_empty() {
            bail!("--url needs at least one gateway");
        }
        if self.users == 0 {
            bail!("--users must be at least 1");
        }
        for (flag, value) in [
            ("--rate", self.rate),
            ("--seconds", self.seconds),
            ("--connect-rate", self.connect_rate),
        ] {
            if !(value.is_finite() && value > 0.0) {
                bail!("{flag} must be a positive number");
            }
        }
        for (flag, value) in [
            ("--settle-seconds", self.settle_seconds),
            ("--drain-seconds", self.drain_seconds),
            ("--linger-seconds", self.linger_seconds),
        ] {
            if !(value.is_finite() && (0.0..3_600.0).contains(&value)) {
                bail!("{flag} must be a number of seconds in 0..3600");
            }
        }
        if self.publishers == 0 || self.threads == 0 {
            bail!("--publishers and --threads must be at least 1");
        }
        if self.source_ips == 0 || self.source_ips > 250 {
            bail!("--source-ips must be in 1..=250");
        }
        if self.secret.is_empty() {
            bail!("--secret must not be empty");
        }
        if !self.gateway_pid.is_empty() && self.gateway_pid.len() != self.url.len() {
            bail!("--gateway-pid needs one PID per --url, in the same order");
        }
        if let Some(url) = &self.worker_url
            && !url.starts_with("http://")
        {
            bail!("--worker-url {url:?} must start with http://");
        }
        Ok(())
    }
}

fn unix_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

// ---------------------------------------------------------------------------------------
// Redis figures

/// What Redis says about itself at one moment.
#[derive(Clone, Debug, Default)]
struct RedisStats {
    /// `cmdstat_<name>` → calls.
    calls: BTreeMap<String, u64>,
    net_input_bytes: u64,
    net_output_bytes: u64,
    commands_processed: u64,
}

/// Parse `INFO commandstats` + `INFO stats` text.
fn parse_info(text: &str) -> RedisStats {
    let mut stats = RedisStats::default();
    for line in text.lines() {
        let Some((key, value)) = line.trim().split_once(':') else {
            continue;
        };
        if let Some(name) = key.strip_prefix("cmdstat_") {
            let calls = value
                .split(',')
                .find_map(|kv| kv.strip_prefix("calls="))
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
            stats.calls.insert(name.to_owned(), calls);
            continue;
        }
        let number = || value.trim().parse::<u64>().unwrap_or(0);
        match key {
            "total_net_input_bytes" => stats.net_input_bytes = number(),
            "total_net_output_bytes" => stats.net_output_bytes = number(),
            "total_commands_processed" => stats.commands_processed = number(),
            _ => {}
        }
    }
    stats
}

/// The work Redis did between two samples.
#[derive(Clone, Debug, Default, Serialize)]
pub struct RedisWork {
    /// Calls per command (only those that changed).
    pub calls: BTreeMap<String, u64>,
    pub commands: u64,
    pub net_input_bytes: u64,
    pub net_output_bytes: u64,
}

impl RedisWork {
    fn between(before: &RedisStats, after: &RedisStats) -> RedisWork {
        let calls = after
            .calls
            .iter()
            .filter_map(|(name, &n)| {
                let delta = n.saturating_sub(before.calls.get(name).copied().unwrap_or(0));
                (delta > 0).then(|| (name.clone(), delta))
            })
            .collect();
        RedisWork {
            calls,
            commands: after
                .commands_processed
                .saturating_sub(before.commands_processed),
            net_input_bytes: after.net_input_bytes.saturating_sub(before.net_input_bytes),
            net_output_bytes: after
                .net_output_bytes
                .saturating_sub(before.net_output_bytes),
        }
    }

    fn calls_of(&self, name: &str) -> u64 {
        self.calls.get(name).copied().unwrap_or(0)
    }
}

/// A plain connection for `INFO` (not counted apart: its own `INFO` calls show up as such).
struct RedisAdmin {
    conn: redis::aio::MultiplexedConnection,
}

impl RedisAdmin {
    async fn connect(url: &str) -> anyhow::Result<RedisAdmin> {
        let client = redis::Client::open(url).with_context(|| format!("--redis-url {url:?}"))?;
        let conn = timeout(INFO_TIMEOUT, client.get_multiplexed_async_connection())
            .await
            .with_context(|| format!("timed out connecting to {url}"))?
            .with_context(|| format!("connecting to {url}"))?;
        Ok(RedisAdmin { conn })
    }

    async fn info(&mut self, section: &str) -> anyhow::Result<String> {
        timeout(
            INFO_TIMEOUT,
            redis::cmd("INFO").arg(section).query_async(&mut self.conn),
        )
        .await
        .context("Redis INFO timed out")?
        .context("Redis INFO")
    }

    async fn stats(&mut self) -> anyhow::Result<RedisStats> {
        let commands = self.info("commandstats").await?;
        let stats = self.info("stats").await?;
        Ok(parse_info(&format!("{commands}\n{stats}")))
    }

    /// The server's PID (`INFO server` → `process_id`), to read its CPU on this machine.
    async fn pid(&mut self) -> Option<u32> {
        let text = self.info("server").await.ok()?;
        text.lines()
            .find_map(|l| l.trim().strip_prefix("process_id:"))
            .and_then(|v| v.parse().ok())
    }
}

// ---------------------------------------------------------------------------------------
// Clients

/// The part of a server frame a client reads.
#[derive(Deserialize)]
struct Frame<'a> {
    #[serde(rename = "type", borrow)]
    kind: std::borrow::Cow<'a, str>,
    #[serde(default)]
    id: Option<String>,
    #[serde(default)]
    data: Option<SentAt>,
    #[serde(default, borrow)]
    code: Option<std::borrow::Cow<'a, str>>,
}

#[derive(Deserialize)]
struct SentAt {
    sent_us: u64,
}

/// State every client shares.
struct Clients {
    targets: Vec<Target>,
    secret: String,
    source_ips: u8,
    ws_config: WebSocketConfig,
    /// Publish → socket latency, µs.
    latency: Mutex<Histogram<u64>>,
    /// Distinct notifications received, per gateway (in target order).
    delivered: Vec<AtomicU64>,
    duplicates: AtomicU64,
    /// Notifications without a readable `sent_us`.
    unstamped: AtomicU64,
    acks_sent: AtomicU64,
    connected: AtomicU64,
    failed: AtomicU64,
    dropped: AtomicU64,
    reasons: Mutex<BTreeMap<String, u64>>,
    server_errors: Mutex<BTreeMap<String, u64>>,
    stop: CancellationToken,
}

fn count(map: &Mutex<BTreeMap<String, u64>>, key: String) {
    let mut map = map.lock().unwrap_or_else(|p| p.into_inner());
    if map.len() < 32 || map.contains_key(&key) {
        *map.entry(key).or_default() += 1;
    } else {
        *map.entry("other".into()).or_default() += 1;
    }
}

impl Clients {
    fn new(targets: Vec<Target>, secret: &str, source_ips: u8) -> anyhow::Result<Clients> {
        let n = targets.len();
        Ok(Clients {
            targets,
            secret: secret.into(),
            source_ips,
            ws_config: net::client_ws_config(),
            latency: Mutex::new(
                Histogram::new_with_bounds(1, MAX_LATENCY_US, 3).context("histogram bounds")?,
            ),
            delivered: (0..n).map(|_| AtomicU64::new(0)).collect(),
            duplicates: AtomicU64::new(0),
            unstamped: AtomicU64::new(0),
            acks_sent: AtomicU64::new(0),
            connected: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
            reasons: Mutex::default(),
            server_errors: Mutex::default(),
            stop: CancellationToken::new(),
        })
    }

    fn delivered(&self) -> u64 {
        self.delivered
            .iter()
            .map(|d| d.load(Ordering::Relaxed))
            .sum()
    }

    /// TCP, upgrade with a fresh token for `sub`, wait for `welcome`.
    async fn open(&self, index: usize, sub: &str) -> Result<Ws, String> {
        let target = &self.targets[index % self.targets.len()];
        let token = geopush_gateway::auth::mint_hs256(&self.secret, sub, Some("load"), 3_600)
            .map_err(|e| format!("minting a token: {e}"))?;
        // Every client of one index range shares a source address; see `--source-ips`.
        let spread = usize::from(self.source_ips);
        let source =
            (spread > 1).then(|| net::source_address((index / self.targets.len()) % spread));
        net::open_session(target, &token, source, self.ws_config).await
    }

    /// Read until `stop`: record each notification, ack it. `Some(reason)` if lost first.
    async fn receive(&self, ws: &mut Ws, gateway: usize) -> Option<String> {
        let mut seen: HashSet<String> = HashSet::new();
        loop {
            let message = tokio::select! {
                biased;
                () = self.stop.cancelled() => return None,
                message = ws.next() => message,
            };
            let text = match message {
                Some(Ok(Message::Text(text))) => text,
                Some(Ok(Message::Close(frame))) => {
                    let code = frame.map(|f| u16::from(f.code)).unwrap_or(1005);
                    return Some(format!("closed by the gateway (code {code})"));
                }
                // tungstenite queues the pong and flushes it on the next read or send.
                Some(Ok(_)) => continue,
                Some(Err(e)) => return Some(format!("read: {e}")),
                None => return Some("connection ended".into()),
            };
            let received_us = unix_us();
            let Ok(frame) = serde_json::from_str::<Frame>(text.as_str()) else {
                continue;
            };
            match &*frame.kind {
                "notification" => {}
                "error" => {
                    count(
                        &self.server_errors,
                        frame.code.as_deref().unwrap_or("?").to_owned(),
                    );
                    continue;
                }
                _ => continue,
            }
            let Some(id) = frame.id else { continue };
            match frame.data {
                Some(SentAt { sent_us }) => {
                    let micros = received_us.saturating_sub(sent_us).clamp(1, MAX_LATENCY_US);
                    self.latency
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .saturating_record(micros);
                }
                None => {
                    self.unstamped.fetch_add(1, Ordering::Relaxed);
                }
            }
            let ack = format!(r#"{{"type":"ack","ids":["{id}"]}}"#);
            if seen.insert(id) {
                self.delivered[gateway].fetch_add(1, Ordering::Relaxed);
            } else {
                self.duplicates.fetch_add(1, Ordering::Relaxed);
            }
            if let Err(e) = ws.send(Message::text(ack)).await {
                return Some(format!("sending an ack: {e}"));
            }
            self.acks_sent.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Connect `subs` (client i to gateway i mod n) at `rate` per second; returns the sockets
/// that got their `welcome`, with their index. The first failure of client 0 fails the run.
async fn connect_all(
    clients: &Arc<Clients>,
    subs: &[String],
    rate: f64,
) -> anyhow::Result<Vec<(usize, Ws)>> {
    let first = clients.open(0, &subs[0]).await;
    let first = match first {
        Ok(ws) => ws,
        Err(reason) => {
            let hint = if reason.contains("401") {
                " (is --secret the gateways' --jwt-secret?)"
            } else {
                ""
            };
            bail!(
                "the first connection to {} failed: {reason}{hint}",
                clients.targets[0].url
            );
        }
    };
    let handshakes = Arc::new(Semaphore::new(HANDSHAKE_CONCURRENCY));
    let mut tasks = tokio::task::JoinSet::new();
    let start = Instant::now();
    for (index, sub) in subs.iter().enumerate().skip(1) {
        sleep_until(start + Duration::from_secs_f64(index as f64 / rate)).await;
        let permit = handshakes.clone().acquire_owned().await?;
        let clients = clients.clone();
        let sub = sub.clone();
        tasks.spawn(async move {
            let opened = timeout(CONNECT_TIMEOUT, clients.open(index, &sub)).await;
            drop(permit);
            match opened {
                Ok(Ok(ws)) => Some((index, ws)),
                Ok(Err(reason)) => {
                    clients.failed.fetch_add(1, Ordering::Relaxed);
                    count(&clients.reasons, reason);
                    None
                }
                Err(_) => {
                    clients.failed.fetch_add(1, Ordering::Relaxed);
                    count(&clients.reasons, "no welcome in time".into());
                    None
                }
            }
        });
    }
    let mut sockets = vec![(0, first)];
    while let Some(joined) = tasks.join_next().await {
        if let Some(socket) = joined.context("a connect task panicked")? {
            sockets.push(socket);
        }
    }
    clients
        .connected
        .fetch_add(sockets.len() as u64, Ordering::Relaxed);
    Ok(sockets)
}

/// Close sockets politely, bounded.
async fn close_all(sockets: Vec<(usize, Ws)>) {
    let mut tasks = tokio::task::JoinSet::new();
    for (_, mut ws) in sockets {
        tasks.spawn(async move {
            let _ = timeout(CLOSE_TIMEOUT, async {
                let _ = ws.close(Some(net::normal_close())).await;
                while let Some(Ok(_)) = ws.next().await {}
            })
            .await;
        });
    }
    while tasks.join_next().await.is_some() {}
}

// ---------------------------------------------------------------------------------------
// Publisher

/// What the publisher did.
#[derive(Clone, Debug, Default, Serialize)]
pub struct PublisherReport {
    /// Publishes that returned `Ok` (the notifications expected at the clients).
    pub published: u64,
    pub errors: u64,
    pub error_reasons: BTreeMap<String, u64>,
    /// Publishes asked for: rate × seconds.
    pub scheduled: u64,
    /// First to last publish, seconds.
    pub seconds: f64,
    /// `published / seconds`.
    pub rate_per_s: f64,
    /// Latest a publish started after its scheduled time, ms (the publisher falling behind).
    pub max_lag_ms: f64,
    /// Duration of one `publish` call (XADD pipeline + PUBLISH: two Redis round trips).
    pub call_latency: Latency,
    /// CPU of the publisher's thread.
    pub cpu: CpuTime,
}

/// Publish `rate` × `seconds` user notifications to random users of `users`, at most
/// `in_flight` at once, on a runtime of its own in a thread of its own.
fn spawn_publisher(
    args: &NotifyArgs,
    users: Vec<String>,
    go: std::sync::mpsc::Receiver<()>,
) -> std::thread::JoinHandle<anyhow::Result<PublisherReport>> {
    let via = match &args.worker_url {
        Some(base) => PublishVia::Api {
            base: base.clone(),
            api_key: args.api_key.clone(),
        },
        None => PublishVia::Redis {
            url: args.redis_url.clone(),
            prefix: args.redis_prefix.clone(),
        },
    };
    let (rate, seconds, in_flight, seed) = (args.rate, args.seconds, args.publishers, args.seed);
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("starting the publisher's runtime")?;
        let tid = procfs::thread_id();
        runtime.block_on(async move {
            let publisher = Sender::connect(&via, in_flight).await?;
            // Wait for the clients (the receiver ends if they failed).
            if go.recv().is_err() {
                return Ok(PublisherReport::default());
            }
            let cpu_start = procfs::thread_cpu(tid);
            let total = (rate * seconds).round() as u64;
            let slots = Arc::new(Semaphore::new(in_flight));
            let published = Arc::new(AtomicU64::new(0));
            let errors = Arc::new(Mutex::new(BTreeMap::<String, u64>::new()));
            let calls = Arc::new(Mutex::new(Histogram::<u64>::new_with_bounds(
                1,
                MAX_LATENCY_US,
                3,
            )?));
            let mut rng = StdRng::seed_from_u64(seed);
            let tracker = TaskTracker::new();
            let mut ticker = tokio::time::interval(Duration::from_millis(1));
            ticker.set_missed_tick_behavior(MissedTickBehavior::Skip);
            let start = Instant::now();
            let mut sent = 0u64;
            let mut max_lag = Duration::ZERO;
            while sent < total {
                ticker.tick().await;
                let due = ((start.elapsed().as_secs_f64() * rate) as u64 + 1).min(total);
                while sent < due {
                    let permit = slots.clone().acquire_owned().await?;
                    let scheduled = start + Duration::from_secs_f64(sent as f64 / rate);
                    max_lag = max_lag.max(Instant::now().saturating_duration_since(scheduled));
                    let user = users[rng.gen_range(0..users.len())].clone();
                    let (publisher, published, errors, calls) = (
                        publisher.clone(),
                        published.clone(),
                        errors.clone(),
                        calls.clone(),
                    );
                    tracker.spawn(async move {
                        let called = Instant::now();
                        let data = serde_json::value::RawValue::from_string(format!(
                            r#"{{"sent_us":{}}}"#,
                            unix_us()
                        ))
                        .ok();
                        let request = NotificationRequest {
                            target: PublishTarget::Users(vec![user]),
                            title: "load".into(),
                            body: String::new(),
                            data,
                            ttl_s: NOTIFICATION_TTL_S,
                            send_at: None,
                            idempotency_key: None,
                        };
                        match publisher.send(&request).await {
                            Ok(()) => {
                                published.fetch_add(1, Ordering::Relaxed);
                                let micros = called.elapsed().as_micros() as u64;
                                calls
                                    .lock()
                                    .unwrap_or_else(|p| p.into_inner())
                                    .saturating_record(micros.clamp(1, MAX_LATENCY_US));
                            }
                            Err(e) => count(&errors, e),
                        }
                        drop(permit);
                    });
                    sent += 1;
                }
            }
            tracker.close();
            tracker.wait().await;
            let elapsed = start.elapsed().as_secs_f64();
            let published = published.load(Ordering::Relaxed);
            let error_reasons =
                std::mem::take(&mut *errors.lock().unwrap_or_else(|p| p.into_inner()));
            let call_latency = Latency::of(&calls.lock().unwrap_or_else(|p| p.into_inner()));
            Ok(PublisherReport {
                published,
                errors: error_reasons.values().sum(),
                error_reasons,
                scheduled: total,
                seconds: elapsed,
                rate_per_s: published as f64 / elapsed.max(1e-9),
                max_lag_ms: max_lag.as_secs_f64() * 1e3,
                call_latency,
                cpu: procfs::thread_cpu(tid).since(&cpu_start),
            })
        })
    })
}

// ---------------------------------------------------------------------------------------
// Report

/// One process (a gateway or Redis) during the publishing window.
#[derive(Clone, Debug, Serialize)]
pub struct ProcessReport {
    pub name: String,
    pub pid: u32,
    pub cpu: CpuTime,
    /// CPU seconds per second of the window (1.0 = one core).
    pub cores: f64,
    pub memory: Memory,
}

/// The subscribe cost of connecting and disconnecting clients.
#[derive(Clone, Debug, Default, Serialize)]
pub struct ChurnReport {
    pub clients: usize,
    pub connected: usize,
    /// Redis work from the first connect until every `welcome` (+ the settle).
    pub connect: RedisWork,
    /// Redis work from the first close until past the linger.
    pub disconnect: RedisWork,
    pub subscribe_per_connect: f64,
    pub unsubscribe_per_disconnect: f64,
}

/// Everything a `notify` run measured.
#[derive(Clone, Debug, Serialize)]
pub struct NotifyReport {
    pub urls: Vec<String>,
    pub users: usize,
    pub connected: u64,
    pub failed: u64,
    pub failure_reasons: BTreeMap<String, u64>,
    pub dropped: u64,
    pub rate_asked_per_s: f64,
    pub publisher: PublisherReport,
    /// Publish → socket, for every notification received (duplicates included).
    pub latency: Latency,
    pub expected: u64,
    /// Distinct notifications received.
    pub delivered: u64,
    /// Distinct notifications received, per gateway (in --url order).
    pub delivered_per_gateway: Vec<u64>,
    /// `expected − delivered` (never negative).
    pub lost: u64,
    pub duplicates: u64,
    pub unstamped: u64,
    pub acks_sent: u64,
    pub server_errors: BTreeMap<String, u64>,
    /// First publish → end of the drain, seconds (the window of the CPU figures).
    pub window_seconds: f64,
    pub gateways: Vec<ProcessReport>,
    pub redis_process: Option<ProcessReport>,
    /// Whole load process (clients + publisher) during the window.
    pub client_cpu: CpuTime,
    /// The part of `client_cpu` not on the publisher's thread.
    pub client_sockets_cpu: CpuTime,
    pub client_memory: Memory,
    /// Redis work during the window.
    pub redis: RedisWork,
    pub redis_commands_per_delivered: f64,
    pub redis_calls_per_delivered: BTreeMap<String, f64>,
    pub redis_in_bytes_per_delivered: f64,
    pub redis_out_bytes_per_delivered: f64,
    pub churn: Option<ChurnReport>,
}

impl NotifyReport {
    /// A human-readable summary.
    pub fn summary(&self) -> String {
        use std::fmt::Write;
        let mut s = String::new();
        let _ = writeln!(
            s,
            "== geopush-loadtest notify against {}",
            self.urls.join(", ")
        );
        let _ = writeln!(
            s,
            "clients       {} of {} connected ({} failed, {} dropped)",
            self.connected, self.users, self.failed, self.dropped
        );
        for (reason, n) in &self.failure_reasons {
            let _ = writeln!(s, "  failed      {n} × {reason}");
        }
        let p = &self.publisher;
        let _ = writeln!(
            s,
            "published     {} of {} ({} errors) in {:.2} s: {:.0}/s (asked {:.0}/s), \
             max lag {:.1} ms, publish call p50 {:.2} ms p99 {:.2} ms",
            p.published,
            p.scheduled,
            p.errors,
            p.seconds,
            p.rate_per_s,
            self.rate_asked_per_s,
            p.max_lag_ms,
            p.call_latency.p50_ms,
            p.call_latency.p99_ms
        );
        for (reason, n) in &p.error_reasons {
            let _ = writeln!(s, "  error       {n} × {reason}");
        }
        let _ = writeln!(
            s,
            "delivered     {} of {} expected (per gateway {:?}); lost {}, duplicates {}, \
             unstamped {}, acks sent {}",
            self.delivered,
            self.expected,
            self.delivered_per_gateway,
            self.lost,
            self.duplicates,
            self.unstamped,
            self.acks_sent
        );
        let l = &self.latency;
        let _ = writeln!(
            s,
            "latency       publish → socket p50 {:.3} ms  p90 {:.3} ms  p99 {:.3} ms  \
             p99.9 {:.3} ms  max {:.3} ms  ({} samples)",
            l.p50_ms, l.p90_ms, l.p99_ms, l.p999_ms, l.max_ms, l.count
        );
        if !self.server_errors.is_empty() {
            let _ = writeln!(s, "server errors {:?}", self.server_errors);
        }
        let _ = writeln!(s, "window        {:.2} s", self.window_seconds);
        for g in self.gateways.iter().chain(self.redis_process.as_ref()) {
            let _ = writeln!(
                s,
                "{:<13} pid {} CPU {:.2} s ({:.0} % of a core; user {:.2}, sys {:.2}), \
                 RSS {} KiB",
                g.name,
                g.pid,
                g.cpu.total_s(),
                g.cores * 100.0,
                g.cpu.user_s,
                g.cpu.system_s,
                g.memory.vm_rss_kib
            );
        }
        let window = self.window_seconds.max(1e-9);
        let _ = writeln!(
            s,
            "client        CPU {:.2} s ({:.0} % of a core): sockets {:.2} s, publisher \
             thread {:.2} s; RSS {} KiB",
            self.client_cpu.total_s(),
            self.client_cpu.total_s() / window * 100.0,
            self.client_sockets_cpu.total_s(),
            p.cpu.total_s(),
            self.client_memory.vm_rss_kib
        );
        let _ = writeln!(
            s,
            "redis         {} commands ({:.2} per delivered), in {} B ({:.0} B/delivered), \
             out {} B ({:.0} B/delivered)",
            self.redis.commands,
            self.redis_commands_per_delivered,
            self.redis.net_input_bytes,
            self.redis_in_bytes_per_delivered,
            self.redis.net_output_bytes,
            self.redis_out_bytes_per_delivered
        );
        for (name, per) in &self.redis_calls_per_delivered {
            let _ = writeln!(
                s,
                "  {:<11} {:>9} calls  {:.3} per delivered",
                name,
                self.redis.calls_of(name),
                per
            );
        }
        if let Some(c) = &self.churn {
            let _ = writeln!(
                s,
                "churn         {} of {} clients: SUBSCRIBE {} ({:.3}/connect), UNSUBSCRIBE {} \
                 ({:.3}/disconnect)",
                c.connected,
                c.clients,
                c.connect.calls_of("subscribe"),
                c.subscribe_per_connect,
                c.disconnect.calls_of("unsubscribe"),
                c.unsubscribe_per_disconnect
            );
            let _ = writeln!(s, "  connect     {:?}", c.connect.calls);
            let _ = writeln!(s, "  disconnect  {:?}", c.disconnect.calls);
        }
        s
    }
}

// ---------------------------------------------------------------------------------------
// The run

fn process_sample(pid: u32) -> anyhow::Result<(Memory, CpuTime)> {
    Ok((procfs::memory(Some(pid))?, procfs::cpu_time(Some(pid))?))
}

/// Connect and disconnect `k` clients; Redis work of each half.
async fn churn(
    args: &NotifyArgs,
    clients: &Arc<Clients>,
    admin: &mut RedisAdmin,
    progress: &impl Fn(&str),
) -> anyhow::Result<ChurnReport> {
    let k = args.churn;
    let subs: Vec<String> = (0..k)
        .map(|i| format!("{}-churn-{i}", args.sub_prefix))
        .collect();
    let before = admin.stats().await?;
    let sockets = connect_all(clients, &subs, args.connect_rate).await?;
    // Subscriptions go out in batches shortly after the welcome.
    sleep(Duration::from_secs_f64(args.settle_seconds.max(0.5))).await;
    let connected = admin.stats().await?;
    let n = sockets.len();
    progress(&format!("churn: {n} of {k} connected; closing"));
    close_all(sockets).await;
    // Unsubscribes happen on the subscriber's tick after the linger (tick = linger / 2).
    sleep(Duration::from_secs_f64(args.linger_seconds * 1.5 + 1.5)).await;
    let closed = admin.stats().await?;
    let connect = RedisWork::between(&before, &connected);
    let disconnect = RedisWork::between(&connected, &closed);
    let per = |calls: u64| calls as f64 / n.max(1) as f64;
    Ok(ChurnReport {
        clients: k,
        connected: n,
        subscribe_per_connect: per(connect.calls_of("subscribe")),
        unsubscribe_per_disconnect: per(disconnect.calls_of("unsubscribe")),
        connect,
        disconnect,
    })
}

/// Run the scenario to the end and report. Fails fast on bad options, an unreachable Redis
/// or gateway, or a first connection the gateway refuses.
pub async fn run(args: NotifyArgs) -> anyhow::Result<NotifyReport> {
    args.validate()?;
    let progress = |line: &str| {
        if !args.quiet {
            eprintln!("notify: {line}");
        }
    };
    let mut targets = Vec::new();
    for url in &args.url {
        targets.push(Target::resolve(url).await?);
    }
    if let Some(url) = &args.worker_url {
        // Fail now, not after connecting every client.
        net::check_http_healthy(url).await?;
    }
    let mut admin = RedisAdmin::connect(&args.redis_url).await?;
    let redis_pid = admin.pid().await;
    let clients = Arc::new(Clients::new(
        targets.clone(),
        &args.secret,
        args.source_ips,
    )?);

    let churn = if args.churn > 0 {
        let report = churn(&args, &clients, &mut admin, &progress).await?;
        progress(&format!(
            "churn: SUBSCRIBE {:.3}/connect, UNSUBSCRIBE {:.3}/disconnect",
            report.subscribe_per_connect, report.unsubscribe_per_disconnect
        ));
        Some(report)
    } else {
        None
    };
    // The notify phase counts its own clients only.
    let clients = Arc::new(Clients::new(
        targets.clone(),
        &args.secret,
        args.source_ips,
    )?);

    let users: Vec<String> = (0..args.users)
        .map(|i| format!("{}-{i}", args.sub_prefix))
        .collect();
    let (go_tx, go_rx) = std::sync::mpsc::channel();
    let publisher = spawn_publisher(&args, users.clone(), go_rx);

    progress(&format!("connecting {} clients", users.len()));
    let sockets = connect_all(&clients, &users, args.connect_rate).await?;
    progress(&format!(
        "{} connected, {} failed; settling {:.1} s",
        sockets.len(),
        clients.failed.load(Ordering::Relaxed),
        args.settle_seconds
    ));
    let tracker = TaskTracker::new();
    for (index, mut ws) in sockets {
        let clients = clients.clone();
        let gateway = index % clients.targets.len();
        tracker.spawn(async move {
            match clients.receive(&mut ws, gateway).await {
                None => {
                    let _ = timeout(CLOSE_TIMEOUT, async {
                        let _ = ws.close(Some(net::normal_close())).await;
                        while let Some(Ok(_)) = ws.next().await {}
                    })
                    .await;
                }
                Some(reason) => {
                    clients.dropped.fetch_add(1, Ordering::Relaxed);
                    count(&clients.reasons, reason);
                }
            }
        });
    }
    sleep(Duration::from_secs_f64(args.settle_seconds)).await;

    // The window: from the go to the end of the drain.
    let redis_before = admin.stats().await?;
    let gateways_before = args
        .gateway_pid
        .iter()
        .map(|&pid| process_sample(pid).with_context(|| format!("--gateway-pid {pid}")))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let redis_cpu_before = redis_pid.and_then(|pid| procfs::cpu_time(Some(pid)).ok());
    let client_before = procfs::cpu_time(None)?;
    let window_start = Instant::now();
    let _ = go_tx.send(());
    // Progress while publishing; the publisher's thread ends by itself.
    let publisher = {
        let mut last = Instant::now();
        while !publisher.is_finished() {
            sleep(Duration::from_millis(100)).await;
            if last.elapsed() >= Duration::from_secs(5) {
                last = Instant::now();
                progress(&format!(
                    "{:.0} s: delivered {}",
                    window_start.elapsed().as_secs_f64(),
                    clients.delivered()
                ));
            }
        }
        publisher
            .join()
            .map_err(|_| anyhow::anyhow!("the publisher thread panicked"))??
    };
    let drain_end = Instant::now() + Duration::from_secs_f64(args.drain_seconds);
    while clients.delivered() < publisher.published && Instant::now() < drain_end {
        sleep(Duration::from_millis(10)).await;
    }
    let window = window_start.elapsed().as_secs_f64();
    let client_after = procfs::cpu_time(None)?;
    let client_memory = procfs::memory(None)?;
    let mut gateways = Vec::new();
    for (i, (&pid, before)) in args.gateway_pid.iter().zip(&gateways_before).enumerate() {
        let (memory, cpu) = process_sample(pid)?;
        let cpu = cpu.since(&before.1);
        gateways.push(ProcessReport {
            name: format!("gateway {}", (b'A' + (i % 26) as u8) as char),
            pid,
            cores: cpu.total_s() / window.max(1e-9),
            cpu,
            memory,
        });
    }
    let redis_process = match (redis_pid, redis_cpu_before) {
        (Some(pid), Some(before)) => process_sample(pid).ok().map(|(memory, cpu)| {
            let cpu = cpu.since(&before);
            ProcessReport {
                name: "redis".into(),
                pid,
                cores: cpu.total_s() / window.max(1e-9),
                cpu,
                memory,
            }
        }),
        _ => None,
    };
    let redis_after = admin.stats().await?;
    progress("closing");
    clients.stop.cancel();
    tracker.close();
    let _ = timeout(CLOSE_TIMEOUT * 2, tracker.wait()).await;

    let delivered = clients.delivered();
    let redis = RedisWork::between(&redis_before, &redis_after);
    let per = |x: u64| x as f64 / delivered.max(1) as f64;
    let client_cpu = client_after.since(&client_before);
    let take = |m: &Mutex<BTreeMap<String, u64>>| {
        std::mem::take(&mut *m.lock().unwrap_or_else(|p| p.into_inner()))
    };
    let latency = Latency::of(&clients.latency.lock().unwrap_or_else(|p| p.into_inner()));
    Ok(NotifyReport {
        urls: targets.iter().map(|t| t.url.clone()).collect(),
        users: args.users,
        connected: clients.connected.load(Ordering::Relaxed),
        failed: clients.failed.load(Ordering::Relaxed),
        failure_reasons: take(&clients.reasons),
        dropped: clients.dropped.load(Ordering::Relaxed),
        rate_asked_per_s: args.rate,
        latency,
        expected: publisher.published,
        delivered,
        delivered_per_gateway: clients
            .delivered
            .iter()
            .map(|d| d.load(Ordering::Relaxed))
            .collect(),
        lost: publisher.published.saturating_sub(delivered),
        duplicates: clients.duplicates.load(Ordering::Relaxed),
        unstamped: clients.unstamped.load(Ordering::Relaxed),
        acks_sent: clients.acks_sent.load(Ordering::Relaxed),
        server_errors: take(&clients.server_errors),
        window_seconds: window,
        gateways,
        redis_process,
        client_sockets_cpu: CpuTime {
            user_s: client_cpu.user_s - publisher.cpu.user_s,
            system_s: client_cpu.system_s - publisher.cpu.system_s,
        },
        client_cpu,
        client_memory,
        redis_commands_per_delivered: per(redis.commands),
        redis_calls_per_delivered: redis
            .calls
            .iter()
            .map(|(name, &n)| (name.clone(), per(n)))
            .collect(),
        redis_in_bytes_per_delivered: per(redis.net_input_bytes),
        redis_out_bytes_per_delivered: per(redis.net_output_bytes),
        redis,
        publisher,
        churn,
    })
}

/// The `notify` subcommand: run on a runtime of `--threads` workers, print, write JSON.
pub fn main(args: NotifyArgs) -> anyhow::Result<()> {
    args.validate()?;
    let runtime = if args.threads == 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(args.threads)
            .enable_all()
            .build()
    }
    .context("starting tokio")?;
    let json_report = args.json_report.clone();
    let report = runtime.block_on(run(args))?;
    print!("{}", report.summary());
    if let Some(path) = json_report {
        let json = serde_json::to_string_pretty(&report).context("serializing the report")?;
        std::fs::write(&path, json + "\n")
            .with_context(|| format!("writing {}", path.display()))?;
    }
    if report.delivered == 0 {
        bail!("no notification was delivered");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn info_text_parses() {
        let text = "# Commandstats\r\ncmdstat_subscribe:calls=3,usec=10,usec_per_call=3.33,\
                    rejected_calls=0,failed_calls=0\r\ncmdstat_publish:calls=10,usec=5\r\n\
                    # Stats\r\ntotal_commands_processed:42\r\ntotal_net_input_bytes:1000\r\n\
                    total_net_output_bytes:2000\r\n";
        let s = parse_info(text);
        assert_eq!(s.calls.get("subscribe"), Some(&3));
        assert_eq!(s.calls.get("publish"), Some(&10));
        assert_eq!(s.commands_processed, 42);
        assert_eq!(s.net_input_bytes, 1000);
        assert_eq!(s.net_output_bytes, 2000);
        let later = parse_info(&text.replace("calls=10", "calls=25"));
        let work = RedisWork::between(&s, &later);
        assert_eq!(work.calls_of("publish"), 15);
        assert_eq!(work.calls_of("subscribe"), 0);
        assert!(!work.calls.contains_key("subscribe"));
    }

    #[test]
    fn notification_frames_parse() {
        let text = r#"{"type":"notification","id":"01J","cursor":"1-0","title":"t",
                       "body":"","data":{"sent_us":1700000000000000},"ts":1}"#;
        let f: Frame = serde_json::from_str(text).expect("parses");
        assert_eq!(f.kind, "notification");
        assert_eq!(f.id.as_deref(), Some("01J"));
        assert_eq!(f.data.map(|d| d.sent_us), Some(1_700_000_000_000_000));
        let welcome: Frame =
            serde_json::from_str(r#"{"type":"welcome","node":"a"}"#).expect("parses");
        assert_eq!(welcome.kind, "welcome");
    }

    #[test]
    fn bad_options_are_refused() {
        let ok = NotifyArgs::new(vec!["ws://127.0.0.1:1/v1/ws".into()], "s", "redis://x");
        ok.validate().expect("defaults");
        let mut a = ok.clone();
        a.users = 0;
        assert!(a.validate().is_err());
        let mut a = ok.clone();
        a.rate = f64::NAN;
        assert!(a.validate().is_err());
        let mut a = ok.clone();
        a.gateway_pid = vec![1, 2];
        assert!(a.validate().is_err(), "one pid per url");
        let mut a = ok;
        a.url.clear();
        assert!(a.validate().is_err());
    }
}
