//! What the gateway's benches share: real cities to place clients and places around, a
//! small step on the globe, and the wall clock.
//!
//! Cities: GeoNames `cities1000` (CC BY 4.0) from `shared/data/cities1000.csv` beside the
//! workspace, or `GEOPUSH_CITIES_FILE`; without the file, a synthetic spread is used and a
//! line says so.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::path::PathBuf;
use std::time::{SystemTime, UNIX_EPOCH};

pub const METRES_PER_DEGREE: f64 = 111_320.0;

/// (lat, lon, population ≥ 1) of real places, or 5,000 synthetic ones if the file is
/// missing; `bench` names the caller in that message.
pub fn load_cities(bench: &str) -> Vec<(f64, f64, f64)> {
    let path = std::env::var_os("GEOPUSH_CITIES_FILE")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared/data/cities1000.csv")
        });
    let mut out = Vec::new();
    if let Ok(text) = std::fs::read_to_string(&path) {
        for line in text.lines().skip(1) {
            // timezone, population, country, lon, lat, "id,name" (names may hold commas)
            let f: Vec<&str> = line.rsplitn(6, ',').collect();
            if let [_, population, _, lon, lat, _] = f[..]
                && let (Ok(lat), Ok(lon)) = (lat.parse::<f64>(), lon.parse::<f64>())
            {
                out.push((lat, lon, population.parse().unwrap_or(1_000.0f64).max(1.0)));
            }
        }
    }
    if out.is_empty() {
        eprintln!(
            "{bench}: {} not readable; using 5,000 synthetic cities",
            path.display()
        );
        let mut rng = StdRng::seed_from_u64(5);
        out = (0..5_000)
            .map(|_| {
                (
                    rng.gen_range(-60.0..70.0),
                    rng.gen_range(-180.0..180.0),
                    rng.gen_range(1e3..1e6),
                )
            })
            .collect();
    }
    out
}

/// `metres` from (lat, lon) towards `bearing` (radians), on a local flat approximation.
pub fn step(lat: f64, lon: f64, metres: f64, bearing: f64) -> (f64, f64) {
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

/// The wall clock in Unix milliseconds.
pub fn unix_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}
