//! Places, `nearby` and geofences on one core (issue 3).
//!
//! One [`PlacesReplica`] holds 1,000,000 places clustered around real cities; every tenth
//! place has a fence (circles of 50–500 m, and every tenth fence a polygon of 6–12 vertices,
//! a quarter of those with a hole). Benches:
//!
//! * `geo/nearby_query` — `PlacesSnapshot::nearby`, radius 500 m, limit 20, at query points
//!   drawn like the places (goal: p99 < 20 µs)
//! * `geo/fix/decode`, `geo/fix/validate`, `geo/fix/index_move` (`ClientIndex::update` in an
//!   index of 100,000 clients), `geo/fix/fences` (`FenceTracker::on_fix`),
//!   `geo/fix/nearby_tracker` (`NearbyTracker::on_fix`): each step alone
//! * `geo/fix/full` — all of them as the session runs them, plus the snapshot load and the
//!   clocks the session reads (goal: < 5 µs, 200,000 fixes/s per core)
//!
//! Before criterion runs, a percentile pass times every query and every fix one by one with
//! `Instant` and prints p50/p90/p99/p99.9/max, with what the fixes did (how often `nearby`
//! ran again, frames sent, fence candidates and events).
//!
//! Places and query points: a city is drawn by population (GeoNames `cities1000`, CC BY 4.0,
//! from `shared/data/cities1000.csv` beside the workspace or `GEOPUSH_CITIES_FILE`), then a
//! point at a Rayleigh-distributed distance from its center, scale `2 km · √(population /
//! 1e6)` clamped to 0.3–6 km (a town of 10,000: most within 600 m; Berlin: most within 8
//! km). `loadtest/src/geo_bench.rs` draws the same places and queries (same algorithm and
//! seeds) for its Redis comparison; both print a fingerprint of the data.
//!
//! Movement: 100,000 simulated clients, each with its own `FenceTracker` and
//! `NearbyTracker`, start around cities drawn the same way. 60% walk (2–8 m per fix), 40%
//! ride (10–40 m per fix); the heading turns up to ±30° per fix and points back home once a
//! client is 1.5 km away. Clients take turns in a shuffled order, one fix each per lap, so
//! every fix touches another client's state, as on a node with 100,000 active sessions.
//!
//! `GEOPUSH_BENCH_PLACES` and `GEOPUSH_BENCH_CLIENTS` change the sizes (defaults 1,000,000
//! and 100,000).

mod support;

use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use geopush_gateway::geo::fences::{FenceEvent, FenceRules, FenceTracker};
use geopush_gateway::geo::nearby::{NearbyRules, NearbyTracker};
use geopush_gateway::geo::places::NearbyHit;
use geopush_gateway::geo::{ClientIndex, PlacesReplica, metres_between, unit_vector};
use geopush_proto::frames::{ClientFrame, LocationFrame, decode_client_frame};
use geopush_proto::{Fix, FixPolicy, Place, PlaceFence, Polygon};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use std::f64::consts::TAU;
use std::hint::black_box;
use std::time::Instant;
use support::{METRES_PER_DEGREE, step, unix_ms};

const DEFAULT_PLACES: usize = 1_000_000;
const DEFAULT_CLIENTS: usize = 100_000;
const QUERIES: usize = 200_000;
const RADIUS_M: f64 = 500.0;
const LIMIT: usize = 20;
/// Seeds shared with `loadtest/src/geo_bench.rs`, so both draw the same data.
const PLACES_SEED: u64 = 2024;
const QUERIES_SEED: u64 = 7;
const CLIENTS_SEED: u64 = 3;

/// The gateway's defaults (see `Config`).
const FENCE_RULES: FenceRules = FenceRules {
    max_accuracy_m: 100.0,
    exit_margin_floor_m: 15.0,
};
const NEARBY_RULES: NearbyRules = NearbyRules {
    default_radius_m: RADIUS_M,
    max_radius_m: 5_000.0,
    default_limit: LIMIT as u32,
    max_limit: 100,
    min_move_m: 25.0,
};

fn env_count(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|n| *n > 0)
        .unwrap_or(default)
}

/// Cities with their population weights and the spread of their places.
struct Cities {
    /// (lat, lon, Rayleigh scale in metres).
    points: Vec<(f64, f64, f64)>,
    cumulative: Vec<f64>,
}

