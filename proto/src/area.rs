//! Delivery areas: a circle or a GeoJSON polygon (outer ring, then holes), validated.

use serde::{Deserialize, Serialize};
use thiserror::Error;
use utoipa::ToSchema;

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
    #[error("polygon edges intersect (ring {ring} and ring {other}): it must be simple")]
    SelfIntersecting { ring: usize, other: usize },
    #[error("polygon too complex to check: too many edges overlap each other's longitudes")]
    TooComplex,
}

/// Most edge pairs compared to prove a polygon simple (a few ms). Real outlines compare a
/// few per edge; only contrived shapes (every edge spanning every other's longitudes) get
/// near it, and they are refused rather than costing seconds of CPU per request.
pub const MAX_EDGE_COMPARISONS: usize = 2_000_000;

/// A circle on the sphere: every point within `radius_m` great-circle metres of the center.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Circle {
    #[schema(minimum = -90, maximum = 90)]
    pub lat: f64,
    #[schema(minimum = -180, maximum = 180)]
    pub lon: f64,
    /// Metres, > 0 and at most 1,000,000.
    #[schema(exclusive_minimum = 0, maximum = 1000000)]
    pub radius_m: f64,
}

/// A polygon in GeoJSON `Polygon` coordinates: `rings[0]` is the outer ring, the rest are
/// holes; each position is `[lon, lat]`. Edges are straight in lon/lat, as GeoJSON says.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Polygon {
    /// Rings of `[lon, lat]` positions, each closed (last = first), at least 4 positions.
    pub rings: Vec<Vec<[f64; 2]>>,
}

/// Where a geo-targeted delivery goes: exactly one of these.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Area {
    Circle(Circle),
    Polygon(Polygon),
}

/// The schema is written out because it is the bare GeoJSON coordinates array (the struct is
/// `serde(transparent)`, which utoipa's derive does not follow).
impl utoipa::PartialSchema for Polygon {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        use utoipa::openapi::schema::{ArrayBuilder, ObjectBuilder, Type};
        let position = ArrayBuilder::new()
            .items(ObjectBuilder::new().schema_type(Type::Number))
            .min_items(Some(2))
            .max_items(Some(2))
            .description(Some("[lon, lat]"));
        let ring = ArrayBuilder::new()
            .items(position)
            .min_items(Some(4))
            .description(Some("A closed ring: the last position equals the first"));
        ArrayBuilder::new()
            .items(ring)
            .min_items(Some(1))
            .description(Some(
                "GeoJSON Polygon coordinates: the outer ring, then holes; at most 10,000 \
                 positions in all; edges must not cross",
            ))
            .into()
    }
}

impl ToSchema for Polygon {}

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
        match first_crossing(&self.rings, MAX_EDGE_COMPARISONS) {
            Crossing::None => {}
            Crossing::Found(ring, other) => {
                return Err(AreaError::SelfIntersecting { ring, other });
            }
            Crossing::TooComplex => return Err(AreaError::TooComplex),
        }
        Ok(())
    }
}

/// One polygon edge: ring index, position of its first vertex in the ring, and the ends.
#[derive(Clone, Copy)]
struct Edge {
    ring: usize,
    index: usize,
    a: [f64; 2],
    b: [f64; 2],
}

impl Edge {
    fn x_range(&self) -> (f64, f64) {
        (self.a[0].min(self.b[0]), self.a[0].max(self.b[0]))
    }
}

/// Twice the signed area of (p, q, r): > 0 counter-clockwise, 0 collinear.
fn orientation(p: [f64; 2], q: [f64; 2], r: [f64; 2]) -> f64 {
    (q[0] - p[0]) * (r[1] - p[1]) - (q[1] - p[1]) * (r[0] - p[0])
}

fn on_segment(p: [f64; 2], q: [f64; 2], r: [f64; 2]) -> bool {
    r[0] >= p[0].min(q[0])
        && r[0] <= p[0].max(q[0])
        && r[1] >= p[1].min(q[1])
        && r[1] <= p[1].max(q[1])
}

