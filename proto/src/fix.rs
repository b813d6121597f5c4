//! A validated GPS fix.
//!
//! A [`Fix`] can only be built through [`Fix::validate`], so code that holds one knows the
//! coordinates are finite and in range, the accuracy is non-negative and the timestamp is sane.

use crate::frames::LocationFrame;
use thiserror::Error;

/// Why a `location` frame was refused. The message is sent to the client verbatim.
#[derive(Clone, Debug, PartialEq, Error)]
pub enum FixError {
    #[error("lat must be a finite number in [-90, 90], got {0}")]
    Latitude(f64),
    #[error("lon must be a finite number in [-180, 180], got {0}")]
    Longitude(f64),
    #[error("accuracy_m must be a finite number >= 0, got {0}")]
    Accuracy(f64),
    #[error("speed_mps must be a finite number >= 0, got {0}")]
    Speed(f64),
    #[error("heading_deg must be a finite number in [0, 360), got {0}")]
    Heading(f64),
    #[error(
        "ts {ts} is {ahead_ms} ms ahead of the server clock (at most {max_ahead_ms} ms allowed)"
    )]
    TimestampInFuture {
        ts: i64,
        ahead_ms: i64,
        max_ahead_ms: i64,
    },
    #[error("ts {ts} is older than {max_age_ms} ms")]
    TimestampTooOld { ts: i64, max_age_ms: i64 },
    #[error("radius_m must be a finite number > 0, got {0}")]
    Radius(f64),
    #[error("limit must be at least 1")]
    Limit,
}

/// The timestamp window a fix must fall into, relative to the server clock.
#[derive(Clone, Copy, Debug)]
pub struct FixPolicy {
    /// How far ahead of the server clock a client's `ts` may be (clock skew).
    pub max_future_ms: i64,
    /// How old a fix may be when it arrives (buffered fixes after a tunnel are fine; a fix
    /// from last week is not a position).
    pub max_age_ms: i64,
}

impl Default for FixPolicy {
    fn default() -> Self {
        FixPolicy {
            max_future_ms: 60_000,
            max_age_ms: 24 * 3_600_000,
        }
    }
}

/// A GPS fix whose every field has been checked.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Fix {
    /// Degrees north, in [-90, 90].
    pub lat: f64,
    /// Degrees east, in [-180, 180].
    pub lon: f64,
    /// Horizontal accuracy radius in metres (0 when the client did not say).
    pub accuracy_m: f64,
    /// Client timestamp in Unix milliseconds (the server's receive time when absent).
    pub ts_ms: i64,
    pub speed_mps: Option<f64>,
    pub heading_deg: Option<f64>,
    /// The nearby radius the client asked for, if any (the gateway caps it).
    pub radius_m: Option<f64>,
    /// The nearby result count the client asked for, if any (the gateway caps it).
    pub limit: Option<u32>,
}

