//! Places through Redis: a place written to the store appears on every node (and in
//! `nearby`); changes and deletes follow; a node that starts after the change log was
//! trimmed converges from the snapshot; geofence events land in the `gp:events` stream.

use geopush_gateway::bus::places_sync::PlacesStore;
use geopush_gateway::bus::redis::RedisTarget;
use geopush_proto::place::{Place, PlaceFence};
use geopush_tests::gateway::{TestGateway, redis_config};
use geopush_tests::redis::Redis;
use geopush_tests::tokens::user_token;
use geopush_tests::wait::eventually;
use geopush_tests::{READ_TIMEOUT, WsClient};
use std::collections::HashMap;
use std::time::Duration;

const WITHIN: Duration = Duration::from_secs(10);
const BERLIN: (f64, f64) = (52.52, 13.405);

fn place(id: &str, name: &str, at: (f64, f64), fence_m: Option<f64>) -> Place {
    Place {
        id: id.into(),
        name: name.into(),
        lat: at.0,
        lon: at.1,
        tags: Default::default(),
        fence: fence_m.map(|radius_m| PlaceFence::Circle { radius_m }),
        dwell_s: None,
    }
}

async fn connect(node: &TestGateway, user: &str) -> WsClient {
    let token = user_token(user).expect("token");
    let (client, _) = WsClient::connect_welcomed(node.addr(), &token)
        .await
        .expect("connect");
    client
}

fn name_on(node: &TestGateway, id: &str) -> Option<String> {
    node.gateway()
        .places()
        .snapshot()
        .get(id)
        .map(|(_, e)| e.place.name.clone())
}

async fn nodes(redis: &Redis, count: usize) -> Vec<TestGateway> {
    let mut nodes = Vec::new();
    for i in 0..count {
        let node = TestGateway::start_redis(redis_config(
            &redis.url(),
            redis.is_cluster(),
            &format!("places-{i}"),
        ))
        .await
        .expect("node");
        node.wait_ready().await.expect("ready");
        nodes.push(node);
    }
    nodes
}

#[tokio::test]
async fn places_written_to_the_store_reach_every_node() {
    places_reach_every_node(Redis::single().await.expect("redis")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn places_reach_every_node_on_a_cluster() {
    places_reach_every_node(Redis::cluster().await.expect("cluster")).await;
}

async fn places_reach_every_node(redis: Redis) {
    let nodes = nodes(&redis, 2).await;
    let store = nodes[0]
        .gateway()
        .places_store()
        .expect("a Redis node has a store");

    store
        .upsert(&[place("cafe", "Café", BERLIN, None)])
        .await
        .expect("upsert");
    eventually("the cafe on every node", WITHIN, || {
        nodes
            .iter()
            .all(|n| name_on(n, "cafe").as_deref() == Some("Café"))
    })
    .await
    .expect("propagated");
    // A client on the second node sees it in `nearby`.
    let mut client = connect(&nodes[1], "near").await;
    client.send_fix(BERLIN.0, BERLIN.1).await.expect("fix");
    let nearby = client
        .expect_type("nearby", READ_TIMEOUT)
        .await
        .expect("nearby");
    assert_eq!(nearby["places"][0]["id"], "cafe");

    store
        .upsert(&[place("cafe", "Café Neu", BERLIN, None)])
        .await
        .expect("rename");
    eventually("the rename on every node", WITHIN, || {
        nodes
            .iter()
            .all(|n| name_on(n, "cafe").as_deref() == Some("Café Neu"))
    })
    .await
    .expect("renamed");
    store.delete(&["cafe".into()]).await.expect("delete");
    eventually("the delete on every node", WITHIN, || {
        nodes.iter().all(|n| name_on(n, "cafe").is_none())
    })
    .await
    .expect("deleted");
    assert!(nodes.iter().all(|n| n.metric("geopush_places", &[]) == 0.0));
}

#[tokio::test]
async fn a_node_starting_after_the_log_was_trimmed_converges() {
    let redis = Redis::single().await.expect("redis");
    let store = PlacesStore::connect(&RedisTarget::parse(&redis.url(), false), "gp:")
        .await
        .expect("store");
    let places: Vec<Place> = (0..50)
        .map(|i| {
            place(
                &format!("p{i}"),
                &format!("P{i}"),
                (52.0 + f64::from(i) * 0.01, 13.0),
                None,
            )
        })
        .collect();
    store.upsert(&places).await.expect("upsert");
    store.delete(&["p0".into()]).await.expect("delete");
    store.trim_log(1).await.expect("trim");
    let nodes = nodes(&redis, 1).await;
    assert_eq!(nodes[0].gateway().places().snapshot().len(), 49);
    assert!(name_on(&nodes[0], "p0").is_none());
    assert_eq!(name_on(&nodes[0], "p49").as_deref(), Some("P49"));

    // After converging from the snapshot it follows the log again.
    store
        .upsert(&[place("late", "Late", BERLIN, None)])
        .await
        .expect("upsert");
    eventually("the late place", WITHIN, || {
        name_on(&nodes[0], "late").is_some()
    })
    .await
    .expect("late");
}

#[tokio::test]
async fn geofence_events_land_in_the_events_stream() {
    let redis = Redis::single().await.expect("redis");
    let nodes = nodes(&redis, 1).await;
    let store = nodes[0].gateway().places_store().expect("store");
    store
        .upsert(&[place("park", "Park", BERLIN, Some(200.0))])
        .await
        .expect("upsert");
    eventually("the park", WITHIN, || name_on(&nodes[0], "park").is_some())
        .await
        .expect("park");

    let mut client = connect(&nodes[0], "walker").await;
    client.send_fix(BERLIN.0, BERLIN.1).await.expect("fix");
    let enter = client
        .expect_type("geofence", READ_TIMEOUT)
        .await
        .expect("enter");
    assert_eq!(enter["event"], "enter");

    let events = || async {
        redis.servers()[0]
            .query::<Vec<(String, HashMap<String, String>)>>(
                redis::cmd("XRANGE").arg("gp:events").arg("-").arg("+"),
            )
            .await
            .unwrap_or_default()
    };
    let mut seen = Vec::new();
    for _ in 0..250 {
        seen = events().await;
        if !seen.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(seen.len(), 1, "{seen:?}");
    let fields = &seen[0].1;
    assert_eq!(fields.get("user").map(String::as_str), Some("walker"));
    assert_eq!(fields.get("place").map(String::as_str), Some("park"));
    assert_eq!(fields.get("event").map(String::as_str), Some("enter"));
}
