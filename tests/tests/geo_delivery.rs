//! Geo-targeted delivery (DESIGN §3.2, §3.4): hundreds of real clients at seeded random
//! positions each send a fix; circle and polygon (with a hole, concave) deliveries reach
//! exactly the clients a brute-force reference (haversine; even-odd point in polygon) says,
//! including circles across the antimeridian and around the North Pole, and after clients
//! move. Clients outside receive nothing: after each area delivery a sentinel goes to
//! everyone, and whatever a client read before the sentinel is what it got.

use futures_util::future::join_all;
use geopush_gateway::{Notification, Target};
use geopush_proto::{Area, Circle, Polygon};
use geopush_tests::geometry::{distance_to_rings_deg, haversine_m, in_polygon};
use geopush_tests::tokens::user_token;
use geopush_tests::wait::eventually;
use geopush_tests::{READ_TIMEOUT, TestGateway, WAIT_TIMEOUT, WsClient, test_config};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Whether the reference puts a client inside, or too close to the boundary to say.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Expect {
    Inside,
    Outside,
    /// Within rounding distance of the boundary: either answer is accepted.
    Boundary,
}

struct Crowd {
    gateway: TestGateway,
    clients: Vec<WsClient>,
    positions: Vec<(f64, f64)>,
}

fn notification(id: &str) -> Notification {
    Notification {
        id: id.into(),
        cursor: None,
        title: id.into(),
        body: String::new(),
        data: None,
        ts: 0,
    }
}

/// Connect one client per position (in parallel batches), send each one fix, and wait
/// until the gateway has indexed them all.
async fn crowd(positions: Vec<(f64, f64)>) -> Crowd {
    let gateway = TestGateway::start(test_config()).await.expect("gateway");
    let addr = gateway.addr();
    let mut clients = Vec::with_capacity(positions.len());
    for (batch_index, batch) in positions.chunks(25).enumerate() {
        let connecting = batch.iter().enumerate().map(|(i, &(lat, lon))| async move {
            let user = format!("geo-{}", batch_index * 25 + i);
            let token = user_token(&user).expect("token");
            let (mut client, _) = WsClient::connect_welcomed(addr, &token)
                .await
                .unwrap_or_else(|e| panic!("{user}: {e:#}"));
            client.send_fix(lat, lon).await.expect("fix");
            client
        });
        clients.extend(join_all(connecting).await);
    }
    let n = positions.len();
    eventually("every client located", WAIT_TIMEOUT, || {
        gateway.hub().located_count() == n
    })
    .await
    .unwrap_or_else(|e| panic!("{e:#}: {} of {n}", gateway.hub().located_count()));
    Crowd {
        gateway,
        clients,
        positions,
    }
}

impl Crowd {
    /// Deliver to `area` and check every client against `expect`.
    async fn check(&mut self, name: &str, area: Area, expect: &[Expect]) {
        let inside = expect.iter().filter(|e| **e == Expect::Inside).count();
        let boundary = expect.iter().filter(|e| **e == Expect::Boundary).count();
        assert!(
            inside > 0 && inside + boundary < self.clients.len(),
            "{name}: the area must split the crowd to prove anything ({inside} inside)"
        );
        let queued = self
            .gateway
            .hub()
            .publish(&Target::Area(area), &notification(name));
        assert!(
            (inside..=inside + boundary).contains(&queued),
            "{name}: queued for {queued}, reference says {inside} (+{boundary} on the boundary)"
        );
        let sentinel = format!("{name}-sentinel");
        assert_eq!(
            self.gateway
                .hub()
                .publish(&Target::All, &notification(&sentinel)),
            self.clients.len()
        );
        let mut wrong = Vec::new();
        let mut received_total = 0;
        for (i, client) in self.clients.iter_mut().enumerate() {
            let before = client
                .frames_before(&sentinel, READ_TIMEOUT)
                .await
                .unwrap_or_else(|e| panic!("{name}: client {i}: {e:#}"));
            let ids: Vec<_> = before.iter().map(|f| f["id"].clone()).collect();
            let got = match ids.as_slice() {
                [] => false,
                [id] if *id == name => true,
                _ => panic!("{name}: client {i} received {before:?}"),
            };
            received_total += usize::from(got);
            let ok = match expect[i] {
                Expect::Inside => got,
                Expect::Outside => !got,
                Expect::Boundary => true,
            };
            if !ok {
                wrong.push((i, self.positions[i], expect[i], got));
            }
        }
        assert!(
            wrong.is_empty(),
            "{name}: {} clients got the wrong answer (index, (lat, lon), expected, received): {wrong:?}",
            wrong.len()
        );
        assert_eq!(received_total, queued, "{name}: received == queued");
    }

    fn expect_circle(&self, circle: &Circle) -> Vec<Expect> {
        self.positions
            .iter()
            .map(|&(lat, lon)| {
                let d = haversine_m(circle.lat, circle.lon, lat, lon);
                // Centimetres from the edge is rounding territory, not geometry.
                if (d - circle.radius_m).abs() < 0.01 {
                    Expect::Boundary
                } else if d < circle.radius_m {
                    Expect::Inside
                } else {
                    Expect::Outside
                }
            })
            .collect()
    }

    fn expect_polygon(&self, polygon: &Polygon) -> Vec<Expect> {
        self.positions
            .iter()
            .map(|&(lat, lon)| {
                if distance_to_rings_deg(lon, lat, &polygon.rings) < 1e-9 {
                    Expect::Boundary
                } else if in_polygon(lon, lat, &polygon.rings) {
                    Expect::Inside
                } else {
                    Expect::Outside
                }
            })
            .collect()
    }

