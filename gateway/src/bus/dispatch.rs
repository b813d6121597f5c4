//! The node's side of the Redis bus: the dispatcher that routes pushed messages to the hub,
//! and the health loop that notices outages and silent subscription loss and recovers.
//!
//! Recovery means: wait until Redis answers, make sure every held channel is subscribed,
//! then replay every connected session's inbox from the cursor it last got. Whatever was
//! published while the node was deaf is in the inboxes, so a Redis blip loses nothing
//! durable (geo, topic and broadcast messages are best effort, DESIGN §7).

use crate::bus::redis::RedisBus;
use crate::node::Node;
use crate::session;
use crate::status::Counts;
use bytes::Bytes;
use geopush_proto::bus::{Cursor, decode_envelope};
use redis::{PushInfo, PushKind, Value};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;
use tokio::sync::{Notify, mpsc};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

/// What the dispatcher tells the health loop.
#[derive(Default)]
pub struct BusSignals {
    /// The subscription connection dropped.
    pub disconnected: Notify,
    /// A probe came back.
    pub probe_seen: Notify,
}

fn bytes_of(value: &Value) -> Option<&[u8]> {
    match value {
        Value::BulkString(bytes) => Some(bytes),
        Value::SimpleString(text) => Some(text.as_bytes()),
        _ => None,
    }
}

/// Route pushes until the channel closes or `stop`.
pub async fn run_dispatcher(
    node: Arc<Node>,
    mut pushes: mpsc::Receiver<PushInfo>,
    signals: Arc<BusSignals>,
    stop: CancellationToken,
) {
    loop {
        let push = tokio::select! {
            push = pushes.recv() => match push {
                Some(push) => push,
                None => return,
            },
            () = stop.cancelled() => return,
        };
        match push.kind {
            PushKind::Message | PushKind::SMessage => {
                let (Some(channel), Some(payload)) = (
                    push.data.first().and_then(bytes_of),
                    push.data.get(1).and_then(bytes_of),
                ) else {
                    continue;
                };
                route(&node, &signals, channel, payload);
            }
            PushKind::Disconnection => {
                warn!("bus subscription connection lost");
                if let Some(bus) = node.bus.redis() {
                    bus.set_up(false);
                }
                node.metrics.bus_up.set(0);
                mark_gap_everywhere(&node);
                signals.disconnected.notify_one();
            }
            _ => {}
        }
    }
}

/// Deliver one bus message to this node's sessions.
fn route(node: &Node, signals: &BusSignals, channel: &[u8], payload: &[u8]) {
    let Some(bus) = node.bus.redis() else { return };
    let Ok(channel) = std::str::from_utf8(channel) else {
        return;
    };
    let Some(name) = channel.strip_prefix(bus.keys.prefix()) else {
        return;
    };
    if name.starts_with("probe:") {
        signals.probe_seen.notify_one();
        return;
    }
    let Some((header, frame)) = decode_envelope(payload) else {
        warn!(channel, "undecodable bus message dropped");
        return;
    };
    let frame = Bytes::copy_from_slice(frame);
    let inner = |prefix: &str| {
        name.strip_prefix(prefix)
            .and_then(|rest| rest.strip_prefix('{'))
            .and_then(|rest| rest.strip_suffix('}'))
    };
    if let Some(user) = inner("u:") {
        let Some(cursor) = header.cursor.as_deref().and_then(Cursor::parse) else {
            warn!(channel, "user message without a cursor dropped");
            return;
        };
        let queued = node.hub.deliver_user(user, cursor, &header.id, frame);
        node.status.count(
            &header.id,
            Counts {
                delivered: queued as u64,
                ..Counts::default()
            },
        );
    } else if let Some(topic) = inner("t:") {
        let target = crate::Target::Topic(topic.to_owned());
        let reach = node.hub.deliver_reach(&target, frame, "notification");
        node.status.count(&header.id, reach.into());
    } else if name == "all" {
        let target = header.area.map_or(crate::Target::All, crate::Target::Area);
        let reach = node.hub.deliver_reach(&target, frame, "notification");
        node.status.count(&header.id, reach.into());
    } else if let Some(rest) = name.strip_prefix("g:") {
        let cell = rest
            .split_once(':')
            .and_then(|(_, c)| c.strip_prefix('{'))
            .and_then(|c| c.strip_suffix('}'));
        match (cell, header.area) {
            (Some(cell), Some(area)) => {
                let reach = node.hub.deliver_in_cell(&area, cell, frame);
                node.status.count(&header.id, reach.into());
            }
            _ => warn!(channel, "geo message without a cell or an area dropped"),
        }
    } else {
        debug!(channel, "message on an unknown channel");
    }
}