/// Whether two closed segments share any point.
fn segments_touch(e: &Edge, f: &Edge) -> bool {
    let (d1, d2) = (orientation(e.a, e.b, f.a), orientation(e.a, e.b, f.b));
    let (d3, d4) = (orientation(f.a, f.b, e.a), orientation(f.a, f.b, e.b));
    if ((d1 > 0.0 && d2 < 0.0) || (d1 < 0.0 && d2 > 0.0))
        && ((d3 > 0.0 && d4 < 0.0) || (d3 < 0.0 && d4 > 0.0))
    {
        return true;
    }
    (d1 == 0.0 && on_segment(e.a, e.b, f.a))
        || (d2 == 0.0 && on_segment(e.a, e.b, f.b))
        || (d3 == 0.0 && on_segment(f.a, f.b, e.a))
        || (d4 == 0.0 && on_segment(f.a, f.b, e.b))
}

/// What the simplicity check found.
#[derive(Debug, PartialEq, Eq)]
enum Crossing {
    None,
    /// Two edges touch where they should not: rings of the pair.
    Found(usize, usize),
    /// More than the budget of comparisons would be needed.
    TooComplex,
}

/// The rings of the first pair of edges that touch where they should not: edges of one ring
/// that are not neighbours, or edges of two rings. A sweep over edges sorted by their west
/// end compares only edges whose longitude ranges overlap, so ordinary polygons cost about
/// n log n rather than n²; at most `budget` pairs are compared.
fn first_crossing(rings: &[Vec<[f64; 2]>], budget: usize) -> Crossing {
    match first_crossing_within(rings, budget) {
        Ok(Some((ring, other))) => Crossing::Found(ring, other),
        Ok(None) => Crossing::None,
        Err(()) => Crossing::TooComplex,
    }
}

