//! Geofence-event webhooks against a real `redis-server` and a real HTTP receiver on
//! loopback: events are signed so that `verify` accepts them and rejects tampering; failed
//! attempts are retried and a URL that keeps failing is dead-lettered after exactly
//! `max_attempts`; two dispatchers share the stream without delivering an event twice; the
//! events of a dispatcher stopped mid-delivery are taken over by another; an entry that is
//! not an event is dead-lettered; a Redis restart is ridden out; and an event a real
//! gateway wrote reaches the webhook.
//!
//! Every test writes its events before the dispatcher starts: a fresh consumer group starts
//! at the beginning of the stream, so those events are delivered too.

use bytes::Bytes;
use geopush_gateway::bus::events::EVENTS_STREAM_LEN;
use geopush_gateway::bus::redis::RedisTarget;
use geopush_proto::bus::Keys;
use geopush_proto::place::{Place, PlaceFence};
use geopush_tests::gateway::{TestGateway, redis_config};
use geopush_tests::redis::{RedisServer, free_port};
use geopush_tests::tokens::{now_unix, now_unix_ms, user_token};
use geopush_tests::wait::{POLL_INTERVAL, eventually};
use geopush_tests::{READ_TIMEOUT, WAIT_TIMEOUT, WsClient};
use geopush_worker::webhooks::{
    DEFAULT_TOLERANCE_S, HEADER_EVENT_ID, HEADER_SIGNATURE, HEADER_TIMESTAMP, OUTCOME_DEAD,
    OUTCOME_ERROR, OUTCOME_OK, OUTCOME_RETRY, SignatureError, WEBHOOK_GROUP, WebhookConfig,
    WebhookError, WebhookMetrics, run_webhooks, verify,
};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use redis::streams::StreamPendingReply;
use serde_json::Value;
use std::collections::{HashMap, HashSet};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::task::{JoinHandle, JoinSet};
use tokio_util::sync::CancellationToken;

const SECRET: &[u8] = b"webhook-test-secret-0123456789";
/// The bound on a dispatcher returning after its stop (a hang detector, not a timing).
const STOP_WITHIN: Duration = Duration::from_secs(5);
const BERLIN: (f64, f64) = (52.52, 13.405);

// ---------------------------------------------------------------------------------------
// The receiver: a hyper server on 127.0.0.1:0 that records every request and answers as
// the test's plan says.

/// How the receiver answers one request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Answer {
    Status(u16),
    /// 200 after a pause.
    SlowOk(Duration),
    /// Never answer.
    Stall,
}

impl Answer {
    fn is_ok(self) -> bool {
        match self {
            Answer::Status(status) => (200..300).contains(&status),
            Answer::SlowOk(_) => true,
            Answer::Stall => false,
        }
    }
}

/// One request as the receiver saw it.
#[derive(Clone, Debug)]
struct Received {
    event_id: String,
    timestamp: String,
    signature: String,
    content_type: String,
    body: Bytes,
    answer: Answer,
}

/// The plan: (event id, how many requests for this id so far including this one, body).
type Plan = Arc<dyn Fn(&str, usize, &Value) -> Answer + Send + Sync>;

struct Receiver {
    addr: SocketAddr,
    log: Arc<Mutex<Vec<Received>>>,
    /// Requests whose answer has been written (or dropped by the client).
    finished: Arc<Mutex<usize>>,
    server: JoinHandle<()>,
}

impl Receiver {
    async fn start(
        plan: impl Fn(&str, usize, &Value) -> Answer + Send + Sync + 'static,
    ) -> Receiver {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind receiver");
        let addr = listener.local_addr().expect("receiver addr");
        let log = Arc::new(Mutex::new(Vec::new()));
        let finished = Arc::new(Mutex::new(0));
        let plan: Plan = Arc::new(plan);
        let server = tokio::spawn({
            let log = log.clone();
            let finished = finished.clone();
            async move {
                // Dropping the set (when the receiver is dropped) aborts the connections.
                let mut connections = JoinSet::new();
                while let Ok((stream, _)) = listener.accept().await {
                    let (log, finished, plan) = (log.clone(), finished.clone(), plan.clone());
                    let service = service_fn(move |request| {
                        answer(request, log.clone(), finished.clone(), plan.clone())
                    });
                    connections.spawn(async move {
                        let _ = hyper::server::conn::http1::Builder::new()
                            .serve_connection(TokioIo::new(stream), service)
                            .await;
                    });
                }
            }
        });
        Receiver {
            addr,
            log,
            finished,
            server,
        }
    }

