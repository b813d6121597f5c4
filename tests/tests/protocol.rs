//! Client protocol v1 (DESIGN §4) over real WebSockets: topic subscribe/unsubscribe reaches
//! subscribers only and once each, a user's every session gets a user notification,
//! app-level `ping` is answered with `pong` carrying the same id, WebSocket pings get pongs,
//! and a notification's `data` is echoed byte for byte.

use geopush_gateway::{Notification, Target};
use geopush_tests::tokens::{device_token, user_token};
use geopush_tests::{READ_TIMEOUT, TestGateway, WsClient, WsEvent, test_config};
use serde_json::value::RawValue;
use serde_json::{Value, json};

fn notification(id: &str) -> Notification {
    Notification {
        id: id.into(),
        cursor: None,
        title: format!("title {id}"),
        body: format!("body {id}"),
        data: None,
        ts: 1_763_700_000_000,
    }
}

async fn connect(gateway: &TestGateway, user: &str) -> WsClient {
    let token = user_token(user).expect("token");
    WsClient::connect_welcomed(gateway.addr(), &token)
        .await
        .unwrap_or_else(|e| panic!("{user} connects: {e:#}"))
        .0
}

/// Publish a sentinel to everyone and return, per client, the ids of the notifications each
/// received before it (and fail on any other frame).
async fn received_ids(
    gateway: &TestGateway,
    clients: &mut [&mut WsClient],
    sentinel: &str,
) -> Vec<Vec<String>> {
    gateway.hub().publish(&Target::All, &notification(sentinel));
    let mut all = Vec::new();
    for client in clients.iter_mut() {
        let frames = client
            .frames_before(sentinel, READ_TIMEOUT)
            .await
            .expect("sentinel arrives");
        all.push(
            frames
                .iter()
                .map(|f| {
                    assert_eq!(f["type"], "notification", "unexpected frame {f}");
                    f["id"].as_str().expect("id").to_owned()
                })
                .collect(),
        );
    }
    all
}

async fn subscribe(client: &mut WsClient, topic: &str, confirm_id: u64) {
    client
        .send_json(&json!({"type": "subscribe", "topic": topic}))
        .await
        .expect("send subscribe");
    // Frames are handled in order: the pong proves the subscription is in place.
    client
        .roundtrip(confirm_id)
        .await
        .expect("pong after subscribe");
}

#[tokio::test]
async fn topics_reach_subscribers_only_once_each() {
    let gateway = TestGateway::start(test_config()).await.expect("gateway");
    let mut a = connect(&gateway, "a").await;
    let mut b = connect(&gateway, "b").await;
    let mut c = connect(&gateway, "c").await;

    subscribe(&mut a, "traffic", 1).await;
    subscribe(&mut b, "traffic", 2).await;
    subscribe(&mut b, "traffic", 3).await; // twice: still one subscription
    subscribe(&mut b, "weather", 4).await;

    let topic = |t: &str| Target::Topic(t.into());
    assert_eq!(
        gateway
            .hub()
            .publish(&topic("traffic"), &notification("t1")),
        2
    );
    assert_eq!(
        gateway
            .hub()
            .publish(&topic("weather"), &notification("w1")),
        1
    );
    assert_eq!(
        gateway.hub().publish(&topic("nobody"), &notification("x1")),
        0
    );
    let got = received_ids(&gateway, &mut [&mut a, &mut b, &mut c], "s1").await;
    assert_eq!(got[0], ["t1"], "a: traffic only");
    assert_eq!(got[1], ["t1", "w1"], "b: traffic once, then weather");
    assert!(got[2].is_empty(), "c subscribed nothing: {:?}", got[2]);

    a.send_json(&json!({"type": "unsubscribe", "topic": "traffic"}))
        .await
        .expect("unsubscribe");
    a.roundtrip(5).await.expect("pong after unsubscribe");
    // Unsubscribing from a topic never subscribed is harmless.
    c.send_json(&json!({"type": "unsubscribe", "topic": "traffic"}))
        .await
        .expect("unsubscribe");
    c.roundtrip(6)
        .await
        .expect("pong after a no-op unsubscribe");

    assert_eq!(
        gateway
            .hub()
            .publish(&topic("traffic"), &notification("t2")),
        1
    );
    let got = received_ids(&gateway, &mut [&mut a, &mut b, &mut c], "s2").await;
    assert!(got[0].is_empty(), "a unsubscribed: {:?}", got[0]);
    assert_eq!(got[1], ["t2"]);
    assert!(got[2].is_empty());

    // A subscriber that leaves is no longer a recipient.
    drop(b);
    geopush_tests::wait::eventually("b's session to end", geopush_tests::WAIT_TIMEOUT, || {
        gateway.hub().session_count() == 2
    })
    .await
    .expect("b leaves");
    assert_eq!(
        gateway
            .hub()
            .publish(&topic("weather"), &notification("w2")),
        0
    );
}

