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
use geopush_proto::bus::Cursor;
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
    /// A user notification at or before the delivered cursor; not queued again.
    Duplicate,
    /// Held until the running replay ends.
    Held,
}

/// What an acked id named (see [`Outbound::ack`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AckMatch {
    First,
    Again,
    Untracked,
}

/// Most delivered-but-unacked user notifications a session remembers for acks; older
/// ones keep the stored cursor where it is (so they are replayed: at-least-once).
const MAX_UNACKED: usize = 512;

/// The session's position in its user's inbox. Created on the first user notification or
/// replay, so a session that never gets one pays a pointer.
#[derive(Default)]
struct Feed {
    /// The last inbox cursor queued to this session.
    delivered: Option<Cursor>,
    /// The generation of the replay running, if one is: live user notifications wait in
    /// `held` meanwhile, so the client sees its inbox in order.
    replaying: Option<u64>,
    generation: u64,
    held: Vec<(Cursor, Box<str>, Bytes)>,
    /// Delivered notifications in cursor order, and whether each was acked.
    unacked: VecDeque<(Cursor, Box<str>, bool)>,
    /// The first notification delivered while `unacked` was full.
    untracked_from: Option<Cursor>,
    /// What was delivered when the bus last started losing messages (see
    /// [`Outbound::mark_bus_gap`]); `Some(None)`: nothing had been.
    gap_from: Option<Option<Cursor>>,
}

impl Feed {
    /// Hold live notifications from now until a replay ends (and supersede any running
    /// replay): after a bus gap, the recovery replay delivers in cursor order.
    fn hold_live(&mut self) {
        self.generation += 1;
        self.replaying = Some(self.generation);
    }
}

/// Where a replay starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReplayFrom {
    /// After what the session already has (else after the device's ack cursor).
    Delivered,
    /// After this cursor (an explicit `resume`).
    Cursor(Cursor),
    /// After this cursor, even if more was delivered since (recovery after a bus gap; the
    /// client dedupes what comes twice). `None`: after the device's ack cursor.
    Rewind(Option<Cursor>),
}

#[derive(Default)]
struct Queue {
    frames: VecDeque<Outgoing>,
    nearby: Option<Bytes>,
    close: Option<CloseRequest>,
    /// The peer is gone: the writer stops without writing anything more.
    abandoned: bool,
    feed: Option<Box<Feed>>,
}

impl Queue {
    /// Queue a frame, or turn the session into a slow consumer when full.
    fn push(&mut self, frame: Outgoing, capacity: usize, metrics: &Metrics) -> Pushed {
        if self.close.is_some() {
            metrics.queue_drops.inc();
            return Pushed::Closing;
        }
        if self.frames.len() >= capacity {
            return self.overflow(1, metrics);
        }
        self.frames.push_back(frame);
        Pushed::Queued
    }

    /// The client is not keeping up: drop what waits (and `extra` frames not queued) and
    /// close with 4009.
    fn overflow(&mut self, extra: usize, metrics: &Metrics) -> Pushed {
        let held = self
            .feed
            .as_mut()
            .map_or(0, |f| std::mem::take(&mut f.held).len());
        let dropped = self.frames.len() + extra + held + usize::from(self.nearby.is_some());
        metrics.queue_drops.inc_by(dropped as u64);
        self.frames = VecDeque::new();
        self.nearby = None;
        self.close = Some(CloseRequest {
            code: CloseCode::SlowConsumer.as_u16(),
            reason: "slow consumer",
        });
        Pushed::Overflowed
    }

    /// Queue a user notification unless this cursor was already delivered.
    fn push_user(
        &mut self,
        cursor: Cursor,
        id: &str,
        json: Bytes,
        since: Option<Instant>,
        capacity: usize,
        metrics: &Metrics,
    ) -> Pushed {
        let feed = self.feed.get_or_insert_with(Default::default);
        if feed.delivered.is_some_and(|d| d >= cursor) {
            return Pushed::Duplicate;
        }
        feed.delivered = Some(cursor);
        if feed.unacked.len() < MAX_UNACKED {
            feed.unacked.push_back((cursor, id.into(), false));
        } else {
            // Untracked from here on: the stored cursor must never pass this one.
            feed.untracked_from.get_or_insert(cursor);
        }
        self.push(Outgoing::Text { json, since }, capacity, metrics)
    }
}