    fn url(&self) -> String {
        format!("http://{}/hooks/geo", self.addr)
    }

    fn received(&self) -> Vec<Received> {
        self.log.lock().expect("log").clone()
    }

    fn for_event(&self, id: &str) -> Vec<Received> {
        self.received()
            .into_iter()
            .filter(|r| r.event_id == id)
            .collect()
    }

    /// Requests for `id` answered with success.
    fn delivered(&self, id: &str) -> usize {
        self.for_event(id)
            .iter()
            .filter(|r| r.answer.is_ok())
            .count()
    }

    /// No request is waiting for its answer (stalled ones excepted).
    fn idle(&self) -> bool {
        let stalled = self
            .received()
            .iter()
            .filter(|r| r.answer == Answer::Stall)
            .count();
        let finished = *self.finished.lock().expect("finished");
        finished + stalled == self.received().len()
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.server.abort();
    }
}

/// Counts a request as finished when dropped: after its answer, or when hyper gives up.
struct Finished(Arc<Mutex<usize>>);

impl Drop for Finished {
    fn drop(&mut self) {
        *self.0.lock().unwrap_or_else(|p| p.into_inner()) += 1;
    }
}

async fn answer(
    request: Request<Incoming>,
    log: Arc<Mutex<Vec<Received>>>,
    finished: Arc<Mutex<usize>>,
    plan: Plan,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let header = |name: &str| {
        request
            .headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_owned()
    };
    let event_id = header(HEADER_EVENT_ID);
    let timestamp = header(HEADER_TIMESTAMP);
    let signature = header(HEADER_SIGNATURE);
    let content_type = header("content-type");
    let body = match request.into_body().collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(_) => Bytes::new(),
    };
    let json: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let decided = {
        let mut log = log.lock().expect("log");
        let nth = log.iter().filter(|r| r.event_id == event_id).count() + 1;
        let decided = plan(&event_id, nth, &json);
        log.push(Received {
            event_id,
            timestamp,
            signature,
            content_type,
            body,
            answer: decided,
        });
        decided
    };
    let status = match decided {
        Answer::Status(status) => status,
        Answer::SlowOk(pause) => {
            let _finished = Finished(finished);
            tokio::time::sleep(pause).await;
            return Ok(respond(200));
        }
        Answer::Stall => std::future::pending().await,
    };
    let _finished = Finished(finished);
    Ok(respond(status))
}

fn respond(status: u16) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from_static(b"{}")));
    *response.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::IM_A_TEAPOT);
    response
}

// ---------------------------------------------------------------------------------------
// The dispatcher under test, and the stream.

struct Dispatcher {
    stop: CancellationToken,
    task: Option<JoinHandle<Result<(), WebhookError>>>,
    metrics: WebhookMetrics,
}

impl Dispatcher {
    fn start(redis: &RedisServer, config: WebhookConfig) -> Dispatcher {
        let stop = CancellationToken::new();
        let metrics = WebhookMetrics::default();
        let task = tokio::spawn(run_webhooks(
            RedisTarget::parse(&redis.url(), false),
            Keys::default(),
            config,
            metrics.clone(),
            stop.clone(),
        ));
        Dispatcher {
            stop,
            task: Some(task),
            metrics,
        }
    }

    /// Cancel and wait for `run_webhooks` to return `Ok`.
    async fn stop(mut self) {
        self.stop.cancel();
        let task = self.task.take().expect("running");
        match tokio::time::timeout(STOP_WITHIN, task).await {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(e))) => panic!("run_webhooks failed: {e}"),
            Ok(Err(e)) => panic!("run_webhooks panicked: {e}"),
            Err(_) => panic!("run_webhooks did not return within {STOP_WITHIN:?} of the stop"),
        }
    }

    fn count(&self, outcome: &'static str) -> u64 {
        self.metrics.count(outcome)
    }
}

