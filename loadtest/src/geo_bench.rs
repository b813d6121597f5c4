//! `geo-bench`: geopush's `nearby` beside Redis `GEOSEARCH` on the same places and queries.
//!
//! Draws N places clustered around real cities and Q query points the same way (the same
//! algorithm and seeds as `gateway/benches/geo.rs`; both print a fingerprint of the data),
//! then, in one run on one machine:
//!
//! 1. bulk-loads a [`PlacesReplica`] and times every `PlacesSnapshot::nearby` (radius 500 m,
//!    limit 20) one by one with `Instant`, after a warm-up;
//! 2. starts its own `redis-server` on a free loopback port (`--save "" --appendonly no`),
//!    loads the places with pipelined `GEOADD` batches, and times every
//!    `GEOSEARCH key FROMLONLAT lon lat BYRADIUS 500 m ASC COUNT 20 WITHDIST` round trip,
//!    sequentially from one client (and `PING`, the floor under any call): first on a
//!    blocking connection (the lowest latency a client can get), then on an async
//!    multiplexed one on a current-thread tokio runtime (what a gateway task would pay);
//! 3. compares the result sets on a sample of queries (ids, order, distances);
//! 4. stops the server by its PID. A watchdog kills it and exits if the run outlives
//!    `--max-seconds`, and every Redis call has a timeout, so the run always ends.
//!
//! Redis measures on a sphere of radius 6,372,797.56 m and geopush on 6,371,008.8 m (IUGG
//! mean), so Redis's distances are 0.028% longer (0.14 m at 500 m), and it stores positions
//! as 52-bit geohashes (within about 0.3 m). Places within a metre of the radius, or of the
//! last distance of a full result, may legitimately be in one result and not the other, or
//! swap places; the comparison counts those as agreeing up to ties.

use crate::procfs;
use anyhow::{Context, bail};
use clap::Args;
use geopush_gateway::geo::places::NearbyHit;
use geopush_gateway::geo::{PlacesReplica, PlacesSnapshot, metres_between, unit_vector};
use geopush_proto::{EARTH_RADIUS_M, Place, PlaceFence, Polygon};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;
use std::f64::consts::TAU;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// Redis's earth radius for GEO commands (`geohash_helper.c`).
pub const REDIS_EARTH_RADIUS_M: f64 = 6_372_797.560_856;
/// Seeds shared with `gateway/benches/geo.rs`, so both draw the same data.
const PLACES_SEED: u64 = 2024;
const QUERIES_SEED: u64 = 7;
const METRES_PER_DEGREE: f64 = 111_320.0;
/// The sorted set the places go into.
const KEY: &str = "geobench:places";
/// How close (metres) to the radius or to a full result's last distance a place must be for
/// a difference between the two results to count as a tie.
const TIE_TOLERANCE_M: f64 = 1.0;

/// Options of `geopush-loadtest geo-bench`.
#[derive(Args, Clone, Debug)]
pub struct GeoBenchArgs {
    /// Places to draw around cities.
    #[arg(long, default_value_t = 1_000_000)]
    pub places: usize,
    /// Queries timed one by one (after the warm-up), for each engine.
    #[arg(long, default_value_t = 200_000)]
    pub queries: usize,
    /// Untimed queries before each timed pass.
    #[arg(long, default_value_t = 20_000)]
    pub warmup: usize,
    /// `nearby` radius, metres.
    #[arg(long, default_value_t = 500.0)]
    pub radius_m: f64,
    /// Most places per result.
    #[arg(long, default_value_t = 20)]
    pub limit: usize,
    /// Queries whose results are compared between the two engines.
    #[arg(long, default_value_t = 10_000)]
    pub compare: usize,
    /// Members per `GEOADD`; a pipeline carries 16 of them.
    #[arg(long, default_value_t = 1_000)]
    pub geoadd_batch: usize,
    /// GeoNames cities1000 CSV the places cluster around.
    #[arg(long, env = "GEOPUSH_CITIES_FILE")]
    pub cities: Option<PathBuf>,
    /// The redis-server binary to start.
    #[arg(long, default_value = "redis-server")]
    pub redis_server: PathBuf,
    /// Skip the async client pass.
    #[arg(long)]
    pub no_async: bool,
    /// Bound on the run once redis-server is up: past it, the server is killed and the run
    /// fails.
    #[arg(long, default_value_t = 900)]
    pub max_seconds: u64,
    /// Write the report as JSON to this file.
    #[arg(long)]
    pub json_report: Option<PathBuf>,
}

