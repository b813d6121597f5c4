//! A Redis outage while notifications flow (DESIGN §6, §7, §9): the `redis-server` under
//! three nodes is SIGKILLed and restarted on the same port. Readiness turns 503 and
//! `geopush_bus_up` 0 while it is down, then 200 and 1 again, and
//! `geopush_bus_reconnects_total` moves. A backend publishing all along retries what fails
//! (a publish during the outage returns an error), and afterwards every device has every
//! notification whose publish was accepted, in inbox order — nothing lost, nothing that is
//! not in the user's inbox.
//!
//! The server is durable (`--appendonly yes --appendfsync always`), as a production Redis
//! is: an accepted publish is on disk, so the inboxes outlive the restart.

use anyhow::Context;
use geopush_gateway::bus::redis::field;
use geopush_proto::bus::Cursor;
use geopush_tests::fleet::{Fleet, to_users};
use geopush_tests::redis::{Redis, RedisServer};
use geopush_tests::wait::{POLL_INTERVAL, eventually, eventually_async};
use geopush_tests::{WAIT_TIMEOUT, WsClient};
use serde_json::{Value, json};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

const USERS: usize = 4;
const FINAL: &str = "final";

/// What the publishing backend saw.
#[derive(Default)]
struct Ledger {
    /// Accepted publishes per user: (title, id) in publish order.
    accepted: BTreeMap<String, Vec<(String, String)>>,
    /// Titles with at least one attempt that returned an error.
    failed_titles: BTreeSet<String>,
    failures: usize,
    /// Rounds completed per user.
    rounds: BTreeMap<String, usize>,
}

impl Ledger {
    /// Rounds every user's publisher completed.
    fn rounds(&self) -> usize {
        self.rounds.values().copied().min().unwrap_or(0)
    }

    fn accepted_count(&self) -> usize {
        self.accepted.values().map(Vec::len).sum()
    }
}

type Shared = Arc<Mutex<Ledger>>;

fn ledger(shared: &Shared) -> std::sync::MutexGuard<'_, Ledger> {
    shared.lock().unwrap_or_else(|p| p.into_inner())
}

