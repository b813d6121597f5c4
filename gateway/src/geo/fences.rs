//! `FenceTracker`: one session's geofence memberships, and the events they produce.
//!
//! GPS jitter must not make events flap, so:
//! - a fix whose accuracy is worse than a bound changes nothing;
//! - a fix older than the last one used (by its `ts`) changes nothing;
//! - entering needs the fix inside the fence; leaving needs it outside by a margin of at
//!   least its reported accuracy (and never less than a floor) — a hysteresis band;
//! - `dwell` fires once, `dwell_s` after the enter, on the server clock.
//!
//! Only fences whose bounding box holds the fix are tested for an enter; fences the
//! session is inside are re-tested on every fix.

use super::places::{FenceSide, PlaceIndex, PlacesSnapshot};
use super::unit_vector;
use geopush_proto::Fix;
use geopush_proto::frames::GeofenceEvent;
use std::collections::VecDeque;
use std::sync::Mutex;
use tokio::time::{Duration, Instant};

/// The anti-flap rules' parameters.
#[derive(Clone, Copy, Debug)]
pub struct FenceRules {
    /// Fixes less accurate than this (metres) do not change fence state.
    pub max_accuracy_m: f64,
    /// The smallest exit margin (metres), whatever accuracy the fix claims.
    pub exit_margin_floor_m: f64,
}

/// A transition of one session at one place.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct FenceEvent {
    pub kind: GeofenceEvent,
    pub place: PlaceIndex,
    /// Unix ms: the fix's `ts` for enter and exit, the server clock for dwell.
    pub ts_ms: i64,
}

struct Membership {
    place_id: Box<str>,
    /// Index in the snapshot of `version`; re-resolved by id after a swap.
    index: PlaceIndex,
    version: u64,
    /// When `dwell` is due; `None` when it fired or the place has no dwell.
    dwell_due: Option<Instant>,
}

/// The fences one session is inside.
#[derive(Default)]
pub struct FenceTracker {
    inside: Vec<Membership>,
    last_ts: Option<i64>,
}

impl FenceTracker {
    /// Ids of the places the session is inside.
    pub fn inside(&self) -> impl Iterator<Item = &str> {
        self.inside.iter().map(|m| &*m.place_id)
    }

    /// When the next `dwell` is due, if any.
    pub fn next_dwell_at(&self) -> Option<Instant> {
        self.inside.iter().filter_map(|m| m.dwell_due).min()
    }

    /// Bring memberships to the snapshot's version; forget places that are gone.
    fn resolve(&mut self, places: &PlacesSnapshot) {
        self.inside.retain_mut(|m| {
            if m.version == places.version {
                return true;
            }
            match places.get(&m.place_id) {
                Some((index, entry)) if entry.fence.is_some() => {
                    m.index = index;
                    m.version = places.version;
                    true
                }
                _ => false,
            }
        });
    }

    /// Apply a validated fix; push the enter and exit events it causes.
    pub fn on_fix(
        &mut self,
        fix: &Fix,
        places: &PlacesSnapshot,
        rules: &FenceRules,
        now: Instant,
        events: &mut Vec<FenceEvent>,
    ) {
        if fix.accuracy_m > rules.max_accuracy_m
            || self.last_ts.is_some_and(|last| fix.ts_ms < last)
        {
            return;
        }
        self.last_ts = Some(fix.ts_ms);
        self.resolve(places);
        let margin = fix.accuracy_m.max(rules.exit_margin_floor_m);
        self.inside.retain(|m| {
            let Some(fence) = places.entry(m.index).fence.as_ref() else {
                return false;
            };
            match fence.side(fix.lat, fix.lon) {
                FenceSide::Outside(beyond) if beyond > margin => {
                    events.push(FenceEvent {
                        kind: GeofenceEvent::Exit,
                        place: m.index,
                        ts_ms: fix.ts_ms,
                    });
                    false
                }
                _ => true,
            }
        });
        for index in places.fences_near(&unit_vector(fix.lat, fix.lon)) {
            if self.inside.iter().any(|m| m.index == index) {
                continue;
            }
            let entry = places.entry(index);
            let Some(fence) = entry.fence.as_ref() else {
                continue;
            };
            if fence.side(fix.lat, fix.lon) == FenceSide::Inside {
                events.push(FenceEvent {
                    kind: GeofenceEvent::Enter,
                    place: index,
                    ts_ms: fix.ts_ms,
                });
                self.inside.push(Membership {
                    place_id: entry.place.id.as_str().into(),
                    index,
                    version: places.version,
                    dwell_due: entry
                        .place
                        .dwell_s
                        .map(|s| now + Duration::from_secs(u64::from(s))),
                });
            }
        }
    }

