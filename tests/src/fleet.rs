//! A fleet: several in-process gateway nodes sharing one Redis deployment (a standalone
//! server or a cluster), a standalone publisher as a backend would use, and the delivery
//! checks that `tests/multinode.rs` and `tests/cluster.rs` both run against a fleet.
//!
//! Every check starts from what a client can see (frames on its socket, counted; an
//! app-level `ping` round trip proves nothing more was queued before it) and adds what Redis
//! can see (`PUBSUB NUMSUB`/`SHARDNUMSUB`: which nodes subscribe a channel). Before a
//! publish that is best effort by contract (topic, broadcast, area: "to clients connected at
//! send time"), the checks wait until Redis shows the subscriptions the publish needs, since
//! subscribing is asynchronous; a node that never subscribes fails that wait, with the count
//! Redis reported.

use crate::geometry::{distance_to_rings_deg, haversine_m, in_polygon};
use crate::redis::Redis;
use crate::tokens::device_token;
use crate::wait::POLL_INTERVAL;
use crate::{READ_TIMEOUT, TestGateway, WAIT_TIMEOUT, WsClient};
use anyhow::{Context, bail, ensure};
use futures_util::future::join_all;
use geopush_gateway::bus::redis::RedisTarget;
use geopush_gateway::config::Config;
use geopush_gateway::publish::{Published, Publisher, cells_for_area};
use geopush_proto::api::{NotificationRequest, PublishTarget};
use geopush_proto::bus::{CELL_LEVELS, Keys, geohash};
use geopush_proto::{Area, Circle, Polygon};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{Value, json};
use std::collections::{BTreeMap, HashSet};
use std::time::Duration;
use tokio::time::Instant;

/// The key prefix every fleet uses (the default).
pub const PREFIX: &str = "gp:";

/// A request for `users`, with a TTL.
pub fn to_users(users: &[&str], title: &str, ttl_s: u64) -> NotificationRequest {
    request(
        PublishTarget::Users(users.iter().map(|u| (*u).to_owned()).collect()),
        title,
        ttl_s,
    )
}

/// A request for everyone subscribed to `topic`.
pub fn to_topic(topic: &str, title: &str) -> NotificationRequest {
    request(PublishTarget::Topic(topic.to_owned()), title, 3600)
}

/// A request for every session.
pub fn to_all(title: &str) -> NotificationRequest {
    request(PublishTarget::All(true), title, 3600)
}

/// A request for the sessions in `area`.
pub fn to_area(area: Area, title: &str) -> NotificationRequest {
    request(PublishTarget::Area(area), title, 3600)
}

fn request(target: PublishTarget, title: &str, ttl_s: u64) -> NotificationRequest {
    NotificationRequest {
        target,
        title: title.to_owned(),
        body: format!("body of {title}"),
        data: None,
        ttl_s,
        send_at: None,
        idempotency_key: None,
    }
}

/// A standalone publisher on `redis` (what the worker uses), with the fleet's prefix.
pub async fn standalone_publisher(redis: &Redis) -> anyhow::Result<Publisher> {
    let target = RedisTarget::parse(&redis.url(), redis.is_cluster());
    Publisher::connect(&target, PREFIX, 1000)
        .await
        .context("connecting a standalone publisher")
}

/// Publish, with the title in the error.
pub async fn publish(
    publisher: &Publisher,
    request: &NotificationRequest,
) -> anyhow::Result<Published> {
    publisher
        .publish(request)
        .await
        .with_context(|| format!("publishing {:?}", request.title))
}

/// A frame's `id` as a string (empty when it has none).
pub fn id_of(frame: &Value) -> String {
    frame["id"].as_str().unwrap_or_default().to_owned()
}

/// Nodes sharing one Redis deployment.
pub struct Fleet {
    pub redis: Redis,
    nodes: Vec<TestGateway>,
    publisher: Publisher,
    keys: Keys,
}

impl Fleet {
    /// `count` nodes named `node-0`, `node-1`, … on `redis` with [`crate::gateway::redis_config`],
    /// each ready (`/readyz` 200) before this returns.
    pub async fn start(redis: Redis, count: usize) -> anyhow::Result<Fleet> {
        Fleet::start_with(redis, count, |_| {}).await
    }