impl Drop for Dispatcher {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// Short backoffs, three attempts, a long `claim_idle` (no takeovers unless a test wants
/// them).
fn config(urls: Vec<String>, consumer: &str) -> WebhookConfig {
    WebhookConfig {
        urls,
        secret: SECRET.to_vec(),
        max_attempts: 3,
        backoff_base: Duration::from_millis(5),
        backoff_max: Duration::from_millis(20),
        request_timeout: Duration::from_secs(3),
        consumer: consumer.to_owned(),
        batch: 16,
        concurrency: 8,
        claim_idle: Duration::from_secs(60),
    }
}

fn events_key() -> String {
    Keys::default().events()
}

fn dead_letter_key() -> String {
    Keys::default().events_dead_letter()
}

/// Append a geofence event exactly as the gateway's event writer does
/// (`gateway/src/bus/events.rs`); returns its stream id.
async fn add_event(redis: &RedisServer, user: &str, place: &str, kind: &str) -> String {
    redis
        .query::<String>(
            redis::cmd("XADD")
                .arg(events_key())
                .arg("MAXLEN")
                .arg("~")
                .arg(EVENTS_STREAM_LEN)
                .arg("*")
                .arg("user")
                .arg(user)
                .arg("device")
                .arg(format!("{user}-phone"))
                .arg("place")
                .arg(place)
                .arg("event")
                .arg(kind)
                .arg("ts")
                .arg(now_unix_ms())
                .arg("lat")
                .arg(BERLIN.0)
                .arg("lon")
                .arg(BERLIN.1),
        )
        .await
        .expect("XADD event")
}

/// The group's pending summary (`None` before the group exists).
async fn pending(redis: &RedisServer) -> Option<StreamPendingReply> {
    redis
        .query::<StreamPendingReply>(redis::cmd("XPENDING").arg(events_key()).arg(WEBHOOK_GROUP))
        .await
        .ok()
}

async fn pending_count(redis: &RedisServer) -> Option<usize> {
    pending(redis).await.map(|p| p.count())
}

/// Pending entries per consumer.
async fn pending_by_consumer(redis: &RedisServer) -> HashMap<String, usize> {
    match pending(redis).await {
        Some(StreamPendingReply::Data(data)) => data
            .consumers
            .into_iter()
            .map(|c| (c.name, c.pending))
            .collect(),
        _ => HashMap::new(),
    }
}

async fn dead_letters(redis: &RedisServer) -> Vec<(String, HashMap<String, String>)> {
    redis
        .query(
            redis::cmd("XRANGE")
                .arg(dead_letter_key())
                .arg("-")
                .arg("+"),
        )
        .await
        .expect("XRANGE dead letters")
}

/// Poll an async condition on Redis together with a sync one on the receiver.
async fn wait_for<F, Fut>(what: &str, mut condition: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + WAIT_TIMEOUT;
    loop {
        if condition().await {
            return;
        }
        if tokio::time::Instant::now() >= deadline {
            panic!("timed out after {WAIT_TIMEOUT:?} waiting for {what}");
        }
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}

fn now_s() -> i64 {
    i64::try_from(now_unix()).expect("now")
}

// ---------------------------------------------------------------------------------------
// The tests.

#[tokio::test]
async fn a_receiver_gets_a_signed_event_it_can_verify() {
    let redis = RedisServer::start().await.expect("redis");
    let receiver = Receiver::start(|_, _, _| Answer::Status(200)).await;
    let id = add_event(&redis, "u1", "cafe-17", "enter").await;
    let dispatcher = Dispatcher::start(&redis, config(vec![receiver.url()], "w1"));

    wait_for("the event delivered and acked", || async {
        receiver.delivered(&id) == 1 && pending_count(&redis).await == Some(0)
    })
    .await;
    let got = receiver.for_event(&id);
    assert_eq!(got.len(), 1, "{got:?}");
    let request = &got[0];
    assert_eq!(request.content_type, "application/json");
    let body: Value = serde_json::from_slice(&request.body).expect("JSON body");
    assert_eq!(body["id"], id.as_str());
    assert_eq!(body["type"], "geofence.enter");
    assert_eq!(body["user"], "u1");
    assert_eq!(body["device"], "u1-phone");
    assert_eq!(body["place"], "cafe-17");
    assert!(body["ts"].as_i64().is_some_and(|ts| ts > 0), "{body}");
    assert_eq!(body["lat"], BERLIN.0);
    assert_eq!(body["lon"], BERLIN.1);

    // The receiver's check accepts it ...
    let (ts, sig, raw) = (&request.timestamp, &request.signature, &request.body[..]);
    assert!(sig.starts_with("v1="), "{sig}");
    assert_eq!(
        verify(SECRET, ts, sig, raw, now_s(), DEFAULT_TOLERANCE_S),
        Ok(())
    );
    // ... and rejects a changed body, another secret, and a replay after the window.
    let tampered = String::from_utf8_lossy(raw).replace("enter", "exit");
    assert_eq!(
        verify(
            SECRET,
            ts,
            sig,
            tampered.as_bytes(),
            now_s(),
            DEFAULT_TOLERANCE_S
        ),
        Err(SignatureError::Mismatch)
    );
    assert_eq!(
        verify(
            b"some-other-secret-0123456789",
            ts,
            sig,
            raw,
            now_s(),
            DEFAULT_TOLERANCE_S
        ),
        Err(SignatureError::Mismatch)
    );
    let sent_at: i64 = ts.parse().expect("timestamp header is an integer");
    assert!(matches!(
        verify(
            SECRET,
            ts,
            sig,
            raw,
            sent_at + DEFAULT_TOLERANCE_S + 1,
            DEFAULT_TOLERANCE_S
        ),
        Err(SignatureError::Stale { .. })
    ));
    assert_eq!(dispatcher.count(OUTCOME_OK), 1);
    dispatcher.stop().await;
    assert!(dead_letters(&redis).await.is_empty());
}

#[tokio::test]
async fn failed_attempts_are_retried_until_the_receiver_takes_the_event() {
    let redis = RedisServer::start().await.expect("redis");
    // 500 twice, then 200.
    let receiver = Receiver::start(|_, nth, _| {
        if nth <= 2 {
            Answer::Status(500)
        } else {
            Answer::Status(200)
        }
    })
    .await;
    let id = add_event(&redis, "u2", "park", "exit").await;
    let mut settings = config(vec![receiver.url()], "w1");
    settings.max_attempts = 5;
    let dispatcher = Dispatcher::start(&redis, settings);

    wait_for("the third attempt taken and the entry acked", || async {
        receiver.delivered(&id) == 1 && pending_count(&redis).await == Some(0)
    })
    .await;
    let metrics = dispatcher.metrics.clone();
    dispatcher.stop().await;
    let got = receiver.for_event(&id);
    let answers: Vec<Answer> = got.iter().map(|r| r.answer).collect();
    assert_eq!(
        answers,
        [
            Answer::Status(500),
            Answer::Status(500),
            Answer::Status(200)
        ]
    );
    assert_eq!(receiver.received().len(), 3);
    // Every attempt is the same event, signed afresh.
    for request in &got {
        assert_eq!(request.body, got[0].body);
        assert_eq!(
            verify(
                SECRET,
                &request.timestamp,
                &request.signature,
                &request.body,
                now_s(),
                DEFAULT_TOLERANCE_S
            ),
            Ok(())
        );
    }
    assert!(dead_letters(&redis).await.is_empty());
    assert_eq!(metrics.count(OUTCOME_RETRY), 2);
    assert_eq!(metrics.count(OUTCOME_OK), 1);
    assert_eq!(metrics.count(OUTCOME_DEAD), 0);
}

#[tokio::test]
async fn a_url_that_keeps_failing_is_dead_lettered_after_max_attempts() {
    let redis = RedisServer::start().await.expect("redis");
    let healthy = Receiver::start(|_, _, _| Answer::Status(200)).await;
    let failing = Receiver::start(|_, _, _| Answer::Status(500)).await;
    // Nothing listens there: every attempt is refused.
    let closed = format!("http://127.0.0.1:{}/hooks/geo", free_port().expect("port"));
    let id = add_event(&redis, "u3", "station", "enter").await;
    let urls = vec![healthy.url(), failing.url(), closed.clone()];
    let dispatcher = Dispatcher::start(&redis, config(urls, "w1"));

    wait_for("two dead letters and the entry acked", || async {
        dead_letters(&redis).await.len() == 2 && pending_count(&redis).await == Some(0)
    })
    .await;
    let metrics = dispatcher.metrics.clone();
    dispatcher.stop().await;
    // Exactly max_attempts (3) requests to the failing URL; one to the healthy one.
    assert_eq!(failing.for_event(&id).len(), 3, "{:?}", failing.received());
    assert_eq!(healthy.for_event(&id).len(), 1);
    assert_eq!(healthy.delivered(&id), 1);

    let letters: HashMap<String, HashMap<String, String>> = dead_letters(&redis)
        .await
        .into_iter()
        .map(|(_, fields)| (fields.get("url").cloned().unwrap_or_default(), fields))
        .collect();
    let field = |url: &str, name: &str| {
        letters
            .get(url)
            .and_then(|f| f.get(name))
            .cloned()
            .unwrap_or_else(|| panic!("no {name} in the dead letter of {url}: {letters:?}"))
    };
    for url in [failing.url(), closed.clone()] {
        assert_eq!(field(&url, "id"), id);
        assert_eq!(field(&url, "attempts"), "3");
        assert_eq!(field(&url, "user"), "u3");
        assert_eq!(field(&url, "place"), "station");
        assert_eq!(field(&url, "event"), "enter");
    }
    assert!(
        field(&failing.url(), "error").contains("500"),
        "{letters:?}"
    );
    assert!(!field(&closed, "error").is_empty());
    assert!(!letters.contains_key(&healthy.url()));
    assert_eq!(metrics.count(OUTCOME_OK), 1);
    assert_eq!(metrics.count(OUTCOME_RETRY), 4);
    assert_eq!(metrics.count(OUTCOME_DEAD), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_dispatchers_share_the_stream_without_delivering_twice() {
    let redis = RedisServer::start().await.expect("redis");
    // Every tenth event takes longer than `claim_idle` to answer: the dispatcher working on
    // it must keep it from looking idle to the other one.
    let receiver = Receiver::start(|_, _, body| {
        let user = body["user"].as_str().unwrap_or("");
        if user.ends_with('0') {
            Answer::SlowOk(Duration::from_millis(1_500))
        } else {
            Answer::Status(200)
        }
    })
    .await;
    let mut ids = Vec::new();
    for i in 0..50 {
        ids.push(add_event(&redis, &format!("u{i}"), "plaza", "enter").await);
    }
    let settings = |consumer: &str| {
        let mut settings = config(vec![receiver.url()], consumer);
        settings.batch = 4;
        settings.concurrency = 4;
        settings.claim_idle = Duration::from_secs(1);
        settings
    };
    let a = Dispatcher::start(&redis, settings("a"));
    let b = Dispatcher::start(&redis, settings("b"));

    wait_for("all 50 events delivered and acked", || async {
        ids.iter().all(|id| receiver.delivered(id) >= 1)
            && receiver.idle()
            && pending_count(&redis).await == Some(0)
    })
    .await;
    let (metrics_a, metrics_b) = (a.metrics.clone(), b.metrics.clone());
    a.stop().await;
    b.stop().await;
    let received = receiver.received();
    let mut per_event: HashMap<&str, usize> = HashMap::new();
    for request in &received {
        *per_event.entry(request.event_id.as_str()).or_default() += 1;
    }
    let twice: Vec<_> = per_event.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.is_empty(), "delivered more than once: {twice:?}");
    assert_eq!(received.len(), 50);
    let expected: HashSet<&str> = ids.iter().map(String::as_str).collect();
    assert_eq!(per_event.keys().copied().collect::<HashSet<_>>(), expected);
    assert_eq!(
        metrics_a.count(OUTCOME_OK) + metrics_b.count(OUTCOME_OK),
        50
    );
}

#[tokio::test]
async fn a_stopped_dispatchers_events_are_taken_over_by_another() {
    let redis = RedisServer::start().await.expect("redis");
    let stalling = Arc::new(AtomicBool::new(true));
    let receiver = Receiver::start({
        let stalling = stalling.clone();
        move |_, _, _| {
            if stalling.load(Ordering::SeqCst) {
                Answer::Stall
            } else {
                Answer::Status(200)
            }
        }
    })
    .await;
    let mut ids = Vec::new();
    for i in 0..3 {
        ids.push(add_event(&redis, &format!("s{i}"), "museum", "dwell").await);
    }
    let mut first = config(vec![receiver.url()], "first");
    first.request_timeout = Duration::from_secs(60);
    let first = Dispatcher::start(&redis, first);
    wait_for("the first dispatcher stuck on every event", || async {
        ids.iter().all(|id| !receiver.for_event(id).is_empty())
            && pending_by_consumer(&redis).await.get("first") == Some(&3)
    })
    .await;
    first.stop().await;
    // Stopped mid-request: nothing was acknowledged or dead-lettered.
    assert_eq!(pending_by_consumer(&redis).await.get("first"), Some(&3));
    assert!(dead_letters(&redis).await.is_empty());

    stalling.store(false, Ordering::SeqCst);
    let mut second = config(vec![receiver.url()], "second");
    second.claim_idle = Duration::from_millis(300);
    let second = Dispatcher::start(&redis, second);
    wait_for(
        "the second dispatcher delivering the first one's events",
        || async {
            ids.iter().all(|id| receiver.delivered(id) == 1)
                && pending_count(&redis).await == Some(0)
        },
    )
    .await;
    assert_eq!(second.count(OUTCOME_OK), 3);
    second.stop().await;
    for id in &ids {
        assert_eq!(receiver.delivered(id), 1, "{id}");
    }
}

#[tokio::test]
async fn a_stop_cuts_a_retry_sleep_short_and_the_event_stays_pending() {
    let redis = RedisServer::start().await.expect("redis");
    let failing = Arc::new(AtomicBool::new(true));
    let receiver = Receiver::start({
        let failing = failing.clone();
        move |_, _, _| {
            if failing.load(Ordering::SeqCst) {
                Answer::Status(503)
            } else {
                Answer::Status(200)
            }
        }
    })
    .await;
    let id = add_event(&redis, "r1", "harbour", "enter").await;
    // After the first failure the dispatcher sleeps up to an hour.
    let mut sleepy = config(vec![receiver.url()], "sleepy");
    sleepy.backoff_base = Duration::from_secs(3_600);
    sleepy.backoff_max = Duration::from_secs(3_600);
    let sleepy = Dispatcher::start(&redis, sleepy);
    let metrics = sleepy.metrics.clone();
    eventually("a failed attempt", WAIT_TIMEOUT, || {
        metrics.count(OUTCOME_RETRY) >= 1
    })
    .await
    .expect("first attempt");
    sleepy.stop().await;
    assert_eq!(pending_count(&redis).await, Some(1));
    assert!(dead_letters(&redis).await.is_empty());

    failing.store(false, Ordering::SeqCst);
    let mut next = config(vec![receiver.url()], "next");
    next.claim_idle = Duration::from_millis(300);
    let next = Dispatcher::start(&redis, next);
    wait_for("the event delivered by the next dispatcher", || async {
        receiver.delivered(&id) == 1 && pending_count(&redis).await == Some(0)
    })
    .await;
    next.stop().await;
}

#[tokio::test]
async fn an_entry_that_is_not_an_event_is_dead_lettered_without_a_request() {
    let redis = RedisServer::start().await.expect("redis");
    let receiver = Receiver::start(|_, _, _| Answer::Status(200)).await;
    let bad: String = redis
        .query(
            redis::cmd("XADD")
                .arg(events_key())
                .arg("*")
                .arg("user")
                .arg("u9")
                .arg("event")
                .arg("teleport"),
        )
        .await
        .expect("XADD");
    let good = add_event(&redis, "u9", "bridge", "exit").await;
    let dispatcher = Dispatcher::start(&redis, config(vec![receiver.url()], "w1"));
    wait_for(
        "the good event delivered, the bad one dead-lettered",
        || async {
            receiver.delivered(&good) == 1
                && dead_letters(&redis).await.len() == 1
                && pending_count(&redis).await == Some(0)
        },
    )
    .await;
    let metrics = dispatcher.metrics.clone();
    dispatcher.stop().await;
    assert_eq!(receiver.received().len(), 1);
    let (_, letter) = dead_letters(&redis).await.remove(0);
    assert_eq!(letter.get("id"), Some(&bad));
    assert_eq!(letter.get("attempts").map(String::as_str), Some("0"));
    assert_eq!(letter.get("url"), None);
    assert!(
        letter.get("error").is_some_and(|e| e.contains("malformed")),
        "{letter:?}"
    );
    assert_eq!(letter.get("event").map(String::as_str), Some("teleport"));
    assert_eq!(metrics.count(OUTCOME_ERROR), 1);
    assert_eq!(metrics.count(OUTCOME_OK), 1);
}

#[tokio::test]
async fn the_dispatcher_rides_out_a_redis_restart() {
    let mut redis = RedisServer::start().await.expect("redis");
    let receiver = Receiver::start(|_, _, _| Answer::Status(200)).await;
    let before = add_event(&redis, "b1", "zoo", "enter").await;
    let dispatcher = Dispatcher::start(&redis, config(vec![receiver.url()], "w1"));
    wait_for("the first event delivered", || async {
        receiver.delivered(&before) == 1 && pending_count(&redis).await == Some(0)
    })
    .await;

    // A restart without persistence: the stream and the group are gone.
    redis.restart().await.expect("restart");
    let after = add_event(&redis, "b2", "zoo", "exit").await;
    wait_for("the event written after the restart delivered", || async {
        receiver.delivered(&after) == 1 && pending_count(&redis).await == Some(0)
    })
    .await;
    dispatcher.stop().await;
    assert_eq!(receiver.received().len(), 2);
}

fn fenced_place(id: &str, at: (f64, f64), radius_m: f64) -> Place {
    Place {
        id: id.into(),
        name: id.to_uppercase(),
        lat: at.0,
        lon: at.1,
        tags: Default::default(),
        fence: Some(PlaceFence::Circle { radius_m }),
        dwell_s: None,
    }
}

#[tokio::test]
async fn a_geofence_event_from_a_gateway_reaches_the_webhook() {
    let redis = RedisServer::start().await.expect("redis");
    let receiver = Receiver::start(|_, _, _| Answer::Status(200)).await;
    let dispatcher = Dispatcher::start(&redis, config(vec![receiver.url()], "w1"));
    let node = TestGateway::start_redis(redis_config(&redis.url(), false, "hooks-gw"))
        .await
        .expect("gateway");
    node.wait_ready().await.expect("ready");
    let store = node
        .gateway()
        .places_store()
        .expect("a Redis node has a store");
    store
        .upsert(&[fenced_place("park", BERLIN, 200.0)])
        .await
        .expect("upsert");
    eventually("the park on the node", WAIT_TIMEOUT, || {
        node.gateway().places().snapshot().get("park").is_some()
    })
    .await
    .expect("park");

    let token = user_token("walker").expect("token");
    let (mut client, _) = WsClient::connect_welcomed(node.addr(), &token)
        .await
        .expect("connect");
    client.send_fix(BERLIN.0, BERLIN.1).await.expect("fix");
    let enter = client
        .expect_type("geofence", READ_TIMEOUT)
        .await
        .expect("enter");
    assert_eq!(enter["event"], "enter");

    wait_for("the enter event at the webhook", || async {
        receiver.received().iter().any(|r| r.answer.is_ok())
            && pending_count(&redis).await == Some(0)
    })
    .await;
    dispatcher.stop().await;
    let got = receiver.received();
    assert_eq!(got.len(), 1, "{got:?}");
    let body: Value = serde_json::from_slice(&got[0].body).expect("JSON");
    assert_eq!(body["type"], "geofence.enter");
    assert_eq!(body["user"], "walker");
    assert_eq!(body["place"], "park");
    assert_eq!(body["id"], got[0].event_id.as_str());
    assert!(
        body["device"].as_str().is_some_and(|d| !d.is_empty()),
        "{body}"
    );
    assert!((body["lat"].as_f64().unwrap_or(0.0) - BERLIN.0).abs() < 1e-9);
    assert_eq!(
        verify(
            SECRET,
            &got[0].timestamp,
            &got[0].signature,
            &got[0].body,
            now_s(),
            DEFAULT_TOLERANCE_S
        ),
        Ok(())
    );
}
