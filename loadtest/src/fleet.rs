//! A fleet of simulated clients: the `connect` and `fixes` scenarios.
//!
//! Each client is one tokio task holding one WebSocket with small buffers. The coordinator
//! opens them at a bounded rate (and a bound on handshakes in flight), waits until every one
//! got its `welcome` or failed, lets the gateway settle, samples memory, holds the fleet for
//! the hold time (answering the gateway's pings; in the `fixes` scenario also sending a fix
//! per client per interval), then closes every socket and reports.
//!
//! The first connection is made alone: a wrong secret, path or port fails the run at once
//! with the gateway's answer instead of N identical failures.

use crate::cities::{self, Cities};
use crate::procfs::{self, CpuTime, Memory};
use anyhow::{Context, bail};
use futures_util::{SinkExt, StreamExt};
use geopush_proto::frames::{ClientFrame, LocationFrame};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, oneshot};
use tokio::time::{Instant, Interval, MissedTickBehavior, sleep, sleep_until, timeout};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Read buffer of each client socket. Server frames in these scenarios are a few hundred
/// bytes; tungstenite's default (128 KiB, allocated up front) would make the client, not the
/// gateway, the memory hog.
const CLIENT_READ_BUFFER: usize = 4 * 1024;
/// Largest frame a client accepts from the gateway.
const CLIENT_MAX_MESSAGE: usize = 1 << 20;
/// How far from a city centre a client starts, metres.
const START_RADIUS_M: f64 = 3_000.0;
/// Bound on closing the fleet at the end.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);
/// Descriptors this process needs besides its client sockets.
const SPARE_FDS: u64 = 64;

/// What the clients do once connected.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Scenario {
    /// Hold the sockets idle (optionally after one fix each).
    Connect,
    /// Send a fix per client per interval for the hold time.
    Fixes,
}

/// Everything a fleet run is told.
#[derive(Clone, Debug)]
pub struct FleetOptions {
    pub scenario: Scenario,
    /// `ws://host:port/v1/ws` (the path defaults to `/v1/ws`).
    pub url: String,
    /// HS256 secret of the gateway (its `--jwt-secret`).
    pub secret: String,
    pub connections: usize,
    /// New connections per second.
    pub rate: f64,
    /// Most handshakes in flight at once.
    pub concurrency: usize,
    /// How long to hold the fleet once every client is connected, seconds.
    pub hold_seconds: f64,
    /// Pause after the last connect before the memory sample, seconds (within the hold).
    pub settle_seconds: f64,
    /// Send one `location` fix per client right after `welcome`.
    pub fix_once: bool,
    /// `fixes` scenario: one fix per client per this many milliseconds.
    pub fix_interval_ms: u64,
    /// Gateway process to sample memory and CPU of.
    pub gateway_pid: Option<u32>,
    /// Bound on TCP connect + upgrade + `welcome`, seconds.
    pub connect_timeout_seconds: f64,
    /// Clients are `{sub_prefix}-{i}`.
    pub sub_prefix: String,
    /// Where clients start; needed when fixes are sent.
    pub cities: Option<Arc<Cities>>,
    /// Print progress lines to stderr.
    pub progress: bool,
    /// Seed of the clients' positions.
    pub seed: u64,
    /// Spread the clients over this many loopback source addresses (127.0.0.1, .2, …), so
    /// one address's ephemeral ports are not the limit; 1 = let the kernel choose.
    pub source_ips: u8,
}

impl FleetOptions {
    /// Defaults for everything but the target and the secret.
    pub fn new(url: impl Into<String>, secret: impl Into<String>) -> FleetOptions {
        FleetOptions {
            scenario: Scenario::Connect,
            url: url.into(),
            secret: secret.into(),
            connections: 100,
            rate: 500.0,
            concurrency: 200,
            hold_seconds: 10.0,
            settle_seconds: 3.0,
            fix_once: false,
            fix_interval_ms: 1_000,
            gateway_pid: None,
            connect_timeout_seconds: 10.0,
            sub_prefix: "load".into(),
            cities: None,
            progress: false,
            seed: 1,
            source_ips: 1,
        }
    }

