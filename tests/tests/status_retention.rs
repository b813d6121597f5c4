//! How long a notification's status outlives it is `GEOPUSH_STATUS_RETENTION_SECONDS`: the
//! `gp:n:{id}` hash (`{id}` a hash tag)'s TTL in a real Redis is the notification's `ttl_s` plus that, and
//! nothing else; the default keeps a day.

use geopush_tests::redis::RedisServer;
use geopush_tests::worker::TestWorker;
use redis::AsyncCommands;
use serde_json::json;

/// Publish a user notification with `ttl_s` and return the PTTL of its status hash.
async fn status_pttl_ms(worker: &TestWorker, redis: &RedisServer, ttl_s: u64) -> i64 {
    let id = worker
        .api()
        .publish_id(&json!({
            "target": {"users": ["retention-user"]},
            "title": "t",
            "ttl_s": ttl_s,
        }))
        .await
        .expect("publish");
    let mut conn = redis.connection().await.expect("redis");
    conn.pttl(format!("gp:n:{{{id}}}")).await.expect("PTTL")
}

#[tokio::test]
async fn the_status_hash_lives_ttl_plus_the_configured_retention() {
    let redis = RedisServer::start().await.expect("redis");

    let worker = TestWorker::start_with(&redis.url(), |config| {
        config.api.status_retention_seconds = 120;
    })
    .await
    .expect("worker");
    worker.wait_ready().await.expect("ready");
    let pttl = status_pttl_ms(&worker, &redis, 60).await;
    // 60 s + 120 s, less the moments the publish and the PTTL took.
    assert!(
        (170_000..=180_000).contains(&pttl),
        "PTTL {pttl} ms, expected about 180,000"
    );
    worker.stop().await.expect("stop");

    let worker = TestWorker::start(&redis.url()).await.expect("worker");
    worker.wait_ready().await.expect("ready");
    let pttl = status_pttl_ms(&worker, &redis, 60).await;
    assert!(
        (86_390_000..=86_460_000).contains(&pttl),
        "PTTL {pttl} ms, expected about a day and a minute"
    );
    worker.stop().await.expect("stop");
}
