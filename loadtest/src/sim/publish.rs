//! The load publisher: user, geo and broadcast notifications at their rates during the
//! measured phase, on a runtime and thread of its own so its CPU is read apart from the
//! clients'.
//!
//! Each notification carries `{"sent_us": <unix µs>, "k": "u"|"g"|"b", "p": <sub prefix>}` in
//! `data`; clients measure publish → socket from it, and count geo notifications only from
//! their own process's publisher (the only one that knows where they are). What a publish is expected to reach is counted when
//! the API accepts it: a user notification reaches its user's one device; a geo circle
//! (centred on a random positioned client) reaches every connected client inside it at
//! that moment (haversine, as the gateway's index); a broadcast is counted by the clients
//! (see [`super::Reach`]).

use super::{FIRST_BROADCAST_S, Kind, Shared, count};
use crate::procfs::{self, CpuTime};
use crate::sender::{PublishVia, Sender};
use anyhow::{Context, bail};
use geopush_proto::api::{NotificationRequest, PublishTarget};
use geopush_proto::area::{Area, Circle};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;
use tokio::sync::{Semaphore, oneshot};
use tokio::time::{Instant, MissedTickBehavior};
use tokio_util::task::TaskTracker;

/// Inbox TTL of the published notifications: long enough for any run.
const NOTIFICATION_TTL_S: u64 = 600;
/// Publisher loop tick.
const TICK: Duration = Duration::from_millis(1);

/// The publisher thread, from the coordinator's side.
pub(super) struct Handle {
    ready: Option<oneshot::Receiver<Result<(), String>>>,
    go: Option<oneshot::Sender<Duration>>,
    thread: std::thread::JoinHandle<anyhow::Result<CpuTime>>,
}

impl Handle {
    /// Wait until the publisher is connected; its error fails the run before any client.
    pub(super) async fn ready(&mut self) -> anyhow::Result<()> {
        let Some(ready) = self.ready.take() else {
            return Ok(());
        };
        match ready.await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(reason)) => bail!("{reason}"),
            Err(_) => bail!("the publisher thread ended before it was ready"),
        }
    }

    /// Start publishing for `measure`.
    pub(super) fn go(&mut self, measure: Duration) {
        if let Some(go) = self.go.take() {
            let _ = go.send(measure);
        }
    }

    /// Stop a publisher that has not started (dropping `go` ends its thread).
    pub(super) fn abort(self) {}

    /// Wait for the last publish; the publisher thread's CPU.
    pub(super) async fn join(self) -> anyhow::Result<CpuTime> {
        let thread = self.thread;
        tokio::task::spawn_blocking(move || thread.join())
            .await
            .context("joining the publisher")?
            .map_err(|_| anyhow::anyhow!("the publisher thread panicked"))?
    }
}

/// Start the publisher thread; it connects at once and publishes after [`Handle::go`].
pub(super) fn spawn(shared: Arc<Shared>, via: PublishVia, in_flight: usize, seed: u64) -> Handle {
    let (ready_tx, ready_rx) = oneshot::channel();
    let (go_tx, go_rx) = oneshot::channel::<Duration>();
    let thread = std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("starting the publisher's runtime")?;
        let tid = procfs::thread_id();
        runtime.block_on(async move {
            let sender = match Sender::connect(&via, in_flight).await {
                Ok(sender) => {
                    let _ = ready_tx.send(Ok(()));
                    sender
                }
                Err(e) => {
                    let _ = ready_tx.send(Err(format!("{e:#}")));
                    return Ok(CpuTime::default());
                }
            };
            let Ok(measure) = go_rx.await else {
                return Ok(CpuTime::default());
            };
            let cpu_start = procfs::thread_cpu(tid);
            publish_for(&shared, sender, in_flight, seed, measure).await?;
            Ok(procfs::thread_cpu(tid).since(&cpu_start))
        })
    });
    Handle {
        ready: Some(ready_rx),
        go: Some(go_tx),
        thread,
    }
}

