//! `NearbyTracker`: one session's `nearby` state and the decision to send a new frame.
//!
//! After a fix, `nearby` is recomputed only when the client moved at least the minimum
//! distance, asked for another radius or limit, or the places changed; the frame is sent
//! only when the result (the places, in order) differs from the last one sent. A session
//! starts as if it had been sent the empty result.

use super::places::{NearbyHit, PlacesSnapshot};
use super::{UnitVector, metres_between, unit_vector};
use bytes::Bytes;
use geopush_proto::Fix;
use std::cell::RefCell;
use std::fmt::Write as _;
use std::hash::{DefaultHasher, Hash, Hasher};

/// The node's `nearby` parameters.
#[derive(Clone, Copy, Debug)]
pub struct NearbyRules {
    pub default_radius_m: f64,
    pub max_radius_m: f64,
    pub default_limit: u32,
    pub max_limit: u32,
    /// Move (metres) before the query runs again.
    pub min_move_m: f64,
}

/// What the last computation was asked.
struct Query {
    center: UnitVector,
    radius_m: f64,
    limit: u32,
    places_version: u64,
}

/// A session's `nearby` preferences and the last result sent.
pub struct NearbyTracker {
    /// The radius and limit this client asked for (capped), or the node's defaults.
    radius_m: f64,
    limit: u32,
    last_query: Option<Query>,
    /// Fingerprint of the last result sent ([`EMPTY_RESULT`] for none).
    last_result: u64,
}

/// A fingerprint of a result: the snapshot version and the place indexes in order. An
/// index names the same place for as long as the snapshot lives, and hashing indexes does
/// not touch the places themselves (cache misses in a large replica). After the places
/// change, an unchanged list may be sent once more: its places may have changed too.
fn result_hash(version: u64, indexes: impl Iterator<Item = u32>) -> u64 {
    let mut hasher = DefaultHasher::new();
    version.hash(&mut hasher);
    for index in indexes {
        index.hash(&mut hasher);
    }
    hasher.finish()
}

/// The fingerprint of the empty result, whatever the snapshot.
const EMPTY_RESULT: u64 = 0;

thread_local! {
    /// Scratch space for hits, shared by every session on this worker thread.
    static HITS: RefCell<Vec<NearbyHit>> = const { RefCell::new(Vec::new()) };
}

/// The `nearby` frame for these hits, each place's summary spliced in as precomputed.
pub fn nearby_frame(places: &PlacesSnapshot, hits: &[NearbyHit]) -> Bytes {
    let mut json = String::with_capacity(32 + hits.len() * 160);
    json.push_str(r#"{"type":"nearby","places":["#);
    for (i, hit) in hits.iter().enumerate() {
        if i > 0 {
            json.push(',');
        }
        let summary = &places.entry(hit.index).summary_json;
        json.push_str(&summary[..summary.len() - 1]);
        let _ = write!(json, r#","distance_m":{:.1}}}"#, hit.distance_m);
    }
    json.push_str("]}");
    Bytes::from(json)
}

impl NearbyTracker {
    pub fn new(rules: &NearbyRules) -> NearbyTracker {
        NearbyTracker {
            radius_m: rules.default_radius_m,
            limit: rules.default_limit,
            last_query: None,
            last_result: EMPTY_RESULT,
        }
    }

    /// Apply a validated fix; the `nearby` frame to send, if the result changed.
    pub fn on_fix(
        &mut self,
        fix: &Fix,
        places: &PlacesSnapshot,
        rules: &NearbyRules,
    ) -> Option<Bytes> {
        if let Some(radius_m) = fix.radius_m {
            self.radius_m = radius_m.min(rules.max_radius_m);
        }
        if let Some(limit) = fix.limit {
            self.limit = limit.min(rules.max_limit);
        }
        let center = unit_vector(fix.lat, fix.lon);
        let unchanged = self.last_query.as_ref().is_some_and(|q| {
            q.places_version == places.version
                && q.radius_m == self.radius_m
                && q.limit == self.limit
                && metres_between(&q.center, &center) < rules.min_move_m
        });
        if unchanged {
            return None;
        }
        self.last_query = Some(Query {
            center,
            radius_m: self.radius_m,
            limit: self.limit,
            places_version: places.version,
        });
        HITS.with_borrow_mut(|hits| {
            places.nearby(&center, self.radius_m, self.limit as usize, hits);
            let hash = if hits.is_empty() {
                EMPTY_RESULT
            } else {
                result_hash(places.version, hits.iter().map(|h| h.index))
            };
            if hash == self.last_result {
                return None;
            }
            self.last_result = hash;
            Some(nearby_frame(places, hits))
        })
    }
}