    /// Like [`Fleet::start`], with every node's configuration changed by `adjust`.
    pub async fn start_with(
        redis: Redis,
        count: usize,
        adjust: impl Fn(&mut Config),
    ) -> anyhow::Result<Fleet> {
        let url = redis.url();
        let mut nodes = Vec::with_capacity(count);
        for i in 0..count {
            let mut config =
                crate::gateway::redis_config(&url, redis.is_cluster(), &format!("node-{i}"));
            adjust(&mut config);
            nodes.push(TestGateway::start_redis(config).await?);
        }
        for node in &nodes {
            node.wait_ready().await?;
        }
        let publisher = standalone_publisher(&redis).await?;
        Ok(Fleet {
            redis,
            nodes,
            publisher,
            keys: Keys::new(PREFIX),
        })
    }

    pub fn node(&self, i: usize) -> &TestGateway {
        &self.nodes[i]
    }

    pub fn nodes(&self) -> &[TestGateway] {
        &self.nodes
    }

    /// The standalone publisher (not a node's).
    pub fn publisher(&self) -> &Publisher {
        &self.publisher
    }

    pub fn keys(&self) -> &Keys {
        &self.keys
    }

    /// Connect `user`'s `device` to node `node` and read its `welcome`.
    pub async fn connect(&self, node: usize, user: &str, device: &str) -> anyhow::Result<WsClient> {
        let token = device_token(user, device)?;
        let (client, welcome) = WsClient::connect_welcomed(self.nodes[node].addr(), &token)
            .await
            .with_context(|| format!("{user}/{device} connecting to node-{node}"))?;
        ensure!(
            welcome["node"] == format!("node-{node}"),
            "welcome from the wrong node: {welcome}"
        );
        Ok(client)
    }

    /// `geopush_deliveries_total{kind="notification"}` of a node.
    pub fn deliveries(&self, node: usize) -> f64 {
        self.nodes[node].metric("geopush_deliveries_total", &[("kind", "notification")])
    }

    /// Wait until Redis reports exactly `counts[i]` subscribers for `channels[i]`; the error
    /// names every channel whose count differs.
    pub async fn wait_subscribers_of(
        &self,
        channels: &[String],
        counts: &[u64],
    ) -> anyhow::Result<()> {
        let deadline = Instant::now() + WAIT_TIMEOUT;
        loop {
            let now = self.redis.subscribers_of(channels).await?;
            if now == counts {
                return Ok(());
            }
            if Instant::now() >= deadline {
                let wrong: Vec<String> = channels
                    .iter()
                    .zip(counts.iter().zip(&now))
                    .filter(|(_, (want, got))| want != got)
                    .map(|(c, (want, got))| format!("{c}: {got} subscribers, expected {want}"))
                    .collect();
                bail!(
                    "after {WAIT_TIMEOUT:?}, Redis still reports {} of {} channels wrong: {}",
                    wrong.len(),
                    channels.len(),
                    wrong.join("; ")
                );
            }
            tokio::time::sleep(POLL_INTERVAL).await;
        }
    }

    /// Wait until Redis reports exactly `count` subscribers (one per node holding it).
    pub async fn wait_subscribers(&self, channel: &str, count: u64) -> anyhow::Result<()> {
        self.wait_subscribers_of(&[channel.to_owned()], &[count])
            .await
    }

    /// Wait until every user's channel has one subscriber (each user on one node).
    pub async fn wait_users_subscribed(&self, users: &[String]) -> anyhow::Result<()> {
        let channels: Vec<String> = users.iter().map(|u| self.keys.user_channel(u)).collect();
        self.wait_subscribers_of(&channels, &vec![1; channels.len()])
            .await
    }
}

