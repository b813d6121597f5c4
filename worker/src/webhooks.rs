//! Geofence-event webhooks: the dispatcher that delivers the `gp:events` stream to backend
//! URLs, signed, with retries, a dead-letter stream and crash recovery.
//!
//! # Reading the stream
//!
//! Every worker replica is one consumer of the consumer group [`WEBHOOK_GROUP`] on
//! [`Keys::events`], so each new entry goes to exactly one replica. The group is created with
//! `XGROUP CREATE <events> geopush-webhooks 0 MKSTREAM`: a fresh group starts at `0`, the
//! beginning of the stream, so events the gateways wrote before the first worker started
//! are delivered too (the stream keeps about 100 000 entries). An operator who wants a new
//! deployment to start from "now" instead creates the group before the first start, with
//! `$` in place of `0`; an existing group is left as it is (`BUSYGROUP` is not an error).
//! If Redis comes back empty (a restart without persistence) the group is created again.
//!
//! Entries are read with `XREADGROUP … BLOCK 1000 … >` on a Redis connection of the
//! dispatcher's own, and never more than can start at once: each event holds one of
//! `concurrency` permits from the moment it is read until it is acknowledged, so a URL that
//! keeps failing slows down only the events waiting on it.
//!
//! # One event
//!
//! The entry becomes a JSON body (below) that is POSTed to every configured URL
//! concurrently. A 2xx answer is a success; any other status, a transport error or a
//! request that takes longer than `request_timeout` is retried after an exponential backoff
//! with full jitter (a random delay in `[0, min(backoff_max, backoff_base · 2^(n-1))]` after
//! the n-th failure), up to `max_attempts` attempts per URL. Redirects are not followed:
//! a 3xx is a failure. A URL that failed `max_attempts` times gets an entry in the
//! dead-letter stream [`Keys::events_dead_letter`] (capped near [`DEAD_LETTER_STREAM_LEN`]
//! entries) with the fields `id` (the event's stream id), `url`, `attempts`, `error` (the
//! last failure) and the event's own fields. The stream entry is acknowledged (`XACK`)
//! only once every URL succeeded or was dead-lettered. An entry that does not hold a
//! geofence event (a missing or unparsable field) is dead-lettered at once without a `url`,
//! with `attempts` 0, and acknowledged.
//!
//! # Crash recovery
//!
//! Entries stay in the group's pending list until acknowledged. Every `claim_idle / 2` a
//! dispatcher runs `XAUTOCLAIM` for entries idle longer than `claim_idle`: the events of a
//! replica that died (or was stopped mid-delivery) are taken over and delivered by another
//! one, or by the same consumer after its restart. A live dispatcher keeps its own events
//! from looking idle: while an event is in flight (including its retry sleeps) the
//! dispatcher re-claims it to itself every `claim_idle / 3` (`XCLAIM … JUSTID`, which resets
//! the idle time without counting a delivery), so a slow receiver does not make two
//! replicas deliver the same event.
//!
//! # Delivery semantics
//!
//! At least once per URL, in no particular order (events are delivered concurrently and
//! retried independently). In the normal case every event reaches every URL once. It can
//! arrive twice when a dispatcher stops or dies after a receiver got the request but before
//! the entry was acknowledged (the pending entry is delivered again, to every URL), or when
//! a dispatcher cannot reach Redis for longer than `claim_idle` while it delivers. Every
//! request of one event carries the same `X-Geopush-Event-Id`: receivers deduplicate on it.
//!
//! # The request
//!
//! ```text
//! POST <url>
//! Content-Type: application/json
//! User-Agent: geopush-webhooks/<version>
//! X-Geopush-Event-Id: 1718000000000-0
//! X-Geopush-Timestamp: 1718000000
//! X-Geopush-Signature: v1=5257a869e7ecebeda32affa62cdca3fa51cad7e77a0e56ff536d0ce8e108d8bd
//!
//! {"id":"1718000000000-0","type":"geofence.enter","user":"u1","device":"d1",
//!  "place":"cafe-17","ts":1717999999512,"lat":52.52,"lon":13.405}
//! ```
//!
//! `id` is the event's stream id (also in `X-Geopush-Event-Id`); `type` is
//! `geofence.enter`, `geofence.exit` or `geofence.dwell`; `ts` is the Unix time in
//! milliseconds of the fix that caused the event (the server's clock for `dwell`); `lat` and
//! `lon` are where the device was. The body is on one line.
//!
//! `X-Geopush-Timestamp` is the Unix time in seconds when this attempt was sent (every
//! retry is signed afresh), and `X-Geopush-Signature` is `v1=` followed by the lowercase hex
//! HMAC-SHA256, keyed with the shared secret, of the timestamp header's text, a `.`, and the
//! raw body bytes ([`sign`]).
//!
//! # Checking a request (receivers)
//!
//! 1. Take the raw body bytes as received: do not parse and re-serialize before checking.
//! 2. Read `X-Geopush-Timestamp` (decimal Unix seconds). Reject the request when it is more
//!    than 5 minutes away from your clock, in either direction: this is the replay
//!    protection, as a captured request stops being accepted after that window.
//! 3. Compute `hex(HMAC-SHA256(secret, timestamp + "." + body))` and compare it, in
//!    constant time, with the value after `v1=` in `X-Geopush-Signature`. The header may
//!    hold several comma-separated `v1=` values (for a secret rotation); accept if any
//!    matches. Reject otherwise.
//! 4. Deduplicate on `X-Geopush-Event-Id`, remembering ids for longer than the retry span.
//! 5. Answer 2xx promptly, within the dispatcher's request timeout; process the event
//!    afterwards. Any other answer makes the dispatcher retry.
//!
//! [`verify`] does steps 2 and 3 for Rust receivers.

use bytes::Bytes;
use geopush_gateway::bus::redis::{Conn, RedisTarget, connect};
use geopush_proto::bus::Keys;
use hmac::{Hmac, Mac};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use rand::Rng;
use redis::streams::{StreamAutoClaimReply, StreamId, StreamReadReply};
use redis::{RedisError, Value};
use serde::Serialize;
use sha2::Sha256;
use std::collections::{HashMap, HashSet};
use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

