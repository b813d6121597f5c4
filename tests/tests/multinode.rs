//! Several gateway nodes on one real Redis (DESIGN §3.3, §3.4, §6, §7): user, topic,
//! broadcast and geo notifications published anywhere reach exactly their sessions on
//! whichever node holds them, each once; nodes subscribe only the channels their sessions
//! need (checked with `PUBSUB NUMSUB`) and let go of them when the sessions leave; an
//! offline device catches up on another node, without what expired; clients connecting
//! while notifications flow, or published to the moment they are welcomed, lose none; a
//! SIGKILLed node's clients resume on another node without losing anything.
//!
//! Every test starts its own `redis-server` on a free port and in-process nodes (the checks
//! live in `geopush_tests::fleet`, shared with `cluster.rs`). The node-kill test runs the
//! real binary: `cargo build --workspace --bins` first.

use geopush_proto::bus::Cursor;
use geopush_tests::fleet::{self, Fleet, publish, standalone_publisher, to_users};
use geopush_tests::redis::Redis;
use geopush_tests::tokens::{TEST_SECRET, device_token};
use geopush_tests::wait::POLL_INTERVAL;
use geopush_tests::{GatewayProcess, READ_TIMEOUT, WAIT_TIMEOUT, WsClient, WsEvent};
use serde_json::json;
use tokio::time::Instant;

