//! Every fleet scenario, tiny and short, against an in-process single-node gateway (its
//! backend API on the same port), so the tool cannot rot. `drain` needs gateway processes
//! and Redis: see drain_smoke.rs.

use geopush_gateway::Gateway;
use geopush_gateway::config::{Config, Secret};
use geopush_loadtest::report::Report;
use geopush_loadtest::sim::{self, Scenario, SimArgs};
use std::path::PathBuf;
use support::InProcessGateway;

mod support;

const SECRET: &str = "smoke-secret";

/// A gateway on 127.0.0.1:0 with the sample places and a nearby radius that covers the
/// clients' start area.
async fn start_gateway() -> InProcessGateway {
    let mut config = Config::defaults();
    config.tokens.jwt_secret = Some(Secret::new(SECRET));
    config.drain_seconds = 0.1;
    config.shutdown_grace_seconds = 1.0;
    config.nearby_radius_m = 5_000.0;
    config.places_file = Some(workspace().join("deploy/places/sample-cities.ndjson"));
    InProcessGateway::serve(Gateway::new(config).expect("gateway config")).await
}

fn workspace() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace")
        .to_path_buf()
}

/// Small, short arguments: clients around Berlin (one of the sample places).
fn args(url: &str) -> SimArgs {
    let mut args = SimArgs::new(vec![url.to_owned()], SECRET);
    args.connections = 12;
    args.rate = 500.0;
    args.seconds = 1.5;
    args.settle_seconds = 0.2;
    args.grace_seconds = 1.0;
    args.cities = Some(berlin());
    args
}

/// A cities file with Berlin only, written once per test process (the tests run in
/// parallel: rewriting it under another test's read would hand that test an empty file).
fn berlin() -> PathBuf {
    static BERLIN: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    BERLIN
        .get_or_init(|| {
            let path = std::env::temp_dir()
                .join(format!("geopush-smoke-berlin-{}.csv", std::process::id()));
            std::fs::write(
                &path,
                "geonameid,name,latitude,longitude,country_code,population,timezone\n\
                 2950159,Berlin,52.52437,13.41053,DE,3426354,Europe/Berlin\n",
            )
            .expect("cities file");
            path
        })
        .clone()
}

