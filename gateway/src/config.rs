//! Gateway configuration: one struct, parsed from flags with `GEOPUSH_*` env fallbacks,
//! validated once at start, printed with secrets redacted.
//!
//! Every limit the gateway enforces is a field here with a documented default.

use clap::{Args, ValueEnum};
use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;
use thiserror::Error;

/// The HMAC secret used when no key is configured. Anyone can mint tokens with it: the
/// gateway logs a loud warning at start whenever it is in use.
pub const DEV_JWT_SECRET: &str = "geopush-insecure-dev-secret-do-not-use-in-production";

/// A secret string whose `Debug` and `Display` never show the value.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Secret {
        Secret(value.into())
    }
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

impl std::str::FromStr for Secret {
    type Err = std::convert::Infallible;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(Secret(s.to_owned()))
    }
}

/// A Redis URL (or comma-separated cluster seeds) whose `Debug` hides the credentials, so
/// the configuration can be logged: `redis://user:pw@host:6379` shows as
/// `redis://***@host:6379`.
#[derive(Clone, PartialEq, Eq)]
pub struct RedisUrl(String);

impl RedisUrl {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for RedisUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let redacted: Vec<String> = self
            .0
            .split(',')
            .map(|url| match (url.find("://"), url.rfind('@')) {
                (Some(scheme_end), Some(at)) if at > scheme_end => {
                    format!("{}***{}", &url[..scheme_end + 3], &url[at..])
                }
                _ => url.to_owned(),
            })
            .collect();
        write!(f, "{:?}", redacted.join(","))
    }
}

impl std::str::FromStr for RedisUrl {
    type Err = std::convert::Infallible;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(RedisUrl(s.to_owned()))
    }
}

impl From<&str> for RedisUrl {
    fn from(s: &str) -> RedisUrl {
        RedisUrl(s.to_owned())
    }
}

impl From<String> for RedisUrl {
    fn from(s: String) -> RedisUrl {
        RedisUrl(s)
    }
}

/// Log output format.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// JSON when stderr is not a terminal, pretty otherwise.
    Auto,
    Json,
    Pretty,
}

/// The keys tokens are verified with: client tokens for sessions, and service tokens (with
/// a `scope` claim) for the backend API.
#[derive(Clone, Debug, Args)]
pub struct TokenKeys {
    /// HS256/384/512 secret for client tokens. With no key at all, an insecure development
    /// secret is used and loudly logged.
    #[arg(long, env = "GEOPUSH_JWT_SECRET")]
    pub jwt_secret: Option<Secret>,

    /// PEM public key (a path, or the PEM text itself) for RS256 or ES256 client tokens.
    #[arg(long, env = "GEOPUSH_JWT_PUBLIC_KEY")]
    pub jwt_public_key: Option<String>,

    /// JWKS file with RSA/EC public keys; a token's `kid` picks the key.
    #[arg(long, env = "GEOPUSH_JWKS_FILE")]
    pub jwks_file: Option<PathBuf>,

    /// Required `iss` claim, if set.
    #[arg(long, env = "GEOPUSH_JWT_ISSUER")]
    pub jwt_issuer: Option<String>,

    /// Required `aud` claim, if set.
    #[arg(long, env = "GEOPUSH_JWT_AUDIENCE")]
    pub jwt_audience: Option<String>,

    /// Clock leeway for `exp` and `nbf`, seconds.
    #[arg(long, env = "GEOPUSH_JWT_LEEWAY_SECONDS", default_value_t = 30)]
    pub jwt_leeway_seconds: u64,
}

impl TokenKeys {
    /// True when no key is configured and the development secret is in use.
    pub fn uses_dev_secret(&self) -> bool {
        self.jwt_secret.is_none() && self.jwt_public_key.is_none() && self.jwks_file.is_none()
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        let keys = [
            self.jwt_secret.is_some(),
            self.jwt_public_key.is_some(),
            self.jwks_file.is_some(),
        ];
        if keys.iter().filter(|k| **k).count() > 1 {
            return Err(ConfigError {
                field: "jwt_secret / jwt_public_key / jwks_file",
                reason: "configure exactly one token key source".into(),
            });
        }
        Ok(())
    }
}

/// The backend HTTP API's limits and keys (DESIGN §5).
#[derive(Clone, Debug, Args)]
pub struct ApiConfig {
    /// Backend API keys as `name:<sha256 hex of the key>:scope+scope`, comma-separated;
    /// scopes `publish`, `places`, `admin` (`geopush-worker hash-key` prints an entry).
    /// Unset: an insecure development key with every scope, loudly logged.
    #[arg(long, env = "GEOPUSH_API_KEYS")]
    pub api_keys: Option<Secret>,

