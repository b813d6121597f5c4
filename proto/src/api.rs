//! Backend HTTP API bodies (DESIGN §5) that more than one process reads.

use crate::area::{Area, AreaError};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use thiserror::Error;
use utoipa::ToSchema;

/// Most users one publish call may target.
pub const MAX_USERS_PER_PUBLISH: usize = 1_000;
/// Longest `title`, bytes.
pub const MAX_TITLE_LEN: usize = 256;
/// Longest `body`, bytes.
pub const MAX_BODY_LEN: usize = 4_096;
/// Largest `data`, bytes of JSON.
pub const MAX_DATA_LEN: usize = 8_192;
/// Longest `ttl_s` (a week); the default is a day.
pub const MAX_TTL_S: u64 = 7 * 24 * 3600;
pub const DEFAULT_TTL_S: u64 = 24 * 3600;
/// Furthest ahead `send_at` may lie (30 days).
pub const MAX_SCHEDULE_AHEAD_S: i64 = 30 * 24 * 3600;
/// How far in the past `send_at` may lie and still be sent (at once): clocks differ a little.
pub const MAX_SCHEDULE_PAST_S: i64 = 60;
/// Longest idempotency key, bytes.
pub const MAX_IDEMPOTENCY_KEY_LEN: usize = 128;

/// Who a notification is for: exactly one of these.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum PublishTarget {
    /// User ids (`sub` of their tokens), 1 to 1,000 of 1 to 128 bytes: every device of each
    /// user, durably.
    Users(Vec<String>),
    /// Every client inside the area at send time.
    Area(Area),
    /// Every client inside the fence of this place (its id, 1 to 128 bytes) at send time.
    Place(String),
    /// Every client subscribed to the topic (1 to 128 bytes) at send time.
    Topic(String),
    /// `{"all": true}` (only `true`): every connected client.
    All(bool),
}

/// `POST /v1/notifications`. Unknown fields are refused, so a misspelt `ttl_s` or
/// `send_at` is an error rather than a silently different notification.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NotificationRequest {
    pub target: PublishTarget,
    /// At most 256 bytes of UTF-8.
    #[serde(default)]
    #[schema(max_length = 256)]
    pub title: String,
    /// At most 4,096 bytes of UTF-8.
    #[serde(default)]
    #[schema(max_length = 4096)]
    pub body: String,
    /// The publisher's JSON object (at most 8,192 bytes), echoed verbatim to clients.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub data: Option<Box<RawValue>>,
    /// Seconds the notification stays deliverable (user inboxes keep it this long).
    #[serde(default = "default_ttl")]
    #[schema(minimum = 1, maximum = 604800, default = 86400)]
    pub ttl_s: u64,
    /// RFC 3339 time to send at (e.g. `2026-11-22T18:00:00Z`), at most 30 days ahead;
    /// absent: now.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub send_at: Option<String>,
    /// A repeat of this key within 24 h returns the first id and sends nothing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(min_length = 1, max_length = 128)]
    pub idempotency_key: Option<String>,
}

fn default_ttl() -> u64 {
    DEFAULT_TTL_S
}

/// Why a publish request was refused.
#[derive(Clone, Debug, PartialEq, Error)]
pub enum RequestError {
    #[error("target.users must hold 1..={MAX_USERS_PER_PUBLISH} non-empty user ids")]
    Users,
    #[error("target.area: {0}")]
    Area(#[from] AreaError),
    #[error("target.all must be true")]
    AllFalse,
    #[error("target.topic and target.place must be 1..=128 bytes")]
    Name,
    #[error("title is longer than {MAX_TITLE_LEN} bytes")]
    Title,
    #[error("body is longer than {MAX_BODY_LEN} bytes")]
    Body,
    #[error("data must be a JSON object of at most {MAX_DATA_LEN} bytes")]
    Data,
    #[error("ttl_s must be in 1..={MAX_TTL_S}")]
    Ttl,
    #[error(
        "send_at must be an RFC 3339 time at most {MAX_SCHEDULE_AHEAD_S} s ahead and {MAX_SCHEDULE_PAST_S} s past"
    )]
    SendAt,
    #[error("idempotency_key must be 1..={MAX_IDEMPOTENCY_KEY_LEN} bytes")]
    IdempotencyKey,
}

impl RequestError {
    /// The stable `error.code` of the HTTP answer.
    pub fn code(&self) -> &'static str {
        match self {
            RequestError::Users => "invalid_users",
            RequestError::Area(_) => "invalid_area",
            RequestError::AllFalse => "invalid_all",
            RequestError::Name => "invalid_name",
            RequestError::Title => "title_too_long",
            RequestError::Body => "body_too_long",
            RequestError::Data => "invalid_data",
            RequestError::Ttl => "invalid_ttl",
            RequestError::SendAt => "invalid_send_at",
            RequestError::IdempotencyKey => "invalid_idempotency_key",
        }
    }
}

/// Parse an RFC 3339 time to Unix milliseconds.
pub fn parse_rfc3339_ms(text: &str) -> Option<i64> {
    let time =
        time::OffsetDateTime::parse(text, &time::format_description::well_known::Rfc3339).ok()?;
    i64::try_from(time.unix_timestamp_nanos() / 1_000_000).ok()
}

/// Format Unix milliseconds as RFC 3339 (UTC).
pub fn format_rfc3339_ms(ms: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_default()
}

