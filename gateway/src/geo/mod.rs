//! Geometry on the sphere, and the node's index of where its clients are.
//!
//! Positions are kept as unit vectors in 3-D (earth-centred). A great-circle radius `r` on
//! the sphere is exactly a chord of length `2·sin(r / 2R)`, so a radius query in an R-tree of
//! unit vectors is exact, and the antimeridian and the poles are not special cases.

pub mod clients;
pub mod fences;
pub mod nearby;
pub mod places;

pub use clients::ClientIndex;
pub use places::{PlacesReplica, PlacesSnapshot};

use geopush_proto::EARTH_RADIUS_M;

/// An earth-centred unit vector.
pub type UnitVector = [f64; 3];

/// The unit vector of a latitude/longitude in degrees.
pub fn unit_vector(lat: f64, lon: f64) -> UnitVector {
    let (lat, lon) = (lat.to_radians(), lon.to_radians());
    let (sin_lat, cos_lat) = lat.sin_cos();
    let (sin_lon, cos_lon) = lon.sin_cos();
    [cos_lat * cos_lon, cos_lat * sin_lon, sin_lat]
}

/// The squared chord length between two points `metres` apart along a great circle.
/// Distances past half the circumference clamp to the antipode.
pub fn chord_squared_for_metres(metres: f64) -> f64 {
    let angle = (metres / EARTH_RADIUS_M).min(std::f64::consts::PI);
    let chord = 2.0 * (angle / 2.0).sin();
    chord * chord
}

/// Great-circle distance in metres between two unit vectors (numerically stable everywhere).
pub fn metres_between(a: &UnitVector, b: &UnitVector) -> f64 {
    let cross = [
        a[1] * b[2] - a[2] * b[1],
        a[2] * b[0] - a[0] * b[2],
        a[0] * b[1] - a[1] * b[0],
    ];
    let sin = (cross[0] * cross[0] + cross[1] * cross[1] + cross[2] * cross[2]).sqrt();
    let cos = a[0] * b[0] + a[1] * b[1] + a[2] * b[2];
    sin.atan2(cos) * EARTH_RADIUS_M
}

/// Haversine distance in metres between two lat/lon points in degrees.
pub fn haversine_m(lat1: f64, lon1: f64, lat2: f64, lon2: f64) -> f64 {
    let (p1, p2) = (lat1.to_radians(), lat2.to_radians());
    let dp = p2 - p1;
    let dl = (lon2 - lon1).to_radians();
    let h = (dp / 2.0).sin().powi(2) + p1.cos() * p2.cos() * (dl / 2.0).sin().powi(2);
    2.0 * EARTH_RADIUS_M * h.sqrt().min(1.0).asin()
}

/// The smallest axis-aligned 3-D box holding every unit vector whose latitude lies in
/// `[lat_min, lat_max]` and longitude in `[lon_min, lon_max]` (degrees, `lon_min <= lon_max`).
/// Used to pre-select candidates for a polygon before the exact test.
pub fn lat_lon_box_bounds(
    lat_min: f64,
    lat_max: f64,
    lon_min: f64,
    lon_max: f64,
) -> (UnitVector, UnitVector) {
    // Extremes of x, y, z over the patch lie at its corners, or where the patch crosses a
    // longitude of 0/90/180/270 degrees, or the equator.
    let mut lats = vec![lat_min, lat_max];
    if lat_min < 0.0 && lat_max > 0.0 {
        lats.push(0.0);
    }
    let mut lons = vec![lon_min, lon_max];
    for axis in [-180.0, -90.0, 0.0, 90.0, 180.0] {
        if lon_min < axis && axis < lon_max {
            lons.push(axis);
        }
    }
    let mut lower = [f64::INFINITY; 3];
    let mut upper = [f64::NEG_INFINITY; 3];
    for &lat in &lats {
        for &lon in &lons {
            let v = unit_vector(lat, lon);
            for i in 0..3 {
                lower[i] = lower[i].min(v[i]);
                upper[i] = upper[i].max(v[i]);
            }
        }
    }
    // Rounding in sin/cos must not exclude a point on the boundary.
    const SLACK: f64 = 1e-12;
    (lower.map(|c| c - SLACK), upper.map(|c| c + SLACK))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chord_distance_agrees_with_haversine() {
        let pairs = [
            ((52.52, 13.405), (52.5201, 13.4051)),
            ((-17.8, 179.99), (-17.8, -179.99)),
            ((89.9, 0.0), (89.9, 180.0)),
            ((0.0, 0.0), (0.0, 90.0)),
        ];
        for ((la1, lo1), (la2, lo2)) in pairs {
            let exact = haversine_m(la1, lo1, la2, lo2);
            let via_vectors = metres_between(&unit_vector(la1, lo1), &unit_vector(la2, lo2));
            assert!(
                (exact - via_vectors).abs() < 1e-6 * exact.max(1.0),
                "{exact} vs {via_vectors}"
            );
            let a = unit_vector(la1, lo1);
            let b = unit_vector(la2, lo2);
            let chord2: f64 = (0..3).map(|i| (a[i] - b[i]).powi(2)).sum();
            let predicted = chord_squared_for_metres(exact);
            assert!(
                (chord2 - predicted).abs() < 1e-12,
                "{chord2} vs {predicted}"
            );
        }
    }

    #[test]
    fn lat_lon_box_holds_its_points() {
        use rand::{Rng, SeedableRng, rngs::StdRng};
        let mut rng = StdRng::seed_from_u64(3);
        for _ in 0..2_000 {
            let (a, b) = (rng.gen_range(-90.0..=90.0), rng.gen_range(-90.0..=90.0));
            let (c, d) = (rng.gen_range(-180.0..=180.0), rng.gen_range(-180.0..=180.0));
            let (lat_min, lat_max) = if a < b { (a, b) } else { (b, a) };
            let (lon_min, lon_max) = if c < d { (c, d) } else { (d, c) };
            let (lower, upper) = lat_lon_box_bounds(lat_min, lat_max, lon_min, lon_max);
            for _ in 0..20 {
                let v = unit_vector(
                    rng.gen_range(lat_min..=lat_max),
                    rng.gen_range(lon_min..=lon_max),
                );
                for i in 0..3 {
                    assert!(lower[i] <= v[i] && v[i] <= upper[i]);
                }
            }
        }
    }
}