/// Latency percentiles of one pass, microseconds.
#[derive(Clone, Debug, Serialize)]
pub struct Latency {
    pub count: usize,
    pub mean_us: f64,
    pub p50_us: f64,
    pub p90_us: f64,
    pub p99_us: f64,
    pub p999_us: f64,
    pub max_us: f64,
}

impl Latency {
    fn from_ns(mut ns: Vec<u64>) -> Latency {
        ns.sort_unstable();
        let n = ns.len().max(1);
        let at = |q: f64| {
            ns.get(((q * n as f64).ceil() as usize).clamp(1, n) - 1)
                .map_or(0.0, |&v| v as f64 / 1_000.0)
        };
        Latency {
            count: ns.len(),
            mean_us: ns.iter().sum::<u64>() as f64 / n as f64 / 1_000.0,
            p50_us: at(0.50),
            p90_us: at(0.90),
            p99_us: at(0.99),
            p999_us: at(0.999),
            max_us: ns.last().map_or(0.0, |&v| v as f64 / 1_000.0),
        }
    }

    fn row(&self, label: &str) -> String {
        format!(
            "{label:<28} {:>9.2} {:>9.2} {:>9.2} {:>9.2} {:>9.2} {:>10.2}\n",
            self.mean_us, self.p50_us, self.p90_us, self.p99_us, self.p999_us, self.max_us
        )
    }
}

/// How the two engines' results compare on the sample.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Agreement {
    pub queries: usize,
    /// Same ids in the same order.
    pub identical: usize,
    /// Different only by places within `TIE_TOLERANCE_M` of the radius or of the cut at the
    /// limit, or by the order of places at (almost) equal distances.
    pub ties_only: usize,
    pub disagree: usize,
    /// Largest |Redis distance − geopush distance| over places in both results, metres.
    pub max_distance_diff_m: f64,
    /// The same after scaling Redis's distance to geopush's earth radius.
    pub max_scaled_distance_diff_m: f64,
    /// A few disagreeing queries, for a look.
    pub examples: Vec<String>,
}

/// What `geo-bench` measured.
#[derive(Clone, Debug, Serialize)]
pub struct GeoBenchReport {
    pub places: usize,
    pub fences: usize,
    pub cities: usize,
    pub queries: usize,
    pub radius_m: f64,
    pub limit: usize,
    pub fingerprint: f64,
    pub mean_hits: f64,
    pub empty_fraction: f64,
    pub full_fraction: f64,
    pub geopush_build_s: f64,
    pub geopush_rss_growth_mib: f64,
    pub redis_version: String,
    pub redis_load_s: f64,
    pub redis_used_memory_mib: f64,
    pub geopush: Latency,
    /// `PING` round trips on the blocking connection: the floor under any Redis call.
    pub redis_ping: Latency,
    pub redis_sync: Latency,
    pub redis_async: Option<Latency>,
    pub ratio_p50: f64,
    pub ratio_p99: f64,
    pub agreement: Agreement,
}