    /// Largest request body of the API but imports, bytes (larger: 413).
    #[arg(long, env = "GEOPUSH_API_MAX_BODY_BYTES", default_value_t = 256 * 1024)]
    pub api_max_body_bytes: usize,

    /// Longest wait for the next bytes of a request body (the whole body of ordinary
    /// requests; each chunk of an import), seconds; then 408.
    #[arg(long, env = "GEOPUSH_API_BODY_TIMEOUT_SECONDS", default_value_t = 30.0)]
    pub api_body_timeout_seconds: f64,

    /// Largest single row (an NDJSON line or a FeatureCollection feature) of a places
    /// import, bytes; an import itself may be of any size.
    #[arg(long, env = "GEOPUSH_IMPORT_MAX_ROW_BYTES", default_value_t = 256 * 1024)]
    pub import_max_row_bytes: usize,

    /// Places written to the store per batch during an import.
    #[arg(long, env = "GEOPUSH_IMPORT_BATCH", default_value_t = 1_000)]
    pub import_batch: usize,

    /// Most rejected rows an import answer lists one by one (the rest are counted).
    #[arg(
        long,
        env = "GEOPUSH_IMPORT_MAX_REJECTED_LISTED",
        default_value_t = 1_000
    )]
    pub import_max_rejected_listed: usize,

    /// Largest `limit` of a nearby places query.
    #[arg(long, env = "GEOPUSH_API_MAX_NEARBY_LIMIT", default_value_t = 1_000)]
    pub api_max_nearby_limit: usize,

    /// Largest `radius_m` of a nearby places query, metres.
    #[arg(
        long,
        env = "GEOPUSH_API_MAX_NEARBY_RADIUS_M",
        default_value_t = 100_000.0
    )]
    pub api_max_nearby_radius_m: f64,

    /// How often scheduled notifications are checked for being due, milliseconds.
    #[arg(long, env = "GEOPUSH_SCHEDULE_POLL_MS", default_value_t = 200)]
    pub schedule_poll_ms: u64,

    /// How long a worker holds a due scheduled notification before another may take it
    /// over (if the first died while sending), seconds.
    #[arg(long, env = "GEOPUSH_SCHEDULE_LEASE_SECONDS", default_value_t = 30)]
    pub schedule_lease_seconds: u64,

    /// How long a notification's status stays queryable after it expires, seconds (in
    /// Redis: how long its `gp:n:{id}` hash, ~200 bytes, outlives it).
    #[arg(
        long,
        env = "GEOPUSH_STATUS_RETENTION_SECONDS",
        default_value_t = 86_400
    )]
    pub status_retention_seconds: u64,
}

/// The API key used when none is configured. Anyone can publish with it: its use is
/// loudly logged.
pub const DEV_API_KEY: &str = "geopush-insecure-dev-api-key";

impl ApiConfig {
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.api_max_body_bytes < 1024 {
            return Err(ConfigError {
                field: "api_max_body_bytes",
                reason: "must be at least 1024".into(),
            });
        }
        if self.import_max_row_bytes < 1024 {
            return Err(ConfigError {
                field: "import_max_row_bytes",
                reason: "must be at least 1024".into(),
            });
        }
        positive_seconds("api_body_timeout_seconds", self.api_body_timeout_seconds)?;
        at_least_one("import_batch", self.import_batch)?;
        at_least_one("api_max_nearby_limit", self.api_max_nearby_limit)?;
        at_least_one("schedule_poll_ms", self.schedule_poll_ms)?;
        at_least_one("schedule_lease_seconds", self.schedule_lease_seconds)?;
        at_least_one("status_retention_seconds", self.status_retention_seconds)?;
        if !(self.api_max_nearby_radius_m.is_finite() && self.api_max_nearby_radius_m > 0.0) {
            return Err(ConfigError {
                field: "api_max_nearby_radius_m",
                reason: "must be a positive number of metres".into(),
            });
        }
        Ok(())
    }
    pub fn body_timeout(&self) -> Duration {
        Duration::from_secs_f64(self.api_body_timeout_seconds)
    }
    pub fn schedule_poll(&self) -> Duration {
        Duration::from_millis(self.schedule_poll_ms)
    }
    pub fn schedule_lease(&self) -> Duration {
        Duration::from_secs(self.schedule_lease_seconds)
    }
    pub fn status_retention(&self) -> Duration {
        Duration::from_secs(self.status_retention_seconds)
    }
}

