//! The Redis bus: pub/sub between stateless nodes, durable inboxes and ack cursors.
//!
//! Two connections per node: one multiplexed connection for commands, and one RESP3
//! connection for subscriptions whose pushes arrive on a bounded channel (a closure with
//! `try_send`, so a stalled dispatcher cannot grow memory without bound; an overflow makes
//! the node replay every inbox instead). Both reconnect by themselves; the subscription
//! connection resubscribes what it had. With Redis Cluster, sharded pub/sub
//! (`SSUBSCRIBE`/`SPUBLISH`) is used and every key carries a hash tag.
//!
//! Subscriptions are reference-counted: sessions acquire the channels they need (their
//! user, topics, cells) and release them when done; a channel whose count reaches zero is
//! unsubscribed after a linger, so a reconnecting client does not cause churn. New
//! subscriptions are sent in batches by one task.

use super::{BusError, StoredNotification};
use geopush_proto::bus::{Cursor, Keys};
use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster::ClusterClient;
use redis::cluster_async::ClusterConnection;
use redis::{Cmd, Pipeline, PushInfo, RedisFuture, RedisResult, Value};
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{Notify, mpsc};
use tokio::time::Instant;

/// Pushes buffered between the subscription connection and the dispatcher.
pub const PUSH_BUFFER: usize = 65_536;
/// Most channels in one `SUBSCRIBE`.
const SUBSCRIBE_BATCH: usize = 256;

/// A connection to one Redis or to a cluster.
#[derive(Clone)]
pub enum Conn {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Conn::Single(c) => c.req_packed_command(cmd),
            Conn::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Conn::Single(c) => c.req_packed_commands(pipeline, offset, count),
            Conn::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Single(c) => c.get_db(),
            Conn::Cluster(c) => c.get_db(),
        }
    }
}

/// Pushes go to a bounded channel; a full channel is remembered, not waited on.
struct PushSink {
    tx: mpsc::Sender<PushInfo>,
    overflowed: Arc<AtomicBool>,
}

impl redis::aio::AsyncPushSender for PushSink {
    fn send(&self, info: PushInfo) -> Result<(), redis::aio::SendError> {
        self.tx.try_send(info).map_err(|_| {
            self.overflowed.store(true, Ordering::Release);
            redis::aio::SendError
        })
    }
}

/// Where the Redis bus connects.
#[derive(Clone, Debug)]
pub struct RedisTarget {
    /// One URL, or several (a cluster's seed nodes) separated by commas.
    pub urls: Vec<String>,
    pub cluster: bool,
}

impl RedisTarget {
    /// Parse `--redis-url` (comma-separated seeds) and `--redis-cluster`.
    pub fn parse(urls: &str, cluster: bool) -> RedisTarget {
        let urls: Vec<String> = urls
            .split(',')
            .map(str::trim)
            .filter(|u| !u.is_empty())
            .map(str::to_owned)
            .collect();
        let cluster = cluster || urls.len() > 1;
        RedisTarget { urls, cluster }
    }
}

fn with_resp3(url: &str) -> String {
    if url.contains("protocol=") {
        url.to_owned()
    } else if url.contains('?') {
        format!("{url}&protocol=resp3")
    } else {
        format!("{url}?protocol=resp3")
    }
}

fn unavailable(e: impl std::fmt::Display) -> BusError {
    BusError::Unavailable(e.to_string())
}