impl Cities {
    fn load() -> Cities {
        let rows = support::load_cities("geo");
        let mut total = 0.0;
        let mut points = Vec::with_capacity(rows.len());
        let mut cumulative = Vec::with_capacity(rows.len());
        for (lat, lon, population) in rows {
            total += population;
            cumulative.push(total);
            let scale_m = (2_000.0 * (population / 1e6).sqrt()).clamp(300.0, 6_000.0);
            points.push((lat, lon, scale_m));
        }
        Cities { points, cumulative }
    }

    /// A point around a city drawn by population, spread like a city.
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

/// Round to the 7 decimals a phone sends.
fn round7(x: f64) -> f64 {
    (x * 1e7).round() / 1e7
}

const KINDS: [&str; 8] = [
    "cafe", "shop", "park", "station", "museum", "bar", "pharmacy", "school",
];

/// A star-shaped ring of 6–12 vertices, 100–600 m across, around (lat, lon); every fourth
/// with a square hole in the middle.
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

/// `count` places around cities; every tenth has a fence (every tenth fence a polygon), and
/// every fortieth place a dwell time.
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

/// A fingerprint of the places and queries, to check that two programs drew the same data.
fn fingerprint(places: &[Place], queries: &[(f64, f64)]) -> f64 {
    places.iter().map(|p| p.lat + 2.0 * p.lon).sum::<f64>()
        + queries.iter().map(|q| q.0 + 2.0 * q.1).sum::<f64>()
}

/// Nanosecond samples, summarized.
fn summary(label: &str, mut ns: Vec<u64>) {
    ns.sort_unstable();
    let at = |q: f64| ns[((q * ns.len() as f64).ceil() as usize).clamp(1, ns.len()) - 1];
    let mean = ns.iter().sum::<u64>() as f64 / ns.len() as f64;
    let us = |v: u64| v as f64 / 1_000.0;
    eprintln!(
        "geo: {label:<26} n={:<7} mean {:>7.2} µs  p50 {:>7.2}  p90 {:>7.2}  p99 {:>7.2}  p99.9 {:>7.2}  max {:>8.2} µs",
        ns.len(),
        mean / 1_000.0,
        us(at(0.50)),
        us(at(0.90)),
        us(at(0.99)),
        us(at(0.999)),
        us(ns[ns.len() - 1]),
    );
}

/// A simulated client's movement.
struct Walker {
    home: (f64, f64),
    lat: f64,
    lon: f64,
    heading: f64,
    /// Metres per fix: (low, high).
    pace: (f64, f64),
    ts_ms: i64,
}

/// One fix ready to be processed: its session, its bytes, and what they decode and
/// validate to (for benches of the later steps alone).
struct PreparedFix {
    session: usize,
    bytes: Vec<u8>,
    frame: LocationFrame,
    fix: Fix,
}

/// The fleet's movement: walkers take turns in a shuffled order.
struct Fleet {
    walkers: Vec<Walker>,
    order: Vec<usize>,
    cursor: usize,
    rng: StdRng,
}

impl Fleet {
    fn new(cities: &Cities, clients: usize) -> Fleet {
        let mut rng = StdRng::seed_from_u64(CLIENTS_SEED);
        let now = unix_ms();
        let walkers = (0..clients)
            .map(|_| {
                let (lat, lon) = cities.sample(&mut rng);
                let pace = if rng.gen_range(0..10) < 6 {
                    (2.0, 8.0)
                } else {
                    (10.0, 40.0)
                };
                Walker {
                    home: (lat, lon),
                    lat,
                    lon,
                    heading: rng.gen_range(0.0..TAU),
                    pace,
                    ts_ms: now,
                }
            })
            .collect();
        let mut order: Vec<usize> = (0..clients).collect();
        order.shuffle(&mut rng);
        Fleet {
            walkers,
            order,
            cursor: 0,
            rng,
        }
    }

