//! `PlacesReplica`: every place in memory, in two R-trees (points for `nearby`, fence boxes
//! for geofences), swapped whole on update so readers never take a lock.
//!
//! Readers call [`PlacesReplica::snapshot`] and work on an immutable [`PlacesSnapshot`];
//! an update builds a new snapshot with bulk loading and swaps it in atomically.

use super::{
    UnitVector, chord_squared_for_metres, lat_lon_box_bounds, metres_between, unit_vector,
};
use arc_swap::ArcSwap;
use geo::{Contains, Coord, Distance, Euclidean, LineString, Point};
use geopush_proto::frames::PlaceSummary;
use geopush_proto::place::{Place, PlaceFence, PlacesFile, RejectedRow, parse_places_file};
use geopush_proto::{EARTH_RADIUS_M, Polygon};
use rstar::{AABB, PointDistance, RTree, RTreeObject};
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

/// Index of a place in its snapshot.
pub type PlaceIndex = u32;

/// Where a point is relative to a fence.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum FenceSide {
    Inside,
    /// Outside, this many metres from the fence's edge.
    Outside(f64),
}

/// A fence prepared for fast tests.
#[derive(Clone, Debug)]
pub enum CompiledFence {
    Circle {
        center: UnitVector,
        radius_m: f64,
    },
    /// The polygon in a local equirectangular plane in metres around `origin`: an affine
    /// map of lon/lat, so containment is exactly GeoJSON's, and distances are accurate for
    /// fences up to tens of kilometres.
    Polygon {
        origin_lat: f64,
        origin_lon: f64,
        metres_per_lon_degree: f64,
        shape: geo::Polygon<f64>,
    },
}

const METRES_PER_LAT_DEGREE: f64 = EARTH_RADIUS_M * std::f64::consts::PI / 180.0;

impl CompiledFence {
    fn compile(place: &Place) -> Option<CompiledFence> {
        match place.fence.as_ref()? {
            PlaceFence::Circle { radius_m } => Some(CompiledFence::Circle {
                center: unit_vector(place.lat, place.lon),
                radius_m: *radius_m,
            }),
            PlaceFence::Polygon(polygon) => {
                let (origin_lat, origin_lon) = (place.lat, place.lon);
                let metres_per_lon_degree =
                    METRES_PER_LAT_DEGREE * origin_lat.to_radians().cos().max(1e-6);
                let project = |ring: &Vec<[f64; 2]>| {
                    LineString::new(
                        ring.iter()
                            .map(|&[lon, lat]| Coord {
                                x: (lon - origin_lon) * metres_per_lon_degree,
                                y: (lat - origin_lat) * METRES_PER_LAT_DEGREE,
                            })
                            .collect(),
                    )
                };
                let (outer, holes) = polygon.rings.split_first()?;
                let shape = geo::Polygon::new(project(outer), holes.iter().map(project).collect());
                Some(CompiledFence::Polygon {
                    origin_lat,
                    origin_lon,
                    metres_per_lon_degree,
                    shape,
                })
            }
        }
    }

    /// Which side of the fence a point is on.
    pub fn side(&self, lat: f64, lon: f64) -> FenceSide {
        match self {
            CompiledFence::Circle { center, radius_m } => {
                let beyond = metres_between(center, &unit_vector(lat, lon)) - radius_m;
                if beyond <= 0.0 {
                    FenceSide::Inside
                } else {
                    FenceSide::Outside(beyond)
                }
            }
            CompiledFence::Polygon {
                origin_lat,
                origin_lon,
                metres_per_lon_degree,
                shape,
            } => {
                let point = Point::new(
                    (lon - origin_lon) * metres_per_lon_degree,
                    (lat - origin_lat) * METRES_PER_LAT_DEGREE,
                );
                if shape.contains(&point) {
                    FenceSide::Inside
                } else {
                    FenceSide::Outside(Euclidean.distance(&point, shape))
                }
            }
        }
    }

    /// A 3-D box holding every unit vector inside the fence.
    fn bounds(&self, place: &Place) -> (UnitVector, UnitVector) {
        match (self, &place.fence) {
            (CompiledFence::Circle { center, radius_m }, _) => {
                cap_bounds(center, radius_m / EARTH_RADIUS_M)
            }
            (_, Some(PlaceFence::Polygon(polygon))) => polygon_bounds(polygon),
            _ => (
                unit_vector(place.lat, place.lon),
                unit_vector(place.lat, place.lon),
            ),
        }
    }
}

