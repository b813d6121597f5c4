//! Places, `nearby` and geofences over real sockets: `nearby` is sent only when the result
//! changed and never for a fix that failed validation; geofence events reach the client and
//! the event sink; a places file with broken rows loads the good ones and reports the rest.

use geopush_proto::EARTH_RADIUS_M;
use geopush_proto::place::{Place, PlaceFence};
use geopush_tests::gateway::TestGateway;
use geopush_tests::process::GatewayProcess;
use geopush_tests::tokens::{TEST_SECRET, now_unix_ms, user_token};
use geopush_tests::wait::eventually;
use geopush_tests::{WsClient, geometry::haversine_m};
use serde_json::{Value, json};
use std::time::Duration;

const WITHIN: Duration = Duration::from_secs(5);
const BERLIN: (f64, f64) = (52.52, 13.405);

/// The point `metres` north of `from`.
fn north(from: (f64, f64), metres: f64) -> (f64, f64) {
    (from.0 + (metres / EARTH_RADIUS_M).to_degrees(), from.1)
}

fn place(id: &str, at: (f64, f64), fence: Option<PlaceFence>) -> Place {
    Place {
        id: id.into(),
        name: id.to_uppercase(),
        lat: at.0,
        lon: at.1,
        tags: serde_json::from_value(json!({"kind": "test"})).expect("tags"),
        fence,
        dwell_s: None,
    }
}

async fn send_fix(client: &mut WsClient, at: (f64, f64), extra: Value) {
    let mut fix =
        json!({"type": "location", "lat": at.0, "lon": at.1, "accuracy_m": 5, "ts": now_unix_ms()});
    if let (Some(fix), Some(extra)) = (fix.as_object_mut(), extra.as_object()) {
        fix.extend(extra.clone());
    }
    client.send_json(&fix).await.expect("send fix");
}

/// Two app-level ping round trips: anything the gateway sent before them (a `nearby` is
/// written after the frames queued with it) shows up as an unexpected frame here.
async fn assert_nothing_pending(client: &mut WsClient, id: u64) {
    client.roundtrip(id).await.expect("first round trip");
    client
        .roundtrip(id + 1)
        .await
        .expect("nothing else was sent");
}

fn ids(nearby: &Value) -> Vec<String> {
    nearby["places"]
        .as_array()
        .expect("places")
        .iter()
        .map(|p| p["id"].as_str().unwrap_or("").to_owned())
        .collect()
}

#[tokio::test]
async fn nearby_is_sent_only_when_the_result_changed() {
    let gw = TestGateway::start_with(|c| {
        c.max_fixes_per_second = 100;
    })
    .await
    .expect("gateway");
    gw.gateway().replace_places(vec![
        place("p100", north(BERLIN, 100.0), None),
        place("p300", north(BERLIN, 300.0), None),
        place("p450", north(BERLIN, 450.0), None),
        place("far", north(BERLIN, 5_000.0), None),
    ]);
    let token = user_token("walker").expect("token");
    let (mut client, _) = WsClient::connect_welcomed(gw.addr(), &token)
        .await
        .expect("connect");

    send_fix(&mut client, BERLIN, json!({})).await;
    let first = client
        .expect_type("nearby", WITHIN)
        .await
        .expect("first nearby");
    assert_eq!(
        ids(&first),
        ["p100", "p300", "p450"],
        "within 500 m, nearest first"
    );
    let distance = first["places"][0]["distance_m"].as_f64().expect("distance");
    assert!(
        (distance - 100.0).abs() < 0.2,
        "true metres, got {distance}"
    );
    assert_eq!(first["places"][0]["tags"]["kind"], "test");

    // A move of 10 m (under the 25 m threshold) sends nothing.
    send_fix(&mut client, north(BERLIN, 10.0), json!({})).await;
    assert_nothing_pending(&mut client, 1).await;
    // A move of 60 m recomputes, but the ids are the same: nothing is sent.
    send_fix(&mut client, north(BERLIN, 60.0), json!({})).await;
    assert_nothing_pending(&mut client, 3).await;
    // A fix that fails validation is answered with an error and never with nearby.
    client
        .send_json(&json!({"type": "location", "lat": 95.0, "lon": 13.4}))
        .await
        .expect("send");
    client
        .expect_error("invalid_fix")
        .await
        .expect("invalid fix error");
    assert_nothing_pending(&mut client, 5).await;
    // A smaller radius changes the result.
    send_fix(
        &mut client,
        north(BERLIN, 60.0),
        json!({"radius_m": 300.0, "limit": 1}),
    )
    .await;
    let smaller = client
        .expect_type("nearby", WITHIN)
        .await
        .expect("smaller radius");
    assert_eq!(ids(&smaller), ["p100"]);
    // Moving far from every place sends the empty result once.
    send_fix(&mut client, north(BERLIN, 2_000.0), json!({})).await;
    let empty = client
        .expect_type("nearby", WITHIN)
        .await
        .expect("empty nearby");
    assert_eq!(ids(&empty), Vec::<String>::new());
    send_fix(&mut client, north(BERLIN, 2_100.0), json!({})).await;
    assert_nothing_pending(&mut client, 7).await;

    assert_eq!(
        gw.metric("geopush_deliveries_total", &[("kind", "nearby")]),
        3.0
    );
}

