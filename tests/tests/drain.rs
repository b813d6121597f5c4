//! Graceful drain of the real binary (DESIGN §3.6, §9): on SIGTERM `/readyz` turns 503, new
//! upgrades are refused with 503, every connected client gets `reconnect` (integer
//! `after_ms`) and then close 1001, and the process exits with status 0.
//!
//! The in-process drain is also shown to be bounded by the grace period when a client has
//! stopped reading.
//!
//! Needs the binary: `cargo build --workspace --bins` first.

use geopush_gateway::{Notification, Target};
use geopush_tests::http::{self, upgrade_request};
use geopush_tests::tokens::{TEST_SECRET, user_token};
use geopush_tests::wait::eventually_async;
use geopush_tests::{
    GatewayProcess, READ_TIMEOUT, RawWsClient, TestGateway, WAIT_TIMEOUT, WsClient,
};

const CLIENTS: usize = 5;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_every_client_and_exits_zero() {
    let mut process = GatewayProcess::start(&[
        "--jwt-secret",
        TEST_SECRET,
        "--drain-seconds",
        "1",
        "--shutdown-grace-seconds",
        "3",
        "--reconnect-jitter-seconds",
        "2",
    ])
    .expect("gateway process starts");
    let addr = process.addr();
    let ready = http::get(addr, "/readyz").await.expect("readyz");
    assert_eq!(ready.status, 200, "ready before the signal");

    let mut clients = Vec::new();
    for i in 0..CLIENTS {
        let token = user_token(&format!("user-{i}")).expect("t");
        let (mut client, _) = WsClient::connect_welcomed(addr, &token)
            .await
            .expect("client connects");
        client.roundtrip(i as u64).await.expect("live");
        clients.push(client);
    }

    process.sigterm().expect("SIGTERM");
    eventually_async("/readyz to answer 503", WAIT_TIMEOUT, || async move {
        matches!(http::get(addr, "/readyz").await, Ok(r) if r.status == 503)
    })
    .await
    .unwrap_or_else(|e| panic!("{e:#}\nlogs:\n{}", process.logs_text()));

    // Right after readiness failed, the drain window is open: upgrades are refused.
    let token = user_token("latecomer").expect("t");
    let refused = upgrade_request(addr, "/v1/ws", Some(&token))
        .await
        .expect("the drain window is still open");
    assert_eq!(refused.status, 503, "{}", refused.text());
    assert_eq!(refused.json().expect("JSON")["error"]["code"], "draining");

    for (i, client) in clients.iter_mut().enumerate() {
        let reconnect = client
            .recv_json(WAIT_TIMEOUT)
            .await
            .unwrap_or_else(|e| panic!("client {i}: {e:#}"));
        assert_eq!(reconnect["type"], "reconnect", "client {i}: {reconnect}");
        let after_ms = reconnect["after_ms"]
            .as_u64()
            .unwrap_or_else(|| panic!("after_ms is not an integer: {reconnect}"));
        assert!(
            after_ms <= 2_000,
            "after_ms within the jitter bound: {after_ms}"
        );
        assert_eq!(reconnect["reason"], "draining");
        client
            .expect_close(1001, READ_TIMEOUT)
            .await
            .unwrap_or_else(|e| panic!("client {i}: {e:#}"));
    }

    let status = process
        .wait_exit(WAIT_TIMEOUT)
        .await
        .expect("the process exits");
    assert_eq!(
        status.code(),
        Some(0),
        "exit status; logs:\n{}",
        process.logs_text()
    );
    assert!(
        process.logged("drained"),
        "the drain completed; logs:\n{}",
        process.logs_text()
    );
}

/// The in-process drain is bounded too: a client that stopped reading (its socket full, its
/// writer stuck) cannot hold `serve` past the grace period, and the reading client still
/// gets `reconnect` and 1001 after every notification it was sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_is_bounded_by_the_grace_period_despite_a_stalled_client() {
    let gateway = TestGateway::start_with(|c| {
        c.queue_len = 100_000; // no 4009 here: the stalled writer must be stopped by the drain
        c.write_timeout_seconds = 60.0;
        c.drain_seconds = 0.2;
        c.shutdown_grace_seconds = 1.0;
    })
    .await
    .expect("gateway");
    let mut stalled = RawWsClient::connect(gateway.addr(), &user_token("stalled").expect("t"))
        .await
        .expect("stalled connects");
    stalled
        .expect_type("welcome", READ_TIMEOUT)
        .await
        .expect("welcome");
    let (mut reader, _) =
        WsClient::connect_welcomed(gateway.addr(), &user_token("reader").expect("t"))
            .await
            .expect("reader connects");
    let body = "y".repeat(16 * 1024);
    const SENT: usize = 600; // ~10 MB: more than the loopback socket buffers hold
    for seq in 0..SENT {
        let queued = gateway.hub().publish(
            &Target::All,
            &Notification {
                id: format!("n-{seq}"),
                cursor: None,
                title: String::new(),
                body: body.clone(),
                data: None,
                ts: 0,
            },
        );
        assert_eq!(queued, 2);
    }
    for seq in 0..SENT {
        let frame = reader.recv_json(READ_TIMEOUT).await.expect("notification");
        assert_eq!(frame["id"], format!("n-{seq}"));
    }

    let shutting_down = tokio::spawn(gateway.shutdown());
    let reconnect = reader
        .expect_type("reconnect", WAIT_TIMEOUT)
        .await
        .expect("reconnect");
    assert!(reconnect["after_ms"].is_u64(), "{reconnect}");
    reader
        .expect_close(1001, READ_TIMEOUT)
        .await
        .expect("close 1001");
    shutting_down
        .await
        .expect("shutdown task")
        .expect("serve returns within its bound despite the stalled client");
    drop(stalled);
}
