//! `ClientIndex`: the node's R-tree of connected clients' last positions.
//!
//! Each session's entry is kept beside the tree (`positions`): a small move only updates
//! the entry, a larger one is a targeted remove of the old point plus an insert of the new
//! one (see [`TREE_SLACK_M`]); area queries pre-select with the tree, widened by the slack,
//! and then apply the exact test to the exact position.

use super::{UnitVector, chord_squared_for_metres, lat_lon_box_bounds, unit_vector};
use geo::{Contains, Coord, LineString, Point};
use geopush_proto::bus::geohash;
use geopush_proto::{Circle, EARTH_RADIUS_M, Polygon};
use rstar::{AABB, PointDistance, RTree, RTreeObject};
use std::collections::HashMap;

/// A session's identity on this node.
pub type SessionId = u64;

/// One client in the tree: where it is and which session it is.
#[derive(Clone, Copy, Debug, PartialEq)]
struct ClientPoint {
    position: UnitVector,
    session: SessionId,
}

impl RTreeObject for ClientPoint {
    type Envelope = AABB<UnitVector>;
    fn envelope(&self) -> Self::Envelope {
        AABB::from_point(self.position)
    }
}

impl PointDistance for ClientPoint {
    fn distance_2(&self, point: &UnitVector) -> f64 {
        (0..3).map(|i| (self.position[i] - point[i]).powi(2)).sum()
    }
}

/// A client's point in the tree moves only when the client is farther than this from it
/// (metres). Most fixes of a walking or standing phone are smaller moves, and an R-tree
/// move (remove + insert) costs microseconds while a map write costs nanoseconds; queries
/// widen their search by this much and then test the exact position.
pub const TREE_SLACK_M: f64 = 25.0;

/// The last known position of a client, in the forms the index needs.
#[derive(Clone, Copy, Debug, PartialEq)]
struct LastPosition {
    lat: f64,
    lon: f64,
    /// The exact position.
    position: UnitVector,
    /// Where the client's point sits in the tree (within `TREE_SLACK_M` of `position`).
    tree_position: UnitVector,
    /// Geohash bits of the position (see `geopush_proto::bus::geohash`).
    cell: u64,
}

fn chord2(a: &UnitVector, b: &UnitVector) -> f64 {
    (0..3).map(|i| (a[i] - b[i]).powi(2)).sum()
}

/// Where every located client of this node is.
#[derive(Default)]
pub struct ClientIndex {
    tree: RTree<ClientPoint>,
    positions: HashMap<SessionId, LastPosition>,
}

impl ClientIndex {
    pub fn new() -> ClientIndex {
        ClientIndex::default()
    }

    /// Number of located clients.
    pub fn len(&self) -> usize {
        self.positions.len()
    }

    pub fn is_empty(&self) -> bool {
        self.positions.is_empty()
    }

    /// Record a session's new position, replacing its previous one. Returns the geohash
    /// bits of the previous position (if any) and of the new one.
    pub fn update(&mut self, session: SessionId, lat: f64, lon: f64) -> (Option<u64>, u64) {
        let position = unit_vector(lat, lon);
        let cell = geohash::bits(lat, lon);
        if let Some(last) = self.positions.get_mut(&session) {
            let old_cell = last.cell;
            let tree_position = last.tree_position;
            *last = LastPosition {
                lat,
                lon,
                position,
                tree_position,
                cell,
            };
            if chord2(&tree_position, &position) > chord_squared_for_metres(TREE_SLACK_M) {
                last.tree_position = position;
                self.tree.remove(&ClientPoint {
                    position: tree_position,
                    session,
                });
                self.tree.insert(ClientPoint { position, session });
            }
            return (Some(old_cell), cell);
        }
        self.positions.insert(
            session,
            LastPosition {
                lat,
                lon,
                position,
                tree_position: position,
                cell,
            },
        );
        self.tree.insert(ClientPoint { position, session });
        (None, cell)
    }

    /// Forget a session (it disconnected); the geohash bits of its last position.
    pub fn remove(&mut self, session: SessionId) -> Option<u64> {
        let old = self.positions.remove(&session)?;
        self.tree.remove(&ClientPoint {
            position: old.tree_position,
            session,
        });
        Some(old.cell)
    }

    /// The geohash bits of a session's last position.
    pub fn cell_of(&self, session: SessionId) -> Option<u64> {
        self.positions.get(&session).map(|p| p.cell)
    }

    /// The sessions within the circle, by great-circle distance.
    pub fn sessions_in_circle(&self, circle: &Circle) -> Vec<SessionId> {
        let center = unit_vector(circle.lat, circle.lon);
        let exact = chord_squared_for_metres(circle.radius_m);
        let widened = chord_squared_for_metres(circle.radius_m + TREE_SLACK_M);
        self.tree
            .locate_within_distance(center, widened)
            .filter(|p| {
                self.positions
                    .get(&p.session)
                    .is_some_and(|last| chord2(&last.position, &center) <= exact)
            })
            .map(|p| p.session)
            .collect()
    }

