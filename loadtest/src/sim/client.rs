//! One simulated mobile client, from its first connect to the end of the run.
//!
//! It connects with its own token, sends its position after each `welcome` when the plan
//! says so, walks and sends fixes during the measured phase, acks every notification and
//! records its publish → socket latency (from the `sent_us` stamp in `data`), times the
//! `nearby` a fix caused, and when the gateway closes it (drain, slow consumer, a node gone)
//! waits what the `reconnect` frame asked, connects to the next gateway and sends `resume`
//! from the last cursor it saw. A churning client closes itself now and then and does the
//! same.

use super::{Kind, Reach, Shared, count, lock, record, unix_us};
use crate::cities::{self, Cities};
use crate::net::{self, Ws};
use futures_util::{SinkExt, StreamExt};
use geopush_proto::frames::{ClientFrame, LocationFrame};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::Deserialize;
use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;
use tokio::sync::{OwnedSemaphorePermit, oneshot};
use tokio::time::{Instant, Interval, MissedTickBehavior, sleep, timeout};
use tokio_tungstenite::tungstenite::Message;

/// How far from a city centre a client starts, metres.
const START_RADIUS_M: f64 = 3_000.0;
/// A walker further than this from where it started turns back, metres.
const MAX_WANDER_M: f64 = 5_000.0;
/// Lifetime of the minted tokens: longer than any run.
const TOKEN_TTL_S: u64 = 24 * 3_600;
/// Longest wait a `reconnect` frame may impose.
const MAX_RECONNECT_WAIT: Duration = Duration::from_secs(60);
/// Wait before reconnecting after a close without a `reconnect` frame, ms (random in range).
const RECONNECT_BACKOFF_MS: std::ops::Range<u64> = 100..1_000;
/// Bound on a polite close.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);

/// The part of a server frame a client reads.
#[derive(Deserialize)]
struct Frame<'a> {
    #[serde(rename = "type", borrow)]
    kind: std::borrow::Cow<'a, str>,
    #[serde(default)]
    id: Option<String>,
    #[serde(default)]
    cursor: Option<String>,
    #[serde(default)]
    data: Option<Stamp>,
    #[serde(default, borrow)]
    code: Option<std::borrow::Cow<'a, str>>,
    #[serde(default)]
    after_ms: Option<u64>,
}

/// What the load publisher puts in `data`.
#[derive(Deserialize)]
struct Stamp {
    sent_us: u64,
    k: char,
    /// The publishing process's `--sub-prefix`.
    #[serde(default)]
    p: String,
}

/// A position that moves a little with each fix: a random walk with momentum that stays
/// within a few kilometres of where it started.
struct Walker {
    rng: StdRng,
    start: (f64, f64),
    lat: f64,
    lon: f64,
    bearing_deg: f64,
}

impl Walker {
    fn new(cities: &Cities, seed: u64) -> Walker {
        let mut rng = StdRng::seed_from_u64(seed);
        let (lat, lon) = round7(cities.sample(&mut rng, START_RADIUS_M));
        let bearing_deg = rng.gen_range(0.0..360.0);
        Walker {
            rng,
            start: (lat, lon),
            lat,
            lon,
            bearing_deg,
        }
    }

    /// Walk `metres` on, turning a little (back home past [`MAX_WANDER_M`]).
    fn walk(&mut self, metres: f64) {
        let away =
            geopush_gateway::geo::haversine_m(self.lat, self.lon, self.start.0, self.start.1);
        if away > MAX_WANDER_M {
            let (dlat, dlon) = (self.start.0 - self.lat, self.start.1 - self.lon);
            self.bearing_deg = dlon.atan2(dlat).to_degrees();
        } else {
            self.bearing_deg += self.rng.gen_range(-30.0..30.0);
        }
        (self.lat, self.lon) = round7(cities::step(self.lat, self.lon, metres, self.bearing_deg));
    }

    /// The current position as a `location` frame.
    fn frame(&mut self) -> String {
        let frame = ClientFrame::Location(LocationFrame {
            lat: self.lat,
            lon: self.lon,
            accuracy_m: Some(self.rng.gen_range(3.0f64..20.0).round()),
            ts: Some((unix_us() / 1_000) as i64),
            speed_mps: None,
            heading_deg: None,
            radius_m: None,
            limit: None,
        });
        serde_json::to_string(&frame).unwrap_or_default()
    }
}