/// One publisher per user, in parallel (so that several publishes are in flight when Redis
/// dies), each publishing round after round until `stop`; a failed publish is retried,
/// with the same title and idempotency key, until it is accepted.
fn start_backend(
    fleet: &Fleet,
    users: &[String],
    shared: &Shared,
    stop: &CancellationToken,
) -> Vec<JoinHandle<()>> {
    users
        .iter()
        .map(|user| {
            let (publisher, user) = (fleet.publisher().clone(), user.clone());
            let (shared, stop) = (shared.clone(), stop.clone());
            tokio::spawn(async move {
                let mut round = 0;
                while !stop.is_cancelled() {
                    let title = format!("{user}-{round:03}");
                    let mut request = to_users(&[&user], &title, 3600);
                    request.idempotency_key = Some(title.clone());
                    loop {
                        match publisher.publish(&request).await {
                            Ok(published) => {
                                let mut l = ledger(&shared);
                                l.accepted
                                    .entry(user.clone())
                                    .or_default()
                                    .push((title.clone(), published.id));
                                break;
                            }
                            Err(_) => {
                                {
                                    let mut l = ledger(&shared);
                                    l.failures += 1;
                                    l.failed_titles.insert(title.clone());
                                }
                                tokio::time::sleep(Duration::from_millis(50)).await;
                            }
                        }
                    }
                    round += 1;
                    ledger(&shared).rounds.insert(user.clone(), round);
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            })
        })
        .collect()
}

/// Append an entry to a user's inbox the way the publisher does, without publishing it on
/// the user's channel: what a node finds in the inbox after it was deaf (a publish made
/// while it was not subscribed, or a publisher that died between `XADD` and `PUBLISH`).
async fn append_unpublished(fleet: &Fleet, user: &str, title: &str) -> anyhow::Result<()> {
    let now = geopush_tests::tokens::now_unix_ms();
    let mut commands = fleet.redis.commands().await?;
    let _: String = commands
        .query(
            redis::cmd("XADD")
                .arg(fleet.keys().inbox(user))
                .arg("*")
                .arg(field::ID)
                .arg(format!("unpublished-{title}"))
                .arg(field::TITLE)
                .arg(title)
                .arg(field::BODY)
                .arg("")
                .arg(field::TS)
                .arg(now)
                .arg(field::EXPIRES)
                .arg(now + 3_600_000),
        )
        .await?;
    Ok(())
}

/// A device that reads everything, acks every notification, and stops at the `final` one.
/// Returns the notifications in the order received.
fn start_device(name: String, mut client: WsClient) -> JoinHandle<anyhow::Result<Vec<Value>>> {
    tokio::spawn(async move {
        let mut got = Vec::new();
        loop {
            let frame = client
                .recv_json(Duration::from_secs(30))
                .await
                .with_context(|| format!("{name} after {} notifications", got.len()))?;
            if frame["type"] != "notification" {
                continue;
            }
            if frame["title"] == FINAL {
                return Ok(got);
            }
            client
                .send_json(&json!({"type": "ack", "ids": [frame["id"].clone()]}))
                .await?;
            got.push(frame);
        }
    })
}

async fn wait_rounds(shared: &Shared, at_least: usize, what: &str) {
    eventually(what, WAIT_TIMEOUT, || ledger(shared).rounds() >= at_least)
        .await
        .unwrap_or_else(|e| panic!("{e:#}"));
}

fn bus_up(fleet: &Fleet, node: usize) -> f64 {
    fleet.node(node).metric("geopush_bus_up", &[])
}

fn reconnects(fleet: &Fleet, node: usize) -> f64 {
    fleet.node(node).metric("geopush_bus_reconnects_total", &[])
}

async fn all_ready_is(fleet: &Fleet, status: u16) -> bool {
    for node in fleet.nodes() {
        if !matches!(node.readyz().await, Ok(s) if s == status) {
            return false;
        }
    }
    true
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_restart_while_notifications_flow_loses_no_accepted_notification() {
    // The nodes' logs go with a failure's output: they show when each bus went down and up.
    let _ = tracing_subscriber::fmt()
        .with_env_filter("geopush_gateway=info")
        .with_test_writer()
        .try_init();
    let server = RedisServer::start_durable()
        .await
        .expect("durable redis-server");
    let mut fleet = Fleet::start(Redis::Single(server), 3)
        .await
        .expect("three ready nodes");
    let n = fleet.nodes().len();
    let users: Vec<String> = (0..USERS).map(|i| format!("u{i}")).collect();

    // Two devices per user, on different nodes.
    let mut devices = Vec::new();
    for (i, user) in users.iter().enumerate() {
        for (k, device) in ["phone", "tablet"].into_iter().enumerate() {
            let client = fleet
                .connect((i + k) % n, user, device)
                .await
                .expect("connect");
            devices.push((user.clone(), (i + k) % n, device, client));
        }
    }
    let channels: Vec<String> = users.iter().map(|u| fleet.keys().user_channel(u)).collect();
    fleet
        .wait_subscribers_of(&channels, &[2; USERS])
        .await
        .expect("every user's channel held by two nodes");
    let readers: Vec<(String, usize, &str, JoinHandle<_>)> = devices
        .into_iter()
        .map(|(user, node, device, client)| {
            let name = format!("{user}/{device}");
            (user, node, device, start_device(name, client))
        })
        .collect();
    let reconnects_before: Vec<f64> = (0..n).map(|i| reconnects(&fleet, i)).collect();

    let shared: Shared = Arc::default();
    let stop = CancellationToken::new();
    let backend = start_backend(&fleet, &users, &shared, &stop);
    wait_rounds(&shared, 5, "five rounds published before the outage").await;

    // SIGKILL: no shutdown, no goodbye to the clients of Redis.
    let server = fleet.redis.server_mut().expect("standalone");
    server.kill().expect("SIGKILL redis-server");
    let killed_at = Instant::now();
    let f = &fleet;
    eventually_async("every node's /readyz to answer 503", WAIT_TIMEOUT, || {
        all_ready_is(f, 503)
    })
    .await
    .unwrap_or_else(|e| panic!("{e:#}"));
    for node in 0..n {
        assert_eq!(bus_up(&fleet, node), 0.0, "node-{node}: geopush_bus_up");
    }
    eventually("publishes to fail during the outage", WAIT_TIMEOUT, || {
        ledger(&shared).failures >= 3
    })
    .await
    .unwrap_or_else(|e| panic!("{e:#}"));
    // Down for a second at least, as a real outage would be (the nodes' reconnect backoff
    // grows meanwhile).
    eventually("a second of outage", WAIT_TIMEOUT, || {
        killed_at.elapsed() >= Duration::from_secs(1)
    })
    .await
    .unwrap_or_else(|e| panic!("{e:#}"));
    let rounds_in_outage = ledger(&shared).rounds();
    let killed_for = killed_at.elapsed();

    let server = fleet.redis.server_mut().expect("standalone");
    server.restart().await.expect("restart on the same port");
    let accepted_at_restart = ledger(&shared).accepted_count();
    // Durable entries the nodes never hear of live: only the recovery replay delivers them.
    for user in &users {
        append_unpublished(&fleet, user, &format!("gap-{user}"))
            .await
            .expect("XADD right after the restart");
    }
    // A node that already reports its bus up may have replayed before these entries existed;
    // only the others owe them to their sessions (`geopush_bus_up` is set before the replay).
    let down_after_gap: Vec<bool> = (0..n).map(|node| bus_up(&fleet, node) == 0.0).collect();
    assert!(
        down_after_gap.iter().any(|down| *down),
        "every node recovered within milliseconds of the restart: nothing to check"
    );
    let f = &fleet;
    eventually_async(
        "every node's /readyz to answer 200 again",
        WAIT_TIMEOUT,
        || all_ready_is(f, 200),
    )
    .await
    .unwrap_or_else(|e| panic!("{e:#}"));
    let accepted_in_recovery = ledger(&shared).accepted_count() - accepted_at_restart;
    for (node, before) in reconnects_before.iter().enumerate() {
        assert_eq!(bus_up(&fleet, node), 1.0, "node-{node}: geopush_bus_up");
        assert!(
            reconnects(&fleet, node) > *before,
            "node-{node}: geopush_bus_reconnects_total stayed at {before}"
        );
    }
    wait_rounds(
        &shared,
        rounds_in_outage + 5,
        "five rounds published after the recovery",
    )
    .await;
    stop.cancel();
    for task in backend {
        task.await.expect("backend task");
    }

    // The last word to every user, retried like the rest.
    let publisher = fleet.publisher().clone();
    for user in &users {
        let request = to_users(&[user], FINAL, 3600);
        let deadline = Instant::now() + WAIT_TIMEOUT;
        while publisher.publish(&request).await.is_err() {
            assert!(Instant::now() < deadline, "publishing {FINAL} to {user}");
            tokio::time::sleep(POLL_INTERVAL).await;
        }
    }

    // What the inboxes hold now, per user: (cursor, id, title) in inbox order.
    let mut commands = fleet.redis.commands().await.expect("redis");
    let mut inboxes: HashMap<String, Vec<(Cursor, String, String)>> = HashMap::new();
    for user in &users {
        let entries: Vec<(String, HashMap<String, String>)> = commands
            .query(
                redis::cmd("XRANGE")
                    .arg(fleet.keys().inbox(user))
                    .arg("-")
                    .arg("+"),
            )
            .await
            .expect("XRANGE");
        let entries = entries
            .into_iter()
            .map(|(cursor, f)| {
                let cursor = Cursor::parse(&cursor).expect("stream id");
                (cursor, f[field::ID].clone(), f[field::TITLE].clone())
            })
            .filter(|(_, _, title)| title != FINAL)
            .collect();
        inboxes.insert(user.clone(), entries);
    }

    // Every publisher task has ended: the ledger is final.
    let l = std::mem::take(&mut *ledger(&shared));
    let mut report = Vec::new();
    let mut problems = Vec::new();
    for (user, node, device, reader) in readers {
        let name = format!("{user}/{device} on node-{node}");
        let got = reader
            .await
            .expect("device task")
            .unwrap_or_else(|e| panic!("{e:#}"));
        let accepted = &l.accepted[&user];
        let inbox = &inboxes[&user];
        let mut first_seen: Vec<(String, Cursor)> = Vec::new();
        for frame in &got {
            let id = frame["id"].as_str().expect("id").to_owned();
            if first_seen.iter().any(|(seen, _)| *seen == id) {
                continue;
            }
            let cursor = frame["cursor"]
                .as_str()
                .and_then(Cursor::parse)
                .unwrap_or_else(|| panic!("{name}: no cursor in {frame}"));
            first_seen.push((id, cursor));
        }
        let received: BTreeSet<&String> = first_seen.iter().map(|(id, _)| id).collect();
        let accepted_ids: BTreeSet<&String> = accepted.iter().map(|(_, id)| id).collect();
        let in_inbox: BTreeSet<&String> = inbox.iter().map(|(_, id, _)| id).collect();

        let not_durable: Vec<&(String, String)> = accepted
            .iter()
            .filter(|(_, id)| !in_inbox.contains(id))
            .collect();
        if !not_durable.is_empty() {
            problems.push(format!(
                "{name}: accepted but not in the inbox after the restart: {not_durable:?}"
            ));
        }
        let missing: Vec<String> = inbox
            .iter()
            .filter(|(_, id, title)| {
                !received.contains(id) && (!title.starts_with("gap-") || down_after_gap[node])
            })
            .map(|(cursor, id, title)| {
                let how = if accepted_ids.contains(id) {
                    "accepted"
                } else if title.starts_with("gap-") {
                    "appended unpublished while this node's bus was down"
                } else {
                    "stored by an attempt that returned an error"
                };
                format!("{title} (cursor {cursor}, {how})")
            })
            .collect();
        if !missing.is_empty() {
            let after: Vec<String> = first_seen
                .iter()
                .filter_map(|(id, cursor)| {
                    let title = &inbox.iter().find(|(_, i, _)| i == id)?.2;
                    Some(format!("{title}@{cursor}"))
                })
                .collect();
            problems.push(format!(
                "{name}: {} inbox entries never reached the socket: {}; what it received, in \
                 order: {}",
                missing.len(),
                missing.join(", "),
                after.join(" ")
            ));
        }
        let phantom: Vec<&&String> = received.difference(&in_inbox).collect();
        if !phantom.is_empty() {
            problems.push(format!(
                "{name}: received ids not in the inbox: {phantom:?}"
            ));
        }
        if !first_seen.windows(2).all(|w| w[0].1 < w[1].1) {
            problems.push(format!(
                "{name}: first deliveries out of inbox order: {first_seen:?}"
            ));
        }
        // Entries whose publish was not accepted: the unpublished ones appended above, and
        // attempts that stored the entry and then failed (retried under a new id).
        let extra: Vec<&(Cursor, String, String)> = inbox
            .iter()
            .filter(|(_, id, _)| !accepted_ids.contains(id))
            .collect();
        for (_, id, title) in &extra {
            if !title.starts_with("gap-") && !l.failed_titles.contains(title) {
                problems.push(format!(
                    "{name}: {id} ({title}) is in the inbox, yet no publish of {title} failed"
                ));
            }
        }
        report.push(format!(
            "{name}: {} accepted, {} frames, {} distinct, {} unaccepted in the inbox",
            accepted.len(),
            got.len(),
            received.len(),
            extra.len()
        ));
    }
    let summary = format!(
        "outage of {killed_for:?}: {} failed publish attempts, {accepted_in_recovery} accepted \
         between the restart and every node ready; {}",
        l.failures,
        report.join("; ")
    );
    assert!(
        problems.is_empty(),
        "after the Redis restart, devices must hold every inbox entry (after dedupe by id), \
         in inbox order:\n{}\n({summary})",
        problems.join("\n")
    );
    eprintln!("{summary}");
}
