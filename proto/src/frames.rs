//! Client protocol v1: JSON text frames in both directions (DESIGN §4).
//!
//! Decoding is two passes over the bytes: a tiny pass that reads only `type`, then the typed
//! pass for that frame. This avoids serde's buffering of internally tagged enums on the hot
//! `location` path and lets every failure name exactly what was wrong.

use crate::codes::ErrorCode;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use std::borrow::Cow;
use thiserror::Error;

/// Most ids one `ack` frame may carry.
pub const MAX_ACK_IDS: usize = 256;
/// Longest id, cursor or topic name accepted from a client, in bytes.
pub const MAX_NAME_LEN: usize = 128;

/// A `location` frame as sent; see [`crate::Fix`] for the validated form.
#[derive(Clone, Copy, Debug, PartialEq, Deserialize, Serialize)]
pub struct LocationFrame {
    pub lat: f64,
    pub lon: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub accuracy_m: Option<f64>,
    /// Unix milliseconds when the fix was taken.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ts: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub speed_mps: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub heading_deg: Option<f64>,
    /// The nearby radius this client wants.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub radius_m: Option<f64>,
    /// The most nearby places this client wants.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<u32>,
}

/// A frame from a client.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ClientFrame {
    Location(LocationFrame),
    Ack {
        ids: Vec<String>,
    },
    Resume {
        after: String,
    },
    Subscribe {
        topic: String,
    },
    Unsubscribe {
        topic: String,
    },
    Refresh {
        token: String,
    },
    /// App-level heartbeat for clients that cannot see WebSocket pings; `id` is echoed.
    Ping {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        id: Option<serde_json::Value>,
    },
}

/// Why bytes from a client are not a valid [`ClientFrame`].
#[derive(Clone, Debug, PartialEq, Eq, Error)]
pub enum DecodeError {
    #[error("frame is not valid JSON: {0}")]
    MalformedJson(String),
    #[error("frame has no string field \"type\"")]
    MissingType,
    #[error("unknown frame type {0:?}")]
    UnknownType(String),
    #[error("bad {kind} frame: {reason}")]
    BadFrame { kind: &'static str, reason: String },
}

impl DecodeError {
    /// The `error` frame code that answers this failure.
    pub fn code(&self) -> ErrorCode {
        match self {
            DecodeError::MalformedJson(_) => ErrorCode::MalformedJson,
            DecodeError::MissingType | DecodeError::UnknownType(_) => ErrorCode::UnknownType,
            DecodeError::BadFrame { .. } => ErrorCode::BadRequest,
        }
    }
}

#[derive(Deserialize)]
struct TypeTag<'a> {
    #[serde(rename = "type", borrow)]
    kind: Option<Cow<'a, str>>,
}

#[derive(Deserialize)]
struct AckBody {
    ids: Vec<String>,
}
#[derive(Deserialize)]
struct ResumeBody {
    after: String,
}
#[derive(Deserialize)]
struct TopicBody {
    topic: String,
}
#[derive(Deserialize)]
struct RefreshBody {
    token: String,
}
#[derive(Deserialize)]
struct PingBody {
    #[serde(default)]
    id: Option<serde_json::Value>,
}

fn typed<'a, T: Deserialize<'a>>(bytes: &'a [u8], kind: &'static str) -> Result<T, DecodeError> {
    serde_json::from_slice(bytes).map_err(|e| DecodeError::BadFrame {
        kind,
        reason: e.to_string(),
    })
}

fn check_name(kind: &'static str, field: &str, value: &str) -> Result<(), DecodeError> {
    if value.is_empty() || value.len() > MAX_NAME_LEN {
        return Err(DecodeError::BadFrame {
            kind,
            reason: format!("{field} must be 1..={MAX_NAME_LEN} bytes"),
        });
    }
    Ok(())
}

fn check_topic(kind: &'static str, topic: &str) -> Result<(), DecodeError> {
    check_name(kind, "topic", topic)?;
    let allowed = |c: char| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | ':');
    if !topic.chars().all(allowed) {
        return Err(DecodeError::BadFrame {
            kind,
            reason: "topic may hold only ASCII letters, digits and - _ . :".into(),
        });
    }
    Ok(())
}