/// Remember, for every session, what it had when the bus started losing messages.
pub fn mark_gap_everywhere(node: &Node) {
    for s in node.hub.sessions() {
        s.outbound.mark_bus_gap();
    }
}

/// Replay every connected session's inbox from what it had when the bus started losing
/// messages (or from what it last got).
pub fn replay_all(node: &Arc<Node>) {
    let sessions = node.hub.sessions();
    info!(
        sessions = sessions.len(),
        "replaying inboxes after a bus recovery"
    );
    for s in sessions {
        node.tasks.spawn(session::replay(
            node.clone(),
            s.user,
            s.device,
            s.outbound.clone(),
            s.outbound.take_bus_gap(),
        ));
    }
}

/// Watch the bus: recover after a disconnection, probe the subscription end to end, and
/// replay after anything that may have lost messages.
pub async fn run_health(
    node: Arc<Node>,
    bus: Arc<RedisBus>,
    signals: Arc<BusSignals>,
    stop: CancellationToken,
) {
    let interval = node.config.bus_probe_interval();
    let probe_timeout = node.config.bus_probe_timeout();
    let probe_channel = bus.keys.probe_channel(&node.node_id);
    bus.acquire(probe_channel.clone());
    // Broadcasts (and areas too large for cells) reach every node.
    bus.acquire(bus.keys.all_channel());
    while !bus.is_subscribed(&probe_channel) {
        tokio::select! {
            () = tokio::time::sleep(Duration::from_millis(20)) => {}
            () = stop.cancelled() => return,
        }
    }
    let mut first = true;
    loop {
        // Wait for Redis to answer (at once when it is up).
        let mut backoff = Duration::from_millis(100);
        while let Err(e) = bus.ping().await {
            debug!(error = %e, "bus down; retrying");
            tokio::select! {
                () = tokio::time::sleep(backoff) => {}
                () = stop.cancelled() => return,
            }
            backoff = (backoff * 2).min(Duration::from_secs(2));
        }
        // Probe: a message to ourselves proves the subscriptions work end to end.
        let seen = signals.probe_seen.notified();
        tokio::pin!(seen);
        seen.as_mut().enable();
        let probe_ok = bus.publish(&probe_channel, b"probe").await.is_ok()
            && tokio::select! {
                () = &mut seen => true,
                () = tokio::time::sleep(probe_timeout) => false,
                () = stop.cancelled() => return,
            };
        let overflowed = bus.overflowed.swap(false, Ordering::AcqRel);
        if probe_ok && !overflowed {
            if !bus.is_up() {
                bus.set_up(true);
                node.metrics.bus_up.set(1);
                if first {
                    info!("bus up");
                } else {
                    info!("bus recovered");
                    node.metrics.bus_reconnects.inc();
                    replay_all(&node);
                }
                first = false;
            }
        } else {
            if !probe_ok {
                warn!("bus probe failed: resubscribing every channel");
                node.metrics.bus_probe_failures.inc();
                mark_gap_everywhere(&node);
                bus.set_up(false);
                node.metrics.bus_up.set(0);
                if let Err(e) = bus.resubscribe_all().await {
                    warn!(error = %e, "resubscribe failed");
                }
            } else {
                warn!("bus pushes overflowed: replaying every inbox");
                for s in node.hub.sessions() {
                    s.outbound.mark_bus_gap_unknown();
                }
                replay_all(&node);
            }
            continue;
        }
        tokio::select! {
            () = signals.disconnected.notified() => {}
            () = tokio::time::sleep(interval) => {}
            () = stop.cancelled() => return,
        }
    }
}