impl GeoBenchReport {
    pub fn summary(&self) -> String {
        let mut out = format!(
            "geo-bench: {} places ({} fenced) around {} cities, {} queries, radius {} m, \
             limit {}; fingerprint {:.6}\n\
             results: {:.2} places per query on average, {:.1}% empty, {:.1}% at the limit\n\
             geopush: bulk load {:.2} s, RSS +{:.0} MiB (places with names, tags, fences)\n\
             redis {}: GEOADD load {:.2} s, used_memory {:.0} MiB\n\n\
             {:<28} {:>9} {:>9} {:>9} {:>9} {:>9} {:>10}\n",
            self.places,
            self.fences,
            self.cities,
            self.queries,
            self.radius_m,
            self.limit,
            self.fingerprint,
            self.mean_hits,
            100.0 * self.empty_fraction,
            100.0 * self.full_fraction,
            self.geopush_build_s,
            self.geopush_rss_growth_mib,
            self.redis_version,
            self.redis_load_s,
            self.redis_used_memory_mib,
            "per query, µs",
            "mean",
            "p50",
            "p90",
            "p99",
            "p99.9",
            "max",
        );
        out += &self.geopush.row("geopush nearby (in process)");
        out += &self.redis_sync.row("redis GEOSEARCH (blocking)");
        out += &self.redis_ping.row("redis PING (blocking)");
        if let Some(latency) = &self.redis_async {
            out += &latency.row("redis GEOSEARCH (async)");
        }
        let a = &self.agreement;
        out += &format!(
            "\nratio redis(blocking)/geopush: p50 {:.1}x, p99 {:.1}x\n\
             agreement on {} queries: {} identical, {} differ only by ties at the radius or \
             the limit (within {TIE_TOLERANCE_M} m), {} disagree; distances differ by at most \
             {:.3} m ({:.3} m after scaling Redis's earth radius to ours)\n",
            self.ratio_p50,
            self.ratio_p99,
            a.queries,
            a.identical,
            a.ties_only,
            a.disagree,
            a.max_distance_diff_m,
            a.max_scaled_distance_diff_m,
        );
        for example in &a.examples {
            out += &format!("  {example}\n");
        }
        out
    }
}

/// Cities with their population weights and the spread of their places (the same model as
/// `gateway/benches/geo.rs`).
struct Cities {
    /// (lat, lon, Rayleigh scale in metres).
    points: Vec<(f64, f64, f64)>,
    cumulative: Vec<f64>,
}

impl Cities {
    fn load(path: &Path) -> anyhow::Result<Cities> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read the cities file {}", path.display()))?;
        let mut total = 0.0;
        let mut points = Vec::new();
        let mut cumulative = Vec::new();
        for line in text.lines().skip(1) {
            // timezone, population, country, lon, lat, "id,name" (names may hold commas)
            let f: Vec<&str> = line.rsplitn(6, ',').collect();
            if let [_, population, _, lon, lat, _] = f[..]
                && let (Ok(lat), Ok(lon)) = (lat.parse::<f64>(), lon.parse::<f64>())
            {
                let population = population.parse().unwrap_or(1_000.0f64).max(1.0);
                total += population;
                cumulative.push(total);
                let scale_m = (2_000.0 * (population / 1e6).sqrt()).clamp(300.0, 6_000.0);
                points.push((lat, lon, scale_m));
            }
        }
        if points.is_empty() {
            bail!("no cities in {}", path.display());
        }
        Ok(Cities { points, cumulative })
    }

    /// A point around a city drawn by population, at a Rayleigh-distributed distance.
    fn sample(&self, rng: &mut StdRng) -> (f64, f64) {
        let total = self.cumulative.last().copied().unwrap_or(1.0);
        let pick = rng.gen_range(0.0..total);
        let i = self
            .cumulative
            .partition_point(|&c| c <= pick)
            .min(self.points.len() - 1);
        let (lat, lon, scale_m) = self.points[i];
        let u: f64 = rng.gen_range(f64::EPSILON..1.0);
        let distance = scale_m * (-2.0 * u.ln()).sqrt();
        let (lat, lon) = step(lat, lon, distance, rng.gen_range(0.0..TAU));
        (round7(lat), round7(lon))
    }
}

