//! What crosses Redis: key and channel names (DESIGN §6), geohash cells, and the envelope
//! format of bus messages.
//!
//! Every name puts the user, topic or cell in `{…}`: a Redis Cluster hash tag, so a user's
//! channel, inbox and ack cursors live in one slot, and sharded pub/sub spreads cells and
//! users over the shards.

use serde::{Deserialize, Serialize};

/// Names under one prefix (default `gp:`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Keys {
    prefix: String,
}

impl Default for Keys {
    fn default() -> Self {
        Keys::new("gp:")
    }
}

impl Keys {
    pub fn new(prefix: impl Into<String>) -> Keys {
        Keys {
            prefix: prefix.into(),
        }
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// Channel of user-targeted envelopes.
    pub fn user_channel(&self, user: &str) -> String {
        format!("{}u:{{{user}}}", self.prefix)
    }
    /// Channel of a topic.
    pub fn topic_channel(&self, topic: &str) -> String {
        format!("{}t:{{{topic}}}", self.prefix)
    }
    /// Channel of broadcasts.
    pub fn all_channel(&self) -> String {
        format!("{}all", self.prefix)
    }
    /// Channel of a geohash cell at a level (its length).
    pub fn cell_channel(&self, cell: &str) -> String {
        format!("{}g:{}:{{{cell}}}", self.prefix, cell.len())
    }
    /// Channel the nodes' end-to-end probes travel on.
    pub fn probe_channel(&self, node: &str) -> String {
        format!("{}probe:{{{node}}}", self.prefix)
    }
    /// A user's durable inbox stream.
    pub fn inbox(&self, user: &str) -> String {
        format!("{}inbox:{{{user}}}", self.prefix)
    }
    /// The last acked inbox cursor of a user's device.
    pub fn ack(&self, user: &str, device: &str) -> String {
        format!("{}ack:{{{user}}}:{device}", self.prefix)
    }
    /// Status counters of a notification.
    pub fn status(&self, id: &str) -> String {
        format!("{}n:{{{id}}}", self.prefix)
    }
    /// The places hash. It shares a hash tag with its change log, so one pipeline writes
    /// both on a cluster too.
    pub fn places(&self) -> String {
        format!("{}{{places}}", self.prefix)
    }
    /// The places change log stream.
    pub fn places_log(&self) -> String {
        format!("{}{{places}}:log", self.prefix)
    }
    /// The geofence event stream.
    pub fn events(&self) -> String {
        format!("{}events", self.prefix)
    }
    /// An idempotency key.
    pub fn idempotency(&self, key: &str) -> String {
        format!("{}idem:{{{key}}}", self.prefix)
    }
    /// Where geofence events go after the webhook dispatcher gave up on them.
    pub fn events_dead_letter(&self) -> String {
        format!("{}events:dead", self.prefix)
    }
    /// Scheduled notifications: a sorted set of ids by due time (Unix ms). It shares a hash
    /// tag with [`Keys::schedule_requests`], so one script claims from both on a cluster.
    pub fn schedule(&self) -> String {
        format!("{}{{sched}}", self.prefix)
    }
    /// The requests of scheduled notifications: a hash of id → request JSON.
    pub fn schedule_requests(&self) -> String {
        format!("{}{{sched}}:req", self.prefix)
    }
}

/// The geohash levels (cell lengths) nodes subscribe and publishers choose from: about
/// 39 km, 4.9 km and 1.2 km wide.
pub const CELL_LEVELS: [usize; 3] = [4, 5, 6];
/// A publisher uses the finest level whose covering of an area has at most this many cells
/// (else it broadcasts the area and every node filters).
pub const MAX_CELLS_PER_PUBLISH: usize = 16;

/// Geohash cells (base32, as everyone spells them).
pub mod geohash {
    const BASE32: &[u8; 32] = b"0123456789bcdefghjkmnpqrstuvwxyz";