    /// Check every value; a run refuses to start on an error.
    pub fn validate(&self) -> anyhow::Result<()> {
        if self.connections == 0 {
            bail!("--connections must be at least 1");
        }
        if !(self.rate.is_finite() && self.rate > 0.0) {
            bail!("--rate must be a positive number of connections per second");
        }
        if self.concurrency == 0 {
            bail!("--concurrency must be at least 1");
        }
        for (flag, value) in [
            ("--hold-seconds", self.hold_seconds),
            ("--settle-seconds", self.settle_seconds),
        ] {
            if !(value.is_finite() && (0.0..1e7).contains(&value)) {
                bail!("{flag} must be a number of seconds >= 0");
            }
        }
        if !(self.connect_timeout_seconds.is_finite() && self.connect_timeout_seconds > 0.0) {
            bail!("--connect-timeout-seconds must be positive");
        }
        if self.scenario == Scenario::Fixes && self.fix_interval_ms == 0 {
            bail!("--fix-interval-ms must be at least 1");
        }
        if self.sends_fixes() && self.cities.is_none() {
            bail!("sending fixes needs a cities file");
        }
        if self.source_ips == 0 || self.source_ips > 250 {
            bail!("--source-ips must be in 1..=250");
        }
        if self.secret.is_empty() {
            bail!("--secret must not be empty");
        }
        if let Some(limit) = open_files_limit() {
            let needed = self.connections as u64 + SPARE_FDS;
            if needed > limit {
                bail!(
                    "{} connections need about {needed} file descriptors, but this process may \
                     open {limit} (ulimit -n): run several loadtest processes with fewer \
                     connections each",
                    self.connections
                );
            }
        }
        Ok(())
    }

    fn sends_fixes(&self) -> bool {
        self.fix_once || self.scenario == Scenario::Fixes
    }
}

/// The soft limit on open files of this process.
fn open_files_limit() -> Option<u64> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line.split_whitespace().nth(3)?.parse().ok()
}

/// Where the fleet connects.
#[derive(Clone, Debug)]
struct Target {
    /// The full WebSocket URL, path included.
    url: String,
    /// `host:port`, for the metrics request.
    authority: String,
    /// Resolved once, so no connection waits on DNS.
    addr: SocketAddr,
}

impl Target {
    async fn resolve(url: &str) -> anyhow::Result<Target> {
        let uri: http::Uri = url
            .parse()
            .with_context(|| format!("--url {url:?} is not a URL"))?;
        match uri.scheme_str() {
            Some("ws") => {}
            Some("wss") => bail!("--url: wss:// is not supported; point the fleet at ws://"),
            _ => bail!("--url {url:?} must start with ws://"),
        }
        let authority = uri
            .authority()
            .with_context(|| format!("--url {url:?} has no host"))?;
        let host_port = format!(
            "{}:{}",
            authority.host(),
            authority.port_u16().unwrap_or(80)
        );
        let path = match uri.path_and_query().map(|p| p.as_str()) {
            None | Some("") | Some("/") => "/v1/ws",
            Some(p) => p,
        };
        let addr = tokio::net::lookup_host(&host_port)
            .await
            .with_context(|| format!("cannot resolve {host_port}"))?
            .next()
            .with_context(|| format!("{host_port} resolves to no address"))?;
        Ok(Target {
            url: format!("ws://{host_port}{path}"),
            authority: host_port,
            addr,
        })
    }
}

/// Counters the clients update as they go.
#[derive(Default)]
struct Counters {
    connected: AtomicU64,
    failed: AtomicU64,
    /// Connected, then lost before the end of the hold.
    dropped: AtomicU64,
    pings: AtomicU64,
    texts: AtomicU64,
    fixes_sent: AtomicU64,
}

/// State shared by the coordinator and every client.
struct Fleet {
    target: Target,
    options: FleetOptions,
    ws_config: WebSocketConfig,
    counters: Counters,
    /// `welcome` latencies (TCP connect → `welcome` received), microseconds.
    latencies_us: Mutex<Vec<u32>>,
    failures: Mutex<BTreeMap<String, u64>>,
    drops: Mutex<BTreeMap<String, u64>>,
    /// `error` frames received, by code.
    server_errors: Mutex<BTreeMap<String, u64>>,
    /// Cancelled when every client has connected or failed: the hold begins.
    hold_started: CancellationToken,
    /// Cancelled at the end of the hold: every client closes.
    stop: CancellationToken,
}

fn count(map: &Mutex<BTreeMap<String, u64>>, key: String) {
    let mut map = map.lock().unwrap_or_else(|p| p.into_inner());
    // Bound the number of distinct reasons kept (they carry server text).
    if map.len() < 32 || map.contains_key(&key) {
        *map.entry(key).or_default() += 1;
    } else {
        *map.entry("other".into()).or_default() += 1;
    }
}

fn unix_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// The part of a server frame the fleet looks at.
#[derive(Deserialize)]
struct FrameKind {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    code: Option<String>,
}

type Ws = WebSocketStream<TcpStream>;

/// A simulated client's position, moving a little with each fix.
struct Walker {
    rng: StdRng,
    lat: f64,
    lon: f64,
}

impl Walker {
    fn new(cities: &Cities, seed: u64) -> Walker {
        let mut rng = StdRng::seed_from_u64(seed);
        let (lat, lon) = cities.sample(&mut rng, START_RADIUS_M);
        Walker { rng, lat, lon }
    }

