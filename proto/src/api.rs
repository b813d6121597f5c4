//! Backend HTTP API bodies (DESIGN §5) that more than one process reads.

use crate::area::{Area, AreaError};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use thiserror::Error;

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

/// Who a notification is for: exactly one of these.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum PublishTarget {
    Users(Vec<String>),
    Area(Area),
    /// The fence of a place.
    Place(String),
    Topic(String),
    /// `{"all": true}`.
    All(bool),
}

/// `POST /v1/notifications`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct NotificationRequest {
    pub target: PublishTarget,
    #[serde(default)]
    pub title: String,
    #[serde(default)]
    pub body: String,
    /// The publisher's JSON object, echoed verbatim to clients.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<Box<RawValue>>,
    #[serde(default = "default_ttl")]
    pub ttl_s: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
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
}

impl NotificationRequest {
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
    }
}