    /// The 60 interleaved bits of a point's 12-character cell; a cell of `precision`
    /// characters is the top `5 × precision` of them. Quantizes each coordinate to 30 bits
    /// and interleaves them (longitude first), which is what geohash's bisection computes,
    /// without its 60 data-dependent branches.
    pub fn bits(lat: f64, lon: f64) -> u64 {
        const STEPS: f64 = (1u64 << 30) as f64;
        let quantize = |value: f64, min: f64, span: f64| {
            (((value - min) / span * STEPS) as u64).min((1 << 30) - 1)
        };
        (spread(quantize(lon, -180.0, 360.0)) << 1) | spread(quantize(lat, -90.0, 180.0))
    }

    /// The low 30 bits of `x` moved to the even bit positions.
    fn spread(x: u64) -> u64 {
        let mut x = x & 0x3FFF_FFFF;
        x = (x | (x << 16)) & 0x0000_FFFF_0000_FFFF;
        x = (x | (x << 8)) & 0x00FF_00FF_00FF_00FF;
        x = (x | (x << 4)) & 0x0F0F_0F0F_0F0F_0F0F;
        x = (x | (x << 2)) & 0x3333_3333_3333_3333;
        (x | (x << 1)) & 0x5555_5555_5555_5555
    }

    /// The cell at `precision` (1..=12) characters of 60-bit cell bits.
    pub fn from_bits(bits: u64, precision: usize) -> String {
        let precision = precision.clamp(1, 12);
        (0..precision)
            .map(|i| BASE32[((bits >> (55 - 5 * i)) & 31) as usize] as char)
            .collect()
    }

    /// The same cell at `precision`? (Compares bit prefixes; no strings.)
    pub fn same_cell(a: u64, b: u64, precision: usize) -> bool {
        let shift = 60 - 5 * precision.clamp(1, 12);
        a >> shift == b >> shift
    }

    /// The cell of a point at `precision` characters (1..=12).
    pub fn encode(lat: f64, lon: f64, precision: usize) -> String {
        from_bits(bits(lat, lon), precision)
    }

    /// Size of a cell at `precision` in degrees: (lat, lon).
    pub fn cell_size(precision: usize) -> (f64, f64) {
        let bits = 5 * precision;
        let lon_bits = bits.div_ceil(2);
        let lat_bits = bits / 2;
        (
            180.0 / f64::powi(2.0, lat_bits as i32),
            360.0 / f64::powi(2.0, lon_bits as i32),
        )
    }

    /// The cells at `precision` that cover a lat/lon box, or `None` when there are more
    /// than `max_cells`. Boxes crossing the antimeridian are given as `lon_min > lon_max`.
    pub fn cover(
        lat_min: f64,
        lat_max: f64,
        lon_min: f64,
        lon_max: f64,
        precision: usize,
        max_cells: usize,
    ) -> Option<Vec<String>> {
        let (dlat, dlon) = cell_size(precision);
        let spans: Vec<(f64, f64)> = if lon_min <= lon_max {
            vec![(lon_min, lon_max)]
        } else {
            vec![(lon_min, 180.0), (-180.0, lon_max)]
        };
        let rows = ((lat_max.min(90.0) - lat_min.max(-90.0)) / dlat).floor() as usize + 2;
        let mut cells = Vec::new();
        for (lo, hi) in spans {
            let columns = ((hi - lo) / dlon).floor() as usize + 2;
            if rows.saturating_mul(columns).saturating_add(cells.len())
                > max_cells.saturating_mul(4) + 8
            {
                return None;
            }
            // Step by cell size from the cell holding the corner; clamp to the box.
            let lat_start = ((lat_min.max(-90.0) + 90.0) / dlat).floor() * dlat - 90.0;
            let lon_start = ((lo + 180.0) / dlon).floor() * dlon - 180.0;
            let mut lat = lat_start;
            while lat <= lat_max.min(90.0) {
                let mut lon = lon_start;
                while lon <= hi {
                    let cell = encode(
                        (lat + dlat / 2.0).min(90.0),
                        (lon + dlon / 2.0).min(180.0),
                        precision,
                    );
                    if !cells.contains(&cell) {
                        cells.push(cell);
                    }
                    lon += dlon;
                }
                lat += dlat;
            }
        }
        (cells.len() <= max_cells).then_some(cells)
    }
}

/// A position in a user's inbox: a Redis stream entry id `ms-seq`, ordered numerically.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Cursor {
    pub ms: u64,
    pub seq: u64,
}

