//! Authentication at the upgrade (DESIGN §3.1, §8): a valid token in the header or the query
//! gets `welcome`; every bad token — missing, malformed, wrong key, wrong algorithm,
//! `alg: none`, expired, not yet valid, wrong issuer or audience, unknown `kid` — gets HTTP
//! 401 before any upgrade, and never a session. Covers HS256 secrets, RS256 and ES256 PEM
//! keys and a JWKS file.

use geopush_gateway::config::Config;
use geopush_tests::http::{HttpResponse, upgrade_request};
use geopush_tests::tokens::{
    EC_KID, RSA_KID, TEST_SECRET, TestClaims, fixture, fixture_text, now_unix, sign_es256,
    sign_hs256, sign_rs256, unsigned_alg_none, user_token,
};
use geopush_tests::wait::eventually;
use geopush_tests::{READ_TIMEOUT, TestGateway, WAIT_TIMEOUT, WsClient, test_config};

/// A gateway whose only key is `key` (the HMAC secret of [`test_config`] removed).
async fn gateway_with_key(set_key: impl FnOnce(&mut Config)) -> TestGateway {
    let mut config = test_config();
    config.tokens.jwt_secret = None;
    set_key(&mut config);
    TestGateway::start(config).await.expect("gateway starts")
}

/// The token is accepted: the upgrade answers 101, and a real client gets `welcome`.
async fn assert_accepted(gateway: &TestGateway, what: &str, token: &str) {
    let response = upgrade_request(gateway.addr(), "/v1/ws", Some(token))
        .await
        .expect("upgrade request");
    assert_eq!(response.status, 101, "{what}: {}", response.text());
    let (client, welcome) = WsClient::connect_welcomed(gateway.addr(), token)
        .await
        .unwrap_or_else(|e| panic!("{what}: {e:#}"));
    assert_eq!(welcome["node"], "test-node", "{what}: {welcome}");
    drop(client);
    // Leave no session behind, so the refusals that follow can check that none is made.
    eventually("the accepted sessions to end", WAIT_TIMEOUT, || {
        gateway.gateway().connection_count() == 0
    })
    .await
    .expect("sessions end");
}

/// The token is refused with 401, a JSON error body and no upgrade.
async fn assert_refused(gateway: &TestGateway, what: &str, token: Option<&str>) {
    let before = gateway.metric(
        "geopush_upgrades_refused_total",
        &[("reason", "unauthorized")],
    );
    let response = upgrade_request(gateway.addr(), "/v1/ws", token)
        .await
        .expect("upgrade request");
    assert_unauthorized(what, &response);
    assert_eq!(
        gateway.metric(
            "geopush_upgrades_refused_total",
            &[("reason", "unauthorized")]
        ),
        before + 1.0,
        "{what}: counted as an unauthorized upgrade"
    );
    assert_eq!(
        gateway.gateway().connection_count(),
        0,
        "{what}: no session"
    );
}

fn assert_unauthorized(what: &str, response: &HttpResponse) {
    assert_eq!(response.status, 401, "{what}: {}", response.text());
    assert!(
        response.header("upgrade").is_none() && response.header("sec-websocket-accept").is_none(),
        "{what}: a refused request must not carry upgrade headers: {:?}",
        response.headers
    );
    let body = response.json().expect("JSON error body");
    assert_eq!(body["error"]["code"], "unauthorized", "{what}: {body}");
}

#[tokio::test]
async fn valid_token_in_header_or_query_gets_welcome() {
    let gateway = TestGateway::start(test_config()).await.expect("gateway");
    let token = user_token("alice").expect("token");

    let (mut by_header, welcome) = WsClient::connect_welcomed(gateway.addr(), &token)
        .await
        .expect("header token connects");
    assert_eq!(welcome["node"], "test-node");
    assert!(
        welcome["session"].as_str().is_some_and(|s| !s.is_empty()),
        "{welcome}"
    );
    assert_eq!(welcome["heartbeat_s"], 25.0);
    assert_eq!(welcome["limits"]["max_frame_bytes"], 16 * 1024);

    let mut by_query = WsClient::connect_query(gateway.addr(), &token)
        .await
        .expect("query token connects");
    let welcome2 = by_query
        .expect_type("welcome", READ_TIMEOUT)
        .await
        .expect("welcome on the query-token connection");
    assert_ne!(welcome["session"], welcome2["session"], "two sessions");

    // Both are live sessions of alice.
    by_header
        .roundtrip(1)
        .await
        .expect("header session answers");
    by_query.roundtrip(2).await.expect("query session answers");
    assert_eq!(gateway.hub().session_count(), 2);
    let delivered = gateway.hub().publish(
        &geopush_gateway::Target::User("alice".into()),
        &notification("n1"),
    );
    assert_eq!(delivered, 2);
}

