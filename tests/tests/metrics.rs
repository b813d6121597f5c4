//! Metrics and the HTTP probes (DESIGN §9): `/metrics` over real HTTP is valid Prometheus
//! text with every contract name; after known traffic the counters moved by exactly the
//! traffic (fixes, frames in and out, deliveries, closes) and the connection gauge went up
//! and back down; `/healthz` and `/readyz` answer 200, an unknown route 404 with a JSON error.

use geopush_gateway::{Notification, Target};
use geopush_tests::http;
use geopush_tests::prom::Exposition;
use geopush_tests::tokens::user_token;
use geopush_tests::wait::eventually;
use geopush_tests::{READ_TIMEOUT, TestGateway, WAIT_TIMEOUT, WsClient, test_config};

async fn scrape(gateway: &TestGateway) -> Exposition {
    let response = http::get(gateway.addr(), "/metrics")
        .await
        .expect("GET /metrics");
    assert_eq!(response.status, 200);
    let content_type = response.header("content-type").unwrap_or_default();
    assert!(
        content_type.starts_with("text/plain")
            || content_type.starts_with("application/openmetrics-text"),
        "content-type {content_type:?}"
    );
    Exposition::parse(&response.text()).expect("valid Prometheus text")
}

/// The counters this test moves, read in one scrape.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Counters {
    connections: f64,
    fixes: f64,
    frames_in: f64,
    frames_out: f64,
    notifications: f64,
    closes_1000: f64,
}

fn counters(m: &Exposition) -> Counters {
    Counters {
        connections: m.value("geopush_connections", &[]),
        fixes: m.value("geopush_fixes_total", &[]),
        frames_in: m.value("geopush_frames_in_total", &[]),
        frames_out: m.value("geopush_frames_out_total", &[]),
        notifications: m.value("geopush_deliveries_total", &[("kind", "notification")]),
        closes_1000: m.value("geopush_closes_total", &[("code", "1000")]),
    }
}

#[tokio::test]
async fn metrics_text_is_valid_and_names_the_contract() {
    let gateway = TestGateway::start(test_config()).await.expect("gateway");
    let m = scrape(&gateway).await;
    for (family, kind) in [
        ("geopush_connections", "gauge"),
        ("geopush_fixes", "counter"),
        ("geopush_frames_in", "counter"),
        ("geopush_frames_out", "counter"),
        ("geopush_deliveries", "counter"),
        ("geopush_delivery_seconds", "histogram"),
        ("geopush_queue_drops", "counter"),
        ("geopush_closes", "counter"),
        ("geopush_bus_up", "gauge"),
        ("geopush_bus_reconnects", "counter"),
        ("geopush_places", "gauge"),
        ("geopush_bus_probe_failures", "counter"),
        ("geopush_geofence_events_dropped", "counter"),
    ] {
        assert_eq!(m.type_of(family), Some(kind), "{family} is a {kind}");
    }
    // Unlabelled series exist from the start, at zero.
    for name in [
        "geopush_connections",
        "geopush_fixes_total",
        "geopush_frames_in_total",
        "geopush_frames_out_total",
        "geopush_queue_drops_total",
        "geopush_bus_probe_failures_total",
        "geopush_geofence_events_dropped_total",
    ] {
        assert_eq!(m.get(name, &[]), Some(0.0), "{name}");
    }
    assert_eq!(m.get("geopush_bus_up", &[]), Some(1.0));
    // Every close code geopush sends has a series from the start.
    for code in [
        "1000", "1001", "1002", "1007", "1009", "1011", "4001", "4008", "4009",
    ] {
        assert_eq!(
            m.get("geopush_closes_total", &[("code", code)]),
            Some(0.0),
            "closes_total{{code={code}}}"
        );
    }
    // The same text as the library returns.
    let direct = gateway.metrics().expect("library metrics parse");
    assert_eq!(direct.types, m.types);
}