/// `metres` from (lat, lon) towards `bearing` (radians), on a local flat approximation.
fn step(lat: f64, lon: f64, metres: f64, bearing: f64) -> (f64, f64) {
    let dlat = metres * bearing.cos() / METRES_PER_DEGREE;
    let dlon = metres * bearing.sin() / (METRES_PER_DEGREE * lat.to_radians().cos().max(0.01));
    let lat = (lat + dlat).clamp(-89.9999, 89.9999);
    let mut lon = lon + dlon;
    if lon > 180.0 {
        lon -= 360.0;
    } else if lon < -180.0 {
        lon += 360.0;
    }
    (lat, lon)
}

fn round7(x: f64) -> f64 {
    (x * 1e7).round() / 1e7
}

const KINDS: [&str; 8] = [
    "cafe", "shop", "park", "station", "museum", "bar", "pharmacy", "school",
];

fn polygon_fence(lat: f64, lon: f64, rng: &mut StdRng) -> Polygon {
    let vertices = rng.gen_range(6..=12);
    let radius_m = rng.gen_range(100.0..600.0);
    let mut outer: Vec<[f64; 2]> = (0..vertices)
        .map(|k| {
            let angle = TAU * (k as f64 + rng.gen_range(0.0..0.5)) / vertices as f64;
            let (la, lo) = step(lat, lon, radius_m * rng.gen_range(0.6..1.0), angle);
            [round7(lo), round7(la)]
        })
        .collect();
    outer.push(outer[0]);
    let mut rings = vec![outer];
    if rng.gen_range(0..4) == 0 {
        let h = radius_m * 0.25;
        let mut hole: Vec<[f64; 2]> = [(h, h), (h, -h), (-h, -h), (-h, h)]
            .iter()
            .map(|&(north, east)| {
                let (la, _) = step(lat, lon, north, 0.0);
                let (_, lo) = step(lat, lon, east, TAU / 4.0);
                [round7(lo), round7(la)]
            })
            .collect();
        hole.push(hole[0]);
        rings.push(hole);
    }
    Polygon { rings }
}

/// `count` places around cities, exactly as the criterion bench draws them (fences included,
/// so the replica is the same; Redis gets the points).
fn make_places(cities: &Cities, count: usize) -> Vec<Place> {
    let mut rng = StdRng::seed_from_u64(PLACES_SEED);
    (0..count)
        .map(|i| {
            let (lat, lon) = cities.sample(&mut rng);
            let fence = match (i % 10, (i / 10) % 10) {
                (0, 9) => Some(PlaceFence::Polygon(polygon_fence(lat, lon, &mut rng))),
                (0, _) => Some(PlaceFence::Circle {
                    radius_m: rng.gen_range(50.0..=500.0f64).round(),
                }),
                _ => None,
            };
            let mut tags = serde_json::Map::new();
            tags.insert("kind".into(), KINDS[i % KINDS.len()].into());
            Place {
                id: format!("p{i}"),
                name: format!("Place {i}"),
                lat,
                lon,
                tags,
                dwell_s: (i % 40 == 0).then_some(300),
                fence,
            }
        })
        .collect()
}

fn fingerprint(places: &[Place], queries: &[(f64, f64)]) -> f64 {
    places.iter().map(|p| p.lat + 2.0 * p.lon).sum::<f64>()
        + queries.iter().map(|q| q.0 + 2.0 * q.1).sum::<f64>()
}

/// A redis-server of our own; stopped by its PID when dropped.
struct RedisServer {
    child: Child,
    port: u16,
}

