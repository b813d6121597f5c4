//! The load tool against an in-process gateway, small and short, so it cannot rot.

use geopush_gateway::Gateway;
use geopush_gateway::config::{Config, Secret};
use geopush_loadtest::cities::Cities;
use geopush_loadtest::{FleetOptions, Scenario, fleet};
use std::sync::Arc;
use tokio::net::TcpListener;
use tokio::sync::oneshot;

const SECRET: &str = "smoke-secret";

/// A gateway on 127.0.0.1:0; returns it, its URL and the switch that stops it.
async fn start_gateway() -> (
    Gateway,
    String,
    oneshot::Sender<()>,
    tokio::task::JoinHandle<()>,
) {
    let mut config = Config::defaults();
    config.tokens.jwt_secret = Some(Secret::new(SECRET));
    config.drain_seconds = 0.1;
    config.shutdown_grace_seconds = 1.0;
    let gateway = Gateway::new(config).expect("gateway config");
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let url = format!("ws://{}/v1/ws", listener.local_addr().expect("addr"));
    let (stop, stopped) = oneshot::channel::<()>();
    let serving = gateway.clone();
    let task = tokio::spawn(async move {
        serving
            .serve(listener, async {
                let _ = stopped.await;
            })
            .await;
    });
    (gateway, url, stop, task)
}

fn cities() -> Arc<Cities> {
    Arc::new(
        Cities::from_weighted(vec![
            ((52.52, 13.405), 3.6e6),
            ((-17.8, 179.9), 1e4),
            ((35.68, 139.69), 1.4e7),
        ])
        .expect("cities"),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_scenario_connects_everyone_and_measures_the_gateway() {
    let (gateway, url, stop, task) = start_gateway().await;
    let mut options = FleetOptions::new(&url, SECRET);
    options.connections = 20;
    options.rate = 200.0;
    options.hold_seconds = 1.0;
    options.settle_seconds = 0.2;
    options.fix_once = true;
    options.cities = Some(cities());
    // The gateway runs in this process: its /proc figures are ours, which is enough to
    // exercise the sampling path.
    options.gateway_pid = Some(std::process::id());

    let report = fleet::run(options).await.expect("run");
    assert_eq!(report.connected, 20, "{}", report.summary());
    assert_eq!(report.failed, 0);
    assert_eq!(report.dropped, 0);
    assert_eq!(report.fixes_sent, 20);
    assert!(
        report.server_errors.is_empty(),
        "{:?}",
        report.server_errors
    );
    assert_eq!(report.server_metrics.connections, Some(20.0));
    assert_eq!(report.server_metrics.fixes_indexed, Some(20.0));
    let measured = report.gateway.as_ref().expect("gateway figures");
    assert!(measured.after_settle.vm_rss_kib > 0);
    assert!(report.summary().contains("connected     20 of 20"));
    assert!(serde_json::to_string(&report).is_ok());

    // Every client closed at the end of the hold.
    for _ in 0..100 {
        if gateway.connection_count() == 0 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert_eq!(gateway.connection_count(), 0);
    let _ = stop.send(());
    task.await.expect("gateway stopped");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fixes_scenario_streams_fixes_and_a_wrong_secret_fails_fast() {
    let (_gateway, url, stop, task) = start_gateway().await;

    let mut wrong = FleetOptions::new(&url, "not-the-secret");
    wrong.connections = 5;
    let error = fleet::run(wrong).await.expect_err("wrong secret");
    assert!(error.to_string().contains("401"), "{error}");

    let mut options = FleetOptions::new(&url, SECRET);
    options.scenario = Scenario::Fixes;
    options.connections = 10;
    options.rate = 500.0;
    options.hold_seconds = 1.0;
    options.settle_seconds = 0.1;
    options.fix_interval_ms = 250;
    options.source_ips = 2;
    options.cities = Some(cities());
    let report = fleet::run(options).await.expect("run");
    assert_eq!(report.connected, 10, "{}", report.summary());
    assert!(report.fixes_sent >= 20, "{}", report.summary());
    assert!(
        report.server_metrics.fixes_indexed.unwrap_or(0.0) >= 20.0,
        "{}",
        report.summary()
    );
    let _ = stop.send(());
    task.await.expect("gateway stopped");
}
