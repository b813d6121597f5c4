//! Bad flags fail fast with a clear message: no run starts, nothing hangs.

use std::process::{Command, Output, Stdio};
use std::time::Duration;

/// Far longer than any refusal takes; only a hang reaches it.
const HANG: Duration = Duration::from_secs(30);

fn loadtest(args: &[&str]) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_geopush-loadtest"))
        .args(args)
        .env_remove("GEOPUSH_JWT_SECRET")
        .env_remove("GEOPUSH_REDIS_URL")
        .env_remove("GEOPUSH_LOADTEST_URL")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let started = std::time::Instant::now();
    while child.try_wait().expect("wait").is_none() {
        if started.elapsed() > HANG {
            let _ = child.kill();
            panic!("geopush-loadtest {args:?} still running after {HANG:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().expect("output")
}

fn refused(args: &[&str], message: &str) {
    let out = loadtest(args);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{args:?} succeeded");
    assert!(
        stderr.contains(message),
        "{args:?}: expected {message:?} in: {stderr}"
    );
}

/// A loopback port nothing listens on (bound, then released).
fn closed_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    listener.local_addr().expect("addr").port()
}

#[test]
fn bad_flags_are_refused_before_anything_runs() {
    refused(
        &["connect", "--secret", "s", "--connections", "0"],
        "--connections must be at least 1",
    );
    refused(
        &["fixes", "--secret", "s", "--rate=-5"],
        "--rate must be a positive number",
    );
    refused(&["stampede", "--secret", "s"], "unrecognized subcommand");
    refused(&["connect", "--connections", "1"], "--secret");
    let port = closed_port();
    let url = format!("ws://127.0.0.1:{port}/v1/ws");
    refused(
        &[
            "connect",
            "--secret",
            "s",
            "--connections",
            "1",
            "--url",
            &url,
        ],
        "cannot reach the gateway",
    );
    refused(
        &[
            "connect",
            "--secret",
            "s",
            "--url",
            "http://127.0.0.1:1/v1/ws",
        ],
        "must start with ws://",
    );
    let redis = format!("redis://127.0.0.1:{port}");
    refused(
        &[
            "notify",
            "--secret",
            "s",
            "--redis-url",
            &redis,
            "--users",
            "0",
        ],
        "--users must be at least 1",
    );
    refused(
        &[
            "notify",
            "--secret",
            "s",
            "--redis-url",
            &redis,
            "--rate=-1",
        ],
        "--rate must be a positive number",
    );
    refused(
        &[
            "notify",
            "--secret",
            "s",
            "--redis-url",
            &redis,
            "--worker-url",
            "ftp://x",
        ],
        "--worker-url",
    );
    refused(
        &[
            "notify",
            "--secret",
            "s",
            "--redis-url",
            &redis,
            "--worker-url",
            &format!("http://127.0.0.1:{port}"),
        ],
        "cannot reach the worker",
    );
}

#[test]
fn bad_flags_of_the_fleet_scenarios_are_refused() {
    refused(&["drain", "--secret", "s"], "drain needs --drain-pid");
    refused(
        &["connect", "--secret", "s", "--drain-pid", "1"],
        "--drain-pid is for the drain scenario",
    );
    refused(
        &["geo", "--secret", "s", "--geo-rate=-1"],
        "--geo-rate must be a number ≥ 0",
    );
    refused(
        &["churn", "--secret", "s", "--user-rate=-3"],
        "--user-rate must be a number ≥ 0",
    );
    refused(
        &["broadcast", "--secret", "s", "--broadcast-every-s=-1"],
        "--broadcast-every-s must be a number ≥ 0",
    );
    refused(
        &["city", "--secret", "s", "--geo-radius-m", "0"],
        "--geo-radius-m must be a positive number",
    );
    refused(
        &[
            "drain",
            "--secret",
            "s",
            "--drain-pid",
            "1",
            "--seconds",
            "5",
            "--drain-at-s",
            "9",
        ],
        "--drain-at-s must fall inside --seconds",
    );
    refused(
        &[
            "connect",
            "--secret",
            "s",
            "-n",
            "100000",
            "--source-ips",
            "1",
        ],
        "raise --source-ips",
    );
    refused(
        &["merge", "/nonexistent/report.json"],
        "reading /nonexistent/report.json",
    );

    // Something accepts TCP where the gateway should be, so the run gets as far as the
    // publisher: an unreachable API and a missing cities file are refused before any client.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let url = format!("ws://{}/v1/ws", listener.local_addr().expect("addr"));
    let closed = format!("http://127.0.0.1:{}", closed_port());
    refused(
        &[
            "churn",
            "--secret",
            "s",
            "--url",
            &url,
            "--worker-url",
            &closed,
        ],
        "cannot reach the worker",
    );
    refused(
        &[
            "fixes",
            "--secret",
            "s",
            "--url",
            &url,
            "--cities",
            "/nonexistent/cities.csv",
        ],
        "fixes need real positions",
    );
}