/// A position rounded to the 7 decimals a fix carries, so the publisher's idea of where a
/// client is equals the gateway's.
fn round7((lat, lon): (f64, f64)) -> (f64, f64) {
    ((lat * 1e7).round() / 1e7, (lon * 1e7).round() / 1e7)
}

/// What a client remembers across its sessions.
struct Memory {
    /// Notification ids received, for deduplication.
    seen: HashSet<String>,
    /// The last inbox cursor received.
    cursor: Option<String>,
    /// What the last `reconnect` frame asked to wait.
    reconnect_after: Option<Duration>,
    /// When the latest fix went out: a `nearby` is timed from it (the frame names no fix; a
    /// gateway more than one fix interval behind would read short, which the gateways'
    /// `geopush_fixes_total` against the fixes sent would show).
    fix_sent_at: Option<Instant>,
    walker: Option<Walker>,
}

/// How a session ended.
enum End {
    /// The run is over.
    Stopped,
    /// The client chose to close (churn).
    Churned,
    /// The gateway closed it or the connection broke.
    Lost(String),
}

/// One client for the whole run. `first` hears whether its first connect worked.
pub(super) async fn run(
    shared: Arc<Shared>,
    index: usize,
    mut permit: Option<OwnedSemaphorePermit>,
    mut first: Option<oneshot::Sender<Result<(), String>>>,
) {
    let slot = &shared.slots[index];
    let sub = format!("{}-{index}", shared.sub_prefix);
    let token =
        match geopush_gateway::auth::mint_hs256(&shared.secret, &sub, Some("load"), TOKEN_TTL_S) {
            Ok(token) => token,
            Err(e) => {
                fail(&shared, format!("minting a token: {e}"), first);
                return;
            }
        };
    let spread = usize::from(shared.source_ips);
    let source = (spread > 1).then(|| net::source_address((index / shared.targets.len()) % spread));
    let mut rng = StdRng::seed_from_u64(shared.seed.wrapping_mul(31).wrapping_add(index as u64));
    let mut memory = Memory {
        seen: HashSet::new(),
        cursor: None,
        reconnect_after: None,
        fix_sent_at: None,
        walker: shared
            .cities
            .as_deref()
            .map(|cities| Walker::new(cities, shared.seed.wrapping_add(index as u64))),
    };
    let mut attempt = 0usize;
    let mut closed_at: Option<Instant> = None;
    loop {
        let target = &shared.targets[(index + attempt) % shared.targets.len()];
        let started = Instant::now();
        let opened = match timeout(
            shared.connect_timeout,
            net::open_session(target, &token, source, shared.ws_config),
        )
        .await
        {
            Ok(opened) => opened,
            Err(_) => Err(format!(
                "no welcome within {:.1} s",
                shared.connect_timeout.as_secs_f64()
            )),
        };
        drop(permit.take());
        let mut ws = match opened {
            Ok(ws) => ws,
            Err(reason) if closed_at.is_none() => {
                // A client that never connected is a failure, not retried.
                fail(&shared, reason, first);
                return;
            }
            Err(reason) => {
                count(
                    &shared.stats.close_reasons,
                    format!("reconnect failed: {reason}"),
                );
                attempt += 1;
                let backoff = Duration::from_millis(rng.gen_range(RECONNECT_BACKOFF_MS));
                if wait_or_stop(&shared, backoff).await {
                    return;
                }
                continue;
            }
        };
        let stats = &shared.stats;
        record(&stats.welcome, started.elapsed().as_micros() as u64);
        stats.connects.fetch_add(1, Ordering::Relaxed);
        stats.connected_now.fetch_add(1, Ordering::Relaxed);
        slot.connected.store(true, Ordering::Relaxed);
        if !slot.ever_connected.swap(true, Ordering::Relaxed) {
            stats.ever_connected.fetch_add(1, Ordering::Relaxed);
        }
        if let Some(closed) = closed_at {
            stats.reconnects.fetch_add(1, Ordering::Relaxed);
            record(&stats.reconnect_gap, closed.elapsed().as_micros() as u64);
            let signal_ms = shared.drain_signal_unix_ms.load(Ordering::Relaxed);
            if signal_ms > 0 {
                let now_us = unix_us();
                record(
                    &stats.reconnect_after_drain,
                    now_us.saturating_sub(signal_ms * 1_000),
                );
            }
        }
        if let Some(first) = first.take() {
            let _ = first.send(Ok(()));
        }

        let end = session(&shared, index, &mut ws, &mut memory).await;
        slot.connected.store(false, Ordering::Relaxed);
        stats.connected_now.fetch_sub(1, Ordering::Relaxed);
        match end {
            End::Stopped => {
                close(&mut ws).await;
                return;
            }
            End::Churned => {
                close(&mut ws).await;
                closed_at = Some(Instant::now());
                attempt += 1;
            }
            End::Lost(reason) => {
                stats.closes.fetch_add(1, Ordering::Relaxed);
                count(&stats.close_reasons, reason);
                closed_at = Some(Instant::now());
                attempt += 1;
                let wait = memory.reconnect_after.take().map_or_else(
                    || Duration::from_millis(rng.gen_range(RECONNECT_BACKOFF_MS)),
                    |asked| asked.min(MAX_RECONNECT_WAIT),
                );
                if wait_or_stop(&shared, wait).await {
                    return;
                }
            }
        }
    }
}

