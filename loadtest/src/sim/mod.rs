//! Simulated mobile fleets with publishers: every scenario but `notify` and `geo-bench`.
//!
//! A run connects N clients (each its own user, device `load`, own JWT) at a paced rate,
//! lets the gateways settle and samples their memory, then runs the measured phase: clients
//! walk around real cities sending fixes, a publisher thread sends user, geo and broadcast
//! notifications through the backend API (or straight to Redis), clients may churn, and a
//! gateway may be sent SIGTERM. Clients ack every notification, answer pings, and reconnect
//! — with `resume` from their last cursor — whenever the gateway closes them. After a grace
//! period for late deliveries, everything closes and the [`Report`] tells what happened.
//!
//! | scenario    | fixes              | publishes                   | other            |
//! |-------------|--------------------|-----------------------------|------------------|
//! | `connect`   | once with --fix-once | —                         | memory per conn. |
//! | `fixes`     | every 1 s          | —                           | fix → nearby     |
//! | `geo`       | once (stationary)  | geo circles 50/s            | exact expected   |
//! | `broadcast` | —                  | a broadcast every 1 s       | reach time       |
//! | `churn`     | —                  | user 100/s                  | 10 % of N/s churn|
//! | `drain`     | —                  | user 200/s                  | SIGTERM a node   |
//! | `city`      | every 1 s          | user 100/s, geo 10/s, broadcast every 5 s | —  |
//!
//! Every default above is a flag.

mod client;
mod publish;

use crate::cities::{self, Cities};
use crate::net::{self, Target};
use crate::procfs::{self, CpuTime};
use crate::report::{
    self, BroadcastReach, ClientCost, Delivery, Event, GatewayReport, Latency, Report, Second,
};
use crate::sender::PublishVia;
use anyhow::{Context, bail};
use hdrhistogram::Histogram;
use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::sync::{Semaphore, oneshot};
use tokio::time::{Instant, sleep, sleep_until, timeout};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Descriptors this process needs besides its client sockets.
const SPARE_FDS: u64 = 64;
/// Connections one loopback source address can hold to one gateway port.
const MAX_CONNECTIONS_PER_SOURCE: usize = 28_000;
/// Bound on closing the fleet at the end.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(3);
/// How far into the run the first broadcast goes out (then one per interval).
const FIRST_BROADCAST_S: f64 = 0.5;

/// What the clients and the publisher do.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Scenario {
    Connect,
    Fixes,
    Geo,
    Broadcast,
    Churn,
    Drain,
    City,
}

impl Scenario {
    pub fn name(self) -> &'static str {
        match self {
            Scenario::Connect => "connect",
            Scenario::Fixes => "fixes",
            Scenario::Geo => "geo",
            Scenario::Broadcast => "broadcast",
            Scenario::Churn => "churn",
            Scenario::Drain => "drain",
            Scenario::City => "city",
        }
    }
}