/// A user notification published anywhere — through the standalone publisher or any
/// node's own publisher — reaches the node holding the user's session, exactly once; a
/// user with devices on two nodes gets it on both.
pub async fn user_notifications_cross_nodes(fleet: &Fleet) -> anyhow::Result<()> {
    let last = fleet.nodes().len() - 1;
    let mut ann = fleet.connect(0, "ann", "phone").await?;
    fleet
        .wait_subscribers(&fleet.keys().user_channel("ann"), 1)
        .await?;
    let publishers = [
        ("standalone", fleet.publisher().clone()),
        ("node-1", fleet.node(1).gateway().publisher()),
        ("last node", fleet.node(last).gateway().publisher()),
    ];
    let mut cursors = Vec::new();
    for (i, (from, publisher)) in publishers.iter().enumerate() {
        let title = format!("for-ann-from-{from}");
        let published = publish(publisher, &to_users(&["ann"], &title, 3600)).await?;
        let frame = ann
            .expect_type("notification", READ_TIMEOUT)
            .await
            .with_context(|| format!("ann waiting for {title:?} published by {from}"))?;
        ensure!(
            frame["title"] == title && frame["id"] == published.id,
            "ann expected {title:?} ({}), got {frame}",
            published.id
        );
        let cursor = frame["cursor"]
            .as_str()
            .with_context(|| format!("a user notification without a cursor: {frame}"))?;
        cursors.push(geopush_proto::bus::Cursor::parse(cursor).context("cursor")?);
        ann.roundtrip(i as u64)
            .await
            .with_context(|| format!("exactly once: {title:?}"))?;
    }
    ensure!(
        cursors.windows(2).all(|w| w[0] < w[1]),
        "inbox cursors must grow: {cursors:?}"
    );

    let mut phone = fleet.connect(0, "bob", "phone").await?;
    let mut tablet = fleet.connect(1, "bob", "tablet").await?;
    fleet
        .wait_subscribers(&fleet.keys().user_channel("bob"), 2)
        .await
        .context("bob's channel: one subscriber per node with a bob session")?;
    let published = publish(fleet.publisher(), &to_users(&["bob"], "for-bob", 3600)).await?;
    for (name, device) in [
        ("phone (node-0)", &mut phone),
        ("tablet (node-1)", &mut tablet),
    ] {
        let frame = device
            .expect_type("notification", READ_TIMEOUT)
            .await
            .with_context(|| format!("bob's {name}"))?;
        ensure!(
            frame["id"] == published.id && frame["title"] == "for-bob",
            "bob's {name} got {frame}"
        );
        device
            .roundtrip(7)
            .await
            .with_context(|| format!("bob's {name}: exactly once"))?;
    }
    // ann was not a recipient.
    ann.roundtrip(99)
        .await
        .context("ann gets nothing for bob")?;
    Ok(())
}

/// Two sessions per node, one subscribed to a topic (twice, which is a no-op) and one not:
/// two topic publishes reach every subscribed session exactly once each, in order, and no
/// other session.
pub async fn topic_reaches_each_subscriber_once(fleet: &Fleet) -> anyhow::Result<()> {
    let n = fleet.nodes().len();
    let mut subscribed = Vec::new();
    let mut others = Vec::new();
    for node in 0..n {
        let mut fan = fleet.connect(node, &format!("fan-{node}"), "phone").await?;
        for _ in 0..2 {
            fan.send_json(&json!({"type": "subscribe", "topic": "traffic"}))
                .await?;
        }
        fan.roundtrip(1).await.context("subscribe handled")?;
        subscribed.push(fan);
        others.push(
            fleet
                .connect(node, &format!("other-{node}"), "phone")
                .await?,
        );
    }
    let users: Vec<String> = (0..n).map(|i| format!("other-{i}")).collect();
    fleet.wait_users_subscribed(&users).await?;
    let channel_ready = fleet
        .wait_subscribers(&fleet.keys().topic_channel("traffic"), n as u64)
        .await;
    let first = publish(fleet.publisher(), &to_topic("traffic", "jam-1")).await?;
    if let Err(e) = channel_ready {
        let delivered = how_many_got(&mut subscribed, &first.id).await;
        bail!(
            "every node with a session subscribed to topic \"traffic\" must subscribe its \
             channel once: {e:#}; a topic publish then reached {delivered}"
        );
    }
    let second = publish(fleet.publisher(), &to_topic("traffic", "jam-2")).await?;
    for (node, fan) in subscribed.iter_mut().enumerate() {
        for expected in [&first, &second] {
            let frame = fan
                .expect_type("notification", READ_TIMEOUT)
                .await
                .with_context(|| format!("subscriber on node-{node}"))?;
            ensure!(
                frame["id"] == expected.id && frame["cursor"].is_null(),
                "subscriber on node-{node}: expected {} without a cursor, got {frame}",
                expected.id
            );
        }
        fan.roundtrip(2)
            .await
            .with_context(|| format!("subscriber on node-{node}: each exactly once"))?;
    }
    // Every subscriber has both; a user notification after them shows what the others got.
    let refs: Vec<&str> = users.iter().map(String::as_str).collect();
    let sentinel = publish(fleet.publisher(), &to_users(&refs, "sentinel", 3600)).await?;
    for (node, other) in others.iter_mut().enumerate() {
        let before = other.frames_before(&sentinel.id, READ_TIMEOUT).await?;
        ensure!(
            before.is_empty(),
            "a session on node-{node} not subscribed to the topic got {before:?}"
        );
    }
    Ok(())
}