    /// The sessions inside the polygon (holes excluded), edges straight in lon/lat as in
    /// GeoJSON. The polygon must be valid (see [`Polygon::validate`]).
    pub fn sessions_in_polygon(&self, polygon: &Polygon) -> Vec<SessionId> {
        let Some(shape) = to_geo_polygon(polygon) else {
            return Vec::new();
        };
        let outer = &polygon.rings[0];
        let (mut lat_min, mut lat_max) = (f64::INFINITY, f64::NEG_INFINITY);
        let (mut lon_min, mut lon_max) = (f64::INFINITY, f64::NEG_INFINITY);
        for [lon, lat] in outer.iter().copied() {
            lat_min = lat_min.min(lat);
            lat_max = lat_max.max(lat);
            lon_min = lon_min.min(lon);
            lon_max = lon_max.max(lon);
        }
        let (lower, upper) = lat_lon_box_bounds(lat_min, lat_max, lon_min, lon_max);
        // A tree point lies within the slack of its client: widen the box by as much.
        let slack = TREE_SLACK_M / EARTH_RADIUS_M;
        let widened = AABB::from_corners(lower.map(|c| c - slack), upper.map(|c| c + slack));
        self.tree
            .locate_in_envelope(&widened)
            .filter(|p| {
                self.positions
                    .get(&p.session)
                    .is_some_and(|last| shape.contains(&Point::new(last.lon, last.lat)))
            })
            .map(|p| p.session)
            .collect()
    }
}

/// The `geo` form of a validated GeoJSON polygon.
pub fn to_geo_polygon(polygon: &Polygon) -> Option<geo::Polygon<f64>> {
    let ring = |positions: &Vec<[f64; 2]>| {
        LineString::new(positions.iter().map(|&[x, y]| Coord { x, y }).collect())
    };
    let (outer, holes) = polygon.rings.split_first()?;
    Some(geo::Polygon::new(
        ring(outer),
        holes.iter().map(ring).collect(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::geo::haversine_m;
    use rand::{Rng, SeedableRng, rngs::StdRng};

    #[test]
    fn circle_query_equals_brute_force_haversine() {
        let mut rng = StdRng::seed_from_u64(11);
        let mut index = ClientIndex::new();
        let mut truth = HashMap::new();
        // Clients around three spots, one on the antimeridian and one near the pole.
        let spots = [(52.52, 13.405), (-17.8, 179.95), (89.9, 10.0)];
        for session in 0..3_000u64 {
            let (lat0, lon0) = spots[session as usize % spots.len()];
            let lat: f64 = (lat0 + rng.gen_range(-0.05f64..0.05)).clamp(-90.0, 90.0);
            let mut lon: f64 = lon0 + rng.gen_range(-0.1..0.1);
            if lon > 180.0 {
                lon -= 360.0;
            }
            index.update(session, lat, lon);
            truth.insert(session, (lat, lon));
        }
        // Nudge a third of them by a few metres (under the tree slack): exact answers still.
        for session in (0..3_000u64).step_by(3) {
            let (lat, lon) = truth[&session];
            let nudged = ((lat + 0.000_1).min(90.0), lon);
            index.update(session, nudged.0, nudged.1);
            truth.insert(session, nudged);
        }
        // Move half of them: the index must forget the old positions.
        for session in (0..3_000u64).step_by(2) {
            let (lat, lon) = truth[&session];
            let moved = ((lat + 0.001).min(90.0), lon);
            index.update(session, moved.0, moved.1);
            truth.insert(session, moved);
        }
        assert_eq!(index.len(), 3_000);
        for (lat, lon) in spots {
            for radius_m in [100.0, 1_000.0, 5_000.0] {
                let circle = Circle { lat, lon, radius_m };
                let mut got = index.sessions_in_circle(&circle);
                got.sort_unstable();
                let mut want: Vec<_> = truth
                    .iter()
                    .filter(|(_, (la, lo))| haversine_m(lat, lon, *la, *lo) <= radius_m)
                    .map(|(s, _)| *s)
                    .collect();
                want.sort_unstable();
                assert_eq!(got, want, "circle {circle:?}");
            }
        }
        for session in 0..3_000u64 {
            index.remove(session);
        }
        assert!(index.is_empty());
        assert_eq!(index.tree.size(), 0);
    }

    #[test]
    fn polygon_query_excludes_holes() {
        let mut index = ClientIndex::new();
        index.update(1, 0.5, 0.5); // inside the hole
        index.update(2, 0.1, 0.1); // inside, outside the hole
        index.update(3, 2.0, 2.0); // outside
        let polygon = Polygon {
            rings: vec![
                vec![[0.0, 0.0], [1.0, 0.0], [1.0, 1.0], [0.0, 1.0], [0.0, 0.0]],
                vec![[0.4, 0.4], [0.6, 0.4], [0.6, 0.6], [0.4, 0.6], [0.4, 0.4]],
            ],
        };
        assert_eq!(index.sessions_in_polygon(&polygon), vec![2]);
    }
}