/// Flags of every fleet scenario. Options left out take the scenario's default.
#[derive(Clone, Debug, clap::Args)]
pub struct SimArgs {
    /// Gateway WebSocket URLs, comma-separated (path defaults to /v1/ws). Client i starts at
    /// URL i mod n and moves to the next one on each reconnect.
    #[arg(
        long,
        env = "GEOPUSH_LOADTEST_URL",
        value_delimiter = ',',
        default_value = "ws://127.0.0.1:8080/v1/ws"
    )]
    pub url: Vec<String>,
    /// The gateways' HS256 secret (their --jwt-secret); one token is minted per client.
    #[arg(long, env = "GEOPUSH_JWT_SECRET")]
    pub secret: String,
    /// Number of clients, each its own user `{sub-prefix}-{i}`.
    #[arg(
        long,
        short = 'n',
        env = "GEOPUSH_LOADTEST_CONNECTIONS",
        default_value_t = 100
    )]
    pub connections: usize,
    /// New connections per second while the fleet connects.
    #[arg(long, env = "GEOPUSH_LOADTEST_RATE", default_value_t = 500.0)]
    pub rate: f64,
    /// Most handshakes in flight at once.
    #[arg(long, default_value_t = 200)]
    pub concurrency: usize,
    /// Seconds of the measured phase (after every client connected and settled).
    #[arg(
        long,
        alias = "hold-seconds",
        env = "GEOPUSH_LOADTEST_SECONDS",
        default_value_t = 10.0
    )]
    pub seconds: f64,
    /// Seconds between the last connect and the memory sample / the measured phase.
    #[arg(long, default_value_t = 1.0)]
    pub settle_seconds: f64,
    /// Seconds after the last publish to wait for deliveries, reconnects and replays.
    #[arg(long, default_value_t = 2.0)]
    pub grace_seconds: f64,
    /// Each client sends its position once right after every `welcome`.
    #[arg(long)]
    pub fix_once: bool,
    /// Clients do not ack notifications (apps do; this shows what the acks cost). User
    /// notifications are then replayed after every reconnect.
    #[arg(long)]
    pub no_ack: bool,
    /// Milliseconds between two fixes of one client during the measured phase; 0: none.
    /// [default: 1000 for fixes and city, else 0]
    #[arg(long)]
    pub fix_interval_ms: Option<u64>,
    /// Walking speed of a client between fixes, m/s.
    #[arg(long, default_value_t = 1.4)]
    pub speed_mps: f64,
    /// GeoNames cities1000 CSV to scatter clients around (default: ../shared/data beside
    /// the workspace).
    #[arg(long, env = "GEOPUSH_CITIES_FILE")]
    pub cities: Option<PathBuf>,
    /// Base URL of the backend API to publish through: a worker, or a single-node gateway
    /// [default: the first gateway's host and port].
    #[arg(long)]
    pub worker_url: Option<String>,
    /// API key for --worker-url (the dev key by default).
    #[arg(
        long,
        env = "GEOPUSH_LOADTEST_API_KEY",
        default_value = geopush_gateway::config::DEV_API_KEY
    )]
    pub api_key: String,
    /// Publish straight to this Redis with the publisher library instead of the API.
    #[arg(long)]
    pub redis_url: Option<String>,
    /// Key prefix for --redis-url.
    #[arg(long, default_value = "gp:")]
    pub redis_prefix: String,
    /// User notifications per second to random connected users.
    /// [default: churn 100, drain 200, city 100, else 0]
    #[arg(long)]
    pub user_rate: Option<f64>,
    /// Geo notifications per second: a circle around a random client.
    /// [default: geo 50, city 10, else 0]
    #[arg(long)]
    pub geo_rate: Option<f64>,
    /// Radius of the geo notifications' circles, metres.
    #[arg(long, default_value_t = 1_000.0)]
    pub geo_radius_m: f64,
    /// Seconds between two broadcasts; 0: none. [default: broadcast 1, city 5, else 0]
    #[arg(long)]
    pub broadcast_every_s: Option<f64>,
    /// Most publishes in flight at once.
    #[arg(long, default_value_t = 64)]
    pub publishers: usize,
    /// Clients that disconnect and reconnect per second. [default: churn 10 % of N, else 0]
    #[arg(long)]
    pub churn_per_s: Option<f64>,
    /// `drain`: the gateway process to send SIGTERM to.
    #[arg(long)]
    pub drain_pid: Option<u32>,
    /// `drain`: seconds into the measured phase to send it [default: a third of --seconds].
    #[arg(long)]
    pub drain_at_s: Option<f64>,
    /// Gateway process ids, comma-separated: RSS and CPU read from /proc.
    #[arg(long, env = "GEOPUSH_LOADTEST_GATEWAY_PID", value_delimiter = ',')]
    pub gateway_pid: Vec<u32>,
    /// Bound on TCP connect + upgrade + welcome per client, seconds.
    #[arg(long, default_value_t = 10.0)]
    pub connect_timeout_seconds: f64,
    /// Clients are named `{prefix}-{i}` (distinct prefixes for parallel processes).
    #[arg(long, default_value = "load")]
    pub sub_prefix: String,
    /// Seed for positions, walks and publish targets.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Spread clients over this many loopback source addresses (127.0.0.1, .2, …): one
    /// address holds at most ~28,000 connections to one gateway.
    #[arg(long, default_value_t = 1)]
    pub source_ips: u8,
    /// Runtime worker threads of the clients (1 = a single-threaded runtime).
    #[arg(long, default_value_t = 1)]
    pub threads: usize,
    /// Write the report as JSON here (merge several with `geopush-loadtest merge`).
    #[arg(long)]
    pub json_report: Option<PathBuf>,
    /// Write the SVG chart (latency distributions, counts per second) here.
    #[arg(long)]
    pub chart: Option<PathBuf>,
    /// No progress lines.
    #[arg(long, short = 'q')]
    pub quiet: bool,
}