#[tokio::test]
async fn counters_move_by_exactly_the_traffic() {
    let gateway = TestGateway::start(test_config()).await.expect("gateway");
    let base = counters(&scrape(&gateway).await);
    assert_eq!(base.connections, 0.0);

    let mut walker = WsClient::connect_welcomed(gateway.addr(), &user_token("walker").expect("t"))
        .await
        .expect("walker")
        .0;
    let mut sitter = WsClient::connect_welcomed(gateway.addr(), &user_token("sitter").expect("t"))
        .await
        .expect("sitter")
        .0;
    let mut reader = WsClient::connect_welcomed(gateway.addr(), &user_token("reader").expect("t"))
        .await
        .expect("reader")
        .0;
    eventually("three connections in the gauge", WAIT_TIMEOUT, || {
        gateway.metric("geopush_connections", &[]) == 3.0
    })
    .await
    .expect("gauge goes up");

    // Frames in: walker 3 fixes + 2 pings, sitter 1 fix, then sitter's close = 7.
    // Frames out: 3 welcomes + 2 pongs + 3 notifications + sitter's close echo = 9.
    for (i, (lat, lon)) in [(52.50, 13.40), (52.51, 13.41), (52.52, 13.42)]
        .into_iter()
        .enumerate()
    {
        walker.send_fix(lat, lon).await.expect("fix");
        if i < 2 {
            walker.roundtrip(i as u64).await.expect("pong");
        }
    }
    sitter.send_fix(48.85, 2.35).await.expect("fix");
    eventually("both walker and sitter located", WAIT_TIMEOUT, || {
        gateway.hub().located_count() == 2
    })
    .await
    .expect("located");
    let queued = gateway.hub().publish(
        &Target::All,
        &Notification {
            id: "m1".into(),
            cursor: None,
            title: "t".into(),
            body: "b".into(),
            data: None,
            ts: 0,
        },
    );
    assert_eq!(queued, 3);
    for client in [&mut walker, &mut sitter, &mut reader] {
        client
            .expect_type("notification", READ_TIMEOUT)
            .await
            .expect("notification");
    }
    sitter.close().await.expect("close");
    sitter
        .expect_close(1000, READ_TIMEOUT)
        .await
        .expect("server echoes the close");

    let expected = Counters {
        connections: base.connections + 2.0,
        fixes: base.fixes + 4.0,
        frames_in: base.frames_in + 7.0,
        frames_out: base.frames_out + 9.0,
        notifications: base.notifications + 3.0,
        closes_1000: base.closes_1000 + 1.0,
    };
    let mut last = base;
    let settled = eventually(
        "the counters to reach the traffic's values",
        WAIT_TIMEOUT,
        || {
            last = counters(&gateway.metrics().expect("metrics"));
            last == expected
        },
    )
    .await;
    assert!(settled.is_ok(), "expected {expected:?}, got {last:?}");
    // Scraped over HTTP, the same numbers.
    assert_eq!(counters(&scrape(&gateway).await), expected);

    drop(walker);
    drop(reader);
    eventually("the gauge back to zero", WAIT_TIMEOUT, || {
        gateway.metric("geopush_connections", &[]) == 0.0
    })
    .await
    .expect("gauge goes down");
    // Peers that vanish without a close frame are counted as 1006.
    assert_eq!(
        gateway.metric("geopush_closes_total", &[("code", "1006")]),
        2.0
    );
}

#[tokio::test]
async fn probes_and_unknown_routes() {
    let gateway = TestGateway::start(test_config()).await.expect("gateway");
    let health = http::get(gateway.addr(), "/healthz")
        .await
        .expect("healthz");
    assert_eq!(health.status, 200);
    let ready = http::get(gateway.addr(), "/readyz").await.expect("readyz");
    assert_eq!(ready.status, 200);

    let missing = http::get(gateway.addr(), "/no/such/route")
        .await
        .expect("404");
    assert_eq!(missing.status, 404);
    assert!(
        missing
            .header("content-type")
            .is_some_and(|c| c.starts_with("application/json")),
        "{:?}",
        missing.headers
    );
    let body = missing.json().expect("JSON body");
    assert_eq!(body["error"]["code"], "not_found");
    assert!(body["error"]["message"].is_string(), "{body}");

    let wrong_method = http::request(gateway.addr(), "POST", "/metrics")
        .await
        .expect("405");
    assert_eq!(wrong_method.status, 405);
    assert_eq!(
        wrong_method.json().expect("JSON")["error"]["code"],
        "method_not_allowed"
    );

    // A plain GET on the WebSocket path with a valid token is not an upgrade.
    let token = user_token("x").expect("t");
    let plain = http::send(
        gateway.addr(),
        &format!(
            "GET /v1/ws HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\nConnection: close\r\n\r\n"
        ),
    )
    .await
    .expect("plain GET");
    assert_eq!(plain.status, 400, "{}", plain.text());
    assert_eq!(gateway.gateway().connection_count(), 0);
}
