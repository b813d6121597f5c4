//! The multi-node checks against a real Redis Cluster (DESIGN §6: sharded pub/sub,
//! `SSUBSCRIBE`/`SPUBLISH`, every key and channel with a hash tag): three masters started and
//! joined by the harness (`redis-cli --cluster create`), gateway nodes given the three seed
//! URLs with `redis_cluster = true`. User delivery across nodes, topic, broadcast, geo,
//! offline replay, channel release (`PUBSUB SHARDNUMSUB` summed over the masters), and a
//! notification published the moment its session is welcomed.
//!
//! Each test builds its own cluster (the checks live in `geopush_tests::fleet`, shared with
//! `multinode.rs`).

use geopush_tests::fleet::{self, Fleet};
use geopush_tests::redis::Redis;

async fn cluster_fleet(nodes: usize) -> Fleet {
    let redis = Redis::cluster()
        .await
        .expect("a three-master Redis Cluster");
    Fleet::start(redis, nodes)
        .await
        .expect("ready gateway nodes on the cluster")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_user_notifications_reach_their_sessions_on_any_node() {
    let fleet = cluster_fleet(2).await;
    fleet::user_notifications_cross_nodes(&fleet)
        .await
        .unwrap_or_else(|e| panic!("{e:#}"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_topic_reaches_every_subscribed_session_once() {
    let fleet = cluster_fleet(2).await;
    fleet::topic_reaches_each_subscriber_once(&fleet)
        .await
        .unwrap_or_else(|e| panic!("{e:#}"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_broadcast_reaches_every_session_once() {
    let fleet = cluster_fleet(2).await;
    fleet::broadcast_reaches_everyone_once(&fleet)
        .await
        .unwrap_or_else(|e| panic!("{e:#}"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_geo_notifications_reach_exactly_the_clients_inside() {
    let fleet = cluster_fleet(3).await;
    fleet::geo_reaches_exactly_the_clients_inside(&fleet)
        .await
        .unwrap_or_else(|e| panic!("{e:#}"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_offline_device_catches_up_on_another_node() {
    let fleet = cluster_fleet(2).await;
    fleet::offline_device_catches_up_on_another_node(&fleet)
        .await
        .unwrap_or_else(|e| panic!("{e:#}"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_channels_are_released_after_their_sessions_leave() {
    let fleet = cluster_fleet(2).await;
    fleet::subscriptions_released_after_clients_leave(&fleet)
        .await
        .unwrap_or_else(|e| panic!("{e:#}"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_a_notification_published_right_after_welcome_arrives() {
    let fleet = cluster_fleet(2).await;
    fleet::published_right_after_welcome_arrives(&fleet)
        .await
        .unwrap_or_else(|e| panic!("{e:#}"));
}