/// The consumer group of the webhook dispatchers on the events stream.
pub const WEBHOOK_GROUP: &str = "geopush-webhooks";
/// Entries the dead-letter stream keeps (approximately: `MAXLEN ~`).
pub const DEAD_LETTER_STREAM_LEN: usize = 10_000;
/// How long one `XREADGROUP` blocks. Well below the Redis connection's 5 s response
/// timeout, and the longest a stop waits for a read.
pub const READ_BLOCK: Duration = Duration::from_millis(1_000);
/// The replay window receivers should allow (and [`verify`] takes as `tolerance_s`).
pub const DEFAULT_TOLERANCE_S: i64 = 300;
/// The shortest shared secret [`WebhookConfig::validate`] accepts, in bytes.
pub const MIN_SECRET_LEN: usize = 16;
/// The shortest `claim_idle` accepted: in-flight events are re-claimed every third of it.
pub const MIN_CLAIM_IDLE: Duration = Duration::from_millis(100);

/// Default attempts per URL before an event is dead-lettered.
pub const DEFAULT_MAX_ATTEMPTS: u32 = 8;
/// Default backoff after the first failure (the ceiling of its jitter).
pub const DEFAULT_BACKOFF_BASE: Duration = Duration::from_millis(500);
/// Default cap of the backoff between two attempts.
pub const DEFAULT_BACKOFF_MAX: Duration = Duration::from_secs(60);
/// Default bound on one HTTP request, connection included.
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Default most entries read at once.
pub const DEFAULT_BATCH: usize = 64;
/// Default most events in flight at once (per replica).
pub const DEFAULT_CONCURRENCY: usize = 32;
/// Default idle time after which another replica takes over a pending event.
pub const DEFAULT_CLAIM_IDLE: Duration = Duration::from_secs(30);

/// The header carrying the event's stream id (for receiver dedupe).
pub const HEADER_EVENT_ID: &str = "X-Geopush-Event-Id";
/// The header carrying the Unix seconds the signature covers.
pub const HEADER_TIMESTAMP: &str = "X-Geopush-Timestamp";
/// The header carrying `v1=<hex HMAC-SHA256>`.
pub const HEADER_SIGNATURE: &str = "X-Geopush-Signature";

/// Bounds on the pause between two tries of a failing Redis operation.
const REDIS_BACKOFF_MIN: Duration = Duration::from_millis(100);
const REDIS_BACKOFF_MAX: Duration = Duration::from_secs(5);
/// The signature scheme's prefix in [`HEADER_SIGNATURE`].
const SIGNATURE_PREFIX: &str = "v1=";
/// Most digits of a timestamp header (Unix seconds stay below this for millennia).
const MAX_TIMESTAMP_DIGITS: usize = 12;

type HmacSha256 = Hmac<Sha256>;

/// Why the dispatcher cannot run. Redis being away is not one: it is waited out.
#[derive(Debug, thiserror::Error)]
pub enum WebhookError {
    #[error("invalid webhook config: {0}")]
    Config(String),
    #[error("invalid webhook URL {url:?}: {reason}")]
    Url { url: String, reason: String },
    #[error("cannot build the webhook HTTP client")]
    Client(#[source] reqwest::Error),
}

/// Why [`verify`] rejected a request.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SignatureError {
    #[error("the timestamp header is not a Unix time in seconds")]
    BadTimestamp,
    #[error("the timestamp is {age_s} s away from now, beyond the tolerance")]
    Stale { age_s: u64 },
    #[error("the signature header holds no v1 signature")]
    MissingSignature,
    #[error("the signature does not match")]
    Mismatch,
}

/// What the dispatcher delivers, where, and its bounds.
#[derive(Clone)]
pub struct WebhookConfig {
    /// Every event goes to each of these (http or https).
    pub urls: Vec<String>,
    /// The HMAC key the requests are signed with (at least [`MIN_SECRET_LEN`] bytes).
    pub secret: Vec<u8>,
    /// Attempts per URL and event, the first included (at least 1).
    pub max_attempts: u32,
    /// The backoff ceiling after the first failure; it doubles after each further one.
    pub backoff_base: Duration,
    /// The most the backoff ceiling grows to.
    pub backoff_max: Duration,
    /// Bound on one HTTP request, from connecting to the end of the response headers.
    pub request_timeout: Duration,
    /// This replica's consumer name in the group: stable across restarts, unique per replica.
    pub consumer: String,
    /// Most entries read (or claimed) with one command.
    pub batch: usize,
    /// Most events in flight at once in this replica.
    pub concurrency: usize,
    /// A pending event idle this long is taken over by whichever replica claims next.
    pub claim_idle: Duration,
}

impl fmt::Debug for WebhookConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let urls: Vec<String> = self.urls.iter().map(|u| redact(u)).collect();
        f.debug_struct("WebhookConfig")
            .field("urls", &urls)
            .field("secret", &"***")
            .field("max_attempts", &self.max_attempts)
            .field("backoff_base", &self.backoff_base)
            .field("backoff_max", &self.backoff_max)
            .field("request_timeout", &self.request_timeout)
            .field("consumer", &self.consumer)
            .field("batch", &self.batch)
            .field("concurrency", &self.concurrency)
            .field("claim_idle", &self.claim_idle)
            .finish()
    }
}

impl WebhookConfig {
    /// A config with the default bounds (the `DEFAULT_…` constants).
    pub fn new(urls: Vec<String>, secret: Vec<u8>, consumer: impl Into<String>) -> WebhookConfig {
        WebhookConfig {
            urls,
            secret,
            max_attempts: DEFAULT_MAX_ATTEMPTS,
            backoff_base: DEFAULT_BACKOFF_BASE,
            backoff_max: DEFAULT_BACKOFF_MAX,
            request_timeout: DEFAULT_REQUEST_TIMEOUT,
            consumer: consumer.into(),
            batch: DEFAULT_BATCH,
            concurrency: DEFAULT_CONCURRENCY,
            claim_idle: DEFAULT_CLAIM_IDLE,
        }
    }