impl SimArgs {
    /// Defaults for everything but the gateways and the secret (tests, tools).
    pub fn new(urls: Vec<String>, secret: &str) -> SimArgs {
        SimArgs {
            url: urls,
            secret: secret.into(),
            connections: 100,
            rate: 500.0,
            concurrency: 200,
            seconds: 10.0,
            settle_seconds: 1.0,
            grace_seconds: 2.0,
            fix_once: false,
            no_ack: false,
            fix_interval_ms: None,
            speed_mps: 1.4,
            cities: None,
            worker_url: None,
            api_key: geopush_gateway::config::DEV_API_KEY.into(),
            redis_url: None,
            redis_prefix: "gp:".into(),
            user_rate: None,
            geo_rate: None,
            geo_radius_m: 1_000.0,
            broadcast_every_s: None,
            publishers: 64,
            churn_per_s: None,
            drain_pid: None,
            drain_at_s: None,
            gateway_pid: Vec::new(),
            connect_timeout_seconds: 10.0,
            sub_prefix: "load".into(),
            seed: 1,
            source_ips: 1,
            threads: 1,
            json_report: None,
            chart: None,
            quiet: true,
        }
    }

    /// Check every value; a run refuses to start on an error.
    pub fn validate(&self, scenario: Scenario) -> anyhow::Result<()> {
        if self.url.is_empty() {
            bail!("--url needs at least one gateway");
        }
        if self.connections == 0 {
            bail!("--connections must be at least 1");
        }
        if self.secret.is_empty() {
            bail!("--secret must not be empty");
        }
        if self.sub_prefix.is_empty()
            || self.sub_prefix.len() > 64
            || !self
                .sub_prefix
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            bail!("--sub-prefix must be 1 to 64 letters, digits, '-' or '_'");
        }
        for (flag, value) in [
            ("--rate", self.rate),
            ("--seconds", self.seconds),
            ("--connect-timeout-seconds", self.connect_timeout_seconds),
            ("--geo-radius-m", self.geo_radius_m),
        ] {
            if !(value.is_finite() && value > 0.0) {
                bail!("{flag} must be a positive number");
            }
        }
        for (flag, value) in [
            ("--settle-seconds", Some(self.settle_seconds)),
            ("--grace-seconds", Some(self.grace_seconds)),
            ("--speed-mps", Some(self.speed_mps)),
            ("--user-rate", self.user_rate),
            ("--geo-rate", self.geo_rate),
            ("--broadcast-every-s", self.broadcast_every_s),
            ("--churn-per-s", self.churn_per_s),
            ("--drain-at-s", self.drain_at_s),
        ] {
            if let Some(value) = value
                && !(value.is_finite() && value >= 0.0)
            {
                bail!("{flag} must be a number ≥ 0");
            }
        }
        if self.geo_radius_m > 1_000_000.0 {
            bail!("--geo-radius-m must be at most 1,000,000");
        }
        if self.concurrency == 0 || self.publishers == 0 || self.threads == 0 {
            bail!("--concurrency, --publishers and --threads must be at least 1");
        }
        if self.source_ips == 0 || self.source_ips > 250 {
            bail!("--source-ips must be in 1..=250");
        }
        let per_source = self
            .connections
            .div_ceil(self.url.len() * usize::from(self.source_ips));
        if per_source > MAX_CONNECTIONS_PER_SOURCE {
            bail!(
                "{} connections over {} gateway(s) and {} source address(es) is more than \
                 {MAX_CONNECTIONS_PER_SOURCE} per address and gateway: raise --source-ips",
                self.connections,
                self.url.len(),
                self.source_ips
            );
        }
        if let Some(limit) = open_files_limit()
            && self.connections as u64 + SPARE_FDS > limit
        {
            bail!(
                "--connections {} needs more open files than this process may open ({limit}, \
                 ulimit -n): run several loadtest processes with fewer connections each",
                self.connections
            );
        }
        if let Some(url) = &self.worker_url
            && !url.starts_with("http://")
        {
            bail!("--worker-url {url:?} must start with http://");
        }
        match (scenario, self.drain_pid) {
            (Scenario::Drain, None) => {
                bail!("drain needs --drain-pid: the gateway process to send SIGTERM to")
            }
            (Scenario::Drain, Some(_)) => {}
            (_, Some(_)) => bail!("--drain-pid is for the drain scenario"),
            (_, None) => {}
        }
        if let Some(at) = self.drain_at_s
            && at >= self.seconds
        {
            bail!("--drain-at-s must fall inside --seconds");
        }
        Ok(())
    }
}

/// The soft limit on open files of this process.
fn open_files_limit() -> Option<u64> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line.split_whitespace().nth(3)?.parse().ok()
}

/// A scenario's behaviour once its defaults are applied.
#[derive(Clone, Debug)]
struct Plan {
    /// Send the position after every `welcome`.
    fix_once: bool,
    /// Ack every notification.
    acks: bool,
    fix_interval: Option<Duration>,
    speed_mps: f64,
    user_rate: f64,
    geo_rate: f64,
    geo_radius_m: f64,
    broadcast_every: Option<f64>,
    /// Mean seconds a client stays connected before it churns.
    churn_lifetime_s: Option<f64>,
    drain: Option<(u32, f64)>,
}