impl NotificationRequest {
    /// When to send it (Unix ms), if scheduled: `send_at` checked against `now_ms`. A time
    /// up to [`MAX_SCHEDULE_PAST_S`] in the past means "now" (`None`).
    pub fn send_at_ms(&self, now_ms: i64) -> Result<Option<i64>, RequestError> {
        let Some(text) = &self.send_at else {
            return Ok(None);
        };
        let at = parse_rfc3339_ms(text).ok_or(RequestError::SendAt)?;
        if at > now_ms.saturating_add(MAX_SCHEDULE_AHEAD_S * 1000)
            || at < now_ms.saturating_sub(MAX_SCHEDULE_PAST_S * 1000)
        {
            return Err(RequestError::SendAt);
        }
        Ok((at > now_ms).then_some(at))
    }

    /// Check everything but `send_at` (which needs the clock: [`Self::send_at_ms`]).
    pub fn validate(&self) -> Result<(), RequestError> {
        match &self.target {
            PublishTarget::Users(users) => {
                if users.is_empty()
                    || users.len() > MAX_USERS_PER_PUBLISH
                    || users.iter().any(|u| u.is_empty() || u.len() > 128)
                {
                    return Err(RequestError::Users);
                }
            }
            PublishTarget::Area(area) => area.validate()?,
            PublishTarget::All(all) => {
                if !all {
                    return Err(RequestError::AllFalse);
                }
            }
            PublishTarget::Topic(name) | PublishTarget::Place(name) => {
                if name.is_empty() || name.len() > 128 {
                    return Err(RequestError::Name);
                }
            }
        }
        if self.title.len() > MAX_TITLE_LEN {
            return Err(RequestError::Title);
        }
        if self.body.len() > MAX_BODY_LEN {
            return Err(RequestError::Body);
        }
        if let Some(data) = &self.data
            && (data.get().len() > MAX_DATA_LEN || !data.get().trim_start().starts_with('{'))
        {
            return Err(RequestError::Data);
        }
        if self.ttl_s == 0 || self.ttl_s > MAX_TTL_S {
            return Err(RequestError::Ttl);
        }
        if let Some(key) = &self.idempotency_key
            && (key.is_empty() || key.len() > MAX_IDEMPOTENCY_KEY_LEN)
        {
            return Err(RequestError::IdempotencyKey);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_design_example_parses_and_validates() {
        let text = r#"{"target":{"area":{"circle":{"lat":52.52,"lon":13.405,"radius_m":500}}},
            "title":"Street festival","body":"Starts in 10 min","data":{"url":"app://fest"},
            "ttl_s":3600,"idempotency_key":"fest-2026-11-21"}"#;
        let request: NotificationRequest = serde_json::from_str(text).expect("parses");
        request.validate().expect("valid");
        assert_eq!(
            request.data.as_ref().map(|d| d.get()),
            Some(r#"{"url":"app://fest"}"#)
        );
        for target in [
            r#"{"users":["a","b"]}"#,
            r#"{"topic":"t"}"#,
            r#"{"all":true}"#,
            r#"{"place":"cafe"}"#,
        ] {
            let text = format!(r#"{{"target":{target},"title":"x"}}"#);
            let request: NotificationRequest = serde_json::from_str(&text).expect("parses");
            request.validate().expect("valid");
            assert_eq!(request.ttl_s, DEFAULT_TTL_S);
        }
    }

    #[test]
    fn bad_requests_are_refused() {
        let parse = |text: &str| serde_json::from_str::<NotificationRequest>(text);
        assert!(
            parse(r#"{"target":{"users":["a"],"topic":"t"}}"#).is_err(),
            "two targets"
        );
        let check = |text: &str| parse(text).expect("parses").validate();
        assert_eq!(
            check(r#"{"target":{"users":[]}}"#),
            Err(RequestError::Users)
        );
        assert_eq!(
            check(r#"{"target":{"all":false}}"#),
            Err(RequestError::AllFalse)
        );
        assert_eq!(
            check(r#"{"target":{"all":true},"data":[1]}"#),
            Err(RequestError::Data)
        );
        assert_eq!(
            check(r#"{"target":{"all":true},"ttl_s":0}"#),
            Err(RequestError::Ttl)
        );
        assert!(
            parse(r#"{"target":{"all":true},"ttl":5}"#).is_err(),
            "unknown field"
        );
        assert!(parse(r#"{"target":{"all":true},"ttl_s":-1}"#).is_err());
    }

    #[test]
    fn send_at_is_checked_against_the_clock() {
        let now = parse_rfc3339_ms("2026-11-22T12:00:00Z").expect("parses");
        let at = |text: &str| {
            let request: NotificationRequest = serde_json::from_str(&format!(
                r#"{{"target":{{"all":true}},"send_at":"{text}"}}"#
            ))
            .expect("parses");
            request.send_at_ms(now)
        };
        assert_eq!(at("2026-11-22T12:00:30Z"), Ok(Some(now + 30_000)));
        assert_eq!(at("2026-11-22T13:00:30+01:00"), Ok(Some(now + 30_000)));
        assert_eq!(at("2026-11-22T11:59:30Z"), Ok(None), "just past: now");
        assert_eq!(at("2026-11-22T11:00:00Z"), Err(RequestError::SendAt));
        assert_eq!(at("2027-11-22T12:00:00Z"), Err(RequestError::SendAt));
        assert_eq!(at("tomorrow"), Err(RequestError::SendAt));
        assert_eq!(format_rfc3339_ms(now), "2026-11-22T12:00:00Z");
    }
}