/// Everything `geopush-gateway serve` can be told.
#[derive(Clone, Debug, Args)]
pub struct Config {
    /// Address for WebSocket and HTTP.
    #[arg(long, env = "GEOPUSH_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,

    /// This node's name in `welcome` frames, logs and metrics (default: a random id).
    #[arg(long, env = "GEOPUSH_NODE_ID")]
    pub node_id: Option<String>,

    /// Redis URL (`redis://host:port`), or a cluster's seed URLs separated by commas. Unset:
    /// single-node mode with an in-memory bus.
    #[arg(long, env = "GEOPUSH_REDIS_URL")]
    pub redis_url: Option<RedisUrl>,

    /// Treat the Redis URL as a Redis Cluster (sharded pub/sub); implied by several URLs.
    #[arg(long, env = "GEOPUSH_REDIS_CLUSTER", default_value_t = false)]
    pub redis_cluster: bool,

    /// Prefix of every Redis key and channel.
    #[arg(long, env = "GEOPUSH_REDIS_PREFIX", default_value = "gp:")]
    pub redis_prefix: String,

    /// How long a channel nobody holds stays subscribed (avoids churn on reconnects), seconds.
    #[arg(
        long,
        env = "GEOPUSH_SUBSCRIPTION_LINGER_SECONDS",
        default_value_t = 2.0
    )]
    pub subscription_linger_seconds: f64,

    /// Interval of the end-to-end pub/sub probe, seconds.
    #[arg(long, env = "GEOPUSH_BUS_PROBE_SECONDS", default_value_t = 5.0)]
    pub bus_probe_seconds: f64,

    /// A probe not back within this is a failure (resubscribe, replay), seconds.
    #[arg(long, env = "GEOPUSH_BUS_PROBE_TIMEOUT_SECONDS", default_value_t = 2.0)]
    pub bus_probe_timeout_seconds: f64,

    /// Token keys: the client tokens of sessions, and service tokens of the API.
    #[command(flatten)]
    pub tokens: TokenKeys,

    /// The backend HTTP API (served here in single-node mode).
    #[command(flatten)]
    pub api: ApiConfig,

    /// How long a session may live past its token's `exp` (after an `error` frame with
    /// `token_expired`) before it is closed with 4001, seconds.
    #[arg(long, env = "GEOPUSH_TOKEN_GRACE_SECONDS", default_value_t = 30.0)]
    pub token_grace_seconds: f64,

    /// Places to load at start: a GeoJSON FeatureCollection or NDJSON of Features. Bad rows
    /// are logged with their position and skipped.
    #[arg(long, env = "GEOPUSH_PLACES_FILE")]
    pub places_file: Option<PathBuf>,

    /// `nearby` radius when the client asks for none, metres.
    #[arg(long, env = "GEOPUSH_NEARBY_RADIUS_M", default_value_t = 500.0)]
    pub nearby_radius_m: f64,

    /// Largest `nearby` radius a client may ask for, metres.
    #[arg(long, env = "GEOPUSH_NEARBY_MAX_RADIUS_M", default_value_t = 5_000.0)]
    pub nearby_max_radius_m: f64,

    /// `nearby` result count when the client asks for none.
    #[arg(long, env = "GEOPUSH_NEARBY_LIMIT", default_value_t = 20)]
    pub nearby_limit: u32,

    /// Largest `nearby` result count a client may ask for.
    #[arg(long, env = "GEOPUSH_NEARBY_MAX_LIMIT", default_value_t = 100)]
    pub nearby_max_limit: u32,

    /// A client must move this far (metres) before `nearby` is computed again (unless its
    /// radius or limit changed, or the places changed).
    #[arg(long, env = "GEOPUSH_NEARBY_MIN_MOVE_M", default_value_t = 25.0)]
    pub nearby_min_move_m: f64,

    /// Fixes less accurate than this (metres) do not change geofence state.
    #[arg(long, env = "GEOPUSH_FENCE_MAX_ACCURACY_M", default_value_t = 100.0)]
    pub fence_max_accuracy_m: f64,

    /// Smallest distance (metres) a client must be outside a fence to exit it; the fix's
    /// accuracy is used when larger.
    #[arg(long, env = "GEOPUSH_FENCE_EXIT_MARGIN_M", default_value_t = 15.0)]
    pub fence_exit_margin_m: f64,

    /// Geofence events the in-memory sink keeps (single-node mode).
    #[arg(long, env = "GEOPUSH_GEOFENCE_EVENT_BUFFER", default_value_t = 10_000)]
    pub geofence_event_buffer: usize,

    /// How often delivery and ack counts are folded into the notifications' status in
    /// Redis, milliseconds.
    #[arg(long, env = "GEOPUSH_STATUS_FLUSH_MS", default_value_t = 100)]
    pub status_flush_ms: u64,

    /// Notifications kept per user inbox (oldest dropped first).
    #[arg(long, env = "GEOPUSH_INBOX_LEN", default_value_t = 1_000)]
    pub inbox_len: usize,

    /// Most concurrent WebSocket sessions; upgrades past it get HTTP 503.
    #[arg(long, env = "GEOPUSH_MAX_CONNECTIONS", default_value_t = 50_000)]
    pub max_connections: usize,

    /// Time a client has to send a complete HTTP upgrade request, seconds.
    #[arg(
        long,
        env = "GEOPUSH_HANDSHAKE_TIMEOUT_SECONDS",
        default_value_t = 10.0
    )]
    pub handshake_timeout_seconds: f64,

    /// Largest WebSocket frame accepted from a client, bytes (larger: close 1009).
    #[arg(long, env = "GEOPUSH_MAX_FRAME_BYTES", default_value_t = 16 * 1024)]
    pub max_frame_bytes: usize,

    /// Frames a session's outbound queue holds before the client counts as a slow consumer
    /// (close 4009). `nearby` frames do not count: they are coalesced to the latest.
    #[arg(long, env = "GEOPUSH_QUEUE_LEN", default_value_t = 256)]
    pub queue_len: usize,

    /// Fixes per second a session processes; faster fixes are coalesced (latest wins).
    #[arg(long, env = "GEOPUSH_MAX_FIXES_PER_SECOND", default_value_t = 5)]
    pub max_fixes_per_second: u32,

    /// A session sending more than this many times its fix rate, for
    /// `fix_flood_seconds` seconds in a row, is closed with 4008.
    #[arg(long, env = "GEOPUSH_FIX_FLOOD_FACTOR", default_value_t = 10)]
    pub fix_flood_factor: u32,

    /// Consecutive flooding seconds before close 4008.
    #[arg(long, env = "GEOPUSH_FIX_FLOOD_SECONDS", default_value_t = 3)]
    pub fix_flood_seconds: u32,

    /// Bad frames (malformed, unknown, invalid) a session may send per minute before it is
    /// closed with 4008. Each one is answered with an `error` frame.
    #[arg(long, env = "GEOPUSH_MAX_BAD_FRAMES_PER_MINUTE", default_value_t = 20)]
    pub max_bad_frames_per_minute: u32,

    /// How far a fix's `ts` may be ahead of the server clock, seconds.
    #[arg(long, env = "GEOPUSH_FIX_MAX_FUTURE_SECONDS", default_value_t = 60)]
    pub fix_max_future_seconds: u64,

    /// Topics one session may subscribe.
    #[arg(long, env = "GEOPUSH_MAX_TOPICS", default_value_t = 32)]
    pub max_topics: usize,

    /// Interval between server WebSocket pings; a session silent for two intervals (plus a
    /// little) is closed as dead.
    #[arg(long, env = "GEOPUSH_HEARTBEAT_SECONDS", default_value_t = 25.0)]
    pub heartbeat_seconds: f64,

    /// Window over which drain spreads `reconnect` frames and closes, seconds.
    #[arg(long, env = "GEOPUSH_DRAIN_SECONDS", default_value_t = 10.0)]
    pub drain_seconds: f64,

    /// Hard bound on shutdown after the drain window: tasks still running are abandoned.
    #[arg(long, env = "GEOPUSH_SHUTDOWN_GRACE_SECONDS", default_value_t = 5.0)]
    pub shutdown_grace_seconds: f64,

    /// Longest a single socket write may stall before the peer is dropped, seconds. Bounds
    /// how long a client that stopped reading can hold its session after a 4009.
    #[arg(long, env = "GEOPUSH_WRITE_TIMEOUT_SECONDS", default_value_t = 10.0)]
    pub write_timeout_seconds: f64,

    /// Upper bound of the random `after_ms` in `reconnect` frames sent during drain, seconds.
    #[arg(long, env = "GEOPUSH_RECONNECT_JITTER_SECONDS", default_value_t = 5.0)]
    pub reconnect_jitter_seconds: f64,

    /// Log format.
    #[arg(long, env = "GEOPUSH_LOG_FORMAT", value_enum, default_value_t = LogFormat::Auto)]
    pub log_format: LogFormat,
}