impl Cursor {
    /// Parse `ms-seq` (or a bare `ms`, meaning `ms-0`).
    pub fn parse(text: &str) -> Option<Cursor> {
        let (ms, seq) = text.split_once('-').unwrap_or((text, "0"));
        Some(Cursor {
            ms: ms.parse().ok()?,
            seq: seq.parse().ok()?,
        })
    }
}

impl std::fmt::Display for Cursor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}-{}", self.ms, self.seq)
    }
}

/// A new notification id: 26 characters of Crockford base32, time-ordered (a ULID: 48 bits
/// of Unix ms, then 80 random bits supplied by the caller, since this crate does no I/O).
pub fn notification_id(unix_ms: u64, random: u128) -> String {
    const CROCKFORD: &[u8; 32] = b"0123456789ABCDEFGHJKMNPQRSTVWXYZ";
    let value: u128 =
        (u128::from(unix_ms & 0xFFFF_FFFF_FFFF) << 80) | (random & ((1u128 << 80) - 1));
    (0..26)
        .rev()
        .map(|i| CROCKFORD[((value >> (i * 5)) & 31) as usize] as char)
        .collect()
}

/// The header of a bus message; the client frame follows it after a newline, verbatim.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EnvelopeHeader {
    /// Notification id (for status counting and dedupe).
    pub id: String,
    /// For user notifications: the inbox cursor of this notification.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cursor: Option<String>,
    /// Unix ms when the publisher published, for the publish→socket latency.
    pub published_ms: i64,
    /// For geo envelopes: the exact area the node filters its clients with.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub area: Option<crate::Area>,
}

/// Join a header and a frame into one bus message.
pub fn encode_envelope(header: &EnvelopeHeader, frame: &[u8]) -> Vec<u8> {
    let mut out = serde_json::to_vec(header).unwrap_or_default();
    out.push(b'\n');
    out.extend_from_slice(frame);
    out
}