impl Plan {
    fn new(scenario: Scenario, args: &SimArgs) -> Plan {
        use Scenario::*;
        let fix_interval_ms = args.fix_interval_ms.unwrap_or(match scenario {
            Fixes | City => 1_000,
            _ => 0,
        });
        let churn_per_s = args.churn_per_s.unwrap_or(match scenario {
            Churn => args.connections as f64 * 0.1,
            _ => 0.0,
        });
        let broadcast_every_s = args.broadcast_every_s.unwrap_or(match scenario {
            Broadcast => 1.0,
            City => 5.0,
            _ => 0.0,
        });
        Plan {
            fix_once: args.fix_once || matches!(scenario, Geo | City),
            acks: !args.no_ack,
            fix_interval: (fix_interval_ms > 0).then(|| Duration::from_millis(fix_interval_ms)),
            speed_mps: args.speed_mps,
            user_rate: args.user_rate.unwrap_or(match scenario {
                Churn | City => 100.0,
                Drain => 200.0,
                _ => 0.0,
            }),
            geo_rate: args.geo_rate.unwrap_or(match scenario {
                Geo => 50.0,
                City => 10.0,
                _ => 0.0,
            }),
            geo_radius_m: args.geo_radius_m,
            broadcast_every: (broadcast_every_s > 0.0).then_some(broadcast_every_s),
            churn_lifetime_s: (churn_per_s > 0.0).then(|| args.connections as f64 / churn_per_s),
            drain: args
                .drain_pid
                .map(|pid| (pid, args.drain_at_s.unwrap_or(args.seconds / 3.0))),
        }
    }

    fn sends_fixes(&self) -> bool {
        self.fix_once || self.fix_interval.is_some()
    }

    fn publishes(&self) -> bool {
        self.user_rate > 0.0 || self.geo_rate > 0.0 || self.broadcast_every.is_some()
    }
}

/// The kinds of notification a run publishes; the stamp in `data` says which.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    User = 0,
    Geo = 1,
    Broadcast = 2,
}

impl Kind {
    fn stamp(self) -> char {
        match self {
            Kind::User => 'u',
            Kind::Geo => 'g',
            Kind::Broadcast => 'b',
        }
    }

    fn from_stamp(c: char) -> Option<Kind> {
        match c {
            'u' => Some(Kind::User),
            'g' => Some(Kind::Geo),
            'b' => Some(Kind::Broadcast),
            _ => None,
        }
    }
}

/// One client as the publisher sees it: connected or not, and where.
#[derive(Default)]
struct Slot {
    connected: AtomicBool,
    ever_connected: AtomicBool,
    positioned: AtomicBool,
    lat_bits: AtomicU64,
    lon_bits: AtomicU64,
}

impl Slot {
    fn set_position(&self, lat: f64, lon: f64) {
        self.lat_bits.store(lat.to_bits(), Ordering::Relaxed);
        self.lon_bits.store(lon.to_bits(), Ordering::Relaxed);
        self.positioned.store(true, Ordering::Relaxed);
    }

    fn position(&self) -> Option<(f64, f64)> {
        self.positioned.load(Ordering::Relaxed).then(|| {
            (
                f64::from_bits(self.lat_bits.load(Ordering::Relaxed)),
                f64::from_bits(self.lon_bits.load(Ordering::Relaxed)),
            )
        })
    }
}

/// Delivery counters of one kind.
#[derive(Default)]
struct KindStats {
    published: AtomicU64,
    publish_errors: AtomicU64,
    expected: AtomicU64,
    delivered: AtomicU64,
    duplicates: AtomicU64,
    latency: Mutex<Option<Histogram<u64>>>,
}

/// A broadcast's reach in this process, while the run goes.
struct Reach {
    expected: u64,
    reached: u64,
    last_us: u64,
}