/// A configuration value that cannot work.
#[derive(Debug, Error)]
#[error("invalid configuration: {field}: {reason}")]
pub struct ConfigError {
    pub field: &'static str,
    pub reason: String,
}

/// A positive, finite number of seconds as a `Duration`, or the error naming `field`.
pub fn positive_seconds(field: &'static str, value: f64) -> Result<Duration, ConfigError> {
    if value.is_finite() && value > 0.0 && value < 1e9 {
        Ok(Duration::from_secs_f64(value))
    } else {
        Err(ConfigError {
            field,
            reason: format!("must be a positive number of seconds, got {value}"),
        })
    }
}

fn at_least_one<T: PartialOrd + From<u8> + fmt::Display>(
    field: &'static str,
    value: T,
) -> Result<(), ConfigError> {
    if value >= T::from(1) {
        Ok(())
    } else {
        Err(ConfigError {
            field,
            reason: format!("must be at least 1, got {value}"),
        })
    }
}

impl Config {
    /// The defaults, as `geopush-gateway serve` with no flags and no env would have them.
    pub fn defaults() -> Config {
        #[derive(clap::Parser)]
        #[command(name = "geopush-gateway")]
        struct Wrapper {
            #[command(flatten)]
            config: Config,
        }
        // Defaults come from the same attributes the binary uses; env is ignored so tests are
        // not affected by the shell they run in.
        let mut cmd = <Wrapper as clap::CommandFactory>::command();
        for arg in cmd
            .get_arguments()
            .map(|a| a.get_id().clone())
            .collect::<Vec<_>>()
        {
            cmd = cmd.mut_arg(arg, |a| a.env(None::<&str>));
        }
        let matches = cmd
            .try_get_matches_from(["geopush-gateway"])
            .unwrap_or_else(|e| e.exit());
        <Wrapper as clap::FromArgMatches>::from_arg_matches(&matches)
            .map(|w| w.config)
            .unwrap_or_else(|e| e.exit())
    }