/// What a replay step found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReplayStep {
    Queued,
    /// Already delivered to this session; not queued again.
    Skipped,
    /// A newer replay (or the session's end) took over; stop this one.
    Superseded,
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
        let pushed = self.lock().push(frame, self.0.capacity, metrics);
        self.0.wake.notify_one();
        pushed
    }

    /// A live user notification: queued, held while a replay runs, or skipped when its
    /// cursor was already delivered.
    pub fn offer_user(
        &self,
        cursor: Cursor,
        id: &str,
        json: Bytes,
        since: Option<Instant>,
        metrics: &Metrics,
    ) -> Pushed {
        let mut queue = self.lock();
        let capacity = self.0.capacity;
        if let Some(feed) = queue.feed.as_mut()
            && feed.replaying.is_some()
        {
            if feed.held.len() >= capacity {
                // As many held as the queue holds: the client is not keeping up.
                let pushed = queue.overflow(1, metrics);
                drop(queue);
                self.0.wake.notify_one();
                return pushed;
            }
            feed.held.push((cursor, id.into(), json));
            return Pushed::Held;
        }
        let pushed = queue.push_user(cursor, id, json, since, capacity, metrics);
        drop(queue);
        self.0.wake.notify_one();
        pushed
    }

    /// Start a replay: live user notifications are held until [`Outbound::end_replay`].
    /// Returns the replay's generation and the cursor to replay after (`None`: from the
    /// device's stored ack cursor).
    pub fn begin_replay(&self, from: ReplayFrom) -> (u64, Option<Cursor>) {
        let mut queue = self.lock();
        let feed = queue.feed.get_or_insert_with(Default::default);
        feed.hold_live();
        match from {
            ReplayFrom::Delivered => {}
            ReplayFrom::Cursor(cursor) => feed.delivered = Some(cursor),
            ReplayFrom::Rewind(cursor) => feed.delivered = cursor,
        }
        (feed.generation, feed.delivered)
    }

    /// The bus may be losing messages from now on (it disconnected, or a probe failed):
    /// remember what this session had, so the recovery replays from there, and hold live
    /// notifications until that replay ends, so the client still sees cursor order. The
    /// earliest gap wins.
    pub fn mark_bus_gap(&self) {
        let mut queue = self.lock();
        let feed = queue.feed.get_or_insert_with(Default::default);
        if feed.gap_from.is_none() {
            feed.gap_from = Some(feed.delivered);
        }
        feed.hold_live();
    }

    /// Messages were lost at an unknown point: the recovery replays from the device's
    /// stored ack cursor.
    pub fn mark_bus_gap_unknown(&self) {
        let mut queue = self.lock();
        let feed = queue.feed.get_or_insert_with(Default::default);
        feed.gap_from = Some(None);
        feed.hold_live();
    }

    /// Where the recovery replay must start, if a gap was marked (and forget it).
    pub fn take_bus_gap(&self) -> ReplayFrom {
        match self.lock().feed.as_mut().and_then(|f| f.gap_from.take()) {
            Some(cursor) => ReplayFrom::Rewind(cursor),
            None => ReplayFrom::Delivered,
        }
    }

    /// Queue one replayed notification (skipped when already delivered).
    pub fn push_replayed(
        &self,
        generation: u64,
        cursor: Cursor,
        id: &str,
        json: Bytes,
        metrics: &Metrics,
    ) -> ReplayStep {
        let mut queue = self.lock();
        let current = queue.feed.as_ref().and_then(|f| f.replaying);
        if current != Some(generation) || queue.close.is_some() {
            return ReplayStep::Superseded;
        }
        let capacity = self.0.capacity;
        let pushed = queue.push_user(cursor, id, json, None, capacity, metrics);
        drop(queue);
        self.0.wake.notify_one();
        match pushed {
            Pushed::Overflowed | Pushed::Closing => ReplayStep::Superseded,
            Pushed::Duplicate => ReplayStep::Skipped,
            Pushed::Queued | Pushed::Held => ReplayStep::Queued,
        }
    }

    /// End a replay: queue what was held meanwhile (in cursor order, skipping duplicates —
    /// the replay usually delivered them already). Returns the ids it queued.
    pub fn end_replay(&self, generation: u64, metrics: &Metrics) -> Vec<Box<str>> {
        let mut queue = self.lock();
        let capacity = self.0.capacity;
        let Some(feed) = queue.feed.as_mut() else {
            return Vec::new();
        };
        if feed.replaying != Some(generation) {
            return Vec::new();
        }
        feed.replaying = None;
        let mut held = std::mem::take(&mut feed.held);
        held.sort_by_key(|(cursor, _, _)| *cursor);
        let mut queued = Vec::new();
        for (cursor, id, json) in held {
            if queue.push_user(cursor, &id, json, None, capacity, metrics) == Pushed::Queued {
                queued.push(id);
            }
        }
        drop(queue);
        self.0.wake.notify_one();
        queued
    }

    /// Mark notifications acked; the new stored cursor when the acked prefix grew. `matched`
    /// is filled with what each id named: a user notification acked now for the first time,
    /// one acked before, or nothing this session tracks (a live notification, or one whose
    /// ack already moved the stored cursor).
    pub fn ack(&self, ids: &[String], matched: &mut Vec<AckMatch>) -> Option<Cursor> {
        matched.clear();
        matched.resize(ids.len(), AckMatch::Untracked);
        let mut queue = self.lock();
        let feed = queue.feed.as_mut()?;
        for (_, id, acked) in feed.unacked.iter_mut() {
            if let Some(i) = ids.iter().position(|a| **a == **id) {
                matched[i] = if *acked {
                    AckMatch::Again
                } else {
                    AckMatch::First
                };
                *acked = true;
            }
        }
        let mut advanced = None;
        while let Some((cursor, _, true)) = feed.unacked.front() {
            if feed.untracked_from.is_some_and(|u| *cursor > u) {
                break;
            }
            advanced = Some(*cursor);
            feed.unacked.pop_front();
        }
        advanced
    }

    /// The last inbox cursor queued to this session.
    pub fn delivered_cursor(&self) -> Option<Cursor> {
        self.lock().feed.as_ref().and_then(|f| f.delivered)
    }

    /// Free places in the queue (a replay waits for room instead of overflowing it).
    pub fn room(&self) -> usize {
        self.0.capacity.saturating_sub(self.lock().frames.len())
    }

    pub fn capacity(&self) -> usize {
        self.0.capacity
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

    fn cursor(ms: u64) -> Cursor {
        Cursor { ms, seq: 0 }
    }

    #[test]
    fn replay_holds_live_notifications_and_delivers_in_order() {
        let metrics = Metrics::new();
        let out = Outbound::new(16);
        let json = || Bytes::from_static(b"{}");
        assert_eq!(
            out.offer_user(cursor(1), "a", json(), None, &metrics),
            Pushed::Queued
        );
        let (generation, after) = out.begin_replay(ReplayFrom::Delivered);
        assert_eq!(after, Some(cursor(1)));
        assert_eq!(
            out.offer_user(cursor(4), "d", json(), None, &metrics),
            Pushed::Held
        );
        assert_eq!(
            out.push_replayed(generation, cursor(1), "a", json(), &metrics),
            ReplayStep::Skipped,
            "already delivered"
        );
        assert_eq!(
            out.push_replayed(generation, cursor(2), "b", json(), &metrics),
            ReplayStep::Queued
        );
        assert_eq!(
            out.push_replayed(generation, cursor(3), "c", json(), &metrics),
            ReplayStep::Queued
        );
        out.end_replay(generation, &metrics);
        assert_eq!(out.delivered_cursor(), Some(cursor(4)));
        assert_eq!(
            out.len(),
            4,
            "a, then b, c replayed, then the held d; the replayed a was a duplicate"
        );
        assert_eq!(
            out.offer_user(cursor(4), "d", json(), None, &metrics),
            Pushed::Duplicate
        );
        // A newer replay supersedes an older one.
        let (old, _) = out.begin_replay(ReplayFrom::Delivered);
        let (_new, _) = out.begin_replay(ReplayFrom::Cursor(cursor(2)));
        assert_eq!(
            out.push_replayed(old, cursor(5), "e", json(), &metrics),
            ReplayStep::Superseded
        );
    }

    #[test]
    fn recovery_rewinds_to_the_gap_start() {
        let metrics = Metrics::new();
        let out = Outbound::new(16);
        let json = || Bytes::from_static(b"{}");
        out.offer_user(cursor(1), "a", json(), None, &metrics);
        out.mark_bus_gap();
        out.offer_user(cursor(5), "e", json(), None, &metrics);
        out.mark_bus_gap();
        let from = out.take_bus_gap();
        assert_eq!(
            from,
            ReplayFrom::Rewind(Some(cursor(1))),
            "the earliest gap"
        );
        let (_, after) = out.begin_replay(from);
        assert_eq!(
            after,
            Some(cursor(1)),
            "replays 2..4 that live delivery skipped"
        );
        assert_eq!(out.take_bus_gap(), ReplayFrom::Delivered);
    }

    #[test]
    fn ack_advances_only_over_an_acked_prefix() {
        let metrics = Metrics::new();
        let out = Outbound::new(16);
        for (ms, id) in [(1, "a"), (2, "b"), (3, "c")] {
            out.offer_user(cursor(ms), id, Bytes::from_static(b"{}"), None, &metrics);
        }
        let mut matched = Vec::new();
        assert_eq!(
            out.ack(&["b".into()], &mut matched),
            None,
            "a is not acked yet"
        );
        assert_eq!(matched, [AckMatch::First]);
        assert_eq!(
            out.ack(&["a".into(), "b".into()], &mut matched),
            Some(cursor(2))
        );
        assert_eq!(matched, [AckMatch::First, AckMatch::Again]);
        assert_eq!(out.ack(&["b".into()], &mut matched), None);
        assert_eq!(matched, [AckMatch::Untracked], "b left the window with a");
        assert_eq!(out.ack(&["zzz".into()], &mut matched), None);
        assert_eq!(matched, [AckMatch::Untracked]);
        assert_eq!(out.ack(&["c".into()], &mut matched), Some(cursor(3)));
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
