//! Brute-force reference geometry, written independently of the gateway's: haversine
//! distance and point-in-polygon (with holes) for GeoJSON `[lon, lat]` rings.

/// Mean Earth radius in metres, the sphere the gateway measures on (IUGG).
pub const EARTH_RADIUS_M: f64 = 6_371_008.8;

/// Great-circle distance in metres between two points in degrees.
pub fn haversine_m(lat1: f64, lon1: f64, lat2: f64, lon2: f64) -> f64 {
    let (phi1, phi2) = (lat1.to_radians(), lat2.to_radians());
    let d_phi = phi2 - phi1;
    let d_lambda = (lon2 - lon1).to_radians();
    let a = (d_phi / 2.0).sin().powi(2) + phi1.cos() * phi2.cos() * (d_lambda / 2.0).sin().powi(2);
    2.0 * EARTH_RADIUS_M * a.sqrt().min(1.0).asin()
}

/// Even-odd ray casting: is `(lon, lat)` inside `ring` (closed, `[lon, lat]` positions)?
pub fn in_ring(lon: f64, lat: f64, ring: &[[f64; 2]]) -> bool {
    let mut inside = false;
    for edge in ring.windows(2) {
        let ([x1, y1], [x2, y2]) = (edge[0], edge[1]);
        if (y1 > lat) != (y2 > lat) {
            let x_at = x1 + (lat - y1) / (y2 - y1) * (x2 - x1);
            if lon < x_at {
                inside = !inside;
            }
        }
    }
    inside
}

/// Inside the outer ring and outside every hole.
pub fn in_polygon(lon: f64, lat: f64, rings: &[Vec<[f64; 2]>]) -> bool {
    match rings.split_first() {
        Some((outer, holes)) => {
            in_ring(lon, lat, outer) && !holes.iter().any(|h| in_ring(lon, lat, h))
        }
        None => false,
    }
}

/// Distance in degrees (lon/lat plane) from a point to the nearest edge of any ring: used to
/// keep random test points off boundaries, where "inside" is a matter of rounding.
pub fn distance_to_rings_deg(lon: f64, lat: f64, rings: &[Vec<[f64; 2]>]) -> f64 {
    let mut best = f64::INFINITY;
    for ring in rings {
        for edge in ring.windows(2) {
            let ([x1, y1], [x2, y2]) = (edge[0], edge[1]);
            let (dx, dy) = (x2 - x1, y2 - y1);
            let len2 = dx * dx + dy * dy;
            let t = if len2 == 0.0 {
                0.0
            } else {
                (((lon - x1) * dx + (lat - y1) * dy) / len2).clamp(0.0, 1.0)
            };
            let (px, py) = (x1 + t * dx, y1 + t * dy);
            best = best.min(((lon - px).powi(2) + (lat - py).powi(2)).sqrt());
        }
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reference_geometry_is_sane() {
        // One degree of latitude is about 111.2 km.
        let d = haversine_m(0.0, 0.0, 1.0, 0.0);
        assert!((d - 111_195.0).abs() < 10.0, "{d}");
        // Across the antimeridian the short way.
        assert!(haversine_m(0.0, 179.9, 0.0, -179.9) < 23_000.0);
        let square = vec![
            vec![[0.0, 0.0], [4.0, 0.0], [4.0, 4.0], [0.0, 4.0], [0.0, 0.0]],
            vec![[1.0, 1.0], [1.0, 3.0], [3.0, 3.0], [3.0, 1.0], [1.0, 1.0]],
        ];
        assert!(in_polygon(0.5, 0.5, &square));
        assert!(!in_polygon(2.0, 2.0, &square), "in the hole");
        assert!(!in_polygon(5.0, 2.0, &square));
        assert!((distance_to_rings_deg(2.0, 2.0, &square) - 1.0).abs() < 1e-12);
    }
}