    /// Push a `dwell` event for every membership whose dwell time has passed.
    pub fn on_timer(
        &mut self,
        places: &PlacesSnapshot,
        now: Instant,
        now_ms: i64,
        events: &mut Vec<FenceEvent>,
    ) {
        if self.next_dwell_at().is_none_or(|due| due > now) {
            return;
        }
        self.resolve(places);
        for m in &mut self.inside {
            if m.dwell_due.is_some_and(|due| due <= now) {
                m.dwell_due = None;
                events.push(FenceEvent {
                    kind: GeofenceEvent::Dwell,
                    place: m.index,
                    ts_ms: now_ms,
                });
            }
        }
    }
}

/// A geofence event as backends see it.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct GeofenceRecord {
    pub user: String,
    pub device: String,
    pub place: String,
    pub event: GeofenceEvent,
    pub ts: i64,
    pub lat: f64,
    pub lon: f64,
}

/// Where geofence events go besides the client: memory in single-node mode, a Redis
/// stream with the bus.
pub trait GeofenceSink: Send + Sync {
    fn publish(&self, record: GeofenceRecord);
}

/// The in-memory sink: the most recent events, bounded.
pub struct MemorySink {
    capacity: usize,
    events: Mutex<VecDeque<GeofenceRecord>>,
}

impl MemorySink {
    pub fn new(capacity: usize) -> MemorySink {
        MemorySink {
            capacity,
            events: Mutex::new(VecDeque::new()),
        }
    }

    /// The events kept, oldest first.
    pub fn recent(&self) -> Vec<GeofenceRecord> {
        self.events
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .cloned()
            .collect()
    }
}

