//! The `notify` scenario against two in-process gateways on a redis-server of its own:
//! small and short, so it cannot rot.

use geopush_gateway::Gateway;
use geopush_gateway::config::{Config, Secret};
use geopush_loadtest::notify::{self, NotifyArgs};
use std::time::Duration;
use support::{InProcessGateway, RedisServer};

mod support;

const SECRET: &str = "notify-smoke-secret";

/// A gateway on 127.0.0.1:0 using `redis_url`, ready.
async fn start_gateway(redis_url: &str, node: &str) -> InProcessGateway {
    let mut config = Config::defaults();
    config.tokens.jwt_secret = Some(Secret::new(SECRET));
    config.redis_url = Some(redis_url.into());
    config.node_id = Some(node.into());
    config.subscription_linger_seconds = 0.3;
    config.drain_seconds = 0.1;
    config.shutdown_grace_seconds = 1.0;
    InProcessGateway::serve(Gateway::start(config).await.expect("gateway start")).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn notify_scenario_delivers_everything_through_redis_to_two_gateways() {
    let redis = RedisServer::start().await;
    let gateway_a = start_gateway(&redis.url(), "gw-a").await;
    let gateway_b = start_gateway(&redis.url(), "gw-b").await;

    let mut args = NotifyArgs::new(
        vec![gateway_a.url.clone(), gateway_b.url.clone()],
        SECRET,
        &redis.url(),
    );
    args.users = 10;
    args.rate = 200.0;
    args.seconds = 1.0;
    args.publishers = 8;
    args.settle_seconds = 0.5;
    args.drain_seconds = 5.0;
    args.churn = 6;
    args.linger_seconds = 0.3;
    // The gateways run in this process: their /proc figures are ours, which is enough to
    // exercise the sampling path.
    args.gateway_pid = vec![std::process::id(); 2];

    let report = tokio::time::timeout(Duration::from_secs(60), notify::run(args))
        .await
        .expect("the run is bounded")
        .expect("run");
    let summary = report.summary();
    assert_eq!(report.connected, 10, "{summary}");
    assert_eq!(report.publisher.published, 200, "{summary}");
    assert_eq!(report.publisher.errors, 0, "{summary}");
    assert_eq!(report.delivered, report.expected, "{summary}");
    assert_eq!(report.lost, 0, "{summary}");
    assert_eq!(report.duplicates, 0, "{summary}");
    assert_eq!(report.unstamped, 0, "{summary}");
    assert_eq!(report.latency.count, 200, "{summary}");
    assert!(
        report.delivered_per_gateway.iter().all(|&n| n > 0),
        "{summary}"
    );
    assert_eq!(report.acks_sent, 200, "{summary}");
    // Every delivery is one XADD and one PUBLISH.
    assert_eq!(report.redis.calls.get("xadd"), Some(&200), "{summary}");
    assert!(report.redis.calls.get("publish").copied().unwrap_or(0) >= 200);
    assert_eq!(report.gateways.len(), 2);
    assert!(report.redis_process.is_some(), "{summary}");
    let churn = report.churn.as_ref().expect("churn");
    assert_eq!(churn.connected, 6, "{summary}");
    assert!(churn.subscribe_per_connect > 0.0, "{summary}");
    assert!(churn.unsubscribe_per_disconnect > 0.0, "{summary}");
    assert!(summary.contains("latency"));
    assert!(serde_json::to_string(&report).is_ok());

    gateway_a.stop().await;
    gateway_b.stop().await;
}
