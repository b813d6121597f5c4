//! Starting points for simulated clients: real populated places, weighted by population.
//!
//! The data is GeoNames' `cities1000` (CC BY 4.0, <https://www.geonames.org>) as shipped in
//! `shared/data/cities1000.csv`: `geonameid,name,latitude,longitude,country_code,population,
//! timezone`. Only the name may hold a (quoted) comma, so each row is split from the right.

use anyhow::{Context, bail};
use rand::Rng;
use std::path::{Path, PathBuf};

/// Metres per degree of latitude (and of longitude at the equator).
const METRES_PER_DEGREE: f64 = 111_320.0;

/// The default location of the cities file: `shared/` beside the workspace.
pub fn default_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/data/cities1000.csv")
}

/// Places to scatter clients around, with cumulative population weights for sampling.
#[derive(Clone, Debug)]
pub struct Cities {
    /// (lat, lon) in degrees.
    points: Vec<(f64, f64)>,
    /// Running sum of the weights; the last entry is the total.
    cumulative: Vec<f64>,
}

impl Cities {
    /// Load the cities CSV.
    pub fn load(path: &Path) -> anyhow::Result<Cities> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read the cities file {}", path.display()))?;
        Cities::parse(&text).with_context(|| format!("bad cities file {}", path.display()))
    }

    /// Parse CSV text with a header line.
    pub fn parse(text: &str) -> anyhow::Result<Cities> {
        let mut rows = Vec::new();
        for (number, line) in text.lines().enumerate().skip(1) {
            if line.trim().is_empty() {
                continue;
            }
            // timezone, population, country, lon, lat, then "id,name" (name may hold commas).
            let fields: Vec<&str> = line.rsplitn(6, ',').collect();
            let [_tz, population, _cc, lon, lat, _rest] = fields[..] else {
                bail!("line {}: expected 7 columns", number + 1);
            };
            let lat: f64 = lat
                .parse()
                .with_context(|| format!("line {}: latitude {lat:?}", number + 1))?;
            let lon: f64 = lon
                .parse()
                .with_context(|| format!("line {}: longitude {lon:?}", number + 1))?;
            let population: f64 = population.parse().unwrap_or(1_000.0);
            rows.push(((lat, lon), population.max(1.0)));
        }
        Cities::from_weighted(rows)
    }

    /// Build from (lat, lon) points and weights (for tests and synthetic fleets).
    pub fn from_weighted(rows: Vec<((f64, f64), f64)>) -> anyhow::Result<Cities> {
        if rows.is_empty() {
            bail!("no cities");
        }
        let mut total = 0.0;
        let mut points = Vec::with_capacity(rows.len());
        let mut cumulative = Vec::with_capacity(rows.len());
        for ((lat, lon), weight) in rows {
            let on_globe = lat.is_finite()
                && (-90.0..=90.0).contains(&lat)
                && lon.is_finite()
                && (-180.0..=180.0).contains(&lon);
            if !on_globe {
                bail!("city outside the globe: {lat}, {lon}");
            }
            total += weight;
            points.push((lat, lon));
            cumulative.push(total);
        }
        Ok(Cities { points, cumulative })
    }

    pub fn len(&self) -> usize {
        self.points.len()
    }

    pub fn is_empty(&self) -> bool {
        self.points.is_empty()
    }

    /// A random position within about `radius_m` of a city drawn by population.
    pub fn sample(&self, rng: &mut impl Rng, radius_m: f64) -> (f64, f64) {
        let total = self.cumulative.last().copied().unwrap_or(0.0);
        let pick = rng.gen_range(0.0..total.max(f64::MIN_POSITIVE));
        let i = self
            .cumulative
            .partition_point(|&c| c <= pick)
            .min(self.points.len() - 1);
        let (lat, lon) = self.points[i];
        let distance = radius_m * rng.gen_range(0.0f64..1.0).sqrt();
        step(lat, lon, distance, rng.gen_range(0.0..360.0))
    }
}

/// The point `metres` away from (lat, lon) in direction `bearing_deg`, on a local flat
/// approximation (fine for the few kilometres a simulated client wanders), kept on the globe.
pub fn step(lat: f64, lon: f64, metres: f64, bearing_deg: f64) -> (f64, f64) {
    let bearing = bearing_deg.to_radians();
    let dlat = metres * bearing.cos() / METRES_PER_DEGREE;
    let cos_lat = lat.to_radians().cos().max(0.01);
    let dlon = metres * bearing.sin() / (METRES_PER_DEGREE * cos_lat);
    let new_lat = (lat + dlat).clamp(-89.999, 89.999);
    let mut new_lon = lon + dlon;
    if new_lon > 180.0 {
        new_lon -= 360.0;
    } else if new_lon < -180.0 {
        new_lon += 360.0;
    }
    (new_lat, new_lon)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{SeedableRng, rngs::StdRng};

    #[test]
    fn parses_quoted_names_and_samples_near_cities() {
        let csv = "geonameid,name,latitude,longitude,country_code,population,timezone\n\
                   1,Berlin,52.52,13.405,DE,3600000,Europe/Berlin\n\
                   2,\"Misato, Saitama\",35.84373,139.88347,JP,142145,Asia/Tokyo\n";
        let cities = Cities::parse(csv).expect("parse");
        assert_eq!(cities.len(), 2);
        let mut rng = StdRng::seed_from_u64(1);
        for _ in 0..100 {
            let (lat, lon) = cities.sample(&mut rng, 2_000.0);
            let near_berlin = (lat - 52.52).abs() < 0.05 && (lon - 13.405).abs() < 0.05;
            let near_misato = (lat - 35.84).abs() < 0.05 && (lon - 139.88).abs() < 0.05;
            assert!(near_berlin || near_misato, "{lat},{lon}");
        }
    }

    #[test]
    fn steps_wrap_the_antimeridian() {
        let (_, lon) = step(-17.8, 179.9999, 100.0, 90.0);
        assert!(lon < -179.99, "{lon}");
    }
}