async fn fleet_of_three() -> Fleet {
    let redis = Redis::single().await.expect("redis-server starts");
    Fleet::start(redis, 3).await.expect("three ready nodes")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn user_notifications_reach_their_sessions_on_any_node() {
    let fleet = fleet_of_three().await;
    fleet::user_notifications_cross_nodes(&fleet)
        .await
        .unwrap_or_else(|e| panic!("{e:#}"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_topic_reaches_every_subscribed_session_once() {
    let fleet = fleet_of_three().await;
    fleet::topic_reaches_each_subscriber_once(&fleet)
        .await
        .unwrap_or_else(|e| panic!("{e:#}"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broadcast_reaches_every_session_once() {
    let fleet = fleet_of_three().await;
    fleet::broadcast_reaches_everyone_once(&fleet)
        .await
        .unwrap_or_else(|e| panic!("{e:#}"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn geo_notifications_reach_exactly_the_clients_inside_across_nodes() {
    let fleet = fleet_of_three().await;
    fleet::geo_reaches_exactly_the_clients_inside(&fleet)
        .await
        .unwrap_or_else(|e| panic!("{e:#}"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_offline_device_catches_up_on_another_node_without_stale_ones() {
    let fleet = fleet_of_three().await;
    fleet::offline_device_catches_up_on_another_node(&fleet)
        .await
        .unwrap_or_else(|e| panic!("{e:#}"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn channels_are_released_after_their_sessions_leave() {
    let fleet = fleet_of_three().await;
    fleet::subscriptions_released_after_clients_leave(&fleet)
        .await
        .unwrap_or_else(|e| panic!("{e:#}"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_connecting_while_notifications_flow_lose_none() {
    let fleet = fleet_of_three().await;
    fleet::connecting_while_publishing_loses_nothing(&fleet)
        .await
        .unwrap_or_else(|e| panic!("{e:#}"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_notification_published_right_after_welcome_arrives() {
    let fleet = fleet_of_three().await;
    fleet::published_right_after_welcome_arrives(&fleet)
        .await
        .unwrap_or_else(|e| panic!("{e:#}"));
}

/// Read notifications until every id of `wanted` was seen; the ids in the order first seen
/// (duplicates dropped: a `resume` replays again, at-least-once).
async fn until_seen(client: &mut WsClient, wanted: &[String]) -> Vec<String> {
    let mut seen = Vec::new();
    while !wanted.iter().all(|w| seen.contains(w)) {
        let frame = client
            .expect_type("notification", READ_TIMEOUT)
            .await
            .unwrap_or_else(|e| panic!("seen {seen:?}, waiting for all of {wanted:?}: {e:#}"));
        let id = fleet::id_of(&frame);
        if !seen.contains(&id) {
            seen.push(id);
        }
    }
    seen
}

/// A node killed with SIGKILL says goodbye to nobody: its clients see the TCP connection
/// end, reconnect to another node, `resume` from the last cursor they saw, and lose
/// nothing published before, during or after the outage — in inbox order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_of_a_sigkilled_node_resume_on_another_without_loss() {
    sigkilled_node_clients_resume(Redis::single().await.expect("redis-server starts")).await;
}

/// The same on a 3-master Redis Cluster (the binary with `--redis-cluster`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_of_a_sigkilled_node_resume_on_another_without_loss_on_a_cluster() {
    sigkilled_node_clients_resume(Redis::cluster().await.expect("a three-master cluster")).await;
}

async fn sigkilled_node_clients_resume(redis: Redis) {
    let url = redis.url();
    let mut args = vec![
        "--jwt-secret",
        TEST_SECRET,
        "--redis-url",
        &url,
        "--node-id",
        "doomed",
        "--bus-probe-seconds",
        "0.5",
    ];
    if redis.is_cluster() {
        args.push("--redis-cluster");
    }
    let mut doomed = GatewayProcess::start(&args).expect("the gateway binary starts");
    doomed.wait_ready().await.expect("doomed node ready");
    let fleet = Fleet::start(redis, 1).await.expect("a surviving node");
    let publisher = standalone_publisher(&fleet.redis).await.expect("publisher");

    let users = ["kim", "lee", "max"];
    let mut clients = Vec::new();
    for user in users {
        let token = device_token(user, "phone").expect("token");
        let (client, welcome) = WsClient::connect_welcomed(doomed.addr(), &token)
            .await
            .expect("connect to the doomed node");
        assert_eq!(welcome["node"], "doomed");
        clients.push(client);
    }
    let channels: Vec<String> = users.iter().map(|u| fleet.keys().user_channel(u)).collect();
    fleet
        .wait_subscribers_of(&channels, &[1, 1, 1])
        .await
        .expect("the doomed node subscribed its users");

    // Before the kill: two each, seen live (the second one not acked).
    let mut last_seen: Vec<Cursor> = Vec::new();
    let mut published: Vec<Vec<String>> = vec![Vec::new(); users.len()];
    for round in 0..2 {
        for (i, user) in users.iter().enumerate() {
            let p = publish(
                &publisher,
                &to_users(&[user], &format!("{user}-{round}"), 3600),
            )
            .await
            .expect("publish");
            published[i].push(p.id);
        }
    }
    for (i, client) in clients.iter_mut().enumerate() {
        let mut got = Vec::new();
        for _ in 0..2 {
            got.push(
                client
                    .expect_type("notification", READ_TIMEOUT)
                    .await
                    .expect("live"),
            );
        }
        let ids: Vec<String> = got.iter().map(fleet::id_of).collect();
        assert_eq!(ids, published[i], "{}: live before the kill", users[i]);
        client
            .send_json(&json!({"type": "ack", "ids": [ids[0]]}))
            .await
            .expect("ack the first");
        client.roundtrip(1).await.expect("ack handled");
        let cursor = got[1]["cursor"]
            .as_str()
            .and_then(Cursor::parse)
            .expect("cursor");
        last_seen.push(cursor);
    }
    // The acks are stored in the background: wait until Redis has them.
    let mut commands = fleet.redis.commands().await.expect("redis");
    for user in users {
        let key = fleet.keys().ack(user, "phone");
        let deadline = Instant::now() + WAIT_TIMEOUT;
        loop {
            let stored: Option<String> = commands
                .query(redis::cmd("GET").arg(&key))
                .await
                .expect("GET");
            if stored.is_some() {
                break;
            }
            assert!(Instant::now() < deadline, "{key} never stored");
            tokio::time::sleep(POLL_INTERVAL).await;
        }
    }

    doomed.kill().expect("SIGKILL the node");
    for (i, client) in clients.iter_mut().enumerate() {
        // No close frame from a killed process: the stream just ends.
        let deadline = Instant::now() + WAIT_TIMEOUT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match client.next_event(left).await {
                Ok(WsEvent::Ended(_)) | Err(_) => break,
                Ok(WsEvent::Close(code, reason)) => {
                    panic!(
                        "{}: a SIGKILLed node sent close {code:?} {reason}",
                        users[i]
                    )
                }
                Ok(_) => {}
            }
        }
    }
    // While the clients are away.
    for round in 2..4 {
        for (i, user) in users.iter().enumerate() {
            let p = publish(
                &publisher,
                &to_users(&[user], &format!("{user}-{round}"), 3600),
            )
            .await
            .expect("publish while away");
            published[i].push(p.id);
        }
    }
    let mut resumed = Vec::new();
    for (i, user) in users.iter().enumerate() {
        let mut client = fleet.connect(0, user, "phone").await.expect("reconnect");
        client
            .send_json(&json!({"type": "resume", "after": last_seen[i].to_string()}))
            .await
            .expect("resume");
        resumed.push(client);
    }
    // After the reconnect, live again.
    for round in 4..5 {
        for (i, user) in users.iter().enumerate() {
            fleet
                .wait_subscribers(&fleet.keys().user_channel(user), 1)
                .await
                .expect("the surviving node holds the user");
            let p = publish(
                &publisher,
                &to_users(&[user], &format!("{user}-{round}"), 3600),
            )
            .await
            .expect("publish after the reconnect");
            published[i].push(p.id);
        }
    }
    for (i, client) in resumed.iter_mut().enumerate() {
        let user = users[i];
        let wanted = &published[i][2..];
        let seen = until_seen(client, wanted).await;
        // Also fine: the one seen before the kill but never acked (at-least-once).
        let unacked = &published[i][1];
        let in_order: Vec<&String> = seen.iter().filter(|id| *id != unacked).collect();
        assert_eq!(
            in_order,
            wanted.iter().collect::<Vec<_>>(),
            "{user}: everything after the last cursor seen, in order, nothing acked again \
             (seen {seen:?})"
        );
        // Whatever else is queued before the pong is one of those again, never the acked one.
        client
            .send_json(&json!({"type": "ping", "id": 5}))
            .await
            .expect("ping");
        loop {
            let frame = client.recv_json(READ_TIMEOUT).await.expect("frame");
            if frame["type"] == "pong" {
                break;
            }
            let id = fleet::id_of(&frame);
            assert!(
                frame["type"] == "notification" && (wanted.contains(&id) || id == *unacked),
                "{user}: unexpected {frame}"
            );
        }
    }
}