/// What every report must hold: everyone connected, nobody closed, the JSON and chart.
fn check_common(report: &Report, n: u64) {
    let summary = report.summary();
    assert_eq!(report.connected, n, "{summary}");
    assert_eq!(report.failed, 0, "{summary}");
    assert!(report.closes.is_empty(), "{summary}");
    assert!(report.server_errors.is_empty(), "{summary}");
    assert!(report.publish_error_reasons.is_empty(), "{summary}");
    assert_eq!(report.welcome.count, n, "{summary}");
    assert!(!report.series.is_empty(), "{summary}");
    let json = serde_json::to_string(report).expect("json");
    let back: Report = serde_json::from_str(&json).expect("the report reads back");
    assert_eq!(back.welcome.p99_ms, report.welcome.p99_ms);
    let chart = report.chart();
    assert!(
        chart.starts_with("<svg") || chart.starts_with("<?xml"),
        "{chart}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_holds_everyone_and_measures_the_gateway() {
    let gw = start_gateway().await;
    let mut a = args(&gw.url);
    a.fix_once = true;
    // The gateway runs in this process: its /proc figures are ours, which exercises the
    // sampling path.
    a.gateway_pid = vec![std::process::id()];
    let report = sim::run(Scenario::Connect, a).await.expect("run");
    check_common(&report, 12);
    assert_eq!(report.fixes_sent, 12);
    assert_eq!(report.connected_at_end, 12);
    assert_eq!(report.gateways.len(), 1);
    assert!(report.gateway_rss_bytes_per_connection.is_some());
    assert!(report.summary().contains("connected     12 of 12"));
    wait_for_no_connections(&gw.gateway).await;
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fixes_stream_and_nearby_is_timed() {
    let gw = start_gateway().await;
    let mut a = args(&gw.url);
    a.fix_interval_ms = Some(250);
    a.source_ips = 2;
    let report = sim::run(Scenario::Fixes, a).await.expect("run");
    check_common(&report, 12);
    assert!(report.fixes_sent >= 24, "{}", report.summary());
    // The gateway's own count of the fixes it took, read from its /metrics.
    assert!(
        report.fixes_accepted_per_s.is_some_and(|per_s| per_s > 0.0),
        "{}",
        report.summary()
    );
    // Berlin's place lies within the nearby radius of every client: each first fix gets
    // a `nearby`, timed from that fix.
    assert!(report.nearby_received >= 12, "{}", report.summary());
    assert_eq!(report.fix_to_nearby.count, report.nearby_received);
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn geo_notifications_reach_exactly_the_clients_inside() {
    let gw = start_gateway().await;
    let mut a = args(&gw.url);
    a.geo_rate = Some(10.0);
    a.geo_radius_m = 2_000.0;
    let report = sim::run(Scenario::Geo, a).await.expect("run");
    check_common(&report, 12);
    let geo = &report.geo;
    assert!(geo.published >= 10, "{}", report.summary());
    assert!(
        geo.expected >= geo.published,
        "each circle holds its centre client"
    );
    assert_eq!(
        (geo.delivered, geo.lost, geo.duplicates),
        (geo.expected, 0, 0),
        "{}",
        report.summary()
    );
    assert_eq!(geo.latency.count, geo.delivered);
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broadcasts_reach_every_socket() {
    let gw = start_gateway().await;
    let mut a = args(&gw.url);
    a.broadcast_every_s = Some(0.5);
    let report = sim::run(Scenario::Broadcast, a).await.expect("run");
    check_common(&report, 12);
    assert!(report.broadcasts.len() >= 2, "{}", report.summary());
    assert_eq!(report.broadcasts.len() as u64, report.broadcast.published);
    for reach in &report.broadcasts {
        assert_eq!((reach.expected, reach.reached), (12, 12), "{reach:?}");
    }
    assert_eq!(report.broadcast.lost, 0);
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn churning_clients_resume_and_lose_no_user_notification() {
    let gw = start_gateway().await;
    let mut a = args(&gw.url);
    a.seconds = 2.0;
    a.churn_per_s = Some(12.0);
    a.user_rate = Some(50.0);
    let report = sim::run(Scenario::Churn, a).await.expect("run");
    let summary = report.summary();
    assert_eq!((report.connected, report.failed), (12, 0), "{summary}");
    assert!(report.reconnects >= 5, "{summary}");
    assert_eq!(report.reconnect_gap.count, report.reconnects);
    assert_eq!(report.connected_at_end, 12, "{summary}");
    let users = &report.users;
    assert!(users.published >= 80, "{summary}");
    assert_eq!(
        (users.delivered, users.lost),
        (users.expected, 0),
        "{summary}"
    );
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_city_mixes_fixes_and_every_kind_of_notification() {
    let gw = start_gateway().await;
    let mut a = args(&gw.url);
    a.seconds = 2.0;
    a.fix_interval_ms = Some(500);
    a.user_rate = Some(20.0);
    a.geo_rate = Some(5.0);
    a.broadcast_every_s = Some(1.0);
    let json = std::env::temp_dir().join(format!("geopush-smoke-city-{}.json", std::process::id()));
    let svg = json.with_extension("svg");
    let report = sim::run(Scenario::City, a).await.expect("run");
    check_common(&report, 12);
    assert!(report.fixes_sent >= 36, "{}", report.summary());
    for (kind, d) in [
        ("user", &report.users),
        ("geo", &report.geo),
        ("broadcast", &report.broadcast),
    ] {
        assert!(d.published > 0, "{kind}: {}", report.summary());
        assert!(d.delivered > 0, "{kind}: {}", report.summary());
        assert_eq!(d.duplicates, 0, "{kind}");
    }
    assert_eq!(report.users.lost, 0, "{}", report.summary());

    // The written report merges with itself into twice the clients.
    report.write(Some(&json), Some(&svg)).expect("write");
    let loaded = Report::load(&json).expect("load");
    let merged = Report::merge(&[loaded.clone(), loaded]).expect("merge");
    assert_eq!(merged.clients, 24);
    assert_eq!(merged.users.delivered, report.users.delivered * 2);
    assert_eq!(merged.welcome.count, report.welcome.count * 2);
    assert!(
        std::fs::read_to_string(&svg)
            .expect("svg")
            .contains("</svg>")
    );
    let _ = std::fs::remove_file(&json);
    let _ = std::fs::remove_file(&svg);
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_secret_fails_fast_with_the_gateways_answer() {
    let gw = start_gateway().await;
    let mut a = args(&gw.url);
    a.secret = "not-the-secret".into();
    let error = sim::run(Scenario::Connect, a)
        .await
        .expect_err("wrong secret");
    assert!(error.to_string().contains("401"), "{error}");
    gw.stop().await;
}

async fn wait_for_no_connections(gateway: &Gateway) {
    for _ in 0..100 {
        if gateway.connection_count() == 0 {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert_eq!(
        gateway.connection_count(),
        0,
        "every client closed at the end"
    );
}