    /// Check every field; [`run_webhooks`] refuses to start with an invalid config.
    pub fn validate(&self) -> Result<(), WebhookError> {
        let invalid = |what: &str| Err(WebhookError::Config(what.to_owned()));
        if self.urls.is_empty() {
            return invalid("no webhook URL");
        }
        let mut seen = HashSet::new();
        for url in &self.urls {
            let bad = |reason: &str| WebhookError::Url {
                url: redact(url),
                reason: reason.to_owned(),
            };
            let parsed = reqwest::Url::parse(url).map_err(|e| bad(&e.to_string()))?;
            if !matches!(parsed.scheme(), "http" | "https") {
                return Err(bad("the scheme must be http or https"));
            }
            if parsed.host_str().is_none_or(str::is_empty) {
                return Err(bad("no host"));
            }
            if !seen.insert(parsed) {
                return Err(bad("listed twice (every event would be sent to it twice)"));
            }
        }
        if self.secret.len() < MIN_SECRET_LEN {
            return invalid(&format!(
                "the secret must be at least {MIN_SECRET_LEN} bytes"
            ));
        }
        if self.max_attempts == 0 {
            return invalid("max_attempts must be at least 1");
        }
        if self.backoff_base.is_zero() {
            return invalid("backoff_base must be positive");
        }
        if self.backoff_max < self.backoff_base {
            return invalid("backoff_max must be at least backoff_base");
        }
        if self.request_timeout.is_zero() {
            return invalid("request_timeout must be positive");
        }
        if self.consumer.trim().is_empty() {
            return invalid("the consumer name is empty");
        }
        if self.batch == 0 {
            return invalid("batch must be at least 1");
        }
        if self.concurrency == 0 {
            return invalid("concurrency must be at least 1");
        }
        if self.claim_idle < MIN_CLAIM_IDLE {
            return invalid(&format!("claim_idle must be at least {MIN_CLAIM_IDLE:?}"));
        }
        Ok(())
    }
}

/// A URL without credentials, query or fragment, for logs.
fn redact(url: &str) -> String {
    match reqwest::Url::parse(url) {
        Ok(mut parsed) => {
            let _ = parsed.set_username("");
            let _ = parsed.set_password(None);
            parsed.set_query(None);
            parsed.set_fragment(None);
            parsed.to_string()
        }
        Err(_) => "<not a URL>".to_owned(),
    }
}

/// The outcome of one delivery attempt (or of an event that could not be attempted).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabel {
    pub outcome: &'static str,
}

/// A 2xx answer.
pub const OUTCOME_OK: &str = "ok";
/// A failed attempt that will be retried.
pub const OUTCOME_RETRY: &str = "retry";
/// A failed last attempt: the event is dead-lettered for that URL.
pub const OUTCOME_DEAD: &str = "dead";
/// An entry that is not a geofence event: dead-lettered without a request.
pub const OUTCOME_ERROR: &str = "error";

/// The dispatcher's metrics; clones share the counters.
#[derive(Clone, Debug, Default)]
pub struct WebhookMetrics {
    /// `geopush_webhook_attempts_total{outcome}`: [`OUTCOME_OK`], [`OUTCOME_RETRY`],
    /// [`OUTCOME_DEAD`] (one per request), and [`OUTCOME_ERROR`] (one per malformed entry).
    pub attempts: Family<OutcomeLabel, Counter>,
}

impl WebhookMetrics {
    /// Register under `geopush_webhook_attempts` (exported as `…_total`), with every
    /// outcome present from the start.
    pub fn register(&self, registry: &mut Registry) {
        for outcome in [OUTCOME_OK, OUTCOME_RETRY, OUTCOME_DEAD, OUTCOME_ERROR] {
            let _ = self.attempts.get_or_create(&OutcomeLabel { outcome });
        }
        registry.register(
            "geopush_webhook_attempts",
            "Webhook delivery attempts by outcome",
            self.attempts.clone(),
        );
    }

    /// The count of one outcome.
    pub fn count(&self, outcome: &'static str) -> u64 {
        self.attempts.get_or_create(&OutcomeLabel { outcome }).get()
    }

    fn inc(&self, outcome: &'static str) {
        self.attempts.get_or_create(&OutcomeLabel { outcome }).inc();
    }
}

fn hmac_of(secret: &[u8], timestamp: &str, body: &[u8]) -> HmacSha256 {
    #[allow(clippy::expect_used)]
    let mut mac =
        HmacSha256::new_from_slice(secret).expect("HMAC-SHA256 takes a key of any length");
    mac.update(timestamp.as_bytes());
    mac.update(b".");
    mac.update(body);
    mac
}

/// The [`HEADER_SIGNATURE`] value of a request: `v1=` and the lowercase hex
/// HMAC-SHA256(`secret`, `"<timestamp>.<body>"`).
pub fn sign(secret: &[u8], timestamp: i64, body: &[u8]) -> String {
    let mac = hmac_of(secret, &timestamp.to_string(), body);
    format!(
        "{SIGNATURE_PREFIX}{}",
        hex::encode(mac.finalize().into_bytes())
    )
}

/// Check a request as a receiver: the timestamp is within `tolerance_s` of `now_unix_s`
/// (either way: the replay protection), and one of the `v1=` signatures in
/// `signature_header` (comma-separated) is the HMAC of `"<timestamp_header>.<body>"`,
/// compared in constant time.
pub fn verify(
    secret: &[u8],
    timestamp_header: &str,
    signature_header: &str,
    body: &[u8],
    now_unix_s: i64,
    tolerance_s: i64,
) -> Result<(), SignatureError> {
    let digits = timestamp_header.trim();
    if digits.is_empty()
        || digits.len() > MAX_TIMESTAMP_DIGITS
        || !digits.bytes().all(|b| b.is_ascii_digit())
    {
        return Err(SignatureError::BadTimestamp);
    }
    let timestamp: i64 = digits.parse().map_err(|_| SignatureError::BadTimestamp)?;
    let age_s = now_unix_s.abs_diff(timestamp);
    if age_s > tolerance_s.max(0).unsigned_abs() {
        return Err(SignatureError::Stale { age_s });
    }
    let mut seen_any = false;
    for candidate in signature_header.split(',') {
        let Some(hex_mac) = candidate.trim().strip_prefix(SIGNATURE_PREFIX) else {
            continue;
        };
        let Ok(claimed) = hex::decode(hex_mac) else {
            continue;
        };
        seen_any = true;
        if hmac_of(secret, digits, body).verify_slice(&claimed).is_ok() {
            return Ok(());
        }
    }
    Err(if seen_any {
        SignatureError::Mismatch
    } else {
        SignatureError::MissingSignature
    })
}

