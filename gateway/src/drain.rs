//! Graceful drain: tell every client to reconnect elsewhere, spread over the drain window.
//!
//! Sessions are closed in a random order at evenly spaced moments across the window, each
//! after a `reconnect` frame whose `after_ms` adds jitter of its own, so a node's clients do
//! not all land on the other nodes in the same instant.

use crate::node::Node;
use crate::session::outbound::Outgoing;
use bytes::Bytes;
use geopush_proto::CloseCode;
use geopush_proto::frames::ServerFrame;
use rand::Rng;
use rand::seq::SliceRandom;
use std::sync::Arc;
use tokio::time::{Instant, sleep_until};
use tracing::info;

/// Send `reconnect` + close 1001 to every session, spread over the drain window. Returns
/// when the last one has been told (the writers then finish on their own).
pub(crate) async fn drain_sessions(node: &Arc<Node>) {
    let mut outbounds = node.hub.outbounds();
    outbounds.shuffle(&mut rand::thread_rng());
    let count = outbounds.len();
    info!(
        sessions = count,
        window_s = node.config.drain_seconds,
        "draining sessions"
    );
    let start = Instant::now();
    let window = node.config.drain_window();
    let jitter_ms = node.config.reconnect_jitter().as_millis().max(1) as u64;
    for (i, outbound) in outbounds.into_iter().enumerate() {
        let at = start + window.mul_f64(i as f64 / count as f64);
        tokio::select! {
            () = sleep_until(at) => {}
            () = node.hard_stop.cancelled() => return,
        }
        let after_ms = rand::thread_rng().gen_range(0..=jitter_ms);
        let json = Bytes::from(
            ServerFrame::Reconnect {
                after_ms,
                reason: "draining",
            }
            .to_json(),
        );
        outbound.push(Outgoing::Text { json, since: None }, &node.metrics);
        outbound.close(CloseCode::GoingAway, "draining");
    }
}
