//! A session's bounded outbound queue and the writer task that drains it to the socket.
//!
//! Producers (the hub, the session's own reader, the drain) never wait: `push` either queues
//! or, when the queue is full, marks the session a slow consumer (close 4009) and drops what
//! it held. `nearby` frames have a slot of their own holding only the latest, so they are
//! coalesced rather than counted against the queue.

use crate::metrics::Metrics;
use crate::session::socket::SocketWriter;
use bytes::Bytes;
use fastwebsockets::{Frame, OpCode, Payload, WebSocketWrite};
use geopush_proto::CloseCode;
use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use tokio::sync::Notify;
use tokio::time::{Instant, timeout};

/// One frame waiting to be written.
#[derive(Debug)]
pub enum Outgoing {
    /// A JSON text frame, possibly shared with other sessions (a broadcast is serialized
    /// once); `since` is when it was handed to delivery, for the latency histogram.
    Text {
        json: Bytes,
        since: Option<Instant>,
    },
    Ping,
    Pong(Bytes),
}

/// What the writer should close with, and why.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CloseRequest {
    pub code: u16,
    pub reason: &'static str,
}

/// What became of a push.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pushed {
    Queued,
    /// The queue was full: the session is now closing with 4009.
    Overflowed,
    /// The session is already closing; the frame was dropped.
    Closing,
}

#[derive(Default)]
struct Queue {
    frames: VecDeque<Outgoing>,
    nearby: Option<Bytes>,
    close: Option<CloseRequest>,
    /// The peer is gone: the writer stops without writing anything more.
    abandoned: bool,
}

struct Shared {
    queue: Mutex<Queue>,
    wake: Notify,
    capacity: usize,
}

/// The producer handle of a session's queue. Cheap to clone.
#[derive(Clone)]
pub struct Outbound(Arc<Shared>);

impl Outbound {
    pub fn new(capacity: usize) -> Outbound {
        Outbound(Arc::new(Shared {
            queue: Mutex::new(Queue::default()),
            wake: Notify::new(),
            capacity,
        }))
    }

    fn lock(&self) -> MutexGuard<'_, Queue> {
        // A panic while holding this lock cannot leave the queue inconsistent (every
        // critical section is a single push/take), so a poisoned lock is still usable.
        self.0
            .queue
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Queue a frame. Never waits.
    pub fn push(&self, frame: Outgoing, metrics: &Metrics) -> Pushed {
        let mut queue = self.lock();
        if queue.close.is_some() {
            metrics.queue_drops.inc();
            return Pushed::Closing;
        }
        if queue.frames.len() >= self.0.capacity {
            let dropped = queue.frames.len() + 1 + usize::from(queue.nearby.is_some());
            metrics.queue_drops.inc_by(dropped as u64);
            queue.frames = VecDeque::new();
            queue.nearby = None;
            queue.close = Some(CloseRequest {
                code: CloseCode::SlowConsumer.as_u16(),
                reason: "slow consumer",
            });
            drop(queue);
            self.0.wake.notify_one();
            return Pushed::Overflowed;
        }
        queue.frames.push_back(frame);
        drop(queue);
        self.0.wake.notify_one();
        Pushed::Queued
    }

    /// Replace the pending `nearby` frame (latest wins).
    pub fn push_nearby(&self, json: Bytes, metrics: &Metrics) {
        let mut queue = self.lock();
        if queue.close.is_some() {
            metrics.queue_drops.inc();
            return;
        }
        if queue.nearby.replace(json).is_some() {
            metrics.queue_drops.inc();
        }
        drop(queue);
        self.0.wake.notify_one();
    }

    /// Ask the writer to send what is queued, then a close frame. The first close wins.
    pub fn close(&self, code: CloseCode, reason: &'static str) {
        self.close_raw(code.as_u16(), reason);
    }

    /// Like [`Outbound::close`] with any code (for echoing a client's close).
    pub fn close_raw(&self, code: u16, reason: &'static str) {
        let mut queue = self.lock();
        if queue.close.is_none() {
            queue.close = Some(CloseRequest { code, reason });
        }
        drop(queue);
        self.0.wake.notify_one();
    }

    /// Stop the writer without a close frame (the peer vanished or timed out).
    pub fn abandon(&self) {
        self.lock().abandoned = true;
        self.0.wake.notify_one();
    }

    /// The close requested so far, if any.
    pub fn close_requested(&self) -> Option<CloseRequest> {
        self.lock().close
    }