impl Fix {
    /// Validate a decoded `location` frame against the server clock `now_ms`.
    pub fn validate(
        frame: &LocationFrame,
        now_ms: i64,
        policy: FixPolicy,
    ) -> Result<Fix, FixError> {
        let LocationFrame {
            lat,
            lon,
            accuracy_m,
            ts,
            speed_mps,
            heading_deg,
            radius_m,
            limit,
        } = *frame;
        if !(lat.is_finite() && (-90.0..=90.0).contains(&lat)) {
            return Err(FixError::Latitude(lat));
        }
        if !(lon.is_finite() && (-180.0..=180.0).contains(&lon)) {
            return Err(FixError::Longitude(lon));
        }
        let accuracy_m = accuracy_m.unwrap_or(0.0);
        if !(accuracy_m.is_finite() && accuracy_m >= 0.0) {
            return Err(FixError::Accuracy(accuracy_m));
        }
        if let Some(speed) = speed_mps.filter(|s| !(s.is_finite() && *s >= 0.0)) {
            return Err(FixError::Speed(speed));
        }
        if let Some(heading) = heading_deg.filter(|h| !(h.is_finite() && (0.0..360.0).contains(h)))
        {
            return Err(FixError::Heading(heading));
        }
        if let Some(radius) = radius_m.filter(|r| !(r.is_finite() && *r > 0.0)) {
            return Err(FixError::Radius(radius));
        }
        if limit == Some(0) {
            return Err(FixError::Limit);
        }
        let ts_ms = ts.unwrap_or(now_ms);
        let ahead_ms = ts_ms.saturating_sub(now_ms);
        if ahead_ms > policy.max_future_ms {
            return Err(FixError::TimestampInFuture {
                ts: ts_ms,
                ahead_ms,
                max_ahead_ms: policy.max_future_ms,
            });
        }
        if now_ms.saturating_sub(ts_ms) > policy.max_age_ms {
            return Err(FixError::TimestampTooOld {
                ts: ts_ms,
                max_age_ms: policy.max_age_ms,
            });
        }
        Ok(Fix {
            lat,
            lon,
            accuracy_m,
            ts_ms,
            speed_mps,
            heading_deg,
            radius_m,
            limit,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: i64 = 1_763_700_000_000;

    fn frame(lat: f64, lon: f64) -> LocationFrame {
        LocationFrame {
            lat,
            lon,
            accuracy_m: Some(8.0),
            ts: Some(NOW),
            speed_mps: None,
            heading_deg: None,
            radius_m: None,
            limit: None,
        }
    }

    fn check(f: LocationFrame) -> Result<Fix, FixError> {
        Fix::validate(&f, NOW, FixPolicy::default())
    }

    #[test]
    fn accepts_the_edges_of_the_globe() {
        for (lat, lon) in [(90.0, 180.0), (-90.0, -180.0), (0.0, 0.0), (52.52, 13.405)] {
            let fix = check(frame(lat, lon)).expect("valid");
            assert_eq!((fix.lat, fix.lon), (lat, lon));
        }
    }

    #[test]
    fn refuses_out_of_range_and_non_finite_coordinates() {
        assert_eq!(check(frame(90.0001, 0.0)), Err(FixError::Latitude(90.0001)));
        assert_eq!(check(frame(0.0, -180.5)), Err(FixError::Longitude(-180.5)));
        assert!(matches!(
            check(frame(f64::NAN, 0.0)),
            Err(FixError::Latitude(_))
        ));
        assert!(matches!(
            check(frame(0.0, f64::INFINITY)),
            Err(FixError::Longitude(_))
        ));
    }

    #[test]
    fn refuses_negative_accuracy_and_bad_motion() {
        let mut f = frame(1.0, 1.0);
        f.accuracy_m = Some(-1.0);
        assert_eq!(check(f), Err(FixError::Accuracy(-1.0)));
        let mut f = frame(1.0, 1.0);
        f.heading_deg = Some(360.0);
        assert_eq!(check(f), Err(FixError::Heading(360.0)));
        let mut f = frame(1.0, 1.0);
        f.speed_mps = Some(f64::NEG_INFINITY);
        assert!(matches!(check(f), Err(FixError::Speed(_))));
        let mut f = frame(1.0, 1.0);
        f.limit = Some(0);
        assert_eq!(check(f), Err(FixError::Limit));
        let mut f = frame(1.0, 1.0);
        f.radius_m = Some(0.0);
        assert_eq!(check(f), Err(FixError::Radius(0.0)));
    }

    #[test]
    fn timestamp_window() {
        let mut f = frame(1.0, 1.0);
        f.ts = Some(NOW + 60_000);
        assert!(check(f).is_ok(), "one minute of skew is allowed");
        f.ts = Some(NOW + 3_600_000);
        assert!(matches!(check(f), Err(FixError::TimestampInFuture { .. })));
        f.ts = Some(i64::MAX);
        assert!(matches!(check(f), Err(FixError::TimestampInFuture { .. })));
        f.ts = Some(i64::MIN);
        assert!(matches!(check(f), Err(FixError::TimestampTooOld { .. })));
        f.ts = None;
        assert_eq!(
            check(f).expect("valid").ts_ms,
            NOW,
            "absent ts means received now"
        );
    }

    #[test]
    fn missing_accuracy_means_zero() {
        let mut f = frame(1.0, 1.0);
        f.accuracy_m = None;
        assert_eq!(check(f).expect("valid").accuracy_m, 0.0);
    }
}
