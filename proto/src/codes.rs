//! Error codes carried in `error` frames and WebSocket close codes (DESIGN §4).

use serde::{Deserialize, Serialize};

/// The `code` of an `error` frame. Clients switch on these strings, so they are part of the
/// protocol: add new ones, never rename.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// The frame is not JSON, or not a JSON object.
    MalformedJson,
    /// The frame has no `type` or a `type` this server does not know.
    UnknownType,
    /// A required field is missing or has the wrong type or range.
    BadRequest,
    /// A `location` fix failed validation (range, finiteness, accuracy, timestamp).
    InvalidFix,
    /// Fixes arrive faster than the per-connection rate; the latest is kept, others dropped.
    RateLimited,
    /// The token expired; send `refresh` before the grace period ends.
    TokenExpired,
    /// The token in a `refresh` frame did not verify or names another user.
    TokenInvalid,
    /// The frame exceeded the maximum frame size.
    TooLarge,
    /// Binary frames are not part of protocol v1.
    BinaryNotSupported,
    /// The session already holds the maximum number of topic subscriptions.
    TooManySubscriptions,
    /// The server could not do what was asked for a reason of its own.
    Internal,
}

impl ErrorCode {
    /// The wire string, as used in metrics labels and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::MalformedJson => "malformed_json",
            ErrorCode::UnknownType => "unknown_type",
            ErrorCode::BadRequest => "bad_request",
            ErrorCode::InvalidFix => "invalid_fix",
            ErrorCode::RateLimited => "rate_limited",
            ErrorCode::TokenExpired => "token_expired",
            ErrorCode::TokenInvalid => "token_invalid",
            ErrorCode::TooLarge => "too_large",
            ErrorCode::BinaryNotSupported => "binary_not_supported",
            ErrorCode::TooManySubscriptions => "too_many_subscriptions",
            ErrorCode::Internal => "internal",
        }
    }
}

/// WebSocket close codes geopush sends (RFC 6455 §7.4 plus the 4000–4999 private range).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u16)]
pub enum CloseCode {
    /// 1000: orderly close, the client asked for it.
    Normal = 1000,
    /// 1001: the node is draining; reconnect (after the `reconnect` frame's delay).
    GoingAway = 1001,
    /// 1002: the peer broke the WebSocket protocol (bad opcode, reserved bits, unmasked frame).
    ProtocolError = 1002,
    /// 1007: a text frame was not valid UTF-8.
    InvalidPayload = 1007,
    /// 1009: a frame exceeded the maximum frame size.
    TooBig = 1009,
    /// 1011: the server failed.
    InternalError = 1011,
    /// 4001: the token is bad or expired and was not refreshed in time.
    Auth = 4001,
    /// 4008: policy violation: a persistent fix flood or repeated bad frames.
    Policy = 4008,
    /// 4009: slow consumer: the outbound queue overflowed; reconnect and resume.
    SlowConsumer = 4009,
}

impl CloseCode {
    /// Every close code, for metrics that want a zero for each.
    pub const ALL: [CloseCode; 9] = [
        CloseCode::Normal,
        CloseCode::GoingAway,
        CloseCode::ProtocolError,
        CloseCode::InvalidPayload,
        CloseCode::TooBig,
        CloseCode::InternalError,
        CloseCode::Auth,
        CloseCode::Policy,
        CloseCode::SlowConsumer,
    ];

    /// The numeric code as sent in the close frame.
    pub fn as_u16(self) -> u16 {
        self as u16
    }

    /// The code for a number received from a peer, if it is one geopush sends.
    pub fn from_u16(code: u16) -> Option<CloseCode> {
        CloseCode::ALL.into_iter().find(|c| c.as_u16() == code)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_codes_serialize_as_their_wire_strings() {
        for code in [
            ErrorCode::MalformedJson,
            ErrorCode::UnknownType,
            ErrorCode::BadRequest,
            ErrorCode::InvalidFix,
            ErrorCode::RateLimited,
            ErrorCode::TokenExpired,
            ErrorCode::TokenInvalid,
            ErrorCode::TooLarge,
            ErrorCode::BinaryNotSupported,
            ErrorCode::TooManySubscriptions,
            ErrorCode::Internal,
        ] {
            let json = serde_json::to_string(&code).expect("serializes");
            assert_eq!(json, format!("\"{}\"", code.as_str()));
        }
    }

    #[test]
    fn close_codes_round_trip() {
        for code in CloseCode::ALL {
            assert_eq!(CloseCode::from_u16(code.as_u16()), Some(code));
        }
        assert_eq!(CloseCode::from_u16(4999), None);
        assert_eq!(CloseCode::SlowConsumer.as_u16(), 4009);
    }
}