/// After a publish whose channel was not subscribed as it should be: how many of `clients`
/// got notification `id` anyway (each given a couple of seconds, all at once).
async fn how_many_got(clients: &mut [WsClient], id: &str) -> String {
    let total = clients.len();
    let got = join_all(
        clients
            .iter_mut()
            .map(|c| async move { c.frames_before(id, Duration::from_secs(2)).await.is_ok() }),
    )
    .await;
    format!(
        "{} of the {total} sessions it was for",
        got.iter().filter(|g| **g).count()
    )
}

/// Two sessions per node: two broadcasts reach every one of them exactly once, in order.
pub async fn broadcast_reaches_everyone_once(fleet: &Fleet) -> anyhow::Result<()> {
    let n = fleet.nodes().len();
    let mut clients = Vec::new();
    for node in 0..n {
        for k in 0..2 {
            clients.push((
                node,
                fleet
                    .connect(node, &format!("all-{node}-{k}"), "phone")
                    .await?,
            ));
        }
    }
    let channel_ready = fleet
        .wait_subscribers(&fleet.keys().all_channel(), n as u64)
        .await;
    let first = publish(fleet.publisher(), &to_all("everyone-1")).await?;
    if let Err(e) = channel_ready {
        let mut sessions: Vec<WsClient> = clients.into_iter().map(|(_, c)| c).collect();
        let delivered = how_many_got(&mut sessions, &first.id).await;
        bail!(
            "every node must subscribe the broadcast channel once: {e:#}; a broadcast then \
             reached {delivered}"
        );
    }
    let second = publish(fleet.publisher(), &to_all("everyone-2")).await?;
    for (i, (node, client)) in clients.iter_mut().enumerate() {
        for expected in [&first, &second] {
            let frame = client
                .expect_type("notification", READ_TIMEOUT)
                .await
                .with_context(|| format!("client {i} on node-{node}"))?;
            ensure!(
                frame["id"] == expected.id,
                "client {i} on node-{node}: expected {}, got {frame}",
                expected.id
            );
        }
        client
            .roundtrip(3)
            .await
            .with_context(|| format!("client {i} on node-{node}: each broadcast exactly once"))?;
    }
    Ok(())
}

/// Whether the reference puts a client inside, or too close to the boundary to say.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Expect {
    Inside,
    Outside,
    Boundary,
}

fn expect_in(area: &Area, lat: f64, lon: f64) -> Expect {
    match area {
        Area::Circle(c) => {
            let d = haversine_m(c.lat, c.lon, lat, lon);
            if (d - c.radius_m).abs() < 0.01 {
                Expect::Boundary
            } else if d < c.radius_m {
                Expect::Inside
            } else {
                Expect::Outside
            }
        }
        Area::Polygon(p) => {
            if distance_to_rings_deg(lon, lat, &p.rings) < 1e-9 {
                Expect::Boundary
            } else if in_polygon(lon, lat, &p.rings) {
                Expect::Inside
            } else {
                Expect::Outside
            }
        }
    }
}

struct GeoClient {
    node: usize,
    user: String,
    lat: f64,
    lon: f64,
    client: WsClient,
}