/// The ceiling of the backoff after `failures` failed attempts (at least 1):
/// `min(max, base · 2^(failures-1))`.
pub fn backoff_ceiling(base: Duration, max: Duration, failures: u32) -> Duration {
    let doublings = failures.saturating_sub(1).min(31);
    base.saturating_mul(1u32 << doublings).min(max)
}

/// The backoff after `failures` failed attempts, with full jitter: uniform in
/// `[0, backoff_ceiling(base, max, failures)]`.
pub fn backoff_delay(base: Duration, max: Duration, failures: u32, rng: &mut impl Rng) -> Duration {
    let ceiling = backoff_ceiling(base, max, failures);
    let micros = u64::try_from(ceiling.as_micros()).unwrap_or(u64::MAX);
    Duration::from_micros(rng.gen_range(0..=micros))
}

fn unix_now_s() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// The JSON body of a geofence event (see the module docs).
#[derive(Serialize)]
struct EventBody<'a> {
    id: &'a str,
    #[serde(rename = "type")]
    kind: &'static str,
    user: &'a str,
    device: &'a str,
    place: &'a str,
    ts: i64,
    lat: f64,
    lon: f64,
}

/// A stream entry's fields as text (a non-text value is left out).
fn entry_fields(map: &HashMap<String, Value>) -> HashMap<String, String> {
    map.iter()
        .filter_map(|(name, value)| {
            let text = match value {
                Value::BulkString(bytes) => String::from_utf8(bytes.clone()).ok()?,
                Value::SimpleString(s) => s.clone(),
                Value::Int(i) => i.to_string(),
                _ => return None,
            };
            Some((name.clone(), text))
        })
        .collect()
}

/// The request body of the entry `id`, or why the entry is not a geofence event.
fn event_body(id: &str, fields: &HashMap<String, String>) -> Result<Vec<u8>, String> {
    let text = |name: &str| {
        fields
            .get(name)
            .map(String::as_str)
            .ok_or_else(|| format!("no {name:?} field"))
    };
    let number = |name: &str| -> Result<f64, String> {
        text(name)?
            .parse::<f64>()
            .ok()
            .filter(|n| n.is_finite())
            .ok_or_else(|| format!("{name:?} is not a number"))
    };
    let kind = match text("event")? {
        "enter" => "geofence.enter",
        "exit" => "geofence.exit",
        "dwell" => "geofence.dwell",
        other => return Err(format!("unknown event kind {other:?}")),
    };
    let body = EventBody {
        id,
        kind,
        user: text("user")?,
        device: text("device")?,
        place: text("place")?,
        ts: text("ts")?
            .parse()
            .map_err(|_| "\"ts\" is not an integer".to_owned())?,
        lat: number("lat")?,
        lon: number("lon")?,
    };
    serde_json::to_vec(&body).map_err(|e| e.to_string())
}

/// An error and its sources on one line (reqwest's own message omits the cause).
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

fn is_no_group(error: &RedisError) -> bool {
    error.code() == Some("NOGROUP")
}

/// How one URL fared with one event.
enum UrlOutcome {
    Delivered,
    Failed {
        url: Arc<str>,
        attempts: u32,
        error: String,
    },
    /// The dispatcher was stopped first; the event stays pending.
    Stopped,
}

/// Deliver geofence events from the events stream to the configured webhooks until `stop`
/// is cancelled (see the module docs). Redis being unreachable, now or later, is logged and
/// retried with a backoff; only an invalid config or HTTP client fails.
///
/// # Cancel safety
///
/// Stop it with `stop`: it returns within about one [`READ_BLOCK`]. In-flight requests and
/// retry sleeps are abandoned; their events stay pending and are claimed again after
/// `claim_idle`. Dropping the future has the same effect on the tasks it spawned.
pub async fn run_webhooks(
    target: RedisTarget,
    keys: Keys,
    config: WebhookConfig,
    metrics: WebhookMetrics,
    stop: CancellationToken,
) -> Result<(), WebhookError> {
    config.validate()?;
    let client = reqwest::Client::builder()
        .timeout(config.request_timeout)
        .connect_timeout(config.request_timeout)
        .redirect(reqwest::redirect::Policy::none())
        .user_agent(concat!("geopush-webhooks/", env!("CARGO_PKG_VERSION")))
        .pool_max_idle_per_host(config.concurrency)
        .build()
        .map_err(WebhookError::Client)?;
    // A child token: dropping this future cancels the tasks it spawned too.
    let stop = stop.child_token();
    let _stop_on_drop = stop.clone().drop_guard();

    let Some(mut reader) = connect_until_stopped(&target, &stop).await else {
        return Ok(());
    };
    let Some(commands) = connect_until_stopped(&target, &stop).await else {
        return Ok(());
    };
    info!(
        consumer = %config.consumer,
        urls = config.urls.len(),
        group = WEBHOOK_GROUP,
        "webhook dispatcher started"
    );
    let dispatcher = Arc::new(Dispatcher {
        stream: keys.events(),
        dead_letter: keys.events_dead_letter(),
        urls: config.urls.iter().map(|u| Arc::from(u.as_str())).collect(),
        config,
        client,
        metrics,
        commands,
        in_flight: Mutex::new(HashSet::new()),
        stop,
    });
    let tasks = TaskTracker::new();
    tasks.spawn(dispatcher.clone().keep_in_flight_claimed());
    dispatcher.read_and_dispatch(&mut reader, &tasks).await;
    tasks.close();
    tasks.wait().await;
    info!(consumer = %dispatcher.config.consumer, "webhook dispatcher stopped");
    Ok(())
}

/// Open a connection, retrying with a backoff; `None` once stopped.
async fn connect_until_stopped(target: &RedisTarget, stop: &CancellationToken) -> Option<Conn> {
    let mut backoff = REDIS_BACKOFF_MIN;
    loop {
        let attempt = tokio::select! {
            attempt = connect(target, None) => attempt,
            () = stop.cancelled() => return None,
        };
        match attempt {
            Ok(conn) => return Some(conn),
            Err(e) => warn!(error = %e, "webhook dispatcher cannot reach Redis; retrying"),
        }
        if !pause(&mut backoff, stop).await {
            return None;
        }
    }
}