impl RedisServer {
    fn start(binary: &Path) -> anyhow::Result<RedisServer> {
        let mut last_error = None;
        // A port found free may be taken before redis binds it: try a few.
        for _ in 0..3 {
            let port = TcpListener::bind("127.0.0.1:0")
                .and_then(|l| l.local_addr())
                .context("finding a free loopback port")?
                .port();
            let child = Command::new(binary)
                .args(["--bind", "127.0.0.1", "--port", &port.to_string()])
                .args(["--save", "", "--appendonly", "no", "--daemonize", "no"])
                .args(["--dir", &std::env::temp_dir().to_string_lossy()])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::inherit())
                .spawn()
                .with_context(|| format!("starting {}", binary.display()))?;
            let mut server = RedisServer { child, port };
            match server.wait_ready(Duration::from_secs(10)) {
                Ok(()) => return Ok(server),
                Err(e) => last_error = Some(e),
            }
        }
        Err(last_error.unwrap_or_else(|| anyhow::anyhow!("redis-server did not start")))
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    fn wait_ready(&mut self, bound: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + bound;
        loop {
            if let Some(status) = self.child.try_wait()? {
                bail!("redis-server exited at start ({status})");
            }
            if let Ok(mut con) = self.connect()
                && redis::cmd("PING").query::<String>(&mut con).is_ok()
            {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("redis-server on port {} not ready in {bound:?}", self.port);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// A blocking connection whose every call times out.
    fn connect(&self) -> anyhow::Result<redis::Connection> {
        let client = redis::Client::open(self.url())?;
        let con = client.get_connection_with_timeout(Duration::from_secs(5))?;
        con.set_read_timeout(Some(Duration::from_secs(30)))?;
        con.set_write_timeout(Some(Duration::from_secs(30)))?;
        Ok(con)
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        // Child::kill signals this child's PID only.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Kills `pid` and ends the process if `done` is not signalled within `bound`.
fn watchdog(pid: u32, bound: Duration) -> mpsc::Sender<()> {
    let (done, wait) = mpsc::channel::<()>();
    std::thread::spawn(move || {
        if let Err(mpsc::RecvTimeoutError::Timeout) = wait.recv_timeout(bound) {
            eprintln!("geo-bench: still running after {bound:?}: killing redis-server {pid}");
            let _ = Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .status();
            std::process::exit(3);
        }
    });
    done
}

fn geosearch(lat: f64, lon: f64, radius_m: f64, limit: usize) -> redis::Cmd {
    let mut cmd = redis::cmd("GEOSEARCH");
    cmd.arg(KEY)
        .arg("FROMLONLAT")
        .arg(lon)
        .arg(lat)
        .arg("BYRADIUS")
        .arg(radius_m)
        .arg("m")
        .arg("ASC")
        .arg("COUNT")
        .arg(limit)
        .arg("WITHDIST");
    cmd
}

/// Time every query alone on the replica, after a warm-up.
fn time_geopush(
    snapshot: &PlacesSnapshot,
    queries: &[(f64, f64)],
    args: &GeoBenchArgs,
) -> (Latency, [usize; 3]) {
    let mut hits: Vec<NearbyHit> = Vec::with_capacity(args.limit);
    for &(lat, lon) in queries.iter().cycle().take(args.warmup) {
        snapshot.nearby(&unit_vector(lat, lon), args.radius_m, args.limit, &mut hits);
    }
    let mut ns = Vec::with_capacity(queries.len());
    let mut counts = [0usize; 3];
    for &(lat, lon) in queries {
        let started = Instant::now();
        snapshot.nearby(&unit_vector(lat, lon), args.radius_m, args.limit, &mut hits);
        ns.push(started.elapsed().as_nanos() as u64);
        counts[0] += hits.len();
        counts[1] += usize::from(hits.is_empty());
        counts[2] += usize::from(hits.len() == args.limit);
    }
    (Latency::from_ns(ns), counts)
}

fn time_redis_sync(
    con: &mut redis::Connection,
    queries: &[(f64, f64)],
    args: &GeoBenchArgs,
) -> anyhow::Result<Latency> {
    for &(lat, lon) in queries.iter().cycle().take(args.warmup) {
        let _: Vec<(String, f64)> = geosearch(lat, lon, args.radius_m, args.limit).query(con)?;
    }
    let mut ns = Vec::with_capacity(queries.len());
    for &(lat, lon) in queries {
        let started = Instant::now();
        let found: Vec<(String, f64)> =
            geosearch(lat, lon, args.radius_m, args.limit).query(con)?;
        ns.push(started.elapsed().as_nanos() as u64);
        std::hint::black_box(found);
    }
    Ok(Latency::from_ns(ns))
}

/// Round trips of a command that does nothing, for the floor under `GEOSEARCH`.
fn time_redis_ping(
    con: &mut redis::Connection,
    count: usize,
    warmup: usize,
) -> anyhow::Result<Latency> {
    for _ in 0..warmup {
        let _: String = redis::cmd("PING").query(con)?;
    }
    let mut ns = Vec::with_capacity(count);
    for _ in 0..count {
        let started = Instant::now();
        let pong: String = redis::cmd("PING").query(con)?;
        ns.push(started.elapsed().as_nanos() as u64);
        std::hint::black_box(pong);
    }
    Ok(Latency::from_ns(ns))
}

fn time_redis_async(
    url: &str,
    queries: &[(f64, f64)],
    args: &GeoBenchArgs,
) -> anyhow::Result<Latency> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting tokio")?;
    runtime.block_on(async {
        let client = redis::Client::open(url)?;
        let config = redis::AsyncConnectionConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(5)))
            .set_response_timeout(Some(Duration::from_secs(30)));
        let mut con = client
            .get_multiplexed_async_connection_with_config(&config)
            .await?;
        for &(lat, lon) in queries.iter().cycle().take(args.warmup) {
            let _: Vec<(String, f64)> = geosearch(lat, lon, args.radius_m, args.limit)
                .query_async(&mut con)
                .await?;
        }
        let mut ns = Vec::with_capacity(queries.len());
        for &(lat, lon) in queries {
            let started = Instant::now();
            let found: Vec<(String, f64)> = geosearch(lat, lon, args.radius_m, args.limit)
                .query_async(&mut con)
                .await?;
            ns.push(started.elapsed().as_nanos() as u64);
            std::hint::black_box(found);
        }
        Ok(Latency::from_ns(ns))
    })
}

/// Compare the two engines' results on `sample`.
fn compare(
    snapshot: &PlacesSnapshot,
    con: &mut redis::Connection,
    sample: &[(f64, f64)],
    args: &GeoBenchArgs,
) -> anyhow::Result<Agreement> {
    let mut agreement = Agreement {
        queries: sample.len(),
        ..Agreement::default()
    };
    let mut hits = Vec::with_capacity(args.limit);
    for &(lat, lon) in sample {
        let center = unit_vector(lat, lon);
        snapshot.nearby(&center, args.radius_m, args.limit, &mut hits);
        let ours: Vec<&str> = hits
            .iter()
            .map(|h| snapshot.entry(h.index).place.id.as_str())
            .collect();
        let theirs: Vec<(String, f64)> =
            geosearch(lat, lon, args.radius_m, args.limit).query(con)?;
        // Our exact distance to any place either engine returned.
        let distance = |id: &str| {
            snapshot
                .get(id)
                .map(|(_, e)| metres_between(&center, &e.position))
        };
        for (id, redis_m) in &theirs {
            if let Some(hit) = ours.iter().position(|o| o == id).map(|k| hits[k]) {
                let diff = (redis_m - hit.distance_m).abs();
                let scaled =
                    (redis_m * EARTH_RADIUS_M / REDIS_EARTH_RADIUS_M - hit.distance_m).abs();
                agreement.max_distance_diff_m = agreement.max_distance_diff_m.max(diff);
                agreement.max_scaled_distance_diff_m =
                    agreement.max_scaled_distance_diff_m.max(scaled);
            }
        }
        if ours.len() == theirs.len() && ours.iter().zip(&theirs).all(|(a, (b, _))| *a == b) {
            agreement.identical += 1;
            continue;
        }
        // Where each list was cut: the radius, or the last distance of a full result.
        let cut = |full: bool, last: Option<f64>| match (full, last) {
            (true, Some(last)) => last,
            _ => args.radius_m,
        };
        let our_cut = cut(hits.len() == args.limit, hits.last().map(|h| h.distance_m));
        let their_distances: Vec<f64> = theirs
            .iter()
            .map(|(id, _)| distance(id).unwrap_or(f64::INFINITY))
            .collect();
        let their_cut = cut(theirs.len() == args.limit, their_distances.last().copied());
        let only_ours_ok = hits
            .iter()
            .zip(&ours)
            .filter(|(_, id)| !theirs.iter().any(|(t, _)| t == *id))
            .all(|(h, _)| h.distance_m >= their_cut - TIE_TOLERANCE_M);
        let only_theirs_ok = theirs
            .iter()
            .zip(&their_distances)
            .filter(|((id, _), _)| !ours.contains(&id.as_str()))
            .all(|(_, d)| *d <= our_cut + TIE_TOLERANCE_M);
        let their_order_ok = their_distances
            .windows(2)
            .all(|w| w[1] >= w[0] - TIE_TOLERANCE_M);
        if only_ours_ok && only_theirs_ok && their_order_ok {
            agreement.ties_only += 1;
        } else {
            agreement.disagree += 1;
            if agreement.examples.len() < 5 {
                agreement.examples.push(format!(
                    "({lat}, {lon}): geopush {:?} / redis {:?}",
                    hits.iter()
                        .zip(&ours)
                        .map(|(h, id)| format!("{id}@{:.2}", h.distance_m))
                        .collect::<Vec<_>>(),
                    theirs
                        .iter()
                        .map(|(id, d)| format!("{id}@{d:.2}"))
                        .collect::<Vec<_>>(),
                ));
            }
        }
    }
    Ok(agreement)
}

fn rss_mib() -> f64 {
    procfs::memory(None).map_or(0.0, |m| m.vm_rss_kib as f64 / 1024.0)
}

/// `geopush-loadtest geo-bench`: run the comparison and print the report.
pub fn main(args: &GeoBenchArgs) -> anyhow::Result<()> {
    print!("{}", run(args)?.summary());
    Ok(())
}

/// Run the comparison; starts and stops its own redis-server.
pub fn run(args: &GeoBenchArgs) -> anyhow::Result<GeoBenchReport> {
    if args.places == 0 || args.queries == 0 || args.limit == 0 || args.radius_m <= 0.0 {
        bail!("--places, --queries, --limit and --radius-m must be positive");
    }
    let path = args
        .cities
        .clone()
        .unwrap_or_else(crate::cities::default_path);
    let cities = Cities::load(&path)?;
    let started = Instant::now();
    let places = make_places(&cities, args.places);
    let mut rng = StdRng::seed_from_u64(QUERIES_SEED);
    let queries: Vec<(f64, f64)> = (0..args.queries).map(|_| cities.sample(&mut rng)).collect();
    let fingerprint = fingerprint(&places, &queries);
    let fences = places.iter().filter(|p| p.fence.is_some()).count();
    eprintln!(
        "geo-bench: {} places around {} cities and {} queries drawn in {:.1} s; fingerprint \
         {fingerprint:.6}",
        places.len(),
        cities.points.len(),
        queries.len(),
        started.elapsed().as_secs_f64(),
    );

    let rss_before = rss_mib();
    let started = Instant::now();
    let replica = PlacesReplica::new();
    replica.replace(places);
    let snapshot = replica.snapshot();
    let geopush_build_s = started.elapsed().as_secs_f64();
    let geopush_rss_growth_mib = rss_mib() - rss_before;
    eprintln!("geo-bench: geopush bulk load {geopush_build_s:.2} s; timing nearby");
    let (geopush, [found, empty, full]) = time_geopush(&snapshot, &queries, args);

    let server = RedisServer::start(&args.redis_server)?;
    let done = watchdog(server.child.id(), Duration::from_secs(args.max_seconds));
    eprintln!(
        "geo-bench: redis-server pid {} on 127.0.0.1:{}; loading",
        server.child.id(),
        server.port
    );
    let mut con = server.connect()?;
    let info: String = redis::cmd("INFO").arg("server").query(&mut con)?;
    let redis_version = info
        .lines()
        .find_map(|l| l.strip_prefix("redis_version:"))
        .unwrap_or("?")
        .trim()
        .to_owned();
    let started = Instant::now();
    let entries: Vec<&Place> = snapshot.places().map(|e| &e.place).collect();
    for chunk in entries.chunks(args.geoadd_batch.max(1) * 16) {
        let mut pipe = redis::pipe();
        for batch in chunk.chunks(args.geoadd_batch.max(1)) {
            let cmd = pipe.cmd("GEOADD").arg(KEY);
            for place in batch {
                cmd.arg(place.lon).arg(place.lat).arg(&place.id);
            }
            cmd.ignore();
        }
        pipe.query::<()>(&mut con).context("GEOADD")?;
    }
    let loaded: usize = redis::cmd("ZCARD").arg(KEY).query(&mut con)?;
    let redis_load_s = started.elapsed().as_secs_f64();
    if loaded != entries.len() {
        bail!(
            "redis holds {loaded} of {} places (GEOADD refuses |lat| > 85.05)",
            entries.len()
        );
    }
    let memory: String = redis::cmd("INFO").arg("memory").query(&mut con)?;
    let redis_used_memory_mib = memory
        .lines()
        .find_map(|l| l.strip_prefix("used_memory:"))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .unwrap_or(0.0)
        / (1024.0 * 1024.0);
    eprintln!("geo-bench: redis load {redis_load_s:.2} s; timing GEOSEARCH (blocking)");
    let redis_sync = time_redis_sync(&mut con, &queries, args)?;
    eprintln!("geo-bench: timing PING");
    let redis_ping = time_redis_ping(&mut con, queries.len(), args.warmup)?;
    let redis_async = if args.no_async {
        None
    } else {
        eprintln!("geo-bench: timing GEOSEARCH (async)");
        Some(time_redis_async(&server.url(), &queries, args)?)
    };
    eprintln!("geo-bench: comparing results");
    let sample = &queries[..args.compare.min(queries.len())];
    let agreement = compare(&snapshot, &mut con, sample, args)?;
    drop(con);
    drop(server);
    let _ = done.send(());

    let n = queries.len() as f64;
    let report = GeoBenchReport {
        places: snapshot.len(),
        fences,
        cities: cities.points.len(),
        queries: queries.len(),
        radius_m: args.radius_m,
        limit: args.limit,
        fingerprint,
        mean_hits: found as f64 / n,
        empty_fraction: empty as f64 / n,
        full_fraction: full as f64 / n,
        geopush_build_s,
        geopush_rss_growth_mib,
        redis_version,
        redis_load_s,
        redis_used_memory_mib,
        ratio_p50: redis_sync.p50_us / geopush.p50_us.max(1e-9),
        ratio_p99: redis_sync.p99_us / geopush.p99_us.max(1e-9),
        geopush,
        redis_ping,
        redis_sync,
        redis_async,
        agreement,
    };
    if let Some(path) = &args.json_report {
        let json = serde_json::to_string_pretty(&report).context("serializing the report")?;
        std::fs::write(path, json + "\n").with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_of_known_samples() {
        let latency = Latency::from_ns((1..=1_000).map(|i| i * 1_000).collect());
        assert_eq!(latency.p50_us, 500.0);
        assert_eq!(latency.p99_us, 990.0);
        assert_eq!(latency.p999_us, 999.0);
        assert_eq!(latency.max_us, 1_000.0);
    }
}