/// Clients at seeded random positions: in overlapping strips of Berlin on every node but
/// the last (node-0 further west than node-1, …), around Paris on the last. A circle and a
/// concave polygon with a hole, published once by the standalone publisher on the level-5
/// cells covering them, reach exactly the clients a brute-force reference puts inside,
/// whichever node holds them. Redis shows each covering cell subscribed by exactly the
/// nodes with a client in it, so the Paris node never hears of a Berlin area: its
/// notification deliveries move only by the user sentinel each of its clients gets.
pub async fn geo_reaches_exactly_the_clients_inside(fleet: &Fleet) -> anyhow::Result<()> {
    let n = fleet.nodes().len();
    ensure!(n >= 2, "the geo check needs a node far from the areas");
    let per_node = 24;
    let mut rng = StdRng::seed_from_u64(0x6e0_f1ee7);
    let mut placed = Vec::new();
    for node in 0..n {
        for i in 0..per_node {
            let (lat, lon) = if node + 1 < n {
                let west = 13.28 + 0.10 * node as f64;
                (
                    rng.gen_range(52.45..52.59),
                    rng.gen_range(west..west + 0.16),
                )
            } else {
                (rng.gen_range(48.80..48.90), rng.gen_range(2.30..2.40))
            };
            placed.push((node, format!("geo-{node}-{i}"), lat, lon));
        }
    }
    let mut clients = Vec::new();
    for batch in placed.chunks(24) {
        let connecting = batch.iter().map(|(node, user, lat, lon)| async move {
            let mut client = fleet.connect(*node, user, "phone").await?;
            client.send_fix(*lat, *lon).await?;
            client.roundtrip(0).await.context("fix handled")?;
            anyhow::Ok(GeoClient {
                node: *node,
                user: user.clone(),
                lat: *lat,
                lon: *lon,
                client,
            })
        });
        for client in join_all(connecting).await {
            clients.push(client?);
        }
    }
    for node in 0..n {
        let located = fleet.node(node).hub().located_count();
        ensure!(
            located == per_node,
            "node-{node} indexed {located} clients, expected {per_node}"
        );
    }
    let users: Vec<String> = clients.iter().map(|c| c.user.clone()).collect();
    fleet.wait_users_subscribed(&users).await?;

    let circle = Area::Circle(Circle {
        lat: 52.52,
        lon: 13.41,
        radius_m: 4_000.0,
    });
    // A concave "C" with a hole in its lower arm.
    let polygon = Area::Polygon(Polygon {
        rings: vec![
            vec![
                [13.33, 52.48],
                [13.45, 52.48],
                [13.45, 52.50],
                [13.36, 52.50],
                [13.36, 52.54],
                [13.45, 52.54],
                [13.45, 52.56],
                [13.33, 52.56],
                [13.33, 52.48],
            ],
            vec![
                [13.38, 52.484],
                [13.38, 52.496],
                [13.42, 52.496],
                [13.42, 52.484],
                [13.38, 52.484],
            ],
        ],
    });
    for (name, area) in [("circle", circle), ("polygon", polygon)] {
        area.validate().context("a valid test area")?;
        check_area(fleet, &mut clients, &users, name, area).await?;
    }
    Ok(())
}