/// Split a bus message into its header and frame; `None` when it is not one.
pub fn decode_envelope(message: &[u8]) -> Option<(EnvelopeHeader, &[u8])> {
    let newline = message.iter().position(|b| *b == b'\n')?;
    let header = serde_json::from_slice(&message[..newline]).ok()?;
    Some((header, &message[newline + 1..]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_use_hash_tags() {
        let keys = Keys::default();
        assert_eq!(keys.user_channel("alice"), "gp:u:{alice}");
        assert_eq!(keys.inbox("alice"), "gp:inbox:{alice}");
        assert_eq!(keys.ack("alice", "phone"), "gp:ack:{alice}:phone");
        assert_eq!(keys.cell_channel("u33d"), "gp:g:4:{u33d}");
        assert_eq!(
            (keys.places(), keys.places_log()),
            ("gp:{places}".into(), "gp:{places}:log".into())
        );
        assert_eq!(Keys::new("x:").all_channel(), "x:all");
    }

    #[test]
    fn geohash_matches_known_cells() {
        // Reference values from the geohash definition (Niemeyer).
        assert_eq!(geohash::encode(57.64911, 10.40744, 11), "u4pruydqqvj");
        assert_eq!(geohash::encode(52.52, 13.405, 6), "u33dc0");
        assert_eq!(geohash::encode(-90.0, -180.0, 3), "000");
    }

    /// Geohash by its definition: bisect longitude and latitude in turn.
    fn bisected(lat: f64, lon: f64) -> u64 {
        let (mut lat_range, mut lon_range) = ((-90.0, 90.0), (-180.0, 180.0));
        let mut value = 0u64;
        for bit in 0..60 {
            let (range, coordinate) = if bit % 2 == 0 {
                (&mut lon_range, lon)
            } else {
                (&mut lat_range, lat)
            };
            let mid = (range.0 + range.1) / 2.0;
            value <<= 1;
            if coordinate >= mid {
                value |= 1;
                range.0 = mid;
            } else {
                range.1 = mid;
            }
        }
        value
    }

    #[test]
    fn interleaved_bits_equal_the_bisection() {
        use rand::{Rng, SeedableRng, rngs::StdRng};
        let mut rng = StdRng::seed_from_u64(12);
        for _ in 0..200_000 {
            let (lat, lon) = (rng.gen_range(-90.0..=90.0), rng.gen_range(-180.0..=180.0));
            assert_eq!(geohash::bits(lat, lon), bisected(lat, lon), "{lat},{lon}");
        }
        for (lat, lon) in [(90.0, 180.0), (-90.0, -180.0), (0.0, 0.0), (52.52, 13.405)] {
            assert_eq!(geohash::bits(lat, lon), bisected(lat, lon), "{lat},{lon}");
        }
    }

    #[test]
    fn cell_bits_compare_by_level() {
        let a = geohash::bits(52.52, 13.405);
        let b = geohash::bits(52.5201, 13.4051);
        assert!(geohash::same_cell(a, b, 6));
        assert!(!geohash::same_cell(a, b, 12));
        assert_eq!(geohash::from_bits(a, 6), "u33dc0");
    }

    #[test]
    fn cover_holds_every_point_of_the_box() {
        let cells = geohash::cover(52.50, 52.54, 13.38, 13.43, 5, 64).expect("few cells");
        for i in 0..=20 {
            for j in 0..=20 {
                let lat = 52.50 + 0.04 * f64::from(i) / 20.0;
                let lon = 13.38 + 0.05 * f64::from(j) / 20.0;
                assert!(cells.contains(&geohash::encode(lat, lon, 5)), "{lat},{lon}");
            }
        }
        assert!(
            geohash::cover(-10.0, 10.0, -10.0, 10.0, 6, 64).is_none(),
            "too many cells"
        );
        let across = geohash::cover(-17.9, -17.7, 179.9, -179.9, 5, 64).expect("antimeridian");
        assert!(across.contains(&geohash::encode(-17.8, 179.95, 5)));
        assert!(across.contains(&geohash::encode(-17.8, -179.95, 5)));
    }

    #[test]
    fn cursors_order_numerically() {
        let a = Cursor::parse("1763700000000-9").expect("cursor");
        let b = Cursor::parse("1763700000000-10").expect("cursor");
        assert!(a < b);
        assert_eq!(b.to_string(), "1763700000000-10");
        assert_eq!(Cursor::parse("5"), Some(Cursor { ms: 5, seq: 0 }));
        assert_eq!(Cursor::parse("x-1"), None);
    }

    #[test]
    fn notification_ids_are_ulids_in_time_order() {
        let a = notification_id(1_763_700_000_000, u128::MAX);
        let b = notification_id(1_763_700_000_001, 0);
        assert_eq!(a.len(), 26);
        assert!(a < b, "{a} < {b}");
        assert!(a.starts_with("01K"), "{a}");
    }

    #[test]
    fn envelopes_round_trip() {
        let header = EnvelopeHeader {
            id: "n1".into(),
            cursor: Some("1-0".into()),
            published_ms: 5,
            area: None,
        };
        let message = encode_envelope(&header, br#"{"type":"notification"}"#);
        let (back, frame) = decode_envelope(&message).expect("envelope");
        assert_eq!(back, header);
        assert_eq!(frame, br#"{"type":"notification"}"#);
        assert!(decode_envelope(b"no newline").is_none());
    }
}