    /// The next fix as a frame: a few metres on from the last one.
    fn next_frame(&mut self) -> String {
        let metres = self.rng.gen_range(1.0..15.0);
        (self.lat, self.lon) =
            cities::step(self.lat, self.lon, metres, self.rng.gen_range(0.0..360.0));
        let frame = ClientFrame::Location(LocationFrame {
            lat: (self.lat * 1e7).round() / 1e7,
            lon: (self.lon * 1e7).round() / 1e7,
            accuracy_m: Some(self.rng.gen_range(3.0f64..20.0).round()),
            ts: Some(unix_ms()),
            speed_mps: None,
            heading_deg: None,
            radius_m: None,
            limit: None,
        });
        serde_json::to_string(&frame).unwrap_or_default()
    }
}

/// Open one client: TCP, upgrade with a fresh token, wait for `welcome`.
async fn open(fleet: &Fleet, index: usize) -> Result<Ws, String> {
    let options = &fleet.options;
    let sub = format!("{}-{index}", options.sub_prefix);
    let ttl = (options.hold_seconds + options.connect_timeout_seconds) as u64 + 3_600;
    let token = geopush_gateway::auth::mint_hs256(&options.secret, &sub, Some("load"), ttl)
        .map_err(|e| format!("minting a token: {e}"))?;
    let mut request = fleet
        .target
        .url
        .as_str()
        .into_client_request()
        .map_err(|e| format!("bad request: {e}"))?;
    let bearer = http::HeaderValue::from_str(&format!("Bearer {token}"))
        .map_err(|e| format!("bad token header: {e}"))?;
    request
        .headers_mut()
        .insert(http::header::AUTHORIZATION, bearer);

    let tcp = connect_tcp(fleet, index)
        .await
        .map_err(|e| format!("tcp connect: {e}"))?;
    let _ = tcp.set_nodelay(true);
    let (mut ws, _response) =
        tokio_tungstenite::client_async_with_config(request, tcp, Some(fleet.ws_config))
            .await
            .map_err(|e| match e {
                tungstenite::Error::Http(response) => {
                    let body = response
                        .body()
                        .as_deref()
                        .map(String::from_utf8_lossy)
                        .unwrap_or_default();
                    let body: String = body.chars().take(160).collect();
                    format!("upgrade refused: HTTP {} {body}", response.status())
                }
                other => format!("upgrade: {other}"),
            })?;
    loop {
        match ws.next().await {
            Some(Ok(Message::Text(text))) => {
                if serde_json::from_str::<FrameKind>(text.as_str())
                    .is_ok_and(|f| f.kind == "welcome")
                {
                    fleet.counters.texts.fetch_add(1, Ordering::Relaxed);
                    return Ok(ws);
                }
            }
            Some(Ok(Message::Close(frame))) => {
                let code = frame.map(|f| u16::from(f.code)).unwrap_or(1005);
                return Err(format!("closed before welcome (code {code})"));
            }
            Some(Ok(_)) => {}
            Some(Err(e)) => return Err(format!("before welcome: {e}")),
            None => return Err("connection ended before welcome".into()),
        }
    }
}

/// A TCP connection to the gateway, from the client's share of the source addresses.
async fn connect_tcp(fleet: &Fleet, index: usize) -> std::io::Result<TcpStream> {
    let spread = usize::from(fleet.options.source_ips);
    if spread <= 1 {
        return TcpStream::connect(fleet.target.addr).await;
    }
    let source = Ipv4Addr::new(127, 0, 0, 1 + (index % spread) as u8);
    let socket = TcpSocket::new_v4()?;
    socket.bind(SocketAddr::new(source.into(), 0))?;
    socket.connect(fleet.target.addr).await
}

async fn tick(interval: &mut Option<Interval>) {
    match interval {
        Some(interval) => {
            interval.tick().await;
        }
        None => std::future::pending().await,
    }
}