/// Sleep a jittered `backoff` and double it (up to a cap); `false` once stopped.
async fn pause(backoff: &mut Duration, stop: &CancellationToken) -> bool {
    let delay = {
        let mut rng = rand::thread_rng();
        backoff.mul_f64(rng.gen_range(0.5..=1.0))
    };
    *backoff = (*backoff * 2).min(REDIS_BACKOFF_MAX);
    tokio::select! {
        () = tokio::time::sleep(delay) => true,
        () = stop.cancelled() => false,
    }
}

struct Dispatcher {
    stream: String,
    dead_letter: String,
    urls: Vec<Arc<str>>,
    config: WebhookConfig,
    client: reqwest::Client,
    metrics: WebhookMetrics,
    /// Acks, dead letters, claims (the reader has its own connection for the blocking read).
    commands: Conn,
    /// Ids of the events this replica is working on.
    in_flight: Mutex<HashSet<String>>,
    stop: CancellationToken,
}

/// Removes an event from the in-flight set when its task ends, however it ends.
struct InFlight {
    dispatcher: Arc<Dispatcher>,
    id: String,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.dispatcher.in_flight_set().remove(&self.id);
    }
}

impl Dispatcher {
    fn in_flight_set(&self) -> std::sync::MutexGuard<'_, HashSet<String>> {
        self.in_flight.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The reading loop: create the group, then alternate reads with periodic claims of
    /// idle entries, each limited to the free permits, until stopped.
    async fn read_and_dispatch(self: &Arc<Self>, reader: &mut Conn, tasks: &TaskTracker) {
        let permits = Arc::new(Semaphore::new(self.config.concurrency));
        let claim_every = (self.config.claim_idle / 2).max(MIN_CLAIM_IDLE / 2);
        let mut backoff = REDIS_BACKOFF_MIN;
        let mut group_ready = false;
        let mut claim_cursor = "0-0".to_owned();
        let mut next_claim = Instant::now();
        while !self.stop.is_cancelled() {
            if !group_ready {
                match self.create_group().await {
                    Ok(()) => group_ready = true,
                    Err(e) => {
                        warn!(error = %e, "cannot create the webhook consumer group; retrying");
                        if !pause(&mut backoff, &self.stop).await {
                            return;
                        }
                        continue;
                    }
                }
            }
            let first = tokio::select! {
                permit = permits.clone().acquire_owned() => match permit {
                    Ok(permit) => permit,
                    Err(_) => return,
                },
                () = self.stop.cancelled() => return,
            };
            let mut held = vec![first];
            while held.len() < self.config.batch {
                match permits.clone().try_acquire_owned() {
                    Ok(permit) => held.push(permit),
                    Err(_) => break,
                }
            }
            let entries = if Instant::now() >= next_claim {
                let claimed = self.claim_idle_entries(&mut claim_cursor, held.len()).await;
                // A scan that did not reach the end goes on at once.
                next_claim = if claim_cursor == "0-0" {
                    Instant::now() + claim_every
                } else {
                    Instant::now()
                };
                claimed
            } else {
                self.read_new(reader, held.len()).await
            };
            match entries {
                Ok(entries) => {
                    backoff = REDIS_BACKOFF_MIN;
                    for entry in entries {
                        let permit = match held.pop() {
                            Some(permit) => permit,
                            // Redis returned more than asked: wait for room.
                            None => tokio::select! {
                                permit = permits.clone().acquire_owned() => match permit {
                                    Ok(permit) => permit,
                                    Err(_) => return,
                                },
                                () = self.stop.cancelled() => return,
                            },
                        };
                        if !self.in_flight_set().insert(entry.id.clone()) {
                            continue;
                        }
                        let guard = InFlight {
                            dispatcher: self.clone(),
                            id: entry.id.clone(),
                        };
                        tasks.spawn(self.clone().handle(entry, guard, permit));
                    }
                }
                Err(e) if is_no_group(&e) => {
                    warn!(error = %e, "the webhook consumer group is gone; creating it again");
                    group_ready = false;
                    drop(held);
                    if !pause(&mut backoff, &self.stop).await {
                        return;
                    }
                }
                Err(e) => {
                    warn!(error = %e, "reading geofence events failed; retrying");
                    drop(held);
                    if !pause(&mut backoff, &self.stop).await {
                        return;
                    }
                }
            }
        }
    }