fn notification(id: &str) -> geopush_gateway::Notification {
    geopush_gateway::Notification {
        id: id.into(),
        cursor: None,
        title: "t".into(),
        body: "b".into(),
        data: None,
        ts: 0,
    }
}

#[tokio::test]
async fn bad_tokens_get_401_before_the_upgrade() {
    let gateway = TestGateway::start(test_config()).await.expect("gateway");
    let now = now_unix();
    let rs256 =
        sign_rs256("rsa-private.pem", None, &TestClaims::new("alice", 3600)).expect("RS256 token");
    let cases: Vec<(&str, Option<String>)> = vec![
        ("missing token", None),
        ("empty bearer", Some(String::new())),
        ("malformed", Some("not-a-token".into())),
        ("three garbage parts", Some("a.b.c".into())),
        (
            "wrong secret",
            Some(sign_hs256(b"another-secret", &TestClaims::new("alice", 3600)).expect("t")),
        ),
        ("RS256 on an HS256 gateway", Some(rs256)),
        (
            "alg none",
            Some(unsigned_alg_none(&TestClaims::new("alice", 3600)).expect("t")),
        ),
        (
            "expired beyond the leeway",
            Some(
                sign_hs256(
                    TEST_SECRET.as_bytes(),
                    &TestClaims::new("alice", 0).exp(now - 300),
                )
                .expect("t"),
            ),
        ),
        (
            "not yet valid (nbf)",
            Some(
                sign_hs256(
                    TEST_SECRET.as_bytes(),
                    &TestClaims::new("alice", 3600).nbf(now + 600),
                )
                .expect("t"),
            ),
        ),
        (
            "no exp",
            Some(
                sign_hs256(TEST_SECRET.as_bytes(), &{
                    let mut c = TestClaims::new("alice", 3600);
                    c.exp = None;
                    c
                })
                .expect("t"),
            ),
        ),
        (
            "empty subject",
            Some(sign_hs256(TEST_SECRET.as_bytes(), &TestClaims::new("", 3600)).expect("t")),
        ),
    ];
    for (what, token) in &cases {
        assert_refused(&gateway, what, token.as_deref()).await;
    }
    // The same path through a query parameter is refused too.
    let expired = sign_hs256(
        TEST_SECRET.as_bytes(),
        &TestClaims::new("alice", 0).exp(now - 300),
    )
    .expect("t");
    let response = upgrade_request(
        gateway.addr(),
        &format!("/v1/ws?access_token={expired}"),
        None,
    )
    .await
    .expect("upgrade request");
    assert_unauthorized("expired token in the query", &response);

    // Control: the same request with a good token upgrades, so the refusals above are about
    // the tokens and nothing else.
    assert_accepted(&gateway, "valid HS256", &user_token("alice").expect("t")).await;
}

#[tokio::test]
async fn rs256_pem_gateway_accepts_its_key_only() {
    let public_pem_path = fixture("rsa-public.pem");
    let gateway = gateway_with_key(|c| {
        c.tokens.jwt_public_key = Some(public_pem_path.display().to_string());
    })
    .await;
    let claims = TestClaims::new("alice", 3600);
    assert_accepted(
        &gateway,
        "RS256 signed with the configured key",
        &sign_rs256("rsa-private.pem", None, &claims).expect("t"),
    )
    .await;

    let public_pem = fixture_text("rsa-public.pem").expect("pem");
    let cases = [
        (
            "RS256 signed with another RSA key",
            sign_rs256("rsa-other-private.pem", None, &claims).expect("t"),
        ),
        (
            "HS256 with the test secret on an RS256 gateway",
            sign_hs256(TEST_SECRET.as_bytes(), &claims).expect("t"),
        ),
        (
            "HS256 keyed with the RSA public key (algorithm confusion)",
            sign_hs256(public_pem.as_bytes(), &claims).expect("t"),
        ),
        (
            "ES256 on an RS256 gateway",
            sign_es256("ec-private.pem", None, &claims).expect("t"),
        ),
        ("alg none", unsigned_alg_none(&claims).expect("t")),
    ];
    for (what, token) in &cases {
        assert_refused(&gateway, what, Some(token)).await;
    }
}