/// Open a command connection, and optionally a subscription connection with its pushes.
pub async fn connect(
    target: &RedisTarget,
    pushes: Option<PushSinkParts>,
) -> Result<Conn, BusError> {
    let timeout = Duration::from_secs(5);
    if target.cluster {
        let mut builder = ClusterClient::builder(target.urls.iter().map(|u| with_resp3(u)))
            .use_protocol(redis::ProtocolVersion::RESP3)
            .connection_timeout(timeout)
            .response_timeout(timeout);
        if let Some(parts) = pushes {
            builder = builder.push_sender(PushSink {
                tx: parts.tx,
                overflowed: parts.overflowed,
            });
        }
        let client = builder.build().map_err(unavailable)?;
        return client
            .get_async_connection()
            .await
            .map(Conn::Cluster)
            .map_err(unavailable);
    }
    let url = target
        .urls
        .first()
        .ok_or_else(|| BusError::Unavailable("no Redis URL".into()))?;
    let client = redis::Client::open(with_resp3(url)).map_err(unavailable)?;
    let mut config = ConnectionManagerConfig::new()
        .set_connection_timeout(Some(timeout))
        .set_response_timeout(Some(timeout))
        .set_max_delay(Duration::from_secs(2))
        .set_number_of_retries(3);
    if let Some(parts) = pushes {
        config = config
            .set_push_sender(PushSink {
                tx: parts.tx,
                overflowed: parts.overflowed,
            })
            .set_automatic_resubscription();
    }
    client
        .get_connection_manager_with_config(config)
        .await
        .map(Conn::Single)
        .map_err(unavailable)
}

/// The sending side of a push channel, handed to [`connect`].
pub struct PushSinkParts {
    pub tx: mpsc::Sender<PushInfo>,
    pub overflowed: Arc<AtomicBool>,
}

#[derive(Default)]
struct SubscriptionTable {
    /// Sessions holding each channel.
    counts: HashMap<String, usize>,
    /// Channels subscribed on the server (as far as we know).
    subscribed: HashSet<String>,
    /// Channels whose count reached zero, and when they may be unsubscribed.
    lingering: HashMap<String, Instant>,
    /// Channels to subscribe in the next batch.
    wanted: Vec<String>,
}

/// A node's Redis bus.
pub struct RedisBus {
    pub keys: Keys,
    commands: Conn,
    pubsub: Conn,
    table: Mutex<SubscriptionTable>,
    changed: Notify,
    linger: Duration,
    /// False from a disconnection until the subscriptions are confirmed again.
    up: AtomicBool,
    /// The push channel overflowed: messages may be lost, so every session replays.
    pub overflowed: Arc<AtomicBool>,
    pub inbox_len: usize,
}

impl RedisBus {
    /// Connect both connections; the receiver yields the subscription pushes.
    pub async fn connect(
        target: &RedisTarget,
        keys: Keys,
        linger: Duration,
        inbox_len: usize,
    ) -> Result<(RedisBus, mpsc::Receiver<PushInfo>), BusError> {
        let (tx, rx) = mpsc::channel(PUSH_BUFFER);
        let overflowed = Arc::new(AtomicBool::new(false));
        let pubsub = connect(
            target,
            Some(PushSinkParts {
                tx,
                overflowed: overflowed.clone(),
            }),
        )
        .await?;
        let commands = connect(target, None).await?;
        let bus = RedisBus {
            keys,
            commands,
            pubsub,
            table: Mutex::new(SubscriptionTable::default()),
            changed: Notify::new(),
            linger,
            up: AtomicBool::new(false),
            overflowed,
            inbox_len,
        };
        bus.ping().await?;
        Ok((bus, rx))
    }

