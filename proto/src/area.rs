//! Delivery areas: a circle or a GeoJSON polygon (outer ring, then holes), validated.

use serde::{Deserialize, Serialize};
use thiserror::Error;

/// Largest circle radius accepted for a delivery area (a quarter of the Earth's circumference
/// would already be absurd for a push; this keeps area queries bounded).
pub const MAX_AREA_RADIUS_M: f64 = 1_000_000.0;
/// Most vertices over all rings of one polygon.
pub const MAX_POLYGON_VERTICES: usize = 10_000;

/// Why an area was refused.
#[derive(Clone, Debug, PartialEq, Error)]
pub enum AreaError {
    #[error("center must have lat in [-90, 90] and lon in [-180, 180], finite")]
    Center,
    #[error("radius_m must be finite, > 0 and <= {MAX_AREA_RADIUS_M}")]
    Radius,
    #[error("polygon needs an outer ring")]
    NoRing,
    #[error("ring {0} must be closed and hold at least 4 positions")]
    Ring(usize),
    #[error("ring {ring} position {index} is not a valid [lon, lat]")]
    Position { ring: usize, index: usize },
    #[error("polygon has more than {MAX_POLYGON_VERTICES} vertices")]
    TooManyVertices,
}

/// A circle on the sphere: every point within `radius_m` great-circle metres of the center.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Circle {
    pub lat: f64,
    pub lon: f64,
    pub radius_m: f64,
}

/// A polygon in GeoJSON `Polygon` coordinates: `rings[0]` is the outer ring, the rest are
/// holes; each position is `[lon, lat]`. Edges are straight in lon/lat, as GeoJSON says.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Polygon {
    pub rings: Vec<Vec<[f64; 2]>>,
}

/// Where a geo-targeted delivery goes.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Area {
    Circle(Circle),
    Polygon(Polygon),
}

fn valid_lat_lon(lat: f64, lon: f64) -> bool {
    lat.is_finite()
        && lon.is_finite()
        && (-90.0..=90.0).contains(&lat)
        && (-180.0..=180.0).contains(&lon)
}

impl Circle {
    pub fn validate(&self) -> Result<(), AreaError> {
        if !valid_lat_lon(self.lat, self.lon) {
            return Err(AreaError::Center);
        }
        if !(self.radius_m.is_finite() && self.radius_m > 0.0 && self.radius_m <= MAX_AREA_RADIUS_M)
        {
            return Err(AreaError::Radius);
        }
        Ok(())
    }
}

impl Polygon {
    pub fn validate(&self) -> Result<(), AreaError> {
        if self.rings.is_empty() {
            return Err(AreaError::NoRing);
        }
        let vertices: usize = self.rings.iter().map(Vec::len).sum();
        if vertices > MAX_POLYGON_VERTICES {
            return Err(AreaError::TooManyVertices);
        }
        for (ring_index, ring) in self.rings.iter().enumerate() {
            if ring.len() < 4 || ring.first() != ring.last() {
                return Err(AreaError::Ring(ring_index));
            }
            for (index, [lon, lat]) in ring.iter().copied().enumerate() {
                if !valid_lat_lon(lat, lon) {
                    return Err(AreaError::Position {
                        ring: ring_index,
                        index,
                    });
                }
            }
        }
        Ok(())
    }
}

impl Area {
    pub fn validate(&self) -> Result<(), AreaError> {
        match self {
            Area::Circle(c) => c.validate(),
            Area::Polygon(p) => p.validate(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn circle_bounds() {
        assert!(
            Circle {
                lat: 1.0,
                lon: 2.0,
                radius_m: 500.0
            }
            .validate()
            .is_ok()
        );
        assert_eq!(
            Circle {
                lat: 91.0,
                lon: 2.0,
                radius_m: 5.0
            }
            .validate(),
            Err(AreaError::Center)
        );
        assert_eq!(
            Circle {
                lat: 1.0,
                lon: 2.0,
                radius_m: -5.0
            }
            .validate(),
            Err(AreaError::Radius)
        );
        assert_eq!(
            Circle {
                lat: 1.0,
                lon: 2.0,
                radius_m: f64::NAN
            }
            .validate(),
            Err(AreaError::Radius)
        );
    }

    #[test]
    fn polygon_rings_must_close() {
        let square = Polygon {
            rings: vec![vec![[0.0, 0.0], [1.0, 0.0], [1.0, 1.0], [0.0, 0.0]]],
        };
        assert!(square.validate().is_ok());
        let open = Polygon {
            rings: vec![vec![[0.0, 0.0], [1.0, 0.0], [1.0, 1.0], [0.0, 1.0]]],
        };
        assert_eq!(open.validate(), Err(AreaError::Ring(0)));
        let bad = Polygon {
            rings: vec![vec![[0.0, 0.0], [200.0, 0.0], [1.0, 1.0], [0.0, 0.0]]],
        };
        assert_eq!(
            bad.validate(),
            Err(AreaError::Position { ring: 0, index: 1 })
        );
        assert_eq!(Polygon { rings: vec![] }.validate(), Err(AreaError::NoRing));
    }

    #[test]
    fn area_json_shape_matches_the_api() {
        let a: Area =
            serde_json::from_str(r#"{"circle":{"lat":52.52,"lon":13.405,"radius_m":500}}"#)
                .expect("circle");
        assert!(matches!(a, Area::Circle(_)));
        let p: Area =
            serde_json::from_str(r#"{"polygon":[[[0,0],[1,0],[1,1],[0,0]]]}"#).expect("polygon");
        assert!(matches!(p, Area::Polygon(ref poly) if poly.rings.len() == 1));
    }
}
