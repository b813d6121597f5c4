//! Durable per-user delivery on one node (in-memory bus): notifications published while a
//! device is offline are replayed in order on connect; acks move the device's cursor;
//! `resume` replays from an explicit cursor; expired notifications are never delivered;
//! live notifications during a replay keep the order.

use geopush_proto::api::{NotificationRequest, PublishTarget};
use geopush_tests::gateway::TestGateway;
use geopush_tests::tokens::device_token;
use geopush_tests::{READ_TIMEOUT, WsClient};
use serde_json::{Value, json};

fn to_user(user: &str, title: &str, ttl_s: u64) -> NotificationRequest {
    NotificationRequest {
        target: PublishTarget::Users(vec![user.into()]),
        title: title.into(),
        body: String::new(),
        data: None,
        ttl_s,
        send_at: None,
        idempotency_key: None,
    }
}

async fn titles(client: &mut WsClient, count: usize) -> Vec<Value> {
    let mut out = Vec::new();
    for _ in 0..count {
        out.push(
            client
                .expect_type("notification", READ_TIMEOUT)
                .await
                .expect("notification"),
        );
    }
    out
}

#[tokio::test]
async fn offline_device_gets_its_inbox_in_order_and_acks_move_its_cursor() {
    let gw = TestGateway::start_with(|_| {}).await.expect("gateway");
    let publisher = gw.gateway().publisher();
    for i in 0..5 {
        publisher
            .publish(&to_user("ann", &format!("n{i}"), 3600))
            .await
            .expect("publish");
    }
    let token = device_token("ann", "phone").expect("token");
    let (mut phone, _) = WsClient::connect_welcomed(gw.addr(), &token)
        .await
        .expect("connect");
    let got = titles(&mut phone, 5).await;
    let seen: Vec<_> = got
        .iter()
        .map(|n| n["title"].as_str().unwrap_or("").to_owned())
        .collect();
    assert_eq!(seen, ["n0", "n1", "n2", "n3", "n4"]);
    assert!(
        got.iter()
            .all(|n| n["cursor"].is_string() && n["id"].is_string())
    );

    // Ack the first three, reconnect: only n3 and n4 come again.
    let ids: Vec<_> = got[..3].iter().map(|n| n["id"].clone()).collect();
    phone
        .send_json(&json!({"type": "ack", "ids": ids}))
        .await
        .expect("ack");
    phone.roundtrip(1).await.expect("ack handled");
    phone.close().await.expect("close");
    let (mut phone, _) = WsClient::connect_welcomed(gw.addr(), &token)
        .await
        .expect("reconnect");
    let again = titles(&mut phone, 2).await;
    assert_eq!(again[0]["title"], "n3");
    assert_eq!(again[1]["title"], "n4");
    phone.roundtrip(2).await.expect("nothing more");

    // An explicit resume replays after that cursor.
    let cursor = got[0]["cursor"].as_str().expect("cursor").to_owned();
    phone
        .send_json(&json!({"type": "resume", "after": cursor}))
        .await
        .expect("resume");
    let resumed = titles(&mut phone, 4).await;
    assert_eq!(resumed[0]["title"], "n1");
    assert_eq!(resumed[3]["title"], "n4");
    // A bad cursor is a bad request.
    phone
        .send_json(&json!({"type": "resume", "after": "yesterday"}))
        .await
        .expect("resume");
    phone.expect_error("bad_request").await.expect("bad cursor");

    // Another device of the same user has its own cursor: it gets all five.
    let tablet_token = device_token("ann", "tablet").expect("token");
    let (mut tablet, _) = WsClient::connect_welcomed(gw.addr(), &tablet_token)
        .await
        .expect("tablet");
    assert_eq!(titles(&mut tablet, 5).await.len(), 5);

    // Live delivery reaches both devices, once each.
    publisher
        .publish(&to_user("ann", "live", 3600))
        .await
        .expect("publish");
    for client in [&mut phone, &mut tablet] {
        let live = client
            .expect_type("notification", READ_TIMEOUT)
            .await
            .expect("live");
        assert_eq!(live["title"], "live");
        client.roundtrip(9).await.expect("exactly once");
    }
}

#[tokio::test]
async fn expired_notifications_are_never_delivered() {
    let gw = TestGateway::start_with(|_| {}).await.expect("gateway");
    let publisher = gw.gateway().publisher();
    publisher
        .publish(&to_user("bo", "short", 1))
        .await
        .expect("publish");
    publisher
        .publish(&to_user("bo", "long", 3600))
        .await
        .expect("publish");
    // Wait past the one-second TTL by polling the clock, not by a long sleep.
    let deadline = std::time::Instant::now() + std::time::Duration::from_millis(1_100);
    while std::time::Instant::now() < deadline {
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let token = device_token("bo", "phone").expect("token");
    let (mut phone, _) = WsClient::connect_welcomed(gw.addr(), &token)
        .await
        .expect("connect");
    let first = phone
        .expect_type("notification", READ_TIMEOUT)
        .await
        .expect("notification");
    assert_eq!(first["title"], "long");
    phone.roundtrip(1).await.expect("nothing stale");
}

#[tokio::test]
async fn a_large_inbox_replays_in_order_while_live_notifications_arrive() {
    let gw = TestGateway::start_with(|c| c.queue_len = 32)
        .await
        .expect("gateway");
    let publisher = gw.gateway().publisher();
    for i in 0..300 {
        publisher
            .publish(&to_user("cy", &format!("{i:04}"), 3600))
            .await
            .expect("publish");
    }
    let token = device_token("cy", "phone").expect("token");
    let (mut phone, _) = WsClient::connect_welcomed(gw.addr(), &token)
        .await
        .expect("connect");
    let live = tokio::spawn(async move {
        for i in 300..320 {
            publisher
                .publish(&to_user("cy", &format!("{i:04}"), 3600))
                .await
                .expect("publish");
            tokio::task::yield_now().await;
        }
    });
    let got = titles(&mut phone, 320).await;
    live.await.expect("live publisher");
    let seen: Vec<_> = got
        .iter()
        .map(|n| n["title"].as_str().unwrap_or("").to_owned())
        .collect();
    let want: Vec<_> = (0..320).map(|i| format!("{i:04}")).collect();
    assert_eq!(
        seen, want,
        "in order, without gaps or duplicates, and no 4009 with a queue of 32"
    );
    phone.roundtrip(1).await.expect("nothing more");
}