/// Decode one text frame from a client. Never panics, whatever the bytes.
pub fn decode_client_frame(bytes: &[u8]) -> Result<ClientFrame, DecodeError> {
    let tag: TypeTag<'_> =
        serde_json::from_slice(bytes).map_err(|e| DecodeError::MalformedJson(e.to_string()))?;
    let kind = tag.kind.ok_or(DecodeError::MissingType)?;
    let frame = match kind.as_ref() {
        "location" => ClientFrame::Location(typed(bytes, "location")?),
        "ack" => {
            let AckBody { ids } = typed(bytes, "ack")?;
            if ids.is_empty() || ids.len() > MAX_ACK_IDS {
                return Err(DecodeError::BadFrame {
                    kind: "ack",
                    reason: format!("ids must hold 1..={MAX_ACK_IDS} ids"),
                });
            }
            for id in &ids {
                check_name("ack", "each id", id)?;
            }
            ClientFrame::Ack { ids }
        }
        "resume" => {
            let ResumeBody { after } = typed(bytes, "resume")?;
            check_name("resume", "after", &after)?;
            ClientFrame::Resume { after }
        }
        "subscribe" => {
            let TopicBody { topic } = typed(bytes, "subscribe")?;
            check_topic("subscribe", &topic)?;
            ClientFrame::Subscribe { topic }
        }
        "unsubscribe" => {
            let TopicBody { topic } = typed(bytes, "unsubscribe")?;
            check_topic("unsubscribe", &topic)?;
            ClientFrame::Unsubscribe { topic }
        }
        "refresh" => {
            let RefreshBody { token } = typed(bytes, "refresh")?;
            ClientFrame::Refresh { token }
        }
        "ping" => {
            let PingBody { id } = typed(bytes, "ping")?;
            ClientFrame::Ping { id }
        }
        other => {
            let shown: String = other.chars().take(MAX_NAME_LEN).collect();
            return Err(DecodeError::UnknownType(shown));
        }
    };
    Ok(frame)
}

/// Limits a client should respect, announced in `welcome`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SessionLimits {
    pub max_frame_bytes: usize,
    /// Fixes per second processed; faster fixes are coalesced (latest wins).
    pub max_fixes_per_s: u32,
    pub max_topics: usize,
}

/// A place in a `nearby` or `geofence` frame.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PlaceSummary {
    pub id: String,
    pub name: String,
    pub lat: f64,
    pub lon: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub distance_m: Option<f64>,
    #[serde(default)]
    pub tags: serde_json::Map<String, serde_json::Value>,
}

/// Geofence transition kinds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GeofenceEvent {
    Enter,
    Exit,
    Dwell,
}

/// A frame to a client.
#[derive(Clone, Debug, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ServerFrame<'a> {
    Welcome {
        session: &'a str,
        node: &'a str,
        heartbeat_s: f64,
        limits: &'a SessionLimits,
    },
    Nearby {
        places: &'a [PlaceSummary],
    },
    Geofence {
        event: GeofenceEvent,
        place: &'a PlaceSummary,
        ts: i64,
    },
    Notification {
        id: &'a str,
        #[serde(skip_serializing_if = "Option::is_none")]
        cursor: Option<&'a str>,
        title: &'a str,
        body: &'a str,
        /// The publisher's JSON object, echoed verbatim.
        #[serde(skip_serializing_if = "Option::is_none")]
        data: Option<&'a RawValue>,
        ts: i64,
    },
    Error {
        code: ErrorCode,
        message: &'a str,
    },
    Reconnect {
        after_ms: u64,
        reason: &'a str,
    },
    Pong {
        #[serde(skip_serializing_if = "Option::is_none")]
        id: Option<&'a serde_json::Value>,
    },
}

