//! The per-fix cost on one core: decode the `location` frame, validate it, move the client in
//! a [`ClientIndex`] that already holds 100,000 clients around real cities.
//!
//! Each step is also measured alone, so the total can be read as a sum:
//!
//! * `fix_path/decode`   — `geopush_proto::decode_client_frame` on the frame's bytes
//! * `fix_path/validate` — `Fix::validate` on the decoded frame
//! * `fix_path/index_move` — `ClientIndex::update` moving an indexed client 2–15 m (below
//!   the index's tree slack, so its R-tree point stays and only its entry changes)
//! * `fix_path/index_move_far` — the same with 30–80 m moves: the R-tree point moves too
//!   (a targeted remove of the old point and an insert of the new one)
//! * `fix_path/decode_validate_index` — the three together, as the session runs them
//! * `fix_path/session_like` — the same plus what the session does around them: the UTF-8
//!   check, reading the wall clock, and locking the (uncontended) index
//!
//! Every iteration takes the next prepared fix from a ring that touches every client in a
//! random order, moving it a few metres and (on the second lap) back, so the index keeps its
//! size and shape however long criterion runs, and the caches see a realistic spread of
//! tree nodes instead of one hot client.
//!
//! Cities: GeoNames `cities1000` (CC BY 4.0) from `shared/data/cities1000.csv` beside the
//! workspace, or `GEOPUSH_CITIES_FILE`; without the file, a synthetic spread is used and a
//! line says so. `GEOPUSH_BENCH_CLIENTS` changes the index size (default 100,000).

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use geopush_gateway::geo::ClientIndex;
use geopush_proto::frames::{ClientFrame, LocationFrame, decode_client_frame};
use geopush_proto::{Fix, FixPolicy};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use std::hint::black_box;

mod support;

use support::{load_cities as cities_of, step, unix_ms};

const DEFAULT_CLIENTS: usize = 100_000;

/// Round to the 7 decimals a phone sends, so the index holds exactly what frames decode to.
fn round7(x: f64) -> f64 {
    (x * 1e7).round() / 1e7
}

/// One prepared fix: the session it moves, the frame's bytes and what they decode to.
struct PreparedFix {
    session: u64,
    bytes: Vec<u8>,
    frame: LocationFrame,
}

struct Setup {
    index: ClientIndex,
    /// Two laps: every client moved a few metres, then every client moved back.
    ring: Vec<PreparedFix>,
    /// The same with moves of 30–80 m: (session, lat, lon).
    far_ring: Vec<(u64, f64, f64)>,
    now_ms: i64,
}