async fn check_area(
    fleet: &Fleet,
    clients: &mut [GeoClient],
    users: &[String],
    name: &str,
    area: Area,
) -> anyhow::Result<()> {
    let n = fleet.nodes().len();
    let expect: Vec<Expect> = clients
        .iter()
        .map(|c| expect_in(&area, c.lat, c.lon))
        .collect();
    let inside = expect.iter().filter(|e| **e == Expect::Inside).count();
    let certain = expect.iter().filter(|e| **e != Expect::Boundary).count();
    ensure!(
        inside > 0 && inside < certain,
        "{name}: the area must split the crowd to prove anything ({inside} inside)"
    );

    // The channels the publisher will use, and the nodes that must subscribe each.
    let cells = cells_for_area(&area)
        .with_context(|| format!("{name}: the area is small enough for cell channels"))?;
    let level = cells[0].len();
    ensure!(
        level == 5,
        "{name}: the test area is covered by level-5 cells, got {cells:?}"
    );
    let channels: Vec<String> = cells.iter().map(|c| fleet.keys().cell_channel(c)).collect();
    let counts: Vec<u64> = cells
        .iter()
        .map(|cell| {
            (0..n)
                .filter(|node| {
                    clients
                        .iter()
                        .any(|c| c.node == *node && geohash::encode(c.lat, c.lon, level) == *cell)
                })
                .count() as u64
        })
        .collect();
    ensure!(
        counts.iter().any(|c| *c > 0),
        "{name}: some cell of the covering holds clients"
    );
    fleet
        .wait_subscribers_of(&channels, &counts)
        .await
        .with_context(|| {
            format!("{name}: each covering cell subscribed by exactly the nodes with clients in it")
        })?;

    let before: Vec<f64> = (0..n).map(|node| fleet.deliveries(node)).collect();
    let published = publish(fleet.publisher(), &to_area(area, name)).await?;
    ensure!(
        published.queued == cells.len(),
        "{name}: one message per cell ({} cells), the publisher sent {}",
        cells.len(),
        published.queued
    );
    // Every client the reference puts inside gets it next. Only then the sentinel (on user
    // channels, which on a cluster live on other shards than the cells: no order between
    // them), so that whatever else a client read before its sentinel was in its queue
    // together with the area message.
    let mut wrong = Vec::new();
    let mut received = vec![0usize; n];
    let mut expected_on = vec![0usize; n];
    for (i, c) in clients.iter_mut().enumerate() {
        expected_on[c.node] += usize::from(expect[i] == Expect::Inside);
        if expect[i] != Expect::Inside {
            continue;
        }
        match c.client.expect_type("notification", READ_TIMEOUT).await {
            Ok(frame) if frame["id"] == published.id => received[c.node] += 1,
            other => wrong.push(format!(
                "{} on node-{} at ({}, {}) is inside, and got {other:?}",
                c.user, c.node, c.lat, c.lon
            )),
        }
    }
    let refs: Vec<&str> = users.iter().map(String::as_str).collect();
    let sentinel_title = format!("{name}-sentinel");
    let sentinel = publish(fleet.publisher(), &to_users(&refs, &sentinel_title, 3600)).await?;
    for (i, c) in clients.iter_mut().enumerate() {
        let frames = c
            .client
            .frames_before(&sentinel.id, READ_TIMEOUT)
            .await
            .with_context(|| format!("{name}: {} on node-{}", c.user, c.node))?;
        match (frames.as_slice(), expect[i]) {
            ([], _) => {}
            ([frame], Expect::Boundary) if frame["id"] == published.id => received[c.node] += 1,
            _ => wrong.push(format!(
                "{} on node-{} at ({}, {}) ({:?}) received {frames:?}",
                c.user, c.node, c.lat, c.lon, expect[i]
            )),
        }
    }
    ensure!(
        wrong.is_empty(),
        "{name}: {} clients got the wrong answer: {}",
        wrong.len(),
        wrong.join("; ")
    );
    ensure!(
        received[n - 1] == 0 && expected_on[n - 1] == 0,
        "{name}: the far node's clients are outside"
    );
    for node in 0..n {
        let clients_on = clients.iter().filter(|c| c.node == node).count();
        let moved = fleet.deliveries(node) - before[node];
        let want = (received[node] + clients_on) as f64;
        ensure!(
            moved == want,
            "{name}: node-{node} counted {moved} notification deliveries, expected {want} \
             ({} in the area + {clients_on} sentinels)",
            received[node]
        );
    }
    Ok(())
}