impl ServerFrame<'_> {
    /// The frame as JSON bytes. Serializing these types cannot fail (no maps with non-string
    /// keys, no failing `Serialize` impls); the fallback is an `internal` error frame.
    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_else(|_| {
            br#"{"type":"error","code":"internal","message":"serialization failed"}"#.to_vec()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_every_client_frame_of_the_design() {
        let cases: &[(&str, ClientFrame)] = &[
            (
                r#"{"type":"location","lat":52.52,"lon":13.405,"accuracy_m":8,"ts":1763700000000}"#,
                ClientFrame::Location(LocationFrame {
                    lat: 52.52,
                    lon: 13.405,
                    accuracy_m: Some(8.0),
                    ts: Some(1_763_700_000_000),
                    speed_mps: None,
                    heading_deg: None,
                    radius_m: None,
                    limit: None,
                }),
            ),
            (
                r#"{"type":"ack","ids":["01JD"]}"#,
                ClientFrame::Ack {
                    ids: vec!["01JD".into()],
                },
            ),
            (
                r#"{"type":"resume","after":"1763700000000-0"}"#,
                ClientFrame::Resume {
                    after: "1763700000000-0".into(),
                },
            ),
            (
                r#"{"type":"subscribe","topic":"traffic"}"#,
                ClientFrame::Subscribe {
                    topic: "traffic".into(),
                },
            ),
            (
                r#"{"type":"unsubscribe","topic":"traffic"}"#,
                ClientFrame::Unsubscribe {
                    topic: "traffic".into(),
                },
            ),
            (
                r#"{"type":"refresh","token":"a.b.c"}"#,
                ClientFrame::Refresh {
                    token: "a.b.c".into(),
                },
            ),
            (
                r#"{"type":"ping","id":7}"#,
                ClientFrame::Ping {
                    id: Some(serde_json::json!(7)),
                },
            ),
            (r#"{"type":"ping"}"#, ClientFrame::Ping { id: None }),
        ];
        for (text, expected) in cases {
            assert_eq!(&decode_client_frame(text.as_bytes()).expect(text), expected);
            // Encoding and decoding again gives the same frame.
            let again = serde_json::to_vec(expected).expect("serializes");
            assert_eq!(&decode_client_frame(&again).expect("round trip"), expected);
        }
    }

    #[test]
    fn bad_bytes_get_typed_errors() {
        let code = |text: &[u8]| decode_client_frame(text).map(|_| ()).map_err(|e| e.code());
        assert_eq!(code(b"{not json"), Err(ErrorCode::MalformedJson));
        assert_eq!(code(b""), Err(ErrorCode::MalformedJson));
        assert_eq!(code(b"[1,2]"), Err(ErrorCode::MalformedJson));
        assert_eq!(code(b"\xff\xfe"), Err(ErrorCode::MalformedJson));
        assert_eq!(code(br#"{"lat":1}"#), Err(ErrorCode::UnknownType));
        assert_eq!(code(br#"{"type":"teleport"}"#), Err(ErrorCode::UnknownType));
        assert_eq!(
            code(br#"{"type":"location","lat":1}"#),
            Err(ErrorCode::BadRequest)
        );
        assert_eq!(
            code(br#"{"type":"location","lat":"x","lon":1}"#),
            Err(ErrorCode::BadRequest)
        );
        assert_eq!(
            code(br#"{"type":"location","lat":NaN,"lon":1}"#),
            Err(ErrorCode::MalformedJson)
        );
        assert_eq!(
            code(br#"{"type":"location","lat":1e999,"lon":1}"#),
            Err(ErrorCode::BadRequest)
        );
        assert_eq!(
            code(br#"{"type":"ack","ids":[]}"#),
            Err(ErrorCode::BadRequest)
        );
        assert_eq!(
            code(br#"{"type":"subscribe","topic":"a b"}"#),
            Err(ErrorCode::BadRequest)
        );
        assert_eq!(
            code(br#"{"type":"subscribe","topic":""}"#),
            Err(ErrorCode::BadRequest)
        );
        assert_eq!(code(br#"{"type":7}"#), Err(ErrorCode::MalformedJson));
    }

    #[test]
    fn unknown_type_is_echoed_bounded() {
        let long = format!(r#"{{"type":"{}"}}"#, "x".repeat(10_000));
        match decode_client_frame(long.as_bytes()) {
            Err(DecodeError::UnknownType(shown)) => assert_eq!(shown.len(), MAX_NAME_LEN),
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn random_bytes_never_panic() {
        use rand::{Rng, SeedableRng, rngs::StdRng};
        let mut rng = StdRng::seed_from_u64(7);
        let seeds: [&[u8]; 3] = [
            br#"{"type":"location","lat":52.52,"lon":13.405,"accuracy_m":8,"ts":1}"#,
            br#"{"type":"ack","ids":["a","b"]}"#,
            br#"{"type":"ping","id":{"x":[1,2,null]}}"#,
        ];
        for _ in 0..20_000 {
            let mut bytes = seeds[rng.gen_range(0..seeds.len())].to_vec();
            for _ in 0..rng.gen_range(1..6) {
                let i = rng.gen_range(0..bytes.len());
                match rng.gen_range(0..3) {
                    0 => bytes[i] = rng.r#gen(),
                    1 => {
                        bytes.remove(i);
                    }
                    _ => bytes.insert(i, rng.r#gen()),
                }
                if bytes.is_empty() {
                    break;
                }
            }
            let _ = decode_client_frame(&bytes);
        }
    }

    #[test]
    fn server_frames_serialize_as_the_design_shows() {
        let limits = SessionLimits {
            max_frame_bytes: 4096,
            max_fixes_per_s: 5,
            max_topics: 32,
        };
        let welcome = ServerFrame::Welcome {
            session: "s1",
            node: "n1",
            heartbeat_s: 25.0,
            limits: &limits,
        };
        let v: serde_json::Value = serde_json::from_slice(&welcome.to_json()).expect("json");
        assert_eq!(v["type"], "welcome");
        assert_eq!(v["heartbeat_s"], 25.0);
        assert_eq!(v["limits"]["max_frame_bytes"], 4096);

        let data = RawValue::from_string(r#"{"url":"app://fest"}"#.into()).expect("raw");
        let n = ServerFrame::Notification {
            id: "01JD",
            cursor: Some("1-0"),
            title: "t",
            body: "b",
            data: Some(&data),
            ts: 1,
        };
        let text = String::from_utf8(n.to_json()).expect("utf8");
        assert!(text.contains(r#""data":{"url":"app://fest"}"#), "{text}");

        let err = ServerFrame::Error {
            code: ErrorCode::RateLimited,
            message: "slow down",
        };
        let v: serde_json::Value = serde_json::from_slice(&err.to_json()).expect("json");
        assert_eq!(v["code"], "rate_limited");

        let pong = ServerFrame::Pong {
            id: Some(&serde_json::json!(7)),
        };
        assert_eq!(pong.to_json(), br#"{"type":"pong","id":7}"#);
        let r = ServerFrame::Reconnect {
            after_ms: 2300,
            reason: "draining",
        };
        assert_eq!(
            r.to_json(),
            br#"{"type":"reconnect","after_ms":2300,"reason":"draining"}"#
        );
    }
}