fn setup() -> Setup {
    let clients = std::env::var("GEOPUSH_BENCH_CLIENTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|n| *n > 0)
        .unwrap_or(DEFAULT_CLIENTS);
    let cities = cities_of("fix_path");
    let mut cumulative = Vec::with_capacity(cities.len());
    let mut total = 0.0;
    for &(_, _, population) in &cities {
        total += population;
        cumulative.push(total);
    }
    let mut rng = StdRng::seed_from_u64(42);
    let now_ms = unix_ms();

    // Clients within ~5 km of cities drawn by population.
    let mut index = ClientIndex::new();
    let mut positions = Vec::with_capacity(clients);
    for session in 0..clients as u64 {
        let pick = rng.gen_range(0.0..total);
        let (lat, lon, _) = cities[cumulative
            .partition_point(|&c| c <= pick)
            .min(cities.len() - 1)];
        let (lat, lon) = step(
            lat,
            lon,
            5_000.0 * rng.gen_range(0.0f64..1.0).sqrt(),
            rng.gen_range(0.0..std::f64::consts::TAU),
        );
        let (lat, lon) = (round7(lat), round7(lon));
        index.update(session, lat, lon);
        positions.push((session, lat, lon));
    }
    assert_eq!(index.len(), clients);

    let fix = |session: u64, lat: f64, lon: f64, rng: &mut StdRng| {
        let frame = LocationFrame {
            lat,
            lon,
            accuracy_m: Some(rng.gen_range(3u32..25).into()),
            ts: Some(now_ms - rng.gen_range(0..2_000)),
            speed_mps: None,
            heading_deg: None,
            radius_m: None,
            limit: None,
        };
        let bytes = serde_json::to_vec(&ClientFrame::Location(frame)).expect("serialize a fix");
        PreparedFix {
            session,
            bytes,
            frame,
        }
    };
    positions.shuffle(&mut rng);
    let mut ring = Vec::with_capacity(2 * clients);
    for &(session, lat, lon) in &positions {
        let (moved_lat, moved_lon) = step(
            lat,
            lon,
            rng.gen_range(2.0..15.0),
            rng.gen_range(0.0..std::f64::consts::TAU),
        );
        ring.push(fix(session, round7(moved_lat), round7(moved_lon), &mut rng));
    }
    for &(session, lat, lon) in &positions {
        ring.push(fix(session, lat, lon, &mut rng));
    }
    let mut far_ring = Vec::with_capacity(2 * clients);
    for &(session, lat, lon) in &positions {
        let (far_lat, far_lon) = step(
            lat,
            lon,
            rng.gen_range(30.0..80.0),
            rng.gen_range(0.0..std::f64::consts::TAU),
        );
        far_ring.push((session, round7(far_lat), round7(far_lon)));
    }
    far_ring.extend(positions.iter().copied());
    let sample = String::from_utf8_lossy(&ring[0].bytes).into_owned();
    eprintln!(
        "fix_path: {clients} clients around {} cities; frames like {sample}",
        cities.len()
    );
    Setup {
        index,
        ring,
        far_ring,
        now_ms,
    }
}

fn fix_path(c: &mut Criterion) {
    let Setup {
        mut index,
        ring,
        far_ring,
        now_ms,
    } = setup();
    let policy = FixPolicy::default();
    let mut group = c.benchmark_group("fix_path");
    group.throughput(Throughput::Elements(1));

    let mut next = 0usize;
    group.bench_function("decode", |b| {
        b.iter(|| {
            let fix = &ring[next];
            next = (next + 1) % ring.len();
            black_box(decode_client_frame(black_box(&fix.bytes)))
        })
    });

    let mut next = 0usize;
    group.bench_function("validate", |b| {
        b.iter(|| {
            let fix = &ring[next];
            next = (next + 1) % ring.len();
            black_box(Fix::validate(black_box(&fix.frame), now_ms, policy))
        })
    });

    // Ring entries carry absolute positions, so wherever criterion stops a bench, the index
    // holds each client at its start or a few metres from it; one cursor serves both.
    let mut next = 0usize;
    group.bench_function("index_move", |b| {
        b.iter(|| {
            let fix = &ring[next];
            next = (next + 1) % ring.len();
            index.update(fix.session, fix.frame.lat, fix.frame.lon);
        })
    });

    group.bench_function("decode_validate_index", |b| {
        b.iter(|| {
            let fix = &ring[next];
            next = (next + 1) % ring.len();
            if let Ok(ClientFrame::Location(location)) = decode_client_frame(black_box(&fix.bytes))
                && let Ok(valid) = Fix::validate(&location, now_ms, policy)
            {
                index.update(fix.session, valid.lat, valid.lon);
            }
        })
    });
    // What the session adds around the three steps: the UTF-8 check of the payload, the
    // wall clock for validation, and the index's lock (uncontended here).
    let locked = std::sync::Mutex::new(std::mem::take(&mut index));
    group.bench_function("session_like", |b| {
        b.iter(|| {
            let fix = &ring[next];
            next = (next + 1) % ring.len();
            let bytes = black_box(&fix.bytes);
            if std::str::from_utf8(bytes).is_ok()
                && let Ok(ClientFrame::Location(location)) = decode_client_frame(bytes)
                && let Ok(valid) = Fix::validate(&location, unix_ms(), policy)
            {
                locked.lock().unwrap_or_else(|p| p.into_inner()).update(
                    fix.session,
                    valid.lat,
                    valid.lon,
                );
            }
        })
    });
    let mut index = locked.into_inner().unwrap_or_else(|p| p.into_inner());

    // Moves longer than the index's tree slack: the R-tree point moves too (remove +
    // insert). Run last: it leaves clients up to 80 m from where the other benches expect.
    let mut next = 0usize;
    group.bench_function("index_move_far", |b| {
        b.iter(|| {
            let (session, lat, lon) = far_ring[next];
            next = (next + 1) % far_ring.len();
            index.update(session, lat, lon);
        })
    });
    group.finish();
    assert_eq!(index.len(), ring.len() / 2, "the index kept its clients");
}

criterion_group!(benches, fix_path);
criterion_main!(benches);