fn first_crossing_within(
    rings: &[Vec<[f64; 2]>],
    mut budget: usize,
) -> Result<Option<(usize, usize)>, ()> {
    let mut edges: Vec<Edge> = Vec::new();
    let mut ring_edges = Vec::with_capacity(rings.len());
    for (ring, positions) in rings.iter().enumerate() {
        let before = edges.len();
        for (index, pair) in positions.windows(2).enumerate() {
            // Repeated positions make zero-length edges; they cross nothing.
            if pair[0] != pair[1] {
                edges.push(Edge {
                    ring,
                    index,
                    a: pair[0],
                    b: pair[1],
                });
            }
        }
        ring_edges.push(edges.len() - before);
    }
    // A ring whose distinct edges cannot enclose anything is degenerate.
    if let Some(ring) = ring_edges.iter().position(|&n| n < 3) {
        return Ok(Some((ring, ring)));
    }
    let neighbours = |e: &Edge, f: &Edge| {
        if e.ring != f.ring {
            return false;
        }
        // Neighbours share exactly one vertex: consecutive edges, or the ring's last and
        // first (the ring is closed).
        e.b == f.a || f.b == e.a
    };
    edges.sort_by(|e, f| e.x_range().0.total_cmp(&f.x_range().0));
    for (i, e) in edges.iter().enumerate() {
        let east = e.x_range().1;
        for f in &edges[i + 1..] {
            if f.x_range().0 > east {
                break;
            }
            budget = budget.checked_sub(1).ok_or(())?;
            if neighbours(e, f) {
                // Neighbours may not fold back onto each other.
                let folded = orientation(e.a, e.b, if e.b == f.a { f.b } else { f.a }) == 0.0 && {
                    let (shared, far_e, far_f) = if e.b == f.a {
                        (e.b, e.a, f.b)
                    } else {
                        (e.a, e.b, f.a)
                    };
                    (far_e[0] - shared[0]) * (far_f[0] - shared[0])
                        + (far_e[1] - shared[1]) * (far_f[1] - shared[1])
                        > 0.0
                };
                if folded && e.index != f.index {
                    return Ok(Some((e.ring, f.ring)));
                }
                continue;
            }
            if segments_touch(e, f) {
                return Ok(Some((e.ring.min(f.ring), e.ring.max(f.ring))));
            }
        }
    }
    Ok(None)
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
    fn self_intersecting_polygons_are_refused() {
        let bow_tie = Polygon {
            rings: vec![vec![
                [0.0, 0.0],
                [1.0, 1.0],
                [1.0, 0.0],
                [0.0, 1.0],
                [0.0, 0.0],
            ]],
        };
        assert_eq!(
            bow_tie.validate(),
            Err(AreaError::SelfIntersecting { ring: 0, other: 0 })
        );
        let square = vec![[0.0, 0.0], [4.0, 0.0], [4.0, 4.0], [0.0, 4.0], [0.0, 0.0]];
        let hole = vec![[1.0, 1.0], [2.0, 1.0], [2.0, 2.0], [1.0, 2.0], [1.0, 1.0]];
        let with_hole = Polygon {
            rings: vec![square.clone(), hole],
        };
        assert_eq!(with_hole.validate(), Ok(()));
        let crossing_hole = vec![[3.0, 1.0], [5.0, 1.0], [5.0, 2.0], [3.0, 2.0], [3.0, 1.0]];
        assert_eq!(
            Polygon {
                rings: vec![square.clone(), crossing_hole]
            }
            .validate(),
            Err(AreaError::SelfIntersecting { ring: 0, other: 1 })
        );
        let spike = Polygon {
            rings: vec![vec![
                [0.0, 0.0],
                [2.0, 0.0],
                [1.0, 0.0],
                [1.0, 1.0],
                [0.0, 0.0],
            ]],
        };
        assert!(spike.validate().is_err());
        let flat = Polygon {
            rings: vec![vec![[0.0, 0.0], [1.0, 0.0], [0.0, 0.0], [0.0, 0.0]]],
        };
        assert!(flat.validate().is_err());
        // A real-world shape with many vertices: a 1,000-gon is simple.
        let gon: Vec<[f64; 2]> = (0..=1000)
            .map(|i| {
                let t = (i % 1000) as f64 / 1000.0 * std::f64::consts::TAU;
                [13.4 + 0.01 * t.cos(), 52.5 + 0.01 * t.sin()]
            })
            .collect();
        assert_eq!(Polygon { rings: vec![gon] }.validate(), Ok(()));
    }

    /// A simple sawtooth whose every edge spans every other's longitudes: the sweep cannot
    /// skip any pair, so the check stops at its budget instead of costing n² comparisons.
    #[test]
    fn contrived_polygons_stop_at_the_budget() {
        let teeth = 4_990;
        let lat = |i: usize| i as f64 * 0.001;
        let mut ring = vec![[0.0, 0.0]];
        for i in 0..teeth {
            ring.push([10.0, lat(2 * i + 1)]);
            ring.push([0.0, lat(2 * i + 2)]);
        }
        ring.push([-1.0, lat(2 * teeth)]);
        ring.push([-1.0, 0.0]);
        ring.push([0.0, 0.0]);
        let rings = vec![ring];
        assert_eq!(
            first_crossing(&rings, MAX_EDGE_COMPARISONS),
            Crossing::TooComplex
        );
        assert_eq!(
            Polygon {
                rings: rings.clone()
            }
            .validate(),
            Err(AreaError::TooComplex)
        );
        // The same shape with a few teeth is simple and checked in full.
        let small: Vec<[f64; 2]> = rings[0][..41]
            .iter()
            .copied()
            .chain([[-1.0, lat(40)], [-1.0, 0.0], [0.0, 0.0]])
            .collect();
        assert_eq!(
            first_crossing(&[small], MAX_EDGE_COMPARISONS),
            Crossing::None
        );
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