/// Publish at the plan's rates for `measure`, at most `in_flight` at once.
async fn publish_for(
    shared: &Arc<Shared>,
    sender: Sender,
    in_flight: usize,
    seed: u64,
    measure: Duration,
) -> anyhow::Result<()> {
    let plan = &shared.plan;
    let slots = Arc::new(Semaphore::new(in_flight));
    let tracker = TaskTracker::new();
    let mut rng = StdRng::seed_from_u64(seed ^ 0x5eed_f09e);
    let mut ticker = tokio::time::interval(TICK);
    ticker.set_missed_tick_behavior(MissedTickBehavior::Skip);
    let start = Instant::now();
    let (mut users, mut geos, mut broadcasts) = (0u64, 0u64, 0u64);
    while start.elapsed() < measure {
        ticker.tick().await;
        let elapsed = start.elapsed().as_secs_f64();
        let due_users = (elapsed * plan.user_rate) as u64;
        let due_geos = (elapsed * plan.geo_rate) as u64;
        let due_broadcasts = match plan.broadcast_every {
            Some(every) if elapsed >= FIRST_BROADCAST_S => {
                ((elapsed - FIRST_BROADCAST_S) / every) as u64 + 1
            }
            _ => 0,
        };
        let mut jobs = Vec::new();
        while users < due_users {
            users += 1;
            if let Some(job) = user_job(shared, &mut rng) {
                jobs.push(job);
            }
        }
        while geos < due_geos {
            geos += 1;
            if let Some(job) = geo_job(shared, &mut rng) {
                jobs.push(job);
            }
        }
        while broadcasts < due_broadcasts {
            broadcasts += 1;
            jobs.push((Kind::Broadcast, PublishTarget::All(true), 0));
        }
        for (kind, target, expected) in jobs {
            let permit = slots.clone().acquire_owned().await?;
            let (shared, sender) = (shared.clone(), sender.clone());
            tracker.spawn(async move {
                let request = NotificationRequest {
                    target,
                    title: "load".into(),
                    body: String::new(),
                    data: serde_json::value::RawValue::from_string(format!(
                        r#"{{"sent_us":{},"k":"{}","p":"{}"}}"#,
                        super::unix_us(),
                        kind.stamp(),
                        shared.sub_prefix
                    ))
                    .ok(),
                    ttl_s: NOTIFICATION_TTL_S,
                    send_at: None,
                    idempotency_key: None,
                };
                let k = shared.kind(kind);
                match sender.send(&request).await {
                    Ok(()) => {
                        k.published.fetch_add(1, Ordering::Relaxed);
                        k.expected.fetch_add(expected, Ordering::Relaxed);
                    }
                    Err(reason) => {
                        k.publish_errors.fetch_add(1, Ordering::Relaxed);
                        count(&shared.stats.publish_error_reasons, reason);
                    }
                }
                drop(permit);
            });
        }
    }
    tracker.close();
    tracker.wait().await;
    Ok(())
}

type Job = (Kind, PublishTarget, u64);

/// A user notification to a random client that has connected (offline ones get it on
/// their next connect: user notifications are durable).
fn user_job(shared: &Shared, rng: &mut StdRng) -> Option<Job> {
    let n = shared.slots.len();
    for _ in 0..16 {
        let index = rng.gen_range(0..n);
        if shared.slots[index].ever_connected.load(Ordering::Relaxed) {
            let user = format!("{}-{index}", shared.sub_prefix);
            return Some((Kind::User, PublishTarget::Users(vec![user]), 1));
        }
    }
    None
}

/// A circle around a random connected, positioned client; expected: the connected clients
/// inside it now.
fn geo_job(shared: &Shared, rng: &mut StdRng) -> Option<Job> {
    let n = shared.slots.len();
    let radius_m = shared.plan.geo_radius_m;
    for _ in 0..16 {
        let slot = &shared.slots[rng.gen_range(0..n)];
        if !slot.connected.load(Ordering::Relaxed) {
            continue;
        }
        let Some((lat, lon)) = slot.position() else {
            continue;
        };
        let inside = shared
            .slots
            .iter()
            .filter(|s| s.connected.load(Ordering::Relaxed))
            .filter_map(|s| s.position())
            .filter(|&(la, lo)| geopush_gateway::geo::haversine_m(lat, lon, la, lo) <= radius_m)
            .count() as u64;
        let area = Area::Circle(Circle { lat, lon, radius_m });
        return Some((Kind::Geo, PublishTarget::Area(area), inside));
    }
    None
}