#[tokio::test]
async fn es256_pem_gateway_accepts_its_key_only() {
    // PEM text inline rather than a path: both forms are accepted by the configuration.
    let public_pem = fixture_text("ec-public.pem").expect("pem");
    let gateway = gateway_with_key(|c| c.tokens.jwt_public_key = Some(public_pem.clone())).await;
    let claims = TestClaims::new("bob", 3600);
    assert_accepted(
        &gateway,
        "ES256 signed with the configured key",
        &sign_es256("ec-private.pem", None, &claims).expect("t"),
    )
    .await;
    let cases = [
        (
            "RS256 on an ES256 gateway",
            sign_rs256("rsa-private.pem", None, &claims).expect("t"),
        ),
        (
            "HS256 keyed with the EC public key (algorithm confusion)",
            sign_hs256(public_pem.as_bytes(), &claims).expect("t"),
        ),
        (
            "HS256 with the test secret",
            sign_hs256(TEST_SECRET.as_bytes(), &claims).expect("t"),
        ),
    ];
    for (what, token) in &cases {
        assert_refused(&gateway, what, Some(token)).await;
    }
}

#[tokio::test]
async fn jwks_gateway_picks_the_key_by_kid() {
    let gateway = gateway_with_key(|c| c.tokens.jwks_file = Some(fixture("jwks.json"))).await;
    let claims = TestClaims::new("carol", 3600);
    assert_accepted(
        &gateway,
        "RS256 with kid test-rsa-1",
        &sign_rs256("rsa-private.pem", Some(RSA_KID), &claims).expect("t"),
    )
    .await;
    assert_accepted(
        &gateway,
        "ES256 with kid test-ec-1",
        &sign_es256("ec-private.pem", Some(EC_KID), &claims).expect("t"),
    )
    .await;
    let cases = [
        (
            "unknown kid",
            sign_rs256("rsa-private.pem", Some("no-such-kid"), &claims).expect("t"),
        ),
        (
            "no kid",
            sign_rs256("rsa-private.pem", None, &claims).expect("t"),
        ),
        (
            "known kid, another key's signature",
            sign_rs256("rsa-other-private.pem", Some(RSA_KID), &claims).expect("t"),
        ),
        (
            "RSA kid on an ES256 token",
            sign_es256("ec-private.pem", Some(RSA_KID), &claims).expect("t"),
        ),
        (
            "EC kid on an RS256 token",
            sign_rs256("rsa-private.pem", Some(EC_KID), &claims).expect("t"),
        ),
        ("HS256 with a known kid", {
            let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256);
            header.kid = Some(RSA_KID.into());
            jsonwebtoken::encode(
                &header,
                &claims,
                &jsonwebtoken::EncodingKey::from_secret(TEST_SECRET.as_bytes()),
            )
            .expect("t")
        }),
    ];
    for (what, token) in &cases {
        assert_refused(&gateway, what, Some(token)).await;
    }
}

async fn gateway_with_issuer_and_audience() -> TestGateway {
    TestGateway::start_with(|c| {
        c.tokens.jwt_issuer = Some("https://issuer.test".into());
        c.tokens.jwt_audience = Some("geopush".into());
    })
    .await
    .expect("gateway")
}

fn sign_test(claims: TestClaims) -> String {
    sign_hs256(TEST_SECRET.as_bytes(), &claims).expect("token")
}

fn issued_for_geopush() -> TestClaims {
    TestClaims::new("dave", 3600)
        .iss("https://issuer.test")
        .aud("geopush")
}

#[tokio::test]
async fn issuer_and_audience_are_enforced_when_configured() {
    let gateway = gateway_with_issuer_and_audience().await;
    assert_accepted(
        &gateway,
        "matching iss and aud",
        &sign_test(issued_for_geopush()),
    )
    .await;
    let cases = [
        (
            "wrong issuer",
            sign_test(issued_for_geopush().iss("https://evil.test")),
        ),
        (
            "wrong audience",
            sign_test(issued_for_geopush().aud("someone-else")),
        ),
        ("missing issuer", {
            let mut c = issued_for_geopush();
            c.iss = None;
            sign_test(c)
        }),
    ];
    for (what, token) in &cases {
        assert_refused(&gateway, what, Some(token)).await;
    }
}

#[tokio::test]
async fn missing_audience_is_refused_when_an_audience_is_configured() {
    let gateway = gateway_with_issuer_and_audience().await;
    let mut claims = issued_for_geopush();
    claims.aud = None;
    assert_refused(&gateway, "token without aud", Some(&sign_test(claims))).await;
}