    fn table(&self) -> std::sync::MutexGuard<'_, SubscriptionTable> {
        self.table.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn is_cluster(&self) -> bool {
        matches!(self.commands, Conn::Cluster(_))
    }

    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::Acquire)
    }

    pub fn set_up(&self, up: bool) {
        self.up.store(up, Ordering::Release);
    }

    /// A command connection (cheap clone of a multiplexed handle).
    pub fn commands(&self) -> Conn {
        self.commands.clone()
    }

    pub async fn ping(&self) -> Result<(), BusError> {
        let mut conn = self.pubsub.clone();
        redis::cmd("PING")
            .query_async::<Value>(&mut conn)
            .await
            .map(|_| ())
            .map_err(unavailable)
    }

    /// Hold a channel; the first holder subscribes it (in the next batch).
    pub fn acquire(&self, channel: String) {
        let mut table = self.table();
        let count = table.counts.entry(channel.clone()).or_insert(0);
        *count += 1;
        if *count == 1 {
            table.lingering.remove(&channel);
            if !table.subscribed.contains(&channel) {
                table.wanted.push(channel);
                drop(table);
                self.changed.notify_one();
            }
        }
    }

    /// Let go of a channel; the last holder starts its linger.
    pub fn release(&self, channel: &str) {
        let mut table = self.table();
        let Some(count) = table.counts.get_mut(channel) else {
            return;
        };
        *count -= 1;
        if *count == 0 {
            table.counts.remove(channel);
            let until = Instant::now() + self.linger;
            table.lingering.insert(channel.to_owned(), until);
        }
    }

    /// Channels currently held by sessions (for tests and metrics).
    pub fn held_channels(&self) -> usize {
        self.table().counts.len()
    }

    /// Whether a channel's subscription was confirmed.
    pub fn is_subscribed(&self, channel: &str) -> bool {
        self.table().subscribed.contains(channel)
    }

    /// Subscribed channels (as confirmed by Redis).
    pub fn subscribed_channels(&self) -> usize {
        self.table().subscribed.len()
    }

    async fn send_subscriptions(&self, channels: &[String], subscribe: bool) -> RedisResult<()> {
        let mut conn = self.pubsub.clone();
        match &mut conn {
            Conn::Single(c) => {
                for batch in channels.chunks(SUBSCRIBE_BATCH) {
                    if subscribe {
                        c.subscribe(batch).await?;
                    } else {
                        c.unsubscribe(batch).await?;
                    }
                }
            }
            // Sharded channels of one command must share a slot: one channel per command.
            Conn::Cluster(c) => {
                for channel in channels {
                    if subscribe {
                        c.ssubscribe(channel).await?;
                    } else {
                        c.sunsubscribe(channel).await?;
                    }
                }
            }
        }
        Ok(())
    }

    /// Subscribe every held channel again (after a failed probe: the server may have lost
    /// them without the connection noticing).
    pub async fn resubscribe_all(&self) -> Result<(), BusError> {
        let channels: Vec<String> = self.table().counts.keys().cloned().collect();
        self.send_subscriptions(&channels, true)
            .await
            .map_err(unavailable)?;
        let mut table = self.table();
        table.subscribed.extend(channels);
        Ok(())
    }

    /// Run the subscription batching until `stop`: subscribe what is wanted, unsubscribe
    /// what lingered long enough. Failures are retried with backoff.
    pub async fn run_subscriber(&self, stop: tokio_util::sync::CancellationToken) {
        let tick = (self.linger / 2).max(Duration::from_millis(50));
        let mut backoff = Duration::from_millis(50);
        loop {
            let (wanted, expired) = {
                let mut table = self.table();
                let now = Instant::now();
                let wanted: Vec<String> = std::mem::take(&mut table.wanted)
                    .into_iter()
                    .filter(|c| table.counts.contains_key(c) && !table.subscribed.contains(c))
                    .collect::<HashSet<_>>()
                    .into_iter()
                    .collect();
                let expired: Vec<String> = table
                    .lingering
                    .iter()
                    .filter(|(_, until)| **until <= now)
                    .map(|(c, _)| c.clone())
                    .collect();
                for channel in &expired {
                    table.lingering.remove(channel);
                }
                (wanted, expired)
            };
            let mut failed = false;
            if !wanted.is_empty() {
                match self.send_subscriptions(&wanted, true).await {
                    Ok(()) => self.table().subscribed.extend(wanted),
                    Err(e) => {
                        tracing::warn!(error = %e, channels = wanted.len(), "subscribe failed; retrying");
                        self.table().wanted.extend(wanted);
                        failed = true;
                    }
                }
            }
            if !expired.is_empty() {
                let still_unheld: Vec<String> = {
                    let table = self.table();
                    expired
                        .into_iter()
                        .filter(|c| !table.counts.contains_key(c))
                        .collect()
                };
                if self.send_subscriptions(&still_unheld, false).await.is_ok() {
                    let mut table = self.table();
                    for channel in &still_unheld {
                        table.subscribed.remove(channel);
                    }
                }
            }
            let wait = if failed {
                backoff = (backoff * 2).min(Duration::from_secs(2));
                backoff
            } else {
                backoff = Duration::from_millis(50);
                tick
            };
            tokio::select! {
                () = self.changed.notified() => {}
                () = tokio::time::sleep(wait) => {}
                () = stop.cancelled() => return,
            }
        }
    }

    /// Publish a message on a channel (`SPUBLISH` on a cluster).
    pub async fn publish(&self, channel: &str, message: &[u8]) -> Result<(), BusError> {
        publish(&mut self.commands(), channel, message).await
    }

    pub async fn inbox_after(
        &self,
        user: &str,
        after: Option<Cursor>,
        count: usize,
        now_ms: i64,
    ) -> Result<Vec<StoredNotification>, BusError> {
        inbox_after(&mut self.commands(), &self.keys, user, after, count, now_ms).await
    }

    pub async fn load_ack(&self, user: &str, device: &str) -> Result<Option<Cursor>, BusError> {
        let mut conn = self.commands();
        let value: Option<String> = redis::cmd("GET")
            .arg(self.keys.ack(user, device))
            .query_async(&mut conn)
            .await
            .map_err(unavailable)?;
        Ok(value.as_deref().and_then(Cursor::parse))
    }

    pub async fn store_ack(
        &self,
        user: &str,
        device: &str,
        cursor: Cursor,
    ) -> Result<(), BusError> {
        let mut conn = self.commands();
        redis::cmd("SET")
            .arg(self.keys.ack(user, device))
            .arg(cursor.to_string())
            .arg("EX")
            .arg(ACK_TTL_S)
            .query_async::<Value>(&mut conn)
            .await
            .map(|_| ())
            .map_err(unavailable)
    }
}