#[tokio::test]
async fn user_notification_reaches_every_session_of_the_user() {
    let gateway = TestGateway::start(test_config()).await.expect("gateway");
    let phone = device_token("alice", "phone").expect("token");
    let tablet = device_token("alice", "tablet").expect("token");
    let (mut alice_phone, _) = WsClient::connect_welcomed(gateway.addr(), &phone)
        .await
        .expect("phone");
    let (mut alice_tablet, _) = WsClient::connect_welcomed(gateway.addr(), &tablet)
        .await
        .expect("tablet");
    let mut bob = connect(&gateway, "bob").await;

    let queued = gateway
        .hub()
        .publish(&Target::User("alice".into()), &notification("for-alice"));
    assert_eq!(queued, 2);
    assert_eq!(
        gateway
            .hub()
            .publish(&Target::User("nobody".into()), &notification("lost")),
        0
    );
    let got = received_ids(
        &gateway,
        &mut [&mut alice_phone, &mut alice_tablet, &mut bob],
        "s",
    )
    .await;
    assert_eq!(got[0], ["for-alice"]);
    assert_eq!(got[1], ["for-alice"]);
    assert!(got[2].is_empty(), "bob got {:?}", got[2]);
}

#[tokio::test]
async fn app_ping_gets_pong_with_the_same_id() {
    let gateway = TestGateway::start(test_config()).await.expect("gateway");
    let mut client = connect(&gateway, "pinger").await;

    client
        .send_text(r#"{"type":"ping","id":7}"#)
        .await
        .expect("ping");
    let pong = client.recv_text(READ_TIMEOUT).await.expect("pong");
    let pong: Value = serde_json::from_str(&pong).expect("JSON");
    assert_eq!(pong, json!({"type": "pong", "id": 7}));

    // Any JSON id is echoed as it was sent; no id gives a pong without one.
    for id in [json!("abc"), json!({"seq": [1, 2]}), json!(1.5)] {
        client
            .send_json(&json!({"type": "ping", "id": id}))
            .await
            .expect("ping");
        let pong = client
            .expect_type("pong", READ_TIMEOUT)
            .await
            .expect("pong");
        assert_eq!(pong["id"], id);
    }
    client.send_text(r#"{"type":"ping"}"#).await.expect("ping");
    let pong = client
        .expect_type("pong", READ_TIMEOUT)
        .await
        .expect("pong");
    assert_eq!(pong, json!({"type": "pong"}));
}

#[tokio::test]
async fn websocket_ping_gets_pong_with_the_payload() {
    let gateway = TestGateway::start(test_config()).await.expect("gateway");
    let mut client = connect(&gateway, "wsping").await;
    client
        .send_ping(b"are-you-there".to_vec())
        .await
        .expect("ping");
    loop {
        match client.next_event(READ_TIMEOUT).await.expect("an event") {
            WsEvent::Pong(payload) => {
                assert_eq!(payload, b"are-you-there");
                break;
            }
            WsEvent::Ping(_) => continue,
            other => panic!("expected a pong, got {other:?}"),
        }
    }
    // The session is still fine afterwards.
    client.roundtrip(1).await.expect("app roundtrip");
}

#[tokio::test]
async fn notification_data_is_echoed_verbatim() {
    let gateway = TestGateway::start(test_config()).await.expect("gateway");
    let mut client = connect(&gateway, "echo").await;
    // Number spellings, key order, escapes, non-ASCII, big integers and whitespace: a
    // parse-and-reserialize would change at least one of them.
    let data = r#"{"z":1.50,"a":[2e3,-0.0,{"k":null}], "s":"Gr\u00fc\u00dfe \"q\" €","big":123456789012345678901234567890}"#;
    let mut n = notification("verbatim");
    n.data = Some(RawValue::from_string(data.to_owned()).expect("raw JSON"));
    assert_eq!(gateway.hub().publish(&Target::User("echo".into()), &n), 1);
    let text = client.recv_text(READ_TIMEOUT).await.expect("notification");
    assert!(
        text.contains(&format!(r#""data":{data}"#)),
        "data not verbatim in {text}"
    );
    let frame: Value = serde_json::from_str(&text).expect("JSON");
    assert_eq!(frame["type"], "notification");
    assert_eq!(frame["id"], "verbatim");
    assert_eq!(frame["title"], "title verbatim");
    assert_eq!(frame["body"], "body verbatim");
    assert_eq!(frame["ts"], 1_763_700_000_000i64);
}

#[tokio::test]
async fn subscriptions_past_the_limit_are_refused() {
    let gateway = TestGateway::start_with(|c| c.max_topics = 2)
        .await
        .expect("gateway");
    let mut client = connect(&gateway, "collector").await;
    subscribe(&mut client, "a", 1).await;
    subscribe(&mut client, "b", 2).await;
    client
        .send_json(&json!({"type": "subscribe", "topic": "c"}))
        .await
        .expect("third subscribe");
    client
        .expect_error("too_many_subscriptions")
        .await
        .expect("the limit is enforced");
    client.roundtrip(3).await.expect("the session continues");
    let topic = |t: &str| Target::Topic(t.into());
    assert_eq!(gateway.hub().publish(&topic("c"), &notification("c1")), 0);
    assert_eq!(gateway.hub().publish(&topic("a"), &notification("a1")), 1);
    client
        .expect_type("notification", READ_TIMEOUT)
        .await
        .expect("a1");

    // A slot freed by unsubscribing can be used again.
    client
        .send_json(&json!({"type": "unsubscribe", "topic": "a"}))
        .await
        .expect("unsubscribe");
    subscribe(&mut client, "c", 4).await;
    assert_eq!(gateway.hub().publish(&topic("c"), &notification("c2")), 1);
    assert_eq!(gateway.hub().publish(&topic("a"), &notification("a2")), 0);
    let frame = client
        .expect_type("notification", READ_TIMEOUT)
        .await
        .expect("c2");
    assert_eq!(frame["id"], "c2");
}