impl GeofenceSink for MemorySink {
    fn publish(&self, record: GeofenceRecord) {
        let mut events = self.events.lock().unwrap_or_else(|p| p.into_inner());
        if events.len() >= self.capacity {
            events.pop_front();
        }
        events.push_back(record);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::geo::places::PlacesReplica;
    use geopush_proto::place::{Place, PlaceFence};
    use geopush_proto::{EARTH_RADIUS_M, Polygon};
    use rand::{Rng, SeedableRng, rngs::StdRng};

    const RULES: FenceRules = FenceRules {
        max_accuracy_m: 100.0,
        exit_margin_floor_m: 10.0,
    };
    const CENTER: (f64, f64) = (52.52, 13.405);
    const RADIUS_M: f64 = 200.0;

    fn replica_with(fence: PlaceFence, dwell_s: Option<u32>) -> PlacesReplica {
        let replica = PlacesReplica::new();
        replica.replace(vec![Place {
            id: "fence".into(),
            name: "Fence".into(),
            lat: CENTER.0,
            lon: CENTER.1,
            tags: Default::default(),
            fence: Some(fence),
            dwell_s,
        }]);
        replica
    }

    fn fix(lat: f64, lon: f64, accuracy_m: f64, ts_ms: i64) -> Fix {
        Fix {
            lat,
            lon,
            accuracy_m,
            ts_ms,
            speed_mps: None,
            heading_deg: None,
            radius_m: None,
            limit: None,
        }
    }

    /// The point `distance_m` from CENTER at `bearing` radians (small distances).
    fn offset(distance_m: f64, bearing: f64) -> (f64, f64) {
        let dlat = distance_m * bearing.cos() / EARTH_RADIUS_M;
        let dlon = distance_m * bearing.sin() / (EARTH_RADIUS_M * CENTER.0.to_radians().cos());
        (CENTER.0 + dlat.to_degrees(), CENTER.1 + dlon.to_degrees())
    }

    #[tokio::test(start_paused = true)]
    async fn noisy_walk_along_the_boundary_enters_once_and_exits_once() {
        let replica = replica_with(PlaceFence::Circle { radius_m: RADIUS_M }, None);
        let places = replica.snapshot();
        let mut rng = StdRng::seed_from_u64(42);
        let mut tracker = FenceTracker::default();
        let mut events = Vec::new();
        let (mut naive_inside, mut naive_transitions) = (false, 0);
        let mut ts = 1_000;
        // Walk in from 400 m, then round the boundary (on it, true position) for two
        // laps, then walk out to 400 m. Each fix is displaced by noise within its accuracy.
        let mut path: Vec<(f64, f64)> = (0..20).map(|i| (400.0 - 10.0 * i as f64, 0.0)).collect();
        path.extend((0..400).map(|i| (RADIUS_M, i as f64 * std::f64::consts::TAU / 200.0)));
        path.extend((0..20).map(|i| (RADIUS_M + 10.0 * i as f64, 0.0)));
        for (distance, bearing) in path {
            let accuracy: f64 = rng.gen_range(5.0..50.0);
            let noise = rng.gen_range(0.0..accuracy);
            let (lat, lon) = offset(distance, bearing);
            let (nlat, nlon) = {
                let dir = rng.gen_range(0.0..std::f64::consts::TAU);
                let dlat = noise * dir.cos() / EARTH_RADIUS_M;
                let dlon = noise * dir.sin() / (EARTH_RADIUS_M * lat.to_radians().cos());
                (lat + dlat.to_degrees(), lon + dlon.to_degrees())
            };
            ts += 1_000;
            tracker.on_fix(
                &fix(nlat, nlon, accuracy, ts),
                &places,
                &RULES,
                Instant::now(),
                &mut events,
            );
            let inside_now = crate::geo::haversine_m(CENTER.0, CENTER.1, nlat, nlon) <= RADIUS_M;
            if inside_now != naive_inside {
                naive_transitions += 1;
                naive_inside = inside_now;
            }
        }
        let kinds: Vec<_> = events.iter().map(|e| e.kind).collect();
        assert_eq!(kinds, [GeofenceEvent::Enter, GeofenceEvent::Exit]);
        assert!(
            naive_transitions > 10,
            "the naive test flaps ({naive_transitions} transitions)"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn dwell_fires_once_after_dwell_s() {
        let replica = replica_with(PlaceFence::Circle { radius_m: RADIUS_M }, Some(300));
        let places = replica.snapshot();
        let mut tracker = FenceTracker::default();
        let mut events = Vec::new();
        tracker.on_fix(
            &fix(CENTER.0, CENTER.1, 5.0, 1),
            &places,
            &RULES,
            Instant::now(),
            &mut events,
        );
        assert_eq!(events.len(), 1);
        tokio::time::advance(Duration::from_secs(299)).await;
        tracker.on_timer(&places, Instant::now(), 2, &mut events);
        assert_eq!(events.len(), 1, "not yet");
        tokio::time::advance(Duration::from_secs(1)).await;
        assert!(
            tracker
                .next_dwell_at()
                .is_some_and(|due| due <= Instant::now())
        );
        tracker.on_timer(&places, Instant::now(), 3, &mut events);
        tokio::time::advance(Duration::from_secs(600)).await;
        tracker.on_timer(&places, Instant::now(), 4, &mut events);
        tracker.on_fix(
            &fix(CENTER.0, CENTER.1, 5.0, 5),
            &places,
            &RULES,
            Instant::now(),
            &mut events,
        );
        let kinds: Vec<_> = events.iter().map(|e| e.kind).collect();
        assert_eq!(kinds, [GeofenceEvent::Enter, GeofenceEvent::Dwell]);
        assert_eq!(tracker.next_dwell_at(), None);
    }

    #[tokio::test(start_paused = true)]
    async fn inaccurate_and_out_of_order_fixes_change_nothing() {
        let replica = replica_with(PlaceFence::Circle { radius_m: RADIUS_M }, None);
        let places = replica.snapshot();
        let mut tracker = FenceTracker::default();
        let mut events = Vec::new();
        let far = offset(5_000.0, 0.0);
        tracker.on_fix(
            &fix(CENTER.0, CENTER.1, 500.0, 10),
            &places,
            &RULES,
            Instant::now(),
            &mut events,
        );
        assert!(events.is_empty(), "accuracy 500 m is worse than the bound");
        tracker.on_fix(
            &fix(CENTER.0, CENTER.1, 5.0, 10),
            &places,
            &RULES,
            Instant::now(),
            &mut events,
        );
        tracker.on_fix(
            &fix(far.0, far.1, 5.0, 9),
            &places,
            &RULES,
            Instant::now(),
            &mut events,
        );
        assert_eq!(events.len(), 1, "the older fix outside is ignored");
        tracker.on_fix(
            &fix(far.0, far.1, 5.0, 11),
            &places,
            &RULES,
            Instant::now(),
            &mut events,
        );
        assert_eq!(
            events.iter().map(|e| e.kind).collect::<Vec<_>>(),
            [GeofenceEvent::Enter, GeofenceEvent::Exit]
        );
    }

    #[tokio::test(start_paused = true)]
    async fn polygon_hole_is_outside() {
        let (lat, lon) = CENTER;
        let d = 0.01;
        let ring = |s: f64| {
            vec![
                [lon - s, lat - s],
                [lon + s, lat - s],
                [lon + s, lat + s],
                [lon - s, lat + s],
                [lon - s, lat - s],
            ]
        };
        let replica = replica_with(
            PlaceFence::Polygon(Polygon {
                rings: vec![ring(d), ring(d / 4.0)],
            }),
            None,
        );
        let places = replica.snapshot();
        let mut tracker = FenceTracker::default();
        let mut events = Vec::new();
        tracker.on_fix(
            &fix(lat, lon, 5.0, 1),
            &places,
            &RULES,
            Instant::now(),
            &mut events,
        );
        assert!(events.is_empty(), "the center is in the hole");
        tracker.on_fix(
            &fix(lat + d / 2.0, lon, 5.0, 2),
            &places,
            &RULES,
            Instant::now(),
            &mut events,
        );
        assert_eq!(events.len(), 1, "between the rings is inside");
        tracker.on_fix(
            &fix(lat, lon, 5.0, 3),
            &places,
            &RULES,
            Instant::now(),
            &mut events,
        );
        assert_eq!(
            events.iter().map(|e| e.kind).collect::<Vec<_>>(),
            [GeofenceEvent::Enter, GeofenceEvent::Exit]
        );
    }
}
