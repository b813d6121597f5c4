//! Bad input (DESIGN §8): every case gets its defined answer — an `error` frame with the
//! code from `proto/src/codes.rs` while the session survives, or the defined close code —
//! and a bystander on the same gateway still gets its notifications afterwards.
//!
//! Covered: malformed JSON, unknown or missing `type`, missing or mistyped fields, fixes out
//! of range / non-finite / negative accuracy / far-future timestamps, binary frames,
//! invalid UTF-8 (1007), oversize frames (`too_large` + 1009), fragmented and unmasked
//! frames, a fix flood (rate limit with coalescing, then 4008), repeated bad frames (4008),
//! a dead peer (heartbeat timeout, counted as 1006), a handshake that never finishes, and
//! connections over the limit (503 before the upgrade).

use geopush_gateway::config::Config;
use geopush_gateway::{Notification, Target};
use geopush_proto::{Area, Circle};
use geopush_tests::http::upgrade_request;
use geopush_tests::raw::{
    OP_BINARY, OP_CLOSE, OP_CONTINUATION, OP_PING, OP_PONG, OP_TEXT, RawWsClient, encode_frame,
};
use geopush_tests::tokens::{now_unix_ms, user_token};
use geopush_tests::wait::eventually;
use geopush_tests::{READ_TIMEOUT, TestGateway, WAIT_TIMEOUT, WsClient, WsEvent, test_config};
use serde_json::{Value, json};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A gateway with a well-behaved client ("bystander") connected before any abuse.
struct Arena {
    gateway: TestGateway,
    bystander: WsClient,
}

impl Arena {
    async fn start(adjust: impl FnOnce(&mut Config)) -> Arena {
        let mut config = test_config();
        adjust(&mut config);
        let gateway = TestGateway::start(config).await.expect("gateway");
        let (bystander, _) =
            WsClient::connect_welcomed(gateway.addr(), &user_token("bystander").expect("t"))
                .await
                .expect("bystander connects");
        Arena { gateway, bystander }
    }

    fn addr(&self) -> std::net::SocketAddr {
        self.gateway.addr()
    }

    fn metric(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.gateway.metric(name, labels)
    }

    async fn client(&self, user: &str) -> WsClient {
        WsClient::connect_welcomed(self.addr(), &user_token(user).expect("t"))
            .await
            .unwrap_or_else(|e| panic!("{user} connects: {e:#}"))
            .0
    }

    async fn raw_client(&self, user: &str) -> RawWsClient {
        let mut raw = RawWsClient::connect(self.addr(), &user_token(user).expect("t"))
            .await
            .unwrap_or_else(|e| panic!("{user} connects raw: {e:#}"));
        raw.expect_type("welcome", READ_TIMEOUT)
            .await
            .expect("welcome on the raw connection");
        raw
    }

    /// Every abusive session has ended and released its slot: only the bystander is left.
    async fn assert_only_bystander_left(&self) {
        eventually("only the bystander's session left", WAIT_TIMEOUT, || {
            self.gateway.gateway().connection_count() == 1
                && self.gateway.hub().session_count() == 1
        })
        .await
        .expect("no session leaked");
        assert_eq!(self.metric("geopush_connections", &[]), 1.0);
    }

    /// After the abuse: the bystander is still connected and its next frame is the
    /// notification published to it, nothing else before it.
    async fn finish(mut self) {
        let queued = self.gateway.hub().publish(
            &Target::User("bystander".into()),
            &Notification {
                id: "still-here".into(),
                cursor: None,
                title: "t".into(),
                body: "b".into(),
                data: None,
                ts: 0,
            },
        );
        assert_eq!(queued, 1, "the bystander's session is still registered");
        let frame = self
            .bystander
            .recv_json(READ_TIMEOUT)
            .await
            .expect("bystander receives");
        assert_eq!(frame["type"], "notification", "{frame}");
        assert_eq!(frame["id"], "still-here");
        self.bystander
            .roundtrip(99)
            .await
            .expect("bystander answers");
    }
}

