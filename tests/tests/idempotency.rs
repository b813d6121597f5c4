//! Idempotency keys: publishing twice with one key sends once and returns the first id, in
//! single-node mode and through Redis; a key whose first publish did not finish is
//! published again under the same id (clients dedupe by id).

use geopush_gateway::bus::redis::RedisTarget;
use geopush_gateway::publish::Publisher;
use geopush_proto::api::{NotificationRequest, PublishTarget};
use geopush_tests::gateway::{TestGateway, redis_config};
use geopush_tests::redis::Redis;
use geopush_tests::tokens::device_token;
use geopush_tests::{READ_TIMEOUT, WsClient};

fn keyed(user: &str, key: &str) -> NotificationRequest {
    NotificationRequest {
        target: PublishTarget::Users(vec![user.into()]),
        title: "once".into(),
        body: String::new(),
        data: None,
        ttl_s: 3600,
        send_at: None,
        idempotency_key: Some(key.into()),
    }
}

async fn publishes_once(gw: &TestGateway, publisher: &Publisher) {
    let token = device_token("idem", "phone").expect("token");
    let (mut phone, _) = WsClient::connect_welcomed(gw.addr(), &token)
        .await
        .expect("connect");
    phone.roundtrip(1).await.expect("connected");
    let first = publisher
        .publish(&keyed("idem", "fest-2026"))
        .await
        .expect("first");
    let second = publisher
        .publish(&keyed("idem", "fest-2026"))
        .await
        .expect("second");
    assert_eq!(first.id, second.id, "a repeat returns the first id");
    assert_eq!(second.queued, 0, "and sends nothing");
    let frame = phone
        .expect_type("notification", READ_TIMEOUT)
        .await
        .expect("notification");
    assert_eq!(frame["id"], first.id.as_str());
    phone.roundtrip(2).await.expect("exactly one delivery");
    let other = publisher
        .publish(&keyed("idem", "another-key"))
        .await
        .expect("other key");
    assert_ne!(other.id, first.id);
}

#[tokio::test]
async fn single_node_publishes_a_key_once() {
    let gw = TestGateway::start_with(|_| {}).await.expect("gateway");
    publishes_once(&gw, &gw.gateway().publisher()).await;
}

#[tokio::test]
async fn redis_publishes_a_key_once_and_retries_an_unfinished_one_under_its_id() {
    let redis = Redis::single().await.expect("redis");
    let gw = TestGateway::start_redis(redis_config(&redis.url(), false, "idem-0"))
        .await
        .expect("node");
    gw.wait_ready().await.expect("ready");
    let publisher = Publisher::connect(&RedisTarget::parse(&redis.url(), false), "gp:", 1000)
        .await
        .expect("publisher");
    publishes_once(&gw, &publisher).await;

    // A publish that died after claiming its key: the retry reuses the claimed id.
    let _: () = redis.servers()[0]
        .query(
            redis::cmd("SET")
                .arg("gp:idem:{half-done}")
                .arg("pending:01TESTID0000000000000000000"),
        )
        .await
        .expect("seed a pending key");
    let retried = publisher
        .publish(&keyed("idem", "half-done"))
        .await
        .expect("retry");
    assert_eq!(retried.id, "01TESTID0000000000000000000");
    let again = publisher
        .publish(&keyed("idem", "half-done"))
        .await
        .expect("repeat");
    assert_eq!(
        (again.id.as_str(), again.queued),
        ("01TESTID0000000000000000000", 0)
    );
}