/// How long an ack cursor outlives its device's last ack (longer than any inbox TTL).
pub const ACK_TTL_S: u64 = 30 * 24 * 3600;

/// `PUBLISH`, or `SPUBLISH` on a cluster.
pub async fn publish(conn: &mut Conn, channel: &str, message: &[u8]) -> Result<(), BusError> {
    let command = if matches!(conn, Conn::Cluster(_)) {
        "SPUBLISH"
    } else {
        "PUBLISH"
    };
    redis::cmd(command)
        .arg(channel)
        .arg(message)
        .query_async::<Value>(conn)
        .await
        .map(|_| ())
        .map_err(unavailable)
}

/// Fields of an inbox entry.
pub mod field {
    pub const ID: &str = "id";
    pub const TITLE: &str = "t";
    pub const BODY: &str = "b";
    pub const DATA: &str = "d";
    pub const TS: &str = "ts";
    pub const EXPIRES: &str = "exp";
}

/// Where the cursor goes in a message template of [`append_and_publish`]. The header's
/// cursor and the frame's come first in the message (before any publisher text), and only
/// the first two occurrences are replaced.
pub const CURSOR_PLACEHOLDER: &str = "@@GEOPUSHCURSOR@@";

/// Appends to the inbox and publishes the message with its cursor, in one step: `KEYS[1]`
/// the inbox, `KEYS[2]` the user's channel (same hash tag); `ARGV[1]` the cap, `ARGV[2]` the
/// TTL in ms, `ARGV[3]` `PUBLISH` or `SPUBLISH`, `ARGV[4]` the message template, then the
/// entry's field/value pairs. Redis runs scripts one at a time, so a user's messages are
/// published in their inbox order — two publishers racing for one user cannot make a
/// gateway see a later cursor first (it would skip the earlier one as already delivered).
const APPEND_PUBLISH_SCRIPT: &str = r"
local fields = {}
for i = 5, #ARGV do fields[#fields + 1] = ARGV[i] end
local id = redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[1], '*', unpack(fields))
redis.call('PEXPIRE', KEYS[1], ARGV[2], 'NX')
redis.call('PEXPIRE', KEYS[1], ARGV[2], 'GT')
local message = string.gsub(ARGV[4], '@@GEOPUSHCURSOR@@', id, 2)
redis.call(ARGV[3], KEYS[2], message)
return id
";

