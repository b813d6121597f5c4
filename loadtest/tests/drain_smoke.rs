//! The `drain` scenario end to end with real processes: Redis, two gateways, the worker,
//! and the `geopush-loadtest drain` binary sending SIGTERM to one gateway mid-run while user
//! notifications flow through the worker's API. Nothing may be lost; every client ends
//! connected to the other gateway; the report and chart are written.

mod support;

use geopush_loadtest::report::Report;
use std::process::Command;
use std::time::Duration;
use support::{Process, RedisServer, free_port, wait_http_ok};

const SECRET: &str = "drain-smoke-secret";

fn gateway(redis: &RedisServer, port: u16, node: &str) -> Process {
    Process::spawn(
        "geopush-gateway",
        &[
            ("GEOPUSH_LISTEN", format!("127.0.0.1:{port}")),
            ("GEOPUSH_REDIS_URL", redis.url()),
            ("GEOPUSH_NODE_ID", node.into()),
            ("GEOPUSH_JWT_SECRET", SECRET.into()),
            ("GEOPUSH_DRAIN_SECONDS", "1".into()),
            ("GEOPUSH_RECONNECT_JITTER_SECONDS", "1".into()),
            ("GEOPUSH_SHUTDOWN_GRACE_SECONDS", "2".into()),
            ("GEOPUSH_SUBSCRIPTION_LINGER_SECONDS", "0.5".into()),
        ],
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn draining_a_gateway_loses_no_user_notification() {
    let redis = RedisServer::start().await;
    let (port_a, port_b, port_worker) = (free_port(), free_port(), free_port());
    let mut gateway_a = gateway(&redis, port_a, "drain-a");
    let _gateway_b = gateway(&redis, port_b, "drain-b");
    let _worker = Process::spawn(
        "geopush-worker",
        &[
            ("GEOPUSH_LISTEN", format!("127.0.0.1:{port_worker}")),
            ("GEOPUSH_REDIS_URL", redis.url()),
            ("GEOPUSH_JWT_SECRET", SECRET.into()),
        ],
    );
    for port in [port_a, port_b] {
        wait_http_ok(&format!("127.0.0.1:{port}"), "/readyz").await;
    }
    wait_http_ok(&format!("127.0.0.1:{port_worker}"), "/readyz").await;

    let dir = std::env::temp_dir().join(format!("geopush-drain-smoke-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let (json, svg) = (dir.join("drain.json"), dir.join("drain.svg"));
    let output = tokio::task::spawn_blocking({
        let (json, svg) = (json.clone(), svg.clone());
        let pid = gateway_a.pid();
        move || {
            Command::new(support::binary("geopush-loadtest"))
                .arg("drain")
                .args([
                    "--url",
                    &format!("ws://127.0.0.1:{port_a}/v1/ws,ws://127.0.0.1:{port_b}/v1/ws"),
                ])
                .args(["--secret", SECRET])
                .args(["--worker-url", &format!("http://127.0.0.1:{port_worker}")])
                .args(["--drain-pid", &pid.to_string(), "--drain-at-s", "1"])
                .args(["-n", "20", "--seconds", "4", "--grace-seconds", "3"])
                .args(["--user-rate", "50", "--quiet"])
                .arg("--json-report")
                .arg(&json)
                .arg("--chart")
                .arg(&svg)
                .output()
                .expect("running geopush-loadtest")
        }
    })
    .await
    .expect("join");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stdout}\n{stderr}");

    // The drained gateway exited cleanly.
    assert!(gateway_a.wait_exit(Duration::from_secs(10)).await.success());

    let report = Report::load(&json).expect("the JSON report");
    assert_eq!((report.connected, report.failed), (20, 0), "{stdout}");
    assert_eq!(
        report.connected_at_end, 20,
        "every client ends connected: {stdout}"
    );
    // Half the clients started on the drained gateway: closed with 1001, reconnected.
    assert!(report.reconnects >= 10, "{stdout}");
    assert!(
        report.closes.keys().any(|reason| reason.contains("1001")),
        "{:?}",
        report.closes
    );
    assert_eq!(
        report.reconnect_after_drain.count, report.reconnects,
        "{stdout}"
    );
    let users = &report.users;
    assert!(users.published >= 150, "{stdout}");
    assert_eq!(users.publish_errors, 0, "{stdout}");
    assert_eq!(
        (users.delivered, users.lost),
        (users.expected, 0),
        "{stdout}"
    );
    assert!(report.events.iter().any(|e| e.label.starts_with("SIGTERM")));
    assert!(
        std::fs::read_to_string(&svg)
            .expect("chart")
            .contains("SIGTERM")
    );
    let _ = std::fs::remove_dir_all(&dir);
}