/// Counters every client and the publisher update.
#[derive(Default)]
struct Stats {
    connected_now: AtomicU64,
    ever_connected: AtomicU64,
    failed: AtomicU64,
    connects: AtomicU64,
    closes: AtomicU64,
    reconnects: AtomicU64,
    fixes: AtomicU64,
    nearby: AtomicU64,
    kinds: [KindStats; 3],
    welcome: Mutex<Option<Histogram<u64>>>,
    fix_to_nearby: Mutex<Option<Histogram<u64>>>,
    reconnect_gap: Mutex<Option<Histogram<u64>>>,
    reconnect_after_drain: Mutex<Option<Histogram<u64>>>,
    failures: Mutex<BTreeMap<String, u64>>,
    close_reasons: Mutex<BTreeMap<String, u64>>,
    server_errors: Mutex<BTreeMap<String, u64>>,
    publish_error_reasons: Mutex<BTreeMap<String, u64>>,
    broadcasts: Mutex<HashMap<String, Reach>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Record into a lazily created latency histogram.
fn record(h: &Mutex<Option<Histogram<u64>>>, micros: u64) {
    report::record(lock(h).get_or_insert_with(report::histogram), micros);
}

fn latency_of(h: &Mutex<Option<Histogram<u64>>>) -> Latency {
    lock(h).as_ref().map(Latency::of).unwrap_or_default()
}

/// Count `key` in a bounded map of reasons (they may carry server text).
fn count(map: &Mutex<BTreeMap<String, u64>>, key: String) {
    let mut map = lock(map);
    if map.len() < 32 || map.contains_key(&key) {
        *map.entry(key).or_default() += 1;
    } else {
        *map.entry("other".into()).or_default() += 1;
    }
}

fn unix_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

/// State shared by the coordinator, the clients and the publisher.
struct Shared {
    plan: Plan,
    targets: Vec<Target>,
    secret: String,
    sub_prefix: String,
    source_ips: u8,
    seed: u64,
    cities: Option<Arc<Cities>>,
    ws_config: WebSocketConfig,
    connect_timeout: Duration,
    slots: Vec<Slot>,
    stats: Stats,
    /// Cancelled when the measured phase begins: fixes and churn start.
    measuring: CancellationToken,
    /// Cancelled when the measured phase ends: clients stop churning.
    measured: CancellationToken,
    /// Cancelled at the end: every client closes.
    stop: CancellationToken,
    /// When the drain's SIGTERM went out, unix ms (0: not yet).
    drain_signal_unix_ms: AtomicU64,
}

impl Shared {
    fn kind(&self, kind: Kind) -> &KindStats {
        &self.stats.kinds[kind as usize]
    }
}

/// Cumulative counters at one moment, for the per-second series.
#[derive(Clone, Copy, Default)]
struct Totals {
    connects: u64,
    closes: u64,
    fixes: u64,
    nearby: u64,
    published: u64,
    delivered: u64,
}

impl Totals {
    fn now(stats: &Stats) -> Totals {
        let sum = |f: fn(&KindStats) -> &AtomicU64| {
            stats
                .kinds
                .iter()
                .map(|k| f(k).load(Ordering::Relaxed))
                .sum()
        };
        Totals {
            connects: stats.connects.load(Ordering::Relaxed),
            closes: stats.closes.load(Ordering::Relaxed),
            fixes: stats.fixes.load(Ordering::Relaxed),
            nearby: stats.nearby.load(Ordering::Relaxed),
            published: sum(|k| &k.published),
            delivered: sum(|k| &k.delivered),
        }
    }
}

/// Record a [`Second`] at every wall-clock second until `stop`.
async fn sample_seconds(
    shared: Arc<Shared>,
    series: Arc<Mutex<Vec<Second>>>,
    stop: CancellationToken,
) {
    let mut last = Totals::now(&shared.stats);
    loop {
        let now_us = unix_us();
        let next_second_us = (now_us / 1_000_000 + 1) * 1_000_000;
        tokio::select! {
            () = stop.cancelled() => return,
            () = sleep(Duration::from_micros(next_second_us - now_us)) => {}
        }
        let totals = Totals::now(&shared.stats);
        lock(&series).push(Second {
            unix_s: next_second_us / 1_000_000 - 1,
            connected: shared.stats.connected_now.load(Ordering::Relaxed),
            connects: totals.connects - last.connects,
            closes: totals.closes - last.closes,
            fixes: totals.fixes - last.fixes,
            nearby: totals.nearby - last.nearby,
            published: totals.published - last.published,
            delivered: totals.delivered - last.delivered,
        });
        last = totals;
    }
}

/// RSS and CPU of the given gateways at one moment.
fn sample_gateways(pids: &[u32]) -> anyhow::Result<Vec<(procfs::Memory, CpuTime)>> {
    pids.iter()
        .map(|&pid| {
            Ok((
                procfs::memory(Some(pid)).with_context(|| format!("--gateway-pid {pid}"))?,
                procfs::cpu_time(Some(pid)).with_context(|| format!("--gateway-pid {pid}"))?,
            ))
        })
        .collect()
}

/// A gateway that exited (drained) keeps its last sample.
fn sample_gateways_lenient(
    pids: &[u32],
    last: &[(procfs::Memory, CpuTime)],
) -> Vec<(procfs::Memory, CpuTime)> {
    pids.iter()
        .zip(last)
        .map(
            |(&pid, last)| match (procfs::memory(Some(pid)), procfs::cpu_time(Some(pid))) {
                (Ok(memory), Ok(cpu)) => (memory, cpu),
                _ => *last,
            },
        )
        .collect()
}

/// `geopush_fixes_total` summed over the gateways; `None` if one does not answer (a
/// drained gateway is gone).
async fn scrape_fixes(targets: &[Target]) -> Option<u64> {
    let client = reqwest::Client::new();
    let mut total = 0u64;
    for target in targets {
        let text = client
            .get(format!("http://{}/metrics", target.authority))
            .timeout(Duration::from_secs(3))
            .send()
            .await
            .ok()?
            .text()
            .await
            .ok()?;
        let value = text.lines().find_map(|line| {
            line.strip_prefix("geopush_fixes_total ")
                .and_then(|v| v.trim().parse::<f64>().ok())
        })?;
        total += value as u64;
    }
    Some(total)
}

/// Send SIGTERM to `pid` (the operator named it with --drain-pid).
fn send_sigterm(pid: u32) -> anyhow::Result<()> {
    let status = std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .context("running kill")?;
    if !status.success() {
        bail!("kill -TERM {pid} failed ({status})");
    }
    Ok(())
}

/// Run `scenario` to its end and report. Fails fast on bad flags, an unreachable gateway or
/// API, or a first connection the gateway refuses.
pub async fn run(scenario: Scenario, args: SimArgs) -> anyhow::Result<Report> {
    args.validate(scenario)?;
    let plan = Plan::new(scenario, &args);
    let mut targets = Vec::new();
    for url in &args.url {
        let target = Target::resolve(url).await?;
        if args.source_ips > 1 && !(target.addr.is_ipv4() && target.addr.ip().is_loopback()) {
            bail!(
                "--source-ips needs gateways on 127.x.x.x addresses, not {}",
                target.addr
            );
        }
        target.check_reachable().await?;
        targets.push(target);
    }
    let cities = if plan.sends_fixes() {
        let path = args.cities.clone().unwrap_or_else(cities::default_path);
        Some(Arc::new(Cities::load(&path).context(
            "fixes need real positions: pass --cities PATH (GeoNames cities1000.csv)",
        )?))
    } else {
        None
    };
    let via = match (&args.redis_url, &args.worker_url) {
        (Some(url), _) => PublishVia::Redis {
            url: url.clone(),
            prefix: args.redis_prefix.clone(),
        },
        (None, Some(base)) => PublishVia::Api {
            base: base.clone(),
            api_key: args.api_key.clone(),
        },
        (None, None) => PublishVia::Api {
            base: format!("http://{}", targets[0].authority),
            api_key: args.api_key.clone(),
        },
    };
    if plan.publishes()
        && let PublishVia::Api { base, .. } = &via
    {
        net::check_http_healthy(base).await?;
    }

    let n = args.connections;
    let shared = Arc::new(Shared {
        plan: plan.clone(),
        targets: targets.clone(),
        secret: args.secret.clone(),
        sub_prefix: args.sub_prefix.clone(),
        source_ips: args.source_ips,
        seed: args.seed,
        cities,
        ws_config: net::client_ws_config(),
        connect_timeout: Duration::from_secs_f64(args.connect_timeout_seconds),
        slots: (0..n).map(|_| Slot::default()).collect(),
        stats: Stats::default(),
        measuring: CancellationToken::new(),
        measured: CancellationToken::new(),
        stop: CancellationToken::new(),
        drain_signal_unix_ms: AtomicU64::new(0),
    });
    let mut publisher = if plan.publishes() {
        let mut publisher = publish::spawn(shared.clone(), via, args.publishers, args.seed);
        publisher.ready().await?;
        Some(publisher)
    } else {
        None
    };

    let progress = {
        let shared = shared.clone();
        let quiet = args.quiet;
        move |phase: &str, start: Instant| {
            if quiet {
                return;
            }
            let s = &shared.stats;
            let t = Totals::now(s);
            eprintln!(
                "[{:7.1}s] {phase:<10} connected {:>6}/{n} failed {:>5} closes {:>5} \
                 reconnects {:>5} fixes {:>8} nearby {:>7} published {:>7} delivered {:>8}",
                start.elapsed().as_secs_f64(),
                s.connected_now.load(Ordering::Relaxed),
                s.failed.load(Ordering::Relaxed),
                t.closes,
                s.reconnects.load(Ordering::Relaxed),
                t.fixes,
                t.nearby,
                t.published,
                t.delivered,
            );
        }
    };

    let started_unix_ms = unix_us() / 1_000;
    let gateways_before = sample_gateways(&args.gateway_pid)?;
    let client_cpu_start = procfs::cpu_time(None)?;
    let series = Arc::new(Mutex::new(Vec::new()));
    let sampler_stop = CancellationToken::new();
    tokio::spawn(sample_seconds(
        shared.clone(),
        series.clone(),
        sampler_stop.clone(),
    ));
    let mut events = Vec::new();

    // Connect: the first client alone (its failure is the run's), then paced.
    let tracker = TaskTracker::new();
    let handshakes = Arc::new(Semaphore::new(args.concurrency));
    let start = Instant::now();
    let (first_tx, first_rx) = oneshot::channel();
    let permit = handshakes.clone().acquire_owned().await?;
    tracker.spawn(client::run(shared.clone(), 0, Some(permit), Some(first_tx)));
    match first_rx.await {
        Ok(Ok(())) => {}
        Ok(Err(reason)) => {
            shared.stop.cancel();
            sampler_stop.cancel();
            if let Some(publisher) = publisher {
                publisher.abort();
            }
            bail!(
                "the first connection to {} failed: {reason}{}",
                targets[0].url,
                net::first_failure_hint(&reason)
            );
        }
        Err(_) => bail!("the first client ended without a result"),
    }
    let mut spawned = 1;
    let mut next_progress = start + Duration::from_secs(1);
    while spawned < n {
        let due = ((start.elapsed().as_secs_f64() * args.rate) as usize + 1).min(n);
        while spawned < due {
            let permit = handshakes.clone().acquire_owned().await?;
            tracker.spawn(client::run(shared.clone(), spawned, Some(permit), None));
            spawned += 1;
        }
        if Instant::now() >= next_progress {
            progress("connecting", start);
            next_progress += Duration::from_secs(1);
        }
        if spawned < n {
            let next_at = start + Duration::from_secs_f64(spawned as f64 / args.rate);
            sleep_until(next_at.min(next_progress)).await;
        }
    }
    let attempted = || {
        let s = &shared.stats;
        (s.ever_connected.load(Ordering::Relaxed) + s.failed.load(Ordering::Relaxed)) as usize >= n
    };
    let last_deadline = Instant::now()
        + shared.connect_timeout
        + Duration::from_secs(n.div_ceil(args.concurrency) as u64 * 2 + 5);
    while !attempted() && Instant::now() < last_deadline {
        sleep(Duration::from_millis(20)).await;
        if Instant::now() >= next_progress {
            progress("connecting", start);
            next_progress += Duration::from_secs(1);
        }
    }
    let connect_seconds = start.elapsed().as_secs_f64();
    progress("connected", start);

    // Settle, then sample memory.
    sleep(Duration::from_secs_f64(args.settle_seconds)).await;
    let gateways_settled = sample_gateways(&args.gateway_pid)?;
    progress("settled", start);

    // The measured phase.
    let measure_start = Instant::now();
    events.push(Event {
        unix_ms: unix_us() / 1_000,
        label: "measuring".into(),
    });
    shared.measuring.cancel();
    let fixes_before = shared.stats.fixes.load(Ordering::Relaxed);
    let counted_before = scrape_fixes(&targets).await;
    let measure = Duration::from_secs_f64(args.seconds);
    if let Some(publisher) = publisher.as_mut() {
        publisher.go(measure);
    }
    let mut drain_at = plan
        .drain
        .map(|(pid, at)| (pid, measure_start + Duration::from_secs_f64(at)));
    let measure_end = measure_start + measure;
    while Instant::now() < measure_end {
        let next = next_progress.min(measure_end);
        match drain_at {
            Some((pid, at)) if at <= next => {
                sleep_until(at).await;
                send_sigterm(pid)?;
                let now_ms = unix_us() / 1_000;
                shared.drain_signal_unix_ms.store(now_ms, Ordering::Relaxed);
                events.push(Event {
                    unix_ms: now_ms,
                    label: format!("SIGTERM {pid}"),
                });
                if !args.quiet {
                    eprintln!("drain: sent SIGTERM to {pid}");
                }
                drain_at = None;
            }
            _ => {
                sleep_until(next).await;
                if Instant::now() >= next_progress {
                    progress("measuring", start);
                    next_progress += Duration::from_secs(1);
                }
            }
        }
    }
    shared.measured.cancel();
    let fixes_measured = shared.stats.fixes.load(Ordering::Relaxed) - fixes_before;
    let fixes_accepted_per_s = match (counted_before, scrape_fixes(&targets).await) {
        (Some(before), Some(after)) if plan.fix_interval.is_some() => {
            Some(after.saturating_sub(before) as f64 / measure_start.elapsed().as_secs_f64())
        }
        _ => None,
    };
    let publisher_cpu = match publisher {
        Some(publisher) => Some(publisher.join().await?),
        None => None,
    };
    events.push(Event {
        unix_ms: unix_us() / 1_000,
        label: "grace".into(),
    });
    let grace_end = Instant::now() + Duration::from_secs_f64(args.grace_seconds);
    while Instant::now() < grace_end {
        sleep_until(next_progress.min(grace_end)).await;
        if Instant::now() >= next_progress {
            progress("grace", start);
            next_progress += Duration::from_secs(1);
        }
    }
    let gateways_end = sample_gateways_lenient(&args.gateway_pid, &gateways_settled);
    let connected_at_end = shared.stats.connected_now.load(Ordering::Relaxed);
    let client_memory = procfs::memory(None)?;
    let seconds = start.elapsed().as_secs_f64();

    // Close everything, bounded.
    shared.stop.cancel();
    tracker.close();
    if timeout(CLOSE_TIMEOUT * 2, tracker.wait()).await.is_err() && !args.quiet {
        eprintln!("some clients did not close in time; leaving them");
    }
    sampler_stop.cancel();
    let client_cpu = procfs::cpu_time(None)?.since(&client_cpu_start);

    let s = &shared.stats;
    let connected = s.ever_connected.load(Ordering::Relaxed);
    let gateways: Vec<GatewayReport> = args
        .gateway_pid
        .iter()
        .zip(
            gateways_before
                .iter()
                .zip(&gateways_settled)
                .zip(&gateways_end),
        )
        .map(|(&pid, ((before, settled), end))| {
            let cpu = end.1.since(&before.1);
            GatewayReport {
                pid,
                before: before.0,
                settled: settled.0,
                end: end.0,
                rss_delta_kib: settled.0.vm_rss_kib as i64 - before.0.vm_rss_kib as i64,
                cores: cpu.total_s() / seconds.max(1e-9),
                cpu,
            }
        })
        .collect();
    let delivery = |kind: Kind| {
        let k = shared.kind(kind);
        let expected = k.expected.load(Ordering::Relaxed);
        let delivered = k.delivered.load(Ordering::Relaxed);
        Delivery {
            published: k.published.load(Ordering::Relaxed),
            publish_errors: k.publish_errors.load(Ordering::Relaxed),
            expected,
            delivered,
            lost: expected.saturating_sub(delivered),
            duplicates: k.duplicates.load(Ordering::Relaxed),
            latency: latency_of(&k.latency),
        }
    };
    let mut broadcasts: Vec<BroadcastReach> = lock(&s.broadcasts)
        .iter()
        .map(|(id, r)| BroadcastReach {
            id: id.clone(),
            expected: r.expected,
            reached: r.reached,
            last_ms: r.last_us as f64 / 1e3,
        })
        .collect();
    broadcasts.sort_by(|a, b| a.id.cmp(&b.id));
    let mut broadcast = delivery(Kind::Broadcast);
    broadcast.expected = broadcasts.iter().map(|b| b.expected).sum();
    broadcast.lost = broadcast.expected.saturating_sub(broadcast.delivered);
    let fixes_sent = s.fixes.load(Ordering::Relaxed);
    let take = |m: &Mutex<BTreeMap<String, u64>>| std::mem::take(&mut *lock(m));
    Ok(Report {
        scenario: scenario.name().into(),
        urls: targets.iter().map(|t| t.url.clone()).collect(),
        started_unix_ms,
        seconds,
        clients: n as u64,
        connected,
        failed: s.failed.load(Ordering::Relaxed),
        failure_reasons: take(&s.failures),
        connected_at_end,
        connect_seconds,
        connect_rate_per_s: connected as f64 / connect_seconds.max(1e-9),
        welcome: latency_of(&s.welcome),
        closes: take(&s.close_reasons),
        publish_error_reasons: take(&s.publish_error_reasons),
        reconnects: s.reconnects.load(Ordering::Relaxed),
        reconnect_gap: latency_of(&s.reconnect_gap),
        reconnect_after_drain: latency_of(&s.reconnect_after_drain),
        fixes_sent,
        fixes_per_s: fixes_measured as f64 / args.seconds,
        fixes_accepted_per_s,
        nearby_received: s.nearby.load(Ordering::Relaxed),
        fix_to_nearby: latency_of(&s.fix_to_nearby),
        users: delivery(Kind::User),
        geo: delivery(Kind::Geo),
        broadcast,
        broadcasts,
        server_errors: take(&s.server_errors),
        gateway_rss_bytes_per_connection: report::rss_per_connection(&gateways, connected),
        gateways,
        client: ClientCost {
            processes: 1,
            cpu: client_cpu,
            cores: client_cpu.total_s() / seconds.max(1e-9),
            publisher_cpu: publisher_cpu.unwrap_or_default(),
            rss_kib: client_memory.vm_rss_kib,
        },
        series: std::mem::take(&mut *lock(&series)),
        events,
    })
}