/// The 3-D bounding box of a spherical cap of angular radius `angle` around `center`.
fn cap_bounds(center: &UnitVector, angle: f64) -> (UnitVector, UnitVector) {
    const SLACK: f64 = 1e-9;
    let mut lower = [0.0; 3];
    let mut upper = [0.0; 3];
    for i in 0..3 {
        let to_axis = center[i].clamp(-1.0, 1.0).acos();
        upper[i] = ((to_axis - angle).max(0.0)).cos() + SLACK;
        lower[i] = -((std::f64::consts::PI - to_axis - angle).max(0.0)).cos() - SLACK;
    }
    (lower, upper)
}

fn polygon_bounds(polygon: &Polygon) -> (UnitVector, UnitVector) {
    let (mut lat_min, mut lat_max, mut lon_min, mut lon_max) =
        (90.0f64, -90.0f64, 180.0f64, -180.0f64);
    for [lon, lat] in polygon.rings.first().into_iter().flatten().copied() {
        lat_min = lat_min.min(lat);
        lat_max = lat_max.max(lat);
        lon_min = lon_min.min(lon);
        lon_max = lon_max.max(lon);
    }
    lat_lon_box_bounds(lat_min, lat_max, lon_min, lon_max)
}

/// A place in the snapshot with what the hot paths need precomputed.
pub struct PlaceEntry {
    pub place: Place,
    pub position: UnitVector,
    pub fence: Option<CompiledFence>,
    /// The place as a `PlaceSummary` JSON object without `distance_m`, ready to splice
    /// into `nearby` and `geofence` frames.
    pub summary_json: Box<str>,
}

#[derive(Clone, Copy)]
struct PlacePoint {
    position: UnitVector,
    index: PlaceIndex,
}

impl RTreeObject for PlacePoint {
    type Envelope = AABB<UnitVector>;
    fn envelope(&self) -> Self::Envelope {
        AABB::from_point(self.position)
    }
}

impl PointDistance for PlacePoint {
    fn distance_2(&self, point: &UnitVector) -> f64 {
        (0..3).map(|i| (self.position[i] - point[i]).powi(2)).sum()
    }
}

#[derive(Clone, Copy)]
struct FenceBox {
    bounds: AABB<UnitVector>,
    index: PlaceIndex,
}

impl RTreeObject for FenceBox {
    type Envelope = AABB<UnitVector>;
    fn envelope(&self) -> Self::Envelope {
        self.bounds
    }
}

/// Radii up to this (metres) collect every place inside and select the nearest; larger
/// ones walk the nearest-neighbour iterator (a 5 km circle in a city can hold thousands).
pub const SMALL_RADIUS_M: f64 = 1_000.0;

/// One place found by a nearby query.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct NearbyHit {
    pub index: PlaceIndex,
    pub distance_m: f64,
}

/// An immutable set of places and its indexes.
pub struct PlacesSnapshot {
    /// Increases with every swap; sessions recompute `nearby` when it changes.
    pub version: u64,
    entries: Vec<PlaceEntry>,
    by_id: HashMap<String, PlaceIndex>,
    points: RTree<PlacePoint>,
    fences: RTree<FenceBox>,
}

impl PlacesSnapshot {
    fn build(places: Vec<Place>, version: u64) -> PlacesSnapshot {
        let mut entries = Vec::with_capacity(places.len());
        let mut by_id = HashMap::with_capacity(places.len());
        for place in places {
            let summary = PlaceSummary {
                id: place.id.clone(),
                name: place.name.clone(),
                lat: place.lat,
                lon: place.lon,
                distance_m: None,
                tags: place.tags.clone(),
            };
            let summary_json = serde_json::to_string(&summary)
                .unwrap_or_else(|_| "{}".into())
                .into_boxed_str();
            let index = entries.len() as PlaceIndex;
            // Later duplicates replace earlier ones.
            by_id.insert(place.id.clone(), index);
            entries.push(PlaceEntry {
                position: unit_vector(place.lat, place.lon),
                fence: CompiledFence::compile(&place),
                summary_json,
                place,
            });
        }
        // Only the entry the id map points at is live.
        let live = |i: usize, e: &PlaceEntry| by_id.get(&e.place.id) == Some(&(i as PlaceIndex));
        let points = entries
            .iter()
            .enumerate()
            .filter(|(i, e)| live(*i, e))
            .map(|(i, e)| PlacePoint {
                position: e.position,
                index: i as PlaceIndex,
            })
            .collect();
        let fences = entries
            .iter()
            .enumerate()
            .filter(|(i, e)| live(*i, e))
            .filter_map(|(i, e)| {
                let (lower, upper) = e.fence.as_ref()?.bounds(&e.place);
                Some(FenceBox {
                    bounds: AABB::from_corners(lower, upper),
                    index: i as PlaceIndex,
                })
            })
            .collect();
        PlacesSnapshot {
            version,
            by_id,
            points: RTree::bulk_load(points),
            fences: RTree::bulk_load(fences),
            entries,
        }
    }