/// One client, from connect to close. `first` hears whether the connect worked.
async fn client(
    fleet: Arc<Fleet>,
    index: usize,
    permit: OwnedSemaphorePermit,
    first: Option<oneshot::Sender<Result<(), String>>>,
) {
    let started = Instant::now();
    let connect_timeout = Duration::from_secs_f64(fleet.options.connect_timeout_seconds);
    let opened = match timeout(connect_timeout, open(&fleet, index)).await {
        Ok(result) => result,
        Err(_) => Err(format!(
            "no welcome within {:.1} s",
            connect_timeout.as_secs_f64()
        )),
    };
    drop(permit);
    let mut ws = match opened {
        Ok(ws) => ws,
        Err(reason) => {
            fleet.counters.failed.fetch_add(1, Ordering::Relaxed);
            count(&fleet.failures, reason.clone());
            if let Some(first) = first {
                let _ = first.send(Err(reason));
            }
            return;
        }
    };
    let micros = started.elapsed().as_micros().min(u128::from(u32::MAX)) as u32;
    fleet
        .latencies_us
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .push(micros);
    fleet.counters.connected.fetch_add(1, Ordering::Relaxed);
    if let Some(first) = first {
        let _ = first.send(Ok(()));
    }

    let options = &fleet.options;
    let mut walker = options
        .cities
        .as_deref()
        .filter(|_| options.sends_fixes())
        .map(|cities| Walker::new(cities, options.seed.wrapping_add(index as u64)));
    let ended = hold(&fleet, &mut ws, walker.as_mut()).await;
    match ended {
        None => {
            // The end of the hold: close politely, bounded.
            let _ = timeout(CLOSE_TIMEOUT, async {
                let _ = ws.close(None).await;
                while let Some(Ok(_)) = ws.next().await {}
            })
            .await;
        }
        Some(reason) => {
            fleet.counters.dropped.fetch_add(1, Ordering::Relaxed);
            count(&fleet.drops, reason);
        }
    }
}