static APPEND_PUBLISH: std::sync::LazyLock<redis::Script> =
    std::sync::LazyLock::new(|| redis::Script::new(APPEND_PUBLISH_SCRIPT));

/// Append a notification to a user's inbox and publish `template` (a message with
/// [`CURSOR_PLACEHOLDER`] where the cursor goes) on the user's channel, atomically and in
/// one round trip; returns the cursor.
pub async fn append_and_publish(
    conn: &mut Conn,
    keys: &Keys,
    user: &str,
    entry: &StoredNotification,
    ttl_ms: i64,
    inbox_len: usize,
    template: &[u8],
) -> Result<Cursor, BusError> {
    let publish = if matches!(conn, Conn::Cluster(_)) {
        "SPUBLISH"
    } else {
        "PUBLISH"
    };
    let mut invocation = APPEND_PUBLISH.key(keys.inbox(user));
    invocation
        .key(keys.user_channel(user))
        .arg(inbox_len)
        .arg(ttl_ms)
        .arg(publish)
        .arg(template)
        .arg(field::ID)
        .arg(&entry.id)
        .arg(field::TITLE)
        .arg(&entry.title)
        .arg(field::BODY)
        .arg(&entry.body)
        .arg(field::TS)
        .arg(entry.ts)
        .arg(field::EXPIRES)
        .arg(entry.expires_ms);
    if let Some(data) = &entry.data {
        invocation.arg(field::DATA).arg(data.get());
    }
    let id: String = invocation.invoke_async(conn).await.map_err(unavailable)?;
    Cursor::parse(&id).ok_or_else(|| BusError::Protocol(format!("XADD returned {id:?}")))
}

/// Inbox entries after a cursor, oldest first, expired ones skipped.
pub async fn inbox_after(
    conn: &mut Conn,
    keys: &Keys,
    user: &str,
    after: Option<Cursor>,
    count: usize,
    now_ms: i64,
) -> Result<Vec<StoredNotification>, BusError> {
    let start = after.map_or_else(|| "-".to_owned(), |c| format!("({c}"));
    let entries: Vec<(String, HashMap<String, String>)> = redis::cmd("XRANGE")
        .arg(keys.inbox(user))
        .arg(start)
        .arg("+")
        .arg("COUNT")
        .arg(count)
        .query_async(conn)
        .await
        .map_err(unavailable)?;
    let mut out = Vec::with_capacity(entries.len());
    for (id, mut fields) in entries {
        let Some(cursor) = Cursor::parse(&id) else {
            continue;
        };
        let number = |v: Option<String>| v.and_then(|s| s.parse::<i64>().ok()).unwrap_or(0);
        let expires_ms = number(fields.remove(field::EXPIRES));
        if expires_ms <= now_ms {
            continue;
        }
        let data = fields
            .remove(field::DATA)
            .and_then(|d| serde_json::value::RawValue::from_string(d).ok());
        out.push(StoredNotification {
            cursor,
            id: fields.remove(field::ID).unwrap_or_default(),
            title: fields.remove(field::TITLE).unwrap_or_default(),
            body: fields.remove(field::BODY).unwrap_or_default(),
            data,
            ts: number(fields.remove(field::TS)),
            expires_ms,
        });
    }
    Ok(out)
}