    /// `XGROUP CREATE <events> <group> 0 MKSTREAM`; an existing group is fine.
    async fn create_group(&self) -> Result<(), RedisError> {
        let created = redis::cmd("XGROUP")
            .arg("CREATE")
            .arg(&self.stream)
            .arg(WEBHOOK_GROUP)
            .arg("0")
            .arg("MKSTREAM")
            .query_async::<()>(&mut self.commands.clone())
            .await;
        match created {
            Err(e) if e.code() == Some("BUSYGROUP") => Ok(()),
            Ok(()) => {
                info!(
                    group = WEBHOOK_GROUP,
                    stream = %self.stream,
                    "webhook consumer group created"
                );
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    /// New entries for this consumer (none after [`READ_BLOCK`] without any, or once
    /// stopped: entries a cut-short read took stay pending and are claimed later).
    async fn read_new(&self, reader: &mut Conn, count: usize) -> Result<Vec<StreamId>, RedisError> {
        let mut command = redis::cmd("XREADGROUP");
        command
            .arg("GROUP")
            .arg(WEBHOOK_GROUP)
            .arg(&self.config.consumer)
            .arg("COUNT")
            .arg(count)
            .arg("BLOCK")
            .arg(u64::try_from(READ_BLOCK.as_millis()).unwrap_or(u64::MAX))
            .arg("STREAMS")
            .arg(&self.stream)
            .arg(">");
        let reply = tokio::select! {
            reply = command.query_async::<Option<StreamReadReply>>(reader) => reply?,
            () = self.stop.cancelled() => return Ok(Vec::new()),
        };
        Ok(reply
            .map(|r| r.keys.into_iter().flat_map(|k| k.ids).collect())
            .unwrap_or_default())
    }

    /// Take over entries idle longer than `claim_idle`, whichever consumer held them.
    async fn claim_idle_entries(
        &self,
        cursor: &mut String,
        count: usize,
    ) -> Result<Vec<StreamId>, RedisError> {
        let min_idle_ms = u64::try_from(self.config.claim_idle.as_millis()).unwrap_or(u64::MAX);
        let reply: StreamAutoClaimReply = redis::cmd("XAUTOCLAIM")
            .arg(&self.stream)
            .arg(WEBHOOK_GROUP)
            .arg(&self.config.consumer)
            .arg(min_idle_ms)
            .arg(cursor.as_str())
            .arg("COUNT")
            .arg(count)
            .query_async(&mut self.commands.clone())
            .await?;
        *cursor = reply.next_stream_id;
        if !reply.claimed.is_empty() {
            info!(
                events = reply.claimed.len(),
                consumer = %self.config.consumer,
                "took over pending geofence events"
            );
        }
        Ok(reply.claimed)
    }

    /// Keep this replica's in-flight events from looking idle to the other replicas.
    async fn keep_in_flight_claimed(self: Arc<Self>) {
        let every = (self.config.claim_idle / 3).max(MIN_CLAIM_IDLE / 3);
        let mut ticks = tokio::time::interval(every);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = ticks.tick() => {}
                () = self.stop.cancelled() => return,
            }
            let ids: Vec<String> = self.in_flight_set().iter().cloned().collect();
            if ids.is_empty() {
                continue;
            }
            let mut command = redis::cmd("XCLAIM");
            command
                .arg(&self.stream)
                .arg(WEBHOOK_GROUP)
                .arg(&self.config.consumer)
                .arg(0)
                .arg(&ids)
                .arg("JUSTID");
            let mut conn = self.commands.clone();
            let result = tokio::select! {
                result = command.query_async::<Value>(&mut conn) => result,
                () = self.stop.cancelled() => return,
            };
            if let Err(e) = result {
                warn!(error = %e, events = ids.len(), "cannot refresh in-flight geofence events");
            }
        }
    }

    /// Deliver one event to every URL, dead-letter the URLs that failed, then acknowledge.
    async fn handle(
        self: Arc<Self>,
        entry: StreamId,
        _in_flight: InFlight,
        _permit: OwnedSemaphorePermit,
    ) {
        let fields = entry_fields(&entry.map);
        let id = entry.id;
        let body = match event_body(&id, &fields) {
            Ok(body) => Bytes::from(body),
            Err(reason) => {
                warn!(
                    id = %id,
                    reason = %reason,
                    "not a geofence event; dead-lettered without a request"
                );
                self.metrics.inc(OUTCOME_ERROR);
                let error = format!("malformed event: {reason}");
                if self.dead_letter(&id, &fields, None, 0, &error).await {
                    self.ack(&id).await;
                }
                return;
            }
        };
        let event_id: Arc<str> = Arc::from(id.as_str());
        let mut deliveries = JoinSet::new();
        for url in &self.urls {
            deliveries.spawn(
                self.clone()
                    .deliver(url.clone(), event_id.clone(), body.clone()),
            );
        }
        let mut settled = true;
        while let Some(outcome) = deliveries.join_next().await {
            match outcome {
                Ok(UrlOutcome::Delivered) => {}
                Ok(UrlOutcome::Failed {
                    url,
                    attempts,
                    error,
                }) => {
                    settled &= self
                        .dead_letter(&id, &fields, Some(&url), attempts, &error)
                        .await;
                }
                Ok(UrlOutcome::Stopped) => settled = false,
                Err(e) => {
                    warn!(
                        id = %id,
                        error = %e,
                        "a webhook delivery task failed; the event stays pending"
                    );
                    settled = false;
                }
            }
        }
        if settled {
            self.ack(&id).await;
        }
    }

    /// POST the event to one URL until it succeeds, fails `max_attempts` times, or the
    /// dispatcher stops.
    async fn deliver(self: Arc<Self>, url: Arc<str>, id: Arc<str>, body: Bytes) -> UrlOutcome {
        let mut attempts = 0;
        loop {
            attempts += 1;
            let timestamp = unix_now_s();
            let request = self
                .client
                .post(&*url)
                .header(reqwest::header::CONTENT_TYPE, "application/json")
                .header(HEADER_EVENT_ID, &*id)
                .header(HEADER_TIMESTAMP, timestamp.to_string())
                .header(
                    HEADER_SIGNATURE,
                    sign(&self.config.secret, timestamp, &body),
                )
                .body(body.clone())
                .send();
            let answer = tokio::select! {
                answer = request => answer,
                () = self.stop.cancelled() => return UrlOutcome::Stopped,
            };
            let error = match answer {
                Ok(response) if response.status().is_success() => {
                    self.metrics.inc(OUTCOME_OK);
                    debug!(id = %id, url = %redact(&url), attempts, "geofence event delivered");
                    return UrlOutcome::Delivered;
                }
                Ok(response) => format!("HTTP {}", response.status()),
                Err(e) if e.is_timeout() => {
                    format!("timed out after {:?}", self.config.request_timeout)
                }
                Err(e) => error_chain(&e),
            };
            if attempts >= self.config.max_attempts {
                self.metrics.inc(OUTCOME_DEAD);
                warn!(
                    id = %id,
                    url = %redact(&url),
                    attempts,
                    error = %error,
                    "geofence event dead-lettered: the webhook kept failing"
                );
                return UrlOutcome::Failed {
                    url,
                    attempts,
                    error,
                };
            }
            self.metrics.inc(OUTCOME_RETRY);
            let delay = {
                let mut rng = rand::thread_rng();
                backoff_delay(
                    self.config.backoff_base,
                    self.config.backoff_max,
                    attempts,
                    &mut rng,
                )
            };
            debug!(
                id = %id,
                url = %redact(&url),
                attempts,
                error = %error,
                ?delay,
                "webhook attempt failed; retrying"
            );
            tokio::select! {
                () = tokio::time::sleep(delay) => {}
                () = self.stop.cancelled() => return UrlOutcome::Stopped,
            }
        }
    }

    /// Append a dead letter; `false` if it could not be written before the stop (the event
    /// then stays pending, to be delivered again).
    async fn dead_letter(
        &self,
        id: &str,
        fields: &HashMap<String, String>,
        url: Option<&str>,
        attempts: u32,
        error: &str,
    ) -> bool {
        let mut command = redis::cmd("XADD");
        command
            .arg(&self.dead_letter)
            .arg("MAXLEN")
            .arg("~")
            .arg(DEAD_LETTER_STREAM_LEN)
            .arg("*")
            .arg("id")
            .arg(id);
        if let Some(url) = url {
            command.arg("url").arg(url);
        }
        command
            .arg("attempts")
            .arg(attempts)
            .arg("error")
            .arg(error);
        let mut names: Vec<&String> = fields.keys().collect();
        names.sort();
        for name in names {
            if !matches!(name.as_str(), "id" | "url" | "attempts" | "error") {
                command.arg(name).arg(&fields[name]);
            }
        }
        self.retry_redis("writing a dead letter", id, &command)
            .await
    }

    /// `XACK` the entry (or leave it pending if the dispatcher stops first).
    async fn ack(&self, id: &str) {
        let mut command = redis::cmd("XACK");
        command.arg(&self.stream).arg(WEBHOOK_GROUP).arg(id);
        if self.retry_redis("acknowledging", id, &command).await {
            debug!(id = %id, "geofence event acknowledged");
        }
    }

    /// Run a command until it succeeds; `false` if the dispatcher stopped first.
    async fn retry_redis(&self, what: &str, id: &str, command: &redis::Cmd) -> bool {
        let mut backoff = REDIS_BACKOFF_MIN;
        loop {
            match command
                .query_async::<Value>(&mut self.commands.clone())
                .await
            {
                Ok(_) => return true,
                Err(e) => warn!(id = %id, error = %e, "{what} a geofence event failed; retrying"),
            }
            if !pause(&mut backoff, &self.stop).await {
                return false;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand::rngs::StdRng;

    const SECRET: &[u8] = b"0123456789abcdef-test-secret";
    const BODY: &[u8] = br#"{"id":"1-0","type":"geofence.enter"}"#;
    const NOW: i64 = 1_718_000_000;

    #[test]
    fn a_signature_verifies_with_its_secret_body_and_timestamp() {
        let signature = sign(SECRET, NOW, BODY);
        assert!(signature.starts_with("v1="));
        assert_eq!(signature.len(), 3 + 64);
        assert_eq!(
            verify(SECRET, &NOW.to_string(), &signature, BODY, NOW, 300),
            Ok(())
        );
        // Within the tolerance either way.
        assert_eq!(
            verify(SECRET, &NOW.to_string(), &signature, BODY, NOW + 300, 300),
            Ok(())
        );
        assert_eq!(
            verify(SECRET, &NOW.to_string(), &signature, BODY, NOW - 300, 300),
            Ok(())
        );
    }

    #[test]
    fn the_signature_is_hmac_sha256_of_timestamp_dot_body() {
        // printf '%s' '1718000000.{"id":"1-0","type":"geofence.enter"}' |
        //   openssl dgst -sha256 -hmac '0123456789abcdef-test-secret'
        assert_eq!(
            sign(SECRET, NOW, BODY),
            "v1=c2a52ecb08dfd35f5cd3d1dc28ca52f131b600eb59a34785a3218b7b875860e5"
        );
    }

    #[test]
    fn a_tampered_body_or_another_secret_is_a_mismatch() {
        let signature = sign(SECRET, NOW, BODY);
        let ts = NOW.to_string();
        let tampered = br#"{"id":"1-0","type":"geofence.exit"}"#;
        assert_eq!(
            verify(SECRET, &ts, &signature, tampered, NOW, 300),
            Err(SignatureError::Mismatch)
        );
        assert_eq!(
            verify(b"another-secret-of-16+", &ts, &signature, BODY, NOW, 300),
            Err(SignatureError::Mismatch)
        );
        // The timestamp is covered too: a replay with a fresh timestamp fails.
        let later = (NOW + 10).to_string();
        assert_eq!(
            verify(SECRET, &later, &signature, BODY, NOW + 10, 300),
            Err(SignatureError::Mismatch)
        );
    }

    #[test]
    fn a_stale_or_future_timestamp_is_rejected() {
        let signature = sign(SECRET, NOW, BODY);
        let ts = NOW.to_string();
        assert_eq!(
            verify(SECRET, &ts, &signature, BODY, NOW + 301, 300),
            Err(SignatureError::Stale { age_s: 301 })
        );
        assert_eq!(
            verify(SECRET, &ts, &signature, BODY, NOW - 301, 300),
            Err(SignatureError::Stale { age_s: 301 })
        );
    }

    #[test]
    fn malformed_headers_are_rejected() {
        let signature = sign(SECRET, NOW, BODY);
        for bad in [
            "",
            "abc",
            "-5",
            "1.5",
            "99999999999999999999",
            "+1718000000",
        ] {
            assert_eq!(
                verify(SECRET, bad, &signature, BODY, NOW, 300),
                Err(SignatureError::BadTimestamp),
                "{bad:?}"
            );
        }
        let ts = NOW.to_string();
        for bad in ["", "v0=abcd", "sha256=00", "v1=not-hex"] {
            assert_eq!(
                verify(SECRET, &ts, bad, BODY, NOW, 300),
                Err(SignatureError::MissingSignature),
                "{bad:?}"
            );
        }
        assert_eq!(
            verify(SECRET, &ts, "v1=00ff", BODY, NOW, 300),
            Err(SignatureError::Mismatch)
        );
    }

    #[test]
    fn any_of_several_signatures_may_match() {
        let good = sign(SECRET, NOW, BODY);
        let old = sign(b"the-previous-secret!", NOW, BODY);
        let header = format!("{old}, {good}");
        assert_eq!(
            verify(SECRET, &NOW.to_string(), &header, BODY, NOW, 300),
            Ok(())
        );
    }

    #[test]
    fn backoff_ceilings_double_up_to_the_cap() {
        let base = Duration::from_millis(100);
        let max = Duration::from_secs(1);
        let ceilings: Vec<u128> = (1..=6)
            .map(|n| backoff_ceiling(base, max, n).as_millis())
            .collect();
        assert_eq!(ceilings, [100, 200, 400, 800, 1000, 1000]);
        assert_eq!(backoff_ceiling(base, max, 0), base);
        assert_eq!(backoff_ceiling(base, max, u32::MAX), max);
        assert_eq!(
            backoff_ceiling(Duration::from_secs(3600), Duration::MAX, 40),
            Duration::from_secs(3600).saturating_mul(1 << 31)
        );
    }

    #[test]
    fn jittered_backoff_stays_within_zero_and_the_ceiling() {
        let mut rng = StdRng::seed_from_u64(7);
        let base = Duration::from_millis(10);
        let max = Duration::from_millis(250);
        for failures in 1..=10 {
            let ceiling = backoff_ceiling(base, max, failures);
            let delays: Vec<Duration> = (0..2_000)
                .map(|_| backoff_delay(base, max, failures, &mut rng))
                .collect();
            assert!(delays.iter().all(|d| *d <= ceiling), "above {ceiling:?}");
            // Full jitter: the delays spread over the whole range, not around the ceiling.
            assert!(delays.iter().any(|d| *d < ceiling / 4), "{failures}");
            assert!(delays.iter().any(|d| *d > ceiling * 3 / 4), "{failures}");
        }
    }

    fn fields(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    fn gateway_entry() -> HashMap<String, String> {
        fields(&[
            ("user", "u1"),
            ("device", "d1"),
            ("place", "cafe-17"),
            ("event", "enter"),
            ("ts", "1717999999512"),
            ("lat", "52.52"),
            ("lon", "13.405"),
        ])
    }

    #[test]
    fn the_body_carries_the_event() {
        let body = event_body("1718000000000-0", &gateway_entry()).expect("body");
        let text = String::from_utf8(body).expect("utf-8");
        assert_eq!(
            text,
            r#"{"id":"1718000000000-0","type":"geofence.enter","user":"u1","device":"d1","place":"cafe-17","ts":1717999999512,"lat":52.52,"lon":13.405}"#
        );
        for (kind, expected) in [("exit", "geofence.exit"), ("dwell", "geofence.dwell")] {
            let mut entry = gateway_entry();
            entry.insert("event".into(), kind.into());
            let body: serde_json::Value =
                serde_json::from_slice(&event_body("1-0", &entry).expect("body")).expect("json");
            assert_eq!(body["type"], expected);
        }
    }

    #[test]
    fn an_entry_that_is_not_an_event_has_no_body() {
        for (field, value) in [
            ("event", Some("teleport")),
            ("lat", Some("north")),
            ("lon", Some("NaN")),
            ("ts", Some("yesterday")),
            ("user", None),
            ("place", None),
        ] {
            let mut entry = gateway_entry();
            match value {
                Some(v) => entry.insert(field.into(), v.into()),
                None => entry.remove(field),
            };
            assert!(event_body("1-0", &entry).is_err(), "{field} = {value:?}");
        }
    }

    #[test]
    fn entry_fields_keep_text_values() {
        let map: HashMap<String, Value> = [
            ("user".to_owned(), Value::BulkString(b"u1".to_vec())),
            ("bad".to_owned(), Value::BulkString(vec![0xff, 0xfe])),
            ("n".to_owned(), Value::Int(3)),
        ]
        .into_iter()
        .collect();
        let fields = entry_fields(&map);
        assert_eq!(fields.get("user").map(String::as_str), Some("u1"));
        assert_eq!(fields.get("n").map(String::as_str), Some("3"));
        assert!(!fields.contains_key("bad"));
    }

    fn valid() -> WebhookConfig {
        WebhookConfig::new(
            vec![
                "https://backend.example/hooks/geo".into(),
                "http://127.0.0.1:9/x".into(),
            ],
            SECRET.to_vec(),
            "worker-1",
        )
    }

    #[test]
    fn validate_accepts_the_defaults_and_rejects_each_bad_field() {
        assert!(valid().validate().is_ok());
        type Change = fn(&mut WebhookConfig);
        let cases: Vec<(&str, Change)> = vec![
            ("no urls", |c| c.urls.clear()),
            ("relative", |c| c.urls = vec!["/hooks".into()]),
            ("ftp", |c| c.urls = vec!["ftp://example.com/x".into()]),
            ("no host", |c| c.urls = vec!["https://".into()]),
            ("twice", |c| {
                c.urls = vec!["http://a.example/".into(), "http://a.example".into()]
            }),
            ("short secret", |c| c.secret = b"short".to_vec()),
            ("no attempts", |c| c.max_attempts = 0),
            ("zero base", |c| c.backoff_base = Duration::ZERO),
            ("max < base", |c| c.backoff_max = Duration::from_millis(1)),
            ("zero timeout", |c| c.request_timeout = Duration::ZERO),
            ("no consumer", |c| c.consumer = " ".into()),
            ("zero batch", |c| c.batch = 0),
            ("zero concurrency", |c| c.concurrency = 0),
            ("tiny claim_idle", |c| {
                c.claim_idle = Duration::from_millis(5)
            }),
        ];
        for (what, change) in cases {
            let mut config = valid();
            change(&mut config);
            assert!(config.validate().is_err(), "{what} was accepted");
        }
    }

    #[test]
    fn debug_masks_the_secret_and_url_credentials() {
        let mut config = valid();
        config.urls = vec!["https://user:pa55@backend.example/hook?token=s3cret".into()];
        let text = format!("{config:?}");
        assert!(text.contains("***"));
        assert!(!text.contains("test-secret"), "{text}");
        assert!(!text.contains("pa55") && !text.contains("s3cret"), "{text}");
        assert!(text.contains("backend.example/hook"), "{text}");
    }

    #[test]
    fn metrics_register_with_every_outcome() {
        let metrics = WebhookMetrics::default();
        let mut registry = Registry::default();
        metrics.register(&mut registry);
        metrics.inc(OUTCOME_RETRY);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).expect("encode");
        assert!(
            text.contains(r#"geopush_webhook_attempts_total{outcome="retry"} 1"#),
            "{text}"
        );
        assert!(
            text.contains(r#"geopush_webhook_attempts_total{outcome="dead"} 0"#),
            "{text}"
        );
        assert_eq!(metrics.count(OUTCOME_RETRY), 1);
    }
}
