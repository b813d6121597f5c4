//! Racing publishers cannot make a gateway lose a user notification.
//!
//! A gateway skips a user notification whose cursor is not after the last one it delivered
//! to a session (that is how replays and live deliveries dedupe). So a user's messages must
//! reach the gateways in inbox order, even when many publishers on many threads publish to
//! the same user at once. Before the append and the publish became one Redis script, a
//! later cursor could be published first and the earlier one was skipped: the loadtest
//! through the worker lost 74 of 75,000 at 5,000/s.

use geopush_gateway::bus::redis::RedisTarget;
use geopush_gateway::publish::Publisher;
use geopush_proto::api::{NotificationRequest, PublishTarget};
use geopush_tests::gateway::{TestGateway, redis_config};
use geopush_tests::redis::RedisServer;
use geopush_tests::tokens::device_token;
use geopush_tests::{READ_TIMEOUT, WsClient};
use std::collections::HashSet;

/// Notifications published at once to the one user.
const CONCURRENT: usize = 400;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_publishes_to_one_user_all_arrive_in_cursor_order() {
    let redis = RedisServer::start().await.expect("redis");
    let gateway = TestGateway::start_redis(redis_config(&redis.url(), false, "gw-order"))
        .await
        .expect("gateway");
    let token = device_token("racer", "phone").expect("token");
    let (mut client, _) = WsClient::connect_welcomed(gateway.addr(), &token)
        .await
        .expect("connect");
    // A first notification proves the user's channel is subscribed.
    let publisher = Publisher::connect(&RedisTarget::parse(&redis.url(), false), "gp:", 1_000)
        .await
        .expect("publisher");
    let request = |title: String| NotificationRequest {
        target: PublishTarget::Users(vec!["racer".into()]),
        title,
        body: String::new(),
        data: None,
        ttl_s: 600,
        send_at: None,
        idempotency_key: None,
    };
    publisher
        .publish(&request("warm-up".into()))
        .await
        .expect("publish");
    client
        .expect_type("notification", READ_TIMEOUT)
        .await
        .expect("warm-up arrives");

    let mut tasks = Vec::new();
    for i in 0..CONCURRENT {
        let publisher = publisher.clone();
        let request = request(format!("n{i}"));
        tasks.push(tokio::spawn(async move {
            publisher.publish(&request).await.map(|p| p.id)
        }));
    }
    let mut published = HashSet::new();
    for task in tasks {
        published.insert(task.await.expect("task").expect("publish"));
    }
    let mut received = HashSet::new();
    let mut last_cursor = String::new();
    while received.len() < CONCURRENT {
        let frame = client
            .expect_type("notification", READ_TIMEOUT)
            .await
            .unwrap_or_else(|e| panic!("{} of {CONCURRENT} arrived, then: {e}", received.len()));
        let cursor = frame["cursor"].as_str().expect("cursor").to_owned();
        // Cursors are `ms-seq`; compare them as numbers.
        let key = |c: &str| {
            let (ms, seq) = c.split_once('-').expect("ms-seq");
            (
                ms.parse::<u64>().expect("ms"),
                seq.parse::<u64>().expect("seq"),
            )
        };
        if !last_cursor.is_empty() {
            assert!(
                key(&cursor) > key(&last_cursor),
                "{cursor} after {last_cursor}"
            );
        }
        last_cursor = cursor;
        let id = frame["id"].as_str().expect("id").to_owned();
        assert!(published.contains(&id), "unknown id {id}");
        assert!(received.insert(id), "duplicate");
    }
    gateway.shutdown().await.expect("shutdown");
}