    async fn check_circle(&mut self, name: &str, lat: f64, lon: f64, radius_m: f64) {
        let circle = Circle { lat, lon, radius_m };
        circle.validate().expect("valid circle");
        let expect = self.expect_circle(&circle);
        self.check(name, Area::Circle(circle), &expect).await;
    }

    async fn check_polygon(&mut self, name: &str, rings: Vec<Vec<[f64; 2]>>) {
        let polygon = Polygon { rings };
        polygon.validate().expect("valid polygon");
        let expect = self.expect_polygon(&polygon);
        self.check(name, Area::Polygon(polygon), &expect).await;
    }
}

fn wrap_lon(lon: f64) -> f64 {
    if lon >= 180.0 { lon - 360.0 } else { lon }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn circles_reach_exactly_the_clients_inside() {
    let mut rng = StdRng::seed_from_u64(0x6e0_b001);
    let positions = (0..200)
        .map(|_| (rng.gen_range(52.3..52.7), rng.gen_range(13.0..13.8)))
        .collect();
    let mut crowd = crowd(positions).await;
    crowd
        .check_circle("mitte-5km", 52.52, 13.405, 5_000.0)
        .await;
    crowd
        .check_circle("southwest-12km", 52.40, 13.20, 12_000.0)
        .await;
    crowd
        .check_circle("wide-25km", 52.50, 13.40, 25_000.0)
        .await;

    // Half the crowd moves; the index follows (and forgets the old positions).
    for i in 0..100 {
        let (lat, lon) = (rng.gen_range(52.3..52.7), rng.gen_range(13.0..13.8));
        crowd.positions[i] = (lat, lon);
        let client = &mut crowd.clients[i];
        client.send_fix(lat, lon).await.expect("move");
        // Handled in order: after the pong, the move is indexed.
        client
            .roundtrip(i as u64)
            .await
            .expect("pong after the move");
    }
    assert_eq!(crowd.gateway.hub().located_count(), 200);
    crowd
        .check_circle("mitte-5km-after-moves", 52.52, 13.405, 5_000.0)
        .await;
    crowd
        .check_circle("east-10km-after-moves", 52.55, 13.65, 10_000.0)
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn polygons_with_holes_reach_exactly_the_clients_inside() {
    let mut rng = StdRng::seed_from_u64(0x6e0_b002);
    let positions = (0..200)
        .map(|_| (rng.gen_range(48.0..49.0), rng.gen_range(2.0..3.0)))
        .collect();
    let mut crowd = crowd(positions).await;
    // A square with a square hole ([lon, lat], outer counter-clockwise, hole clockwise).
    crowd
        .check_polygon(
            "square-with-hole",
            vec![
                vec![
                    [2.1, 48.1],
                    [2.9, 48.1],
                    [2.9, 48.9],
                    [2.1, 48.9],
                    [2.1, 48.1],
                ],
                vec![
                    [2.3, 48.3],
                    [2.3, 48.7],
                    [2.7, 48.7],
                    [2.7, 48.3],
                    [2.3, 48.3],
                ],
            ],
        )
        .await;
    // A concave L shape.
    crowd
        .check_polygon(
            "l-shape",
            vec![vec![
                [2.0, 48.0],
                [2.6, 48.0],
                [2.6, 48.3],
                [2.3, 48.3],
                [2.3, 48.8],
                [2.0, 48.8],
                [2.0, 48.0],
            ]],
        )
        .await;
    // A triangle with two holes.
    crowd
        .check_polygon(
            "triangle-two-holes",
            vec![
                vec![[2.05, 48.05], [2.95, 48.05], [2.5, 48.95], [2.05, 48.05]],
                vec![
                    [2.3, 48.2],
                    [2.3, 48.35],
                    [2.45, 48.35],
                    [2.45, 48.2],
                    [2.3, 48.2],
                ],
                vec![[2.55, 48.4], [2.5, 48.6], [2.65, 48.4], [2.55, 48.4]],
            ],
        )
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn circles_across_the_antimeridian() {
    let mut rng = StdRng::seed_from_u64(0x6e0_b003);
    // Around Fiji: longitudes 179°E … 179°W.
    let positions = (0..120)
        .map(|_| {
            (
                rng.gen_range(-18.5..-17.1),
                wrap_lon(rng.gen_range(179.0..181.0)),
            )
        })
        .collect();
    let mut crowd = crowd(positions).await;
    let east_side = crowd.positions.iter().filter(|(_, lon)| *lon > 0.0).count();
    assert!(east_side > 0 && east_side < 120, "clients on both sides");
    crowd
        .check_circle("centre-east-40km", -17.8, 179.95, 40_000.0)
        .await;
    crowd
        .check_circle("centre-west-30km", -17.9, -179.9, 30_000.0)
        .await;
    crowd
        .check_circle("on-the-line-60km", -18.0, 180.0, 60_000.0)
        .await;
    crowd
        .check_circle("on-the-line-west-50km", -17.5, -180.0, 50_000.0)
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn circles_around_the_north_pole() {
    let mut rng = StdRng::seed_from_u64(0x6e0_b004);
    let positions = (0..120)
        .map(|_| (rng.gen_range(89.0..90.0), rng.gen_range(-180.0..180.0)))
        .collect();
    let mut crowd = crowd(positions).await;
    crowd
        .check_circle("the-pole-50km", 90.0, 0.0, 50_000.0)
        .await;
    crowd
        .check_circle("near-pole-30km", 89.8, 90.0, 30_000.0)
        .await;
    crowd
        .check_circle("across-the-pole-60km", 89.7, -170.0, 60_000.0)
        .await;
}