    fn next(&mut self) -> PreparedFix {
        let session = self.order[self.cursor];
        self.cursor = (self.cursor + 1) % self.order.len();
        let rng = &mut self.rng;
        let w = &mut self.walkers[session];
        let from_home = geopush_gateway::geo::haversine_m(w.home.0, w.home.1, w.lat, w.lon);
        if from_home > 1_500.0 {
            let north = (w.home.0 - w.lat) * METRES_PER_DEGREE;
            let east = (w.home.1 - w.lon) * METRES_PER_DEGREE * w.lat.to_radians().cos().max(0.01);
            w.heading = east.atan2(north);
        } else {
            w.heading += rng.gen_range(-0.52..0.52);
        }
        let (lat, lon) = step(w.lat, w.lon, rng.gen_range(w.pace.0..w.pace.1), w.heading);
        (w.lat, w.lon) = (round7(lat), round7(lon));
        w.ts_ms = w.ts_ms.max(unix_ms());
        let frame = LocationFrame {
            lat: w.lat,
            lon: w.lon,
            accuracy_m: Some(rng.gen_range(3u32..25).into()),
            ts: Some(w.ts_ms),
            speed_mps: None,
            heading_deg: None,
            radius_m: None,
            limit: None,
        };
        let bytes = serde_json::to_vec(&ClientFrame::Location(frame)).expect("serialize a fix");
        let fix = Fix::validate(&frame, unix_ms(), FixPolicy::default()).expect("a valid fix");
        PreparedFix {
            session,
            bytes,
            frame,
            fix,
        }
    }
}

/// One simulated session's geo state.
struct Session {
    fences: FenceTracker,
    nearby: NearbyTracker,
}

/// Everything the fix path touches.
struct Node {
    replica: PlacesReplica,
    index: ClientIndex,
    sessions: Vec<Session>,
    events: Vec<FenceEvent>,
}

impl Node {
    /// The per-fix path as `Session::on_location`/`process_fix` run it (without the rate
    /// limit and the outbound queue): decode, validate, index, fences, nearby.
    fn full(&mut self, session: usize, bytes: &[u8]) -> bool {
        let Ok(ClientFrame::Location(location)) = decode_client_frame(bytes) else {
            return false;
        };
        let Ok(fix) = Fix::validate(&location, unix_ms(), FixPolicy::default()) else {
            return false;
        };
        self.index.update(session as u64, fix.lat, fix.lon);
        let places = self.replica.snapshot();
        let s = &mut self.sessions[session];
        self.events.clear();
        s.fences.on_fix(
            &fix,
            &places,
            &FENCE_RULES,
            tokio::time::Instant::now(),
            &mut self.events,
        );
        s.nearby.on_fix(&fix, &places, &NEARBY_RULES).is_some()
    }
}

struct Setup {
    node: Node,
    fleet: Fleet,
    queries: Vec<(f64, f64)>,
}

fn setup() -> Setup {
    let place_count = env_count("GEOPUSH_BENCH_PLACES", DEFAULT_PLACES);
    let clients = env_count("GEOPUSH_BENCH_CLIENTS", DEFAULT_CLIENTS);
    let cities = Cities::load();

    let started = Instant::now();
    let places = make_places(&cities, place_count);
    let mut rng = StdRng::seed_from_u64(QUERIES_SEED);
    let queries: Vec<(f64, f64)> = (0..QUERIES).map(|_| cities.sample(&mut rng)).collect();
    let fences = places.iter().filter(|p| p.fence.is_some()).count();
    let polygons = places
        .iter()
        .filter(|p| matches!(p.fence, Some(PlaceFence::Polygon(_))))
        .count();
    eprintln!(
        "geo: {} places ({fences} fences, {polygons} polygons) around {} cities, {} queries, \
         drawn in {:.1} s; fingerprint {:.6}",
        places.len(),
        cities.points.len(),
        queries.len(),
        started.elapsed().as_secs_f64(),
        fingerprint(&places, &queries),
    );
    let started = Instant::now();
    let replica = PlacesReplica::new();
    replica.replace(places);
    eprintln!(
        "geo: PlacesReplica::replace (bulk load) took {:.2} s",
        started.elapsed().as_secs_f64()
    );

    let fleet = Fleet::new(&cities, clients);
    let mut index = ClientIndex::new();
    for (session, w) in fleet.walkers.iter().enumerate() {
        index.update(session as u64, w.lat, w.lon);
    }
    let sessions = (0..clients)
        .map(|_| Session {
            fences: FenceTracker::default(),
            nearby: NearbyTracker::new(&NEARBY_RULES),
        })
        .collect();
    Setup {
        node: Node {
            replica,
            index,
            sessions,
            events: Vec::new(),
        },
        fleet,
        queries,
    }
}

/// Time every query alone, after a warm-up; print percentiles and what the queries found.
fn nearby_percentiles(node: &Node, queries: &[(f64, f64)]) {
    let snapshot = node.replica.snapshot();
    let mut hits: Vec<NearbyHit> = Vec::with_capacity(LIMIT);
    for &(lat, lon) in queries.iter().take(20_000) {
        snapshot.nearby(&unit_vector(lat, lon), RADIUS_M, LIMIT, &mut hits);
    }
    let mut ns = Vec::with_capacity(queries.len());
    // The same samples split by how many places the query found: none, some, the limit.
    let mut by_hits: [Vec<u64>; 3] = Default::default();
    let (mut found, mut empty, mut full) = (0usize, 0usize, 0usize);
    for &(lat, lon) in queries {
        let started = Instant::now();
        snapshot.nearby(&unit_vector(lat, lon), RADIUS_M, LIMIT, &mut hits);
        let elapsed = started.elapsed().as_nanos() as u64;
        ns.push(elapsed);
        found += hits.len();
        empty += usize::from(hits.is_empty());
        full += usize::from(hits.len() == LIMIT);
        by_hits[usize::from(!hits.is_empty()) + usize::from(hits.len() == LIMIT)].push(elapsed);
    }
    let n = queries.len() as f64;
    eprintln!(
        "geo: nearby r={RADIUS_M} m limit {LIMIT}: {:.1} hits per query on average, {:.1}% \
         empty, {:.1}% at the limit",
        found as f64 / n,
        100.0 * empty as f64 / n,
        100.0 * full as f64 / n,
    );
    summary("nearby_query", ns);
    for (label, ns) in [
        "nearby_query (0 hits)",
        "nearby_query (1-19 hits)",
        "nearby_query (20 hits)",
    ]
    .into_iter()
    .zip(by_hits)
    {
        if !ns.is_empty() {
            summary(label, ns);
        }
    }
}

/// Warm the sessions up, print what fixes do, then time fixes one by one.
fn fix_percentiles(node: &mut Node, fleet: &mut Fleet) {
    let clients = fleet.walkers.len();
    let snapshot = node.replica.snapshot();
    // Where each tracker last computed `nearby`, by the tracker's own rule (places, radius
    // and limit never change here): again once the client moved `min_move_m` from there.
    let mut last_center: Vec<Option<[f64; 3]>> = vec![None; clients];
    let (mut recomputes, mut frames, mut candidates, mut events, mut inside) = (0, 0, 0, 0, 0);
    // Ten fixes per client to warm up (every tracker has a result and its fences, and the
    // clients' recomputes, all due on their first fix, have drifted out of step), then two
    // laps with counters, untimed.
    const WARM_UP_LAPS: usize = 10;
    const COUNTED_LAPS: usize = 2;
    for lap in 0..WARM_UP_LAPS + COUNTED_LAPS {
        for _ in 0..clients {
            let fix = fleet.next();
            let center = unit_vector(fix.fix.lat, fix.fix.lon);
            let recompute = last_center[fix.session]
                .is_none_or(|c| metres_between(&c, &center) >= NEARBY_RULES.min_move_m);
            if recompute {
                last_center[fix.session] = Some(center);
            }
            let sent = node.full(fix.session, &fix.bytes);
            if lap >= WARM_UP_LAPS {
                recomputes += usize::from(recompute);
                candidates += snapshot.fences_near(&center).count();
                frames += usize::from(sent);
                events += node.events.len();
                inside += node.sessions[fix.session].fences.inside().count();
            }
        }
    }
    let n = (COUNTED_LAPS * clients) as f64;
    eprintln!(
        "geo: per fix over {COUNTED_LAPS} laps of {clients} clients: nearby recomputed {:.1}%, frame sent \
         {:.1}%, {:.2} fence candidates, {:.3} fence events, inside {:.2} fences",
        100.0 * recomputes as f64 / n,
        100.0 * frames as f64 / n,
        candidates as f64 / n,
        events as f64 / n,
        inside as f64 / n,
    );
    // Three laps timed fix by fix; each lap's fixes are prepared before it. The samples are
    // also split by what `nearby` did: nothing (moved less than `min_move_m`), a query
    // with the same result, or a query and a new frame.
    let mut ns = Vec::with_capacity(3 * clients);
    let mut by_outcome: [Vec<u64>; 3] = Default::default();
    for _ in 0..3 {
        let lap: Vec<(PreparedFix, bool)> = (0..clients)
            .map(|_| {
                let fix = fleet.next();
                let center = unit_vector(fix.fix.lat, fix.fix.lon);
                let recompute = last_center[fix.session]
                    .is_none_or(|c| metres_between(&c, &center) >= NEARBY_RULES.min_move_m);
                if recompute {
                    last_center[fix.session] = Some(center);
                }
                (fix, recompute)
            })
            .collect();
        for (fix, recompute) in &lap {
            let started = Instant::now();
            let sent = black_box(node.full(fix.session, &fix.bytes));
            let elapsed = started.elapsed().as_nanos() as u64;
            ns.push(elapsed);
            by_outcome[usize::from(*recompute) + usize::from(sent)].push(elapsed);
        }
    }
    summary("fix_full", ns);
    let labels = [
        "fix_full (no query)",
        "fix_full (query, same)",
        "fix_full (query, frame)",
    ];
    for (label, ns) in labels.into_iter().zip(by_outcome) {
        if !ns.is_empty() {
            summary(label, ns);
        }
    }
}

fn geo(c: &mut Criterion) {
    let Setup {
        mut node,
        mut fleet,
        queries,
    } = setup();
    nearby_percentiles(&node, &queries);
    fix_percentiles(&mut node, &mut fleet);

    let mut group = c.benchmark_group("geo");
    group.throughput(Throughput::Elements(1));
    let snapshot = node.replica.snapshot();
    let mut hits: Vec<NearbyHit> = Vec::with_capacity(LIMIT);
    let mut next = 0usize;
    group.bench_function("nearby_query", |b| {
        b.iter(|| {
            let (lat, lon) = queries[next];
            next = (next + 1) % queries.len();
            snapshot.nearby(&unit_vector(lat, lon), RADIUS_M, LIMIT, &mut hits);
            black_box(hits.len())
        })
    });
    drop(snapshot);

    // Each fix is prepared (moved, serialized, validated) outside the timed batch.
    let batch = BatchSize::NumIterations(1_024);
    let policy = FixPolicy::default();
    group.bench_function("fix/decode", |b| {
        b.iter_batched_ref(
            || fleet.next(),
            |fix| black_box(decode_client_frame(&fix.bytes)),
            batch,
        )
    });
    group.bench_function("fix/validate", |b| {
        b.iter_batched_ref(
            || fleet.next(),
            |fix| black_box(Fix::validate(&fix.frame, unix_ms(), policy)),
            batch,
        )
    });
    group.bench_function("fix/index_move", |b| {
        b.iter_batched_ref(
            || fleet.next(),
            |fix| {
                black_box(
                    node.index
                        .update(fix.session as u64, fix.fix.lat, fix.fix.lon),
                )
            },
            batch,
        )
    });
    let places = node.replica.snapshot();
    group.bench_function("fix/fences", |b| {
        b.iter_batched_ref(
            || fleet.next(),
            |fix| {
                node.events.clear();
                node.sessions[fix.session].fences.on_fix(
                    &fix.fix,
                    &places,
                    &FENCE_RULES,
                    tokio::time::Instant::now(),
                    &mut node.events,
                );
            },
            batch,
        )
    });
    group.bench_function("fix/nearby_tracker", |b| {
        b.iter_batched_ref(
            || fleet.next(),
            |fix| {
                black_box(node.sessions[fix.session].nearby.on_fix(
                    &fix.fix,
                    &places,
                    &NEARBY_RULES,
                ))
            },
            batch,
        )
    });
    drop(places);
    group.bench_function("fix/full", |b| {
        b.iter_batched_ref(
            || fleet.next(),
            |fix| black_box(node.full(fix.session, &fix.bytes)),
            batch,
        )
    });
    group.finish();
}

criterion_group!(benches, geo);
criterion_main!(benches);