    /// Number of places.
    pub fn len(&self) -> usize {
        self.by_id.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_id.is_empty()
    }

    pub fn entry(&self, index: PlaceIndex) -> &PlaceEntry {
        &self.entries[index as usize]
    }

    pub fn get(&self, id: &str) -> Option<(PlaceIndex, &PlaceEntry)> {
        let index = *self.by_id.get(id)?;
        Some((index, self.entry(index)))
    }

    /// Places within `radius_m` great-circle metres of `center`, nearest first, at most
    /// `limit`. `out` is cleared and filled (reused to avoid allocating per fix).
    pub fn nearby(
        &self,
        center: &UnitVector,
        radius_m: f64,
        limit: usize,
        out: &mut Vec<NearbyHit>,
    ) {
        out.clear();
        let max_chord2 = chord_squared_for_metres(radius_m);
        let to_hit = |index: PlaceIndex, chord2: f64| NearbyHit {
            index,
            distance_m: 2.0 * (chord2.sqrt() / 2.0).min(1.0).asin() * EARTH_RADIUS_M,
        };
        if radius_m <= SMALL_RADIUS_M {
            // Few places fit in a small circle: collecting them all and selecting the
            // nearest beats the nearest-neighbour iterator (its heap, and its walk past
            // the radius when nothing is inside).
            out.extend(
                self.points
                    .locate_within_distance(*center, max_chord2)
                    .map(|p| to_hit(p.index, p.distance_2(center))),
            );
            let by_distance = |a: &NearbyHit, b: &NearbyHit| a.distance_m.total_cmp(&b.distance_m);
            if out.len() > limit {
                out.select_nth_unstable_by(limit, by_distance);
                out.truncate(limit);
            }
            out.sort_unstable_by(by_distance);
            return;
        }
        for (point, chord2) in self.points.nearest_neighbor_iter_with_distance_2(center) {
            if chord2 > max_chord2 || out.len() >= limit {
                break;
            }
            out.push(to_hit(point.index, chord2));
        }
    }

    /// Places whose fence box holds the point (candidates for an exact fence test).
    pub fn fences_near(&self, position: &UnitVector) -> impl Iterator<Item = PlaceIndex> + '_ {
        self.fences
            .locate_in_envelope_intersecting(&AABB::from_point(*position))
            .map(|f| f.index)
    }

    /// Every place (live entries only).
    pub fn places(&self) -> impl Iterator<Item = &PlaceEntry> + '_ {
        self.by_id.values().map(|i| self.entry(*i))
    }
}

/// What loading a places file did.
#[derive(Clone, Debug, Default)]
pub struct LoadReport {
    pub loaded: usize,
    pub rejected: Vec<RejectedRow>,
}

/// The node's replica of every place.
pub struct PlacesReplica {
    current: ArcSwap<PlacesSnapshot>,
    next_version: AtomicU64,
}

impl Default for PlacesReplica {
    fn default() -> Self {
        PlacesReplica::new()
    }
}

impl PlacesReplica {
    pub fn new() -> PlacesReplica {
        PlacesReplica {
            current: ArcSwap::from_pointee(PlacesSnapshot::build(Vec::new(), 0)),
            next_version: AtomicU64::new(1),
        }
    }

    /// The current snapshot. Lock-free; hold it for the duration of one fix.
    pub fn snapshot(&self) -> Arc<PlacesSnapshot> {
        self.current.load_full()
    }