/// Hold a connected client until the fleet stops; `Some(reason)` if it was lost first.
async fn hold(fleet: &Fleet, ws: &mut Ws, mut walker: Option<&mut Walker>) -> Option<String> {
    let options = &fleet.options;
    if options.fix_once
        && let Some(walker) = walker.as_deref_mut()
    {
        if let Err(e) = ws.send(Message::text(walker.next_frame())).await {
            return Some(format!("sending a fix: {e}"));
        }
        fleet.counters.fixes_sent.fetch_add(1, Ordering::Relaxed);
    }
    let fix_every = (options.scenario == Scenario::Fixes)
        .then(|| Duration::from_millis(options.fix_interval_ms));
    let mut ticker: Option<Interval> = None;
    loop {
        tokio::select! {
            biased;
            () = fleet.stop.cancelled() => return None,
            () = fleet.hold_started.cancelled(), if ticker.is_none() && fix_every.is_some() => {
                // Spread the fleet's fixes evenly over the interval.
                let every = fix_every.unwrap_or(Duration::from_secs(1));
                let offset = every.mul_f64(rand::random::<f64>());
                let mut interval = tokio::time::interval_at(Instant::now() + offset, every);
                interval.set_missed_tick_behavior(MissedTickBehavior::Delay);
                ticker = Some(interval);
            }
            message = ws.next() => match message {
                Some(Ok(Message::Text(text))) => {
                    fleet.counters.texts.fetch_add(1, Ordering::Relaxed);
                    if let Ok(FrameKind { kind, code }) = serde_json::from_str(text.as_str())
                        && kind == "error"
                    {
                        count(&fleet.server_errors, code.unwrap_or_else(|| "?".into()));
                    }
                }
                // tungstenite queues the pong and flushes it on the next read.
                Some(Ok(Message::Ping(_))) => {
                    fleet.counters.pings.fetch_add(1, Ordering::Relaxed);
                }
                Some(Ok(Message::Close(frame))) => {
                    let code = frame.map(|f| u16::from(f.code)).unwrap_or(1005);
                    return Some(format!("closed by the gateway (code {code})"));
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => return Some(format!("read: {e}")),
                None => return Some("connection ended".into()),
            },
            () = tick(&mut ticker) => {
                let Some(walker) = walker.as_deref_mut() else { continue };
                if let Err(e) = ws.send(Message::text(walker.next_frame())).await {
                    return Some(format!("sending a fix: {e}"));
                }
                fleet.counters.fixes_sent.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

/// Latency percentiles, milliseconds.
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct Percentiles {
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

fn percentiles(mut micros: Vec<u32>) -> Percentiles {
    if micros.is_empty() {
        return Percentiles::default();
    }
    micros.sort_unstable();
    let at = |q: f64| {
        let i = ((micros.len() as f64 - 1.0) * q).round() as usize;
        f64::from(micros[i.min(micros.len() - 1)]) / 1_000.0
    };
    Percentiles {
        p50_ms: at(0.5),
        p90_ms: at(0.9),
        p99_ms: at(0.99),
        max_ms: at(1.0),
    }
}

/// The gateway process as seen from `/proc`.
#[derive(Clone, Debug, Serialize)]
pub struct GatewayReport {
    pub pid: u32,
    pub before: Memory,
    /// After every client connected and the settle pause.
    pub after_settle: Memory,
    /// At the end of the hold, before the fleet closes.
    pub end_of_hold: Memory,
    /// VmRSS after settle − before, KiB.
    pub rss_delta_kib: i64,
    /// `rss_delta_kib` × 1024 / connected.
    pub rss_bytes_per_connection: f64,
    /// The same for anonymous memory only.
    pub anon_bytes_per_connection: f64,
    /// CPU the gateway used while the fleet connected.
    pub cpu_connect: CpuTime,
    /// CPU the gateway used during the hold.
    pub cpu_hold: CpuTime,
}

/// The load client's own cost, so a client bottleneck is not taken for a server one.
#[derive(Clone, Debug, Serialize)]
pub struct ClientReport {
    pub cpu_connect: CpuTime,
    pub cpu_hold: CpuTime,
    pub cpu_total: CpuTime,
    /// Client memory after settle.
    pub memory: Memory,
    pub rss_bytes_per_connection: f64,
}

/// Figures read from the gateway's `/metrics` (best effort).
#[derive(Clone, Debug, Default, Serialize)]
pub struct ServerMetrics {
    /// `geopush_connections` after settle.
    pub connections: Option<f64>,
    /// `geopush_fixes_total` gained during the run.
    pub fixes_indexed: Option<f64>,
    /// `geopush_fixes_coalesced_total` gained during the run.
    pub fixes_coalesced: Option<f64>,
}

/// Everything a run measured.
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    pub scenario: Scenario,
    pub url: String,
    pub connections_requested: usize,
    pub connected: u64,
    pub failed: u64,
    pub failure_reasons: BTreeMap<String, u64>,
    /// First connect → last client connected or failed, seconds.
    pub connect_seconds: f64,
    /// `connected / connect_seconds`.
    pub connect_rate_per_s: f64,
    pub rate_asked_per_s: f64,
    /// TCP connect → `welcome`.
    pub welcome_latency: Percentiles,
    pub hold_seconds: f64,
    pub fix_once: bool,
    pub fix_interval_ms: Option<u64>,
    pub fixes_sent: u64,
    /// Fixes sent per second of hold (`fixes` scenario).
    pub fixes_per_s: f64,
    /// Clients lost before the end of the hold, and why.
    pub dropped: u64,
    pub drop_reasons: BTreeMap<String, u64>,
    pub pings_received: u64,
    pub text_frames_received: u64,
    pub server_errors: BTreeMap<String, u64>,
    pub gateway: Option<GatewayReport>,
    pub server_metrics: ServerMetrics,
    pub client: ClientReport,
}

impl Report {
    /// A human-readable summary.
    pub fn summary(&self) -> String {
        use std::fmt::Write;
        let mut s = String::new();
        let _ = writeln!(
            s,
            "== geopush-loadtest {:?} against {}",
            self.scenario, self.url
        );
        let _ = writeln!(
            s,
            "connected     {} of {} ({} failed) in {:.2} s: {:.0}/s (asked {:.0}/s)",
            self.connected,
            self.connections_requested,
            self.failed,
            self.connect_seconds,
            self.connect_rate_per_s,
            self.rate_asked_per_s
        );
        for (reason, n) in &self.failure_reasons {
            let _ = writeln!(s, "  failed       {n} × {reason}");
        }
        let l = &self.welcome_latency;
        let _ = writeln!(
            s,
            "welcome in    p50 {:.2} ms, p90 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
            l.p50_ms, l.p90_ms, l.p99_ms, l.max_ms
        );
        let _ = writeln!(
            s,
            "held          {:.1} s; dropped {}; pings {}; text frames {}; fixes sent {}{}",
            self.hold_seconds,
            self.dropped,
            self.pings_received,
            self.text_frames_received,
            self.fixes_sent,
            if self.scenario == Scenario::Fixes {
                format!(" ({:.0}/s)", self.fixes_per_s)
            } else {
                String::new()
            }
        );
        for (reason, n) in &self.drop_reasons {
            let _ = writeln!(s, "  dropped      {n} × {reason}");
        }
        for (code, n) in &self.server_errors {
            let _ = writeln!(s, "  error frame  {n} × {code}");
        }
        if let Some(g) = &self.gateway {
            let _ = writeln!(
                s,
                "gateway RSS   {} KiB before, {} KiB after settle, {} KiB at end of hold \
                 (pid {}, {} threads)",
                g.before.vm_rss_kib,
                g.after_settle.vm_rss_kib,
                g.end_of_hold.vm_rss_kib,
                g.pid,
                g.after_settle.threads
            );
            let _ = writeln!(
                s,
                "gateway/conn  {:.0} bytes RSS ({:.2} KiB), {:.0} bytes anonymous",
                g.rss_bytes_per_connection,
                g.rss_bytes_per_connection / 1024.0,
                g.anon_bytes_per_connection
            );
            let _ = writeln!(
                s,
                "gateway CPU   {:.2} s while connecting, {:.2} s during the hold",
                g.cpu_connect.total_s(),
                g.cpu_hold.total_s()
            );
        }
        let m = &self.server_metrics;
        if m.connections.is_some() || m.fixes_indexed.is_some() {
            let show = |v: Option<f64>| v.map_or("?".into(), |v| format!("{v:.0}"));
            let _ = writeln!(
                s,
                "gateway says  {} connections; {} fixes indexed, {} coalesced",
                show(m.connections),
                show(m.fixes_indexed),
                show(m.fixes_coalesced)
            );
        }
        let c = &self.client;
        let _ = writeln!(
            s,
            "client        CPU {:.2} s connecting + {:.2} s holding = {:.2} s \
             (user {:.2}, sys {:.2}); RSS {} KiB ({:.0} bytes/conn), {} threads",
            c.cpu_connect.total_s(),
            c.cpu_hold.total_s(),
            c.cpu_total.total_s(),
            c.cpu_total.user_s,
            c.cpu_total.system_s,
            c.memory.vm_rss_kib,
            c.rss_bytes_per_connection,
            c.memory.threads
        );
        s
    }
}

/// GET `/metrics` from the gateway and sum the samples of each metric in `names`.
async fn scrape(target: &Target, names: &[&str]) -> Option<Vec<Option<f64>>> {
    let fetch = async {
        let mut tcp = TcpStream::connect(target.addr).await.ok()?;
        let request = format!(
            "GET /metrics HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n",
            target.authority
        );
        tcp.write_all(request.as_bytes()).await.ok()?;
        let mut body = Vec::new();
        tcp.read_to_end(&mut body).await.ok()?;
        String::from_utf8(body).ok()
    };
    let text = timeout(Duration::from_secs(3), fetch).await.ok()??;
    Some(
        names
            .iter()
            .map(|name| {
                let mut sum = None;
                for line in text.lines() {
                    let Some(rest) = line.strip_prefix(name) else {
                        continue;
                    };
                    if !(rest.starts_with(' ') || rest.starts_with('{')) {
                        continue;
                    }
                    let value = rest.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok());
                    if let Some(v) = value {
                        *sum.get_or_insert(0.0) += v;
                    }
                }
                sum
            })
            .collect(),
    )
}

fn gateway_sample(pid: Option<u32>) -> anyhow::Result<Option<(Memory, CpuTime)>> {
    pid.map(|pid| {
        Ok((
            procfs::memory(Some(pid)).with_context(|| format!("--gateway-pid {pid}"))?,
            procfs::cpu_time(Some(pid)).with_context(|| format!("--gateway-pid {pid}"))?,
        ))
    })
    .transpose()
}

const METRIC_NAMES: [&str; 3] = [
    "geopush_connections",
    "geopush_fixes_total",
    "geopush_fixes_coalesced_total",
];

/// Run a fleet to the end and report. Fails fast on bad options, an unreachable gateway or
/// a first connection the gateway refuses.
pub async fn run(options: FleetOptions) -> anyhow::Result<Report> {
    options.validate()?;
    let target = Target::resolve(&options.url).await?;
    if options.source_ips > 1 && !(target.addr.is_ipv4() && target.addr.ip().is_loopback()) {
        bail!(
            "--source-ips needs a gateway on a 127.x.x.x address, not {}",
            target.addr
        );
    }
    match timeout(Duration::from_secs(3), TcpStream::connect(target.addr)).await {
        Ok(Ok(_)) => {}
        Ok(Err(e)) => bail!(
            "cannot reach the gateway at {} ({}): {e}",
            target.addr,
            target.url
        ),
        Err(_) => bail!(
            "cannot reach the gateway at {} ({}): no answer in 3 s",
            target.addr,
            target.url
        ),
    }
    let gateway_before = gateway_sample(options.gateway_pid)?;
    let metrics_before = scrape(&target, &METRIC_NAMES).await;
    let client_cpu_start = procfs::cpu_time(None)?;

    let n = options.connections;
    let fleet = Arc::new(Fleet {
        target: target.clone(),
        ws_config: WebSocketConfig::default()
            .read_buffer_size(CLIENT_READ_BUFFER)
            .write_buffer_size(0)
            .max_message_size(Some(CLIENT_MAX_MESSAGE))
            .max_frame_size(Some(CLIENT_MAX_MESSAGE)),
        options: options.clone(),
        counters: Counters::default(),
        latencies_us: Mutex::new(Vec::with_capacity(n)),
        failures: Mutex::default(),
        drops: Mutex::default(),
        server_errors: Mutex::default(),
        hold_started: CancellationToken::new(),
        stop: CancellationToken::new(),
    });
    let tracker = TaskTracker::new();
    let handshakes = Arc::new(Semaphore::new(options.concurrency));
    let progress = |phase: &str, start: Instant| {
        if options.progress {
            let c = &fleet.counters;
            eprintln!(
                "[{:7.1}s] {phase:<10} connected {:>6}/{n}  failed {:>5}  dropped {:>5}  \
                 pings {:>6}  fixes {:>8}",
                start.elapsed().as_secs_f64(),
                c.connected.load(Ordering::Relaxed),
                c.failed.load(Ordering::Relaxed),
                c.dropped.load(Ordering::Relaxed),
                c.pings.load(Ordering::Relaxed),
                c.fixes_sent.load(Ordering::Relaxed),
            );
        }
    };

    // The first client alone: its failure is the whole run's.
    let start = Instant::now();
    let (first_tx, first_rx) = oneshot::channel();
    let permit = handshakes.clone().acquire_owned().await?;
    tracker.spawn(client(fleet.clone(), 0, permit, Some(first_tx)));
    match first_rx.await {
        Ok(Ok(())) => {}
        Ok(Err(reason)) => {
            let hint = if reason.contains("401") {
                " (is --secret the gateway's --jwt-secret?)"
            } else if reason.contains("404") {
                " (the WebSocket path is /v1/ws)"
            } else {
                ""
            };
            fleet.stop.cancel();
            bail!(
                "the first connection to {} failed: {reason}{hint}",
                target.url
            );
        }
        Err(_) => bail!("the first client ended without a result"),
    }

    // The rest, paced: client i starts at start + i / rate, at most `concurrency` in flight.
    let mut spawned = 1;
    let mut next_progress = start + Duration::from_secs(1);
    while spawned < n {
        let due = ((start.elapsed().as_secs_f64() * options.rate) as usize + 1).min(n);
        while spawned < due {
            let permit = handshakes.clone().acquire_owned().await?;
            tracker.spawn(client(fleet.clone(), spawned, permit, None));
            spawned += 1;
        }
        if Instant::now() >= next_progress {
            progress("connecting", start);
            next_progress += Duration::from_secs(1);
        }
        if spawned < n {
            let next_at = start + Duration::from_secs_f64(spawned as f64 / options.rate);
            sleep_until(next_at.min(next_progress)).await;
        }
    }
    // Every client has started; wait for the stragglers, bounded by their connect timeout.
    let done = || {
        let c = &fleet.counters;
        (c.connected.load(Ordering::Relaxed) + c.failed.load(Ordering::Relaxed)) as usize >= n
    };
    let last_deadline = Instant::now()
        + Duration::from_secs_f64(options.connect_timeout_seconds)
        + Duration::from_secs(n.div_ceil(options.concurrency) as u64 * 2 + 5);
    while !done() && Instant::now() < last_deadline {
        sleep(Duration::from_millis(20)).await;
        if Instant::now() >= next_progress {
            progress("connecting", start);
            next_progress += Duration::from_secs(1);
        }
    }
    let connected_at = Instant::now();
    let connect_seconds = (connected_at - start).as_secs_f64();
    progress("connected", start);
    let client_cpu_connected = procfs::cpu_time(None)?;
    let gateway_connected = gateway_sample(options.gateway_pid)?;
    fleet.hold_started.cancel();

    // Settle, then sample memory.
    let hold = Duration::from_secs_f64(options.hold_seconds);
    let settle = Duration::from_secs_f64(options.settle_seconds).min(hold);
    sleep(settle).await;
    let gateway_settled = gateway_sample(options.gateway_pid)?;
    let client_memory = procfs::memory(None)?;
    let metrics_settled = scrape(&target, &METRIC_NAMES).await;
    progress("settled", start);

    // Hold.
    let hold_end = connected_at + hold;
    while Instant::now() < hold_end {
        sleep_until(hold_end.min(Instant::now() + Duration::from_secs(10))).await;
        progress("holding", start);
    }
    let gateway_end = gateway_sample(options.gateway_pid)?;
    let metrics_end = scrape(&target, &METRIC_NAMES).await;
    let client_cpu_held = procfs::cpu_time(None)?;

    // Close everything, bounded.
    fleet.stop.cancel();
    tracker.close();
    if timeout(CLOSE_TIMEOUT * 3, tracker.wait()).await.is_err() && options.progress {
        eprintln!("some clients did not close in time; leaving them");
    }
    let client_cpu_end = procfs::cpu_time(None)?;

    let c = &fleet.counters;
    let connected = c.connected.load(Ordering::Relaxed);
    let per_connection = |kib: i64| {
        if connected == 0 {
            0.0
        } else {
            kib as f64 * 1024.0 / connected as f64
        }
    };
    let gateway = match (
        options.gateway_pid,
        gateway_before,
        gateway_connected,
        gateway_settled,
        gateway_end,
    ) {
        (Some(pid), Some(before), Some(connected_sample), Some(settled), Some(end)) => {
            let rss_delta_kib = settled.0.vm_rss_kib as i64 - before.0.vm_rss_kib as i64;
            let anon_delta_kib = settled.0.rss_anon_kib as i64 - before.0.rss_anon_kib as i64;
            Some(GatewayReport {
                pid,
                before: before.0,
                after_settle: settled.0,
                end_of_hold: end.0,
                rss_delta_kib,
                rss_bytes_per_connection: per_connection(rss_delta_kib),
                anon_bytes_per_connection: per_connection(anon_delta_kib),
                cpu_connect: connected_sample.1.since(&before.1),
                cpu_hold: end.1.since(&connected_sample.1),
            })
        }
        _ => None,
    };
    let delta = |i: usize| match (&metrics_before, &metrics_end) {
        (Some(before), Some(end)) => Some(end[i]? - before[i].unwrap_or(0.0)),
        _ => None,
    };
    let server_metrics = ServerMetrics {
        connections: metrics_settled.as_ref().and_then(|m| m[0]),
        fixes_indexed: delta(1),
        fixes_coalesced: delta(2),
    };
    let take = |m: &Mutex<BTreeMap<String, u64>>| {
        std::mem::take(&mut *m.lock().unwrap_or_else(|p| p.into_inner()))
    };
    let latencies =
        std::mem::take(&mut *fleet.latencies_us.lock().unwrap_or_else(|p| p.into_inner()));
    let fixes_sent = c.fixes_sent.load(Ordering::Relaxed);
    Ok(Report {
        scenario: options.scenario,
        url: target.url.clone(),
        connections_requested: n,
        connected,
        failed: c.failed.load(Ordering::Relaxed),
        failure_reasons: take(&fleet.failures),
        connect_seconds,
        connect_rate_per_s: connected as f64 / connect_seconds.max(1e-9),
        rate_asked_per_s: options.rate,
        welcome_latency: percentiles(latencies),
        hold_seconds: options.hold_seconds,
        fix_once: options.fix_once,
        fix_interval_ms: (options.scenario == Scenario::Fixes).then_some(options.fix_interval_ms),
        fixes_sent,
        fixes_per_s: if options.scenario == Scenario::Fixes && options.hold_seconds > 0.0 {
            fixes_sent as f64 / options.hold_seconds
        } else {
            0.0
        },
        dropped: c.dropped.load(Ordering::Relaxed),
        drop_reasons: take(&fleet.drops),
        pings_received: c.pings.load(Ordering::Relaxed),
        text_frames_received: c.texts.load(Ordering::Relaxed),
        server_errors: take(&fleet.server_errors),
        gateway,
        server_metrics,
        client: ClientReport {
            cpu_connect: client_cpu_connected.since(&client_cpu_start),
            cpu_hold: client_cpu_held.since(&client_cpu_connected),
            cpu_total: client_cpu_end.since(&client_cpu_start),
            memory: client_memory,
            rss_bytes_per_connection: per_connection(client_memory.vm_rss_kib as i64),
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_options_are_refused() {
        let ok = FleetOptions::new("ws://127.0.0.1:1/v1/ws", "s");
        ok.validate().expect("defaults");
        let mut o = ok.clone();
        o.connections = 0;
        assert!(o.validate().is_err());
        let mut o = ok.clone();
        o.rate = 0.0;
        assert!(o.validate().is_err());
        let mut o = ok.clone();
        o.rate = f64::NAN;
        assert!(o.validate().is_err());
        let mut o = ok.clone();
        o.fix_once = true;
        assert!(o.validate().is_err(), "fixes need cities");
        let mut o = ok.clone();
        o.source_ips = 0;
        assert!(o.validate().is_err());
        let mut o = ok;
        o.connections = 10_000_000;
        assert!(o.validate().is_err(), "more than the fd limit");
    }

    #[tokio::test]
    async fn urls_get_the_default_path_and_refuse_wss() {
        let t = Target::resolve("ws://127.0.0.1:9").await.expect("resolve");
        assert_eq!(t.url, "ws://127.0.0.1:9/v1/ws");
        let t = Target::resolve("ws://127.0.0.1:9/x?y=1")
            .await
            .expect("resolve");
        assert_eq!(t.url, "ws://127.0.0.1:9/x?y=1");
        assert!(Target::resolve("wss://127.0.0.1:9").await.is_err());
        assert!(Target::resolve("http://127.0.0.1:9").await.is_err());
    }

    #[tokio::test]
    async fn an_unreachable_gateway_fails_fast() {
        // Bind and drop a listener to find a closed port.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("port")
            .port();
        let options = FleetOptions::new(format!("ws://127.0.0.1:{port}/v1/ws"), "s");
        let error = run(options).await.expect_err("nothing listens");
        assert!(error.to_string().contains("cannot reach"), "{error}");
    }

    #[test]
    fn percentiles_of_a_few_values() {
        let p = percentiles(vec![1_000, 2_000, 3_000, 4_000, 100_000]);
        assert_eq!(p.p50_ms, 3.0);
        assert_eq!(p.max_ms, 100.0);
    }
}