    /// Frames waiting (for tests and metrics).
    pub fn len(&self) -> usize {
        self.lock().frames.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Wait for work and take all of it.
    ///
    /// # Cancel safety
    /// Cancel safe: work is taken only when the future completes.
    async fn take(&self) -> Option<(VecDeque<Outgoing>, Option<Bytes>, Option<CloseRequest>)> {
        loop {
            let notified = self.0.wake.notified();
            {
                let mut queue = self.lock();
                if queue.abandoned {
                    return None;
                }
                if !queue.frames.is_empty() || queue.nearby.is_some() || queue.close.is_some() {
                    return Some((
                        std::mem::take(&mut queue.frames),
                        queue.nearby.take(),
                        queue.close,
                    ));
                }
            }
            notified.await;
        }
    }
}

/// How the writer ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WriterEnd {
    /// A close frame with this code was written.
    Closed(u16),
    /// The socket failed, a write stalled past the timeout, or the session abandoned the
    /// peer; no close frame got out.
    Broken,
}

/// Drain the queue to the socket until a close is written or the socket fails. Every write
/// is bounded by `write_timeout`, so a peer that stops reading cannot hold the task forever.
pub async fn run_writer(
    mut ws: WebSocketWrite<SocketWriter>,
    outbound: Outbound,
    metrics: Arc<Metrics>,
    write_timeout: Duration,
) -> WriterEnd {
    loop {
        let Some((frames, nearby, close)) = outbound.take().await else {
            return WriterEnd::Broken;
        };
        for frame in frames {
            let (ws_frame, since) = match &frame {
                Outgoing::Text { json, since } => (Frame::text(Payload::Borrowed(json)), *since),
                Outgoing::Ping => (
                    Frame::new(true, OpCode::Ping, None, Payload::Borrowed(&[])),
                    None,
                ),
                Outgoing::Pong(payload) => (Frame::pong(Payload::Borrowed(payload)), None),
            };
            if !matches!(
                timeout(write_timeout, ws.write_frame(ws_frame)).await,
                Ok(Ok(()))
            ) {
                return WriterEnd::Broken;
            }
            metrics.frames_out.inc();
            if let Some(since) = since {
                metrics
                    .delivery_seconds
                    .observe(since.elapsed().as_secs_f64());
            }
            // A slow consumer's close must not wait behind frames it will never read.
            if outbound
                .close_requested()
                .is_some_and(|c| c.code == CloseCode::SlowConsumer.as_u16())
            {
                break;
            }
        }
        if let Some(json) = nearby {
            if !matches!(
                timeout(
                    write_timeout,
                    ws.write_frame(Frame::text(Payload::Borrowed(&json)))
                )
                .await,
                Ok(Ok(()))
            ) {
                return WriterEnd::Broken;
            }
            metrics.frames_out.inc();
        }
        if let Some(CloseRequest { code, reason }) = close {
            let frame = Frame::close(code, reason.as_bytes());
            return match timeout(write_timeout, ws.write_frame(frame)).await {
                Ok(Ok(())) => {
                    metrics.frames_out.inc();
                    WriterEnd::Closed(code)
                }
                _ => WriterEnd::Broken,
            };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(s: &'static str) -> Outgoing {
        Outgoing::Text {
            json: Bytes::from_static(s.as_bytes()),
            since: None,
        }
    }

    #[test]
    fn overflow_closes_with_4009_and_frees_the_queue() {
        let metrics = Metrics::new();
        let out = Outbound::new(2);
        assert_eq!(out.push(text("a"), &metrics), Pushed::Queued);
        assert_eq!(out.push(text("b"), &metrics), Pushed::Queued);
        assert_eq!(out.push(text("c"), &metrics), Pushed::Overflowed);
        assert_eq!(out.len(), 0);
        assert_eq!(out.close_requested().map(|c| c.code), Some(4009));
        assert_eq!(out.push(text("d"), &metrics), Pushed::Closing);
        assert_eq!(metrics.queue_drops.get(), 4);
    }

    #[test]
    fn nearby_is_coalesced_and_does_not_count_against_the_queue() {
        let metrics = Metrics::new();
        let out = Outbound::new(1);
        for _ in 0..10 {
            out.push_nearby(Bytes::from_static(b"{}"), &metrics);
        }
        assert_eq!(out.push(text("a"), &metrics), Pushed::Queued);
        assert_eq!(metrics.queue_drops.get(), 9);
        assert!(out.close_requested().is_none());
    }

    #[tokio::test]
    async fn take_returns_everything_at_once() {
        let metrics = Metrics::new();
        let out = Outbound::new(8);
        out.push(text("a"), &metrics);
        out.push_nearby(Bytes::from_static(b"n"), &metrics);
        out.close(CloseCode::GoingAway, "draining");
        let (frames, nearby, close) = out.take().await.expect("work");
        assert_eq!(frames.len(), 1);
        assert!(nearby.is_some());
        assert_eq!(close.map(|c| c.code), Some(1001));
    }
}