/// Count a client that never connected.
fn fail(shared: &Shared, reason: String, first: Option<oneshot::Sender<Result<(), String>>>) {
    shared.stats.failed.fetch_add(1, Ordering::Relaxed);
    count(&shared.stats.failures, reason.clone());
    if let Some(first) = first {
        let _ = first.send(Err(reason));
    }
}

/// Sleep `wait`; `true` if the run stopped meanwhile.
async fn wait_or_stop(shared: &Shared, wait: Duration) -> bool {
    tokio::select! {
        () = shared.stop.cancelled() => true,
        () = sleep(wait) => shared.stop.is_cancelled(),
    }
}

/// Close politely, bounded.
async fn close(ws: &mut Ws) {
    let _ = timeout(CLOSE_TIMEOUT, async {
        let _ = ws.close(Some(net::normal_close())).await;
        while let Some(Ok(_)) = ws.next().await {}
    })
    .await;
}

async fn tick(interval: &mut Option<Interval>) {
    match interval {
        Some(interval) => {
            interval.tick().await;
        }
        None => std::future::pending().await,
    }
}

/// One connected session: until the run stops, the client churns, or the connection is lost.
async fn session(shared: &Shared, index: usize, ws: &mut Ws, memory: &mut Memory) -> End {
    let plan = &shared.plan;
    let slot = &shared.slots[index];
    if let Some(cursor) = &memory.cursor {
        let resume = format!(r#"{{"type":"resume","after":"{cursor}"}}"#);
        if let Err(e) = ws.send(Message::text(resume)).await {
            return End::Lost(format!("send: {e}"));
        }
    }
    if plan.fix_once
        && let Some(walker) = memory.walker.as_mut()
    {
        if let Err(e) = ws.send(Message::text(walker.frame())).await {
            return End::Lost(format!("send: {e}"));
        }
        slot.set_position(walker.lat, walker.lon);
        memory.fix_sent_at = Some(Instant::now());
        shared.stats.fixes.fetch_add(1, Ordering::Relaxed);
    }
    let mut armed = false;
    let mut fixes: Option<Interval> = None;
    let churn = sleep(Duration::from_secs(365 * 24 * 3_600));
    tokio::pin!(churn);
    let mut churning = false;
    loop {
        tokio::select! {
            biased;
            () = shared.stop.cancelled() => return End::Stopped,
            () = shared.measuring.cancelled(), if !armed => {
                armed = true;
                if let Some(every) = plan.fix_interval.filter(|_| memory.walker.is_some()) {
                    // Spread the fleet's fixes evenly over the interval.
                    let offset = every.mul_f64(rand::random::<f64>());
                    let mut interval = tokio::time::interval_at(Instant::now() + offset, every);
                    interval.set_missed_tick_behavior(MissedTickBehavior::Delay);
                    fixes = Some(interval);
                }
                if let Some(mean_s) = plan.churn_lifetime_s {
                    // Exponential lifetimes: churn_per_s closes per second over the fleet.
                    let u: f64 = rand::random::<f64>().max(1e-9);
                    let lifetime = Duration::from_secs_f64((-u.ln() * mean_s).min(3_600.0));
                    churn.as_mut().reset(Instant::now() + lifetime);
                    churning = true;
                }
            }
            () = &mut churn, if churning && !shared.measured.is_cancelled() => return End::Churned,
            () = tick(&mut fixes) => {
                let Some(walker) = memory.walker.as_mut() else { continue };
                let every = plan.fix_interval.unwrap_or(Duration::from_secs(1));
                let metres = plan.speed_mps * every.as_secs_f64() * walker.rng.gen_range(0.5..1.5);
                walker.walk(metres);
                if let Err(e) = ws.send(Message::text(walker.frame())).await {
                    return End::Lost(format!("send: {e}"));
                }
                slot.set_position(walker.lat, walker.lon);
                memory.fix_sent_at = Some(Instant::now());
                shared.stats.fixes.fetch_add(1, Ordering::Relaxed);
            }
            message = ws.next() => match message {
                Some(Ok(Message::Text(text))) => {
                    if let Some(ack) = on_text(shared, memory, text.as_str())
                        && plan.acks
                        && let Err(e) = ws.send(Message::text(ack)).await
                    {
                        return End::Lost(format!("send: {e}"));
                    }
                }
                Some(Ok(Message::Close(frame))) => {
                    let code = frame.map(|f| u16::from(f.code)).unwrap_or(1005);
                    return End::Lost(format!("closed by the gateway (code {code})"));
                }
                // tungstenite queues the pong and flushes it on the next read or send.
                Some(Ok(_)) => {}
                Some(Err(e)) => return End::Lost(format!("read: {e}")),
                None => return End::Lost("connection ended".into()),
            },
        }
    }
}

/// Handle one text frame; the ack to send back, if any.
fn on_text(shared: &Shared, memory: &mut Memory, text: &str) -> Option<String> {
    let received_us = unix_us();
    let Ok(frame) = serde_json::from_str::<Frame>(text) else {
        return None;
    };
    let stats = &shared.stats;
    match &*frame.kind {
        "notification" => {}
        "nearby" => {
            stats.nearby.fetch_add(1, Ordering::Relaxed);
            if let Some(sent) = memory.fix_sent_at.take() {
                record(&stats.fix_to_nearby, sent.elapsed().as_micros() as u64);
            }
            return None;
        }
        "reconnect" => {
            memory.reconnect_after = frame.after_ms.map(Duration::from_millis);
            return None;
        }
        "error" => {
            count(
                &stats.server_errors,
                frame.code.as_deref().unwrap_or("?").to_owned(),
            );
            return None;
        }
        _ => return None,
    }
    let id = frame.id?;
    if let Some(cursor) = frame.cursor {
        memory.cursor = Some(cursor);
    }
    let ack = format!(r#"{{"type":"ack","ids":["{id}"]}}"#);
    let Some(stamp) = frame.data else {
        return Some(ack);
    };
    let Some(kind) = Kind::from_stamp(stamp.k) else {
        return Some(ack);
    };
    if kind == Kind::Geo && stamp.p != shared.sub_prefix {
        // Another process's circle: its publisher counted only its own clients as expected.
        return Some(ack);
    }
    let k = shared.kind(kind);
    let latency_us = received_us.saturating_sub(stamp.sent_us);
    if !memory.seen.insert(id.clone()) {
        k.duplicates.fetch_add(1, Ordering::Relaxed);
        return Some(ack);
    }
    k.delivered.fetch_add(1, Ordering::Relaxed);
    record(&k.latency, latency_us);
    if kind == Kind::Broadcast {
        let connected = stats.connected_now.load(Ordering::Relaxed);
        let mut broadcasts = lock(&stats.broadcasts);
        let reach = broadcasts.entry(id).or_insert(Reach {
            expected: connected,
            reached: 0,
            last_us: 0,
        });
        reach.reached += 1;
        reach.last_us = reach.last_us.max(latency_us);
    }
    Some(ack)
}