    /// Replace every place.
    pub fn replace(&self, places: Vec<Place>) {
        let version = self.next_version.fetch_add(1, Ordering::Relaxed);
        self.current
            .store(Arc::new(PlacesSnapshot::build(places, version)));
    }

    /// Insert or replace some places and delete others, keeping the rest.
    pub fn apply(&self, upserts: Vec<Place>, deletes: &[String]) {
        let current = self.snapshot();
        let deletes: std::collections::HashSet<&str> = deletes.iter().map(String::as_str).collect();
        let mut places: Vec<Place> = current
            .places()
            .filter(|e| !deletes.contains(e.place.id.as_str()))
            .map(|e| e.place.clone())
            .collect();
        places.extend(upserts);
        self.replace(places);
    }

    /// Parse a places file and replace every place with its good rows.
    pub fn load_text(&self, text: &str) -> LoadReport {
        let PlacesFile { places, rejected } = parse_places_file(text);
        let loaded = places.len();
        self.replace(places);
        LoadReport { loaded, rejected }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::geo::haversine_m;
    use rand::{Rng, SeedableRng, rngs::StdRng};

    fn place(id: usize, lat: f64, lon: f64) -> Place {
        Place {
            id: format!("p{id}"),
            name: format!("Place {id}"),
            lat,
            lon,
            tags: Default::default(),
            fence: None,
            dwell_s: None,
        }
    }

    fn brute_force(
        places: &[Place],
        lat: f64,
        lon: f64,
        radius_m: f64,
        limit: usize,
    ) -> Vec<(String, f64)> {
        let mut hits: Vec<_> = places
            .iter()
            .map(|p| (p.id.clone(), haversine_m(lat, lon, p.lat, p.lon)))
            .filter(|(_, d)| *d <= radius_m)
            .collect();
        hits.sort_by(|a, b| a.1.total_cmp(&b.1));
        hits.truncate(limit);
        hits
    }

    fn check_against_brute_force(
        places: Vec<Place>,
        queries: &[(f64, f64)],
        radius_m: f64,
        limit: usize,
    ) {
        let replica = PlacesReplica::new();
        replica.replace(places.clone());
        let snapshot = replica.snapshot();
        let mut hits = Vec::new();
        for &(lat, lon) in queries {
            snapshot.nearby(&unit_vector(lat, lon), radius_m, limit, &mut hits);
            let want = brute_force(&places, lat, lon, radius_m, limit);
            assert_eq!(hits.len(), want.len(), "count at ({lat}, {lon})");
            for (hit, (id, distance)) in hits.iter().zip(&want) {
                // Equal distances may swap order; distances must agree to a millimetre.
                assert!(
                    (hit.distance_m - distance).abs() < 1e-3,
                    "{} vs {id} {distance}",
                    hit.distance_m
                );
            }
        }
    }

    #[test]
    fn nearby_equals_brute_force_on_random_data_across_the_antimeridian_and_poles() {
        let mut rng = StdRng::seed_from_u64(5);
        let spots = [
            (0.0, 179.9),
            (0.0, -179.9),
            (89.9, 0.0),
            (-89.9, 120.0),
            (48.85, 2.35),
        ];
        let mut places = Vec::new();
        for i in 0..20_000 {
            let (lat0, lon0) = spots[i % spots.len()];
            let lat = (lat0 + rng.gen_range(-0.02..0.02f64)).clamp(-90.0, 90.0);
            let mut lon = lon0 + rng.gen_range(-0.05..0.05f64);
            if lon > 180.0 {
                lon -= 360.0;
            } else if lon < -180.0 {
                lon += 360.0;
            }
            places.push(place(i, lat, lon));
        }
        let queries = [
            (0.0, 180.0),
            (0.0, 179.9),
            (0.0, -179.9),
            (0.0, -179.95),
            (89.9, 0.0),
            (90.0, 0.0),
            (-89.9, 120.0),
            (48.85, 2.35),
        ];
        check_against_brute_force(places.clone(), &queries, 500.0, 20);
        check_against_brute_force(places, &queries, 3_000.0, 1_000);
    }

    #[test]
    fn nearby_equals_brute_force_on_real_cities() {
        // The full GeoNames file beside the workspace, else the subset shipped in the repo.
        let full = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../shared/data/cities1000.csv"
        );
        let subset = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/testdata/cities1000-subset.csv"
        );
        let csv = std::fs::read_to_string(full)
            .or_else(|_| std::fs::read_to_string(subset))
            .expect("gateway/testdata/cities1000-subset.csv is in the repository");
        let places: Vec<Place> = csv
            .lines()
            .skip(1)
            .enumerate()
            .filter_map(|(i, line)| {
                let mut cols = line.split(',');
                let (_, _, lat, lon) = (cols.next()?, cols.next()?, cols.next()?, cols.next()?);
                Some(place(i, lat.parse().ok()?, lon.parse().ok()?))
            })
            .collect();
        assert!(places.len() > 5_000);
        // Fiji and Chukotka on the antimeridian, Svalbard and Greenland up north, Berlin.
        let queries = [
            (-17.8, 178.0),
            (-16.8, -179.9),
            (64.7, 177.5),
            (78.22, 15.65),
            (70.5, -21.9),
            (52.52, 13.405),
        ];
        check_against_brute_force(places.clone(), &queries, 50_000.0, 20);
        check_against_brute_force(places, &queries, 200_000.0, 500);
    }

    #[test]
    fn fence_sides_and_boxes() {
        let mut cafe = place(1, 52.52, 13.405);
        cafe.fence = Some(PlaceFence::Circle { radius_m: 150.0 });
        let mut square = place(2, 0.5, 0.5);
        square.fence = Some(PlaceFence::Polygon(Polygon {
            rings: vec![
                vec![[0.0, 0.0], [1.0, 0.0], [1.0, 1.0], [0.0, 1.0], [0.0, 0.0]],
                vec![[0.4, 0.4], [0.6, 0.4], [0.6, 0.6], [0.4, 0.6], [0.4, 0.4]],
            ],
        }));
        let replica = PlacesReplica::new();
        replica.replace(vec![cafe, square]);
        let snapshot = replica.snapshot();
        let (i, entry) = snapshot.get("p1").expect("cafe");
        let fence = entry.fence.as_ref().expect("fence");
        assert_eq!(fence.side(52.52, 13.405), FenceSide::Inside);
        match fence.side(52.52 + 200.0 / METRES_PER_LAT_DEGREE, 13.405) {
            FenceSide::Outside(d) => assert!((d - 50.0).abs() < 0.5, "{d}"),
            other => panic!("{other:?}"),
        }
        assert_eq!(
            snapshot
                .fences_near(&unit_vector(52.5205, 13.405))
                .collect::<Vec<_>>(),
            vec![i]
        );
        assert!(
            snapshot
                .fences_near(&unit_vector(52.6, 13.405))
                .next()
                .is_none()
        );

        let (_, entry) = snapshot.get("p2").expect("square");
        let fence = entry.fence.as_ref().expect("fence");
        assert_eq!(fence.side(0.2, 0.2), FenceSide::Inside);
        assert!(
            matches!(fence.side(0.5, 0.5), FenceSide::Outside(_)),
            "the hole is outside"
        );
        assert!(matches!(fence.side(1.5, 0.5), FenceSide::Outside(_)));
    }

    #[test]
    fn cap_bounds_hold_the_cap() {
        let mut rng = StdRng::seed_from_u64(9);
        for _ in 0..500 {
            let (lat, lon) = (rng.gen_range(-90.0..=90.0), rng.gen_range(-180.0..=180.0));
            let radius_m = rng.gen_range(1.0..100_000.0);
            let center = unit_vector(lat, lon);
            let (lower, upper) = cap_bounds(&center, radius_m / EARTH_RADIUS_M);
            for _ in 0..50 {
                let (la, lo) = (
                    rng.gen_range(-90.0..=90.0f64),
                    rng.gen_range(-180.0..=180.0f64),
                );
                // Points near the center, inside the cap.
                let (la, lo) = (
                    (lat + (la / 90.0) * radius_m / 111_000.0).clamp(-90.0, 90.0),
                    lon + (lo / 180.0) * 0.001,
                );
                if haversine_m(lat, lon, la, lo) <= radius_m {
                    let v = unit_vector(la, lo);
                    for k in 0..3 {
                        assert!(lower[k] <= v[k] && v[k] <= upper[k]);
                    }
                }
            }
        }
    }
}