    /// Check every value once; the gateway refuses to start on an error.
    pub fn validate(&self) -> Result<(), ConfigError> {
        positive_seconds("token_grace_seconds", self.token_grace_seconds)?;
        positive_seconds("handshake_timeout_seconds", self.handshake_timeout_seconds)?;
        positive_seconds("heartbeat_seconds", self.heartbeat_seconds)?;
        positive_seconds("drain_seconds", self.drain_seconds)?;
        positive_seconds("shutdown_grace_seconds", self.shutdown_grace_seconds)?;
        positive_seconds("write_timeout_seconds", self.write_timeout_seconds)?;
        positive_seconds(
            "subscription_linger_seconds",
            self.subscription_linger_seconds,
        )?;
        positive_seconds("bus_probe_seconds", self.bus_probe_seconds)?;
        positive_seconds("bus_probe_timeout_seconds", self.bus_probe_timeout_seconds)?;
        positive_seconds("reconnect_jitter_seconds", self.reconnect_jitter_seconds)?;
        at_least_one("max_connections", self.max_connections)?;
        at_least_one("queue_len", self.queue_len)?;
        at_least_one("max_fixes_per_second", self.max_fixes_per_second)?;
        at_least_one("fix_flood_factor", self.fix_flood_factor)?;
        at_least_one("fix_flood_seconds", self.fix_flood_seconds)?;
        at_least_one("max_bad_frames_per_minute", self.max_bad_frames_per_minute)?;
        for (field, value) in [
            ("nearby_radius_m", self.nearby_radius_m),
            ("nearby_max_radius_m", self.nearby_max_radius_m),
            ("fence_max_accuracy_m", self.fence_max_accuracy_m),
        ] {
            if !(value.is_finite() && value > 0.0) {
                return Err(ConfigError {
                    field,
                    reason: format!("must be a positive number of metres, got {value}"),
                });
            }
        }
        for (field, value) in [
            ("nearby_min_move_m", self.nearby_min_move_m),
            ("fence_exit_margin_m", self.fence_exit_margin_m),
        ] {
            if !(value.is_finite() && value >= 0.0) {
                return Err(ConfigError {
                    field,
                    reason: format!("must be a number of metres >= 0, got {value}"),
                });
            }
        }
        at_least_one("nearby_limit", self.nearby_limit)?;
        at_least_one("nearby_max_limit", self.nearby_max_limit)?;
        at_least_one("geofence_event_buffer", self.geofence_event_buffer)?;
        at_least_one("inbox_len", self.inbox_len)?;
        if self.max_frame_bytes < 256 {
            return Err(ConfigError {
                field: "max_frame_bytes",
                reason: "must be at least 256".into(),
            });
        }
        at_least_one("status_flush_ms", self.status_flush_ms)?;
        self.tokens.validate()?;
        self.api.validate()
    }

