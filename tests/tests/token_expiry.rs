//! Tokens that expire mid-session (DESIGN §4, §8): with no leeway and a short grace, a
//! session whose token expires gets an `error` `token_expired`, then close 4001; a session
//! that sends `refresh` with a fresh token first stays open past the old expiry; a refresh
//! with another user's token or a bad token gets `token_invalid`, the session continues,
//! and the old expiry still applies.

use geopush_tests::tokens::{TEST_SECRET, TestClaims, now_unix, sign_hs256, user_token};
use geopush_tests::wait::{eventually, until_unix_time};
use geopush_tests::{READ_TIMEOUT, TestGateway, WAIT_TIMEOUT, WsClient};
use serde_json::json;

async fn gateway() -> TestGateway {
    TestGateway::start_with(|c| {
        c.tokens.jwt_leeway_seconds = 0;
        c.token_grace_seconds = 0.5;
    })
    .await
    .expect("gateway")
}

/// A token for `sub` that expires at Unix second `exp`.
fn token_expiring_at(sub: &str, exp: u64) -> String {
    sign_hs256(TEST_SECRET.as_bytes(), &TestClaims::new(sub, 0).exp(exp)).expect("token")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_token_is_closed_with_4001_unless_refreshed() {
    let gateway = gateway().await;
    let exp = now_unix() + 2;

    let (mut keeper, _) =
        WsClient::connect_welcomed(gateway.addr(), &token_expiring_at("keeper", exp))
            .await
            .expect("keeper connects");
    keeper
        .send_json(&json!({"type": "refresh", "token": user_token("keeper").expect("t")}))
        .await
        .expect("refresh");
    // The refresh is answered by silence: the next frame is the pong.
    keeper.roundtrip(1).await.expect("refresh accepted");

    let (mut lapser, _) =
        WsClient::connect_welcomed(gateway.addr(), &token_expiring_at("lapser", exp))
            .await
            .expect("lapser connects");
    lapser
        .roundtrip(1)
        .await
        .expect("lapser is live before exp");
    let error = lapser
        .recv_json(WAIT_TIMEOUT)
        .await
        .expect("an error frame at expiry");
    assert_eq!(error["type"], "error", "{error}");
    assert_eq!(error["code"], "token_expired", "{error}");
    lapser
        .expect_close(4001, READ_TIMEOUT)
        .await
        .expect("close 4001 after the grace");
    eventually("the 4001 close counted", WAIT_TIMEOUT, || {
        gateway.metric("geopush_closes_total", &[("code", "4001")]) == 1.0
    })
    .await
    .expect("counted");

    // Past the old exp + grace (plus a second: exp has whole-second resolution), the
    // refreshed session answers, and nothing came before the pong.
    until_unix_time(exp as f64 + 0.5 + 1.0, WAIT_TIMEOUT)
        .await
        .expect("clock");
    keeper
        .roundtrip(2)
        .await
        .expect("the refreshed session outlives the old token");
    assert_eq!(gateway.hub().session_count(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_refresh_gets_token_invalid_and_does_not_extend() {
    let gateway = gateway().await;
    let exp = now_unix() + 3;
    let (mut carol, _) =
        WsClient::connect_welcomed(gateway.addr(), &token_expiring_at("carol", exp))
            .await
            .expect("carol connects");

    let refreshes = [
        (
            "another user's valid token",
            user_token("mallory").expect("t"),
        ),
        ("garbage", "not-a-jwt".to_owned()),
        (
            "carol's token, expired",
            token_expiring_at("carol", now_unix() - 300),
        ),
        (
            "carol's token, wrong secret",
            sign_hs256(b"other-secret", &TestClaims::new("carol", 3600)).expect("t"),
        ),
    ];
    for (i, (what, token)) in refreshes.iter().enumerate() {
        carol
            .send_json(&json!({"type": "refresh", "token": token}))
            .await
            .expect("refresh");
        carol
            .expect_error("token_invalid")
            .await
            .unwrap_or_else(|e| panic!("{what}: {e:#}"));
        carol
            .roundtrip(i as u64)
            .await
            .unwrap_or_else(|e| panic!("session continues after {what}: {e:#}"));
    }
    assert_eq!(
        gateway.metric("geopush_bad_frames_total", &[("code", "token_invalid")]),
        refreshes.len() as f64
    );

    // None of them extended the session: the original expiry still closes it.
    let error = carol
        .recv_json(WAIT_TIMEOUT)
        .await
        .expect("an error frame at the original exp");
    assert_eq!(error["type"], "error", "{error}");
    assert_eq!(error["code"], "token_expired", "{error}");
    carol
        .expect_close(4001, READ_TIMEOUT)
        .await
        .expect("close 4001");
}