#[tokio::test]
async fn geofence_events_reach_the_client_and_the_sink() {
    let gw = TestGateway::start_with(|c| {
        c.max_fixes_per_second = 100;
    })
    .await
    .expect("gateway");
    gw.gateway().replace_places(vec![place(
        "cafe",
        BERLIN,
        Some(PlaceFence::Circle { radius_m: 150.0 }),
    )]);
    let token = user_token("visitor").expect("token");
    let (mut client, _) = WsClient::connect_welcomed(gw.addr(), &token)
        .await
        .expect("connect");

    send_fix(&mut client, north(BERLIN, 50.0), json!({})).await;
    let enter = client.expect_type("geofence", WITHIN).await.expect("enter");
    assert_eq!(
        (enter["event"].as_str(), enter["place"]["id"].as_str()),
        (Some("enter"), Some("cafe"))
    );
    client
        .expect_type("nearby", WITHIN)
        .await
        .expect("the cafe is nearby");
    // Just outside (160 m, margin 15 m): still inside by the hysteresis rule.
    send_fix(&mut client, north(BERLIN, 160.0), json!({})).await;
    assert_nothing_pending(&mut client, 1).await;
    send_fix(&mut client, north(BERLIN, 400.0), json!({})).await;
    let exit = client.expect_type("geofence", WITHIN).await.expect("exit");
    assert_eq!(exit["event"], "exit");

    let events = gw.gateway().geofence_events();
    let seen: Vec<_> = events
        .iter()
        .map(|e| (e.user.as_str(), e.place.as_str(), format!("{:?}", e.event)))
        .collect();
    assert_eq!(
        seen,
        [
            ("visitor", "cafe", "Enter".to_string()),
            ("visitor", "cafe", "Exit".to_string())
        ]
    );
    assert!(haversine_m(events[1].lat, events[1].lon, BERLIN.0, BERLIN.1) > 390.0);
}

#[tokio::test]
async fn places_file_with_broken_rows_loads_the_good_ones_and_reports_each_bad_one() {
    let dir = std::env::temp_dir().join(format!("geopush-places-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let path = dir.join("places.ndjson");
    let good = |id: &str, lon: f64| {
        format!(
            r#"{{"type":"Feature","id":"{id}","geometry":{{"type":"Point","coordinates":[{lon},52.52]}},"properties":{{"name":"{id}"}}}}"#
        )
    };
    let rows = [
        good("a", 13.40),
        r#"{"type":"Feature","id":"bad-coords","geometry":{"type":"Point","coordinates":[13.4,95]},"properties":{}}"#.into(),
        r#"{"type":"Feature","geometry":{"type":"Point","coordinates":[13.4,52.5]},"properties":{}}"#.into(),
        r#"{"type":"Feature","id":"bad-poly","geometry":{"type":"Point","coordinates":[13.4,52.5]},"properties":{"fence":{"type":"Polygon","coordinates":[[[13.4,52.5],[13.5,52.5]]]}}}"#.into(),
        good("a", 13.41),
        good("b", 13.42),
    ];
    std::fs::write(&path, rows.join("\n")).expect("write places");

    let mut process = GatewayProcess::start(&[
        "--jwt-secret",
        TEST_SECRET,
        "--places-file",
        path.to_str().expect("utf-8 path"),
    ])
    .expect("gateway process");
    let metrics = geopush_tests::http::get(process.addr(), "/metrics")
        .await
        .expect("metrics");
    let places = geopush_tests::prom::Exposition::parse(&metrics.text()).expect("prometheus text");
    assert_eq!(places.get("geopush_places", &[]), Some(2.0));
    eventually("rejections logged", WITHIN, || {
        process.logged("place rejected")
    })
    .await
    .expect("logged");
    let rejected: Vec<(u64, String)> = process
        .logs_text()
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| v["message"] == "place rejected")
        .map(|v| {
            (
                v["position"].as_u64().unwrap_or(0),
                v["reason"].as_str().unwrap_or("").to_owned(),
            )
        })
        .collect();
    let lines: Vec<u64> = rejected.iter().map(|(line, _)| *line).collect();
    assert_eq!(lines, [2, 3, 4, 5], "{rejected:?}");
    assert!(rejected[1].1.contains("id"), "{rejected:?}");
    assert!(rejected[3].1.contains("duplicate"), "{rejected:?}");
    process.sigterm().expect("sigterm");
    let status = process
        .wait_exit(Duration::from_secs(10))
        .await
        .expect("exit");
    assert!(status.success());
    let _ = std::fs::remove_dir_all(dir);
}