    /// True when no key is configured and the development secret is in use.
    pub fn uses_dev_secret(&self) -> bool {
        self.tokens.uses_dev_secret()
    }

    pub fn status_flush_interval(&self) -> Duration {
        Duration::from_millis(self.status_flush_ms)
    }

    pub fn token_grace(&self) -> Duration {
        Duration::from_secs_f64(self.token_grace_seconds)
    }
    pub fn handshake_timeout(&self) -> Duration {
        Duration::from_secs_f64(self.handshake_timeout_seconds)
    }
    pub fn heartbeat(&self) -> Duration {
        Duration::from_secs_f64(self.heartbeat_seconds)
    }
    /// Silence after which a session is considered dead: two heartbeats and a margin.
    pub fn idle_timeout(&self) -> Duration {
        self.heartbeat().mul_f64(2.2)
    }
    pub fn drain_window(&self) -> Duration {
        Duration::from_secs_f64(self.drain_seconds)
    }
    pub fn subscription_linger(&self) -> Duration {
        Duration::from_secs_f64(self.subscription_linger_seconds)
    }
    pub fn bus_probe_interval(&self) -> Duration {
        Duration::from_secs_f64(self.bus_probe_seconds)
    }
    pub fn bus_probe_timeout(&self) -> Duration {
        Duration::from_secs_f64(self.bus_probe_timeout_seconds)
    }
    pub fn write_timeout(&self) -> Duration {
        Duration::from_secs_f64(self.write_timeout_seconds)
    }
    pub fn reconnect_jitter(&self) -> Duration {
        Duration::from_secs_f64(self.reconnect_jitter_seconds)
    }
    pub fn shutdown_grace(&self) -> Duration {
        Duration::from_secs_f64(self.shutdown_grace_seconds)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redis_urls_hide_their_credentials_when_logged() {
        let url = RedisUrl::from("redis://user:s3cret@10.0.0.1:6379/0,redis://:pw@10.0.0.2:6379");
        let shown = format!("{url:?}");
        assert!(
            !shown.contains("s3cret") && !shown.contains("pw@"),
            "{shown}"
        );
        assert_eq!(
            shown,
            r#""redis://***@10.0.0.1:6379/0,redis://***@10.0.0.2:6379""#
        );
        assert_eq!(
            format!("{:?}", RedisUrl::from("redis://h:1")),
            r#""redis://h:1""#
        );
        assert_eq!(
            url.as_str(),
            "redis://user:s3cret@10.0.0.1:6379/0,redis://:pw@10.0.0.2:6379"
        );
    }

    #[test]
    fn defaults_are_valid_and_use_the_dev_secret() {
        let config = Config::defaults();
        config.validate().expect("defaults validate");
        assert!(config.uses_dev_secret());
        assert_eq!(config.listen, "127.0.0.1:8080".parse().expect("addr"));
        assert_eq!(config.queue_len, 256);
    }

    #[test]
    fn secrets_do_not_print() {
        let mut config = Config::defaults();
        config.tokens.jwt_secret = Some(Secret::new("hunter2"));
        assert!(!format!("{config:?}").contains("hunter2"));
    }

    #[test]
    fn bad_values_are_refused() {
        let mut config = Config::defaults();
        config.heartbeat_seconds = 0.0;
        assert_eq!(
            config.validate().expect_err("zero heartbeat").field,
            "heartbeat_seconds"
        );
        let mut config = Config::defaults();
        config.queue_len = 0;
        assert_eq!(
            config.validate().expect_err("zero queue").field,
            "queue_len"
        );
        let mut config = Config::defaults();
        config.tokens.jwt_secret = Some(Secret::new("a"));
        config.tokens.jwks_file = Some("x.json".into());
        assert!(config.validate().is_err());
    }
}