/// A `ping` frame padded with spaces to exactly `len` bytes.
fn padded_ping(id: u64, len: usize) -> String {
    let mut text = format!(r#"{{"type":"ping","id":{id}}}"#);
    assert!(text.len() <= len);
    text.push_str(&" ".repeat(len - text.len()));
    text
}

#[tokio::test]
async fn each_bad_frame_gets_its_error_and_the_session_survives() {
    let arena = Arena::start(|_| {}).await;
    let mut client = arena.client("sloppy").await;
    let future_ts = now_unix_ms() + 3_600_000;
    let cases: Vec<(&str, String, &str)> = vec![
        ("not JSON", "{not json".into(), "malformed_json"),
        ("a JSON array", "[1,2]".into(), "malformed_json"),
        ("empty text", String::new(), "malformed_json"),
        (
            "NaN is not JSON",
            r#"{"type":"location","lat":NaN,"lon":1}"#.into(),
            "malformed_json",
        ),
        ("no type", r#"{"lat":1,"lon":2}"#.into(), "unknown_type"),
        (
            "unknown type",
            r#"{"type":"teleport"}"#.into(),
            "unknown_type",
        ),
        (
            "location without lon",
            r#"{"type":"location","lat":1}"#.into(),
            "bad_request",
        ),
        (
            "lat as a string",
            r#"{"type":"location","lat":"52","lon":13}"#.into(),
            "bad_request",
        ),
        (
            "Infinity (1e999)",
            r#"{"type":"location","lat":1e999,"lon":1}"#.into(),
            "bad_request",
        ),
        (
            "subscribe without topic",
            r#"{"type":"subscribe"}"#.into(),
            "bad_request",
        ),
        (
            "ack without ids",
            r#"{"type":"ack","ids":[]}"#.into(),
            "bad_request",
        ),
        (
            "lat above 90",
            r#"{"type":"location","lat":90.5,"lon":0}"#.into(),
            "invalid_fix",
        ),
        (
            "lat below -90",
            r#"{"type":"location","lat":-91,"lon":0}"#.into(),
            "invalid_fix",
        ),
        (
            "lon above 180",
            r#"{"type":"location","lat":0,"lon":180.01}"#.into(),
            "invalid_fix",
        ),
        (
            "lon below -180",
            r#"{"type":"location","lat":0,"lon":-181}"#.into(),
            "invalid_fix",
        ),
        (
            "negative accuracy",
            r#"{"type":"location","lat":1,"lon":1,"accuracy_m":-1}"#.into(),
            "invalid_fix",
        ),
        (
            "ts an hour ahead",
            format!(r#"{{"type":"location","lat":1,"lon":1,"ts":{future_ts}}}"#),
            "invalid_fix",
        ),
    ];
    for (what, text, code) in &cases {
        client.send_text(text.clone()).await.expect("send");
        let error = client
            .expect_error(code)
            .await
            .unwrap_or_else(|e| panic!("{what}: {e:#}"));
        assert!(
            !error["message"].as_str().unwrap_or_default().is_empty(),
            "{what}"
        );
    }
    client
        .send_binary(b"\x01\x02".to_vec())
        .await
        .expect("binary");
    client
        .expect_error("binary_not_supported")
        .await
        .expect("binary frames are refused");
    client.roundtrip(1).await.expect("the session survived");

    // None of the invalid fixes was indexed or counted.
    assert_eq!(arena.gateway.hub().located_count(), 0);
    assert_eq!(arena.metric("geopush_fixes_total", &[]), 0.0);
    for (code, count) in [
        ("malformed_json", 4.0),
        ("unknown_type", 2.0),
        ("bad_request", 5.0),
        ("invalid_fix", 6.0),
        ("binary_not_supported", 1.0),
    ] {
        assert_eq!(
            arena.metric("geopush_bad_frames_total", &[("code", code)]),
            count,
            "bad_frames_total{{code={code}}}"
        );
    }
    // A valid fix after all that is accepted.
    client.send_fix(52.52, 13.405).await.expect("fix");
    client.roundtrip(2).await.expect("pong");
    assert_eq!(arena.gateway.hub().located_count(), 1);
    assert_eq!(arena.gateway.hub().session_count(), 2);
    arena.finish().await;
}

#[tokio::test]
async fn invalid_utf8_text_closes_with_1007() {
    let arena = Arena::start(|_| {}).await;
    let mut whole = arena.raw_client("mojibake").await;
    whole
        .send_frame(
            true,
            OP_TEXT,
            b"{\"type\":\"ping\",\"id\":\"\xff\xfe\"}",
            true,
        )
        .await
        .expect("send");
    let seen = whole.read_until_close(READ_TIMEOUT).await.expect("close");
    assert_eq!(seen.close, Some(Some(1007)), "{seen:?}");
    assert!(seen.texts.is_empty(), "no answer but the close: {seen:?}");

    // Split inside a fragmented message: only the whole message is invalid.
    let mut fragmented = arena.raw_client("mojibake2").await;
    fragmented
        .send_frame(false, OP_TEXT, b"{\"type\":\"ping\",\"id\":\"\xc3", true)
        .await
        .expect("first fragment");
    fragmented
        .send_frame(true, OP_CONTINUATION, b"\x28\"}", true)
        .await
        .expect("last fragment");
    let seen = fragmented
        .read_until_close(READ_TIMEOUT)
        .await
        .expect("close");
    assert_eq!(seen.close, Some(Some(1007)), "{seen:?}");

    eventually("two 1007 closes counted", WAIT_TIMEOUT, || {
        arena.metric("geopush_closes_total", &[("code", "1007")]) == 2.0
    })
    .await
    .expect("closes counted");
    arena.assert_only_bystander_left().await;
    arena.finish().await;
}

#[tokio::test]
async fn frame_over_the_limit_gets_too_large_and_1009() {
    let arena = Arena::start(|c| c.max_frame_bytes = 1024).await;
    let mut client = arena.raw_client("big").await;
    // The limit is inclusive: exactly max_frame_bytes is fine.
    client
        .send_text(&padded_ping(1, 1024))
        .await
        .expect("send 1024 bytes");
    let pong = client
        .expect_type("pong", READ_TIMEOUT)
        .await
        .expect("a frame of exactly the limit is accepted");
    assert_eq!(pong["id"], 1);

    client
        .send_text(&padded_ping(2, 1025))
        .await
        .expect("send 1025 bytes");
    let seen = client.read_until_close(READ_TIMEOUT).await.expect("close");
    assert_eq!(seen.close, Some(Some(1009)), "{seen:?}");
    let frames = seen.json().expect("JSON");
    assert_eq!(frames.len(), 1, "one error before the close: {frames:?}");
    assert_eq!(frames[0]["type"], "error");
    assert_eq!(frames[0]["code"], "too_large");
    assert_eq!(
        arena.metric("geopush_bad_frames_total", &[("code", "too_large")]),
        1.0
    );

    // Fragments that add up past the limit are refused the same way.
    let mut fragmented = arena.raw_client("big2").await;
    let half = padded_ping(3, 600);
    fragmented
        .send_frame(false, OP_TEXT, half.as_bytes(), true)
        .await
        .expect("first fragment");
    fragmented
        .send_frame(true, OP_CONTINUATION, " ".repeat(600).as_bytes(), true)
        .await
        .expect("last fragment");
    let seen = fragmented
        .read_until_close(READ_TIMEOUT)
        .await
        .expect("close");
    assert_eq!(seen.close, Some(Some(1009)), "{seen:?}");
    for frame in seen.json().expect("JSON") {
        assert_eq!(
            frame["code"], "too_large",
            "only a too_large error may precede: {frame}"
        );
    }
    eventually("two 1009 closes counted", WAIT_TIMEOUT, || {
        arena.metric("geopush_closes_total", &[("code", "1009")]) == 2.0
    })
    .await
    .expect("closes counted");
    arena.assert_only_bystander_left().await;
    arena.finish().await;
}

#[tokio::test]
async fn fragmented_message_is_reassembled_around_a_ping() {
    let arena = Arena::start(|_| {}).await;
    let mut client = arena.raw_client("fragments").await;
    client
        .send_frame(false, OP_TEXT, br#"{"type":"pi"#, true)
        .await
        .expect("fragment 1");
    // Control frames may come between fragments (RFC 6455 §5.4).
    client
        .send_frame(true, OP_PING, b"mid", true)
        .await
        .expect("ping");
    client
        .send_frame(false, OP_CONTINUATION, br#"ng","id""#, true)
        .await
        .expect("fragment 2");
    client
        .send_frame(true, OP_CONTINUATION, b":9}", true)
        .await
        .expect("fragment 3");
    let pong = client
        .read_frame(READ_TIMEOUT)
        .await
        .expect("a frame")
        .expect("not EOF");
    assert_eq!(
        (pong.opcode, pong.payload.as_slice()),
        (OP_PONG, &b"mid"[..])
    );
    let app_pong = client
        .expect_type("pong", READ_TIMEOUT)
        .await
        .expect("app pong");
    assert_eq!(app_pong["id"], 9);

    // A continuation with no message to continue is a protocol error.
    client
        .send_frame(true, OP_CONTINUATION, b"{}", true)
        .await
        .expect("stray continuation");
    let seen = client.read_until_close(READ_TIMEOUT).await.expect("close");
    assert_eq!(seen.close, Some(Some(1002)), "{seen:?}");
    arena.assert_only_bystander_left().await;
    arena.finish().await;
}

#[tokio::test]
async fn websocket_protocol_violations_close_with_1002() {
    let arena = Arena::start(|_| {}).await;
    let text = br#"{"type":"ping","id":1}"#;
    let cases: [(&str, Vec<Vec<u8>>); 5] = [
        (
            "a reserved bit set",
            vec![{
                let mut frame = encode_frame(true, OP_TEXT, text, true);
                frame[0] |= 0x40;
                frame
            }],
        ),
        (
            "a reserved opcode (0x3)",
            vec![encode_frame(true, 0x3, text, true)],
        ),
        (
            "a ping longer than 125 bytes",
            vec![encode_frame(true, OP_PING, &[b'p'; 126], true)],
        ),
        (
            "a fragmented control frame",
            vec![encode_frame(false, OP_PING, b"p", true)],
        ),
        (
            "a new message inside a fragmented one",
            vec![
                encode_frame(false, OP_TEXT, br#"{"type":"#, true),
                encode_frame(true, OP_BINARY, b"x", true),
            ],
        ),
    ];
    for (i, (what, frames)) in cases.iter().enumerate() {
        let mut client = arena.raw_client(&format!("violator-{i}")).await;
        for frame in frames {
            client.write_raw(frame).await.expect("send");
        }
        let seen = client
            .read_until_close(READ_TIMEOUT)
            .await
            .unwrap_or_else(|e| panic!("{what}: {e:#}"));
        assert_eq!(seen.close, Some(Some(1002)), "{what}: {seen:?}");
        assert!(seen.texts.is_empty(), "{what}: {seen:?}");
    }
    eventually("the 1002 closes counted", WAIT_TIMEOUT, || {
        arena.metric("geopush_closes_total", &[("code", "1002")]) == cases.len() as f64
    })
    .await
    .expect("closes counted");
    arena.assert_only_bystander_left().await;
    arena.finish().await;
}

#[tokio::test]
async fn client_close_is_echoed_and_the_session_ends() {
    let arena = Arena::start(|_| {}).await;
    let mut client = arena.raw_client("leaver").await;
    let mut payload = 4000u16.to_be_bytes().to_vec();
    payload.extend_from_slice(b"bye");
    client
        .send_frame(true, OP_CLOSE, &payload, true)
        .await
        .expect("close");
    let seen = client.read_until_close(READ_TIMEOUT).await.expect("echo");
    assert_eq!(
        seen.close,
        Some(Some(4000)),
        "the client's code echoed: {seen:?}"
    );
    assert!(
        seen.ended,
        "the server ends the TCP connection after the close"
    );
    arena.assert_only_bystander_left().await;
    arena.finish().await;
}

#[tokio::test]
async fn an_empty_client_close_is_answered_with_1000_and_the_session_ends() {
    // What tungstenite's `close(None)` sends: a close frame with no payload at all.
    let arena = Arena::start(|_| {}).await;
    let mut client = arena.raw_client("quiet-leaver").await;
    client
        .send_frame(true, OP_CLOSE, &[], true)
        .await
        .expect("close");
    let seen = client.read_until_close(READ_TIMEOUT).await.expect("echo");
    assert_eq!(seen.close, Some(Some(1000)), "{seen:?}");
    assert!(seen.ended, "{seen:?}");
    arena.assert_only_bystander_left().await;
    eventually("the close counted under 1000", WAIT_TIMEOUT, || {
        arena.metric("geopush_closes_total", &[("code", "1000")]) == 1.0
    })
    .await
    .expect("counted");
    arena.finish().await;
}

#[tokio::test]
async fn invalid_client_close_frames_are_protocol_errors() {
    // RFC 6455 §7.4: 1004-1006, 1015, 1016-2999 and anything below 1000 or above 4999 are
    // not valid in a close frame, nor is a 1-byte payload; the endpoint that receives one
    // fails the connection (1002), and an invalid UTF-8 reason is 1007 (Autobahn 7.5, 7.9).
    let arena = Arena::start(|_| {}).await;
    let code = |c: u16| c.to_be_bytes().to_vec();
    let cases: Vec<(String, Vec<u8>, u16)> = [999u16, 1004, 1005, 1006, 1015, 1016, 2999, 5000]
        .into_iter()
        .map(|c| (format!("code {c}"), code(c), 1002))
        .chain([
            ("a 1-byte payload".to_owned(), vec![0x03], 1002),
            (
                "an invalid UTF-8 reason".to_owned(),
                [code(1000), vec![0xff, 0xfe]].concat(),
                1007,
            ),
        ])
        .collect();
    let mut wrong = Vec::new();
    for (i, (what, payload, expected)) in cases.iter().enumerate() {
        let mut client = arena.raw_client(&format!("closer-{i}")).await;
        client
            .send_frame(true, OP_CLOSE, payload, true)
            .await
            .expect("close");
        let seen = client
            .read_until_close(READ_TIMEOUT)
            .await
            .unwrap_or_else(|e| panic!("{what}: {e:#}"));
        if seen.close != Some(Some(*expected)) {
            wrong.push(format!("{what}: expected {expected}, got {:?}", seen.close));
        }
    }
    assert!(
        wrong.is_empty(),
        "wrong answers to invalid close frames: {wrong:#?}"
    );
    arena.assert_only_bystander_left().await;
    arena.finish().await;
}

#[tokio::test]
async fn unmasked_client_frame_closes_with_1002() {
    // RFC 6455 §5.1: a server MUST close the connection on an unmasked client frame;
    // proto/src/codes.rs lists "unmasked frame" under 1002.
    let arena = Arena::start(|_| {}).await;
    let mut client = arena.raw_client("unmasked").await;
    client
        .send_frame(true, OP_TEXT, br#"{"type":"ping","id":1}"#, false)
        .await
        .expect("send unmasked");
    let answer = client
        .read_frame(READ_TIMEOUT)
        .await
        .expect("an answer")
        .expect("a close frame before EOF");
    assert_eq!(
        answer.close_code(),
        Some(1002),
        "expected close 1002, the server answered opcode {:#x}: {:?}",
        answer.opcode,
        String::from_utf8_lossy(&answer.payload)
    );
    arena.finish().await;
}

#[tokio::test]
async fn fix_flood_is_rate_limited_and_coalesced_latest_wins() {
    let arena = Arena::start(|c| c.max_fixes_per_second = 5).await;
    let mut client = arena.client("flooder").await;
    const SENT: usize = 20;
    // Walk north in 0.01° steps; the last fix is the one that must end up indexed.
    let position = |i: usize| (10.0 + 0.01 * i as f64, 20.0);
    for i in 0..SENT {
        let (lat, lon) = position(i);
        client.send_fix(lat, lon).await.expect("fix");
    }
    client
        .send_json(&json!({"type": "ping", "id": 1}))
        .await
        .expect("ping");
    let mut errors = Vec::new();
    loop {
        let frame = client.recv_json(READ_TIMEOUT).await.expect("frame");
        match frame["type"].as_str() {
            Some("pong") => break,
            Some("error") => errors.push(frame),
            _ => panic!("unexpected {frame}"),
        }
    }
    assert!(!errors.is_empty(), "a flood gets rate_limited");
    assert!(errors.len() < SENT, "not one error per fix: {errors:?}");
    for error in &errors {
        assert_eq!(error["code"], "rate_limited", "{error}");
    }
    // Every fix is either processed or coalesced into a later one; at least one was.
    eventually("processed + coalesced == sent", WAIT_TIMEOUT, || {
        arena.metric("geopush_fixes_total", &[])
            + arena.metric("geopush_fixes_coalesced_total", &[])
            == SENT as f64
    })
    .await
    .expect("every fix accounted for");
    assert!(arena.metric("geopush_fixes_coalesced_total", &[]) > 0.0);
    assert!(arena.metric("geopush_bad_frames_total", &[("code", "rate_limited")]) >= 1.0);

    // The latest fix won: the client is indexed at the last position, not at an earlier one.
    let (last_lat, last_lon) = position(SENT - 1);
    let around = |lat: f64, lon: f64| {
        Target::Area(Area::Circle(Circle {
            lat,
            lon,
            radius_m: 100.0,
        }))
    };
    let note = |id: &str| Notification {
        id: id.into(),
        cursor: None,
        title: String::new(),
        body: String::new(),
        data: None,
        ts: 0,
    };
    let mut delivered = 0;
    eventually("the last fix to be indexed", WAIT_TIMEOUT, || {
        delivered = arena
            .gateway
            .hub()
            .publish(&around(last_lat, last_lon), &note("at-last"));
        delivered == 1
    })
    .await
    .expect("the pending (latest) fix is processed");
    let (first_lat, first_lon) = position(0);
    assert_eq!(
        arena
            .gateway
            .hub()
            .publish(&around(first_lat, first_lon), &note("at-first")),
        0
    );
    let frame = client
        .recv_json(READ_TIMEOUT)
        .await
        .expect("area notification");
    assert_eq!(frame["id"], "at-last");
    client
        .roundtrip(2)
        .await
        .expect("the flooder is still connected");
    arena.finish().await;
}

#[tokio::test]
async fn persistent_fix_flood_closes_with_4008() {
    let arena = Arena::start(|c| {
        c.max_fixes_per_second = 5;
        c.fix_flood_factor = 2;
        c.fix_flood_seconds = 1;
    })
    .await;
    let mut client = arena.client("hose").await;
    let deadline = tokio::time::Instant::now() + WAIT_TIMEOUT;
    let mut sent = 0u32;
    let close = loop {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no close after {sent} fixes"
        );
        // Keep sending until the server closes; sends may fail once it has.
        if client
            .send_fix(1.0, 1.0 + f64::from(sent) * 1e-5)
            .await
            .is_ok()
        {
            sent += 1;
        }
        match client.next_event(Duration::from_millis(10)).await {
            Ok(WsEvent::Close(code, _)) => break code,
            Ok(WsEvent::Ended(e)) => panic!("stream ended without a close frame: {e:?}"),
            Ok(WsEvent::Text(text)) => {
                let frame: Value = serde_json::from_str(&text).expect("JSON");
                assert_eq!(frame["code"], "rate_limited", "{frame}");
            }
            _ => {}
        }
    };
    assert_eq!(close, Some(4008));
    eventually("a 4008 close counted", WAIT_TIMEOUT, || {
        arena.metric("geopush_closes_total", &[("code", "4008")]) == 1.0
    })
    .await
    .expect("close counted");
    arena.assert_only_bystander_left().await;
    arena.finish().await;
}

#[tokio::test]
async fn repeated_bad_frames_close_with_4008() {
    let arena = Arena::start(|c| c.max_bad_frames_per_minute = 5).await;
    let mut client = arena.client("noisy").await;
    for _ in 0..6 {
        client.send_text("{oops").await.expect("send");
    }
    let (frames, close) = client.recv_until_close(READ_TIMEOUT).await.expect("close");
    assert_eq!(close, Some(4008));
    assert_eq!(frames.len(), 6, "each bad frame answered: {frames:?}");
    for frame in &frames {
        assert_eq!(frame["code"], "malformed_json", "{frame}");
    }
    eventually("a 4008 close counted", WAIT_TIMEOUT, || {
        arena.metric("geopush_closes_total", &[("code", "4008")]) == 1.0
    })
    .await
    .expect("close counted");

    // Five bad frames (the limit) do not close.
    let mut careful = arena.client("careful").await;
    for _ in 0..5 {
        careful.send_text("{oops").await.expect("send");
        careful.expect_error("malformed_json").await.expect("error");
    }
    careful
        .roundtrip(1)
        .await
        .expect("still connected at the limit");
    arena.finish().await;
}

#[tokio::test]
async fn dead_peer_is_dropped_after_missed_heartbeats() {
    let arena = Arena::start(|c| c.heartbeat_seconds = 0.3).await;
    let mut dead = arena.raw_client("dead").await;
    // Read everything, answer nothing: the server pings, then gives up and drops the TCP
    // connection without a close frame.
    let seen = dead.read_until_close(WAIT_TIMEOUT).await.expect("EOF");
    assert!(seen.pings >= 1, "the server pinged: {seen:?}");
    assert_eq!(
        seen.close, None,
        "a dead peer gets no close frame: {seen:?}"
    );
    assert!(seen.ended, "{seen:?}");
    eventually("a 1006 close counted", WAIT_TIMEOUT, || {
        arena.metric("geopush_closes_total", &[("code", "1006")]) == 1.0
    })
    .await
    .expect("close counted");
    eventually("only the bystander left", WAIT_TIMEOUT, || {
        arena.gateway.gateway().connection_count() == 1
    })
    .await
    .expect("the dead session is gone");
    // The bystander answered the same pings and is alive.
    arena.assert_only_bystander_left().await;
    arena.finish().await;
}

/// Read from a plain TCP connection until EOF; whatever the server sent before is returned.
async fn read_to_eof(stream: &mut TcpStream) -> Vec<u8> {
    let mut received = Vec::new();
    let result = tokio::time::timeout(READ_TIMEOUT, stream.read_to_end(&mut received)).await;
    match result {
        Ok(Ok(_)) => {}
        Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
        Ok(Err(e)) => panic!("reading: {e}"),
        Err(_) => panic!(
            "the server kept the connection open for {READ_TIMEOUT:?}; received {:?}",
            String::from_utf8_lossy(&received)
        ),
    }
    received
}

#[tokio::test]
async fn unfinished_handshake_is_closed_by_the_server() {
    let arena = Arena::start(|c| c.handshake_timeout_seconds = 0.5).await;
    let mut half = TcpStream::connect(arena.addr()).await.expect("connect");
    half.write_all(b"GET /v1/ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n")
        .await
        .expect("half a request");
    let received = read_to_eof(&mut half).await;
    // Either nothing or an error status: never a 101.
    assert!(
        !String::from_utf8_lossy(&received).contains(" 101 "),
        "{received:?}"
    );
    arena.assert_only_bystander_left().await;
    arena.finish().await;
}

#[tokio::test]
async fn silent_connection_is_closed_by_the_server() {
    let arena = Arena::start(|c| c.handshake_timeout_seconds = 0.5).await;
    // Connect and send nothing at all: also a handshake that never finishes.
    let mut silent = TcpStream::connect(arena.addr()).await.expect("connect");
    read_to_eof(&mut silent).await;
    arena.assert_only_bystander_left().await;
    arena.finish().await;
}

#[tokio::test]
async fn connections_over_the_limit_get_503_before_the_upgrade() {
    // The bystander holds one of the two slots.
    let arena = Arena::start(|c| c.max_connections = 2).await;
    let second = arena.client("second").await;
    let token = user_token("third").expect("t");
    let response = upgrade_request(arena.addr(), "/v1/ws", Some(&token))
        .await
        .expect("request");
    assert_eq!(response.status, 503, "{}", response.text());
    assert!(response.header("sec-websocket-accept").is_none());
    assert_eq!(response.json().expect("JSON")["error"]["code"], "full");
    assert_eq!(
        arena.metric("geopush_upgrades_refused_total", &[("reason", "full")]),
        1.0
    );
    assert_eq!(arena.gateway.gateway().connection_count(), 2);

    // A slot freed is a slot available again.
    drop(second);
    eventually("the second session to end", WAIT_TIMEOUT, || {
        arena.gateway.gateway().connection_count() == 1
    })
    .await
    .expect("slot released");
    let mut third = arena.client("third").await;
    third.roundtrip(1).await.expect("third connected");
    arena.finish().await;
}
