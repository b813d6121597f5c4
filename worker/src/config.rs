//! Worker configuration: flags with `GEOPUSH_*` env fallbacks, validated once at start,
//! printed with secrets redacted. The token keys and API limits are the gateway's groups,
//! so both processes read the same variables the same way.

use clap::Args;
pub use geopush_gateway::config::LogFormat;
use geopush_gateway::config::{
    ApiConfig, ConfigError, RedisUrl, Secret, TokenKeys, positive_seconds,
};
use std::net::SocketAddr;
use std::time::Duration;

/// Everything `geopush-worker serve` can be told.
#[derive(Clone, Debug, Args)]
pub struct WorkerConfig {
    /// Address of the backend HTTP API.
    #[arg(long, env = "GEOPUSH_LISTEN", default_value = "127.0.0.1:8081")]
    pub listen: SocketAddr,

    /// Redis URL (`redis://host:port`), or a cluster's seed URLs separated by commas. The
    /// worker needs Redis; without it run the single-node gateway, which serves this API.
    #[arg(long, env = "GEOPUSH_REDIS_URL")]
    pub redis_url: Option<RedisUrl>,

    /// Treat the Redis URL as a Redis Cluster; implied by several URLs.
    #[arg(long, env = "GEOPUSH_REDIS_CLUSTER", default_value_t = false)]
    pub redis_cluster: bool,

    /// Prefix of every Redis key and channel (the gateways' must be the same).
    #[arg(long, env = "GEOPUSH_REDIS_PREFIX", default_value = "gp:")]
    pub redis_prefix: String,

    /// Notifications kept per user inbox (oldest dropped first); as on the gateways.
    #[arg(long, env = "GEOPUSH_INBOX_LEN", default_value_t = 1_000)]
    pub inbox_len: usize,

    /// This worker's name: its consumer name in the webhook consumer group (default: a
    /// random id; give a stable one, e.g. the pod name, so a restarted worker finishes its
    /// own pending events).
    #[arg(long, env = "GEOPUSH_WORKER_ID")]
    pub worker_id: Option<String>,

    #[command(flatten)]
    pub tokens: TokenKeys,

    #[command(flatten)]
    pub api: ApiConfig,

    #[command(flatten)]
    pub webhooks: WebhookSettings,

    /// Time a client has to send a complete request head, seconds.
    #[arg(
        long,
        env = "GEOPUSH_HANDSHAKE_TIMEOUT_SECONDS",
        default_value_t = 10.0
    )]
    pub handshake_timeout_seconds: f64,

    /// Bound on shutdown: requests and tasks still running this long after SIGTERM are
    /// abandoned, seconds.
    #[arg(long, env = "GEOPUSH_SHUTDOWN_GRACE_SECONDS", default_value_t = 5.0)]
    pub shutdown_grace_seconds: f64,

    /// Log format.
    #[arg(long, env = "GEOPUSH_LOG_FORMAT", value_enum, default_value_t = LogFormat::Auto)]
    pub log_format: LogFormat,
}

/// Geofence-event webhooks.
#[derive(Clone, Debug, Args)]
pub struct WebhookSettings {
    /// URLs every geofence event is POSTed to, comma-separated. Unset: no webhooks.
    #[arg(long, env = "GEOPUSH_WEBHOOK_URLS", value_delimiter = ',')]
    pub webhook_urls: Vec<String>,

    /// HMAC-SHA256 key of the `X-Geopush-Signature` header (required with URLs).
    #[arg(long, env = "GEOPUSH_WEBHOOK_SECRET")]
    pub webhook_secret: Option<Secret>,

    /// Attempts per event and URL before the event goes to the dead-letter stream.
    #[arg(long, env = "GEOPUSH_WEBHOOK_MAX_ATTEMPTS", default_value_t = 8)]
    pub webhook_max_attempts: u32,

    /// First retry delay (doubled per attempt, with full jitter), milliseconds.
    #[arg(long, env = "GEOPUSH_WEBHOOK_BACKOFF_BASE_MS", default_value_t = 500)]
    pub webhook_backoff_base_ms: u64,

    /// Longest retry delay, milliseconds.
    #[arg(long, env = "GEOPUSH_WEBHOOK_BACKOFF_MAX_MS", default_value_t = 60_000)]
    pub webhook_backoff_max_ms: u64,

    /// Bound on one webhook request, seconds.
    #[arg(long, env = "GEOPUSH_WEBHOOK_TIMEOUT_SECONDS", default_value_t = 10.0)]
    pub webhook_timeout_seconds: f64,

    /// Events read from the stream at once.
    #[arg(long, env = "GEOPUSH_WEBHOOK_BATCH", default_value_t = 64)]
    pub webhook_batch: usize,

    /// Events delivered concurrently.
    #[arg(long, env = "GEOPUSH_WEBHOOK_CONCURRENCY", default_value_t = 16)]
    pub webhook_concurrency: usize,

    /// Events pending this long with a consumer (a worker that died) are taken over,
    /// seconds.
    #[arg(
        long,
        env = "GEOPUSH_WEBHOOK_CLAIM_IDLE_SECONDS",
        default_value_t = 60.0
    )]
    pub webhook_claim_idle_seconds: f64,
}

impl WorkerConfig {
    /// Check every value once; the worker refuses to start on an error.
    pub fn validate(&self) -> Result<(), ConfigError> {
        positive_seconds("handshake_timeout_seconds", self.handshake_timeout_seconds)?;
        positive_seconds("shutdown_grace_seconds", self.shutdown_grace_seconds)?;
        positive_seconds(
            "webhook_timeout_seconds",
            self.webhooks.webhook_timeout_seconds,
        )?;
        positive_seconds(
            "webhook_claim_idle_seconds",
            self.webhooks.webhook_claim_idle_seconds,
        )?;
        self.redis()?;
        if self.inbox_len == 0 {
            return Err(ConfigError {
                field: "inbox_len",
                reason: "must be at least 1".into(),
            });
        }
        if !self.webhooks.webhook_urls.is_empty() && self.webhooks.webhook_secret.is_none() {
            return Err(ConfigError {
                field: "webhook_secret",
                reason: "webhook URLs need a signing secret".into(),
            });
        }
        self.tokens.validate()?;
        self.api.validate()
    }

    /// The Redis URL(s); the worker has no in-memory mode.
    pub fn redis(&self) -> Result<&str, ConfigError> {
        match self.redis_url.as_ref().map(|url| url.as_str().trim()) {
            Some(url) if !url.is_empty() => Ok(url),
            _ => Err(ConfigError {
                field: "redis_url",
                reason: "the worker needs Redis (GEOPUSH_REDIS_URL); without Redis run \
                         geopush-gateway, which serves this API in single-node mode"
                    .into(),
            }),
        }
    }

    pub fn handshake_timeout(&self) -> Duration {
        Duration::from_secs_f64(self.handshake_timeout_seconds)
    }
    pub fn shutdown_grace(&self) -> Duration {
        Duration::from_secs_f64(self.shutdown_grace_seconds)
    }
}
