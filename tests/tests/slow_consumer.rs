//! Slow consumers (DESIGN §7, §8): a client that stops reading overflows its bounded queue
//! and is closed with 4009, while a fast client on the same node receives every
//! notification, in order. When the slow client reads again it finds an unbroken prefix of
//! the notifications, then the 4009 close frame; the close and the dropped frames are
//! counted.

use geopush_gateway::{Notification, Target};
use geopush_tests::tokens::user_token;
use geopush_tests::wait::eventually;
use geopush_tests::{READ_TIMEOUT, RawWsClient, TestGateway, WAIT_TIMEOUT, WsClient};

/// Notifications at least; more are sent (up to `MAX_SENT`) until the slow queue overflows.
const MIN_SENT: usize = 1_000;
const MAX_SENT: usize = 4_000;
/// Published between two checks that the fast client has caught up (half the queue).
const BATCH: usize = 8;

fn big_notification(seq: usize, body: &str) -> Notification {
    Notification {
        id: format!("n-{seq}"),
        cursor: None,
        title: format!("#{seq}"),
        body: body.to_owned(),
        data: None,
        ts: seq as i64,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_reader_is_closed_with_4009_and_fast_reader_gets_everything() {
    let gateway = TestGateway::start_with(|c| {
        c.queue_len = 16;
        // The slow client's writer waits this long on a full socket: long enough for the
        // test to start reading again and see the close frame.
        c.write_timeout_seconds = 30.0;
    })
    .await
    .expect("gateway");
    let mut slow = RawWsClient::connect(gateway.addr(), &user_token("slow").expect("t"))
        .await
        .expect("slow connects");
    slow.expect_type("welcome", READ_TIMEOUT)
        .await
        .expect("slow welcome");
    let (mut fast, _) = WsClient::connect_welcomed(gateway.addr(), &user_token("fast").expect("t"))
        .await
        .expect("fast connects");

    let body = "x".repeat(16 * 1024);
    let mut sent = 0;
    let mut overflowed_at = None;
    while sent < MIN_SENT || (overflowed_at.is_none() && sent < MAX_SENT) {
        for _ in 0..BATCH {
            let queued = gateway
                .hub()
                .publish(&Target::All, &big_notification(sent, &body));
            match (queued, overflowed_at) {
                (2, None) => {}
                (1, None) => overflowed_at = Some(sent),
                (1, Some(_)) => {}
                (other, _) => panic!("notification {sent} queued for {other} sessions"),
            }
            sent += 1;
        }
        // The fast client keeps up: it has every notification so far, in order.
        for expected in sent - BATCH..sent {
            let frame = fast
                .recv_json(READ_TIMEOUT)
                .await
                .unwrap_or_else(|e| panic!("fast client, notification {expected}: {e:#}"));
            assert_eq!(frame["type"], "notification");
            assert_eq!(
                frame["id"],
                format!("n-{expected}"),
                "fast client out of order"
            );
            assert_eq!(frame["body"].as_str().map(str::len), Some(body.len()));
        }
    }
    let overflowed_at =
        overflowed_at.unwrap_or_else(|| panic!("the slow queue never overflowed in {sent}"));
    assert!(
        gateway.metric("geopush_queue_drops_total", &[]) > 0.0,
        "dropped frames are counted"
    );
    fast.roundtrip(1)
        .await
        .expect("the fast client is still connected");

    // The slow client reads again: an unbroken prefix, then the 4009 close.
    let seen = slow
        .read_until_close(WAIT_TIMEOUT)
        .await
        .expect("the slow client reads to the close");
    assert_eq!(seen.close, Some(Some(4009)), "close code");
    let frames = seen.json().expect("JSON");
    eprintln!(
        "slow queue overflowed at notification {overflowed_at} of {sent}; \
         the slow client then read {} notifications and the close",
        frames.len()
    );
    assert!(
        frames.len() <= overflowed_at,
        "{} frames reached the slow client but its queue overflowed at {overflowed_at}",
        frames.len()
    );
    for (seq, frame) in frames.iter().enumerate() {
        assert_eq!(
            frame["id"],
            format!("n-{seq}"),
            "slow client's frames in order, no gap"
        );
    }
    eventually("the 4009 close counted", WAIT_TIMEOUT, || {
        gateway.metric("geopush_closes_total", &[("code", "4009")]) == 1.0
    })
    .await
    .expect("4009 counted once");
    assert_eq!(
        gateway.hub().session_count(),
        1,
        "only the fast client is left"
    );
    // Later deliveries reach the fast client only.
    assert_eq!(
        gateway
            .hub()
            .publish(&Target::All, &big_notification(sent, "after")),
        1
    );
    let frame = fast.recv_json(READ_TIMEOUT).await.expect("after");
    assert_eq!(frame["id"], format!("n-{sent}"));
}