/// A device acks, goes offline, and reconnects to another node: it receives exactly what
/// was published meanwhile, in inbox order, and nothing whose TTL (1 s) ran out.
pub async fn offline_device_catches_up_on_another_node(fleet: &Fleet) -> anyhow::Result<()> {
    let last = fleet.nodes().len() - 1;
    let mut phone = fleet.connect(0, "cy", "phone").await?;
    fleet
        .wait_subscribers(&fleet.keys().user_channel("cy"), 1)
        .await?;
    publish(fleet.publisher(), &to_users(&["cy"], "seen", 3600)).await?;
    let seen = phone.expect_type("notification", READ_TIMEOUT).await?;
    ensure!(seen["title"] == "seen", "expected \"seen\", got {seen}");
    phone
        .send_json(&json!({"type": "ack", "ids": [seen["id"].clone()]}))
        .await?;
    // The ack is stored in the background: wait until Redis has it.
    let cursor = seen["cursor"].as_str().context("cursor")?.to_owned();
    let ack_key = fleet.keys().ack("cy", "phone");
    let mut commands = fleet.redis.commands().await?;
    let deadline = Instant::now() + WAIT_TIMEOUT;
    loop {
        let stored: Option<String> = commands.query(redis::cmd("GET").arg(&ack_key)).await?;
        if stored.as_deref() == Some(cursor.as_str()) {
            break;
        }
        ensure!(
            Instant::now() < deadline,
            "{ack_key} holds {stored:?}, expected the acked cursor {cursor}"
        );
        tokio::time::sleep(POLL_INTERVAL).await;
    }
    phone.close().await?;
    drop(phone);

    let mut expired_after = Instant::now();
    for (title, ttl_s) in [
        ("away-1", 3600),
        ("away-2", 3600),
        ("stale", 1),
        ("away-3", 3600),
        ("away-4", 3600),
    ] {
        publish(fleet.publisher(), &to_users(&["cy"], title, ttl_s)).await?;
        if ttl_s == 1 {
            expired_after = Instant::now() + Duration::from_millis(1_100);
        }
    }
    // Past the short TTL (measured from after its publish returned), in short sleeps.
    while Instant::now() < expired_after {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut phone = fleet.connect(last, "cy", "phone").await?;
    let mut got = Vec::new();
    let mut cursors = Vec::new();
    for _ in 0..4 {
        let frame = phone
            .expect_type("notification", READ_TIMEOUT)
            .await
            .with_context(|| format!("after {got:?}"))?;
        got.push(frame["title"].as_str().unwrap_or_default().to_owned());
        cursors.push(
            frame["cursor"]
                .as_str()
                .and_then(geopush_proto::bus::Cursor::parse)
                .with_context(|| format!("cursor of {frame}"))?,
        );
    }
    ensure!(
        got == ["away-1", "away-2", "away-3", "away-4"],
        "replay on node-{last} after the acked cursor: {got:?}"
    );
    ensure!(
        cursors.windows(2).all(|w| w[0] < w[1]),
        "in inbox order: {cursors:?}"
    );
    phone
        .roundtrip(1)
        .await
        .context("nothing stale, nothing acked, nothing twice")?;
    Ok(())
}

/// A user's channel and cell channels are subscribed once per node holding a session of
/// the user, and unsubscribed (after the linger) when the sessions leave.
pub async fn subscriptions_released_after_clients_leave(fleet: &Fleet) -> anyhow::Result<()> {
    let (lat, lon) = (52.52, 13.405);
    let mut phone = fleet.connect(0, "dee", "phone").await?;
    let mut tablet = fleet.connect(1, "dee", "tablet").await?;
    for device in [&mut phone, &mut tablet] {
        device.send_fix(lat, lon).await?;
        device.roundtrip(1).await?;
    }
    let mut channels = vec![fleet.keys().user_channel("dee")];
    channels.extend(
        CELL_LEVELS
            .iter()
            .map(|&level| fleet.keys().cell_channel(&geohash::encode(lat, lon, level))),
    );
    let all = |count: u64| vec![count; channels.len()];
    fleet
        .wait_subscribers_of(&channels, &all(2))
        .await
        .context("two nodes hold dee's channels")?;
    phone.close().await?;
    fleet
        .wait_subscribers_of(&channels, &all(1))
        .await
        .context("node-0 lets go of dee's channels after the phone left")?;
    // node-1 still delivers.
    let published = publish(fleet.publisher(), &to_users(&["dee"], "still-here", 3600)).await?;
    let frame = tablet.expect_type("notification", READ_TIMEOUT).await?;
    ensure!(frame["id"] == published.id, "tablet got {frame}");
    tablet.close().await?;
    fleet
        .wait_subscribers_of(&channels, &all(0))
        .await
        .context("no node holds dee's channels after both devices left")?;
    Ok(())
}

/// Clients connect (in parallel, to every node) while a publisher streams notifications to
/// their users: every accepted notification reaches its user's session — published before
/// the connect, it comes from the inbox replay; after, live — in inbox order, none twice.
/// A session whose channel is subscribed only after its replay read the inbox would miss
/// whatever was published in between.
pub async fn connecting_while_publishing_loses_nothing(fleet: &Fleet) -> anyhow::Result<()> {
    let n = fleet.nodes().len();
    let users: Vec<String> = (0..24).map(|i| format!("busy-{i}")).collect();
    let stop = tokio_util::sync::CancellationToken::new();
    let streaming = {
        let publisher = fleet.publisher().clone();
        let users = users.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut accepted: BTreeMap<String, Vec<(String, String)>> = BTreeMap::new();
            let mut round = 0;
            while !stop.is_cancelled() {
                for user in &users {
                    let title = format!("{user}-{round}");
                    let published = publisher
                        .publish(&to_users(&[user], &title, 3600))
                        .await
                        .with_context(|| format!("publishing {title}"))?;
                    accepted
                        .entry(user.clone())
                        .or_default()
                        .push((title, published.id));
                }
                round += 1;
            }
            anyhow::Ok(accepted)
        })
    };
    let connecting = users.iter().enumerate().map(|(i, user)| async move {
        let mut client = fleet.connect(i % n, user, "phone").await?;
        // Cell channels too, so the subscriber has more to do while the replays run.
        client
            .send_fix(52.3 + 0.01 * i as f64, 13.2 + 0.01 * i as f64)
            .await?;
        anyhow::Ok(client)
    });
    let mut clients = Vec::new();
    for client in join_all(connecting).await {
        clients.push(client?);
    }
    fleet.wait_users_subscribed(&users).await?;
    // A little more live traffic to every connected session, then stop.
    let more = Instant::now() + Duration::from_millis(300);
    while Instant::now() < more {
        tokio::time::sleep(POLL_INTERVAL).await;
    }
    stop.cancel();
    let accepted = streaming.await.context("publisher task")??;
    let refs: Vec<&str> = users.iter().map(String::as_str).collect();
    let sentinel = publish(fleet.publisher(), &to_users(&refs, "end", 3600)).await?;
    let mut missing = Vec::new();
    for (user, client) in users.iter().zip(clients.iter_mut()) {
        let frames = client
            .frames_before(&sentinel.id, WAIT_TIMEOUT)
            .await
            .with_context(|| user.clone())?;
        let mut cursors = Vec::new();
        let mut titles = Vec::new();
        let mut ids = HashSet::new();
        for frame in frames.iter().filter(|f| f["type"] == "notification") {
            let cursor = frame["cursor"]
                .as_str()
                .and_then(geopush_proto::bus::Cursor::parse)
                .with_context(|| format!("{user}: cursor of {frame}"))?;
            cursors.push(cursor);
            titles.push(frame["title"].as_str().unwrap_or_default().to_owned());
            ids.insert(id_of(frame));
        }
        ensure!(
            cursors.windows(2).all(|w| w[0] < w[1]),
            "{user}: notifications out of inbox order or twice: {titles:?}"
        );
        let want = accepted.get(user).map(Vec::as_slice).unwrap_or_default();
        let lost: Vec<&String> = want
            .iter()
            .filter(|(_, id)| !ids.contains(id))
            .map(|(title, _)| title)
            .collect();
        if !lost.is_empty() {
            missing.push(format!(
                "{user} (node-{}) never got {lost:?} of {} accepted; it received {titles:?}",
                users.iter().position(|u| u == user).unwrap_or(0) % n,
                want.len()
            ));
        }
    }
    ensure!(
        missing.is_empty(),
        "accepted notifications never delivered (each user's titles count up from 0):\n{}",
        missing.join("\n")
    );
    Ok(())
}

/// Many clients connect at once (spread over the nodes, each also sending a fix so that
/// its node has cell channels to subscribe as well), and the moment each one has its
/// `welcome`, a notification is published to its user. The session exists, so the
/// notification must reach it: from the inbox replay if the replay reads it, else live.
/// Published after the replay read the inbox and before the node's subscription to the
/// user's channel took effect, it would reach neither way.
pub async fn published_right_after_welcome_arrives(fleet: &Fleet) -> anyhow::Result<()> {
    let n = fleet.nodes().len();
    let users: Vec<String> = (0..48).map(|i| format!("eager-{i}")).collect();
    let connecting = users.iter().enumerate().map(|(i, user)| async move {
        let mut client = fleet.connect(i % n, user, "phone").await?;
        let published = publish(fleet.publisher(), &to_users(&[user], "hello", 3600)).await?;
        client
            .send_fix(52.3 + 0.002 * i as f64, 13.2 + 0.003 * i as f64)
            .await?;
        anyhow::Ok((client, published.id))
    });
    let mut clients = Vec::new();
    for client in join_all(connecting).await {
        clients.push(client?);
    }
    let waiting = clients
        .iter_mut()
        .zip(&users)
        .map(|((client, id), user)| async move {
            match client.frames_before(id, READ_TIMEOUT).await {
                Ok(_) => None,
                Err(_) => Some(user.clone()),
            }
        });
    let lost: Vec<String> = join_all(waiting).await.into_iter().flatten().collect();
    if lost.is_empty() {
        return Ok(());
    }
    // What Redis says about the first lost one: stored, and its channel subscribed by now.
    let user = &lost[0];
    let subscribers = fleet
        .redis
        .subscribers(&fleet.keys().user_channel(user))
        .await?;
    let mut commands = fleet.redis.commands().await?;
    let stored: u64 = commands
        .query(redis::cmd("XLEN").arg(fleet.keys().inbox(user)))
        .await?;
    bail!(
        "{} of {} sessions never got the notification published right after their welcome \
         (within {READ_TIMEOUT:?}): {lost:?}; {user}'s inbox holds {stored} entries and its \
         channel has {subscribers} subscriber(s) now",
        lost.len(),
        users.len()
    )
}
